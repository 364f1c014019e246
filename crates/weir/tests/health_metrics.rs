//! The agent's /healthz, /readyz and /metrics, scraped from the host at the `metricsURL`
//! that `weir lab nodes -o json` gives, as Prometheus and the kubelet's probes would.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::Value;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: m}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: m, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shut, namespace: m, labels: {app: shut}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: m}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: m}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: m}
spec: {podSelector: {matchLabels: {app: shut}}, policyTypes: [Ingress]}
"#;

/// GET `url`: status code and body.
fn get(url: &str) -> (u16, String) {
    http_get(url, Duration::from_secs(10)).unwrap()
}

/// Every sample of the exposition: (name, labels) -> value; and checks its shape: each
/// sample's family declared with TYPE and HELP, names prefixed, `# EOF` last.
fn parse(text: &str) -> BTreeMap<(String, String), f64> {
    let mut typed = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "exposition ends with # EOF");
    for l in &lines[..lines.len() - 1] {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            typed.insert(name.to_string(), ty.to_string());
        } else if let Some(rest) = l.strip_prefix("# HELP ") {
            helped.insert(rest.split_once(' ').unwrap().0.to_string());
        } else if !l.starts_with('#') {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n.to_string(), l.trim_end_matches('}').to_string()),
                None => (series.to_string(), String::new()),
            };
            assert!(
                name.starts_with("weir_") || name.starts_with("process_"),
                "metric {name} has the weir_ prefix"
            );
            let family = typed
                .keys()
                .filter(|f| name.starts_with(f.as_str()))
                .max_by_key(|f| f.len())
                .unwrap_or_else(|| panic!("{name} has no TYPE"));
            assert!(helped.contains(family), "{family} has no HELP");
            samples.insert((name, labels), value.parse().unwrap());
        }
    }
    samples
}

fn sum(samples: &BTreeMap<(String, String), f64>, name: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|((n, l), _)| n == name && l.contains(label))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn probes_and_prometheus_metrics_from_the_host() {
    let lab = Lab::up("metr", 1, APP);
    let nodes: Value =
        serde_json::from_str(&ok(&mut lab.weir(&["lab", "nodes", "-o", "json"]))).unwrap();
    let url = nodes[0]["metricsURL"].as_str().unwrap().to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/metrics"),
        "{url}"
    );
    let base = url.trim_end_matches("/metrics");
    assert_eq!(get(&format!("{base}/healthz")), (200, "ok\n".to_string()));
    assert_eq!(get(&format!("{base}/readyz")), (200, "ok\n".to_string()));
    assert_eq!(get(&format!("{base}/nope")).0, 404);

    // Traffic: allowed through the Service, denied by the policy.
    let r = lab.connect("m/client", "web.m:80", "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
    let shut = lab.get_json(&["pod", "shut", "-n", "m"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    let r = lab.connect("m/client", &format!("{shut}:8080"), "tcp", 2);
    assert_eq!(r["ok"], 0, "{r}");
    // A change to carry: the programming latency is measured from its trigger time.
    let (code, before) = get(&url);
    assert_eq!(code, 200);
    let before = parse(&before);
    ok(&mut lab.kubectl(&["label", "pod", "shut", "-n", "m", "app=web", "--overwrite"]));
    let mut after = BTreeMap::new();
    lab.eventually(
        "a network programming sample",
        Duration::from_secs(10),
        || {
            after = parse(&get(&url).1);
            sum(
                &after,
                "weir_network_programming_duration_seconds_count",
                "",
            ) > sum(
                &before,
                "weir_network_programming_duration_seconds_count",
                "",
            )
        },
    );
    let m = after;
    assert!(
        sum(
            &m,
            "weir_datapath_packets_total",
            "reason=\"DROP_POLICY_DENIED\""
        ) >= 1.0
    );
    assert!(sum(&m, "weir_drops_total", "reason=\"DROP_POLICY_DENIED\"") >= 1.0);
    assert!(sum(&m, "weir_datapath_bytes_total", "direction=\"") > 0.0);
    assert!(
        sum(&m, "weir_policy_verdicts_total", "verdict=\"denied\"") >= 1.0,
        "{m:?}"
    );
    assert!(sum(&m, "weir_bpf_map_capacity", "map=\"weir_lb4_svc\"") > 0.0);
    assert!(sum(&m, "weir_bpf_map_entries", "map=\"weir_lb4_svc\"") > 0.0);
    assert!(
        sum(
            &m,
            "weir_datapath_apply_duration_seconds_count",
            "part=\"services\""
        ) >= 1.0
    );
    assert!(
        sum(
            &m,
            "weir_datapath_apply_duration_seconds_count",
            "part=\"endpoints\""
        ) >= 1.0
    );
    assert!(
        sum(
            &m,
            "weir_datapath_apply_duration_seconds_count",
            "part=\"policy\""
        ) >= 1.0
    );
    assert_eq!(sum(&m, "weir_endpoints", ""), 3.0);
    assert!(sum(&m, "weir_frontends", "") >= 1.0);
    assert!(sum(&m, "weir_identities", "") >= 1.0);
    assert_eq!(sum(&m, "weir_ready", ""), 1.0);
    assert!(sum(&m, "process_resident_memory_bytes", "") > 1e6);
    assert!(sum(&m, "process_open_fds", "") > 0.0);
    assert!(sum(&m, "process_cpu_seconds_total", "") > 0.0);
    // Bounded labels: reasons are names from a fixed list, never addresses or pods.
    for (name, labels) in m.keys() {
        assert!(
            !labels.contains("10.244.") && !labels.contains("m/"),
            "{name}{{{labels}}} has an unbounded label"
        );
    }
}
