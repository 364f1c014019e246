//! ClusterIP load balancing end to end in labs: at the socket layer (real programs in the
//! nodes' pod cgroups) and, for the tests that run on every dataplane, in nftables; real
//! sockets from inside pods.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: lb}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: lb, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: lb, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: lb, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 9090}, {name: dns, containerPort: 5353, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: lb, labels: {app: client}}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: lb}
spec:
  selector: {app: web}
  ipFamilyPolicy: PreferDualStack
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: lb}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: brief, namespace: lb}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: maglev, namespace: lb, annotations: {weir.dev/lb-algorithm: maglev}}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: lb}
spec:
  selector: {app: nothing}
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
"#;

fn responders(r: &Value) -> BTreeSet<String> {
    r["responders"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn webs() -> BTreeSet<String> {
    ["lb/web-1", "lb/web-2", "lb/web-3"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn lb_list(lab: &Lab, node: &str) -> Value {
    serde_json::from_str(&ok(
        &mut lab.weir(&["bpf", "lb", "list", "--node", node, "-o", "json"])
    ))
    .unwrap()
}

#[test]
fn clusterip_tcp_udp_ipv4_ipv6_across_nodes() {
    clusterip_across_nodes("ebpf");
}

#[test]
fn clusterip_tcp_udp_ipv4_ipv6_across_nodes_nftables() {
    clusterip_across_nodes("nftables");
}

#[test]
fn clusterip_tcp_udp_ipv4_ipv6_across_nodes_iptables() {
    clusterip_across_nodes("iptables");
}

/// The same Service semantics on every dataplane (the eBPF one translates at the socket
/// layer, the netfilter ones per packet: getpeername shows the VIP in both).
fn clusterip_across_nodes(dataplane: &str) {
    let lab = Lab::up_with("cip", 2, APP, &["--dataplane", dataplane]);
    // TCP through the VIP reaches all three pods on both nodes, with the named targetPort
    // resolved per pod (web-3 serves http on 9090), and getpeername shows the VIP.
    let svc = lab.get_json(&["svc", "web", "-n", "lb"]);
    let vip4 = svc["spec"]["clusterIPs"][0].as_str().unwrap().to_string();
    let vip6 = svc["spec"]["clusterIPs"][1].as_str().unwrap().to_string();
    let r = lab.connect("lb/client", "web.lb:80", "tcp", 60);
    assert_eq!(r["ok"], 60, "{r}");
    assert_eq!(responders(&r), webs(), "{r}");
    assert_eq!(
        r["peers"][format!("{vip4}:80")],
        60,
        "the socket layer is transparent: {r}"
    );
    // UDP (unconnected sendmsg/recvmsg would be the same path; the helper uses connected
    // sockets, which go through connect).
    let r = lab.connect("lb/client", "web.lb:53", "udp", 60);
    assert_eq!(r["ok"], 60, "{r}");
    assert_eq!(responders(&r), webs(), "{r}");
    // IPv6 ClusterIP.
    let r = lab.connect("lb/client", &format!("[{vip6}]:80"), "tcp", 40);
    assert_eq!(r["ok"], 40, "{r}");
    assert_eq!(responders(&r), webs(), "{r}");
    assert_eq!(r["peers"][format!("[{vip6}]:80")], 40, "{r}");
    let r = lab.connect("lb/client", &format!("[{vip6}]:53"), "udp", 40);
    assert_eq!(responders(&r), webs(), "{r}");
    // Processes of the node itself (in the node's cgroup) reach ClusterIPs too, as with
    // kube-proxy; the external host, outside the cluster, does not.
    let r = lab.connect("node-2", "web.lb:80", "tcp", 6);
    assert_eq!(r["ok"], 6, "{r}");
    let r = lab.connect("external", &format!("{vip4}:80"), "tcp", 2);
    assert_eq!(r["ok"], 0, "{r}");
    // Both nodes' datapaths hold the same frontends.
    let a = lb_list(&lab, "node-1");
    let b = lb_list(&lab, "node-2");
    let keys = |d: &Value| {
        d["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["key"].to_string())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(keys(&a), keys(&b));
    let table = ok(&mut lab.weir(&["bpf", "lb", "list"]));
    assert!(table.contains(&format!("{vip4}:80/TCP")), "{table}");
    let status = ok(&mut lab.weir(&["status", "--node", "node-2"]));
    assert!(
        status.contains("in sync") && status.contains(&format!("Dataplane:     {dataplane}")),
        "{status}"
    );
    if dataplane == "ebpf" {
        assert!(
            status.contains("sock4_connect") && status.contains("weir_lb4_svc"),
            "{status}"
        );
    } else {
        assert!(
            status.contains("lb/maglev: Maglev is not available"),
            "{status}"
        );
    }
}

#[test]
fn no_endpoints_refused_at_once_affinity_and_maglev() {
    let lab = Lab::up("cip2", 1, APP);
    let r = lab.connect("lb/client", "empty.lb:80", "tcp", 5);
    assert_eq!(r["errors"]["ECONNREFUSED"], 5, "{r}");
    let r = lab.connect("lb/client", "empty.lb:53", "udp", 5);
    assert_eq!(r["errors"]["ECONNREFUSED"], 5, "{r}");
    // Session affinity: every connection from one client goes to one backend.
    let r = lab.connect("lb/client", "sticky.lb:80", "tcp", 30);
    assert_eq!(r["ok"], 30, "{r}");
    assert_eq!(responders(&r).len(), 1, "{r}");
    let list = lb_list(&lab, "node-1");
    assert!(!list["affinity"].as_array().unwrap().is_empty());
    // Maglev, chosen by annotation: a table of a prime size over 100 x 3 backends.
    let fe = list["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["maglev_size"].is_u64())
        .expect("a maglev frontend")
        .clone();
    assert_eq!(fe["maglev_size"], 307);
    let r = lab.connect("lb/client", "maglev.lb:80", "tcp", 60);
    assert_eq!(r["ok"], 60, "{r}");
    assert_eq!(responders(&r), webs(), "{r}");
    let counters = &list["counters"];
    assert!(
        counters
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c[0] == "no_backend" && c[1].as_u64().unwrap() >= 10),
        "{counters}"
    );
}

#[test]
fn lab_wide_maglev_default() {
    let lab = Lab::up_with("cip7", 1, APP, &["--lb-algorithm", "maglev"]);
    let list = lb_list(&lab, "node-1");
    for f in list["frontends"].as_array().unwrap() {
        if !f["backends"].as_array().unwrap().is_empty() {
            assert!(
                f["maglev_size"].as_u64().unwrap() > 100,
                "every Service uses Maglev: {f}"
            );
        }
    }
    let r = lab.connect("lb/client", "web.lb:80", "tcp", 30);
    assert_eq!(responders(&r), webs(), "{r}");
}

fn counter(lab: &Lab, name: &str) -> u64 {
    lb_list(lab, "node-1")["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap()
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let lab = Lab::up("cip6", 1, APP);
    let hits = counter(&lab, "affinity_hit");
    // First connection picks a backend and remembers it; the second, right after, is a hit.
    lab.connect("lb/client", "brief.lb:80", "tcp", 1);
    lab.connect("lb/client", "brief.lb:80", "tcp", 1);
    assert_eq!(counter(&lab, "affinity_hit"), hits + 1);
    // After the 1 s timeout (the clock has whole seconds) the entry is stale: no hit.
    std::thread::sleep(Duration::from_millis(2600));
    let r = lab.connect("lb/client", "brief.lb:80", "tcp", 1);
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(
        counter(&lab, "affinity_hit"),
        hits + 1,
        "an expired affinity entry must not be used"
    );
    // ... and a new one was remembered: the next connection right after is a hit again.
    lab.connect("lb/client", "brief.lb:80", "tcp", 1);
    assert_eq!(counter(&lab, "affinity_hit"), hits + 2);
}

#[test]
fn endpoints_follow_scale_termination_and_fallback() {
    endpoints_follow_scale("ebpf");
}

#[test]
fn endpoints_follow_scale_termination_and_fallback_nftables() {
    endpoints_follow_scale("nftables");
}

#[test]
fn endpoints_follow_scale_termination_and_fallback_iptables() {
    endpoints_follow_scale("iptables");
}

fn endpoints_follow_scale(dataplane: &str) {
    let manifest = r#"
apiVersion: v1
kind: Namespace
metadata: {name: t}
---
apiVersion: v1
kind: Pod
metadata: {name: solo-1, namespace: t, labels: {app: solo}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: t}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Service
metadata: {name: solo, namespace: t}
spec:
  selector: {app: solo}
  ports: [{port: 80, targetPort: 8080}]
"#;
    let lab = Lab::up_with("cip3", 1, manifest, &["--dataplane", dataplane]);
    let t = Duration::from_secs(20);
    let only = |who: &str| {
        let r = lab.connect("t/client", "solo.t:80", "tcp", 10);
        r["ok"] == 10 && responders(&r) == [who.to_string()].into_iter().collect()
    };
    assert!(only("t/solo-1"));
    // Scale up while clients connect: the new pod takes its share.
    let out = lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: solo-2, namespace: t, labels: {app: solo}}\nspec: {containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}\n");
    assert!(out.status.success());
    lab.eventually("solo-2 takes traffic", t, || {
        responders(&lab.connect("t/client", "solo.t:80", "tcp", 20)).contains("t/solo-2")
    });
    // solo-1 terminates (serving+terminating): new connections go to ready solo-2 only.
    ok(&mut lab.weir(&["lab", "terminate", "t/solo-1"]));
    lab.eventually("only solo-2 while solo-1 terminates", t, || {
        only("t/solo-2")
    });
    // solo-2 terminates too: nothing is ready, so the serving+terminating endpoints are used
    // (KEP-1669) instead of refusing.
    ok(&mut lab.weir(&["lab", "terminate", "t/solo-2"]));
    lab.eventually("terminating fallback", t, || {
        let r = lab.connect("t/client", "solo.t:80", "tcp", 20);
        r["ok"] == 20 && responders(&r).len() == 2
    });
    // Both gone: refused at once.
    ok(&mut lab.kubectl(&[
        "delete",
        "pod",
        "solo-1",
        "solo-2",
        "-n",
        "t",
        "--grace-period=0",
        "--force",
    ]));
    lab.eventually("refused when no endpoint is left", t, || {
        lab.connect("t/client", "solo.t:80", "tcp", 3)["errors"]["ECONNREFUSED"] == 3
    });
}

/// Holds one connected UDP socket to the VIP while each backend in turn leaves the Service
/// and comes back; returns what the holder saw.
fn udp_hold_while_backends_leave(dataplane: &str) -> Value {
    let lab = Lab::up_with("cip4", 1, APP, &["--dataplane", dataplane]);
    let holder = lab.hold("lb/client", "web.lb:53", "udp", "4s");
    std::thread::sleep(Duration::from_millis(1000));
    for p in ["web-1", "web-2", "web-3"] {
        ok(&mut lab.kubectl(&["label", "pod", p, "-n", "lb", "app=out", "--overwrite"]));
        std::thread::sleep(Duration::from_millis(300));
        ok(&mut lab.kubectl(&["label", "pod", p, "-n", "lb", "app=web", "--overwrite"]));
    }
    holder.join().unwrap()
}

/// Under netfilter the socket stays: its conntrack entry is deleted when its backend leaves
/// (the stale-UDP reconciliation), so its next datagram goes to another backend.
#[test]
fn connected_udp_moves_off_a_removed_backend_nftables() {
    let r = udp_hold_while_backends_leave("nftables");
    assert!(
        responders(&r).len() >= 2,
        "the flow moved to another backend: {r}"
    );
}

#[test]
fn connected_udp_moves_off_a_removed_backend_iptables() {
    let r = udp_hold_while_backends_leave("iptables");
    assert!(
        responders(&r).len() >= 2,
        "the flow moved to another backend: {r}"
    );
}

#[test]
fn connected_udp_moves_off_a_removed_backend() {
    let r = udp_hold_while_backends_leave("ebpf");
    assert!(
        r["reconnects"].as_u64().unwrap() >= 1,
        "the socket was closed when its backend left: {r}"
    );
    assert!(
        responders(&r).len() >= 2,
        "and the reconnected socket went to another backend: {r}"
    );
}

#[test]
fn agent_restart_keeps_connections_and_api_outage_keeps_serving() {
    agent_restart_keeps_connections("ebpf");
}

#[test]
fn agent_restart_keeps_connections_and_api_outage_keeps_serving_nftables() {
    agent_restart_keeps_connections("nftables");
}

#[test]
fn agent_restart_keeps_connections_and_api_outage_keeps_serving_iptables() {
    agent_restart_keeps_connections("iptables");
}

/// With no agent the datapath keeps serving (pinned programs and maps; netfilter rules and
/// conntrack), a restarted agent changes nothing that did not change, and an API server
/// outage is survived.
fn agent_restart_keeps_connections(dataplane: &str) {
    let lab = Lab::up_with("cip5", 1, APP, &["--dataplane", dataplane]);
    // A long-lived TCP connection through the VIP while the agent is killed and restarted.
    let holder = lab.hold("lb/client", "web.lb:80", "tcp", "3s");
    std::thread::sleep(Duration::from_millis(700));
    let before = lb_list(&lab, "node-1")["frontends"].clone();
    kill9_matching(&format!("lab agent --cluster {} ", lab.name));
    // New connections keep working with no agent at all: the programs stay attached.
    let r = lab.connect("lb/client", "web.lb:80", "tcp", 10);
    assert_eq!(r["ok"], 10, "{r}");
    // While the agent is down a Service goes away: the restarted agent removes it (resync).
    let maglev_vip = lab.get_json(&["svc", "maglev", "-n", "lb"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&mut lab.kubectl(&["delete", "svc", "maglev", "-n", "lb"]));
    let _agent = lab.restart_agent("node-1");
    let r = holder.join().unwrap();
    assert_eq!(
        r["failed"], 0,
        "no message lost on the held connection: {r}"
    );
    assert_eq!(
        r["reconnects"], 0,
        "the held connection was never reset: {r}"
    );
    assert_eq!(responders(&r).len(), 1, "{r}");
    // The restarted agent answers once it has loaded its programs (seconds on a loaded
    // machine): until then `status` fails, which is "not yet".
    lab.eventually("restarted agent in sync", Duration::from_secs(30), || {
        let out = lab.weir(&["status"]).output().unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("in sync")
    });
    // The restart changed nothing else: same frontend ids, same backend ids in the same slots.
    let after = lb_list(&lab, "node-1")["frontends"].clone();
    let without = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|f| f["key"]["vip"] != maglev_vip.as_str())
            .cloned()
            .collect()
    };
    assert_eq!(
        without(&before),
        without(&after),
        "a restart must not reprogram unchanged frontends"
    );
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["key"]["vip"] != maglev_vip.as_str()),
        "the Service deleted during the restart is gone"
    );
    let r = lab.connect("lb/client", "web.lb:80", "tcp", 10);
    assert_eq!(r["ok"], 10, "{r}");
    // API server outage: the datapath keeps its state and keeps serving.
    let vip = lab.get_json(&["svc", "web", "-n", "lb"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    kill9_matching(&format!("lab apiserver --cluster {}", lab.name));
    let r = lab.connect("lb/client", &format!("{vip}:80"), "tcp", 10);
    assert_eq!(
        r["ok"],
        10,
        "serving with the API server down: {r}\n{}",
        ok(&mut lab.weir(&["bpf", "lb", "list"]))
    );
    // The API server comes back; a change made then reaches the datapath (the agent resyncs).
    let _api = lab.restart_apiserver(&[]);
    let out = lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: web-4, namespace: lb, labels: {app: web}}\nspec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.eventually("web-4 receives traffic", Duration::from_secs(30), || {
        responders(&lab.connect("lb/client", "web.lb:80", "tcp", 30)).contains("lb/web-4")
    });
}

/// The kinds a cluster without weir's multi-cluster CRDs does not serve.
const NO_MESH_KINDS: &str = "multicluster.x-k8s.io/v1beta1=false,multicluster.x-k8s.io/v1alpha1=false,weir.dev/v1alpha1/remoteendpoints=false,weir.dev/v1alpha1/remotenodes=false";

/// On a cluster without the mesh's CRDs (ServiceImport, RemoteEndpoint and RemoteNode not
/// served) an agent starts, programs Services and enforces NetworkPolicy as ever: those
/// watches stand empty instead of holding the agent back.
#[test]
fn agent_runs_where_the_multicluster_kinds_are_not_served() {
    let lab = Lab::up("cip8", 1, APP);
    kill9_matching(&format!("lab apiserver --cluster {}", lab.name));
    kill9_matching(&format!("lab agent --cluster {} ", lab.name));
    let _api = lab.restart_apiserver(&["--runtime-config", NO_MESH_KINDS]);
    let out = run(&mut lab.kubectl(&["get", "serviceimports", "-A"]));
    assert!(!out.status.success(), "ServiceImports are not served");
    // A Service made while no agent runs: the new agent programs it from its first lists.
    let out = lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: lb}\nspec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _agent = lab.restart_agent("node-1");
    lab.eventually("late programmed", Duration::from_secs(20), || {
        lab.connect("lb/client", "late.lb:80", "tcp", 5)["ok"] == 5
    });
    // NetworkPolicy is enforced: no ingress to the web pods.
    let out = lab.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: lb}\nspec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress]}\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.eventually("ingress denied", Duration::from_secs(20), || {
        lab.connect("lb/client", "late.lb:80", "tcp", 5)["ok"] == 0
    });
}

