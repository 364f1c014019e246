//! The agent's Prometheus metrics (the prometheus-client crate; text exposition format), all
//! named `weir_*` with units in the name, labels of bounded cardinality:
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `weir_datapath_packets_total` | counter | `direction`, `reason` | packets the per-packet programs counted, by verdict or drop reason (`weir bpf metrics list`) |
//! | `weir_datapath_bytes_total` | counter | `direction`, `reason` | their bytes |
//! | `weir_drops_total` | counter | `reason` | the same packets where the reason is a drop |
//! | `weir_policy_verdicts_total` | counter | `verdict`, `direction`, `match` | NetworkPolicy verdicts on new flows (`allowed`, `denied`), one per direction judged, by the kind of entry that matched (`l3-only`, `l3-l4`, `l4-only`, `all`, `none`), from the verdict events (those the ring buffer refused are counted as `REASON_EVENT_LOST` packets) |
//! | `weir_kernel_drops_total` | counter | `reason` | packets the kernel dropped in the node's network namespace or a local pod's, outside weir's programs, by the kernel's drop reason (`skb:kfree_skb`) |
//! | `weir_kernel_drop_events_lost_total` | counter | `reason` | of those, the events its full ring buffer refused (still counted above) |
//! | `weir_flows_total` | counter | `event`, `verdict`, `reason`, `direction` | flows the agent logged for `weir observe`: policy verdicts, forwarding summaries (`trace`), socket translations (`trace-sock`), drops of weir's programs, the kernel's drops |
//! | `weir_tcp_flags_total` | counter | `flag`, `family` | TCP flags (`SYN`, `SYN-ACK`, `FIN`, `RST`) of forwarded flows, from the forwarding summaries |
//! | `weir_service_connections_total` | counter | `namespace`, `service`, `outcome` | new connections (and UDP socket/backend pairs) to a Service: `translated` to a backend, or `refused` for want of one |
//! | `weir_trace_events_lost_total`, `weir_sock_events_lost_total` | counter | `reason` / `point` | forwarding summaries and socket translation events their full ring buffers refused |
//! | `weir_drop_events_lost_total` | counter | `reason` | drop events of weir's programs their full ring buffer refused (the drops are counted in `weir_drops_total`) |
//! | `weir_tcp_retransmits_total` | counter | `namespace`, `workload` | TCP segments the node's pods retransmitted (`tcp:tcp_retransmit_skb`) |
//! | `weir_tcp_resets_total` | counter | `namespace`, `workload`, `direction` | resets sent and received |
//! | `weir_tcp_connects_total` | counter | `namespace`, `workload`, `outcome` | connects `established` or `failed` (`sock:inet_sock_set_state`) |
//! | `weir_tcp_connect_seconds_total` | counter | `namespace`, `workload` | established connects' SYN-to-ESTABLISHED time, summed |
//! | `weir_tcp_smoothed_rtt_seconds_total`, `weir_tcp_rtt_samples_total` | counter | `namespace`, `workload` | connections' smoothed RTT as they closed, summed, and how many |
//! | `weir_service_tcp_*` (the six above) | counter | `namespace`, `service` (+ `direction`, `outcome`) | the same, of the node's pods' client sockets towards a Service's backends (what its clients went through) |
//! | `weir_lb_events_total` | counter | `event` | socket load-balancer events (translations, no backend, ...) |
//! | `weir_bpf_map_entries` | gauge | `map` | entries in use in each pinned map (read at most every 15 s) |
//! | `weir_bpf_map_capacity` | gauge | `map` | each map's capacity |
//! | `weir_frontends` | gauge | | Service frontends programmed |
//! | `weir_endpoints` | gauge | | local pod endpoints programmed |
//! | `weir_identities` | gauge | | security identities known |
//! | `weir_datapath_apply_duration_seconds` | histogram | `part` | one apply of the desired state (`services`, `endpoints`, `policy`) |
//! | `weir_datapath_apply_errors_total` | counter | `part` | applies that failed |
//! | `weir_network_programming_duration_seconds` | histogram | | from a Service or EndpointSlice change (its `endpoints.kubernetes.io/last-change-trigger-time`, else when the agent saw it) to the datapath carrying it, as kube-proxy's |
//! | `weir_ready` | gauge | | 1 when /readyz answers 200 |
//! | `weir_build_info` | gauge | `version` | always 1 |
//! | `process_*` | | | the agent's own CPU seconds, resident and virtual memory, open and maximum file descriptors, start time |

