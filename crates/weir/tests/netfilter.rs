//! The nftables dataplane end to end in a two-node lab: NodePorts from the external host
//! (SNAT to a remote backend, the client's address kept for a local one,
//! externalTrafficPolicy: Local), pods masqueraded to the external host, a pod isolated by a
//! NetworkPolicy, and the agent's tables and detached programs. (The upstream NetworkPolicy
//! model runs on nftables in policy.rs.)

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// What `dataplane` shows of its rules in node-1: the Services part and the policy part
/// (empty when there is none).
fn rules(lab: &Lab, dataplane: &str) -> (String, String) {
    let ns = format!("--net=/run/netns/{}", node_netns(lab, "node-1"));
    let show = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(&ns)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    if dataplane == "nftables" {
        (
            show(&["nft", "list", "table", "ip", "weir"]),
            show(&["nft", "list", "table", "inet", "weir-policy"]),
        )
    } else {
        let filter = show(&["iptables-save", "-t", "filter"]);
        let policy: Vec<&str> = filter
            .lines()
            .filter(|l| l.starts_with("-A WEIR-IN-") || l.starts_with("-A WEIR-OUT-"))
            .collect();
        (show(&["iptables-save", "-t", "nat"]), policy.join("\n"))
    }
}

/// A dual-stack NodePort Service of pod a.
const NP6_TO_A: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: np6, namespace: x}\nspec:\n  type: NodePort\n  ipFamilyPolicy: PreferDualStack\n  selector: {pod: a}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n";

const DENY_INGRESS_TO_A: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-a, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n";

#[test]
fn node_ports_masquerading_and_policy_isolation_nftables() {
    node_ports_masquerading_and_policy_isolation("nftables");
}

#[test]
fn node_ports_masquerading_and_policy_isolation_iptables() {
    node_ports_masquerading_and_policy_isolation("iptables");
}

