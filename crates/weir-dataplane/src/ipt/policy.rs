//! NetworkPolicy in iptables (pure): the compiled `PolicyState` as one filter-table restore
//! per family, the way Calico's iptables mode judges (an accept bit in the packet mark, set
//! by peer chains, checked at the end of the pod's chain):
//!
//! ```text
//! FORWARD -> WEIR-POLICY-FWD   conntrack ESTABLISHED,RELATED RETURN
//!                              -i <pod veth> -j WEIR-OUT-<veth>; -o <pod veth> -j WEIR-IN-<veth>
//! INPUT   -> WEIR-POLICY-IN    conntrack ESTABLISHED,RELATED RETURN; -i <pod veth> -j WEIR-OUT-<veth>
//! WEIR-IN-<veth>   hairpin mark RETURN; clear the bit; -j WEIR-PS-host;
//!                  per entry: [-p P [--dport LO:HI]] -j WEIR-PS-<peer> (any peer: set the bit)
//!                  bit set: RETURN; DROP
//! WEIR-OUT-<veth>  the same with WEIR-PD-<peer> (destination addresses)
//! WEIR-PS-<peer>   -s <prefix> -j MARK --or-mark BIT   per prefix of the peer's addresses
//! ```
//!
//! Allowed flows RETURN rather than ACCEPT: weir only drops what policy denies and leaves the
//! rest to the node's other rules.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::net::IpAddr;

use weir_control::policy::{id, PolicyEntry, PolicyState};

use crate::nft::expr::Family;
use crate::nft::policy::{device_entries, peer_spans, peers_of, Span};
use crate::nft::render::MARK_HAIRPIN;

/// Mark bit: a peer chain matched the flow (the policy allows it).
pub const MARK_ALLOW: u32 = 0x10000;

/// The kernel chains the policy hooks: (kernel chain, weir's chain).
pub const HOOKS: [(&str, &str); 2] = [("FORWARD", "WEIR-POLICY-FWD"), ("INPUT", "WEIR-POLICY-IN")];

fn peer_name(peer: u32) -> String {
    match peer {
        id::HOST => "host".into(),
        id::WORLD => "world".into(),
        id::REMOTE_NODE => "remote-node".into(),
        id::CLUSTER => "cluster".into(),
        p if p >= id::NS_BASE => format!("nsc-{}", p - id::NS_BASE),
        p if p >= id::CIDR_BASE => format!("cidr-{}", p - id::CIDR_BASE),
        p => format!("id-{p}"),
    }
}

/// The last address of the block of 2^`size_bits` addresses starting at `at`, if it exists.
fn block_last(at: u128, size_bits: u32) -> Option<u128> {
    if size_bits >= 128 {
        return (at == 0).then_some(u128::MAX);
    }
    at.checked_add((1u128 << size_bits) - 1)
}

/// The CIDR prefixes that cover the span exactly.
fn prefixes(f: Family, (lo, hi): Span) -> Vec<String> {
    let bits: u32 = if f == Family::Ip { 32 } else { 128 };
    let mut out = Vec::new();
    let mut at = lo;
    loop {
        // The largest aligned block starting at `at` that stays within `hi`.
        let mut size_bits = if at == 0 {
            bits
        } else {
            at.trailing_zeros().min(bits)
        };
        let mut end = block_last(at, size_bits);
        while size_bits > 0 && end.is_none_or(|l| l > hi) {
            size_bits -= 1;
            end = block_last(at, size_bits);
        }
        let end = end.unwrap_or(at);
        let addr = match f {
            Family::Ip => std::net::Ipv4Addr::from(at as u32).to_string(),
            Family::Ip6 => std::net::Ipv6Addr::from(at).to_string(),
        };
        out.push(format!("{addr}/{}", bits - size_bits));
        if end >= hi {
            return out;
        }
        at = end + 1;
    }
}

/// The match of an entry's protocol and ports (empty: every protocol).
fn proto_match(e: &PolicyEntry) -> String {
    if e.proto == 0 {
        return String::new();
    }
    let name = match e.proto {
        6 => "tcp",
        17 => "udp",
        132 => "sctp",
        1 => "icmp",
        58 => "ipv6-icmp",
        _ => "",
    };
    let p = if name.is_empty() {
        e.proto.to_string()
    } else {
        name.to_string()
    };
    if e.port_bits == 0 || !matches!(e.proto, 6 | 17 | 132) {
        return format!("-p {p} ");
    }
    let lo = u32::from(e.port);
    let hi = lo + (1u32 << (16 - u32::from(e.port_bits))) - 1;
    let ports = if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}:{hi}")
    };
    format!("-p {p} -m {p} --dport {ports} ")
}

