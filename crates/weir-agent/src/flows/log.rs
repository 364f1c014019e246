//! The flow log: every event as it came (the pods at its addresses resolved on arrival), in a
//! bounded ring; records are spelled out (names, Services, policies, words) when read, so an
//! event costs the reader threads little more than its metrics, however fast they come.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

/// The maps consulted for every event: a fast hash (their keys are not chosen by others).
type FastMap<K, V> = hashbrown::HashMap<K, V, foldhash::fast::RandomState>;

use weir_bpf::datapath::{flow_event, reason_description, reason_name, weir_reason, DropEvent};
use weir_bpf::events::{
    sock_point_name, tcp_flag_names, SockEvent, TraceCount, TraceEvent, SOCK_XLATE_RECVMSG,
    TRACE_F_NEW, TRACE_F_REPLY,
};
use weir_bpf::kdrop::KernelDrop;
use weir_control::policy::MatchKind;

/// A label value written in the code, as a key: hashed and compared by where it is (its
/// address and length), so that a lookup reads no text. The same text at two addresses is
/// two keys of one series (the family finds the series by its labels' text). Only text the
/// program holds (literals, or a fixed set of them): text made per event would add a key
/// each time.
#[derive(Clone, Copy, Debug)]
struct Lit(&'static str);

impl PartialEq for Lit {
    fn eq(&self, other: &Lit) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Lit {}

impl std::hash::Hash for Lit {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (self.0.as_ptr() as usize).hash(h);
        self.0.len().hash(h);
    }
}

use super::{
    kernel_reason_text, FlowDetail, FlowEnd, FlowPage, FlowRecord, PodMeta, TcpStats, Translation,
    CAPACITY,
};

/// What the log knows of a local or remote pod at an address, shared by its events.
#[derive(Debug, PartialEq, Eq)]
struct PodEnd {
    /// `namespace/name`.
    pod: String,
    namespace: String,
    workload: Option<String>,
    /// `namespace/workload` (the pod's name without one), for metric labels.
    workload_key: String,
    labels: BTreeMap<String, String>,
}

/// The pods at a flow's source and destination, where they are pods.
type Ends = (Option<Arc<PodEnd>>, Option<Arc<PodEnd>>);

/// What `weir_flows_total` says of a flow's ends, as Hubble's `labelsContext` (asked for
/// with `weir agent --flow-metrics-context`): nothing (the default: labels of fixed
/// lists), or `source` and `destination` labels naming each end's namespace, workload
/// (`namespace/workload`) or pod (`namespace/name`); empty for an end that is no pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MetricsContext {
    /// No `source` or `destination` label.
    #[default]
    None,
    /// The ends' namespaces.
    Namespace,
    /// The ends' workloads.
    Workload,
    /// The ends' pods (one series per pod pair: only where that is affordable).
    Pod,
}

impl MetricsContext {
    /// Every context, by name.
    pub const ALL: [(&'static str, MetricsContext); 4] = [
        ("none", MetricsContext::None),
        ("namespace", MetricsContext::Namespace),
        ("workload", MetricsContext::Workload),
        ("pod", MetricsContext::Pod),
    ];

    /// The label value of end `p` (empty for no pod).
    fn of(self, p: Option<&Arc<PodEnd>>) -> &str {
        match (self, p) {
            (_, None) | (MetricsContext::None, _) => "",
            (MetricsContext::Namespace, Some(p)) => &p.namespace,
            (MetricsContext::Workload, Some(p)) => &p.workload_key,
            (MetricsContext::Pod, Some(p)) => &p.pod,
        }
    }

    /// The label value of pod `pod` (`namespace/name`) of workload `workload`.
    fn of_pod(self, pod: &str, workload: Option<&str>) -> String {
        let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
        match self {
            MetricsContext::None => String::new(),
            MetricsContext::Namespace => ns.to_string(),
            MetricsContext::Workload => format!("{ns}/{}", workload.unwrap_or(name)),
            MetricsContext::Pod => pod.to_string(),
        }
    }
}

impl std::str::FromStr for MetricsContext {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|(_, c)| *c)
            .ok_or_else(|| format!("{s:?}: expected none, namespace, workload or pod"))
    }
}

/// The NetworkPolicies (`namespace/name`) of an origin, shared by the verdicts naming it.
type Origin = Arc<Vec<String>>;

/// How many origins no longer programmed the log still names.
const RETIRED_ORIGINS: usize = 4096;

