//! Switching a running node from one dataplane to another without losing its established
//! flows (`POST /dataplane?to=KIND`, `weir dataplane switch`). The switch runs inside the
//! Services loop, between two passes, with the desired state of the last one:
//!
//! 1. the target is installed alongside, inert (the BPF programs still carry the traffic):
//!    its Services rules from the desired state, its masquerading, its NetworkPolicy;
//! 2. the eBPF datapath's translated flows are written into the kernel's conntrack with
//!    their NAT ([`weir_dataplane::handover`]);
//! 3. the cut-over: every tc and XDP program is detached, then the socket programs;
//! 4. flows the programs translated during the copy are written too;
//! 5. the target becomes the node's dataplane.
//!
//! A failure before the cut-over takes the target away again and leaves the node as it was.
//! Built so far: from ebpf to nftables or iptables.

use std::collections::BTreeSet;
use std::time::Instant;

use serde::Serialize;
use weir_control::lb::LbState;
use weir_dataplane::ctnetlink::Conntrack;
use weir_dataplane::ipt::{IptablesBackend, IptablesDataplane};
use weir_dataplane::nft::{NftDataplane, NodeNet};
use weir_dataplane::pods::NetfilterPolicy;
use weir_dataplane::{handover, Dataplane, DataplaneKind};

use crate::Shared;

/// What a switch did on this node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SwitchReport {
    /// Node name.
    pub node: String,
    /// The dataplane before.
    pub from: String,
    /// The dataplane after (the one before when it failed).
    pub to: String,
    /// Translated flows written into the kernel's conntrack.
    pub flows_copied: usize,
    /// Flows that could not be written (their packets meet the new rules as new flows).
    pub flows_failed: usize,
    /// Of the copied, those the programs translated while the first copy ran.
    pub flows_copied_after_cutover: usize,
    /// Milliseconds from the start to the cut-over.
    pub cutover_ms: u64,
    /// Milliseconds in all.
    pub total_ms: u64,
    /// When it finished (RFC 3339).
    pub finished: String,
    /// Why it failed (and was rolled back), if it did.
    pub error: Option<String>,
    /// Handed-over flows still in the kernel's conntrack (counted when the status is read).
    pub draining: Option<usize>,
}

/// Fills in how many handed-over flows are still there, for a status read now.
pub fn count_draining(shared: &Shared, report: &mut SwitchReport) {
    if report.error.is_some() || report.from == report.to {
        return;
    }
    let netns = shared.pods.as_ref().and_then(|p| p.config.netns.clone());
    report.draining =
        weir_dataplane::conntrack::count_marked(netns.as_deref(), handover::HANDOVER_MARK).ok();
}

/// A switch asked for through the API, waiting for the Services loop.
pub struct SwitchRequest {
    /// The dataplane to switch to.
    pub to: DataplaneKind,
    /// A test hook: fail on purpose after this phase (`install` or `copy`), to check the
    /// rollback.
    pub fail_after: Option<String>,
    /// Where the report goes.
    pub reply: tokio::sync::oneshot::Sender<SwitchReport>,
}

fn target_of(
    to: DataplaneKind,
    netns: Option<std::path::PathBuf>,
    node: NodeNet,
) -> Result<(Box<dyn Dataplane>, NetfilterPolicy), String> {
    let e = |e: weir_dataplane::DataplaneError| e.to_string();
    Ok(match to {
        DataplaneKind::Nftables => (
            Box::new(NftDataplane::new(netns, node).map_err(e)?),
            NetfilterPolicy::Nftables,
        ),
        DataplaneKind::Iptables => (
            Box::new(IptablesDataplane::new(netns, node, IptablesBackend::Auto).map_err(e)?),
            NetfilterPolicy::Iptables(IptablesBackend::Auto),
        ),
        DataplaneKind::Ebpf => {
            return Err(
                "switching to ebpf is not built yet (from ebpf to nftables or iptables only)"
                    .into(),
            )
        }
    })
}

/// Removes what a target left (a switch rolled back).
fn remove_target(to: DataplaneKind, netns: Option<&std::path::Path>) {
    let r = match to {
        DataplaneKind::Nftables => NftDataplane::remove(netns),
        DataplaneKind::Iptables => IptablesDataplane::remove(netns, IptablesBackend::Auto),
        DataplaneKind::Ebpf => Ok(()),
    };
    if let Err(e) = r {
        tracing::error!(error = %e, "removing the rules of a switch rolled back");
    }
}

