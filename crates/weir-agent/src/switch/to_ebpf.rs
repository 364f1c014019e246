//! From nftables or iptables to eBPF:
//!
//! 1. the eBPF dataplane installed alongside: its maps programmed from the desired state, no
//!    program attached (netfilter still carries the traffic);
//! 2. the kernel's conntrack taken over: the events of newly confirmed entries subscribed
//!    first, the BPF conntrack cleared of what an earlier eBPF spell left, then every entry
//!    dumped and written into it
//!    ([`weir_dataplane::takeover`]), the kernel's entries of the TCP flows carried set to
//!    liberal window tracking (while the programs are attached device by device, netfilter
//!    sees one direction of a flow acknowledge data the other took past it);
//! 3. the cut-over: the socket programs attached (new connections to Services are then made
//!    to their backends, needing no NAT from anyone), 100 ms for the SYNs of connects made
//!    just before to reach netfilter, the entries netfilter confirmed since the dump (the
//!    events) taken over, then the tc and XDP programs on the node's devices and every pod's;
//! 4. the entries confirmed while they went on taken over too;
//! 5. the kernel's conntrack and NAT hooks held while flows the node's own processes opened
//!    through netfilter's NAT live ([`weir_dataplane::nft::hold`]; no program sees those
//!    sockets' packets), the netfilter rules removed, and eBPF the node's dataplane.
//!
//! A failure before the programs are all attached detaches them again and leaves netfilter
//! in charge.

use std::collections::HashSet;
use std::net::SocketAddr;

use weir_dataplane::ctnetlink::{Conntrack, Entry, Events};
use weir_dataplane::ebpf::EbpfDataplane;
use weir_dataplane::{takeover, Dataplane};

use super::{iptables_backend, policy_of, publish, remove_rules, Step, SwitchReport};

/// How long the connects made before the socket programs went on are given to reach
/// netfilter's conntrack (see [`run`]).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

fn e(what: &str) -> impl Fn(weir_dataplane::DataplaneError) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Writes `entries` into the BPF conntrack, counting into `report` (`late`: after the cut-over).
fn take_over(
    step: &Step,
    (target, kernel): (&EbpfDataplane, &mut Conntrack),
    entries: &[Entry],
    report: &mut SwitchReport,
    late: bool,
) -> Result<(), String> {
    let pods = step.pods.dataplane.lock().expect("pods");
    let w =
        takeover::write(&pods, target, entries, kernel).map_err(e("writing the BPF conntrack"))?;
    report.flows_copied += w.flows;
    report.verdicts_copied += w.verdicts;
    report.flows_failed += w.failed;
    if late {
        report.flows_copied_after_cutover += w.flows;
    }
    Ok(())
}

/// Takes over what netfilter confirmed since the last look (the events; all of it again if
/// they overran), leaving out what `seen` holds and adding it there. Failures cost those
/// flows, not the switch: they are logged.
fn take_late(
    step: &Step,
    (target, ct, events): (&EbpfDataplane, &mut Conntrack, &mut Events),
    seen: &mut HashSet<(u8, (SocketAddr, SocketAddr))>,
    report: &mut SwitchReport,
) {
    let late = events.drain().or_else(|err| {
        tracing::warn!(error = %err, "conntrack events lost; dumping again");
        ct.dump()
    });
    let late = late
        .map_err(e("reading what netfilter confirmed since the dump"))
        .map(|l| -> Vec<Entry> {
            l.into_iter()
                .filter(|e| seen.insert((e.proto, e.orig)))
                .collect()
        })
        .and_then(|late| take_over(step, (target, ct), &late, report, true));
    if let Err(err) = late {
        tracing::error!(error = %err, "flows confirmed during the copy not taken over");
    }
}

/// Keeps the kernel's conntrack and NAT hooks while flows the node's processes opened through
/// netfilter's NAT live (released by the pod loop when they have ended).
fn hold_node_flows(step: &Step, entries: &[Entry], report: &mut SwitchReport) {
    let node: HashSet<std::net::IpAddr> = {
        let pods = step.pods.dataplane.lock().expect("pods");
        pods.node_addrs().iter().copied().collect()
    };
    let n = takeover::node_nat_flows(entries, &node);
    if n == 0 {
        return;
    }
    match weir_dataplane::nft::hold::hold(step.netns().as_deref()) {
        Ok(()) => {
            tracing::info!(
                flows = n,
                "the kernel goes on translating the node's own flows"
            );
            report.node_flows_held = n;
            *step.pods.nat_hold.lock().expect("nat hold") = Some(true);
        }
        Err(err) => tracing::error!(error = %err, "holding the kernel's NAT for the node's flows"),
    }
}