/// An event as it came.
enum Raw {
    /// With the policies that allowed it, per direction (`WEIR_DIR_*`), resolved on arrival.
    Verdict(flow_event, [Option<Origin>; 2]),
    Drop(DropEvent),
    /// With its direction, worked out on arrival.
    KernelDrop(Box<(KernelDrop, &'static str)>),
    /// An IPv6 flow's, or one pushed decoded.
    Trace(Box<TraceEvent>),
    /// An IPv4 flow's `struct trace_event4`, as the program wrote it.
    Trace4([u8; 64]),
    /// With the client's address, when its network namespace is a known pod's.
    Sock(SockEvent, Option<IpAddr>),
    /// A pod's client sockets (at the address) towards one peer over a period.
    /// Client, peer, and (the counts, the frontend the connects asked for).
    TcpHealth(IpAddr, SocketAddr, Box<(TcpStats, Option<SocketAddr>)>),
}

struct Entry {
    seq: u64,
    /// Wall clock, nanoseconds since the epoch.
    wall_ns: i128,
    src: Option<Arc<PodEnd>>,
    dst: Option<Arc<PodEnd>>,
    raw: Raw,
}

/// The boot clock's offset from the wall clock, read again once events are a second past
/// the last reading (by their own time stamps: no clock read per event).
struct Clock {
    offset_ns: i128,
    /// The boot clock at the last reading (None: never read).
    read: Option<u64>,
}

impl Clock {
    fn wall_ns(&mut self, boot_ns: u64) -> i128 {
        if self
            .read
            .is_none_or(|at| boot_ns > at.saturating_add(1_000_000_000))
        {
            let wall = jiff::Timestamp::now().as_nanosecond();
            let boot = super::boot_ns();
            self.offset_ns = wall - boot as i128;
            self.read = Some(boot);
        }
        self.offset_ns + boot_ns as i128
    }
}

/// `weir_flows_total`'s counters by (event, verdict, direction).
type FlowCounters = FastMap<(Lit, Lit, Lit), Counter>;

/// Counters already looked up in their families, by their labels' values.
#[derive(Default)]
struct Counters {
    /// What `weir_flows_total` says of the ends.
    context: MetricsContext,
    /// `weir_flows_total` by reason, then (event, verdict, direction): without a context.
    flows: FastMap<String, FlowCounters>,
    /// `weir_flows_total` by reason, source and destination, then (event, verdict,
    /// direction): with a context.
    flows_by_ends: FastMap<String, FastMap<String, FastMap<String, FlowCounters>>>,
    /// `weir_policy_verdicts_total` by (verdict, direction, match).
    verdicts: FastMap<(Lit, Lit, Lit), Counter>,
    /// `weir_tcp_flags_total` by (flag, family).
    tcp_flags: FastMap<(Lit, Lit), Counter>,
    /// `weir_service_connections_total` by Service (`namespace/name`), then outcome.
    services: FastMap<String, FastMap<Lit, Counter>>,
}

/// The value under `key`, made on first use: one lookup, and no allocation once it is there.
fn entry<'m, V: Default>(map: &'m mut FastMap<String, V>, key: &str) -> &'m mut V {
    map.entry_ref(key).or_default()
}

/// The labels of a Service's `weir_service_connections_total` series.
fn service_labels(service: &str, outcome: &str) -> crate::metrics::Labels {
    let mut l = crate::metrics::service_labels(service);
    l.push(("outcome", outcome.to_string()));
    l
}

/// The labels of a `weir_flows_total` series (`source` and `destination` with a context).
fn flow_labels(
    context: MetricsContext,
    (event, verdict, dir): (&str, &str, &str),
    reason: &str,
    (src, dst): (&str, &str),
) -> crate::metrics::Labels {
    let mut l = vec![
        ("event", event.to_string()),
        ("verdict", verdict.to_string()),
        ("reason", reason.to_string()),
        ("direction", dir.to_string()),
    ];
    if context != MetricsContext::None {
        l.push(("source", src.to_string()));
        l.push(("destination", dst.to_string()));
    }
    l
}

impl Counters {
    fn flow(
        &mut self,
        event: &'static str,
        verdict: &'static str,
        reason: &str,
        dir: &'static str,
        (s, d): (Option<&Arc<PodEnd>>, Option<&Arc<PodEnd>>),
    ) {
        let context = self.context;
        let (src, dst) = (context.of(s), context.of(d));
        let counters = if context == MetricsContext::None {
            entry(&mut self.flows, reason)
        } else {
            entry(entry(entry(&mut self.flows_by_ends, reason), src), dst)
        };
        debug_assert!(counters.len() < 256, "label keys made per event");
        counters
            .entry((Lit(event), Lit(verdict), Lit(dir)))
            .or_insert_with(|| {
                let l = flow_labels(context, (event, verdict, dir), reason, (src, dst));
                crate::metrics::METRICS.flows.get_or_create(&l).clone()
            })
            .inc();
    }

    /// Removes the `weir_flows_total` series naming an end not in `live` (pods gone).
    fn forget_ends(&mut self, live: &std::collections::HashSet<String>) {
        if self.context == MetricsContext::None {
            return;
        }
        let context = self.context;
        let gone = |e: &str| !e.is_empty() && !live.contains(e);
        for (reason, by_src) in self.flows_by_ends.iter_mut() {
            for (src, by_dst) in by_src.iter_mut() {
                by_dst.retain(|dst, counters| {
                    if !gone(src) && !gone(dst) {
                        return true;
                    }
                    for (e, v, d) in counters.keys() {
                        let l = flow_labels(context, (e.0, v.0, d.0), reason, (src, dst));
                        crate::metrics::METRICS.flows.remove(&l);
                    }
                    false
                });
            }
            by_src.retain(|_, by_dst| !by_dst.is_empty());
        }
        self.flows_by_ends.retain(|_, by_src| !by_src.is_empty());
    }

