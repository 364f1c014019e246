//! Kubernetes NetworkPolicy (networking.k8s.io/v1) compiled into identity-based datapath
//! state, without a kernel.
//!
//! - Every pod has a security identity: a number for its (namespace, namespace labels, pod
//!   labels), allocated cluster-wide by the caller (the agent, through the API), so that all
//!   nodes agree. Reserved identities name the node itself ([`id::HOST`]), other nodes
//!   ([`id::REMOTE_NODE`]) and everything else ([`id::WORLD`]).
//! - The ipcache maps each pod address to its identity and namespace class; each node address
//!   to host or remote node.
//! - ipBlock peers are matched by address: every CIDR named by a policy (and every `except`)
//!   gets a node-local CIDR identity, and the datapath looks up the longest prefix holding the
//!   peer in a second trie. A rule's `cidr` minus its `except`s is exactly the CIDR identities
//!   inside `cidr` and outside every `except`, because each of those prefixes is in the trie.
//! - Per local pod and direction, the set of allowed (peer, protocol, port prefix) entries.
//!   Peers are identities or classes, so that allow-all-style rules stay one entry whatever the
//!   number of identities: [`id::ANY`] (a rule without peers), [`id::CLUSTER`] (every pod:
//!   an empty namespaceSelector), one class per namespace ([`id::NS_BASE`] + n: an empty
//!   podSelector, or a namespaceSelector with labels). Only peers whose selector has pod labels
//!   grow with the identities they match, as they must.
//! - Port ranges (`endPort`) become at most 30 port prefixes, so the datapath's lookups stay
//!   a fixed number of longest-prefix matches.
//! - Each entry carries its origin: a node-local number for the set of NetworkPolicies it
//!   comes from (with those of the broader entries of the same peer, which allow whatever it
//!   allows), so that a verdict made on one entry can name the policies that allowed it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use weir_model::selector::LabelSelector;

/// Numeric identities and classes.
pub mod id {
    /// Any peer at all (a rule without `from`/`to`).
    pub const ANY: u32 = 0;
    /// The node itself (its own addresses): always allowed to reach its pods.
    pub const HOST: u32 = 1;
    /// Anything outside the cluster.
    pub const WORLD: u32 = 2;
    /// Another node of the cluster.
    pub const REMOTE_NODE: u32 = 3;
    /// Class: every pod of the cluster (an empty namespaceSelector).
    pub const CLUSTER: u32 = 4;
    /// The first identity allocated to pods.
    pub const POD_MIN: u32 = 256;
    /// The last identity allocated to pods.
    pub const POD_MAX: u32 = (1 << 24) - 1;
    /// Node-local CIDR identities start here.
    pub const CIDR_BASE: u32 = 1 << 24;
    /// Node-local namespace classes start here.
    pub const NS_BASE: u32 = 2 << 24;

    /// A readable name for an identity or class.
    pub fn name(id: u32) -> String {
        match id {
            ANY => "any".into(),
            HOST => "host".into(),
            WORLD => "world".into(),
            REMOTE_NODE => "remote-node".into(),
            CLUSTER => "cluster".into(),
            n if n >= NS_BASE => format!("namespace-class:{}", n - NS_BASE),
            n if n >= CIDR_BASE => format!("cidr:{}", n - CIDR_BASE),
            n => n.to_string(),
        }
    }
}

/// IP protocols a NetworkPolicy port names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The name NetworkPolicy and Pod specs use (`TCP`, `UDP`, `SCTP`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// A protocol as the API writes it (none: TCP); None for an unknown one.
    pub fn parse(s: Option<&str>) -> Option<Protocol> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// The label every identity of a clusterset carries: the cluster the pod runs in (set by
/// weir from where the pod lives; a pod's own label of that name is overridden).
pub const CLUSTER_LABEL: &str = "weir.dev/cluster";

/// The labels an identity stands for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityLabels {
    /// The pod's namespace.
    pub namespace: String,
    /// The namespace's labels (with `kubernetes.io/metadata.name`).
    pub namespace_labels: BTreeMap<String, String>,
    /// The pod's labels.
    pub pod_labels: BTreeMap<String, String>,
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    /// `ports[].name`.
    pub name: String,
    /// `ports[].protocol`.
    pub protocol: Protocol,
    /// `ports[].containerPort`.
    pub port: u16,
}

/// What the compiler needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (empty until the pod has an address).
    pub ips: Vec<IpAddr>,
    /// Named container ports.
    pub ports: Vec<NamedPort>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `spec.hostNetwork`: the pod has its node's addresses and no identity of its own.
    pub host_network: bool,
    /// The cluster of a pod another cluster of the clusterset runs (None: this cluster's).
    /// Such a pod is a peer only: no policy here selects it.
    pub cluster: Option<String>,
    /// A remote pod's namespace labels, as its own cluster has them (namespace sameness
    /// shares the name, not the labels).
    pub namespace_labels: Option<BTreeMap<String, String>>,
}

impl PodInfo {
    /// From a Pod object.
    pub fn from_k8s(pod: &Pod) -> PodInfo {
        let spec = pod.spec.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(st) = &pod.status {
            for p in st.pod_ips.iter().flatten() {
                if let Ok(ip) = p.ip.parse() {
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
            if let Some(ip) = st.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        let ports = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone()?,
                    protocol: Protocol::parse(p.protocol.as_deref())?,
                    port: u16::try_from(p.container_port).ok()?,
                })
            })
            .collect();
        PodInfo {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            ports,
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            cluster: None,
            namespace_labels: None,
        }
    }

    /// `namespace/name` (`cluster/namespace/name` for another cluster's pod).
    pub fn key(&self) -> String {
        match &self.cluster {
            Some(c) => format!("{c}/{}/{}", self.namespace, self.name),
            None => format!("{}/{}", self.namespace, self.name),
        }
    }

    /// The key of the pod's namespace: its name, or `cluster/name` for another cluster's
    /// (whose labels may differ).
    pub fn ns_key(&self) -> String {
        match &self.cluster {
            Some(c) => format!("{c}/{}", self.namespace),
            None => self.namespace.clone(),
        }
    }

    /// The identity labels of this pod in a namespace with `namespace_labels`.
    pub fn identity_labels(&self, namespace_labels: &BTreeMap<String, String>) -> IdentityLabels {
        IdentityLabels {
            namespace: self.namespace.clone(),
            namespace_labels: namespace_labels.clone(),
            pod_labels: self.labels.clone(),
        }
    }

    fn resolve(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// A namespace's labels, with the automatic `kubernetes.io/metadata.name`.
pub fn namespace_labels(ns: &Namespace) -> BTreeMap<String, String> {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert(name);
    labels
}

/// The cluster as the compiler sees it.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Namespace name -> labels (see [`namespace_labels`]).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Every pod.
    pub pods: Vec<PodInfo>,
    /// Every NetworkPolicy.
    pub policies: Vec<NetworkPolicy>,
}

