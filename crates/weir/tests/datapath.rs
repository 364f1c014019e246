//! End-to-end tests of the per-packet pod datapath in a two-node lab: pod-to-pod traffic is
//! delivered by the tc programs (bpf_redirect_peer on the same node, the FIB's device across
//! nodes) and never reaches netfilter in the node namespaces.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: echo\n    ports:\n    - {{containerPort: 8080}}\n    - {{containerPort: 5353, protocol: UDP}}\n"
    )
}

fn in_netns(ns: &str, cmd: &[&str]) -> String {
    ok(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .args(cmd))
}

fn metric(lab: &Lab, node: &str, name: &str) -> u64 {
    let v: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["bpf", "metrics", "list", "--node", node, "-o", "json"])
    ))
    .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == name)
        .map(|m| m["packets"].as_u64().unwrap())
        .sum()
}

fn ip_of(lab: &Lab, pod: &str, family: usize) -> String {
    let p = lab.get_json(&["pod", pod, "-n", "x"]);
    p["status"]["podIPs"][family]["ip"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn pod_traffic_takes_the_shortcut_and_bypasses_netfilter() {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}",
        pod("a", "node-1"),
        pod("b", "node-1"),
        pod("c", "node-2")
    );
    let lab = Lab::up("dp", 2, &m);
    // The agents know every local pod (the kubelet's endpoint records).
    lab.eventually("endpoints programmed", Duration::from_secs(20), || {
        let n1: Value = serde_json::from_str(&ok(
            &mut lab.weir(&["bpf", "endpoint", "list", "--node", "node-1", "-o", "json"])
        ))
        .unwrap();
        let n2: Value = serde_json::from_str(&ok(
            &mut lab.weir(&["bpf", "endpoint", "list", "--node", "node-2", "-o", "json"])
        ))
        .unwrap();
        // a and b dual-stack on node-1, c on node-2.
        n1.as_array().unwrap().len() == 4 && n2.as_array().unwrap().len() == 2
    });
    let table = ok(&mut lab.weir(&["bpf", "endpoint", "list", "--node", "node-1"]));
    assert!(table.contains("redirect-peer"), "{table}");

    // Netfilter in both node namespaces: rules that count every pod TCP and UDP packet the
    // host stack would see, and conntrack switched on by a state match. (Neighbour discovery
    // between a pod and its gateway is the node's business and goes to the stack.)
    let nodes = [node_netns(&lab, "node-1"), node_netns(&lab, "node-2")];
    for ns in &nodes {
        for proto in ["tcp", "udp"] {
            for args in [
                vec![
                    "iptables",
                    "-t",
                    "raw",
                    "-A",
                    "PREROUTING",
                    "-s",
                    "10.244.0.0/16",
                ],
                vec![
                    "iptables",
                    "-A",
                    "FORWARD",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW,ESTABLISHED",
                ],
                vec![
                    "iptables",
                    "-t",
                    "mangle",
                    "-A",
                    "POSTROUTING",
                    "-d",
                    "10.244.0.0/16",
                ],
                vec![
                    "ip6tables",
                    "-t",
                    "raw",
                    "-A",
                    "PREROUTING",
                    "-s",
                    "fd00:10:244::/48",
                ],
                vec!["ip6tables", "-A", "FORWARD"],
            ] {
                let mut a = args.clone();
                a.extend(["-p", proto]);
                in_netns(ns, &a);
            }
        }
    }
    let peer_before = metric(&lab, "node-1", "REASON_FORWARD_PEER");

    // Same node (a -> b) and across nodes (a -> c), TCP and UDP, IPv4 and IPv6.
    for (to, family) in [("b", 0), ("c", 0), ("b", 1), ("c", 1)] {
        let ip = ip_of(&lab, to, family);
        let addr = if family == 1 {
            format!("[{ip}]")
        } else {
            ip.clone()
        };
        let r = lab.connect("x/a", &format!("{addr}:8080"), "tcp", 5);
        assert_eq!(r["ok"], 5, "tcp to {to} ({ip}): {r}");
        assert!(
            r["responders"].to_string().contains(&format!("x/{to}")),
            "{r}"
        );
        let r = lab.connect("x/a", &format!("{addr}:5353"), "udp", 3);
        assert_eq!(r["ok"], 3, "udp to {to} ({ip}): {r}");
    }

    // Nothing of it went through netfilter, on either node.
    for ns in &nodes {
        for (cmd, table, chain) in [
            ("iptables", "raw", "PREROUTING"),
            ("iptables", "filter", "FORWARD"),
            ("iptables", "mangle", "POSTROUTING"),
            ("ip6tables", "raw", "PREROUTING"),
            ("ip6tables", "filter", "FORWARD"),
        ] {
            let out = in_netns(ns, &[cmd, "-t", table, "-L", chain, "-v", "-n", "-x"]);
            for line in out.lines().skip(2) {
                let packets: u64 = line
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                assert_eq!(
                    packets, 0,
                    "{ns} {cmd} {table} {chain} counted pod traffic:\n{out}"
                );
            }
        }
        let ct = in_netns(ns, &["conntrack", "-L"]);
        assert!(
            !ct.contains("10.244.") && !ct.contains("fd00:10:244:"),
            "{ns}: conntrack tracked pod flows:\n{ct}"
        );
    }

    // The programs did the work, and say so.
    assert!(metric(&lab, "node-1", "REASON_FORWARD_PEER") > peer_before);
    assert!(
        metric(&lab, "node-1", "REASON_FORWARD_FIB")
            + metric(&lab, "node-1", "REASON_FORWARD_NEIGH")
            > 0
    );
    assert!(metric(&lab, "node-2", "REASON_FORWARD_PEER") > 0);
    let table = ok(&mut lab.weir(&["bpf", "metrics", "list", "--node", "node-2"]));
    assert!(table.contains("REASON_FORWARD_PEER"), "{table}");
    let status = ok(&mut lab.weir(&["status", "--node", "node-1"]));
    assert!(status.contains("from_pod"), "{status}");
}

