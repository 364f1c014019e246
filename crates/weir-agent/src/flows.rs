//! Flows for `weir observe`: a thread drains the datapath's ring buffer of policy verdicts
//! (`weir_events`, one record per judged flow: allowed, or dropped with its reason), another
//! the kernel's drops in the node's network namespace (`weir_bpf::kdrop`: packets netfilter,
//! routing, neighbours, sockets or TCP dropped, with the kernel's reason), into a bounded log,
//! naming the pods behind the addresses as they are when the event arrives.
//! `GET /flows?since=SEQ` hands out what came after `SEQ`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use weir_bpf::datapath::{flow_event, reason_description, reason_name, weir_reason, DropEvent};
use weir_bpf::events::{
    sock_point_name, tcp_flag_names, SockEvent, TraceEvent, TRACE_F_NEW, TRACE_F_REPLY,
};
use weir_bpf::kdrop::{KernelDrop, KernelDrops};

use crate::pods::Pods;

/// How many records the log keeps.
pub const CAPACITY: usize = 8192;

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    /// Address.
    pub ip: IpAddr,
    /// Port (0 for protocols without ports).
    pub port: u16,
    /// The pod with this address, as `namespace/name`, when it is one.
    pub pod: Option<String>,
    /// Its namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Its workload (see [`workload_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Its labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Security identity (0: unknown here).
    pub identity: u32,
    /// What the identity stands for: `host`, `world`, `remote-node`, `pod`, `cidr`,
    /// `namespace-class`, `cluster`, or `unknown`.
    pub identity_kind: String,
}

/// One policy verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Position in the agent's log.
    pub seq: u64,
    /// When the datapath judged it (RFC 3339).
    pub time: String,
    /// The node whose datapath judged it.
    pub node: String,
    /// What reported it: `policy-verdict` (weir's programs judged a flow), `drop` (weir's
    /// programs dropped a packet for another reason) or `kernel-drop` (the kernel dropped
    /// it, outside weir's programs).
    #[serde(default = "policy_verdict")]
    pub event: String,
    /// `allowed` or `dropped`.
    pub verdict: String,
    /// The datapath's reason (`REASON_POLICY_ALLOWED`, `DROP_POLICY_DENIED`,
    /// `DROP_POLICY_FAILED`), or the kernel's drop reason (`NETFILTER_DROP`, `NO_SOCKET`, ...).
    pub reason: String,
    /// Which pod's policy decided: `ingress` (the destination's) or `egress` (the source's);
    /// for a drop, `ingress` when the destination is a local pod, `egress` when the source
    /// is, else `node`.
    pub direction: String,
    /// The reason in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason_text: String,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    /// The original source (before any SNAT).
    pub source: FlowEnd,
    /// The real destination (after a Service's DNAT).
    pub destination: FlowEnd,
    /// The Service (`namespace/name`) whose backend the destination is, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The NetworkPolicies (`namespace/name`) that decided a denial: every policy isolating
    /// the pod in the direction judged (none of their rules allowed the flow).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// What forwarding summaries and translations add.
    #[serde(flatten)]
    pub detail: FlowDetail,
}

/// What a forwarding summary (`trace`) or a socket translation (`trace-sock`) adds to a flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowDetail {
    /// The flow's addresses before a translation, and where it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation: Option<Translation>,
    /// Packets the summary covers (since the flow's previous summary at that point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    /// Their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The TCP flags of the packet that made the summary due (`SYN`, `SYN-ACK`, `FIN`,
    /// `RST`, `ACK`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tcp_flags: String,
    /// Whether the packets are a translated flow's replies (absent: not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_reply: Option<bool>,
    /// The device the summary was made on (its ifindex in the node's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<u32>,
}

/// A translation: where it was made and the addresses before it (`ip:port`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    /// `connect`, `sendmsg`, `recvmsg` (the socket layer) or `packet` (tc, XDP).
    pub point: String,
    /// The source before.
    pub source: String,
    /// The destination before (a Service's address for a request).
    pub destination: String,
}

/// What the log knows of a pod besides its addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    /// Its workload (see [`workload_of`]).
    pub workload: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

fn policy_verdict() -> String {
    "policy-verdict".into()
}

