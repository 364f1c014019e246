//! The desired state as iptables-restore text (pure; golden-tested), in kube-proxy's iptables
//! layout with weir's own chains (`WEIR-*`), one text per table and family:
//!
//! ```text
//! nat  PREROUTING  -> WEIR-PREROUTING: -i <node device> -j WEIR-EXTERNAL, then RETURN;
//!                                      -i lxc+ mark pod (masquerade candidate); -j WEIR-CLUSTER
//!      OUTPUT      -> WEIR-OUTPUT:     -j WEIR-CLUSTER
//!      WEIR-CLUSTER    -d VIP -p P --dport N -j WEIR-FE-<hash>          ClusterIPs
//!      WEIR-EXTERNAL   -d VIP ... -j WEIR-FE-<hash>; addrtype LOCAL -j WEIR-NODEPORTS
//!      WEIR-FE-<hash>  [source ranges] [recent --rcheck: affinity] statistic random -> WEIR-BE-<hash>
//!      WEIR-BE-<hash>  [-s backend: hairpin mark] [external mark] [recent --set] DNAT
//!      POSTROUTING -> WEIR-POSTROUTING: masquerade hairpin, external-to-remote, pods' egress
//! filter INPUT/FORWARD/OUTPUT -> WEIR-FILTER: the drop mark; new flows to a ClusterIP
//!      without endpoints: REJECT (as kube-proxy)
//! ```
//!
//! The nat table cannot drop: a flow to be dropped (source ranges, externalTrafficPolicy:
//! Local without a local endpoint) gets a mark the filter table drops, as kube-proxy's
//! KUBE-MARK-DROP did.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use weir_control::lb::{Backend, Frontend, FrontendKey, LbState, Scope};

use crate::nft::expr::Family;
use crate::nft::render::{key_id, short_hash, NodeNet, MARK_EXTERNAL, MARK_HAIRPIN};

/// Mark bit: the flow is to be dropped (the filter table does it).
pub const MARK_DROP: u32 = 0x1000;
/// Mark bit: the flow comes from a pod (masqueraded when it leaves for outside the cluster).
pub const MARK_POD: u32 = 0x2000;
/// The kernel chains weir hooks, per table: (table, kernel chain, weir's chain).
pub const HOOKS: [(&str, &str, &str); 6] = [
    ("nat", "PREROUTING", "WEIR-PREROUTING"),
    ("nat", "OUTPUT", "WEIR-OUTPUT"),
    ("nat", "POSTROUTING", "WEIR-POSTROUTING"),
    ("filter", "INPUT", "WEIR-FILTER"),
    ("filter", "FORWARD", "WEIR-FILTER"),
    ("filter", "OUTPUT", "WEIR-FILTER"),
];

/// The chain of frontend `k`.
pub fn frontend_chain(k: &FrontendKey) -> String {
    format!("WEIR-FE-{}", short_hash(&key_id(k)))
}

/// The chain sending frontend `k`'s flows to backend `b`.
pub fn backend_chain(k: &FrontendKey, b: &Backend) -> String {
    format!("WEIR-BE-{}", short_hash(&format!("{}>{b}", key_id(k))))
}

/// The `recent` list of clients stuck to backend `b` of `k`.
fn affinity_list(k: &FrontendKey, b: &Backend) -> String {
    format!("WEIR-AFF-{}", short_hash(&format!("{}>{b}", key_id(k))))
}

fn proto(k: &FrontendKey) -> &'static str {
    crate::nft::expr::proto_name(k.proto)
}

fn host(ip: std::net::IpAddr) -> String {
    ipnet::IpNet::from(ip).to_string()
}

fn comment(c: &str) -> String {
    // iptables keeps comments of up to 256 bytes; quotes would end the argument.
    let c: String = c.chars().filter(|ch| *ch != '"').take(200).collect();
    format!("-m comment --comment \"{c}\"")
}

