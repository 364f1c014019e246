//! The import side: what a merged export looks like in an importing cluster's API (its
//! ServiceImport and one EndpointSlice per source cluster's slice), and the ClusterSetIPs the
//! cluster allocates for it.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use serde_json::{json, Value};
use weir_control::mcs::{MCS_SERVICE_NAME_LABEL as SERVICE_NAME_LABEL, SOURCE_CLUSTER_LABEL};

use crate::merge::Merged;
use crate::record::{ExportRecord, PortRecord};

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

/// The name of the EndpointSlice carrying the `i`th slice of address type `family` (`IPv4`,
/// `IPv6`) of `cluster`'s export of `name`: readable, with a hash of the four so that names
/// with dashes cannot collide (and a generated slice name never holds a `-` in its
/// 5-character suffix, so these cannot clash with the EndpointSlice controller's). The address
/// type is in the name because a slice's `addressType` cannot change: numbered across
/// families, the IPv6 slice could take the name of an IPv4 one when that goes.
pub fn slice_name(name: &str, cluster: &str, family: &str, i: usize) -> String {
    let h = hash(&json!([name, cluster, family, i]));
    let family = family.to_ascii_lowercase();
    format!("{name}-{cluster}-{family}-{i}-{}", &h[..6])
}

/// The EndpointSlices of `record` (one source cluster) as cluster `local` holds them. Remote
/// endpoints lose their node name, target and hints: those name another cluster's objects (its
/// nodes are not this cluster's, even when named alike). A slice keeps only the ports its
/// cluster exposes as the import does (same name, protocol and number among `ports`, the
/// merged ones): a cluster whose `tcp` port is 4242 where the import's `tcp` is 42 (its
/// definition lost the conflict) gets no traffic for it.
pub fn import_slices(
    record: &ExportRecord,
    local: &str,
    ports: &[PortRecord],
) -> Vec<(String, Value)> {
    let exposed = |name: &Option<String>| {
        let name = name.clone().unwrap_or_default();
        record.ports.iter().any(|p| {
            p.name == name
                && ports
                    .iter()
                    .any(|u| u.name == p.name && u.protocol == p.protocol && u.port == p.port)
        })
    };
    let mut per_family: BTreeMap<&str, usize> = BTreeMap::new();
    record
        .slices
        .iter()
        .map(|s| {
            let i = per_family.entry(&s.address_type).or_default();
            let name = slice_name(&record.name, &record.cluster, &s.address_type, *i);
            *i += 1;
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
                "ports": s.ports.iter().filter(|p| exposed(&p.name)).collect::<Vec<_>>(),
                "endpoints": endpoints,
            });
            let h = hash(&v);
            v["metadata"]["annotations"] = json!({HASH_ANNOTATION: h});
            (name, v)
        })
        .collect()
}

/// The ClusterSetIPs for `families` (in their order): each family's address from `existing`
/// if it has one (an import's IPs are stable for its life), else a free one of that family's
/// CIDR, looked for from an offset given by `seed` (the import's name hashed, see
/// [`seed_of`]) onwards: spread over the range as kube-apiserver's allocator starts at a
/// random offset, an allocation takes a few probes however many imports there are. None when
/// a family has no CIDR or its CIDR is full.
pub fn allocate(
    cidrs: &[ipnet::IpNet],
    families: &[String],
    existing: &[String],
    used: &HashSet<IpAddr>,
    seed: u64,
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
        let ip = free_in(net, used, seed)
            .ok_or_else(|| format!("the ClusterSetIP range {net} is full"))?;
        out.push(ip.to_string());
    }
    Ok(out)
}

/// A stable seed for [`allocate`] from an import's namespace and name.
pub fn seed_of(namespace: &str, name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (namespace, name).hash(&mut h);
    h.finish()
}