/// The log and the names it gives to addresses.
pub struct FlowLog {
    node: String,
    next_seq: u64,
    records: VecDeque<FlowRecord>,
    /// Pod addresses -> `namespace/name` (kept by the policy loop).
    pub pod_names: HashMap<IpAddr, String>,
    /// `namespace/name` -> the pod's workload and labels (kept by the policy loop).
    pub pods: HashMap<String, PodMeta>,
    /// (backend address, port, protocol number) -> the Service (`namespace/name`) it is a
    /// backend of (kept by the Services loop).
    pub services: HashMap<(IpAddr, u16, u8), String>,
    /// `namespace/name` of a pod -> the policies isolating it for ingress and for egress
    /// (kept by the policy loop).
    pub isolating: HashMap<String, (Vec<String>, Vec<String>)>,
    /// (frontend address, port, protocol number) -> its Service (`namespace/name`); node
    /// ports under the unspecified address (kept by the Services loop).
    pub frontends: HashMap<(IpAddr, u16, u8), String>,
    /// A pod network namespace's cookie -> the pod (`namespace/name`) and its addresses
    /// (kept by the socket events' reader).
    pub netns_pods: HashMap<u64, (String, Vec<IpAddr>)>,
}

/// A pod's workload, as metrics label it: a Deployment's name for a pod of one of its
/// ReplicaSets (the owner's name less the `pod-template-hash`), else the controlling owner's
/// name (a StatefulSet, DaemonSet, Job, ...), else the pod's own name.
pub fn workload_of(p: &k8s_openapi::api::core::v1::Pod) -> String {
    let name = p.metadata.name.clone().unwrap_or_default();
    let owners = p.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(o) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first())
    else {
        return name;
    };
    let hash = p
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    if o.kind == "ReplicaSet" {
        if let Some(d) = hash.and_then(|h| o.name.strip_suffix(&format!("-{h}"))) {
            return d.to_string();
        }
    }
    o.name.clone()
}

/// What `GET /flows` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowPage {
    /// Pass as `since` next time.
    pub next: u64,
    /// Records that left the log before they were asked for.
    pub lost: u64,
    /// Verdict events the datapath could not hand over since it was loaded: its ring buffer
    /// was full (REASON_EVENT_LOST).
    #[serde(default)]
    pub events_lost: u64,
    /// The records, oldest first.
    pub flows: Vec<FlowRecord>,
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

/// The wall-clock time of a `CLOCK_BOOTTIME` stamp.
fn wall_time(boot_ns: u64) -> String {
    let now = jiff::Timestamp::now();
    let Ok(boot_now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) else {
        return now.to_string();
    };
    let boot_now = boot_now.tv_sec() as i128 * 1_000_000_000 + boot_now.tv_nsec() as i128;
    let ago = (boot_now - boot_ns as i128).max(0) as i64;
    now.checked_sub(jiff::SignedDuration::from_nanos(ago))
        .unwrap_or(now)
        .to_string()
}

impl FlowLog {
    /// An empty log for `node`.
    pub fn new(node: &str) -> Self {
        FlowLog {
            node: node.to_string(),
            next_seq: 1,
            records: VecDeque::new(),
            pod_names: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            isolating: HashMap::new(),
            frontends: HashMap::new(),
            netns_pods: HashMap::new(),
        }
    }

    /// One end of a flow, with what is known of the pod at `ip`.
    fn end(&self, ip: IpAddr, port: u16, identity: u32) -> FlowEnd {
        let pod = self.pod_names.get(&ip).cloned();
        let meta = pod.as_ref().and_then(|p| self.pods.get(p));
        FlowEnd {
            ip,
            port,
            namespace: pod
                .as_ref()
                .and_then(|p| p.split_once('/'))
                .map(|(ns, _)| ns.to_string()),
            workload: meta.map(|m| m.workload.clone()),
            labels: meta.map(|m| m.labels.clone()).unwrap_or_default(),
            pod,
            identity,
            identity_kind: identity_kind(identity).into(),
        }
    }

    /// The policies that decided a denial: those isolating `pod` for ingress or egress.
    fn deciding(&self, pod: Option<&String>, ingress: bool) -> Vec<String> {
        pod.and_then(|p| self.isolating.get(p))
            .map(|(i, e)| if ingress { i.clone() } else { e.clone() })
            .unwrap_or_default()
    }

    /// The Service whose backend `dst` is, for protocol `proto`.
    fn service_of(&self, dst: &FlowEnd, proto: u8) -> Option<String> {
        self.services.get(&(dst.ip, dst.port, proto)).cloned()
    }