use std::sync::{Arc, LazyLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::Shared;

/// A label set: a list of (name, value).
pub type Labels = Vec<(&'static str, String)>;

fn buckets() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The metrics the agent's loops record as they run.
pub struct Metrics {
    /// `weir_datapath_apply_duration_seconds`.
    pub apply_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// `weir_datapath_apply_errors_total`.
    pub apply_errors: Family<Labels, Counter>,
    /// `weir_network_programming_duration_seconds`.
    pub programming: Histogram,
    /// `weir_policy_verdicts_total`.
    pub policy_verdicts: Family<Labels, Counter>,
    /// `weir_kernel_drops_total`.
    pub kernel_drops: Family<Labels, Counter>,
    /// `weir_kernel_drop_events_lost_total`.
    pub kernel_drop_events_lost: Family<Labels, Counter>,
    /// `weir_flows_total`.
    pub flows: Family<Labels, Counter>,
    /// `weir_tcp_flags_total`.
    pub tcp_flags: Family<Labels, Counter>,
    /// `weir_service_connections_total`.
    pub service_connections: Family<Labels, Counter>,
    /// `weir_tcp_*`.
    pub tcp: TcpMetrics,
    /// `weir_service_tcp_*`, labelled by the Service's namespace and name.
    pub service_tcp: TcpMetrics,
}

/// TCP health by namespace and workload (or by Service).
#[derive(Default)]
pub struct TcpMetrics {
    /// `weir_tcp_retransmits_total`.
    pub retransmits: Family<Labels, Counter>,
    /// `weir_tcp_resets_total` (`direction`: sent, received).
    pub resets: Family<Labels, Counter>,
    /// `weir_tcp_connects_total` (`outcome`: established, failed).
    pub connects: Family<Labels, Counter>,
    /// `weir_tcp_connect_seconds_total`.
    pub connect_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// `weir_tcp_smoothed_rtt_seconds_total`.
    pub rtt_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// `weir_tcp_rtt_samples_total`.
    pub rtt_samples: Family<Labels, Counter>,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    apply_duration: Family::new_with_constructor(buckets),
    apply_errors: Family::default(),
    programming: buckets(),
    policy_verdicts: Family::default(),
    kernel_drops: Family::default(),
    kernel_drop_events_lost: Family::default(),
    flows: Family::default(),
    tcp_flags: Family::default(),
    service_connections: Family::default(),
    tcp: TcpMetrics::default(),
    service_tcp: TcpMetrics::default(),
});

/// The labels naming a Service (`namespace/name`): `namespace` and `service`.
pub fn service_labels(service: &str) -> Labels {
    let (ns, name) = service.split_once('/').unwrap_or(("", service));
    vec![("namespace", ns.to_string()), ("service", name.to_string())]
}

/// Records one apply of `part` that took `seconds` and succeeded or not.
pub fn record_apply(part: &'static str, seconds: f64, ok: bool) {
    let l = vec![("part", part.to_string())];
    METRICS.apply_duration.get_or_create(&l).observe(seconds);
    if !ok {
        METRICS.apply_errors.get_or_create(&l).inc();
    }
}

/// The registry served on /metrics: the recorded metrics and what is read at scrape time.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "weir_datapath_apply_duration_seconds",
        "Time one apply of the desired state took, by part (services, endpoints, policy)",
        METRICS.apply_duration.clone(),
    );
    r.register(
        "weir_datapath_apply_errors",
        "Applies of the desired state that failed, by part",
        METRICS.apply_errors.clone(),
    );
    r.register(
        "weir_network_programming_duration_seconds",
        "Time from a Service or EndpointSlice change to the datapath carrying it",
        METRICS.programming.clone(),
    );
    r.register(
        "weir_policy_verdicts",
        "NetworkPolicy verdicts on new flows, by verdict (allowed, denied) and direction",
        METRICS.policy_verdicts.clone(),
    );
    r.register(
        "weir_kernel_drops",
        "Packets the kernel dropped in the node's network namespace or a local pod's, outside weir's programs, by the kernel's drop reason",
        METRICS.kernel_drops.clone(),
    );
    r.register(
        "weir_kernel_drop_events_lost",
        "Kernel drop events the full ring buffer refused, by reason (the drops are still counted)",
        METRICS.kernel_drop_events_lost.clone(),
    );
    r.register(
        "weir_flows",
        "Flows the agent logged, by event (policy-verdict, trace, trace-sock, drop, kernel-drop), verdict, reason and direction",
        METRICS.flows.clone(),
    );
    r.register(
        "weir_tcp_flags",
        "TCP flags (SYN, SYN-ACK, FIN, RST) of forwarded flows, from the forwarding summaries, by flag and address family",
        METRICS.tcp_flags.clone(),
    );
    r.register(
        "weir_service_connections",
        "New connections (and UDP socket/backend pairs) to a Service, by its namespace and name and the outcome (translated, refused)",
        METRICS.service_connections.clone(),
    );
    register_tcp(&mut r, "weir_tcp", "the node's pods", &METRICS.tcp);
    register_tcp(
        &mut r,
        "weir_service_tcp",
        "the node's pods' client sockets towards a Service's backends",
        &METRICS.service_tcp,
    );
    r.register_collector(Box::new(Scraped { shared }));
    r
}