impl Cluster {
    /// The cluster of these API objects (pods that finished are left out: they have no
    /// traffic, and their address may be reused).
    pub fn from_objects<'a>(
        namespaces: impl IntoIterator<Item = &'a Namespace>,
        pods: impl IntoIterator<Item = &'a Pod>,
        policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    ) -> Cluster {
        Cluster {
            namespaces: namespaces
                .into_iter()
                .map(|ns| {
                    (
                        ns.metadata.name.clone().unwrap_or_default(),
                        namespace_labels(ns),
                    )
                })
                .collect(),
            pods: pods
                .into_iter()
                .filter(|p| {
                    !p.status
                        .as_ref()
                        .and_then(|s| s.phase.as_deref())
                        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed")
                })
                .map(PodInfo::from_k8s)
                .collect(),
            policies: policies.into_iter().cloned().collect(),
        }
    }

    /// Every policy's status (selected pods, rules, warnings), as any node would report it;
    /// `entries` counts what a node running every selected pod would program.
    pub fn statuses(&self) -> Vec<PolicyStatus> {
        let ids: BTreeMap<IdentityLabels, u32> = self
            .identity_labels()
            .into_iter()
            .zip(id::POD_MIN..)
            .collect();
        let mut all = self.clone();
        for p in &mut all.pods {
            p.node = Some(String::new());
        }
        compile(
            &all,
            &NodeView::default(),
            &|l| ids.get(l).copied(),
            &mut LocalIds::default(),
        )
        .policies
    }

    /// The labels of namespace `ns` (only its name label when the namespace is unknown).
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces.get(ns).cloned().unwrap_or_else(|| {
            BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())])
        })
    }

    /// The labels of pod `p`'s namespace: its own cluster's for another cluster's pod.
    pub fn pod_namespace_labels(&self, p: &PodInfo) -> BTreeMap<String, String> {
        p.namespace_labels
            .clone()
            .unwrap_or_else(|| self.namespace_labels(&p.namespace))
    }

    /// The identity labels of every pod that has an identity (not host-network).
    pub fn identity_labels(&self) -> BTreeSet<IdentityLabels> {
        self.pods
            .iter()
            .filter(|p| !p.host_network)
            .map(|p| p.identity_labels(&self.pod_namespace_labels(p)))
            .collect()
    }
}

/// The node the state is compiled for.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Node name (pods with this `spec.nodeName` are local endpoints).
    pub name: String,
    /// The node's own addresses (identity host).
    pub own_addrs: Vec<IpAddr>,
    /// Other nodes' addresses (identity remote-node).
    pub other_addrs: Vec<IpAddr>,
}

/// Node-local numbers for namespace classes and CIDR identities, kept stable across compiles
/// (the datapath's entries keep their meaning while unrelated objects change).
#[derive(Debug, Clone, Default)]
pub struct LocalIds {
    namespaces: HashMap<String, u32>,
    cidrs: HashMap<IpNet, u32>,
    /// Origins (sorted `namespace/name` sets) -> number; a number is not reused while the
    /// process lives, so that a verdict event read late never names another set.
    origins: HashMap<Vec<String>, u32>,
    last_origin: u32,
}

impl LocalIds {
    fn assign<K: std::hash::Hash + Ord + Clone>(
        map: &mut HashMap<K, u32>,
        wanted: &BTreeSet<K>,
        base: u32,
    ) {
        map.retain(|k, _| wanted.contains(k));
        let mut used: BTreeSet<u32> = map.values().copied().collect();
        let mut next = 1;
        for k in wanted {
            if map.contains_key(k) {
                continue;
            }
            // `used` holds numbers with their base.
            while used.contains(&(base + next)) {
                next += 1;
            }
            used.insert(base + next);
            map.insert(k.clone(), base + next);
        }
    }

    /// New origin numbers start above `n` (the largest a previous process left in the
    /// pinned maps: an entry it wrote keeps naming its own set until rewritten).
    pub fn continue_origins_after(&mut self, n: u32) {
        self.last_origin = self.last_origin.max(n);
    }

    /// The origin numbers of `wanted` (the others are forgotten); new sets get new numbers.
    fn assign_origins(&mut self, wanted: &BTreeSet<Vec<String>>) -> BTreeMap<u32, Vec<String>> {
        self.origins.retain(|k, _| wanted.contains(k));
        for k in wanted {
            if !self.origins.contains_key(k) {
                self.last_origin = self.last_origin.checked_add(1).unwrap_or(1);
                self.origins.insert(k.clone(), self.last_origin);
            }
        }
        self.origins.iter().map(|(k, v)| (*v, k.clone())).collect()
    }
}

/// The value of an ipcache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IpcacheEntry {
    /// The identity of the address.
    pub identity: u32,
    /// The namespace class of a pod, 0 for anything else.
    pub ns_class: u32,
}

/// One allowed (peer, protocol, port prefix) of a direction of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyEntry {
    /// Identity or class of the peer (see [`id`]).
    pub peer: u32,
    /// IP protocol number; 0: every protocol and port.
    pub proto: u8,
    /// The port prefix (host order), 0 when `port_bits` is 0.
    pub port: u16,
    /// Significant leading bits of `port`: 16 for one port, 0 for all ports of `proto`.
    pub port_bits: u8,
}

/// The kind of an entry, as policy verdicts are counted (Cilium's policy match types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatchKind {
    /// No entry: a denial, or the node's own traffic to its pods.
    None,
    /// A peer, every port.
    L3Only,
    /// A peer and ports.
    L3L4,
    /// Ports, from or to any peer.
    L4Only,
    /// Everything.
    All,
}

impl MatchKind {
    /// The datapath's number (`POLICY_MATCH_*`).
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The kind of a datapath number; unknown numbers are `None`.
    pub fn from_number(n: u8) -> MatchKind {
        match n {
            1 => MatchKind::L3Only,
            2 => MatchKind::L3L4,
            3 => MatchKind::L4Only,
            4 => MatchKind::All,
            _ => MatchKind::None,
        }
    }

    /// The name in flows and metric labels: `none`, `l3-only`, `l3-l4`, `l4-only`, `all`.
    pub fn name(self) -> &'static str {
        match self {
            MatchKind::None => "none",
            MatchKind::L3Only => "l3-only",
            MatchKind::L3L4 => "l3-l4",
            MatchKind::L4Only => "l4-only",
            MatchKind::All => "all",
        }
    }
}

impl PolicyEntry {
    /// The entry's kind.
    pub fn match_kind(&self) -> MatchKind {
        match (self.peer == id::ANY, self.proto == 0) {
            (true, true) => MatchKind::All,
            (true, false) => MatchKind::L4Only,
            (false, true) => MatchKind::L3Only,
            (false, false) => MatchKind::L3L4,
        }
    }

    /// Whether this entry allows everything `other` does (same peer, a protocol and port
    /// prefix at least as broad).
    pub fn covers(&self, other: &PolicyEntry) -> bool {
        self.peer == other.peer
            && (self.proto == 0
                || (self.proto == other.proto
                    && self.port_bits <= other.port_bits
                    && prefix_of(other.port, self.port_bits)
                        == prefix_of(self.port, self.port_bits)))
    }

    /// Whether this entry allows protocol `proto`, port `port` (of its peer).
    pub fn allows_port(&self, proto: u8, port: u16) -> bool {
        self.proto == 0
            || (self.proto == proto
                && prefix_of(port, self.port_bits) == prefix_of(self.port, self.port_bits))
    }
}

/// The first `bits` bits of `port`.
fn prefix_of(port: u16, bits: u8) -> u16 {
    match bits {
        0 => 0,
        b if b >= 16 => port,
        b => port >> (16 - b),
    }
}

/// One direction of a local pod: the allowed entries, each with its origin (a key of
/// [`PolicyState::origins`]).
pub type PolicyEntries = BTreeMap<PolicyEntry, u32>;

/// The policy of one local pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EndpointPolicy {
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Its identity, when allocated.
    pub identity: Option<u32>,
    /// Allowed ingress when some policy isolates the pod for ingress, else `None` (all allowed).
    #[serde(serialize_with = "entries_as_list")]
    pub ingress: Option<PolicyEntries>,
    /// Allowed egress when some policy isolates the pod for egress.
    #[serde(serialize_with = "entries_as_list")]
    pub egress: Option<PolicyEntries>,
}

/// Entries as a JSON list (`PolicyEntry` fields plus `origin`): a map's keys must be strings.
fn entries_as_list<S: serde::Serializer>(
    e: &Option<PolicyEntries>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Item<'a> {
        #[serde(flatten)]
        entry: &'a PolicyEntry,
        origin: u32,
    }
    match e {
        None => s.serialize_none(),
        Some(m) => s.collect_seq(m.iter().map(|(entry, &origin)| Item { entry, origin })),
    }
}

