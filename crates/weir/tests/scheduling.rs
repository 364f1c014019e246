//! Cross-cluster traffic scheduling end to end (GlobalTrafficPolicy): shares of new
//! connections per cluster as Envoy's priority-load rules give them, gradual scale-up,
//! ClusterProperty priorities, ActiveActive weights, and outlier ejection by the datapath, in a
//! three-cluster lab whose pods' readiness is turned by readiness gates.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{ok, responder_names, ClusterSet, Lab};
use serde_json::Value;

/// `n` pods `hello-K` in namespace mcs whose readiness waits for condition weir.dev/ready,
/// and their Service.
fn app(n: usize) -> String {
    let mut m = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: mcs}\n");
    for k in 1..=n {
        m.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello-{k}, namespace: mcs, labels: {{app: hello}}}}\nspec:\n  readinessGates: [{{conditionType: weir.dev/ready}}]\n  containers: [{{name: c, image: echo, ports: [{{containerPort: 8080}}]}}]\n"
        ));
    }
    m.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: mcs}\nspec:\n  selector: {app: hello}\n  ports: [{name: tcp, port: 80, targetPort: 8080}]\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: hello, namespace: mcs}\n");
    m
}

/// A client pod (always ready).
const CLIENT: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: mcs}\nspec:\n  containers: [{name: c, image: echo, ports: [{containerPort: 9000}]}]\n";

fn set_ready(c: &Lab, pod: &str, ready: bool) {
    let patch = format!(
        r#"{{"status":{{"conditions":[{{"type":"weir.dev/ready","status":"{}"}}]}}}}"#,
        if ready { "True" } else { "False" }
    );
    ok(&mut c.kubectl(&[
        "patch",
        "pod",
        pod,
        "-n",
        "mcs",
        "--subresource=status",
        "--type=strategic",
        "-p",
        &patch,
    ]));
}

/// [`set_ready`] for pods mcs/hello-K of cluster `c`.
fn set_ready_all(c: &Lab, pods: std::ops::RangeInclusive<usize>, ready: bool) {
    for k in pods {
        set_ready(c, &format!("hello-{k}"), ready);
    }
}

fn region(c: &Lab, r: &str) {
    let p = format!("apiVersion: about.k8s.io/v1alpha1\nkind: ClusterProperty\nmetadata: {{name: region.weir.dev}}\nspec: {{value: {r}}}\n");
    assert!(c.apply(&p).status.success());
}