    /// Records one event from the datapath.
    pub fn push(&mut self, ev: &flow_event) {
        let end = |words: &[u32; 4], port: u16, identity: u32| {
            let ip = weir_bpf::ip_from_words(ev.family, *words);
            self.end(ip, u16::from_be(port), identity)
        };
        let allowed = ev.reason == weir_reason::REASON_POLICY_ALLOWED.0;
        let ingress = ev.dir != weir_bpf::datapath::POLICY_EGRESS;
        let direction = if ingress { "ingress" } else { "egress" };
        crate::metrics::METRICS
            .policy_verdicts
            .get_or_create(&vec![
                (
                    "verdict",
                    if allowed { "allowed" } else { "denied" }.to_string(),
                ),
                ("direction", direction.to_string()),
            ])
            .inc();
        let source = end(&ev.saddr, ev.sport, ev.src_identity);
        let destination = end(&ev.daddr, ev.dport, ev.dst_identity);
        let policies = if allowed {
            Vec::new()
        } else {
            let judged = if ingress { &destination } else { &source };
            self.deciding(judged.pod.as_ref(), ingress)
        };
        let rec = FlowRecord {
            seq: self.next_seq,
            time: wall_time(ev.ts),
            node: self.node.clone(),
            event: policy_verdict(),
            verdict: if allowed { "allowed" } else { "dropped" }.into(),
            reason: reason_name(ev.reason as u8),
            reason_text: reason_description(ev.reason as u8),
            direction: direction.into(),
            protocol: protocol_name(ev.proto),
            service: self.service_of(&destination, ev.proto),
            policies,
            source,
            destination,
            detail: FlowDetail::default(),
        };
        self.append(rec);
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
        let reason = (d.reason.clone(), kernel_reason_text(&d.reason));
        self.push_drop("kernel-drop", d.ts, reason, d.proto, (src, dst));
    }

    /// Records one packet weir's programs dropped for a reason other than policy.
    pub fn push_drop_event(&mut self, d: &DropEvent) {
        let (Some(src), Some(dst)) = (d.src, d.dst) else {
            return;
        };
        let code = d.reason as u8;
        let reason = (reason_name(code), reason_description(code));
        if d.reason == weir_reason::DROP_NO_SERVICE_BACKEND.0 {
            count_service_connection(self.frontend_service(dst, d.proto).as_deref(), "refused");
        }
        let ends = ((src.ip(), src.port()), (dst.ip(), dst.port()));
        self.push_drop("drop", d.ts, reason, d.proto, ends);
    }

    /// A drop's record (between `(address, port)` ends): its direction from where the pods
    /// are.
    fn push_drop(
        &mut self,
        event: &str,
        ts: u64,
        (reason, reason_text): (String, String),
        proto: u8,
        (src, dst): ((IpAddr, u16), (IpAddr, u16)),
    ) {
        let (source, destination) = (self.end(src.0, src.1, 0), self.end(dst.0, dst.1, 0));
        let direction = Self::direction_of(&source, &destination);
        let frontend = std::net::SocketAddr::new(dst.0, dst.1);
        let service = self
            .service_of(&destination, proto)
            .or_else(|| self.frontend_service(frontend, proto));
        let rec = FlowRecord {
            seq: self.next_seq,
            time: wall_time(ts),
            node: self.node.clone(),
            event: event.into(),
            verdict: "dropped".into(),
            reason,
            reason_text,
            direction: direction.into(),
            protocol: protocol_name(proto),
            service,
            policies: Vec::new(),
            source,
            destination,
            detail: FlowDetail::default(),
        };
        self.append(rec);
    }

    /// The Service of frontend `addr` (a node port's under the unspecified address).
    fn frontend_service(&self, addr: std::net::SocketAddr, proto: u8) -> Option<String> {
        let any: IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        self.frontends
            .get(&(addr.ip(), addr.port(), proto))
            .or_else(|| self.frontends.get(&(any, addr.port(), proto)))
            .cloned()
    }