/// What became of one NetworkPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyStatus {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `namespace/name` of the pods it selects (all nodes).
    pub selected: Vec<String>,
    /// Isolates selected pods for ingress.
    pub ingress: bool,
    /// Isolates selected pods for egress.
    pub egress: bool,
    /// Rules compiled (ingress + egress).
    pub rules: usize,
    /// Datapath entries it contributes on this node.
    pub entries: usize,
    /// What is not enforced as written, or matches nothing.
    pub warnings: Vec<String>,
}

/// The datapath state of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyState {
    /// Address (host prefix) -> identity, every pod and node of the cluster.
    pub ipcache: BTreeMap<IpNet, IpcacheEntry>,
    /// ipBlock prefixes -> CIDR identity.
    pub cidrs: BTreeMap<IpNet, u32>,
    /// Local pods, by `namespace/name`.
    pub endpoints: BTreeMap<String, EndpointPolicy>,
    /// Per policy, in (namespace, name) order.
    pub policies: Vec<PolicyStatus>,
    /// Origin number -> the policies (`namespace/name`) its entries come from.
    pub origins: BTreeMap<u32, Vec<String>>,
    /// Pods whose identity is not allocated yet (they are `world` to policy until it is).
    pub pending_identities: Vec<String>,
}

impl PolicyState {
    /// Total policy entries over all endpoints and directions.
    pub fn entry_count(&self) -> usize {
        self.endpoints
            .values()
            .map(|e| {
                e.ingress.as_ref().map_or(0, BTreeMap::len)
                    + e.egress.as_ref().map_or(0, BTreeMap::len)
            })
            .sum()
    }
}

/// The port prefixes covering `start..=end` (host order): (port, significant bits).
pub fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(start), u32::from(end));
    while lo <= hi {
        // The largest aligned block starting at lo that stays within hi.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

/// One port of a rule, resolved for a pod: protocol and range, or "all ports".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PortMatch {
    All,
    Range(Protocol, u16, u16),
}

/// A rule's port as written.
enum RulePort {
    /// Every port of every protocol (no ports listed).
    All,
    /// Every port of one protocol (a port without `port`).
    Proto(Protocol),
    Numeric(Protocol, u16, u16),
    Named(Protocol, String),
}

fn rule_ports(ports: Option<&Vec<NetworkPolicyPort>>) -> Vec<RulePort> {
    let ports = match ports {
        Some(p) if !p.is_empty() => p,
        _ => return vec![RulePort::All],
    };
    ports
        .iter()
        .filter_map(|p| {
            let proto = Protocol::parse(p.protocol.as_deref())?;
            Some(match &p.port {
                None => RulePort::Proto(proto),
                Some(IntOrString::Int(n)) => {
                    let start = u16::try_from(*n).ok()?;
                    let end = p
                        .end_port
                        .and_then(|e| u16::try_from(e).ok())
                        .unwrap_or(start)
                        .max(start);
                    RulePort::Numeric(proto, start, end)
                }
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(n) => RulePort::Numeric(proto, n, n),
                    Err(_) => RulePort::Named(proto, s.clone()),
                },
            })
        })
        .collect()
}

impl RulePort {
    /// The match of a numeric or protocol-only port (named ports are resolved per pod).
    fn numeric(&self) -> Option<PortMatch> {
        match self {
            RulePort::All => Some(PortMatch::All),
            RulePort::Proto(p) => Some(PortMatch::Range(*p, 0, 65535)),
            RulePort::Numeric(p, s, e) => Some(PortMatch::Range(*p, *s, *e)),
            RulePort::Named(..) => None,
        }
    }
}

/// One direction of a local pod while compiling: each entry with the policies (indexes into
/// [`PolicyState::policies`]) that allow it.
type Grants = BTreeMap<PolicyEntry, BTreeSet<usize>>;

/// The entries of `peer` on `m`, granted by policy `policy`.
fn push_entries(out: &mut Grants, peer: u32, m: PortMatch, policy: usize) {
    let mut add = |proto: u8, port: u16, port_bits: u8| {
        let e = PolicyEntry {
            peer,
            proto,
            port,
            port_bits,
        };
        out.entry(e).or_default().insert(policy);
    };
    match m {
        PortMatch::All => add(0, 0, 0),
        PortMatch::Range(proto, 0, 65535) => add(proto.number(), 0, 0),
        PortMatch::Range(proto, start, end) => {
            for (port, bits) in port_prefixes(start, end) {
                add(proto.number(), port, bits);
            }
        }
    }
}

/// The policies behind each entry of `g`: its own and those of the broader entries of the
/// same peer (the datapath's longest-prefix lookup finds only the narrowest one).
fn widened(g: &Grants) -> Vec<(PolicyEntry, BTreeSet<usize>)> {
    g.iter()
        .map(|(e, own)| {
            let mut all = own.clone();
            // Entries of one peer are adjacent in the map's order.
            let same_peer = g.range(
                PolicyEntry {
                    peer: e.peer,
                    proto: 0,
                    port: 0,
                    port_bits: 0,
                }..*e,
            );
            for (_, p) in same_peer.filter(|(b, _)| b.covers(e)) {
                all.extend(p);
            }
            (*e, all)
        })
        .collect()
}

/// A peer resolved to identities and classes, plus the pods it stands for (for egress named
/// ports, which are resolved on the destination pods).
struct Peers {
    ids: BTreeSet<u32>,
    /// Pod identities the classes and identities stand for, with their pods.
    pod_ids: BTreeMap<u32, Vec<usize>>,
    /// The peer set includes addresses outside any pod (ANY or CIDR ids).
    addresses: bool,
}

struct Ctx<'a> {
    cluster: &'a Cluster,
    /// Pod index -> identity.
    pod_identity: Vec<Option<u32>>,
    /// Namespace key (see [`PodInfo::ns_key`]) -> class.
    ns_class: &'a HashMap<String, u32>,
    /// Namespace key -> (namespace name, labels).
    ns_info: BTreeMap<String, (String, BTreeMap<String, String>)>,
    cidr_ids: &'a HashMap<IpNet, u32>,
}