    fn verdict(&mut self, verdict: &'static str, dir: &'static str, kind: &'static str) {
        debug_assert!(self.verdicts.len() < 256, "label keys made per event");
        self.verdicts
            .entry((Lit(verdict), Lit(dir), Lit(kind)))
            .or_insert_with(|| {
                crate::metrics::METRICS
                    .policy_verdicts
                    .get_or_create(&vec![
                        ("verdict", verdict.to_string()),
                        ("direction", dir.to_string()),
                        ("match", kind.to_string()),
                    ])
                    .clone()
            })
            .inc();
    }

    /// A forwarded TCP packet's flags as Hubble counts them (`SYN`, `SYN-ACK`, `FIN`, `RST`),
    /// by address family.
    fn tcp_flags(&mut self, f: u8, v4: bool) {
        let family = if v4 { "ipv4" } else { "ipv6" };
        let syn = if f & 0x10 != 0 { "SYN-ACK" } else { "SYN" };
        for (bit, flag) in [(0x02, syn), (0x01, "FIN"), (0x04, "RST")] {
            if f & bit == 0 {
                continue;
            }
            self.tcp_flags
                .entry((Lit(flag), Lit(family)))
                .or_insert_with(|| {
                    crate::metrics::METRICS
                        .tcp_flags
                        .get_or_create(&vec![("flag", flag.to_string()), ("family", family.into())])
                        .clone()
                })
                .inc();
        }
    }

    /// A connection to a Service: `translated` to a backend, or `refused`.
    fn service(&mut self, service: Option<&str>, outcome: &'static str) {
        let Some(service) = service else { return };
        entry(&mut self.services, service)
            .entry(Lit(outcome))
            .or_insert_with(|| {
                crate::metrics::METRICS
                    .service_connections
                    .get_or_create(&service_labels(service, outcome))
                    .clone()
            })
            .inc();
    }
}

/// The log and the names it gives to addresses.
pub struct FlowLog {
    node: String,
    next_seq: u64,
    entries: VecDeque<Entry>,
    clock: Clock,
    counters: Counters,
    /// The pods at addresses, as resolved since the pod maps last changed.
    ends: FastMap<IpAddr, Option<Arc<PodEnd>>>,
    /// The last two addresses asked for with their pods (either way round): a connection's
    /// summaries come one way then the other.
    last_ends: Option<(IpAddr, IpAddr, Ends)>,
    /// Pod addresses -> `namespace/name` (kept by the policy loop, with [`FlowLog::set_pods`]).
    pub pod_names: HashMap<IpAddr, String>,
    /// `namespace/name` -> the pod's workload and labels (kept by the policy loop).
    pub pods: HashMap<String, PodMeta>,
    /// (backend address, port, protocol number) -> the Service (`namespace/name`) it is a
    /// backend of (kept by the Services loop).
    pub services: HashMap<(IpAddr, u16, u8), String>,
    /// `namespace/name` of a pod -> the policies isolating it for ingress and for egress
    /// (kept by the policy loop).
    pub isolating: HashMap<String, (Vec<String>, Vec<String>)>,
    /// Services (`namespace/name`) with `weir_service_tcp_*` series (kept by the TCP health
    /// thread; they go with the Service, in [`FlowLog::set_services`]).
    pub(crate) tcp_services: std::collections::HashSet<String>,
    /// The datapath's policy entry origins -> the policies they come from (kept by the
    /// policy loop, with [`FlowLog::set_origins`]), retired ones included.
    origins: HashMap<u32, Origin>,
    /// Origins no longer programmed, oldest first: kept (numbers are not reused) for the
    /// verdicts still on their way, up to [`RETIRED_ORIGINS`].
    retired: VecDeque<u32>,
    /// The numbers of the last table.
    live_origins: Vec<u32>,
    /// (frontend address, port, protocol number) -> its Service (`namespace/name`); node
    /// ports under the unspecified address (kept by the Services loop).
    pub frontends: HashMap<(IpAddr, u16, u8), String>,
    /// A pod network namespace's cookie -> the pod (`namespace/name`) and its addresses
    /// (kept by the socket events' reader).
    pub netns_pods: HashMap<u64, (String, Vec<IpAddr>)>,
    /// A local pod network namespace's inode -> the pod's addresses (kept by the kernel
    /// drops' reader): which way a drop in a pod's namespace went.
    pub kdrop_pods: HashMap<u32, Vec<IpAddr>>,
}

