//! Defaults the API server fills in, as kube-apiserver's defaulting does, so that every
//! reader (controllers, agents, `weir get`) sees explicit values.

use serde_json::{json, Map, Value};

use crate::kinds::ResourceKind;

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let m = v.as_object_mut().expect("object");
    let e = m.entry(key.to_string()).or_insert_with(|| json!({}));
    if !e.is_object() {
        *e = json!({});
    }
    e.as_object_mut().expect("object")
}

fn set_default(m: &mut Map<String, Value>, key: &str, v: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), v);
    }
}

/// Fills in defaults for an object of `kind` (not allocation: that needs cluster state).
pub fn apply_defaults(kind: &ResourceKind, obj: &mut Value) {
    if !obj.is_object() {
        return;
    }
    match kind.kind {
        "Namespace" => {
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let meta = obj_mut(obj, "metadata");
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            if let Some(l) = labels.as_object_mut() {
                l.insert("kubernetes.io/metadata.name".into(), Value::String(name));
            }
            set_default(obj_mut(obj, "spec"), "finalizers", json!(["kubernetes"]));
            set_default(obj_mut(obj, "status"), "phase", json!("Active"));
        }
        "Pod" => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "restartPolicy", json!("Always"));
            set_default(spec, "terminationGracePeriodSeconds", json!(30));
            set_default(spec, "dnsPolicy", json!("ClusterFirst"));
            set_default(spec, "schedulerName", json!("default-scheduler"));
            for c in spec
                .get_mut("containers")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                for p in c
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(m) = p.as_object_mut() {
                        set_default(m, "protocol", json!("TCP"));
                    }
                }
            }
            set_default(obj_mut(obj, "status"), "phase", json!("Pending"));
        }
        "Service" => {
            let spec = obj_mut(obj, "spec");
            set_default(spec, "type", json!("ClusterIP"));
            set_default(spec, "sessionAffinity", json!("None"));
            let ty = spec["type"].as_str().unwrap_or_default().to_string();
            if ty != "ExternalName" {
                set_default(spec, "internalTrafficPolicy", json!("Cluster"));
            }
            if ty == "NodePort" || ty == "LoadBalancer" {
                set_default(spec, "externalTrafficPolicy", json!("Cluster"));
            }
            if ty == "LoadBalancer" {
                set_default(spec, "allocateLoadBalancerNodePorts", json!(true));
            }
            if spec["sessionAffinity"] == "ClientIP" {
                let cfg = spec
                    .entry("sessionAffinityConfig")
                    .or_insert_with(|| json!({}));
                if cfg.pointer("/clientIP/timeoutSeconds").is_none() {
                    *cfg = json!({"clientIP": {"timeoutSeconds": 10800}});
                }
            }
            for p in spec
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(m) = p.as_object_mut() {
                    set_default(m, "protocol", json!("TCP"));
                    if let Some(port) = m.get("port").cloned() {
                        set_default(m, "targetPort", port);
                    }
                }
            }
        }
        "EndpointSlice" => {
            if let Some(ports) = obj.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports {
                    if let Some(m) = p.as_object_mut() {
                        set_default(m, "protocol", json!("TCP"));
                    }
                }
            }
        }
        "NetworkPolicy" => {
            let spec = obj_mut(obj, "spec");
            if spec.get("policyTypes").is_none_or(Value::is_null) {
                let mut types = vec![json!("Ingress")];
                if spec.get("egress").is_some_and(|e| !e.is_null()) {
                    types.push(json!("Egress"));
                }
                spec.insert("policyTypes".into(), Value::Array(types));
            }
            for dir in ["ingress", "egress"] {
                for rule in spec
                    .get_mut(dir)
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    for p in rule
                        .get_mut("ports")
                        .and_then(Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(m) = p.as_object_mut() {
                            set_default(m, "protocol", json!("TCP"));
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::*;

    #[test]
    fn service_defaults() {
        let mut s = json!({"metadata": {"name": "s"}, "spec": {"sessionAffinity": "ClientIP", "ports": [{"port": 80}]}});
        apply_defaults(&SERVICE, &mut s);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(
            s["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
    }

    #[test]
    fn namespace_label_and_policy_types() {
        let mut n =
            json!({"metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "y"}}});
        apply_defaults(&NAMESPACE, &mut n);
        assert_eq!(n["metadata"]["labels"]["kubernetes.io/metadata.name"], "x");
        let mut p = json!({"spec": {"podSelector": {}, "egress": [{}]}});
        apply_defaults(&NETWORK_POLICY, &mut p);
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    }
}
