//! The lab's kernel networking: a fabric namespace with a bridge, one namespace per node and
//! one for the external host. Pods' namespaces are wired by the CNI plugin (weir-cni: a /32
//! and /128 on `eth0`, a default route to a link-local gateway the node answers on every
//! pod-facing veth); the node routes other nodes' pod CIDRs to their fabric addresses (native
//! routing) or the agents carry them over VXLAN.

use crate::paths::{Layout, NodeLayout};
use crate::sys::{self, ip, ip_batch};
use crate::LabError;

fn base_sysctls(ns: &str, forwarding: bool) -> Result<(), LabError> {
    let f = if forwarding { "1" } else { "0" };
    sys::sysctls(
        ns,
        &[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv4.ip_forward", f),
            ("net.ipv6.conf.all.forwarding", f),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.ping_group_range", "0 2147483647"),
        ],
    )
}

/// Creates the fabric, the external host and every node of `layout`.
pub fn create_cluster_network(layout: &Layout) -> Result<(), LabError> {
    create_fabric(layout)?;
    add_cluster_nodes(layout)?;
    route_pod_cidrs(&[layout])
}

/// The fabric's port of node `n` (`n1`; in a clusterset's cluster `c2n1`, as the clusters
/// share one fabric).
pub fn fabric_port(layout: &Layout, n: &NodeLayout) -> String {
    match layout.name.split_once('/') {
        Some((_, cluster)) => format!("{cluster}n{}", n.index),
        None => format!("n{}", n.index),
    }
}

/// Creates the fabric namespace with its bridge, and the external host on it (once per lab,
/// or per clusterset).
pub fn create_fabric(layout: &Layout) -> Result<(), LabError> {
    let fabric = &layout.fabric_netns;
    ip(&["netns", "add", fabric])?;
    base_sysctls(fabric, false)?;
    ip_batch(
        Some(fabric),
        &[
            "link set lo up".into(),
            "link add br0 type bridge".into(),
            "link set br0 up".into(),
        ],
    )?;
    attach_host(
        layout,
        &layout.external_netns,
        "ext",
        &layout.external_ip.to_string(),
        &layout.external_ip6.to_string(),
        false,
        1500,
    )?;
    sys::sysctls(
        &layout.external_netns,
        &[("net.ipv4.fib_multipath_hash_policy", "1")],
    )?;
    if layout.xdp {
        xdp_ready_ports(layout, &["ext".to_string()], &[&layout.external_netns])?;
    }
    Ok(())
}

/// Adds the nodes of `layout` to the fabric, with the external host's route to the
/// cluster's LoadBalancer pool and, in VXLAN mode, each node's tunnel device.
pub fn add_cluster_nodes(layout: &Layout) -> Result<(), LabError> {
    for n in &layout.nodes {
        create_node(layout, n)?;
        // The node-local DNS address pods' resolv.conf names (see dns_server).
        ip_batch(
            Some(&n.netns),
            &[format!("addr add {}/32 dev lo", crate::dns::NODE_LOCAL_DNS)],
        )?;
    }
    // The external host reaches LoadBalancer IPs through every node, spreading connections by
    // their ports (ECMP with the L4 hash), as an upstream router announcing them from each node
    // would.
    let hops: Vec<String> = layout
        .nodes
        .iter()
        .map(|n| format!("nexthop via {}", n.ip))
        .collect();
    ip_batch(
        Some(&layout.external_netns),
        &[format!(
            "route replace {} {}",
            layout.lb_pool,
            hops.join(" ")
        )],
    )?;
    if layout.xdp {
        let ports: Vec<String> = layout
            .nodes
            .iter()
            .map(|n| fabric_port(layout, n))
            .collect();
        let hosts: Vec<&str> = layout.nodes.iter().map(|n| n.netns.as_str()).collect();
        xdp_ready_ports(layout, &ports, &hosts)?;
    }
    if layout.tunnel == "vxlan" {
        // VXLAN mode: one collect-metadata device per node; the agents pick the far end per
        // packet. Pod addresses are not routed on the fabric (nor from the external host).
        for n in &layout.nodes {
            ip_batch(
                Some(&n.netns),
                &[
                    format!("link add {TUNNEL_DEVICE} type vxlan external dstport 8472"),
                    format!("link set {TUNNEL_DEVICE} up"),
                ],
            )?;
        }
    }
    Ok(())
}