#[test]
fn endpoints_follow_pods_and_links_survive_an_agent_restart() {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}",
        pod("a", "node-1"),
        pod("b", "node-1")
    );
    let lab = Lab::up("dpr", 1, &m);
    let count = |lab: &Lab| -> usize {
        let v: Value = serde_json::from_str(&ok(
            &mut lab.weir(&["bpf", "endpoint", "list", "--node", "node-1", "-o", "json"])
        ))
        .unwrap();
        v.as_array().unwrap().len()
    };
    lab.eventually("both pods programmed", Duration::from_secs(20), || {
        count(&lab) == 4
    });
    let b = ip_of(&lab, "b", 0);
    // A long connection through the shortcut stays up while the agent is killed and restarted.
    let before = metric(&lab, "node-1", "REASON_FORWARD_PEER");
    kill9_matching(&format!("lab agent --cluster {} --node node-1", lab.name));
    let r = lab.connect("x/a", &format!("{b}:8080"), "tcp", 5);
    assert_eq!(r["ok"], 5, "traffic flows while the agent is down: {r}");
    let _agent = lab.restart_agent("node-1");
    lab.eventually("the agent is back", Duration::from_secs(30), || {
        lab.weir(&["bpf", "endpoint", "list", "--node", "node-1"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    assert!(
        metric(&lab, "node-1", "REASON_FORWARD_PEER") > before,
        "the pinned programs kept forwarding"
    );
    // Deleting a pod removes its endpoint.
    ok(&mut lab.kubectl(&[
        "delete",
        "pod",
        "b",
        "-n",
        "x",
        "--grace-period=0",
        "--force",
    ]));
    lab.eventually("b's endpoint removed", Duration::from_secs(20), || {
        count(&lab) == 2
    });
}

#[test]
fn node_ports_from_outside_with_snat_and_both_traffic_policies() {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}{}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        np_service("np", "app: np", "Cluster"),
        np_service("only-a", "pod: a", "Cluster"),
        np_service("local", "app: np", "Local"),
    );
    let lab = Lab::up("np", 2, &m);
    let (n1, n2) = (lab.node_ip("node-1"), lab.node_ip("node-2"));
    let external = "172.30.0.2";

    // Cluster policy: any node forwards to any backend, TCP and UDP.
    let (tcp, udp) = (node_port(&lab, "np", "http"), node_port(&lab, "np", "dns"));
    for node in [&n1, &n2] {
        assert_node_port_reaches(&lab, node, (tcp, udp), &["x/a", "x/c"]);
    }

    // `weir explain` runs a synthetic first packet through node-1's programs: the verdict,
    // the backend and the NAT it would get, with nothing written to conntrack.
    let ct_count = || -> usize {
        serde_json::from_str::<Value>(&ok(
            &mut lab.weir(&["bpf", "ct", "list", "--node", "node-1", "-o", "json"])
        ))
        .unwrap()
        .as_array()
        .unwrap()
        .len()
    };
    let before = ct_count();
    let e: Value = serde_json::from_str(&ok(&mut lab.weir(&[
        "explain",
        "--node",
        "node-1",
        "--from",
        &format!("{external}:40000"),
        "--to",
        &format!("{n1}:{tcp}"),
        "--protocol",
        "tcp",
        "-o",
        "json",
    ])))
    .unwrap();
    assert_eq!(e["program"], "from_netdev", "{e}");
    assert_eq!(e["verdict"], "redirect", "{e}");
    let backend = e["backend"].as_str().unwrap();
    assert!(backend.ends_with(":8080"), "{e}");
    if e["reason"] != "REASON_FORWARD_PEER" {
        // A backend on node-2: SNATed to node-1's address.
        assert!(
            e["snat"].as_str().unwrap().starts_with(&format!("{n1}:")),
            "{e}"
        );
    }
    assert_eq!(ct_count(), before, "explain wrote nothing");
    let text = ok(&mut lab.weir(&[
        "explain",
        "--node",
        "node-1",
        "--from",
        &format!("{external}:40000"),
        "--to",
        &format!("{n1}:22"),
    ]));
    assert!(
        text.contains("PASS") && text.contains("REASON_PASS_STACK"),
        "{text}"
    );

    // The client's address reaches a backend on the node it came to; a backend on another
    // node sees that node's address (SNAT), and the NAT table says so.
    let only_a = node_port(&lab, "only-a", "http");
    assert_eq!(client_ip_seen(&lab, &format!("{n1}:{only_a}")), external);
    assert_eq!(client_ip_seen(&lab, &format!("{n2}:{only_a}")), n2);
    let nat: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["bpf", "nat", "list", "--node", "node-2", "-o", "json"])
    ))
    .unwrap();
    assert!(
        nat.as_array()
            .unwrap()
            .iter()
            .any(|e| e["dst"] == format!("{n2}:{only_a}")
                && e["snat"].as_str().unwrap().starts_with(&format!("{n2}:"))),
        "{nat}"
    );
    let table = ok(&mut lab.weir(&["bpf", "ct", "list", "--node", "node-1"]));
    assert!(table.contains(&format!("{n1}:{only_a}")), "{table}");

    // Local policy: each node only uses its own endpoints, and keeps the client's address.
    let local = node_port(&lab, "local", "http");
    for (node, pod) in [(&n1, "x/a"), (&n2, "x/c")] {
        let r = lab.connect("external", &format!("{node}:{local}"), "tcp", 10);
        assert_eq!(r["ok"], 10, "{r}");
        assert_eq!(responder_names(&r), vec![pod], "via {node}: {r}");
        assert_eq!(client_ip_seen(&lab, &format!("{node}:{local}")), external);
    }
    // Without a local endpoint the node drops, with a reason.
    ok(&mut lab.kubectl(&[
        "delete",
        "pod",
        "c",
        "-n",
        "x",
        "--grace-period=0",
        "--force",
    ]));
    lab.eventually(
        "node-2 drops Local traffic",
        Duration::from_secs(20),
        || {
            let r = lab.connect("external", &format!("{n2}:{local}"), "tcp", 1);
            r["ok"] == 0 && metric(&lab, "node-2", "DROP_NO_SERVICE_BACKEND") > 0
        },
    );
    let r = lab.connect("external", &format!("{n1}:{local}"), "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");

    // The XDP prefilter: node-1 drops the external host's packets before anything else runs
    // (node-2 still answers it), counts them, and answers again once the prefix is out.
    let ns1 = node_netns(&lab, "node-1");
    let xdp_on_eth0 = || in_netns(&ns1, &["ip", "-d", "link", "show", "eth0"]).contains("prog/xdp");
    assert!(
        !xdp_on_eth0(),
        "no XDP program while the prefilter is empty"
    );
    let out = ok(&mut lab.weir(&[
        "prefilter",
        "add",
        "--node",
        "node-1",
        "172.30.0.1/30",
        "2001:db8:ffff::/48",
    ]));
    assert!(out.contains("172.30.0.0/30 added"), "{out}");
    assert!(xdp_on_eth0());
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 2);
    assert_eq!(r["ok"], 0, "{r}");
    let r = lab.connect("external", &format!("{n2}:{tcp}"), "tcp", 2);
    assert_eq!(r["ok"], 2, "{r}");
    let list: Value = serde_json::from_str(&ok(&mut lab.weir(&[
        "prefilter",
        "list",
        "--node",
        "node-1",
        "-o",
        "json",
    ])))
    .unwrap();
    let entry = |cidr: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["cidr"] == cidr)
            .cloned()
    };
    assert!(
        entry("172.30.0.0/30").unwrap()["packets"].as_u64().unwrap() > 0,
        "{list}"
    );
    assert_eq!(entry("2001:db8:ffff::/48").unwrap()["packets"], 0, "{list}");
    assert!(metric(&lab, "node-1", "DROP_PREFILTER") > 0);
    // Bad input names the prefix and changes nothing.
    let out = run(&mut lab.weir(&[
        "prefilter",
        "add",
        "--node",
        "node-1",
        "192.0.2.0/24",
        "10.0.0/8",
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"10.0.0/8\" is not an IP prefix"));
    let out = run(&mut lab.weir(&[
        "prefilter",
        "delete",
        "--node",
        "node-1",
        "172.30.0.0/30",
        "192.0.2.0/24",
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("192.0.2.0/24 is not in the prefilter"));
    let list = ok(&mut lab.weir(&["prefilter", "list", "--node", "node-1"]));
    assert_eq!(list.lines().count(), 3, "header and two prefixes: {list}");
    assert!(
        list.contains("172.30.0.0/30") && !list.contains("192.0.2.0"),
        "{list}"
    );
    ok(&mut lab.weir(&[
        "prefilter",
        "delete",
        "--node",
        "node-1",
        "172.30.0.0/30",
        "2001:db8:ffff::/48",
    ]));
    assert!(
        !xdp_on_eth0(),
        "the prefilter program left with the last prefix"
    );
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 2);
    assert_eq!(r["ok"], 2, "{r}");
}

/// An HTTP GET from the external host: (status code, body).
fn http_from_external(lab: &Lab, to: &str, path: &str) -> (u16, String) {
    let (host, port) = to.split_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port}; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = ok(&mut lab.weir(&["lab", "exec", "external", "--", "bash", "-c", &script]));
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out.rsplit("\r\n\r\n").next().unwrap().to_string())
}

