//! Multi-cluster Services end to end: clustersets of labs sharing exports through etcd, the
//! MCS API's semantics (KEP-1645 and the mcs-api conformance cases), ClusterSetIPs in the
//! datapath, and the mesh's behaviour under partitions and restarts.

mod common;

use std::time::{Duration, Instant};

use common::{ok, ClusterSet, Lab};
use serde_json::Value;

/// The same namespace, pod and Service in every cluster (namespace sameness).
const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mcs}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-1, namespace: mcs, labels: {app: hello}}
spec:
  containers: [{name: c, image: echo, ports: [{containerPort: 8080}, {containerPort: 8080, protocol: UDP}]}]
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: mcs}
spec:
  selector: {app: hello}
  ports:
  - {name: tcp, port: 80, targetPort: 8080}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP}
"#;

fn export(name: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: mcs}}\n"
    )
}

/// A v1beta1 ServiceExport of `name` exporting label `label` and annotation `annotation`
/// (both "true").
fn exported_with(name: &str, label: &str, annotation: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: mcs}}\nspec: {{exportedLabels: {{{label}: \"true\"}}, exportedAnnotations: {{{annotation}: \"true\"}}}}\n"
    )
}

fn import(c: &Lab, name: &str) -> Option<Value> {
    let out = c
        .weir(&["get", "serviceimports", "-n", "mcs", name, "-o", "json"])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn condition(c: &Lab, name: &str, type_: &str) -> Option<(String, String)> {
    let e = c.get_json(&["serviceexports", "-n", "mcs", name]);
    e["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|x| x["type"] == type_)
        .map(|x| {
            (
                x["status"].as_str().unwrap_or_default().to_string(),
                x["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

fn clusterset_ip(c: &Lab, name: &str) -> String {
    import(c, name).unwrap()["spec"]["ips"][0]
        .as_str()
        .unwrap()
        .to_string()
}

fn responders(v: &Value) -> Vec<String> {
    let mut r: Vec<String> = v["responders"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    r.sort();
    r
}

fn mcs_slices(c: &Lab, name: &str) -> Vec<Value> {
    let sel = format!("multicluster.kubernetes.io/service-name={name}");
    c.get_json(&["endpointslices", "-n", "mcs", "-l", &sel])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Export, import, conflicts, headless and ExternalName, and unexport, in a two-cluster
/// clusterset: the mcs-api conformance suite's Required cases and its EndpointSlice and
/// connectivity cases.
#[test]
fn mcs_lifecycle_conflicts_and_connectivity() {
    let set = ClusterSet::up("mcs", 2, 1, APP, &[]);
    let (c1, c2) = (set.c(1), set.c(2));
    // Each cluster carries its clusterset membership in the About API.
    let prop = c2.get_json(&["clusterproperties", "cluster.clusterset.k8s.io"]);
    assert_eq!(prop["spec"]["value"], "c2");
    let prop = c1.get_json(&["clusterproperties", "clusterset.k8s.io"]);
    assert_eq!(prop["spec"]["value"], set.name.as_str());
    // Not exported: nothing imported anywhere.
    assert!(import(c1, "hello").is_none() && import(c2, "hello").is_none());

    // Exported from c1 only: imported in both clusters (the exporter too), and only c1's pod
    // answers on the ClusterSetIP, from either cluster, although c2 has the Service too.
    assert!(c1.apply(&export("hello")).status.success());
    for c in [c1, c2] {
        c.eventually("the import", Duration::from_secs(20), || {
            import(c, "hello")
                .is_some_and(|i| i["status"]["clusters"].as_array().map(Vec::len) == Some(1))
        });
        let i = import(c, "hello").unwrap();
        assert_eq!(i["spec"]["type"], "ClusterSetIP");
        assert_eq!(i["spec"]["ipFamilies"], serde_json::json!(["IPv4"]));
        assert_eq!(i["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(i["status"]["clusters"][0]["cluster"], "c1");
        let ip: std::net::Ipv4Addr = clusterset_ip(c, "hello").parse().unwrap();
        assert!(ipnet::Ipv4Net::new([10, 90, 0, 0].into(), 16)
            .unwrap()
            .contains(&ip));
        let slices = mcs_slices(c, "hello");
        assert_eq!(slices.len(), 1, "{slices:?}");
        let labels = &slices[0]["metadata"]["labels"];
        assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "c1");
        assert_ne!(
            labels["endpointslice.kubernetes.io/managed-by"],
            "endpointslice-controller.k8s.io"
        );
        assert!(labels.get("kubernetes.io/service-name").is_none());
    }
    c1.eventually("the export's conditions", Duration::from_secs(20), || {
        condition(c1, "hello", "Ready") == Some(("True".into(), "Exported".into()))
    });
    assert_eq!(
        condition(c1, "hello", "Valid"),
        Some(("True".into(), "Valid".into()))
    );
    assert_eq!(
        condition(c1, "hello", "Conflict"),
        Some(("False".into(), "NoConflicts".into()))
    );
    for (c, ip) in [
        (c1, clusterset_ip(c1, "hello")),
        (c2, clusterset_ip(c2, "hello")),
    ] {
        for proto in ["tcp", "udp"] {
            let r = c.connect("mcs/hello-1", &format!("{ip}:80"), proto, 20);
            assert_eq!(r["ok"], 20, "{} {proto}: {r}", c.name);
            assert_eq!(
                responders(&r),
                ["c1/mcs/hello-1"],
                "{} {proto}: {r}",
                c.name
            );
        }
    }
    // A pod in c2 reaches c1's pod by its own address (not masqueraded across clusters).
    let r = c2.connect(
        "mcs/hello-1",
        &format!("{}:80", clusterset_ip(c2, "hello")),
        "tcp",
        3,
    );
    assert_eq!(
        r["seen_as"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["10.245.1.2"]
    );

    // Exported from c2 too, with one port more and one less: the import has the union, both
    // exports a port conflict, and each port reaches only the clusters that expose it.
    ok(&mut c2.kubectl(&["patch", "service", "-n", "mcs", "hello", "--type", "json", "-p",
        r#"[{"op": "replace", "path": "/spec/ports/1", "value": {"name": "alt", "port": 81, "targetPort": 8080, "protocol": "TCP"}}]"#]));
    assert!(c2.apply(&export("hello")).status.success());
    for c in [c1, c2] {
        c.eventually(
            "both clusters in the import",
            Duration::from_secs(20),
            || {
                import(c, "hello")
                    .is_some_and(|i| i["status"]["clusters"].as_array().map(Vec::len) == Some(2))
            },
        );
        c.eventually(
            "the conflict on the export",
            Duration::from_secs(20),
            || condition(c, "hello", "Conflict") == Some(("True".into(), "PortConflict".into())),
        );
        let ports: Vec<String> = import(c, "hello").unwrap()["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{}/{}/{}",
                    p["name"].as_str().unwrap(),
                    p["protocol"].as_str().unwrap(),
                    p["port"]
                )
            })
            .collect();
        assert_eq!(
            ports,
            ["tcp/TCP/80", "udp/UDP/80", "alt/TCP/81"],
            "the oldest export's first"
        );
    }
    let ip2 = clusterset_ip(c2, "hello");
    c2.eventually("both clusters answering", Duration::from_secs(20), || {
        responders(&c2.connect("mcs/hello-1", &format!("{ip2}:80"), "tcp", 30)).len() == 2
    });
    let r = c2.connect("mcs/hello-1", &format!("{ip2}:80"), "udp", 20);
    assert_eq!(
        (r["ok"].as_u64(), responders(&r)),
        (Some(20), vec!["c1/mcs/hello-1".to_string()]),
        "{r}"
    );
    let r = c2.connect("mcs/hello-1", &format!("{ip2}:81"), "tcp", 20);
    assert_eq!(
        (r["ok"].as_u64(), responders(&r)),
        (Some(20), vec!["c2/mcs/hello-1".to_string()]),
        "{r}"
    );

    // A GlobalTrafficPolicy in c2: its status gives each exporting cluster's share for c2's
    // clients and why, and names a cluster that is not in the clusterset.
    let gtp = "apiVersion: weir.dev/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {name: hello, namespace: mcs}\nspec:\n  lbType: FailOver\n  priorities: [{clusters: [c2]}, {clusters: [c1, c9]}]\n";
    assert!(c2.apply(gtp).status.success());
    c2.eventually("the policy's status", Duration::from_secs(20), || {
        let st = &c2.get_json(&["globaltrafficpolicies", "-n", "mcs", "hello"])["status"];
        let share = |c: &str| {
            st["clusters"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["cluster"] == c).cloned())
                .map(|x| (x["share"].as_f64(), x["level"].as_u64()))
        };
        share("c2") == Some((Some(100.0), Some(0)))
            && share("c1") == Some((Some(0.0), Some(1)))
            && st["conditions"][1]["reason"] == "UnknownClusters"
    });
    let wide = ok(&mut c2.weir(&["get", "gtp", "-n", "mcs", "-o", "wide"]));
    assert!(
        wide.contains("[c2] [c1,c9]") && wide.contains("c1=0.0%,c2=100.0%"),
        "{wide}"
    );

    // ExternalName: not valid, never imported. Headless: imported without IPs.
    let extra = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: mcs}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: hs, namespace: mcs, labels: {dummy-svc: dummy}, annotations: {dummy-svc: dummy}}
spec:
  clusterIP: None
  selector: {app: hello}
  ports: [{name: tcp, port: 80, targetPort: 8080}]
"#;
    assert!(c1.apply(extra).status.success());
    // The import carries the export's exportedLabels and exportedAnnotations, not the
    // Service's own.
    assert!(c1
        .apply(&format!(
            "{}---\n{}",
            export("ext"),
            exported_with("hs", "dummy-label", "dummy-annotation")
        ))
        .status
        .success());
    c1.eventually("ExternalName refused", Duration::from_secs(20), || {
        condition(c1, "ext", "Valid") == Some(("False".into(), "InvalidServiceType".into()))
    });
    c2.eventually("the headless import", Duration::from_secs(20), || {
        import(c2, "hs").is_some()
    });
    let hs = import(c2, "hs").unwrap();
    assert_eq!(hs["spec"]["type"], "Headless");
    assert!(hs["spec"]
        .get("ips")
        .is_none_or(|v| v.as_array().is_some_and(Vec::is_empty)));
    assert_eq!(hs["spec"]["ipFamilies"], serde_json::json!(["IPv4"]));
    assert!(import(c1, "ext").is_none() && import(c2, "ext").is_none());
    let meta = &hs["metadata"];
    assert_eq!(meta["labels"]["dummy-label"], "true", "{meta}");
    assert_eq!(meta["annotations"]["dummy-annotation"], "true", "{meta}");
    assert!(
        meta["labels"].get("dummy-svc").is_none() && meta["annotations"].get("dummy-svc").is_none()
    );
    // Exported from c2 with other labels and annotations: both exports conflict, the oldest's
    // stay on the import.
    assert!(c2.apply(extra).status.success());
    assert!(c2
        .apply(&exported_with("hs", "dummy-label2", "dummy-annotation2"))
        .status
        .success());
    let reasons = "AnnotationsConflict,LabelsConflict";
    for c in [c1, c2] {
        c.eventually("the labels conflict", Duration::from_secs(20), || {
            condition(c, "hs", "Conflict") == Some(("True".into(), reasons.into()))
        });
    }
    let meta = import(c1, "hs").unwrap()["metadata"].clone();
    assert_eq!(meta["labels"]["dummy-label"], "true", "{meta}");
    assert!(meta["labels"].get("dummy-label2").is_none(), "{meta}");
    assert!(
        meta["annotations"].get("dummy-annotation2").is_none(),
        "{meta}"
    );

    // `weir get -o wide` and `weir status` show each import's clusters, endpoints per
    // cluster, conflicts and the age of each cluster's data.
    let wide = ok(&mut c2.weir(&["get", "serviceimports", "-n", "mcs", "-o", "wide"]));
    let line = wide
        .lines()
        .find(|l| l.starts_with("hello "))
        .unwrap_or_default();
    for want in [
        "ClusterSetIP",
        "c1,c2",
        "c1=1,c2=1",
        "PortConflict (oldest export: c1)",
        "c1=",
    ] {
        assert!(line.contains(want), "{want} missing from {wide}");
    }
    let st = ok(&mut c2.weir(&["status"]));
    assert!(st.contains("connected to etcd"), "{st}");
    assert!(
        st.contains("mcs/hello") && st.contains("PortConflict"),
        "{st}"
    );

    // Unexported everywhere: the import and its slices go from every cluster.
    for c in [c1, c2] {
        ok(&mut c.kubectl(&[
            "delete",
            "serviceexport",
            "-n",
            "mcs",
            "hello",
            "--ignore-not-found",
        ]));
    }
    for c in [c1, c2] {
        c.eventually("the import deleted", Duration::from_secs(20), || {
            import(c, "hello").is_none()
        });
        c.eventually("its slices deleted", Duration::from_secs(20), || {
            mcs_slices(c, "hello").is_empty()
        });
    }
}

/// A partitioned cluster is withdrawn once the remote TTL has passed (no failed connection to
/// a ClusterSetIP with reachable endpoints elsewhere after that, none at all to local ones),
/// keeps its last state itself, and converges after healing without a restart, changes made
/// meanwhile included. Mesh, etcd and agent restarts never interrupt ClusterSetIP traffic.
#[test]
fn partitions_and_restarts_under_load() {
    let set = ClusterSet::up("mcp", 2, 1, APP, &["--remote-ttl", "4s"]);
    let (c1, c2) = (set.c(1), set.c(2));
    assert!(c1.apply(&export("hello")).status.success());
    assert!(c2.apply(&export("hello")).status.success());
    c2.eventually("both clusters imported", Duration::from_secs(20), || {
        import(c2, "hello")
            .is_some_and(|i| i["status"]["clusters"].as_array().map(Vec::len) == Some(2))
    });
    let ip2 = clusterset_ip(c2, "hello");
    let target = format!("{ip2}:80");
    c2.eventually("both clusters answering", Duration::from_secs(20), || {
        responders(&c2.connect("mcs/hello-1", &target, "tcp", 30)).len() == 2
    });

    // Cut c1 off. Its local Service keeps working throughout; once the TTL has passed, c2
    // sends nothing to c1 any more and no connection to the ClusterSetIP fails.
    let local = c2.get_json(&["services", "-n", "mcs", "hello"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let load = c2.hold("mcs/hello-1", &format!("{local}:80"), "tcp", "8s");
    let cut = Instant::now();
    ok(&mut c1.weir(&["lab", "partition"]));
    c2.eventually("c1 withdrawn", Duration::from_secs(15), || {
        import(c2, "hello")
            .is_some_and(|i| i["status"]["clusters"].as_array().map(Vec::len) == Some(1))
    });
    let withdrawn = cut.elapsed();
    assert!(
        withdrawn >= Duration::from_secs(3),
        "withdrawn before the TTL: {withdrawn:?}"
    );
    let r = c2.connect("mcs/hello-1", &target, "tcp", 40);
    assert_eq!(
        (r["ok"].as_u64(), responders(&r)),
        (Some(40), vec!["c2/mcs/hello-1".to_string()]),
        "{r}"
    );
    let held = load.join().unwrap();
    assert_eq!(
        held["failed"], 0,
        "local traffic during the partition: {held}"
    );
    // The cut-off mesh keeps what it had.
    let st = ok(&mut c1.weir(&["get", "serviceimports", "-n", "mcs", "hello", "-o", "json"]));
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["status"]["clusters"].as_array().map(Vec::len), Some(2));

    // Meanwhile c1 gains a pod; after healing c2 sees it without any restart.
    assert!(c1
        .apply("apiVersion: v1\nkind: Pod\nmetadata: {name: hello-2, namespace: mcs, labels: {app: hello}}\nspec:\n  containers: [{name: c, image: echo, ports: [{containerPort: 8080}]}]\n")
        .status
        .success());
    ok(&mut c1.weir(&["lab", "heal"]));
    c2.eventually(
        "c1's new pod reachable through the ClusterSetIP",
        Duration::from_secs(30),
        || responders(&c2.connect("mcs/hello-1", &target, "tcp", 40)).len() == 3,
    );

    // Restarts under load: the mesh, etcd and the agents of c2.
    for (who, comp) in [(c2, "mesh"), (c2, "agents"), (c2, "apiserver")] {
        let load = c2.hold("mcs/hello-1", &target, "tcp", "4s");
        ok(&mut who.weir(&["lab", "stop", "--component", comp]));
        std::thread::sleep(Duration::from_secs(1));
        ok(&mut who.weir(&["lab", "start", "--component", comp]));
        let held = load.join().unwrap();
        assert_eq!(held["failed"], 0, "{comp} restart: {held}");
    }
    let load = c2.hold("mcs/hello-1", &target, "tcp", "4s");
    ok(&mut set.weir(&["lab", "stop", "--component", "etcd"]));
    std::thread::sleep(Duration::from_secs(1));
    let r = c2.connect("mcs/hello-1", &target, "tcp", 30);
    assert_eq!(
        responders(&r).len(),
        3,
        "etcd down: the last state stays: {r}"
    );
    ok(&mut set.weir(&["lab", "start", "--component", "etcd"]));
    let held = load.join().unwrap();
    assert_eq!(held["failed"], 0, "etcd restart: {held}");
    c2.eventually("the mesh reconnected", Duration::from_secs(20), || {
        let s: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("/run/weir/labs/{}/mesh-status.json", c2.name))
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        s["connected"] == true
    });
    let r = c2.connect("mcs/hello-1", &target, "tcp", 40);
    assert_eq!(responders(&r).len(), 3, "{r}");
}

/// `dig` (or any resolver) run in a pod with `weir lab exec`: its short answer lines, sorted.
fn dig(c: &Lab, args: &[&str]) -> Vec<String> {
    let mut a = vec![
        "lab",
        "exec",
        "mcs/client",
        "--",
        "dig",
        "+short",
        "+tries=1",
        "+time=2",
    ];
    a.extend_from_slice(args);
    let mut v: Vec<String> = ok(&mut c.weir(&a)).lines().map(String::from).collect();
    v.sort();
    v
}

/// The lab's DNS for `cluster.local` and `clusterset.local`, as CoreDNS's kubernetes and
/// multicluster plugins answer: ClusterIP and ClusterSetIP A records, SRV for named ports and
/// bare names, headless per-endpoint names (by hostname+subdomain, else the dashed address,
/// and `<hostname>.<clusterid>.` across clusters), dns-version, and names through
/// `lab connect`.
#[test]
fn dns_for_the_cluster_and_the_clusterset() {
    let manifest = format!(
        "{APP}---\n{}",
        r#"apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mcs}
spec:
  containers: [{name: c, image: echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: mcs, labels: {app: db}}
spec:
  hostname: db-0
  subdomain: db
  containers: [{name: c, image: echo, ports: [{containerPort: 5432}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-x, namespace: mcs, labels: {app: db}}
spec:
  containers: [{name: c, image: echo, ports: [{containerPort: 5432}]}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: mcs}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
"#
    );
    let set = ClusterSet::up("mcd", 2, 1, &manifest, &[]);
    let (c1, c2) = (set.c(1), set.c(2));
    assert!(c1
        .apply(&format!("{}---\n{}", export("hello"), export("db")))
        .status
        .success());
    assert!(c2.apply(&export("db")).status.success());
    c2.eventually("imports", Duration::from_secs(20), || {
        import(c2, "hello").is_some()
            && import(c2, "db")
                .is_some_and(|i| i["status"]["clusters"].as_array().map(Vec::len) == Some(2))
    });
    let csip = clusterset_ip(c2, "hello");
    let pod_ip = |c: &Lab, pod: &str| {
        c.get_json(&["pods", "-n", "mcs", pod])["status"]["podIP"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (db1, db2) = (pod_ip(c1, "db-0"), pod_ip(c2, "db-0"));
    let dbx2 = pod_ip(c2, "db-x");
    let local = c2.get_json(&["services", "-n", "mcs", "hello"])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    c2.eventually(
        "DNS answering for the clusterset",
        Duration::from_secs(20),
        || dig(c2, &["db.mcs.svc.clusterset.local"]).len() == 4,
    );
    // ClusterSetIP and ClusterIP.
    assert_eq!(dig(c2, &["hello.mcs.svc.clusterset.local"]), [csip]);
    assert_eq!(dig(c2, &["hello.mcs.svc.cluster.local"]), [local]);
    assert!(dig(c2, &["AAAA", "hello.mcs.svc.clusterset.local"]).is_empty());
    assert_eq!(
        dig(c2, &["SRV", "_tcp._tcp.hello.mcs.svc.clusterset.local"]),
        ["0 100 80 hello.mcs.svc.clusterset.local."]
    );
    // The bare name: every port (tcp/80 and udp/80 are one record).
    assert_eq!(
        dig(c2, &["SRV", "hello.mcs.svc.clusterset.local"]),
        ["0 50 80 hello.mcs.svc.clusterset.local."]
    );
    assert_eq!(
        dig(c2, &["TXT", "dns-version.clusterset.local"]),
        ["\"1.0.0\""]
    );
    // Headless across the clusterset: every ready endpoint, and one name per endpoint.
    let mut all = vec![db1.clone(), db2.clone(), pod_ip(c1, "db-x"), dbx2.clone()];
    all.sort();
    assert_eq!(dig(c2, &["db.mcs.svc.clusterset.local"]), all);
    assert_eq!(dig(c2, &["db-0.c1.db.mcs.svc.clusterset.local"]), [db1]);
    assert_eq!(
        dig(c2, &["db-0.c2.db.mcs.svc.clusterset.local"]),
        std::slice::from_ref(&db2)
    );
    assert!(
        dig(c2, &["c1.db.mcs.svc.clusterset.local"]).is_empty(),
        "reserved"
    );
    let srv = dig(c2, &["SRV", "_pg._tcp.db.mcs.svc.clusterset.local"]);
    assert_eq!(srv.len(), 4, "{srv:?}");
    assert!(
        srv.iter()
            .any(|r| r.ends_with(" 5432 db-0.c1.db.mcs.svc.clusterset.local.")),
        "{srv:?}"
    );
    // In the cluster's own zone: by hostname, else by dashed address.
    assert_eq!(dig(c2, &["db-0.db.mcs.svc.cluster.local"]), [db2]);
    let dashed = format!("{}.db.mcs.svc.cluster.local", dbx2.replace('.', "-"));
    assert_eq!(dig(c2, &[dashed.as_str()]), [dbx2]);
    // The search path: a short name resolves as in a pod.
    assert_eq!(dig(c2, &["+search", "hello"]).len(), 1);
    // lab connect resolves names of two dots or more through the pod's resolver.
    let r = c2.connect("mcs/client", "hello.mcs.svc.clusterset.local:80", "tcp", 5);
    assert_eq!(r["ok"], 5, "{r}");
    assert_eq!(responders(&r), ["c1/mcs/hello-1"]);
    let r = c2.connect("mcs/client", "nope.mcs.svc.clusterset.local:80", "tcp", 2);
    assert_eq!(r["errors"]["ENOTFOUND"], 2, "{r}");
}

/// NetworkPolicy across the clusterset: selectors match pods of every cluster, a remote
/// pod's namespace is judged by its own cluster's labels, and `weir.dev/cluster` (set from
/// where the pod lives, whatever the pod says) limits a peer to one cluster.
#[test]
fn network_policy_across_clusters() {
    let manifest = format!(
        "{APP}---\n{}",
        r#"apiVersion: v1
kind: Namespace
metadata: {name: team}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: team}
spec:
  containers: [{name: c, image: echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mcs}
spec:
  containers: [{name: c, image: echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: liar, namespace: mcs, labels: {weir.dev/cluster: c2}}
spec:
  containers: [{name: c, image: echo}]
"#
    );
    let set = ClusterSet::up("mcn", 2, 1, &manifest, &[]);
    let (c1, c2) = (set.c(1), set.c(2));
    // Only c2's namespace `team` is team a.
    ok(&mut c2.kubectl(&["label", "namespace", "team", "team=a"]));
    let hello = c1.get_json(&["pods", "-n", "mcs", "hello-1"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    let target = format!("{hello}:8080");
    let reach = |c: &Lab, from: &str| c.connect(from, &target, "tcp", 2)["ok"] == 2;
    // No policy: everyone reaches c1's pod by its address, across clusters too.
    c2.eventually("c2 reaches c1's pod", Duration::from_secs(20), || {
        reach(c2, "team/client")
    });

    let from_team_a = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-team-a, namespace: mcs}
spec:
  podSelector: {matchLabels: {app: hello}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]
"#;
    assert!(c1.apply(from_team_a).status.success());
    c1.eventually(
        "c1's own team namespace denied",
        Duration::from_secs(20),
        || !reach(c1, "team/client"),
    );
    c2.eventually(
        "c2's team namespace (labelled there) allowed",
        Duration::from_secs(20),
        || reach(c2, "team/client"),
    );
    assert!(!reach(c2, "mcs/client"), "c2's mcs namespace is not team a");
    // The remote peers are known by identity, with their cluster.
    let reps = c1.get_json(&["remoteendpoints"])["items"]
        .as_array()
        .cloned()
        .unwrap();
    assert!(reps
        .iter()
        .any(|r| r["spec"]["cluster"] == "c2" && r["spec"]["pod"] == "client"));
    assert!(
        !reps.iter().any(|r| r["spec"]["cluster"] == "c1"),
        "own pods are not remote"
    );

    ok(&mut c1.kubectl(&["delete", "networkpolicy", "-n", "mcs", "from-team-a"]));
    let only_c2 = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-c2, namespace: mcs}
spec:
  podSelector: {matchLabels: {app: hello}}
  ingress: [{from: [{podSelector: {matchLabels: {weir.dev/cluster: c2}}}]}]
"#;
    assert!(c1.apply(only_c2).status.success());
    c1.eventually("c1's pods denied", Duration::from_secs(20), || {
        !reach(c1, "mcs/client")
    });
    c2.eventually(
        "c2's pods of the namespace allowed",
        Duration::from_secs(20),
        || reach(c2, "mcs/client"),
    );
    assert!(!reach(c1, "mcs/liar"), "a pod cannot claim another cluster");
    assert!(!reach(c2, "team/client"), "another namespace of c2");
    observed_across_the_clusterset(&set);
}

/// `weir observe` on a clusterset reads every node of every cluster at once, merged by time,
/// the nodes named CLUSTER/NODE: c1's denials of c2's clients, c2's forwarding summaries.
fn observed_across_the_clusterset(set: &ClusterSet) {
    let flows = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["observe", "--last", "5000", "-o", "json"];
        all.extend_from_slice(args);
        ok(&mut set.weir(&all))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut all = Vec::new();
    set.c(1)
        .eventually("both clusters' flows", Duration::from_secs(10), || {
            all = flows(&[]);
            all.iter().any(|f| {
                f["node"] == "c1/node-1"
                    && f["event"] == "policy-verdict"
                    && f["verdict"] == "dropped"
            }) && all
                .iter()
                .any(|f| f["node"] == "c2/node-1" && f["event"] == "trace")
        });
    let times: Vec<&str> = all.iter().map(|f| f["time"].as_str().unwrap()).collect();
    let parsed: Vec<jiff::Timestamp> = times.iter().map(|t| t.parse().unwrap()).collect();
    assert!(parsed.windows(2).all(|w| w[0] <= w[1]), "merged by time");
    let only = flows(&["--node", "c2/node-1"]);
    assert!(!only.is_empty() && only.iter().all(|f| f["node"] == "c2/node-1"));
    let out = set.weir(&["observe", "--node", "node-1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("c1/node-1, c2/node-1"),
        "{err}"
    );
}

/// In VXLAN mode pod addresses are not routed on the fabric: the agents tunnel to the other
/// clusters' pods through the nodes the mesh shares (RemoteNodes), and leave those flows
/// unmasqueraded.
#[test]
fn vxlan_across_clusters_through_shared_nodes() {
    let set = ClusterSet::up("mcv", 2, 2, APP, &["--tunnel", "vxlan"]);
    let (c1, c2) = (set.c(1), set.c(2));
    let nodes = c2.get_json(&["remotenodes"])["items"]
        .as_array()
        .cloned()
        .unwrap();
    assert_eq!(nodes.len(), 2, "c1's two nodes: {nodes:?}");
    assert!(nodes.iter().all(|n| n["spec"]["cluster"] == "c1"));
    assert!(c1.apply(&export("hello")).status.success());
    c2.eventually("the import", Duration::from_secs(20), || {
        import(c2, "hello").is_some()
    });
    let ip = clusterset_ip(c2, "hello");
    c2.eventually(
        "c1's pod through the tunnel",
        Duration::from_secs(20),
        || c2.connect("mcs/hello-1", &format!("{ip}:80"), "tcp", 5)["ok"] == 5,
    );
    let r = c2.connect("mcs/hello-1", &format!("{ip}:80"), "tcp", 10);
    assert_eq!(responders(&r), ["c1/mcs/hello-1"], "{r}");
    let me = c2.get_json(&["pods", "-n", "mcs", "hello-1"])["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        r["seen_as"].as_object().unwrap().keys().collect::<Vec<_>>(),
        [&me],
        "{r}"
    );
    // Session affinity holds through the ClusterSetIP: exported from both clusters with
    // ClientIP affinity, a client keeps reaching one backend.
    for c in [c1, c2] {
        ok(&mut c.kubectl(&[
            "patch",
            "service",
            "-n",
            "mcs",
            "hello",
            "-p",
            r#"{"spec": {"sessionAffinity": "ClientIP"}}"#,
        ]));
    }
    assert!(c2.apply(&export("hello")).status.success());
    c2.eventually("affinity in the import", Duration::from_secs(20), || {
        import(c2, "hello").is_some_and(|i| {
            i["spec"]["sessionAffinity"] == "ClientIP"
                && i["status"]["clusters"].as_array().map(Vec::len) == Some(2)
        })
    });
    c2.eventually("both clusters' endpoints", Duration::from_secs(20), || {
        mcs_slices(c2, "hello").len() >= 2
    });
    std::thread::sleep(Duration::from_secs(1));
    let r = c2.connect("mcs/hello-1", &format!("{ip}:80"), "tcp", 30);
    assert_eq!(r["ok"], 30, "{r}");
    assert_eq!(responders(&r).len(), 1, "one backend for one client: {r}");
}
