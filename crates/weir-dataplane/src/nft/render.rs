//! The desired state as nftables objects (pure; golden-tested). One table per family,
//! `ip weir` and `ip6 weir`, laid out as kube-proxy's nftables mode lays out its own:
//!
//! ```text
//! nat-prerouting (nat, dstnat)  iifname @node-devices jump external; else jump cluster
//! nat-output     (nat, -100)    jump cluster
//! cluster        daddr . l4proto . dport vmap @cluster-ips            ClusterIPs (Scope::Cluster)
//! external       daddr . l4proto . dport vmap @external-ips           externalIPs, LB IPs
//!                fib daddr type local  l4proto . dport vmap @nodeports NodePorts
//! fe-<hash>      [saddr != {sourceRanges} drop] [saddr @aff-<hash> goto be-<hash>]...
//!                numgen random mod N vmap { 0: goto be-<hash>, ... }   (weighted: ranges)
//! be-<hash>      [saddr == backend: mark hairpin] [external: mark] [update @aff] dnat to ip:port
//! nat-postrouting (nat, srcnat) hairpin mark: masquerade; external mark out a node device:
//!                masquerade; pods (iifname "lxc*") out a node device to daddr != @nomasq:
//!                masquerade (ports of the SNAT range)
//! filter-{input,forward,output} ct state new: daddr . l4proto . dport vmap @no-endpoints
//!                (a ClusterIP without endpoints: reject, as kube-proxy)
//! ```
//!
//! Names are hashes of the frontend (and backend), so a frontend renders to the same objects
//! on every node and after every restart, and a change touches only its own objects.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use weir_control::lb::{Backend, Frontend, FrontendKey, LbMode, LbState, Scope};

use super::expr::{self as x, Family};

/// The table weir owns in each family.
pub const TABLE: &str = "weir";
/// Packet mark bit: the flow is a backend reaching itself through its Service (masquerade, or
/// the backend would answer itself).
pub const MARK_HAIRPIN: u32 = 0x4000;
/// Packet mark bit: the flow came from outside the node (masquerade when it leaves for a backend
/// on another node, so the reply comes back through this one).
pub const MARK_EXTERNAL: u32 = 0x8000;
/// The prefix of pod-facing devices (weir-cni names the host side of each pod's veth so).
pub const POD_DEVICES: &str = "lxc*";

/// Node-wide settings of the rendering.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeNet {
    /// Devices facing the network (external traffic arrives there; masquerading leaves there).
    pub devices: Vec<String>,
    /// Source ports of SNAT and masquerading.
    pub snat_ports: (u16, u16),
    /// Pods' IPv4 flows leave masqueraded unless they go to one of these (every node's pod
    /// CIDR and the configured networks); None: no masquerading (not asked for, or the
    /// exceptions are not known yet: masquerading between pods would break their flows).
    pub masquerade: Option<Vec<ipnet::Ipv4Net>>,
}

/// A rule: its statements and a comment.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Statements, in order.
    pub expr: Vec<Value>,
    /// What it is for.
    pub comment: Option<String>,
}

impl Rule {
    fn new(expr: Vec<Value>) -> Rule {
        Rule {
            expr,
            comment: None,
        }
    }
    fn with_comment(mut self, c: String) -> Rule {
        // nft keeps comments of up to 128 bytes.
        let mut c = c;
        while c.len() > 127 {
            c.pop();
        }
        self.comment = Some(c);
        self
    }
}

/// What one frontend puts in its family's table.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontendObjects {
    /// Its family.
    pub family: Family,
    /// The dispatch map it is an element of, and the element (`[key, verdict]`).
    pub element: (String, Value),
    /// Sets it owns (session affinity), name -> `add set` body.
    pub sets: BTreeMap<String, Value>,
    /// Chains it owns, name -> rules; the frontend chain is one of them.
    pub chains: BTreeMap<String, Vec<Rule>>,
}

/// 48 bits of FNV-1a of `s`, in hex: stable names for a frontend's objects.
pub(crate) fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

pub(crate) fn key_id(k: &FrontendKey) -> String {
    format!("{}|{}|{}|{}", k.vip, k.port, k.proto, k.scope.number())
}

/// The chain of frontend `k`.
pub fn frontend_chain(k: &FrontendKey) -> String {
    format!("fe-{}", short_hash(&key_id(k)))
}

/// The chain that sends frontend `k`'s flows to backend `b`.
pub fn backend_chain(k: &FrontendKey, b: &Backend) -> String {
    format!("be-{}", short_hash(&format!("{}>{b}", key_id(k))))
}

