//! NetworkPolicy on this node: Pods, Namespaces, NetworkPolicies, Nodes and
//! SecurityIdentities are watched; every pod's (namespace labels, pod labels) gets a numeric
//! identity allocated cluster-wide through the API (the lowest free number, created as a
//! SecurityIdentity object whose name is the number: a conflict means another agent took it,
//! and the next is tried; when two agents race for the same labels, everyone uses the lowest
//! number); weir-control compiles the policies; the pod datapath programs them.
//!
//! Identities are collected as Cilium's operator does with CiliumIdentities: one that no pod
//! needs (no pod has its labels any more, or it lost a race for its labels to a lower number)
//! for the grace period is deleted, with the object's uid and resourceVersion as
//! preconditions. Every agent collects; a deletion another agent made first is a 404. The grace
//! period covers watches that lag: a pod another node just started may already use an
//! identity this agent's Pod watch has not shown it yet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::Notify;
use weir_control::policy::{self, IdentityLabels, LocalIds, NodeView, PolicyStatus};
use weir_dataplane::pods::PolicyApplyStats;

use crate::pods::Pods;

/// Pod (`namespace/name`) -> the policies isolating it for ingress and for egress.
fn isolating(
    statuses: &[PolicyStatus],
) -> std::collections::HashMap<String, (Vec<String>, Vec<String>)> {
    let mut out: std::collections::HashMap<String, (Vec<String>, Vec<String>)> = Default::default();
    for s in statuses {
        let name = format!("{}/{}", s.namespace, s.name);
        for pod in &s.selected {
            let e = out.entry(pod.clone()).or_default();
            if s.ingress {
                e.0.push(name.clone());
            }
            if s.egress {
                e.1.push(name.clone());
            }
        }
    }
    out
}

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
    /// Identities no pod needs, deleted once unused for the grace period.
    pub unused_identities: Vec<u32>,
    /// Identities this agent deleted.
    pub collected: u64,
    /// The last error.
    pub last_error: Option<String>,
}

/// The SecurityIdentity resource (weir.dev/v1alpha1).
pub fn identity_resource() -> ApiResource {
    crate::api_resource(&weir_model::kinds::SECURITY_IDENTITY)
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

/// The identities no pod needs: those whose labels no pod has (`wanted`), and those that lost a
/// race for their labels to a lower number.
pub fn unused_identities(
    known: &[(u32, IdentityLabels)],
    wanted: &BTreeSet<IdentityLabels>,
) -> BTreeSet<u32> {
    let mut lowest: BTreeMap<&IdentityLabels, u32> = BTreeMap::new();
    for (id, labels) in known {
        let e = lowest.entry(labels).or_insert(*id);
        *e = (*e).min(*id);
    }
    known
        .iter()
        .filter(|(id, labels)| !wanted.contains(labels) || lowest[labels] != *id)
        .map(|(id, _)| *id)
        .collect()
}

/// When each unused identity was first seen unused.
#[derive(Debug, Default)]
pub struct IdentityGc {
    since: BTreeMap<u32, Instant>,
}

impl IdentityGc {
    /// Records what is unused `now`; returns the identities unused for `grace` or longer. An
    /// identity used again starts afresh.
    pub fn due(&mut self, unused: &BTreeSet<u32>, now: Instant, grace: Duration) -> Vec<u32> {
        self.since.retain(|id, _| unused.contains(id));
        for id in unused {
            self.since.entry(*id).or_insert(now);
        }
        self.since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= grace)
            .map(|(id, _)| *id)
            .collect()
    }

    /// When the next identity falls due.
    pub fn next_due(&self, grace: Duration) -> Option<Instant> {
        self.since.values().min().map(|t| *t + grace)
    }

    /// The identities waiting for their grace period to end.
    pub fn pending(&self) -> Vec<u32> {
        self.since.keys().copied().collect()
    }

    /// Forgets `id` (deleted).
    pub fn forget(&mut self, id: u32) {
        self.since.remove(&id);
    }
}

/// What became of an identity to collect.
enum Collected {
    /// This agent deleted it.
    Deleted,
    /// Another agent deleted it first.
    Gone,
    /// It changed since this agent saw it: judged again on the next pass.
    Changed,
}

/// Deletes the SecurityIdentity `obj` if it is unchanged (uid and resourceVersion).
async fn collect(api: &Api<DynamicObject>, obj: &DynamicObject) -> Result<Collected, String> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: obj.metadata.uid.clone(),
            resource_version: obj.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => Ok(Collected::Deleted),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Collected::Gone),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Collected::Changed),
        Err(e) => Err(format!("deleting SecurityIdentity {name}: {e}")),
    }
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

