//! The mesh's loop over its own cluster's API: what to publish (from Services, ServiceExports
//! and EndpointSlices), and what to write back (ServiceImports, their EndpointSlices, the
//! ServiceExports' conditions) from the merged view of every cluster.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::export::{self, Invalid};
use crate::import::{self, MANAGED_BY, MANAGED_BY_LABEL};
use crate::link::{LinkState, Remote};
use crate::merge::{self, Merged};
use crate::record::{self, ExportRecord, NodeRecord, PodRecord, PortRecord};
use crate::traffic;
use crate::{MeshConfig, MeshStatus};

const FIELD_MANAGER: &str = "weir-mesh";
/// The label the EndpointSlice controller puts on the slices of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

fn api_resource(kind: &weir_model::ResourceKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group, kind.version, kind.kind),
        kind.plural,
    )
}

fn spawn_reflector<K>(
    api: Api<K>,
    writer: Writer<K>,
    cfg: watcher::Config,
    wake: Arc<Notify>,
) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let reader = writer.as_reader();
    let events = watcher::watcher(api, cfg).modify(|o| weir_control::trim_meta(o.meta_mut()));
    let stream = reflector::reflector(writer, events).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "watch failed; retrying");
            }
            wake.notify_one();
        }
    });
    reader
}

struct Stores {
    services: Store<Service>,
    exports: Store<DynamicObject>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    imports: Store<DynamicObject>,
    mcs_slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    remote_endpoints: Store<DynamicObject>,
    nodes: Store<Node>,
    remote_nodes: Store<DynamicObject>,
    properties: Store<DynamicObject>,
    policies: Store<DynamicObject>,
}

fn start_stores(client: &Client, wake: &Arc<Notify>) -> Stores {
    let ex = api_resource(&weir_model::kinds::SERVICE_EXPORT);
    let im = api_resource(&weir_model::kinds::SERVICE_IMPORT);
    let re = api_resource(&weir_model::kinds::REMOTE_ENDPOINT);
    let rn = api_resource(&weir_model::kinds::REMOTE_NODE);
    let cp = api_resource(&weir_model::kinds::CLUSTER_PROPERTY);
    let gtp = api_resource(&weir_model::kinds::GLOBAL_TRAFFIC_POLICY);
    let all = watcher::Config::default;
    Stores {
        services: spawn_reflector(
            Api::all(client.clone()),
            Writer::default(),
            all(),
            wake.clone(),
        ),
        exports: spawn_reflector(
            Api::all_with(client.clone(), &ex),
            Writer::new(ex.clone()),
            all(),
            wake.clone(),
        ),
        slices: spawn_reflector(
            Api::all(client.clone()),
            Writer::default(),
            all().labels(SERVICE_LABEL),
            wake.clone(),
        ),
        namespaces: spawn_reflector(
            Api::all(client.clone()),
            Writer::default(),
            all(),
            wake.clone(),
        ),
        imports: spawn_reflector(
            Api::all_with(client.clone(), &im),
            Writer::new(im.clone()),
            all(),
            wake.clone(),
        ),
        mcs_slices: spawn_reflector(
            Api::all(client.clone()),
            Writer::default(),
            all().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
            wake.clone(),
        ),
        pods: spawn_reflector(
            Api::all(client.clone()),
            Writer::default(),
            all(),
            wake.clone(),
        ),
        remote_endpoints: spawn_reflector(
            Api::all_with(client.clone(), &re),
            Writer::new(re.clone()),
            all().labels(&format!("{}={MANAGED_BY}", import::IMPORT_MANAGED_LABEL)),
            wake.clone(),
        ),
        nodes: spawn_reflector(
            Api::all(client.clone()),
            Writer::default(),
            all(),
            wake.clone(),
        ),
        remote_nodes: spawn_reflector(
            Api::all_with(client.clone(), &rn),
            Writer::new(rn.clone()),
            all().labels(&format!("{}={MANAGED_BY}", import::IMPORT_MANAGED_LABEL)),
            wake.clone(),
        ),
        properties: spawn_reflector(
            Api::all_with(client.clone(), &cp),
            Writer::new(cp.clone()),
            all(),
            wake.clone(),
        ),
        policies: spawn_reflector(
            Api::all_with(client.clone(), &gtp),
            Writer::new(gtp.clone()),
            all(),
            wake.clone(),
        ),
    }
}