/// Registers a set of TCP health metrics named `prefix`_*, of the sockets `whose`.
fn register_tcp(r: &mut Registry, prefix: &str, whose: &str, t: &TcpMetrics) {
    r.register(
        format!("{prefix}_retransmits"),
        format!("TCP segments {whose} retransmitted"),
        t.retransmits.clone(),
    );
    r.register(
        format!("{prefix}_resets"),
        format!("TCP resets {whose} sent or received, by direction"),
        t.resets.clone(),
    );
    r.register(
        format!("{prefix}_connects"),
        format!("TCP connects {whose} made, by outcome (established, failed)"),
        t.connects.clone(),
    );
    r.register(
        format!("{prefix}_connect_seconds"),
        format!(
            "Time the established TCP connects of {whose} took from SYN to ESTABLISHED, summed"
        ),
        t.connect_seconds.clone(),
    );
    r.register(
        format!("{prefix}_smoothed_rtt_seconds"),
        format!("Smoothed RTT of the TCP connections of {whose} as they closed, summed (divide by {prefix}_rtt_samples_total)"),
        t.rtt_seconds.clone(),
    );
    r.register(
        format!("{prefix}_rtt_samples"),
        "TCP connections whose smoothed RTT was summed",
        t.rtt_samples.clone(),
    );
}

/// Metrics read when scraped: datapath counters, map fill levels, sizes, process.
#[derive(Debug)]
struct Scraped {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.node_name)
            .finish()
    }
}

/// One metric family written at scrape time: its name, help, type and samples.
struct Sampled {
    name: &'static str,
    help: &'static str,
    counter: bool,
    samples: Vec<(Labels, f64)>,
}

impl Sampled {
    fn new(name: &'static str, help: &'static str, counter: bool) -> Self {
        Sampled {
            name,
            help,
            counter,
            samples: Vec::new(),
        }
    }

    /// A family of one sample without labels.
    fn single(name: &'static str, help: &'static str, counter: bool, v: f64) -> Self {
        let mut s = Sampled::new(name, help, counter);
        s.add(Vec::new(), v);
        s
    }

