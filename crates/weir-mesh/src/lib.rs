//! `weir mesh`: one per cluster of a clusterset, between the cluster's API server and the
//! clusterset's etcd, in both directions (as Cilium's clustermesh-apiserver with KVStoreMesh,
//! and an MCS controller):
//!
//! - out: every Service with a ServiceExport of its name becomes an export record in etcd
//!   (its clusterset-wide properties and endpoints), under a lease of this mesh's;
//! - in: every cluster's records are merged by KEP-1645's rules into a ServiceImport (with
//!   ClusterSetIPs this cluster allocates) and EndpointSlices labelled with their source
//!   cluster, written into this cluster's API, where the agents read them like any other
//!   kind. Agents never talk to etcd.
//!
//! Nothing is concluded from a partial view: imports are written (and stale ones removed)
//! only once both the cluster's objects and etcd have been listed in full; while etcd is out
//! of reach the last state stays as it is.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod export;
pub mod health;
pub mod import;
pub mod link;
pub mod merge;
mod reconcile;
pub mod record;
pub mod traffic;

/// TLS material for etcd.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificate.
    pub ca: PathBuf,
    /// This cluster's client certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The name etcd's certificate is checked against (None: each endpoint's host).
    pub server_name: Option<String>,
}

/// How a mesh runs.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The clusterset's name (the etcd key prefix).
    pub clusterset: String,
    /// This cluster's id (its `cluster.clusterset.k8s.io` property).
    pub cluster: String,
    /// etcd endpoints (`https://HOST:PORT`).
    pub etcd_endpoints: Vec<String>,
    /// TLS for etcd (None: plain).
    pub etcd_tls: Option<EtcdTls>,
    /// How long this cluster's records outlive the mesh's last renewal (the lease's TTL), and
    /// so how long other clusters keep a silent cluster's endpoints.
    pub remote_ttl: Duration,
    /// The ranges ClusterSetIPs are allocated from (at most one per family).
    pub clusterset_cidrs: Vec<ipnet::IpNet>,
    /// Where to write the mesh's status as JSON (None: nowhere).
    pub status_file: Option<PathBuf>,
    /// Active health checks of the cluster's exported endpoints (None: off).
    pub health_check: Option<health::HealthCheckConfig>,
}

/// What a mesh reports about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// This cluster.
    pub cluster: String,
    /// Whether the mesh reaches etcd now.
    pub connected: bool,
    /// Since when it has been connected, or disconnected (RFC 3339).
    pub since: String,
    /// Whether imports are being written (both the cluster and etcd listed in full).
    pub synced: bool,
    /// The clusters whose data the mesh holds, each with when it last renewed it (RFC 3339).
    pub clusters: BTreeMap<String, String>,
    /// Services this cluster exports (valid ServiceExports).
    pub exports: usize,
    /// ServiceImports written into this cluster.
    pub imports: usize,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Reads a status file a mesh wrote.
pub fn read_status(path: &std::path::Path) -> Option<MeshStatus> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Runs the mesh until the process is stopped.
pub async fn run(client: kube::Client, cfg: MeshConfig) -> Result<(), String> {
    let (own_tx, own_rx) = tokio::sync::watch::channel(BTreeMap::new());
    let remote = Arc::new(Mutex::new(link::Remote::default()));
    let state = Arc::new(Mutex::new(link::LinkState::default()));
    let changed = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(link::run(
        cfg.clone(),
        own_rx,
        remote.clone(),
        state.clone(),
        changed.clone(),
    ));
    let health = match &cfg.health_check {
        Some(hc) => {
            let h = Arc::new(health::Health::default());
            health::spawn(hc.clone(), h.clone(), changed.clone())?;
            Some(h)
        }
        None => None,
    };
    reconcile::run(client, cfg, own_tx, remote, state, changed, health).await
}
