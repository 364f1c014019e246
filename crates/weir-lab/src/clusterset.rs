//! Clustersets: `weir lab up --name SET --clusters N` makes clusters `SET/c1`..`SET/cN`, each a
//! whole lab cluster (API server, controllers, kubelets, agents) with ranges of its own, on
//! one shared fabric with one external host, plus one etcd for the clusterset and a mesh per
//! cluster. Also the fault injection of clustersets: partitions and component stops.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lab::{self, Progress, UpOptions};
use crate::paths::{self, LabPaths, Layout};
use crate::{client, net, sys, LabError};

/// The largest clusterset (cluster K's pods are in 10.(243+K).0.0/16).
pub const MAX_CLUSTERS: u8 = 12;

/// The ClusterSetIP ranges every cluster's mesh allocates from (each importing cluster
/// allocates its own, stable for the import's lifetime); distinct from every cluster's
/// Service CIDR.
pub const CLUSTERSET_CIDRS: [&str; 2] = ["10.90.0.0/16", "fd00:10:90::/112"];

/// The recorded shape of a clusterset (`clusterset.json` in its directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSetLayout {
    /// The clusterset's name.
    pub name: String,
    /// Its clusters' ids, `c1`..`cN`.
    pub clusters: Vec<String>,
    /// etcd's client port on 127.0.0.1.
    pub etcd_port: u16,
    /// etcd's peer port on 127.0.0.1.
    pub etcd_peer_port: u16,
    /// Per cluster, the loopback port its mesh reaches etcd through (the lab's gate, which
    /// `lab partition` closes).
    pub gate_ports: BTreeMap<String, u16>,
    /// How long a cluster's data outlives its mesh's last renewal, in milliseconds.
    pub remote_ttl_ms: u64,
    /// The meshes' active health checks: interval in milliseconds (0: off).
    #[serde(default)]
    pub health_check_ms: u64,
    /// Creation time (RFC 3339).
    pub created: String,
}

impl ClusterSetLayout {
    fn file(p: &LabPaths) -> PathBuf {
        p.dir.join("clusterset.json")
    }

    /// Reads the clusterset `name`, if it is one.
    pub fn load(name: &str) -> Option<ClusterSetLayout> {
        let text = std::fs::read_to_string(Self::file(&LabPaths::new(name))).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, p: &LabPaths) -> Result<(), LabError> {
        let text = serde_json::to_string_pretty(self).expect("json");
        std::fs::write(Self::file(p), text).map_err(|e| LabError::io(Self::file(p), e))
    }

    /// The paths of cluster `id`.
    pub fn cluster_paths(&self, id: &str) -> LabPaths {
        LabPaths::new(&format!("{}/{id}", self.name))
    }
}

/// Where a clusterset keeps its etcd (data and credentials).
pub fn etcd_dir(set: &LabPaths) -> PathBuf {
    set.dir.join("etcd")
}

/// The credentials of the clusterset's etcd.
pub fn etcd_pki(set: &LabPaths) -> weir_apiserver::pki::EtcdPki {
    weir_apiserver::pki::EtcdPki::in_dir(&etcd_dir(set).join("pki"))
}

/// Where a cluster's mesh reports its state (written by the mesh, read by `lab up` and
/// `weir status`).
pub fn mesh_status_file(cluster: &LabPaths) -> PathBuf {
    cluster.dir.join("mesh-status.json")
}

/// The file whose presence tells the gate to cut cluster `cluster`'s mesh off etcd.
fn cut_file(cluster: &LabPaths) -> PathBuf {
    cluster.dir.join("partitioned")
}

/// The file the gate writes once it has closed (or reopened) the cluster's connections.
fn cut_ack_file(cluster: &LabPaths) -> PathBuf {
    cluster.dir.join("partition.applied")
}