const PROXY_NAMES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: pn}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: pn, labels: {app: web}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: pn}
spec: {containers: [{name: c, image: i}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: pn}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: mine, namespace: pn, labels: {service.kubernetes.io/service-proxy-name: weir}}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: pn, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: pn, labels: {service.kubernetes.io/headless: ""}}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"#;

/// The Services of namespace pn whose ClusterIP node-1's agent has programmed.
fn programmed(lab: &Lab) -> BTreeSet<String> {
    let list = lb_list(lab, "node-1");
    let vips: BTreeSet<String> = list["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["key"]["vip"].as_str().map(String::from))
        .collect();
    ["plain", "mine", "other", "headless"]
        .into_iter()
        .filter(|s| {
            let ip = lab.get_json(&["svc", s, "-n", "pn"])["spec"]["clusterIP"]
                .as_str()
                .unwrap()
                .to_string();
            vips.contains(&ip)
        })
        .map(String::from)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn wait_programmed(lab: &Lab, want: &[&str]) {
    let want = set(want);
    lab.eventually(
        &format!("node-1 programs exactly {want:?}"),
        Duration::from_secs(10),
        || programmed(lab) == want,
    );
}

#[test]
fn services_for_other_proxies_and_headless_ones_are_left_alone() {
    // Without --service-proxy-name (kube-proxy's behaviour): only unlabelled Services.
    let lab = Lab::up("cippn", 1, PROXY_NAMES);
    assert_eq!(programmed(&lab), set(&["plain"]));
    let r = lab.connect("pn/client", "other.pn:80", "tcp", 3);
    assert_eq!(
        r["ok"], 0,
        "a Service of another proxy is not translated: {r}"
    );
    // A label removed or added takes effect at once (the watch sees the object enter or
    // leave its selection).
    ok(&mut lab.kubectl(&[
        "label",
        "svc",
        "other",
        "-n",
        "pn",
        "service.kubernetes.io/service-proxy-name-",
    ]));
    ok(&mut lab.kubectl(&[
        "label",
        "svc",
        "plain",
        "-n",
        "pn",
        "service.kubernetes.io/headless=",
    ]));
    wait_programmed(&lab, &["other"]);
    let r = lab.connect("pn/client", "other.pn:80", "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    ok(&mut lab.kubectl(&[
        "label",
        "svc",
        "plain",
        "-n",
        "pn",
        "service.kubernetes.io/headless-",
    ]));
    wait_programmed(&lab, &["other", "plain"]);
    drop(lab);

    // With --service-proxy-name weir (Cilium's --k8s-service-proxy-name): only Services
    // labelled with that name, never a headless-labelled one.
    let lab = Lab::up_with("cippn", 1, PROXY_NAMES, &["--service-proxy-name", "weir"]);
    assert_eq!(programmed(&lab), set(&["mine"]));
    let r = lab.connect("pn/client", "mine.pn:80", "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    ok(&mut lab.kubectl(&[
        "label",
        "svc",
        "other",
        "-n",
        "pn",
        "--overwrite",
        "service.kubernetes.io/service-proxy-name=weir",
    ]));
    ok(&mut lab.kubectl(&[
        "label",
        "svc",
        "mine",
        "-n",
        "pn",
        "service.kubernetes.io/headless=",
    ]));
    wait_programmed(&lab, &["other"]);
}
