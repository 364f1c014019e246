//! TCP health per workload (`weir_bpf::tcp_health`): a thread gives each local pod's network
//! namespace (from its endpoint record, looked for every 500 ms) a slot of the programs'
//! counters, and every 3 s adds what each pod's sockets went through to the metrics, labelled by namespace
//! and workload (bounded: never the pod or its address). A workload's series go when its
//! last pod on the node goes.
//!
//! The pods' client sockets are counted per peer too (the address and port they connected
//! to): what changed for a peer since the last round goes into the flow log as a
//! `tcp-health` record (client pod -> peer, the Service whose backend the peer is), which
//! `weir observe` and the map's edges show, and into `weir_service_tcp_*` by Service (its
//! series go with the Service).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_bpf::tcp_health::{tcp_counters, TcpHealth, TcpPeer, SLOTS};
use weir_model::endpoint::EndpointRecord;

use crate::flows::{FlowLog, TcpStats};
use crate::metrics::{service_labels, Labels, TcpMetrics, METRICS};
use crate::pods::Pods;

/// How often the counters are read.
const PERIOD: Duration = Duration::from_secs(3);
/// How often new pods are looked for (a pod's first connects come soon after its start; the
/// kernel drop reader looks as often).
pub(crate) const NEW_PODS_PERIOD: Duration = Duration::from_millis(500);

/// One watched pod: its slot, namespace inode, addresses, labels and the counters last read.
struct Watched {
    slot: u32,
    inum: u32,
    ips: Vec<IpAddr>,
    labels: (String, String),
    last: tcp_counters,
}

/// The pods watched, by endpoint uid.
#[derive(Default)]
struct Watch {
    pods: HashMap<String, Watched>,
    free: Vec<u32>,
    /// Slots of pods gone this round, free from the next.
    cooling: Vec<u32>,
    next: u32,
    /// The peers' counters last read.
    peers: HashMap<TcpPeer, tcp_counters>,
}

impl Watch {
    fn slot(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < SLOTS).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }
}

