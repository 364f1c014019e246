//! The lab's controller manager: the EndpointSlice controller, a round-robin scheduler for
//! Pods with no `spec.nodeName`, and a LoadBalancer IP allocator (as a cloud controller or
//! MetalLB would): LoadBalancer Services get an ingress IP from the lab's pool in their status.

/// A lab's LoadBalancer IP pool (a clusterset's clusters have one each, see
/// [`crate::paths::Layout::lb_pool`]); the external host routes it to every node (ECMP).
pub const LB_POOL: &str = "172.30.100.0/24";

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::Client;
use serde_json::json;
use tokio::sync::Notify;

use weir_agent::spawn_reflector;

use crate::endpoints::{self, CONTROLLER_NAME, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};
use crate::LabError;

fn rv(s: &EndpointSlice) -> u64 {
    s.metadata
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

/// The controller state: reflector stores plus what this controller wrote but may not have
/// seen come back through its watch yet (so it never acts twice on a stale view).
struct Controller {
    client: Client,
    services: Store<Service>,
    pods: Store<Pod>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    written: HashMap<(String, String), EndpointSlice>,
    deleted: HashSet<(String, String)>,
    bound: HashSet<String>,
    next_node: usize,
    /// LoadBalancer IPs given out and not yet seen in a Service's status.
    lb_assigned: HashMap<(String, String), std::net::Ipv4Addr>,
    lb_pool: ipnet::Ipv4Net,
    /// When the change that started this pass was seen: the slices written get it as
    /// `endpoints.kubernetes.io/last-change-trigger-time`, from which proxies measure their
    /// network programming latency.
    triggered: jiff::Timestamp,
}

/// The annotation of an EndpointSlice telling when the change it carries happened
/// (v1.EndpointsLastChangeTriggerTime, RFC 3339 with nanoseconds).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn with_trigger_time(mut s: EndpointSlice, t: jiff::Timestamp) -> EndpointSlice {
    s.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(TRIGGER_TIME_ANNOTATION.into(), t.to_string());
    s
}

fn notifier<K>(notify: &Arc<Notify>) -> impl Fn(Option<&watcher::Event<K>>) + Send + 'static {
    let notify = notify.clone();
    move |_| notify.notify_one()
}

impl Controller {
    /// Managed slices of a Service: the reflector's view overlaid with our own recent writes.
    fn slices_of(&mut self, ns: &str, svc: &str) -> Vec<EndpointSlice> {
        let mut by_name: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        for s in self.slices.state() {
            if s.metadata.namespace.as_deref() != Some(ns) {
                continue;
            }
            let labels = s.metadata.labels.clone().unwrap_or_default();
            if labels.get(SERVICE_NAME_LABEL).map(String::as_str) != Some(svc)
                || labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(CONTROLLER_NAME)
            {
                continue;
            }
            by_name.insert(s.metadata.name.clone().unwrap_or_default(), (*s).clone());
        }
        // Forget overlay entries the watch has caught up with.
        self.deleted
            .retain(|k| k.0 != ns || by_name.contains_key(&k.1));
        let seen: Vec<(String, String)> = self
            .written
            .iter()
            .filter(|(k, w)| k.0 == ns && by_name.get(&k.1).is_some_and(|s| rv(s) >= rv(w)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in seen {
            self.written.remove(&k);
        }
        for ((wns, name), w) in &self.written {
            let owner = w
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str);
            if wns == ns && owner == Some(svc) {
                by_name.insert(name.clone(), w.clone());
            }
        }
        by_name.retain(|n, _| !self.deleted.contains(&key(ns, n)));
        by_name.into_values().collect()
    }

    async fn reconcile_service(&mut self, svc: &Service, pods: &[Pod]) -> Result<(), LabError> {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let existing = self.slices_of(&ns, &name);
        let plan = endpoints::plan(svc, pods, &existing);
        if plan.is_empty() {
            return Ok(());
        }
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
        let err = |what: &str, e: kube::Error| {
            LabError::Kube(format!("{what} EndpointSlice for service {ns}/{name}: {e}"))
        };
        for s in plan.create {
            let s = with_trigger_time(s, self.triggered);
            let created = api
                .create(&PostParams::default(), &s)
                .await
                .map_err(|e| err("creating", e))?;
            self.written.insert(
                key(&ns, created.metadata.name.as_deref().unwrap_or_default()),
                created,
            );
        }
        for s in plan.update {
            let s = with_trigger_time(s, self.triggered);
            let n = s.metadata.name.clone().unwrap_or_default();
            match api.replace(&n, &PostParams::default(), &s).await {
                Ok(updated) => {
                    self.written.insert(key(&ns, &n), updated);
                }
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                    // Our view was stale; the watch will bring the current one.
                    self.written.remove(&key(&ns, &n));
                    return Err(LabError::Kube(format!(
                        "EndpointSlice {ns}/{n} changed meanwhile; retrying"
                    )));
                }
                Err(e) => return Err(err("updating", e)),
            }
        }
        for n in plan.delete {
            match api.delete(&n, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(err("deleting", e)),
            }
            self.written.remove(&key(&ns, &n));
            self.deleted.insert(key(&ns, &n));
        }
        Ok(())
    }