    /// Where a flow between `source` and `destination` stands: `ingress` into a local pod,
    /// `egress` out of one, else `node`.
    fn direction_of(source: &FlowEnd, destination: &FlowEnd) -> &'static str {
        if destination.pod.is_some() {
            "ingress"
        } else if source.pod.is_some() {
            "egress"
        } else {
            "node"
        }
    }

    /// Records one forwarding summary of the tc or XDP programs.
    pub fn push_trace(&mut self, t: &TraceEvent) {
        let source = self.end(t.src.ip(), t.src.port(), 0);
        let destination = self.end(t.dst.ip(), t.dst.port(), 0);
        let reply = t.flags & TRACE_F_REPLY != 0;
        // The Service: a translated request's original destination, a reply's new source,
        // else the Service whose backend the destination is.
        let service = match t.orig {
            Some((_, d)) if !reply => self.frontend_service(d, t.proto),
            Some(_) => self.frontend_service(t.src, t.proto),
            None => self.service_of(&destination, t.proto),
        };
        let code = t.reason as u8;
        let flags = tcp_flag_names(t.tcp_flags);
        if t.proto == 6 {
            count_tcp_flags(t.tcp_flags, t.src.is_ipv4());
        }
        if t.flags & TRACE_F_NEW != 0 && t.orig.is_some() && !reply {
            count_service_connection(service.as_deref(), "translated");
        }
        let rec = FlowRecord {
            seq: self.next_seq,
            time: wall_time(t.ts),
            node: self.node.clone(),
            event: "trace".into(),
            verdict: "forwarded".into(),
            reason: reason_name(code),
            reason_text: reason_description(code),
            direction: Self::direction_of(&source, &destination).into(),
            protocol: protocol_name(t.proto),
            service,
            policies: Vec::new(),
            source,
            destination,
            detail: FlowDetail {
                translation: t.orig.map(|(s, d)| Translation {
                    point: "packet".into(),
                    source: s.to_string(),
                    destination: d.to_string(),
                }),
                packets: Some(t.packets),
                bytes: Some(t.bytes),
                tcp_flags: flags,
                is_reply: (t.orig.is_some() || t.proto == 6).then_some(reply),
                interface: Some(t.ifindex),
            },
        };
        self.append(rec);
    }

    /// Records one translation (or refusal) of the socket layer: the client is the pod
    /// whose network namespace the socket is in.
    pub fn push_sock(&mut self, e: &SockEvent) {
        let client = self.netns_pods.get(&e.netns).and_then(|(_, ips)| {
            ips.iter()
                .find(|ip| ip.is_ipv4() == e.vip.is_ipv4())
                .copied()
        });
        let unspecified: IpAddr = if e.vip.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let source = self.end(client.unwrap_or(unspecified), 0, 0);
        let to = e.backend.unwrap_or(e.vip);
        let destination = self.end(to.ip(), to.port(), 0);
        let service = self.frontend_service(e.vip, e.proto);
        let point = sock_point_name(e.point);
        let (verdict, reason, text) = if e.reason != 0 {
            count_service_connection(service.as_deref(), "refused");
            let code = e.reason as u8;
            ("dropped", reason_name(code), reason_description(code))
        } else {
            if e.point != weir_bpf::events::SOCK_XLATE_RECVMSG {
                count_service_connection(service.as_deref(), "translated");
            }
            let text = format!(
                "{point}() to {} was given backend {to} at the socket layer",
                service.as_deref().unwrap_or("a Service")
            );
            (
                "translated",
                format!("XLATE_{}", point.to_ascii_uppercase()),
                text,
            )
        };
        let rec = FlowRecord {
            seq: self.next_seq,
            time: wall_time(e.ts),
            node: self.node.clone(),
            event: "trace-sock".into(),
            verdict: verdict.into(),
            reason,
            reason_text: text,
            direction: "egress".into(),
            protocol: protocol_name(e.proto),
            service,
            policies: Vec::new(),
            source,
            destination,
            detail: FlowDetail {
                translation: Some(Translation {
                    point: point.into(),
                    source: client
                        .map(|c| format!("{}", std::net::SocketAddr::new(c, 0)))
                        .unwrap_or_default(),
                    destination: e.vip.to_string(),
                }),
                is_reply: Some(e.point == weir_bpf::events::SOCK_XLATE_RECVMSG),
                ..Default::default()
            },
        };
        self.append(rec);
    }

    fn append(&mut self, rec: FlowRecord) {
        crate::metrics::METRICS
            .flows
            .get_or_create(&vec![
                ("event", rec.event.clone()),
                ("verdict", rec.verdict.clone()),
                ("reason", rec.reason.clone()),
                ("direction", rec.direction.clone()),
            ])
            .inc();
        self.next_seq += 1;
        if self.records.len() == CAPACITY {
            self.records.pop_front();
        }
        self.records.push_back(rec);
    }

    /// The records after `since`.
    pub fn since(&self, since: u64) -> FlowPage {
        let first = self.records.front().map(|r| r.seq).unwrap_or(self.next_seq);
        FlowPage {
            next: self.next_seq - 1,
            lost: first.saturating_sub(since + 1),
            events_lost: 0,
            flows: self
                .records
                .iter()
                .filter(|r| r.seq > since)
                .cloned()
                .collect(),
        }
    }
}

