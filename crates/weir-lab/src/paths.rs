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
/// (namespaces, cgroups, pins) stays valid and unambiguous; or `SET/cK`, cluster cK of
/// clusterset SET.
pub fn check_name(name: &str) -> Result<(), LabError> {
    if let Some((set, cluster)) = name.split_once('/') {
        check_label(set).map_err(|_| LabError::BadName(name.to_string()))?;
        return check_label(cluster).map_err(|_| LabError::BadName(name.to_string()));
    }
    check_label(name)
}

fn check_label(name: &str) -> Result<(), LabError> {
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
    /// Paths of lab `name` (a lab, a clusterset, or `SET/cK`: a cluster of a clusterset, whose
    /// directory, namespaces and pins sit inside the clusterset's).
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
        format!("weir.{}.{what}", self.dotted())
    }
    /// Prefix of all of this lab's network namespaces.
    pub fn netns_prefix(&self) -> String {
        format!("weir.{}.", self.dotted())
    }
    /// The name with `/` (a clusterset's cluster) written as `.`.
    fn dotted(&self) -> String {
        self.name.replace('/', ".")
    }
    /// The clusterset this lab is a cluster of, if any.
    pub fn clusterset(&self) -> Option<&str> {
        self.name.split_once('/').map(|(set, _)| set)
    }
    /// Where the lab mounts cgroup v2 (its own mount, so that labs never share one and
    /// the host's /sys/fs/cgroup is left alone).
    pub fn cgroup_mount(&self) -> PathBuf {
        self.dir.join("cgroup2")
    }
    /// The lab's cgroup v2 directory: `weir.<lab>` at the root of the hierarchy, holding
    /// one directory per node (and `external`), which hold one per pod.
    pub fn cgroup_dir(&self) -> PathBuf {
        self.cgroup_mount().join(format!("weir.{}", self.dotted()))
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
    /// The node's dataplane when it differs from the lab's (a `weir dataplane switch` that
    /// stopped part way): its agent starts in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<weir_dataplane::DataplaneKind>,
}

impl Layout {
    /// The dataplane node `n`'s agent runs.
    pub fn dataplane_of(&self, n: &NodeLayout) -> weir_dataplane::DataplaneKind {
        n.dataplane.unwrap_or(self.dataplane)
    }
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
    /// The dataplane the agents render their node's state with.
    #[serde(default)]
    pub dataplane: weir_dataplane::DataplaneKind,
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
    /// Prefix length of the fabric's addresses (IPv4): 24 for a lab, 16 for a clusterset's
    /// shared fabric.
    #[serde(default = "default_fabric_prefix")]
    pub fabric_prefix: u8,
    /// The API server's Service CIDRs, primary first.
    #[serde(default = "default_service_cidrs")]
    pub service_cidrs: Vec<String>,
    /// The LoadBalancer IP pool (IPv4) the lab's controller hands out.
    #[serde(default = "default_lb_pool")]
    pub lb_pool: String,
    /// Destinations the agents never masquerade to besides their own cluster's pod CIDRs:
    /// in a clusterset, the other clusters' pod ranges.
    #[serde(default)]
    pub non_masquerade: Vec<String>,
    /// The CIDRs the cluster's mesh allocates ClusterSetIPs from (clusterset clusters only).
    #[serde(default)]
    pub clusterset_cidrs: Vec<String>,
}

fn default_fabric_prefix() -> u8 {
    24
}

fn default_service_cidrs() -> Vec<String> {
    vec!["10.96.0.0/16".into(), "fd00:10:96::/112".into()]
}