fn policy(c: &Lab, spec: &str) {
    let p = format!("apiVersion: weir.dev/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {{name: hello, namespace: mcs}}\nspec: {spec}\n");
    let out = c.apply(&p);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent's programmed share per cluster for the import's frontend (`weir status`).
fn shares(c: &Lab) -> BTreeMap<String, f64> {
    let st: Value = serde_json::from_str(&ok(&mut c.weir(&["status", "-o", "json"]))).unwrap();
    let mut out = BTreeMap::new();
    for sc in st["status"]["schedules"].as_array().into_iter().flatten() {
        if sc["import"] != "mcs/hello" {
            continue;
        }
        for row in sc["clusters"].as_array().into_iter().flatten() {
            out.insert(
                row["cluster"].as_str().unwrap().to_string(),
                row["share"].as_f64().unwrap(),
            );
        }
    }
    out
}

/// The cluster each answer came from, counted (responders are `cK/mcs/pod`).
fn by_cluster(r: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (who, n) in r["responders"].as_object().into_iter().flatten() {
        let c = who.split('/').next().unwrap().to_string();
        *out.entry(c).or_default() += n.as_u64().unwrap();
    }
    out
}

fn percent(counts: &BTreeMap<String, u64>, c: &str, n: u64) -> f64 {
    100.0 * counts.get(c).copied().unwrap_or(0) as f64 / n as f64
}

/// `n` connections from mcs/client to `target`, all answered: the percent answered by
/// cluster `c`.
fn measured_share(from: &Lab, target: &str, c: &str, n: usize) -> f64 {
    let r = from.connect("mcs/client", target, "tcp", n);
    assert_eq!(r["ok"].as_u64(), Some(n as u64), "{r}");
    percent(&by_cluster(&r), c, n as u64)
}

/// `weir lab fault` on pods mcs/hello-K of cluster `c`.
fn fault(c: &Lab, pods: std::ops::RangeInclusive<usize>, mode: &str) {
    for k in pods {
        ok(&mut c.weir(&["lab", "fault", &format!("mcs/hello-{k}"), "--mode", mode]));
    }
}

/// The backends the datapath of `c`'s node has ejected now (`weir bpf lb list`).
fn ejected(c: &Lab) -> Vec<Value> {
    let lb: Value =
        serde_json::from_str(&ok(&mut c.weir(&["bpf", "lb", "list", "-o", "json"]))).unwrap();
    lb["health"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["remaining_ms"].as_u64().unwrap_or(0) > 0)
        .cloned()
        .collect()
}

#[test]
fn shares_priorities_weights_and_ejection() {
    let set = ClusterSet::up("sched", 3, 1, "", &[]);
    let (c1, c2, c3) = (set.c(1), set.c(2), set.c(3));
    for (c, n, r) in [(c1, 10, "eu"), (c2, 4, "us"), (c3, 4, "eu")] {
        let out = c.apply(&app(n));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        region(c, r);
    }
    assert!(c1.apply(CLIENT).status.success());
    for (c, n) in [(c2, 4), (c3, 4)] {
        set_ready_all(c, 1..=n, true);
    }
    let t = Duration::from_secs(30);
    c1.eventually("c1 imports all three clusters", t, || {
        let sel = "multicluster.kubernetes.io/service-name=hello";
        let slices = c1.get_json(&["endpointslices", "-n", "mcs", "-l", sel]);
        slices["items"].as_array().map(Vec::len) == Some(3)
    });
    let ip = c1.get_json(&["serviceimports", "-n", "mcs", "hello"])["spec"]["ips"][0]
        .as_str()
        .unwrap()
        .to_string();
    let target = format!("{ip}:80");
    c1.eventually("the client pod", t, || {
        c1.get_json(&["pod", "client", "-n", "mcs"])["status"]["podIP"].is_string()
    });

    // FailOver: the own cluster, then the others. None of c1's ten endpoints is ready: 0%
    // local. Then they turn ready one by one, as a Deployment scales up: the local share
    // follows min(100, 1.4 x ready/10) at each step (Envoy's numbers), never all at once.
    policy(c1, "{lbType: FailOver}");
    c1.eventually("nothing local", t, || {
        shares(c1).get("c1") == Some(&0.0) && shares(c1).get("c2") == Some(&50.0)
    });
    let r = c1.connect("mcs/client", &target, "tcp", 200);
    assert_eq!(percent(&by_cluster(&r), "c1", 200), 0.0, "{r}");
    for k in 1..=10u32 {
        set_ready(c1, &format!("hello-{k}"), true);
        let want = f64::from((14 * k).min(100));
        c1.eventually(&format!("{k} of 10 local ready: {want}% local"), t, || {
            shares(c1).get("c1") == Some(&want)
        });
        if k == 5 {
            // 2,000 connections: the binomial sd of 70% is 1.0 point; 4 points is 3.9 sd.
            let n = 2000;
            let local = measured_share(c1, &target, "c1", n);
            assert!((local - 70.0).abs() < 4.0, "5 of 10 ready: {local}% local");
            eprintln!("5 of 10 local ready: {local:.1}% of {n} connections local (formula: 70%)");
        }
    }
    let r = c1.connect("mcs/client", &target, "tcp", 200);
    assert_eq!(percent(&by_cluster(&r), "c1", 200), 100.0, "{r}");

    // Panic: 2 of c1's 10 ready and none elsewhere. Both levels are below the threshold
    // (50%), so shares follow the endpoint counts (10 of 18: 56%, Envoy's integer rounding)
    // and every endpoint carries traffic, ready or not.
    set_ready_all(c1, 3..=10, false);
    for c in [c2, c3] {
        set_ready_all(c, 1..=4, false);
    }
    c1.eventually("total panic", t, || {
        let s = shares(c1);
        s.get("c1") == Some(&56.0) && s.get("c2") == Some(&22.0)
    });
    let r = c1.connect("mcs/client", &target, "tcp", 400);
    assert_eq!(r["ok"].as_u64(), Some(400), "{r}");
    assert!(
        r["responders"]
            .as_object()
            .unwrap()
            .contains_key("c1/mcs/hello-10"),
        "an unready endpoint answers in panic: {r}"
    );
    for c in [c2, c3] {
        set_ready_all(c, 1..=4, true);
    }

    // Ordered by ClusterProperty: own cluster, then the same region (c3, eu), then the rest.
    // With every local endpoint unready, all traffic goes to c3 and none to c2.
    policy(
        c1,
        "{lbType: FailOver, priorities: [{clusters: [c1]}, {selector: {sameAsImporter: [region.weir.dev]}}, {selector: {}}]}",
    );
    set_ready_all(c1, 1..=10, false);
    c1.eventually("all to the same region", t, || {
        let s = shares(c1);
        s.get("c3") == Some(&100.0) && s.get("c1") == Some(&0.0)
    });
    let r = c1.connect("mcs/client", &target, "tcp", 300);
    assert_eq!(by_cluster(&r).keys().collect::<Vec<_>>(), ["c3"], "{r}");

    // ActiveActive 80/20 between c2 and c3: within 3 points over 10,000 connections (the
    // binomial sd is 0.4 point).
    policy(
        c1,
        "{lbType: ActiveActive, targets: [{cluster: c2, weight: 80}, {cluster: c3, weight: 20}]}",
    );
    c1.eventually("80/20 programmed", t, || {
        let s = shares(c1);
        s.get("c2") == Some(&80.0) && s.get("c3") == Some(&20.0)
    });
    let n = 10_000;
    let c2_share = measured_share(c1, &target, "c2", n);
    assert!(
        (c2_share - 80.0).abs() < 3.0,
        "ActiveActive: {c2_share}% to c2"
    );
    eprintln!("ActiveActive 80/20: {c2_share:.2}% of {n} connections to c2");

    // Established connections never move: one held open while c2 takes everything stays on
    // c2 through share changes and ejections.
    let outlier = "outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 3s}";
    policy(
        c1,
        &format!("{{lbType: ActiveActive, targets: [{{cluster: c2, weight: 1}}], {outlier}}}"),
    );
    c1.eventually("all to c2", t, || shares(c1).get("c2") == Some(&100.0));
    let held = c1.hold("mcs/client", &target, "tcp", "15s");
    std::thread::sleep(Duration::from_millis(500));
    policy(
        c1,
        &format!("{{lbType: ActiveActive, targets: [{{cluster: c2, weight: 50}}, {{cluster: c3, weight: 50}}], {outlier}}}"),
    );
    c1.eventually("50/50 programmed", t, || {
        shares(c1).get("c3") == Some(&50.0)
    });

    // Outlier ejection without any API change: c3's servers start refusing. Connections to
    // them fail until each of c3's endpoints has failed consecutiveFailures (2) times; the
    // datapath ejects them and every new connection goes to c2. Healed, they are admitted
    // again after the ejection time (3 s).
    fault(c3, 1..=4, "refuse");
    let r = c1.connect_with("mcs/client", &target, &["--count", "100"]);
    let failed = 100 - r["ok"].as_u64().unwrap();
    // At least 4 endpoints x 2 failures; more only from connects already on their way to an
    // endpoint as it is ejected (`lab connect` keeps 16 in flight): a loaded run saw 17.
    assert!(
        (8..=8 + 15).contains(&failed),
        "4 endpoints x 2 failures, then none but those in flight: {r}"
    );
    eprintln!(
        "refusing c3: {failed} of 100 connections failed before its 4 endpoints were ejected"
    );
    c1.eventually("c3 ejected", t, || shares(c1).get("c2") == Some(&100.0));
    let r = c1.connect("mcs/client", &target, "tcp", 100);
    assert_eq!(r["ok"].as_u64(), Some(100), "after ejection: {r}");
    let e = ejected(c1);
    assert_eq!(e.len(), 4, "{e:?}");
    let status = ok(&mut c1.weir(&["status"]));
    assert!(status.contains("ejected by outlier detection"), "{status}");
    fault(c3, 1..=4, "none");
    c1.eventually("c3 admitted again", t, || {
        shares(c1).get("c3") == Some(&50.0)
    });
    let r = c1.connect("mcs/client", &target, "tcp", 200);
    assert!(percent(&by_cluster(&r), "c3", 200) > 30.0, "{r}");
    let h = held.join().unwrap();
    assert_eq!(h["failed"], 0, "the held connection: {h}");
    assert_eq!(by_cluster(&h).keys().collect::<Vec<_>>(), ["c2"], "{h}");
}

/// Two clusters (`weir lab up` with `extra`): c2 exports mcs/hello of two ready pods, c1 has
/// the namespace and the client pod.
fn exporter_and_client(prefix: &str, extra: &[&str]) -> ClusterSet {
    let set = ClusterSet::up(prefix, 2, 1, "", extra);
    let out = set.c(2).apply(&app(2));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    set_ready_all(set.c(2), 1..=2, true);
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mcs}\n---\n";
    assert!(set.c(1).apply(&format!("{ns}{CLIENT}")).status.success());
    set
}