    /// Deletes managed slices whose Service is gone (what owner-reference garbage collection
    /// does in a real cluster).
    async fn collect_orphans(&mut self) -> Result<(), LabError> {
        let services: HashSet<(String, String)> = self
            .services
            .state()
            .iter()
            .map(|s| {
                key(
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        for s in self.slices.state() {
            let labels = s.metadata.labels.clone().unwrap_or_default();
            if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(CONTROLLER_NAME) {
                continue;
            }
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let owner = labels.get(SERVICE_NAME_LABEL).cloned().unwrap_or_default();
            let name = s.metadata.name.clone().unwrap_or_default();
            if services.contains(&key(&ns, &owner)) || self.deleted.contains(&key(&ns, &name)) {
                continue;
            }
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(LabError::Kube(format!(
                        "deleting orphaned EndpointSlice {ns}/{name}: {e}"
                    )))
                }
            }
            self.deleted.insert(key(&ns, &name));
        }
        Ok(())
    }

    /// Binds unscheduled pods to Ready nodes, round-robin in node-name order.
    async fn schedule(&mut self) -> Result<(), LabError> {
        let mut nodes: Vec<String> = self
            .nodes
            .state()
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        nodes.sort_by_key(|n| (n.len(), n.clone()));
        if nodes.is_empty() {
            return Ok(());
        }
        let mut pending: Vec<Arc<Pod>> = self
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .unwrap_or_default()
                    .is_empty()
            })
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                !self
                    .bound
                    .contains(p.metadata.uid.as_deref().unwrap_or_default())
            })
            .collect();
        pending.sort_by_key(|p| {
            (
                p.metadata
                    .creation_timestamp
                    .clone()
                    .map(|t| serde_json::to_string(&t).unwrap_or_default()),
                p.metadata.namespace.clone(),
                p.metadata.name.clone(),
            )
        });
        for p in pending {
            let node = nodes[self.next_node % nodes.len()].clone();
            let (ns, name) = (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            );
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            match api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"nodeName": node}})),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(pod = %format!("{ns}/{name}"), node = %node, "scheduled");
                    self.next_node += 1;
                    self.bound
                        .insert(p.metadata.uid.clone().unwrap_or_default());
                }
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 422 => {}
                Err(e) => return Err(LabError::Kube(format!("binding pod {ns}/{name}: {e}"))),
            }
        }
        Ok(())
    }

    /// Gives every LoadBalancer Service without an ingress IP one from the pool (its
    /// `spec.loadBalancerIP` if it asks for a free one of the pool), in its status. Services
    /// with a `loadBalancerClass` belong to another controller.
    async fn assign_lb_ips(&mut self) -> Result<(), LabError> {
        let pool = self.lb_pool;
        let services = self.services.state();
        let mut used: HashSet<std::net::Ipv4Addr> = self.lb_assigned.values().copied().collect();
        for s in &services {
            for i in s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
            {
                if let Some(ip) = i.ip.as_deref().and_then(|a| a.parse().ok()) {
                    used.insert(ip);
                }
            }
        }
        for s in &services {
            let Some(spec) = s.spec.as_ref() else {
                continue;
            };
            let k = key(
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default(),
            );
            let has_ingress = s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .is_some_and(|i| !i.is_empty());
            if has_ingress {
                self.lb_assigned.remove(&k);
                continue;
            }
            if spec.type_.as_deref() != Some("LoadBalancer")
                || spec.load_balancer_class.is_some()
                || self.lb_assigned.contains_key(&k)
            {
                continue;
            }
            let wanted = spec
                .load_balancer_ip
                .as_deref()
                .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
                .filter(|a| pool.contains(a) && !used.contains(a));
            let Some(ip) = wanted.or_else(|| {
                pool.hosts()
                    .skip(9) // .1-.9 stay free for the lab's own use
                    .find(|a| !used.contains(a))
            }) else {
                tracing::warn!(service = %format!("{}/{}", k.0, k.1), "the LoadBalancer pool is exhausted");
                continue;
            };
            let api: Api<Service> = Api::namespaced(self.client.clone(), &k.0);
            match api
                .patch_status(
                    &k.1,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}}),
                    ),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(service = %format!("{}/{}", k.0, k.1), %ip, "LoadBalancer IP assigned");
                    used.insert(ip);
                    self.lb_assigned.insert(k, ip);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(LabError::Kube(format!(
                        "assigning a LoadBalancer IP to {}/{}: {e}",
                        k.0, k.1
                    )))
                }
            }
        }
        Ok(())
    }

    async fn reconcile_all(&mut self) -> Result<(), LabError> {
        self.schedule().await?;
        self.assign_lb_ips().await?;
        let pods: Vec<Pod> = self.pods.state().iter().map(|p| (**p).clone()).collect();
        let mut by_ns: HashMap<String, Vec<Pod>> = HashMap::new();
        for p in pods {
            by_ns
                .entry(p.metadata.namespace.clone().unwrap_or_default())
                .or_default()
                .push(p);
        }
        let services: Vec<Arc<Service>> = self.services.state();
        let mut first_err = None;
        for s in services {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let empty = Vec::new();
            let pods = by_ns.get(&ns).unwrap_or(&empty);
            if let Err(e) = self.reconcile_service(&s, pods).await {
                first_err.get_or_insert(e);
            }
        }
        self.collect_orphans().await?;
        first_err.map_or(Ok(()), Err)
    }
}