    fn add(&mut self, labels: Labels, v: f64) {
        self.samples.push((labels, v));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ty = if self.counter {
            MetricType::Counter
        } else {
            MetricType::Gauge
        };
        let mut m = encoder.encode_descriptor(self.name, self.help, None, ty)?;
        for (labels, v) in &self.samples {
            let fm = m.encode_family(labels)?;
            if self.counter {
                ConstCounter::new(*v).encode(fm)?;
            } else {
                ConstGauge::new(*v).encode(fm)?;
            }
        }
        Ok(())
    }
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in scrape(&self.shared) {
            family.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// What is read by walking maps (the socket load balancer's dump, every map's fill level):
/// at most every [`SLOW_READ_EVERY`], so that frequent scrapes never hold the datapath's
/// locks long (a full conntrack table is 262,144 entries).
#[derive(Clone, Default)]
struct SlowReads {
    lb_counters: Vec<(String, u64)>,
    sock_events_lost: Vec<(String, u64)>,
    maps: Vec<weir_dataplane::MapUsage>,
}

/// How long a walk of the maps serves scrapes.
const SLOW_READ_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

static SLOW: std::sync::Mutex<Option<(std::time::Instant, SlowReads)>> =
    std::sync::Mutex::new(None);

fn slow_reads(shared: &Shared) -> SlowReads {
    let mut cache = SLOW.lock().expect("metrics cache");
    if let Some((at, r)) = cache.as_ref() {
        if at.elapsed() < SLOW_READ_EVERY {
            return r.clone();
        }
    }
    let mut r = SlowReads::default();
    if let Ok(d) = shared.dataplane.lock().expect("dataplane").dump() {
        r.lb_counters = d.counters;
        r.sock_events_lost = d.events_lost;
        r.maps = d.maps;
    }
    if let Some(p) = &shared.pods {
        r.maps.extend(p.dataplane.lock().expect("pods").map_usage());
    }
    *cache = Some((std::time::Instant::now(), r.clone()));
    r
}

/// Whether a reason name is a drop (`DROP_*`).
fn is_drop(reason: &str) -> bool {
    reason.starts_with("DROP_")
}

fn scrape(shared: &Shared) -> Vec<Sampled> {
    let mut packets = Sampled::new(
        "weir_datapath_packets",
        "Packets the per-packet programs counted, by direction and verdict or drop reason",
        true,
    );
    let mut bytes = Sampled::new("weir_datapath_bytes", "Bytes of those packets", true);
    let mut drops = Sampled::new("weir_drops", "Packets dropped, by reason", true);
    let mut drops_lost = Sampled::new(
        "weir_drop_events_lost",
        "Drop events of weir's programs their full ring buffer refused, by reason (the drops are still counted in weir_drops_total)",
        true,
    );
    let mut lb = Sampled::new(
        "weir_lb_events",
        "Socket load-balancer events, by event",
        true,
    );
    let mut traces_lost = Sampled::new(
        "weir_trace_events_lost",
        "Forwarding summaries their full ring buffers refused, by reason (their packets ride on the flow's next summary)",
        true,
    );
    let mut sock_lost = Sampled::new(
        "weir_sock_events_lost",
        "Socket-layer translation events the full ring buffer refused, by point (connect, sendmsg, recvmsg)",
        true,
    );
    let mut entries = Sampled::new("weir_bpf_map_entries", "Entries in use in each map", false);
    let mut capacity = Sampled::new("weir_bpf_map_capacity", "Capacity of each map", false);
    let mut sizes = Vec::new();
    let mut gauge = |name, help, v: f64| sizes.push(Sampled::single(name, help, false, v));
    let slow = slow_reads(shared);
    for (event, n) in &slow.lb_counters {
        lb.add(vec![("event", event.clone())], *n as f64);
    }
    for (point, n) in &slow.sock_events_lost {
        sock_lost.add(vec![("point", point.clone())], *n as f64);
    }
    let mut maps = slow.maps;
    let frontends = shared.status.lock().expect("status").frontends;
    gauge(
        "weir_frontends",
        "Service frontends programmed",
        frontends as f64,
    );
    if let Some(p) = &shared.pods {
        let endpoints = p.status.lock().expect("pod status").endpoints;
        gauge(
            "weir_endpoints",
            "Local pod endpoints programmed",
            endpoints as f64,
        );
        let dp = p.dataplane.lock().expect("pods");
        let (counters, lost) = (dp.metrics(), dp.datapath().drops_lost());
        let traced = dp.datapath().traces_lost();
        drop(dp);
        for (reason, n) in lost.iter().flatten() {
            drops_lost.add(vec![("reason", reason.clone())], *n as f64);
        }
        for (reason, n) in traced.iter().flatten() {
            traces_lost.add(vec![("reason", reason.clone())], *n as f64);
        }
        for m in counters.iter().flatten() {
            let l = vec![
                ("direction", m.direction.to_string()),
                ("reason", m.name.clone()),
            ];
            packets.add(l.clone(), m.packets as f64);
            bytes.add(l, m.bytes as f64);
            if is_drop(&m.name) {
                drops.add(vec![("reason", m.name.clone())], m.packets as f64);
            }
        }
    }
    let identities = shared.policy.lock().expect("policy").identities;
    gauge(
        "weir_identities",
        "Security identities known",
        identities as f64,
    );
    gauge(
        "weir_ready",
        "1 when the agent is ready (initial lists synced, datapath applied)",
        if crate::probes::ready(shared).is_ok() {
            1.0
        } else {
            0.0
        },
    );
    let mut info = Sampled::new("weir_build_info", "The agent's version (always 1)", false);
    info.add(
        vec![("version", env!("CARGO_PKG_VERSION").to_string())],
        1.0,
    );
    // The socket and per-packet programs share the load-balancing maps: each once.
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    maps.dedup_by(|a, b| a.name == b.name);
    for m in maps {
        entries.add(vec![("map", m.name.clone())], m.entries as f64);
        capacity.add(vec![("map", m.name)], m.capacity as f64);
    }
    let mut out = vec![
        packets,
        bytes,
        drops,
        drops_lost,
        traces_lost,
        sock_lost,
        lb,
        entries,
        capacity,
        info,
    ];
    out.extend(sizes);
    out.extend(process());
    out
}

/// The standard process metrics, from /proc/self.
fn process() -> Vec<Sampled> {
    let mut out = Vec::new();
    let mut one = |name, help, counter, v: f64| out.push(Sampled::single(name, help, counter, v));
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as f64;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces), from field 3 on.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let f = |i: usize| {
            rest.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        one(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            true,
            (f(14) + f(15)) / ticks,
        );
        one(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            false,
            f(23),
        );
        one(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            false,
            f(24) * page,
        );
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| {
                        l.strip_prefix("btime ")
                            .map(|v| v.trim().parse::<f64>().ok())
                    })
                    .flatten()
            })
            .unwrap_or(0.0);
        one(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            false,
            boot + f(22) / ticks,
        );
    }
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    one(
        "process_open_fds",
        "Number of open file descriptors",
        false,
        fds as f64,
    );
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(max) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
        {
            one(
                "process_max_fds",
                "Maximum number of open file descriptors",
                false,
                max,
            );
        }
    }
    out
}

/// The registry encoded in the text format.
pub fn encode(shared: Arc<Shared>) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry(shared));
    out
}