fn node_ports_masquerading_and_policy_isolation(dataplane: &str) {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}{}{}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        np_pod("client", "node-1"),
        np_service("np", "pod: a", "Cluster"),
        np_service("both", "app: np", "Cluster"),
        np_service("local", "app: np", "Local"),
    ) + NP6_TO_A;
    // `client` carries app: np too; keep it out of the Services' backends.
    let m = m.replace(
        "name: client, namespace: x, labels: {app: np, pod: client}",
        "name: client, namespace: x, labels: {pod: client}",
    );
    let lab = Lab::up_with("nf", 2, &m, &["--dataplane", dataplane]);
    let (n1, n2) = (lab.node_ip("node-1"), lab.node_ip("node-2"));
    let external = "172.30.0.2";

    // externalTrafficPolicy: Cluster: any node forwards to any backend, TCP and UDP.
    let (tcp, udp) = (
        node_port(&lab, "both", "http"),
        node_port(&lab, "both", "dns"),
    );
    for node in [&n1, &n2] {
        assert_node_port_reaches(&lab, node, (tcp, udp), &["x/a", "x/c"]);
    }
    // A local backend sees the client; a remote one the receiving node (SNAT).
    let only_a = node_port(&lab, "np", "http");
    assert_eq!(client_ip_seen(&lab, &format!("{n1}:{only_a}")), external);
    assert_eq!(client_ip_seen(&lab, &format!("{n2}:{only_a}")), n2);
    // externalTrafficPolicy: Local: each node's own backend, the client's address kept.
    let local = node_port(&lab, "local", "http");
    for (node, backend) in [(&n1, "x/a"), (&n2, "x/c")] {
        let r = lab.connect("external", &format!("{node}:{local}"), "tcp", 10);
        assert_eq!(responder_names(&r), vec![backend], "via {node}: {r}");
        assert_eq!(client_ip_seen(&lab, &format!("{node}:{local}")), external);
    }
    // Pods reach the external host from their node's address (masqueraded).
    let r = lab.connect("x/client", &format!("{external}:80"), "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    assert_eq!(r["seen_as"][&n1], 3, "{r}");

    // The agent's rules; no BPF program on the node's devices or the pods' veths.
    let (services, policy) = rules(&lab, dataplane);
    let (nodeports, masq) = if dataplane == "nftables" {
        ("map nodeports", "masquerade")
    } else {
        ("WEIR-NODEPORTS", "MASQUERADE")
    };
    assert!(
        services.contains(nodeports) && services.contains(masq),
        "{services}"
    );
    assert!(
        policy.is_empty(),
        "no policy rules without a NetworkPolicy: {policy}"
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
    assert_eq!(responder_names(&r), vec!["x/a", "x/c"], "{r}");
    let status = ok(&mut lab.weir(&["status", "--node", "node-1"]));
    assert!(
        status.contains(&format!("Dataplane:     {dataplane}")) && status.contains("in sync"),
        "{status}"
    );

    // A NetworkPolicy isolating a's ingress without a rule: new flows to a are refused (the
    // chain for a's veth), and an established one is cut (its conntrack entry deleted, as
    // the eBPF datapath cuts a flow the new policy denies); c still answers; deleting the
    // policy admits them.
    let held = lab.hold("external", &format!("{n1}:{only_a}"), "tcp", "4s");
    let n1_6 = lab.node_ip6("node-1");
    let np6 = node_port(&lab, "np6", "http");
    let held6 = lab.hold("external", &format!("[{n1_6}]:{np6}"), "tcp", "4s");
    std::thread::sleep(Duration::from_millis(800));
    assert!(lab.apply(DENY_INGRESS_TO_A).status.success());
    let t = Duration::from_secs(20);
    lab.eventually("a isolated", t, || {
        lab.connect("external", &format!("{n1}:{only_a}"), "tcp", 2)["ok"] == 0
    });
    for (family, held) in [("IPv4", held), ("IPv6", held6)] {
        let r = held.join().unwrap();
        assert!(
            r["failed"].as_u64().unwrap() > 0,
            "the held {family} flow is cut: {r}"
        );
    }
    let (_, policy) = rules(&lab, dataplane);
    assert!(!policy.is_empty(), "a's ingress chain is programmed");
    let r = lab.connect("external", &format!("{n2}:{local}"), "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    ok(&mut lab.kubectl(&["delete", "networkpolicy", "deny-a", "-n", "x"]));
    lab.eventually("a reachable again", t, || {
        lab.connect("external", &format!("{n1}:{only_a}"), "tcp", 2)["ok"] == 2
    });

    // The prefilter, as netfilter rules before conntrack: node-1 drops the external host's
    // packets (node-2 still answers it) and counts them per prefix; a prefix added later
    // leaves the first one's count alone; deleted, the host is answered again.
    ok(&mut lab.weir(&["prefilter", "add", "--node", "node-1", "172.30.0.1/30"]));
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 2);
    assert_eq!(r["ok"], 0, "{r}");
    let r = lab.connect("external", &format!("{n2}:{tcp}"), "tcp", 2);
    assert_eq!(r["ok"], 2, "{r}");
    let dropped = || -> u64 {
        let list: serde_json::Value = serde_json::from_str(&ok(&mut lab.weir(&[
            "prefilter",
            "list",
            "--node",
            "node-1",
            "-o",
            "json",
        ])))
        .unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["cidr"] == "172.30.0.0/30")
            .and_then(|e| e["packets"].as_u64())
            .unwrap_or(0)
    };
    let before = dropped();
    assert!(before > 0);
    ok(&mut lab.weir(&["prefilter", "add", "--node", "node-1", "2001:db8:ffff::/48"]));
    assert!(dropped() >= before, "the first prefix kept its count");
    let raw = ok(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node_netns(&lab, "node-1")))
        .args(if dataplane == "nftables" {
            vec!["nft", "list", "table", "inet", "weir-prefilter"]
        } else {
            vec!["iptables-save", "-t", "raw"]
        }));
    assert!(raw.contains("172.30.0.0/30"), "{raw}");
    ok(&mut lab.weir(&[
        "prefilter",
        "delete",
        "--node",
        "node-1",
        "172.30.0.0/30",
        "2001:db8:ffff::/48",
    ]));
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 2);
    assert_eq!(r["ok"], 2, "{r}");
}
