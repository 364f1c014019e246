//! Services and EndpointSlices to load-balancing state, with Kubernetes' semantics: one
//! frontend per ClusterIP and port; backends from the Service's EndpointSlices with ports
//! resolved per slice; ready endpoints, or serving+terminating ones when none is ready
//! (KEP-1669); internalTrafficPolicy; session affinity; headless and ExternalName Services
//! get no frontend.
//!
//! Traffic from outside the cluster gets frontends of its own ([`Scope::External`]), read only
//! by the per-packet datapath: NodePorts (address 0.0.0.0 or ::, meaning any address of this
//! node), externalIPs and LoadBalancer ingress IPs, with externalTrafficPolicy deciding whether
//! their backends are all endpoints or this node's only. Pods reaching an externalIP or
//! LoadBalancer IP use the cluster-wide backends ([`Scope::Cluster`]), as kube-proxy
//! short-circuits them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::{Deserialize, Serialize};

/// Annotation choosing a Service's backend selection: `random` or `maglev`.
pub const ALGORITHM_ANNOTATION: &str = "weir.dev/lb-algorithm";
/// Annotation choosing how NodePort/external traffic reaches a backend on another node:
/// `snat` (the default) or `dsr`.
pub const LB_MODE_ANNOTATION: &str = "weir.dev/lb-mode";
/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Default session affinity timeout (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// Transport protocol of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
    /// From an IP protocol number.
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// Which traffic a frontend serves.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum Scope {
    /// Traffic from inside the cluster (the socket layer; ClusterIPs, and externalIPs and
    /// LoadBalancer IPs reached from pods).
    #[default]
    Cluster,
    /// Traffic from outside arriving at this node (the per-packet datapath): NodePorts,
    /// externalIPs, LoadBalancer IPs.
    External,
}

impl Scope {
    /// The value of `lb4_key.scope` / `lb6_key.scope`.
    pub fn number(self) -> u8 {
        match self {
            Scope::Cluster => 0,
            Scope::External => 1,
        }
    }
    /// From the key's value.
    pub fn from_number(n: u8) -> Scope {
        if n == 1 {
            Scope::External
        } else {
            Scope::Cluster
        }
    }
}

/// A service address: VIP, port, protocol and scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FrontendKey {
    /// The ClusterIP, externalIP or LoadBalancer IP; for a NodePort 0.0.0.0 or ::.
    pub vip: IpAddr,
    /// The Service port (the node port for a NodePort).
    pub port: u16,
    /// The protocol.
    pub proto: Proto,
    /// Which traffic it serves.
    #[serde(default)]
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ext = if self.scope == Scope::External {
            " (external)"
        } else {
            ""
        };
        match self.vip {
            IpAddr::V4(a) if a.is_unspecified() => {
                write!(f, "*:{}/{} (NodePort)", self.port, self.proto)
            }
            IpAddr::V6(a) if a.is_unspecified() => {
                write!(f, "[*]:{}/{} (NodePort)", self.port, self.proto)
            }
            IpAddr::V4(a) => write!(f, "{a}:{}/{}{ext}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}{ext}", self.port, self.proto),
        }
    }
}

/// A backend address (its protocol is the frontend's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// Endpoint IP.
    pub ip: IpAddr,
    /// Resolved target port.
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// How a backend is chosen for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// Uniformly at random.
    Random,
    /// From the Service's Maglev table.
    Maglev,
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Algorithm::Random),
            "maglev" => Ok(Algorithm::Maglev),
            other => Err(format!(
                "unknown load-balancing algorithm {other:?} (use random or maglev)"
            )),
        }
    }
}

/// How traffic from outside reaches a backend on another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LbMode {
    /// Source NAT to the receiving node: replies come back through it.
    #[default]
    Snat,
    /// Direct server return: the packet is tunnelled (IPIP) to the backend's node with the
    /// client's address kept, and the reply leaves the backend's node straight to the client.
    Dsr,
}

