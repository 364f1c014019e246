//! The weir agent: one per node. It watches Services and EndpointSlices through kube-rs
//! reflectors (the same code against a lab's API server and a real one), turns them into
//! load-balancing state with weir-control, and applies the difference through a
//! `Dataplane`. It serves a node-local introspection API on a unix socket (mode 0600) for
//! `weir status` and `weir bpf lb list`, as cilium-dbg talks to its agent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod cni;
pub mod flows;
pub mod healthcheck;
pub mod imports;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod probes;
pub mod ring;
pub mod switch;
pub mod tcp_health;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::Notify;
use weir_control::import_schedule::ImportSchedule;
use weir_control::lb::{self, Algorithm, Options, Warning};
use weir_control::mcs;
use weir_dataplane::{ApplyStats, Dataplane};

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// Where the introspection socket goes.
    pub socket: PathBuf,
    /// Backend selection for Services without the algorithm annotation.
    pub default_algorithm: Algorithm,
    /// How external traffic reaches remote backends for Services without the mode annotation.
    pub default_mode: lb::LbMode,
    /// How long a security identity no pod needs stays before it is deleted.
    pub identity_gc_grace: std::time::Duration,
    /// The `service.kubernetes.io/service-proxy-name` this agent serves: Services labelled
    /// with another name (or any name, when unset) are left to another proxy.
    pub service_proxy_name: Option<String>,
    /// TCP addresses serving /healthz, /readyz and /metrics.
    pub listen: Vec<std::net::SocketAddr>,
    /// This cluster's id in its clusterset: every identity carries it as `weir.dev/cluster`
    /// (None: not in a clusterset).
    pub cluster_id: Option<String>,
    /// Where to write the address the first of `listen` was bound to (useful with port 0).
    pub listen_file: Option<PathBuf>,
    /// What `weir_flows_total` says of a flow's ends (none by default).
    pub flow_metrics_context: flows::MetricsContext,
}

/// Services (and their EndpointSlices) with this label have no proxy at all: the
/// EndpointSlice controller puts it on the slices of Services without a cluster IP, and
/// kube-proxy and Cilium skip whatever carries it.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Services (and their EndpointSlices) with this label are programmed only by the proxy of
/// that name (kube-proxy programs none of them; Cilium those of `--k8s-service-proxy-name`).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// The label selector of the Services and EndpointSlices an agent with `proxy_name` programs,
/// as kube-proxy (pkg/proxy/apis/well_known_labels.go, cmd/kube-proxy/app/server.go) and
/// Cilium (`--k8s-service-proxy-name`) select them. The API server turns a label change into
/// an ADDED or DELETED event for the watch, so a relabel takes effect at once.
pub fn service_label_selector(proxy_name: Option<&str>) -> String {
    match proxy_name {
        Some(name) => format!("!{HEADLESS_LABEL},{SERVICE_PROXY_NAME_LABEL}={name}"),
        None => format!("!{HEADLESS_LABEL},!{SERVICE_PROXY_NAME_LABEL}"),
    }
}

/// What the agent reports about its synchronisation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncStatus {
    /// Node name.
    pub node: String,
    /// True once the datapath matches a complete view of the API.
    pub synced: bool,
    /// Number of applies so far.
    pub applies: u64,
    /// When the last apply finished (RFC 3339).
    pub last_apply: Option<String>,
    /// How long the last apply took, in microseconds.
    pub last_apply_micros: u64,
    /// How long building the desired state from the API objects took, in microseconds.
    pub last_build_micros: u64,
    /// What the last apply changed.
    pub last_stats: ApplyStats,
    /// Frontends programmed.
    pub frontends: usize,
    /// The last error, if the last apply failed.
    pub last_error: Option<String>,
    /// Inputs not acted on.
    pub warnings: Vec<Warning>,
    /// Whether the API server watches are healthy.
    pub api_connected: bool,
    /// Health-check node ports served: port, `namespace/name`, local ready endpoints.
    pub health_checks: Vec<(u16, String, usize)>,
    /// ServiceImports under a GlobalTrafficPolicy or with ejected backends: their shares.
    pub schedules: Vec<imports::ImportStatus>,
    /// The dataplane rendering the node's state: `ebpf`, `nftables` or `iptables`.
    pub dataplane: String,
    /// The last dataplane switch of this node, if any.
    pub switch: Option<switch::SwitchReport>,
    /// Under netfilter, after a switch from eBPF: the DSR flows still open, which the tc
    /// programs carry until they end (netfilter cannot); counted when the status is read.
    pub dsr_draining: Option<usize>,
}

/// Shared between the reconcile loop and the introspection API.
pub struct Shared {
    /// The dataplane.
    pub dataplane: Mutex<Box<dyn Dataplane>>,
    /// Sync status.
    pub status: Mutex<SyncStatus>,
    /// The per-packet pod datapath, when the agent runs one.
    pub pods: Option<Arc<pods::Pods>>,
    /// NetworkPolicy (with the pod datapath).
    pub policy: Arc<Mutex<policy::PolicyReport>>,
    /// Policy verdict events (with the pod datapath).
    pub flows: Arc<Mutex<flows::FlowLog>>,
    /// The Node objects (this node's pod CIDRs and addresses, for the CNI plugin).
    pub nodes: Store<k8s_openapi::api::core::v1::Node>,
    /// This node's name.
    pub node_name: String,
    /// A dataplane switch waiting for the Services loop, and what wakes the loop for it.
    pub switch: Mutex<Option<switch::SwitchRequest>>,
    /// Wakes the Services loop for a switch.
    pub switch_wake: Notify,
    /// Whether the socket layer's translation events are being read (started under eBPF,
    /// or at a switch to it).
    pub sock_events_read: std::sync::atomic::AtomicBool,
}