#[test]
fn load_balancer_ips_and_health_check_node_ports() {
    load_balancer_ips_and_health_check_node_ports_on("ebpf");
}

#[test]
fn load_balancer_ips_and_health_check_node_ports_nftables() {
    load_balancer_ips_and_health_check_node_ports_on("nftables");
}

#[test]
fn load_balancer_ips_and_health_check_node_ports_iptables() {
    load_balancer_ips_and_health_check_node_ports_on("iptables");
}

fn load_balancer_ips_and_health_check_node_ports_on(dataplane: &str) {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: x}}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {{pod: a}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
    );
    let lab = Lab::up_with("lbhc", 2, &m, &["--dataplane", dataplane]);
    let svc = lab.get_json(&["svc", "lb", "-n", "x"]);
    let hc = svc["spec"]["healthCheckNodePort"].as_u64().unwrap();
    let (n1, n2) = (lab.node_ip("node-1"), lab.node_ip("node-2"));

    // node-1 has the Service's only endpoint: 200; node-2 has none: 503.
    lab.eventually("health checks served", Duration::from_secs(20), || {
        http_from_external(&lab, &format!("{n1}:{hc}"), "/healthz").0 == 200
    });
    let (code, body) = http_from_external(&lab, &format!("{n1}:{hc}"), "/healthz");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"service": {"namespace": "x", "name": "lb"}, "localEndpoints": 1})
    );
    let (code, body) = http_from_external(&lab, &format!("{n2}:{hc}"), "/healthz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["localEndpoints"],
        0
    );
    let status = ok(&mut lab.weir(&["status", "--node", "node-1", "-o", "json"]));
    assert!(status.contains(&format!("{hc}")), "{status}");

    // A LoadBalancer ingress IP, set in the Service's status by hand (as a cloud controller
    // would) and routed to node-1 by the external host, reaches the backend.
    ok(&mut lab.kubectl(&[
        "patch",
        "svc",
        "lb",
        "-n",
        "x",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"198.51.100.7"}]}}}"#,
    ]));
    ok(&mut lab.weir(&[
        "lab",
        "exec",
        "external",
        "--",
        "ip",
        "route",
        "replace",
        "198.51.100.7/32",
        "via",
        &n1,
    ]));
    lab.eventually(
        "the LoadBalancer IP answers",
        Duration::from_secs(20),
        || lab.connect("external", "198.51.100.7:80", "tcp", 1)["ok"] == 1,
    );
    let r = lab.connect("external", "198.51.100.7:80", "tcp", 5);
    assert_eq!(r["responders"]["x/a"], 5, "{r}");
    assert_eq!(r["peers"]["198.51.100.7:80"], 5, "{r}");

    // loadBalancerSourceRanges: a range without the external host drops its new flows (with
    // the reason counted); one with it admits them again. The NodePort is not affected.
    let np = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let ranges = |r: &str| {
        ok(&mut lab.kubectl(&[
            "patch",
            "svc",
            "lb",
            "-n",
            "x",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"loadBalancerSourceRanges":["{r}"]}}}}"#),
        ]));
    };
    ranges("10.0.0.0/8");
    lab.eventually("the external host refused", Duration::from_secs(20), || {
        lab.connect("external", "198.51.100.7:80", "tcp", 1)["ok"] == 0
            && (dataplane != "ebpf" || metric(&lab, "node-1", "DROP_SOURCE_RANGE") > 0)
    });
    let lb_list = ok(&mut lab.weir(&["bpf", "lb", "list", "--node", "node-1"]));
    assert!(lb_list.contains("from 10.0.0.0/8"), "{lb_list}");
    let r = lab.connect("external", &format!("{n1}:{np}"), "tcp", 2);
    assert_eq!(r["ok"], 2, "the NodePort ignores the ranges: {r}");
    ranges("172.30.0.0/24");
    lab.eventually(
        "the external host admitted",
        Duration::from_secs(20),
        || lab.connect("external", "198.51.100.7:80", "tcp", 1)["ok"] == 1,
    );
    let lb_list = ok(&mut lab.weir(&["bpf", "lb", "list", "--node", "node-1"]));
    assert!(
        lb_list.contains("from 172.30.0.0/24") && !lb_list.contains("10.0.0.0/8"),
        "the old range is gone: {lb_list}"
    );
}