fn identity_kind(id: u32) -> &'static str {
    use weir_control::policy::id;
    match id {
        id::ANY => "unknown",
        id::HOST => "host",
        id::WORLD => "world",
        id::REMOTE_NODE => "remote-node",
        id::CLUSTER => "cluster",
        id::POD_MIN..=id::POD_MAX => "pod",
        i if i >= id::NS_BASE => "namespace-class",
        i if i >= id::CIDR_BASE => "cidr",
        _ => "reserved",
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// Where a flow stands from the pods at its ends: `ingress` into a pod, `egress` out of one,
/// else `node`.
fn direction_of(src: Option<&Arc<PodEnd>>, dst: Option<&Arc<PodEnd>>) -> &'static str {
    if dst.is_some() {
        "ingress"
    } else if src.is_some() {
        "egress"
    } else {
        "node"
    }
}

/// A reason code's name for a metrics label: no allocation for the codes the enum has.
fn reason_label(code: u8) -> std::borrow::Cow<'static, str> {
    weir_bpf::datapath::reason_str(code)
        .map(std::borrow::Cow::Borrowed)
        .unwrap_or_else(|| reason_name(code).into())
}

/// `ingress` or `egress`, for a `WEIR_DIR_*`.
fn dir_name(dir: u8) -> &'static str {
    if dir == weir_bpf::datapath::POLICY_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// The policies whose entries allowed a flow: the source's egress ones, then the
/// destination's ingress ones.
fn allowing(ev: &flow_event, origins: &[Option<Origin>; 2]) -> Vec<String> {
    use weir_bpf::datapath::{POLICY_EGRESS, POLICY_INGRESS};
    let mut out: Vec<String> = Vec::new();
    for d in [POLICY_EGRESS, POLICY_INGRESS] {
        if ev.judged & (1 << d) == 0 {
            continue;
        }
        for p in origins[usize::from(d)].iter().flat_map(|o| o.iter()) {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
    }
    out
}

fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    }
}

impl FlowLog {
    /// An empty log for `node`.
    pub fn new(node: &str) -> Self {
        FlowLog {
            node: node.to_string(),
            next_seq: 1,
            entries: VecDeque::new(),
            clock: Clock {
                offset_ns: 0,
                read: None,
            },
            counters: Counters::default(),
            ends: FastMap::default(),
            last_ends: None,
            pod_names: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            isolating: HashMap::new(),
            tcp_services: Default::default(),
            origins: HashMap::new(),
            retired: VecDeque::new(),
            live_origins: Vec::new(),
            frontends: HashMap::new(),
            netns_pods: HashMap::new(),
            kdrop_pods: HashMap::new(),
        }
    }

    /// Replaces the pods the log names addresses after (addresses -> `namespace/name`, and
    /// their workloads and labels).
    /// With a metrics context, the `weir_flows_total` series of pods gone go.
    pub fn set_pods(&mut self, names: HashMap<IpAddr, String>, pods: HashMap<String, PodMeta>) {
        let context = self.counters.context;
        if context != MetricsContext::None {
            let live = names
                .values()
                .map(|p| context.of_pod(p, pods.get(p).map(|m| m.workload.as_str())))
                .collect();
            self.counters.forget_ends(&live);
        }
        self.pod_names = names;
        self.pods = pods;
        self.ends.clear();
        self.last_ends = None;
    }

    /// Sets what `weir_flows_total` says of a flow's ends (from the next flow on).
    pub fn set_metrics_context(&mut self, context: MetricsContext) {
        self.counters.context = context;
    }

    /// Takes the table of policy entry origins (number -> `namespace/name`s). Origins no
    /// longer in it stay a while: verdicts made on entries not yet rewritten, or still in
    /// the ring, name them.
    pub fn set_origins(&mut self, origins: &BTreeMap<u32, Vec<String>>) {
        // The last table's numbers not in this one retire (a number is never reused).
        for n in std::mem::take(&mut self.live_origins) {
            if !origins.contains_key(&n) {
                self.retired.push_back(n);
            }
        }
        self.live_origins = origins.keys().copied().collect();
        while self.retired.len() > RETIRED_ORIGINS {
            if let Some(n) = self.retired.pop_front() {
                self.origins.remove(&n);
            }
        }
        for (n, o) in origins {
            if self.origins.get(n).is_none_or(|have| **have != *o) {
                self.origins.insert(*n, Arc::new(o.clone()));
            }
        }
    }

    /// Replaces the Services the log names flows after: backends (address, port, protocol)
    /// and frontends -> `namespace/name`. The connection counts and TCP health series of
    /// Services gone go too.
    pub fn set_services(
        &mut self,
        backends: HashMap<(IpAddr, u16, u8), String>,
        frontends: HashMap<(IpAddr, u16, u8), String>,
    ) {
        let live: std::collections::HashSet<&String> = frontends.values().collect();
        let gone: Vec<String> = self
            .counters
            .services
            .keys()
            .filter(|s| !live.contains(s))
            .cloned()
            .collect();
        for service in gone {
            for outcome in self.counters.services[&service].keys() {
                crate::metrics::METRICS
                    .service_connections
                    .remove(&service_labels(&service, outcome.0));
            }
            self.counters.services.remove(&service);
        }
        self.tcp_services.retain(|service| {
            let keep = live.contains(service);
            if !keep {
                crate::tcp_health::remove_service_series(service);
            }
            keep
        });
        self.services = backends;
        self.frontends = frontends;
    }

