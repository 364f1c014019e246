//! What a cluster's mesh publishes in etcd, and where.
//!
//! Keys (all under `weir/v1/<clusterset>/`, each cluster's on a lease of its mesh):
//! - `clusters/<cluster>`: the cluster's presence, renewed every few seconds
//!   ([`ClusterRecord`]).
//! - `exports/<cluster>/<namespace>/<name>`: one exported Service with its endpoints
//!   ([`ExportRecord`]).
//! - `properties/<cluster>`: the cluster's ClusterProperties (name -> value), for
//!   GlobalTrafficPolicy levels chosen by property (`sameAsImporter`).
//!
//! A cluster's records are written only by its own mesh; when its lease lapses (the mesh
//! stopped or cut off for longer than the remote TTL) etcd deletes them all at once and every
//! other mesh withdraws the cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
use serde::{Deserialize, Serialize};

/// The prefix of clusterset `set`'s keys.
pub fn prefix(set: &str) -> String {
    format!("weir/v1/{set}/")
}

/// The presence key of `cluster`.
pub fn cluster_key(set: &str, cluster: &str) -> String {
    format!("{}clusters/{cluster}", prefix(set))
}

/// The key of `cluster`'s export of `namespace/name`.
pub fn export_key(set: &str, cluster: &str, namespace: &str, name: &str) -> String {
    format!("{}exports/{cluster}/{namespace}/{name}", prefix(set))
}

/// The key of `cluster`'s pod `namespace/name`.
pub fn pod_key(set: &str, cluster: &str, namespace: &str, name: &str) -> String {
    format!("{}pods/{cluster}/{namespace}/{name}", prefix(set))
}

/// The key of `cluster`'s node `name`.
pub fn node_key(set: &str, cluster: &str, name: &str) -> String {
    format!("{}nodes/{cluster}/{name}", prefix(set))
}

/// The key of `cluster`'s ClusterProperties.
pub fn properties_key(set: &str, cluster: &str) -> String {
    format!("{}properties/{cluster}", prefix(set))
}

/// Whether `key` is one of `cluster`'s own records (other than its presence).
pub fn is_own(set: &str, cluster: &str, key: &str) -> bool {
    matches!(parse_key(set, key),
        Some(Key::Export(c, ..)) | Some(Key::Pod(c, ..)) | Some(Key::Node(c, _))
        | Some(Key::Properties(c)) if c == cluster)
}

/// What a key of clusterset `set` names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A cluster's presence.
    Cluster(String),
    /// A cluster's export: (cluster, namespace, name).
    Export(String, String, String),
    /// A cluster's pod: (cluster, namespace, name).
    Pod(String, String, String),
    /// A cluster's node: (cluster, name).
    Node(String, String),
    /// A cluster's ClusterProperties.
    Properties(String),
}

/// Parses a key of clusterset `set` (None: not one of the mesh's keys).
pub fn parse_key(set: &str, key: &str) -> Option<Key> {
    let rest = key.strip_prefix(&prefix(set))?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["clusters", c] => Some(Key::Cluster(c.to_string())),
        ["exports", c, ns, name] => {
            Some(Key::Export(c.to_string(), ns.to_string(), name.to_string()))
        }
        ["pods", c, ns, name] => Some(Key::Pod(c.to_string(), ns.to_string(), name.to_string())),
        ["nodes", c, name] => Some(Key::Node(c.to_string(), name.to_string())),
        ["properties", c] => Some(Key::Properties(c.to_string())),
        _ => None,
    }
}

/// A cluster's presence in the clusterset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    /// The cluster's id.
    pub cluster: String,
    /// When its mesh last renewed it (RFC 3339).
    pub renewed_at: String,
}

/// A pod, as NetworkPolicy in other clusters sees it: its addresses, labels and its
/// namespace's labels in its own cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// The pod's cluster.
    pub cluster: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its addresses.
    pub ips: Vec<String>,
    /// Its labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its namespace's labels (with `kubernetes.io/metadata.name`).
    #[serde(default)]
    pub namespace_labels: std::collections::BTreeMap<String, String>,
    /// Its named container ports (NetworkPolicy rules name them).
    #[serde(default)]
    pub ports: Vec<PortRecord>,
}

/// A node, as other clusters route to its pods: its addresses and pod CIDRs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// The node's cluster.
    pub cluster: String,
    /// Its name.
    pub name: String,
    /// Its InternalIP addresses.
    pub addresses: Vec<String>,
    /// Its pod CIDRs.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

/// One port of an exported Service (a ServiceImport port).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct PortRecord {
    /// Port name (empty for a Service's only, unnamed port).
    #[serde(default)]
    pub name: String,
    /// TCP, UDP or SCTP.
    pub protocol: String,
    /// The Service port.
    pub port: i32,
    /// The port's application protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// The endpoints of one of the Service's EndpointSlices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SliceRecord {
    /// IPv4 or IPv6.
    pub address_type: String,
    /// The slice's ports (named as the Service's ports).
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
    /// Its endpoints, with readiness, node, zone and hostname.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One cluster's export of a Service: the Service's clusterset-wide properties and its
/// endpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportRecord {
    /// The exporting cluster.
    pub cluster: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The ServiceExport's creationTimestamp (RFC 3339): the oldest export wins conflicts.
    pub created: String,
    /// Whether the Service is headless (clusterIP None).
    pub headless: bool,
    /// The Service's ports.
    pub ports: Vec<PortRecord>,
    /// The Service's IP families.
    #[serde(default)]
    pub ip_families: Vec<String>,
    /// `None` or `ClientIP`.
    #[serde(default)]
    pub session_affinity: String,
    /// The Service's sessionAffinityConfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<serde_json::Value>,
    /// The Service's internalTrafficPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// The Service's trafficDistribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// The Service's endpoints, one entry per EndpointSlice.
    #[serde(default)]
    pub slices: Vec<SliceRecord>,
    /// The ServiceExport's `spec.exportedLabels`: put on the ServiceImport.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exported_labels: BTreeMap<String, String>,
    /// The ServiceExport's `spec.exportedAnnotations`: put on the ServiceImport.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exported_annotations: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = export_key("s", "c1", "mcs", "hello");
        assert_eq!(k, "weir/v1/s/exports/c1/mcs/hello");
        assert_eq!(
            parse_key("s", &k),
            Some(Key::Export("c1".into(), "mcs".into(), "hello".into()))
        );
        assert_eq!(
            parse_key("s", &cluster_key("s", "c2")),
            Some(Key::Cluster("c2".into()))
        );
        assert_eq!(parse_key("other", &k), None);
        let p = pod_key("s", "c1", "mcs", "web-0");
        assert_eq!(
            parse_key("s", &p),
            Some(Key::Pod("c1".into(), "mcs".into(), "web-0".into()))
        );
        assert!(is_own("s", "c1", &p) && is_own("s", "c1", &k));
        let n = node_key("s", "c1", "node-1");
        assert_eq!(
            parse_key("s", &n),
            Some(Key::Node("c1".into(), "node-1".into()))
        );
        assert!(is_own("s", "c1", &n));
        assert!(!is_own("s", "c2", &p) && !is_own("s", "c1", &cluster_key("s", "c1")));
        assert_eq!(parse_key("s", "weir/v1/s/exports/c1"), None);
    }
}
