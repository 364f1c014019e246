//! The import side: what a merged export looks like in an importing cluster's API (its
//! ServiceImport and one EndpointSlice per source cluster's slice), and the ClusterSetIPs the
//! cluster allocates for it.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{json, Value};

use crate::merge::Merged;
use crate::record::ExportRecord;

/// The MCS label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// The MCS label naming the cluster an EndpointSlice's endpoints live in.
pub const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// The EndpointSlice label naming the controller that manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The mesh's name as a slice's manager (not the EndpointSlice controller's, so that it never
/// touches them).
pub const MANAGED_BY: &str = "mesh.weir.dev";

/// The ServiceImport of `m` (spec only; the status is written apart), with `ips` its
/// ClusterSetIPs (empty when headless).
pub fn import_spec(m: &Merged, ips: &[String]) -> Value {
    let ports: Vec<Value> = m
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"name": p.name, "protocol": p.protocol, "port": p.port});
            if let Some(a) = &p.app_protocol {
                v["appProtocol"] = json!(a);
            }
            v
        })
        .collect();
    let mut spec = json!({
        "type": if m.headless { "Headless" } else { "ClusterSetIP" },
        "ports": ports,
        "ipFamilies": m.ip_families,
        "sessionAffinity": m.session_affinity,
    });
    if !m.headless {
        spec["ips"] = json!(ips);
    }
    if let Some(c) = &m.session_affinity_config {
        spec["sessionAffinityConfig"] = c.clone();
    }
    if let Some(p) = &m.internal_traffic_policy {
        spec["internalTrafficPolicy"] = json!(p);
    }
    if let Some(t) = &m.traffic_distribution {
        spec["trafficDistribution"] = json!(t);
    }
    spec
}

/// The ServiceImport's status: the exporting clusters, and Ready.
pub fn import_status(m: &Merged) -> Value {
    json!({
        "clusters": m.clusters.iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>(),
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                        "message": format!("exported by {}", m.clusters.join(", "))}],
    })
}

/// The name of the EndpointSlice carrying slice `i` of `cluster`'s export of `name` (a
/// generated slice name never holds a `-` in its 5-character suffix, so these cannot clash
/// with the EndpointSlice controller's).
pub fn slice_name(name: &str, cluster: &str, i: usize) -> String {
    format!("{name}-{cluster}-{i}")
}

/// The EndpointSlices of `record` (one source cluster) as the importing cluster holds them.
pub fn import_slices(record: &ExportRecord) -> Vec<(String, Value)> {
    record
        .slices
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = slice_name(&record.name, &record.cluster, i);
            let v = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": record.namespace,
                    "labels": {
                        SERVICE_NAME_LABEL: record.name,
                        SOURCE_CLUSTER_LABEL: record.cluster,
                        MANAGED_BY_LABEL: MANAGED_BY,
                    },
                },
                "addressType": s.address_type,
                "ports": s.ports,
                "endpoints": s.endpoints,
            });
            (name, v)
        })
        .collect()
}

/// The ClusterSetIPs for `families` (in their order): each family's address from `existing`
/// if it has one (an import's IPs are stable for its life), else the lowest free one of that
/// family's CIDR. None when a family has no CIDR or its CIDR is full.
pub fn allocate(
    cidrs: &[ipnet::IpNet],
    families: &[String],
    existing: &[String],
    used: &HashSet<IpAddr>,
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for fam in families {
        let v4 = fam == "IPv4";
        if let Some(ip) = existing
            .iter()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .find(|ip| ip.is_ipv4() == v4)
        {
            out.push(ip.to_string());
            continue;
        }
        let net = cidrs
            .iter()
            .find(|c| c.addr().is_ipv4() == v4)
            .ok_or_else(|| format!("no ClusterSetIP range for {fam}"))?;
        // Not the network address (IPv6's hosts() starts with it: the subnet-router anycast).
        let ip = net
            .hosts()
            .find(|ip| *ip != net.network() && !used.contains(ip))
            .ok_or_else(|| format!("the ClusterSetIP range {net} is full"))?;
        out.push(ip.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_stable_and_per_family() {
        let cidrs: Vec<ipnet::IpNet> = vec![
            "10.90.0.0/16".parse().unwrap(),
            "fd00:10:90::/112".parse().unwrap(),
        ];
        let fams = vec!["IPv6".to_string(), "IPv4".to_string()];
        let mut used = HashSet::new();
        let a = allocate(&cidrs, &fams, &[], &used).unwrap();
        assert_eq!(a, ["fd00:10:90::1", "10.90.0.1"]);
        used.extend(a.iter().map(|s| s.parse::<IpAddr>().unwrap()));
        let b = allocate(&cidrs, &fams[1..], &[], &used).unwrap();
        assert_eq!(b, ["10.90.0.2"]);
        // An existing import keeps its addresses.
        let again = allocate(&cidrs, &fams, &a, &used).unwrap();
        assert_eq!(again, a);
        assert!(allocate(&cidrs[..1], &fams, &[], &used).is_err());
    }
}