impl std::str::FromStr for LbMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "snat" => Ok(LbMode::Snat),
            "dsr" => Ok(LbMode::Dsr),
            other => Err(format!(
                "unknown load-balancing mode {other:?} (use snat or dsr)"
            )),
        }
    }
}

/// Everything the datapath needs to know about one frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frontend {
    /// `namespace/name:port-name` of the Service port.
    pub service: String,
    /// Backends new connections may go to, sorted.
    pub backends: Vec<Backend>,
    /// True when `backends` are serving+terminating endpoints because none is ready.
    pub terminating_fallback: bool,
    /// Session affinity timeout in seconds (sessionAffinity: ClientIP), or None.
    pub affinity_timeout: Option<u32>,
    /// Backend selection.
    pub algorithm: Algorithm,
    /// Client addresses allowed (loadBalancerSourceRanges, on the external frontends of
    /// LoadBalancer IPs); empty: any.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// External frontends: how a backend on another node is reached.
    pub mode: LbMode,
    /// Per backend (in `backends` order), its relative share of new connections; empty: all
    /// equal. Set for ServiceImports under a GlobalTrafficPolicy.
    pub weights: Vec<u32>,
    /// Outlier detection of the backends (every ClusterSetIP), or None.
    pub outlier: Option<Outlier>,
    /// Endpoints listed but given no new connection (share 0, unready, ejected): kept in
    /// the datapath for the connections they have (tc flows keep their conntrack entries,
    /// connected UDP sockets stay open) and under outlier detection, so that an ejection runs
    /// its time.
    pub standby: Vec<Backend>,
}

impl Frontend {
    /// A frontend of `service` with `backends`, chosen at random with equal weights, and
    /// nothing else set (no affinity, source ranges, outlier detection or standby).
    pub fn new(service: impl Into<String>, backends: Vec<Backend>) -> Frontend {
        Frontend {
            service: service.into(),
            backends,
            terminating_fallback: false,
            affinity_timeout: None,
            algorithm: Algorithm::Random,
            source_ranges: Vec::new(),
            mode: LbMode::Snat,
            weights: Vec::new(),
            outlier: None,
            standby: Vec::new(),
        }
    }
}

/// Outlier detection settings the datapath enforces per backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Outlier {
    /// Consecutive failed connects that eject a backend.
    pub consecutive_failures: u32,
    /// Ejection time (times the number of ejections), in milliseconds.
    pub base_ejection_ms: u32,
}

/// The desired load-balancing state of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LbState {
    /// Frontends by address.
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// Node-wide settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name (for internalTrafficPolicy: Local).
    pub node_name: String,
    /// Selection when a Service has no annotation.
    pub default_algorithm: Algorithm,
    /// Mode of external frontends when a Service has no `weir.dev/lb-mode` annotation.
    pub default_mode: LbMode,
}

/// Something in the input that weir does not act on, said rather than silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// `namespace/name` of the Service.
    pub service: String,
    /// What is not acted on, and why.
    pub message: String,
}

/// One endpoint of a Service port, as its EndpointSlice lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    /// Its address.
    pub ip: IpAddr,
    /// Its port for this Service port.
    pub port: u16,
    /// Ready (unset counts as ready).
    pub ready: bool,
    /// Serving (unset: as ready).
    pub serving: bool,
    /// Terminating.
    pub terminating: bool,
    /// Its node, if known.
    pub node: Option<String>,
    /// The cluster it is in (the MCS `source-cluster` label of its slice), if any.
    pub cluster: Option<String>,
}

impl EndpointView {
    /// Its backend address.
    pub fn backend(&self) -> Backend {
        Backend {
            ip: self.ip,
            port: self.port,
        }
    }
}

/// Chooses a frontend's backends from its endpoints instead of the plain ready rule (a
/// ServiceImport under a GlobalTrafficPolicy).
pub trait Scheduler {
    /// The backends, their weights (empty: equal) and outlier settings, and the plan
    /// behind them.
    fn select(&self, proto: Proto, endpoints: &[EndpointView]) -> Scheduled;
}

