//! ClusterIP and NodePort allocation, as kube-apiserver's Service REST storage does it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;
use serde_json::{json, Value};
use weir_model::validate::{FieldError, FieldErrorType, ValidationError};

/// Which Service holds an address or port: `namespace/name`.
pub type Owner = String;

/// Allocation state: every ClusterIP and NodePort in use, with its Service.
#[derive(Debug, Default)]
pub struct Allocations {
    ips: HashMap<IpAddr, Owner>,
    node_ports: HashMap<u16, Owner>,
    cursor: HashMap<bool, u128>,
}

/// The service network and NodePort range to allocate from.
#[derive(Debug, Clone)]
pub struct AllocConfig {
    /// Service CIDRs, at most one per IP family; the first is the primary family.
    pub service_cidrs: Vec<IpNet>,
    /// NodePort range (default 30000-32767).
    pub node_ports: RangeInclusive<u16>,
}

impl Default for AllocConfig {
    fn default() -> Self {
        AllocConfig {
            service_cidrs: vec![
                "10.96.0.0/16".parse().expect("cidr"),
                "fd00:10:96::/112".parse().expect("cidr"),
            ],
            node_ports: 30000..=32767,
        }
    }
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn net_family(n: &IpNet) -> &'static str {
    family(&n.addr())
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn u128_to_ip(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((v as u32).into())
    } else {
        IpAddr::V6(v.into())
    }
}

fn cluster_ips(svc: &Value) -> Vec<IpAddr> {
    svc.pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect()
}

fn node_ports(svc: &Value) -> Vec<u16> {
    let mut out: Vec<u16> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort")?.as_u64())
        .filter(|p| *p != 0)
        .map(|p| p as u16)
        .collect();
    if let Some(h) = svc
        .pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_u64)
    {
        if h != 0 {
            out.push(h as u16);
        }
    }
    out
}

fn owner_of(svc: &Value) -> Owner {
    format!(
        "{}/{}",
        svc.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        svc.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    )
}