/// The mesh configuration of lab cluster `name` (`SET/cK`), and its kubeconfig.
pub fn mesh_settings(name: &str) -> Result<(weir_mesh::MeshConfig, PathBuf), LabError> {
    paths::check_name(name)?;
    let p = LabPaths::new(name);
    let (set_name, id) = name.split_once('/').ok_or_else(|| {
        LabError::Usage(format!(
            "{name:?} is not a clusterset's cluster (use --cluster SET/cK)"
        ))
    })?;
    let set =
        ClusterSetLayout::load(set_name).ok_or_else(|| LabError::NoSuchLab(set_name.into()))?;
    let port = set
        .gate_ports
        .get(id)
        .ok_or_else(|| LabError::NoSuchLab(name.into()))?;
    let layout = Layout::load(&p)?;
    let pki = etcd_pki(&LabPaths::new(set_name));
    let (cert, key) = pki.client(id);
    let cfg = weir_mesh::MeshConfig {
        clusterset: set_name.into(),
        cluster: id.into(),
        etcd_endpoints: vec![format!("https://127.0.0.1:{port}")],
        etcd_tls: Some(weir_mesh::EtcdTls {
            ca: pki.ca_cert(),
            cert,
            key,
            server_name: Some("localhost".into()),
        }),
        remote_ttl: Duration::from_millis(set.remote_ttl_ms),
        clusterset_cidrs: layout
            .clusterset_cidrs
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
        status_file: Some(mesh_status_file(&p)),
        // Checks run from the cluster's first node, which reaches every pod.
        health_check: (set.health_check_ms > 0).then(|| weir_mesh::health::HealthCheckConfig {
            interval: Duration::from_millis(set.health_check_ms),
            timeout: Duration::from_secs(1),
            threshold: 3,
            netns: layout
                .nodes
                .first()
                .map(|n| crate::paths::netns_path(&n.netns)),
        }),
    };
    Ok((cfg, p.kubeconfig()))
}

/// Completes cluster `k`'s layout: its mesh allocates ClusterSetIPs from the clusterset
/// ranges. (The other clusters' pod ranges reach the agents through the mesh, as RemoteNodes:
/// routed, tunnelled and left unmasqueraded like the cluster's own.)
pub(crate) fn plan_cluster(layout: &mut Layout, _k: u8, _n: u8) {
    layout.clusterset_cidrs = CLUSTERSET_CIDRS.iter().map(|c| c.to_string()).collect();
}

/// `weir lab up --clusters N`: builds the clusterset and waits until every cluster is ready
/// and every mesh is connected. Returns the clusters' kubeconfigs. On failure everything
/// made so far is removed.
pub async fn up(opts: &UpOptions, docs: &[client::Doc]) -> Result<Vec<PathBuf>, LabError> {
    if !(1..=MAX_CLUSTERS).contains(&opts.clusters) {
        return Err(LabError::Usage(format!(
            "--clusters must be between 1 and {MAX_CLUSTERS}, not {}",
            opts.clusters
        )));
    }
    let set = LabPaths::new(&opts.name);
    match build(opts, &set, docs).await {
        Ok(k) => Ok(k),
        Err(e) => {
            eprintln!("  ✗ {e}");
            eprintln!(
                "  removing what was made (its logs, and its clusters', are kept in {})",
                lab::keep_logs(&set).display()
            );
            let _ = down(&opts.name);
            Err(e)
        }
    }
}

