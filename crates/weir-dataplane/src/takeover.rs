//! What the eBPF datapath takes over from a netfilter dataplane at a switch: the kernel's
//! conntrack entries ([`crate::ctnetlink::Conntrack::dump`], then the events of entries
//! confirmed meanwhile), written into the BPF conntrack before the programs are attached.
//!
//! - A flow weir's Service rules translated (its reply comes from a backend the eBPF
//!   dataplane knows, for a frontend it programs) becomes a pair of entries, original and
//!   reply, with the DNAT and the SNAT netfilter chose: its next packets are translated by
//!   the programs exactly as netfilter did.
//! - A pod's masqueraded flow (its replies come back to the node's SNAT address) becomes a
//!   masquerade pair.
//! - Every flow of a local pod gets a policy conntrack entry with a verdict from an older
//!   policy revision: its next packet, in either direction, has the flow judged again in its
//!   original direction under the current policy (an allowed flow goes on; one the policy
//!   denies is cut, as the eBPF datapath does for any policy change). Without it, a reply
//!   arriving first would be judged as a new flow from the server.
//!
//! Flows in TIME_WAIT or closed, and anything without ports, are left behind. Flows the node's
//! own processes opened to a Service (DNATed in netfilter's output hook) stay the kernel's:
//! the eBPF datapath translates those at connect(), no program sees a connected socket's
//! later packets, and the kernel's conntrack keeps translating them as long as a NAT chain
//! hooks the node's packets ([`crate::nft::hold`], while [`node_nat_flows`] counts some).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use weir_bpf::datapath::{ct4_entry, ct4_key, ct6_entry, ct6_key, pct_entry};
use weir_bpf::datapath::{
    CT_F_CLOSING, CT_F_ESTABLISHED, CT_F_MASQ, CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SNAT, CT_F_TAKEN,
};
use weir_control::lb::Proto;

use crate::ctnetlink::{tcp_state, Conntrack, Entry, STATUS_DYING, STATUS_SEEN_REPLY};
use crate::ebpf::EbpfDataplane;
use crate::pods::PodDataplane;
use crate::DataplaneError;

/// BPF conntrack lifetimes (seconds), as `bpf/include/weir/api/datapath.h` has them.
const LIFETIME_TCP_ESTABLISHED: u32 = 21600;
const LIFETIME_TCP_SYN: u32 = 60;
const LIFETIME_TCP_CLOSING: u32 = 10;
const LIFETIME_OTHER: u32 = 60;

/// One BPF conntrack entry, family-neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// Protocol number.
    pub proto: u8,
    /// The key: (source, destination) of the packets it matches.
    pub key: (SocketAddr, SocketAddr),
    /// Original: the backend (or the destination, masquerading); reply: the frontend.
    pub nat: SocketAddr,
    /// Original: the SNAT address and port; reply: the client. None without SNAT.
    pub snat: Option<SocketAddr>,
    /// `CT_F_*`.
    pub flags: u16,
    /// Seconds to live.
    pub lifetime: u32,
    /// The frontend's and backend's ids (0 for masquerading).
    pub ids: (u32, u32),
}

/// What one kernel entry becomes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The translation pair (original, reply), if weir translated the flow.
    pub nat: Option<(CtEntry, CtEntry)>,
    /// The policy conntrack key (the flow after DNAT, before SNAT), if a local pod is in it.
    pub policy: Option<(u8, SocketAddr, SocketAddr, u16, u32)>,
}

/// What the node knows to read kernel entries with.
pub struct Context<'a> {
    /// The ids of a (frontend, protocol, backend), when the eBPF dataplane programs them.
    pub ids: &'a dyn Fn(SocketAddr, Proto, SocketAddr) -> Option<(u32, u32)>,
    /// The node's local pods' addresses.
    pub pods: &'a HashSet<IpAddr>,
    /// The node's own addresses (flows its processes opened stay the kernel's).
    pub node: &'a HashSet<IpAddr>,
    /// The node's IPv4 SNAT address (masquerading).
    pub snat4: Option<IpAddr>,
}