/// XDP_TX sends frames as they are: packets must carry complete checksums, so every link
/// that could hand a node a CHECKSUM_PARTIAL packet computes them in software; and a veth
/// receives what its peer sends with XDP_TX only when it has an XDP program itself: a
/// pass-everything one on the fabric side of each link.
fn xdp_ready_ports(layout: &Layout, ports: &[String], hosts: &[&str]) -> Result<(), LabError> {
    for port in ports {
        sys::run(
            "ip",
            &[
                "netns",
                "exec",
                &layout.fabric_netns,
                "ethtool",
                "-K",
                port,
                "tx",
                "off",
            ],
        )?;
    }
    let fabric = crate::paths::netns_path(&layout.fabric_netns);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), LabError> {
            sys::enter_netns(&fabric)?;
            for port in ports {
                let ifindex = nix::net::if_::if_nametoindex(port.as_str())
                    .map_err(|e| LabError::Command(format!("fabric port {port}"), e.to_string()))?;
                weir_bpf::datapath::attach_xdp_pass(ifindex).map_err(|e| {
                    LabError::Command(format!("XDP on fabric port {port}"), e.to_string())
                })?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| LabError::Command("XDP on the fabric".into(), "thread panicked".into()))?
    })?;
    for ns in hosts {
        sys::run(
            "ip",
            &["netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off"],
        )?;
    }
    Ok(())
}

/// Native routing: every node of `layouts` (and the external host) reaches each node's pod
/// CIDRs through that node's fabric address, as a routed underlay would. Clusters in VXLAN
/// mode carry pod traffic in their tunnels instead.
pub fn route_pod_cidrs(layouts: &[&Layout]) -> Result<(), LabError> {
    let all: Vec<&NodeLayout> = layouts.iter().flat_map(|l| l.nodes.iter()).collect();
    for layout in layouts.iter().filter(|l| l.tunnel != "vxlan") {
        for n in &layout.nodes {
            let mut hosts: Vec<&str> = all
                .iter()
                .filter(|o| o.netns != n.netns)
                .map(|o| o.netns.as_str())
                .collect();
            hosts.push(&layout.external_netns);
            for h in hosts {
                ip_batch(
                    Some(h),
                    &[
                        format!("route replace {} via {}", n.pod_cidr, n.ip),
                        format!("route replace {} via {}", n.pod_cidr6, n.ip6),
                    ],
                )?;
            }
        }
    }
    Ok(())
}

/// The VXLAN device of each node in VXLAN mode.
pub const TUNNEL_DEVICE: &str = "vxlan0";

/// The MTU of the nodes' fabric links: room for DSR's outer IPv4 header (20 bytes) around a
/// full-size 1,500-byte packet from outside, as an underlay carrying tunnels has.
pub const NODE_FABRIC_MTU: u32 = 1600;

fn attach_host(
    layout: &Layout,
    ns: &str,
    fabric_if: &str,
    ip4: &str,
    ip6: &str,
    forwarding: bool,
    mtu: u32,
) -> Result<(), LabError> {
    ip(&["netns", "add", ns])?;
    base_sysctls(ns, forwarding)?;
    ip_batch(
        Some(&layout.fabric_netns),
        &[
            format!("link add {fabric_if} mtu {mtu} type veth peer name eth0 netns {ns}"),
            format!("link set {fabric_if} master br0"),
            format!("link set {fabric_if} up"),
        ],
    )?;
    ip_batch(
        Some(ns),
        &[
            "link set lo up".into(),
            format!("link set eth0 mtu {mtu}"),
            "link set eth0 up".into(),
            format!("addr add {ip4}/{} dev eth0", layout.fabric_prefix),
            format!("addr add {ip6}/64 dev eth0 nodad"),
        ],
    )
}

/// The source ports lab agents SNAT NodePort flows to (`--snat-ports`): a wide range, with
/// the nodes' own ephemeral ports kept below it. A flow its backend closed first keeps its
/// port for the backend's TIME_WAIT (60 s), so the range bounds the sustained rate of such
/// flows per backend (20,480 ports: about 340 per second).
pub const LAB_SNAT_PORTS: (u16, u16) = (45056, 65535);

fn create_node(layout: &Layout, n: &NodeLayout) -> Result<(), LabError> {
    attach_host(
        layout,
        &n.netns,
        &fabric_port(layout, n),
        &n.ip.to_string(),
        &n.ip6.to_string(),
        true,
        NODE_FABRIC_MTU,
    )?;
    // The node's own connections take ports below the SNAT range (kernel ephemeral ports
    // and SNAT ports must not meet: a reply to the node's own flow would be taken for a
    // SNATed one's).
    let range = format!("32768 {}", LAB_SNAT_PORTS.0 - 1);
    sys::sysctls(
        &n.netns,
        &[("net.ipv4.ip_local_port_range", range.as_str())],
    )?;
    // A netfilter dataplane translates the node's own connections to Service addresses after
    // the routing decision (kube-proxy relies on the node's default route): the service CIDRs
    // get a route, as a real node's default route would serve them (also for a node switched
    // to netfilter later). The eBPF one translates at connect() and at tc, before any route.
    let routes: Vec<String> = layout
        .service_cidrs
        .iter()
        .map(|c| format!("route replace {c} dev eth0"))
        .collect();
    ip_batch(Some(&n.netns), &routes)
}

/// The sysctls of a new pod namespace (a runtime's sandbox setup, before CNI ADD): no DAD,
/// no forwarding, loose reverse-path filtering, and unprivileged ICMP echo sockets.
pub fn pod_sysctls(netns: &str) -> Result<(), LabError> {
    base_sysctls(netns, false)
}