/// The set of clients stuck to backend `b` of frontend `k` (timeout `t` seconds).
fn affinity_set(k: &FrontendKey, b: &Backend, t: u32) -> String {
    format!("aff-{}", short_hash(&format!("{}>{b}@{t}", key_id(k))))
}

/// Where `k` is dispatched: map name and element key.
fn dispatch(k: &FrontendKey, has_backends: bool) -> (&'static str, Value) {
    let (proto, port) = (json!(x::proto_name(k.proto)), json!(k.port));
    if k.scope == Scope::External && k.vip.is_unspecified() {
        return ("nodeports", x::concat(vec![proto, port]));
    }
    let map = match k.scope {
        Scope::External => "external-ips",
        Scope::Cluster if has_backends => "cluster-ips",
        Scope::Cluster => "no-endpoints",
    };
    (map, x::concat(vec![json!(k.vip.to_string()), proto, port]))
}

/// The objects of one frontend.
pub fn frontend(k: &FrontendKey, fe: &Frontend) -> FrontendObjects {
    let f = Family::of(k.vip);
    let chain = frontend_chain(k);
    let external = k.scope == Scope::External;
    let (map, key) = dispatch(k, !fe.backends.is_empty());
    let mut out = FrontendObjects {
        family: f,
        element: (map.to_string(), Value::Null),
        sets: BTreeMap::new(),
        chains: BTreeMap::new(),
    };
    if !external && fe.backends.is_empty() {
        out.element.1 = json!([key, x::goto("reject-packet")]);
        return out;
    }
    out.element.1 = json!([key, x::goto(&chain)]);
    let saddr = x::addr(f, "saddr");
    let mut rules = Vec::new();
    let about = format!("{} {k}", fe.service);
    if external && !fe.source_ranges.is_empty() {
        let mine: Vec<Value> = fe
            .source_ranges
            .iter()
            .filter(|n| Family::of(n.addr()) == f)
            .map(x::prefix)
            .collect();
        // Ranges of the other family only: nobody is allowed (fail closed, as the eBPF path).
        rules.push(Rule::new(if mine.is_empty() {
            vec![x::drop()]
        } else {
            vec![
                x::matches(saddr.clone(), "!=", x::anon_set(mine)),
                x::drop(),
            ]
        }));
    }
    if fe.backends.is_empty() {
        // externalTrafficPolicy: Local without a local endpoint.
        rules.push(Rule::new(vec![x::drop()]));
    } else {
        if let Some(t) = fe.affinity_timeout {
            for b in &fe.backends {
                // nft makes it dynamic (updated from the packet path) by itself.
                let set = affinity_set(k, b, t);
                out.sets.insert(
                    set.clone(),
                    json!({"family": f.name(), "table": TABLE, "name": set, "type": f.addr_type(),
                           "flags": ["timeout"], "timeout": t}),
                );
                rules.push(Rule::new(vec![
                    x::eq(saddr.clone(), x::set_ref(&set)),
                    x::goto(&backend_chain(k, b)),
                ]));
            }
        }
        rules.push(select(k, fe));
        for b in &fe.backends {
            out.chains
                .insert(backend_chain(k, b), backend_rules(k, fe, b, f));
        }
    }
    if let Some(first) = rules.first_mut() {
        *first = first.clone().with_comment(about);
    }
    out.chains.insert(chain, rules);
    out
}

/// The rule choosing a backend for a new flow: uniformly, or by the weights.
fn select(k: &FrontendKey, fe: &Frontend) -> Rule {
    let bs = &fe.backends;
    if bs.len() == 1 {
        return Rule::new(vec![x::goto(&backend_chain(k, &bs[0]))]);
    }
    let weighted = fe.weights.len() == bs.len()
        && fe.weights.iter().any(|w| *w != fe.weights[0])
        && fe.weights.iter().any(|w| *w > 0);
    let items: Vec<Value>;
    let n: u32;
    if weighted {
        let mut lo: u64 = 0;
        let mut v = Vec::new();
        for (b, w) in bs.iter().zip(&fe.weights) {
            if *w == 0 {
                continue;
            }
            let hi = lo + u64::from(*w) - 1;
            let slot = if hi == lo {
                json!(lo)
            } else {
                x::range(json!(lo), json!(hi))
            };
            v.push(json!([slot, x::goto(&backend_chain(k, b))]));
            lo = hi + 1;
        }
        items = v;
        n = lo.min(u64::from(u32::MAX)) as u32;
    } else {
        items = bs
            .iter()
            .enumerate()
            .map(|(i, b)| json!([i, x::goto(&backend_chain(k, b))]))
            .collect();
        n = bs.len() as u32;
    }
    Rule::new(vec![x::vmap(x::numgen(n), x::anon_set(items))])
}

