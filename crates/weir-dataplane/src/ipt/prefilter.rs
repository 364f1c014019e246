//! The prefilter under the iptables dataplane: chain `WEIR-PREFILTER` of the raw table (before
//! conntrack and NAT), jumped to from PREROUTING, one DROP rule per denied prefix and node
//! device. The chain is restored whole, each rule with the counters it had (`--counters`), so
//! that the prefixes kept keep their counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ipnet::IpNet;

use super::{ensure_jump, run, IptablesBackend};
use crate::nft::expr::Family;
use crate::DataplaneError;

/// The chain (raw table).
pub const CHAIN: &str = "WEIR-PREFILTER";

/// The chain's rules in an `iptables-save -c` text: ((prefix, device), (packets, bytes)).
fn saved_rules(saved: &str) -> BTreeMap<(IpNet, String), (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in saved.lines() {
        let Some((counts, rule)) = line.strip_prefix('[').and_then(|l| l.split_once("] ")) else {
            continue;
        };
        let words: Vec<&str> = rule.split_whitespace().collect();
        if words.get(..2) != Some(&["-A", CHAIN][..]) {
            continue;
        }
        let after = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
        };
        let (Some(net), Some(dev)) = (after("-s").and_then(|s| s.parse().ok()), after("-i")) else {
            continue;
        };
        let (p, b) = counts.split_once(':').unwrap_or(("0", "0"));
        out.insert(
            (net, dev.to_string()),
            (p.parse().unwrap_or(0), b.parse().unwrap_or(0)),
        );
    }
    out
}

/// Family `f`'s raw table as `iptables-save -c` prints it.
fn saved_raw(
    netns: Option<&Path>,
    backend: IptablesBackend,
    f: Family,
) -> Result<String, DataplaneError> {
    run(
        netns,
        &backend.binary(f, "iptables-save"),
        &["-c", "-t", "raw"],
        None,
    )
}

/// The restore text of family `f`: the chain with a rule per prefix of `want` (of that
/// family) and device, each with its counters from `prev`.
fn render(
    f: Family,
    want: &BTreeSet<IpNet>,
    devices: &[String],
    prev: &BTreeMap<(IpNet, String), (u64, u64)>,
) -> String {
    let mut text = format!("*raw\n:{CHAIN} - [0:0]\n");
    for net in want.iter().filter(|n| {
        matches!(
            (f, n),
            (Family::Ip, IpNet::V4(_)) | (Family::Ip6, IpNet::V6(_))
        )
    }) {
        for dev in devices {
            let (p, b) = prev.get(&(*net, dev.clone())).copied().unwrap_or_default();
            text.push_str(&format!("[{p}:{b}] -A {CHAIN} -s {net} -i {dev} -j DROP\n"));
        }
    }
    text.push_str("COMMIT\n");
    text
}

/// Makes the chain deny exactly `want` on `devices`, both families, with the binaries of
/// `backend`.
pub fn write(
    netns: Option<&Path>,
    backend: IptablesBackend,
    want: &BTreeSet<IpNet>,
    devices: &[String],
) -> Result<(), DataplaneError> {
    for f in [Family::Ip, Family::Ip6] {
        let saved = saved_raw(netns, backend, f)?;
        let text = render(f, want, devices, &saved_rules(&saved));
        run(
            netns,
            &backend.binary(f, "iptables-restore"),
            &["-w", "--noflush", "--counters"],
            Some(&text),
        )?;
        ensure_jump(
            netns,
            &backend.binary(f, "iptables"),
            ("raw", "PREROUTING", CHAIN),
        )?;
    }
    Ok(())
}

/// Packets and bytes dropped per prefix (all devices together).
pub fn counters(
    netns: Option<&Path>,
    backend: IptablesBackend,
) -> Result<BTreeMap<IpNet, (u64, u64)>, DataplaneError> {
    let mut out: BTreeMap<IpNet, (u64, u64)> = BTreeMap::new();
    for f in [Family::Ip, Family::Ip6] {
        for ((net, _), (p, b)) in saved_rules(&saved_raw(netns, backend, f)?) {
            let e = out.entry(net).or_default();
            e.0 += p;
            e.1 += b;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_back_and_carried() {
        let saved = "*raw\n:PREROUTING ACCEPT [10:600]\n:WEIR-PREFILTER - [0:0]\n[0:0] -A PREROUTING -m comment --comment weir -j WEIR-PREFILTER\n[3:180] -A WEIR-PREFILTER -s 172.30.0.0/30 -i eth0 -j DROP\nCOMMIT\n";
        let prev = saved_rules(saved);
        assert_eq!(prev.len(), 1);
        let want: BTreeSet<IpNet> = [
            "172.30.0.0/30".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/48".parse().unwrap(),
        ]
        .into();
        let text = render(Family::Ip, &want, &["eth0".into()], &prev);
        assert_eq!(
            text,
            "*raw\n:WEIR-PREFILTER - [0:0]\n[0:0] -A WEIR-PREFILTER -s 10.0.0.0/8 -i eth0 -j DROP\n[3:180] -A WEIR-PREFILTER -s 172.30.0.0/30 -i eth0 -j DROP\nCOMMIT\n"
        );
    }
}
