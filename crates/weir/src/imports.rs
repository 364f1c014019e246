//! What `weir status` and `weir get serviceimports -o wide` show of a cluster's imports: the
//! exporting clusters, ready endpoints per cluster (from the mesh's EndpointSlices), the
//! conflicts the mesh found, and how old each cluster's data is (from the mesh's status, when
//! it can be read: a lab cluster's mesh writes it beside the lab).

use std::collections::BTreeMap;

use anyhow::Result;
use kube::api::{Api, DynamicObject, ListParams};
use serde::Serialize;
use serde_json::Value;

/// One import as the commands show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// ClusterSetIP or Headless.
    #[serde(rename = "type")]
    pub type_: String,
    /// Its ClusterSetIPs.
    pub ips: Vec<String>,
    /// The exporting clusters.
    pub clusters: Vec<String>,
    /// Ready endpoints per source cluster.
    pub endpoints: BTreeMap<String, usize>,
    /// The conflict the mesh reports (`<none>` when the exports agree).
    pub conflicts: String,
}

/// The mesh status of lab cluster `name` (`SET/cK`), when it is one.
pub fn lab_mesh_status(name: Option<&str>) -> Option<weir_mesh::MeshStatus> {
    let name = name.filter(|n| n.contains('/'))?;
    let p = weir_lab::paths::LabPaths::new(name);
    weir_mesh::read_status(&weir_lab::clusterset::mesh_status_file(&p))
}

/// The imports of namespace `ns` (every namespace when None).
pub async fn list(c: &kube::Client, ns: Option<&str>) -> Result<Vec<ImportInfo>> {
    let ar = weir_lab::client::api_resource(&weir_model::kinds::SERVICE_IMPORT);
    let imports: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(c.clone(), ns, &ar),
        None => Api::all_with(c.clone(), &ar),
    };
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = match ns {
        Some(ns) => Api::namespaced(c.clone(), ns),
        None => Api::all(c.clone()),
    };
    let lp = ListParams::default().labels(weir_control::mcs::MCS_SERVICE_NAME_LABEL);
    let mut ready: BTreeMap<(String, String), BTreeMap<String, usize>> = BTreeMap::new();
    for s in slices.list(&lp).await?.items {
        let labels = s.metadata.labels.clone().unwrap_or_default();
        let (Some(svc), Some(cluster)) = (
            labels.get(weir_control::mcs::MCS_SERVICE_NAME_LABEL),
            labels.get(weir_control::mcs::SOURCE_CLUSTER_LABEL),
        ) else {
            continue;
        };
        let n = s
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .count();
        *ready
            .entry((
                s.metadata.namespace.clone().unwrap_or_default(),
                svc.clone(),
            ))
            .or_default()
            .entry(cluster.clone())
            .or_default() += n;
    }
    let strs = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    Ok(imports
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|o| {
            let key = (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            );
            let clusters: Vec<String> = o.data["status"]["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["cluster"].as_str().map(String::from))
                .collect();
            let mut endpoints = ready.remove(&key).unwrap_or_default();
            for c in &clusters {
                endpoints.entry(c.clone()).or_default();
            }
            ImportInfo {
                type_: o.data["spec"]["type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ips: strs(o.data.pointer("/spec/ips")),
                clusters,
                endpoints,
                conflicts: o
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(weir_mesh::import::CONFLICTS_ANNOTATION))
                    .cloned()
                    .unwrap_or_else(|| "<none>".into()),
                namespace: key.0,
                name: key.1,
            }
        })
        .collect())
}

/// How long ago each cluster's data was renewed, as the mesh last saw it (`?` when unknown).
pub fn data_ages(
    clusters: &[String],
    mesh: Option<&weir_mesh::MeshStatus>,
    now: jiff::Timestamp,
) -> String {
    if clusters.is_empty() {
        return "<none>".into();
    }
    clusters
        .iter()
        .map(|c| {
            let age = mesh
                .and_then(|m| m.clusters.get(c))
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| {
                    let secs = now.duration_since(t).as_secs_f64().max(0.0);
                    format!("{secs:.0}s")
                })
                .unwrap_or_else(|| "?".into());
            format!("{c}={age}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The wide columns of one import: CLUSTERS, ENDPOINTS, CONFLICTS, DATA-AGE.
pub fn wide_cells(
    i: &ImportInfo,
    mesh: Option<&weir_mesh::MeshStatus>,
    now: jiff::Timestamp,
) -> Vec<String> {
    let or_none = |s: String| if s.is_empty() { "<none>".into() } else { s };
    vec![
        or_none(i.clusters.join(",")),
        or_none(
            i.endpoints
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        i.conflicts.clone(),
        data_ages(&i.clusters, mesh, now),
    ]
}

/// The mesh section of `weir status` for a clusterset's cluster.
pub fn render(mesh: &weir_mesh::MeshStatus, imports: &[ImportInfo]) -> String {
    let now = jiff::Timestamp::now();
    let mut out = String::new();
    out.push_str(&format!(
        "\nMesh ({}):   {} since {}{}\n",
        mesh.cluster,
        if mesh.connected {
            "connected to etcd"
        } else {
            "DISCONNECTED from etcd (keeping the last state)"
        },
        mesh.since,
        mesh.last_error
            .as_ref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    ));
    let clusters: Vec<String> = mesh.clusters.keys().cloned().collect();
    out.push_str(&format!(
        "Clusters:      {}\n",
        data_ages(&clusters, Some(mesh), now)
    ));
    out.push_str(&format!(
        "Exports:       {}    Imports: {}\n\n",
        mesh.exports, mesh.imports
    ));
    let rows: Vec<Vec<String>> = imports
        .iter()
        .map(|i| {
            let mut r = vec![
                format!("{}/{}", i.namespace, i.name),
                i.type_.clone(),
                if i.ips.is_empty() {
                    "<none>".into()
                } else {
                    i.ips.join(",")
                },
            ];
            r.extend(wide_cells(i, Some(mesh), now));
            r
        })
        .collect();
    if rows.is_empty() {
        out.push_str("No ServiceImports.\n");
    } else {
        out.push_str(&crate::get::render_table(
            &[
                "IMPORT",
                "TYPE",
                "IPS",
                "CLUSTERS",
                "ENDPOINTS",
                "CONFLICTS",
                "DATA-AGE",
            ],
            &rows,
        ));
    }
    out
}
