//! The lab kubelet: one per node. It registers its Node, watches the Pods bound to it, and
//! makes each Pod a sandbox: a network namespace and cgroup v2 directory of its own, wired by
//! executing the node's CNI plugins as a container runtime does (weir-cni: a veth pair to the
//! node, addresses from the node's pod CIDRs, the pod's programs attached by the agent), and
//! a process serving the echo server on every containerPort. It reports status (IPs, Ready
//! with readiness gates and initialDelaySeconds), keeps deleted pods serving until their
//! grace period ends, and then confirms the deletion.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::Client;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cni;
use crate::echo::ServePort;
use crate::net;
use crate::paths::{LabPaths, Layout, NodeLayout};
use crate::{sys, LabError};

/// A pod's sandbox as the kubelet records it on disk (so a restarted kubelet adopts it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sandbox {
    /// Pod uid.
    pub uid: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Node-side veth.
    pub host_if: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// The sandbox process.
    pub pid: i32,
    /// The pod's cgroup directory.
    pub cgroup: PathBuf,
    /// When the sandbox started (RFC 3339).
    pub started: String,
    /// The CNI ADD result (DEL gets it as prevResult).
    #[serde(default)]
    pub cni_result: Value,
}

/// Everything the kubelet needs to know about its place in the lab.
pub struct Kubelet {
    paths: LabPaths,
    layout: Layout,
    node: NodeLayout,
    exe: PathBuf,
    client: Client,
    sandboxes: HashMap<String, Sandbox>,
    expiring: BTreeSet<String>,
}

enum Msg {
    /// Re-evaluate a pod's status (a readiness delay ended).
    Recheck(String),
    /// A deleted pod's grace period ended.
    Expire(String),
}

fn uid8(uid: &str) -> String {
    uid.replace('-', "").chars().take(10).collect()
}

