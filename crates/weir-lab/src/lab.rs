//! Lab life cycle (`up`, `down`, `list`, `nodes`) and the user-facing operations on a running
//! lab (`terminate`, `exec`, `connect`, `probe`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams};
use kube::Client;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::connect::{AttemptSpec, ConnectSummary};
use crate::paths::{self, LabPaths, Layout};
use crate::{client, net, sys, LabError};

/// Options of `weir lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Lab name.
    pub name: String,
    /// Number of nodes.
    pub nodes: u8,
    /// Manifests to apply (files, directories, `-`).
    pub manifests: Vec<String>,
    /// How long to wait for pods to become Ready.
    pub timeout: Duration,
    /// Default backend selection of the agents (Services can override it by annotation).
    pub lb_algorithm: weir_control::lb::Algorithm,
    /// Load-balance pods' Service traffic at the socket layer (else per packet, at tc).
    pub socket_lb: bool,
    /// The dataplane the agents render their node's state with.
    pub dataplane: weir_dataplane::DataplaneKind,
    /// Cross-node pod traffic: `native` or `vxlan`.
    pub tunnel: String,
    /// XDP on the nodes' devices.
    pub xdp: bool,
    /// Masquerade pods' flows leaving the cluster.
    pub masquerade: bool,
    /// How long the agents keep a security identity no pod needs.
    pub identity_gc_grace: Duration,
    /// The agents' `--service-proxy-name`.
    pub service_proxy_name: Option<String>,
    /// Number of clusters: 0 for a lab, N for a clusterset `name` of clusters c1..cN.
    pub clusters: u8,
    /// A clusterset's remote TTL: how long a cluster's mesh data outlives its last renewal.
    pub remote_ttl: Duration,
    /// A clusterset's meshes check their exported endpoints this often (zero: not at all).
    pub mesh_health_check: Duration,
}

/// Prints progress to stderr: one line per step, and a live counter while waiting.
pub(crate) struct Progress {
    tty: bool,
    start: Instant,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
        }
    }
    pub(crate) fn step(&self, msg: &str) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("  ✓ {msg} ({:.1}s)", self.start.elapsed().as_secs_f64());
    }
    fn status(&self, msg: &str) {
        if self.tty {
            eprint!("\r\x1b[2K  … {msg}");
            let _ = std::io::stderr().flush();
        }
    }
}

fn current_exe() -> Result<PathBuf, LabError> {
    std::env::current_exe().map_err(|e| LabError::io("/proc/self/exe".into(), e))
}

/// Copies the log directories of a lab (and of a clusterset's clusters) that `lab up` is
/// about to remove after a failure to /tmp/weir-lab-<name>-logs (replacing an older copy), so
/// that the cause can be read; returns where.
pub(crate) fn keep_logs(p: &LabPaths) -> PathBuf {
    let dest = std::env::temp_dir().join(format!("weir-lab-{}-logs", p.name.replace('/', ".")));
    let _ = std::fs::remove_dir_all(&dest);
    let mut dirs = vec![(p.log_dir(), dest.clone())];
    for e in std::fs::read_dir(&p.dir).into_iter().flatten().flatten() {
        if e.path().join("logs").is_dir() {
            dirs.push((e.path().join("logs"), dest.join(e.file_name())));
        }
    }
    for (from, to) in dirs {
        let _ = std::fs::create_dir_all(&to);
        for f in std::fs::read_dir(&from).into_iter().flatten().flatten() {
            if f.path().is_file() {
                let _ = std::fs::copy(f.path(), to.join(f.file_name()));
            }
        }
    }
    dest
}

/// Starts a lab component as a detached process logging to `logs/<component>.log`.
fn spawn_daemon(paths: &LabPaths, component: &str, args: &[OsString]) -> Result<i32, LabError> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(paths.log_dir()).map_err(|e| LabError::io(paths.log_dir(), e))?;
    std::fs::create_dir_all(paths.pid_dir()).map_err(|e| LabError::io(paths.pid_dir(), e))?;
    let log_path = paths.log_dir().join(format!("{component}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| LabError::io(log_path.clone(), e))?;
    let mut cmd = std::process::Command::new(current_exe()?);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| LabError::io(log_path.clone(), e))?,
        )
        .stderr(log)
        .process_group(0);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let child = cmd
        .spawn()
        .map_err(|e| LabError::Command(format!("weir {component}"), e.to_string()))?;
    let pid = child.id() as i32;
    let pid_file = paths.pid_dir().join(format!("{component}.pid"));
    std::fs::write(&pid_file, pid.to_string()).map_err(|e| LabError::io(pid_file, e))?;
    // The child outlives this process; a thread reaps it if it ends first.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}