/// Counts a forwarded TCP packet's flags in `weir_tcp_flags_total` as Hubble does (`SYN`,
/// `SYN-ACK`, `FIN`, `RST`), by address family.
fn count_tcp_flags(f: u8, v4: bool) {
    let family = if v4 { "ipv4" } else { "ipv6" };
    let mut flags = Vec::new();
    if f & 0x02 != 0 {
        flags.push(if f & 0x10 != 0 { "SYN-ACK" } else { "SYN" });
    }
    if f & 0x01 != 0 {
        flags.push("FIN");
    }
    if f & 0x04 != 0 {
        flags.push("RST");
    }
    for flag in flags {
        crate::metrics::METRICS
            .tcp_flags
            .get_or_create(&vec![("flag", flag.to_string()), ("family", family.into())])
            .inc();
    }
}

/// Counts a connection to a Service (`translated` to a backend, or `refused`) in
/// `weir_service_connections_total`.
fn count_service_connection(service: Option<&str>, outcome: &str) {
    let Some(service) = service else { return };
    crate::metrics::METRICS
        .service_connections
        .get_or_create(&vec![
            ("service", service.to_string()),
            ("outcome", outcome.to_string()),
        ])
        .inc();
}

/// Starts the thread that drains the ring buffer into `log`.
pub fn spawn(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) -> Result<(), String> {
    crate::ring::spawn(
        "weir-flows",
        "the policy verdict events",
        move || {
            pods.dataplane
                .lock()
                .expect("pods")
                .datapath()
                .events(move |ev| log.lock().expect("flow log").push(ev))
        },
        |rb, wait| rb.poll(wait),
    )
}

/// A kernel drop reason in words: the common ones said, the others spelled out.
pub fn kernel_reason_text(name: &str) -> String {
    let said = match name {
        "NETFILTER_DROP" => "a netfilter rule dropped it",
        "NO_SOCKET" => "no socket was there to take it (nothing listening, or no connection)",
        "IP_OUTNOROUTES" => "no route to send it by",
        "IP_INNOROUTES" | "IP_INADDRERRORS" => "no route for its destination",
        "NEIGH_FAILED" => "its next hop's link-layer address could not be resolved",
        "NEIGH_QUEUEFULL" => "too many packets waited for a next hop's link-layer address",
        "QDISC_DROP" => "the device's queue discipline dropped it (queue full)",
        "CPU_BACKLOG" => "the CPU's input backlog was full",
        "SOCKET_RCVBUFF" => "the socket's receive buffer was full",
        "SOCKET_BACKLOG" => "the socket's backlog was full",
        "TCP_LISTEN_OVERFLOW" => "the listening socket's accept queue was full",
        "PKT_TOO_BIG" => "larger than the path's MTU",
        "IP_RPFILTER" => "reverse path filtering refused its source",
        "OTHERHOST" => "it was not for this host",
        _ => "",
    };
    if !said.is_empty() {
        return said.to_string();
    }
    format!(
        "the kernel: {}",
        name.to_ascii_lowercase().replace('_', " ")
    )
}

/// Starts the thread that drains the drops of weir's programs (other than policy's) into
/// `log` (what their full ring buffer refused is read from the kernel at scrape time:
/// `weir_drop_events_lost_total`).
pub fn spawn_drops(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) -> Result<(), String> {
    crate::ring::spawn(
        "weir-drops",
        "the drop events",
        move || {
            pods.dataplane
                .lock()
                .expect("pods")
                .datapath()
                .drop_events(move |ev| log.lock().expect("flow log").push_drop_event(ev))
        },
        |rb, wait| rb.poll(wait),
    )
}

/// Starts the thread that drains the forwarding summaries of the tc and XDP programs into
/// `log` (what their full ring buffer refused is read from the kernel at scrape time:
/// `weir_trace_events_lost_total`).
pub fn spawn_traces(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) -> Result<(), String> {
    crate::ring::spawn(
        "weir-traces",
        "the forwarding summaries",
        move || {
            pods.dataplane
                .lock()
                .expect("pods")
                .datapath()
                .trace_events(move |ev| log.lock().expect("flow log").push_trace(ev))
        },
        |rb, wait| rb.poll(wait),
    )
}

/// Starts the thread that drains the socket layer's translations (the ring buffer pinned at
/// `path`) into `log`, naming the client pods by their network namespace's cookie (from the
/// endpoint records in `endpoint_dir`, read again when a cookie is not known).
pub fn spawn_sock_events(
    path: std::path::PathBuf,
    endpoint_dir: std::path::PathBuf,
    log: Arc<Mutex<FlowLog>>,
) -> Result<(), String> {
    crate::ring::spawn(
        "weir-sock-events",
        "the socket layer's translations",
        move || {
            let mut last_read: Option<std::time::Instant> = None;
            weir_bpf::events::watch_sock_events(&path, move |ev| {
                let mut log = log.lock().expect("flow log");
                let due =
                    last_read.is_none_or(|t| t.elapsed() > std::time::Duration::from_millis(500));
                if !log.netns_pods.contains_key(&ev.netns) && due {
                    log.netns_pods = netns_pods(&endpoint_dir);
                    last_read = Some(std::time::Instant::now());
                }
                log.push_sock(ev)
            })
        },
        |rb, wait| rb.poll(wait),
    )
}

