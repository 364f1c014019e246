//! NetworkPolicy on this node: Pods, Namespaces, NetworkPolicies, Nodes and
//! SecurityIdentities are watched; every pod's (namespace labels, pod labels) gets a numeric
//! identity allocated cluster-wide through the API (the lowest free number, created as a
//! SecurityIdentity object whose name is the number: a conflict means another agent took it,
//! and the next is tried; when two agents race for the same labels, everyone uses the lowest
//! number); weir-control compiles the policies; the pod datapath programs them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::PostParams;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::Notify;
use weir_control::policy::{self, IdentityLabels, LocalIds, NodeView, PolicyStatus};
use weir_dataplane::pods::PolicyApplyStats;

use crate::pods::Pods;

/// What the agent reports about NetworkPolicy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyReport {
    /// Whether the policy state was programmed from a complete view of the API.
    pub synced: bool,
    /// What the last apply did.
    pub last_apply: PolicyApplyStats,
    /// Every NetworkPolicy: pods selected, rules, entries on this node, warnings.
    pub policies: Vec<PolicyStatus>,
    /// Pods waiting for their identity.
    pub pending_identities: Vec<String>,
    /// Identities known (SecurityIdentity objects).
    pub identities: usize,
    /// Identities this agent allocated.
    pub allocated: u64,
    /// The last error.
    pub last_error: Option<String>,
}

/// The SecurityIdentity resource (weir.dev/v1alpha1).
pub fn identity_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weir.dev", "v1alpha1", "SecurityIdentity"),
        "securityidentities",
    )
}

/// The identity number and labels of a SecurityIdentity object.
fn identity_of(o: &DynamicObject) -> Option<(u32, IdentityLabels)> {
    let id: u32 = o.metadata.name.as_deref()?.parse().ok()?;
    let labels = serde_json::from_value(o.data.get("spec")?.clone()).ok()?;
    Some((id, labels))
}

/// Creates a SecurityIdentity for `labels` with the lowest number not in `taken`. Returns the
/// number, or None when the API refused for another reason than a taken number.
async fn allocate(
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    labels: &IdentityLabels,
    taken: &mut BTreeSet<u32>,
) -> Result<u32, String> {
    let mut next = policy::id::POD_MIN;
    for _ in 0..64 {
        while taken.contains(&next) {
            next += 1;
        }
        if next > policy::id::POD_MAX {
            return Err("no identity number left".into());
        }
        taken.insert(next);
        let mut obj = DynamicObject::new(&next.to_string(), ar);
        obj.data = serde_json::json!({ "spec": labels });
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => return Ok(next),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(format!("creating SecurityIdentity {next}: {e}")),
        }
    }
    Err("every identity number tried was taken".into())
}

/// A reflector callback that wakes the loop.
fn wake<K>(n: &Arc<Notify>) -> impl Fn(Option<&watcher::Event<K>>) + Send + 'static {
    let n = n.clone();
    move |_| n.notify_one()
}

