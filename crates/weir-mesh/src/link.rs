//! The mesh's connection to the clusterset's etcd: it publishes this cluster's records under
//! a lease of its own (renewed while the mesh reaches etcd, so that etcd deletes them all
//! once the cluster has been gone for the remote TTL), and mirrors every cluster's records
//! into [`Remote`] (a full list, then a watch from the list's revision; after any failure,
//! the list again, so a reconnected mesh converges on whatever changed meanwhile).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use tokio::sync::{watch, Notify};

use crate::record::{self, ClusterRecord, ExportRecord, Key};
use crate::MeshConfig;

/// Every cluster's records as last read from etcd.
#[derive(Debug, Default)]
pub struct Remote {
    /// Exports by (cluster, namespace, name).
    pub exports: BTreeMap<(String, String, String), ExportRecord>,
    /// Presence records by cluster.
    pub clusters: BTreeMap<String, ClusterRecord>,
    /// True once a complete list has been read: before that, nothing may be concluded from
    /// what is missing.
    pub synced: bool,
}

/// The link's state, for the mesh's status.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    /// Whether etcd answers now.
    pub connected: bool,
    /// Since when it has (or has not).
    pub since: String,
    /// The keys of this cluster's records as last written (key → value).
    pub published: BTreeMap<String, String>,
    /// The last error.
    pub last_error: Option<String>,
}

/// How long one etcd call may take before the connection counts as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

async fn connect(cfg: &MeshConfig) -> Result<Client, String> {
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
    if let Some(tls) = &cfg.etcd_tls {
        opts = opts.with_tls(
            TlsOptions::new()
                .domain_name("localhost")
                .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
                .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?)),
        );
    }
    timed(
        "connecting to etcd",
        Client::connect(cfg.etcd_endpoints.clone(), Some(opts)),
    )
    .await
}

fn set_state(state: &Mutex<LinkState>, connected: bool, err: Option<String>) {
    let mut s = state.lock().expect("link state");
    if s.connected != connected || s.since.is_empty() {
        s.connected = connected;
        s.since = jiff::Timestamp::now().to_string();
    }
    if err.is_some() || connected {
        s.last_error = err;
    }
}