/// Starts a kube-rs reflector for `api` in the background and returns its store. After
/// every watch event `on_event(Some(event))` runs (`None` after an error), so that callers can wake their
/// reconcile loop and record the watch's health. Watch errors are retried with kube-rs'
/// default backoff; the store keeps its last complete view meanwhile.
pub fn spawn_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    on_event: impl Fn(Option<&watcher::Event<K>>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    spawn_reflector_with(api, reflector::store::Writer::default(), cfg, on_event)
}

/// [`spawn_reflector`] for kinds whose type is known only at run time (DynamicObject).
pub fn spawn_reflector_with<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    cfg: watcher::Config,
    on_event: impl Fn(Option<&watcher::Event<K>>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let reader = writer.as_reader();
    tokio::spawn(run_reflector(api, writer, cfg, on_event));
    reader
}

/// Feeds `writer` from a watch of `api` for as long as the process runs.
async fn run_reflector<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    cfg: watcher::Config,
    on_event: impl Fn(Option<&watcher::Event<K>>) + Send + 'static,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let events = watcher::watcher(api, cfg).modify(|o| weir_control::trim_meta(o.meta_mut()));
    let stream = reflector::reflector(writer, events).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        match &ev {
            Ok(e) => on_event(Some(e)),
            Err(e) => {
                tracing::warn!(error = %e, "watch failed; retrying");
                on_event(None);
            }
        }
    }
}

type ServiceKey = (String, String);

/// Which Services changed since the last build (or that everything must be rebuilt).
#[derive(Default)]
struct Dirty {
    full: bool,
    services: HashSet<ServiceKey>,
    /// The Service each EndpointSlice belonged to when last seen, so that a slice moving to
    /// another Service (or deleted) dirties the one it left.
    slice_owner: HashMap<ServiceKey, ServiceKey>,
    /// When the oldest change not yet applied happened: its EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time`, else when the agent saw it.
    since: Option<std::time::SystemTime>,
    /// The datapath ejected a backend: its health is to be read again.
    ejections: bool,
}

impl Dirty {
    /// Notes a change made at `t`: `since` keeps the oldest not yet applied.
    fn changed_at(&mut self, t: std::time::SystemTime) {
        self.since = Some(self.since.map_or(t, |s| s.min(t)));
    }
}

/// The annotation the EndpointSlice controller puts on the slices it writes: when the change
/// they carry happened (RFC 3339 with nanoseconds).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_time(meta: &kube::api::ObjectMeta) -> Option<std::time::SystemTime> {
    let t: jiff::Timestamp = meta
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?
        .parse()
        .ok()?;
    Some(std::time::SystemTime::from(t))
}

fn key_of(meta: &kube::api::ObjectMeta) -> ServiceKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The Service (or ServiceImport, as `NAME@clusterset`) an EndpointSlice belongs to.
fn slice_service(sl: &EndpointSlice) -> Option<ServiceKey> {
    match sl.metadata.labels.as_ref()?.get(lb::SERVICE_NAME_LABEL) {
        Some(name) => Some((
            sl.metadata.namespace.clone().unwrap_or_default(),
            name.clone(),
        )),
        None => mcs::import_of_slice(sl),
    }
}

fn wake<K>(
    notify: &Arc<Notify>,
    shared: &Arc<Shared>,
    dirty: &Arc<Mutex<Dirty>>,
    mark: fn(&mut Dirty, &K, bool),
) -> impl Fn(Option<&watcher::Event<K>>) + Send + 'static
where
    K: Send + 'static,
{
    let (notify, shared, dirty) = (notify.clone(), shared.clone(), dirty.clone());
    move |ev| {
        if let Ok(mut s) = shared.status.lock() {
            s.api_connected = ev.is_some();
        }
        if let Ok(mut d) = dirty.lock() {
            if matches!(
                ev,
                Some(watcher::Event::Apply(_) | watcher::Event::Delete(_))
            ) {
                d.changed_at(std::time::SystemTime::now());
            }
            match ev {
                Some(watcher::Event::Apply(o)) => mark(&mut d, o, false),
                Some(watcher::Event::Delete(o)) => mark(&mut d, o, true),
                // A relist replaces the whole store.
                Some(
                    watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone,
                ) => d.full = true,
                None => {}
            }
        }
        notify.notify_one();
    }
}

fn mark_service(d: &mut Dirty, s: &Service, _deleted: bool) {
    d.services.insert(key_of(&s.metadata));
}

/// Something every import depends on changed (this cluster's id): rebuild everything.
fn mark_everything(d: &mut Dirty, _: &DynamicObject, _deleted: bool) {
    d.full = true;
}

