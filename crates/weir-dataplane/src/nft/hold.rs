//! Keeping the kernel translating the flows netfilter NATed, after a switch to eBPF removed
//! the rules that did it: connections the node's own processes opened to a Service (DNATed
//! in the output hook). No program sees a connected socket's later packets, so those flows
//! stay the kernel's conntrack's; but a network namespace's conntrack and NAT hooks are
//! registered only while something uses them (a NAT chain, a rule matching on conntrack),
//! and once the last netfilter rule of weir's goes, such a flow's next packet leaves
//! untranslated. Tables `ip weir-nat-hold` and `ip6 weir-nat-hold` hold both: an empty NAT
//! chain on the output hook, and a filter chain counting established packets. They go when
//! no such flow is left.

use std::path::Path;

use super::nft;
use crate::DataplaneError;

/// The tables' name (families ip and ip6).
pub const TABLE: &str = "weir-nat-hold";

/// Writes the tables (again, if they are there).
pub fn hold(netns: Option<&Path>) -> Result<(), DataplaneError> {
    let mut script = String::new();
    for family in ["ip", "ip6"] {
        script.push_str(&format!(
            "add table {family} {TABLE}\ndelete table {family} {TABLE}\n\
             table {family} {TABLE} {{\n\
             \tchain nat {{ type nat hook output priority 100; }}\n\
             \tchain track {{ type filter hook output priority 100; ct state established counter; }}\n\
             }}\n"
        ));
    }
    nft(netns, &["-f", "-"], Some(&script)).map(|_| ())
}

/// Whether the tables are there.
pub fn held(netns: Option<&Path>) -> Result<bool, DataplaneError> {
    let tables = nft(netns, &["list", "tables"], None)?;
    Ok(tables
        .lines()
        .any(|l| l.trim() == format!("table ip {TABLE}")))
}

/// Removes the tables (nothing when they are not there).
pub fn release(netns: Option<&Path>) -> Result<(), DataplaneError> {
    let mut script = String::new();
    for family in ["ip", "ip6"] {
        script.push_str(&format!(
            "add table {family} {TABLE}\ndelete table {family} {TABLE}\n"
        ));
    }
    nft(netns, &["-f", "-"], Some(&script)).map(|_| ())
}
