//! kubectl (the real one, /usr/bin/kubectl) driving a lab through weir's API server.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const POD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: k}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: k\n  labels: {app: web}\nspec:\n  containers:\n  - name: c\n    image: nginx\n    ports: [{name: http, containerPort: 8080}]\n";
const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: k\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: http}]\n";

#[test]
fn kubectl_create_get_watch_label_apply_delete() {
    let lab = Lab::up("kubectl", 1, "");
    let dir = tempfile::tempdir().unwrap();
    let pod_file = dir.path().join("pod.yaml");
    std::fs::write(&pod_file, POD).unwrap();
    let svc_file = dir.path().join("svc.yaml");
    std::fs::write(&svc_file, SVC).unwrap();

    // A watch started before anything exists sees the pod arrive.
    let mut watch = lab
        .kubectl(&["get", "pods", "-n", "k", "-w", "--request-timeout=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let out = ok(&mut lab.kubectl(&["create", "-f", pod_file.to_str().unwrap()]));
    assert!(
        out.contains("namespace/k created") && out.contains("pod/p created"),
        "{out}"
    );
    let again = run(&mut lab.kubectl(&["create", "-f", pod_file.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&again.stderr).contains("AlreadyExists"));

    lab.eventually("pod running", Duration::from_secs(20), || {
        ok(&mut lab.kubectl(&["get", "pod", "p", "-n", "k"])).contains("Running")
    });
    let yaml = ok(&mut lab.kubectl(&["get", "pod", "p", "-n", "k", "-o", "yaml"]));
    assert!(yaml.contains("podIP: 10.244.1."), "{yaml}");
    assert!(yaml.contains("phase: Running"), "{yaml}");

    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && !seen.iter().any(|l: &String| l.contains("Running"))
    {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(l);
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.starts_with("p ") && l.contains("Running")),
        "watch output: {seen:?}"
    );
    let _ = watch.kill();
    let _ = watch.wait();

    ok(&mut lab.kubectl(&["label", "pod", "p", "-n", "k", "tier=front"]));
    let labels =
        ok(&mut lab.kubectl(&["get", "pods", "-n", "k", "-l", "tier=front", "-o", "name"]));
    assert_eq!(labels.trim(), "pod/p");

    // Client-side apply (strategic merge patch) and server-side apply.
    let out = ok(&mut lab.kubectl(&["apply", "-f", svc_file.to_str().unwrap()]));
    assert!(out.contains("service/web created"), "{out}");
    std::fs::write(
        &svc_file,
        SVC.replace(
            "ports: [{port: 80, targetPort: http}]",
            "ports: [{port: 81, targetPort: http}]",
        ),
    )
    .unwrap();
    let out = ok(&mut lab.kubectl(&["apply", "-f", svc_file.to_str().unwrap()]));
    assert!(out.contains("service/web configured"), "{out}");
    assert!(ok(&mut lab.kubectl(&["get", "svc", "web", "-n", "k"])).contains("81/TCP"));
    std::fs::write(
        &svc_file,
        SVC.replace(
            "ports: [{port: 80, targetPort: http}]",
            "ports: [{port: 82, targetPort: http}]",
        ),
    )
    .unwrap();
    let out = ok(&mut lab.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        svc_file.to_str().unwrap(),
    ]));
    assert!(out.contains("service/web serverside-applied"), "{out}");
    assert!(ok(&mut lab.kubectl(&["get", "svc", "web", "-n", "k"])).contains("82/TCP"));
    let slices = ok(&mut lab.kubectl(&["get", "endpointslices", "-n", "k"]));
    assert!(slices.contains("8080"), "{slices}");
    assert!(ok(&mut lab.kubectl(&["get", "netpol", "-A"])).is_empty());

    // Invalid input is refused with the field named.
    let bad_file = dir.path().join("bad.yaml");
    std::fs::write(
        &bad_file,
        SVC.replace("name: web", "name: bad")
            .replace("port: 80,", "port: 0,"),
    )
    .unwrap();
    let bad = run(&mut lab.kubectl(&["create", "-f", bad_file.to_str().unwrap()]));
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("The Service \"bad\" is invalid: spec.ports[0].port: Invalid value: 0"),
        "{err}"
    );
    // kubectl's object generators send protobuf, which is refused with an explanation.
    let proto = run(&mut lab.kubectl(&[
        "create",
        "service",
        "clusterip",
        "gen",
        "-n",
        "k",
        "--tcp=80:80",
    ]));
    assert!(
        String::from_utf8_lossy(&proto.stderr).contains("not protobuf"),
        "{}",
        String::from_utf8_lossy(&proto.stderr)
    );

    // Delete waits until the pod is gone (the kubelet confirms).
    let out = ok(&mut lab.kubectl(&["delete", "pod", "p", "-n", "k", "--grace-period=1"]));
    assert!(out.contains("pod \"p\" deleted"), "{out}");
    assert!(
        ok(&mut lab.kubectl(&["get", "pods", "-n", "k", "-o", "name"]))
            .trim()
            .is_empty()
    );
    ok(&mut lab.kubectl(&["delete", "namespace", "k"]));
    lab.eventually("namespace gone", Duration::from_secs(15), || {
        !ok(&mut lab.kubectl(&["get", "ns", "-o", "name"])).contains("namespace/k\n")
    });
}