async fn build(
    opts: &UpOptions,
    set: &LabPaths,
    docs: &[client::Doc],
) -> Result<Vec<PathBuf>, LabError> {
    let progress = Progress::new();
    std::fs::create_dir_all(&set.dir).map_err(|e| LabError::io(set.dir.clone(), e))?;
    let clusters: Vec<String> = (1..=opts.clusters).map(|k| format!("c{k}")).collect();
    let mut gate_ports = BTreeMap::new();
    for c in &clusters {
        gate_ports.insert(c.clone(), lab::free_port()?);
    }
    let shape = ClusterSetLayout {
        name: opts.name.clone(),
        clusters: clusters.clone(),
        etcd_port: lab::free_port()?,
        etcd_peer_port: lab::free_port()?,
        gate_ports,
        remote_ttl_ms: opts.remote_ttl.as_millis() as u64,
        health_check_ms: opts.mesh_health_check.as_millis() as u64,
        created: weir_model::now_rfc3339(),
    };
    shape.save(set)?;
    sys::ensure_bpffs()?;
    sys::ensure_netns_run_dir()?;
    sys::ensure_cgroup2(&set.cgroup_mount())?;
    for dir in [set.cgroup_dir(), set.cgroup_dir().join("external")] {
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(dir.clone(), e))?;
    }

    weir_apiserver::pki::EtcdPki::create(&etcd_dir(set).join("pki"), &opts.name, &clusters)
        .map_err(|e| LabError::Command("etcd credentials".into(), e.to_string()))?;
    start_etcd(set)?;
    start_gate(set)?;
    wait_for_etcd(&shape, Duration::from_secs(20)).await?;
    progress.step(&format!(
        "etcd listening on https://127.0.0.1:{} (client certificates for {})",
        shape.etcd_port,
        clusters.join(", ")
    ));

    // The fabric and external host first (the first cluster's layout names them), then each
    // cluster's control plane and nodes.
    let mut layouts = Vec::new();
    let mut clients = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        let p = shape.cluster_paths(c);
        let (layout, client) =
            lab::start_control_plane(opts, &p, Some(i as u8 + 1), &progress).await?;
        if i == 0 {
            tokio::task::block_in_place(|| net::create_fabric(&layout))?;
            tokio::task::block_in_place(|| lab::start_external_server(set, &layout))?;
        }
        tokio::task::block_in_place(|| net::add_cluster_nodes(&layout))?;
        layouts.push(layout);
        clients.push(client);
    }
    let refs: Vec<&Layout> = layouts.iter().collect();
    tokio::task::block_in_place(|| net::route_pod_cidrs(&refs))?;
    progress.step(&format!(
        "network: {} cluster(s) of {} node(s) on fabric 172.30.0.0/16, external host {}",
        clusters.len(),
        opts.nodes,
        layouts[0].external_ip
    ));
    for ((c, layout), client) in clusters.iter().zip(&layouts).zip(&clients) {
        let p = shape.cluster_paths(c);
        lab::start_nodes(&p, layout, client, &progress).await?;
        write_cluster_properties(client, &opts.name, c).await?;
        start_mesh(&p)?;
    }
    wait_for_meshes(&shape, &shape.clusters, Duration::from_secs(30)).await?;
    progress.step(&format!(
        "mesh connected: {} cluster(s) sharing through etcd",
        clusters.len()
    ));
    for (layout, client) in layouts.iter().zip(&clients) {
        lab::apply_and_settle(opts, client, layout, docs, &progress).await?;
    }
    Ok(clusters
        .iter()
        .map(|c| shape.cluster_paths(c).kubeconfig())
        .collect())
}

/// The About API's two well-known properties: the cluster's id and its clusterset's name.
async fn write_cluster_properties(
    client: &kube::Client,
    set: &str,
    id: &str,
) -> Result<(), LabError> {
    let docs: Vec<client::Doc> = [
        ("cluster.clusterset.k8s.io", id),
        ("clusterset.k8s.io", set),
    ]
    .iter()
    .map(|(name, value)| {
        let object = serde_json::json!({
            "apiVersion": "about.k8s.io/v1beta1",
            "kind": "ClusterProperty",
            "metadata": {"name": name},
            "spec": {"value": value},
        });
        client::Doc {
            origin: "lab".into(),
            kind: &weir_model::kinds::CLUSTER_PROPERTY,
            namespace: None,
            name: name.to_string(),
            object,
        }
    })
    .collect();
    client::apply(client, &docs).await?;
    Ok(())
}