/// Pods translated at tc (no socket load balancing): the datapath counts connect outcomes
/// through the flows' conntrack entries. Refused connects (resets) and SYNs left unanswered
/// until their retransmission eject the backend.
#[test]
fn tc_flows_eject_failing_backends() {
    let set = exporter_and_client("schedtc", &["--no-socket-lb"]);
    let (c1, c2) = (set.c(1), set.c(2));
    policy(
        c1,
        "{lbType: ActiveActive, targets: [{cluster: c2, weight: 1}], outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 8s}}",
    );
    let t = Duration::from_secs(30);
    c1.eventually("c2's endpoints scheduled", t, || {
        shares(c1).get("c2") == Some(&100.0)
            && c1.get_json(&["pod", "client", "-n", "mcs"])["status"]["podIP"].is_string()
    });
    let ip = c1.get_json(&["serviceimports", "-n", "mcs", "hello"])["spec"]["ips"][0]
        .as_str()
        .unwrap()
        .to_string();
    let target = format!("{ip}:80");
    let r = c1.connect("mcs/client", &target, "tcp", 20);
    assert_eq!(r["ok"].as_u64(), Some(20), "{r}");
    // A flow established before its endpoint turns unready (share 0) keeps going: its
    // backend stays programmed for it while it is listed; new connections are refused.
    let held = c1.hold("mcs/client", &target, "tcp", "3s");
    std::thread::sleep(Duration::from_millis(500));
    set_ready_all(c2, 1..=2, false);
    c1.eventually("nothing to schedule", t, || {
        shares(c1).get("c2") == Some(&0.0)
    });
    let r = c1.connect("mcs/client", &target, "tcp", 4);
    assert_eq!(r["ok"].as_u64(), Some(0), "{r}");
    let h = held.join().unwrap();
    assert_eq!(h["failed"], 0, "the held flow: {h}");
    set_ready_all(c2, 1..=2, true);
    c1.eventually("scheduled again", t, || {
        shares(c1).get("c2") == Some(&100.0)
    });
    // Both endpoints programmed again (the share is 100 as soon as one is ready).
    c1.eventually("both endpoints answer", t, || {
        responder_names(&c1.connect("mcs/client", &target, "tcp", 12)).len() == 2
    });
    // Resets.
    fault(c2, 1..=2, "refuse");
    let r = c1.connect_with("mcs/client", &target, &["--count", "12"]);
    assert_eq!(r["ok"].as_u64(), Some(0), "{r}");
    let e = ejected(c1);
    assert_eq!(e.len(), 2, "both ejected after 2 resets each: {e:?}");
    fault(c2, 1..=2, "none");
    c1.eventually("admitted again", t, || ejected(c1).is_empty());
    // Unanswered SYNs: hello-1 drops everything; attempts give up after 3 s, their SYN having
    // been retransmitted at 1 s.
    fault(c2, 1..=1, "blackhole");
    let r = c1.connect_with("mcs/client", &target, &["--count", "16", "--timeout", "3s"]);
    // The 16 attempts start at once, each given either backend (3 of 16 or fewer reach
    // hello-2 about once in a hundred runs): some do.
    assert!(r["ok"].as_u64().unwrap() >= 1, "{r}");
    let e = ejected(c1);
    let hello1 = c2.get_json(&["pod", "hello-1", "-n", "mcs"])["status"]["podIP"].clone();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["backend"]["ip"], hello1, "{e:?}");
    assert!(e[0]["failures_total"].as_u64().unwrap() >= 2, "{e:?}");
    c1.eventually("hello-1 out of the shares", t, || {
        let r = c1.connect("mcs/client", &target, "tcp", 10);
        r["ok"].as_u64() == Some(10)
    });
}

