//! The nftables dataplane end to end in a two-node lab: NodePorts from the external host
//! (SNAT to a remote backend, the client's address kept for a local one,
//! externalTrafficPolicy: Local), pods masqueraded to the external host, pods under
//! NetworkPolicy isolated (fail closed), and the agent's tables and detached programs.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: np, pod: {name}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: echo\n    ports:\n    - {{containerPort: 8080}}\n    - {{containerPort: 5353, protocol: UDP}}\n"
    )
}

fn service(name: &str, selector: &str, etp: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  type: NodePort\n  externalTrafficPolicy: {etp}\n  selector: {{{selector}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

fn node_port(lab: &Lab, svc: &str, name: &str) -> u64 {
    lab.get_json(&["svc", svc, "-n", "x"])["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()["nodePort"]
        .as_u64()
        .unwrap()
}

fn responders(r: &Value) -> Vec<String> {
    r["responders"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

/// The client address the backend saw, asked over HTTP from the external host.
fn client_ip_seen(lab: &Lab, to: &str) -> String {
    let (host, port) = to.split_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port}; printf 'GET /clientip HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = ok(&mut lab.weir(&["lab", "exec", "external", "--", "bash", "-c", &script]));
    let body = out.rsplit("\r\n\r\n").next().unwrap().trim();
    body.rsplit_once(':').unwrap().0.to_string()
}

fn node_netns(lab: &Lab, node: &str) -> String {
    let layout: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/weir/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    let n = layout["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node);
    format!("/run/netns/{}", n.unwrap()["netns"].as_str().unwrap())
}

fn in_node(lab: &Lab, node: &str, cmd: &[&str]) -> String {
    ok(Command::new("nsenter")
        .arg(format!("--net={}", node_netns(lab, node)))
        .arg("--")
        .args(cmd))
}

const DENY_INGRESS_TO_A: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-a, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n";

#[test]
fn node_ports_masquerading_and_policy_isolation() {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}{}{}",
        pod("a", "node-1"),
        pod("c", "node-2"),
        pod("client", "node-1"),
        service("np", "app: np, pod: a", "Cluster").replace("app: np, pod: a", "pod: a"),
        service("both", "app: np", "Cluster"),
        service("local", "app: np", "Local"),
    );
    // `client` carries app: np too; keep it out of the Services' backends.
    let m = m.replace(
        "name: client, namespace: x, labels: {app: np, pod: client}",
        "name: client, namespace: x, labels: {pod: client}",
    );
    let lab = Lab::up_with("nft", 2, &m, &["--dataplane", "nftables"]);
    let (n1, n2) = (lab.node_ip("node-1"), lab.node_ip("node-2"));
    let external = "172.30.0.2";

    // externalTrafficPolicy: Cluster: any node forwards to any backend, TCP and UDP.
    let (tcp, udp) = (
        node_port(&lab, "both", "http"),
        node_port(&lab, "both", "dns"),
    );
    for node in [&n1, &n2] {
        let r = lab.connect("external", &format!("{node}:{tcp}"), "tcp", 24);
        assert_eq!(r["ok"], 24, "tcp via {node}: {r}");
        assert_eq!(responders(&r), vec!["x/a", "x/c"], "tcp via {node}: {r}");
        let r = lab.connect("external", &format!("{node}:{udp}"), "udp", 24);
        assert_eq!(r["ok"], 24, "udp via {node}: {r}");
        assert_eq!(responders(&r), vec!["x/a", "x/c"], "udp via {node}: {r}");
    }
    // A local backend sees the client; a remote one the receiving node (SNAT).
    let only_a = node_port(&lab, "np", "http");
    assert_eq!(client_ip_seen(&lab, &format!("{n1}:{only_a}")), external);
    assert_eq!(client_ip_seen(&lab, &format!("{n2}:{only_a}")), n2);
    // externalTrafficPolicy: Local: each node's own backend, the client's address kept.
    let local = node_port(&lab, "local", "http");
    for (node, backend) in [(&n1, "x/a"), (&n2, "x/c")] {
        let r = lab.connect("external", &format!("{node}:{local}"), "tcp", 10);
        assert_eq!(responders(&r), vec![backend], "via {node}: {r}");
        assert_eq!(client_ip_seen(&lab, &format!("{node}:{local}")), external);
    }
    // Pods reach the external host from their node's address (masqueraded).
    let r = lab.connect("x/client", &format!("{external}:80"), "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    assert_eq!(r["seen_as"][&n1], 3, "{r}");

    // The agent's tables; no BPF program on the node's devices or the pods' veths.
    let table = in_node(&lab, "node-1", &["nft", "list", "table", "ip", "weir"]);
    assert!(
        table.contains("map nodeports") && table.contains("masquerade"),
        "{table}"
    );
    let tc_pins = format!("/sys/fs/bpf/weir/{}/node-1/tc", lab.name);
    assert!(
        std::path::Path::new(&tc_pins).is_dir(),
        "the pod datapath's maps are pinned"
    );
    let links = format!("{tc_pins}/links");
    let pinned: Vec<_> = std::fs::read_dir(&links)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    assert!(
        pinned.is_empty(),
        "tc/XDP links pinned in {links}: {pinned:?}"
    );
    let r = lab.connect("x/client", "both.x:80", "tcp", 20);
    assert_eq!(responders(&r), vec!["x/a", "x/c"], "{r}");
    let status = ok(&mut lab.weir(&["status", "--node", "node-1"]));
    assert!(
        status.contains("Dataplane:     nftables") && status.contains("in sync"),
        "{status}"
    );

    // A NetworkPolicy isolating a's ingress: the netfilter dataplanes do not render its rules
    // yet, so every new flow to a is refused (fail closed); c still answers, and a's own
    // flows go out.
    assert!(lab.apply(DENY_INGRESS_TO_A).status.success());
    let t = Duration::from_secs(20);
    lab.eventually("a isolated", t, || {
        lab.connect("external", &format!("{n1}:{only_a}"), "tcp", 2)["ok"] == 0
    });
    let r = lab.connect("external", &format!("{n2}:{local}"), "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    ok(&mut lab.kubectl(&["delete", "networkpolicy", "deny-a", "-n", "x"]));
    lab.eventually("a reachable again", t, || {
        lab.connect("external", &format!("{n1}:{only_a}"), "tcp", 2)["ok"] == 2
    });
}