fn backend_rules(k: &FrontendKey, fe: &Frontend, b: &Backend, f: Family) -> Vec<Rule> {
    let saddr = x::addr(f, "saddr");
    let mut rules = vec![Rule::new(vec![
        x::eq(saddr.clone(), json!(b.ip.to_string())),
        x::mark_set(MARK_HAIRPIN),
    ])
    .with_comment(format!("{} backend {b}", fe.service))];
    if k.scope == Scope::External {
        // DSR is not available here: remote backends are reached with SNAT (a warning says so).
        rules.push(Rule::new(vec![x::mark_set(MARK_EXTERNAL)]));
    }
    if let Some(t) = fe.affinity_timeout {
        rules.push(Rule::new(vec![x::set_update(
            &affinity_set(k, b, t),
            saddr,
        )]));
    }
    rules.push(Rule::new(vec![
        x::eq(x::meta("l4proto"), json!(x::proto_name(k.proto))),
        x::dnat(f, b.ip, b.port),
    ]));
    rules
}

/// Every frontend of `state` rendered, by key.
pub fn frontends(state: &LbState) -> BTreeMap<FrontendKey, FrontendObjects> {
    state
        .frontends
        .iter()
        .map(|(k, fe)| (*k, frontend(k, fe)))
        .collect()
}

fn table(f: Family) -> Value {
    json!({"family": f.name(), "name": TABLE})
}

fn named(f: Family, name: &str) -> Value {
    json!({"family": f.name(), "table": TABLE, "name": name})
}

/// `add rule` of `r` in `chain`.
pub fn add_rule(f: Family, chain: &str, r: &Rule) -> Value {
    let mut body = json!({"family": f.name(), "table": TABLE, "chain": chain, "expr": r.expr});
    if let Some(c) = &r.comment {
        body["comment"] = json!(c);
    }
    x::cmd("add", "rule", body)
}

fn base_chain(f: Family, name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    x::cmd(
        "add",
        "chain",
        json!({"family": f.name(), "table": TABLE, "name": name, "type": kind,
               "hook": hook, "prio": prio, "policy": "accept"}),
    )
}

fn add_chain(f: Family, name: &str) -> Value {
    x::cmd("add", "chain", named(f, name))
}

/// Commands that replace `f`'s table with the skeleton (maps, base chains, dispatch) and the
/// node's settings, in the same transaction as what follows them: the old table is deleted
/// and the new one written atomically, so traffic never meets a half-written table.
pub fn skeleton(f: Family, node: &NodeNet) -> Vec<Value> {
    let addr = f.addr_type();
    let svc_key = json!([addr, "inet_proto", "inet_service"]);
    let mut c = vec![
        x::cmd("add", "table", table(f)),
        x::cmd("delete", "table", table(f)),
        x::cmd("add", "table", table(f)),
    ];
    for m in ["cluster-ips", "external-ips", "no-endpoints"] {
        let mut body = named(f, m);
        body["type"] = svc_key.clone();
        body["map"] = json!("verdict");
        c.push(x::cmd("add", "map", body));
    }
    let mut np = named(f, "nodeports");
    np["type"] = json!(["inet_proto", "inet_service"]);
    np["map"] = json!("verdict");
    c.push(x::cmd("add", "map", np));
    let mut devs = named(f, "node-devices");
    devs["type"] = json!("ifname");
    c.push(x::cmd("add", "set", devs));
    if f == Family::Ip {
        let mut nomasq = named(f, "nomasq");
        nomasq["type"] = json!(addr);
        nomasq["flags"] = json!(["interval"]);
        c.push(x::cmd("add", "set", nomasq));
    }
    for ch in ["cluster", "external", "endpoints-check", "reject-packet"] {
        c.push(add_chain(f, ch));
    }
    c.push(base_chain(f, "nat-prerouting", "nat", "prerouting", -100));
    c.push(base_chain(f, "nat-output", "nat", "output", -100));
    c.push(base_chain(f, "nat-postrouting", "nat", "postrouting", 100));
    for hook in ["input", "forward", "output"] {
        c.push(base_chain(
            f,
            &format!("filter-{hook}"),
            "filter",
            hook,
            -10,
        ));
    }
    let svc = x::concat(vec![x::addr(f, "daddr"), x::meta("l4proto"), x::th_dport()]);
    let rules: Vec<(&str, Vec<Value>)> = vec![
        (
            "nat-prerouting",
            vec![
                x::eq(x::meta("iifname"), x::set_ref("node-devices")),
                x::jump("external"),
            ],
        ),
        (
            "nat-prerouting",
            vec![
                x::matches(x::meta("iifname"), "!=", x::set_ref("node-devices")),
                x::jump("cluster"),
            ],
        ),
        ("nat-output", vec![x::jump("cluster")]),
        (
            "cluster",
            vec![x::vmap(svc.clone(), x::set_ref("cluster-ips"))],
        ),
        (
            "external",
            vec![x::vmap(svc.clone(), x::set_ref("external-ips"))],
        ),
        (
            "external",
            vec![
                x::fib_daddr_local(),
                x::vmap(
                    x::concat(vec![x::meta("l4proto"), x::th_dport()]),
                    x::set_ref("nodeports"),
                ),
            ],
        ),
        (
            "endpoints-check",
            vec![x::vmap(svc, x::set_ref("no-endpoints"))],
        ),
        (
            "reject-packet",
            vec![
                x::eq(x::meta("l4proto"), json!("tcp")),
                json!({"reject": {"type": "tcp reset"}}),
            ],
        ),
        ("reject-packet", vec![json!({"reject": null})]),
    ];
    for (chain, expr) in rules {
        c.push(add_rule(f, chain, &Rule::new(expr)));
    }
    for hook in ["input", "forward", "output"] {
        c.push(add_rule(
            f,
            &format!("filter-{hook}"),
            &Rule::new(vec![x::ct_state_new(), x::jump("endpoints-check")]),
        ));
    }
    c.extend(node_settings(f, node));
    c
}