/// The pods of the endpoint records in `dir` by their network namespace's cookie.
fn netns_pods(dir: &std::path::Path) -> HashMap<u64, (String, Vec<IpAddr>)> {
    let (records, _) = weir_model::endpoint::EndpointRecord::read_dir(dir);
    records
        .into_iter()
        .filter(|r| r.netns_cookie != 0 && !r.pod.is_empty())
        .map(|r| (r.netns_cookie, (r.pod, r.ips)))
        .collect()
}

/// Starts the thread that drains the kernel's drops in the node's network namespace into
/// `log`, and keeps `weir_kernel_drops_total` (the kernel's per-reason counts) and
/// `weir_kernel_drop_events_lost_total` up to date. A kernel without drop reasons or BTF
/// leaves a warning, not a failure.
pub fn spawn_kernel_drops(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) {
    let ns = pods
        .config
        .netns
        .clone()
        .unwrap_or_else(|| "/proc/self/ns/net".into());
    let opened = crate::ring::spawn(
        "weir-kdrops",
        "the kernel's drop events",
        move || -> Result<KernelDropReader, String> {
            let inum = weir_bpf::kdrop::netns_inum(&ns).map_err(|e| e.to_string())?;
            let drops = KernelDrops::load(inum).map_err(|e| e.to_string())?;
            let rb = drops
                .events(move |d| log.lock().expect("flow log").push_kernel_drop(&d))
                .map_err(|e| e.to_string())?;
            Ok(KernelDropReader {
                drops,
                rb,
                seen: Mutex::default(),
            })
        },
        |r, wait| {
            r.rb.poll(wait)?;
            r.count();
            Ok::<(), weir_bpf::LibbpfError>(())
        },
    );
    if let Err(e) = opened {
        tracing::warn!(error = %e, "the kernel's drops are not observed");
    }
}

/// The kernel drop program, its event reader, and the counts last turned into metrics.
struct KernelDropReader {
    drops: KernelDrops,
    rb: weir_bpf::RingBuffer<'static>,
    seen: Mutex<HashMap<(bool, String), u64>>,
}