/// A ServiceImport, or the GlobalTrafficPolicy of the same name, changed.
fn mark_import(d: &mut Dirty, i: &DynamicObject, _deleted: bool) {
    let (ns, name) = key_of(&i.metadata);
    d.services.insert((ns, mcs::import_name(&name)));
}

/// The kube-rs description of a kind weir serves (watched as DynamicObjects).
pub fn api_resource(kind: &weir_model::ResourceKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group, kind.version, kind.kind),
        kind.plural,
    )
}

/// [`spawn_reflector`] for a kind known by its [`weir_model::ResourceKind`] (every object of
/// it, as DynamicObjects).
pub fn spawn_kind_reflector(
    client: &Client,
    kind: &weir_model::ResourceKind,
    cfg: watcher::Config,
    on_event: impl Fn(Option<&watcher::Event<DynamicObject>>) + Send + 'static,
) -> Store<DynamicObject> {
    let ar = api_resource(kind);
    spawn_reflector_with(
        Api::all_with(client.clone(), &ar),
        reflector::store::Writer::new(ar),
        cfg,
        on_event,
    )
}

/// How often a kind the API server does not serve is looked for again.
const UNSERVED_RECHECK: Duration = Duration::from_secs(10);

/// Whether the API server serves `kind` (its group/version lists it): a CRD not installed is
/// not served.
pub async fn kind_served(
    client: &Client,
    kind: &weir_model::ResourceKind,
) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources(&format!("{}/{}", kind.group, kind.version))
        .await
    {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == kind.plural)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`spawn_kind_reflector`] for a kind a cluster may not serve (the multi-cluster kinds on a
/// cluster without weir's mesh CRDs): while the API server does not serve it the store is
/// ready and empty, as Cilium treats an absent optional CRD, and the kind is looked for again
/// every few seconds; once served it is watched like any other (its first list arrives as a
/// relist). An API server that cannot be reached leaves the store not ready, as any watch.
pub fn spawn_optional_kind_reflector(
    client: &Client,
    kind: &weir_model::ResourceKind,
    cfg: watcher::Config,
    on_event: impl Fn(Option<&watcher::Event<DynamicObject>>) + Send + 'static,
) -> Store<DynamicObject> {
    let ar = api_resource(kind);
    let mut writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let (client, kind) = (client.clone(), *kind);
    tokio::spawn(async move {
        let mut empty = false;
        loop {
            match kind_served(&client, &kind).await {
                Ok(true) => break,
                Ok(false) if !empty => {
                    tracing::info!(
                        kind = kind.kind,
                        group = kind.group,
                        "not served by the API server (its CRD is not installed); empty until it is"
                    );
                    writer.apply_watcher_event(&watcher::Event::Init);
                    writer.apply_watcher_event(&watcher::Event::InitDone);
                    empty = true;
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(kind = kind.kind, error = %e, "discovery failed"),
            }
            tokio::time::sleep(UNSERVED_RECHECK).await;
        }
        if empty {
            tracing::info!(kind = kind.kind, "now served; watching it");
        }
        run_reflector(Api::all_with(client, &ar), writer, cfg, on_event).await;
    });
    reader
}

/// The ServiceImport kind as the agents watch it.
fn import_resource() -> ApiResource {
    api_resource(&weir_model::kinds::SERVICE_IMPORT)
}

fn mark_slice(d: &mut Dirty, sl: &EndpointSlice, deleted: bool) {
    if let Some(t) = trigger_time(&sl.metadata) {
        d.changed_at(t);
    }
    let me = key_of(&sl.metadata);
    if let Some(old) = d.slice_owner.remove(&me) {
        d.services.insert(old);
    }
    if let Some(svc) = slice_service(sl) {
        d.services.insert(svc.clone());
        if !deleted {
            d.slice_owner.insert(me, svc);
        }
    }
}

/// The desired state kept up to date Service by Service: a change rebuilds only the Services
/// it touches, so its cost does not grow with the number of Services.
#[derive(Default)]
struct Incremental {
    state: lb::LbState,
    contrib: HashMap<ServiceKey, Vec<lb::FrontendKey>>,
    warnings: HashMap<ServiceKey, Vec<Warning>>,
    /// Imports: what their schedules chose per frontend, and their policy's type.
    scheduled: HashMap<ServiceKey, (Option<String>, BTreeMap<lb::FrontendKey, lb::Scheduled>)>,
}

impl Incremental {
    fn set(
        &mut self,
        key: ServiceKey,
        svc: Option<&Service>,
        slices: &[&EndpointSlice],
        opts: &Options,
        sched: Option<&ImportSchedule>,
    ) {
        for k in self.contrib.remove(&key).unwrap_or_default() {
            self.state.frontends.remove(&k);
        }
        self.warnings.remove(&key);
        self.scheduled.remove(&key);
        let Some(svc) = svc else { return };
        let (st, w, chosen) = lb::build_with(
            std::slice::from_ref(svc),
            slices,
            opts,
            sched.map(|s| s as &dyn lb::Scheduler),
        );
        self.contrib
            .insert(key.clone(), st.frontends.keys().copied().collect());
        self.state.frontends.extend(st.frontends);
        if !w.is_empty() {
            self.warnings.insert(key.clone(), w);
        }
        if let Some(s) = sched {
            let policy = s.policy.as_ref().map(|p| p.lb_type.clone());
            self.scheduled.insert(key, (policy, chosen));
        }
    }

    /// The imports whose frontends use, or left out as ejected, any of `backends`.
    fn imports_using(&self, backends: &HashSet<lb::Backend>) -> HashSet<ServiceKey> {
        self.scheduled
            .iter()
            .filter(|(key, (_, chosen))| {
                chosen
                    .values()
                    .any(|c| c.ejected.iter().any(|b| backends.contains(b)))
                    || self.contrib.get(*key).into_iter().flatten().any(|k| {
                        self.state
                            .frontends
                            .get(k)
                            .is_some_and(|f| f.backends.iter().any(|b| backends.contains(b)))
                    })
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The schedules of the imports with a policy or an ejection, for status.
    fn import_statuses(&self) -> Vec<imports::ImportStatus> {
        let mut out: Vec<imports::ImportStatus> = self
            .scheduled
            .iter()
            .filter(|(_, (policy, chosen))| {
                policy.is_some() || chosen.values().any(|c| !c.ejected.is_empty())
            })
            .flat_map(|((ns, name), (policy, chosen))| {
                let import = format!("{ns}/{}", name.trim_end_matches(mcs::IMPORT_MARK));
                imports::status_of(&import, policy.as_deref(), chosen)
            })
            .collect();
        out.sort_by(|a, b| (&a.import, &a.frontend).cmp(&(&b.import, &b.frontend)));
        out
    }

    fn rebuild_all(
        &mut self,
        services: &[Arc<Service>],
        imports: &[Arc<DynamicObject>],
        slices: &[Arc<EndpointSlice>],
        opts: &Options,
        sched: &imports::Scheduling,
    ) {
        *self = Incremental::default();
        let mut by_service: HashMap<ServiceKey, Vec<&EndpointSlice>> = HashMap::new();
        for sl in slices {
            if let Some(k) = slice_service(sl) {
                by_service.entry(k).or_default().push(sl);
            }
        }
        for svc in services {
            let key = key_of(&svc.metadata);
            let own = by_service.remove(&key).unwrap_or_default();
            self.set(key, Some(svc), &own, opts, None);
        }
        for imp in imports {
            let (ns, name) = key_of(&imp.metadata);
            let key = (ns, mcs::import_name(&name));
            let own = by_service.remove(&key).unwrap_or_default();
            self.set_import(key, Some(imp), &own, opts, sched);
        }
    }

    /// A ServiceImport's frontends: its ClusterSetIPs, with the endpoints of every source
    /// cluster's slices.
    fn set_import(
        &mut self,
        key: ServiceKey,
        import: Option<&DynamicObject>,
        slices: &[&EndpointSlice],
        opts: &Options,
        sched: &imports::Scheduling,
    ) {
        let svc = import.and_then(|i| mcs::import_service(&i.metadata, &i.data));
        let slices: Vec<EndpointSlice> =
            slices.iter().filter_map(|s| mcs::import_slice(s)).collect();
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        let name = key.1.trim_end_matches(mcs::IMPORT_MARK);
        let schedule = sched.for_import(&key.0, name);
        self.set(key.clone(), svc.as_ref(), &refs, opts, Some(&schedule));
    }

    /// Rebuilds the Services (and imports) `keys` from one scan of the slices.
    fn rebuild(
        &mut self,
        keys: HashSet<ServiceKey>,
        services: &Store<Service>,
        imports: &Store<DynamicObject>,
        slices: &[Arc<EndpointSlice>],
        opts: &Options,
        sched: &imports::Scheduling,
    ) {
        let mut own: HashMap<ServiceKey, Vec<&EndpointSlice>> =
            keys.into_iter().map(|k| (k, Vec::new())).collect();
        for sl in slices {
            if let Some(v) = slice_service(sl).and_then(|k| own.get_mut(&k)) {
                v.push(sl);
            }
        }
        for (key, own) in own {
            if let Some(name) = key.1.strip_suffix(mcs::IMPORT_MARK) {
                let r = reflector::ObjectRef::new_with(name, import_resource()).within(&key.0);
                let imp = imports.get(&r);
                self.set_import(key, imp.as_deref(), &own, opts, sched);
                continue;
            }
            let svc = services.get(&reflector::ObjectRef::new(&key.1).within(&key.0));
            self.set(key, svc.as_deref(), &own, opts, None);
        }
    }

    fn all_warnings(&self) -> Vec<Warning> {
        self.warnings.values().flatten().cloned().collect()
    }
}

/// Runs the agent until the process is stopped. The dataplane was created (and its pinned
/// state read back) before, so traffic keeps flowing while the API is out of reach.
pub async fn run(
    client: Client,
    dataplane: Box<dyn Dataplane>,
    pod_datapath: Option<(weir_dataplane::pods::PodDataplane, pods::PodConfig)>,
    cfg: AgentConfig,
) -> Result<(), std::io::Error> {
    let mut health =
        healthcheck::HealthServer::new(pod_datapath.as_ref().and_then(|(_, c)| c.netns.clone()));
    let pods = match pod_datapath {
        Some((dp, pcfg)) => {
            let p = Arc::new(pods::Pods {
                dataplane: Mutex::new(dp),
                status: Mutex::new(Default::default()),
                config: pcfg.clone(),
                nat_hold: Mutex::new(None),
            });
            pods::spawn(p.clone(), pcfg).map_err(std::io::Error::other)?;
            Some(p)
        }
        None => None,
    };
    // One watch of the Nodes serves the CNI plugin (this node's pod CIDRs and addresses) and
    // the loop below.
    let nodes_changed = Arc::new(Notify::new());
    let n2 = nodes_changed.clone();
    let node_store = spawn_reflector(
        Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()),
        watcher::Config::default(),
        move |_| n2.notify_one(),
    );
    // Other clusters' nodes (the mesh writes them): routed and left unmasqueraded as ours.
    let n3 = nodes_changed.clone();
    let remote_nodes = spawn_optional_kind_reflector(
        &client,
        &weir_model::kinds::REMOTE_NODE,
        watcher::Config::default(),
        move |_| n3.notify_one(),
    );
    let policy_report = Arc::new(Mutex::new(policy::PolicyReport::default()));
    let flow_log = Arc::new(Mutex::new(flows::FlowLog::new(&cfg.node_name)));
    flow_log
        .lock()
        .expect("flow log")
        .set_metrics_context(cfg.flow_metrics_context);
    if let Some(p) = &pods {
        flows::spawn(p.clone(), flow_log.clone()).map_err(std::io::Error::other)?;
        flows::spawn_drops(p.clone(), flow_log.clone()).map_err(std::io::Error::other)?;
        flows::spawn_traces(p.clone(), flow_log.clone()).map_err(std::io::Error::other)?;
        flows::spawn_kernel_drops(p.clone(), flow_log.clone());
        tcp_health::spawn(p.clone(), flow_log.clone());
        tokio::spawn(policy::run(
            client.clone(),
            p.clone(),
            policy_report.clone(),
            flow_log.clone(),
            cfg.node_name.clone(),
            cfg.identity_gc_grace,
            cfg.cluster_id.clone(),
        ));
    }
    let kind = dataplane.kind();
    let shared = Arc::new(Shared {
        dataplane: Mutex::new(dataplane),
        status: Mutex::new(SyncStatus {
            node: cfg.node_name.clone(),
            dataplane: kind.to_string(),
            ..Default::default()
        }),
        pods,
        policy: policy_report,
        flows: flow_log,
        nodes: node_store,
        node_name: cfg.node_name.clone(),
        switch: Mutex::new(None),
        switch_wake: Notify::new(),
        sock_events_read: Default::default(),
    });
    // From the Node objects: in VXLAN mode, the other nodes' pod CIDRs into the tunnel maps;
    // when masquerading, every node's pod CIDR (and the configured networks) into the map of
    // destinations left untranslated.
    if let Some(p) = shared
        .pods
        .as_ref()
        .filter(|p| p.config.tunnel.is_some() || p.config.masquerade)
    {
        let nodes = shared.nodes.clone();
        let p = p.clone();
        let sh = shared.clone();
        let me = cfg.node_name.clone();
        tokio::spawn(async move {
            // Nothing is written before the first complete list of Nodes: an empty view would
            // remove every other node's pod CIDR from the maps the previous agent left, and
            // pod-to-pod flows across nodes would be masqueraded (and broken) until it came.
            let _ = nodes.wait_until_ready().await;
            let _ = remote_nodes.wait_until_ready().await;
            loop {
                let mut nodes: Vec<Arc<k8s_openapi::api::core::v1::Node>> = nodes.state();
                nodes.extend(
                    remote_nodes
                        .state()
                        .iter()
                        .filter_map(|r| weir_control::tunnel::remote_node(r.data.get("spec")?))
                        .map(Arc::new),
                );
                if p.config.tunnel.is_some() {
                    let routes = weir_control::tunnel::routes(&nodes, &me);
                    let r = p.dataplane.lock().expect("pods").set_tunnel_routes(&routes);
                    match r {
                        Ok(()) => p.status.lock().expect("pod status").tunnel_routes = routes.len(),
                        Err(e) => tracing::error!(error = %e, "programming the tunnel routes"),
                    }
                }
                if p.config.masquerade {
                    let mut cidrs = weir_control::tunnel::pod_cidrs4(&nodes);
                    cidrs.extend(
                        p.config
                            .non_masquerade
                            .iter()
                            .map(|n| (n.network(), n.prefix_len())),
                    );
                    let r = p.dataplane.lock().expect("pods").set_nomasq_cidrs(&cidrs);
                    // The netfilter dataplanes masquerade in their own rules.
                    let nets: Vec<ipnet::Ipv4Net> = cidrs
                        .iter()
                        .filter_map(|(a, l)| ipnet::Ipv4Net::new(*a, *l).ok())
                        .collect();
                    let r = r.and_then(|()| {
                        sh.dataplane
                            .lock()
                            .expect("dataplane")
                            .set_masquerade(Some(nets))
                    });
                    match r {
                        Ok(()) => {
                            p.status.lock().expect("pod status").non_masquerade =
                                cidrs.iter().map(|(a, l)| format!("{a}/{l}")).collect()
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "programming the masquerade exceptions")
                        }
                    }
                }
                nodes_changed.notified().await;
            }
        });
    }
    for (i, addr) in cfg.listen.iter().enumerate() {
        let bound = probes::serve(*addr, shared.clone()).await?;
        tracing::info!(%bound, "serving /healthz, /readyz and /metrics");
        if let (0, Some(f)) = (i, &cfg.listen_file) {
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, bound.to_string()).and_then(|_| std::fs::rename(&tmp, f))?;
        }
    }
    let api_task = tokio::spawn(api::serve(cfg.socket.clone(), shared.clone()));
    let notify = Arc::new(Notify::new());
    let dirty = Arc::new(Mutex::new(Dirty {
        full: true,
        ..Default::default()
    }));
    let selected = watcher::Config::default()
        .labels(&service_label_selector(cfg.service_proxy_name.as_deref()));
    let services = spawn_reflector(
        Api::<Service>::all(client.clone()),
        selected.clone(),
        wake(&notify, &shared, &dirty, mark_service),
    );
    let slices = spawn_reflector(
        Api::<EndpointSlice>::all(client.clone()),
        selected,
        wake(&notify, &shared, &dirty, mark_slice),
    );
    // ServiceImports (their EndpointSlices come with the others): the mesh writes them.
    let imports = spawn_optional_kind_reflector(
        &client,
        &weir_model::kinds::SERVICE_IMPORT,
        watcher::Config::default(),
        wake(&notify, &shared, &dirty, mark_import),
    );
    // Their GlobalTrafficPolicies (a policy applies to the import of the same name).
    let policies = spawn_optional_kind_reflector(
        &client,
        &weir_model::kinds::GLOBAL_TRAFFIC_POLICY,
        watcher::Config::default(),
        wake(&notify, &shared, &dirty, mark_import),
    );
    // Without --cluster-id, the cluster's id is its cluster.clusterset.k8s.io ClusterProperty.
    let properties = cfg.cluster_id.is_none().then(|| {
        spawn_optional_kind_reflector(
            &client,
            &weir_model::kinds::CLUSTER_PROPERTY_V1ALPHA1,
            watcher::Config::default(),
            wake(&notify, &shared, &dirty, mark_everything),
        )
    });
    let mut sched = imports::Scheduling {
        policies: Some(policies.clone()),
        importer: cfg.cluster_id.clone().unwrap_or_default(),
        ..Default::default()
    };
    // The datapath's ejections: each event has the backends' health read again.
    let events = shared
        .dataplane
        .lock()
        .expect("dataplane")
        .ejection_events();
    if let Some(path) = events {
        let (n, d) = (notify.clone(), dirty.clone());
        imports::spawn_ejection_watch(path, move || {
            d.lock().expect("dirty lock").ejections = true;
            n.notify_one();
        })
        .map_err(std::io::Error::other)?;
    }
    spawn_translation_events(&shared)?;
    // Apply only from a complete view: until the initial lists are in, the pinned state
    // stays as the previous agent left it (stale entries are removed by the first apply).
    let _ = services.wait_until_ready().await;
    let _ = slices.wait_until_ready().await;
    let _ = imports.wait_until_ready().await;
    let _ = policies.wait_until_ready().await;
    if let Some(p) = &properties {
        let _ = p.wait_until_ready().await;
    }
    if let Some((_, health)) = refresh_ejections(&shared, &mut sched) {
        shared
            .dataplane
            .lock()
            .expect("dataplane lock")
            .acknowledge(&health)
            .ok();
    }
    tracing::info!(node = %cfg.node_name, "initial lists received; programming the datapath");
    let opts = Options {
        node_name: cfg.node_name.clone(),
        default_algorithm: cfg.default_algorithm,
        default_mode: cfg.default_mode,
    };
    let mut desired = Incremental::default();
    loop {
        // The stores hand out Arcs: no object is copied. After a relist everything is
        // rebuilt; otherwise only the Services that the events touched.
        let build_started = std::time::Instant::now();
        let (full, mut changed, since, ejections) = {
            let mut d = dirty.lock().expect("dirty lock");
            (
                std::mem::take(&mut d.full),
                std::mem::take(&mut d.services),
                d.since.take(),
                std::mem::take(&mut d.ejections),
            )
        };
        if let Some(id) = properties.as_ref().map(imports::cluster_id) {
            sched.importer = id;
        }
        let readmit = sched.next_readmission.is_some_and(|t| t <= Instant::now());
        let mut seen_health = None;
        if ejections || readmit {
            if let Some((moved, health)) = refresh_ejections(&shared, &mut sched) {
                changed.extend(desired.imports_using(&moved));
                seen_health = Some(health);
            }
        }
        let sls = slices.state();
        if full {
            desired.rebuild_all(&services.state(), &imports.state(), &sls, &opts, &sched);
        } else {
            desired.rebuild(changed, &services, &imports, &sls, &opts, &sched);
        }
        let state = &desired.state;
        shared
            .flows
            .lock()
            .expect("flow log")
            .set_services(backend_services(state), frontend_services(state));
        let mut warnings = desired.all_warnings();
        warnings.extend(shared.dataplane.lock().expect("dataplane").limits(state));
        let checks = lb::health_checks(&services.state(), &sls, &cfg.node_name);
        let served: Vec<(u16, String, usize)> = checks
            .iter()
            .map(|(p, c)| (*p, format!("{}/{}", c.namespace, c.name), c.local_endpoints))
            .collect();
        for e in health.update(checks) {
            warnings.push(Warning {
                service: String::new(),
                message: e,
            });
        }
        let build_micros = build_started.elapsed().as_micros() as u64;
        // A dataplane switch asked for: done here, between passes, with this pass's state.
        let request = shared.switch.lock().expect("switch").take();
        if let Some(req) = request {
            let report = switch::run(&shared, state, req.to, req.fail_after.as_deref());
            {
                let mut st = shared.status.lock().expect("status lock");
                st.dataplane = shared
                    .dataplane
                    .lock()
                    .expect("dataplane")
                    .kind()
                    .to_string();
                st.switch = Some(report.clone());
            }
            let _ = req.reply.send(report);
        }
        let started = std::time::Instant::now();
        let result = {
            let mut dp = shared.dataplane.lock().expect("dataplane lock");
            let r = dp.apply(state);
            // The ejections read for this pass are scheduled around now.
            match (&r, &seen_health) {
                (Ok(_), Some(h)) => dp.acknowledge(h).map(|()| r.expect("ok")),
                _ => r,
            }
        };
        metrics::record_apply("services", started.elapsed().as_secs_f64(), result.is_ok());
        match (&result, since) {
            (Ok(stats), Some(t)) if *stats != ApplyStats::default() => {
                if let Ok(d) = t.elapsed() {
                    metrics::METRICS.programming.observe(d.as_secs_f64());
                }
            }
            // Not applied: the change is still to be carried.
            (Err(_), Some(t)) => dirty.lock().expect("dirty lock").changed_at(t),
            _ => {}
        }
        {
            let mut st = shared.status.lock().expect("status lock");
            st.applies += 1;
            st.last_apply = Some(jiff::Timestamp::now().to_string());
            st.last_apply_micros = started.elapsed().as_micros() as u64;
            st.last_build_micros = build_micros;
            st.frontends = state.frontends.len();
            st.warnings = warnings;
            st.health_checks = served;
            st.schedules = desired.import_statuses();
            match result {
                Ok(stats) => {
                    if stats != ApplyStats::default() {
                        tracing::info!(?stats, micros = st.last_apply_micros, "datapath updated");
                    }
                    st.last_stats = stats;
                    st.synced = true;
                    st.last_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "applying the datapath state; retrying");
                    st.last_error = Some(e.to_string());
                    st.synced = false;
                }
            }
        }
        let failed = shared
            .status
            .lock()
            .map(|s| s.last_error.is_some())
            .unwrap_or(false);
        if failed {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let pass = build_started.elapsed().min(Duration::from_secs(1));
        let readmission = sched.next_readmission.map_or(Duration::from_secs(60), |t| {
            t.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            _ = notify.notified() => {}
            _ = shared.switch_wake.notified() => {}
            _ = tokio::time::sleep(readmission.min(Duration::from_secs(60))) => {
                // Quiet for a while: read the health again too, in case the ring buffer was
                // full when an ejection was posted.
                dirty.lock().expect("dirty lock").ejections = true;
            }
        }
        // Coalesce a burst of events into one apply: wait as long as the last pass took (at
        // least 5 ms), so that under a stream of changes (thousands of Services or imports
        // arriving) passes take at most half of a core and each carries a larger batch.
        tokio::time::sleep(pass.max(Duration::from_millis(5))).await;
        if api_task.is_finished() {
            return Err(std::io::Error::other("the introspection API stopped"));
        }
    }
}

/// Reads the backends' health from the datapath: the backends whose ejection began or ended,
/// and what was read. On an error, tries again in a second.
fn refresh_ejections(
    shared: &Shared,
    sched: &mut imports::Scheduling,
) -> Option<(HashSet<lb::Backend>, Vec<weir_dataplane::Ejection>)> {
    let health = shared.dataplane.lock().expect("dataplane lock").health();
    match health {
        Ok(h) => Some((sched.refresh(&h), h)),
        Err(e) => {
            tracing::warn!(error = %e, "reading the backends' health");
            sched.next_readmission = Some(Instant::now() + Duration::from_secs(1));
            None
        }
    }
}

/// With flow summaries on, the socket layer's translations go into the flow log (their
/// clients named by the node's endpoint records): called at the start, and again when a
/// switch made eBPF the dataplane (the reader starts once; its ring stays pinned across
/// switches).
pub(crate) fn spawn_translation_events(shared: &Shared) -> std::io::Result<()> {
    let on = shared
        .pods
        .as_ref()
        .is_some_and(|p| p.config.flow_summaries);
    let mut dp = shared.dataplane.lock().expect("dataplane");
    let Some(path) = dp.translation_events() else {
        return Ok(());
    };
    // Written either way: the setting is pinned, and an earlier agent may have turned it on.
    dp.set_translation_events(on)
        .map_err(std::io::Error::other)?;
    drop(dp);
    let Some(p) = shared.pods.as_ref().filter(|_| on) else {
        return Ok(());
    };
    if shared
        .sock_events_read
        .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return Ok(());
    }
    flows::spawn_sock_events(path, p.config.endpoint_dir.clone(), shared.flows.clone()).map_err(
        |e| {
            // Not reading: the next switch to eBPF tries again.
            shared
                .sock_events_read
                .store(false, std::sync::atomic::Ordering::SeqCst);
            std::io::Error::other(e)
        },
    )
}

/// Every frontend of `state` -> its Service (`namespace/name`), node ports under the
/// unspecified address of their family, for naming translated flows.
fn frontend_services(
    state: &weir_control::lb::LbState,
) -> std::collections::HashMap<(std::net::IpAddr, u16, u8), String> {
    state
        .frontends
        .iter()
        .map(|(k, f)| ((k.vip, k.port, k.proto.number()), service_of(f)))
        .collect()
}

/// A frontend's Service, `namespace/name` (without its port's name).
fn service_of(f: &weir_control::lb::Frontend) -> String {
    f.service
        .split_once(':')
        .map_or(&*f.service, |(s, _)| s)
        .to_string()
}

/// Every backend of `state` -> its Service (`namespace/name`, without the port), for naming
/// flows that do not say which frontend they came through. A backend several Services share
/// is named by the first of them by name (the same on every node and every round).
fn backend_services(
    state: &weir_control::lb::LbState,
) -> std::collections::HashMap<(std::net::IpAddr, u16, u8), String> {
    let mut out = std::collections::HashMap::new();
    for (k, f) in &state.frontends {
        let name = service_of(f);
        for b in f.backends.iter().chain(&f.standby) {
            out.entry((b.ip, b.port, k.proto.number()))
                .and_modify(|n: &mut String| {
                    if name < *n {
                        n.clone_from(&name);
                    }
                })
                .or_insert_with(|| name.clone());
        }
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use serde_json::json;

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "x", "resourceVersion": "1"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}))
        .unwrap()
    }

    fn slice(name: &str, owner: &str, addr: &str) -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "x", "labels": {lb::SERVICE_NAME_LABEL: owner}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [addr]}]}))
        .unwrap()
    }

    fn opts() -> Options {
        Options {
            node_name: "n".into(),
            default_algorithm: lb::Algorithm::Random,
            default_mode: lb::LbMode::Snat,
        }
    }

    /// Applies `events` to the stores and the dirty set as the reflectors would, rebuilds the
    /// dirty Services, and checks the result against a full build.
    #[test]
    fn incremental_state_equals_a_full_build() {
        let (svc_reader, mut svc_writer): (Store<Service>, Writer<Service>) = reflector::store();
        let mut slices: Vec<Arc<EndpointSlice>> = Vec::new();
        let mut dirty = Dirty::default();
        let mut inc = Incremental::default();
        let services = vec![
            svc("a", "10.96.0.1"),
            svc("b", "10.96.0.2"),
            svc("c", "10.96.0.3"),
        ];
        for s in &services {
            svc_writer.apply_watcher_event(&watcher::Event::Apply(s.clone()));
        }
        let initial = vec![
            slice("a-1", "a", "10.0.0.1"),
            slice("b-1", "b", "10.0.0.2"),
            slice("c-1", "c", "10.0.0.3"),
        ];
        for sl in &initial {
            mark_slice(&mut dirty, sl, false);
            slices.push(Arc::new(sl.clone()));
        }
        let imports = reflector::store::Writer::<DynamicObject>::new(import_resource()).as_reader();
        let sched = imports::Scheduling::default();
        inc.rebuild_all(&svc_reader.state(), &[], &slices, &opts(), &sched);
        let check = |inc: &Incremental, slices: &[Arc<EndpointSlice>]| {
            let (full, _) = lb::build(&svc_reader.state(), slices, &opts());
            assert_eq!(inc.state, full);
        };
        check(&inc, &slices);

        // b-1 moves from Service b to Service c: both must be rebuilt.
        dirty.services.clear();
        let moved = slice("b-1", "c", "10.0.0.2");
        mark_slice(&mut dirty, &moved, false);
        slices[1] = Arc::new(moved);
        assert!(
            dirty.services.contains(&("x".into(), "b".into()))
                && dirty.services.contains(&("x".into(), "c".into()))
        );
        let keys = std::mem::take(&mut dirty.services);
        inc.rebuild(keys, &svc_reader, &imports, &slices, &opts(), &sched);
        check(&inc, &slices);

        // Service a is deleted: its frontend goes.
        let gone = services[0].clone();
        svc_writer.apply_watcher_event(&watcher::Event::Delete(gone.clone()));
        mark_service(&mut dirty, &gone, true);
        let keys = std::mem::take(&mut dirty.services);
        inc.rebuild(keys, &svc_reader, &imports, &slices, &opts(), &sched);
        check(&inc, &slices);
        assert_eq!(inc.state.frontends.len(), 2);

        // c-1 is deleted: only b-1 remains behind Service c.
        let c1 = slices.remove(2);
        mark_slice(&mut dirty, &c1, true);
        let keys = std::mem::take(&mut dirty.services);
        inc.rebuild(keys, &svc_reader, &imports, &slices, &opts(), &sched);
        check(&inc, &slices);
    }
}