#[test]
fn node_port_connections_survive_an_agent_restart() {
    node_port_connections_survive_an_agent_restart_on("ebpf");
}

#[test]
fn node_port_connections_survive_an_agent_restart_nftables() {
    node_port_connections_survive_an_agent_restart_on("nftables");
}

#[test]
fn node_port_connections_survive_an_agent_restart_iptables() {
    node_port_connections_survive_an_agent_restart_on("iptables");
}

fn node_port_connections_survive_an_agent_restart_on(dataplane: &str) {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        np_service("np", "app: np", "Cluster"),
    );
    let lab = Lab::up_with("npr", 2, &m, &["--dataplane", dataplane]);
    let tcp = node_port(&lab, "np", "http");
    let n1 = lab.node_ip("node-1");
    // Held TCP connections from outside (one of them SNATed to node-2's pod, most likely)
    // while node-1's agent is killed and restarted.
    let holders: Vec<_> = (0..4)
        .map(|_| lab.hold("external", &format!("{n1}:{tcp}"), "tcp", "3s"))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    kill9_matching(&format!("lab agent --cluster {} --node node-1", lab.name));
    std::thread::sleep(Duration::from_millis(300));
    let _agent = lab.restart_agent("node-1");
    for h in holders {
        let r = h.join().unwrap();
        assert_eq!(r["failed"], 0, "no message lost: {r}");
        assert_eq!(r["reconnects"], 0, "never reset: {r}");
    }
    // New flows work with the restarted agent.
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 6);
    assert_eq!(r["ok"], 6, "{r}");
}

