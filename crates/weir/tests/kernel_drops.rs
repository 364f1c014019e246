//! Kernel drops and TCP health end to end: packets the kernel drops on a node outside weir's
//! programs (here nftables' NetworkPolicy rules, and datagrams to a port nobody listens on,
//! on the node and in a pod's own namespace) show up in `weir observe --reason` with the
//! kernel's reason and the pod they belong to, and in `weir_kernel_drops_total`; the pods'
//! connects, failures, retransmits and RTT in the `weir_tcp_*` metrics by namespace and
//! workload.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Namespace m's pods `web` (app=web, port 8080) and `client`.
macro_rules! web_and_client {
    () => {
        r#"---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: m, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: m}
spec: {containers: [{name: c, image: i}]}
"#
    };
}

const APP: &str = concat!(
    r#"
apiVersion: v1
kind: Namespace
metadata: {name: m}
---
apiVersion: v1
kind: Pod
metadata: {name: shut, namespace: m, labels: {app: shut}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
"#,
    web_and_client!(),
    r#"---
apiVersion: v1
kind: Service
metadata: {name: shut, namespace: m}
spec: {selector: {app: shut}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: m}
spec: {podSelector: {matchLabels: {app: shut}}, policyTypes: [Ingress]}
"#
);

/// The first node's `/metrics`.
fn metrics(lab: &Lab) -> String {
    let nodes: Value =
        serde_json::from_str(&ok(&mut lab.weir(&["lab", "nodes", "-o", "json"]))).unwrap();
    let url = nodes[0]["metricsURL"].as_str().unwrap();
    http_get(url, Duration::from_secs(10)).unwrap().1
}

/// The sum of the samples of the first node's `/metrics` whose line starts with `series`
/// (a name with labels, or the start of them).
fn metric(lab: &Lab, series: &str) -> f64 {
    metrics(lab)
        .lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// The kernel drops `weir observe --reason REASON` lists, as JSON records.
fn observed(lab: &Lab, reason: &str) -> Vec<Value> {
    ok(&mut lab.weir(&["observe", "--reason", reason, "--last", "100", "-o", "json"]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn kernel_drops_and_tcp_health_are_observed_by_pod_and_workload() {
    let lab = Lab::up_with("kdrop", 1, APP, &["--dataplane", "nftables"]);
    let shut = lab.get_json(&["pod", "shut", "-n", "m"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    // nftables' policy rules drop the client's SYNs to the isolated pod.
    lab.eventually("the policy in force", Duration::from_secs(20), || {
        lab.connect("m/client", &format!("{shut}:8080"), "tcp", 1)["ok"] == 0
    });
    let mut drops = Vec::new();
    lab.eventually("the drops observed", Duration::from_secs(10), || {
        drops = observed(&lab, "NETFILTER_DROP");
        !drops.is_empty()
    });
    let d = &drops[0];
    assert_eq!(d["event"], "kernel-drop", "{d}");
    assert_eq!(d["verdict"], "dropped", "{d}");
    assert_eq!(d["reason"], "NETFILTER_DROP", "{d}");
    assert_eq!(d["protocol"], "tcp", "{d}");
    assert_eq!(d["direction"], "ingress", "{d}");
    assert_eq!(d["destination"]["pod"], "m/shut", "{d}");
    assert_eq!(d["destination"]["port"], 8080, "{d}");
    assert_eq!(d["source"]["pod"], "m/client", "{d}");
    // A datagram to the node on a port nobody listens on: the UDP stack drops it.
    let node = lab.node_ip("node-1");
    lab.connect("m/client", &format!("{node}:9"), "udp", 2);
    let mut drops = Vec::new();
    lab.eventually("the socket drops observed", Duration::from_secs(10), || {
        drops = observed(&lab, "no_socket");
        drops.iter().any(|d| d["destination"]["port"] == 9)
    });
    let d = drops
        .iter()
        .find(|d| d["destination"]["port"] == 9)
        .unwrap();
    assert_eq!(d["direction"], "egress", "{d}");
    assert_eq!(d["source"]["pod"], "m/client", "{d}");
    // A datagram to a pod on a port nobody listens on there: the pod's own UDP stack drops
    // it, in the pod's network namespace (watched as the node's is).
    let web = lab.get_json(&["pod", "web", "-n", "m"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    lab.eventually(
        "the pod's socket drops observed",
        Duration::from_secs(20),
        || {
            lab.connect("m/client", &format!("{web}:9"), "udp", 2);
            observed(&lab, "NO_SOCKET").iter().any(|d| {
                d["destination"]["pod"] == "m/web"
                    && d["destination"]["port"] == 9
                    && d["source"]["pod"] == "m/client"
                    && d["direction"] == "ingress"
            })
        },
    );
    // Through the Service: the drop names it; Hubble's filters find it.
    lab.connect("m/client", "shut.m:80", "tcp", 1);
    let find = |args: &[&str]| -> Vec<Value> {
        let mut a = vec!["observe", "--last", "100", "-o", "json"];
        a.extend_from_slice(args);
        ok(&mut lab.weir(&a))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    lab.eventually(
        "the drop through the Service",
        Duration::from_secs(10),
        || !find(&["--service", "m/shut"]).is_empty(),
    );
    let via = find(&[
        "--service",
        "m/shut",
        "--to-label",
        "app=shut",
        "--from-namespace",
        "m",
    ]);
    assert!(
        via.iter()
            .all(|d| d["service"] == "m/shut" && d["destination"]["workload"] == "shut"),
        "{via:?}"
    );
    assert!(
        via.iter()
            .all(|d| d["destination"]["labels"]["app"] == "shut"),
        "{via:?}"
    );
    assert!(find(&["--service", "m/shut", "--from-label", "app=shut"]).is_empty());
    let not_socket = find(&["--from-pod", "m/client", "--not", "--reason", "NO_SOCKET"]);
    assert!(!not_socket.is_empty() && not_socket.iter().all(|d| d["reason"] != "NO_SOCKET"));
    assert!(find(&["--protocol", "udp", "--port", "9"])
        .iter()
        .all(|d| d["reason"] == "NO_SOCKET"));
    // (Dropped ones: the client's TCP health towards m/shut is a flow to it too, logged at
    // any round.)
    let table = ok(&mut lab.weir(&[
        "observe",
        "--to-pod",
        "m/shut",
        "--verdict",
        "dropped",
        "-o",
        "table",
        "--last",
        "2",
    ]));
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("TIME"), "{table}");
    assert!(
        lines.all(|l| l.contains("m/shut:8080") && l.contains("DROPPED (kernel)")),
        "{table}"
    );
    // The text form says who dropped it.
    let text = ok(&mut lab.weir(&["observe", "--reason", "NETFILTER_DROP", "--last", "1"]));
    assert!(
        text.contains("DROPPED by the kernel (NETFILTER_DROP)"),
        "{text}"
    );
    // The kernel's counts on /metrics.
    let count = |reason: &str| {
        metric(
            &lab,
            &format!("weir_kernel_drops_total{{reason=\"{reason}\"}}"),
        )
    };
    lab.eventually("the metrics", Duration::from_secs(10), || {
        count("NETFILTER_DROP") >= 1.0 && count("NO_SOCKET") >= 2.0
    });
    // TCP health: the client's connects to web work, its connects to the isolated pod fail
    // after retransmitted SYNs; by namespace and workload, never by pod address.
    let tcp = |series: &str| metric(&lab, series);
    let client = "namespace=\"m\",workload=\"client\"";
    let established = format!("weir_tcp_connects_total{{{client},outcome=\"established\"}}");
    // (The pods are watched within a few seconds of their start.)
    lab.eventually("the connects counted", Duration::from_secs(15), || {
        lab.connect("m/client", &format!("{web}:8080"), "tcp", 1)["ok"] == 1
            && tcp(&established) >= 1.0
    });
    // A connect whose SYNs the policy drops: retransmitted after a second, then given up.
    let r = run(&mut lab.weir(&[
        "lab",
        "connect",
        "--from",
        "m/client",
        "--to",
        &format!("{shut}:8080"),
        "--timeout",
        "2500ms",
        "-o",
        "json",
    ]));
    assert!(String::from_utf8_lossy(&r.stdout).contains("\"ok\":0"));
    lab.eventually("the TCP health metrics", Duration::from_secs(15), || {
        tcp(&established) >= 1.0
            && tcp(&format!(
                "weir_tcp_connects_total{{{client},outcome=\"failed\"}}"
            )) >= 1.0
            && tcp(&format!("weir_tcp_retransmits_total{{{client}}}")) >= 1.0
            && tcp(&format!("weir_tcp_rtt_samples_total{{{client}}}")) >= 1.0
    });
    let body = metrics(&lab);
    assert!(
        !body
            .lines()
            .any(|l| l.starts_with("weir_tcp") && l.contains(&web)),
        "no address in a label"
    );
    // The workload's series go with its last pod on the node.
    let out = run(&mut lab.kubectl(&[
        "delete",
        "pod",
        "client",
        "-n",
        "m",
        "--grace-period=0",
        "--force",
    ]));
    assert!(out.status.success(), "{out:?}");
    lab.eventually("the client's series gone", Duration::from_secs(30), || {
        !metrics(&lab)
            .lines()
            .any(|l| l.starts_with("weir_tcp_") && l.contains(client))
    });
}

const EBPF_APP: &str = concat!(
    r#"
apiVersion: v1
kind: Namespace
metadata: {name: m}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: m}
spec:
  type: NodePort
  selector: {app: none}
  ports:
  - {port: 80, targetPort: 8080}
"#,
    web_and_client!(),
    r#"---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: m}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-alt, namespace: m}
spec: {selector: {app: web}, ports: [{port: 81, targetPort: 8080}]}
"#
);

/// `weir observe -o json` with `args`, as JSON records.
fn observe_json(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "--last", "200", "-o", "json"];
    all.extend_from_slice(args);
    ok(&mut lab.weir(&all))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The drops of weir's own programs other than policy's are flows too, with the reason in
/// words: a NodePort without a backend under eBPF. tc's own drop reason (`TC_INGRESS`) for
/// the same packet is not logged twice. The socket layer's translations and refusals and the
/// tc programs' forwarding summaries are flows as well, and counted per Service.
#[test]
fn drops_of_weirs_programs_are_observed_with_the_reason_in_words() {
    let lab = Lab::up("wdrop", 1, EBPF_APP);
    let port = lab.get_json(&["svc", "nobody", "-n", "m"])["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap();
    let node = lab.node_ip("node-1");
    let r = lab.connect("external", &format!("{node}:{port}"), "tcp", 2);
    assert_eq!(r["ok"], 0, "{r}");
    let mut drops = Vec::new();
    lab.eventually("the drops observed", Duration::from_secs(10), || {
        drops = observed(&lab, "NO_SERVICE_BACKEND");
        !drops.is_empty()
    });
    let d = &drops[0];
    assert_eq!(d["event"], "drop", "{d}");
    assert_eq!(d["reason"], "DROP_NO_SERVICE_BACKEND", "{d}");
    assert!(
        d["reason_text"]
            .as_str()
            .unwrap()
            .contains("without usable backend"),
        "{d}"
    );
    assert_eq!(d["destination"]["port"], port, "{d}");
    assert_eq!(d["source"]["ip"], "172.30.0.2", "{d}");
    assert!(observed(&lab, "TC_INGRESS").is_empty());
    translations_and_summaries_are_observed(&lab);
}

/// A pod's connect to a Service is a `trace-sock` flow (translated, with the Service, the
/// client pod and the address it asked for), its packets `trace` summaries (the SYN's first);
/// a connect to a Service without endpoints is refused at the socket and said so; the
/// connections are counted per Service, the TCP flags by flag.
fn translations_and_summaries_are_observed(lab: &Lab) {
    let vip = lab.get_json(&["svc", "web", "-n", "m"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let nobody = lab.get_json(&["svc", "nobody", "-n", "m"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let r = lab.connect("m/client", &format!("{vip}:80"), "tcp", 2);
    assert_eq!(r["ok"], 2, "{r}");
    let r = lab.connect("m/client", &format!("{nobody}:80"), "tcp", 1);
    assert_eq!(r["ok"], 0, "{r}");
    let (mut xlate, mut refused, mut traces) = (Vec::new(), Vec::new(), Vec::new());
    lab.eventually("the translations observed", Duration::from_secs(10), || {
        xlate = observe_json(lab, &["-t", "trace-sock", "--verdict", "translated"]);
        refused = observe_json(lab, &["--type", "trace-sock", "--verdict", "dropped"]);
        traces = observe_json(
            lab,
            &["-t", "trace", "--from-pod", "m/client", "--to-pod", "m/web"],
        );
        // The SYN's summary may come a drain after later ones (another CPU's ring).
        xlate.len() >= 2 && !refused.is_empty() && traces.iter().any(|t| t["tcp_flags"] == "SYN")
    });
    let x = &xlate[0];
    assert_eq!(x["reason"], "XLATE_CONNECT", "{x}");
    assert_eq!(x["service"], "m/web", "{x}");
    assert_eq!(x["source"]["pod"], "m/client", "{x}");
    assert_eq!(x["destination"]["pod"], "m/web", "{x}");
    assert_eq!(x["destination"]["port"], 8080, "{x}");
    assert_eq!(x["translation"]["point"], "connect", "{x}");
    assert_eq!(x["translation"]["destination"], format!("{vip}:80"), "{x}");
    let f = &refused[0];
    assert_eq!(f["reason"], "DROP_NO_SERVICE_BACKEND", "{f}");
    assert_eq!(f["service"], "m/nobody", "{f}");
    assert_eq!(f["source"]["pod"], "m/client", "{f}");
    // The SYN's summary opens each connection's: the packets as they left from_pod.
    let t = traces
        .iter()
        .find(|t| t["tcp_flags"] == "SYN")
        .expect("a SYN's summary");
    assert_eq!(t["verdict"], "forwarded", "{t}");
    assert_eq!(t["reason"], "REASON_FORWARD_PEER", "{t}");
    assert_eq!(t["tcp_flags"], "SYN", "{t}");
    assert_eq!(t["packets"], 1, "{t}");
    assert_eq!(t["service"], "m/web", "{t}");
    assert_eq!(t["destination"]["port"], 8080, "{t}");
    // The text form: flags, packets, and the Service of the socket translation.
    let text = ok(&mut lab.weir(&[
        "observe",
        "-t",
        "trace-sock",
        "--verdict",
        "translated",
        "--last",
        "1",
    ]));
    assert!(
        text.contains("TRANSLATED (XLATE_CONNECT) via m/web"),
        "{text}"
    );
    // Per Service, per flag.
    let series = |s: &str| metric(lab, s);
    lab.eventually("the connection metrics", Duration::from_secs(10), || {
        series("weir_service_connections_total{namespace=\"m\",service=\"web\",outcome=\"translated\"}") >= 2.0
            && series("weir_service_connections_total{namespace=\"m\",service=\"nobody\",outcome=\"refused\"}")
                >= 2.0
            && series("weir_tcp_flags_total{flag=\"SYN\",family=\"ipv4\"}") >= 2.0
            && series("weir_tcp_flags_total{flag=\"SYN-ACK\",family=\"ipv4\"}") >= 2.0
    });
    tcp_health_is_observed_per_peer_and_service(lab);
}

/// The client's connects to the Service, as its sockets went through them: `tcp-health`
/// flows from the client pod to the backend (with the Service), and the Service's
/// `weir_service_tcp_*` series.
fn tcp_health_is_observed_per_peer_and_service(lab: &Lab) {
    let vip = lab.get_json(&["svc", "web", "-n", "m"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let mut health = Vec::new();
    lab.eventually("the TCP health per peer", Duration::from_secs(20), || {
        // The agent watches a pod's sockets from its first round after the pod started:
        // connect again until two connects were seen.
        lab.connect("m/client", &format!("{vip}:80"), "tcp", 1);
        health = observe_json(lab, &["-t", "tcp-health", "--from-pod", "m/client"]);
        health
            .iter()
            .filter(|h| h["service"] == "m/web")
            .map(|h| h["tcp"]["connects"].as_u64().unwrap())
            .sum::<u64>()
            >= 2
    });
    let h = health.iter().find(|h| h["service"] == "m/web").unwrap();
    assert_eq!(h["verdict"], "traced", "{h}");
    assert_eq!(h["destination"]["pod"], "m/web", "{h}");
    assert_eq!(h["destination"]["port"], 8080, "{h}");
    assert!(
        h["reason_text"].as_str().unwrap().contains("connect"),
        "{h}"
    );
    let series = |s: &str| metric(lab, s);
    lab.eventually("the Service's TCP health", Duration::from_secs(10), || {
        series("weir_service_tcp_connects_total{namespace=\"m\",service=\"web\",outcome=\"established\"}")
            >= 2.0
    });
    // A second Service of the same backend: its connects are its own (the frontend each
    // socket asked for), while those through the first stay the first's (one name per
    // backend would give every connect to one of them).
    let alt = lab.get_json(&["svc", "web-alt", "-n", "m"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    lab.eventually(
        "the second Service's TCP health",
        Duration::from_secs(20),
        || {
            lab.connect("m/client", &format!("{alt}:81"), "tcp", 1);
            health = observe_json(lab, &["-t", "tcp-health", "--from-pod", "m/client"]);
            health.iter().any(|h| h["service"] == "m/web-alt")
        },
    );
    let h = health.iter().find(|h| h["service"] == "m/web-alt").unwrap();
    assert_eq!(h["destination"]["pod"], "m/web", "{h}");
    assert!(health.iter().any(|h| h["service"] == "m/web"), "{health:?}");
    lab.eventually("web-alt's series", Duration::from_secs(10), || {
        series("weir_service_tcp_connects_total{namespace=\"m\",service=\"web-alt\",outcome=\"established\"}")
            >= 1.0
    });
}