fn selector(
    sel: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Option<LabelSelector> {
    match sel {
        None => Some(LabelSelector::default()),
        Some(s) => LabelSelector::from_k8s(s).ok(),
    }
}

impl Ctx<'_> {
    fn pods_where(&self, f: impl Fn(&PodInfo) -> bool) -> BTreeMap<u32, Vec<usize>> {
        let mut out: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, p) in self.cluster.pods.iter().enumerate() {
            if let Some(id) = self.pod_identity[i] {
                if f(p) {
                    out.entry(id).or_default().push(i);
                }
            }
        }
        out
    }

    /// The peers of a rule (`from`/`to`); an empty list is every peer.
    fn peers(
        &self,
        policy_ns: &str,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        warn: &mut Vec<String>,
        field: &str,
    ) -> Peers {
        let mut out = Peers {
            ids: BTreeSet::new(),
            pod_ids: BTreeMap::new(),
            addresses: false,
        };
        let peers = match peers {
            Some(p) if !p.is_empty() => p,
            _ => {
                out.ids.insert(id::ANY);
                out.pod_ids = self.pods_where(|_| true);
                out.addresses = true;
                return out;
            }
        };
        for (j, peer) in peers.iter().enumerate() {
            if let Some(block) = &peer.ip_block {
                let Ok(cidr) = block.cidr.parse::<IpNet>().map(|n| n.trunc()) else {
                    warn.push(format!(
                        "{field}[{j}].ipBlock.cidr: {:?} is not a CIDR; the peer matches nothing",
                        block.cidr
                    ));
                    continue;
                };
                let excepts: Vec<IpNet> = block
                    .except
                    .iter()
                    .flatten()
                    .filter_map(|e| e.parse::<IpNet>().ok().map(|n| n.trunc()))
                    .collect();
                for (net, cid) in self.cidr_ids {
                    if cidr.contains(net) && !excepts.iter().any(|e| e.contains(net)) {
                        out.ids.insert(*cid);
                    }
                }
                out.addresses = true;
                continue;
            }
            let (Some(pod_sel), Some(ns_sel)) = (
                selector(peer.pod_selector.as_ref()),
                selector(peer.namespace_selector.as_ref()),
            ) else {
                warn.push(format!(
                    "{field}[{j}]: invalid selector; the peer matches nothing"
                ));
                continue;
            };
            // A namespace by name and labels: with namespace sameness a peer without a
            // namespaceSelector is the policy's namespace in every cluster, and a selector
            // judges each cluster's namespace by its own labels.
            let ns_matches =
                |ns: &str, labels: &BTreeMap<String, String>| match &peer.namespace_selector {
                    None => ns == policy_ns,
                    Some(_) => ns_sel.matches(labels),
                };
            let members = self.pods_where(|p| {
                ns_matches(&p.namespace, &self.cluster.pod_namespace_labels(p))
                    && pod_sel.matches(&p.labels)
            });
            if pod_sel.is_empty() {
                if peer.namespace_selector.is_some() && ns_sel.is_empty() {
                    out.ids.insert(id::CLUSTER);
                } else {
                    for (key, class) in self.ns_class {
                        if let Some((ns, labels)) = self.ns_info.get(key) {
                            if ns_matches(ns, labels) {
                                out.ids.insert(*class);
                            }
                        }
                    }
                }
            } else {
                out.ids.extend(members.keys().copied());
            }
            for (k, v) in members {
                out.pod_ids.entry(k).or_default().extend(v);
            }
        }
        out
    }
}

/// Compiles the cluster's NetworkPolicies for `node`. `identity` gives the allocated identity
/// of a label set (None: not allocated yet); `local` keeps this node's class and CIDR numbers.
pub fn compile(
    cluster: &Cluster,
    node: &NodeView,
    identity: &dyn Fn(&IdentityLabels) -> Option<u32>,
    local: &mut LocalIds,
) -> PolicyState {
    let mut state = PolicyState::default();
    let ns_info: BTreeMap<String, (String, BTreeMap<String, String>)> = cluster
        .pods
        .iter()
        .map(|p| {
            (
                p.ns_key(),
                (p.namespace.clone(), cluster.pod_namespace_labels(p)),
            )
        })
        .collect();
    let pod_identity: Vec<Option<u32>> = cluster
        .pods
        .iter()
        .map(|p| {
            if p.host_network {
                return None;
            }
            let id = identity(&p.identity_labels(&ns_info[&p.ns_key()].1));
            if id.is_none() {
                state.pending_identities.push(p.key());
            }
            id
        })
        .collect();

    // Node-local numbers: a class per namespace that has pods, an id per ipBlock prefix.
    let namespaces: BTreeSet<String> = ns_info.keys().cloned().collect();
    LocalIds::assign(&mut local.namespaces, &namespaces, id::NS_BASE);
    let mut cidrs = BTreeSet::new();
    for np in &cluster.policies {
        let spec = np.spec.as_ref();
        let ing = spec
            .and_then(|s| s.ingress.as_ref())
            .into_iter()
            .flatten()
            .flat_map(|r| r.from.iter().flatten());
        let eg = spec
            .and_then(|s| s.egress.as_ref())
            .into_iter()
            .flatten()
            .flat_map(|r| r.to.iter().flatten());
        for peer in ing.chain(eg) {
            if let Some(b) = &peer.ip_block {
                for s in std::iter::once(&b.cidr).chain(b.except.iter().flatten()) {
                    if let Ok(net) = s.parse::<IpNet>() {
                        cidrs.insert(net.trunc());
                    }
                }
            }
        }
    }
    LocalIds::assign(&mut local.cidrs, &cidrs, id::CIDR_BASE);
    state.cidrs = local.cidrs.iter().map(|(k, v)| (*k, *v)).collect();

    // The ipcache: nodes first, pods over them (a pod never has a node's address unless it is
    // host-network, and those are skipped).
    for ip in &node.other_addrs {
        state.ipcache.insert(
            IpNet::from(*ip),
            IpcacheEntry {
                identity: id::REMOTE_NODE,
                ns_class: 0,
            },
        );
    }
    for ip in &node.own_addrs {
        state.ipcache.insert(
            IpNet::from(*ip),
            IpcacheEntry {
                identity: id::HOST,
                ns_class: 0,
            },
        );
    }
    for (i, p) in cluster.pods.iter().enumerate() {
        let Some(identity) = pod_identity[i] else {
            continue;
        };
        let ns_class = local.namespaces[&p.ns_key()];
        for ip in &p.ips {
            state
                .ipcache
                .insert(IpNet::from(*ip), IpcacheEntry { identity, ns_class });
        }
    }

    let ctx = Ctx {
        cluster,
        pod_identity,
        ns_class: &local.namespaces,
        ns_info,
        cidr_ids: &local.cidrs,
    };
    for (i, p) in cluster.pods.iter().enumerate() {
        if p.host_network || p.node.as_deref() != Some(node.name.as_str()) || p.ips.is_empty() {
            continue;
        }
        state.endpoints.insert(
            p.key(),
            EndpointPolicy {
                ips: p.ips.clone(),
                identity: ctx.pod_identity[i],
                ingress: None,
                egress: None,
            },
        );
    }

    let mut policies: Vec<&NetworkPolicy> = cluster.policies.iter().collect();
    policies.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    let mut grants: BTreeMap<String, [Option<Grants>; 2]> = state
        .endpoints
        .keys()
        .map(|k| (k.clone(), [None, None]))
        .collect();
    for (i, np) in policies.into_iter().enumerate() {
        state.policies.push(compile_one(&ctx, np, i, &mut grants));
    }
    set_entries(&mut state, grants, local);
    state
}

/// Each local pod's entries with their origins, from what the policies granted.
fn set_entries(
    state: &mut PolicyState,
    grants: BTreeMap<String, [Option<Grants>; 2]>,
    local: &mut LocalIds,
) {
    type Widened = Vec<(PolicyEntry, BTreeSet<usize>)>;
    let pods: Vec<(String, [Option<Widened>; 2])> = grants
        .into_iter()
        .map(|(pod, dirs)| (pod, dirs.map(|g| g.as_ref().map(widened))))
        .collect();
    // Each distinct set of policies once, by its names (sorted: so are the policies).
    let sets: BTreeSet<&BTreeSet<usize>> = pods
        .iter()
        .flat_map(|(_, dirs)| dirs.iter().flatten().flatten())
        .map(|(_, set)| set)
        .collect();
    let policies = &state.policies;
    let by_names: BTreeMap<Vec<String>, &BTreeSet<usize>> = sets
        .into_iter()
        .map(|set| {
            let names = set
                .iter()
                .map(|&i| format!("{}/{}", policies[i].namespace, policies[i].name))
                .collect();
            (names, set)
        })
        .collect();
    state.origins = local.assign_origins(&by_names.keys().cloned().collect());
    let number: HashMap<&BTreeSet<usize>, u32> = state
        .origins
        .iter()
        .map(|(n, names)| (by_names[names], *n))
        .collect();
    let entries = |w: &Option<Widened>| {
        w.as_ref()
            .map(|w| w.iter().map(|(e, set)| (*e, number[set])).collect())
    };
    for (pod, [ingress, egress]) in &pods {
        let ep = state
            .endpoints
            .get_mut(pod)
            .expect("granted to a local pod");
        ep.ingress = entries(ingress);
        ep.egress = entries(egress);
    }
}

