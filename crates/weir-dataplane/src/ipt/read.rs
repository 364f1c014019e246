//! Reads weir's chains back from `iptables-save` into the dataplane-neutral [`Dump`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use weir_control::lb::{Backend, FrontendKey, Proto, Scope};

use crate::nft::expr::Family;
use crate::{Dump, FrontendDump};

/// The words of an iptables-save rule, quoted arguments kept whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The value after `flag` in `w`.
fn arg<'a>(w: &'a [String], flag: &str) -> Option<&'a str> {
    w.iter()
        .position(|x| x == flag)
        .and_then(|i| w.get(i + 1))
        .map(String::as_str)
}

/// Rules by chain (`-A CHAIN ...`), each as words after the chain name.
fn rules(saved: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut out: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for l in saved.lines() {
        let w = words(l);
        if w.len() > 1 && w[0] == "-A" {
            out.entry(w[1].clone()).or_default().push(w[2..].to_vec());
        }
    }
    out
}

fn key(w: &[String], f: Family, scope: Scope, nodeport: bool) -> Option<FrontendKey> {
    let vip: IpAddr = if nodeport {
        match f {
            Family::Ip => IpAddr::from([0u8; 4]),
            Family::Ip6 => IpAddr::from([0u16; 8]),
        }
    } else {
        arg(w, "-d")?.split('/').next()?.parse().ok()?
    };
    Some(FrontendKey {
        vip,
        port: arg(w, "--dport")?.parse().ok()?,
        proto: match arg(w, "-p")? {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return None,
        },
        scope,
    })
}

fn backend(rules: &[Vec<String>]) -> Option<Backend> {
    rules.iter().find_map(|w| {
        let to = arg(w, "--to-destination")?;
        let (ip, port) = to.rsplit_once(':')?;
        Some(Backend {
            ip: ip
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()?,
            port: port.parse().ok()?,
        })
    })
}

fn frontend(
    nat: &BTreeMap<String, Vec<Vec<String>>>,
    key: FrontendKey,
    chain: &str,
) -> FrontendDump {
    let mut fd = FrontendDump::new(key);
    let empty = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for w in nat.get(chain).unwrap_or(&empty) {
        if let Some(t) = arg(w, "--seconds") {
            fd.affinity_timeout = t.parse().ok();
        }
        // An allowed source range clears the drop mark (saved as --set-xmark).
        if arg(w, "-j") == Some("MARK") {
            if let Some(r) = arg(w, "-s") {
                fd.source_ranges.push(r.to_string());
            }
        }
        if let Some(target) = arg(w, "-j").filter(|t| t.starts_with("WEIR-BE-")) {
            if seen.insert(target.to_string()) {
                if let Some(b) = backend(nat.get(target).unwrap_or(&empty)) {
                    fd.backends.push((fd.backends.len() as u32, b));
                }
            }
        }
    }
    fd
}

/// The dump of the saved nat and filter tables of each family.
pub fn dump(saved: &[(Family, String, String)]) -> Dump {
    let mut dump = Dump::default();
    for (f, nat, filter) in saved {
        let nat = rules(nat);
        let filter = rules(filter);
        for (chain, scope, nodeport) in [
            ("WEIR-CLUSTER", Scope::Cluster, false),
            ("WEIR-EXTERNAL", Scope::External, false),
            ("WEIR-NODEPORTS", Scope::External, true),
        ] {
            for w in nat.get(chain).into_iter().flatten() {
                let Some(target) = arg(w, "-j").filter(|t| t.starts_with("WEIR-FE-")) else {
                    continue;
                };
                if let Some(k) = key(w, *f, scope, nodeport) {
                    dump.frontends.push(frontend(&nat, k, target));
                }
            }
        }
        for w in filter.get("WEIR-NOEP").into_iter().flatten() {
            if let Some(k) = key(w, *f, Scope::Cluster, false) {
                dump.frontends.push(frontend(&nat, k, ""));
            }
        }
    }
    dump.index_backends();
    dump
}