/// Starts the clusterset's etcd (through `weir lab etcd`, which places itself in the
/// clusterset's cgroup and becomes etcd).
pub fn start_etcd(set: &LabPaths) -> Result<i32, LabError> {
    lab::start_component(set, "etcd", "etcd", &[])
}

/// Starts the gate the meshes reach etcd through.
pub fn start_gate(set: &LabPaths) -> Result<i32, LabError> {
    lab::start_component(set, "etcd-gate", "etcd-gate", &[])
}

/// Starts cluster `p`'s mesh.
pub fn start_mesh(p: &LabPaths) -> Result<i32, LabError> {
    let _ = std::fs::remove_file(mesh_status_file(p));
    lab::start_component(p, "mesh", "mesh", &[])
}

/// The etcd command line of clusterset `name` (the `weir lab etcd` component execs it).
pub fn etcd_command(name: &str) -> Result<(PathBuf, std::process::Command), LabError> {
    let set = LabPaths::new(name);
    let shape = ClusterSetLayout::load(name).ok_or_else(|| LabError::NoSuchLab(name.into()))?;
    let pki = etcd_pki(&set);
    let (cert, key) = pki.server();
    let client_url = format!("https://127.0.0.1:{}", shape.etcd_port);
    let peer_url = format!("http://127.0.0.1:{}", shape.etcd_peer_port);
    let member = format!("weir-{name}");
    let mut cmd = std::process::Command::new("etcd");
    cmd.arg("--name")
        .arg(&member)
        .arg("--data-dir")
        .arg(etcd_dir(&set).join("data"))
        .arg("--listen-client-urls")
        .arg(&client_url)
        .arg("--advertise-client-urls")
        .arg(&client_url)
        .arg("--listen-peer-urls")
        .arg(&peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer_url)
        .arg("--initial-cluster")
        .arg(format!("{member}={peer_url}"))
        .arg("--cert-file")
        .arg(cert)
        .arg("--key-file")
        .arg(key)
        .arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(pki.ca_cert())
        .arg("--log-level")
        .arg("warn")
        // The meshes rewrite their records and presence: keep an hour of history at most.
        .arg("--auto-compaction-mode")
        .arg("periodic")
        .arg("--auto-compaction-retention")
        .arg("1h");
    Ok((set.cgroup_dir().join("etcd"), cmd))
}

