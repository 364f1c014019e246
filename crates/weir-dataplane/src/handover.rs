//! What the eBPF datapath hands to a netfilter dataplane at a switch: its translated flows
//! (NodePort and LoadBalancer flows with their DNAT and SNAT, ClusterIP flows translated at tc,
//! masqueraded flows), read from the BPF conntrack and written into the kernel's conntrack
//! ([`crate::ctnetlink`]) before the programs are detached. Flows the socket layer translated
//! need nothing: their packets already carry the backend's address, and conntrack picks an
//! established TCP flow up from the middle (`nf_conntrack_tcp_loose`); so do flows between
//! pods. ICMP echo flows are not carried; DSR flows keep the tc programs until they end
//! (`PodDataplane::leave_programs`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use weir_bpf::datapath::{CT_F_CLOSING, CT_F_DSR, CT_F_REPLY, CT_F_SNAT};

use crate::ctnetlink::{Flow, FlowProto};
use crate::pods::PodDataplane;
use crate::DataplaneError;

/// The mark of flows handed over (conntrack entries weir wrote at a switch).
pub const HANDOVER_MARK: u32 = 0x7765_6972;

struct Raw {
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    nat: SocketAddr,
    snat: SocketAddr,
    flags: u16,
    expires: u64,
}

fn flow(r: Raw, now: u64) -> Option<Flow> {
    let proto = match r.proto {
        6 => FlowProto::Tcp,
        17 => FlowProto::Udp,
        _ => return None,
    };
    if r.flags & (CT_F_REPLY | CT_F_DSR | CT_F_CLOSING) != 0 || r.expires <= now {
        return None;
    }
    let dnat = (r.nat != r.dst && !r.nat.ip().is_unspecified()).then_some(r.nat);
    let snat = (r.flags & CT_F_SNAT != 0).then_some(r.snat);
    if dnat.is_none() && snat.is_none() {
        return None;
    }
    Some(Flow {
        proto,
        src: r.src,
        dst: r.dst,
        dnat,
        snat,
        timeout: (r.expires - now).min(u64::from(u32::MAX)) as u32,
        mark: HANDOVER_MARK,
    })
}

fn v4(a: u32, p: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from(a.to_ne_bytes()), u16::from_be(p))
}

fn v6(a: &[u32; 4], p: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(weir_bpf::ip6_from_words(*a)), u16::from_be(p))
}

/// The translated TCP and UDP flows of the BPF conntrack (original direction, live, not
/// closing), both families, without those in `skip`.
pub fn bpf_flows(
    pods: &PodDataplane,
    skip: &BTreeSet<(SocketAddr, SocketAddr)>,
) -> Result<Vec<Flow>, DataplaneError> {
    let now = weir_bpf::datapath::boot_seconds();
    let dp = pods.datapath();
    let mut out = Vec::new();
    for (k, v) in dp.ct_entries()? {
        out.extend(flow(
            Raw {
                proto: k.proto,
                src: v4(k.saddr, k.sport),
                dst: v4(k.daddr, k.dport),
                nat: v4(v.nat_addr, v.nat_port),
                snat: v4(v.snat_addr, v.snat_port),
                flags: v.flags,
                expires: v.expires,
            },
            now,
        ));
    }
    for (k, v) in dp.ct6_entries()? {
        out.extend(flow(
            Raw {
                proto: k.proto,
                src: v6(&k.saddr, k.sport),
                dst: v6(&k.daddr, k.dport),
                nat: v6(&v.nat_addr, v.nat_port),
                snat: v6(&v.snat_addr, v.snat_port),
                flags: v.flags,
                expires: v.expires,
            },
            now,
        ));
    }
    out.retain(|f| !skip.contains(&(f.src, f.dst)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(flags: u16, nat: &str, snat: &str) -> Raw {
        Raw {
            proto: 6,
            src: "172.30.0.2:40000".parse().unwrap(),
            dst: "172.30.0.11:30080".parse().unwrap(),
            nat: nat.parse().unwrap(),
            snat: snat.parse().unwrap(),
            flags,
            expires: 100,
        }
    }

    #[test]
    fn only_live_translated_original_entries_are_handed_over() {
        // A NodePort flow to a remote backend: DNAT and SNAT.
        let f = flow(raw(CT_F_SNAT, "10.244.2.5:8080", "172.30.0.11:50000"), 10).unwrap();
        assert_eq!(f.dnat, Some("10.244.2.5:8080".parse().unwrap()));
        assert_eq!(f.snat, Some("172.30.0.11:50000".parse().unwrap()));
        assert_eq!(f.timeout, 90);
        // A local backend: DNAT only.
        let f = flow(raw(0, "10.244.1.5:8080", "0.0.0.0:0"), 10).unwrap();
        assert_eq!(f.snat, None);
        // Reply entries, DSR, closing and expired flows, untranslated ones: nothing.
        assert!(flow(
            raw(CT_F_REPLY | CT_F_SNAT, "10.244.2.5:8080", "1.1.1.1:1"),
            10
        )
        .is_none());
        assert!(flow(raw(CT_F_DSR, "10.244.2.5:8080", "0.0.0.0:0"), 10).is_none());
        assert!(flow(raw(CT_F_CLOSING, "10.244.2.5:8080", "0.0.0.0:0"), 10).is_none());
        assert!(flow(raw(0, "10.244.2.5:8080", "0.0.0.0:0"), 200).is_none());
        assert!(flow(raw(0, "172.30.0.11:30080", "0.0.0.0:0"), 10).is_none());
    }
}
