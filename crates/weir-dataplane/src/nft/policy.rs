//! NetworkPolicy in nftables (pure): the same compiled state the eBPF pod datapath programs
//! (`weir_control::policy::PolicyState`) rendered into one table, `inet weir-policy`,
//! rewritten whole in one transaction when it changes.
//!
//! ```text
//! forward (filter, 0)  ct state established,related accept
//!                      iif vmap @egress  { <pod ifindex> : jump out-<ifindex> }
//!                      oif vmap @ingress { <pod ifindex> : jump in-<ifindex> }
//! input   (filter, 0)  ct state established,related accept
//!                      iif vmap @egress                      (a pod reaching its node)
//! in-<ifindex>         mark hairpin return                    (the pod itself, via its Service)
//!                      saddr @host return                     (the node reaches its pods)
//!                      [saddr @peer4-<id>] [l4proto P] [th dport LO-HI] return   per entry
//!                      drop
//! out-<ifindex>        [daddr @peer4-<id>] [l4proto P] [th dport LO-HI] return   per entry
//!                      drop
//! ```
//!
//! A peer's set holds what the eBPF datapath's lookups would match: the addresses whose ipcache
//! identity is the peer, whose namespace class is (pods only), every pod for the class
//! "every pod", and for a CIDR identity the addresses whose longest ipBlock prefix is it. The
//! peer "world" is every address the ipcache does not hold. Established flows are not judged
//! again (a policy change applies to new flows; the eBPF datapath also cuts the old ones).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Value};
use weir_control::policy::{id, PolicyEntries, PolicyEntry, PolicyState};

use super::expr::{self as x, Family};

/// The table NetworkPolicy is rendered into.
pub const TABLE: &str = "weir-policy";

/// A pod device's allowed ingress and egress entries (None: that direction is open).
pub(crate) type Directions<'a> = (Option<&'a PolicyEntries>, Option<&'a PolicyEntries>);

/// An inclusive address range of one family, as integers.
pub(crate) type Span = (u128, u128);

