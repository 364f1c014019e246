//! Switching a running node from one dataplane to another without losing its established
//! flows (`POST /dataplane?to=KIND`, `weir dataplane switch`). The switch runs inside the
//! Services loop, between two passes, with the desired state of the last one, in the same
//! steps whatever the direction: the target installed alongside and inert, the flows' state
//! copied, one cut-over, the old dataplane removed.
//!
//! - eBPF to nftables or iptables ([`to_netfilter::from_ebpf`]): the BPF conntrack's
//!   translated flows are written into the kernel's conntrack with their NAT.
//! - nftables or iptables to eBPF ([`to_ebpf::run`]): the kernel's conntrack is read (dump,
//!   then the events of what was confirmed meanwhile) into the BPF conntrack.
//! - nftables to iptables and back ([`to_netfilter::between`]): both render into the same
//!   kernel conntrack, which keeps every flow; only the rules change.
//!
//! A failure before the cut-over takes the target away again and leaves the node as it was.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use weir_control::lb::LbState;
use weir_dataplane::ipt::{IptablesBackend, IptablesDataplane};
use weir_dataplane::nft::{NftDataplane, NodeNet};
use weir_dataplane::pods::NetfilterPolicy;
use weir_dataplane::{handover, Dataplane, DataplaneKind};

use crate::pods::Pods;
use crate::Shared;

mod to_ebpf;
mod to_netfilter;

/// What a switch did on this node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SwitchReport {
    /// Node name.
    pub node: String,
    /// The dataplane before.
    pub from: String,
    /// The dataplane after (the one before when it failed).
    pub to: String,
    /// Translated flows copied (into the kernel's conntrack, or into the BPF conntrack).
    pub flows_copied: usize,
    /// To eBPF: flows of local pods whose policy verdict was carried (each judged again on
    /// its next packet).
    pub verdicts_copied: usize,
    /// To eBPF: flows the node's own processes opened through netfilter's NAT, which the
    /// kernel goes on translating (tables `weir-nat-hold`) until they end.
    pub node_flows_held: usize,
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
    /// Where it is: `installing`, `copying`, `cutting-over`, then `done` or `rolled-back`
    /// (`weir status` shows a switch under way).
    pub phase: String,
    /// Why it failed (and was rolled back), if it did.
    pub error: Option<String>,
    /// Copied flows still there (in the kernel's conntrack with weir's mark, or in the BPF
    /// conntrack as taken over), counted when the status is read.
    pub draining: Option<usize>,
}

/// Fills in how many handed-over flows are still there, for a status read now.
pub fn count_draining(shared: &Shared, report: &mut SwitchReport) {
    if report.error.is_some() || report.from == report.to {
        return;
    }
    let Some(pods) = shared.pods.as_ref() else {
        return;
    };
    report.draining = if report.to == DataplaneKind::Ebpf.to_string() {
        let dp = pods.dataplane.lock().expect("pods");
        weir_dataplane::takeover::count_taken(&dp).ok()
    } else {
        let netns = pods.config.netns.as_deref();
        weir_dataplane::conntrack::count_marked(netns, handover::HANDOVER_MARK).ok()
    };
}