/// Switches this node's dataplane to `to`, the desired state being `state` (failing on purpose
/// after the phase `fail_after`, if given).
pub fn run(
    shared: &Shared,
    state: &LbState,
    to: DataplaneKind,
    fail_after: Option<&str>,
) -> SwitchReport {
    let started = Instant::now();
    let from = shared.dataplane.lock().expect("dataplane").kind();
    let mut report = SwitchReport {
        node: shared.node_name.clone(),
        from: from.to_string(),
        to: from.to_string(),
        ..Default::default()
    };
    let result = if from == to {
        Ok(())
    } else {
        switch(shared, state, (from, to), fail_after, &mut report, started)
    };
    if let Err(e) = result {
        tracing::error!(error = %e, %from, %to, "dataplane switch failed; rolled back");
        report.error = Some(e);
    }
    report.total_ms = started.elapsed().as_millis() as u64;
    report.finished = jiff::Timestamp::now().to_string();
    report
}

fn switch(
    shared: &Shared,
    state: &LbState,
    (from, to): (DataplaneKind, DataplaneKind),
    fail_after: Option<&str>,
    report: &mut SwitchReport,
    started: Instant,
) -> Result<(), String> {
    let injected = |phase: &str| fail_after == Some(phase);
    if from != DataplaneKind::Ebpf {
        return Err(format!(
            "switching from {from} is not built yet (from ebpf to nftables or iptables only)"
        ));
    }
    let pods = shared
        .pods
        .as_ref()
        .ok_or("this agent runs no pod datapath to switch")?;
    let cfg = &pods.config;
    let netns = cfg.netns.clone();
    let masquerade = cfg.masquerade.then(|| {
        pods.status
            .lock()
            .expect("pod status")
            .non_masquerade
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect::<Vec<ipnet::Ipv4Net>>()
    });
    let node = NodeNet {
        devices: cfg.devices.clone(),
        snat_ports: cfg.snat_ports,
        masquerade,
    };
    // 1. The target, installed alongside.
    let (mut target, policy) = target_of(to, netns.clone(), node)?;
    let installed = target
        .apply(state)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            pods.dataplane
                .lock()
                .expect("pods")
                .prepare_netfilter(netns.clone(), policy)
                .map_err(|e| e.to_string())
        });
    let rollback = |why: String| -> Result<(), String> {
        pods.dataplane.lock().expect("pods").abandon_netfilter();
        remove_target(to, netns.as_deref());
        Err(why)
    };
    if let Err(e) = installed {
        return rollback(format!("installing {to}: {e}"));
    }
    if injected("install") {
        return rollback("a failure injected after the install (test hook)".into());
    }
    // 2. The translated flows, copied.
    let mut ct = match Conntrack::open(netns.as_deref()) {
        Ok(c) => c,
        Err(e) => return rollback(e.to_string()),
    };
    let flows = match handover::bpf_flows(&pods.dataplane.lock().expect("pods"), &BTreeSet::new()) {
        Ok(f) => f,
        Err(e) => return rollback(format!("reading the BPF conntrack: {e}")),
    };
    let mut copied = BTreeSet::new();
    for f in &flows {
        match ct.insert(f) {
            Ok(()) => {
                copied.insert((f.src, f.dst));
            }
            Err(e) => {
                tracing::warn!(error = %e, "a flow not handed over");
                report.flows_failed += 1;
            }
        }
    }
    if injected("copy") {
        // The copied entries go too: the programs keep translating those flows.
        for f in flows.iter().filter(|f| copied.contains(&(f.src, f.dst))) {
            let _ = ct.delete(f);
        }
        return rollback("a failure injected after the copy (test hook)".into());
    }
    // 3. The cut-over: the per-packet programs first (while the socket programs still
    // translate connect(), new connections carry their backend's address and need no NAT
    // from netfilter), then the socket programs.
    report.cutover_ms = started.elapsed().as_millis() as u64;
    pods.dataplane.lock().expect("pods").detach_programs();
    if let Err(e) = shared.dataplane.lock().expect("dataplane").retire() {
        tracing::error!(error = %e, "detaching the socket programs");
    }
    // 4. Flows translated while the copy ran.
    let late =
        handover::bpf_flows(&pods.dataplane.lock().expect("pods"), &copied).unwrap_or_default();
    for f in &late {
        match ct.insert(f) {
            Ok(()) => {
                copied.insert((f.src, f.dst));
                report.flows_copied_after_cutover += 1;
            }
            Err(_) => report.flows_failed += 1,
        }
    }
    report.flows_copied = copied.len();
    // 5. The target is the node's dataplane.
    *shared.dataplane.lock().expect("dataplane") = target;
    report.to = to.to_string();
    tracing::info!(
        %from, %to,
        copied = report.flows_copied,
        failed = report.flows_failed,
        "dataplane switched"
    );
    Ok(())
}
