//! Helpers for end-to-end tests: labs with unique names torn down by a guard.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The weir binary under test.
pub fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

/// Runs a command and returns its output, printing it on failure.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    if !out.status.success() {
        eprintln!(
            "command {cmd:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "command failed: {cmd:?}");
    String::from_utf8(out.stdout).expect("utf8")
}

/// Runs `cmd` with `input` on its standard input; its output.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// GET `url` (`http://HOST:PORT/PATH`) over HTTP/1.0, waiting at most `timeout` for the
/// answer: its status code and body.
pub fn http_get(url: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {head:?}")))?;
    Ok((code, body.to_string()))
}

/// A unique lab name for this test process.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100000);
    assert!(name.len() <= 20, "lab name {name} too long");
    name
}

/// Requires root: the tests build real namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (they create network namespaces)"
    );
}

/// A private mount namespace held open by a sleeping process (killed when dropped), in which
/// a test runs commands as on a fresh machine: /sys/fs/bpf and /run/netns start unmounted
/// there, and nothing mounted inside is seen by the host.
pub struct MountNs {
    holder: std::process::Child,
}

impl MountNs {
    /// A new private mount namespace with /sys/fs/bpf and /run/netns unmounted in it.
    pub fn fresh() -> MountNs {
        require_root();
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sleep", "3600"])
            .spawn()
            .expect("unshare");
        let ns = MountNs { holder };
        let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(ns.path()).ok().as_ref() == Some(&own) {
            assert!(
                Instant::now() < deadline,
                "unshare did not make a mount namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ok(ns
            .command("sh")
            .args(["-c", "for d in /sys/fs/bpf /run/netns; do while grep -q \" $d \" /proc/self/mounts; do umount -l $d || exit 1; done; done"]));
        ns
    }

    /// The namespace's /proc path.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder.id()))
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// The filesystem types mounted at `path` inside the namespace, in mount order.
    pub fn mounts_at(&self, path: &str) -> Vec<String> {
        ok(self.command("cat").arg("/proc/self/mounts"))
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&path)).then(|| f[2].to_string())
            })
            .collect()
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A running lab, removed when dropped.
pub struct Lab {
    /// Its name.
    pub name: String,
    /// Its kubeconfig.
    pub kubeconfig: PathBuf,
    /// The mount namespace its processes run in, when not the test's own.
    pub mntns: Option<MountNs>,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// Brings up a lab with `nodes` nodes and the given manifest.
    pub fn up(prefix: &str, nodes: u8, manifest: &str) -> Lab {
        Lab::up_with(prefix, nodes, manifest, &[])
    }

    /// Brings up a lab with extra `weir lab up` arguments.
    pub fn up_with(prefix: &str, nodes: u8, manifest: &str, extra: &[&str]) -> Lab {
        Lab::up_in(None, prefix, nodes, manifest, extra)
    }