/// Starts `weir lab <command> --cluster <lab> [extra...]` as the lab's component
/// `component` (its log and pid file are named after it).
pub(crate) fn start_component(
    paths: &LabPaths,
    component: &str,
    command: &str,
    extra: &[&str],
) -> Result<i32, LabError> {
    let mut args: Vec<OsString> = vec![
        "lab".into(),
        command.into(),
        "--cluster".into(),
        paths.name.clone().into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    spawn_daemon(paths, component, &args)
}

/// Starts (or restarts) the lab's API server process.
pub fn start_apiserver(paths: &LabPaths) -> Result<i32, LabError> {
    start_component(paths, "apiserver", "apiserver", &[])
}

/// Starts the lab's controller manager.
pub fn start_controller(paths: &LabPaths) -> Result<i32, LabError> {
    start_component(paths, "controller", "controller", &[])
}

/// Starts the cluster's DNS server (answering in every node).
pub fn start_dns(paths: &LabPaths) -> Result<i32, LabError> {
    start_component(paths, "dns", "dns", &[])
}

/// Starts a node's kubelet.
pub fn start_kubelet(paths: &LabPaths, node: &str) -> Result<i32, LabError> {
    start_component(
        paths,
        &format!("kubelet-{node}"),
        "kubelet",
        &["--node", node],
    )
}

/// Starts a node's weir agent.
pub fn start_agent(paths: &LabPaths, node: &str) -> Result<i32, LabError> {
    start_component(paths, &format!("agent-{node}"), "agent", &["--node", node])
}

/// The ports the external host's echo server answers on (a server outside the cluster for
/// pods to reach).
pub const EXTERNAL_PORTS: &[&str] = &["tcp:80", "udp:80"];

/// Starts the external host's echo server (identity `external`) and waits until it listens.
pub fn start_external_server(paths: &LabPaths, layout: &Layout) -> Result<i32, LabError> {
    let ready = paths.dir.join("external.ready");
    let _ = std::fs::remove_file(&ready);
    let mut args: Vec<OsString> = vec![
        "lab".into(),
        "sandbox".into(),
        "--cluster".into(),
        paths.name.clone().into(),
        "--netns".into(),
        paths::netns_path(&layout.external_netns).into(),
        "--cgroup".into(),
        paths.cgroup_dir().join("external").into(),
        "--identity".into(),
        "external".into(),
        "--ready-file".into(),
        ready.clone().into(),
    ];
    for port in EXTERNAL_PORTS {
        args.push("--port".into());
        args.push((*port).into());
    }
    let pid = spawn_daemon(paths, "external", &args)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        if Instant::now() > deadline || !sys::alive(pid) {
            return Err(LabError::Command(
                "the external host's echo server".into(),
                format!(
                    "not listening (see {})",
                    paths.log_dir().join("external.log").display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pid)
}

/// The CNI configuration of a lab node: weir alone, speaking 1.1.0, with the node's agent
/// socket, endpoint directory and allocation directory.
pub fn cni_conflist(p: &LabPaths, node: &str) -> serde_json::Value {
    weir_cni::conflist(
        "1.1.0",
        &p.agent_socket(node),
        &p.endpoint_dir(node),
        Some(&p.cni_ipam_dir(node)),
    )
}

/// Installs the CNI plugin as a DaemonSet's init container would: `weir-cni` (beside this
/// executable) into the lab's CNI bin directory and each node's conflist.
fn install_cni(p: &LabPaths, layout: &Layout) -> Result<(), LabError> {
    let bin = p.cni_bin_dir();
    std::fs::create_dir_all(&bin).map_err(|e| LabError::io(bin.clone(), e))?;
    let exe = current_exe()?;
    let plugin = exe.with_file_name("weir-cni");
    if !plugin.exists() {
        return Err(LabError::Command(
            "installing the CNI plugin".into(),
            format!(
                "{} is missing (build it: cargo build -p weir-cni)",
                plugin.display()
            ),
        ));
    }
    let dest = bin.join("weir-cni");
    let _ = std::fs::remove_file(&dest);
    std::os::unix::fs::symlink(&plugin, &dest).map_err(|e| LabError::io(dest.clone(), e))?;
    for n in &layout.nodes {
        let dir = p.cni_conf_dir(&n.name);
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(dir.clone(), e))?;
        let f = dir.join(weir_cni::CONFLIST_NAME);
        let text = serde_json::to_string_pretty(&cni_conflist(p, &n.name)).expect("json");
        std::fs::write(&f, text).map_err(|e| LabError::io(f.clone(), e))?;
    }
    Ok(())
}

/// A client for the lab, failing with a hint when the lab does not exist.
pub async fn lab_client(name: &str) -> Result<Client, LabError> {
    paths::check_name(name)?;
    let p = LabPaths::new(name);
    if !p.kubeconfig().exists() {
        return Err(LabError::NoSuchLab(name.to_string()));
    }
    client::client_from_kubeconfig(&p.kubeconfig()).await
}

pub(crate) async fn wait_for_apiserver(
    client: &Client,
    paths: &LabPaths,
    timeout: Duration,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        match client.apiserver_version().await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(LabError::Timeout(format!(
                    "the API server of lab {:?} did not answer within {timeout:?}: {e} (see {})",
                    paths.name,
                    paths.log_dir().join("apiserver.log").display()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A free TCP port on the loopback.
pub(crate) fn free_port() -> Result<u16, LabError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| LabError::io("127.0.0.1:0".into(), e))?;
    Ok(l.local_addr()
        .map_err(|e| LabError::io("127.0.0.1:0".into(), e))?
        .port())
}

/// `weir lab up`: builds the lab and waits until every pod is Ready. Returns the kubeconfig.
/// On failure everything made so far is removed.
pub async fn up(opts: &UpOptions) -> Result<PathBuf, LabError> {
    paths::check_name(&opts.name)?;
    if !sys::is_root() {
        return Err(LabError::NotRoot);
    }
    if !(1..=16).contains(&opts.nodes) {
        return Err(LabError::Usage(format!(
            "--nodes must be between 1 and 16, not {}",
            opts.nodes
        )));
    }
    check_dataplane(opts)?;
    let p = LabPaths::new(&opts.name);
    let leftovers = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&p.netns_prefix())
        });
    if p.dir.exists() || leftovers {
        return Err(LabError::LabExists(opts.name.clone()));
    }
    // Read manifests before making anything, so a typo costs nothing.
    let docs = client::read_manifests(&opts.manifests, "default")?;
    if opts.clusters > 0 {
        let kubeconfigs = crate::clusterset::up(opts, &docs).await?;
        return Ok(kubeconfigs.into_iter().next().unwrap_or_default());
    }
    match build(opts, &p, &docs).await {
        Ok(k) => Ok(k),
        Err(e) => {
            eprintln!("  ✗ {e}");
            eprintln!(
                "  removing what was made (its logs are kept in {})",
                keep_logs(&p).display()
            );
            let _ = down(&opts.name);
            Err(e)
        }
    }
}

async fn build(opts: &UpOptions, p: &LabPaths, docs: &[client::Doc]) -> Result<PathBuf, LabError> {
    let progress = Progress::new();
    // First-run state, made once before any agent starts: the BPF filesystem the agents pin
    // in and the shared /run/netns mount point.
    sys::ensure_bpffs()?;
    sys::ensure_netns_run_dir()?;
    let (layout, client) = start_control_plane(opts, p, None, &progress).await?;
    tokio::task::block_in_place(|| net::create_cluster_network(&layout))?;
    tokio::task::block_in_place(|| start_external_server(p, &layout))?;
    progress.step(&format!(
        "network: {} node(s), fabric 172.30.0.0/24, external host {} (echo server on {})",
        layout.nodes.len(),
        layout.external_ip,
        EXTERNAL_PORTS.join(", ")
    ));
    start_nodes(p, &layout, &client, &progress).await?;
    apply_and_settle(opts, &client, &layout, docs, &progress).await?;
    Ok(p.kubeconfig())
}

/// Refuses the combinations of `lab up` options the chosen dataplane cannot run.
fn check_dataplane(opts: &UpOptions) -> Result<(), LabError> {
    use weir_dataplane::DataplaneKind;
    let netfilter = opts.dataplane != DataplaneKind::Ebpf;
    let clash = [
        (
            netfilter && opts.tunnel != "native",
            "--tunnel vxlan needs the eBPF dataplane (its tunnel routes are BPF maps)",
        ),
        (netfilter && opts.xdp, "--xdp needs the eBPF dataplane"),
        (
            netfilter && !opts.socket_lb,
            "--no-socket-lb is an eBPF setting (the netfilter dataplanes translate per packet)",
        ),
    ];
    match clash.into_iter().find(|(bad, _)| *bad) {
        Some((_, why)) => Err(LabError::Usage(format!(
            "--dataplane {}: {why}",
            opts.dataplane
        ))),
        None => Ok(()),
    }
}

/// Plans a lab's (or a clusterset cluster's) layout with the options of `lab up`.
fn plan_layout(opts: &UpOptions, p: &LabPaths, cluster: Option<u8>) -> Result<Layout, LabError> {
    let mut layout = Layout::plan_in(p, opts.nodes, free_port()?, cluster);
    layout.lb_algorithm = match opts.lb_algorithm {
        weir_control::lb::Algorithm::Random => "random".into(),
        weir_control::lb::Algorithm::Maglev => "maglev".into(),
    };
    layout.socket_lb = opts.socket_lb;
    layout.dataplane = opts.dataplane;
    layout.tunnel = opts.tunnel.clone();
    layout.xdp = opts.xdp;
    layout.masquerade = opts.masquerade;
    layout.identity_gc_grace_ms = opts.identity_gc_grace.as_millis() as u64;
    layout.service_proxy_name = opts.service_proxy_name.clone();
    Ok(layout)
}

/// Makes a cluster's directory, layout, credentials and kubeconfig, starts its API server
/// and mounts its cgroup v2 tree. `cluster` is the index in a clusterset.
pub(crate) async fn start_control_plane(
    opts: &UpOptions,
    p: &LabPaths,
    cluster: Option<u8>,
    progress: &Progress,
) -> Result<(Layout, Client), LabError> {
    std::fs::create_dir_all(&p.dir).map_err(|e| LabError::io(p.dir.clone(), e))?;
    let mut layout = plan_layout(opts, p, cluster)?;
    if let Some(k) = cluster {
        crate::clusterset::plan_cluster(&mut layout, k, opts.clusters);
    }
    layout.save(p)?;
    let pki = weir_apiserver::pki::Pki::ensure(&p.pki_dir(), &p.name)
        .map_err(|e| LabError::Command("pki".into(), e.to_string()))?;
    let server = format!("https://127.0.0.1:{}", layout.apiserver_port);
    pki.write_kubeconfig(&p.kubeconfig(), &p.name, &server)
        .map_err(|e| LabError::Command("kubeconfig".into(), e.to_string()))?;

    start_apiserver(p)?;
    let client = client::client_from_kubeconfig(&p.kubeconfig()).await?;
    wait_for_apiserver(&client, p, Duration::from_secs(15)).await?;
    progress.step(&format!("{}: API server listening on {server}", p.name));
    sys::ensure_cgroup2(&p.cgroup_mount())?;
    for dir in [p.cgroup_dir(), p.cgroup_dir().join("external")] {
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(dir.clone(), e))?;
    }
    Ok((layout, client))
}

/// Installs the CNI plugin and starts the controllers, kubelets and agents of a cluster
/// whose nodes are on the fabric; returns when every node is Ready.
pub(crate) async fn start_nodes(
    p: &LabPaths,
    layout: &Layout,
    client: &Client,
    progress: &Progress,
) -> Result<(), LabError> {
    install_cni(p, layout)?;
    start_controller(p)?;
    start_dns(p)?;
    for n in &layout.nodes {
        start_kubelet(p, &n.name)?;
        start_agent(p, &n.name)?;
    }
    wait_for_nodes(client, layout, progress, Duration::from_secs(20)).await?;
    progress.step(&format!(
        "{}: controllers and {} kubelet(s) running; nodes Ready",
        p.name,
        layout.nodes.len()
    ));
    Ok(())
}

/// Applies `docs`, waits for their pods and for every node's datapath to match the API.
pub(crate) async fn apply_and_settle(
    opts: &UpOptions,
    client: &Client,
    layout: &Layout,
    docs: &[client::Doc],
    progress: &Progress,
) -> Result<(), LabError> {
    if !docs.is_empty() {
        let lines = client::apply(client, docs).await?;
        progress.step(&format!(
            "{}: applied {} object(s)",
            layout.name,
            lines.len()
        ));
        wait_for_pods(client, progress, opts.timeout).await?;
    }
    wait_converged(client, layout, opts.timeout).await?;
    progress.step(&format!(
        "{}: EndpointSlices and every node's datapath match the API",
        layout.name
    ));
    Ok(())
}

async fn wait_for_nodes(
    client: &Client,
    layout: &Layout,
    progress: &Progress,
    timeout: Duration,
) -> Result<(), LabError> {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let nodes = api
            .list(&ListParams::default())
            .await
            .map_err(|e| LabError::Kube(e.to_string()))?;
        let ready = nodes
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        progress.status(&format!("nodes Ready: {ready}/{}", layout.nodes.len()));
        if ready >= layout.nodes.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(format!(
                "only {ready} of {} nodes became Ready within {timeout:?}",
                layout.nodes.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every pod of the cluster is Ready.
pub async fn wait_for_pods(
    client: &Client,
    progress_out: &impl PodProgress,
    timeout: Duration,
) -> Result<(), LabError> {
    let api: Api<Pod> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let pods = api
            .list(&ListParams::default())
            .await
            .map_err(|e| LabError::Kube(e.to_string()))?;
        let live: Vec<&Pod> = pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let not_ready: Vec<String> = live
            .iter()
            .filter(|p| !crate::endpoints::pod_is_ready(p))
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default()
                )
            })
            .collect();
        progress_out.pods(live.len() - not_ready.len(), live.len());
        if not_ready.is_empty() {
            progress_out.done(&format!("{} pod(s) Ready", live.len()));
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(format!(
                "pods not Ready after {timeout:?}: {}",
                not_ready.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Frontends and their backends, as comparable strings.
type LbView = std::collections::BTreeMap<String, Vec<String>>;

fn expected_view(
    services: &[Service],
    slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
    node: &str,
) -> LbView {
    let opts = weir_control::lb::Options {
        node_name: node.into(),
        default_algorithm: weir_control::lb::Algorithm::Random,
        default_mode: weir_control::lb::LbMode::Snat,
    };
    let (state, _) = weir_control::lb::build(services, slices, &opts);
    state
        .frontends
        .iter()
        .map(|(k, f)| {
            (
                k.to_string(),
                f.backends.iter().map(|b| b.to_string()).collect(),
            )
        })
        .collect()
}

fn agent_view(dump: &serde_json::Value) -> LbView {
    let mut out = LbView::new();
    for f in dump["frontends"].as_array().into_iter().flatten() {
        let Ok(key) = serde_json::from_value::<weir_control::lb::FrontendKey>(f["key"].clone())
        else {
            continue;
        };
        let mut backends: Vec<String> = f["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| serde_json::from_value::<weir_control::lb::Backend>(b[1].clone()).ok())
            .map(|b| b.to_string())
            .collect();
        backends.sort();
        out.insert(key.to_string(), backends);
    }
    out
}

/// Whether every Service's EndpointSlices list exactly its Ready pods.
fn slices_caught_up(
    services: &[Service],
    slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
    pods: &[Pod],
) -> bool {
    for s in services {
        let Some(sel) = s
            .spec
            .as_ref()
            .and_then(|sp| sp.selector.as_ref())
            .filter(|m| !m.is_empty())
        else {
            continue;
        };
        let ns = s.metadata.namespace.as_deref().unwrap_or_default();
        let name = s.metadata.name.as_deref().unwrap_or_default();
        let selector = weir_model::LabelSelector::from_map(sel);
        let mut want: Vec<String> = pods
            .iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.deletion_timestamp.is_none()
                    && crate::endpoints::pod_is_ready(p)
            })
            .filter(|p| selector.matches(&p.metadata.labels.clone().unwrap_or_default()))
            .filter_map(|p| p.status.as_ref().and_then(|st| st.pod_ip.clone()))
            .collect();
        let mut have: Vec<String> = slices
            .iter()
            .filter(|sl| sl.metadata.namespace.as_deref() == Some(ns) && sl.address_type == "IPv4")
            .filter(|sl| {
                sl.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(crate::endpoints::SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == Some(name)
            })
            .flat_map(|sl| sl.endpoints.clone().unwrap_or_default())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .filter_map(|e| e.addresses.first().cloned())
            .collect();
        want.sort();
        have.sort();
        have.dedup();
        if want != have {
            return false;
        }
    }
    true
}

/// Waits until the EndpointSlice controller has caught up with the pods and every node's
/// agent has programmed exactly what the API says: a lab that `up` returns is consistent.
pub async fn wait_converged(
    client: &Client,
    layout: &Layout,
    timeout: Duration,
) -> Result<(), LabError> {
    let p = LabPaths::new(&layout.name);
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let lp = ListParams::default();
        let kerr = |e: kube::Error| LabError::Kube(e.to_string());
        let services = Api::<Service>::all(client.clone())
            .list(&lp)
            .await
            .map_err(kerr)?
            .items;
        let slices = Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::all(client.clone())
            .list(&lp)
            .await
            .map_err(kerr)?
            .items;
        let pods = Api::<Pod>::all(client.clone())
            .list(&lp)
            .await
            .map_err(kerr)?
            .items;
        // What the agents program: the Services and slices their label selector takes.
        let proxied = weir_model::LabelSelector::parse(&weir_agent::service_label_selector(
            layout.service_proxy_name.as_deref(),
        ))
        .expect("the agents' selector parses");
        let selected =
            |m: &kube::api::ObjectMeta| proxied.matches(&m.labels.clone().unwrap_or_default());
        let mut proxied_services: Vec<Service> = services
            .iter()
            .filter(|s| selected(&s.metadata))
            .cloned()
            .collect();
        let mut proxied_slices: Vec<_> = slices
            .iter()
            .filter(|s| selected(&s.metadata))
            .cloned()
            .collect();
        // ServiceImports are programmed as Services of their own (see weir_control::mcs).
        let imports = Api::<kube::api::DynamicObject>::all_with(
            client.clone(),
            &client::api_resource(&weir_model::kinds::SERVICE_IMPORT),
        )
        .list(&lp)
        .await
        .map_err(kerr)?
        .items;
        proxied_services.extend(
            imports
                .iter()
                .filter_map(|i| weir_control::mcs::import_service(&i.metadata, &i.data)),
        );
        for sl in &mut proxied_slices {
            if let Some(r) = weir_control::mcs::import_slice(sl) {
                *sl = r;
            }
        }
        let mut ok = slices_caught_up(&services, &slices, &pods);
        if !ok {
            last = "EndpointSlices do not yet list every Ready pod".into();
        }
        if ok {
            for n in &layout.nodes {
                let want = expected_view(&proxied_services, &proxied_slices, &n.name);
                // The pod datapath knows every running pod of the node (its programs are on
                // the pod's veth before its address is in the map).
                let want_eps: std::collections::BTreeSet<String> = pods
                    .iter()
                    .filter(|pod| {
                        pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(n.name.as_str())
                    })
                    .flat_map(|pod| {
                        pod.status
                            .as_ref()
                            .and_then(|st| st.pod_ips.clone())
                            .unwrap_or_default()
                    })
                    .map(|ip| ip.ip)
                    .collect();
                match weir_agent::api::get(&p.agent_socket(&n.name), "/datapath").await {
                    Ok(dp) => {
                        let have: std::collections::BTreeSet<String> = dp["dump"]["endpoints"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|e| e["ip"].as_str().map(String::from))
                            .collect();
                        if !want_eps.is_subset(&have) {
                            ok = false;
                            last = format!(
                                "the agent of {} has not attached every pod's datapath yet",
                                n.name
                            );
                        }
                    }
                    Err(_) => ok = false,
                }
                match weir_agent::api::get(&p.agent_socket(&n.name), "/lb").await {
                    Ok(dump) if agent_view(&dump) == want => {}
                    Ok(_) => {
                        ok = false;
                        last = format!(
                            "the agent of {} has not programmed the current Services yet",
                            n.name
                        );
                    }
                    Err(e) => {
                        ok = false;
                        last = format!(
                            "the agent of {} does not answer on {}: {e}",
                            n.name,
                            p.agent_socket(&n.name).display()
                        );
                    }
                }
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(format!(
                "the lab did not converge within {timeout:?}: {last} (logs in {})",
                p.log_dir().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where a node's agent serves /healthz, /readyz and /metrics: on the host's loopback (the
/// agents run in the host network namespace), so they are reachable from outside the lab.
/// A fixed port (labs made before ports were chosen by the agents), else port 0: the agent
/// binds a free one and writes it to [`metrics_file`]. (A port chosen at `lab up` and bound
/// seconds later by the agent could be taken meanwhile, by another lab or any connection.)
fn metrics_addr(n: &crate::paths::NodeLayout) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], n.metrics_port))
}

/// What a (re)started agent listens on: the port its node's agent had before when it is
/// still free (a restart keeps the node's metrics URL), else the layout's.
fn metrics_listen(p: &LabPaths, n: &crate::paths::NodeLayout) -> std::net::SocketAddr {
    metrics_bound(p, n)
        .filter(|a| std::net::TcpListener::bind(a).is_ok())
        .unwrap_or_else(|| metrics_addr(n))
}

/// Where a lab node's agent writes the address it serves /metrics on.
fn metrics_file(p: &LabPaths, node: &str) -> PathBuf {
    p.node_dir(node).join("metrics.addr")
}

/// The address a lab node's agent serves /metrics on, when it runs.
fn metrics_bound(p: &LabPaths, n: &crate::paths::NodeLayout) -> Option<std::net::SocketAddr> {
    std::fs::read_to_string(metrics_file(p, &n.name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs a node's agent in this process (the `weir lab agent` component).
pub async fn run_agent(
    name: &str,
    node: &str,
    algorithm: Option<weir_control::lb::Algorithm>,
) -> Result<(), LabError> {
    let p = LabPaths::new(name);
    let layout = Layout::load(&p)?;
    layout.node(node)?;
    // The lab's default (from `lab up --lb-algorithm`) unless the command line says otherwise.
    let algorithm = match algorithm {
        Some(a) => a,
        None => layout.lb_algorithm.parse().map_err(LabError::Usage)?,
    };
    let cgroup = p.cgroup_dir().join(node);
    std::fs::create_dir_all(&cgroup).map_err(|e| LabError::io(cgroup.clone(), e))?;
    let netns = paths::netns_path(&layout.node(node)?.netns);
    let opener = weir_dataplane::open::NodeDataplanes {
        kind: layout.dataplane_of(layout.node(node)?),
        pins: p.node_bpf_dir(node),
        cgroup: cgroup.clone(),
        socket_lb: layout.socket_lb,
        netns: Some(netns.clone()),
        node: weir_dataplane::nft::NodeNet {
            devices: vec!["eth0".into()],
            snat_ports: net::LAB_SNAT_PORTS,
            masquerade: None,
        },
        iptables: weir_dataplane::ipt::IptablesBackend::Auto,
    };
    let (dp, pods) = opener
        .open()
        .map_err(|e| LabError::Command(format!("loading the datapath of {node}"), e.to_string()))?;
    // The agent stays in the host namespace (the API server listens on its loopback); the
    // pod datapath thread enters the node's namespace, where the devices are.
    let pod_cfg = weir_agent::pods::PodConfig {
        endpoint_dir: p.endpoint_dir(node),
        devices: vec!["eth0".into()],
        netns: Some(netns),
        snat_ports: net::LAB_SNAT_PORTS,
        tunnel: (layout.tunnel == "vxlan").then(|| net::TUNNEL_DEVICE.to_string()),
        xdp: layout.xdp,
        masquerade: layout.masquerade,
        non_masquerade: layout
            .non_masquerade
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
        dataplanes: Some(opener),
        flow_summaries: true,
    };
    let client = client::client_from_kubeconfig(&p.kubeconfig()).await?;
    let cfg = weir_agent::AgentConfig {
        node_name: node.into(),
        socket: p.agent_socket(node),
        default_algorithm: algorithm,
        default_mode: weir_control::lb::LbMode::Snat,
        identity_gc_grace: Duration::from_millis(layout.identity_gc_grace_ms),
        service_proxy_name: layout.service_proxy_name.clone(),
        listen: vec![metrics_listen(&p, layout.node(node)?)],
        listen_file: Some(metrics_file(&p, node)),
        cluster_id: name.split_once('/').map(|(_, c)| c.to_string()),
        flow_metrics_context: Default::default(),
    };
    weir_agent::run(client, dp, Some((pods, pod_cfg)), cfg)
        .await
        .map_err(|e| LabError::Command("agent".into(), e.to_string()))
}

/// Where `wait_for_pods` reports progress.
pub trait PodProgress {
    /// `ready` of `total` pods are Ready.
    fn pods(&self, ready: usize, total: usize);
    /// Finished.
    fn done(&self, msg: &str);
}

impl PodProgress for Progress {
    fn pods(&self, ready: usize, total: usize) {
        self.status(&format!("pods Ready: {ready}/{total}"));
    }
    fn done(&self, msg: &str) {
        self.step(msg);
    }
}

/// What `lab down` removed.
#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    /// Processes stopped.
    pub processes: usize,
    /// Network namespaces deleted.
    pub namespaces: usize,
    /// Whether the cgroup tree was removed.
    pub cgroups: bool,
    /// Whether BPF pins were removed.
    pub pins: bool,
}

fn lab_netns(p: &LabPaths) -> Vec<String> {
    let prefix = p.netns_prefix();
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    v.sort();
    v
}

/// `weir lab down`: removes everything a lab (or a whole clusterset) made (processes,
/// namespaces and the links in them, cgroups, BPF pins, files), from whatever state it is in.
pub fn down(name: &str) -> Result<DownReport, LabError> {
    paths::check_name(name)?;
    if !sys::is_root() {
        return Err(LabError::NotRoot);
    }
    if name.contains('/') {
        return Err(LabError::Usage(format!(
            "{name:?} is a cluster of a clusterset: remove the whole clusterset with `weir lab down --name {}`",
            name.split('/').next().unwrap_or(name)
        )));
    }
    if LabPaths::new(name).dir.join("clusterset.json").exists() {
        return crate::clusterset::down(name);
    }
    down_one(name)
}

/// Removes one lab, one cluster of a clusterset, or what a clusterset shares once its
/// clusters are gone.
pub(crate) fn down_one(name: &str) -> Result<DownReport, LabError> {
    let p = LabPaths::new(name);
    let namespaces = lab_netns(&p);
    if !p.dir.exists() && namespaces.is_empty() && !p.bpf_dir().exists() {
        return Err(LabError::NoSuchLab(name.to_string()));
    }
    // The lab's cgroups are reachable through its own cgroup2 mount; mount it again if a
    // crash left the tree but not the mount.
    sys::ensure_cgroup2(&p.cgroup_mount())?;
    let mut report = DownReport::default();
    // Processes: those started for this lab (they carry `--cluster NAME`), and anything
    // left inside its cgroups or network namespaces.
    let mut pids = sys::pids_with_args(&["--cluster", name]);
    pids.extend(sys::pids_in_cgroup_tree(&p.cgroup_dir()));
    for ns in &namespaces {
        pids.extend(sys::pids_in_netns(ns));
    }
    pids.sort();
    pids.dedup();
    pids.retain(|pid| *pid != std::process::id() as i32);
    report.processes = pids.len();
    sys::kill_all(&pids, Duration::from_secs(2));
    // Pods first, then nodes, the external host and the fabric.
    let mut ordered = namespaces.clone();
    ordered.sort_by_key(|n| (!n.contains(".pod-"), n.ends_with(".fabric"), n.clone()));
    for ns in &ordered {
        if sys::ip(&["netns", "del", ns]).is_ok() {
            report.namespaces += 1;
        }
    }
    if p.cgroup_dir().exists() {
        sys::remove_cgroup_tree(&p.cgroup_dir())?;
        report.cgroups = true;
    }
    sys::unmount_cgroup2(&p.cgroup_mount())?;
    if p.bpf_dir().exists() {
        std::fs::remove_dir_all(p.bpf_dir()).map_err(|e| LabError::io(p.bpf_dir(), e))?;
        report.pins = true;
    }
    if p.dir.exists() {
        std::fs::remove_dir_all(&p.dir).map_err(|e| LabError::io(p.dir.clone(), e))?;
    }
    Ok(report)
}

/// One line of `weir lab list`.
#[derive(Debug, Serialize)]
pub struct LabSummary {
    /// Name.
    pub name: String,
    /// Node count.
    pub nodes: usize,
    /// Whether the API server process is alive.
    pub apiserver_running: bool,
    /// API server URL.
    pub server: String,
    /// Kubeconfig path.
    pub kubeconfig: PathBuf,
    /// Creation time.
    pub created: String,
    /// The clusterset this lab is a cluster of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clusterset: Option<String>,
}

/// The pid of a lab component from its pid file, when it is alive.
pub(crate) fn pid_of(paths: &LabPaths, component: &str) -> Option<i32> {
    std::fs::read_to_string(paths.pid_dir().join(format!("{component}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| sys::alive(*pid))
}

/// `weir lab list`.
pub fn list() -> Vec<LabSummary> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(paths::RUN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let names = match crate::clusterset::ClusterSetLayout::load(&name) {
            Some(set) => set.clusters.iter().map(|c| format!("{name}/{c}")).collect(),
            None => vec![name],
        };
        for name in names {
            let p = LabPaths::new(&name);
            let Ok(layout) = Layout::load(&p) else {
                continue;
            };
            out.push(LabSummary {
                nodes: layout.nodes.len(),
                apiserver_running: pid_of(&p, "apiserver").is_some(),
                server: format!("https://127.0.0.1:{}", layout.apiserver_port),
                kubeconfig: p.kubeconfig(),
                created: layout.created.clone(),
                clusterset: p.clusterset().map(str::to_string),
                name,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One host of `weir lab nodes`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostInfo {
    /// Node name, or `external`.
    pub name: String,
    /// `node` or `external`.
    pub role: String,
    /// Fabric IPv4 address.
    pub ip: String,
    /// Fabric IPv6 address.
    pub ip6: String,
    /// Pod CIDRs (nodes only).
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// Network namespace.
    pub netns: String,
    /// The node's CNI configuration directory (nodes only; absolute).
    #[serde(rename = "cniConfDir", skip_serializing_if = "Option::is_none")]
    pub cni_conf_dir: Option<PathBuf>,
    /// The directory holding `weir-cni` (nodes only; absolute).
    #[serde(rename = "cniBinDir", skip_serializing_if = "Option::is_none")]
    pub cni_bin_dir: Option<PathBuf>,
    /// The node agent's Prometheus endpoint, reachable from the host (nodes only); /healthz
    /// and /readyz are served beside it.
    #[serde(rename = "metricsURL", skip_serializing_if = "Option::is_none")]
    pub metrics_url: Option<String>,
}

/// `weir lab nodes`.
pub fn nodes(name: &str) -> Result<Vec<HostInfo>, LabError> {
    paths::check_name(name)?;
    let p = LabPaths::new(name);
    let layout = Layout::load(&p)?;
    let mut out: Vec<HostInfo> = layout
        .nodes
        .iter()
        .map(|n| HostInfo {
            name: n.name.clone(),
            role: "node".into(),
            ip: n.ip.to_string(),
            ip6: n.ip6.to_string(),
            pod_cidrs: vec![n.pod_cidr.clone(), n.pod_cidr6.clone()],
            netns: n.netns.clone(),
            cni_conf_dir: Some(p.cni_conf_dir(&n.name)),
            cni_bin_dir: Some(p.cni_bin_dir()),
            metrics_url: metrics_bound(&p, n).map(|a| format!("http://{a}/metrics")),
        })
        .collect();
    out.push(HostInfo {
        name: "external".into(),
        role: "external".into(),
        ip: layout.external_ip.to_string(),
        ip6: layout.external_ip6.to_string(),
        pod_cidrs: vec![],
        netns: layout.external_netns.clone(),
        cni_conf_dir: None,
        cni_bin_dir: None,
        metrics_url: None,
    });
    Ok(out)
}

fn split_pod(spec: &str) -> Result<(String, String), LabError> {
    match spec.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Ok(("default".to_string(), spec.to_string())),
    }
}

/// `weir lab terminate`: deletes a pod with a long grace period, so it keeps serving while
/// its endpoint is serving+terminating.
pub async fn terminate(lab: &str, pod: &str, grace: i64) -> Result<(), LabError> {
    let client = lab_client(lab).await?;
    let (ns, name) = split_pod(pod)?;
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(grace.max(0) as u32),
        ..Default::default()
    };
    api.delete(&name, &dp).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 404 => {
            LabError::NoSuchPod(format!("no pod {ns}/{name} in lab {lab:?}"))
        }
        e => LabError::Kube(e.to_string()),
    })?;
    Ok(())
}

/// The network namespace and cgroup a command "from" something runs in.
#[derive(Debug, Clone)]
pub struct Source {
    /// What the user named.
    pub label: String,
    /// Network namespace path.
    pub netns: PathBuf,
    /// cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Namespace of the pod, for resolving Service names.
    pub namespace: String,
    /// The pod's resolv.conf (pods only).
    pub resolv_conf: Option<PathBuf>,
}

/// Resolves `external`, a node name, or `namespace/pod` of lab `lab`.
pub async fn resolve_source(lab: &str, what: &str, client: &Client) -> Result<Source, LabError> {
    let p = LabPaths::new(lab);
    let layout = Layout::load(&p)?;
    if what == "external" {
        return Ok(Source {
            label: what.into(),
            netns: paths::netns_path(&layout.external_netns),
            cgroup: p.cgroup_dir().join("external"),
            namespace: "default".into(),
            resolv_conf: None,
        });
    }
    let node_name = what.strip_prefix("node/").unwrap_or(what);
    if let Ok(n) = layout.node(node_name) {
        return Ok(Source {
            label: what.into(),
            netns: paths::netns_path(&n.netns),
            cgroup: p.cgroup_dir().join(&n.name),
            namespace: "default".into(),
            resolv_conf: None,
        });
    }
    let (ns, name) = split_pod(what)?;
    // The kubelets' sandbox records answer without the API (so exec and connect work while
    // the API server is down).
    for n in &layout.nodes {
        let dir = p.node_dir(&n.name).join("pods");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let Ok(sb) = serde_json::from_str::<crate::kubelet::Sandbox>(&text) else {
                continue;
            };
            if sb.namespace == ns && sb.name == name && sys::alive(sb.pid) {
                return Ok(Source {
                    label: format!("{ns}/{name}"),
                    netns: paths::netns_path(&sb.netns),
                    cgroup: sb.cgroup.clone(),
                    namespace: ns,
                    resolv_conf: Some(crate::kubelet::resolv_conf_path(&p, &n.name, &sb.uid)),
                });
            }
        }
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = api
        .get_opt(&name)
        .await
        .map_err(|e| LabError::Kube(e.to_string()))?
        .ok_or_else(|| {
            LabError::NoSuchPod(format!(
                "no pod {ns}/{name} in lab {lab:?} (hint: `weir --cluster {lab} get pods -A`)"
            ))
        })?;
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let id: String = uid.replace('-', "").chars().take(10).collect();
    let netns = paths::netns_path(&p.netns(&format!("pod-{id}")));
    if node.is_empty() || !netns.exists() {
        return Err(LabError::NoSuchPod(format!(
            "pod {ns}/{name} of lab {lab:?} is not running yet"
        )));
    }
    Ok(Source {
        label: format!("{ns}/{name}"),
        netns,
        cgroup: p.cgroup_dir().join(&node).join(format!("pod-{id}")),
        namespace: ns,
        resolv_conf: Some(crate::kubelet::resolv_conf_path(&p, &node, &uid)),
    })
}

/// Runs attempts inside `src` through a helper process (`weir lab attempts`).
pub async fn run_attempts(
    lab: &str,
    src: &Source,
    spec: &AttemptSpec,
) -> Result<crate::connect::AttemptReport, LabError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(current_exe()?)
        .args(["lab", "attempts", "--cluster", lab, "--netns"])
        .arg(&src.netns)
        .arg("--cgroup")
        .arg(&src.cgroup)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command("weir lab attempts".into(), e.to_string()))?;
    let input = serde_json::to_vec(spec).expect("json");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(&input)
        .await
        .map_err(|e| LabError::Command("weir lab attempts".into(), e.to_string()))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| LabError::Command("weir lab attempts".into(), e.to_string()))?;
    if !out.status.success() {
        return Err(LabError::Command(
            format!("attempts from {}", src.label),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| LabError::Command(format!("attempts from {}", src.label), e.to_string()))
}

/// The resolv.conf a source resolves names with: a pod's own; a node's is the node-local
/// DNS server with the default namespace's search path.
fn source_resolv_conf(src: &Source) -> Result<String, LabError> {
    match &src.resolv_conf {
        Some(f) => std::fs::read_to_string(f).map_err(|e| LabError::io(f.clone(), e)),
        None if src.label == "external" => Err(LabError::Usage(
            "the external host has no cluster DNS: give it an address".into(),
        )),
        None => Ok(crate::kubelet::resolv_conf("default")),
    }
}

/// Resolves `HOST:PORT` where HOST is an IP or a Service as `name[.namespace]` (its first
/// ClusterIP).
pub async fn resolve_target(
    client: &Client,
    to: &str,
    default_ns: &str,
) -> Result<SocketAddr, LabError> {
    if let Ok(a) = to.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = to
        .rsplit_once(':')
        .ok_or_else(|| LabError::Usage(format!("--to {to:?}: expected HOST:PORT")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| LabError::Usage(format!("--to {to:?}: bad port")))?;
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let (name, ns) = host
        .split_once('.')
        .map(|(a, b)| (a, b.split('.').next().unwrap_or(b)))
        .unwrap_or((host, default_ns));
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc = api
        .get_opt(name)
        .await
        .map_err(|e| LabError::Kube(e.to_string()))?
        .ok_or_else(|| LabError::Usage(format!("--to {to:?}: no Service {ns}/{name}")))?;
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .filter(|i| i != "None")
        .ok_or_else(|| {
            LabError::Usage(format!("--to {to:?}: Service {ns}/{name} has no ClusterIP"))
        })?;
    Ok(SocketAddr::new(
        ip.parse()
            .map_err(|_| LabError::Usage(format!("bad ClusterIP {ip}")))?,
        port,
    ))
}

/// How `weir lab fault` makes a pod's servers fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Connections reset, datagrams answered port-unreachable (a crashed process).
    Refuse,
    /// Nothing answers (a hung process, a dead host).
    Blackhole,
    /// Back to normal.
    None,
}

/// The nftables table in a pod's network namespace that holds its fault.
const FAULT_TABLE: &str = "weir_fault";

/// `weir lab fault`: makes pod `pod`'s servers fail as `mode` says, without any API change:
/// every packet of a connection or flow that a peer opened to the pod (conntrack's original
/// direction) is rejected (Refuse: TCP reset, ICMP port-unreachable) or dropped (Blackhole);
/// the pod's own outgoing connections keep working. In place when this returns.
pub async fn fault(lab: &str, pod: &str, mode: FaultMode) -> Result<(), LabError> {
    split_pod(pod)?;
    let client = lab_client(lab).await?;
    let src = resolve_source(lab, pod, &client).await?;
    let verdict = match mode {
        FaultMode::Refuse => Some(
            "    ct direction original meta l4proto tcp reject with tcp reset\n    ct direction original meta l4proto udp reject with icmpx type port-unreachable",
        ),
        FaultMode::Blackhole => {
            Some("    ct direction original meta l4proto { tcp, udp } drop")
        }
        FaultMode::None => None,
    };
    let mut script = format!("table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n");
    if let Some(rules) = verdict {
        script.push_str(&format!(
            "table inet {FAULT_TABLE} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n    iifname \"lo\" accept\n{rules}\n  }}\n}}\n"
        ));
    }
    crate::sys::run_with_stdin(
        "nsenter",
        &[&format!("--net={}", src.netns.display()), "nft", "-f", "-"],
        &script,
    )?;
    Ok(())
}

/// How `weir lab connect` makes its attempts.
#[derive(Debug, Clone, Default)]
pub struct ConnectOpts {
    /// UDP (a connected socket) instead of TCP.
    pub udp: bool,
    /// Number of attempts.
    pub count: usize,
    /// Timeout per attempt.
    pub timeout: Duration,
    /// Hold one connection this long instead.
    pub hold: Option<Duration>,
    /// Attempts per second, evenly spaced.
    pub rate: Option<f64>,
}

/// `weir lab connect`.
pub async fn connect(
    lab: &str,
    from: &str,
    to: &str,
    opts: &ConnectOpts,
) -> Result<ConnectSummary, LabError> {
    let ConnectOpts {
        udp,
        count,
        timeout,
        hold,
        rate,
    } = opts.clone();
    let interval_us = match rate {
        None => 0,
        Some(r) if r > 0.0 && r.is_finite() => ((1e6 / r).round() as u64).max(1),
        Some(r) => {
            return Err(LabError::Usage(format!(
                "--rate {r}: give a positive number of attempts per second"
            )))
        }
    };
    let client = lab_client(lab).await?;
    let src = resolve_source(lab, from, &client).await?;
    // A name of two dots or more goes through the source's resolver, once per attempt.
    let dns_name = to
        .rsplit_once(':')
        .map(|(h, _)| h)
        .filter(|h| h.matches('.').count() >= 2 && h.parse::<IpAddr>().is_err());
    let (target, resolve) = match dns_name {
        Some(host) => {
            let port: u16 = to
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| LabError::Usage(format!("--to {to:?}: bad port")))?;
            let conf = source_resolv_conf(&src)?;
            (
                SocketAddr::from(([0, 0, 0, 0], port)),
                Some((host.to_string(), conf)),
            )
        }
        None => (resolve_target(&client, to, &src.namespace).await?, None),
    };
    let spec = AttemptSpec {
        targets: vec![target; count],
        udp,
        timeout_ms: timeout.as_millis() as u64,
        parallel: 16,
        hold_ms: hold.map_or(0, |h| h.as_millis() as u64),
        resolve: resolve.as_ref().map(|(h, _)| h.clone()),
        resolv_conf: resolve.map(|(_, c)| c),
        interval_us,
    };
    let report = run_attempts(lab, &src, &spec).await?;
    let mut summary = ConnectSummary::from_outcomes(&report.outcomes);
    summary.reconnects = report.reconnects;
    Ok(summary)
}

/// How `weir lab probe` reaches each pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The pod's IP.
    PodIp,
    /// The ClusterIP of a Service that selects exactly that pod.
    Service,
}

/// The result of `weir lab probe`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeMatrix {
    /// Port probed.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// Pods, as `namespace/name`, in row and column order.
    pub columns: Vec<String>,
    /// rows[from][to]: whether `to` answered `from`.
    pub rows: BTreeMap<String, BTreeMap<String, bool>>,
}

/// `weir lab probe`: every pod to every pod, in parallel.
pub async fn probe(
    lab: &str,
    port: u16,
    udp: bool,
    via: Via,
    timeout: Duration,
) -> Result<ProbeMatrix, LabError> {
    let client = lab_client(lab).await?;
    let pods: Vec<Pod> = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| LabError::Kube(e.to_string()))?
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
        })
        .collect();
    let mut pods = pods;
    pods.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    let id = |p: &Pod| {
        format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default()
        )
    };
    let columns: Vec<String> = pods.iter().map(id).collect();
    let mut targets: Vec<SocketAddr> = Vec::new();
    match via {
        Via::PodIp => {
            for p in &pods {
                let ip: IpAddr = p
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|i| i.parse().ok())
                    .ok_or_else(|| LabError::NoSuchPod(format!("pod {} has no IP", id(p))))?;
                targets.push(SocketAddr::new(ip, port));
            }
        }
        Via::Service => {
            let services = Api::<Service>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| LabError::Kube(e.to_string()))?
                .items;
            let mut missing = Vec::new();
            for p in &pods {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let in_ns: Vec<&Pod> = pods
                    .iter()
                    .filter(|q| q.metadata.namespace.as_deref() == Some(ns.as_str()))
                    .collect();
                let found = services
                    .iter()
                    .filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()))
                    .find_map(|s| {
                        let spec = s.spec.as_ref()?;
                        let sel = spec.selector.as_ref().filter(|m| !m.is_empty())?;
                        let selector = weir_model::LabelSelector::from_map(sel);
                        let selected: Vec<&&Pod> = in_ns
                            .iter()
                            .filter(|q| {
                                selector.matches(&q.metadata.labels.clone().unwrap_or_default())
                            })
                            .collect();
                        if selected.len() != 1 || selected[0].metadata.uid != p.metadata.uid {
                            return None;
                        }
                        let proto = if udp { "UDP" } else { "TCP" };
                        let sp = spec.ports.as_ref()?.iter().find(|sp| {
                            sp.protocol.as_deref().unwrap_or("TCP") == proto
                                && (sp.port == port as i32
                                    || crate::endpoints::resolve_target_port(p, sp)
                                        == Some(port as i32))
                        })?;
                        let ip: IpAddr = spec.cluster_ip.as_ref()?.parse().ok()?;
                        Some(SocketAddr::new(ip, sp.port as u16))
                    });
                match found {
                    Some(a) => targets.push(a),
                    None => missing.push(id(p)),
                }
            }
            if !missing.is_empty() {
                return Err(LabError::Usage(format!(
                    "--via service: no Service selects exactly {} on port {port}",
                    missing.join(", ")
                )));
            }
        }
    }
    let mut tasks = Vec::new();
    for p in &pods {
        let src = resolve_source(lab, &id(p), &client).await?;
        let spec = AttemptSpec {
            targets: targets.clone(),
            udp,
            timeout_ms: timeout.as_millis() as u64,
            parallel: targets.len().max(1),
            hold_ms: 0,
            resolve: None,
            resolv_conf: None,
            interval_us: 0,
        };
        let lab = lab.to_string();
        tasks.push(tokio::spawn(async move {
            run_attempts(&lab, &src, &spec).await
        }));
    }
    let mut rows = BTreeMap::new();
    // A clusterset's pods answer as `cK/namespace/name`.
    let own = |r: &str| -> String {
        match lab.split_once('/') {
            Some((_, c)) => r.strip_prefix(&format!("{c}/")).unwrap_or(r).to_string(),
            None => r.to_string(),
        }
    };
    for (p, t) in pods.iter().zip(tasks) {
        let outcomes = t
            .await
            .map_err(|e| LabError::Command("probe".into(), e.to_string()))??
            .outcomes;
        let row: BTreeMap<String, bool> = columns
            .iter()
            .zip(outcomes)
            .map(|(c, o)| {
                (
                    c.clone(),
                    o.responder.as_deref().map(own) == Some(c.clone()),
                )
            })
            .collect();
        rows.insert(id(p), row);
    }
    Ok(ProbeMatrix {
        port,
        protocol: if udp { "UDP".into() } else { "TCP".into() },
        columns,
        rows,
    })
}

