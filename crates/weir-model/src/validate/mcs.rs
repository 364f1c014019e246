//! Validation of the multi-cluster kinds as their CRDs' schemas check them (kubernetes-sigs
//! mcs-api for ServiceExport and ServiceImport, about-api for ClusterProperty): types,
//! required fields, enums, list sizes, and the standard metav1.Condition fields.

use serde_json::Value;

use super::{arr_at, str_at, Errs};

/// `^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$` (a condition's reason).
fn valid_reason(r: &str) -> bool {
    let b = r.as_bytes();
    !b.is_empty()
        && b.len() <= 1024
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b',' | b':'))
        && !matches!(b[b.len() - 1], b',' | b':')
}

/// Checks `status.conditions` (metav1.Condition: type, status, reason, message and
/// lastTransitionTime required; status True, False or Unknown; types unique).
fn check_conditions(obj: &Value, e: &mut Errs) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in arr_at(obj, "/status/conditions").iter().enumerate() {
        let f = format!("status.conditions[{i}]");
        for req in ["type", "status", "reason", "message", "lastTransitionTime"] {
            if c.get(req).is_none_or(Value::is_null) {
                e.required(format!("{f}.{req}"));
            }
        }
        e.one_of(
            &format!("{f}.status"),
            c.get("status").and_then(Value::as_str),
            &["True", "False", "Unknown"],
        );
        if let Some(r) = c.get("reason").and_then(Value::as_str) {
            if !valid_reason(r) {
                e.invalid(
                    format!("{f}.reason"),
                    Value::String(r.into()),
                    "a condition reason must start with a letter and contain only letters, digits, '_', ',' and ':'",
                );
            }
        }
        if let Some(t) = c.get("type").and_then(Value::as_str) {
            if t.is_empty() || t.len() > 316 {
                e.invalid(
                    format!("{f}.type"),
                    Value::String(t.into()),
                    "must be 1 to 316 characters",
                );
            } else if !seen.insert(t.to_string()) {
                e.duplicate(format!("{f}.type"), Value::String(t.into()));
            }
        }
    }
}

fn check_string_map(obj: &Value, ptr: &str, field: &str, e: &mut Errs) {
    match obj.pointer(ptr) {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if !v.is_string() {
                    e.invalid(format!("{field}[{k}]"), v.clone(), "must be a string");
                }
            }
        }
        Some(other) => e.invalid(field, other.clone(), "must be a map of strings"),
    }
}

/// ServiceExport: `spec.exportedLabels` and `spec.exportedAnnotations` are maps of strings;
/// status conditions as metav1.Condition.
pub(super) fn validate_service_export(obj: &Value, e: &mut Errs) {
    check_string_map(obj, "/spec/exportedLabels", "spec.exportedLabels", e);
    check_string_map(
        obj,
        "/spec/exportedAnnotations",
        "spec.exportedAnnotations",
        e,
    );
    check_conditions(obj, e);
}

/// ServiceImport: `spec` with `ports` (each with a `port`) and `type` (ClusterSetIP or
/// Headless) required; at most two `ips` and `ipFamilies`; `status.clusters` name theirs.
pub(super) fn validate_service_import(obj: &Value, e: &mut Errs) {
    match obj.pointer("/spec/ports") {
        Some(Value::Array(ports)) => {
            for (i, p) in ports.iter().enumerate() {
                match p.get("port") {
                    Some(Value::Number(n))
                        if n.as_i64().is_some_and(|v| i32::try_from(v).is_ok()) => {}
                    None | Some(Value::Null) => e.required(format!("spec.ports[{i}].port")),
                    Some(other) => e.invalid(
                        format!("spec.ports[{i}].port"),
                        other.clone(),
                        "must be a 32-bit integer",
                    ),
                }
            }
        }
        None | Some(Value::Null) => e.required("spec.ports"),
        Some(other) => e.invalid("spec.ports", other.clone(), "must be a list of ports"),
    }
    match str_at(obj, "/spec/type") {
        None => e.required("spec.type"),
        t => e.one_of("spec.type", t, &["ClusterSetIP", "Headless"]),
    }
    for field in ["ips", "ipFamilies"] {
        let n = arr_at(obj, &format!("/spec/{field}")).len();
        if n > 2 {
            e.0.push(super::FieldError {
                field: format!("spec.{field}"),
                kind: super::FieldErrorType::TooMany(n, 2),
            });
        }
    }
    for (i, c) in arr_at(obj, "/status/clusters").iter().enumerate() {
        if c.get("cluster").and_then(Value::as_str).is_none() {
            e.required(format!("status.clusters[{i}].cluster"));
        }
    }
    check_conditions(obj, e);
}

/// ClusterProperty: `spec.value`, a non-empty string, is required.
pub(super) fn validate_cluster_property(obj: &Value, e: &mut Errs) {
    match obj.pointer("/spec/value") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::String(_)) => e.invalid("spec.value", "", "should be at least 1 chars long"),
        None | Some(Value::Null) => e.required("spec.value"),
        Some(other) => e.invalid("spec.value", other.clone(), "must be a string"),
    }
}

#[cfg(test)]
mod tests {
    use crate::kinds::*;
    use crate::validate::validate;
    use serde_json::json;

    fn causes(kind: &crate::ResourceKind, obj: serde_json::Value) -> Vec<String> {
        match validate(kind, &obj, None) {
            Ok(()) => Vec::new(),
            Err(e) => e.causes.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn service_imports_need_ports_and_a_type() {
        let ok = json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"type": "ClusterSetIP", "ips": ["10.99.0.1"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            "status": {"clusters": [{"cluster": "c1"}]}});
        assert_eq!(causes(&SERVICE_IMPORT, ok.clone()), Vec::<String>::new());
        let mut bad = ok.clone();
        bad["spec"] = json!({"type": "Other", "ips": ["a", "b", "c"], "ports": [{"name": "x"}]});
        assert_eq!(
            causes(&SERVICE_IMPORT, bad),
            vec![
                "spec.ports[0].port: Required value".to_string(),
                "spec.type: Unsupported value: \"Other\": supported values: \"ClusterSetIP\", \"Headless\"".into(),
                "spec.ips: Too many: 3: must have at most 2 items".into(),
            ]
        );
        let mut none = ok;
        none["spec"] = json!({});
        assert_eq!(causes(&SERVICE_IMPORT_V1ALPHA1, none).len(), 2);
    }

    #[test]
    fn exports_conditions_and_cluster_properties() {
        let export = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "x"},
            "status": {"conditions": [{"type": "Valid", "status": "True", "reason": "Valid", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                                      {"type": "Ready", "status": "Maybe", "reason": "no good!", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        let c = causes(&SERVICE_EXPORT_V1ALPHA1, export);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].starts_with("status.conditions[1].status: Unsupported value"));
        assert!(c[1].starts_with("status.conditions[1].reason: Invalid value"));
        let prop = |spec: serde_json::Value| {
            causes(
                &CLUSTER_PROPERTY,
                json!({"apiVersion": "about.k8s.io/v1beta1", "kind": "ClusterProperty",
                "metadata": {"name": "cluster.clusterset.k8s.io"}, "spec": spec}),
            )
        };
        assert!(prop(json!({"value": "c1"})).is_empty());
        assert_eq!(
            prop(json!({})),
            vec!["spec.value: Required value".to_string()]
        );
        assert_eq!(prop(json!({"value": ""})).len(), 1);
    }
}