async fn wait_for_etcd(shape: &ClusterSetLayout, timeout: Duration) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], shape.etcd_port));
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(format!(
                "etcd of clusterset {:?} did not listen within {timeout:?} (see {})",
                shape.name,
                LabPaths::new(&shape.name)
                    .log_dir()
                    .join("etcd.log")
                    .display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads cluster `p`'s mesh status, if its mesh has written one.
pub fn mesh_status(p: &LabPaths) -> Option<weir_mesh::MeshStatus> {
    weir_mesh::read_status(&mesh_status_file(p))
}

/// Waits until the meshes of `clusters` (of `shape`) are connected, synced and hold every
/// cluster's data.
async fn wait_for_meshes(
    shape: &ClusterSetLayout,
    clusters: &[String],
    timeout: Duration,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let waiting: Vec<LabPaths> = clusters
            .iter()
            .map(|c| shape.cluster_paths(c))
            .filter(|p| {
                !mesh_status(p).is_some_and(|s| {
                    s.connected
                        && s.synced
                        && shape.clusters.iter().all(|o| s.clusters.contains_key(o))
                })
            })
            .collect();
        let Some(first) = waiting.first() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            let names: Vec<&str> = waiting.iter().map(|p| p.name.as_str()).collect();
            return Err(LabError::Timeout(format!(
                "the mesh of {} did not connect within {timeout:?} (see {})",
                names.join(", "),
                first.log_dir().join("mesh.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes clusterset `name`: every cluster as `lab down` removes a lab, then etcd, the
/// fabric and external host, and the clusterset's directory.
pub fn down(name: &str) -> Result<lab::DownReport, LabError> {
    let set = LabPaths::new(name);
    let mut report = lab::DownReport::default();
    let clusters: Vec<String> = std::fs::read_dir(&set.dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("lab.json").exists() || e.path().join("pids").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Every part is removed even when another fails; the first failure is reported.
    let mut first_err = None;
    let names = clusters
        .iter()
        .map(|c| format!("{name}/{c}"))
        .chain([name.to_string()]);
    for n in names {
        match lab::down_one(&n) {
            Ok(r) => {
                report.processes += r.processes;
                report.namespaces += r.namespaces;
                report.cgroups |= r.cgroups;
                report.pins |= r.pins;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Which lab component `lab stop|start` acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// A cluster's mesh.
    Mesh,
    /// Every node's agent of a cluster.
    Agents,
    /// A cluster's API server.
    Apiserver,
    /// The clusterset's etcd.
    Etcd,
}

fn stop_component(p: &LabPaths, component: &str) {
    if let Some(pid) = lab::pid_of(p, component) {
        sys::kill_all(&[pid], Duration::from_secs(5));
    }
}

/// `weir lab stop`: stops a component and returns once it is gone.
pub fn stop(name: &str, what: Component) -> Result<String, LabError> {
    let (p, layout) = component_target(name, what)?;
    match what {
        Component::Mesh => stop_component(&p, "mesh"),
        Component::Apiserver => stop_component(&p, "apiserver"),
        Component::Etcd => stop_component(&p, "etcd"),
        Component::Agents => {
            for n in &layout.expect("cluster layout").nodes {
                stop_component(&p, &format!("agent-{}", n.name));
            }
        }
    }
    Ok(format!("{} of {name} stopped", component_name(what)))
}

/// `weir lab start`: starts a stopped component and returns once it serves.
pub async fn start(name: &str, what: Component) -> Result<String, LabError> {
    let (p, layout) = component_target(name, what)?;
    match what {
        Component::Mesh => {
            if lab::pid_of(&p, "mesh").is_none() {
                start_mesh(&p)?;
            }
            let set = ClusterSetLayout::load(p.clusterset().unwrap_or_default())
                .ok_or_else(|| LabError::NoSuchLab(name.into()))?;
            let id = p.name.rsplit('/').next().unwrap_or_default().to_string();
            wait_for_meshes(&set, &[id], Duration::from_secs(30)).await?;
        }
        Component::Apiserver => {
            if lab::pid_of(&p, "apiserver").is_none() {
                lab::start_apiserver(&p)?;
            }
            let client = client::client_from_kubeconfig(&p.kubeconfig()).await?;
            lab::wait_for_apiserver(&client, &p, Duration::from_secs(15)).await?;
        }
        Component::Etcd => {
            if lab::pid_of(&p, "etcd").is_none() {
                start_etcd(&p)?;
            }
            let shape =
                ClusterSetLayout::load(name).ok_or_else(|| LabError::NoSuchLab(name.into()))?;
            wait_for_etcd(&shape, Duration::from_secs(20)).await?;
        }
        Component::Agents => {
            let layout = layout.expect("cluster layout");
            for n in &layout.nodes {
                if lab::pid_of(&p, &format!("agent-{}", n.name)).is_none() {
                    lab::start_agent(&p, &n.name)?;
                }
            }
            let client = client::client_from_kubeconfig(&p.kubeconfig()).await?;
            lab::wait_converged(&client, &layout, Duration::from_secs(60)).await?;
        }
    }
    Ok(format!("{} of {name} started", component_name(what)))
}

fn component_name(what: Component) -> &'static str {
    match what {
        Component::Mesh => "the mesh",
        Component::Agents => "the agents",
        Component::Apiserver => "the API server",
        Component::Etcd => "etcd",
    }
}

/// The paths (and, for a cluster, the layout) `stop`/`start` act on: a cluster `SET/cK` for
/// every component but etcd, which belongs to the clusterset `SET`.
fn component_target(name: &str, what: Component) -> Result<(LabPaths, Option<Layout>), LabError> {
    paths::check_name(name)?;
    let is_cluster = name.contains('/');
    match (what, is_cluster) {
        (Component::Etcd, false) => {
            ClusterSetLayout::load(name).ok_or_else(|| LabError::NoSuchLab(name.into()))?;
            Ok((LabPaths::new(name), None))
        }
        (Component::Etcd, true) => Err(LabError::Usage(format!(
            "etcd belongs to the clusterset: use --cluster {} --component etcd",
            name.split('/').next().unwrap_or(name)
        ))),
        (_, false) => Err(LabError::Usage(format!(
            "--component {} acts on a cluster of a clusterset: --cluster {name}/cK",
            match what {
                Component::Mesh => "mesh",
                Component::Agents => "agents",
                Component::Apiserver => "apiserver",
                Component::Etcd => "etcd",
            }
        ))),
        (_, true) => {
            let p = LabPaths::new(name);
            let layout = Layout::load(&p)?;
            Ok((p, Some(layout)))
        }
    }
}

/// The nftables table in the fabric namespace that holds partitions.
const PARTITION_TABLE: &str = "weir_partition";

/// `weir lab partition`: cuts cluster `name` (`SET/cK`) off the other clusters: its nodes'
/// fabric links to theirs (a bridge filter in the fabric namespace; the external host still
/// reaches everyone) and its mesh's connection to etcd. Returns once both are cut.
pub async fn partition(name: &str) -> Result<String, LabError> {
    set_partition(name, true).await
}

/// `weir lab heal`: undoes `partition`.
pub async fn heal(name: &str) -> Result<String, LabError> {
    set_partition(name, false).await
}

async fn set_partition(name: &str, cut: bool) -> Result<String, LabError> {
    let (set, id) = name.split_once('/').ok_or_else(|| {
        LabError::Usage(format!(
            "partition and heal act on a cluster of a clusterset: --cluster {name}/cK"
        ))
    })?;
    paths::check_name(name)?;
    let shape = ClusterSetLayout::load(set).ok_or_else(|| LabError::NoSuchLab(set.into()))?;
    if !shape.clusters.iter().any(|c| c == id) {
        return Err(LabError::NoSuchLab(name.into()));
    }
    let p = shape.cluster_paths(id);
    let cut_path = cut_file(&p);
    if cut {
        std::fs::write(&cut_path, b"").map_err(|e| LabError::io(cut_path.clone(), e))?;
    } else {
        let _ = std::fs::remove_file(&cut_path);
    }
    if let Err(e) = tokio::task::block_in_place(|| program_partitions(&shape)) {
        // Nothing half-done: the mesh's cut follows the file.
        if cut {
            let _ = std::fs::remove_file(&cut_path);
        }
        return Err(e);
    }
    // The gate acknowledges once it has closed (or reopened) the mesh's etcd connections.
    let want = if cut { "cut" } else { "open" };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read_to_string(cut_ack_file(&p)).is_ok_and(|s| s.trim() == want) {
            break;
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(format!(
                "the etcd gate did not {} {name}'s mesh connection within 10s (see {})",
                if cut { "cut" } else { "reopen" },
                LabPaths::new(set).log_dir().join("etcd-gate.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(if cut {
        format!("{name} partitioned from the other clusters of {set}")
    } else {
        format!("{name} healed")
    })
}

/// Rewrites the fabric's partition filter from the clusters marked partitioned: frames
/// between a partitioned cluster's ports and any other cluster's are dropped.
fn program_partitions(shape: &ClusterSetLayout) -> Result<(), LabError> {
    let mut ports: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut fabric = None;
    for c in &shape.clusters {
        let p = shape.cluster_paths(c);
        let layout = Layout::load(&p)?;
        fabric = Some(layout.fabric_netns.clone());
        ports.insert(
            c.clone(),
            layout
                .nodes
                .iter()
                .map(|n| net::fabric_port(&layout, n))
                .collect(),
        );
    }
    let Some(fabric) = fabric else { return Ok(()) };
    let mut rules = Vec::new();
    for c in &shape.clusters {
        if !cut_file(&shape.cluster_paths(c)).exists() {
            continue;
        }
        let mine = ports[c].join(", ");
        let others: Vec<String> = ports
            .iter()
            .filter(|(o, _)| *o != c)
            .flat_map(|(_, v)| v.iter().cloned())
            .collect();
        if others.is_empty() {
            continue;
        }
        let others = others.join(", ");
        rules.push(format!(
            "    iifname {{ {mine} }} oifname {{ {others} }} drop"
        ));
        rules.push(format!(
            "    iifname {{ {others} }} oifname {{ {mine} }} drop"
        ));
    }
    let script = format!(
        "table bridge {PARTITION_TABLE}\ndelete table bridge {PARTITION_TABLE}\ntable bridge {PARTITION_TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n{}\n  }}\n}}\n",
        rules.join("\n")
    );
    sys::run_with_stdin(
        "nsenter",
        &[
            &format!("--net={}", paths::netns_path(&fabric).display()),
            "nft",
            "-f",
            "-",
        ],
        &script,
    )?;
    Ok(())
}

/// Runs the gate between the clusters' meshes and etcd (the `weir lab etcd-gate`
/// component): per cluster a loopback port relaying to etcd, closed while the cluster is
/// partitioned.
pub async fn run_gate(name: &str) -> Result<(), LabError> {
    let shape = ClusterSetLayout::load(name).ok_or_else(|| LabError::NoSuchLab(name.into()))?;
    let etcd = std::net::SocketAddr::from(([127, 0, 0, 1], shape.etcd_port));
    let mut tasks = Vec::new();
    for (c, port) in &shape.gate_ports {
        let p = shape.cluster_paths(c);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", *port))
            .await
            .map_err(|e| LabError::io(format!("127.0.0.1:{port}").into(), e))?;
        tasks.push(tokio::spawn(gate_cluster(p, listener, etcd)));
    }
    futures::future::join_all(tasks).await;
    Ok(())
}

async fn gate_cluster(p: LabPaths, listener: tokio::net::TcpListener, etcd: std::net::SocketAddr) {
    let (open_tx, open_rx) = tokio::sync::watch::channel(!cut_file(&p).exists());
    let ack = cut_ack_file(&p);
    let _ = std::fs::write(&ack, if *open_rx.borrow() { "open" } else { "cut" });
    // The cut state follows the file: polled, as `lab partition` writes it from another
    // process.
    let watcher_path = cut_file(&p);
    tokio::spawn(async move {
        loop {
            let open = !watcher_path.exists();
            if *open_tx.borrow() != open {
                open_tx.send_replace(open);
                // Connections see the change and close; give them a moment, then confirm.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = std::fs::write(&ack, if open { "open" } else { "cut" });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    loop {
        let (mut down, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a mesh connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut open = open_rx.clone();
        tokio::spawn(async move {
            // A partition is a black hole, not a reset: the mesh's connection stays open and
            // nothing crosses it (its calls time out, its keepalives go unanswered) until the
            // partition heals; then it is closed and the mesh connects again.
            if *open.borrow() {
                let Ok(mut up) = tokio::net::TcpStream::connect(etcd).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut down, &mut up) => return,
                    _ = open.wait_for(|o| !*o) => {}
                }
            }
            let _ = open.wait_for(|o| *o).await;
            drop(down);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_allocate_from_the_clusterset_ranges() {
        let mut l = Layout::plan_in(&LabPaths::new("s/c2"), 1, 1, Some(2));
        plan_cluster(&mut l, 2, 3);
        assert!(l.non_masquerade.is_empty());
        assert_eq!(l.clusterset_cidrs, CLUSTERSET_CIDRS);
        assert!(mesh_settings("s").is_err());
    }
}
