//! `weir ui` in a real browser: Playwright (npm's playwright-core, run by Node.js from ui/)
//! drives Debian's Chromium headless against a lab with traffic and a denying
//! NetworkPolicy: the map shows the workloads, the denied edge is marked, and clicking it
//! lists its drops with the reason and the policy's name.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: vault, namespace: shop, labels: {app: vault}}
spec: {nodeName: node-1, containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: vault-closed, namespace: shop}
spec: {podSelector: {matchLabels: {app: vault}}, policyTypes: [Ingress]}
"#;

#[test]
fn the_map_shows_workloads_and_marks_the_denied_edge() {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui");
    assert!(
        ui.join("node_modules/playwright-core").is_dir(),
        "ui/node_modules is missing: `make setup` installs it (npm ci in ui/)"
    );
    let lab = Lab::up("ui", 2, APP);
    // The page is up first: it shows traffic as it comes.
    let mut server = lab
        .weir(&["ui", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _server = Daemon::from(server);
    let url = first
        .trim()
        .strip_prefix("weir ui: ")
        .unwrap_or_else(|| panic!("no URL in {first:?}"))
        .to_string();
    let vault = lab.get_json(&["pod", "vault", "-n", "shop"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    lab.eventually("the policies in force", Duration::from_secs(20), || {
        lab.connect("shop/client", "web.shop:80", "tcp", 3)["ok"] == 3
            && lab.connect("shop/client", &format!("{vault}:8080"), "tcp", 1)["ok"] == 0
    });
    // TCP health: the agent watches a pod's sockets from its first round after the pod
    // started; connect until both edges have some.
    lab.eventually("TCP health on both edges", Duration::from_secs(30), || {
        lab.connect("shop/client", "web.shop:80", "tcp", 1);
        lab.connect("shop/client", &format!("{vault}:8080"), "tcp", 1);
        let out = lab
            .weir(&["observe", "-t", "tcp-health", "-o", "json", "--last", "500"])
            .output()
            .unwrap();
        let recs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let seen = |pod: &str, field: &str| {
            recs.iter().any(|r| {
                r["destination"]["pod"] == pod && r["tcp"][field].as_u64().unwrap_or(0) > 0
            })
        };
        seen("shop/web", "connects") && seen("shop/vault", "connect_failures")
    });
    let expect = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        expect.path(),
        serde_json::json!({
            "workloads": ["shop/web", "shop/vault", "shop/client"],
            "denied": ["shop/client", "shop/vault"],
            "reason": "DROP_POLICY_DENIED",
            "policy": "shop/vault-closed",
            "connected": ["shop/client", "shop/web"],
            "service": ["shop/web", "shop/web"],
        })
        .to_string(),
    )
    .unwrap();
    let shot = std::env::temp_dir().join(format!("weir-ui-{}.png", std::process::id()));
    let out = Command::new("node")
        .current_dir(&ui)
        .args(["tests/map.mjs", &url])
        .arg(expect.path())
        .arg(&shot)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let seen: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|_| panic!("{text}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(seen["ok"], true, "{seen}");
    assert!(seen["rows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r.as_str().unwrap().contains("shop/client")));
    // The allowed edge is there too, not marked.
    assert!(seen["workloads"].as_array().unwrap().len() >= 3, "{seen}");
    if let Ok(dir) = std::env::var("WEIR_UI_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("ui-map.png")).unwrap();
    }
    let _ = std::fs::remove_file(&shot);
}

/// The map's model without a browser (`ui/tests/model.mjs`): in a clusterset the same
/// namespace of two clusters is two groups; in one cluster, groups are namespaces.
#[test]
fn the_model_keeps_the_namespaces_of_a_clustersets_clusters_apart() {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui");
    let out = Command::new("node")
        .current_dir(&ui)
        .arg("tests/model.mjs")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