/// One frontend's chains (name -> rules) in the nat table, and its dispatch rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendRules {
    /// Its family.
    pub family: Family,
    /// Which dispatch chain takes it (`WEIR-CLUSTER`, `WEIR-EXTERNAL`, `WEIR-NODEPORTS`, or
    /// the filter table's `WEIR-NOEP`) and the rule there.
    pub dispatch: (&'static str, String),
    /// Its chains and their rules (in the nat table).
    pub chains: BTreeMap<String, Vec<String>>,
}

/// The rules of one frontend.
pub fn frontend(k: &FrontendKey, fe: &Frontend) -> FrontendRules {
    let f = Family::of(k.vip);
    let chain = frontend_chain(k);
    let p = proto(k);
    let nodeport = k.scope == Scope::External && k.vip.is_unspecified();
    let about = comment(&format!("{} {k}", fe.service));
    let matches = if nodeport {
        format!("-p {p} -m {p} --dport {}", k.port)
    } else {
        format!("-d {} -p {p} -m {p} --dport {}", host(k.vip), k.port)
    };
    let mut out = FrontendRules {
        family: f,
        dispatch: ("", String::new()),
        chains: BTreeMap::new(),
    };
    if k.scope == Scope::Cluster && fe.backends.is_empty() {
        out.dispatch = (
            "WEIR-NOEP",
            format!("{matches} {about} -j REJECT{}", reject_with(f, p)),
        );
        return out;
    }
    let table = match (k.scope, nodeport) {
        (Scope::Cluster, _) => "WEIR-CLUSTER",
        (Scope::External, true) => "WEIR-NODEPORTS",
        (Scope::External, false) => "WEIR-EXTERNAL",
    };
    out.dispatch = (table, format!("{matches} {about} -j {chain}"));
    let mut rules = Vec::new();
    let drop = format!("-j MARK --or-mark 0x{MARK_DROP:x}");
    if k.scope == Scope::External && !fe.source_ranges.is_empty() {
        // Marked for dropping unless the client is in a range (ranges of the other family
        // only: nobody is, fail closed as the eBPF path).
        rules.push(drop.clone());
        for r in fe
            .source_ranges
            .iter()
            .filter(|r| Family::of(r.addr()) == f)
        {
            rules.push(format!("-s {r} -j MARK --and-mark 0x{:x}", !MARK_DROP));
        }
        rules.push(format!(
            "-m mark --mark 0x{MARK_DROP:x}/0x{MARK_DROP:x} -j RETURN"
        ));
    }
    if fe.backends.is_empty() {
        rules.push(drop);
    } else {
        if let Some(t) = fe.affinity_timeout {
            for b in &fe.backends {
                rules.push(format!(
                    "-m recent --name {} --rcheck --seconds {t} --reap -j {}",
                    affinity_list(k, b),
                    backend_chain(k, b)
                ));
            }
        }
        rules.extend(select(k, fe));
        for b in &fe.backends {
            out.chains
                .insert(backend_chain(k, b), backend_rules(k, fe, b));
        }
    }
    out.chains.insert(chain, rules);
    out
}

fn reject_with(f: Family, p: &str) -> &'static str {
    match (f, p) {
        (_, "tcp") => " --reject-with tcp-reset",
        (Family::Ip, _) => " --reject-with icmp-port-unreachable",
        (Family::Ip6, _) => " --reject-with icmp6-port-unreachable",
    }
}

/// The statistic rules choosing a backend: backend i with probability w_i / (w_i + ... + w_n).
fn select(k: &FrontendKey, fe: &Frontend) -> Vec<String> {
    let n = fe.backends.len();
    let weights: Vec<u64> = if fe.weights.len() == n && fe.weights.iter().any(|w| *w > 0) {
        fe.weights.iter().map(|w| u64::from(*w)).collect()
    } else {
        vec![1; n]
    };
    let mut rest: u64 = weights.iter().sum();
    let mut out = Vec::new();
    let last = weights.iter().rposition(|w| *w > 0).unwrap_or(0);
    for (i, (b, w)) in fe.backends.iter().zip(&weights).enumerate() {
        if *w == 0 {
            continue;
        }
        let target = backend_chain(k, b);
        if i == last {
            out.push(format!("-j {target}"));
            break;
        }
        let pr = *w as f64 / rest as f64;
        out.push(format!(
            "-m statistic --mode random --probability {pr:.11} -j {target}"
        ));
        rest -= w;
    }
    out
}

