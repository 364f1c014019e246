//! Reads weir's tables back from `nft -j list table` into the dataplane-neutral [`Dump`]: the
//! frontends are the dispatch maps' elements, their backends the `dnat` of the chains their
//! frontend chain goes to.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;
use weir_control::lb::{Backend, FrontendKey, Proto, Scope};

use crate::{Dump, FrontendDump};

/// The maps that dispatch frontends, and the scope of their elements.
const DISPATCH: [(&str, Scope); 4] = [
    ("cluster-ips", Scope::Cluster),
    ("no-endpoints", Scope::Cluster),
    ("external-ips", Scope::External),
    ("nodeports", Scope::External),
];

/// Every chain target a rule's statements go to (goto, jump, and anonymous verdict maps).
fn targets(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, inner) in m {
                if k == "goto" || k == "jump" {
                    if let Some(t) = inner["target"].as_str() {
                        out.push(t.to_string());
                    }
                } else {
                    targets(inner, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|i| targets(i, out)),
        _ => {}
    }
}

fn prefixes(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if m.contains_key("prefix") => {
            let p = &m["prefix"];
            if let (Some(a), Some(l)) = (p["addr"].as_str(), p["len"].as_u64()) {
                out.push(format!("{a}/{l}"));
            }
        }
        Value::Object(m) if m.contains_key("set") => m["set"]
            .as_array()
            .into_iter()
            .flatten()
            .for_each(|i| prefixes(i, out)),
        Value::String(s) => out.push(if s.contains('/') {
            s.clone()
        } else if s.contains(':') {
            format!("{s}/128")
        } else {
            format!("{s}/32")
        }),
        _ => {}
    }
}

struct Table<'a> {
    rules: BTreeMap<(String, String), Vec<&'a Value>>,
    set_timeouts: BTreeMap<(String, String), u32>,
}

impl Table<'_> {
    fn rules(&self, family: &str, chain: &str) -> &[&Value] {
        self.rules
            .get(&(family.to_string(), chain.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// The backend a backend chain DNATs to.
fn backend_of(t: &Table, family: &str, chain: &str) -> Option<Backend> {
    t.rules(family, chain).iter().find_map(|r| {
        r["expr"].as_array()?.iter().find_map(|s| {
            let d = s.get("dnat")?;
            Some(Backend {
                ip: d["addr"].as_str()?.parse().ok()?,
                port: d["port"].as_u64()? as u16,
            })
        })
    })
}

fn frontend(t: &Table, family: &str, key: FrontendKey, target: &str) -> FrontendDump {
    let mut fd = FrontendDump::new(key);
    let mut chains = Vec::new();
    for r in t.rules(family, target) {
        let exprs = r["expr"].as_array().cloned().unwrap_or_default();
        for s in &exprs {
            let m = &s["match"];
            if let Some(set) = m["right"].as_str().and_then(|s| s.strip_prefix('@')) {
                fd.affinity_timeout = t
                    .set_timeouts
                    .get(&(family.to_string(), set.to_string()))
                    .copied();
            }
            if m["op"] == "!=" {
                prefixes(&m["right"], &mut fd.source_ranges);
            }
        }
        targets(&Value::Array(exprs), &mut chains);
    }
    let mut seen = std::collections::BTreeSet::new();
    for ch in chains.iter().filter(|c| c.starts_with("be-")) {
        if seen.insert(ch.clone()) {
            if let Some(b) = backend_of(t, family, ch) {
                fd.backends.push((fd.backends.len() as u32, b));
            }
        }
    }
    fd
}

/// The key of a dispatch map element.
fn key_of(family: &str, scope: Scope, k: &Value) -> Option<FrontendKey> {
    let parts = k["concat"].as_array()?;
    let (vip, proto, port) = match parts.as_slice() {
        [a, p, n] => (a.as_str()?.parse::<IpAddr>().ok()?, p, n),
        [p, n] => (
            if family == "ip6" {
                IpAddr::from([0u16; 8])
            } else {
                IpAddr::from([0u8; 4])
            },
            p,
            n,
        ),
        _ => return None,
    };
    Some(FrontendKey {
        vip,
        port: port.as_u64()? as u16,
        proto: match proto.as_str()? {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return None,
        },
        scope,
    })
}

/// The dump of a listing of weir's tables.
pub fn dump(listing: &[Value]) -> Dump {
    let mut t = Table {
        rules: BTreeMap::new(),
        set_timeouts: BTreeMap::new(),
    };
    let mut maps = Vec::new();
    for o in listing {
        if let Some(r) = o.get("rule") {
            if let (Some(f), Some(c)) = (r["family"].as_str(), r["chain"].as_str()) {
                t.rules.entry((f.into(), c.into())).or_default().push(r);
            }
        }
        if let Some(s) = o.get("set") {
            if let (Some(f), Some(n), Some(to)) = (
                s["family"].as_str(),
                s["name"].as_str(),
                s["timeout"].as_u64(),
            ) {
                t.set_timeouts.insert((f.into(), n.into()), to as u32);
            }
        }
        if let Some(m) = o.get("map") {
            maps.push(m);
        }
    }
    let mut dump = Dump::default();
    for m in maps {
        let (Some(family), Some(name)) = (m["family"].as_str(), m["name"].as_str()) else {
            continue;
        };
        let elems = m["elem"].as_array().cloned().unwrap_or_default();
        let Some(scope) = DISPATCH.iter().find(|(n, _)| *n == name).map(|(_, s)| *s) else {
            continue;
        };
        for e in &elems {
            let Some(key) = key_of(family, scope, &e[0]) else {
                continue;
            };
            let mut to = Vec::new();
            targets(&e[1], &mut to);
            let target = to.first().map(String::as_str).unwrap_or("");
            dump.frontends.push(frontend(&t, family, key, target));
        }
    }
    dump.index_backends();
    dump
}