/// Starts the thread (a kernel without the tracepoints or BTF leaves a warning).
pub fn spawn(pods: Arc<Pods>, log: Arc<Mutex<FlowLog>>) {
    // The socket layer's maps: the frontend each client socket asked for.
    let lb_pins = pods
        .dataplane
        .lock()
        .expect("pods")
        .datapath()
        .lb_pin_dir()
        .to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("weir-tcp-health".into())
        .spawn(move || {
            let th = match TcpHealth::load_sharing(Some(&lb_pins)) {
                Ok(t) => {
                    let _ = tx.send(Ok(()));
                    t
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let mut w = Watch::default();
            let mut last_pass: Option<std::time::Instant> = None;
            loop {
                if last_pass.is_none_or(|t| t.elapsed() >= PERIOD) {
                    pass(&th, &mut w, &pods, &log);
                    last_pass = Some(std::time::Instant::now());
                } else {
                    let (records, _) = EndpointRecord::read_dir(&pods.config.endpoint_dir);
                    watch_new(&th, &mut w, &live_pods(&records), &log);
                }
                std::thread::sleep(NEW_PODS_PERIOD);
            }
        });
    let started = spawned
        .map_err(|e| e.to_string())
        .and_then(|_| rx.recv().map_err(|e| e.to_string())?);
    if let Err(e) = started {
        tracing::warn!(error = %e, "TCP health is not observed");
    }
}

/// `namespace/name` -> (namespace, workload).
fn labels_of(pod: &str, log: &Arc<Mutex<FlowLog>>) -> (String, String) {
    let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
    let workload = log
        .lock()
        .expect("flow log")
        .pods
        .get(pod)
        .map(|m| m.workload.clone())
        .unwrap_or_else(|| name.to_string());
    (ns.to_string(), workload)
}

/// One round: pods come and go, and what their sockets did since the last round is counted.
fn pass(th: &TcpHealth, w: &mut Watch, pods: &Pods, log: &Arc<Mutex<FlowLog>>) {
    let (records, _) = EndpointRecord::read_dir(&pods.config.endpoint_dir);
    let live = live_pods(&records);
    // Slots freed a round ago are free now: their sockets' records had a round to go.
    let cooled = std::mem::take(&mut w.cooling);
    w.free.extend(cooled);
    // What every watched pod's sockets did since the last round, those of pods gone too.
    for p in w.pods.values_mut() {
        if let Some(now) = count(th, p) {
            p.last = now;
        }
    }
    count_peers(th, w, log);
    let before: BTreeSet<(String, String)> = w.pods.values().map(|p| p.labels.clone()).collect();
    // Pods gone: unwatched, their slot cooling for a round.
    let gone: Vec<String> = w
        .pods
        .keys()
        .filter(|u| !live.contains_key(u.as_str()))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(p) = w.pods.remove(&uid) {
            th.unwatch(p.inum, p.slot);
            w.peers.retain(|k, _| k.slot != p.slot);
            w.cooling.push(p.slot);
        }
    }
    watch_new(th, w, &live, log);
    // A workload's series go with its last pod on the node.
    let after: BTreeSet<(String, String)> = w.pods.values().map(|p| p.labels.clone()).collect();
    for gone in before.difference(&after) {
        remove_series(&METRICS.tcp, workload_labels(gone));
    }
}

/// The pods of endpoint records, by uid (those whose namespace is known).
pub(crate) fn live_pods(records: &[EndpointRecord]) -> BTreeMap<&str, &EndpointRecord> {
    records
        .iter()
        .filter(|r| r.netns_inode != 0 && !r.pod.is_empty())
        .map(|r| (r.uid.as_str(), r))
        .collect()
}

/// Watches the pods of `live` not watched yet, each in a free slot.
fn watch_new(
    th: &TcpHealth,
    w: &mut Watch,
    live: &BTreeMap<&str, &EndpointRecord>,
    log: &Arc<Mutex<FlowLog>>,
) {
    for (uid, r) in live {
        if w.pods.contains_key(*uid) {
            continue;
        }
        let Some(slot) = w.slot() else {
            tracing::warn!(pod = %r.pod, "no TCP health slot left");
            continue;
        };
        let inum = r.netns_inode as u32;
        if let Err(e) = th.watch(inum, slot) {
            tracing::warn!(pod = %r.pod, error = %e, "watching a pod's TCP health");
            w.free.push(slot);
            continue;
        }
        let labels = labels_of(&r.pod, log);
        w.pods.insert(
            uid.to_string(),
            Watched {
                slot,
                inum,
                ips: r.ips.clone(),
                labels,
                last: tcp_counters::default(),
            },
        );
    }
}

fn workload_labels((ns, wl): &(String, String)) -> Labels {
    vec![("namespace", ns.clone()), ("workload", wl.clone())]
}

/// Removes a Service's `weir_service_tcp_*` series (it went).
pub(crate) fn remove_service_series(service: &str) {
    remove_series(&METRICS.service_tcp, service_labels(service));
}

/// What counters went through since `last` (all of `now` when they restarted below it: an
/// entry the LRU dropped and made again).
fn delta(now: &tcp_counters, last: &tcp_counters) -> tcp_counters {
    let d = |a: u64, b: u64| if a >= b { a - b } else { a };
    tcp_counters {
        retransmits: d(now.retransmits, last.retransmits),
        resets_sent: d(now.resets_sent, last.resets_sent),
        resets_received: d(now.resets_received, last.resets_received),
        connects: d(now.connects, last.connects),
        connect_failures: d(now.connect_failures, last.connect_failures),
        connect_ns: d(now.connect_ns, last.connect_ns),
        rtt_us: d(now.rtt_us, last.rtt_us),
        rtt_samples: d(now.rtt_samples, last.rtt_samples),
    }
}

/// Adds pod `p`'s counters since the last read to the metrics; returns them.
fn count(th: &TcpHealth, p: &Watched) -> Option<tcp_counters> {
    let now = th.counters(p.slot).ok()?;
    add(
        &METRICS.tcp,
        workload_labels(&p.labels),
        &delta(&now, &p.last),
    );
    Some(now)
}

/// Labels `base` and one more.
fn with_label(base: &Labels, k: &'static str, v: &str) -> Labels {
    let mut l = base.clone();
    l.push((k, v.to_string()));
    l
}

/// Adds counts `d` to the series of `m` under `base` labels.
fn add(m: &TcpMetrics, base: Labels, d: &tcp_counters) {
    let with = |k, v| with_label(&base, k, v);
    m.retransmits.get_or_create(&base).inc_by(d.retransmits);
    m.resets
        .get_or_create(&with("direction", "sent"))
        .inc_by(d.resets_sent);
    m.resets
        .get_or_create(&with("direction", "received"))
        .inc_by(d.resets_received);
    m.connects
        .get_or_create(&with("outcome", "established"))
        .inc_by(d.connects);
    m.connects
        .get_or_create(&with("outcome", "failed"))
        .inc_by(d.connect_failures);
    m.connect_seconds
        .get_or_create(&base)
        .inc_by(d.connect_ns as f64 / 1e9);
    m.rtt_seconds
        .get_or_create(&base)
        .inc_by(d.rtt_us as f64 / 1e6);
    m.rtt_samples.get_or_create(&base).inc_by(d.rtt_samples);
}

/// Removes the series of `m` under `base` labels (a workload's last pod on the node went, or
/// a Service went).
fn remove_series(m: &TcpMetrics, base: Labels) {
    let with = |k, v| with_label(&base, k, v);
    m.retransmits.remove(&base);
    m.connect_seconds.remove(&base);
    m.rtt_seconds.remove(&base);
    m.rtt_samples.remove(&base);
    for dir in ["sent", "received"] {
        m.resets.remove(&with("direction", dir));
    }
    for outcome in ["established", "failed"] {
        m.connects.remove(&with("outcome", outcome));
    }
}

/// What the pods' client sockets went through per peer since the last round: a
/// `tcp-health` flow per peer with news, counted for the peer's Service (whose series
/// [`FlowLog::set_services`] removes when it goes).
fn count_peers(th: &TcpHealth, w: &mut Watch, log: &Arc<Mutex<FlowLog>>) {
    let peers = match th.peers() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "reading TCP health per peer");
            return;
        }
    };
    let clients: HashMap<u32, &Watched> = w.pods.values().map(|p| (p.slot, p)).collect();
    let now_ns = crate::flows::boot_ns();
    let mut log = log.lock().expect("flow log");
    let mut read = HashMap::with_capacity(peers.len());
    for (peer, now) in peers {
        let last = w.peers.get(&peer).copied().unwrap_or_default();
        read.insert(peer, now);
        let d = delta(&now, &last);
        if weir_bpf::as_bytes(&d) == weir_bpf::as_bytes(&tcp_counters::default()) {
            continue;
        }
        let Some(client) = clients.get(&peer.slot).and_then(|p| {
            p.ips
                .iter()
                .find(|ip| ip.is_ipv4() == peer.addr.is_ipv4())
                .copied()
        }) else {
            continue;
        };
        if let Some(svc) = log.tcp_peer_service(peer.addr, peer.frontend) {
            add(&METRICS.service_tcp, service_labels(&svc), &d);
            log.tcp_services.insert(svc);
        }
        log.push_tcp_health(
            now_ns,
            client,
            (peer.addr, peer.frontend),
            TcpStats::of(&d, PERIOD.as_secs()),
        );
    }
    w.peers = read;
}
