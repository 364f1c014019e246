//! The hitless dataplane switch end to end (`weir dataplane switch`): a two-node lab switched
//! round eBPF -> nftables -> iptables -> eBPF and round the other way, each switch while
//! connections are held through a NodePort with a remote backend (DNAT and SNAT), a
//! LoadBalancer IP, a ClusterIP across nodes and straight to a pod (policy-allowed flows),
//! a node's own process to a ClusterIP, a masqueraded connection to the external host and a connected UDP socket to a ClusterIP;
//! new connections are made throughout, and a policy-denied flow stays denied.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// c admits only the client pod.
const ONLY_CLIENT_TO_C: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-client, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: client}}}]\n";

/// A LoadBalancer Service of pod a (the lab assigns it an IP the external host reaches
/// through either node).
const LB: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: x}\nspec:\n  type: LoadBalancer\n  selector: {pod: a}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n";

/// The LoadBalancer IP the lab gave Service x/lb.
fn lb_ip(lab: &Lab) -> String {
    let ingress = || {
        lab.get_json(&["svc", "lb", "-n", "x"])["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .map(str::to_string)
    };
    lab.eventually("a LoadBalancer IP", Duration::from_secs(20), || {
        ingress().is_some()
    });
    ingress().unwrap()
}

/// Pod x/NAME's IP.
fn pod_ip(lab: &Lab, name: &str) -> String {
    lab.get_json(&["pod", name, "-n", "x"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string()
}

fn manifest() -> String {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}{}{}{ONLY_CLIENT_TO_C}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        np_pod("client", "node-1"),
        np_service("to-a", "pod: a", "Cluster"),
        np_service("to-c", "pod: c", "Cluster"),
        np_service("both", "app: np", "Cluster"),
    ) + LB;
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

/// The flows a switch must keep, opened before it: (what, the hold's result).
fn hold_flows(lab: &Lab, secs: u32) -> Vec<(&'static str, std::thread::JoinHandle<Value>)> {
    let n2 = lab.node_ip("node-2");
    let to_a = node_port(lab, "to-a", "http");
    let d = format!("{secs}s");
    vec![
        (
            "NodePort to a remote backend",
            lab.hold("external", &format!("{n2}:{to_a}"), "tcp", &d),
        ),
        (
            "ClusterIP across nodes, policy-allowed",
            lab.hold("x/client", "to-c.x:80", "tcp", &d),
        ),
        (
            "masqueraded to the external host",
            lab.hold("x/client", &format!("{EXTERNAL}:80"), "tcp", &d),
        ),
        (
            "connected UDP to a ClusterIP",
            lab.hold("x/client", "both.x:53", "udp", &d),
        ),
        (
            "LoadBalancer IP",
            lab.hold("external", &format!("{}:80", lb_ip(lab)), "tcp", &d),
        ),
        (
            "the node's own process to a ClusterIP, a local backend",
            lab.hold("node-1", "to-a.x:80", "tcp", &d),
        ),
        (
            "the node's own process to a ClusterIP, a remote backend",
            lab.hold("node-2", "to-a.x:80", "tcp", &d),
        ),
        (
            "pod to pod across nodes, policy-allowed",
            lab.hold("x/client", &format!("{}:8080", pod_ip(lab, "c")), "tcp", &d),
        ),
    ]
}

const EXTERNAL: &str = "172.30.0.2";

/// `weir lab connect ... --count N --rate R -o json` on a thread of its own.
fn connects_meanwhile(
    lab: &Lab,
    from: &str,
    to: &str,
    count: u32,
    rate: u32,
) -> std::thread::JoinHandle<Value> {
    let (count, rate) = (count.to_string(), rate.to_string());
    let mut cmd = lab.weir(&[
        "lab", "connect", "--from", from, "--to", to, "--count", &count, "--rate", &rate, "-o",
        "json",
    ]);
    std::thread::spawn(move || {
        serde_json::from_slice::<Value>(&cmd.output().unwrap().stdout).unwrap()
    })
}

/// One switch of the whole lab to `to` under load: flows held across it keep exchanging
/// with zero errors, new connections all succeed, a denied flow stays denied throughout,
/// and afterwards the new dataplane serves and names itself.
fn switch_under_load(lab: &Lab, to: &str) {
    let n2 = lab.node_ip("node-2");
    let (to_a, to_c) = (
        node_port(lab, "to-a", "http"),
        node_port(lab, "to-c", "http"),
    );
    let holds = hold_flows(lab, 6);
    let fresh = connects_meanwhile(lab, "x/client", "both.x:80", 120, 30);
    let denied = connects_meanwhile(lab, "external", &format!("{n2}:{to_c}"), 8, 2);
    std::thread::sleep(Duration::from_millis(1500));
    let out = ok(&mut lab.weir(&["dataplane", "switch", "--to", to, "-o", "json"]));
    let reports: Value = serde_json::from_str(&out).unwrap();
    let reports = reports.as_array().unwrap();
    eprintln!("switch to {to}: {reports:?}");
    assert_eq!(reports.len(), 2, "{reports:?}");
    for r in reports {
        assert_eq!(r["to"], to, "{r}");
        assert_eq!(r["phase"], "done", "{r}");
        assert_eq!(r["flows_failed"], 0, "{r}");
    }
    // node-2 copied the NodePort flow (DNAT + SNAT); node-1 the masqueraded one, and the
    // ClusterIP flows netfilter or the programs translated. Between nftables and iptables
    // the kernel's conntrack carries every flow: nothing to copy.
    let copied: u64 = reports
        .iter()
        .map(|r| r["flows_copied"].as_u64().unwrap())
        .sum();
    if to == "ebpf" || reports[0]["from"] == "ebpf" {
        assert!(copied >= 2, "{reports:?}");
    } else {
        assert_eq!(copied, 0, "{reports:?}");
    }
    if to == "ebpf" {
        // node-2 carried the verdict of the policy-allowed flow into c.
        assert!(
            reports[1]["verdicts_copied"].as_u64().unwrap() >= 1,
            "{reports:?}"
        );
        // The node's processes' flows through netfilter's NAT stay the kernel's.
        for r in reports {
            assert!(r["node_flows_held"].as_u64().unwrap() >= 1, "{r}");
        }
    }
    for (what, h) in holds {
        no_errors(&format!("{what}, to {to}"), &h.join().unwrap());
    }
    let r = fresh.join().unwrap();
    assert_eq!(
        r["ok"], 120,
        "new connections during the switch to {to}: {r}"
    );
    let r = denied.join().unwrap();
    assert_eq!(
        r["ok"], 0,
        "external -> c stays denied during the switch to {to}: {r}"
    );
    // After: the new dataplane serves and names itself.
    let status = ok(&mut lab.weir(&["status", "--node", "node-2"]));
    assert!(status.contains(&format!("Dataplane:     {to}")), "{status}");
    let r = lab.connect("external", &format!("{n2}:{to_a}"), "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
    // Status: the copied flows still there.
    let st: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["status", "--node", "node-2", "-o", "json"])
    ))
    .unwrap();
    assert!(st["status"]["switch"]["draining"].is_u64(), "{st}");
    // New connections out of the cluster are masqueraded by the new dataplane.
    let r = lab.connect("x/client", &format!("{EXTERNAL}:80"), "tcp", 3);
    assert_eq!(r["seen_as"][&lab.node_ip("node-1")], 3, "{r}");
    // The prefilter's deny list moved with the node, into the new dataplane's own form.
    assert!(ok(&mut lab.weir(&["prefilter", "list", "--node", "node-1"])).contains("192.0.2.0/24"));
    let ns = format!("--net=/run/netns/{}", node_netns(lab, "node-1"));
    let (cmd, want): (&[&str], &str) = match to {
        "nftables" => (
            &["nft", "list", "table", "inet", "weir-prefilter"],
            "192.0.2.0/24",
        ),
        "iptables" => (
            &["iptables-save", "-t", "raw"],
            "-A WEIR-PREFILTER -s 192.0.2.0/24",
        ),
        _ => (&["ip", "-d", "link", "show", "eth0"], "prog/xdp"),
    };
    let shown = ok(std::process::Command::new("nsenter").arg(&ns).args(cmd));
    assert!(shown.contains(want), "{to}: {shown}");
    // The node's own processes reach ClusterIPs through the new dataplane too.
    let r = lab.connect("node-2", "both.x:80", "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
}

/// `weir dataplane switch --to TO` with a failure injected after the copy (test hook): it
/// fails; its reports.
fn failing_switch(lab: &Lab, to: &str) -> Value {
    let out = run(&mut lab.weir(&[
        "dataplane",
        "switch",
        "--to",
        to,
        "--fail-after",
        "copy",
        "-o",
        "json",
    ]));
    assert!(!out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A restarted agent comes back in the dataplane its node was switched to, and serves (the
/// agent lives as long as what this returns).
fn restart_keeps_the_dataplane(lab: &Lab, dataplane: &str) -> Daemon {
    let layout: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/weir/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    assert_eq!(layout["dataplane"], dataplane);
    kill9_matching(&format!("lab agent --cluster {} --node node-1", lab.name));
    let agent = lab.restart_agent("node-1");
    lab.eventually(
        "the restarted agent in sync",
        Duration::from_secs(30),
        || {
            let out = lab.weir(&["status", "--node", "node-1"]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            out.status.success()
                && text.contains("in sync")
                && text.contains(&format!("Dataplane:     {dataplane}"))
        },
    );
    let r = lab.connect("x/client", "both.x:80", "tcp", 10);
    assert_eq!(r["ok"], 10, "{r}");
    agent
}

/// eBPF -> nftables -> iptables -> eBPF, each switch under load; the agents restarted once
/// on nftables; a switch back to eBPF failing half-way (injected) leaves iptables serving.
#[test]
fn switch_round_ebpf_nftables_iptables_ebpf() {
    let lab = Lab::up("swa", 2, &manifest());
    ok(&mut lab.weir(&["prefilter", "add", "--node", "node-1", "192.0.2.0/24"]));
    let n2 = lab.node_ip("node-2");
    let to_c = node_port(&lab, "to-c", "http");
    assert_eq!(
        lab.connect("external", &format!("{n2}:{to_c}"), "tcp", 2)["ok"],
        0,
        "external -> c is denied by policy"
    );
    switch_under_load(&lab, "nftables");
    let _agent = restart_keeps_the_dataplane(&lab, "nftables");
    switch_under_load(&lab, "iptables");
    // Back to eBPF, failing on node-1 after the copy: rolled back, traffic intact.
    let holds = hold_flows(&lab, 4);
    std::thread::sleep(Duration::from_millis(1000));
    let reports = failing_switch(&lab, "ebpf");
    assert_eq!(reports[0]["to"], "iptables", "{reports}");
    assert_eq!(reports[0]["phase"], "rolled-back", "{reports}");
    for (what, h) in holds {
        no_errors(
            &format!("{what}, a failed switch to ebpf"),
            &h.join().unwrap(),
        );
    }
    let r = lab.connect("x/client", "both.x:80", "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
    switch_under_load(&lab, "ebpf");
    // Back on eBPF: no netfilter rule of weir's is left (the NAT hold goes once the node's
    // process's flow has ended).
    let ns = format!("--net=/run/netns/{}", node_netns(&lab, "node-1"));
    let tables = || {
        ok(std::process::Command::new("nsenter")
            .arg(&ns)
            .args(["nft", "list", "tables"]))
    };
    lab.eventually("no nft table of weir's", Duration::from_secs(30), || {
        !tables().contains("weir")
    });
    let saved = ok(std::process::Command::new("nsenter")
        .arg(&ns)
        .args(["iptables-save"]));
    assert!(!saved.contains("WEIR-"), "{saved}");
}

/// eBPF -> iptables -> nftables -> eBPF, each switch under load; the agents restarted once
/// on iptables.
#[test]
fn switch_round_ebpf_iptables_nftables_ebpf() {
    let lab = Lab::up("swb", 2, &manifest());
    ok(&mut lab.weir(&["prefilter", "add", "--node", "node-1", "192.0.2.0/24"]));
    switch_under_load(&lab, "iptables");
    let _agent = restart_keeps_the_dataplane(&lab, "iptables");
    switch_under_load(&lab, "nftables");
    switch_under_load(&lab, "ebpf");
    // node-1's agent started under netfilter: from the switch to eBPF on, it reads the
    // socket layer's translations (its log began at the restart, when none were made).
    lab.eventually(
        "the socket translations after the switch",
        Duration::from_secs(20),
        || {
            lab.connect("x/client", "both.x:80", "tcp", 1);
            let out = ok(&mut lab.weir(&[
                "observe",
                "--node",
                "node-1",
                "-t",
                "trace-sock",
                "--from-pod",
                "x/client",
                "--last",
                "20",
            ]));
            out.contains("TRANSLATED (XLATE_CONNECT)")
        },
    );
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
    let reports = failing_switch(&lab, "nftables");
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

/// The tc/XDP links pinned for `node`'s pod datapath.
fn pinned_links(lab: &Lab, node: &str) -> Vec<String> {
    let links = format!("/sys/fs/bpf/weir/{}/{node}/tc/links", lab.name);
    std::fs::read_dir(&links)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// DSR flows (tunnelled by the frontend's node, answered by the backend's node straight to
/// the client) have no state netfilter could take: across a switch to netfilter the tc
/// programs stay for them alone until they end, then go; a restarted agent goes on draining;
/// a switch back to eBPF meanwhile keeps them too. New connections meanwhile are the
/// netfilter dataplane's (SNAT).
#[test]
fn dsr_flows_drain_through_a_switch() {
    let m = dsr_manifest();
    let lab = Lab::up("swdsr", 2, &m);
    let n1 = lab.node_ip("node-1");
    let (tcp, udp) = (
        node_port(&lab, "dsr", "http"),
        node_port(&lab, "dsr", "dns"),
    );
    let dsr_draining = |node: &str| -> u64 {
        let st: Value =
            serde_json::from_str(&ok(&mut lab.weir(&["status", "--node", node, "-o", "json"])))
                .unwrap();
        st["status"]["dsr_draining"].as_u64().unwrap_or(0)
    };
    // Until node-1 tunnels `n` held flows.
    let dsr_held = |n: usize| {
        lab.eventually("the DSR flows held", Duration::from_secs(10), || {
            let ct = ok(&mut lab.weir(&["bpf", "ct", "list", "--node", "node-1"]));
            ct.lines().filter(|l| l.contains(" dsr ")).count() == n
        })
    };

    // To iptables with a TCP DSR flow held: it keeps the programs on both nodes until it
    // ends; then they go.
    let held = lab.hold("external", &format!("{n1}:{tcp}"), "tcp", "5s");
    dsr_held(1);
    ok(&mut lab.weir(&["dataplane", "switch", "--to", "iptables"]));
    for node in ["node-1", "node-2"] {
        assert_eq!(dsr_draining(node), 1, "{node}");
        let status = ok(&mut lab.weir(&["status", "--node", node]));
        assert!(status.contains("still carry 1 DSR flows"), "{status}");
    }
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 5);
    assert_eq!(r["ok"], 5, "new connections, SNATed by iptables: {r}");
    assert_eq!(
        client_ip_seen(&lab, &format!("{n1}:{tcp}")),
        n1,
        "SNAT under iptables"
    );
    no_errors(
        "a DSR flow across a switch to iptables",
        &held.join().unwrap(),
    );
    lab.eventually(
        "the programs gone once the DSR flow ended",
        Duration::from_secs(40),
        || {
            ["node-1", "node-2"]
                .iter()
                .all(|n| pinned_links(&lab, n).is_empty() && dsr_draining(n) == 0)
        },
    );
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");

    // Back to eBPF (DSR again), then to nftables and back to eBPF while TCP and UDP DSR
    // flows are held.
    ok(&mut lab.weir(&["dataplane", "switch", "--to", "ebpf"]));
    let held = [
        (
            "TCP",
            lab.hold("external", &format!("{n1}:{tcp}"), "tcp", "8s"),
        ),
        (
            "UDP",
            lab.hold("external", &format!("{n1}:{udp}"), "udp", "8s"),
        ),
    ];
    dsr_held(2);
    ok(&mut lab.weir(&["dataplane", "switch", "--to", "nftables"]));
    assert_eq!(dsr_draining("node-1"), 2);
    let r = lab.connect("external", &format!("{n1}:{udp}"), "udp", 5);
    assert_eq!(r["ok"], 5, "new UDP flows under nftables: {r}");
    // A restarted agent goes on draining.
    kill9_matching(&format!("lab agent --cluster {} --node node-1", lab.name));
    let _agent = lab.restart_agent("node-1");
    lab.eventually("the restarted agent", Duration::from_secs(20), || {
        lab.weir(&["status", "--node", "node-1"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert_eq!(dsr_draining("node-1"), 2);
    assert!(!pinned_links(&lab, "node-1").is_empty());
    ok(&mut lab.weir(&["dataplane", "switch", "--to", "ebpf"]));
    for (what, h) in held {
        no_errors(
            &format!("a {what} DSR flow across eBPF -> nftables -> eBPF"),
            &h.join().unwrap(),
        );
    }
    assert_eq!(
        client_ip_seen(&lab, &format!("{n1}:{tcp}")),
        EXTERNAL,
        "DSR again"
    );
}