/// What a [`Scheduler`] chose for one frontend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scheduled {
    /// Backends new connections may use, sorted.
    pub backends: Vec<Backend>,
    /// Their weights, in the same order (empty: equal).
    pub weights: Vec<u32>,
    /// Outlier detection of the backends.
    pub outlier: Option<Outlier>,
    /// The share of each cluster and why.
    pub plan: Vec<crate::schedule::ClusterShare>,
    /// Backends left out because the datapath ejected them.
    pub ejected: Vec<Backend>,
    /// Every listed endpoint not in `backends`.
    pub standby: Vec<Backend>,
}

/// Builds the load-balancing state from all Services and EndpointSlices.
pub fn build<S, E>(services: &[S], slices: &[E], opts: &Options) -> (LbState, Vec<Warning>)
where
    S: std::borrow::Borrow<Service>,
    E: std::borrow::Borrow<EndpointSlice>,
{
    let (st, w, _) = build_with(services, slices, opts, None);
    (st, w)
}

/// [`build`], with the backends of every cluster-scope frontend chosen by `sched` when given;
/// also returns what it chose per frontend.
pub fn build_with<S, E>(
    services: &[S],
    slices: &[E],
    opts: &Options,
    sched: Option<&dyn Scheduler>,
) -> (LbState, Vec<Warning>, BTreeMap<FrontendKey, Scheduled>)
where
    S: std::borrow::Borrow<Service>,
    E: std::borrow::Borrow<EndpointSlice>,
{
    let mut scheduled = BTreeMap::new();
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices.iter().map(|s| s.borrow()) {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        by_service
            .entry((
                s.metadata.namespace.clone().unwrap_or_default(),
                svc.clone(),
            ))
            .or_default()
            .push(s);
    }
    let mut state = LbState::default();
    let mut warnings = Vec::new();
    for svc in services.iter().map(|s| s.borrow()) {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let id = format!("{ns}/{name}");
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|i| vec![i]))
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i.parse().ok())
            .collect();
        if ips.is_empty() {
            continue; // headless, or not allocated yet
        }
        let algorithm = match svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ALGORITHM_ANNOTATION))
        {
            None => opts.default_algorithm,
            Some(v) => match v.parse() {
                Ok(a) => a,
                Err(e) => {
                    warnings.push(Warning {
                        service: id.clone(),
                        message: format!(
                            "annotation {ALGORITHM_ANNOTATION}: {e}; using the default"
                        ),
                    });
                    opts.default_algorithm
                }
            },
        };
        let mode = match svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LB_MODE_ANNOTATION))
        {
            None => opts.default_mode,
            Some(v) => v.parse().unwrap_or_else(|e| {
                warnings.push(Warning {
                    service: id.clone(),
                    message: format!("annotation {LB_MODE_ANNOTATION}: {e}; using the default"),
                });
                opts.default_mode
            }),
        };
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map(|t| t.max(1) as u32)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        // externalIPs, and the LoadBalancer's ingress IPs from its status.
        let mut external_ips: Vec<IpAddr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|i| i.parse().ok())
            .collect();
        let mut lb_ips: Vec<IpAddr> = Vec::new();
        let mut source_ranges: Vec<ipnet::IpNet> = Vec::new();
        if spec.type_.as_deref() == Some("LoadBalancer") {
            lb_ips.extend(
                svc.status
                    .as_ref()
                    .and_then(|st| st.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.ip.as_deref())
                    .filter_map(|i| i.parse::<IpAddr>().ok()),
            );
            external_ips.extend(lb_ips.iter().copied());
            for r in spec.load_balancer_source_ranges.iter().flatten() {
                match r.trim().parse::<ipnet::IpNet>() {
                    Ok(n) => source_ranges.push(n.trunc()),
                    Err(_) => warnings.push(Warning {
                        service: id.clone(),
                        message: format!(
                            "spec.loadBalancerSourceRanges: {r:?} is not a CIDR; ignored"
                        ),
                    }),
                }
            }
        }
        let svc_slices = by_service
            .get(&(ns.clone(), name.clone()))
            .cloned()
            .unwrap_or_default();
        for sp in spec.ports.iter().flatten() {
            let proto = match sp.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                other => {
                    warnings.push(Warning {
                        service: id.clone(),
                        message: format!(
                            "port {} uses {other}, which weir does not load-balance",
                            sp.port
                        ),
                    });
                    continue;
                }
            };
            let port_name = sp.name.clone().unwrap_or_default();
            let service = format!(
                "{id}:{}",
                if port_name.is_empty() {
                    sp.port.to_string()
                } else {
                    port_name.clone()
                }
            );
            let mut add = |key: FrontendKey, local: bool, source_ranges: &[ipnet::IpNet]| {
                let endpoints = endpoints_for(&svc_slices, &key.vip, &ips, &port_name, proto);
                let (backends, fallback, weights, outlier, standby) = match sched {
                    Some(s) => {
                        // internalTrafficPolicy: Local keeps to this node's endpoints here too.
                        let endpoints: Vec<EndpointView> = endpoints
                            .into_iter()
                            .filter(|e| !local || e.node.as_ref() == Some(&opts.node_name))
                            .collect();
                        let mut chosen = s.select(proto, &endpoints);
                        let picked = (
                            std::mem::take(&mut chosen.backends),
                            false,
                            std::mem::take(&mut chosen.weights),
                            chosen.outlier,
                            std::mem::take(&mut chosen.standby),
                        );
                        scheduled.insert(key, chosen);
                        picked
                    }
                    None => {
                        let (b, f) = select(&endpoints, local.then_some(&opts.node_name));
                        (b, f, Vec::new(), None, Vec::new())
                    }
                };
                state.frontends.insert(
                    key,
                    Frontend {
                        service: service.clone(),
                        backends,
                        weights,
                        outlier,
                        standby,
                        terminating_fallback: fallback,
                        affinity_timeout,
                        algorithm,
                        source_ranges: source_ranges
                            .iter()
                            .filter(|r| r.addr().is_ipv4() == key.vip.is_ipv4())
                            .copied()
                            .collect(),
                        mode: if key.scope == Scope::External {
                            mode
                        } else {
                            LbMode::Snat
                        },
                    },
                );
            };
            for ip in &ips {
                add(
                    FrontendKey {
                        vip: *ip,
                        port: sp.port as u16,
                        proto,
                        scope: Scope::Cluster,
                    },
                    local_only,
                    &[],
                );
            }
            for ip in external_ips
                .iter()
                .filter(|e| ips.iter().any(|c| c.is_ipv4() == e.is_ipv4()))
            {
                // From pods: cluster-wide (internalTrafficPolicy); from outside:
                // externalTrafficPolicy, and loadBalancerSourceRanges for LoadBalancer IPs.
                let ranges: &[ipnet::IpNet] = if lb_ips.contains(ip) {
                    &source_ranges
                } else {
                    &[]
                };
                for (scope, local, ranges) in [
                    (Scope::Cluster, local_only, &[][..]),
                    (Scope::External, external_local, ranges),
                ] {
                    add(
                        FrontendKey {
                            vip: *ip,
                            port: sp.port as u16,
                            proto,
                            scope,
                        },
                        local,
                        ranges,
                    );
                }
            }
            if let Some(np) = sp.node_port.filter(|_| node_ports) {
                for ip in &ips {
                    let any = match ip {
                        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
                        IpAddr::V6(_) => IpAddr::from([0u8; 16]),
                    };
                    add(
                        FrontendKey {
                            vip: any,
                            port: np as u16,
                            proto,
                            scope: Scope::External,
                        },
                        external_local,
                        &[],
                    );
                }
            }
        }
    }
    (state, warnings, scheduled)
}