fn pod_ports(pod: &Pod) -> Vec<ServePort> {
    let mut out: Vec<ServePort> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let udp = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => false,
                "UDP" => true,
                _ => return None,
            };
            Some(ServePort {
                udp,
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn parse_time(v: &str) -> Option<jiff::Timestamp> {
    v.parse().ok()
}

impl Kubelet {
    /// Sets up a kubelet for `node` of lab `paths`.
    pub fn new(paths: LabPaths, node_name: &str, client: Client) -> Result<Self, LabError> {
        let layout = Layout::load(&paths)?;
        let node = layout.node(node_name)?.clone();
        let exe = std::env::current_exe().map_err(|e| LabError::io("/proc/self/exe".into(), e))?;
        Ok(Kubelet {
            paths,
            layout,
            node,
            exe,
            client,
            sandboxes: HashMap::new(),
            expiring: BTreeSet::new(),
        })
    }

    fn state_dir(&self) -> PathBuf {
        self.paths.node_dir(&self.node.name).join("pods")
    }

    /// The pod's resolv.conf, as the kubelet writes it for dnsPolicy ClusterFirst: the
    /// node-local DNS server, the namespace's search path and ndots:5.
    fn write_resolv_conf(&self, uid: &str, ns: &str) -> Result<(), LabError> {
        let f = resolv_conf_path(&self.paths, &self.node.name, uid);
        std::fs::create_dir_all(self.state_dir()).map_err(|e| LabError::io(self.state_dir(), e))?;
        std::fs::write(&f, resolv_conf(ns)).map_err(|e| LabError::io(f.clone(), e))
    }

    fn cgroup_dir(&self) -> PathBuf {
        self.paths.cgroup_dir().join(&self.node.name)
    }

    fn save(&self, sb: &Sandbox) -> Result<(), LabError> {
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(dir.clone(), e))?;
        let f = dir.join(format!("{}.json", sb.uid));
        std::fs::write(&f, serde_json::to_vec_pretty(sb).expect("json"))
            .map_err(|e| LabError::io(f, e))
    }

    /// Adopts sandboxes a previous kubelet left running; removes broken ones.
    fn load_sandboxes(&mut self) {
        for e in std::fs::read_dir(self.state_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let Ok(sb) = serde_json::from_str::<Sandbox>(&text) else {
                continue;
            };
            if sys::alive(sb.pid) && crate::paths::netns_path(&sb.netns).exists() {
                self.sandboxes.insert(sb.uid.clone(), sb);
            } else {
                tracing::info!(pod = %format!("{}/{}", sb.namespace, sb.name), "removing a sandbox that did not survive");
                self.destroy(&sb);
            }
        }
    }

    /// Registers (or refreshes) this node's Node object.
    async fn register(&self) -> Result<(), LabError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let now = weir_model::now_rfc3339();
        let n = &self.node;
        let obj = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": {
                "kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": std::env::consts::ARCH,
                "weir.dev/lab": self.layout.name.replace('/', ".")}},
            "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr, n.pod_cidr6]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": n.ip.to_string()}, {"type": "InternalIP", "address": n.ip6.to_string()}, {"type": "Hostname", "address": n.name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "weir lab kubelet is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "nodeInfo": {"kubeletVersion": format!("v1.32.0-weir-{}", env!("CARGO_PKG_VERSION")), "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
                             "containerRuntimeVersion": "weir-lab://netns", "kernelVersion": "", "osImage": "weir lab", "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""}
            }
        });
        let node: Node = serde_json::from_value(obj.clone()).expect("node");
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                api.patch_status(
                    &n.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": obj["status"]})),
                )
                .await
                .map_err(|e| LabError::Kube(format!("updating node {}: {e}", n.name)))?;
                Ok(())
            }
            Err(e) => Err(LabError::Kube(format!("registering node {}: {e}", n.name))),
        }
    }

    /// The node's CNI runtime settings.
    fn cni(&self) -> cni::Runtime {
        cni::Runtime {
            conf_dir: self.paths.cni_conf_dir(&self.node.name),
            bin_dir: self.paths.cni_bin_dir(),
            node_netns: crate::paths::netns_path(&self.node.netns),
        }
    }

    /// The CNI attachment of a sandbox: the pod's uid is its container ID, `eth0` its
    /// interface.
    fn attachment<'a>(sb: &'a Sandbox, netns: &'a Path) -> cni::Attachment<'a> {
        cni::Attachment {
            container_id: &sb.uid,
            netns,
            ifname: "eth0",
            pod: (&sb.namespace, &sb.name, &sb.uid),
        }
    }

    /// Creates the pod's network namespace and has the CNI plugins wire it.
    fn wire(&self, sb: &mut Sandbox) -> Result<(), LabError> {
        let _ = sys::ip(&["netns", "del", &sb.netns]);
        sys::ip(&["netns", "add", &sb.netns])?;
        net::pod_sysctls(&sb.netns)?;
        let netns = crate::paths::netns_path(&sb.netns);
        let result = self.cni().add(&Self::attachment(sb, &netns))?;
        let (ips, host_if) = cni::parse_result(&result);
        sb.ips = ips;
        sb.host_if = host_if.unwrap_or_default();
        sb.cni_result = result;
        Ok(())
    }

    /// Builds the sandbox of `pod`: namespace, veth, addresses, cgroup and the echo process.
    fn create_sandbox(&self, pod: &Pod) -> Result<Sandbox, LabError> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let id = uid8(&uid);
        let mut sb = Sandbox {
            uid: uid.clone(),
            namespace: ns.clone(),
            name: name.clone(),
            netns: self.paths.netns(&format!("pod-{id}")),
            host_if: String::new(),
            ips: Vec::new(),
            pid: 0,
            cgroup: self.cgroup_dir().join(format!("pod-{id}")),
            started: weir_model::now_rfc3339(),
            cni_result: Value::Null,
        };
        let spawned = (|| {
            self.write_resolv_conf(&uid, &ns)?;
            self.wire(&mut sb)?;
            std::fs::create_dir_all(&sb.cgroup).map_err(|e| LabError::io(sb.cgroup.clone(), e))?;
            let logs = self.paths.node_dir(&self.node.name).join("logs");
            std::fs::create_dir_all(&logs).map_err(|e| LabError::io(logs.clone(), e))?;
            let ready = self.state_dir().join(format!("{uid}.ready"));
            let _ = std::fs::remove_file(&ready);
            std::fs::create_dir_all(self.state_dir())
                .map_err(|e| LabError::io(self.state_dir(), e))?;
            let log = std::fs::File::create(logs.join(format!("{ns}_{name}.log")))
                .map_err(|e| LabError::io(logs.clone(), e))?;
            let mut cmd = std::process::Command::new(&self.exe);
            cmd.args(["lab", "sandbox", "--cluster", &self.paths.name, "--netns"])
                .arg(crate::paths::netns_path(&sb.netns))
                .arg("--cgroup")
                .arg(&sb.cgroup)
                .args(["--identity", &pod_identity(&self.paths, &ns, &name)])
                .arg("--ready-file")
                .arg(&ready);
            for p in pod_ports(pod) {
                cmd.args(["--port", &p.to_string()]);
            }
            use std::os::unix::process::CommandExt;
            cmd.process_group(0)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().map_err(|e| LabError::io(logs.clone(), e))?)
                .stderr(log);
            let mut child = cmd
                .spawn()
                .map_err(|e| LabError::Command("lab sandbox".into(), e.to_string()))?;
            let pid = child.id() as i32;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !ready.exists() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(LabError::Command(
                        format!("sandbox of pod {ns}/{name}"),
                        format!(
                            "exited with {status}; see {}",
                            logs.join(format!("{ns}_{name}.log")).display()
                        ),
                    ));
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    return Err(LabError::Command(
                        format!("sandbox of pod {ns}/{name}"),
                        "did not become ready in 20 s".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // Reap the process whenever it ends.
            std::thread::spawn(move || child.wait());
            Ok(pid)
        })();
        match spawned {
            Ok(pid) => {
                let sb = Sandbox { pid, ..sb };
                self.save(&sb)?;
                Ok(sb)
            }
            Err(e) => {
                self.destroy(&sb);
                Err(e)
            }
        }
    }

    /// Stops the sandbox process and removes the namespace, cgroup and state.
    fn destroy(&self, sb: &Sandbox) {
        if sb.pid > 0 {
            sys::kill_all(&[sb.pid], Duration::from_secs(1));
        }
        let rest = sys::pids_in_cgroup_tree(&sb.cgroup);
        if !rest.is_empty() {
            sys::kill_all(&rest, Duration::from_millis(500));
        }
        let stragglers = sys::pids_in_netns(&sb.netns);
        if !stragglers.is_empty() {
            sys::kill_all(&stragglers, Duration::from_millis(500));
        }
        // CNI DEL (the agent forgets the endpoint, the addresses are released, the veth goes),
        // also after a failed or partial ADD, then the namespace.
        let netns = crate::paths::netns_path(&sb.netns);
        let result = (!sb.cni_result.is_null()).then_some(&sb.cni_result);
        if let Err(e) = self.cni().del(&Self::attachment(sb, &netns), result) {
            tracing::warn!(pod = %format!("{}/{}", sb.namespace, sb.name), error = %e, "CNI DEL");
        }
        let _ = sys::ip(&["netns", "del", &sb.netns]);
        let _ = sys::remove_cgroup_tree(&sb.cgroup);
        let _ = std::fs::remove_file(self.state_dir().join(format!("{}.json", sb.uid)));
        let _ = std::fs::remove_file(self.state_dir().join(format!("{}.ready", sb.uid)));
    }

    /// The status this kubelet reports for `pod` running in `sb`, and when (if ever) it must
    /// be looked at again because a readiness delay ends.
    fn status_for(pod: &Pod, sb: &Sandbox, node: &NodeLayout) -> (Value, Option<Duration>) {
        let now = jiff::Timestamp::now();
        let started = parse_time(&sb.started).unwrap_or(now);
        let current = pod.status.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let mut recheck: Option<Duration> = None;
        let mut statuses = Vec::new();
        let mut all_ready = true;
        for c in &spec.containers {
            let delay = c
                .readiness_probe
                .as_ref()
                .and_then(|p| p.initial_delay_seconds)
                .unwrap_or(0)
                .max(0) as i64;
            let ready_at = started + jiff::SignedDuration::from_secs(delay);
            let ready = now >= ready_at;
            if !ready {
                let wait = ready_at.duration_since(now).as_secs().max(0) as u64 + 1;
                recheck = Some(recheck.map_or(Duration::from_secs(wait), |r| {
                    r.min(Duration::from_secs(wait))
                }));
            }
            all_ready &= ready;
            statuses.push(json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "containerID": format!("weir://{}/{}", uid8(&sb.uid), c.name),
                "ready": ready, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": sb.started}}
            }));
        }
        let gates_ok = spec.readiness_gates.iter().flatten().all(|g| {
            current
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == g.condition_type && c.status == "True")
        });
        let ready = all_ready && gates_ok;
        let own = [
            "PodScheduled",
            "Initialized",
            "ContainersReady",
            "Ready",
            "PodReadyToStartContainers",
        ];
        let cond = |t: &str, ok: bool| {
            let status = if ok { "True" } else { "False" };
            let since = current
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == t && c.status == status)
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| serde_json::to_value(t).expect("time"))
                .unwrap_or_else(|| json!(weir_model::now_rfc3339()));
            json!({"type": t, "status": status, "lastTransitionTime": since})
        };
        let mut conditions = vec![
            cond("PodReadyToStartContainers", true),
            cond("Initialized", true),
            cond("Ready", ready),
            cond("ContainersReady", all_ready),
            cond("PodScheduled", true),
        ];
        for c in current
            .conditions
            .iter()
            .flatten()
            .filter(|c| !own.contains(&c.type_.as_str()))
        {
            conditions.push(serde_json::to_value(c).expect("condition"));
        }
        let ips: Vec<Value> = sb
            .ips
            .iter()
            .map(|i| json!({"ip": i.to_string()}))
            .collect();
        let status = json!({
            "phase": "Running",
            "conditions": conditions,
            "hostIP": node.ip.to_string(),
            "hostIPs": [{"ip": node.ip.to_string()}, {"ip": node.ip6.to_string()}],
            "podIP": sb.ips.first().map(|i| i.to_string()),
            "podIPs": ips,
            "startTime": sb.started,
            "containerStatuses": statuses,
            "qosClass": "BestEffort",
        });
        (status, recheck)
    }

    async fn report(&self, pod: &Pod, tx: &mpsc::UnboundedSender<Msg>) -> Result<(), LabError> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Some(sb) = self.sandboxes.get(&uid) else {
            return Ok(());
        };
        let (status, recheck) = Self::status_for(pod, sb, &self.node);
        if let Some(after) = recheck {
            let tx = tx.clone();
            let uid = uid.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(Msg::Recheck(uid));
            });
        }
        let current = serde_json::to_value(pod.status.clone().unwrap_or_default()).expect("status");
        if same_status(&current, &status) {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &sb.namespace);
        match api
            .patch_status(
                &sb.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(LabError::Kube(format!(
                "updating status of pod {}/{}: {e}",
                sb.namespace, sb.name
            ))),
        }
    }

    async fn confirm_deleted(&self, ns: &str, name: &str, uid: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "confirming deletion")
            }
        }
    }

    async fn on_pod(&mut self, pod: Pod, tx: &mpsc::UnboundedSender<Msg>) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(ts) = &pod.metadata.deletion_timestamp {
            if !self.sandboxes.contains_key(&uid) {
                self.confirm_deleted(&ns, &name, &uid).await;
                return;
            }
            if self.expiring.insert(uid.clone()) {
                let at: jiff::Timestamp =
                    serde_json::from_value(serde_json::to_value(ts).expect("time"))
                        .unwrap_or_else(|_| jiff::Timestamp::now());
                let wait = at.duration_since(jiff::Timestamp::now()).as_millis().max(0) as u64;
                tracing::info!(pod = %format!("{ns}/{name}"), grace_ms = wait, "pod deleted; serving until its grace period ends");
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    let _ = tx.send(Msg::Expire(uid));
                });
            }
            // Status keeps being reported while terminating (readiness gates may change).
            if let Err(e) = self.report(&pod, tx).await {
                tracing::warn!(error = %e, "report");
            }
            return;
        }
        if !self.sandboxes.contains_key(&uid) {
            let started = std::time::Instant::now();
            let me = &*self;
            let p = pod.clone();
            let result = tokio::task::block_in_place(|| me.create_sandbox(&p));
            match result {
                Ok(sb) => {
                    tracing::info!(pod = %format!("{ns}/{name}"), ips = ?sb.ips, ms = started.elapsed().as_millis() as u64, "sandbox ready");
                    self.sandboxes.insert(uid.clone(), sb);
                }
                Err(e) => {
                    tracing::error!(pod = %format!("{ns}/{name}"), error = %e, "creating sandbox");
                    let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                    let _ = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Pending", "conditions": [{"type": "PodReadyToStartContainers", "status": "False", "reason": "SandboxFailed", "message": e.to_string()}]}})))
                        .await;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        let _ = tx.send(Msg::Recheck(uid));
                    });
                    return;
                }
            }
        }
        if let Err(e) = self.report(&pod, tx).await {
            tracing::warn!(error = %e, "report");
        }
    }

    fn teardown(&mut self, uid: &str) -> Option<Sandbox> {
        let sb = self.sandboxes.remove(uid)?;
        tokio::task::block_in_place(|| self.destroy(&sb));
        tracing::info!(pod = %format!("{}/{}", sb.namespace, sb.name), "sandbox removed");
        Some(sb)
    }

    /// Runs the kubelet until the process is stopped.
    pub async fn run(mut self) -> Result<(), LabError> {
        let cg = self.cgroup_dir();
        std::fs::create_dir_all(&cg).map_err(|e| LabError::io(cg.clone(), e))?;
        self.load_sandboxes();
        let mut backoff = Duration::from_millis(200);
        while let Err(e) = self.register().await {
            tracing::warn!(error = %e, "registering node; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        let api: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node.name));
        let mut stream = watcher::watcher(api.clone(), cfg).boxed();
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let mut pods: HashMap<String, Pod> = HashMap::new();
        let mut init: Option<HashMap<String, Pod>> = None;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(20));
        loop {
            tokio::select! {
                ev = stream.next() => {
                    let Some(ev) = ev else { return Ok(()) };
                    match ev {
                        Ok(watcher::Event::Init) => init = Some(HashMap::new()),
                        Ok(watcher::Event::InitApply(p)) => {
                            if let Some(m) = init.as_mut() {
                                m.insert(p.metadata.uid.clone().unwrap_or_default(), p);
                            }
                        }
                        Ok(watcher::Event::InitDone) => {
                            pods = init.take().unwrap_or_default();
                            let gone: Vec<String> = self.sandboxes.keys().filter(|u| !pods.contains_key(*u)).cloned().collect();
                            for u in gone {
                                self.teardown(&u);
                            }
                            let all: Vec<Pod> = pods.values().cloned().collect();
                            for p in all {
                                self.on_pod(p, &tx).await;
                            }
                        }
                        Ok(watcher::Event::Apply(p)) => {
                            pods.insert(p.metadata.uid.clone().unwrap_or_default(), p.clone());
                            self.on_pod(p, &tx).await;
                        }
                        Ok(watcher::Event::Delete(p)) => {
                            let uid = p.metadata.uid.clone().unwrap_or_default();
                            pods.remove(&uid);
                            self.expiring.remove(&uid);
                            self.teardown(&uid);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watching pods");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                Some(msg) = rx.recv() => match msg {
                    Msg::Recheck(uid) => {
                        if let Some(p) = pods.get(&uid).cloned() {
                            self.on_pod(p, &tx).await;
                        }
                    }
                    Msg::Expire(uid) => {
                        self.expiring.remove(&uid);
                        if let Some(sb) = self.teardown(&uid) {
                            self.confirm_deleted(&sb.namespace, &sb.name, &uid).await;
                        }
                    }
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = self.register().await {
                        tracing::warn!(error = %e, "node heartbeat");
                    }
                }
            }
        }
    }
}

/// Whether two statuses agree on everything the kubelet reports (ignoring heartbeat-like
/// fields the server may normalise).
fn same_status(current: &Value, want: &Value) -> bool {
    let Some(w) = want.as_object() else {
        return false;
    };
    w.iter().all(|(k, v)| current.get(k) == Some(v))
}

/// The entry point of a pod sandbox process: enters the pod's cgroup and network namespace,
/// serves the echo server and marks readiness by creating `ready_file`.
pub fn sandbox_enter(netns: &Path, cgroup: &Path) -> Result<(), LabError> {
    sys::enter_cgroup(cgroup)?;
    sys::enter_netns(netns)
}

/// How a pod's echo server names itself: `namespace/name`, or in a clusterset's cluster
/// `cK/namespace/name` (the same pod name in two clusters answers as two pods).
pub fn pod_identity(paths: &crate::paths::LabPaths, ns: &str, name: &str) -> String {
    match paths.name.split_once('/') {
        Some((_, cluster)) => format!("{cluster}/{ns}/{name}"),
        None => format!("{ns}/{name}"),
    }
}

/// Where the kubelet of `node` keeps pod `uid`'s resolv.conf.
pub fn resolv_conf_path(paths: &crate::paths::LabPaths, node: &str, uid: &str) -> PathBuf {
    paths
        .node_dir(node)
        .join("pods")
        .join(format!("{uid}.resolv.conf"))
}

/// A resolv.conf for a pod (or node) of namespace `ns` (kubelet's ClusterFirst policy).
pub fn resolv_conf(ns: &str) -> String {
    format!(
        "nameserver {}\nsearch {ns}.svc.{zone} svc.{zone} {zone}\noptions ndots:5\n",
        crate::dns::NODE_LOCAL_DNS,
        zone = crate::dns::CLUSTER_ZONE
    )
}