/// Runs the controllers until the process is stopped, handing out LoadBalancer IPs from
/// `lb_pool`.
pub async fn run(client: Client, lb_pool: ipnet::Ipv4Net) -> Result<(), LabError> {
    let notify = Arc::new(Notify::new());
    let services = spawn_reflector(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        notifier(&notify),
    );
    let pods = spawn_reflector(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        notifier(&notify),
    );
    let slices = spawn_reflector(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={CONTROLLER_NAME}")),
        notifier(&notify),
    );
    let nodes = spawn_reflector(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        notifier(&notify),
    );
    for (what, ready) in [
        ("services", services.wait_until_ready().await.is_ok()),
        ("pods", pods.wait_until_ready().await.is_ok()),
        ("endpointslices", slices.wait_until_ready().await.is_ok()),
        ("nodes", nodes.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            return Err(LabError::Kube(format!(
                "the {what} watch ended before it started"
            )));
        }
    }
    tracing::info!("controllers started");
    let mut c = Controller {
        client,
        services,
        pods,
        slices,
        nodes,
        written: HashMap::new(),
        deleted: HashSet::new(),
        bound: HashSet::new(),
        next_node: 0,
        lb_assigned: HashMap::new(),
        lb_pool,
        triggered: jiff::Timestamp::now(),
    };
    loop {
        // Coalesce bursts of events into one pass.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Err(e) = c.reconcile_all().await {
            tracing::warn!(error = %e, "reconcile; retrying");
            tokio::time::sleep(Duration::from_millis(300)).await;
            notify.notify_one();
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        c.triggered = jiff::Timestamp::now();
    }
}
