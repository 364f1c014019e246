//! Switches whose target is nftables or iptables.

use std::collections::BTreeSet;

use weir_dataplane::ctnetlink::Conntrack;
use weir_dataplane::{handover, Dataplane};

use super::{
    iptables_backend, netfilter_target, node_net, policy_of, publish, remove_rules, Step,
    SwitchReport,
};

/// The target installed alongside: its Services rules and masquerading from the desired
/// state, and NetworkPolicy written into netfilter too. Rolled back on a failure.
fn install(step: &Step) -> Result<Box<dyn Dataplane>, String> {
    let backend = iptables_backend(step.pods);
    let netns = step.netns();
    let mut target = netfilter_target(step.to, netns.clone(), node_net(step.pods), backend)?;
    let policy = policy_of(step.to, backend).expect("a netfilter target");
    let installed = target
        .apply(step.state)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            step.pods
                .dataplane
                .lock()
                .expect("pods")
                .prepare_netfilter(netns.clone(), policy)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = installed {
        return Err(rollback(step, format!("installing {}: {e}", step.to)));
    }
    if step.injected("install") {
        return Err(rollback(
            step,
            "a failure injected after the install (test hook)".into(),
        ));
    }
    Ok(target)
}

/// Takes the target away again (its rules, and NetworkPolicy back where it was written
/// before); returns `why`.
fn rollback(step: &Step, why: String) -> String {
    let backend = iptables_backend(step.pods);
    let netns = step.netns();
    {
        let mut pods = step.pods.dataplane.lock().expect("pods");
        match policy_of(step.from, backend) {
            None => pods.abandon_netfilter(),
            Some(p) => {
                if let Err(e) = pods.prepare_netfilter(netns.clone(), p) {
                    tracing::error!(error = %e, "writing NetworkPolicy back into {}", step.from);
                }
            }
        }
    }
    remove_rules(step.to, netns.as_deref(), backend);
    why
}

/// From eBPF: the target installed beside the programs; the BPF conntrack's translated flows
/// written into the kernel's conntrack with their NAT; the cut-over (tc and XDP programs
/// detached, but for DSR flows, which keep the tc programs until they end; then the socket
/// programs); flows translated during the copy written too.
pub(super) fn from_ebpf(step: &Step, report: &mut SwitchReport) -> Result<(), String> {
    let target = install(step)?;
    let netns = step.netns();
    let pods = step.pods;
    publish(step.shared, report, "copying");
    // The translated flows, copied.
    let mut ct = match Conntrack::open(netns.as_deref()) {
        Ok(c) => c,
        Err(e) => return Err(rollback(step, e.to_string())),
    };
    let flows = match handover::bpf_flows(&pods.dataplane.lock().expect("pods"), &BTreeSet::new()) {
        Ok(f) => f,
        Err(e) => return Err(rollback(step, format!("reading the BPF conntrack: {e}"))),
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
    if step.injected("copy") {
        // The copied entries go too: the programs keep translating those flows.
        for f in flows.iter().filter(|f| copied.contains(&(f.src, f.dst))) {
            let _ = ct.delete(f);
        }
        return Err(rollback(
            step,
            "a failure injected after the copy (test hook)".into(),
        ));
    }
    // The cut-over: the per-packet programs first (while the socket programs still
    // translate connect(), new connections carry their backend's address and need no NAT
    // from netfilter), then the socket programs.
    report.cutover_ms = step.started.elapsed().as_millis() as u64;
    publish(step.shared, report, "cutting-over");
    let dsr = pods.dataplane.lock().expect("pods").leave_programs();
    if dsr > 0 {
        tracing::info!(
            flows = dsr,
            "the tc programs stay for the open DSR flows until they end"
        );
    }
    if let Err(e) = step.shared.dataplane.lock().expect("dataplane").retire() {
        tracing::error!(error = %e, "detaching the socket programs");
    }
    // Flows translated while the copy ran.
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
    *step.shared.dataplane.lock().expect("dataplane") = target;
    Ok(())
}

/// Between nftables and iptables: both render into the kernel's conntrack, which carries
/// every established flow across (with its NAT) whatever rules follow. The target is
/// installed beside the old rules (the first NAT rule to match a new flow decides; both
/// decide alike), then the old rules are removed.
pub(super) fn between(step: &Step, report: &mut SwitchReport) -> Result<(), String> {
    let target = install(step)?;
    if step.injected("copy") {
        return Err(rollback(
            step,
            "a failure injected after the copy (test hook)".into(),
        ));
    }
    report.cutover_ms = step.started.elapsed().as_millis() as u64;
    publish(step.shared, report, "cutting-over");
    let netns = step.netns();
    remove_rules(step.from, netns.as_deref(), iptables_backend(step.pods));
    *step.shared.dataplane.lock().expect("dataplane") = target;
    Ok(())
}