impl ProbeMatrix {
    /// A truth table as Cyclonus prints it: `.` reachable, `X` not.
    pub fn render(&self) -> String {
        let head = format!("{}/{}", self.protocol, self.port);
        let w0 = self
            .columns
            .iter()
            .map(String::len)
            .chain([head.len()])
            .max()
            .unwrap_or(0);
        let widths: Vec<usize> = self.columns.iter().map(|c| c.len().max(1)).collect();
        let sep = format!(
            "+{}+{}",
            "-".repeat(w0 + 2),
            widths
                .iter()
                .map(|w| format!("{}+", "-".repeat(w + 2)))
                .collect::<String>()
        );
        let mut out = String::new();
        out.push_str(&sep);
        out.push('\n');
        out.push_str(&format!("| {head:<w0$} |"));
        for (c, w) in self.columns.iter().zip(&widths) {
            out.push_str(&format!(" {c:<w$} |"));
        }
        out.push('\n');
        out.push_str(&sep);
        out.push('\n');
        for from in &self.columns {
            out.push_str(&format!("| {from:<w0$} |"));
            for (to, w) in self.columns.iter().zip(&widths) {
                let ok = self
                    .rows
                    .get(from)
                    .and_then(|r| r.get(to))
                    .copied()
                    .unwrap_or(false);
                let cell = if ok { "." } else { "X" };
                out.push_str(&format!(" {cell:<w$} |"));
            }
            out.push('\n');
        }
        out.push_str(&sep);
        out.push('\n');
        let total = self.columns.len() * self.columns.len();
        let ok: usize = self
            .rows
            .values()
            .map(|r| r.values().filter(|v| **v).count())
            .sum();
        out.push_str(&format!(
            "{ok}/{total} reachable (. = answered by the target pod, X = no answer from it)\n"
        ));
        out
    }
}