#[test]
fn dsr_node_port_the_backends_node_answers_the_client_directly() {
    let m = dsr_manifest();
    let lab = Lab::up("dsr", 2, &m);
    let n1 = lab.node_ip("node-1");
    let (tcp, udp) = (
        node_port(&lab, "dsr", "http"),
        node_port(&lab, "dsr", "dns"),
    );
    let lb = ok(&mut lab.weir(&["bpf", "lb", "list", "--node", "node-1"]));
    assert!(lb.contains("dsr"), "{lb}");

    // Through node-1 to the pod on node-2: it answers, and it sees the client's own address.
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
    assert_eq!(r["peers"][format!("{n1}:{tcp}")], 5, "{r}");
    let r = lab.connect("external", &format!("{n1}:{udp}"), "udp", 5);
    assert_eq!(r["ok"], 5, "{r}");
    assert_eq!(
        client_ip_seen(&lab, &format!("{n1}:{tcp}")),
        "172.30.0.2",
        "no SNAT with DSR"
    );
    // node-1 keeps only the original direction; node-2 holds the reply entries it made from
    // the tunnel header, and its replies went straight to the client.
    let ct = |node: &str| -> Vec<Value> {
        serde_json::from_str::<Value>(&ok(
            &mut lab.weir(&["bpf", "ct", "list", "--node", node, "-o", "json"])
        ))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
    };
    let c1 = ct("node-1");
    assert!(!c1.is_empty());
    assert!(
        c1.iter().all(|e| e["direction"] == "original"
            && e["flags"].as_array().unwrap().iter().any(|f| f == "dsr")),
        "{c1:?}"
    );
    let c2 = ct("node-2");
    assert!(
        c2.iter().any(|e| e["direction"] == "reply"
            && e["nat"] == format!("{n1}:{tcp}")
            && e["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "seen-reply")),
        "{c2:?}"
    );
}

#[test]
fn without_socket_lb_pods_reach_cluster_ips_through_tc() {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: x}}\nspec:\n  ipFamilyPolicy: PreferDualStack\n  selector: {{app: np}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n",
        np_pod("a", "node-1"),
        np_pod("b", "node-1"),
        np_pod("c", "node-2"),
        pod("client", "node-1"),
    );
    let lab = Lab::up_with("nosock", 2, &m, &["--no-socket-lb"]);
    let vip = lab.get_json(&["svc", "np", "-n", "x"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    // TCP and UDP to the ClusterIP reach all three backends, on both nodes; the client's
    // socket sees the ClusterIP as its peer (replies are translated back at tc).
    let r = lab.connect("x/client", &format!("{vip}:80"), "tcp", 30);
    assert_eq!(r["ok"], 30, "{r}");
    assert_eq!(responder_names(&r), vec!["x/a", "x/b", "x/c"], "{r}");
    assert_eq!(r["peers"][format!("{vip}:80")], 30, "{r}");
    let r = lab.connect("x/client", &format!("{vip}:53"), "udp", 30);
    assert_eq!(r["ok"], 30, "{r}");
    assert_eq!(responder_names(&r), vec!["x/a", "x/b", "x/c"], "{r}");
    // The IPv6 ClusterIP too.
    let vip6 = lab.get_json(&["svc", "np", "-n", "x"])["spec"]["clusterIPs"][1]
        .as_str()
        .unwrap()
        .to_string();
    for (port, proto) in [(80, "tcp"), (53, "udp")] {
        let r = lab.connect("x/client", &format!("[{vip6}]:{port}"), proto, 30);
        assert_eq!(r["ok"], 30, "{proto}: {r}");
        assert_eq!(
            responder_names(&r),
            vec!["x/a", "x/b", "x/c"],
            "{proto}: {r}"
        );
        assert_eq!(r["peers"][format!("[{vip6}]:{port}")], 30, "{r}");
    }
    // The socket layer did none of it.
    let st: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["status", "--node", "node-1", "-o", "json"])
    ))
    .unwrap();
    let connects = st["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == "xlate_connect")
        .map(|c| c[1].as_u64().unwrap())
        .unwrap_or(0);
    assert_eq!(connects, 0, "{st}");
    // Conntrack on the client's node holds the flows to the ClusterIP.
    let ct = ok(&mut lab.weir(&["bpf", "ct", "list", "--node", "node-1"]));
    assert!(ct.contains(&format!("{vip}:80")), "{ct}");
    // explain from the client pod runs its veth's program.
    let client_ip = ip_of(&lab, "client", 0);
    let e: Value = serde_json::from_str(&ok(&mut lab.weir(&[
        "explain",
        "--node",
        "node-1",
        "--from",
        &format!("{client_ip}:40000"),
        "--to",
        &format!("{vip}:80"),
        "-o",
        "json",
    ])))
    .unwrap();
    assert_eq!(e["program"], "from_pod", "{e}");
    assert!(e["backend"].as_str().unwrap().ends_with(":8080"), "{e}");
    assert!(e["snat"].is_null(), "pods' flows are never SNATed: {e}");
}