/// Commands that (re)write the node's settings into an existing table: its devices, the
/// masquerade exceptions and the source NAT rules.
pub fn node_settings(f: Family, node: &NodeNet) -> Vec<Value> {
    let mut c = vec![
        x::cmd("flush", "set", named(f, "node-devices")),
        x::cmd("flush", "chain", named(f, "nat-postrouting")),
    ];
    if !node.devices.is_empty() {
        let mut e = named(f, "node-devices");
        e["elem"] = json!(node.devices);
        c.push(x::cmd("add", "element", e));
    }
    let ports = node.snat_ports;
    let mut rules = masquerade(
        vec![x::mark_has(MARK_HAIRPIN)],
        ports,
        "a backend reaching itself through its Service",
    );
    rules.extend(masquerade(
        vec![
            x::mark_has(MARK_EXTERNAL),
            x::eq(x::meta("oifname"), x::set_ref("node-devices")),
        ],
        ports,
        "external traffic to a backend on another node",
    ));
    if f == Family::Ip {
        c.push(x::cmd("flush", "set", named(f, "nomasq")));
        if let Some(nets) = &node.masquerade {
            let nets: Vec<ipnet::IpNet> =
                nets.iter().map(|n| ipnet::IpNet::V4(n.trunc())).collect();
            if !nets.is_empty() {
                let mut e = named(f, "nomasq");
                e["elem"] = json!(merge(&nets).iter().map(x::prefix).collect::<Vec<_>>());
                c.push(x::cmd("add", "element", e));
            }
            rules.extend(masquerade(
                vec![
                    x::eq(x::meta("iifname"), json!(POD_DEVICES)),
                    x::eq(x::meta("oifname"), x::set_ref("node-devices")),
                    x::matches(x::addr(f, "daddr"), "!=", x::set_ref("nomasq")),
                ],
                ports,
                "pods reaching beyond the cluster",
            ));
        }
    }
    for r in &rules {
        c.push(add_rule(f, "nat-postrouting", r));
    }
    c
}

/// Masquerading of the flows `conds` match: TCP and UDP to a source port of `ports` (a port
/// mapping needs the protocol matched first), anything else (ICMP echo) as the kernel picks.
fn masquerade(conds: Vec<Value>, ports: (u16, u16), why: &str) -> Vec<Rule> {
    let mut ported = conds.clone();
    ported.push(x::eq(
        x::meta("l4proto"),
        x::anon_set(vec![json!("tcp"), json!("udp")]),
    ));
    ported.push(x::masquerade(ports));
    let mut rest = conds;
    rest.push(json!({"masquerade": null}));
    vec![
        Rule::new(ported).with_comment(why.to_string()),
        Rule::new(rest),
    ]
}

