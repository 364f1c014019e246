//! The mesh's connection to the clusterset's etcd: it publishes this cluster's records under
//! a lease of its own (renewed while the mesh reaches etcd, so that etcd deletes them all
//! once the cluster has been gone for the remote TTL), and mirrors every cluster's records
//! into [`Remote`] (a full list, then a watch from the list's revision; after any failure,
//! the list again, so a reconnected mesh converges on whatever changed meanwhile).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use tokio::sync::{watch, Notify};

use crate::record::{self, ClusterRecord, ExportRecord, Key, NodeRecord, PodRecord};
use crate::MeshConfig;

/// Every cluster's records as last read from etcd.
#[derive(Debug, Default)]
pub struct Remote {
    /// Exports by (cluster, namespace, name).
    pub exports: BTreeMap<(String, String, String), Arc<ExportRecord>>,
    /// Pods by (cluster, namespace, name).
    pub pods: BTreeMap<(String, String, String), PodRecord>,
    /// Nodes by (cluster, name).
    pub nodes: BTreeMap<(String, String), NodeRecord>,
    /// Presence records by cluster.
    pub clusters: BTreeMap<String, ClusterRecord>,
    /// ClusterProperties (name -> value) by cluster.
    pub properties: BTreeMap<String, BTreeMap<String, String>>,
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
        let mut t = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
            .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        if let Some(name) = &tls.server_name {
            t = t.domain_name(name.clone());
        }
        opts = opts.with_tls(t);
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
    let mut lease = None;
    loop {
        let err = session(&cfg, own.clone(), &remote, &state, &changed, &mut lease)
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
                remote.exports.insert((c, ns, name), Arc::new(r));
            }
            Err(e) => tracing::warn!(%key, error = %e, "ignoring an unreadable export record"),
        },
        Some(Key::Pod(c, ns, name)) => match serde_json::from_slice(value) {
            Ok(r) => {
                remote.pods.insert((c, ns, name), r);
            }
            Err(e) => tracing::warn!(%key, error = %e, "ignoring an unreadable pod record"),
        },
        Some(Key::Node(c, name)) => match serde_json::from_slice(value) {
            Ok(r) => {
                remote.nodes.insert((c, name), r);
            }
            Err(e) => tracing::warn!(%key, error = %e, "ignoring an unreadable node record"),
        },
        Some(Key::Cluster(c)) => match serde_json::from_slice(value) {
            Ok(r) => {
                remote.clusters.insert(c, r);
            }
            Err(e) => tracing::warn!(%key, error = %e, "ignoring an unreadable cluster record"),
        },
        Some(Key::Properties(c)) => match serde_json::from_slice(value) {
            Ok(r) => {
                remote.properties.insert(c, r);
            }
            Err(e) => tracing::warn!(%key, error = %e, "ignoring unreadable cluster properties"),
        },
        None => {}
    }
}

fn remove_from(remote: &mut Remote, set: &str, key: &str) {
    match record::parse_key(set, key) {
        Some(Key::Export(c, ns, name)) => {
            remote.exports.remove(&(c, ns, name));
        }
        Some(Key::Pod(c, ns, name)) => {
            remote.pods.remove(&(c, ns, name));
        }
        Some(Key::Node(c, name)) => {
            remote.nodes.remove(&(c, name));
        }
        Some(Key::Cluster(c)) => {
            remote.clusters.remove(&c);
        }
        Some(Key::Properties(c)) => {
            remote.properties.remove(&c);
        }
        None => {}
    }
}

/// Whether an etcd error means the connection (or etcd) is gone, rather than that one
/// request was refused (too large, invalid).
fn connection_lost(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal
        ),
        _ => true,
    }
}