#[test]
fn vxlan_mode_carries_pod_traffic_and_node_ports_between_nodes() {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        np_service("np", "app: np", "Cluster"),
    );
    let lab = Lab::up_with("vx", 2, &m, &["--tunnel", "vxlan"]);
    // No route to the other node's pods on the fabric: only the tunnel can carry them.
    let ns1 = node_netns(&lab, "node-1");
    assert_eq!(
        in_netns(&ns1, &["ip", "route", "show", "10.244.2.0/24"]).trim(),
        ""
    );
    for (port, proto) in [(8080, "tcp"), (5353, "udp")] {
        let m = lab.probe(port, proto, "pod-ip");
        let rows = m["rows"].as_object().unwrap();
        assert!(
            rows.values()
                .all(|r| r.as_object().unwrap().values().all(|v| v == true)),
            "{proto}/{port}: {m}"
        );
    }
    let c6 = ip_of(&lab, "c", 1);
    let r = lab.connect("x/a", &format!("[{c6}]:8080"), "tcp", 3);
    assert_eq!(r["ok"], 3, "IPv6 across the tunnel: {r}");
    for node in ["node-1", "node-2"] {
        assert!(metric(&lab, node, "REASON_FORWARD_TUNNEL") > 0, "{node}");
    }
    // NodePorts: the SNATed flow to the other node's backend goes through the tunnel too.
    let n1 = lab.node_ip("node-1");
    let tcp = node_port(&lab, "np", "http");
    let r = lab.connect("external", &format!("{n1}:{tcp}"), "tcp", 24);
    assert_eq!(r["ok"], 24, "{r}");
    assert_eq!(responder_names(&r), vec!["x/a", "x/c"], "{r}");
    // node-1 routes node-2's IPv4 and IPv6 pod CIDRs through the tunnel.
    let st: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["status", "--node", "node-1", "-o", "json"])
    ))
    .unwrap();
    assert_eq!(st["datapath"]["tunnel"], "vxlan0", "{st}");
    assert_eq!(st["datapath"]["tunnel_routes"], 2, "{st}");
    let text = ok(&mut lab.weir(&["status", "--node", "node-1"]));
    assert!(text.contains("VXLAN on vxlan0, 2 routes"), "{text}");

    // Outside the cluster (the external host has no route to the pods): masqueraded behind
    // the pod's node, TCP, UDP and ICMP echo; between pods, never.
    for (pod, node) in [("x/a", "node-1"), ("x/c", "node-2")] {
        let nip = lab.node_ip(node);
        for proto in ["tcp", "udp"] {
            let r = lab.connect(pod, "172.30.0.2:80", proto, 5);
            assert_eq!(r["responders"]["external"], 5, "{pod} {proto}: {r}");
            assert_eq!(r["seen_as"][&nip], 5, "{pod} {proto}: {r}");
        }
        let out = ok(&mut lab.weir(&[
            "lab",
            "exec",
            pod,
            "--",
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "172.30.0.2",
        ]));
        assert!(out.contains("2 received"), "{pod}: {out}");
    }
    let a4 = ip_of(&lab, "a", 0);
    let c4 = ip_of(&lab, "c", 0);
    let r = lab.connect("x/a", &format!("{c4}:8080"), "tcp", 3);
    assert_eq!(r["seen_as"][&a4], 3, "pod to pod keeps its address: {r}");
    let ct: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["bpf", "ct", "list", "--node", "node-1", "-o", "json"])
    ))
    .unwrap();
    let echo: Vec<&Value> = ct
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["proto"] == "ICMP")
        .collect();
    assert_eq!(echo.len(), 2, "the ping's two entries: {ct}");
    assert!(
        echo.iter().all(
            |e| e["flags"].as_array().unwrap().iter().any(|f| f == "masq")
                && e["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f == "seen-reply")
        ),
        "{echo:?}"
    );
}

#[test]
fn icmp_errors_reach_external_clients_through_node_ports() {
    icmp_errors_reach_external_clients_through_node_ports_on("ebpf");
}

#[test]
fn icmp_errors_reach_external_clients_through_node_ports_nftables() {
    icmp_errors_reach_external_clients_through_node_ports_on("nftables");
}

#[test]
fn icmp_errors_reach_external_clients_through_node_ports_iptables() {
    icmp_errors_reach_external_clients_through_node_ports_on("iptables");
}

