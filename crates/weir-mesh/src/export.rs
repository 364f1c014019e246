//! The local side of exporting: a Service with a ServiceExport of the same name becomes an
//! [`ExportRecord`]; the ServiceExport's conditions say whether it is valid, exported and in
//! conflict.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

use crate::merge::Merged;
use crate::record::{ExportRecord, PortRecord, SliceRecord};

/// Why an export is not valid (its `Valid=False` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// No Service of the export's name in its namespace.
    NoService,
    /// An ExternalName Service cannot be exported.
    InvalidServiceType,
}

/// The record of exporting `svc` from `cluster`, with the endpoints of its `slices` (those
/// the EndpointSlice controller keeps for it), or why it cannot be exported.
pub fn export_record(
    cluster: &str,
    export: &ExportMeta,
    svc: Option<&Service>,
    slices: &[&EndpointSlice],
) -> Result<ExportRecord, Invalid> {
    let svc = svc.ok_or(Invalid::NoService)?;
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err(Invalid::InvalidServiceType);
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| PortRecord {
            name: p.name.clone().unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            port: p.port,
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    let mut slices: Vec<&EndpointSlice> = slices.to_vec();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(ExportRecord {
        cluster: cluster.into(),
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        created: export.created.clone(),
        headless: spec.cluster_ip.as_deref() == Some("None"),
        ports,
        ip_families: spec.ip_families.clone().unwrap_or_default(),
        session_affinity: spec
            .session_affinity
            .clone()
            .unwrap_or_else(|| "None".into()),
        session_affinity_config: spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| serde_json::to_value(c).ok()),
        internal_traffic_policy: spec.internal_traffic_policy.clone(),
        traffic_distribution: spec.traffic_distribution.clone(),
        slices: slices
            .iter()
            .map(|s| SliceRecord {
                address_type: s.address_type.clone(),
                ports: s.ports.clone().unwrap_or_default(),
                endpoints: s.endpoints.clone().unwrap_or_default(),
            })
            .collect(),
        exported_labels: export.exported_labels.clone(),
        exported_annotations: export.exported_annotations.clone(),
    })
}

/// What a record takes from the ServiceExport itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportMeta {
    /// Its creationTimestamp (RFC 3339): the oldest export wins conflicts.
    pub created: String,
    /// `spec.exportedLabels`.
    pub exported_labels: BTreeMap<String, String>,
    /// `spec.exportedAnnotations`.
    pub exported_annotations: BTreeMap<String, String>,
}

impl ExportMeta {
    /// From a ServiceExport object.
    pub fn of(export: &kube::api::DynamicObject) -> ExportMeta {
        let map = |field: &str| -> BTreeMap<String, String> {
            export
                .data
                .pointer(&format!("/spec/{field}"))
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default()
        };
        ExportMeta {
            created: export
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            exported_labels: map("exportedLabels"),
            exported_annotations: map("exportedAnnotations"),
        }
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message})
}

/// The conditions of a ServiceExport: `Valid`, `Ready` (`Exported` once the record is
/// published, `Pending` before) and `Conflict` (from the merged view, on every constituent
/// export).
pub fn export_conditions(
    validity: Result<(), Invalid>,
    published: bool,
    merged: Option<&Merged>,
) -> Vec<Value> {
    match validity {
        Err(Invalid::NoService) => vec![
            condition(
                "Valid",
                "False",
                "NoService",
                "no Service of this name in this namespace",
            ),
            condition("Ready", "False", "Pending", "the export is not valid"),
        ],
        Err(Invalid::InvalidServiceType) => vec![
            condition(
                "Valid",
                "False",
                "InvalidServiceType",
                "ExternalName Services cannot be exported",
            ),
            condition("Ready", "False", "Pending", "the export is not valid"),
        ],
        Ok(()) => {
            let mut v = vec![
                condition("Valid", "True", "Valid", "the Service can be exported"),
                if published {
                    condition(
                        "Ready",
                        "True",
                        "Exported",
                        "the Service is exported to the clusterset",
                    )
                } else {
                    condition(
                        "Ready",
                        "Unknown",
                        "Pending",
                        "waiting to publish the export (is the mesh connected?)",
                    )
                },
            ];
            if let Some(m) = merged {
                v.push(if m.conflicts.is_empty() {
                    condition("Conflict", "False", "NoConflicts", &m.message)
                } else {
                    condition("Conflict", "True", &m.conflicts.join(","), &m.message)
                });
            }
            v
        }
    }
}

/// `conditions` with the lastTransitionTime of each kept from `old` where its status did not
/// change (and `now` where it did), as metav1.Condition requires.
pub fn with_transition_times(conditions: Vec<Value>, old: Option<&Value>, now: &str) -> Vec<Value> {
    let old = old.and_then(Value::as_array);
    conditions
        .into_iter()
        .map(|mut c| {
            let prev = old.and_then(|o| {
                o.iter()
                    .find(|p| p["type"] == c["type"] && p["status"] == c["status"])
            });
            let t = prev
                .and_then(|p| p["lastTransitionTime"].as_str())
                .unwrap_or(now)
                .to_string();
            c["lastTransitionTime"] = Value::String(t);
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(created: &str) -> ExportMeta {
        ExportMeta {
            created: created.into(),
            ..Default::default()
        }
    }

    fn svc(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn external_name_and_missing_services_are_invalid() {
        let en = svc(json!({"metadata": {"name": "x", "namespace": "n"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}));
        assert_eq!(
            export_record("c1", &meta("t"), Some(&en), &[]),
            Err(Invalid::InvalidServiceType)
        );
        assert_eq!(
            export_record("c1", &meta("t"), None, &[]),
            Err(Invalid::NoService)
        );
        let c = export_conditions(Err(Invalid::InvalidServiceType), false, None);
        assert_eq!(c[0]["status"], "False");
        assert_eq!(c[0]["reason"], "InvalidServiceType");
    }

    #[test]
    fn a_service_becomes_a_record() {
        let s = svc(json!({"metadata": {"name": "hello", "namespace": "mcs"},
            "spec": {"clusterIP": "None", "ports": [{"name": "tcp", "port": 42, "protocol": "TCP"}],
                     "ipFamilies": ["IPv4"], "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}}}}));
        let sl: EndpointSlice = serde_json::from_value(json!({"metadata": {"name": "hello-1"},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"]}],
            "ports": [{"name": "tcp", "port": 42, "protocol": "TCP"}]}))
        .unwrap();
        let r = export_record("c1", &meta("2026-01-01T00:00:00Z"), Some(&s), &[&sl]).unwrap();
        assert!(r.headless);
        assert_eq!(r.ports[0].port, 42);
        assert_eq!(r.session_affinity, "ClientIP");
        assert_eq!(r.slices[0].endpoints[0].addresses, ["10.244.1.5"]);
    }

    #[test]
    fn transition_times_move_only_on_change() {
        let old = json!([{"type": "Valid", "status": "True", "lastTransitionTime": "then"},
                         {"type": "Ready", "status": "Unknown", "lastTransitionTime": "then"}]);
        let c = with_transition_times(export_conditions(Ok(()), true, None), Some(&old), "now");
        assert_eq!(c[0]["lastTransitionTime"], "then");
        assert_eq!(c[1]["lastTransitionTime"], "now");
    }
}