fn default_lb_pool() -> String {
    "172.30.100.0/24".into()
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
        Layout::plan_in(paths, nodes, apiserver_port, None)
    }

    /// Plans the layout of a lab, or of cluster `cluster` (1-based) of a clusterset: its
    /// nodes at 172.30.K.x on the clusterset's /16 fabric, pod CIDRs in 10.(243+K).0.0/16,
    /// Service CIDR 10.(95+K).0.0/16 and LoadBalancer pool 172.30.(100+K).0/24, so that no
    /// two clusters' ranges overlap (cluster 1's are a lab's own).
    pub fn plan_in(
        paths: &LabPaths,
        nodes: u8,
        apiserver_port: u16,
        cluster: Option<u8>,
    ) -> Layout {
        let k = cluster.unwrap_or(0);
        let pods = 243 + k.max(1) as u16;
        let nodes = (1..=nodes)
            .map(|i| NodeLayout {
                name: format!("node-{i}"),
                index: i,
                netns: paths.netns(&format!("node-{i}")),
                ip: Ipv4Addr::new(172, 30, k, 10 + i),
                ip6: if k == 0 {
                    format!("fd00:172:30::{}", 10 + i)
                } else {
                    format!("fd00:172:30::{k}:{}", 10 + i)
                }
                .parse()
                .expect("ipv6"),
                pod_cidr: format!("10.{pods}.{i}.0/24"),
                pod_cidr6: format!("fd00:10:{pods}:{i}::/64"),
                metrics_port: 0,
                dataplane: None,
            })
            .collect();
        // A clusterset's clusters share its fabric and external host.
        let shared = LabPaths::new(paths.clusterset().unwrap_or(&paths.name));
        let svc = 95 + k.max(1) as u16;
        Layout {
            name: paths.name.clone(),
            apiserver_port,
            nodes,
            external_netns: shared.netns("external"),
            external_ip: Ipv4Addr::new(172, 30, 0, 2),
            external_ip6: "fd00:172:30::2".parse().expect("ipv6"),
            fabric_netns: shared.netns("fabric"),
            created: weir_model::now_rfc3339(),
            lb_algorithm: default_algorithm(),
            socket_lb: true,
            dataplane: Default::default(),
            tunnel: default_tunnel(),
            xdp: false,
            masquerade: false,
            identity_gc_grace_ms: default_identity_gc_grace_ms(),
            service_proxy_name: None,
            fabric_prefix: if cluster.is_some() { 16 } else { 24 },
            service_cidrs: vec![format!("10.{svc}.0.0/16"), format!("fd00:10:{svc}::/112")],
            lb_pool: format!("172.30.{}.0/24", 100 + k as u16),
            non_masquerade: Vec::new(),
            clusterset_cidrs: Vec::new(),
        }
    }

    /// The pod range of cluster `k` of a clusterset (every node's pod CIDR is inside it).
    pub fn cluster_pod_ranges(k: u8) -> [String; 2] {
        let pods = 243 + k.max(1) as u16;
        [format!("10.{pods}.0.0/16"), format!("fd00:10:{pods}::/48")]
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
        assert_eq!(l.lb_pool, "172.30.100.0/24");
        assert_eq!(l.service_cidrs[0], "10.96.0.0/16");
        assert_eq!(l.fabric_prefix, 24);
    }

    #[test]
    fn clusterset_clusters_do_not_overlap() {
        assert!(check_name("set/c1").is_ok());
        assert!(check_name("set/").is_err());
        assert!(check_name("set/c1/x").is_err());
        let p = LabPaths::new("set/c2");
        assert_eq!(p.dir, Path::new(RUN_ROOT).join("set").join("c2"));
        assert_eq!(p.netns("node-1"), "weir.set.c2.node-1");
        assert_eq!(p.clusterset(), Some("set"));
        let c1 = Layout::plan_in(&LabPaths::new("set/c1"), 2, 1, Some(1));
        let c2 = Layout::plan_in(&p, 2, 1, Some(2));
        assert_eq!(c2.fabric_netns, "weir.set.fabric");
        assert_eq!(c2.external_netns, "weir.set.external");
        assert_eq!(c1.nodes[0].pod_cidr, "10.244.1.0/24");
        assert_eq!(c2.nodes[0].pod_cidr, "10.245.1.0/24");
        assert_eq!(c2.nodes[1].ip.to_string(), "172.30.2.12");
        assert_eq!(c2.service_cidrs, ["10.97.0.0/16", "fd00:10:97::/112"]);
        assert_eq!(c1.lb_pool, "172.30.101.0/24");
        assert_eq!(c2.lb_pool, "172.30.102.0/24");
        assert_eq!(c2.fabric_prefix, 16);
        assert_eq!(Layout::cluster_pod_ranges(2)[0], "10.245.0.0/16");
    }
}
