//! TCP health per workload (`weir_bpf::tcp_health`): a thread gives each local pod's network
//! namespace (from its endpoint record) a slot of the programs' counters, and every few
//! seconds adds what each pod's sockets went through to the metrics, labelled by namespace
//! and workload (bounded: never the pod or its address). A workload's series go when its
//! last pod on the node goes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_bpf::tcp_health::{tcp_counters, TcpHealth, SLOTS};
use weir_model::endpoint::EndpointRecord;

use crate::flows::FlowLog;
use crate::metrics::{Labels, METRICS};
use crate::pods::Pods;

/// How often the counters are read.
const PERIOD: Duration = Duration::from_secs(3);

/// One watched pod: its slot, namespace inode, labels and the counters last read.
struct Watched {
    slot: u32,
    inum: u32,
    labels: (String, String),
    last: tcp_counters,
}

/// The pods watched, by endpoint uid.
#[derive(Default)]
struct Watch {
    pods: HashMap<String, Watched>,
    free: Vec<u32>,
    next: u32,
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
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("weir-tcp-health".into())
        .spawn(move || {
            let th = match TcpHealth::load() {
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
            loop {
                pass(&th, &mut w, &pods, &log);
                std::thread::sleep(PERIOD);
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
    let live: BTreeMap<&str, &EndpointRecord> = records
        .iter()
        .filter(|r| r.netns_inode != 0 && !r.pod.is_empty())
        .map(|r| (r.uid.as_str(), r))
        .collect();
    // Pods gone: their slot is freed, and their workload's series go with the last one.
    let gone: Vec<String> = w
        .pods
        .keys()
        .filter(|u| !live.contains_key(u.as_str()))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(p) = w.pods.remove(&uid) {
            count(th, &p);
            th.unwatch(p.inum);
            w.free.push(p.slot);
        }
    }
    let left: BTreeSet<(String, String)> = w.pods.values().map(|p| p.labels.clone()).collect();
    // New pods.
    for (uid, r) in &live {
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
                labels,
                last: tcp_counters::default(),
            },
        );
    }
    for p in w.pods.values_mut() {
        if let Some(now) = count(th, p) {
            p.last = now;
        }
    }
    let now: BTreeSet<(String, String)> = w.pods.values().map(|p| p.labels.clone()).collect();
    for gone in left.difference(&now) {
        remove_series(gone);
    }
}

/// Adds pod `p`'s counters since the last read to the metrics; returns them.
fn count(th: &TcpHealth, p: &Watched) -> Option<tcp_counters> {
    let now = th.counters(p.slot).ok()?;
    let (ns, wl) = &p.labels;
    let l = |extra: Option<(&'static str, &str)>| -> Labels {
        let mut l = vec![("namespace", ns.clone()), ("workload", wl.clone())];
        if let Some((k, v)) = extra {
            l.push((k, v.to_string()));
        }
        l
    };
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let m = &METRICS.tcp;
    m.retransmits
        .get_or_create(&l(None))
        .inc_by(d(now.retransmits, p.last.retransmits));
    m.resets
        .get_or_create(&l(Some(("direction", "sent"))))
        .inc_by(d(now.resets_sent, p.last.resets_sent));
    m.resets
        .get_or_create(&l(Some(("direction", "received"))))
        .inc_by(d(now.resets_received, p.last.resets_received));
    m.connects
        .get_or_create(&l(Some(("outcome", "established"))))
        .inc_by(d(now.connects, p.last.connects));
    m.connects
        .get_or_create(&l(Some(("outcome", "failed"))))
        .inc_by(d(now.connect_failures, p.last.connect_failures));
    m.connect_seconds
        .get_or_create(&l(None))
        .inc_by(d(now.connect_ns, p.last.connect_ns) as f64 / 1e9);
    m.rtt_seconds
        .get_or_create(&l(None))
        .inc_by(d(now.rtt_us, p.last.rtt_us) as f64 / 1e6);
    m.rtt_samples
        .get_or_create(&l(None))
        .inc_by(d(now.rtt_samples, p.last.rtt_samples));
    Some(now)
}

/// Removes a workload's series (its last pod on the node went).
fn remove_series((ns, wl): &(String, String)) {
    let base: Labels = vec![("namespace", ns.clone()), ("workload", wl.clone())];
    let with = |k: &'static str, v: &str| {
        let mut l = base.clone();
        l.push((k, v.to_string()));
        l
    };
    let m = &METRICS.tcp;
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