    /// Brings up a lab whose commands all run in `mntns` (when given).
    pub fn up_in(
        mntns: Option<MountNs>,
        prefix: &str,
        nodes: u8,
        manifest: &str,
        extra: &[&str],
    ) -> Lab {
        require_root();
        let name = unique_name(prefix);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("manifest.yaml");
        std::fs::write(&f, manifest).unwrap();
        let mut cmd = match &mntns {
            Some(ns) => ns.command(env!("CARGO_BIN_EXE_weir")),
            None => weir(),
        };
        cmd.args(["lab", "up", "--name", &name, "--nodes", &nodes.to_string()]);
        if !manifest.trim().is_empty() {
            cmd.arg("-f").arg(&f);
        }
        cmd.args(extra);
        let out = run(&mut cmd);
        let lab = Lab {
            name: name.clone(),
            kubeconfig: PathBuf::from(format!("/run/weir/labs/{name}/kubeconfig")),
            mntns,
            _dir: dir,
        };
        assert!(out.status.success(), "lab up failed");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            lab.kubeconfig.display().to_string()
        );
        lab
    }

    /// `weir` (in the lab's mount namespace).
    pub fn weir_bin(&self) -> Command {
        match &self.mntns {
            Some(ns) => ns.command(env!("CARGO_BIN_EXE_weir")),
            None => weir(),
        }
    }

    /// `weir --cluster NAME ARGS...`
    pub fn weir(&self, args: &[&str]) -> Command {
        let mut c = self.weir_bin();
        c.args(["--cluster", &self.name]).args(args);
        c
    }

    /// `kubectl --kubeconfig ... ARGS...`
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }

    /// Applies a manifest with `weir apply -f -`.
    pub fn apply(&self, manifest: &str) -> Output {
        output_with_stdin(&mut self.weir(&["apply", "-f", "-"]), manifest.as_bytes())
    }

    /// `weir get ... -o json` parsed.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&ok(&mut self.weir(&a))).unwrap()
    }

    /// `weir lab connect ... -o json` parsed.
    pub fn connect(&self, from: &str, to: &str, proto: &str, count: usize) -> Value {
        let count = count.to_string();
        self.connect_with(from, to, &["--protocol", proto, "--count", &count])
    }

    /// `weir lab connect --from FROM --to TO EXTRA... -o json` parsed.
    pub fn connect_with(&self, from: &str, to: &str, extra: &[&str]) -> Value {
        let mut args = vec!["lab", "connect", "--from", from, "--to", to];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&ok(&mut self.weir(&args))).unwrap()
    }

    /// `weir lab probe ... -o json` parsed.
    pub fn probe(&self, port: u16, proto: &str, via: &str) -> Value {
        serde_json::from_str(&ok(&mut self.weir(&[
            "lab",
            "probe",
            "--port",
            &port.to_string(),
            "--protocol",
            proto,
            "--via",
            via,
            "-o",
            "json",
        ])))
        .unwrap()
    }

    /// `weir lab connect --hold DURATION -o json` in the background (one connection kept,
    /// exchanging a message every 100 ms); join the handle for its summary.
    pub fn hold(
        &self,
        from: &str,
        to: &str,
        proto: &str,
        duration: &str,
    ) -> std::thread::JoinHandle<Value> {
        let mut cmd = self.weir(&[
            "lab",
            "connect",
            "--from",
            from,
            "--to",
            to,
            "--protocol",
            proto,
            "--hold",
            duration,
            "-o",
            "json",
        ]);
        std::thread::spawn(move || serde_json::from_str(&ok(&mut cmd)).unwrap())
    }

    /// A node's fabric IPv4 address, as `weir lab nodes` gives it.
    pub fn node_ip(&self, node: &str) -> String {
        self.node_field(node, "ip")
    }

    /// A node's (or the external host's) fabric IPv6 address, as `weir lab nodes` gives it.
    pub fn node_ip6(&self, node: &str) -> String {
        self.node_field(node, "ip6")
    }

    fn node_field(&self, node: &str, field: &str) -> String {
        let nodes: Value =
            serde_json::from_str(&ok(&mut self.weir(&["lab", "nodes", "-o", "json"]))).unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .unwrap_or_else(|| panic!("no node {node} in {nodes}"))[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} for {node} in {nodes}"))
            .to_string()
    }

    /// Waits until `f` holds, failing with `what` after `timeout`.
    pub fn eventually(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for: {what}");
    }
}

/// A process started by a test, killed when dropped.
pub struct Daemon(std::process::Child);