fn icmp_errors_reach_external_clients_through_node_ports_on(dataplane: &str) {
    // UDP to a port the pod does not serve: the pod's node answers port unreachable, which
    // node-1 translates back (SNAT undone, quoted packet restored) to the external client.
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: closed, namespace: x}}\nspec:\n  type: NodePort\n  selector: {{pod: c}}\n  ports:\n  - {{name: dns, port: 53, targetPort: 5454, protocol: UDP}}\n",
        np_pod("c", "node-2"),
    );
    let lab = Lab::up_with("icmp", 2, &m, &["--dataplane", dataplane]);
    let n1 = lab.node_ip("node-1");
    let udp = node_port(&lab, "closed", "dns");
    let r = lab.connect("external", &format!("{n1}:{udp}"), "udp", 3);
    assert_eq!(r["errors"]["ECONNREFUSED"], 3, "{r}");

    // Native routing masquerades too (the lab's default): the pod's flows to the external
    // host leave behind its node, and a port it does not reach answers "unreachable" back
    // through the masquerade...
    let n2 = lab.node_ip("node-2");
    let r = lab.connect("x/c", "172.30.0.2:80", "udp", 3);
    assert_eq!(r["seen_as"][&n2], 3, "{r}");
    let r = lab.connect("x/c", "172.30.0.2:81", "udp", 2);
    assert_eq!(r["errors"]["ECONNREFUSED"], 2, "{r}");
    // ...while the external host, which routes the pod CIDRs, reaches the pod directly and
    // gets its answers from the pod's own address (UDP and ping).
    let c4 = ip_of(&lab, "c", 0);
    let r = lab.connect("external", &format!("{c4}:5353"), "udp", 3);
    assert_eq!(r["responders"]["x/c"], 3, "{r}");
    assert_eq!(r["peers"][format!("{c4}:5353")], 3, "{r}");
    let out = ok(&mut lab.weir(&[
        "lab", "exec", "external", "--", "ping", "-c", "2", "-i", "0.2", "-W", "2", &c4,
    ]));
    assert!(out.contains("2 received"), "{out}");
}

#[test]
fn lab_load_balancer_ips_maglev_consistent_across_nodes_and_affinity() {
    lab_load_balancer_ips_and_affinity("ebpf");
}

/// Under netfilter: the lab's LoadBalancer IPs over both nodes and session affinity (Maglev is
/// eBPF's: backends are chosen at random there).
#[test]
fn lab_load_balancer_ips_and_affinity_nftables() {
    lab_load_balancer_ips_and_affinity("nftables");
}

#[test]
fn lab_load_balancer_ips_and_affinity_iptables() {
    lab_load_balancer_ips_and_affinity("iptables");
}

fn lab_load_balancer_ips_and_affinity(dataplane: &str) {
    let lb = |name: &str, extra: &str, spec: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x{extra}}}\nspec:\n  type: LoadBalancer\n  selector: {{app: np}}\n{spec}  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n")
    };
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}{}{}",
        np_pod("a", "node-1"),
        np_pod("b", "node-1"),
        np_pod("c", "node-2"),
        np_pod("d", "node-2"),
        lb("mg", ", annotations: {weir.dev/lb-algorithm: maglev}", ""),
        lb("sticky", "", "  sessionAffinity: ClientIP\n"),
    );
    let lab = Lab::up_with("lbm", 2, &m, &["--dataplane", dataplane]);
    // The lab gives LoadBalancer Services an IP of its pool, in their status.
    let ingress = |svc: &str| -> Option<String> {
        lab.get_json(&["svc", svc, "-n", "x"])["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .map(str::to_string)
    };
    lab.eventually("LoadBalancer IPs assigned", Duration::from_secs(20), || {
        ingress("mg").is_some() && ingress("sticky").is_some()
    });
    let (mg, sticky) = (ingress("mg").unwrap(), ingress("sticky").unwrap());
    assert!(
        mg.starts_with("172.30.100.") && sticky.starts_with("172.30.100."),
        "{mg} {sticky}"
    );
    assert_ne!(mg, sticky);
    // The external host spreads connections over both nodes (ECMP); all are answered.
    lab.eventually(
        "the LoadBalancer IP answers",
        Duration::from_secs(20),
        || lab.connect("external", &format!("{mg}:80"), "tcp", 1)["ok"] == 1,
    );
    let r = lab.connect("external", &format!("{mg}:80"), "tcp", 40);
    assert_eq!(r["ok"], 40, "{r}");
    assert_eq!(responder_names(&r).len(), 4, "{r}");
    // Maglev: whichever node a flow reaches, it picks the same backend for it.
    let ports: &[u16] = if dataplane == "ebpf" {
        &[40000, 40001, 40002, 40003, 40004, 40005]
    } else {
        &[]
    };
    for &port in ports {
        let pick = |node: &str| -> String {
            let e: Value = serde_json::from_str(&ok(&mut lab.weir(&[
                "explain",
                "--node",
                node,
                "--from",
                &format!("172.30.0.2:{port}"),
                "--to",
                &format!("{mg}:80"),
                "-o",
                "json",
            ])))
            .unwrap();
            e["backend"].as_str().unwrap_or_default().to_string()
        };
        let (p1, p2) = (pick("node-1"), pick("node-2"));
        assert!(!p1.is_empty(), "port {port}");
        assert_eq!(p1, p2, "flow from port {port}");
    }
    // Session affinity from outside: one client, one backend (per node, as at the socket
    // layer; through node-1's NodePort here).
    let n1 = lab.node_ip("node-1");
    let np = node_port(&lab, "sticky", "http");
    let r = lab.connect("external", &format!("{n1}:{np}"), "tcp", 12);
    assert_eq!(r["ok"], 12, "{r}");
    assert_eq!(responder_names(&r).len(), 1, "affinity: {r}");
}