fn ns_name(meta: &kube::api::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Deletes `name`; one already gone is no error.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// How many writes the mesh has in flight at once: an idle API server answers each in well
/// under a millisecond, so written one after the other the round trips, not the work, would
/// bound a pass (ten thousand imports in a large clusterset).
const WRITES_IN_FLIGHT: usize = 16;

/// Runs `writes`, [`WRITES_IN_FLIGHT`] at a time, to the end; the first error, if any.
async fn write_all<F>(writes: impl IntoIterator<Item = F>) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    futures::stream::iter(writes)
        .buffer_unordered(WRITES_IN_FLIGHT)
        .fold(Ok(()), |first, r| async move { first.and(r) })
        .await
}

/// The mesh's hash annotation of an object.
fn annotation(meta: &kube::api::ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(import::HASH_ANNOTATION)
        .map(String::as_str)
}

/// The strings of a JSON list (none when it is not one).
fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Conditions without their transition times, to compare.
fn bare(conds: &Value) -> Value {
    let mut c = conds.clone();
    if let Some(a) = c.as_array_mut() {
        for x in a {
            if let Some(o) = x.as_object_mut() {
                o.remove("lastTransitionTime");
            }
        }
    }
    c
}

struct Mesh {
    cfg: MeshConfig,
    client: Client,
    stores: Stores,
    own_tx: watch::Sender<BTreeMap<String, String>>,
    remote: Arc<Mutex<Remote>>,
    link: Arc<Mutex<LinkState>>,
    last_error: Option<String>,
    imports_written: usize,
    /// The ClusterSetIPs of each import as this mesh last wrote them.
    allocated: BTreeMap<(String, String), Vec<String>>,
    /// The MCS slices of each source record as last built: a pass rebuilds (serializes and
    /// hashes) only those of records that changed, not ten thousand unchanged ones.
    slice_cache: HashMap<(String, String, String), CachedSlices>,
    /// Active health checks, when on.
    health: Option<Arc<crate::health::Health>>,
}

/// An MCS EndpointSlice the mesh wants: its hash, and what it is built from.
struct WantedSlice<'a> {
    hash: String,
    record: &'a Arc<ExportRecord>,
    ports: &'a [PortRecord],
}

/// The MCS slices of one source record as last built: their names and hashes, with the
/// record and merged ports they came from.
struct CachedSlices {
    record: Arc<ExportRecord>,
    ports: Vec<PortRecord>,
    slices: Vec<(String, String)>,
}

/// A record's (cluster, namespace, name).
fn record_key(r: &ExportRecord) -> (String, String, String) {
    (r.cluster.clone(), r.namespace.clone(), r.name.clone())
}

/// One ServiceImport to write: its object (when its hash differs) and its status (when it
/// differs), with the ClusterSetIPs its object carries.
struct ImportWrite {
    key: (String, String),
    ips: Vec<String>,
    apply: Option<Value>,
    status: Option<Value>,
}

/// This cluster's exports: the records of the valid ones, and each export's validity.
type OwnExports = (
    BTreeMap<(String, String), ExportRecord>,
    Vec<((String, String), Result<(), Invalid>)>,
);