/// The BPF state flags and lifetime of a kernel entry, or None when it is over.
fn state(e: &Entry) -> Option<(u16, u32)> {
    let seen = if e.status & STATUS_SEEN_REPLY != 0 {
        CT_F_SEEN_REPLY
    } else {
        0
    };
    let (flags, lifetime) = match (e.proto, e.tcp_state) {
        (6, Some(tcp_state::ESTABLISHED)) => {
            (CT_F_SEEN_REPLY | CT_F_ESTABLISHED, LIFETIME_TCP_ESTABLISHED)
        }
        (6, Some(s)) if (tcp_state::FIN_WAIT..=tcp_state::LAST_ACK).contains(&s) => (
            CT_F_SEEN_REPLY | CT_F_ESTABLISHED | CT_F_CLOSING,
            LIFETIME_TCP_CLOSING,
        ),
        (6, Some(tcp_state::SYN_SENT | tcp_state::SYN_RECV)) => (seen, LIFETIME_TCP_SYN),
        (6, _) => return None,
        (17, _) => (seen, LIFETIME_OTHER),
        _ => return None,
    };
    Some((flags, lifetime.min(e.timeout.max(1))))
}

/// What the kernel entry `e` becomes in the BPF conntrack (see the module's text).
pub fn plan(e: &Entry, cx: &Context) -> Plan {
    let mut out = Plan::default();
    let Some((flags, lifetime)) = state(e) else {
        return out;
    };
    if e.status & STATUS_DYING != 0 {
        return out;
    }
    let ((client, frontend), (backend, back_to)) = (e.orig, e.reply);
    let snat = (back_to != client).then_some(back_to);
    let snat_flag = if snat.is_some() { CT_F_SNAT } else { 0 } | CT_F_TAKEN;
    let pair = |nat_flags: u16, ids: (u32, u32)| {
        (
            CtEntry {
                proto: e.proto,
                key: (client, frontend),
                nat: backend,
                snat,
                flags: flags | nat_flags | snat_flag,
                lifetime,
                ids,
            },
            CtEntry {
                proto: e.proto,
                key: (backend, back_to),
                nat: frontend,
                snat: snat.map(|_| client),
                flags: flags | nat_flags | snat_flag | CT_F_REPLY,
                lifetime,
                ids,
            },
        )
    };
    if backend != frontend && !cx.node.contains(&client.ip()) {
        let proto = Proto::from_number(e.proto);
        if let Some(ids) = proto.and_then(|p| (cx.ids)(frontend, p, backend)) {
            out.nat = Some(pair(0, ids));
        }
    } else if snat.is_some_and(|s| Some(s.ip()) == cx.snat4) && cx.pods.contains(&client.ip()) {
        out.nat = Some(pair(CT_F_MASQ, (0, 0)));
    }
    if cx.pods.contains(&client.ip()) || cx.pods.contains(&backend.ip()) {
        out.policy = Some((e.proto, client, backend, flags, lifetime));
    }
    out
}

/// Of the kernel's entries, the live flows the node's own processes (a source in `node`)
/// opened to an address netfilter translated: what the kernel must go on translating after a
/// switch to eBPF ([`crate::nft::hold`]).
pub fn node_nat_flows(entries: &[Entry], node: &HashSet<IpAddr>) -> usize {
    entries
        .iter()
        .filter(|e| {
            node.contains(&e.orig.0.ip())
                && e.orig.1 != e.reply.0
                && e.status & STATUS_DYING == 0
                && state(e).is_some()
        })
        .count()
}

/// What a takeover wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Translated flows (pairs of entries).
    pub flows: usize,
    /// Policy conntrack entries.
    pub verdicts: usize,
    /// Entries that could not be written.
    pub failed: usize,
}