/// `weir lab exec`: runs `cmd` inside the source's cgroup and network namespace, replacing
/// this process; a pod's command also sees the pod's resolv.conf as /etc/resolv.conf (in a
/// mount namespace of its own, through util-linux's unshare), so resolvers answer as in the
/// pod. Returns only on failure.
pub fn exec_in(src: &Source, cmd: &[String]) -> LabError {
    use std::os::unix::process::CommandExt;
    if cmd.is_empty() {
        return LabError::Usage("nothing to run: give a command after --".into());
    }
    if let Err(e) = sys::enter_cgroup(&src.cgroup).and_then(|_| sys::enter_netns(&src.netns)) {
        return e;
    }
    let err = match src.resolv_conf.as_ref().filter(|r| r.exists()) {
        Some(rc) => std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
            .arg(rc)
            .args(cmd)
            .exec(),
        None => std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec(),
    };
    LabError::Command(cmd.join(" "), err.to_string())
}

/// Sets up the current process as a pod sandbox or attempt helper (before any thread).
pub fn enter(netns: &Path, cgroup: &Path) -> Result<(), LabError> {
    sys::enter_cgroup(cgroup)?;
    sys::enter_netns(netns)
}

/// The kubeconfig of lab `name` (which must exist).
pub fn kubeconfig_of(name: &str) -> Result<PathBuf, LabError> {
    paths::check_name(name)?;
    let p = LabPaths::new(name);
    if p.kubeconfig().exists() {
        Ok(p.kubeconfig())
    } else {
        Err(LabError::NoSuchLab(name.to_string()))
    }
}