    /// The pod at `ip`, resolved once per change of the pod maps.
    fn pod_at(&mut self, ip: IpAddr) -> Option<Arc<PodEnd>> {
        if let Some(e) = self.ends.get(&ip) {
            return e.clone();
        }
        let end = self.pod_names.get(&ip).map(|pod| {
            let meta = self.pods.get(pod);
            let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
            let workload = meta.map(|m| m.workload.clone());
            Arc::new(PodEnd {
                namespace: ns.to_string(),
                workload_key: format!("{ns}/{}", workload.as_deref().unwrap_or(name)),
                workload,
                labels: meta.map(|m| m.labels.clone()).unwrap_or_default(),
                pod: pod.clone(),
            })
        });
        self.ends.insert(ip, end.clone());
        end
    }

    /// The pods at addresses `src` and `dst`.
    fn ends(&mut self, src: Option<IpAddr>, dst: Option<IpAddr>) -> Ends {
        let (Some(s), Some(d)) = (src, dst) else {
            return (
                src.and_then(|ip| self.pod_at(ip)),
                dst.and_then(|ip| self.pod_at(ip)),
            );
        };
        match &self.last_ends {
            Some((a, b, (pa, pb))) if (*a, *b) == (s, d) => return (pa.clone(), pb.clone()),
            Some((a, b, (pa, pb))) if (*a, *b) == (d, s) => return (pb.clone(), pa.clone()),
            _ => {}
        }
        let ends = (self.pod_at(s), self.pod_at(d));
        self.last_ends = Some((s, d, ends.clone()));
        ends
    }