/// A lease of `ttl` seconds: `previous` when etcd still has it (a reconnect within the TTL
/// keeps this cluster's records on the lease they are on), else a new one.
async fn lease(client: &mut Client, previous: Option<i64>, ttl: i64) -> Result<i64, String> {
    if let Some(id) = previous {
        let r = timed("checking the lease", client.lease_time_to_live(id, None)).await?;
        if r.ttl() > 0 {
            return Ok(id);
        }
    }
    Ok(timed("granting a lease", client.lease_grant(ttl, None))
        .await?
        .id())
}

/// Renews `lease` every `every` (and the presence record with it) until it fails; the
/// lease has then lapsed or etcd is out of reach.
async fn renew(mut client: Client, cfg: MeshConfig, lease: i64, every: Duration) -> String {
    let (mut keeper, mut stream) =
        match timed("keeping the lease alive", client.lease_keep_alive(lease)).await {
            Ok(k) => k,
            Err(e) => return e,
        };
    let key = record::cluster_key(&cfg.clusterset, &cfg.cluster);
    let opts = PutOptions::new().with_lease(lease);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = timed("renewing the lease", keeper.keep_alive()).await {
            return e;
        }
        match timed("renewing the lease", stream.message()).await {
            Ok(Some(r)) if r.ttl() > 0 => {}
            Ok(_) => {
                return "the lease expired (the cluster was cut off longer than the remote TTL)"
                    .into()
            }
            Err(e) => return e,
        }
        let rec = ClusterRecord {
            cluster: cfg.cluster.clone(),
            renewed_at: jiff::Timestamp::now().to_string(),
        };
        let v = serde_json::to_string(&rec).expect("json");
        if let Err(e) = timed(
            "renewing the presence",
            client.put(key.as_str(), v, Some(opts.clone())),
        )
        .await
        {
            return e;
        }
    }
}

/// One connection's life: list, watch, publish and renew until something fails.
async fn session(
    cfg: &MeshConfig,
    mut own: watch::Receiver<BTreeMap<String, String>>,
    remote: &Mutex<Remote>,
    state: &Mutex<LinkState>,
    changed: &Notify,
    last_lease: &mut Option<i64>,
) -> Result<(), String> {
    let mut client = connect(cfg).await?;
    let ttl = cfg.remote_ttl.as_secs().max(2) as i64;
    let lease = lease(&mut client, *last_lease, ttl).await?;
    *last_lease = Some(lease);
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
    // What etcd holds of this cluster's records: what a previous session (or mesh) left,
    // to be replaced by what is wanted now.
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    {
        let mut r = remote.lock().expect("remote");
        r.exports.clear();
        r.pods.clear();
        r.nodes.clear();
        r.clusters.clear();
        r.properties.clear();
        for kv in listed.kvs() {
            let key = kv.key_str().unwrap_or_default();
            if record::is_own(&cfg.clusterset, &cfg.cluster, key) {
                published.insert(key.to_string(), String::new());
            }
            parse_into(&mut r, &cfg.clusterset, key, kv.value());
        }
        r.synced = true;
    }
    set_state(state, true, None);
    tracing::info!(revision, lease, "connected to etcd; clusterset listed");
    changed.notify_one();

    let renew_every =
        (cfg.remote_ttl / 4).clamp(Duration::from_millis(500), Duration::from_secs(5));
    let mut renewal = tokio::spawn(renew(client.clone(), cfg.clone(), lease, renew_every));
    let put_opts = PutOptions::new().with_lease(lease);
    own.mark_changed();
    // Publishing runs beside the watch (not between its messages): a thousand records to
    // write must not hold back what the other clusters publish meanwhile.
    let publisher = async {
        loop {
            if own.changed().await.is_err() {
                return Ok(()); // the mesh is stopping
            }
            let want = own.borrow_and_update().clone();
            publish(&client, &want, &mut published, &put_opts, state).await?;
            changed.notify_one();
        }
    };
    tokio::pin!(publisher);
    let result = loop {
        tokio::select! {
            e = &mut renewal => break Err(e.unwrap_or_else(|e| e.to_string())),
            r = &mut publisher => break r,
            m = stream.message() => {
                let resp = match m {
                    Ok(Some(r)) => r,
                    Ok(None) => break Err("the etcd watch ended".into()),
                    Err(e) => break Err(format!("watching the clusterset: {e}")),
                };
                if resp.canceled() {
                    break Err(format!("the etcd watch was canceled: {}", resp.cancel_reason()));
                }
                if apply_events(&mut remote.lock().expect("remote"), &cfg.clusterset, resp.events()) {
                    changed.notify_one();
                }
            }
        }
    };
    renewal.abort();
    result
}