/// A Service's health-check node port (type LoadBalancer with externalTrafficPolicy: Local):
/// load balancers outside the cluster ask it whether this node has endpoints to send to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Ready endpoints of the Service on this node (distinct addresses).
    pub local_endpoints: usize,
}

/// The health-check node ports this node must serve, by port, as kube-proxy serves them.
pub fn health_checks<S, E>(
    services: &[S],
    slices: &[E],
    node_name: &str,
) -> BTreeMap<u16, HealthCheck>
where
    S: std::borrow::Borrow<Service>,
    E: std::borrow::Borrow<EndpointSlice>,
{
    let mut out = BTreeMap::new();
    for svc in services.iter().map(|s| s.borrow()) {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let Some(port) = spec.health_check_node_port.filter(|p| *p > 0 && *p < 65536) else {
            continue;
        };
        if spec.type_.as_deref() != Some("LoadBalancer")
            || spec.external_traffic_policy.as_deref() != Some("Local")
        {
            continue;
        }
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let mut local = BTreeSet::new();
        for sl in slices.iter().map(|s| s.borrow()) {
            let owner = sl
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if sl.metadata.namespace.as_deref() != Some(ns.as_str()) || owner != Some(&name) {
                continue;
            }
            for e in sl.endpoints.iter().flatten() {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if ready && e.node_name.as_deref() == Some(node_name) {
                    if let Some(a) = e.addresses.first() {
                        local.insert(a.clone());
                    }
                }
            }
        }
        out.insert(
            port as u16,
            HealthCheck {
                namespace: ns,
                name,
                local_endpoints: local.len(),
            },
        );
    }
    out
}