fn span_of(net: &IpNet) -> Span {
    match net {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn addr_of(f: Family, v: u128) -> String {
    match f {
        Family::Ip => std::net::Ipv4Addr::from(v as u32).to_string(),
        Family::Ip6 => std::net::Ipv6Addr::from(v).to_string(),
    }
}

fn family_of(net: &IpNet) -> Family {
    Family::of(net.addr())
}

/// `outer` without every span of `holes` (sorted by start, possibly overlapping).
fn subtract(outer: Span, holes: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    let mut next = outer.0;
    for h in holes {
        if h.1 < next || h.0 > outer.1 {
            continue;
        }
        if h.0 > next {
            out.push((next, h.0 - 1));
        }
        if h.1 >= outer.1 {
            return out;
        }
        next = next.max(h.1 + 1);
    }
    out.push((next, outer.1));
    out
}

/// Sorted, merged spans.
fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort();
    let mut out: Vec<Span> = Vec::new();
    for s in spans {
        match out.last_mut() {
            Some(last) if s.0 <= last.1.saturating_add(1) => last.1 = last.1.max(s.1),
            _ => out.push(s),
        }
    }
    out
}

/// The addresses (per family) the peer `peer` matches, or None for "any address".
pub(crate) fn peer_spans(state: &PolicyState, peer: u32) -> Option<BTreeMap<Family, Vec<Span>>> {
    let mut out: BTreeMap<Family, Vec<Span>> = BTreeMap::new();
    let mut add = |net: &IpNet| out.entry(family_of(net)).or_default().push(span_of(net));
    match peer {
        id::ANY => return None,
        id::WORLD => {
            // Everything the ipcache does not hold.
            let mut known: BTreeMap<Family, Vec<Span>> = BTreeMap::new();
            for net in state.ipcache.keys() {
                known.entry(family_of(net)).or_default().push(span_of(net));
            }
            let mut world = BTreeMap::new();
            for f in [Family::Ip, Family::Ip6] {
                let all = match f {
                    Family::Ip => (0, u128::from(u32::MAX)),
                    Family::Ip6 => (0, u128::MAX),
                };
                let holes = merge(known.remove(&f).unwrap_or_default());
                world.insert(f, subtract(all, &holes));
            }
            return Some(world);
        }
        id::CLUSTER => {
            for (net, e) in &state.ipcache {
                if e.ns_class != 0 {
                    add(net);
                }
            }
        }
        p if p >= id::NS_BASE => {
            for (net, e) in &state.ipcache {
                if e.ns_class == p {
                    add(net);
                }
            }
        }
        p if p >= id::CIDR_BASE => {
            // Longest-prefix semantics: the prefix without its more specific ipBlock prefixes.
            for (net, c) in state.cidrs.iter().filter(|(_, c)| **c == p) {
                let mut holes: Vec<Span> = state
                    .cidrs
                    .iter()
                    .filter(|(o, oc)| {
                        **oc != *c && o.prefix_len() > net.prefix_len() && net.contains(*o)
                    })
                    .map(|(o, _)| span_of(o))
                    .collect();
                holes.sort();
                for s in subtract(span_of(net), &holes) {
                    out.entry(family_of(net)).or_default().push(s);
                }
            }
        }
        p => {
            for (net, e) in &state.ipcache {
                if e.identity == p {
                    add(net);
                }
            }
        }
    }
    Some(out.into_iter().map(|(f, v)| (f, merge(v))).collect())
}

fn set_name(f: Family, peer: u32) -> String {
    let v = if f == Family::Ip { 4 } else { 6 };
    match peer {
        id::HOST => format!("host{v}"),
        id::WORLD => format!("world{v}"),
        id::REMOTE_NODE => format!("remote-node{v}"),
        id::CLUSTER => format!("cluster{v}"),
        p if p >= id::NS_BASE => format!("ns-class{v}-{}", p - id::NS_BASE),
        p if p >= id::CIDR_BASE => format!("cidr{v}-{}", p - id::CIDR_BASE),
        p => format!("identity{v}-{p}"),
    }
}

fn named(name: &str) -> Value {
    json!({"family": "inet", "table": TABLE, "name": name})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    x::cmd(
        "add",
        "rule",
        json!({"family": "inet", "table": TABLE, "chain": chain, "expr": expr}),
    )
}

/// The statements of one entry in a direction (`field` is `saddr` for ingress, `daddr` for
/// egress): one list per family whose peer set is not empty.
fn entry_rules(
    e: &PolicyEntry,
    field: &str,
    sets: &BTreeMap<(Family, u32), usize>,
) -> Vec<Vec<Value>> {
    let mut tail = Vec::new();
    if e.proto != 0 {
        tail.push(x::eq(x::meta("l4proto"), json!(e.proto)));
        if e.port_bits > 0 {
            let span = 1u32 << (16 - u32::from(e.port_bits));
            let lo = u32::from(e.port);
            let hi = lo + span - 1;
            let ports = if lo == hi {
                json!(lo)
            } else {
                x::range(json!(lo), json!(hi))
            };
            tail.push(x::eq(x::th_dport(), ports));
        }
    }
    tail.push(json!({"return": null}));
    if e.peer == id::ANY {
        return vec![tail];
    }
    [Family::Ip, Family::Ip6]
        .into_iter()
        .filter(|f| sets.get(&(*f, e.peer)).is_some_and(|n| *n > 0))
        .map(|f| {
            let mut r = vec![x::eq(x::addr(f, field), x::set_ref(&set_name(f, e.peer)))];
            r.extend(tail.iter().cloned());
            r
        })
        .collect()
}

/// Per pod device (as `ip_dev` names it), its ingress and egress entries, for the devices
/// some policy isolates (a pod's addresses share one device).
pub(crate) fn device_entries<'a, D: Ord + Clone>(
    state: &'a PolicyState,
    ip_dev: &HashMap<IpAddr, D>,
) -> BTreeMap<D, Directions<'a>> {
    let mut devices: BTreeMap<D, Directions> = BTreeMap::new();
    for ep in state.endpoints.values() {
        for dev in ep.ips.iter().filter_map(|ip| ip_dev.get(ip)) {
            let d = devices.entry(dev.clone()).or_default();
            d.0 = d.0.or(ep.ingress.as_ref());
            d.1 = d.1.or(ep.egress.as_ref());
        }
    }
    devices.retain(|_, (i, e)| i.is_some() || e.is_some());
    devices
}

/// The peers the entries of `devices` name (not "any"), and the host.
pub(crate) fn peers_of(devices: &BTreeMap<impl Ord, Directions>) -> BTreeSet<u32> {
    let mut peers: BTreeSet<u32> = devices
        .values()
        .flat_map(|(i, e)| {
            i.iter()
                .chain(e.iter())
                .flat_map(|s| s.keys().map(|e| e.peer))
        })
        .filter(|p| *p != id::ANY)
        .collect();
    peers.insert(id::HOST);
    peers
}