/// How many etcd writes the link has in flight at once: etcd commits concurrent proposals
/// together (one WAL sync for many), so written one by one a thousand records took seconds.
const PUTS_IN_FLIGHT: usize = 32;

/// Writes what changed of this cluster's records (under the session's lease) and deletes
/// what is no longer wanted, [`PUTS_IN_FLIGHT`] at a time. A record etcd refuses (too large,
/// say) is left out and reported; a lost connection ends the session.
async fn publish(
    client: &Client,
    want: &BTreeMap<String, String>,
    published: &mut BTreeMap<String, String>,
    opts: &PutOptions,
    state: &Mutex<LinkState>,
) -> Result<(), String> {
    let todo: Vec<(String, String)> = want
        .iter()
        .filter(|(k, v)| published.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (c, o) = (client.clone(), opts.clone());
    let puts = todo.into_iter().map(move |(k, v)| {
        let (mut client, opts) = (c.clone(), o.clone());
        async move {
            let r =
                tokio::time::timeout(CALL_TIMEOUT, client.put(k.as_str(), v.as_str(), Some(opts)))
                    .await;
            (k, v, r)
        }
    });
    let results: Vec<_> = futures::stream::iter(puts)
        .buffer_unordered(PUTS_IN_FLIGHT)
        .collect()
        .await;
    let mut refused = None;
    for (k, v, r) in results {
        match r {
            Ok(Ok(_)) => {
                published.insert(k, v);
            }
            Ok(Err(e)) if !connection_lost(&e) => {
                tracing::warn!(key = %k, error = %e, "etcd refused a record");
                refused = Some(format!("publishing {k}: {e}"));
            }
            Ok(Err(e)) => return Err(format!("publishing {k}: {e}")),
            Err(_) => return Err(format!("publishing {k}: no answer within {CALL_TIMEOUT:?}")),
        }
    }
    let gone: Vec<String> = published
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    let c = client.clone();
    let deletes = gone.into_iter().map(move |k| {
        let mut client = c.clone();
        async move {
            let r = timed("withdrawing an export", client.delete(k.as_str(), None)).await;
            (k, r)
        }
    });
    let results: Vec<_> = futures::stream::iter(deletes)
        .buffer_unordered(PUTS_IN_FLIGHT)
        .collect()
        .await;
    for (k, r) in results {
        r?;
        published.remove(&k);
    }
    let mut s = state.lock().expect("link state");
    s.published = published.clone();
    s.last_error = refused;
    Ok(())
}

/// Applies watch events to `remote`; whether anything the mesh acts on changed (a cluster's
/// presence renewal alone does not).
fn apply_events(remote: &mut Remote, set: &str, events: &[etcd_client::Event]) -> bool {
    let mut acted = false;
    for ev in events {
        let Some(kv) = ev.kv() else { continue };
        let key = kv.key_str().unwrap_or_default();
        let renewal = matches!(record::parse_key(set, key), Some(Key::Cluster(ref c)) if remote.clusters.contains_key(c));
        match ev.event_type() {
            EventType::Put => parse_into(remote, set, key, kv.value()),
            EventType::Delete => remove_from(remote, set, key),
        }
        acted |= !(renewal && ev.event_type() == EventType::Put);
    }
    acted
}