fn backend_rules(k: &FrontendKey, fe: &Frontend, b: &Backend) -> Vec<String> {
    let mut rules = vec![format!(
        "-s {} {} -j MARK --or-mark 0x{MARK_HAIRPIN:x}",
        host(b.ip),
        comment(&format!("{} backend {b}", fe.service))
    )];
    if k.scope == Scope::External {
        rules.push(format!("-j MARK --or-mark 0x{MARK_EXTERNAL:x}"));
    }
    if fe.affinity_timeout.is_some() {
        rules.push(format!("-m recent --name {} --set", affinity_list(k, b)));
    }
    let p = proto(k);
    rules.push(format!("-p {p} -m {p} -j DNAT --to-destination {}", b));
    rules
}

/// Every frontend of `state` of family `f`, by key.
pub fn frontends(state: &LbState, f: Family) -> BTreeMap<FrontendKey, FrontendRules> {
    state
        .frontends
        .iter()
        .filter(|(k, _)| Family::of(k.vip) == f)
        .map(|(k, fe)| (*k, frontend(k, fe)))
        .collect()
}

/// The fixed chains of the nat table and their rules, for the node's settings.
fn nat_base(f: Family, node: &NodeNet) -> Vec<(&'static str, Vec<String>)> {
    let mut pre = Vec::new();
    for d in &node.devices {
        pre.push(format!("-i {d} -j WEIR-EXTERNAL"));
        pre.push(format!("-i {d} -j RETURN"));
    }
    pre.push(format!("-i lxc+ -j MARK --or-mark 0x{MARK_POD:x}"));
    pre.push("-j WEIR-CLUSTER".to_string());
    let (lo, hi) = node.snat_ports;
    let masq = |cond: &str, why: &str| {
        vec![
            format!(
                "{cond} -p tcp {} -j MASQUERADE --to-ports {lo}-{hi}",
                comment(why)
            ),
            format!("{cond} -p udp -j MASQUERADE --to-ports {lo}-{hi}"),
            format!("{cond} -j MASQUERADE"),
        ]
    };
    let mut post = masq(
        &format!("-m mark --mark 0x{MARK_HAIRPIN:x}/0x{MARK_HAIRPIN:x}"),
        "a backend reaching itself through its Service",
    );
    for d in &node.devices {
        post.extend(masq(
            &format!("-m mark --mark 0x{MARK_EXTERNAL:x}/0x{MARK_EXTERNAL:x} -o {d}"),
            "external traffic to a backend on another node",
        ));
    }
    let mut masq_chain = Vec::new();
    if f == Family::Ip {
        if let Some(nets) = &node.masquerade {
            for d in &node.devices {
                post.push(format!(
                    "-m mark --mark 0x{MARK_POD:x}/0x{MARK_POD:x} -o {d} -j WEIR-MASQ"
                ));
            }
            for n in nets {
                masq_chain.push(format!("-d {} -j RETURN", n.trunc()));
            }
            masq_chain.extend(
                masq("", "pods reaching beyond the cluster")
                    .into_iter()
                    .map(|r| r.trim_start().to_string()),
            );
        }
    }
    let external = vec!["-m addrtype --dst-type LOCAL -j WEIR-NODEPORTS".to_string()];
    vec![
        ("WEIR-PREROUTING", pre),
        ("WEIR-OUTPUT", vec!["-j WEIR-CLUSTER".to_string()]),
        ("WEIR-POSTROUTING", post),
        ("WEIR-MASQ", masq_chain),
        ("WEIR-CLUSTER", Vec::new()),
        ("WEIR-EXTERNAL", external),
        ("WEIR-NODEPORTS", Vec::new()),
    ]
}

