//! The import side: what a merged export looks like in an importing cluster's API (its
//! ServiceImport and one EndpointSlice per source cluster's slice), and the ClusterSetIPs the
//! cluster allocates for it.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{json, Value};
use weir_control::mcs::{MCS_SERVICE_NAME_LABEL as SERVICE_NAME_LABEL, SOURCE_CLUSTER_LABEL};

use crate::merge::Merged;
use crate::record::ExportRecord;

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

/// The annotation holding a hash of what the mesh wrote, so that it rewrites an object only
/// when what it wants changed (whatever the API server's normalisation did to it).
pub const HASH_ANNOTATION: &str = "mesh.weir.dev/hash";
/// The annotation of a ServiceImport naming the conflicts among its exports and which export
/// won (absent when they agree).
pub const CONFLICTS_ANNOTATION: &str = "mesh.weir.dev/conflicts";
/// The label the mesh puts on the ServiceImports it writes (it removes only those).
pub const IMPORT_MANAGED_LABEL: &str = "app.kubernetes.io/managed-by";

/// A stable hash of `v` (FNV-1a of its JSON text), as hex.
pub fn hash(v: &Value) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in v.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The name of the EndpointSlice carrying slice `i` of `cluster`'s export of `name`:
/// readable, with a hash of the three so that names with dashes cannot collide (and a
/// generated slice name never holds a `-` in its 5-character suffix, so these cannot clash
/// with the EndpointSlice controller's).
pub fn slice_name(name: &str, cluster: &str, i: usize) -> String {
    let h = hash(&json!([name, cluster, i]));
    format!("{name}-{cluster}-{i}-{}", &h[..6])
}

/// The EndpointSlices of `record` (one source cluster) as cluster `local` holds them. Remote
/// endpoints lose their node name, target and hints: those name another cluster's objects (its
/// nodes are not this cluster's, even when named alike).
pub fn import_slices(record: &ExportRecord, local: &str) -> Vec<(String, Value)> {
    record
        .slices
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = slice_name(&record.name, &record.cluster, i);
            let endpoints: Vec<Value> = s
                .endpoints
                .iter()
                .map(|e| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    if record.cluster != local {
                        if let Some(o) = v.as_object_mut() {
                            o.remove("nodeName");
                            o.remove("targetRef");
                            o.remove("hints");
                        }
                    }
                    v
                })
                .collect();
            let mut v = json!({
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
                "endpoints": endpoints,
            });
            let h = hash(&v);
            v["metadata"]["annotations"] = json!({HASH_ANNOTATION: h});
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
    fn remote_endpoints_lose_their_node() {
        let rec: ExportRecord = serde_json::from_value(json!({
            "cluster": "c2", "namespace": "mcs", "name": "web-c1", "created": "", "headless": false,
            "ports": [], "slices": [{"addressType": "IPv4", "endpoints": [
                {"addresses": ["10.245.1.2"], "nodeName": "node-1", "zone": "z1"}]}]}))
        .unwrap();
        let (name, v) = &import_slices(&rec, "c1")[0];
        assert!(v["endpoints"][0].get("nodeName").is_none());
        assert_eq!(v["endpoints"][0]["zone"], "z1");
        assert!(v["metadata"]["annotations"][HASH_ANNOTATION].is_string());
        let (_, own) = &import_slices(&rec, "c2")[0];
        assert_eq!(own["endpoints"][0]["nodeName"], "node-1");
        // `web-c1` from `c2` and `web` from `c1-c2` do not share a slice name.
        assert_ne!(name, &slice_name("web", "c1-c2", 0));
        assert!(name.starts_with("web-c1-c2-0-"));
    }

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
