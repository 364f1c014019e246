//! What kube-apiserver's registry strategies do to an object on create and update, after
//! defaulting and before validation (PrepareForCreate / PrepareForUpdate of
//! pkg/registry/core/{pod,namespace,service}): the status a new object starts with, and the
//! fields an update drops because they no longer apply.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::defaults::externally_accessible;
use crate::kinds::ResourceKind;

/// Which write an object is prepared for.
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    /// A new object.
    Create,
    /// A replacement (PUT, patch, apply) of the object `old`.
    Update(&'a Value),
    /// A write of the status subresource of `old`.
    Status(&'a Value),
}

/// Prepares `obj` (already defaulted) for `write`, as the kind's registry strategy does.
pub fn prepare(kind: &ResourceKind, obj: &mut Value, write: Write<'_>) {
    if !obj.is_object() {
        return;
    }
    match (kind.kind, write) {
        ("Pod", Write::Create) => {
            // PrepareForCreate: a new Pod is Pending, with the QoS class of its resources.
            let qos = pod_qos(&obj["spec"]);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        ("Pod", Write::Status(old)) => {
            // PrepareForUpdate of the status strategy: an empty QoS class keeps the old one.
            let empty = obj
                .pointer("/status/qosClass")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty);
            if let Some(q) = old.pointer("/status/qosClass").filter(|_| empty) {
                obj["status"]["qosClass"] = q.clone();
            }
        }
        ("Namespace", Write::Create) => {
            obj["status"] = json!({"phase": "Active"});
            let f = &mut obj["spec"]["finalizers"];
            if !f.is_array() {
                *f = json!([]);
            }
            let list = f.as_array_mut().expect("array");
            if !list.iter().any(|x| x == "kubernetes") {
                list.push(json!("kubernetes"));
            }
        }
        ("Namespace", Write::Update(old)) => {
            // Finalizers change only through the finalize subresource.
            obj["spec"]["finalizers"] = old
                .pointer("/spec/finalizers")
                .cloned()
                .unwrap_or(Value::Null);
            if obj["spec"]["finalizers"].is_null() {
                if let Some(s) = obj["spec"].as_object_mut() {
                    s.remove("finalizers");
                }
            }
        }
        ("Service", Write::Update(old)) => drop_type_dependent_fields(obj, old),
        _ => {}
    }
}

fn spec_str<'a>(svc: &'a Value, field: &str) -> &'a str {
    svc.pointer(&format!("/spec/{field}"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn needs_cluster_ip(svc: &Value) -> bool {
    spec_str(svc, "type") != "ExternalName"
}

fn needs_node_port(svc: &Value) -> bool {
    matches!(spec_str(svc, "type"), "NodePort" | "LoadBalancer")
}

fn needs_hc_node_port(svc: &Value) -> bool {
    spec_str(svc, "type") == "LoadBalancer" && spec_str(svc, "externalTrafficPolicy") == "Local"
}

fn node_ports(svc: &Value) -> BTreeSet<i64> {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
        .filter(|n| *n != 0)
        .collect()
}

/// Removes `field` of `new`'s spec when it equals `old`'s (the user did not change it, so
/// it was carried over or defaulted, not asked for).
fn drop_if_same(new: &mut Value, old: &Value, field: &str) {
    let same = new["spec"].get(field) == old["spec"].get(field);
    if same {
        if let Some(s) = new["spec"].as_object_mut() {
            s.remove(field);
        }
    }
}

/// dropTypeDependentFields (pkg/registry/core/service/strategy.go): on a change of type, the
/// fields the new type does not use are dropped when the user left them as they were, so that
/// `kubectl apply` of a NodePort Service turned ClusterIP passes validation; a field the user
/// changed as well stays, and validation judges it.
fn drop_type_dependent_fields(new: &mut Value, old: &Value) {
    if !new.get("spec").is_some_and(Value::is_object) {
        return;
    }
    if needs_cluster_ip(old) && !needs_cluster_ip(new) {
        let same_ips = new["spec"].get("clusterIP") == old["spec"].get("clusterIP")
            && new["spec"].get("clusterIPs") == old["spec"].get("clusterIPs");
        if same_ips {
            if let Some(s) = new["spec"].as_object_mut() {
                s.remove("clusterIP");
                s.remove("clusterIPs");
            }
        }
        drop_if_same(new, old, "ipFamilies");
        drop_if_same(new, old, "ipFamilyPolicy");
    }
    if needs_node_port(old) && !needs_node_port(new) && node_ports(new).is_subset(&node_ports(old))
    {
        for p in new["spec"]["ports"].as_array_mut().into_iter().flatten() {
            if let Some(p) = p.as_object_mut() {
                p.remove("nodePort");
            }
        }
    }
    if needs_hc_node_port(old) && !needs_hc_node_port(new) {
        drop_if_same(new, old, "healthCheckNodePort");
    }
    let leaves_lb =
        spec_str(old, "type") == "LoadBalancer" && spec_str(new, "type") != "LoadBalancer";
    if leaves_lb {
        for f in ["allocateLoadBalancerNodePorts", "loadBalancerClass"] {
            if new["spec"].get(f).is_some_and(|v| !v.is_null()) {
                drop_if_same(new, old, f);
            }
        }
    }
    if externally_accessible(&old["spec"]) && !externally_accessible(&new["spec"]) {
        drop_if_same(new, old, "externalTrafficPolicy");
    }
    if spec_str(new, "type") != "LoadBalancer" {
        // An address no longer served is not reported.
        if let Some(st) = new.get_mut("status").and_then(Value::as_object_mut) {
            st.insert("loadBalancer".into(), json!({}));
        }
    }
}

/// A resource quantity in units of 10^-9 (exact for the quantities pods request), or None
/// when it does not parse (validation reports those).
pub fn parse_quantity(q: &str) -> Option<i128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let negative = int.starts_with('-');
    let int = int.trim_start_matches(['+', '-']);
    if (int.is_empty() && frac.is_empty()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac9: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let mut nanos: i128 =
        int.parse::<i128>().unwrap_or(0) * 1_000_000_000 + frac9.parse::<i128>().ok()?;
    let scale = |n: i128, exp10: i32| -> Option<i128> {
        if exp10 >= 0 {
            n.checked_mul(10i128.checked_pow(exp10 as u32)?)
        } else {
            Some(n / 10i128.checked_pow((-exp10) as u32)?)
        }
    };
    nanos = match suffix {
        "" => nanos,
        "n" => scale(nanos, -9)?,
        "u" => scale(nanos, -6)?,
        "m" => scale(nanos, -3)?,
        "k" => scale(nanos, 3)?,
        "M" => scale(nanos, 6)?,
        "G" => scale(nanos, 9)?,
        "T" => scale(nanos, 12)?,
        "P" => scale(nanos, 15)?,
        "E" => scale(nanos, 18)?,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = "KMGTPE".find(&suffix[..1])? as u32 + 1;
            nanos.checked_mul(1i128 << (10 * power))?
        }
        s if s.starts_with(['e', 'E']) => scale(nanos, s[1..].parse().ok()?)?,
        _ => return None,
    };
    Some(if negative { -nanos } else { nanos })
}

/// The QoS class of a Pod spec, as GetPodQOS (pkg/apis/core/v1/helper/qos) computes it from
/// the CPU and memory requests and limits of its containers and init containers.
pub fn pod_qos(spec: &Value) -> &'static str {
    let mut requests: BTreeMap<&str, i128> = BTreeMap::new();
    let mut limits: BTreeMap<&str, i128> = BTreeMap::new();
    let mut guaranteed = true;
    let containers = ["containers", "initContainers"]
        .into_iter()
        .flat_map(|l| spec.get(l).and_then(Value::as_array).into_iter().flatten());
    for c in containers {
        let positive = |kind: &str| -> Vec<(&'static str, i128)> {
            ["cpu", "memory"]
                .into_iter()
                .filter_map(|r| {
                    let q = c.pointer(&format!("/resources/{kind}/{r}"))?;
                    let n = match q {
                        Value::String(s) => parse_quantity(s)?,
                        Value::Number(n) => parse_quantity(&n.to_string())?,
                        _ => return None,
                    };
                    (n > 0).then_some((r, n))
                })
                .collect()
        };
        for (r, n) in positive("requests") {
            *requests.entry(r).or_default() += n;
        }
        let found = positive("limits");
        if found.len() < 2 {
            guaranteed = false;
        }
        for (r, n) in found {
            *limits.entry(r).or_default() += n;
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return "BestEffort";
    }
    if guaranteed
        && requests.iter().all(|(r, n)| limits.get(r) == Some(n))
        && requests.len() == limits.len()
    {
        return "Guaranteed";
    }
    "Burstable"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defaults::apply_defaults;
    use crate::kinds::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1"), Some(1_000_000_000));
        assert_eq!(parse_quantity("100m"), Some(100_000_000));
        assert_eq!(parse_quantity("0.1"), Some(100_000_000));
        assert_eq!(parse_quantity("1Gi"), Some(1_000_000_000 << 30));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000_000_000_000));
        assert_eq!(parse_quantity("1e3"), parse_quantity("1k"));
        assert_eq!(parse_quantity("x"), None);
    }

    #[test]
    fn qos_classes() {
        let pod = |resources: Value| {
            let mut p = json!({"spec": {"containers": [{"name": "c", "image": "i", "resources": resources}]}});
            apply_defaults(&POD, &mut p);
            pod_qos(&p["spec"])
        };
        assert_eq!(pod(json!({})), "BestEffort");
        assert_eq!(pod(json!({"requests": {"cpu": "100m"}})), "Burstable");
        // Requests default to the limits: equal, hence Guaranteed.
        assert_eq!(
            pod(json!({"limits": {"cpu": "0.5", "memory": "64Mi"}})),
            "Guaranteed"
        );
        assert_eq!(
            pod(json!({"limits": {"cpu": "1", "memory": "64Mi"}, "requests": {"cpu": "500m"}})),
            "Burstable"
        );
        assert_eq!(pod(json!({"limits": {"cpu": "1"}})), "Burstable");
    }

    #[test]
    fn new_pods_and_namespaces() {
        let mut p = json!({"spec": {"containers": [{"name": "c", "image": "i"}]}});
        prepare(&POD, &mut p, Write::Create);
        assert_eq!(
            p["status"],
            json!({"phase": "Pending", "qosClass": "BestEffort"})
        );
        let mut st = json!({"status": {"phase": "Running"}});
        prepare(&POD, &mut st, Write::Status(&p));
        assert_eq!(st["status"]["qosClass"], "BestEffort");

        let mut n = json!({"metadata": {"name": "x"}, "spec": {"finalizers": ["other"]}, "status": {"phase": "Terminating"}});
        prepare(&NAMESPACE, &mut n, Write::Create);
        assert_eq!(n["status"], json!({"phase": "Active"}));
        assert_eq!(n["spec"]["finalizers"], json!(["other", "kubernetes"]));
        let mut u = json!({"metadata": {"name": "x"}, "spec": {"finalizers": []}});
        prepare(&NAMESPACE, &mut u, Write::Update(&n));
        assert_eq!(u["spec"]["finalizers"], json!(["other", "kubernetes"]));
    }

    fn service(spec: Value) -> Value {
        let mut s = json!({"metadata": {"name": "s"}, "spec": spec, "status": {"loadBalancer": {"ingress": [{"ip": "172.30.100.1"}]}}});
        apply_defaults(&SERVICE, &mut s);
        s
    }

    #[test]
    fn a_type_change_drops_what_the_new_type_does_not_use() {
        let old = service(
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 31000, "loadBalancerClass": "x", "clusterIP": "10.96.0.9",
            "clusterIPs": ["10.96.0.9"], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"port": 80, "nodePort": 30080}]}),
        );
        // What kubectl apply makes of a manifest that now says ClusterIP: the old object with
        // the new type.
        let mut new = old.clone();
        new["spec"]["type"] = json!("ClusterIP");
        apply_defaults(&SERVICE, &mut new);
        prepare(&SERVICE, &mut new, Write::Update(&old));
        let spec = &new["spec"];
        for f in [
            "externalTrafficPolicy",
            "healthCheckNodePort",
            "allocateLoadBalancerNodePorts",
            "loadBalancerClass",
        ] {
            assert!(spec.get(f).is_none(), "{f} kept: {spec}");
        }
        assert!(spec["ports"][0].get("nodePort").is_none());
        assert_eq!(spec["clusterIP"], "10.96.0.9");
        assert_eq!(new["status"]["loadBalancer"], json!({}));
        // To ExternalName: the cluster IPs and families go as well.
        let mut ext = old.clone();
        ext["spec"]["type"] = json!("ExternalName");
        ext["spec"]["externalName"] = json!("example.org");
        prepare(&SERVICE, &mut ext, Write::Update(&old));
        for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            assert!(ext["spec"].get(f).is_none(), "{f} kept");
        }
        // A node port the user changed too stays (and validation judges it).
        let mut changed = old.clone();
        changed["spec"]["type"] = json!("ClusterIP");
        changed["spec"]["ports"][0]["nodePort"] = json!(30099);
        prepare(&SERVICE, &mut changed, Write::Update(&old));
        assert_eq!(changed["spec"]["ports"][0]["nodePort"], 30099);
    }
}