/// In a clusterset: every local pod's identity carries `weir.dev/cluster=<this cluster>`
/// (whatever label the pod set itself), and the other clusters' pods join as peers with
/// theirs.
fn add_clusterset(cluster: &mut policy::Cluster, id: Option<&str>, remote: &[Arc<DynamicObject>]) {
    let Some(id) = id else { return };
    for p in &mut cluster.pods {
        p.labels.insert(policy::CLUSTER_LABEL.into(), id.into());
    }
    for r in remote {
        let spec = r.data.get("spec").cloned().unwrap_or_default();
        let text = |k: &str| {
            spec.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let map = |k: &str| -> BTreeMap<String, String> {
            serde_json::from_value(spec.get(k).cloned().unwrap_or_default()).unwrap_or_default()
        };
        let c = text("cluster");
        if c.is_empty() || c == id {
            continue;
        }
        let mut labels = map("labels");
        labels.insert(policy::CLUSTER_LABEL.into(), c.clone());
        cluster.pods.push(policy::PodInfo {
            namespace: text("namespace"),
            name: text("pod"),
            labels,
            ips: spec
                .get("ips")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str()?.parse().ok())
                .collect(),
            ports: spec
                .get("ports")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some(policy::NamedPort {
                        name: p.get("name")?.as_str()?.to_string(),
                        protocol: policy::Protocol::parse(
                            p.get("protocol").and_then(|v| v.as_str()),
                        )?,
                        port: u16::try_from(p.get("port")?.as_i64()?).ok()?,
                    })
                })
                .collect(),
            node: None,
            host_network: false,
            cluster: Some(c),
            namespace_labels: Some(map("namespaceLabels")),
        });
    }
}

