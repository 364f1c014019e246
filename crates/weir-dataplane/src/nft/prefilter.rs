//! The prefilter under the nftables dataplane: table `inet weir-prefilter`, one chain on the
//! prerouting hook at priority -310 (before conntrack and NAT), one rule per denied prefix,
//! matching packets from it arriving on the node's devices, with a counter and the prefix as
//! its comment. Rules are added and deleted one by one (by handle), so that the other
//! prefixes keep their counters. (Rules, not an interval set: a set refuses overlapping
//! prefixes, which the eBPF prefilter's LPM trie takes.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ipnet::IpNet;
use serde_json::Value;

use super::nft;
use crate::DataplaneError;

/// The table (family inet).
pub const TABLE: &str = "weir-prefilter";

/// One rule as listed: its prefix, handle and counter.
struct Rule {
    net: IpNet,
    handle: u64,
    packets: u64,
    bytes: u64,
}

/// The rules of the table, or None when the table is not there.
fn listing(netns: Option<&Path>) -> Result<Option<Vec<Rule>>, DataplaneError> {
    let Ok(text) = nft(netns, &["-j", "-a", "list", "table", "inet", TABLE], None) else {
        return Ok(None);
    };
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| DataplaneError::Netfilter(format!("nft printed invalid JSON: {e}")))?;
    let mut out = Vec::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let r = &item["rule"];
        let Some(net) = r["comment"].as_str().and_then(|c| c.parse().ok()) else {
            continue;
        };
        let counter = r["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e.get("counter"));
        out.push(Rule {
            net,
            handle: r["handle"].as_u64().unwrap_or_default(),
            packets: counter.and_then(|c| c["packets"].as_u64()).unwrap_or(0),
            bytes: counter.and_then(|c| c["bytes"].as_u64()).unwrap_or(0),
        });
    }
    Ok(Some(out))
}

/// The rule denying `net` on `devices` (all interfaces when none are named).
fn rule(net: &IpNet, devices: &[String]) -> String {
    let field = match net {
        IpNet::V4(_) => "ip saddr",
        IpNet::V6(_) => "ip6 saddr",
    };
    let iif = if devices.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = devices.iter().map(|d| format!("\"{d}\"")).collect();
        format!("iifname {{ {} }} ", names.join(", "))
    };
    format!("add rule inet {TABLE} prerouting {iif}{field} {net} counter drop comment \"{net}\"\n")
}

/// The commands taking the table from `have` (None: not there) to denying `want` on
/// `devices`.
fn commands(have: Option<&[Rule]>, want: &BTreeSet<IpNet>, devices: &[String]) -> String {
    let mut text = String::new();
    if have.is_none() {
        text.push_str(&format!(
            "add table inet {TABLE}\nadd chain inet {TABLE} prerouting {{ type filter hook prerouting priority -310; policy accept; }}\n"
        ));
    }
    let have = have.unwrap_or_default();
    for r in have.iter().filter(|r| !want.contains(&r.net)) {
        text.push_str(&format!(
            "delete rule inet {TABLE} prerouting handle {}\n",
            r.handle
        ));
    }
    let had: BTreeSet<IpNet> = have.iter().map(|r| r.net).collect();
    for n in want.difference(&had) {
        text.push_str(&rule(n, devices));
    }
    text
}

/// Makes the table deny exactly `want` on `devices`, in one transaction (the table made
/// when missing; prefixes kept keep their counters).
pub fn write(
    netns: Option<&Path>,
    want: &BTreeSet<IpNet>,
    devices: &[String],
) -> Result<(), DataplaneError> {
    let have = listing(netns)?;
    let text = commands(have.as_deref(), want, devices);
    if text.is_empty() {
        return Ok(());
    }
    nft(netns, &["-f", "-"], Some(&text)).map(|_| ())
}

/// Packets and bytes dropped per prefix.
pub fn counters(netns: Option<&Path>) -> Result<BTreeMap<IpNet, (u64, u64)>, DataplaneError> {
    let mut out: BTreeMap<IpNet, (u64, u64)> = BTreeMap::new();
    for r in listing(netns)?.unwrap_or_default() {
        let e = out.entry(r.net).or_default();
        e.0 += r.packets;
        e.1 += r.bytes;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_touch_only_the_prefixes_that_change() {
        let want: BTreeSet<IpNet> = [
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/48".parse().unwrap(),
        ]
        .into();
        let devs = vec!["eth0".to_string()];
        let first = commands(None, &want, &devs);
        assert!(first.starts_with("add table inet weir-prefilter\n"));
        assert!(first.contains(
            "add rule inet weir-prefilter prerouting iifname { \"eth0\" } ip6 saddr 2001:db8::/48 counter drop comment \"2001:db8::/48\"\n"
        ));
        let have = [
            Rule {
                net: "10.0.0.0/8".parse().unwrap(),
                handle: 4,
                packets: 9,
                bytes: 900,
            },
            Rule {
                net: "192.0.2.0/24".parse().unwrap(),
                handle: 5,
                packets: 0,
                bytes: 0,
            },
        ];
        let next = commands(Some(&have), &want, &devs);
        assert_eq!(
            next,
            "delete rule inet weir-prefilter prerouting handle 5\nadd rule inet weir-prefilter prerouting iifname { \"eth0\" } ip6 saddr 2001:db8::/48 counter drop comment \"2001:db8::/48\"\n"
        );
    }
}