#[test]
fn xdp_node_ports_give_the_same_results_as_tc() {
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        np_service("np", "app: np", "Cluster"),
        np_service("only-c", "pod: c", "Cluster"),
    );
    let lab = Lab::up_with("xdp", 2, &m, &["--xdp"]);
    let n1 = lab.node_ip("node-1");
    let (tcp, udp) = (node_port(&lab, "np", "http"), node_port(&lab, "np", "dns"));
    // The same checks as with tc: both backends, TCP and UDP, through node-1.
    assert_node_port_reaches(&lab, &n1, (tcp, udp), &["x/a", "x/c"]);
    // The SNATed flows (to node-2's pod) were completed at XDP, both directions; the local
    // pod's went on to tc; the source address seen is the same as with tc.
    let only_c = node_port(&lab, "only-c", "http");
    assert_eq!(client_ip_seen(&lab, &format!("{n1}:{only_c}")), n1);
    assert!(
        metric(&lab, "node-1", "REASON_XDP_TX") + metric(&lab, "node-1", "REASON_XDP_REDIRECT") > 0
    );
    assert!(metric(&lab, "node-1", "REASON_FORWARD_PEER") > 0);
    let st: Value = serde_json::from_str(&ok(
        &mut lab.weir(&["status", "--node", "node-1", "-o", "json"])
    ))
    .unwrap();
    assert_eq!(st["datapath"]["xdp"], true, "{st}");
}

#[test]
fn ipv6_node_ports_from_outside_reach_both_nodes_backends() {
    ipv6_node_ports_from_outside_reach_both_nodes_backends_on("ebpf");
}

#[test]
fn ipv6_node_ports_from_outside_reach_both_nodes_backends_nftables() {
    ipv6_node_ports_from_outside_reach_both_nodes_backends_on("nftables");
}

#[test]
fn ipv6_node_ports_from_outside_reach_both_nodes_backends_iptables() {
    ipv6_node_ports_from_outside_reach_both_nodes_backends_on("iptables");
}

fn ipv6_node_ports_from_outside_reach_both_nodes_backends_on(dataplane: &str) {
    let svc = |name: &str, pod: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  type: NodePort\n  ipFamilyPolicy: PreferDualStack\n  selector: {{pod: {pod}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n")
    };
    let m = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n{}{}{}{}",
        np_pod("a", "node-1"),
        np_pod("c", "node-2"),
        svc("to-a", "a"),
        svc("to-c", "c"),
    );
    let lab = Lab::up_with("np6", 2, &m, &["--dataplane", dataplane]);
    let (n1, ext) = (lab.node_ip6("node-1"), lab.node_ip6("external"));
    // Through node-1's IPv6 address: the local pod sees the client, the other node's pod sees
    // node-1 (SNAT); TCP and UDP.
    for (svc, pod, seen) in [("to-a", "x/a", &ext), ("to-c", "x/c", &n1)] {
        for (port, proto) in [("http", "tcp"), ("dns", "udp")] {
            let np = node_port(&lab, svc, port);
            let r = lab.connect("external", &format!("[{n1}]:{np}"), proto, 4);
            assert_eq!(r["responders"][pod], 4, "{svc} {proto}: {r}");
            assert_eq!(r["seen_as"][seen.as_str()], 4, "{svc} {proto}: {r}");
        }
    }
    // The flows are in node-1's IPv6 conntrack (the BPF one under eBPF), and `weir explain`
    // follows an IPv6 packet to the local backend.
    if dataplane == "ebpf" {
        let ct = ok(&mut lab.weir(&["bpf", "ct", "list", "--node", "node-1"]));
        assert!(ct.contains(&format!("[{n1}]:")), "{ct}");
        let np = node_port(&lab, "to-a", "http");
        let e: Value = serde_json::from_str(&ok(&mut lab.weir(&[
            "explain",
            "--node",
            "node-1",
            "--from",
            &format!("[{ext}]:40000"),
            "--to",
            &format!("[{n1}]:{np}"),
            "-o",
            "json",
        ])))
        .unwrap();
        assert_eq!(e["verdict"], "redirect", "{e}");
        assert!(e["backend"].as_str().unwrap().ends_with("]:8080"), "{e}");
        assert!(e["output"].as_str().unwrap().contains(&ext), "{e}");
    }
}
