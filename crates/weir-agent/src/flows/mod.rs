//! Flows for `weir observe` and `weir ui`: reader threads drain the datapath's rings (policy
//! verdicts `weir_events`; drops of weir's programs `weir_drop_events`; forwarding summaries
//! of the tc and XDP programs `weir_trace_events` and `_1` to `_3` (a ring per CPU modulo
//! four, read together by [`SummaryReader`]); the socket layer's translations
//! `weir_sock_events`; the kernel's drops in the node's network namespace and the local
//! pods', `weir_bpf::kdrop`) into a bounded log ([`FlowLog`]), naming the pods behind the
//! addresses as they are when the event arrives. `GET /flows?since=SEQ` hands out what came
//! after `SEQ`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use weir_bpf::kdrop::KernelDrops;

use crate::pods::Pods;

mod log;
mod summaries;
pub use log::{FlowLog, MetricsContext};
pub use summaries::SummaryReader;

/// The boot clock now, nanoseconds (the clock of the datapath's event stamps).
pub fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// How many records the log keeps (about 250 bytes each: events are kept as they came).
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
    /// is, else `node` (a kernel drop in a local pod's own namespace: `egress` when the pod
    /// sent the packet, `ingress` when it was for it, `egress` with the pod as the source
    /// when neither end is its address, as on its loopback).
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
    /// The NetworkPolicies (`namespace/name`) that decided a policy verdict. A denial: every
    /// policy isolating the pod in the direction judged (none of their rules allowed the
    /// flow). An allowed flow: the policies of the entries that allowed it, the source pod's
    /// egress ones first, then the destination pod's ingress ones (none where the pod is
    /// not isolated, or for the node's own traffic to its pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// A policy verdict's kind of match in `direction` (as Hubble names them): `l3-only` (a
    /// peer, every port), `l3-l4` (a peer and ports), `l4-only` (ports of any peer), `all`,
    /// or `none` (a denial, or the node's own traffic). The kind of the first entry found,
    /// in the datapath's order: any peer, the peer's identity, its namespace class or the
    /// cluster, its CIDR (so `l4-only` where an `l3-l4` rule allows the flow too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_match: Option<String>,
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
    /// What a pod's client sockets went through with one peer (`tcp-health`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpStats>,
}

/// TCP health of a pod's client sockets towards one peer over a period (`tcp-health`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpStats {
    /// The seconds the counts cover.
    pub period_seconds: u64,
    /// Connects that reached ESTABLISHED.
    pub connects: u64,
    /// Connects that failed (SYN_SENT to CLOSE: refused, timed out).
    pub connect_failures: u64,
    /// Segments retransmitted (SYNs included).
    pub retransmits: u64,
    /// Resets sent.
    pub resets_sent: u64,
    /// Resets received.
    pub resets_received: u64,
    /// The established connects' mean SYN-to-ESTABLISHED time, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_us: Option<u64>,
    /// The mean smoothed RTT of the connections that closed, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
    /// How many connections the mean RTT is of.
    #[serde(default)]
    pub rtt_samples: u64,
}

impl TcpStats {
    /// The stats of counters accumulated over `period_seconds`.
    pub fn of(c: &weir_bpf::tcp_health::tcp_counters, period_seconds: u64) -> TcpStats {
        TcpStats {
            period_seconds,
            connects: c.connects,
            connect_failures: c.connect_failures,
            retransmits: c.retransmits,
            resets_sent: c.resets_sent,
            resets_received: c.resets_received,
            connect_us: (c.connects > 0).then(|| c.connect_ns / c.connects / 1000),
            rtt_us: (c.rtt_samples > 0).then(|| c.rtt_us / c.rtt_samples),
            rtt_samples: c.rtt_samples,
        }
    }

    /// Whether anything went wrong: a failed connect, a reset or a retransmit.
    pub fn troubled(&self) -> bool {
        self.connect_failures + self.resets_sent + self.resets_received + self.retransmits > 0
    }