impl From<std::process::Child> for Daemon {
    fn from(c: std::process::Child) -> Self {
        Daemon(c)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Lab {
    /// Starts `weir lab agent` for `node` again (after a test killed it), logging to the lab's
    /// logs/agent-NODE-restart.log.
    pub fn restart_agent(&self, node: &str) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!(
                "/run/weir/labs/{}/logs/agent-{node}-restart.log",
                self.name
            ))
            .unwrap();
        Daemon(
            self.weir_bin()
                .args(["lab", "agent", "--cluster", &self.name, "--node", node])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// Starts `weir lab apiserver EXTRA...` again (after a test killed it), logging to the
    /// lab's logs/apiserver-restart.log, and waits until it answers.
    pub fn restart_apiserver(&self, extra: &[&str]) -> Daemon {
        let log = std::fs::File::create(format!(
            "/run/weir/labs/{}/logs/apiserver-restart.log",
            self.name
        ))
        .unwrap();
        let api = Daemon(
            self.weir_bin()
                .args(["lab", "apiserver", "--cluster", &self.name])
                .args(extra)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        self.eventually("API server back", Duration::from_secs(10), || {
            run(&mut self.weir(&["get", "ns"])).status.success()
        });
        api
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self
            .weir_bin()
            .args(["lab", "down", "--name", &self.name])
            .output();
    }
}

/// SIGKILLs every process whose command line matches `pattern` (pgrep -f); at least one must.
pub fn kill9_matching(pattern: &str) {
    let pids = ok(Command::new("pgrep").args(["-f", "--", pattern]));
    for p in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-9", p]).status();
    }
}

/// Every cell of a probe matrix is true.
pub fn all_reachable(m: &Value) -> bool {
    m["rows"].as_object().is_some_and(|rows| {
        !rows.is_empty()
            && rows
                .values()
                .all(|r| r.as_object().is_some_and(|c| c.values().all(|v| v == true)))
    })
}

/// A running clusterset of labs (`weir lab up --clusters N`), removed when dropped.
pub struct ClusterSet {
    /// Its name.
    pub name: String,
    /// Its clusters, `NAME/c1`..`NAME/cN` (removed with the clusterset, not one by one).
    pub clusters: Vec<Lab>,
    _dir: tempfile::TempDir,
}

impl ClusterSet {
    /// Brings up a clusterset of `clusters` clusters of `nodes` nodes each, `manifest` applied
    /// to every cluster, with extra `weir lab up` arguments.
    pub fn up(prefix: &str, clusters: u8, nodes: u8, manifest: &str, extra: &[&str]) -> ClusterSet {
        require_root();
        let name = unique_name(prefix);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("manifest.yaml");
        std::fs::write(&f, manifest).unwrap();
        let mut cmd = weir();
        cmd.args([
            "lab",
            "up",
            "--name",
            &name,
            "--clusters",
            &clusters.to_string(),
        ])
        .args(["--nodes", &nodes.to_string()]);
        if !manifest.trim().is_empty() {
            cmd.arg("-f").arg(&f);
        }
        cmd.args(extra);
        let out = run(&mut cmd);
        let set = ClusterSet {
            clusters: (1..=clusters)
                .map(|k| Lab {
                    name: format!("{name}/c{k}"),
                    kubeconfig: PathBuf::from(format!("/run/weir/labs/{name}/c{k}/kubeconfig")),
                    mntns: None,
                    _dir: tempfile::tempdir().unwrap(),
                })
                .collect(),
            name,
            _dir: dir,
        };
        assert!(out.status.success(), "clusterset up failed");
        let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect();
        let want: Vec<String> = set
            .clusters
            .iter()
            .map(|c| c.kubeconfig.display().to_string())
            .collect();
        assert_eq!(printed, want, "lab up prints every cluster's kubeconfig");
        set
    }

    /// Cluster `k` (1-based).
    pub fn c(&self, k: usize) -> &Lab {
        &self.clusters[k - 1]
    }

    /// `weir --cluster NAME ARGS...` for the clusterset itself.
    pub fn weir(&self, args: &[&str]) -> Command {
        let mut c = weir();
        c.args(["--cluster", &self.name]).args(args);
        c
    }
}

impl Drop for ClusterSet {
    fn drop(&mut self) {
        let _ = weir().args(["lab", "down", "--name", &self.name]).output();
    }
}

/// The network namespace of a lab node (its name under /run/netns).
pub fn node_netns(lab: &Lab, node: &str) -> String {
    let layout: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/weir/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    layout["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()["netns"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A pod for NodePort tests: labels app: np and pod: NAME, TCP 8080 and UDP 5353.
pub fn np_pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: np, pod: {name}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: echo\n    ports:\n    - {{containerPort: 8080}}\n    - {{containerPort: 5353, protocol: UDP}}\n"
    )
}

/// Namespace x, pod c on node-2 and a DSR NodePort Service `dsr` of it (http 80 -> 8080, dns
/// 53 -> 5353/UDP).
pub fn dsr_manifest() -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: dsr, namespace: x, annotations: {{weir.dev/lb-mode: dsr}}}}\nspec:\n  type: NodePort\n  selector: {{pod: c}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n",
        np_pod("c", "node-2"),
    )
}

/// A NodePort Service (http 80 -> 8080, dns 53 -> 5353/UDP) of namespace x.
pub fn np_service(name: &str, selector: &str, etp: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  type: NodePort\n  externalTrafficPolicy: {etp}\n  selector: {{{selector}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

/// The node port of Service x/SVC's port NAME.
pub fn node_port(lab: &Lab, svc: &str, name: &str) -> u64 {
    lab.get_json(&["svc", svc, "-n", "x"])["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()["nodePort"]
        .as_u64()
        .unwrap()
}

/// The client address the backend saw, asked over HTTP from the external host.
pub fn client_ip_seen(lab: &Lab, to: &str) -> String {
    let (host, port) = to.split_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port}; printf 'GET /clientip HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = ok(&mut lab.weir(&["lab", "exec", "external", "--", "bash", "-c", &script]));
    let body = out.rsplit("\r\n\r\n").next().unwrap().trim();
    body.rsplit_once(':').unwrap().0.to_string()
}

/// Node port `tcp` and `udp` of `node` (an address) answer 24 fresh TCP connections and 24
/// UDP exchanges from the external host, from exactly `backends` (`namespace/pod`, sorted).
pub fn assert_node_port_reaches(lab: &Lab, node: &str, (tcp, udp): (u64, u64), backends: &[&str]) {
    for (port, proto) in [(tcp, "tcp"), (udp, "udp")] {
        let r = lab.connect("external", &format!("{node}:{port}"), proto, 24);
        assert_eq!(r["ok"], 24, "{proto} via {node}: {r}");
        let who: Vec<&str> = r["responders"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(who, backends, "{proto} via {node}: {r}");
        if proto == "tcp" {
            assert_eq!(r["peers"][format!("{node}:{port}")], 24, "{r}");
        }
    }
}

/// Who answered a `lab connect` (`namespace/pod` names, sorted).
pub fn responder_names(r: &Value) -> Vec<String> {
    r["responders"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}
