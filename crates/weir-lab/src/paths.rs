//! Where a lab keeps its files, namespaces and cgroups, and its recorded layout.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LabError;

/// Root of every lab's files (one directory per lab).
pub const RUN_ROOT: &str = "/run/weir/labs";
/// Root of pinned BPF objects of all labs (per lab: `<root>/<lab>`).
pub const BPF_ROOT: &str = "/sys/fs/bpf/weir";

/// Checks a lab name: a DNS label of at most 20 characters, so that every derived name
/// (namespaces, cgroups, pins) stays valid and unambiguous.
pub fn check_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(LabError::BadName(name.to_string()))
    }
}

/// The files and names of one lab.
#[derive(Debug, Clone)]
pub struct LabPaths {
    /// Lab name.
    pub name: String,
    /// The lab's directory.
    pub dir: PathBuf,
}

impl LabPaths {
    /// Paths of lab `name`.
    pub fn new(name: &str) -> Self {
        LabPaths {
            name: name.to_string(),
            dir: Path::new(RUN_ROOT).join(name),
        }
    }
    /// `lab.json`: the recorded layout.
    pub fn layout_file(&self) -> PathBuf {
        self.dir.join("lab.json")
    }
    /// The kubeconfig for kubectl and kube-rs.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// Certificates and token.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }
    /// The API server's database.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    /// Component logs.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// Pid files of components.
    pub fn pid_dir(&self) -> PathBuf {
        self.dir.join("pids")
    }
    /// Per-node kubelet state (pod sandboxes, IP allocations).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
    /// The BPF pin directory of a node's agent.
    pub fn node_bpf_dir(&self, node: &str) -> PathBuf {
        self.bpf_dir().join(node)
    }
    /// Where the node's network plugin (the lab kubelet) leaves endpoint records for the
    /// agent.
    pub fn endpoint_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("endpoints")
    }
    /// A node's CNI configuration directory (its conflist, as /etc/cni/net.d on a real node).
    pub fn cni_conf_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("cni").join("net.d")
    }
    /// Where the node's CNI plugin keeps its address allocations.
    pub fn cni_ipam_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("cni").join("ipam")
    }
    /// The lab's CNI plugin directory (as /opt/cni/bin): `weir-cni`.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni").join("bin")
    }
    /// The introspection socket of a node's agent.
    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.sock")
    }
    /// Name of a lab network namespace: `weir.<lab>.<what>` (dots cannot occur in lab names,
    /// so no lab's names are a prefix of another's).
    pub fn netns(&self, what: &str) -> String {
        format!("weir.{}.{what}", self.name)
    }
    /// Prefix of all of this lab's network namespaces.
    pub fn netns_prefix(&self) -> String {
        format!("weir.{}.", self.name)
    }
    /// Where the lab mounts cgroup v2 (its own mount, so that labs never share one and
    /// the host's /sys/fs/cgroup is left alone).
    pub fn cgroup_mount(&self) -> PathBuf {
        self.dir.join("cgroup2")
    }
    /// The lab's cgroup v2 directory: `weir.<lab>` at the root of the hierarchy, holding
    /// one directory per node (and `external`), which hold one per pod.
    pub fn cgroup_dir(&self) -> PathBuf {
        self.cgroup_mount().join(format!("weir.{}", self.name))
    }
    /// The lab's BPF pin directory.
    pub fn bpf_dir(&self) -> PathBuf {
        Path::new(BPF_ROOT).join(&self.name)
    }
}

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// One node of a lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeLayout {
    /// Node name (`node-1`, ...).
    pub name: String,
    /// 1-based index.
    pub index: u8,
    /// Network namespace name.
    pub netns: String,
    /// Address on the fabric (IPv4).
    pub ip: Ipv4Addr,
    /// Address on the fabric (IPv6).
    pub ip6: Ipv6Addr,
    /// Pod CIDR (IPv4).
    pub pod_cidr: String,
    /// Pod CIDR (IPv6).
    pub pod_cidr6: String,
    /// The loopback port the node's agent serves /healthz, /readyz and /metrics on (0: none).
    #[serde(default)]
    pub metrics_port: u16,
}