/// The meshes' active health checks (off unless asked for): an endpoint that stops answering
/// is published not ready to every cluster, without any API change, and ready again once it
/// answers.
#[test]
fn mesh_health_checks_publish_failing_endpoints_not_ready() {
    let set = exporter_and_client("schedhc", &["--mesh-health-check", "300ms"]);
    let (c1, c2) = (set.c(1), set.c(2));
    let ready_in_c1 = || -> Vec<bool> {
        let sel = "multicluster.kubernetes.io/service-name=hello";
        let slices = c1.get_json(&["endpointslices", "-n", "mcs", "-l", sel]);
        let mut out = Vec::new();
        for s in slices["items"].as_array().into_iter().flatten() {
            for e in s["endpoints"].as_array().into_iter().flatten() {
                out.push(e["conditions"]["ready"] != false);
            }
        }
        out
    };
    let t = Duration::from_secs(30);
    c1.eventually("both endpoints imported ready", t, || {
        ready_in_c1() == [true, true]
    });
    fault(c2, 1..=1, "blackhole");
    c1.eventually("hello-1 published not ready", t, || {
        let mut r = ready_in_c1();
        r.sort();
        r == [false, true]
    });
    fault(c2, 1..=1, "none");
    c1.eventually("hello-1 ready again", t, || ready_in_c1() == [true, true]);
}