/// Takes every program away again (but for DSR flows left draining by an earlier switch)
/// and gives NetworkPolicy back to netfilter.
fn detach(step: &Step, target: &mut EbpfDataplane) {
    let mut pods = step.pods.dataplane.lock().expect("pods");
    pods.leave_programs();
    if let Some(p) = policy_of(step.from, iptables_backend(step.pods)) {
        pods.set_netfilter(step.netns(), p);
    }
    if let Err(err) = target.retire() {
        tracing::error!(error = %err, "detaching the socket programs");
    }
}

pub(super) fn run(step: &Step, report: &mut SwitchReport) -> Result<(), String> {
    let opener = step
        .pods
        .config
        .dataplanes
        .as_ref()
        .ok_or("this agent was not told how to open its eBPF dataplane")?;
    let netns = step.netns();
    // 1. Installed alongside: maps only.
    let mut target = EbpfDataplane::new_with(&opener.pins, &opener.cgroup, false)
        .map_err(e("loading the eBPF dataplane"))?;
    target
        .apply(step.state)
        .map_err(e("programming the eBPF dataplane"))?;
    if step.injected("install") {
        return Err("a failure injected after the install (test hook)".into());
    }
    publish(step.shared, report, "copying");
    // 2. The kernel's flows: subscribed first, then dumped, so that none slips between.
    let mut events = Events::subscribe(netns.as_deref()).map_err(e("subscribing"))?;
    let mut ct = Conntrack::open(netns.as_deref()).map_err(e("ctnetlink"))?;
    // What the BPF conntrack still holds from an earlier eBPF spell is stale (those flows
    // went on, or ended, under netfilter); no program reads it now.
    step.pods
        .dataplane
        .lock()
        .expect("pods")
        .ct_flush()
        .map_err(e("clearing the BPF conntrack"))?;
    let entries = ct.dump().map_err(e("dumping the kernel's conntrack"))?;
    take_over(step, (&target, &mut ct), &entries, report, false)?;
    if step.injected("copy") {
        // What was written stays unused (no program reads it) and expires.
        return Err("a failure injected after the copy (test hook)".into());
    }
    // 3. The cut-over. The socket programs first: from then on no connection a pod makes to
    // a Service is NATed by netfilter. Then what netfilter NATed until then is taken over,
    // before the node program can meet its replies. Then tc and XDP on every device.
    report.cutover_ms = step.started.elapsed().as_millis() as u64;
    publish(step.shared, report, "cutting-over");
    let mut seen: HashSet<_> = entries.iter().map(|e| (e.proto, e.orig)).collect();
    if opener.socket_lb {
        if let Err(err) = target.attach_socket_programs() {
            detach(step, &mut target);
            return Err(format!("attaching the socket programs: {err}"));
        }
        // A connect made just before has sent its SYN, but the node may not have NATed and
        // confirmed it yet (the veth's backlog lags under load): a flow taken over only
        // after the tc programs meet its SYN-ACK would have that answer forwarded
        // untranslated (the client resets it). Let such SYNs reach netfilter first.
        std::thread::sleep(SETTLE);
    }
    take_late(step, (&target, &mut ct, &mut events), &mut seen, report);
    step.pods.dataplane.lock().expect("pods").resume_programs();
    if let Err(err) = crate::pods::attach_all(step.pods) {
        detach(step, &mut target);
        return Err(format!("attaching the programs: {err}"));
    }
    // 4. What netfilter confirmed while the programs went on.
    take_late(step, (&target, &mut ct, &mut events), &mut seen, report);
    // 5. Netfilter's rules go; eBPF carries the node. What the node's own processes opened
    // through netfilter's NAT stays the kernel's to translate: its hooks are held.
    hold_node_flows(step, &entries, report);
    remove_rules(step.from, netns.as_deref(), iptables_backend(step.pods));
    *step.shared.dataplane.lock().expect("dataplane") = Box::new(target);
    // The socket layer reports its translations from now on.
    if let Err(e) = crate::spawn_translation_events(step.shared) {
        tracing::warn!(error = %e, "reading the socket layer's translations");
    }
    Ok(())
}