    /// The counts in words (`2 connects (1 failed), 3 retransmits, mean RTT 120 us`).
    pub fn text(&self) -> String {
        let mut parts = vec![format!(
            "{} connect{}{}",
            self.connects + self.connect_failures,
            if self.connects + self.connect_failures == 1 {
                ""
            } else {
                "s"
            },
            if self.connect_failures > 0 {
                format!(" ({} failed)", self.connect_failures)
            } else {
                String::new()
            }
        )];
        for (n, one, many) in [
            (self.retransmits, "retransmit", "retransmits"),
            (self.resets_sent, "reset sent", "resets sent"),
            (self.resets_received, "reset received", "resets received"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {}", if n == 1 { one } else { many }));
            }
        }
        if let Some(us) = self.connect_us {
            parts.push(format!("mean connect time {us} us"));
        }
        if let Some(us) = self.rtt_us {
            parts.push(format!("mean smoothed RTT {us} us"));
        }
        format!("{} in {} s", parts.join(", "), self.period_seconds)
    }
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

fn policy_verdict() -> String {
    "policy-verdict".into()
}

/// What the log knows of a pod besides its addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    /// Its workload (see [`workload_of`]).
    pub workload: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
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

/// Starts thread `name`, which drains rings of the node's datapath with the reader `open`
/// makes (its callback into the flow log), `poll` a round at a time.
fn spawn_datapath_ring<R, O, P, E>(
    name: &str,
    what: &'static str,
    pods: Arc<Pods>,
    open: O,
    poll: P,
) -> Result<(), String>
where
    O: FnOnce(&weir_bpf::datapath::Datapath) -> Result<R, weir_bpf::BpfError> + Send + 'static,
    P: Fn(&R, std::time::Duration) -> Result<(), E> + Send + 'static,
    E: std::fmt::Display,
{
    crate::ring::spawn(
        name,
        what,
        move || open(pods.dataplane.lock().expect("pods").datapath()),
        poll,
    )
}

/// Starts the thread that drains the policy verdicts into `log`.
pub fn spawn(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) -> Result<(), String> {
    spawn_datapath_ring(
        "weir-flows",
        "the policy verdict events",
        pods,
        move |dp| dp.events(move |ev| log.lock().expect("flow log").push(ev)),
        crate::ring::drain,
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
        "QUEUE_PURGE" => {
            "a queue was emptied with it (a socket closed with data unread, a device or \
             neighbour flushed)"
        }
        "TCP_CLOSE" => "it came for a TCP connection already closed",
        "SOCKET_CLOSE" => "its socket was closed",
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
    spawn_datapath_ring(
        "weir-drops",
        "the drop events",
        pods,
        move |dp| dp.drop_events(move |ev| log.lock().expect("flow log").push_drop_event(ev)),
        crate::ring::drain,
    )
}

/// Starts the thread that drains the forwarding summaries of the tc and XDP programs into
/// `log` (what their full ring buffers refused is read from the kernel at scrape time:
/// `weir_trace_events_lost_total`).
pub fn spawn_traces(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) -> Result<(), String> {
    spawn_datapath_ring(
        "weir-traces",
        "the forwarding summaries",
        pods,
        move |dp| SummaryReader::open(dp, log),
        SummaryReader::drain,
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
        crate::ring::drain,
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

/// Starts the thread that drains the kernel's drops in the node's network namespace and the
/// local pods' into `log`, and keeps `weir_kernel_drops_total` (the kernel's per-reason
/// counts) and `weir_kernel_drop_events_lost_total` up to date. A kernel without drop
/// reasons or BTF leaves a warning, not a failure.
pub fn spawn_kernel_drops(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) {
    let ns = pods
        .config
        .netns
        .clone()
        .unwrap_or_else(|| "/proc/self/ns/net".into());
    let endpoint_dir = pods.config.endpoint_dir.clone();
    let opened = crate::ring::spawn(
        "weir-kdrops",
        "the kernel's drop events",
        move || -> Result<KernelDropReader, String> {
            let inum = weir_bpf::kdrop::netns_inum(&ns).map_err(|e| e.to_string())?;
            let drops = KernelDrops::load(inum).map_err(|e| e.to_string())?;
            let events_log = log.clone();
            let rb = drops
                .events(move |d| events_log.lock().expect("flow log").push_kernel_drop(&d))
                .map_err(|e| e.to_string())?;
            Ok(KernelDropReader {
                drops,
                rb,
                seen: Mutex::default(),
                pods: Mutex::new(WatchedPods {
                    endpoint_dir,
                    node: inum,
                    log,
                    inums: BTreeMap::new(),
                    failed: Default::default(),
                    synced: None,
                }),
            })
        },
        |r, wait| {
            // Drained first: a pod gone meanwhile is still known to its last drops.
            crate::ring::drain(&r.rb, wait)?;
            r.count();
            r.pods.lock().expect("watched pods").sync(&r.drops);
            Ok::<(), weir_bpf::LibbpfError>(())
        },
    );
    if let Err(e) = opened {
        tracing::warn!(error = %e, "the kernel's drops are not observed");
    }
}

/// The kernel drop program, its event reader, the counts last turned into metrics, and the
/// pods whose namespaces it watches.
struct KernelDropReader {
    drops: KernelDrops,
    rb: weir_bpf::RingBuffer<'static>,
    seen: Mutex<HashMap<(bool, String), u64>>,
    pods: Mutex<WatchedPods>,
}

/// The local pods' network namespaces the kernel drop program watches, besides the node's:
/// those of the endpoint records, read again at most every `NEW_PODS_PERIOD` (as TCP health
/// reads them).
struct WatchedPods {
    endpoint_dir: std::path::PathBuf,
    node: u32,
    /// Where the watched pods' addresses go (`FlowLog::kdrop_pods`).
    log: Arc<Mutex<FlowLog>>,
    /// Watched: inode -> the pod's addresses.
    inums: BTreeMap<u32, Vec<IpAddr>>,
    /// Those that could not be watched (warned of once).
    failed: std::collections::BTreeSet<u32>,
    synced: Option<std::time::Instant>,
}

impl WatchedPods {
    /// Watches the namespaces of pods come since the last time, and no more those of pods
    /// gone (their drops counted so far stay counted); the log learns their addresses.
    fn sync(&mut self, drops: &KernelDrops) {
        if self
            .synced
            .is_some_and(|t| t.elapsed() < crate::tcp_health::NEW_PODS_PERIOD)
        {
            return;
        }
        self.synced = Some(std::time::Instant::now());
        // A directory not there says nothing of the pods: all stay watched.
        if !self.endpoint_dir.is_dir() {
            return;
        }
        let (records, bad) = weir_model::endpoint::EndpointRecord::read_dir(&self.endpoint_dir);
        let live: BTreeMap<u32, Vec<IpAddr>> = crate::tcp_health::live_pods(&records)
            .into_values()
            .map(|r| (r.netns_inode as u32, r.ips.clone()))
            .filter(|(i, _)| *i != self.node)
            .collect();
        self.failed.retain(|i| live.contains_key(i));
        let before = self.inums.clone();
        // A record that does not parse may be a live pod's: nothing is unwatched then.
        if bad.is_empty() {
            for gone in self.inums.keys().filter(|i| !live.contains_key(i)) {
                drops.unwatch(*gone);
            }
            self.inums.retain(|i, _| live.contains_key(i));
        }
        for (inum, ips) in live {
            if let Some(had) = self.inums.get_mut(&inum) {
                *had = ips; // watched already: its addresses may have changed
                continue;
            }
            match drops.watch(inum) {
                Ok(()) => {
                    self.failed.remove(&inum);
                    self.inums.insert(inum, ips);
                }
                Err(e) if self.failed.insert(inum) => {
                    tracing::warn!(error = %e, inum, "watching a pod's kernel drops")
                }
                Err(_) => {}
            }
        }
        if self.inums != before {
            self.log.lock().expect("flow log").kdrop_pods =
                self.inums.clone().into_iter().collect();
        }
    }
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
    use weir_bpf::datapath::{flow_event, weir_reason, DropEvent};
    use weir_bpf::events::{SockEvent, TraceEvent, TRACE_F_NEW, TRACE_F_REPLY};
    use weir_bpf::kdrop::KernelDrop;

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
        // The last few alone: the newest, in order.
        let last = log.since_last(0, Some(3));
        assert_eq!(last.flows.len(), 3);
        assert_eq!(last.flows[2].seq, p.next);
        assert_eq!(log.since_last(p.next - 1, Some(3)).flows.len(), 1);
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

    /// An allowed flow names the policies of the entries that allowed it (egress, then
    /// ingress), resolved when it came: a later policy change does not rename it.
    #[test]
    fn allowed_flows_name_the_policies_of_the_entries_that_allowed_them() {
        use weir_bpf::datapath::{POLICY_EGRESS, POLICY_INGRESS};
        let mut log = FlowLog::new("n1");
        log.set_origins(&BTreeMap::from([
            (3, vec!["x/out".to_string()]),
            (4, vec!["x/web".to_string(), "x/out".to_string()]),
        ]));
        let mut e = ev(weir_reason::REASON_POLICY_ALLOWED.0);
        e.dir = POLICY_INGRESS;
        e.judged = (1 << POLICY_EGRESS) | (1 << POLICY_INGRESS);
        e.origin[usize::from(POLICY_EGRESS)] = 3;
        e.origin[usize::from(POLICY_INGRESS)] = 4;
        e.r#match[usize::from(POLICY_EGRESS)] = 3;
        e.r#match[usize::from(POLICY_INGRESS)] = 2;
        log.push(&e);
        log.set_origins(&BTreeMap::new());
        let r = &log.since(0).flows[0];
        assert_eq!(r.policies, vec!["x/out", "x/web"]);
        // A verdict made on an entry not rewritten yet still names its retired origin.
        log.push(&e);
        assert_eq!(log.since(1).flows[0].policies, vec!["x/out", "x/web"]);
        assert_eq!(r.policy_match.as_deref(), Some("l3-l4"));
        // Denied at egress: the match is none, the policies those isolating the source.
        let mut d = ev(weir_reason::DROP_POLICY_DENIED.0);
        d.dir = POLICY_EGRESS;
        d.judged = 1 << POLICY_EGRESS;
        log.push(&d);
        let r = &log.since(2).flows[0];
        assert_eq!(r.policy_match.as_deref(), Some("none"));
    }

    /// A pod's client sockets' TCP health towards a backend is a `tcp-health` record naming
    /// the Service, with the counts in words.
    #[test]
    fn tcp_health_records_name_the_peers_service() {
        let mut log = FlowLog::new("n1");
        log.pod_names
            .insert("10.0.0.1".parse().unwrap(), "x/client".into());
        log.pod_names
            .insert("10.0.0.2".parse().unwrap(), "x/web-1".into());
        log.services
            .insert(("10.0.0.2".parse().unwrap(), 8080, 6), "x/web".into());
        let c = weir_bpf::tcp_health::tcp_counters {
            connects: 2,
            connect_failures: 1,
            connect_ns: 200_000,
            retransmits: 3,
            rtt_us: 90,
            rtt_samples: 2,
            ..Default::default()
        };
        log.push_tcp_health(
            0,
            "10.0.0.1".parse().unwrap(),
            ("10.0.0.2:8080".parse().unwrap(), None),
            TcpStats::of(&c, 3),
        );
        let r = &log.since(0).flows[0];
        assert_eq!(
            (r.event.as_str(), r.verdict.as_str()),
            ("tcp-health", "traced")
        );
        assert_eq!(r.service.as_deref(), Some("x/web"));
        assert_eq!(r.source.pod.as_deref(), Some("x/client"));
        assert_eq!(r.destination.port, 8080);
        let t = r.detail.tcp.as_ref().unwrap();
        assert_eq!((t.connect_us, t.rtt_us), (Some(100), Some(45)));
        // A Service's TCP health series go with it.
        let labels = crate::metrics::service_labels("x/web-gone");
        let retransmits = &crate::metrics::METRICS.service_tcp.retransmits;
        retransmits.get_or_create(&labels).inc();
        log.tcp_services.insert("x/web-gone".into());
        log.set_services(HashMap::new(), HashMap::new());
        assert!(
            !retransmits.remove(&labels),
            "the series went with the Service"
        );
        assert!(log.tcp_services.is_empty());
        assert!(t.troubled());
        assert_eq!(
            r.reason_text,
            "3 connects (1 failed), 3 retransmits, mean connect time 100 us, mean smoothed RTT 45 us in 3 s"
        );
    }

    /// With a metrics context, `weir_flows_total` names each end's workload, and the series
    /// of a pod gone go with it.
    #[test]
    fn flow_metrics_name_the_ends_when_asked_and_forget_pods_gone() {
        let mut log = FlowLog::new("n1");
        log.set_metrics_context("workload".parse().unwrap());
        let pods = |names: &[(&str, &str)]| {
            let ips = names
                .iter()
                .map(|(ip, pod)| (ip.parse().unwrap(), pod.to_string()))
                .collect();
            let meta = names
                .iter()
                .map(|(_, pod)| {
                    let workload = pod.trim_end_matches("-1").rsplit('/').next().unwrap();
                    (
                        pod.to_string(),
                        PodMeta {
                            workload: workload.to_string(),
                            labels: Default::default(),
                        },
                    )
                })
                .collect();
            (ips, meta)
        };
        let (ips, meta) = pods(&[("10.9.0.1", "ctx/front-1"), ("10.9.0.2", "ctx/back-1")]);
        log.set_pods(ips, meta);
        log.push_drop_event(&no_route("10.9.0.1:40000", "10.9.0.2:8080"));
        let labels = vec![
            ("event", "drop".to_string()),
            ("verdict", "dropped".to_string()),
            ("reason", "DROP_NO_ROUTE".to_string()),
            ("direction", "ingress".to_string()),
            ("source", "ctx/front".to_string()),
            ("destination", "ctx/back".to_string()),
        ];
        let family = &crate::metrics::METRICS.flows;
        assert_eq!(family.get_or_create(&labels).get(), 1);
        // ctx/back's pod went: its series go.
        let (ips, meta) = pods(&[("10.9.0.1", "ctx/front-1")]);
        log.set_pods(ips, meta);
        assert!(!family.remove(&labels), "the series went with the pod");
        assert!("node".parse::<MetricsContext>().is_err());
    }

    #[test]
    fn a_connections_summaries_name_their_pods_both_ways_and_anew_after_the_pods_change() {
        let mut log = FlowLog::new("n1");
        let pods = |a: &str, b: &str| {
            let ips: HashMap<IpAddr, String> = [
                ("10.244.1.5".parse().unwrap(), a.to_string()),
                ("10.244.1.9".parse().unwrap(), b.to_string()),
            ]
            .into();
            (ips, HashMap::new())
        };
        let summary = |src: &str, dst: &str| {
            syn_summary(src, dst, TRACE_F_NEW, None)
                .encode4()
                .expect("IPv4")
        };
        let (request, reply) = (
            summary("10.244.1.9:40000", "10.244.1.5:8080"),
            summary("10.244.1.5:8080", "10.244.1.9:40000"),
        );
        let (ips, meta) = pods("x/web", "x/client");
        log.set_pods(ips, meta);
        log.push_trace_record(&request);
        log.push_trace_record(&reply);
        log.push_trace_record(&request);
        // The pods change: a summary after names the new ones.
        let (ips, meta) = pods("x/web-2", "x/client-2");
        log.set_pods(ips, meta);
        log.push_trace_record(&reply);
        let ends: Vec<(Option<String>, Option<String>)> = log
            .since(0)
            .flows
            .into_iter()
            .map(|f| (f.source.pod, f.destination.pod))
            .collect();
        let named = |s: &str, d: &str| (Some(s.to_string()), Some(d.to_string()));
        assert_eq!(
            ends,
            [
                named("x/client", "x/web"),
                named("x/web", "x/client"),
                named("x/client", "x/web"),
                named("x/web-2", "x/client-2"),
            ]
        );
    }

    /// A forwarding summary of a TCP SYN from `src` to `dst` (`TRACE_F_*` `flags`, and the
    /// addresses before translation).
    fn syn_summary(src: &str, dst: &str, flags: u8, orig: Option<(&str, &str)>) -> TraceEvent {
        TraceEvent {
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
        }
    }

    /// A TCP packet from `src` to `dst` a program dropped for want of a route (ingress).
    fn no_route(src: &str, dst: &str) -> DropEvent {
        DropEvent {
            ts: 0,
            reason: weir_reason::DROP_NO_ROUTE.0,
            dir: 0,
            ifindex: 2,
            proto: 6,
            src: Some(src.parse().unwrap()),
            dst: Some(dst.parse().unwrap()),
            len: 60,
        }
    }

    #[test]
    fn drops_of_weirs_programs_are_logged_with_the_reason_in_words() {
        let mut log = FlowLog::new("n1");
        log.pod_names
            .insert("10.244.1.5".parse().unwrap(), "x/a".into());
        log.services
            .insert(("10.244.1.5".parse().unwrap(), 8080, 6), "x/web".into());
        log.push_drop_event(&no_route("172.30.0.2:40000", "10.244.1.5:8080"));
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
        let summary = syn_summary;
        // The request as the reader pushes it (the program's record), the reply decoded.
        let request = summary(
            "172.30.0.2:40000",
            "10.244.1.5:8080",
            TRACE_F_NEW | TRACE_F_XLATE,
            Some(("172.30.0.2:40000", "10.1.0.1:30080")),
        );
        log.push_trace_record(&request.encode4().expect("IPv4"));
        log.push_trace(summary(
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
            netns: 1,
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
        // In pod x/a's own namespace: from it when it sent it, though the destination is a
        // pod too.
        log.pod_names
            .insert("10.244.1.6".parse().unwrap(), "x/b".into());
        log.kdrop_pods
            .insert(7, vec!["10.244.1.5".parse().unwrap()]);
        log.push_kernel_drop(&KernelDrop {
            netns: 7,
            ..drop("10.244.1.5", "10.244.1.6")
        });
        log.push_kernel_drop(&KernelDrop {
            netns: 7,
            ..drop("10.244.1.6", "10.244.1.5")
        });
        // Its loopback: the pod's own, named as the source.
        log.push_kernel_drop(&KernelDrop {
            netns: 7,
            ..drop("127.0.0.1", "127.0.0.1")
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
                ("egress", "10.244.1.5".to_string(), Some("x/b")),
                ("ingress", "10.244.1.6".to_string(), Some("x/a")),
                ("egress", "127.0.0.1".to_string(), None),
            ]
        );
        let own = p.flows.last().unwrap();
        assert_eq!(own.source.pod.as_deref(), Some("x/a"), "{own:?}");
    }
}
