//! Agent restarts under load: every node's agent killed and started again 20 times in a row
//! (SIGKILL and SIGTERM in turn) while clients keep opening ClusterIP (TCP and UDP) and
//! NodePort connections and hold long ones, with a NetworkPolicy in force. The pinned
//! programs and maps carry the traffic while no agent runs, and each new agent takes them
//! over without changing them: no new connection fails, no held one breaks, and the datapath
//! is the same before and after.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn manifest() -> String {
    let pod = |name: &str, node: &str, labels: &str| {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: r, labels: {{{labels}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: echo\n    ports:\n    - {{containerPort: 8080}}\n    - {{containerPort: 5353, protocol: UDP}}\n")
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: r}}\n{}{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: r}}\nspec:\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: r}}\nspec:\n  type: NodePort\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: r}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{role: client}}}}\n    - ipBlock: {{cidr: 172.30.0.0/16}}\n",
        pod("web-1", "node-1", "app: web"),
        pod("web-2", "node-2", "app: web"),
        pod("client", "node-1", "role: client"),
    )
}

/// What a node's datapath holds, without counters and timers: Service frontends with their
/// ids and backend slots, and the endpoint map.
fn datapath(lab: &Lab, node: &str) -> (Value, Value) {
    let lb: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["bpf", "lb", "list", "--node", node, "-o", "json"])
    ))
    .unwrap();
    let eps: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["bpf", "endpoint", "list", "--node", node, "-o", "json"])
    ))
    .unwrap();
    (lb["frontends"].clone(), eps)
}

/// Every lab agent process's pids.
fn agent_pids(lab: &Lab) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-f", "--", &format!("lab agent --cluster {} ", lab.name)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Stops every agent of the lab with `signal` and waits until they are gone.
fn stop_agents(lab: &Lab, signal: &str) {
    for p in agent_pids(lab) {
        let _ = Command::new("kill").args([signal, &p]).status();
    }
    lab.eventually("the agents exited", Duration::from_secs(10), || {
        agent_pids(lab).is_empty()
    });
}

/// GET /readyz beside `metrics_url` is 200.
fn ready(metrics_url: &str) -> bool {
    let url = metrics_url.replace("/metrics", "/readyz");
    http_get(&url, Duration::from_secs(2)).is_ok_and(|(code, _)| code == 200)
}

/// Opens connections in a loop until `stop`; returns (attempts, failures, a failed summary).
fn keep_connecting(
    lab: &Lab,
    from: &str,
    to: String,
    proto: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64, Vec<Value>)> {
    let mut cmd = lab.weir(&[
        "lab",
        "connect",
        "--from",
        from,
        "--to",
        &to,
        "--protocol",
        proto,
        "--count",
        "10",
        "--timeout",
        "2s",
        "-o",
        "json",
    ]);
    let mut bad = Vec::new();
    std::thread::spawn(move || {
        let (mut attempts, mut failed) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let r: Value = serde_json::from_str(&ok(&mut cmd)).unwrap();
            attempts += r["attempts"].as_u64().unwrap();
            let f = r["failed"].as_u64().unwrap();
            failed += f;
            if f > 0 {
                bad.push(r);
            }
        }
        (attempts, failed, bad)
    })
}

#[test]
fn twenty_agent_restarts_under_load_break_nothing() {
    let lab = Lab::up("rst", 2, &manifest());
    let nodes: Value =
        serde_json::from_str(&ok(&mut lab.weir(&["lab", "nodes", "-o", "json"]))).unwrap();
    let urls: Vec<(String, String)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "node")
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["metricsURL"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let node_port = lab.get_json(&["svc", "np", "-n", "r"])["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap();
    let np = format!("{}:{node_port}", lab.node_ip("node-1"));
    // Everything answers before the restarts start (and the policy admits the clients).
    for (to, proto) in [("web.r:80", "tcp"), ("web.r:53", "udp")] {
        let r = lab.connect("r/client", to, proto, 10);
        assert_eq!(r["ok"], 10, "{r}");
    }
    assert_eq!(lab.connect("external", &np, "tcp", 10)["ok"], 10);
    let before: Vec<_> = ["node-1", "node-2"]
        .iter()
        .map(|n| datapath(&lab, n))
        .collect();
    let counters = |lab: &Lab| -> Vec<String> {
        ["node-1", "node-2"]
            .iter()
            .map(|n| ok(&mut lab.weir(&["bpf", "metrics", "list", "--node", n])))
            .collect()
    };
    let counters_before = counters(&lab);

    // Long connections, and new ones all along.
    let holds = [
        lab.hold("r/client", "web.r:80", "tcp", "60s"),
        lab.hold("r/client", "web.r:53", "udp", "60s"),
        lab.hold("external", &np, "tcp", "60s"),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        keep_connecting(&lab, "r/client", "web.r:80".into(), "tcp", stop.clone()),
        keep_connecting(&lab, "r/client", "web.r:53".into(), "udp", stop.clone()),
        keep_connecting(&lab, "external", np.clone(), "tcp", stop.clone()),
    ];
    let started = Instant::now();
    let mut agents: Vec<Daemon> = Vec::new();
    for i in 0..20 {
        let signal = if i % 2 == 0 { "-KILL" } else { "-TERM" };
        stop_agents(&lab, signal);
        agents.clear();
        for (node, _) in &urls {
            agents.push(lab.restart_agent(node));
        }
        for (node, url) in &urls {
            lab.eventually(
                &format!("restart {i}: {node}'s agent ready"),
                Duration::from_secs(20),
                || ready(url),
            );
        }
    }
    let restarts_took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in loads {
        let (attempts, failed, bad) = h.join().unwrap();
        assert_eq!(
            failed,
            0,
            "new connections failed during the restarts: {bad:?}\ncounters before: {}\nafter: {}",
            counters_before.join("\n"),
            counters(&lab).join("\n")
        );
        total += attempts;
    }
    for h in holds {
        let r = h.join().unwrap();
        assert_eq!(r["failed"], 0, "a held connection lost messages: {r}");
        assert_eq!(r["reconnects"], 0, "a held connection broke: {r}");
    }
    eprintln!(
        "20 restarts of both agents in {restarts_took:?}; {total} new connections, none failed"
    );
    let after: Vec<_> = ["node-1", "node-2"]
        .iter()
        .map(|n| datapath(&lab, n))
        .collect();
    assert_eq!(before, after, "the datapath is the same after the restarts");
}