fn node_addresses(n: &Node) -> Vec<IpAddr> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Runs the NetworkPolicy loop for `node` until the process ends.
pub async fn run(
    client: Client,
    pods: Arc<Pods>,
    report: Arc<Mutex<PolicyReport>>,
    flows: Arc<Mutex<crate::flows::FlowLog>>,
    node: String,
) {
    let notify = Arc::new(Notify::new());
    let pod_store = crate::spawn_reflector(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        wake(&notify),
    );
    let ns_store = crate::spawn_reflector(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        wake(&notify),
    );
    let np_store = crate::spawn_reflector(
        Api::<NetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
        wake(&notify),
    );
    let node_store = crate::spawn_reflector(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        wake(&notify),
    );
    let ar = identity_resource();
    let id_api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let writer = reflector::store::Writer::new(ar.clone());
    let id_store = writer.as_reader();
    {
        let n = notify.clone();
        let stream =
            reflector::reflector(writer, watcher::watcher(id_api.clone(), Default::default()))
                .default_backoff();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = futures::StreamExt::next(&mut stream).await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "watching SecurityIdentities failed; retrying");
                }
                n.notify_one();
            }
        });
    }
    for ready in [
        pod_store.wait_until_ready().await,
        ns_store.wait_until_ready().await,
        np_store.wait_until_ready().await,
        node_store.wait_until_ready().await,
        id_store.wait_until_ready().await,
    ] {
        if ready.is_err() {
            tracing::error!("a NetworkPolicy watch ended before its first list");
            return;
        }
    }
    let mut local = LocalIds::default();
    // Identities this agent created, known before the watch reports them.
    let mut created: BTreeMap<IdentityLabels, u32> = BTreeMap::new();
    loop {
        let cluster = policy::Cluster::from_objects(
            ns_store.state().iter().map(|n| &**n),
            pod_store.state().iter().map(|p| &**p),
            np_store.state().iter().map(|p| &**p),
        );
        flows.lock().expect("flow log").pod_names = cluster
            .pods
            .iter()
            .filter(|p| !p.host_network)
            .flat_map(|p| {
                p.ips
                    .iter()
                    .map(move |ip| (*ip, format!("{}/{}", p.namespace, p.name)))
            })
            .collect();

        // Identities: the lowest number for each label set. The ones this agent created
        // count until the watch reports them.
        let known: Vec<(u32, IdentityLabels)> = id_store
            .state()
            .iter()
            .filter_map(|o| identity_of(o))
            .collect();
        let known_ids: BTreeSet<u32> = known.iter().map(|(id, _)| *id).collect();
        created.retain(|_, id| !known_ids.contains(id));
        let mut ids: BTreeMap<IdentityLabels, u32> = created.clone();
        let mut taken: BTreeSet<u32> = created.values().copied().collect();
        for (id, labels) in known {
            taken.insert(id);
            let e = ids.entry(labels).or_insert(id);
            *e = (*e).min(id);
        }
        let mut error = None;
        let mut allocated = 0;
        for labels in cluster.identity_labels() {
            if ids.contains_key(&labels) {
                continue;
            }
            match allocate(&id_api, &ar, &labels, &mut taken).await {
                Ok(id) => {
                    tracing::info!(identity = id, namespace = %labels.namespace, "allocated a security identity");
                    created.insert(labels.clone(), id);
                    ids.insert(labels, id);
                    allocated += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "allocating a security identity");
                    error = Some(e);
                    break;
                }
            }
        }

        let nodes = node_store.state();
        let mut view = NodeView {
            name: node.clone(),
            ..Default::default()
        };
        for n in &nodes {
            let addrs = node_addresses(n);
            if n.metadata.name.as_deref() == Some(node.as_str()) {
                view.own_addrs.extend(addrs);
            } else {
                view.other_addrs.extend(addrs);
            }
        }
        view.own_addrs.extend(
            pods.status
                .lock()
                .expect("pod status")
                .host_addresses
                .iter()
                .copied(),
        );
        let state = policy::compile(&cluster, &view, &|l| ids.get(l).copied(), &mut local);
        let policies = state.policies.clone();
        let pending = state.pending_identities.clone();
        let result = pods.dataplane.lock().expect("pods").set_policy(state);
        {
            let mut r = report.lock().expect("policy report");
            r.policies = policies;
            r.pending_identities = pending;
            r.identities = ids.len();
            r.allocated += allocated;
            match result {
                Ok(stats) => {
                    if stats.entries_added + stats.entries_removed > 0 || !stats.failed.is_empty() {
                        tracing::info!(?stats, "NetworkPolicy programmed");
                    }
                    r.last_apply = stats;
                    r.synced = error.is_none();
                    r.last_error = error;
                }
                Err(e) => {
                    tracing::error!(error = %e, "programming NetworkPolicy; retrying");
                    r.synced = false;
                    r.last_error = Some(e.to_string());
                }
            }
        }
        let retry = report.lock().expect("policy report").last_error.is_some();
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(if retry { Duration::from_millis(500) } else { Duration::from_secs(30) }) => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