impl KernelDropReader {
    /// Adds what the kernel counted since the last time to the metrics.
    fn count(&self) {
        let mut seen = self.seen.lock().expect("kernel drop counts");
        for (lost, counts) in [(false, self.drops.counts()), (true, self.drops.lost())] {
            let Ok(counts) = counts else { continue };
            for (reason, n) in counts {
                let before = seen.insert((lost, reason.clone()), n).unwrap_or(0);
                let family = if lost {
                    &crate::metrics::METRICS.kernel_drop_events_lost
                } else {
                    &crate::metrics::METRICS.kernel_drops
                };
                family
                    .get_or_create(&vec![("reason", reason)])
                    .inc_by(n.saturating_sub(before));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(reason: u32) -> flow_event {
        flow_event {
            family: weir_bpf::datapath::AF_INET,
            proto: 6,
            saddr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            daddr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            reason,
            src_identity: 256,
            dst_identity: 2,
            ..Default::default()
        }
    }

    #[test]
    fn the_log_names_pods_pages_by_sequence_and_counts_what_it_lost() {
        let mut log = FlowLog::new("n1");
        log.pod_names
            .insert("10.0.0.1".parse().unwrap(), "x/a".into());
        log.push(&ev(weir_reason::DROP_POLICY_DENIED.0));
        let p = log.since(0);
        assert_eq!((p.next, p.lost, p.flows.len()), (1, 0, 1));
        let r = &p.flows[0];
        assert_eq!(r.verdict, "dropped");
        assert_eq!(r.reason, "DROP_POLICY_DENIED");
        assert_eq!(r.protocol, "tcp");
        assert_eq!(r.source.pod.as_deref(), Some("x/a"));
        assert_eq!(r.source.port, 40000);
        assert_eq!(r.source.identity_kind, "pod");
        assert_eq!(r.destination.ip.to_string(), "10.0.0.2");
        assert_eq!((r.destination.port, r.destination.pod.clone()), (80, None));
        assert_eq!(r.destination.identity_kind, "world");
        for _ in 0..CAPACITY + 9 {
            log.push(&ev(weir_reason::REASON_POLICY_ALLOWED.0));
        }
        let p = log.since(0);
        assert_eq!(p.flows.len(), CAPACITY);
        assert_eq!(p.lost, 10);
        assert_eq!(p.flows[0].verdict, "allowed");
        let tail = log.since(p.next - 2);
        assert_eq!((tail.lost, tail.flows.len()), (0, 2));
        assert!(log.since(p.next).flows.is_empty());
    }

    #[test]
    fn denials_name_the_policies_isolating_the_pod() {
        let mut log = FlowLog::new("n1");
        log.pod_names
            .insert("10.0.0.2".parse().unwrap(), "x/b".into());
        log.isolating.insert(
            "x/b".into(),
            (
                vec!["x/closed".into(), "x/web".into()],
                vec!["x/out".into()],
            ),
        );
        let mut e = ev(weir_reason::DROP_POLICY_DENIED.0);
        log.push(&e);
        e.dir = weir_bpf::datapath::POLICY_EGRESS;
        log.push(&e);
        log.push(&ev(weir_reason::REASON_POLICY_ALLOWED.0));
        let p = log.since(0);
        assert_eq!(p.flows[0].policies, vec!["x/closed", "x/web"]);
        // Egress judged at the source, which no policy isolates here.
        assert!(p.flows[1].policies.is_empty());
        assert!(p.flows[2].policies.is_empty());
    }

    #[test]
    fn drops_of_weirs_programs_are_logged_with_the_reason_in_words() {
        let mut log = FlowLog::new("n1");
        log.pod_names
            .insert("10.244.1.5".parse().unwrap(), "x/a".into());
        log.services
            .insert(("10.244.1.5".parse().unwrap(), 8080, 6), "x/web".into());
        log.push_drop_event(&DropEvent {
            ts: 0,
            reason: weir_reason::DROP_NO_ROUTE.0,
            dir: 0,
            ifindex: 2,
            proto: 6,
            src: Some("172.30.0.2:40000".parse().unwrap()),
            dst: Some("10.244.1.5:8080".parse().unwrap()),
            len: 60,
        });
        let r = &log.since(0).flows[0];
        assert_eq!(
            (r.event.as_str(), r.reason.as_str()),
            ("drop", "DROP_NO_ROUTE")
        );
        assert!(r.reason_text.contains("FIB will not forward"), "{r:?}");
        assert_eq!(r.direction, "ingress");
        assert_eq!(r.service.as_deref(), Some("x/web"));
        assert_eq!(r.destination.namespace.as_deref(), Some("x"));
    }

    #[test]
    fn summaries_and_translations_name_services_pods_and_replies() {
        use weir_bpf::events::{SOCK_XLATE_CONNECT, TRACE_F_XLATE};
        let mut log = FlowLog::new("n1");
        log.pod_names
            .insert("10.244.1.5".parse().unwrap(), "x/web".into());
        log.pod_names
            .insert("10.244.1.9".parse().unwrap(), "x/client".into());
        // A NodePort (under the unspecified address) and a ClusterIP.
        log.frontends
            .insert(("0.0.0.0".parse().unwrap(), 30080, 6), "x/web".into());
        log.frontends
            .insert(("10.96.0.10".parse().unwrap(), 80, 6), "x/web".into());
        let summary = |src: &str, dst: &str, flags: u8, orig: Option<(&str, &str)>| TraceEvent {
            ts: 0,
            reason: weir_reason::REASON_FORWARD_PEER.0,
            dir: 0,
            ifindex: 3,
            proto: 6,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            tcp_flags: 0x02,
            tcp_seen: 0x02,
            packets: 1,
            bytes: 60,
            flags,
            orig: orig.map(|(s, d)| (s.parse().unwrap(), d.parse().unwrap())),
            svc_id: 7,
        };
        log.push_trace(&summary(
            "172.30.0.2:40000",
            "10.244.1.5:8080",
            TRACE_F_NEW | TRACE_F_XLATE,
            Some(("172.30.0.2:40000", "10.1.0.1:30080")),
        ));
        log.push_trace(&summary(
            "10.1.0.1:30080",
            "172.30.0.2:40000",
            TRACE_F_NEW | TRACE_F_XLATE | TRACE_F_REPLY,
            Some(("10.244.1.5:8080", "172.30.0.2:40000")),
        ));
        log.netns_pods
            .insert(99, ("x/client".into(), vec!["10.244.1.9".parse().unwrap()]));
        log.push_sock(&SockEvent {
            ts: 0,
            cookie: 1,
            netns: 99,
            point: SOCK_XLATE_CONNECT,
            proto: 6,
            vip: "10.96.0.10:80".parse().unwrap(),
            backend: Some("10.244.1.5:8080".parse().unwrap()),
            svc_id: 7,
            reason: 0,
        });
        let flows = log.since(0).flows;
        let (req, rep, sock) = (&flows[0], &flows[1], &flows[2]);
        assert_eq!(
            (req.event.as_str(), req.verdict.as_str()),
            ("trace", "forwarded")
        );
        assert_eq!(
            req.service.as_deref(),
            Some("x/web"),
            "the node port's Service"
        );
        assert_eq!(
            (req.direction.as_str(), req.detail.is_reply),
            ("ingress", Some(false))
        );
        assert_eq!(req.detail.tcp_flags, "SYN");
        let t = req.detail.translation.as_ref().unwrap();
        assert_eq!(
            (t.point.as_str(), t.destination.as_str()),
            ("packet", "10.1.0.1:30080")
        );
        assert_eq!(
            rep.service.as_deref(),
            Some("x/web"),
            "a reply's source is the frontend"
        );
        assert_eq!(rep.detail.is_reply, Some(true));
        assert_eq!(
            (sock.event.as_str(), sock.verdict.as_str()),
            ("trace-sock", "translated")
        );
        assert_eq!(sock.reason, "XLATE_CONNECT");
        assert_eq!(sock.source.pod.as_deref(), Some("x/client"));
        assert_eq!(sock.destination.pod.as_deref(), Some("x/web"));
        assert_eq!(sock.service.as_deref(), Some("x/web"));
        assert!(
            sock.reason_text.contains("backend 10.244.1.5:8080"),
            "{sock:?}"
        );
    }

    #[test]
    fn workloads_are_deployments_owners_or_the_pod() {
        let pod = |owner: Option<(&str, &str)>, hash: Option<&str>| {
            serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(serde_json::json!({
                "metadata": {
                    "name": "web-7d9f8c6b5-x2x7k",
                    "labels": hash.map(|h| serde_json::json!({"pod-template-hash": h})),
                    "ownerReferences": owner.map(|(kind, name)| vec![serde_json::json!({
                        "apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u",
                        "controller": true,
                    })]),
                }
            }))
            .unwrap()
        };
        let rs = Some(("ReplicaSet", "web-7d9f8c6b5"));
        assert_eq!(workload_of(&pod(rs, Some("7d9f8c6b5"))), "web");
        assert_eq!(workload_of(&pod(rs, None)), "web-7d9f8c6b5");
        assert_eq!(workload_of(&pod(Some(("StatefulSet", "db")), None)), "db");
        assert_eq!(workload_of(&pod(None, None)), "web-7d9f8c6b5-x2x7k");
    }

    #[test]
    fn kernel_drops_are_logged_with_the_pod_they_concern() {
        let mut log = FlowLog::new("n1");
        log.pod_names
            .insert("10.244.1.5".parse().unwrap(), "x/a".into());
        let drop = |src: &str, dst: &str| KernelDrop {
            ts: 0,
            reason: "NETFILTER_DROP".into(),
            ifindex: 3,
            proto: 6,
            src: Some((src.parse().unwrap(), 40000)),
            dst: Some((dst.parse().unwrap(), 8080)),
        };
        log.push_kernel_drop(&drop("172.30.0.2", "10.244.1.5"));
        log.push_kernel_drop(&drop("10.244.1.5", "172.30.0.2"));
        log.push_kernel_drop(&drop("172.30.0.2", "172.30.0.11"));
        // A tc program's drop (weir's own, which reports it itself): not logged.
        log.push_kernel_drop(&KernelDrop {
            reason: "TC_INGRESS".into(),
            ..drop("172.30.0.2", "10.244.1.5")
        });
        // Not IP (an ARP frame): counted in the metrics, not logged.
        log.push_kernel_drop(&KernelDrop {
            src: None,
            dst: None,
            ..drop("0.0.0.0", "0.0.0.0")
        });
        let p = log.since(0);
        let got: Vec<(&str, String, Option<&str>)> = p
            .flows
            .iter()
            .map(|r| {
                assert_eq!(
                    (r.event.as_str(), r.verdict.as_str()),
                    ("kernel-drop", "dropped")
                );
                assert_eq!(
                    (r.reason.as_str(), r.protocol.as_str()),
                    ("NETFILTER_DROP", "tcp")
                );
                (
                    r.direction.as_str(),
                    r.source.ip.to_string(),
                    r.destination.pod.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("ingress", "172.30.0.2".to_string(), Some("x/a")),
                ("egress", "10.244.1.5".to_string(), None),
                ("node", "172.30.0.2".to_string(), None),
            ]
        );
    }
}