impl Mesh {
    fn own_exports(&self) -> OwnExports {
        // The cluster's own slices, by their Service, once per pass.
        let slices = self.stores.slices.state();
        let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
        for s in &slices {
            if let Some(n) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_LABEL))
            {
                by_service
                    .entry((s.metadata.namespace.clone().unwrap_or_default(), n.clone()))
                    .or_default()
                    .push(s.as_ref());
            }
        }
        let mut records = BTreeMap::new();
        let mut validity = Vec::new();
        for ex in self.stores.exports.state() {
            let key = ns_name(&ex.metadata);
            let svc = self
                .stores
                .services
                .get(&reflector::ObjectRef::new(&key.1).within(&key.0));
            let own = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
            let meta = export::ExportMeta::of(&ex);
            match export::export_record(&self.cfg.cluster, &meta, svc.as_deref(), own) {
                Ok(mut r) => {
                    if let Some(h) = &self.health {
                        h.mark(&mut r);
                    }
                    records.insert(key.clone(), r);
                    validity.push((key, Ok(())));
                }
                Err(e) => validity.push((key, Err(e))),
            }
        }
        if let Some(h) = &self.health {
            h.set_targets(records.values());
        }
        (records, validity)
    }

    /// Whether what the link published still stands in etcd: while connected, or
    /// disconnected for less than the TTL (after that the lease has lapsed).
    fn publication_stands(&self, link: &LinkState) -> bool {
        link.connected
            || link
                .since
                .parse::<jiff::Timestamp>()
                .ok()
                .and_then(|t| jiff::Timestamp::now().duration_since(t).try_into().ok())
                .is_some_and(|d: Duration| d < self.cfg.remote_ttl)
    }

    /// This cluster's pods as other clusters' NetworkPolicy sees them: those with addresses
    /// of their own (not host-network) that have not finished.
    fn own_pods(&self) -> Vec<PodRecord> {
        // As the agents see pods for NetworkPolicy (finished ones left out), with the same
        // namespace labels.
        let (namespaces, pods) = (self.stores.namespaces.state(), self.stores.pods.state());
        let view = weir_control::policy::Cluster::from_objects(
            namespaces.iter().map(|n| &**n),
            pods.iter().map(|p| &**p),
            std::iter::empty(),
        );
        view.pods
            .iter()
            .filter(|p| !p.host_network && !p.ips.is_empty())
            .map(|p| PodRecord {
                cluster: self.cfg.cluster.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                ips: p.ips.iter().map(|ip| ip.to_string()).collect(),
                labels: p.labels.clone(),
                namespace_labels: view.namespace_labels(&p.namespace),
                ports: p
                    .ports
                    .iter()
                    .map(|np| record::PortRecord {
                        name: np.name.clone(),
                        protocol: np.protocol.name().into(),
                        port: i32::from(np.port),
                        app_protocol: None,
                    })
                    .collect(),
            })
            .collect()
    }

    async fn pass(&mut self) -> Result<(), String> {
        let (own, validity) = self.own_exports();
        let set = &self.cfg.clusterset;
        let mut kv: BTreeMap<String, String> = own
            .iter()
            .map(|((ns, name), r)| {
                (
                    record::export_key(set, &self.cfg.cluster, ns, name),
                    serde_json::to_string(r).expect("json"),
                )
            })
            .collect();
        for p in self.own_pods() {
            kv.insert(
                record::pod_key(set, &self.cfg.cluster, &p.namespace, &p.name),
                serde_json::to_string(&p).expect("json"),
            );
        }
        for n in self.own_nodes() {
            kv.insert(
                record::node_key(set, &self.cfg.cluster, &n.name),
                serde_json::to_string(&n).expect("json"),
            );
        }
        let own_props = self.own_properties();
        kv.insert(
            record::properties_key(set, &self.cfg.cluster),
            serde_json::to_string(&own_props).expect("json"),
        );
        self.own_tx.send_if_modified(|cur| {
            if *cur != kv {
                *cur = kv.clone();
                true
            } else {
                false
            }
        });
        let link = self.link.lock().expect("link").clone();
        let stands = self.publication_stands(&link);

        // The merged view: other clusters' records from etcd, this cluster's from its API
        // (so that local changes reach local clients even while etcd is out of reach).
        let (synced, remote_pods, remote_nodes, mut all) = {
            let r = self.remote.lock().expect("remote");
            let other = |c: &String| *c != self.cfg.cluster;
            let mut all: BTreeMap<(String, String), Vec<Arc<ExportRecord>>> = BTreeMap::new();
            for ((c, ns, name), rec) in &r.exports {
                if other(c) {
                    all.entry((ns.clone(), name.clone()))
                        .or_default()
                        .push(rec.clone());
                }
            }
            let pods: Vec<PodRecord> = r
                .pods
                .values()
                .filter(|p| other(&p.cluster))
                .cloned()
                .collect();
            let nodes: Vec<NodeRecord> = r
                .nodes
                .values()
                .filter(|n| other(&n.cluster))
                .cloned()
                .collect();
            (r.synced, pods, nodes, all)
        };
        for (k, r) in &own {
            all.entry(k.clone()).or_default().push(Arc::new(r.clone()));
        }
        let merged: BTreeMap<(String, String), Merged> = all
            .iter()
            .filter_map(|(k, recs)| {
                let refs: Vec<&ExportRecord> = recs.iter().map(|r| &**r).collect();
                merge::merge(&refs).map(|m| (k.clone(), m))
            })
            .collect();

        let mut first_err = None;
        let this = &*self;
        let statuses = validity.into_iter().map(|(key, v)| {
            let rk = record::export_key(set, &self.cfg.cluster, &key.0, &key.1);
            // Exported once a version of the record is in etcd (a newer one follows it).
            let is_published = v.is_ok() && stands && link.published.contains_key(&rk);
            let m = if synced { merged.get(&key) } else { None };
            let conds = export::export_conditions(v, is_published, m);
            async move { this.write_export_status(&key, conds).await }
        });
        let t0 = std::time::Instant::now();
        if let Err(e) = write_all(statuses).await {
            first_err.get_or_insert(e);
        }
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "export statuses");
        if synced {
            let t0 = std::time::Instant::now();
            let r = self.write_imports(&merged, &all).await;
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "imports and slices");
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
            if let Err(e) = self.write_remote_endpoints(&remote_pods).await {
                first_err.get_or_insert(e);
            }
            let nodes: Vec<(String, Value)> = remote_nodes
                .iter()
                .map(|n| {
                    (
                        format!("{}.{}", n.cluster, n.name),
                        json!({"cluster": n.cluster, "node": n.name, "addresses": n.addresses,
                               "podCIDRs": n.pod_cidrs}),
                    )
                })
                .collect();
            let kind = &weir_model::kinds::REMOTE_NODE;
            if let Err(e) = self
                .write_mirrors(kind, &self.stores.remote_nodes, &nodes)
                .await
            {
                first_err.get_or_insert(e);
            }
            if let Err(e) = self.write_policy_statuses(&all, own_props).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Writes a RemoteEndpoint for every other cluster's pod (where its hash differs) and
    /// deletes the mesh's RemoteEndpoints of pods gone.
    async fn write_remote_endpoints(&self, pods: &[PodRecord]) -> Result<(), String> {
        let objects: Vec<(String, Value)> = pods
            .iter()
            .map(|p| {
                (
                    format!("{}.{}.{}", p.cluster, p.namespace, p.name),
                    json!({"cluster": p.cluster, "namespace": p.namespace, "pod": p.name,
                           "ips": p.ips, "labels": p.labels, "namespaceLabels": p.namespace_labels,
                           "ports": p.ports.iter().map(|x| json!({"name": x.name, "protocol": x.protocol, "port": x.port})).collect::<Vec<_>>()}),
                )
            })
            .collect();
        let kind = &weir_model::kinds::REMOTE_ENDPOINT;
        self.write_mirrors(kind, &self.stores.remote_endpoints, &objects)
            .await
    }

    /// Makes the mesh's cluster-scoped objects of `kind` (weir.dev/v1alpha1) exactly
    /// `objects` (name, spec): written where their hash differs, the others deleted.
    async fn write_mirrors(
        &self,
        kind: &weir_model::ResourceKind,
        store: &Store<DynamicObject>,
        objects: &[(String, Value)],
    ) -> Result<(), String> {
        let ar = api_resource(kind);
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let have: BTreeMap<String, Arc<DynamicObject>> = store
            .state()
            .into_iter()
            .map(|o| (o.metadata.name.clone().unwrap_or_default(), o))
            .collect();
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let wanted: HashSet<&String> = objects.iter().map(|(n, _)| n).collect();
        let (api, pp) = (&api, &pp);
        let writes = objects.iter().filter_map(|(name, spec)| {
            let h = import::hash(spec);
            if have
                .get(name)
                .is_some_and(|o| annotation(&o.metadata) == Some(h.as_str()))
            {
                return None;
            }
            let obj = json!({
                "apiVersion": format!("{}/{}", kind.group, kind.version), "kind": kind.kind,
                "metadata": {"name": name, "labels": {import::IMPORT_MANAGED_LABEL: MANAGED_BY},
                             "annotations": {import::HASH_ANNOTATION: h}},
                "spec": spec,
            });
            Some(async move {
                api.patch(name, pp, &Patch::Apply(&obj))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{} {name}: {e}", kind.kind))
            })
        });
        let written = write_all(writes).await;
        let deletes = have
            .keys()
            .filter(|n| !wanted.contains(n))
            .map(|name| async move {
                delete_if_present(api, name)
                    .await
                    .map_err(|e| format!("{} {name}: deleting: {e}", kind.kind))
            });
        written.and(write_all(deletes).await)
    }

    /// This cluster's ClusterProperties: name -> value.
    fn own_properties(&self) -> BTreeMap<String, String> {
        self.stores
            .properties
            .state()
            .iter()
            .filter_map(|p| {
                let v = p.data.pointer("/spec/value")?.as_str()?;
                Some((p.metadata.name.clone()?, v.to_string()))
            })
            .collect()
    }

    /// Writes each GlobalTrafficPolicy's status (shares per cluster and why) where it changed;
    /// `own_props` are this cluster's ClusterProperties.
    async fn write_policy_statuses(
        &self,
        records: &BTreeMap<(String, String), Vec<Arc<ExportRecord>>>,
        own_props: BTreeMap<String, String>,
    ) -> Result<(), String> {
        let (mut props, mut members) = {
            let r = self.remote.lock().expect("remote");
            let members: std::collections::BTreeSet<String> = r.clusters.keys().cloned().collect();
            (r.properties.clone(), members)
        };
        props.insert(self.cfg.cluster.clone(), own_props);
        members.insert(self.cfg.cluster.clone());
        let ar = api_resource(&weir_model::kinds::GLOBAL_TRAFFIC_POLICY);
        let now = weir_model::now_rfc3339();
        let writes = self.stores.policies.state().into_iter().filter_map(|p| {
            let key = ns_name(&p.metadata);
            let recs = records.get(&key).map(Vec::as_slice).unwrap_or_default();
            let mut st =
                traffic::status(&p.data["spec"], &self.cfg.cluster, &members, &props, recs);
            let old = p.data.get("status");
            let same = old.is_some_and(|o| {
                o["clusters"] == st["clusters"] && bare(&o["conditions"]) == bare(&st["conditions"])
            });
            if same {
                return None;
            }
            st["conditions"] = Value::Array(export::with_transition_times(
                st["conditions"].as_array().cloned().unwrap_or_default(),
                old.and_then(|o| o.get("conditions")),
                &now,
            ));
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &key.0, &ar);
            Some(async move {
                api.patch_status(
                    &key.1,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": st})),
                )
                .await
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "GlobalTrafficPolicy {}/{}: writing its status: {e}",
                        key.0, key.1
                    )
                })
            })
        });
        write_all(writes).await
    }

    /// This cluster's nodes as other clusters route to them.
    fn own_nodes(&self) -> Vec<NodeRecord> {
        self.stores
            .nodes
            .state()
            .iter()
            .map(|n| {
                let spec = n.spec.clone().unwrap_or_default();
                let mut cidrs = spec.pod_cidrs.clone().unwrap_or_default();
                if cidrs.is_empty() {
                    cidrs.extend(spec.pod_cidr.clone());
                }
                NodeRecord {
                    cluster: self.cfg.cluster.clone(),
                    name: n.metadata.name.clone().unwrap_or_default(),
                    addresses: n
                        .status
                        .as_ref()
                        .and_then(|s| s.addresses.as_ref())
                        .into_iter()
                        .flatten()
                        .filter(|a| a.type_ == "InternalIP")
                        .map(|a| a.address.clone())
                        .collect(),
                    pod_cidrs: cidrs,
                }
            })
            .collect()
    }

    async fn write_export_status(
        &self,
        key: &(String, String),
        conds: Vec<Value>,
    ) -> Result<(), String> {
        let Some(ex) = self.stores.exports.get(
            &reflector::ObjectRef::new_with(
                &key.1,
                api_resource(&weir_model::kinds::SERVICE_EXPORT),
            )
            .within(&key.0),
        ) else {
            return Ok(());
        };
        let old = ex.data.pointer("/status/conditions");
        if old.map(bare) == Some(bare(&Value::Array(conds.clone()))) {
            return Ok(());
        }
        let now = weir_model::now_rfc3339();
        let conds = export::with_transition_times(conds, old, &now);
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &key.0,
            &api_resource(&weir_model::kinds::SERVICE_EXPORT),
        );
        api.patch_status(
            &key.1,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conds}})),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("ServiceExport {}/{}: writing its status: {e}", key.0, key.1))
    }

    async fn write_imports(
        &mut self,
        merged: &BTreeMap<(String, String), Merged>,
        records: &BTreeMap<(String, String), Vec<Arc<ExportRecord>>>,
    ) -> Result<(), String> {
        let ar = api_resource(&weir_model::kinds::SERVICE_IMPORT);
        let namespaces: HashSet<String> = self
            .stores
            .namespaces
            .state()
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let existing: BTreeMap<(String, String), Arc<DynamicObject>> = self
            .stores
            .imports
            .state()
            .into_iter()
            .map(|o| (ns_name(&o.metadata), o))
            .collect();
        // ClusterSetIPs in use: what the store shows and what this mesh wrote since (the
        // store may not have caught up with the last pass's writes yet).
        for (k, o) in &existing {
            self.allocated
                .entry(k.clone())
                .or_insert_with(|| str_list(o.data.pointer("/spec/ips")));
        }
        let mut used: HashSet<IpAddr> = self
            .allocated
            .values()
            .flatten()
            .filter_map(|s| s.parse().ok())
            .collect();
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut first_err: Option<String> = None;
        let mut wanted_imports = HashSet::new();
        let mut wanted_slices: BTreeMap<(String, String), WantedSlice> = BTreeMap::new();
        let mut seen_records = HashSet::new();
        let mut writes = Vec::new();
        let now = weir_model::now_rfc3339();
        for (key, m) in merged {
            if !namespaces.contains(&key.0) {
                continue;
            }
            // Wanted whatever happens to the writes below: a failed write must not remove
            // what is there.
            wanted_imports.insert(key.clone());
            for r in records.get(key).into_iter().flatten() {
                seen_records.insert(record_key(r));
                for (name, hash) in self.slice_hashes(r, &m.ports) {
                    let w = WantedSlice {
                        hash,
                        record: r,
                        ports: &m.ports,
                    };
                    wanted_slices.insert((key.0.clone(), name), w);
                }
            }
            let have = existing.get(key);
            let ips = if m.headless {
                Vec::new()
            } else {
                let old = self.allocated.get(key).cloned().unwrap_or_default();
                let seed = import::seed_of(&key.0, &key.1);
                match import::allocate(
                    &self.cfg.clusterset_cidrs,
                    &m.ip_families,
                    &old,
                    &used,
                    seed,
                ) {
                    Ok(ips) => ips,
                    Err(e) => {
                        first_err.get_or_insert(format!("ServiceImport {}/{}: {e}", key.0, key.1));
                        continue;
                    }
                }
            };
            used.extend(ips.iter().filter_map(|s| s.parse::<IpAddr>().ok()));
            let spec = import::import_spec(m, &ips);
            let conflicts = (!m.conflicts.is_empty())
                .then(|| format!("{} (oldest export: {})", m.conflicts.join(","), m.winner));
            let h = import::hash(&json!([spec, conflicts, m.labels, m.annotations]));
            let current = have.is_some_and(|o| annotation(&o.metadata) == Some(h.as_str()));
            let apply = (!current).then(|| {
                // The oldest export's exportedLabels and exportedAnnotations, the mesh's own
                // keys last (they are not the user's to set). Server-side apply drops what is
                // left out.
                let mut labels = m.labels.clone();
                labels.insert(import::IMPORT_MANAGED_LABEL.into(), MANAGED_BY.into());
                let mut annotations = m.annotations.clone();
                annotations.insert(import::HASH_ANNOTATION.into(), h.clone());
                if let Some(c) = &conflicts {
                    annotations.insert(import::CONFLICTS_ANNOTATION.into(), c.clone());
                }
                json!({
                    "apiVersion": "multicluster.x-k8s.io/v1beta1",
                    "kind": "ServiceImport",
                    "metadata": {"name": key.1, "namespace": key.0,
                                 "labels": labels, "annotations": annotations},
                    "spec": spec,
                })
            });
            let mut status = import::import_status(m);
            let status_same = have.and_then(|o| o.data.get("status")).is_some_and(|s| {
                bare(&s["conditions"]) == bare(&status["conditions"])
                    && s["clusters"] == status["clusters"]
            });
            let status = (!status_same).then(|| {
                status["conditions"] = Value::Array(export::with_transition_times(
                    status["conditions"].as_array().cloned().unwrap_or_default(),
                    have.and_then(|o| o.data.pointer("/status/conditions")),
                    &now,
                ));
                status
            });
            if apply.is_some() || status.is_some() {
                writes.push(ImportWrite {
                    key: key.clone(),
                    ips,
                    apply,
                    status,
                });
            }
        }
        let (t0, n) = (std::time::Instant::now(), writes.len());
        let written = self.write_import_objects(writes, &pp).await;
        tracing::debug!(n, ms = t0.elapsed().as_millis() as u64, "imports written");
        for (key, ips, result) in written {
            if let Some(ips) = ips {
                self.allocated.insert(key, ips);
            }
            if let Err(e) = result {
                first_err.get_or_insert(e);
            }
        }
        self.imports_written = wanted_imports.len();
        self.slice_cache.retain(|k, _| seen_records.contains(k));
        let t0 = std::time::Instant::now();
        self.write_slices(&wanted_slices, &pp, &mut first_err).await;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "slices written");
        // Imports nothing carries any more (only those the mesh wrote).
        for ((ns, name), o) in &existing {
            let ours = o
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(import::IMPORT_MANAGED_LABEL))
                .is_some_and(|v| v == MANAGED_BY);
            if !ours || wanted_imports.contains(&(ns.clone(), name.clone())) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
            match delete_if_present(&api, name).await {
                Ok(()) => {
                    self.allocated.remove(&(ns.clone(), name.clone()));
                }
                Err(e) => {
                    first_err.get_or_insert(format!("ServiceImport {ns}/{name}: deleting: {e}"));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The (name, hash) of each MCS slice of `r` under the merged `ports`, from the cache
    /// when neither changed since they were last built.
    fn slice_hashes(
        &mut self,
        r: &Arc<ExportRecord>,
        ports: &[PortRecord],
    ) -> Vec<(String, String)> {
        let k = record_key(r);
        if let Some(c) = self.slice_cache.get(&k) {
            if (Arc::ptr_eq(&c.record, r) || c.record == *r) && c.ports == ports {
                return c.slices.clone();
            }
        }
        let slices: Vec<(String, String)> = import::import_slices(r, &self.cfg.cluster, ports)
            .into_iter()
            .map(|(n, v)| {
                let h = v["metadata"]["annotations"][import::HASH_ANNOTATION]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (n, h)
            })
            .collect();
        let c = CachedSlices {
            record: r.clone(),
            ports: ports.to_vec(),
            slices: slices.clone(),
        };
        self.slice_cache.insert(k, c);
        slices
    }

    /// Writes the imports (each its object, then its status), [`WRITES_IN_FLIGHT`] at a time:
    /// each import with its ClusterSetIPs once they stand in the API (its object written, or
    /// current already), and the first error.
    async fn write_import_objects(
        &self,
        writes: Vec<ImportWrite>,
        pp: &PatchParams,
    ) -> Vec<((String, String), Option<Vec<String>>, Result<(), String>)> {
        let ar = api_resource(&weir_model::kinds::SERVICE_IMPORT);
        let (client, ar) = (&self.client, &ar);
        futures::stream::iter(writes)
            .map(|w| async move {
                let (ns, name) = (&w.key.0, &w.key.1);
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
                if let Some(obj) = &w.apply {
                    if let Err(e) = api.patch(name, pp, &Patch::Apply(obj)).await {
                        let e = format!("ServiceImport {ns}/{name}: {e}");
                        return (w.key.clone(), None, Err(e));
                    }
                }
                let mut result = Ok(());
                if let Some(st) = &w.status {
                    let patch = Patch::Merge(json!({"status": st}));
                    if let Err(e) = api
                        .patch_status(name, &PatchParams::default(), &patch)
                        .await
                    {
                        result = Err(format!(
                            "ServiceImport {ns}/{name}: writing its status: {e}"
                        ));
                    }
                }
                // The addresses stand once the object is written, whatever its status.
                (w.key, Some(w.ips), result)
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await
    }

    /// Writes the wanted EndpointSlices where their hash differs, and deletes the mesh's
    /// slices nothing wants.
    async fn write_slices(
        &self,
        wanted: &BTreeMap<(String, String), WantedSlice<'_>>,
        pp: &PatchParams,
        first_err: &mut Option<String>,
    ) {
        let have: BTreeMap<(String, String), Arc<EndpointSlice>> = self
            .stores
            .mcs_slices
            .state()
            .into_iter()
            .map(|s| (ns_name(&s.metadata), s))
            .collect();
        // The slices to write, built (from their records) only now: most are current.
        let mut built: HashMap<(String, String, String), Vec<(String, Value)>> = HashMap::new();
        let mut objects = Vec::new();
        for ((ns, name), w) in wanted {
            let same = have
                .get(&(ns.clone(), name.clone()))
                .is_some_and(|h| annotation(&h.metadata) == Some(w.hash.as_str()));
            if same {
                continue;
            }
            let slices = built
                .entry(record_key(w.record))
                .or_insert_with(|| import::import_slices(w.record, &self.cfg.cluster, w.ports));
            if let Some((_, v)) = slices.iter().find(|(n, _)| n == name) {
                objects.push((ns, name, v.clone()));
            }
        }
        let client = &self.client;
        let writes = objects.into_iter().map(|(ns, name, v)| async move {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
            api.patch(name, pp, &Patch::Apply(&v))
                .await
                .map(|_| ())
                .map_err(|e| format!("EndpointSlice {ns}/{name}: {e}"))
        });
        if let Err(e) = write_all(writes).await {
            first_err.get_or_insert(e);
        }
        let deletes =
            have.keys()
                .filter(|k| !wanted.contains_key(*k))
                .map(|(ns, name)| async move {
                    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
                    delete_if_present(&api, name)
                        .await
                        .map_err(|e| format!("EndpointSlice {ns}/{name}: deleting: {e}"))
                });
        if let Err(e) = write_all(deletes).await {
            first_err.get_or_insert(e);
        }
    }

    fn status(&self, exports: usize) -> MeshStatus {
        let link = self.link.lock().expect("link").clone();
        let r = self.remote.lock().expect("remote");
        MeshStatus {
            cluster: self.cfg.cluster.clone(),
            connected: link.connected,
            since: link.since,
            synced: r.synced,
            clusters: r
                .clusters
                .iter()
                .map(|(c, rec)| (c.clone(), rec.renewed_at.clone()))
                .collect(),
            exports,
            imports: self.imports_written,
            last_error: self.last_error.clone().or(link.last_error),
        }
    }
}

/// The mesh's loop: a pass after every change (coalesced), and every few seconds.
pub(crate) async fn run(
    client: Client,
    cfg: MeshConfig,
    own_tx: watch::Sender<BTreeMap<String, String>>,
    remote: Arc<Mutex<Remote>>,
    link: Arc<Mutex<LinkState>>,
    changed: Arc<Notify>,
    health: Option<Arc<crate::health::Health>>,
) -> Result<(), String> {
    let stores = start_stores(&client, &changed);
    // Nothing is published or written before every list of this cluster is complete.
    for ready in [
        stores.services.wait_until_ready().await.is_ok(),
        stores.exports.wait_until_ready().await.is_ok(),
        stores.slices.wait_until_ready().await.is_ok(),
        stores.namespaces.wait_until_ready().await.is_ok(),
        stores.imports.wait_until_ready().await.is_ok(),
        stores.mcs_slices.wait_until_ready().await.is_ok(),
        stores.pods.wait_until_ready().await.is_ok(),
        stores.remote_endpoints.wait_until_ready().await.is_ok(),
        stores.nodes.wait_until_ready().await.is_ok(),
        stores.remote_nodes.wait_until_ready().await.is_ok(),
        stores.properties.wait_until_ready().await.is_ok(),
        stores.policies.wait_until_ready().await.is_ok(),
    ] {
        if !ready {
            return Err("a watch of the cluster's API ended before it started".into());
        }
    }
    tracing::info!(cluster = %cfg.cluster, "cluster listed; meshing");
    let mut mesh = Mesh {
        cfg,
        client,
        stores,
        own_tx,
        remote,
        link,
        last_error: None,
        imports_written: 0,
        allocated: BTreeMap::new(),
        slice_cache: HashMap::new(),
        health,
    };
    let mut last_status = None;
    let mut last_pass = Duration::ZERO;
    loop {
        // Coalesce a burst of changes: wait at least as long as the last pass took, so that
        // under a stream of changes passes take at most half the mesh's time.
        tokio::time::sleep(last_pass.max(Duration::from_millis(10))).await;
        let started = std::time::Instant::now();
        mesh.last_error = mesh.pass().await.err();
        last_pass = started.elapsed().min(Duration::from_secs(2));
        if let Some(e) = &mesh.last_error {
            tracing::warn!(error = %e, "mesh pass");
        }
        let exports = {
            let kv = mesh.own_tx.borrow();
            kv.keys().filter(|k| k.contains("/exports/")).count()
        };
        let st = mesh.status(exports);
        if let Some(path) = &mesh.cfg.status_file {
            if last_status.as_ref() != Some(&st) {
                let tmp = path.with_extension("tmp");
                let text = serde_json::to_string_pretty(&st).expect("json");
                if std::fs::write(&tmp, text)
                    .and_then(|_| std::fs::rename(&tmp, path))
                    .is_ok()
                {
                    last_status = Some(st);
                }
            }
        }
        let retry = if mesh.last_error.is_some() { 500 } else { 2000 };
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(retry)) => {}
        }
    }
}