/// A host address of `net` not in `used`, from offset `seed` on (wrapping). Neither the
/// network address (IPv6's subnet-router anycast) nor IPv4's broadcast address.
fn free_in(net: &ipnet::IpNet, used: &HashSet<IpAddr>, seed: u64) -> Option<IpAddr> {
    let (base, bits) = match net {
        ipnet::IpNet::V4(n) => (u128::from(u32::from(n.network())), 32),
        ipnet::IpNet::V6(n) => (u128::from(n.network()), 128),
    };
    let host_bits = bits - u32::from(net.prefix_len());
    // Offsets first..=last; ranges wider than 2^64 are searched in their first 2^64.
    let last: u128 = if host_bits >= 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << host_bits)
            - if net.addr().is_ipv4() && host_bits >= 2 {
                2
            } else {
                1
            }
    };
    let first = 1u128.min(last);
    let count = last - first + 1;
    let start = u128::from(seed) % count;
    let mut off = start;
    loop {
        let addr = base + first + off;
        let ip = if bits == 32 {
            IpAddr::from(std::net::Ipv4Addr::from(addr as u32))
        } else {
            IpAddr::from(std::net::Ipv6Addr::from(addr))
        };
        if !used.contains(&ip) {
            return Some(ip);
        }
        off = (off + 1) % count;
        if off == start {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_keep_only_the_ports_their_cluster_exposes_as_the_import() {
        // c2 exposes `tcp` as 4242 (the import's `tcp` is c1's 42) and `tcp2` as 4243.
        let rec: ExportRecord = serde_json::from_value(json!({
            "cluster": "c2", "namespace": "mcs", "name": "hello", "created": "", "headless": false,
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 4242},
                      {"name": "tcp2", "protocol": "TCP", "port": 4243}],
            "slices": [{"addressType": "IPv4",
                        "ports": [{"name": "tcp", "protocol": "TCP", "port": 42},
                                  {"name": "tcp2", "protocol": "TCP", "port": 42}],
                        "endpoints": [{"addresses": ["10.245.1.2"]}]}]}))
        .unwrap();
        let merged: Vec<PortRecord> = serde_json::from_value(json!([
            {"name": "tcp", "protocol": "TCP", "port": 42},
            {"name": "tcp2", "protocol": "TCP", "port": 4243}]))
        .unwrap();
        let (_, v) = &import_slices(&rec, "c1", &merged)[0];
        let names: Vec<&str> = v["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["tcp2"]);
    }

    #[test]
    fn remote_endpoints_lose_their_node() {
        let rec: ExportRecord = serde_json::from_value(json!({
            "cluster": "c2", "namespace": "mcs", "name": "web-c1", "created": "", "headless": false,
            "ports": [], "slices": [{"addressType": "IPv4", "endpoints": [
                {"addresses": ["10.245.1.2"], "nodeName": "node-1", "zone": "z1"}]}]}))
        .unwrap();
        let (name, v) = &import_slices(&rec, "c1", &rec.ports)[0];
        assert!(v["endpoints"][0].get("nodeName").is_none());
        assert_eq!(v["endpoints"][0]["zone"], "z1");
        assert!(v["metadata"]["annotations"][HASH_ANNOTATION].is_string());
        let (_, own) = &import_slices(&rec, "c2", &rec.ports)[0];
        assert_eq!(own["endpoints"][0]["nodeName"], "node-1");
        // `web-c1` from `c2` and `web` from `c1-c2` do not share a slice name.
        assert_ne!(name, &slice_name("web", "c1-c2", "IPv4", 0));
        assert!(name.starts_with("web-c1-c2-ipv4-0-"), "{name}");
    }

    #[test]
    fn allocation_is_stable_and_per_family() {
        let cidrs: Vec<ipnet::IpNet> = vec![
            "10.90.0.0/16".parse().unwrap(),
            "fd00:10:90::/112".parse().unwrap(),
        ];
        let fams = vec!["IPv6".to_string(), "IPv4".to_string()];
        let mut used = HashSet::new();
        let a = allocate(&cidrs, &fams, &[], &used, 0).unwrap();
        assert_eq!(a, ["fd00:10:90::1", "10.90.0.1"]);
        used.extend(a.iter().map(|s| s.parse::<IpAddr>().unwrap()));
        // Taken addresses are skipped; the search starts at the seed's offset.
        let b = allocate(&cidrs, &fams[1..], &[], &used, 0).unwrap();
        assert_eq!(b, ["10.90.0.2"]);
        let c = allocate(&cidrs, &fams[1..], &[], &used, 65_533).unwrap();
        assert_eq!(
            c,
            ["10.90.255.254"],
            "the last host; not the broadcast address"
        );
        let d = allocate(&cidrs, &fams[1..], &[], &used, 65_534).unwrap();
        assert_eq!(
            d,
            ["10.90.0.2"],
            "wraps past the end, skipping the taken .1"
        );
        // An existing import keeps its addresses.
        let again = allocate(&cidrs, &fams, &a, &used, 7).unwrap();
        assert_eq!(again, a);
        assert!(allocate(&cidrs[..1], &fams, &[], &used, 0).is_err());
        // A full range is an error, never the network or broadcast address.
        let tiny: Vec<ipnet::IpNet> = vec!["10.1.0.0/30".parse().unwrap()];
        let mut used = HashSet::new();
        for seed in [5, 9] {
            let ip = allocate(&tiny, &fams[1..], &[], &used, seed).unwrap();
            used.insert(ip[0].parse::<IpAddr>().unwrap());
        }
        let want: HashSet<IpAddr> = ["10.1.0.1", "10.1.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(used, want);
        assert!(allocate(&tiny, &fams[1..], &[], &used, 3)
            .unwrap_err()
            .contains("full"));
    }
}