/// The strings of the list at `key` of a Service spec.
fn str_list(spec: &serde_json::Map<String, Value>, key: &str) -> Vec<String> {
    spec.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A Service with `clusterIP: None` and no selector (its endpoints are written by hand).
fn is_headless_selectorless(spec: &serde_json::Map<String, Value>) -> bool {
    let first_ip = spec
        .get("clusterIPs")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let none =
        spec.get("clusterIP").and_then(Value::as_str) == Some("None") || first_ip == Some("None");
    none && spec
        .get("selector")
        .and_then(Value::as_object)
        .is_none_or(|m| m.is_empty())
}

/// initIPFamilyFields for a headless Service without a selector: dual-stack unless asked
/// otherwise (RequireDualStack by default), the cluster's primary family first, and the
/// other family too even on a single-stack cluster (nothing is allocated for it).
fn headless_selectorless_families(cfg: &AllocConfig, spec: &mut serde_json::Map<String, Value>) {
    let policy = spec
        .get("ipFamilyPolicy")
        .and_then(Value::as_str)
        .unwrap_or("RequireDualStack")
        .to_string();
    let mut families = str_list(spec, "ipFamilies");
    if families.is_empty() {
        let primary = cfg.service_cidrs.first().map(net_family).unwrap_or("IPv4");
        families.push(primary.to_string());
    }
    if policy != "SingleStack" && families.len() == 1 {
        let other = if families[0] == "IPv4" {
            "IPv6"
        } else {
            "IPv4"
        };
        families.push(other.to_string());
    }
    spec.insert("clusterIP".into(), json!("None"));
    spec.insert("clusterIPs".into(), json!(["None"]));
    spec.insert("ipFamilies".into(), json!(families));
    spec.insert("ipFamilyPolicy".into(), json!(policy));
}

fn cause(field: &str, value: Value, msg: String) -> FieldError {
    FieldError {
        field: field.to_string(),
        kind: FieldErrorType::Invalid(value, msg),
    }
}

impl Allocations {
    /// Records the allocations of a stored Service.
    pub fn add(&mut self, svc: &Value) {
        let owner = owner_of(svc);
        for ip in cluster_ips(svc) {
            self.ips.insert(ip, owner.clone());
        }
        for p in node_ports(svc) {
            self.node_ports.insert(p, owner.clone());
        }
    }

    /// Releases the allocations of a Service that is removed or replaced.
    pub fn remove(&mut self, svc: &Value) {
        let owner = owner_of(svc);
        for ip in cluster_ips(svc) {
            if self.ips.get(&ip) == Some(&owner) {
                self.ips.remove(&ip);
            }
        }
        for p in node_ports(svc) {
            if self.node_ports.get(&p) == Some(&owner) {
                self.node_ports.remove(&p);
            }
        }
    }

    fn ip_free(&self, ip: &IpAddr, owner: &str) -> bool {
        self.ips.get(ip).is_none_or(|o| o == owner)
    }

    fn next_ip(&mut self, net: &IpNet, owner: &str, taken: &[IpAddr]) -> Option<IpAddr> {
        let v4 = net.addr().is_ipv4();
        let base = ip_to_u128(net.network());
        let size: u128 = if v4 {
            1u128 << (32 - net.prefix_len())
        } else {
            1u128 << (128 - net.prefix_len()).min(64)
        };
        // Skip the network address and the first host (kube-apiserver reserves .1 for the
        // `kubernetes` Service); for IPv4 also skip the broadcast address.
        let usable = size.saturating_sub(if v4 { 3 } else { 2 });
        let cursor = self.cursor.entry(v4).or_insert(0);
        for i in 0..usable {
            let off = 2 + (*cursor + i) % usable;
            let ip = u128_to_ip(base + off, v4);
            if self.ips.get(&ip).is_none_or(|o| o == owner) && !taken.contains(&ip) {
                *cursor = (*cursor + i + 1) % usable;
                return Some(ip);
            }
        }
        None
    }

    fn next_port(&self, cfg: &AllocConfig, owner: &str, taken: &[u16]) -> Option<u16> {
        cfg.node_ports
            .clone()
            .find(|p| self.node_ports.get(p).is_none_or(|o| o == owner) && !taken.contains(p))
    }

    /// Fills in `spec.clusterIP(s)`, `spec.ipFamilies`, `spec.ipFamilyPolicy`, NodePorts and
    /// `healthCheckNodePort` of a Service being created (`old` = None) or updated, checking
    /// explicit values against the ranges and against other Services.
    pub fn allocate(
        &mut self,
        cfg: &AllocConfig,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ValidationError> {
        let owner = owner_of(svc);
        let mut causes = Vec::new();
        let ty = svc
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        let spec = svc
            .get_mut("spec")
            .and_then(Value::as_object_mut)
            .expect("defaults create spec");

        // Carry over what the old object had allocated when the new one leaves it out (as a
        // patch or an apply does).
        if let Some(old) = old {
            for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                if spec.get(f).is_none_or(Value::is_null) && ty != "ExternalName" {
                    if let Some(v) = old.pointer(&format!("/spec/{f}")) {
                        spec.insert(f.into(), v.clone());
                    }
                }
            }
        }

        if ty == "ExternalName" {
            for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                spec.remove(f);
            }
        } else if is_headless_selectorless(spec) {
            headless_selectorless_families(cfg, spec);
        } else {
            let mut ips = str_list(spec, "clusterIPs");
            if let Some(ip) = spec.get("clusterIP").and_then(Value::as_str) {
                if !ip.is_empty() && ips.is_empty() {
                    ips.push(ip.to_string());
                }
            }
            let headless = ips.first().is_some_and(|i| i == "None");
            let mut families = str_list(spec, "ipFamilies");
            if families.is_empty() {
                families = ips
                    .iter()
                    .filter_map(|i| i.parse::<IpAddr>().ok())
                    .map(|i| family(&i).to_string())
                    .collect();
            }
            let policy = spec
                .get("ipFamilyPolicy")
                .and_then(Value::as_str)
                .unwrap_or(if families.len() > 1 {
                    "RequireDualStack"
                } else {
                    "SingleStack"
                })
                .to_string();
            let cluster_fams: Vec<&str> = cfg.service_cidrs.iter().map(net_family).collect();
            if families.is_empty() {
                families.push(cluster_fams.first().copied().unwrap_or("IPv4").to_string());
            }
            if policy != "SingleStack" && families.len() == 1 {
                if let Some(other) = cluster_fams.iter().find(|f| **f != families[0]) {
                    families.push(other.to_string());
                } else if policy == "RequireDualStack" {
                    causes.push(cause(
                        "spec.ipFamilyPolicy",
                        json!(policy),
                        "this cluster is not configured for dual-stack services".into(),
                    ));
                }
            }
            for (i, f) in families.iter().enumerate() {
                if !headless && !cluster_fams.contains(&f.as_str()) {
                    causes.push(cause(
                        &format!("spec.ipFamilies[{i}]"),
                        json!(f),
                        format!(
                            "not configured on this cluster (service CIDRs are {:?})",
                            cfg.service_cidrs
                                .iter()
                                .map(|c| c.to_string())
                                .collect::<Vec<_>>()
                        ),
                    ));
                }
            }
            if !headless && causes.is_empty() {
                let mut out: Vec<IpAddr> = Vec::new();
                for (i, fam) in families.iter().enumerate() {
                    let net = cfg
                        .service_cidrs
                        .iter()
                        .find(|n| net_family(n) == fam)
                        .expect("checked");
                    match ips.get(i).map(|s| s.parse::<IpAddr>()) {
                        Some(Ok(ip)) => {
                            if family(&ip) != fam {
                                causes.push(cause(
                                    &format!("spec.clusterIPs[{i}]"),
                                    json!(ip.to_string()),
                                    format!(
                                        "expected an {fam} value as indicated by `ipFamilies[{i}]`"
                                    ),
                                ));
                            } else if !net.contains(&ip) {
                                causes.push(cause(&format!("spec.clusterIPs[{i}]"), json!(ip.to_string()), format!("failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {net}")));
                            } else if !self.ip_free(&ip, &owner) {
                                causes.push(cause(&format!("spec.clusterIPs[{i}]"), json!(ip.to_string()), format!("failed to allocate IP {ip}: provided IP is already allocated")));
                            } else {
                                out.push(ip);
                            }
                        }
                        Some(Err(_)) => {} // reported by validation
                        None => match self.next_ip(net, &owner, &out) {
                            Some(ip) => out.push(ip),
                            None => causes.push(cause(
                                "spec.clusterIPs",
                                json!(null),
                                format!("failed to allocate a serviceIP: range is full ({net})"),
                            )),
                        },
                    }
                }
                if causes.is_empty() {
                    let strs: Vec<Value> = out.iter().map(|i| json!(i.to_string())).collect();
                    spec.insert("clusterIP".into(), strs[0].clone());
                    spec.insert("clusterIPs".into(), Value::Array(strs));
                }
            } else if headless {
                spec.insert("clusterIP".into(), json!("None"));
                spec.insert("clusterIPs".into(), json!(["None"]));
            }
            spec.insert("ipFamilies".into(), json!(families));
            spec.insert("ipFamilyPolicy".into(), json!(policy));
        }

        // NodePorts.
        let wants_node_ports = ty == "NodePort"
            || (ty == "LoadBalancer"
                && spec
                    .get("allocateLoadBalancerNodePorts")
                    .and_then(Value::as_bool)
                    != Some(false));
        // patchAllocatedValues: an update that leaves a port's nodePort out gets the one the
        // old port of the same name had, unless another port of the new object uses it.
        let old_by_name: BTreeMap<String, u64> = old
            .and_then(|o| o.pointer("/spec/ports").and_then(Value::as_array))
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    p.get("nodePort")?.as_u64()?,
                ))
            })
            .collect();
        let old_used: BTreeSet<u64> = old_by_name.values().copied().collect();
        let new_explicit: BTreeSet<u64> = spec
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("nodePort")?.as_u64())
            .filter(|p| *p != 0)
            .collect();
        let used: BTreeSet<u64> = old_used.intersection(&new_explicit).copied().collect();
        // initNodePorts: ports with the same number (TCP and UDP 53) share one nodePort.
        let mut by_port: BTreeMap<i64, u64> = BTreeMap::new();
        let mut taken: Vec<u16> = Vec::new();
        let ports = spec.get_mut("ports").and_then(Value::as_array_mut);
        for (i, p) in ports.into_iter().flatten().enumerate() {
            let Some(m) = p.as_object_mut() else { continue };
            if !wants_node_ports && ty != "LoadBalancer" {
                m.remove("nodePort");
                continue;
            }
            let explicit = m
                .get("nodePort")
                .and_then(Value::as_u64)
                .filter(|p| *p != 0);
            let port = m.get("port").and_then(Value::as_i64).unwrap_or(0);
            let name = m.get("name").and_then(Value::as_str).unwrap_or("");
            let reuse = old_by_name
                .get(name)
                .copied()
                .filter(|np| !used.contains(np) || explicit == Some(*np));
            let shared = by_port.get(&port).copied();
            match explicit.or(reuse).or(shared) {
                Some(np) => {
                    let np16 = np as u16;
                    // One Service may use the same nodePort for TCP and UDP of one port.
                    if !cfg.node_ports.contains(&np16) {
                        causes.push(cause(&format!("spec.ports[{i}].nodePort"), json!(np), format!("provided port is not in the valid range. The range of valid ports is {}-{}", cfg.node_ports.start(), cfg.node_ports.end())));
                    } else if self.node_ports.get(&np16).is_some_and(|o| *o != owner) {
                        causes.push(cause(
                            &format!("spec.ports[{i}].nodePort"),
                            json!(np),
                            "provided port is already allocated".into(),
                        ));
                    } else {
                        m.insert("nodePort".into(), json!(np));
                        taken.push(np16);
                        by_port.entry(port).or_insert(np);
                    }
                }
                None if wants_node_ports => match self.next_port(cfg, &owner, &taken) {
                    Some(np) => {
                        m.insert("nodePort".into(), json!(np));
                        taken.push(np);
                        by_port.insert(port, np as u64);
                    }
                    None => causes.push(cause(
                        &format!("spec.ports[{i}].nodePort"),
                        json!(null),
                        "range is full".into(),
                    )),
                },
                None => {}
            }
        }
        let local = spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
        if ty == "LoadBalancer" && local {
            let explicit = spec
                .get("healthCheckNodePort")
                .and_then(Value::as_u64)
                .filter(|p| *p != 0);
            let reuse = old
                .and_then(|o| o.pointer("/spec/healthCheckNodePort"))
                .and_then(Value::as_u64)
                .filter(|p| *p != 0);
            match explicit.or(reuse) {
                Some(np)
                    if self
                        .node_ports
                        .get(&(np as u16))
                        .is_some_and(|o| *o != owner)
                        || taken.contains(&(np as u16)) =>
                {
                    causes.push(cause(
                        "spec.healthCheckNodePort",
                        json!(np),
                        "provided port is already allocated".into(),
                    ));
                }
                Some(np) => {
                    spec.insert("healthCheckNodePort".into(), json!(np));
                }
                None => match self.next_port(cfg, &owner, &taken) {
                    Some(np) => {
                        spec.insert("healthCheckNodePort".into(), json!(np));
                    }
                    None => causes.push(cause(
                        "spec.healthCheckNodePort",
                        json!(null),
                        "range is full".into(),
                    )),
                },
            }
        } else {
            spec.remove("healthCheckNodePort");
        }

        if causes.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                kind: "Service".into(),
                name: svc
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                causes,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, spec: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "d"}, "spec": spec})
    }

    #[test]
    fn allocates_and_rejects_taken_ips() {
        let cfg = AllocConfig::default();
        let mut a = Allocations::default();
        let mut s1 = svc(
            "a",
            json!({"type": "ClusterIP", "ports": [{"port": 80, "protocol": "TCP"}]}),
        );
        a.allocate(&cfg, &mut s1, None).unwrap();
        assert_eq!(s1["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(s1["spec"]["ipFamilies"], json!(["IPv4"]));
        a.add(&s1);
        let mut s2 = svc(
            "b",
            json!({"clusterIP": "10.96.0.2", "ports": [{"port": 80}]}),
        );
        let err = a.allocate(&cfg, &mut s2, None).unwrap_err().to_string();
        assert!(err.contains("provided IP is already allocated"), "{err}");
        let mut s3 = svc(
            "c",
            json!({"clusterIP": "10.1.0.2", "ports": [{"port": 80}]}),
        );
        assert!(a
            .allocate(&cfg, &mut s3, None)
            .unwrap_err()
            .to_string()
            .contains("not in the valid range"));
        let mut s4 = svc(
            "d",
            json!({"ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}),
        );
        a.allocate(&cfg, &mut s4, None).unwrap();
        assert_eq!(s4["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert!(s4["spec"]["clusterIPs"][1]
            .as_str()
            .unwrap()
            .starts_with("fd00:10:96::"));
    }

    #[test]
    fn node_ports() {
        let cfg = AllocConfig::default();
        let mut a = Allocations::default();
        let mut s1 = svc(
            "a",
            json!({"type": "NodePort", "ports": [{"name": "a", "port": 80, "protocol": "TCP", "nodePort": 30080}, {"name": "b", "port": 81, "protocol": "TCP"}]}),
        );
        a.allocate(&cfg, &mut s1, None).unwrap();
        assert_eq!(s1["spec"]["ports"][1]["nodePort"], 30000);
        a.add(&s1);
        let mut s2 = svc(
            "b",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
        );
        assert!(a
            .allocate(&cfg, &mut s2, None)
            .unwrap_err()
            .to_string()
            .contains("already allocated"));
        let mut s3 = svc(
            "c",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}),
        );
        assert!(a
            .allocate(&cfg, &mut s3, None)
            .unwrap_err()
            .to_string()
            .contains("valid range"));
        // An update that leaves nodePort out keeps the allocated one, found by the port's
        // name (a changed port number keeps it too).
        let mut s1b = svc(
            "a",
            json!({"type": "NodePort", "ports": [{"name": "a", "port": 8080, "protocol": "TCP"}, {"name": "b", "port": 81, "protocol": "TCP"}]}),
        );
        a.allocate(&cfg, &mut s1b, Some(&s1)).unwrap();
        assert_eq!(s1b["spec"]["ports"][0]["nodePort"], 30080);
        assert_eq!(s1b["spec"]["ports"][1]["nodePort"], 30000);
        assert_eq!(s1b["spec"]["clusterIP"], s1["spec"]["clusterIP"]);
        // TCP and UDP of one port number share one nodePort.
        let mut dns = svc(
            "d",
            json!({"type": "NodePort", "ports": [{"name": "tcp", "port": 53, "protocol": "TCP"}, {"name": "udp", "port": 53, "protocol": "UDP"}]}),
        );
        a.allocate(&cfg, &mut dns, None).unwrap();
        assert_eq!(
            dns["spec"]["ports"][0]["nodePort"],
            dns["spec"]["ports"][1]["nodePort"]
        );
    }

    #[test]
    fn headless_services_without_selectors_take_both_families() {
        let cfg = AllocConfig {
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            ..AllocConfig::default()
        };
        let mut a = Allocations::default();
        let mut s = svc("h", json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        a.allocate(&cfg, &mut s, None).unwrap();
        assert_eq!(s["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(s["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(s["spec"]["clusterIPs"], json!(["None"]));
        // With a selector: single-stack on a single-stack cluster.
        let mut s = svc(
            "h2",
            json!({"clusterIP": "None", "selector": {"app": "x"}, "ports": [{"port": 80}]}),
        );
        a.allocate(&cfg, &mut s, None).unwrap();
        assert_eq!(s["spec"]["ipFamilyPolicy"], "SingleStack");
        assert_eq!(s["spec"]["ipFamilies"], json!(["IPv4"]));
    }
}
