//! Policy verdict events for `weir observe`: a thread drains the datapath's ring buffer
//! (`weir_events`, one record per judged flow: allowed, or dropped with its reason) into a
//! bounded log, naming the pods behind the addresses as they are when the event arrives.
//! `GET /flows?since=SEQ` hands out what came after `SEQ`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use weir_bpf::datapath::{flow_event, reason_name, weir_reason};

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
    /// `allowed` or `dropped`.
    pub verdict: String,
    /// The datapath's reason (`REASON_POLICY_ALLOWED`, `DROP_POLICY_DENIED`,
    /// `DROP_POLICY_FAILED`).
    pub reason: String,
    /// Which pod's policy decided: `ingress` (the destination's) or `egress` (the source's).
    pub direction: String,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    /// The original source (before any SNAT).
    pub source: FlowEnd,
    /// The real destination (after a Service's DNAT).
    pub destination: FlowEnd,
}

/// The log and the names it gives to addresses.
pub struct FlowLog {
    node: String,
    next_seq: u64,
    records: VecDeque<FlowRecord>,
    /// Pod addresses -> `namespace/name` (kept by the policy loop).
    pub pod_names: HashMap<IpAddr, String>,
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
        }
    }

    /// Records one event from the datapath.
    pub fn push(&mut self, ev: &flow_event) {
        let end = |words: &[u32; 4], port: u16, identity: u32| {
            let ip = weir_bpf::ip_from_words(ev.family, *words);
            FlowEnd {
                ip,
                port: u16::from_be(port),
                pod: self.pod_names.get(&ip).cloned(),
                identity,
                identity_kind: identity_kind(identity).into(),
            }
        };
        let allowed = ev.reason == weir_reason::REASON_POLICY_ALLOWED.0;
        let direction = if ev.dir == weir_bpf::datapath::POLICY_EGRESS {
            "egress"
        } else {
            "ingress"
        };
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
        let rec = FlowRecord {
            seq: self.next_seq,
            time: wall_time(ev.ts),
            node: self.node.clone(),
            verdict: if ev.reason == weir_reason::REASON_POLICY_ALLOWED.0 {
                "allowed".into()
            } else {
                "dropped".into()
            },
            reason: reason_name(ev.reason as u8),
            direction: if ev.dir == weir_bpf::datapath::POLICY_EGRESS {
                "egress".into()
            } else {
                "ingress".into()
            },
            protocol: protocol_name(ev.proto),
            source: end(&ev.saddr, ev.sport, ev.src_identity),
            destination: end(&ev.daddr, ev.dport, ev.dst_identity),
        };
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
}