fn sock4(a: SocketAddr) -> (u32, u16) {
    match a.ip() {
        IpAddr::V4(v4) => (u32::from_ne_bytes(v4.octets()), a.port().to_be()),
        IpAddr::V6(_) => (0, 0),
    }
}

fn sock6(a: SocketAddr) -> ([u32; 4], u16) {
    match a.ip() {
        IpAddr::V6(v6) => (weir_bpf::ip6_words(v6), a.port().to_be()),
        IpAddr::V4(_) => ([0; 4], 0),
    }
}

fn key4(proto: u8, (s, d): (SocketAddr, SocketAddr)) -> ct4_key {
    let ((saddr, sport), (daddr, dport)) = (sock4(s), sock4(d));
    ct4_key {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        ..Default::default()
    }
}

fn key6(proto: u8, (s, d): (SocketAddr, SocketAddr)) -> ct6_key {
    let ((saddr, sport), (daddr, dport)) = (sock6(s), sock6(d));
    ct6_key {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        ..Default::default()
    }
}

fn put_ct(pods: &PodDataplane, c: &CtEntry, now: u64) -> Result<(), DataplaneError> {
    let dp = pods.datapath();
    let expires = now + u64::from(c.lifetime);
    let snat = c.snat.unwrap_or(SocketAddr::new(
        if c.nat.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ));
    // One body for both families' entry types, which share these fields.
    macro_rules! entry {
        ($ty:ident, $sock:ident) => {{
            let ((nat_addr, nat_port), (snat_addr, snat_port)) = ($sock(c.nat), $sock(snat));
            $ty {
                expires,
                nat_addr,
                snat_addr,
                nat_port,
                snat_port,
                svc_id: c.ids.0,
                backend_id: c.ids.1,
                flags: c.flags,
                ..Default::default()
            }
        }};
    }
    if c.key.0.is_ipv4() {
        dp.ct_put(&key4(c.proto, c.key), &entry!(ct4_entry, sock4))?;
    } else {
        dp.ct6_put(&key6(c.proto, c.key), &entry!(ct6_entry, sock6))?;
    }
    Ok(())
}

fn put_policy(
    pods: &PodDataplane,
    (proto, src, dst, flags, lifetime): (u8, SocketAddr, SocketAddr, u16, u32),
    revision: u32,
    now: u64,
) -> Result<(), DataplaneError> {
    let v = pct_entry {
        expires: now + u64::from(lifetime),
        revision,
        flags,
        ..Default::default()
    };
    let dp = pods.datapath();
    if src.is_ipv4() {
        dp.pct4_put(&key4(proto, (src, dst)), &v)?;
    } else {
        dp.pct6_put(&key6(proto, (src, dst)), &v)?;
    }
    Ok(())
}

/// Writes what the kernel entries `entries` become into the pod datapath's conntrack maps,
/// with the ids `ebpf` programmed. The kernel's entries of the TCP flows carried are set to
/// liberal window tracking through `kernel` ([`Conntrack::loosen`]): until the cut-over
/// ends, one direction of a flow may pass the programs while the other still passes
/// netfilter.
pub fn write(
    pods: &PodDataplane,
    ebpf: &EbpfDataplane,
    entries: &[Entry],
    kernel: &mut Conntrack,
) -> Result<Written, DataplaneError> {
    let now = weir_bpf::datapath::boot_seconds();
    // A revision no flow was judged under: the flow is judged again on its next packet.
    let stale = pods.datapath().policy_revision()?.wrapping_sub(1);
    let local: HashSet<IpAddr> = pods.local_pod_addrs().collect();
    let node: HashSet<IpAddr> = pods.node_addrs().iter().copied().collect();
    let ids = |f, p, b| ebpf.flow_ids(f, p, b);
    let cx = Context {
        ids: &ids,
        pods: &local,
        node: &node,
        snat4: pods.snat4().map(IpAddr::V4),
    };
    let mut w = Written::default();
    for e in entries {
        let p = plan(e, &cx);
        if let Some((orig, reply)) = &p.nat {
            // The reply entry first: the original one is what makes the programs translate.
            match put_ct(pods, reply, now).and_then(|_| put_ct(pods, orig, now)) {
                Ok(()) => w.flows += 1,
                Err(err) => {
                    tracing::warn!(error = %err, entry = ?e, "a flow not taken over");
                    w.failed += 1;
                }
            }
        }
        if let Some(k) = p.policy {
            match put_policy(pods, k, stale, now) {
                Ok(()) => w.verdicts += 1,
                Err(_) => w.failed += 1,
            }
        }
        if e.proto == 6 && (p.nat.is_some() || p.policy.is_some()) {
            if let Err(err) = kernel.loosen(e) {
                tracing::warn!(error = %err, "an entry's window tracking left strict");
            }
        }
    }
    Ok(w)
}

