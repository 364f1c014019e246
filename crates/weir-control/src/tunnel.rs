//! Where pods are: which node has which pod CIDRs, from the Node objects (spec.podCIDRs and
//! the first IPv4 InternalIP). VXLAN mode routes every other node's pod CIDRs through the
//! tunnel; masquerading leaves flows to any node's pod CIDR untranslated.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Node;

/// One route through the tunnel: a pod CIDR (network, prefix length) and its node's underlay
/// IPv4 address.
pub type TunnelRoute = (IpAddr, u8, Ipv4Addr);

/// The tunnel routes to the other nodes' pods, sorted.
pub fn routes<N: std::borrow::Borrow<Node>>(nodes: &[N], this_node: &str) -> Vec<TunnelRoute> {
    let mut out = Vec::new();
    for n in nodes.iter().map(|n| n.borrow()) {
        if n.metadata.name.as_deref() == Some(this_node) {
            continue;
        }
        let Some(ip) = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        for net in pod_cidrs(n) {
            out.push((net.addr(), net.prefix_len(), ip));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Another cluster's node (a RemoteNode's `spec`: `cluster`, `node`, `addresses`,
/// `podCIDRs`) as a Node named `<cluster>.<node>`, so that it is routed (or tunnelled) to and
/// left unmasqueraded like this cluster's nodes.
pub fn remote_node(spec: &serde_json::Value) -> Option<Node> {
    let name = format!(
        "{}.{}",
        spec.get("cluster")?.as_str()?,
        spec.get("node")?.as_str()?
    );
    let addresses: Vec<serde_json::Value> = spec
        .get("addresses")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .map(|a| serde_json::json!({"type": "InternalIP", "address": a}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"podCIDRs": spec.get("podCIDRs").cloned().unwrap_or_default()},
        "status": {"addresses": addresses},
    }))
    .ok()
}

/// A node's pod CIDRs (spec.podCIDRs, else spec.podCIDR); unparsable ones are skipped.
fn pod_cidrs(n: &Node) -> Vec<ipnet::IpNet> {
    let spec = n.spec.as_ref();
    let cidrs = spec
        .and_then(|s| s.pod_cidrs.clone())
        .filter(|v| !v.is_empty())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default();
    cidrs
        .iter()
        .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
        .map(|n| n.trunc())
        .collect()
}

/// Every node's IPv4 pod CIDR (this node's too), sorted: the destinations a masquerading
/// node leaves untranslated.
pub fn pod_cidrs4<N: std::borrow::Borrow<Node>>(nodes: &[N]) -> Vec<(Ipv4Addr, u8)> {
    let mut out: Vec<(Ipv4Addr, u8)> = nodes
        .iter()
        .flat_map(|n| pod_cidrs(n.borrow()))
        .filter_map(|net| match net {
            ipnet::IpNet::V4(v4) => Some((v4.addr(), v4.prefix_len())),
            ipnet::IpNet::V6(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn remote_nodes_route_like_local_ones() {
        let r = remote_node(&json!({"cluster": "c2", "node": "node-1",
            "addresses": ["172.30.2.11"], "podCIDRs": ["10.245.1.0/24", "fd00:10:245:1::/64"]}))
        .unwrap();
        assert_eq!(r.metadata.name.as_deref(), Some("c2.node-1"));
        let routes = routes(std::slice::from_ref(&r), "node-1");
        assert_eq!(routes.len(), 2, "{routes:?}");
        assert_eq!(routes[0].2, "172.30.2.11".parse::<Ipv4Addr>().unwrap());
        assert_eq!(pod_cidrs4(&[r]), [("10.245.1.0".parse().unwrap(), 24)]);
    }

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> Node {
        let addrs: Vec<_> = ips
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a}))
            .collect();
        serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"podCIDRs": cidrs}, "status": {"addresses": addrs}}))
        .unwrap()
    }

    #[test]
    fn other_nodes_pod_cidrs_through_their_ipv4_address() {
        let nodes = vec![
            node(
                "n1",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                &["172.30.0.11"],
            ),
            node(
                "n2",
                &["10.244.2.0/24", "fd00:10:244:2::/64"],
                &["fd00::12", "172.30.0.12"],
            ),
            node("n3", &["10.244.3.0/24"], &[]),
        ];
        let r = routes(&nodes, "n1");
        let ip: Ipv4Addr = "172.30.0.12".parse().unwrap();
        assert_eq!(
            r,
            vec![
                ("10.244.2.0".parse().unwrap(), 24, ip),
                ("fd00:10:244:2::".parse().unwrap(), 64, ip),
            ]
        );
    }

    #[test]
    fn every_nodes_ipv4_pod_cidr_is_left_unmasqueraded() {
        let mut legacy = node("n3", &[], &[]);
        legacy.spec.as_mut().unwrap().pod_cidr = Some("10.244.3.7/24".into());
        let nodes = vec![
            node("n1", &["10.244.1.0/24", "fd00:10:244:1::/64"], &[]),
            node("n2", &["10.244.2.0/24", "not a cidr"], &["172.30.0.12"]),
            legacy,
        ];
        assert_eq!(
            pod_cidrs4(&nodes),
            vec![
                ("10.244.1.0".parse().unwrap(), 24),
                ("10.244.2.0".parse().unwrap(), 24),
                ("10.244.3.0".parse().unwrap(), 24),
            ]
        );
    }
}