/// weir's API server on its own (TLS, a token), stopped when dropped, and kubectl for it.
struct Standalone {
    server: std::process::Child,
    port: u16,
    kubeconfig: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Standalone {
    fn start() -> Standalone {
        let dir = tempfile::tempdir().unwrap();
        let pki = weir_apiserver::pki::Pki::ensure(&dir.path().join("pki"), "standalone").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let kubeconfig = dir.path().join("kubeconfig");
        pki.write_kubeconfig(
            &kubeconfig,
            "standalone",
            &format!("https://127.0.0.1:{port}"),
        )
        .unwrap();
        let server = weir()
            .args(["apiserver", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--tls-cert"])
            .arg(&pki.server_cert)
            .arg("--tls-key")
            .arg(&pki.server_key)
            .arg("--token-file")
            .arg(&pki.token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Standalone {
            server,
            port,
            kubeconfig,
            dir,
        };
        let mut up = false;
        for _ in 0..100 {
            if s.kubectl(&["get", "ns"]).output().unwrap().status.success() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(up, "the API server did not come up");
        s
    }

    fn kubectl(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("kubectl");
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }

    /// `kubectl apply -f` of `manifest` (client-side: the three-way strategic merge patch
    /// kubectl computes from its last-applied annotation).
    fn apply(&self, manifest: &str) -> std::process::Output {
        let f = self.dir.path().join("apply.yaml");
        std::fs::write(&f, manifest).unwrap();
        run(&mut self.kubectl(&["apply", "-f", f.to_str().unwrap()]))
    }

    fn get(&self, what: &[&str]) -> serde_json::Value {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&ok(&mut self.kubectl(&args))).unwrap()
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

#[test]
fn standalone_apiserver_with_tls_and_token() {
    let s = Standalone::start();
    let (port, dir) = (s.port, s.dir.path().to_path_buf());
    let kubectl = |args: &[&str]| s.kubectl(args);
    assert!(ok(&mut kubectl(&["get", "ns", "-o", "name"])).contains("namespace/kube-system"));
    // Without the token: refused.
    let anon = run(std::process::Command::new("kubectl").args([
        "--server",
        &format!("https://127.0.0.1:{port}"),
        "--insecure-skip-tls-verify",
        "--token",
        "wrong",
        "get",
        "ns",
    ]));
    assert!(
        String::from_utf8_lossy(&anon.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&anon.stderr)
    );
    drop(s);
    // Only loopback addresses are accepted.
    let out = run(weir()
        .args(["apiserver", "--data-dir"])
        .arg(dir.join("d2"))
        .args(["--listen", "0.0.0.0:0"]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn svc(spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: default}}\nspec:\n{spec}"
    )
}

/// What kubectl apply sends when a manifest changes, replayed through real kubectl: the API
/// server's defaulting and update strategy (SetDefaults_Service, dropTypeDependentFields) let
/// every one of these through, as kube-apiserver does.
#[test]
fn kubectl_apply_changes_that_defaulting_lets_through() {
    let s = Standalone::start();
    let ports = "  ports: [{port: 80, targetPort: 8080}]\n";
    // Session affinity ClientIP (its timeout defaulted), then None, then gone from the file.
    let out = s.apply(&svc(&format!("  sessionAffinity: ClientIP\n{ports}")));
    assert!(out.status.success());
    let v = s.get(&["svc", "s"]);
    assert_eq!(
        v["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
        10800
    );
    let out = s.apply(&svc(&format!("  sessionAffinity: None\n{ports}")));
    assert!(
        out.status.success(),
        "ClientIP -> None: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = s.get(&["svc", "s"]);
    assert_eq!(v["spec"]["sessionAffinity"], "None");
    assert!(v["spec"].get("sessionAffinityConfig").is_none(), "{v}");
    let out = s.apply(&svc(&format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}\n{ports}")));
    assert!(out.status.success());
    let out = s.apply(&svc(ports));
    assert!(
        out.status.success(),
        "affinity removed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.get(&["svc", "s"])["spec"]
        .get("sessionAffinityConfig")
        .is_none());

    // LoadBalancer with a Local policy (node ports and a health-check port allocated), then
    // NodePort, then ClusterIP: each step drops what the new type does not use.
    let out = s.apply(&svc(&format!(
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n{ports}"
    )));
    assert!(out.status.success());
    let v = s.get(&["svc", "s"]);
    assert!(v["spec"]["healthCheckNodePort"].as_u64().is_some(), "{v}");
    let node_port = v["spec"]["ports"][0]["nodePort"].clone();
    let out = s.apply(&svc(&format!("  type: NodePort\n{ports}")));
    assert!(
        out.status.success(),
        "LoadBalancer -> NodePort: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = s.get(&["svc", "s"]);
    assert!(
        v["spec"].get("allocateLoadBalancerNodePorts").is_none(),
        "{v}"
    );
    assert_eq!(
        v["spec"]["ports"][0]["nodePort"], node_port,
        "the node port is kept"
    );
    let out = s.apply(&svc(&format!("  type: ClusterIP\n{ports}")));
    assert!(
        out.status.success(),
        "NodePort -> ClusterIP: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = s.get(&["svc", "s"]);
    assert!(v["spec"]["ports"][0].get("nodePort").is_none(), "{v}");
    assert!(v["spec"].get("externalTrafficPolicy").is_none(), "{v}");
    assert!(v["spec"].get("healthCheckNodePort").is_none(), "{v}");
    // To ExternalName: the cluster IP is released; back to ClusterIP: a new one.
    let out = s.apply(&svc("  type: ExternalName\n  externalName: example.org\n"));
    assert!(
        out.status.success(),
        "ClusterIP -> ExternalName: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = s.get(&["svc", "s"]);
    assert!(v["spec"].get("clusterIP").is_none(), "{v}");
    let out = s.apply(&svc(ports));
    assert!(
        out.status.success(),
        "ExternalName -> ClusterIP: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.get(&["svc", "s"])["spec"]["clusterIP"].is_string());

    // A ClusterIP Service with external IPs takes a traffic policy.
    let out = s.apply(&svc(&format!(
        "  externalIPs: [192.0.2.10]\n  externalTrafficPolicy: Local\n{ports}"
    )));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // NetworkPolicy: `egress: []` isolates ingress only.
    let out = s.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: default}\nspec:\n  podSelector: {}\n  egress: []\n");
    assert!(out.status.success());
    assert_eq!(
        s.get(&["networkpolicy", "np"])["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );

    // A Pod: container defaults and its QoS class; a Namespace starts Active with the
    // kubernetes finalizer whatever status it was sent with.
    let out = s.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\nspec:\n  containers:\n  - {name: c, image: nginx, resources: {limits: {cpu: 100m, memory: 64Mi}}}\n");
    assert!(out.status.success());
    let p = s.get(&["pod", "p"]);
    assert_eq!(p["status"]["qosClass"], "Guaranteed", "{p}");
    assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
    assert_eq!(p["spec"]["enableServiceLinks"], true);
    let out = s.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fresh}\nstatus: {phase: Terminating}\n",
    );
    assert!(out.status.success());
    let n = s.get(&["ns", "fresh"]);
    assert_eq!(n["status"]["phase"], "Active");
    assert_eq!(n["spec"]["finalizers"], serde_json::json!(["kubernetes"]));
}

/// The multi-cluster kinds through real kubectl: ServiceExport and ServiceImport in both
/// served versions (one object, two apiVersions), ClusterProperty, printer columns, and
/// invalid objects refused with the field named.
#[test]
fn kubectl_serves_the_multicluster_kinds_in_both_versions() {
    let s = Standalone::start();
    let out = s.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: shop}\n---\napiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata: {name: web, namespace: shop}\nspec:\n  type: ClusterSetIP\n  ips: [10.99.0.10]\n  ports: [{name: http, port: 80, protocol: TCP}]\n---\napiVersion: about.k8s.io/v1beta1\nkind: ClusterProperty\nmetadata: {name: cluster.clusterset.k8s.io}\nspec: {value: c1}\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The export written as v1alpha1 reads back in either version.
    let v1b = s.get(&[
        "serviceexports.v1beta1.multicluster.x-k8s.io",
        "web",
        "-n",
        "shop",
    ]);
    assert_eq!(v1b["apiVersion"], "multicluster.x-k8s.io/v1beta1");
    let v1a = s.get(&[
        "serviceexports.v1alpha1.multicluster.x-k8s.io",
        "web",
        "-n",
        "shop",
    ]);
    assert_eq!(v1a["apiVersion"], "multicluster.x-k8s.io/v1alpha1");
    assert_eq!(v1a["metadata"]["uid"], v1b["metadata"]["uid"]);
    // Stored once, in the storage version: replacing it unchanged through the other version
    // is no change (same resourceVersion).
    let f = s.dir.path().join("export.json");
    std::fs::write(&f, v1b.to_string()).unwrap();
    ok(&mut s.kubectl(&[
        "replace",
        "--raw",
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceexports/web",
        "-f",
        f.to_str().unwrap(),
    ]));
    let again = s.get(&[
        "serviceexports.v1alpha1.multicluster.x-k8s.io",
        "web",
        "-n",
        "shop",
    ]);
    assert_eq!(
        again["metadata"]["resourceVersion"], v1a["metadata"]["resourceVersion"],
        "{v1a}\n{again}"
    );
    // Tables with the CRDs' columns, short names, several kinds at once.
    let table = ok(&mut s.kubectl(&["get", "serviceexports,serviceimports", "-A"]));
    assert!(
        table.contains("serviceexport.multicluster.x-k8s.io/web"),
        "{table}"
    );
    assert!(
        table.contains("ClusterSetIP") && table.contains("[\"10.99.0.10\"]"),
        "{table}"
    );
    let props = ok(&mut s.kubectl(&["get", "clusterproperties"]));
    assert!(
        props.contains("VALUE") && props.contains("cluster.clusterset.k8s.io   c1"),
        "{props}"
    );
    assert!(
        ok(&mut s.kubectl(&["get", "svcim", "-n", "shop", "-o", "name"]))
            .contains("serviceimport.multicluster.x-k8s.io/web")
    );
    // Status is its own subresource; the schema's rules are enforced.
    let out = s.apply("apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceImport\nmetadata: {name: bad, namespace: shop}\nspec:\n  type: Other\n  ports: [{name: http}]\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("spec.type: Unsupported value: \"Other\"")
            && err.contains("spec.ports[0].port: Required value"),
        "{err}"
    );
    // GlobalTrafficPolicy: accepted as written, refused with the fields named, printed.
    let out = s.apply("apiVersion: weir.dev/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  lbType: FailOver\n  priorities: [{clusters: [c1]}, {selector: {sameAsImporter: [region.weir.dev]}}, {selector: {}}]\n  overprovisioningFactor: 1.4\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = ok(&mut s.kubectl(&["get", "gtp", "-n", "shop"]));
    assert!(
        table.contains("FailOver") && table.contains("[c1] [same:region.weir.dev] [*]"),
        "{table}"
    );
    let out = s.apply("apiVersion: weir.dev/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  lbType: ActiveActive\n  targets: [{cluster: c2, weight: -5}]\n  panicThreshold: 120\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("spec.targets[0].weight: Invalid value: -5")
            && err.contains("spec.panicThreshold: Invalid value: 120"),
        "{err}"
    );
    let out = s.apply("apiVersion: about.k8s.io/v1alpha1\nkind: ClusterProperty\nmetadata: {name: zone.weir.dev}\nspec: {}\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.value: Required value"));
    let discovery: serde_json::Value = serde_json::from_str(&ok(&mut s.kubectl(&[
        "get",
        "--raw",
        "/apis/multicluster.x-k8s.io",
    ])))
    .unwrap();
    assert_eq!(discovery["preferredVersion"]["version"], "v1beta1");
    assert_eq!(discovery["versions"].as_array().unwrap().len(), 2);
}