/// The commands that replace the policy table with `state`'s, for the local pods whose
/// host-side devices `ip_ifindex` gives (address -> ifindex). With no isolated pod the table
/// is removed.
pub fn render(state: &PolicyState, ip_ifindex: &HashMap<IpAddr, u32>) -> Vec<Value> {
    let t = json!({"family": "inet", "name": TABLE});
    let mut c = vec![
        x::cmd("add", "table", t.clone()),
        x::cmd("delete", "table", t.clone()),
    ];
    let devices = device_entries(state, ip_ifindex);
    if devices.is_empty() {
        return c;
    }
    c.push(x::cmd("add", "table", t));
    // The peers' sets (the host's too: it always reaches its pods).
    let peers = peers_of(&devices);
    let mut sizes: BTreeMap<(Family, u32), usize> = BTreeMap::new();
    for p in &peers {
        let spans = peer_spans(state, *p).unwrap_or_default();
        for f in [Family::Ip, Family::Ip6] {
            let v = spans.get(&f).cloned().unwrap_or_default();
            sizes.insert((f, *p), v.len());
            if v.is_empty() {
                continue;
            }
            let name = set_name(f, *p);
            let mut s = named(&name);
            s["type"] = json!(f.addr_type());
            s["flags"] = json!(["interval"]);
            c.push(x::cmd("add", "set", s));
            let elem: Vec<Value> = v
                .iter()
                .map(|(lo, hi)| {
                    if lo == hi {
                        json!(addr_of(f, *lo))
                    } else {
                        x::range(json!(addr_of(f, *lo)), json!(addr_of(f, *hi)))
                    }
                })
                .collect();
            let mut e = named(&name);
            e["elem"] = json!(elem);
            c.push(x::cmd("add", "element", e));
        }
    }
    for m in ["ingress", "egress"] {
        let mut body = named(m);
        body["type"] = json!("iface_index");
        body["map"] = json!("verdict");
        c.push(x::cmd("add", "map", body));
    }
    let mut ingress_elems = Vec::new();
    let mut egress_elems = Vec::new();
    for (ifindex, (ingress, egress)) in &devices {
        for (dir, entries, field, elems) in [
            ("in", ingress, "saddr", &mut ingress_elems),
            ("out", egress, "daddr", &mut egress_elems),
        ] {
            let Some(entries) = entries else { continue };
            let chain = format!("{dir}-{ifindex}");
            c.push(x::cmd("add", "chain", named(&chain)));
            if dir == "in" {
                // A pod reaching itself through its Service (masqueraded, see render.rs).
                c.push(rule(
                    &chain,
                    vec![
                        x::mark_has(super::render::MARK_HAIRPIN),
                        json!({"return": null}),
                    ],
                ));
                for f in [Family::Ip, Family::Ip6] {
                    if sizes.get(&(f, id::HOST)).is_some_and(|n| *n > 0) {
                        c.push(rule(
                            &chain,
                            vec![
                                x::eq(x::addr(f, "saddr"), x::set_ref(&set_name(f, id::HOST))),
                                json!({"return": null}),
                            ],
                        ));
                    }
                }
            }
            for e in entries.keys() {
                for r in entry_rules(e, field, &sizes) {
                    c.push(rule(&chain, r));
                }
            }
            c.push(rule(&chain, vec![x::drop()]));
            elems.push(json!([ifindex, x::jump(&chain)]));
        }
    }
    for (m, elems) in [("ingress", ingress_elems), ("egress", egress_elems)] {
        if !elems.is_empty() {
            let mut e = named(m);
            e["elem"] = json!(elems);
            c.push(x::cmd("add", "element", e));
        }
    }
    for hook in ["forward", "input"] {
        let mut ch = named(hook);
        ch["type"] = json!("filter");
        ch["hook"] = json!(hook);
        ch["prio"] = json!(0);
        ch["policy"] = json!("accept");
        c.push(x::cmd("add", "chain", ch));
        c.push(rule(
            hook,
            vec![
                x::matches(
                    json!({"ct": {"key": "state"}}),
                    "in",
                    json!(["established", "related"]),
                ),
                json!({"accept": null}),
            ],
        ));
        c.push(rule(
            hook,
            vec![x::vmap(x::meta("iif"), x::set_ref("egress"))],
        ));
        if hook == "forward" {
            c.push(rule(
                hook,
                vec![x::vmap(x::meta("oif"), x::set_ref("ingress"))],
            ));
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_spans_leave_out_more_specific_blocks() {
        let mut st = PolicyState::default();
        st.cidrs
            .insert("10.0.0.0/16".parse().unwrap(), id::CIDR_BASE + 1);
        st.cidrs
            .insert("10.0.1.0/24".parse().unwrap(), id::CIDR_BASE + 2);
        st.cidrs
            .insert("10.0.1.7/32".parse().unwrap(), id::CIDR_BASE + 3);
        let s = peer_spans(&st, id::CIDR_BASE + 1).unwrap();
        let v: Vec<(String, String)> = s[&Family::Ip]
            .iter()
            .map(|(a, b)| (addr_of(Family::Ip, *a), addr_of(Family::Ip, *b)))
            .collect();
        assert_eq!(
            v,
            vec![
                ("10.0.0.0".into(), "10.0.0.255".into()),
                ("10.0.2.0".into(), "10.0.255.255".into())
            ]
        );
        let s = peer_spans(&st, id::CIDR_BASE + 2).unwrap();
        assert_eq!(s[&Family::Ip].len(), 2, "the /24 without its /32");
    }

    #[test]
    fn world_is_what_the_ipcache_does_not_hold() {
        let mut st = PolicyState::default();
        st.ipcache.insert(
            "10.244.1.5/32".parse().unwrap(),
            weir_control::policy::IpcacheEntry {
                identity: 300,
                ns_class: id::NS_BASE + 1,
            },
        );
        let w = peer_spans(&st, id::WORLD).unwrap();
        let v4 = &w[&Family::Ip];
        assert_eq!(v4.len(), 2);
        assert_eq!(addr_of(Family::Ip, v4[0].1), "10.244.1.4");
        assert_eq!(addr_of(Family::Ip, v4[1].0), "10.244.1.6");
        assert_eq!(w[&Family::Ip6], vec![(0, u128::MAX)]);
    }
}