/// The filter-table restore (for `--noflush`) of family `f`'s policy: every chain declared
/// and filled, `stale` chains (of an earlier state) deleted. `ip_dev` gives each local pod
/// address's host-side device name.
pub fn render(
    f: Family,
    state: &PolicyState,
    ip_dev: &HashMap<IpAddr, String>,
    stale: &[String],
) -> String {
    let devices = device_entries(state, ip_dev);
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut fwd = vec!["-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_string()];
    let mut input = fwd.clone();
    let allow = format!("-j MARK --or-mark 0x{MARK_ALLOW:x}");
    for p in peers_of(&devices) {
        let spans = peer_spans(state, p).unwrap_or_default();
        let rules: Vec<String> = spans
            .get(&f)
            .into_iter()
            .flatten()
            .flat_map(|s| prefixes(f, *s))
            .collect();
        for (dir, flag) in [("PS", "-s"), ("PD", "-d")] {
            chains.insert(
                format!("WEIR-{dir}-{}", peer_name(p)),
                rules
                    .iter()
                    .map(|n| format!("{flag} {n} {allow}"))
                    .collect(),
            );
        }
    }
    for (dev, (ingress, egress)) in &devices {
        for (dir, entries, peers) in [("IN", ingress, "PS"), ("OUT", egress, "PD")] {
            let Some(entries) = entries else { continue };
            let chain = format!("WEIR-{dir}-{dev}");
            let mut rules = Vec::new();
            if dir == "IN" {
                rules.push(format!(
                    "-m mark --mark 0x{MARK_HAIRPIN:x}/0x{MARK_HAIRPIN:x} -j RETURN"
                ));
            }
            rules.push(format!("-j MARK --and-mark 0x{:x}", !MARK_ALLOW));
            if dir == "IN" {
                rules.push(format!("-j WEIR-{peers}-host"));
            }
            for e in entries.keys() {
                let target = if e.peer == id::ANY {
                    allow.clone()
                } else {
                    format!("-j WEIR-{peers}-{}", peer_name(e.peer))
                };
                rules.push(format!("{}{target}", proto_match(e)));
            }
            rules.push(format!(
                "-m mark --mark 0x{MARK_ALLOW:x}/0x{MARK_ALLOW:x} -j RETURN"
            ));
            rules.push("-j DROP".to_string());
            chains.insert(chain.clone(), rules);
            if dir == "IN" {
                fwd.push(format!("-o {dev} -j {chain}"));
            } else {
                fwd.push(format!("-i {dev} -j {chain}"));
                input.push(format!("-i {dev} -j {chain}"));
            }
        }
    }
    chains.insert("WEIR-POLICY-FWD".into(), fwd);
    chains.insert("WEIR-POLICY-IN".into(), input);
    let mut out = String::from("*filter\n");
    for n in chains.keys().chain(stale.iter()) {
        let _ = writeln!(out, ":{n} - [0:0]");
    }
    for (n, rules) in &chains {
        for r in rules {
            let _ = writeln!(out, "-A {n} {r}");
        }
    }
    for n in stale.iter().filter(|n| !chains.contains_key(*n)) {
        let _ = writeln!(out, "-X {n}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Whether `chain` is one of the policy's per-device or peer chains.
pub fn is_policy_chain(chain: &str) -> bool {
    ["WEIR-IN-", "WEIR-OUT-", "WEIR-PS-", "WEIR-PD-"]
        .iter()
        .any(|p| chain.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_become_exact_prefixes() {
        let v4 = |a: &str| u128::from(u32::from(a.parse::<std::net::Ipv4Addr>().unwrap()));
        assert_eq!(
            prefixes(Family::Ip, (v4("10.0.0.0"), v4("10.0.0.255"))),
            vec!["10.0.0.0/24"]
        );
        assert_eq!(
            prefixes(Family::Ip, (v4("10.0.0.1"), v4("10.0.0.6"))),
            vec!["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(
            prefixes(Family::Ip, (0, u128::from(u32::MAX))),
            vec!["0.0.0.0/0"]
        );
        assert_eq!(prefixes(Family::Ip6, (0, u128::MAX)), vec!["::/0"]);
    }
}