/// Under netfilter: the DSR flows the tc programs still carry (None when not draining).
pub fn count_dsr_draining(shared: &Shared) -> Option<usize> {
    let dp = shared.pods.as_ref()?.dataplane.lock().expect("pods");
    dp.draining().then(|| dp.dsr_flows_open())
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

/// The node's network settings a netfilter dataplane renders with.
fn node_net(pods: &Pods) -> NodeNet {
    let cfg = &pods.config;
    let masquerade = cfg.masquerade.then(|| {
        pods.status
            .lock()
            .expect("pod status")
            .non_masquerade
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect::<Vec<ipnet::Ipv4Net>>()
    });
    NodeNet {
        devices: cfg.devices.clone(),
        snat_ports: cfg.snat_ports,
        masquerade,
    }
}

/// The iptables binaries the node's dataplanes use.
fn iptables_backend(pods: &Pods) -> IptablesBackend {
    pods.config
        .dataplanes
        .as_ref()
        .map(|d| d.iptables)
        .unwrap_or(IptablesBackend::Auto)
}

/// Who renders NetworkPolicy under the netfilter dataplane `kind` (None: eBPF).
fn policy_of(kind: DataplaneKind, backend: IptablesBackend) -> Option<NetfilterPolicy> {
    match kind {
        DataplaneKind::Ebpf => None,
        DataplaneKind::Nftables => Some(NetfilterPolicy::Nftables),
        DataplaneKind::Iptables => Some(NetfilterPolicy::Iptables(backend)),
    }
}

/// A netfilter dataplane of kind `to`, not yet written.
fn netfilter_target(
    to: DataplaneKind,
    netns: Option<PathBuf>,
    node: NodeNet,
    backend: IptablesBackend,
) -> Result<Box<dyn Dataplane>, String> {
    let e = |e: weir_dataplane::DataplaneError| e.to_string();
    Ok(match to {
        DataplaneKind::Nftables => Box::new(NftDataplane::new(netns, node).map_err(e)?),
        DataplaneKind::Iptables => {
            Box::new(IptablesDataplane::new(netns, node, backend).map_err(e)?)
        }
        DataplaneKind::Ebpf => return Err("eBPF is not a netfilter dataplane".into()),
    })
}

/// Removes a netfilter dataplane's rules (Services, masquerading, NetworkPolicy): a switch
/// rolled back takes its target's away, a finished one the old dataplane's.
fn remove_rules(kind: DataplaneKind, netns: Option<&Path>, backend: IptablesBackend) {
    let r = match kind {
        DataplaneKind::Nftables => NftDataplane::remove(netns),
        DataplaneKind::Iptables => IptablesDataplane::remove(netns, backend),
        DataplaneKind::Ebpf => Ok(()),
    };
    if let Err(e) = r {
        tracing::error!(error = %e, %kind, "removing a netfilter dataplane's rules");
    }
}

/// Records that `report`'s switch entered `phase`, where `weir status` reads it.
fn publish(shared: &Shared, report: &mut SwitchReport, phase: &str) {
    report.phase = phase.to_string();
    shared.status.lock().expect("status lock").switch = Some(report.clone());
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
        publish(shared, &mut report, "installing");
        switch(shared, state, (from, to), fail_after, &mut report, started)
    };
    report.phase = if result.is_ok() {
        "done"
    } else {
        "rolled-back"
    }
    .into();
    if let Err(e) = result {
        tracing::error!(error = %e, %from, %to, "dataplane switch failed; rolled back");
        report.error = Some(e);
    } else if from != to {
        report.to = to.to_string();
        tracing::info!(
            %from, %to,
            copied = report.flows_copied,
            verdicts = report.verdicts_copied,
            failed = report.flows_failed,
            "dataplane switched"
        );
    }
    report.total_ms = started.elapsed().as_millis() as u64;
    report.finished = jiff::Timestamp::now().to_string();
    report
}

/// One switch's inputs.
struct Step<'a> {
    shared: &'a Shared,
    pods: &'a std::sync::Arc<Pods>,
    state: &'a LbState,
    from: DataplaneKind,
    to: DataplaneKind,
    fail_after: Option<&'a str>,
    started: Instant,
}

impl Step<'_> {
    /// Whether the test hook asks for a failure after `phase`.
    fn injected(&self, phase: &str) -> bool {
        self.fail_after == Some(phase)
    }

    fn netns(&self) -> Option<PathBuf> {
        self.pods.config.netns.clone()
    }
}

fn switch(
    shared: &Shared,
    state: &LbState,
    (from, to): (DataplaneKind, DataplaneKind),
    fail_after: Option<&str>,
    report: &mut SwitchReport,
    started: Instant,
) -> Result<(), String> {
    let pods = shared
        .pods
        .as_ref()
        .ok_or("this agent runs no pod datapath to switch")?;
    let step = Step {
        shared,
        pods,
        state,
        from,
        to,
        fail_after,
        started,
    };
    match (from, to) {
        (DataplaneKind::Ebpf, _) => to_netfilter::from_ebpf(&step, report),
        (_, DataplaneKind::Ebpf) => to_ebpf::run(&step, report),
        _ => to_netfilter::between(&step, report),
    }
}
