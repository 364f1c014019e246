//! VXLAN mode: which node has which pod CIDRs, from the Node objects (spec.podCIDRs and the
//! first IPv4 InternalIP), for every node but this one.

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
        let spec = n.spec.clone().unwrap_or_default();
        let cidrs = spec
            .pod_cidrs
            .or_else(|| spec.pod_cidr.map(|c| vec![c]))
            .unwrap_or_default();
        for c in cidrs {
            if let Ok(net) = c.parse::<ipnet::IpNet>() {
                let net = net.trunc();
                out.push((net.addr(), net.prefix_len(), ip));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
