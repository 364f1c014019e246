//! End-to-end tests of `weir lab`: real namespaces, veths, cgroups and sockets.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn pods_yaml(ns: &str, names: &[&str], extra_labels: &str) -> String {
    let mut s = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
    for n in names {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {n}\n  namespace: {ns}\n  labels: {{pod: {n}, app: demo{extra_labels}}}\nspec:\n  containers:\n  - name: c\n    image: echo\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: dns, containerPort: 5353, protocol: UDP}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: {ns}}}\nspec:\n  selector: {{pod: {n}}}\n  ports:\n  - {{name: http, port: 80, targetPort: http}}\n  - {{name: dns, port: 53, targetPort: dns, protocol: UDP}}\n"
        ));
    }
    s
}

#[test]
fn every_pod_reaches_every_pod_across_nodes() {
    let mut m = pods_yaml("x", &["a", "b", "c"], "");
    m.push_str("---\n");
    m.push_str(&pods_yaml("y", &["a", "b"], ""));
    let host_links = || -> Vec<String> {
        let out = ok(std::process::Command::new("ip").args(["-o", "link", "show"]));
        let mut v: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().to_string())
            .collect();
        v.sort();
        v
    };
    let before = host_links();
    let lab = Lab::up("probe", 2, &m);
    // Pods were spread over both nodes.
    let pods = lab.get_json(&["pods", "-A"]);
    let nodes: std::collections::BTreeSet<&str> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes.len(),
        2,
        "pods should be spread over both nodes: {nodes:?}"
    );
    for (port, proto) in [(8080, "tcp"), (5353, "udp")] {
        let m = lab.probe(port, proto, "pod-ip");
        assert_eq!(m["columns"].as_array().unwrap().len(), 5);
        assert!(all_reachable(&m), "{proto}/{port}: {m}");
    }
    // The human table says the same.
    let table = ok(&mut lab.weir(&["lab", "probe", "--port", "8080"]));
    assert!(table.contains("25/25 reachable"), "{table}");
    // IPv6 pod addresses work too.
    let b = lab.get_json(&["pod", "b", "-n", "x"]);
    let v6 = b["status"]["podIPs"][1]["ip"].as_str().unwrap();
    let r = lab.connect("y/a", &format!("[{v6}]:8080"), "tcp", 3);
    assert_eq!(r["ok"], 3, "{r}");
    assert_eq!(r["responders"]["x/b"], 3);
    // Connecting to a closed port is refused at once.
    let r = lab.connect(
        "x/a",
        &format!("{}:9", b["status"]["podIP"].as_str().unwrap()),
        "tcp",
        2,
    );
    assert_eq!(r["errors"]["ECONNREFUSED"], 2, "{r}");
    // --rate paces the attempts; the JSON keeps its fields; a rate that is not positive is
    // refused, naming the flag.
    let r = lab.connect_with(
        "y/a",
        &format!("[{v6}]:8080"),
        &["--count", "10", "--rate", "100"],
    );
    assert_eq!(
        (r["ok"].as_u64(), r["attempts"].as_u64()),
        (Some(10), Some(10)),
        "{r}"
    );
    let out = run(&mut lab.weir(&[
        "lab",
        "connect",
        "--from",
        "y/a",
        "--to",
        "10.0.0.1:80",
        "--rate",
        "0",
    ]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate"));
    // lab fault: x/b's servers refuse (reset), then answer nothing, then recover, with no
    // API change; x/b's own outgoing connections keep working meanwhile.
    let attempt =
        |from: &str, to: &str| lab.connect_with(from, to, &["--count", "2", "--timeout", "300ms"]);
    let b4 = format!("{}:8080", b["status"]["podIP"].as_str().unwrap());
    let a4 = format!(
        "{}:8080",
        lab.get_json(&["pod", "a", "-n", "y"])["status"]["podIP"]
            .as_str()
            .unwrap()
    );
    for (mode, want) in [("refuse", "ECONNREFUSED"), ("blackhole", "timeout")] {
        ok(&mut lab.weir(&["lab", "fault", "x/b", "--mode", mode]));
        let r = attempt("y/a", &b4);
        assert_eq!(r["errors"][want], 2, "{mode}: {r}");
        assert_eq!(attempt("x/b", &a4)["ok"], 2, "{mode}: x/b as a client");
    }
    ok(&mut lab.weir(&["lab", "fault", "x/b", "--mode", "none"]));
    assert_eq!(attempt("y/a", &b4)["ok"], 2);
    // --via service dials, for each pod, the ClusterIP of the Service selecting exactly it.
    // (ClusterIPs carry traffic once the weir agent runs on the nodes; here the matrix has
    // the right shape.)
    let via = lab.probe(8080, "tcp", "service");
    assert_eq!(via["columns"], m_columns(&lab));
    // A pod no Service selects alone makes --via service fail with the pod named.
    let out = lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: lonely, namespace: x, labels: {app: demo}}\nspec:\n  containers: [{name: c, image: i, ports: [{containerPort: 8080}]}]\n");
    assert!(out.status.success());
    lab.eventually("lonely running", Duration::from_secs(20), || {
        lab.get_json(&["pod", "lonely", "-n", "x"])["status"]["podIP"].is_string()
    });
    let out = run(&mut lab.weir(&["lab", "probe", "--port", "8080", "--via", "service"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no Service selects exactly x/lonely"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The lab lives in its own namespaces: the host's links are untouched.
    assert_eq!(host_links(), before);
}

#[test]
fn echo_server_answers_identity_and_client_ip() {
    let lab = Lab::up("echo", 1, &pods_yaml("x", &["a", "b"], ""));
    let b = lab.get_json(&["pod", "b", "-n", "x"]);
    let a = lab.get_json(&["pod", "a", "-n", "x"]);
    let b_ip = b["status"]["podIP"].as_str().unwrap();
    // HTTP GET /clientip from pod a shows a's address; the pod runs in its own cgroup.
    let script = format!(
        "exec 3<>/dev/tcp/{b_ip}/8080; printf 'GET /clientip HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = ok(&mut lab.weir(&["lab", "exec", "x/a", "--", "bash", "-c", &script]));
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    let body = out.rsplit("\r\n\r\n").next().unwrap();
    assert!(
        body.starts_with(&format!("{}:", a["status"]["podIP"].as_str().unwrap())),
        "{body}"
    );
    let cg = ok(&mut lab.weir(&["lab", "exec", "x/a", "--", "cat", "/proc/self/cgroup"]));
    let uid: String = a["metadata"]["uid"]
        .as_str()
        .unwrap()
        .replace('-', "")
        .chars()
        .take(10)
        .collect();
    assert!(
        cg.contains(&format!("/weir.{}/node-1/pod-{uid}", lab.name)),
        "{cg}"
    );
    // UDP answers with the identity.
    let r = lab.connect("x/a", &format!("{b_ip}:5353"), "udp", 4);
    assert_eq!(r["responders"]["x/b"], 4, "{r}");
}

fn m_columns(lab: &Lab) -> Value {
    let pods = lab.get_json(&["pods", "-A"]);
    let mut cols: Vec<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    cols.sort();
    serde_json::json!(cols)
}

fn endpoints_of(lab: &Lab, ns: &str, svc: &str) -> Vec<Value> {
    let slices = lab.get_json(&[
        "endpointslices",
        "-n",
        ns,
        "-l",
        &format!("kubernetes.io/service-name={svc}"),
    ]);
    slices["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn conditions(lab: &Lab, ns: &str, svc: &str, pod: &str) -> Option<(bool, bool, bool)> {
    endpoints_of(lab, ns, svc)
        .into_iter()
        .find(|e| e["targetRef"]["name"] == pod)
        .map(|e| {
            let c = &e["conditions"];
            (
                c["ready"] == true,
                c["serving"] == true,
                c["terminating"] == true,
            )
        })
}

#[test]
fn endpointslices_follow_readiness_labels_and_termination() {
    let manifest = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  readinessGates: [{conditionType: example.com/warm}]
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 9090}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: shop}
spec:
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: shop, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.2.3]}]
"#;
    // web-2 waits for its readiness gate, so `lab up` must not wait for all pods; apply after.
    let lab = Lab::up("slices", 1, "");
    let out = lab.apply(manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Duration::from_secs(20);
    lab.eventually("web-1 ready endpoint", t, || {
        conditions(&lab, "shop", "web", "web-1") == Some((true, true, false))
    });
    lab.eventually("web-2 not-ready endpoint", t, || {
        conditions(&lab, "shop", "web", "web-2") == Some((false, false, false))
    });
    // Named targetPort resolves per pod: two port sets, two slices.
    let slices = lab.get_json(&[
        "endpointslices",
        "-n",
        "shop",
        "-l",
        "kubernetes.io/service-name=web",
    ]);
    let mut ports: Vec<i64> = slices["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ports"][0]["port"].as_i64().unwrap())
        .collect();
    ports.sort();
    assert_eq!(ports, vec![8080, 9090]);

    // The readiness gate turns True: web-2 becomes ready.
    let patch = r#"{"status":{"conditions":[{"type":"example.com/warm","status":"True"}]}}"#;
    ok(&mut lab.kubectl(&[
        "patch",
        "pod",
        "web-2",
        "-n",
        "shop",
        "--subresource=status",
        "--type=strategic",
        "-p",
        patch,
    ]));
    lab.eventually("web-2 ready", t, || {
        conditions(&lab, "shop", "web", "web-2") == Some((true, true, false))
    });

    // A label change takes the pod out of the Service, and back in; same IP, same pod.
    let ip_before = lab.get_json(&["pod", "web-1", "-n", "shop"])["status"]["podIP"].clone();
    ok(&mut lab.kubectl(&[
        "label",
        "pod",
        "web-1",
        "-n",
        "shop",
        "app=other",
        "--overwrite",
    ]));
    lab.eventually("web-1 gone from web", t, || {
        conditions(&lab, "shop", "web", "web-1").is_none()
    });
    ok(&mut lab.kubectl(&[
        "label",
        "pod",
        "web-1",
        "-n",
        "shop",
        "app=web",
        "--overwrite",
    ]));
    lab.eventually("web-1 back in web", t, || {
        conditions(&lab, "shop", "web", "web-1") == Some((true, true, false))
    });
    assert_eq!(
        lab.get_json(&["pod", "web-1", "-n", "shop"])["status"]["podIP"],
        ip_before
    );

    // Terminating: serving+terminating, not ready; the pod keeps answering.
    ok(&mut lab.weir(&["lab", "terminate", "shop/web-1"]));
    lab.eventually("web-1 terminating", t, || {
        conditions(&lab, "shop", "web", "web-1") == Some((false, true, true))
    });
    let r = lab.connect(
        "shop/web-2",
        &format!("{}:8080", ip_before.as_str().unwrap()),
        "tcp",
        3,
    );
    assert_eq!(
        r["responders"]["shop/web-1"], 3,
        "a terminating pod keeps serving: {r}"
    );

    // Scale up: a new pod joins.
    let out = lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: web-3, namespace: shop, labels: {app: web}}\nspec:\n  containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]\n");
    assert!(out.status.success());
    lab.eventually("web-3 ready", t, || {
        conditions(&lab, "shop", "web", "web-3") == Some((true, true, false))
    });

    // Force-deleting the terminating pod removes its endpoint and its sandbox.
    ok(&mut lab.kubectl(&[
        "delete",
        "pod",
        "web-1",
        "-n",
        "shop",
        "--grace-period=0",
        "--force",
    ]));
    lab.eventually("web-1 endpoint removed", t, || {
        conditions(&lab, "shop", "web", "web-1").is_none()
    });

    // The hand-written slice of the selectorless Service is left alone.
    let manual = lab.get_json(&["endpointslice", "manual-1", "-n", "shop"]);
    assert_eq!(manual["endpoints"][0]["addresses"][0], "10.1.2.3");
    assert!(manual["metadata"]["labels"]
        .get("endpointslice.kubernetes.io/managed-by")
        .is_none());

    // Deleting the Service deletes its slices.
    ok(&mut lab.kubectl(&["delete", "service", "web", "-n", "shop"]));
    lab.eventually("web slices gone", t, || {
        lab.get_json(&[
            "endpointslices",
            "-n",
            "shop",
            "-l",
            "kubernetes.io/service-name=web",
        ])["items"]
            .as_array()
            .unwrap()
            .is_empty()
    });
}