/// One policy's status, and its entries on the local pods it selects (`endpoints` holds only
/// this node's pods).
fn compile_one(
    ctx: &Ctx,
    np: &NetworkPolicy,
    index: usize,
    endpoints: &mut BTreeMap<String, [Option<Grants>; 2]>,
) -> PolicyStatus {
    let ns = np.metadata.namespace.clone().unwrap_or_default();
    let mut st = PolicyStatus {
        namespace: ns.clone(),
        name: np.metadata.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    let Some(spec) = np.spec.as_ref() else {
        return st;
    };
    let Some(pod_sel) = selector(spec.pod_selector.as_ref()) else {
        st.warnings
            .push("spec.podSelector is invalid; the policy selects nothing".into());
        return st;
    };
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let egress_rules = spec.egress.as_deref().unwrap_or_default();
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            st.ingress = types.iter().any(|t| t == "Ingress");
            st.egress = types.iter().any(|t| t == "Egress");
        }
        _ => {
            st.ingress = true;
            st.egress = !egress_rules.is_empty();
        }
    }
    if !st.ingress && !ingress_rules.is_empty() {
        st.warnings
            .push("spec.ingress is ignored: policyTypes does not list Ingress".into());
    }
    if !st.egress && !egress_rules.is_empty() {
        st.warnings
            .push("spec.egress is ignored: policyTypes does not list Egress".into());
    }
    let selected: Vec<usize> = ctx
        .cluster
        .pods
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.namespace == ns
                && p.cluster.is_none()
                && !p.host_network
                && pod_sel.matches(&p.labels)
        })
        .map(|(i, _)| i)
        .collect();
    st.selected = selected
        .iter()
        .map(|&i| ctx.cluster.pods[i].key())
        .collect();
    if selected.is_empty() {
        st.warnings.push("selects no pods".into());
    }
    st.rules = if st.ingress { ingress_rules.len() } else { 0 }
        + if st.egress { egress_rules.len() } else { 0 };

    // Peers are the same for every selected pod: resolve them once per rule.
    let mut warns = Vec::new();
    let ing: Vec<(Peers, Vec<RulePort>)> = ingress_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                ctx.peers(
                    &ns,
                    r.from.as_ref(),
                    &mut warns,
                    &format!("spec.ingress[{i}].from"),
                ),
                rule_ports(r.ports.as_ref()),
            )
        })
        .collect();
    let eg: Vec<(Peers, Vec<RulePort>)> = egress_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                ctx.peers(
                    &ns,
                    r.to.as_ref(),
                    &mut warns,
                    &format!("spec.egress[{i}].to"),
                ),
                rule_ports(r.ports.as_ref()),
            )
        })
        .collect();
    st.warnings.extend(warns);

    // Named ports nobody defines are worth a warning (the rule then matches no port).
    for (dir, rules, field) in [
        ("ingress", &ing, "spec.ingress"),
        ("egress", &eg, "spec.egress"),
    ] {
        for (i, (peers, ports)) in rules.iter().enumerate() {
            for port in ports {
                let RulePort::Named(proto, name) = port else {
                    continue;
                };
                let defined = if dir == "ingress" {
                    selected
                        .iter()
                        .any(|&k| ctx.cluster.pods[k].resolve(name, *proto).is_some())
                } else {
                    peers
                        .pod_ids
                        .values()
                        .flatten()
                        .any(|&k| ctx.cluster.pods[k].resolve(name, *proto).is_some())
                };
                if !defined {
                    st.warnings.push(format!(
                        "{field}[{i}].ports: named port {name:?} ({}) is defined by no {} pod; it matches nothing",
                        proto.name(),
                        if dir == "ingress" { "selected" } else { "peer" }
                    ));
                }
                if dir == "egress" && peers.addresses {
                    st.warnings.push(format!(
                        "{field}[{i}].ports: named port {name:?} matches pods only, not ipBlock or non-pod addresses"
                    ));
                }
            }
        }
    }

    for &k in &selected {
        let pod = &ctx.cluster.pods[k];
        let Some([ingress, egress]) = endpoints.get_mut(&pod.key()) else {
            continue;
        };
        if st.ingress {
            let set = ingress.get_or_insert_with(Grants::new);
            let before = set.len();
            for (peers, ports) in &ing {
                for port in ports {
                    let m = match port {
                        RulePort::Named(p, name) => match pod.resolve(name, *p) {
                            Some(n) => PortMatch::Range(*p, n, n),
                            None => continue,
                        },
                        other => match other.numeric() {
                            Some(m) => m,
                            None => continue,
                        },
                    };
                    for &peer in &peers.ids {
                        push_entries(set, peer, m, index);
                    }
                }
            }
            st.entries += set.len() - before;
        }
        if st.egress {
            let set = egress.get_or_insert_with(Grants::new);
            let before = set.len();
            for (peers, ports) in &eg {
                for port in ports {
                    match port {
                        RulePort::Named(p, name) => {
                            // Resolved on each destination pod: per identity, every number
                            // its pods give the name.
                            for (peer, pods) in &peers.pod_ids {
                                let nums: BTreeSet<u16> = pods
                                    .iter()
                                    .filter_map(|&i| ctx.cluster.pods[i].resolve(name, *p))
                                    .collect();
                                for n in nums {
                                    push_entries(set, *peer, PortMatch::Range(*p, n, n), index);
                                }
                            }
                        }
                        other => {
                            if let Some(m) = other.numeric() {
                                for &peer in &peers.ids {
                                    push_entries(set, peer, m, index);
                                }
                            }
                        }
                    }
                }
            }
            st.entries += set.len() - before;
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, node: &str) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec![ip.parse().unwrap()],
            ports: vec![
                NamedPort {
                    name: "serve-80-tcp".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                },
                NamedPort {
                    name: "serve-81-udp".into(),
                    protocol: Protocol::Udp,
                    port: 81,
                },
            ],
            node: Some(node.into()),
            host_network: false,
            cluster: None,
            namespace_labels: None,
        }
    }

    fn np(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec
        }))
        .unwrap()
    }

    /// The upstream e2e model: namespaces x, y, z with pods a, b, c (a on node-1, b and c on
    /// node-2), label pod=<name>, namespace label ns=<name>.
    fn model(policies: Vec<NetworkPolicy>) -> Cluster {
        let mut c = Cluster::default();
        for (n, ns) in ["x", "y", "z"].iter().enumerate() {
            c.namespaces.insert(
                ns.to_string(),
                BTreeMap::from([
                    ("ns".to_string(), ns.to_string()),
                    ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
                ]),
            );
            for (m, p) in ["a", "b", "c"].iter().enumerate() {
                let node = if *p == "a" { "node-1" } else { "node-2" };
                c.pods.push(pod(
                    ns,
                    p,
                    &[("pod", p)],
                    &format!("10.0.{n}.{}", m + 1),
                    node,
                ));
            }
        }
        c.policies = policies;
        c
    }

    #[test]
    fn statuses_cover_every_node_and_name_what_is_not_enforced() {
        let c = model(vec![
            np(
                "x",
                "web",
                serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": "nope"}]}, {}]}),
            ),
            np(
                "y",
                "none",
                serde_json::json!({"podSelector": {"matchLabels": {"pod": "zz"}}}),
            ),
        ]);
        let st = c.statuses();
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].name, "web");
        assert_eq!(
            st[0].selected,
            vec!["x/a", "x/b", "x/c"],
            "pods of both nodes"
        );
        assert!(st[0].ingress && !st[0].egress);
        assert_eq!(st[0].rules, 2);
        assert!(st[0].entries > 0);
        assert!(
            st[0].warnings.iter().any(|w| w.contains("nope")),
            "{:?}",
            st[0].warnings
        );
        assert!(st[1].selected.is_empty());
        assert!(
            st[1].warnings.iter().any(|w| w.contains("selects no pods")),
            "{:?}",
            st[1].warnings
        );
    }

    struct Compiled {
        state: PolicyState,
        ids: BTreeMap<IdentityLabels, u32>,
    }

    fn compile_for(c: &Cluster, node: &str) -> Compiled {
        let ids: BTreeMap<IdentityLabels, u32> = c
            .identity_labels()
            .into_iter()
            .enumerate()
            .map(|(i, l)| (l, id::POD_MIN + i as u32))
            .collect();
        let view = NodeView {
            name: node.into(),
            own_addrs: vec!["192.168.0.1".parse().unwrap()],
            other_addrs: vec!["192.168.0.2".parse().unwrap()],
        };
        let state = compile(c, &view, &|l| ids.get(l).copied(), &mut LocalIds::default());
        Compiled { state, ids }
    }

    impl Compiled {
        fn id_of(&self, c: &Cluster, ns: &str, name: &str) -> u32 {
            let p = c
                .pods
                .iter()
                .find(|p| p.namespace == ns && p.name == name)
                .unwrap();
            self.ids[&p.identity_labels(&c.namespace_labels(ns))]
        }

        /// Whether the datapath would allow `peer` (address) -> `to` on `proto`/`port` for the
        /// given direction of local pod `ep`.
        fn allows(&self, ep: &str, ingress: bool, peer: &str, proto: u8, port: u16) -> bool {
            self.allowed_by(ep, ingress, peer, proto, port).is_some()
        }

        /// The policies the datapath would name for allowing that (the same lookups the BPF
        /// program makes, in its order: the first peer kind with an entry, its longest
        /// prefix); `None` when denied, empty when not isolated or the node's own traffic.
        fn allowed_by(
            &self,
            ep: &str,
            ingress: bool,
            peer: &str,
            proto: u8,
            port: u16,
        ) -> Option<Vec<String>> {
            let e = &self.state.endpoints[ep];
            let Some(set) = (if ingress { &e.ingress } else { &e.egress }) else {
                return Some(Vec::new());
            };
            let addr: IpAddr = peer.parse().unwrap();
            let mut ids = vec![id::ANY];
            match self.state.ipcache.get(&IpNet::from(addr)) {
                Some(e) => {
                    if ingress && e.identity == id::HOST {
                        return Some(Vec::new());
                    }
                    ids.push(e.identity);
                    if e.ns_class != 0 {
                        ids.push(e.ns_class);
                        ids.push(id::CLUSTER);
                    }
                }
                None => ids.push(id::WORLD),
            }
            if let Some((_, cid)) = self
                .state
                .cidrs
                .iter()
                .filter(|(n, _)| n.contains(&addr))
                .max_by_key(|(n, _)| n.prefix_len())
            {
                ids.push(*cid);
            }
            ids.iter().find_map(|peer| {
                set.iter()
                    .filter(|(e, _)| e.peer == *peer && e.allows_port(proto, port))
                    .max_by_key(|(e, _)| (e.proto != 0, e.port_bits))
                    .map(|(_, origin)| self.state.origins[origin].clone())
            })
        }
    }

    const TCP: u8 = 6;
    const UDP: u8 = 17;

    /// Another cluster's pod in namespace `ns`, whose namespace there has `ns_labels`.
    fn remote(
        cluster: &str,
        ns: &str,
        name: &str,
        ip: &str,
        ns_labels: &[(&str, &str)],
    ) -> PodInfo {
        let mut p = pod(ns, name, &[("pod", name), (CLUSTER_LABEL, cluster)], ip, "");
        p.node = None;
        p.cluster = Some(cluster.into());
        p.namespace_labels = Some(
            ns_labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    /// Numbers handed out over several compiles never collide (a namespace that appears
    /// later used to get the number of one numbered before).
    #[test]
    fn local_numbers_stay_distinct_across_compiles() {
        let mut m: HashMap<String, u32> = HashMap::new();
        LocalIds::assign(&mut m, &BTreeSet::from(["b".to_string()]), id::NS_BASE);
        LocalIds::assign(
            &mut m,
            &BTreeSet::from(["a".to_string(), "b".to_string()]),
            id::NS_BASE,
        );
        assert_ne!(m["a"], m["b"], "{m:?}");
        assert_eq!(m["b"], id::NS_BASE + 1, "kept");
    }

    #[test]
    fn a_remote_namespace_is_judged_by_its_own_labels() {
        let mut c = Cluster::default();
        for ns in ["mcs", "team"] {
            c.namespaces.insert(
                ns.into(),
                BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]),
            );
        }
        c.pods.push(pod(
            "mcs",
            "hello-1",
            &[("app", "hello"), (CLUSTER_LABEL, "c1")],
            "10.244.1.3",
            "node-1",
        ));
        c.pods.push(pod(
            "mcs",
            "client",
            &[(CLUSTER_LABEL, "c1")],
            "10.244.1.4",
            "node-1",
        ));
        c.pods.push(pod(
            "team",
            "client",
            &[(CLUSTER_LABEL, "c1")],
            "10.244.1.5",
            "node-1",
        ));
        c.pods.push(remote(
            "c2",
            "mcs",
            "client",
            "10.245.1.2",
            &[("kubernetes.io/metadata.name", "mcs")],
        ));
        c.pods.push(remote(
            "c2",
            "team",
            "client",
            "10.245.1.4",
            &[("kubernetes.io/metadata.name", "team"), ("team", "a")],
        ));
        c.policies = vec![np(
            "mcs",
            "from-team-a",
            json!({"podSelector": {"matchLabels": {"app": "hello"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}),
        )];
        let r = compile_for(&c, "node-1");
        assert!(r.allows("mcs/hello-1", true, "10.245.1.4", TCP, 8080));
        assert!(!r.allows("mcs/hello-1", true, "10.245.1.2", TCP, 8080));
        assert!(!r.allows("mcs/hello-1", true, "10.244.1.5", TCP, 8080));
    }

    /// A remote pod is a peer with its own cluster's namespace labels (namespace sameness by
    /// name only), never a policy's target, and `weir.dev/cluster` picks a cluster.
    #[test]
    fn pods_of_other_clusters_are_peers_judged_by_their_own_namespace_labels() {
        let mut c = model(vec![
            np(
                "x",
                "from-team-a",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}),
            ),
            np(
                "x",
                "only-c2",
                json!({"podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {CLUSTER_LABEL: "c2"}}}]}]}),
            ),
        ]);
        // In c2, namespace y has team=a; here it has not.
        c.pods.push(remote(
            "c2",
            "y",
            "r1",
            "10.1.0.1",
            &[("team", "a"), ("kubernetes.io/metadata.name", "y")],
        ));
        c.pods.push(remote(
            "c3",
            "y",
            "r2",
            "10.1.0.2",
            &[("team", "b"), ("kubernetes.io/metadata.name", "y")],
        ));
        c.pods.push(remote(
            "c2",
            "x",
            "r3",
            "10.1.0.3",
            &[("kubernetes.io/metadata.name", "x")],
        ));
        let r = compile_for(&c, "node-1");
        assert!(
            r.allows("x/a", true, "10.1.0.1", TCP, 80),
            "c2's team-a namespace"
        );
        assert!(
            !r.allows("x/a", true, "10.1.0.2", TCP, 80),
            "c3's y is not team a"
        );
        assert!(
            !r.allows("x/a", true, "10.0.1.1", TCP, 80),
            "local y is not team a"
        );
        let r2 = compile_for(&c, "node-2");
        assert!(r2.allows("x/b", true, "10.1.0.3", TCP, 80), "a c2 pod");
        assert!(!r2.allows("x/b", true, "10.0.0.3", TCP, 80), "a local pod");
        assert!(
            !r.state.endpoints.keys().any(|k| k.starts_with("c2/")),
            "remote pods are not targets"
        );
        let st = c.statuses();
        assert!(
            st.iter()
                .all(|s| s.selected.iter().all(|p| !p.starts_with("c"))),
            "{st:?}"
        );
    }

    #[test]
    fn port_prefixes_cover_exactly_the_range() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 81), vec![(80, 15)]);
        for (s, e) in [
            (1, 65535),
            (32000, 32768),
            (81, 1023),
            (5, 6),
            (65535, 65535),
        ] {
            let ps = port_prefixes(s, e);
            assert!(ps.len() <= 30, "{s}-{e}: {} prefixes", ps.len());
            for port in 0..=65535u16 {
                let hits = ps
                    .iter()
                    .filter(|(p, b)| *b == 0 || (port >> (16 - b)) == (p >> (16 - b)))
                    .count();
                assert_eq!(
                    hits,
                    usize::from((s..=e).contains(&port)),
                    "{s}-{e} port {port}"
                );
            }
        }
    }

    #[test]
    fn unselected_pods_are_not_isolated_and_policy_types_default() {
        let c = model(vec![
            np("x", "deny-ingress", json!({"podSelector": {}})),
            np(
                "y",
                "egress-rule",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "egress": [{}]}),
            ),
            np(
                "z",
                "egress-only",
                json!({"podSelector": {}, "policyTypes": ["Egress"]}),
            ),
        ]);
        let r = compile_for(&c, "node-1");
        let xa = &r.state.endpoints["x/a"];
        assert_eq!(xa.ingress, Some(BTreeMap::new()), "x/a ingress denied");
        assert_eq!(xa.egress, None);
        let ya = &r.state.endpoints["y/a"];
        assert_eq!(
            ya.ingress,
            Some(BTreeMap::new()),
            "Ingress is always a default type"
        );
        assert_eq!(
            ya.egress.as_ref().unwrap().len(),
            1,
            "egress [{{}}]: allow all"
        );
        assert!(r.allows("y/a", false, "8.8.8.8", TCP, 53));
        let za = &r.state.endpoints["z/a"];
        assert_eq!(
            (za.ingress.is_none(), za.egress.as_ref().map(BTreeMap::len)),
            (true, Some(0))
        );
        // Only node-1's pods are endpoints here.
        assert_eq!(
            r.state.endpoints.keys().collect::<Vec<_>>(),
            ["x/a", "y/a", "z/a"]
        );
        // Ingress from the node itself is always allowed; from another node it is not.
        assert!(r.allows("x/a", true, "192.168.0.1", TCP, 80));
        assert!(!r.allows("x/a", true, "192.168.0.2", TCP, 80));
    }

    #[test]
    fn peers_pod_and_namespace_selectors() {
        let c = model(vec![np(
            "x",
            "p",
            json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                           "podSelector": {"matchLabels": {"pod": "c"}}}]},
                {"from": [{"namespaceSelector": {"matchExpressions":
                    [{"key": "ns", "operator": "NotIn", "values": ["x", "y"]}]}}],
                 "ports": [{"port": 81, "protocol": "UDP"}]}
            ]}),
        )]);
        let r = compile_for(&c, "node-1");
        // x/b (same namespace, podSelector alone) allowed on any port; y/b not.
        assert!(r.allows("x/a", true, "10.0.0.2", TCP, 80));
        assert!(r.allows("x/a", true, "10.0.0.2", UDP, 81));
        assert!(!r.allows("x/a", true, "10.0.1.2", TCP, 80));
        // Both selectors in one peer: y/c only (AND).
        assert!(r.allows("x/a", true, "10.0.1.3", TCP, 80));
        assert!(!r.allows("x/a", true, "10.0.0.3", TCP, 80));
        assert!(!r.allows("x/a", true, "10.0.2.2", TCP, 80), "z/b on TCP");
        // NotIn: namespace z, UDP 81 only; a namespace selector alone is a class entry.
        assert!(r.allows("x/a", true, "10.0.2.2", UDP, 81));
        assert!(!r.allows("x/a", true, "10.0.2.2", UDP, 80));
        assert!(!r.allows("x/a", true, "10.0.1.1", UDP, 81));
        assert!(
            !r.allows("x/a", true, "8.8.8.8", UDP, 81),
            "world is no namespace's pod"
        );
        let ing = r.state.endpoints["x/a"].ingress.as_ref().unwrap();
        assert!(ing.keys().any(|e| e.peer >= id::NS_BASE));
        assert_eq!(
            ing.keys().map(|e| e.peer).collect::<BTreeSet<_>>(),
            BTreeSet::from([
                r.id_of(&c, "x", "b"),
                r.id_of(&c, "y", "c"),
                r.state.ipcache[&"10.0.2.1/32".parse::<IpNet>().unwrap()].ns_class
            ])
        );
    }

    #[test]
    fn allow_all_rules_stay_one_entry_whatever_the_identities() {
        let mut c = model(vec![np(
            "x",
            "p",
            json!({
                "podSelector": {},
                "ingress": [
                    {"from": [{"namespaceSelector": {}}]},
                    {"from": [{"podSelector": {}}]},
                    {"from": [{"podSelector": {}, "namespaceSelector": {}}]}
                ],
                "egress": [{"to": [{"namespaceSelector": {}}]}]
            }),
        )]);
        let small = compile_for(&c, "node-1");
        let n_small = small.state.entry_count();
        for i in 0..2000 {
            c.pods.push(pod(
                "z",
                &format!("p{i}"),
                &[("n", &i.to_string())],
                &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                "node-2",
            ));
        }
        let big = compile_for(&c, "node-1");
        assert_eq!(
            big.state.entry_count(),
            n_small,
            "entries must not grow with identities"
        );
        // x/a: 2 ingress classes (cluster, namespace x) + 1 egress class.
        assert_eq!(n_small, 3);
        assert!(big.allows("x/a", true, "10.1.3.7", TCP, 9999));
        assert!(big.allows("x/a", true, "10.0.0.2", TCP, 9999));
        assert!(!big.allows("x/a", true, "8.8.8.8", TCP, 80));
        assert!(!big.allows("x/a", false, "8.8.8.8", TCP, 80));
    }

    #[test]
    fn ip_blocks_with_except_match_by_address() {
        let c = model(vec![np(
            "x",
            "p",
            json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                 "ports": [{"port": 53, "protocol": "UDP"}]},
                {"to": [{"ipBlock": {"cidr": "10.0.1.3/32"}}]}
            ]}),
        )]);
        let r = compile_for(&c, "node-1");
        assert!(
            r.allows("x/a", false, "10.0.2.2", TCP, 80),
            "pod inside the cidr"
        );
        assert!(
            !r.allows("x/a", false, "10.0.1.2", TCP, 80),
            "pod in the except"
        );
        assert!(
            r.allows("x/a", false, "10.0.1.3", TCP, 80),
            "a /32 inside the except"
        );
        assert!(r.allows("x/a", false, "8.8.8.8", UDP, 53));
        assert!(!r.allows("x/a", false, "8.8.8.8", TCP, 53));
        assert!(
            !r.allows("x/a", false, "10.9.9.9", UDP, 53),
            "in 10/8 except, not in 10.0/16"
        );
        assert!(
            r.allows("x/a", false, "10.0.200.1", TCP, 1),
            "not a pod, inside 10.0/16"
        );
        assert!(
            !r.allows("x/a", false, "2001:db8::1", UDP, 53),
            "IPv6 is outside 0.0.0.0/0"
        );
        assert_eq!(r.state.cidrs.len(), 5);
    }

    #[test]
    fn named_ports_resolve_per_pod_and_protocol() {
        let mut c = model(vec![
            np(
                "x",
                "ing",
                json!({"podSelector": {},
                "ingress": [{"ports": [{"port": "serve-80-tcp"}, {"port": "serve-81-udp", "protocol": "UDP"},
                                       {"port": "serve-81-udp", "protocol": "TCP"}]}]}),
            ),
            np(
                "y",
                "eg",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}],
                            "ports": [{"port": "web"}]}]}),
            ),
        ]);
        // x/a serves "web" on 8080, x/b on 9090; other pods have no "web".
        c.pods[0].ports.push(NamedPort {
            name: "web".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        });
        c.pods[1].ports.push(NamedPort {
            name: "web".into(),
            protocol: Protocol::Tcp,
            port: 9090,
        });
        let r = compile_for(&c, "node-1");
        assert!(r.allows("x/a", true, "10.0.2.3", TCP, 80));
        assert!(r.allows("x/a", true, "10.0.2.3", UDP, 81));
        assert!(
            !r.allows("x/a", true, "10.0.2.3", TCP, 81),
            "the name is UDP's"
        );
        assert!(!r.allows("x/a", true, "10.0.2.3", UDP, 80));
        assert!(r.allows("y/a", false, "10.0.0.1", TCP, 8080));
        assert!(r.allows("y/a", false, "10.0.0.2", TCP, 9090));
        assert!(!r.allows("y/a", false, "10.0.0.1", TCP, 80));
        assert!(
            !r.allows("y/a", false, "10.0.0.3", TCP, 8080),
            "x/c has no port named web"
        );
        let st = &r.state.policies[0];
        assert_eq!(st.name, "ing");
        assert!(
            st.warnings
                .iter()
                .any(|w| w.contains("\"serve-81-udp\" (TCP)")),
            "{:?}",
            st.warnings
        );
    }

    #[test]
    fn end_port_ranges_and_sctp() {
        let c = model(vec![np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"port": 8000, "endPort": 9000}, {"protocol": "SCTP", "port": 80},
                                   {"protocol": "UDP"}]}]}),
        )]);
        let r = compile_for(&c, "node-1");
        for (proto, port, ok) in [
            (TCP, 7999, false),
            (TCP, 8000, true),
            (TCP, 8500, true),
            (TCP, 9000, true),
            (TCP, 9001, false),
            (132, 80, true),
            (132, 81, false),
            (UDP, 1, true),
            (UDP, 65535, true),
        ] {
            assert_eq!(
                r.allows("x/a", true, "10.0.1.1", proto, port),
                ok,
                "{proto}/{port}"
            );
        }
    }

    #[test]
    fn status_counts_selected_pods_and_warns() {
        let c = model(vec![
            np(
                "x",
                "none",
                json!({"podSelector": {"matchLabels": {"pod": "nope"}}}),
            ),
            np(
                "y",
                "ignored",
                json!({"podSelector": {}, "policyTypes": ["Ingress"],
                "egress": [{}]}),
            ),
        ]);
        let r = compile_for(&c, "node-2");
        let none = &r.state.policies[0];
        assert_eq!(
            (none.selected.len(), none.warnings.clone()),
            (0, vec!["selects no pods".to_string()])
        );
        let ign = &r.state.policies[1];
        assert_eq!(ign.selected, ["y/a", "y/b", "y/c"]);
        assert!(ign.warnings[0].contains("spec.egress is ignored"));
        assert_eq!((ign.ingress, ign.egress, ign.rules), (true, false, 0));
    }

    #[test]
    fn pending_identities_and_host_network_pods() {
        let mut c = model(vec![]);
        c.pods[0].host_network = true;
        c.pods[0].ips = vec!["192.168.0.1".parse().unwrap()];
        let view = NodeView {
            name: "node-1".into(),
            own_addrs: vec!["192.168.0.1".parse().unwrap()],
            other_addrs: vec![],
        };
        let st = compile(
            &c,
            &view,
            &|l| (l.namespace != "y").then_some(300),
            &mut LocalIds::default(),
        );
        assert_eq!(st.pending_identities, ["y/a", "y/b", "y/c"]);
        assert_eq!(
            st.ipcache[&"192.168.0.1/32".parse::<IpNet>().unwrap()].identity,
            id::HOST
        );
        assert!(!st
            .ipcache
            .contains_key(&"10.0.1.1/32".parse::<IpNet>().unwrap()));
        assert!(
            !st.endpoints.contains_key("x/a"),
            "host-network pods are not endpoints"
        );
    }

    #[test]
    fn local_ids_are_stable() {
        let c = model(vec![np(
            "x",
            "p",
            json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
        )]);
        let view = NodeView {
            name: "node-1".into(),
            ..Default::default()
        };
        let mut local = LocalIds::default();
        let f = |_: &IdentityLabels| Some(300);
        let a = compile(&c, &view, &f, &mut local);
        let mut c2 = c.clone();
        c2.policies.push(np(
            "x",
            "q",
            json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "1.0.0.0/8"}}]}]}),
        ));
        let b = compile(&c2, &view, &f, &mut local);
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(a.cidrs[&net], b.cidrs[&net]);
        assert_eq!(a.ipcache, b.ipcache);
    }

    /// Each entry names the policies it comes from, with those of the broader entries of its
    /// peer; the numbers of unchanged origins survive a recompile.
    #[test]
    fn entries_name_the_policies_that_allow_them() {
        let web = np(
            "x",
            "web",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                         "ports": [{"port": 8080}]}]}),
        );
        let from_b = np(
            "x",
            "from-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        );
        let dns = np(
            "x",
            "dns",
            json!({"podSelector": {},
            "ingress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
        );
        let c = model(vec![web.clone(), from_b, dns.clone()]);
        let r = compile_for(&c, "node-1");
        let names = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // x/b on 8080: the narrow entry (web) and the broad one of the same peer (from-b).
        assert_eq!(
            r.allowed_by("x/a", true, "10.0.0.2", TCP, 8080),
            names(&["x/from-b", "x/web"])
        );
        assert_eq!(
            r.allowed_by("x/a", true, "10.0.0.2", TCP, 80),
            names(&["x/from-b"])
        );
        // Any peer on UDP 53: the "any" entry is found first.
        assert_eq!(
            r.allowed_by("x/a", true, "10.0.0.2", UDP, 53),
            names(&["x/dns"])
        );
        assert_eq!(r.allowed_by("x/a", true, "10.0.2.2", TCP, 8080), None);
        let kinds: BTreeSet<&str> = r.state.endpoints["x/a"]
            .ingress
            .as_ref()
            .unwrap()
            .keys()
            .map(|e| e.match_kind().name())
            .collect();
        assert_eq!(kinds, BTreeSet::from(["l3-only", "l3-l4", "l4-only"]));

        // Recompiled without from-b: web's own origin and dns's keep their numbers.
        let view = NodeView {
            name: "node-1".into(),
            ..Default::default()
        };
        let mut local = LocalIds::default();
        let f = |_: &IdentityLabels| Some(300);
        let before = compile(&c, &view, &f, &mut local);
        let after = compile(&model(vec![web, dns]), &view, &f, &mut local);
        let number = |st: &PolicyState, o: &[&str]| {
            st.origins
                .iter()
                .find(|(_, v)| v.iter().map(String::as_str).eq(o.iter().copied()))
                .map(|(n, _)| *n)
        };
        assert_eq!(number(&before, &["x/dns"]), number(&after, &["x/dns"]));
        assert!(number(&after, &["x/dns"]).is_some());
        assert_eq!(number(&after, &["x/from-b", "x/web"]), None);
        assert!(number(&after, &["x/web"]).is_some());
        assert_eq!(
            MatchKind::from_number(MatchKind::L4Only.number()),
            MatchKind::L4Only
        );
        // A restarted agent numbers above what its predecessor left in the pinned map.
        let mut restarted = LocalIds::default();
        restarted.continue_origins_after(1000);
        let st = compile(&c, &view, &f, &mut restarted);
        assert!(st.origins.keys().all(|n| *n > 1000), "{:?}", st.origins);
    }
}
