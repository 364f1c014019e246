//! Multi-cluster Services in the datapath: a ServiceImport of type ClusterSetIP is load
//! balanced like a ClusterIP Service whose addresses are its ClusterSetIPs and whose
//! endpoints are the EndpointSlices labelled `multicluster.kubernetes.io/service-name` (one
//! source cluster each). Both are turned into the Service and EndpointSlices [`crate::lb`]
//! already builds from, under a name no Service can have (`NAME@clusterset`), so that a
//! Service and the import of the same name stay apart.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};

use crate::lb::SERVICE_NAME_LABEL;

/// The MCS label naming the Service an EndpointSlice belongs to.
pub const MCS_SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// The MCS label naming the cluster whose endpoints an EndpointSlice holds.
pub const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// What follows an import's name in its frontends' names.
pub const IMPORT_MARK: &str = "@clusterset";

/// The name import `name`'s frontends go by.
pub fn import_name(name: &str) -> String {
    format!("{name}{IMPORT_MARK}")
}

/// Whether `name` (of a frontend's Service) is an import's.
pub fn is_import_name(name: &str) -> bool {
    name.ends_with(IMPORT_MARK)
}

/// The Service a ServiceImport (`meta`, and its object `data` with `spec`) is load balanced
/// as; None for Headless imports and imports without ClusterSetIPs yet.
pub fn import_service(meta: &ObjectMeta, data: &Value) -> Option<Service> {
    let spec = data.get("spec")?;
    if spec.get("type").and_then(Value::as_str) != Some("ClusterSetIP") {
        return None;
    }
    let ips: Vec<String> = spec
        .get("ips")?
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let first = ips.first()?.clone();
    let ports: Vec<Value> = spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            json!({"name": p.get("name").cloned().unwrap_or(json!("")),
                   "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP")),
                   "port": p.get("port").cloned().unwrap_or(json!(0))})
        })
        .collect();
    let families: Vec<&str> = ips
        .iter()
        .map(|i| if i.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    let mut s = json!({
        "metadata": {"name": import_name(meta.name.as_deref()?), "namespace": meta.namespace,
                     "resourceVersion": meta.resource_version},
        "spec": {"type": "ClusterIP", "clusterIP": first, "clusterIPs": ips, "ipFamilies": families,
                 "ports": ports,
                 "sessionAffinity": spec.get("sessionAffinity").cloned().unwrap_or(json!("None"))},
    });
    for f in ["sessionAffinityConfig", "internalTrafficPolicy"] {
        if let Some(v) = spec.get(f) {
            s["spec"][f] = v.clone();
        }
    }
    serde_json::from_value(s).ok()
}

/// The import name (namespace, `NAME@clusterset`) an MCS EndpointSlice belongs to.
pub fn import_of_slice(sl: &EndpointSlice) -> Option<(String, String)> {
    let labels = sl.metadata.labels.as_ref()?;
    if labels.contains_key(SERVICE_NAME_LABEL) {
        return None;
    }
    let name = labels.get(MCS_SERVICE_NAME_LABEL)?;
    Some((
        sl.metadata.namespace.clone().unwrap_or_default(),
        import_name(name),
    ))
}

/// An MCS EndpointSlice as a slice of its import's Service (relabelled to
/// `kubernetes.io/service-name=NAME@clusterset`); None for any other slice.
pub fn import_slice(sl: &EndpointSlice) -> Option<EndpointSlice> {
    let (_, name) = import_of_slice(sl)?;
    let mut out = sl.clone();
    let labels = out.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(SERVICE_NAME_LABEL.into(), name);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("mcs".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_clustersetip_import_is_a_clusterip_service() {
        let data = json!({"spec": {"type": "ClusterSetIP", "ips": ["10.90.0.1", "fd00:10:90::1"],
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 42}], "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}}}});
        let s = import_service(&meta("hello"), &data).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("hello@clusterset"));
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ips.unwrap(), ["10.90.0.1", "fd00:10:90::1"]);
        assert_eq!(spec.ip_families.unwrap(), ["IPv4", "IPv6"]);
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        let headless = json!({"spec": {"type": "Headless", "ports": []}});
        assert!(import_service(&meta("h"), &headless).is_none());
        let pending = json!({"spec": {"type": "ClusterSetIP", "ips": [], "ports": []}});
        assert!(import_service(&meta("p"), &pending).is_none());
    }

    #[test]
    fn only_mcs_slices_are_relabelled() {
        let mcs: EndpointSlice = serde_json::from_value(
            json!({"metadata": {"name": "hello-c2-0", "namespace": "mcs",
            "labels": {MCS_SERVICE_NAME_LABEL: "hello", SOURCE_CLUSTER_LABEL: "c2"}},
            "addressType": "IPv4", "endpoints": []}),
        )
        .unwrap();
        let r = import_slice(&mcs).unwrap();
        assert_eq!(
            r.metadata.labels.unwrap()[SERVICE_NAME_LABEL],
            "hello@clusterset"
        );
        let native: EndpointSlice = serde_json::from_value(
            json!({"metadata": {"name": "hello-abcde", "namespace": "mcs",
            "labels": {SERVICE_NAME_LABEL: "hello"}}, "addressType": "IPv4", "endpoints": []}),
        )
        .unwrap();
        assert!(import_slice(&native).is_none());
    }
}