    fn add(&mut self, ts: u64, (src, dst): Ends, raw: Raw) {
        let entry = Entry {
            seq: self.next_seq,
            wall_ns: self.clock.wall_ns(ts),
            src,
            dst,
            raw,
        };
        self.next_seq += 1;
        if self.entries.len() == CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// Records one policy verdict of the datapath: counted once per direction judged (the
    /// source pod's egress, the destination pod's ingress), each with the kind of entry
    /// that allowed it.
    pub fn push(&mut self, ev: &flow_event) {
        use weir_bpf::datapath::{POLICY_EGRESS, POLICY_INGRESS};
        let allowed = ev.reason == weir_reason::REASON_POLICY_ALLOWED.0;
        for d in [POLICY_EGRESS, POLICY_INGRESS] {
            if ev.judged & (1 << d) == 0 {
                continue;
            }
            let denied_here = !allowed && d == ev.dir;
            let kind = MatchKind::from_number(ev.r#match[usize::from(d)]);
            self.counters.verdict(
                if denied_here { "denied" } else { "allowed" },
                dir_name(d),
                kind.name(),
            );
        }
        let dir = dir_name(ev.dir);
        let verdict = if allowed { "allowed" } else { "dropped" };
        let reason = reason_label(ev.reason as u8);
        let src = weir_bpf::ip_from_words(ev.family, ev.saddr);
        let dst = weir_bpf::ip_from_words(ev.family, ev.daddr);
        let ends = self.ends(Some(src), Some(dst));
        self.counters.flow(
            "policy-verdict",
            verdict,
            &reason,
            dir,
            (ends.0.as_ref(), ends.1.as_ref()),
        );
        let origins = ev.origin.map(|o| self.origins.get(&o).cloned());
        self.add(ev.ts, ends, Raw::Verdict(*ev, origins));
    }

    /// Records one packet the kernel dropped (IP packets only: the others are counted in
    /// the metrics alone). Drops by tc and XDP programs are weir's own programs' under eBPF,
    /// which report them with their reason: counted in the metrics, not logged twice.
    pub fn push_kernel_drop(&mut self, d: &KernelDrop) {
        if matches!(d.reason.as_str(), "TC_INGRESS" | "TC_EGRESS" | "XDP") {
            return;
        }
        let (Some(src), Some(dst)) = (d.src, d.dst) else {
            return;
        };
        let mut ends = self.ends(Some(src.0), Some(dst.0));
        // Dropped in a local pod's namespace: from the pod when it sent it, to it when it was
        // for it, else (its loopback, say) the pod's own, named as the source.
        let in_pod = self.kdrop_pods.get(&d.netns).cloned();
        let dir = match in_pod {
            Some(ips) if ips.contains(&src.0) => "egress",
            Some(ips) if ips.contains(&dst.0) => "ingress",
            Some(ips) => {
                ends.0 = ips.first().and_then(|ip| self.pod_at(*ip));
                "egress"
            }
            None => direction_of(ends.0.as_ref(), ends.1.as_ref()),
        };
        let (s, t) = (ends.0.as_ref(), ends.1.as_ref());
        self.counters
            .flow("kernel-drop", "dropped", &d.reason, dir, (s, t));
        let raw = Raw::KernelDrop(Box::new((d.clone(), dir)));
        self.add(d.ts, ends, raw);
    }

    /// Records one packet weir's programs dropped for a reason other than policy.
    pub fn push_drop_event(&mut self, d: &DropEvent) {
        let (Some(src), Some(dst)) = (d.src, d.dst) else {
            return;
        };
        if d.reason == weir_reason::DROP_NO_SERVICE_BACKEND.0 {
            let svc = self.frontend_service(dst, d.proto);
            self.counters.service(svc.as_deref(), "refused");
        }
        let ends = self.ends(Some(src.ip()), Some(dst.ip()));
        let (s, t) = (ends.0.as_ref(), ends.1.as_ref());
        let dir = direction_of(s, t);
        let reason = reason_label(d.reason as u8);
        self.counters.flow("drop", "dropped", &reason, dir, (s, t));
        self.add(d.ts, ends, Raw::Drop(d.clone()));
    }

    /// Records one forwarding summary of the tc or XDP programs.
    pub fn push_trace(&mut self, t: TraceEvent) {
        let ends = self.count_trace(&TraceCount::of(&t));
        self.add(t.ts, ends, Raw::Trace(Box::new(t)));
    }

    /// Records one forwarding summary as the programs wrote it (see
    /// [`TraceEvent::decode`]): an IPv4 flow's is kept as it is (64 bytes), counted from the
    /// few fields that count, and decoded when read; one that does not decode is left out.
    pub fn push_trace_record(&mut self, record: &[u8]) {
        match <&[u8; 64]>::try_from(record) {
            Ok(v4) => {
                let t = TraceCount::of4(v4);
                let ends = self.count_trace(&t);
                self.add(t.ts, ends, Raw::Trace4(*v4));
            }
            Err(_) => {
                if let Some(t) = TraceEvent::decode(record) {
                    self.push_trace(t);
                }
            }
        }
    }

    /// Counts forwarding summary `t` in the metrics; the pods at its ends.
    fn count_trace(&mut self, t: &TraceCount) -> Ends {
        let ends = self.ends(Some(t.src), Some(t.dst));
        let (s, d) = (ends.0.as_ref(), ends.1.as_ref());
        let dir = direction_of(s, d);
        let reason = reason_label(t.reason as u8);
        self.counters
            .flow("trace", "forwarded", &reason, dir, (s, d));
        if t.proto == 6 {
            self.counters.tcp_flags(t.tcp_flags, t.src.is_ipv4());
        }
        if t.flags & TRACE_F_NEW != 0 && t.flags & TRACE_F_REPLY == 0 {
            if let Some(frontend) = t.frontend {
                let svc = self.frontend_service(frontend, t.proto);
                self.counters.service(svc.as_deref(), "translated");
            }
        }
        ends
    }

    /// Records one translation (or refusal) of the socket layer: the client is the pod
    /// whose network namespace the socket is in.
    pub fn push_sock(&mut self, e: &SockEvent) {
        let client = self.netns_pods.get(&e.netns).and_then(|(_, ips)| {
            ips.iter()
                .find(|ip| ip.is_ipv4() == e.vip.is_ipv4())
                .copied()
        });
        let svc = self.frontend_service(e.vip, e.proto);
        let to = e.backend.unwrap_or(e.vip);
        let ends = self.ends(client, Some(to.ip()));
        let pods = (ends.0.as_ref(), ends.1.as_ref());
        if e.reason != 0 {
            self.counters.service(svc.as_deref(), "refused");
            let reason = reason_label(e.reason as u8);
            self.counters
                .flow("trace-sock", "dropped", &reason, "egress", pods);
        } else {
            if e.point != SOCK_XLATE_RECVMSG {
                self.counters.service(svc.as_deref(), "translated");
            }
            let reason = sock_reason(e.point);
            self.counters
                .flow("trace-sock", "translated", reason, "egress", pods);
        }
        self.add(e.ts, ends, Raw::Sock(e.clone(), client));
    }

    /// Records what the client sockets of the pod at `client` went through with `peer`
    /// (at boot-clock time `ts`).
    pub fn push_tcp_health(
        &mut self,
        ts: u64,
        client: IpAddr,
        (peer, frontend): (SocketAddr, Option<SocketAddr>),
        s: TcpStats,
    ) {
        let raw = Raw::TcpHealth(client, peer, Box::new((s, frontend)));
        let ends = self.ends(Some(client), Some(peer.ip()));
        self.add(ts, ends, raw);
    }

    /// The Service of TCP connects to `peer`: that of the frontend they asked for (the
    /// socket layer's translation), else the one whose backend `peer` is.
    pub fn tcp_peer_service(
        &self,
        peer: SocketAddr,
        frontend: Option<SocketAddr>,
    ) -> Option<String> {
        frontend
            .and_then(|f| self.frontend_service(f, 6))
            .or_else(|| self.services.get(&(peer.ip(), peer.port(), 6)).cloned())
    }

    /// The Service of frontend `addr` (a node port's under the unspecified address).
    fn frontend_service(&self, addr: SocketAddr, proto: u8) -> Option<String> {
        self.frontends
            .get(&(addr.ip(), addr.port(), proto))
            .or_else(|| {
                self.frontends
                    .get(&(unspecified(addr.is_ipv4()), addr.port(), proto))
            })
            .cloned()
    }

    /// The Service whose backend `dst` is, for protocol `proto`.
    fn service_of(&self, dst: &FlowEnd, proto: u8) -> Option<String> {
        self.services.get(&(dst.ip, dst.port, proto)).cloned()
    }

    /// The policies that decided a denial: those isolating `pod` for ingress or egress.
    fn deciding(&self, pod: Option<&String>, ingress: bool) -> Vec<String> {
        pod.and_then(|p| self.isolating.get(p))
            .map(|(i, e)| if ingress { i.clone() } else { e.clone() })
            .unwrap_or_default()
    }

    /// The records after `since`.
    pub fn since(&self, since: u64) -> FlowPage {
        self.since_last(since, None)
    }

    /// The records after `since`, only the last `last` of them when given (the others are
    /// not spelled out: a reader that wants the last few pays for those alone).
    pub fn since_last(&self, since: u64, last: Option<usize>) -> FlowPage {
        let first = self.entries.front().map(|r| r.seq).unwrap_or(self.next_seq);
        let after = self.entries.partition_point(|e| e.seq <= since);
        let start = match last {
            Some(n) => after.max(self.entries.len().saturating_sub(n)),
            None => after,
        };
        FlowPage {
            next: self.next_seq - 1,
            lost: first.saturating_sub(since + 1),
            events_lost: 0,
            flows: self
                .entries
                .range(start..)
                .map(|e| self.render(e))
                .collect(),
        }
    }

    /// An entry spelled out.
    fn render(&self, e: &Entry) -> FlowRecord {
        let time = jiff::Timestamp::from_nanosecond(e.wall_ns)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut rec = FlowRecord {
            seq: e.seq,
            time,
            node: self.node.clone(),
            event: String::new(),
            verdict: String::new(),
            reason: String::new(),
            direction: direction_of(e.src.as_ref(), e.dst.as_ref()).into(),
            reason_text: String::new(),
            protocol: String::new(),
            source: flow_end(SocketAddr::new(unspecified(true), 0), 0, &None),
            destination: flow_end(SocketAddr::new(unspecified(true), 0), 0, &None),
            service: None,
            policies: Vec::new(),
            policy_match: None,
            detail: FlowDetail::default(),
        };
        match &e.raw {
            Raw::Verdict(ev, origins) => {
                let allowed = ev.reason == weir_reason::REASON_POLICY_ALLOWED.0;
                let ingress = ev.dir != weir_bpf::datapath::POLICY_EGRESS;
                let at = |w: &[u32; 4], port: u16| {
                    SocketAddr::new(weir_bpf::ip_from_words(ev.family, *w), u16::from_be(port))
                };
                rec.source = flow_end(at(&ev.saddr, ev.sport), ev.src_identity, &e.src);
                rec.destination = flow_end(at(&ev.daddr, ev.dport), ev.dst_identity, &e.dst);
                rec.event = "policy-verdict".into();
                rec.verdict = if allowed { "allowed" } else { "dropped" }.into();
                rec.reason = reason_name(ev.reason as u8);
                rec.reason_text = reason_description(ev.reason as u8);
                rec.direction = if ingress { "ingress" } else { "egress" }.into();
                rec.protocol = protocol_name(ev.proto);
                rec.service = self.service_of(&rec.destination, ev.proto);
                if !allowed {
                    let judged = if ingress {
                        &rec.destination
                    } else {
                        &rec.source
                    };
                    rec.policies = self.deciding(judged.pod.as_ref(), ingress);
                } else {
                    rec.policies = allowing(ev, origins);
                }
                if ev.judged & (1 << ev.dir) != 0 {
                    let kind = MatchKind::from_number(ev.r#match[usize::from(ev.dir & 1)]);
                    rec.policy_match = Some(kind.name().into());
                }
            }
            Raw::Drop(d) => {
                let code = d.reason as u8;
                self.render_drop(&mut rec, e, ("drop", d.src, d.dst, d.proto));
                rec.reason = reason_name(code);
                rec.reason_text = reason_description(code);
            }
            Raw::KernelDrop(b) => {
                let (d, dir) = &**b;
                let sock = |a: Option<(IpAddr, u16)>| a.map(|(ip, port)| SocketAddr::new(ip, port));
                let ends = (sock(d.src), sock(d.dst));
                self.render_drop(&mut rec, e, ("kernel-drop", ends.0, ends.1, d.proto));
                rec.direction = (*dir).into();
                rec.reason = d.reason.clone();
                rec.reason_text = kernel_reason_text(&d.reason);
            }
            Raw::Trace(t) => self.render_trace(&mut rec, e, t),
            Raw::Trace4(b) => {
                if let Some(t) = TraceEvent::decode(b) {
                    self.render_trace(&mut rec, e, &t);
                }
            }
            Raw::Sock(s, client) => self.render_sock(&mut rec, e, s, *client),
            Raw::TcpHealth(client, peer, h) => {
                let (s, frontend) = &**h;
                rec.source = flow_end(SocketAddr::new(*client, 0), 0, &e.src);
                rec.destination = flow_end(*peer, 0, &e.dst);
                rec.service = self.tcp_peer_service(*peer, *frontend);
                rec.event = "tcp-health".into();
                rec.verdict = "traced".into();
                rec.reason = "TCP_HEALTH".into();
                rec.reason_text = s.text();
                rec.direction = "egress".into();
                rec.protocol = "tcp".into();
                rec.detail.tcp = Some(s.clone());
            }
        }
        rec
    }

    /// A drop's ends, protocol and Service (the backend's, or the frontend's).
    fn render_drop(
        &self,
        rec: &mut FlowRecord,
        e: &Entry,
        (event, src, dst, proto): (&str, Option<SocketAddr>, Option<SocketAddr>, u8),
    ) {
        let (src, dst) = (src.expect("logged with"), dst.expect("logged with"));
        rec.source = flow_end(src, 0, &e.src);
        rec.destination = flow_end(dst, 0, &e.dst);
        rec.event = event.into();
        rec.verdict = "dropped".into();
        rec.protocol = protocol_name(proto);
        rec.service = self
            .service_of(&rec.destination, proto)
            .or_else(|| self.frontend_service(dst, proto));
    }

    fn render_trace(&self, rec: &mut FlowRecord, e: &Entry, t: &TraceEvent) {
        let reply = t.flags & TRACE_F_REPLY != 0;
        rec.source = flow_end(t.src, 0, &e.src);
        rec.destination = flow_end(t.dst, 0, &e.dst);
        // The Service: a translated request's original destination, a reply's new source,
        // else the Service whose backend the destination is.
        rec.service = match t.orig {
            Some((_, d)) if !reply => self.frontend_service(d, t.proto),
            Some(_) => self.frontend_service(t.src, t.proto),
            None => self.service_of(&rec.destination, t.proto),
        };
        let code = t.reason as u8;
        rec.event = "trace".into();
        rec.verdict = "forwarded".into();
        rec.reason = reason_name(code);
        rec.reason_text = reason_description(code);
        rec.protocol = protocol_name(t.proto);
        rec.detail = FlowDetail {
            translation: t.orig.map(|(s, d)| Translation {
                point: "packet".into(),
                source: s.to_string(),
                destination: d.to_string(),
            }),
            packets: Some(t.packets),
            bytes: Some(t.bytes),
            tcp_flags: tcp_flag_names(t.tcp_flags),
            is_reply: (t.orig.is_some() || t.proto == 6).then_some(reply),
            interface: Some(t.ifindex),
            tcp: None,
        };
    }

    fn render_sock(&self, rec: &mut FlowRecord, e: &Entry, s: &SockEvent, client: Option<IpAddr>) {
        let from = SocketAddr::new(client.unwrap_or(unspecified(s.vip.is_ipv4())), 0);
        let to = s.backend.unwrap_or(s.vip);
        rec.source = flow_end(from, 0, &e.src);
        rec.destination = flow_end(to, 0, &e.dst);
        rec.service = self.frontend_service(s.vip, s.proto);
        let point = sock_point_name(s.point);
        rec.event = "trace-sock".into();
        rec.direction = "egress".into();
        rec.protocol = protocol_name(s.proto);
        if s.reason != 0 {
            let code = s.reason as u8;
            rec.verdict = "dropped".into();
            rec.reason = reason_name(code);
            rec.reason_text = reason_description(code);
        } else {
            rec.verdict = "translated".into();
            rec.reason = sock_reason(s.point).into();
            rec.reason_text = format!(
                "{point}() to {} was given backend {to} at the socket layer",
                rec.service.as_deref().unwrap_or("a Service")
            );
        }
        rec.detail = FlowDetail {
            translation: Some(Translation {
                point: point.into(),
                source: client.map(|_| from.to_string()).unwrap_or_default(),
                destination: s.vip.to_string(),
            }),
            is_reply: Some(s.point == SOCK_XLATE_RECVMSG),
            ..Default::default()
        };
    }
}

/// One end of a flow at `a`, with its identity (0: unknown here) and the pod there.
fn flow_end(a: SocketAddr, identity: u32, pod: &Option<Arc<PodEnd>>) -> FlowEnd {
    FlowEnd {
        ip: a.ip(),
        port: a.port(),
        pod: pod.as_ref().map(|p| p.pod.clone()),
        namespace: pod.as_ref().map(|p| p.namespace.clone()),
        workload: pod.as_ref().and_then(|p| p.workload.clone()),
        labels: pod.as_ref().map(|p| p.labels.clone()).unwrap_or_default(),
        identity,
        identity_kind: identity_kind(identity).into(),
    }
}

/// The reason a socket translation is logged under.
fn sock_reason(point: u8) -> &'static str {
    match point {
        weir_bpf::events::SOCK_XLATE_CONNECT => "XLATE_CONNECT",
        weir_bpf::events::SOCK_XLATE_SENDMSG => "XLATE_SENDMSG",
        _ => "XLATE_RECVMSG",
    }
}