/// Runs the link forever: `own` carries this cluster's records (key → JSON value, without
/// the presence record, which the link renews itself); `remote` receives every cluster's;
/// `changed` is notified after each change of `remote` or of the link's state.
pub async fn run(
    cfg: MeshConfig,
    own: watch::Receiver<BTreeMap<String, String>>,
    remote: Arc<Mutex<Remote>>,
    state: Arc<Mutex<LinkState>>,
    changed: Arc<Notify>,
) {
    loop {
        let err = session(&cfg, own.clone(), &remote, &state, &changed)
            .await
            .err();
        if let Some(e) = &err {
            tracing::warn!(error = %e, "etcd session ended; reconnecting");
        }
        // What was published stays in etcd until the lease lapses: exports stay Ready.
        set_state(&state, false, err);
        changed.notify_one();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn parse_into(remote: &mut Remote, set: &str, key: &str, value: &[u8]) {
    match record::parse_key(set, key) {
        Some(Key::Export(c, ns, name)) => match serde_json::from_slice(value) {
            Ok(r) => {
                remote.exports.insert((c, ns, name), r);
            }
            Err(e) => tracing::warn!(%key, error = %e, "ignoring an unreadable export record"),
        },
        Some(Key::Cluster(c)) => match serde_json::from_slice(value) {
            Ok(r) => {
                remote.clusters.insert(c, r);
            }
            Err(e) => tracing::warn!(%key, error = %e, "ignoring an unreadable cluster record"),
        },
        None => {}
    }
}

fn remove_from(remote: &mut Remote, set: &str, key: &str) {
    match record::parse_key(set, key) {
        Some(Key::Export(c, ns, name)) => {
            remote.exports.remove(&(c, ns, name));
        }
        Some(Key::Cluster(c)) => {
            remote.clusters.remove(&c);
        }
        None => {}
    }
}

/// One connection's life: list, watch, publish and renew until something fails.
async fn session(
    cfg: &MeshConfig,
    mut own: watch::Receiver<BTreeMap<String, String>>,
    remote: &Mutex<Remote>,
    state: &Mutex<LinkState>,
    changed: &Notify,
) -> Result<(), String> {
    let mut client = connect(cfg).await?;
    let ttl = cfg.remote_ttl.as_secs().max(2) as i64;
    let lease = timed("granting a lease", client.lease_grant(ttl, None))
        .await?
        .id();
    let (mut keeper, mut keep_stream) =
        timed("keeping the lease alive", client.lease_keep_alive(lease)).await?;
    let prefix = record::prefix(&cfg.clusterset);
    let listed = timed(
        "listing the clusterset",
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = listed.header().map(|h| h.revision()).unwrap_or(0);
    let mut stream = timed(
        "watching the clusterset",
        client.watch(
            prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await?;
    {
        let mut r = remote.lock().expect("remote");
        r.exports.clear();
        r.clusters.clear();
        for kv in listed.kvs() {
            parse_into(
                &mut r,
                &cfg.clusterset,
                kv.key_str().unwrap_or_default(),
                kv.value(),
            );
        }
        r.synced = true;
    }
    set_state(state, true, None);
    tracing::info!(revision, lease, "connected to etcd; clusterset listed");
    changed.notify_one();

    let put_opts = PutOptions::new().with_lease(lease);
    let presence_key = record::cluster_key(&cfg.clusterset, &cfg.cluster);
    let renew_every =
        (cfg.remote_ttl / 4).clamp(Duration::from_millis(500), Duration::from_secs(5));
    let mut renew = tokio::time::interval(renew_every);
    // This session's lease is new: everything is written again under it.
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    own.mark_changed();
    loop {
        tokio::select! {
            _ = renew.tick() => {
                timed("renewing the lease", keeper.keep_alive()).await?;
                match timed("renewing the lease", keep_stream.message()).await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Err("the lease expired (the cluster was cut off longer than the remote TTL)".into()),
                }
                let rec = ClusterRecord {
                    cluster: cfg.cluster.clone(),
                    renewed_at: jiff::Timestamp::now().to_string(),
                };
                let v = serde_json::to_string(&rec).expect("json");
                timed("renewing the presence", client.put(presence_key.as_str(), v, Some(put_opts.clone()))).await?;
            }
            r = own.changed() => {
                if r.is_err() {
                    return Ok(()); // the mesh is stopping
                }
                let want = own.borrow_and_update().clone();
                for (k, v) in &want {
                    if published.get(k) != Some(v) {
                        timed("publishing an export", client.put(k.as_str(), v.as_str(), Some(put_opts.clone()))).await?;
                        published.insert(k.clone(), v.clone());
                    }
                }
                let gone: Vec<String> = published.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
                for k in gone {
                    timed("withdrawing an export", client.delete(k.as_str(), None)).await?;
                    published.remove(&k);
                }
                state.lock().expect("link state").published = published.clone();
                changed.notify_one();
            }
            m = stream.message() => {
                let resp = m.map_err(|e| format!("watching the clusterset: {e}"))?
                    .ok_or("the etcd watch ended")?;
                if resp.canceled() {
                    return Err(format!("the etcd watch was canceled: {}", resp.cancel_reason()));
                }
                let mut r = remote.lock().expect("remote");
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = kv.key_str().unwrap_or_default();
                    match ev.event_type() {
                        EventType::Put => parse_into(&mut r, &cfg.clusterset, key, kv.value()),
                        EventType::Delete => remove_from(&mut r, &cfg.clusterset, key),
                    }
                }
                drop(r);
                changed.notify_one();
            }
        }
    }
}