/// The recorded layout of a lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    /// Lab name.
    pub name: String,
    /// API server port on 127.0.0.1.
    pub apiserver_port: u16,
    /// Nodes.
    pub nodes: Vec<NodeLayout>,
    /// The external host's namespace.
    pub external_netns: String,
    /// The external host's fabric addresses.
    pub external_ip: Ipv4Addr,
    /// IPv6 of the external host.
    pub external_ip6: Ipv6Addr,
    /// The fabric namespace (a bridge joining nodes and the external host).
    pub fabric_netns: String,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Default backend selection of the lab's agents (`random` or `maglev`).
    #[serde(default = "default_algorithm")]
    pub lb_algorithm: String,
    /// Whether the agents load-balance pods' Service traffic at the socket layer (else per
    /// packet at tc).
    #[serde(default = "default_true")]
    pub socket_lb: bool,
    /// How pods reach other nodes' pods: `native` (routes through the nodes' fabric
    /// addresses) or `vxlan` (a collect-metadata VXLAN device driven by the agents).
    #[serde(default = "default_tunnel")]
    pub tunnel: String,
    /// Whether the agents attach XDP to the nodes' devices.
    #[serde(default)]
    pub xdp: bool,
    /// Whether the agents masquerade pods' flows leaving the cluster.
    #[serde(default)]
    pub masquerade: bool,
    /// How long the agents keep a security identity no pod needs, in milliseconds.
    #[serde(default = "default_identity_gc_grace_ms")]
    pub identity_gc_grace_ms: u64,
    /// The agents' service proxy name (which labelled Services they program).
    #[serde(default)]
    pub service_proxy_name: Option<String>,
}

fn default_identity_gc_grace_ms() -> u64 {
    300_000
}

fn default_tunnel() -> String {
    "native".into()
}

fn default_true() -> bool {
    true
}

fn default_algorithm() -> String {
    "random".into()
}

impl Layout {
    /// Plans the layout of a lab with `nodes` nodes.
    pub fn plan(paths: &LabPaths, nodes: u8, apiserver_port: u16) -> Layout {
        let nodes = (1..=nodes)
            .map(|i| NodeLayout {
                name: format!("node-{i}"),
                index: i,
                netns: paths.netns(&format!("node-{i}")),
                ip: Ipv4Addr::new(172, 30, 0, 10 + i),
                ip6: format!("fd00:172:30::{}", 10 + i).parse().expect("ipv6"),
                pod_cidr: format!("10.244.{i}.0/24"),
                pod_cidr6: format!("fd00:10:244:{i}::/64"),
                metrics_port: 0,
            })
            .collect();
        Layout {
            name: paths.name.clone(),
            apiserver_port,
            nodes,
            external_netns: paths.netns("external"),
            external_ip: Ipv4Addr::new(172, 30, 0, 2),
            external_ip6: "fd00:172:30::2".parse().expect("ipv6"),
            fabric_netns: paths.netns("fabric"),
            created: weir_model::now_rfc3339(),
            lb_algorithm: default_algorithm(),
            socket_lb: true,
            tunnel: default_tunnel(),
            xdp: false,
            masquerade: false,
            identity_gc_grace_ms: default_identity_gc_grace_ms(),
            service_proxy_name: None,
        }
    }

    /// Reads a lab's layout.
    pub fn load(paths: &LabPaths) -> Result<Layout, LabError> {
        let text = std::fs::read_to_string(paths.layout_file())
            .map_err(|_| LabError::NoSuchLab(paths.name.clone()))?;
        serde_json::from_str(&text).map_err(|e| LabError::Corrupt {
            path: paths.layout_file(),
            reason: e.to_string(),
        })
    }

    /// Writes the layout.
    pub fn save(&self, paths: &LabPaths) -> Result<(), LabError> {
        let text = serde_json::to_string_pretty(self).expect("json");
        std::fs::write(paths.layout_file(), text).map_err(|e| LabError::io(paths.layout_file(), e))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeLayout, LabError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::NoSuchNode(self.name.clone(), name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("demo-1").is_ok());
        assert!(check_name("Demo").is_err());
        assert!(check_name("a.b").is_err());
        assert!(check_name("").is_err());
        let p = LabPaths::new("a");
        assert_eq!(p.netns("node-1"), "weir.a.node-1");
        let l = Layout::plan(&p, 2, 1234);
        assert_eq!(l.nodes[1].pod_cidr, "10.244.2.0/24");
        assert_eq!(l.nodes[1].ip6.to_string(), "fd00:172:30::12");
    }
}