/// The backends new connections may use: ready endpoints (of this node only when `node` is
/// given), else serving and terminating ones (KEP-1669). Returns them sorted, and whether they
/// are the terminating fallback.
pub(crate) fn select(endpoints: &[EndpointView], node: Option<&String>) -> (Vec<Backend>, bool) {
    let eligible: Vec<&EndpointView> = endpoints
        .iter()
        .filter(|e| node.is_none() || e.node.as_ref() == node)
        .collect();
    let pick = |f: &dyn Fn(&EndpointView) -> bool| -> Vec<Backend> {
        eligible
            .iter()
            .filter(|e| f(e))
            .map(|e| Backend {
                ip: e.ip,
                port: e.port,
            })
            .collect::<BTreeSet<Backend>>()
            .into_iter()
            .collect()
    };
    let ready = pick(&|e| e.ready);
    if !ready.is_empty() {
        return (ready, false);
    }
    let terminating = pick(&|e| e.serving && e.terminating);
    let fallback = !terminating.is_empty();
    (terminating, fallback)
}

/// Endpoints of the family of `vip` (for a NodePort, 0.0.0.0 or ::; an externalIP may be of
/// either family: its backends are those of the Service's ClusterIP of the same family, if
/// any).
fn endpoints_for(
    slices: &[&EndpointSlice],
    vip: &IpAddr,
    cluster_ips: &[IpAddr],
    port_name: &str,
    proto: Proto,
) -> Vec<EndpointView> {
    if !cluster_ips.iter().any(|c| c.is_ipv4() == vip.is_ipv4()) {
        return Vec::new();
    }
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut out = Vec::new();
    for s in slices.iter().filter(|s| s.address_type == family) {
        let cluster = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::mcs::SOURCE_CLUSTER_LABEL))
            .cloned();
        // The slice's port of this name and protocol: its number applies to every endpoint
        // of the slice (slices are split by resolved port set).
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.clone().unwrap_or_default() == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == proto.to_string()
            })
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            // Consumers use the first address (the API allows more for future use).
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = e.conditions.clone().unwrap_or_default();
            // Unset conditions: ready means ready; serving defaults to ready.
            let ready = c.ready.unwrap_or(true);
            out.push(EndpointView {
                ip,
                port: port as u16,
                ready,
                serving: c.serving.unwrap_or(ready),
                terminating: c.terminating.unwrap_or(false),
                node: e.node_name.clone(),
                cluster: cluster.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(extra: serde_json::Value) -> Service {
        let mut v = json!({"metadata": {"name": "web", "namespace": "x"}, "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}});
        merge(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
        if let (Some(am), Some(bm)) = (a.as_object_mut(), b.as_object()) {
            for (k, v) in bm {
                merge(am.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        } else {
            *a = b.clone();
        }
    }

    fn slice(name: &str, port: i32, eps: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "x", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}], "endpoints": eps}))
        .unwrap()
    }

    const NO_SLICES: &[EndpointSlice] = &[];

    fn opts() -> Options {
        Options {
            node_name: "node-1".into(),
            default_algorithm: Algorithm::Random,
            default_mode: LbMode::Snat,
        }
    }

    fn backends(st: &LbState) -> Vec<String> {
        st.frontends
            .values()
            .next()
            .map(|f| f.backends.iter().map(|b| b.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn ready_endpoints_with_ports_resolved_per_slice() {
        let s = svc(json!({}));
        let slices = vec![
            slice(
                "a",
                8080,
                json!([{"addresses": ["10.244.1.2"], "conditions": {"ready": true}}, {"addresses": ["10.244.1.3"], "conditions": {"ready": false}}]),
            ),
            slice("b", 9090, json!([{"addresses": ["10.244.2.2"]}])),
        ];
        let (st, w) = build(&[s], &slices, &opts());
        assert!(w.is_empty());
        let key = FrontendKey {
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
            scope: Scope::Cluster,
        };
        assert_eq!(st.frontends[&key].service, "x/web:http");
        assert_eq!(backends(&st), vec!["10.244.1.2:8080", "10.244.2.2:9090"]);
    }

    #[test]
    fn terminating_fallback_only_when_nothing_is_ready() {
        let s = svc(json!({}));
        let eps = json!([
            {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.1.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["10.244.1.4"], "conditions": {"ready": true, "serving": true, "terminating": false}}]);
        let (st, _) = build(std::slice::from_ref(&s), &[slice("a", 8080, eps)], &opts());
        assert_eq!(backends(&st), vec!["10.244.1.4:8080"]);
        let eps = json!([
            {"addresses": ["10.244.1.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.1.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["10.244.1.5"], "conditions": {"ready": false, "serving": false, "terminating": false}}]);
        let (st, _) = build(&[s], &[slice("a", 8080, eps)], &opts());
        assert_eq!(backends(&st), vec!["10.244.1.2:8080"]);
        assert!(st.frontends.values().next().unwrap().terminating_fallback);
    }

    #[test]
    fn no_endpoints_still_has_a_frontend_that_refuses() {
        let (st, _) = build(&[svc(json!({}))], NO_SLICES, &opts());
        assert_eq!(st.frontends.len(), 1);
        assert!(st.frontends.values().next().unwrap().backends.is_empty());
    }

    #[test]
    fn headless_and_external_name_get_nothing() {
        let (st, _) = build(
            &[svc(
                json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
            )],
            NO_SLICES,
            &opts(),
        );
        assert!(st.frontends.is_empty());
        let (st, _) = build(
            &[svc(
                json!({"spec": {"type": "ExternalName", "externalName": "x.example"}}),
            )],
            NO_SLICES,
            &opts(),
        );
        assert!(st.frontends.is_empty());
    }

    #[test]
    fn affinity_algorithm_and_dual_stack() {
        let s = svc(
            json!({"metadata": {"annotations": {ALGORITHM_ANNOTATION: "maglev"}},
            "spec": {"sessionAffinity": "ClientIP", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"], "ipFamilies": ["IPv4", "IPv6"]}}),
        );
        let (st, _) = build(&[s], NO_SLICES, &opts());
        assert_eq!(st.frontends.len(), 2);
        for f in st.frontends.values() {
            assert_eq!(f.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
            assert_eq!(f.algorithm, Algorithm::Maglev);
        }
        let s = svc(
            json!({"metadata": {"annotations": {ALGORITHM_ANNOTATION: "fastest"}}, "spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}}),
        );
        let (st, w) = build(&[s], NO_SLICES, &opts());
        assert_eq!(
            st.frontends.values().next().unwrap().affinity_timeout,
            Some(30)
        );
        assert_eq!(w.len(), 1, "an unknown algorithm is reported");
    }

    #[test]
    fn internal_traffic_policy_local() {
        let s = svc(json!({"spec": {"internalTrafficPolicy": "Local"}}));
        let eps = json!([{"addresses": ["10.244.1.2"], "nodeName": "node-1"}, {"addresses": ["10.244.2.2"], "nodeName": "node-2"}]);
        let (st, _) = build(&[s], &[slice("a", 8080, eps)], &opts());
        assert_eq!(backends(&st), vec!["10.244.1.2:8080"]);
    }

    #[test]
    fn multi_port_and_udp() {
        let s = svc(
            json!({"spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "s", "port": 9, "protocol": "SCTP"}]}}),
        );
        let sl: EndpointSlice = serde_json::from_value(json!({"metadata": {"name": "a", "namespace": "x", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["10.244.1.2"]}]})).unwrap();
        let (st, w) = build(&[s], &[sl], &opts());
        let udp = FrontendKey {
            vip: "10.96.0.10".parse().unwrap(),
            port: 53,
            proto: Proto::Udp,
            scope: Scope::Cluster,
        };
        assert_eq!(
            st.frontends[&udp].backends[0].to_string(),
            "10.244.1.2:5353"
        );
        assert_eq!(st.frontends.len(), 2);
        assert_eq!(w.len(), 1);
    }

    fn node_slices() -> Vec<EndpointSlice> {
        vec![serde_json::from_value(json!({"metadata": {"name": "a", "namespace": "x", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.2"], "nodeName": "node-1"}, {"addresses": ["10.244.2.2"], "nodeName": "node-2"}]}))
        .unwrap()]
    }

    fn ext_backends(st: &LbState, vip: &str, port: u16, scope: Scope) -> Option<Vec<String>> {
        st.frontends
            .get(&FrontendKey {
                vip: vip.parse().unwrap(),
                port,
                proto: Proto::Tcp,
                scope,
            })
            .map(|f| f.backends.iter().map(|b| b.to_string()).collect())
    }

    #[test]
    fn node_ports_external_ips_and_load_balancer_ips_with_both_traffic_policies() {
        let all = Some(vec![
            "10.244.1.2:8080".to_string(),
            "10.244.2.2:8080".to_string(),
        ]);
        let local = Some(vec!["10.244.1.2:8080".to_string()]);
        let lb = |etp: &str| {
            svc(
                json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": etp,
                "externalIPs": ["192.0.2.10", "2001:db8::10"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}}),
            )
        };
        for (etp, want) in [("Cluster", &all), ("Local", &local)] {
            let (st, w) = build(&[lb(etp)], &node_slices(), &opts());
            assert!(w.is_empty(), "{w:?}");
            // From outside: NodePort on any node address, externalIPs, LoadBalancer IPs.
            for vip in ["0.0.0.0", "192.0.2.10", "198.51.100.7"] {
                let port = if vip == "0.0.0.0" { 30080 } else { 80 };
                assert_eq!(
                    &ext_backends(&st, vip, port, Scope::External),
                    want,
                    "{etp} {vip}"
                );
            }
            // From pods: externalIPs and LoadBalancer IPs are short-circuited cluster-wide;
            // the ClusterIP is unaffected by externalTrafficPolicy.
            for vip in ["192.0.2.10", "198.51.100.7", "10.96.0.10"] {
                assert_eq!(
                    ext_backends(&st, vip, 80, Scope::Cluster),
                    all,
                    "{etp} {vip}"
                );
            }
            // No frontend for an externalIP of a family the Service has no ClusterIP of, and
            // a NodePort is not a pod-side frontend.
            assert_eq!(ext_backends(&st, "2001:db8::10", 80, Scope::External), None);
            assert_eq!(ext_backends(&st, "0.0.0.0", 30080, Scope::Cluster), None);
        }
        // ClusterIP Services get no external frontends even with a nodePort field.
        let cip =
            svc(json!({"spec": {"ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}));
        let (st, _) = build(&[cip], &node_slices(), &opts());
        assert!(st.frontends.keys().all(|k| k.scope == Scope::Cluster));
        // externalTrafficPolicy: Local without a local endpoint: a frontend that refuses.
        let mut o = opts();
        o.node_name = "node-3".into();
        let (st, _) = build(&[lb("Local")], &node_slices(), &o);
        assert_eq!(
            ext_backends(&st, "0.0.0.0", 30080, Scope::External),
            Some(vec![])
        );
    }

    #[test]
    fn health_check_ports_count_this_nodes_ready_endpoints() {
        let lb = svc(
            json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000, "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}),
        );
        let hc = health_checks(std::slice::from_ref(&lb), &node_slices(), "node-1");
        assert_eq!(
            hc[&32000],
            HealthCheck {
                namespace: "x".into(),
                name: "web".into(),
                local_endpoints: 1
            }
        );
        assert_eq!(
            health_checks(&[lb], &node_slices(), "node-3")[&32000].local_endpoints,
            0
        );
        // Only LoadBalancer Services with the Local policy have one.
        let cluster = svc(
            json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
            "healthCheckNodePort": 32000, "ports": [{"name": "http", "port": 80}]}}),
        );
        assert!(health_checks(&[cluster], &node_slices(), "node-1").is_empty());
    }

    #[test]
    fn source_ranges_guard_only_the_external_load_balancer_frontends() {
        let lb = svc(
            json!({"spec": {"type": "LoadBalancer", "externalIPs": ["192.0.2.10"],
            "loadBalancerSourceRanges": ["172.30.0.0/24", "10.1.2.3/8", "2001:db8::/32", "bad"],
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}}),
        );
        let (st, w) = build(&[lb], &node_slices(), &opts());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("\"bad\" is not a CIDR"), "{w:?}");
        let ranges = |vip: &str, port: u16, scope: Scope| -> Vec<String> {
            st.frontends[&FrontendKey {
                vip: vip.parse().unwrap(),
                port,
                proto: Proto::Tcp,
                scope,
            }]
                .source_ranges
                .iter()
                .map(|r| r.to_string())
                .collect()
        };
        // IPv4 ranges of the IPv4 frontend, normalised; only on the LoadBalancer IP from outside.
        assert_eq!(
            ranges("198.51.100.7", 80, Scope::External),
            vec!["172.30.0.0/24", "10.0.0.0/8"]
        );
        assert!(ranges("198.51.100.7", 80, Scope::Cluster).is_empty());
        assert!(ranges("192.0.2.10", 80, Scope::External).is_empty());
        assert!(ranges("0.0.0.0", 30080, Scope::External).is_empty());
    }

    #[test]
    fn dsr_by_annotation_or_default_on_external_frontends_only() {
        let np = |ann: serde_json::Value| {
            svc(
                json!({"metadata": {"annotations": ann}, "spec": {"type": "NodePort",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}),
            )
        };
        let mode = |st: &LbState, vip: &str, port: u16, scope: Scope| {
            st.frontends[&FrontendKey {
                vip: vip.parse().unwrap(),
                port,
                proto: Proto::Tcp,
                scope,
            }]
                .mode
        };
        let (st, w) = build(
            &[np(json!({LB_MODE_ANNOTATION: "dsr"}))],
            &node_slices(),
            &opts(),
        );
        assert!(w.is_empty());
        assert_eq!(mode(&st, "0.0.0.0", 30080, Scope::External), LbMode::Dsr);
        assert_eq!(mode(&st, "10.96.0.10", 80, Scope::Cluster), LbMode::Snat);
        let mut o = opts();
        o.default_mode = LbMode::Dsr;
        let (st, _) = build(&[np(json!({}))], &node_slices(), &o);
        assert_eq!(mode(&st, "0.0.0.0", 30080, Scope::External), LbMode::Dsr);
        let (st, w) = build(
            &[np(json!({LB_MODE_ANNOTATION: "tunnel"}))],
            &node_slices(),
            &opts(),
        );
        assert_eq!(mode(&st, "0.0.0.0", 30080, Scope::External), LbMode::Snat);
        assert!(w[0].message.contains("use snat or dsr"), "{w:?}");
    }
}