#[test]
fn grace_period_ends_and_pod_is_removed() {
    let lab = Lab::up("grace", 1, &pods_yaml("x", &["a", "b"], ""));
    let a_ip = lab.get_json(&["pod", "a", "-n", "x"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&mut lab.weir(&["lab", "terminate", "x/a", "--grace-period", "4"]));
    // deletionTimestamp has whole seconds, so at least 3 s of the 4 remain.
    std::thread::sleep(Duration::from_millis(2000));
    let r = lab.connect("x/b", &format!("{a_ip}:8080"), "tcp", 1);
    assert_eq!(r["ok"], 1, "still serving during the grace period: {r}");
    assert_eq!(
        lab.get_json(&["pod", "a", "-n", "x"])["metadata"]["deletionGracePeriodSeconds"],
        4
    );
    lab.eventually("pod a removed", Duration::from_secs(15), || {
        lab.get_json(&["pods", "-n", "x"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["metadata"]["name"] != "a")
    });
    let r = lab.connect("x/b", &format!("{a_ip}:8080"), "tcp", 1);
    assert_eq!(r["ok"], 0, "gone after the grace period: {r}");
}

fn leftovers(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let prefix = format!("weir.{name}.");
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            found.push(format!("netns {}", e.file_name().to_string_lossy()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mounts
        .lines()
        .filter(|l| l.contains(&prefix) || l.contains(&format!("/run/weir/labs/{name}/")))
    {
        found.push(format!("mount {l}"));
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            if args
                .windows(2)
                .any(|w| w[0] == b"--cluster" && w[1] == name.as_bytes())
            {
                found.push(format!("process {}", String::from_utf8_lossy(&cmd)));
            }
        }
    }
    if std::path::Path::new(&format!("/run/weir/labs/{name}")).exists() {
        found.push("lab directory".into());
    }
    if std::path::Path::new(&format!("/sys/fs/cgroup/unified/weir.{name}")).exists() {
        found.push("cgroup".into());
    }
    found
}

#[test]
fn lab_down_leaves_nothing_even_after_a_crash() {
    let lab = Lab::up("down", 2, &pods_yaml("x", &["a", "b", "c"], ""));
    let name = lab.name.clone();
    // Simulate a crash: kill every lab process with SIGKILL, leaving namespaces, cgroups and
    // sandboxes' state behind.
    kill9_matching(&format!("--cluster {name}"));
    assert!(!leftovers(&name).is_empty());
    let out = run(weir().args(["--cluster", &name, "get", "pods"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not reachable") && err.contains("hint"),
        "{err}"
    );
    ok(weir().args(["lab", "down", "--name", &name]));
    assert_eq!(leftovers(&name), Vec::<String>::new());
    // A second down says there is no such lab.
    let again = run(weir().args(["lab", "down", "--name", &name]));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no lab named"));
    std::mem::forget(lab);
}

#[test]
fn cli_errors_are_one_line_with_a_hint() {
    let out = run(weir().args(["--cluster", "nosuchlab42", "get", "pods"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no lab named \"nosuchlab42\"") && err.contains("hint"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let comp = ok(weir().args(["completions", "bash"]));
    assert!(comp.contains("_weir()"), "bash completions");
    let out = run(weir().args(["lab", "up", "--name", "Bad_Name"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid lab name"));
}

#[test]
fn apply_validates_every_document_before_writing_any() {
    let lab = Lab::up("apply", 1, "");
    let bad = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: a1}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\nspec: {ports: [{port: 70000}]}\n";
    let out = lab.apply(bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Service \"bad\" is invalid")
            && err.contains("spec.ports[0].port: Invalid value: 70000"),
        "{err}"
    );
    assert!(err.contains("document 3"), "{err}");
    let ns = lab.get_json(&["namespaces"]);
    assert!(
        ns["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["metadata"]["name"] != "a1"),
        "nothing may be written"
    );
    let unknown = lab.apply("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
    assert!(String::from_utf8_lossy(&unknown.stderr)
        .contains("no matches for kind \"Deployment\" in version \"apps/v1\""));
    // A good file applies, and applying again changes nothing.
    let good = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: a1}\nspec: {ports: [{port: 80}], type: NodePort}\n";
    let out = lab.apply(good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("service/ok created"));
    let again = lab.apply(good);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("service/ok unchanged"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    let svc = lab.get_json(&["svc", "ok", "-n", "a1"]);
    assert!(svc["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .starts_with("10.96."));
    assert!(svc["spec"]["ports"][0]["nodePort"].as_i64().unwrap() >= 30000);
    let table = ok(&mut lab.weir(&["get", "svc", "-n", "a1"]));
    assert!(table.starts_with("NAME   TYPE       CLUSTER-IP"), "{table}");
    let ns = lab.get_json(&["ns", "a1"]);
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "a1"
    );
}

#[test]
fn kubelet_restart_adopts_running_pods() {
    let lab = Lab::up("adopt", 1, &pods_yaml("x", &["a", "b"], ""));
    let before = lab.get_json(&["pods", "-n", "x"]);
    kill9_matching(&format!("lab kubelet --cluster {} ", lab.name));
    // Start a new kubelet the way `lab up` does.
    let log = std::fs::File::create(format!(
        "/run/weir/labs/{}/logs/kubelet-restart.log",
        lab.name
    ))
    .unwrap();
    let mut kubelet = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["lab", "kubelet", "--cluster", &lab.name, "--node", "node-1"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // Lab down stops it; a thread reaps it then.
    std::thread::spawn(move || kubelet.wait());
    std::thread::sleep(Duration::from_secs(1));
    let m = lab.probe(8080, "tcp", "pod-ip");
    assert!(all_reachable(&m), "{m}");
    let after = lab.get_json(&["pods", "-n", "x"]);
    for (b, a) in before["items"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["items"].as_array().unwrap())
    {
        assert_eq!(b["status"]["podIP"], a["status"]["podIP"]);
        assert_eq!(
            b["status"]["startTime"], a["status"]["startTime"],
            "the sandbox was adopted, not recreated"
        );
    }
}
