//! The hitless dataplane switch end to end (`weir dataplane switch`): a two-node lab on eBPF
//! switched to nftables and to iptables while connections are held through a NodePort with a
//! remote backend (DNAT and SNAT), a ClusterIP across nodes (a policy-allowed flow), a
//! masqueraded connection to the external host and a connected UDP socket to a ClusterIP;
//! new connections are made throughout, and a policy-denied flow stays denied.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// c admits only the client pod.
const ONLY_CLIENT_TO_C: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-client, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: client}}}]\n";

fn manifest() -> String {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}{}{}{ONLY_CLIENT_TO_C}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        np_pod("client", "node-1"),
        np_service("to-a", "pod: a", "Cluster"),
        np_service("to-c", "pod: c", "Cluster"),
        np_service("both", "app: np", "Cluster"),
    );
    // The client is no backend.
    m.replace(
        "name: client, namespace: x, labels: {app: np, pod: client}",
        "name: client, namespace: x, labels: {pod: client}",
    )
}

fn no_errors(what: &str, r: &Value) {
    assert!(r["ok"].as_u64().unwrap() > 20, "{what}: {r}");
    assert_eq!(r["failed"], 0, "{what}: {r}");
    assert_eq!(r["reconnects"], 0, "{what}: {r}");
}

fn switch_keeps_established_flows(to: &str) {
    let lab = Lab::up("sw", 2, &manifest());
    let n2 = lab.node_ip("node-2");
    let external = "172.30.0.2";
    let (to_a, to_c) = (
        node_port(&lab, "to-a", "http"),
        node_port(&lab, "to-c", "http"),
    );
    let denied = |lab: &Lab| lab.connect("external", &format!("{n2}:{to_c}"), "tcp", 2)["ok"] == 0;
    assert!(denied(&lab), "external -> c is denied by policy");
    let holds = [
        (
            "NodePort to a remote backend",
            lab.hold("external", &format!("{n2}:{to_a}"), "tcp", "7s"),
        ),
        (
            "ClusterIP across nodes, policy-allowed",
            lab.hold("x/client", "to-c.x:80", "tcp", "7s"),
        ),
        (
            "masqueraded to the external host",
            lab.hold("x/client", &format!("{external}:80"), "tcp", "7s"),
        ),
        (
            "connected UDP to a ClusterIP",
            lab.hold("x/client", "both.x:53", "udp", "7s"),
        ),
    ];
    // New connections all along.
    let fresh = {
        let mut cmd = lab.weir(&[
            "lab",
            "connect",
            "--from",
            "x/client",
            "--to",
            "both.x:80",
            "--count",
            "150",
            "--rate",
            "30",
            "-o",
            "json",
        ]);
        std::thread::spawn(move || {
            serde_json::from_slice::<Value>(&cmd.output().unwrap().stdout).unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let out = ok(&mut lab.weir(&["dataplane", "switch", "--to", to, "-o", "json"]));
    let reports: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 2, "{reports}");
    for r in reports.as_array().unwrap() {
        assert_eq!(r["to"], to, "{r}");
        assert_eq!(r["flows_failed"], 0, "{r}");
    }
    // node-2 handed over the NodePort flow (DNAT + SNAT); node-1 the masqueraded one.
    let copied: u64 = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["flows_copied"].as_u64().unwrap())
        .sum();
    assert!(copied >= 2, "{reports}");
    for (what, h) in holds {
        no_errors(what, &h.join().unwrap());
    }
    let r = fresh.join().unwrap();
    assert_eq!(r["ok"], 150, "new connections during the switch: {r}");
    // After: the new dataplane serves, names itself, and policy still holds.
    let status = ok(&mut lab.weir(&["status", "--node", "node-2"]));
    assert!(status.contains(&format!("Dataplane:     {to}")), "{status}");
    assert!(denied(&lab), "external -> c is still denied");
    let r = lab.connect("external", &format!("{n2}:{to_a}"), "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
    // Status: the handed-over flows still in the kernel's conntrack.
    let st: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["status", "--node", "node-2", "-o", "json"])
    ))
    .unwrap();
    assert!(
        st["status"]["switch"]["draining"].as_u64().unwrap() >= 1,
        "{st}"
    );
    // The node's own processes reach ClusterIPs through the new dataplane too.
    let r = lab.connect("node-2", "both.x:80", "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    // The lab keeps the new dataplane for agents started later: a restarted agent comes back
    // in it, and serves.
    let layout: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/weir/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    assert_eq!(layout["dataplane"], to);
    kill9_matching(&format!("lab agent --cluster {} --node node-1", lab.name));
    let _agent = lab.restart_agent("node-1");
    lab.eventually(
        "the restarted agent in sync",
        Duration::from_secs(30),
        || {
            let out = lab.weir(&["status", "--node", "node-1"]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            out.status.success()
                && text.contains("in sync")
                && text.contains(&format!("Dataplane:     {to}"))
        },
    );
    let r = lab.connect("x/client", "both.x:80", "tcp", 10);
    assert_eq!(r["ok"], 10, "{r}");
    // Not built yet: switching back is refused, and the node stays as it is.
    let out = run(&mut lab.weir(&["dataplane", "switch", "--to", "ebpf"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"));
    let r = lab.connect("x/client", "both.x:80", "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
}

#[test]
fn switch_from_ebpf_to_nftables_keeps_established_flows() {
    switch_keeps_established_flows("nftables");
}

#[test]
fn switch_from_ebpf_to_iptables_keeps_established_flows() {
    switch_keeps_established_flows("iptables");
}

/// A switch that fails on a node after the flows were copied (a failure injected through the
/// test hook) rolls that node back: the held connections never notice, the node stays on
/// eBPF without the target's rules, the other node is not touched, and a switch afterwards
/// succeeds.
#[test]
fn a_failed_switch_rolls_back_with_traffic_intact() {
    let lab = Lab::up("swrb", 2, &manifest());
    let n2 = lab.node_ip("node-2");
    let to_a = node_port(&lab, "to-a", "http");
    let holds = [
        (
            "NodePort to a remote backend",
            lab.hold("external", &format!("{n2}:{to_a}"), "tcp", "5s"),
        ),
        (
            "ClusterIP across nodes",
            lab.hold("x/client", "to-c.x:80", "tcp", "5s"),
        ),
    ];
    std::thread::sleep(Duration::from_millis(1000));
    let out = run(&mut lab.weir(&[
        "dataplane",
        "switch",
        "--to",
        "nftables",
        "--fail-after",
        "copy",
        "-o",
        "json",
    ]));
    assert!(!out.status.success());
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &reports[0];
    assert_eq!(
        (r["node"].as_str(), r["to"].as_str()),
        (Some("node-1"), Some("ebpf")),
        "{r}"
    );
    assert!(r["error"].as_str().unwrap().contains("injected"), "{r}");
    assert_eq!(
        reports.as_array().unwrap().len(),
        1,
        "the switch stopped at node-1"
    );
    for (what, h) in holds {
        no_errors(what, &h.join().unwrap());
    }
    for node in ["node-1", "node-2"] {
        let status = ok(&mut lab.weir(&["status", "--node", node]));
        assert!(status.contains("Dataplane:     ebpf"), "{status}");
    }
    let ns = format!("--net=/run/netns/{}", node_netns(&lab, "node-1"));
    let tables = ok(std::process::Command::new("nsenter")
        .arg(&ns)
        .args(["nft", "list", "tables"]));
    assert!(
        !tables.contains("weir"),
        "the target's tables are gone: {tables}"
    );
    let r = lab.connect("x/client", "both.x:80", "tcp", 10);
    assert_eq!(r["ok"], 10, "{r}");
    let out = ok(&mut lab.weir(&["dataplane", "switch", "--to", "nftables"]));
    assert_eq!(out.lines().count(), 2, "{out}");
    let r = lab.connect("external", &format!("{n2}:{to_a}"), "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
}