/// `nets` without the prefixes another one covers (an interval set refuses overlaps).
fn merge(nets: &[ipnet::IpNet]) -> Vec<ipnet::IpNet> {
    let mut v: Vec<ipnet::IpNet> = nets.to_vec();
    v.sort();
    v.dedup();
    v.iter()
        .filter(|n| !v.iter().any(|o| o != *n && o.contains(*n)))
        .copied()
        .collect()
}

/// Commands adding `fe`'s objects to its (existing) table.
pub fn add_frontend(fe: &FrontendObjects) -> Vec<Value> {
    let f = fe.family;
    let mut c: Vec<Value> = fe
        .sets
        .values()
        .map(|s| x::cmd("add", "set", s.clone()))
        .collect();
    c.extend(fe.chains.keys().map(|ch| add_chain(f, ch)));
    for (ch, rules) in &fe.chains {
        c.extend(rules.iter().map(|r| add_rule(f, ch, r)));
    }
    c.push(element("add", fe));
    c
}

fn element(verb: &str, fe: &FrontendObjects) -> Value {
    let mut e = named(fe.family, &fe.element.0);
    e["elem"] = json!([fe.element.1]);
    x::cmd(verb, "element", e)
}

/// Commands turning `old` into `new` (the same frontend): chains rewritten, objects no longer
/// used deleted after nothing refers to them.
pub fn change_frontend(old: &FrontendObjects, new: &FrontendObjects) -> Vec<Value> {
    let f = new.family;
    let mut c: Vec<Value> = new
        .sets
        .iter()
        .filter(|(n, _)| !old.sets.contains_key(*n))
        .map(|(_, s)| x::cmd("add", "set", s.clone()))
        .collect();
    for ch in new.chains.keys().filter(|ch| !old.chains.contains_key(*ch)) {
        c.push(add_chain(f, ch));
    }
    for (ch, rules) in &new.chains {
        if old.chains.get(ch) == Some(rules) {
            continue;
        }
        if old.chains.contains_key(ch) {
            c.push(x::cmd("flush", "chain", named(f, ch)));
        }
        c.extend(rules.iter().map(|r| add_rule(f, ch, r)));
    }
    if old.element != new.element {
        c.push(element("delete", old));
        c.push(element("add", new));
    }
    c.extend(delete_unused(old, Some(new)));
    c
}

/// Commands removing `old`'s objects that `new` (if any) does not have.
pub fn delete_unused(old: &FrontendObjects, new: Option<&FrontendObjects>) -> Vec<Value> {
    let f = old.family;
    let mut c = Vec::new();
    if new.is_none() {
        c.push(element("delete", old));
    }
    let gone: Vec<&String> = old
        .chains
        .keys()
        .filter(|ch| !new.is_some_and(|n| n.chains.contains_key(*ch)))
        .collect();
    // Flushed first: the frontend chain refers to its backend chains.
    c.extend(gone.iter().map(|ch| x::cmd("flush", "chain", named(f, ch))));
    c.extend(
        gone.iter()
            .map(|ch| x::cmd("delete", "chain", named(f, ch))),
    );
    for s in old.sets.keys() {
        if !new.is_some_and(|n| n.sets.contains_key(s)) {
            c.push(x::cmd("delete", "set", named(f, s)));
        }
    }
    c
}

/// What the netfilter dataplanes cannot do for `state`, said per Service.
pub fn limits(state: &LbState) -> Vec<weir_control::lb::Warning> {
    let mut out: BTreeMap<(String, &'static str), ()> = BTreeMap::new();
    for (k, fe) in &state.frontends {
        let service = fe
            .service
            .split(':')
            .next()
            .unwrap_or(&fe.service)
            .to_string();
        if fe.algorithm == weir_control::lb::Algorithm::Maglev {
            out.insert((service.clone(), "Maglev is not available in the netfilter dataplanes: backends are chosen at random"), ());
        }
        if k.scope == Scope::External && fe.mode == LbMode::Dsr {
            out.insert((service.clone(), "DSR is not available in the netfilter dataplanes: remote backends are reached with SNAT"), ());
        }
        if fe.outlier.is_some() {
            out.insert((service, "outlier detection is not available in the netfilter dataplanes: ejected backends are not passed over"), ());
        }
    }
    out.into_keys()
        .map(|(service, message)| weir_control::lb::Warning {
            service,
            message: message.to_string(),
        })
        .collect()
}