/// How many flows taken over are still live in the BPF conntrack (original entries).
pub fn count_taken(pods: &PodDataplane) -> Result<usize, DataplaneError> {
    let now = weir_bpf::datapath::boot_seconds();
    let dp = pods.datapath();
    let live = |flags: u16, expires: u64| {
        flags & (CT_F_TAKEN | CT_F_REPLY) == CT_F_TAKEN && expires >= now
    };
    Ok(dp
        .ct_entries()?
        .iter()
        .filter(|(_, v)| live(v.flags, v.expires))
        .count()
        + dp.ct6_entries()?
            .iter()
            .filter(|(_, v)| live(v.flags, v.expires))
            .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(orig: (&str, &str), reply: (&str, &str), state: u8) -> Entry {
        Entry {
            proto: 6,
            orig: (orig.0.parse().unwrap(), orig.1.parse().unwrap()),
            reply: (reply.0.parse().unwrap(), reply.1.parse().unwrap()),
            status: STATUS_SEEN_REPLY,
            tcp_state: Some(state),
            timeout: 432000,
            mark: 0,
        }
    }

    fn with<R>(f: impl FnOnce(&Context) -> R) -> R {
        let pods: HashSet<IpAddr> = ["10.244.1.2".parse().unwrap()].into();
        let node: HashSet<IpAddr> = ["172.30.0.11".parse().unwrap()].into();
        let ids = |fe: SocketAddr, _p, be: SocketAddr| {
            (fe.port() == 30080 || fe.port() == 80).then_some((7, u32::from(be.port() == 8080)))
        };
        f(&Context {
            ids: &ids,
            pods: &pods,
            node: &node,
            snat4: Some("172.30.0.11".parse().unwrap()),
        })
    }

    #[test]
    fn a_nodeport_flow_becomes_a_translation_pair() {
        let e = entry(
            ("172.30.0.2:40000", "172.30.0.11:30080"),
            ("10.244.2.5:8080", "172.30.0.11:61234"),
            tcp_state::ESTABLISHED,
        );
        let p = with(|cx| plan(&e, cx));
        let (fe, re) = p.nat.unwrap();
        assert_eq!(fe.key, e.orig);
        assert_eq!(fe.nat, "10.244.2.5:8080".parse().unwrap());
        assert_eq!(fe.snat, Some("172.30.0.11:61234".parse().unwrap()));
        assert_eq!(
            fe.flags,
            CT_F_SEEN_REPLY | CT_F_ESTABLISHED | CT_F_SNAT | CT_F_TAKEN
        );
        assert_eq!(fe.lifetime, LIFETIME_TCP_ESTABLISHED);
        assert_eq!(fe.ids, (7, 1));
        assert_eq!(re.key, e.reply);
        assert_eq!(re.nat, "172.30.0.11:30080".parse().unwrap());
        assert_eq!(re.snat, Some("172.30.0.2:40000".parse().unwrap()));
        assert_eq!(re.flags, fe.flags | CT_F_REPLY);
        // Neither end is a local pod: no policy entry.
        assert_eq!(p.policy, None);
    }

    #[test]
    fn a_pods_clusterip_flow_and_its_policy_entry() {
        let e = entry(
            ("10.244.1.2:5000", "10.96.0.10:80"),
            ("10.244.2.5:8080", "10.244.1.2:5000"),
            tcp_state::ESTABLISHED,
        );
        let p = with(|cx| plan(&e, cx));
        let (fe, re) = p.nat.unwrap();
        assert_eq!((fe.snat, re.snat), (None, None));
        assert_eq!(re.key, e.reply);
        // The policy key: after DNAT, before SNAT.
        let (_, src, dst, ..) = p.policy.unwrap();
        assert_eq!((src, dst), (e.orig.0, "10.244.2.5:8080".parse().unwrap()));
    }

    #[test]
    fn masquerading_other_nat_and_finished_flows() {
        // A local pod's flow out, masqueraded to the node's address.
        let e = entry(
            ("10.244.1.2:5000", "172.30.0.2:80"),
            ("172.30.0.2:80", "172.30.0.11:5000"),
            tcp_state::ESTABLISHED,
        );
        let (fe, re) = with(|cx| plan(&e, cx)).nat.unwrap();
        assert_eq!(fe.flags & (CT_F_MASQ | CT_F_SNAT), CT_F_MASQ | CT_F_SNAT);
        assert_eq!(fe.nat, e.orig.1);
        assert_eq!(re.snat, Some(e.orig.0));
        // Somebody else's SNAT (not a local pod), another address: left alone.
        let e = entry(
            ("10.9.9.9:5000", "172.30.0.2:80"),
            ("172.30.0.2:80", "172.30.0.11:5000"),
            tcp_state::ESTABLISHED,
        );
        assert_eq!(with(|cx| plan(&e, cx)), Plan::default());
        // A DNAT to an address weir does not program: no pair.
        let e = entry(
            ("172.30.0.2:40000", "172.30.0.11:9999"),
            ("10.244.2.5:8080", "172.30.0.2:40000"),
            tcp_state::ESTABLISHED,
        );
        assert_eq!(with(|cx| plan(&e, cx)).nat, None);
        // The node's own process to a ClusterIP: the kernel's.
        let e = entry(
            ("172.30.0.11:5000", "10.96.0.10:80"),
            ("10.244.2.5:8080", "172.30.0.11:5000"),
            tcp_state::ESTABLISHED,
        );
        assert_eq!(with(|cx| plan(&e, cx)), Plan::default());
        assert_eq!(
            with(|cx| node_nat_flows(std::slice::from_ref(&e), cx.node)),
            1
        );
        // TIME_WAIT: over.
        let e = entry(
            ("10.244.1.2:5000", "10.96.0.10:80"),
            ("10.244.2.5:8080", "10.244.1.2:5000"),
            tcp_state::TIME_WAIT,
        );
        assert_eq!(with(|cx| plan(&e, cx)), Plan::default());
        // Closing: a short lifetime; UDP: the kernel's timeout when shorter.
        let mut e = entry(
            ("10.244.1.2:5000", "10.96.0.10:80"),
            ("10.244.2.5:8080", "10.244.1.2:5000"),
            tcp_state::FIN_WAIT,
        );
        let (fe, _) = with(|cx| plan(&e, cx)).nat.unwrap();
        assert_eq!(fe.lifetime, LIFETIME_TCP_CLOSING);
        assert_ne!(fe.flags & CT_F_CLOSING, 0);
        e.proto = 17;
        e.tcp_state = None;
        e.timeout = 25;
        let (fe, _) = with(|cx| plan(&e, cx)).nat.unwrap();
        assert_eq!((fe.lifetime, fe.flags), (25, CT_F_SEEN_REPLY | CT_F_TAKEN));
    }
}