/// Runs the NetworkPolicy loop for `node` until the process ends.
pub async fn run(
    client: Client,
    pods: Arc<Pods>,
    report: Arc<Mutex<PolicyReport>>,
    flows: Arc<Mutex<crate::flows::FlowLog>>,
    node: String,
    gc_grace: Duration,
    cluster_id: Option<String>,
) {
    let notify = Arc::new(Notify::new());
    // Other clusters' pods (the mesh writes them): NetworkPolicy peers.
    let remote_store = crate::spawn_optional_kind_reflector(
        &client,
        &weir_model::kinds::REMOTE_ENDPOINT,
        watcher::Config::default(),
        wake(&notify),
    );
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
        remote_store.wait_until_ready().await,
    ] {
        if ready.is_err() {
            tracing::error!("a NetworkPolicy watch ended before its first list");
            return;
        }
    }
    let mut local = LocalIds::default();
    local.continue_origins_after(pods.dataplane.lock().expect("pods").largest_policy_origin());
    // Identities this agent created, known before the watch reports them.
    let mut created: BTreeMap<IdentityLabels, u32> = BTreeMap::new();
    let mut gc = IdentityGc::default();
    loop {
        let mut cluster = policy::Cluster::from_objects(
            ns_store.state().iter().map(|n| &**n),
            pod_store.state().iter().map(|p| &**p),
            np_store.state().iter().map(|p| &**p),
        );
        add_clusterset(&mut cluster, cluster_id.as_deref(), &remote_store.state());
        {
            let names = cluster
                .pods
                .iter()
                .filter(|p| !p.host_network)
                .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.key())))
                .collect();
            let metas = pod_store
                .state()
                .iter()
                .map(|p| {
                    let key = format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref().unwrap_or("default"),
                        p.metadata.name.as_deref().unwrap_or_default()
                    );
                    let meta = crate::flows::PodMeta {
                        workload: crate::flows::workload_of(p),
                        labels: p.metadata.labels.clone().unwrap_or_default(),
                    };
                    (key, meta)
                })
                .collect();
            flows.lock().expect("flow log").set_pods(names, metas);
        }

        // Identities: the lowest number for each label set. The ones this agent created
        // count until the watch reports them.
        let id_objects = id_store.state();
        let known: Vec<(u32, IdentityLabels)> =
            id_objects.iter().filter_map(|o| identity_of(o)).collect();
        let known_ids: BTreeSet<u32> = known.iter().map(|(id, _)| *id).collect();
        created.retain(|_, id| !known_ids.contains(id));
        let mut ids: BTreeMap<IdentityLabels, u32> = created.clone();
        let mut taken: BTreeSet<u32> = created.values().copied().collect();
        for (id, labels) in &known {
            taken.insert(*id);
            let e = ids.entry(labels.clone()).or_insert(*id);
            *e = (*e).min(*id);
        }
        let mut error = None;
        let mut allocated = 0;
        let wanted = cluster.identity_labels();
        for labels in &wanted {
            if ids.contains_key(labels) {
                continue;
            }
            match allocate(&id_api, &ar, labels, &mut taken).await {
                Ok(id) => {
                    tracing::info!(identity = id, namespace = %labels.namespace, "allocated a security identity");
                    created.insert(labels.clone(), id);
                    ids.insert(labels.clone(), id);
                    allocated += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "allocating a security identity");
                    error = Some(e);
                    break;
                }
            }
        }

        // Garbage collection, once every identity a pod needs has its number.
        let mut collected = 0;
        if error.is_none() {
            // The objects `known` was read from: the one deleted is the one judged unused.
            let by_id: BTreeMap<u32, &DynamicObject> = id_objects
                .iter()
                .filter_map(|o| Some((identity_of(o)?.0, &**o)))
                .collect();
            let unused = unused_identities(&known, &wanted);
            for id in gc.due(&unused, Instant::now(), gc_grace) {
                let Some(obj) = by_id.get(&id) else {
                    gc.forget(id);
                    continue;
                };
                match collect(&id_api, obj).await {
                    Ok(Collected::Deleted) => {
                        tracing::info!(identity = id, "deleted an unused security identity");
                        gc.forget(id);
                        collected += 1;
                    }
                    Ok(Collected::Gone | Collected::Changed) => gc.forget(id),
                    Err(e) => {
                        tracing::warn!(error = %e, "collecting a security identity");
                        error = Some(e);
                        break;
                    }
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
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (ep, p) in &state.endpoints {
                tracing::debug!(endpoint = %ep, ingress = ?p.ingress, egress = ?p.egress, "policy entries");
            }
            tracing::debug!(ipcache = ?state.ipcache, "ipcache");
        }
        let policies = state.policies.clone();
        {
            let mut log = flows.lock().expect("flow log");
            log.isolating = isolating(&policies);
            log.set_origins(&state.origins);
        }
        let pending = state.pending_identities.clone();
        let started = std::time::Instant::now();
        let result = pods.dataplane.lock().expect("pods").set_policy(state);
        crate::metrics::record_apply("policy", started.elapsed().as_secs_f64(), result.is_ok());
        let mut programmed = false;
        {
            let mut r = report.lock().expect("policy report");
            r.policies = policies;
            r.pending_identities = pending;
            r.identities = ids.len();
            r.allocated += allocated;
            r.collected += collected;
            r.unused_identities = gc.pending();
            match result {
                Ok(stats) => {
                    if stats.entries_added + stats.entries_removed + stats.entries_updated > 0
                        || !stats.failed.is_empty()
                    {
                        tracing::info!(?stats, "NetworkPolicy programmed");
                    }
                    programmed = true;
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
        // Under netfilter, established flows a changed policy denies are cut here (the eBPF
        // datapath judges them again itself).
        if programmed {
            match crate::pods::cut_denied_flows(&pods) {
                Ok(0) => {}
                Ok(n) => tracing::info!(flows = n, "flows the new policy denies cut"),
                Err(e) => tracing::warn!(error = %e, "cutting denied flows"),
            }
        }
        let retry = report.lock().expect("policy report").last_error.is_some();
        let mut wait = if retry {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(30)
        };
        if let Some(due) = gc.next_due(gc_grace) {
            wait =
                wait.min(due.saturating_duration_since(Instant::now()) + Duration::from_millis(10));
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(ns: &str, pod: &str) -> IdentityLabels {
        IdentityLabels {
            namespace: ns.into(),
            namespace_labels: BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                ns.to_string(),
            )]),
            pod_labels: BTreeMap::from([("app".to_string(), pod.to_string())]),
        }
    }

    #[test]
    fn unused_identities_are_the_label_sets_no_pod_has_and_the_losers_of_races() {
        let known = vec![
            (256, labels("x", "a")),
            (257, labels("x", "b")),
            (258, labels("x", "a")), // lost the race for x/a to 256
            (259, labels("y", "gone")),
        ];
        let wanted = BTreeSet::from([labels("x", "a"), labels("x", "b")]);
        assert_eq!(
            unused_identities(&known, &wanted),
            BTreeSet::from([258, 259])
        );
        assert!(unused_identities(&known[..2], &wanted).is_empty());
    }

    #[test]
    fn identities_fall_due_after_the_grace_period_unless_used_again() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut gc = IdentityGc::default();
        assert!(gc.due(&BTreeSet::from([300, 301]), t0, grace).is_empty());
        assert_eq!(gc.next_due(grace), Some(t0 + grace));
        // 301 is used again before the grace period ends; 302 becomes unused later.
        let t1 = t0 + Duration::from_secs(30);
        assert!(gc.due(&BTreeSet::from([300, 302]), t1, grace).is_empty());
        assert_eq!(gc.pending(), vec![300, 302]);
        let t2 = t0 + grace;
        assert_eq!(
            gc.due(&BTreeSet::from([300, 301, 302]), t2, grace),
            vec![300]
        );
        gc.forget(300);
        // 301 starts afresh at t2; 302 falls due at t1 + grace.
        assert_eq!(gc.next_due(grace), Some(t1 + grace));
        assert_eq!(
            gc.due(&BTreeSet::from([301, 302]), t2 + grace, grace),
            vec![301, 302]
        );
        assert!(gc.next_due(grace).is_some());
        assert!(gc.due(&BTreeSet::new(), t2 + grace, grace).is_empty());
        assert_eq!(gc.next_due(grace), None);
    }

    #[test]
    fn other_clusters_pods_join_as_peers() {
        use serde_json::json;
        let ns = |n: &str, labels: serde_json::Value| -> Namespace {
            serde_json::from_value(json!({"metadata": {"name": n, "labels": labels}})).unwrap()
        };
        let pod = |n: &str, name: &str, ip: &str, labels: serde_json::Value| -> Pod {
            serde_json::from_value(
                json!({"metadata": {"namespace": n, "name": name, "labels": labels},
                "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
            )
            .unwrap()
        };
        let nss = [ns("mcs", json!({})), ns("team", json!({}))];
        let pods = [
            pod("mcs", "hello-1", "10.244.1.3", json!({"app": "hello"})),
            pod("team", "client", "10.244.1.4", json!({})),
        ];
        let np: NetworkPolicy = serde_json::from_value(json!({"metadata": {"namespace": "mcs", "name": "p"},
            "spec": {"podSelector": {"matchLabels": {"app": "hello"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}}))
        .unwrap();
        let mut c = policy::Cluster::from_objects(nss.iter(), pods.iter(), [&np]);
        let rep = |name: &str, n: &str, ip: &str, nsl: serde_json::Value| {
            let ar = crate::policy::identity_resource();
            let mut o = DynamicObject::new(name, &ar);
            o.data = json!({"spec": {"cluster": "c2", "namespace": n, "pod": "client", "ips": [ip],
                                     "labels": {}, "namespaceLabels": nsl,
                                     "ports": [{"name": "web", "protocol": "TCP", "port": 8080}]}});
            Arc::new(o)
        };
        add_clusterset(
            &mut c,
            Some("c1"),
            &[
                rep(
                    "c2.team.client",
                    "team",
                    "10.245.1.4",
                    json!({"kubernetes.io/metadata.name": "team", "team": "a"}),
                ),
                rep(
                    "c2.mcs.client",
                    "mcs",
                    "10.245.1.2",
                    json!({"kubernetes.io/metadata.name": "mcs"}),
                ),
            ],
        );
        let ids: BTreeMap<IdentityLabels, u32> =
            c.identity_labels().into_iter().zip(256..).collect();
        let view = NodeView {
            name: "node-1".into(),
            ..Default::default()
        };
        let st = policy::compile(
            &c,
            &view,
            &|l| ids.get(l).copied(),
            &mut LocalIds::default(),
        );
        let ep = &st.endpoints["mcs/hello-1"];
        let peers: Vec<u32> = ep
            .ingress
            .as_ref()
            .unwrap()
            .keys()
            .map(|e| e.peer)
            .collect();
        let class =
            |ip: &str| st.ipcache[&ipnet::IpNet::from(ip.parse::<IpAddr>().unwrap())].ns_class;
        assert!(
            peers.contains(&class("10.245.1.4")),
            "{peers:?} {:?}",
            st.ipcache
        );
        assert!(!peers.contains(&class("10.245.1.2")), "{peers:?}");
        assert!(!peers.contains(&class("10.244.1.4")), "{peers:?}");
        // A remote pod's named ports are known (egress rules resolve them on the peer).
        let remote = c.pods.iter().find(|p| p.cluster.is_some()).unwrap();
        assert_eq!(remote.ports[0].port, 8080);
    }
}
