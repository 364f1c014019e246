//! Closing connected UDP sockets whose backend went away. A connected UDP socket was
//! translated once, at connect(); later sends do not pass the sendmsg hook, so without this it
//! would keep sending to a removed backend (Cilium issue 48244). The sockets are destroyed
//! through sock_diag (`ss -K`, CONFIG_INET_DIAG_DESTROY) in every network namespace that has a
//! process in the hooked cgroup subtree; the application sees ECONNABORTED and reconnects,
//! which translates again.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use weir_control::lb::Backend;

fn pids_in_tree(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            pids_in_tree(&e.path(), out);
        }
    }
}

/// One pid per distinct network namespace among the processes of the cgroup tree.
fn netns_representatives(cgroup: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    pids_in_tree(cgroup, &mut pids);
    let mut by_ns: BTreeMap<String, u32> = BTreeMap::new();
    for p in pids {
        if let Ok(link) = std::fs::read_link(format!("/proc/{p}/ns/net")) {
            by_ns.entry(link.display().to_string()).or_insert(p);
        }
    }
    by_ns.into_values().collect()
}

/// Destroys UDP sockets connected to any of `backends` in the namespaces of `cgroup`'s
/// processes. Returns how many were destroyed.
pub fn destroy_connected_udp(cgroup: &Path, backends: &[Backend]) -> usize {
    let mut destroyed = 0;
    for pid in netns_representatives(cgroup) {
        for b in backends {
            let dst = match b.ip {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let out = Command::new("nsenter")
                .arg(format!("--net=/proc/{pid}/ns/net"))
                .args([
                    "ss",
                    "-K",
                    "-H",
                    "-u",
                    "state",
                    "connected",
                    "dst",
                    &dst,
                    "dport",
                    "=",
                    &format!(":{}", b.port),
                ])
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    destroyed += String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .count()
                }
                Ok(o) => {
                    tracing::warn!(pid, backend = %b, stderr = %String::from_utf8_lossy(&o.stderr).trim(), "ss -K failed")
                }
                Err(e) => tracing::warn!(error = %e, "running ss -K"),
            }
        }
    }
    destroyed
}