/// The iptables-restore input (for `--noflush`) of the nat and filter tables of family `f`:
/// weir's chains declared (which empties them) and filled; `stale` chains of an earlier state
/// emptied and deleted.
pub fn tables(
    f: Family,
    node: &NodeNet,
    frontends: &BTreeMap<FrontendKey, FrontendRules>,
    stale: &[String],
) -> (String, String) {
    tables_with(f, node, frontends, stale, None)
}

/// Like [`tables`], for a restore with `--noflush` that leaves the frontend chains not in
/// `only` as the kernel has them (neither declared, which would flush them, nor written):
/// kube-proxy's partial sync. The dispatch and base chains are written whole, stale chains
/// deleted.
pub fn tables_partial(
    f: Family,
    node: &NodeNet,
    frontends: &BTreeMap<FrontendKey, FrontendRules>,
    stale: &[String],
    only: &BTreeSet<String>,
) -> (String, String) {
    tables_with(f, node, frontends, stale, Some(only))
}

fn tables_with(
    f: Family,
    node: &NodeNet,
    frontends: &BTreeMap<FrontendKey, FrontendRules>,
    stale: &[String],
    only: Option<&BTreeSet<String>>,
) -> (String, String) {
    let mut chains: Vec<(String, Vec<String>)> = nat_base(f, node)
        .into_iter()
        .map(|(n, r)| (n.to_string(), r))
        .collect();
    let mut noep = Vec::new();
    let mut fe_chains: BTreeMap<&String, &Vec<String>> = BTreeMap::new();
    for fr in frontends.values() {
        let (chain, rule) = &fr.dispatch;
        if *chain == "WEIR-NOEP" {
            noep.push(rule.clone());
        } else if let Some(c) = chains.iter_mut().find(|(n, _)| n == chain) {
            // NodePorts go after the external addresses' rules; the addrtype jump stays last.
            if *chain == "WEIR-EXTERNAL" {
                let at = c.1.len() - 1;
                c.1.insert(at, rule.clone());
            } else {
                c.1.push(rule.clone());
            }
        }
        fe_chains.extend(
            fr.chains
                .iter()
                .filter(|(n, _)| only.is_none_or(|o| o.contains(*n))),
        );
    }
    let mut nat = String::from("*nat\n");
    for (n, _) in &chains {
        let _ = writeln!(nat, ":{n} - [0:0]");
    }
    for n in fe_chains.keys() {
        let _ = writeln!(nat, ":{n} - [0:0]");
    }
    for n in stale {
        let _ = writeln!(nat, ":{n} - [0:0]");
    }
    for (n, rules) in &chains {
        for r in rules {
            let _ = writeln!(nat, "-A {n} {r}");
        }
    }
    for (n, rules) in &fe_chains {
        for r in rules.iter() {
            let _ = writeln!(nat, "-A {n} {r}");
        }
    }
    for n in stale {
        let _ = writeln!(nat, "-X {n}");
    }
    nat.push_str("COMMIT\n");
    let mut filter = String::from("*filter\n:WEIR-FILTER - [0:0]\n:WEIR-NOEP - [0:0]\n");
    let _ = writeln!(
        filter,
        "-A WEIR-FILTER -m mark --mark 0x{MARK_DROP:x}/0x{MARK_DROP:x} -j DROP"
    );
    let _ = writeln!(
        filter,
        "-A WEIR-FILTER -m conntrack --ctstate NEW -j WEIR-NOEP"
    );
    for r in &noep {
        let _ = writeln!(filter, "-A WEIR-NOEP {r}");
    }
    filter.push_str("COMMIT\n");
    (nat, filter)
}
