//! Active health checks (optional, off by default): the mesh connects over TCP to every
//! endpoint of its own cluster's exports, at the first TCP port of its slice, every
//! `interval`; an endpoint whose connects fail `threshold` times in a row is published not
//! ready in that slice (every cluster then counts it unhealthy in its shares), and one answered connect
//! makes it ready again, as a kubelet's probe with successThreshold 1 does. The checks run
//! on a thread of their own, inside a given network namespace when the mesh's own cannot
//! reach pods (the lab's mesh runs on the host).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::record::ExportRecord;

/// `weir mesh --health-check-*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// How often every endpoint is checked.
    pub interval: Duration,
    /// How long a connect may take.
    pub timeout: Duration,
    /// Consecutive failed connects that make an endpoint not ready.
    pub threshold: u32,
    /// The network namespace to connect from (None: the mesh's own).
    pub netns: Option<PathBuf>,
}

/// What the checks found, shared with the reconcile loop.
#[derive(Default)]
pub struct Health {
    /// The endpoints to check (address, port), as the last pass listed them.
    targets: Mutex<BTreeSet<SocketAddr>>,
    /// Consecutive failures per endpoint checked.
    failures: Mutex<BTreeMap<SocketAddr, u32>>,
    /// The endpoints (address, checked port) failing now.
    failing: Mutex<BTreeSet<SocketAddr>>,
}

impl Health {
    /// Sets the endpoints to check from this cluster's `records`.
    pub fn set_targets<'a>(&self, records: impl IntoIterator<Item = &'a ExportRecord>) {
        let mut t = BTreeSet::new();
        for r in records {
            for s in &r.slices {
                let Some(port) = checked_port(&s.ports) else {
                    continue;
                };
                for e in &s.endpoints {
                    if let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) {
                        t.insert(SocketAddr::new(ip, port));
                    }
                }
            }
        }
        *self.targets.lock().expect("targets") = t;
    }

    /// Marks the endpoints failing their checks (at their slice's checked port) not ready in
    /// `r`; returns how many.
    pub fn mark(&self, r: &mut ExportRecord) -> usize {
        let failing = self.failing.lock().expect("failing");
        let mut n = 0;
        for s in &mut r.slices {
            let Some(port) = checked_port(&s.ports) else {
                continue;
            };
            for e in &mut s.endpoints {
                let bad = e
                    .addresses
                    .first()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .is_some_and(|ip| failing.contains(&SocketAddr::new(ip, port)));
                if bad {
                    e.conditions.get_or_insert_with(Default::default).ready = Some(false);
                    n += 1;
                }
            }
        }
        n
    }

    /// Takes one round of results: (endpoint, answered). Returns whether the failing set
    /// changed.
    fn record(&self, results: &[(SocketAddr, bool)], threshold: u32) -> bool {
        let mut failures = self.failures.lock().expect("failures");
        let live: BTreeSet<SocketAddr> = results.iter().map(|(a, _)| *a).collect();
        failures.retain(|a, _| live.contains(a));
        for (addr, ok) in results {
            let f = failures.entry(*addr).or_default();
            *f = if *ok { 0 } else { f.saturating_add(1) };
        }
        let now: BTreeSet<SocketAddr> = failures
            .iter()
            .filter(|(_, f)| **f >= threshold.max(1))
            .map(|(a, _)| *a)
            .collect();
        let mut failing = self.failing.lock().expect("failing");
        let changed = *failing != now;
        *failing = now;
        changed
    }
}

/// The port a slice's endpoints are checked at: its first TCP port.
fn checked_port(ports: &[k8s_openapi::api::discovery::v1::EndpointPort]) -> Option<u16> {
    ports
        .iter()
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .and_then(|p| p.port)
        .map(|p| p as u16)
}

/// Starts the checks; `changed` is notified when an endpoint turns failing or healthy.
pub fn spawn(
    cfg: HealthCheckConfig,
    health: Arc<Health>,
    changed: Arc<Notify>,
) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("weir-mesh-health".into())
        .spawn(move || {
            if let Some(ns) = &cfg.netns {
                let entered = std::fs::File::open(ns)
                    .map_err(|e| e.to_string())
                    .and_then(|f| {
                        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = entered {
                    let _ = tx.send(Err(format!("--health-check-netns {}: {e}", ns.display())));
                    return;
                }
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            rt.block_on(checks(cfg, health, changed));
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())?
}

async fn checks(cfg: HealthCheckConfig, health: Arc<Health>, changed: Arc<Notify>) {
    let mut tick = tokio::time::interval(cfg.interval);
    loop {
        tick.tick().await;
        let targets: Vec<SocketAddr> = health
            .targets
            .lock()
            .expect("targets")
            .iter()
            .copied()
            .collect();
        let probes = targets.into_iter().map(|a| async move {
            let ok = matches!(
                tokio::time::timeout(cfg.timeout, tokio::net::TcpStream::connect(a)).await,
                Ok(Ok(_))
            );
            (a, ok)
        });
        let results = futures::future::join_all(probes).await;
        if health.record(&results, cfg.threshold) {
            tracing::info!(
                failing = ?health.failing.lock().expect("failing"),
                "health checks: endpoints failing changed"
            );
            changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_failures_make_an_endpoint_failing_and_one_answer_heals_it() {
        let h = Health::default();
        let a: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert!(!h.record(&[(a, false), (b, true)], 2));
        assert!(h.record(&[(a, false), (b, true)], 2));
        assert!(h.failing.lock().unwrap().contains(&a));
        let mut r: ExportRecord = serde_json::from_value(serde_json::json!({
            "cluster": "c1", "namespace": "mcs", "name": "hello", "created": "",
            "headless": false, "ports": [],
            "slices": [{"addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]}]}))
        .unwrap();
        h.set_targets([&r]);
        assert_eq!(h.targets.lock().unwrap().len(), 2);
        assert_eq!(h.mark(&mut r), 1);
        let c = r.slices[0].endpoints[0].conditions.as_ref().unwrap();
        assert_eq!(c.ready, Some(false));
        assert!(h.record(&[(a, true), (b, true)], 2), "one answer heals");
        assert!(h.failing.lock().unwrap().is_empty());
    }
}