/// Runs the lab's API server in this process (the `weir lab apiserver` component), serving
/// what `runtime_config` leaves on.
pub async fn run_apiserver(
    name: &str,
    runtime_config: weir_apiserver::RuntimeConfig,
) -> Result<(), LabError> {
    let p = LabPaths::new(name);
    let layout = Layout::load(&p)?;
    let pki = weir_apiserver::pki::Pki::in_dir(&p.pki_dir());
    let token = pki
        .read_token()
        .map_err(|e| LabError::io(pki.token.clone(), e))?;
    let cfg = weir_apiserver::ServerConfig {
        data_dir: p.data_dir(),
        listen: weir_apiserver::Listen::Tcp(SocketAddr::from((
            [127, 0, 0, 1],
            layout.apiserver_port,
        ))),
        tls: Some(weir_apiserver::TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }),
        token: Some(token),
        store: weir_apiserver::StoreConfig {
            alloc: weir_apiserver::alloc::AllocConfig {
                service_cidrs: layout
                    .service_cidrs
                    .iter()
                    .map(|c| {
                        c.parse().map_err(|_| LabError::Corrupt {
                            path: p.layout_file(),
                            reason: format!("serviceCidrs: {c:?} is not a CIDR"),
                        })
                    })
                    .collect::<Result<_, _>>()?,
                ..Default::default()
            },
            ..Default::default()
        },
        bookmark_interval: Duration::from_secs(5),
        runtime_config,
    };
    let running = weir_apiserver::start(cfg)
        .await
        .map_err(|e| LabError::Command("apiserver".into(), e.to_string()))?;
    tracing::info!(addr = ?running.addr, "API server running");
    wait_for_signal().await;
    running.shutdown().await;
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal");
    let mut int = signal(SignalKind::interrupt()).expect("signal");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `json!` of a DownReport, for `-o json`.
pub fn down_report_json(r: &DownReport) -> serde_json::Value {
    json!(r)
}
