//! The cases of kubernetes-sigs/mcs-api's conformance suite (`conformance/`, v1beta1), each
//! as the suite builds and checks it, against a clusterset of two lab clusters. The suite
//! itself needs pod exec and container images (netshoot, socat), which labs do not run; here
//! its `request` pod's `nc` and `nslookup` are `weir lab connect` and `dig` run as that pod
//! (`weir lab exec`), and its socat servers are the lab's echo pods, which answer with their
//! name. C0 of the suite is c1, C1 is c2. Every case runs in its own namespace, as the suite's.

mod common;

use std::time::{Duration, Instant};

use common::{ok, run, ClusterSet, Lab};
use serde_json::{json, Value};

/// How long the suite waits for an object or a condition (`Eventually(..., 20s)`).
const AWAIT: Duration = Duration::from_secs(20);
/// How long the suite checks that something holds (`Consistently(..., 5s)`).
const ENSURE: Duration = Duration::from_secs(5);
const SI: &str = "serviceimports.v1beta1.multicluster.x-k8s.io";
const SE: &str = "serviceexports.v1beta1.multicluster.x-k8s.io";

/// One case: the namespace it runs in and the two clusters.
struct Case<'a> {
    ns: String,
    c: [&'a Lab; 2],
}

type Outcome = Result<(), String>;

fn check(cond: bool, msg: impl FnOnce() -> String) -> Outcome {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// Polls `f` every 100 ms until it holds (Ok) or `within` has passed (the last error).
fn eventually(within: Duration, mut f: impl FnMut() -> Outcome) -> Outcome {
    let deadline = Instant::now() + within;
    loop {
        let r = f();
        if r.is_ok() || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `f` every 100 ms for `within`: it must hold every time.
fn consistently(within: Duration, mut f: impl FnMut() -> Outcome) -> Outcome {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        f()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The suite's `newHelloService()`.
fn hello_service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "annotations": {"dummy-svc": "dummy"}, "labels": {"dummy-svc": "dummy"}},
        "spec": {"selector": {"app": "hello"},
            "ports": [{"name": "tcp", "port": 42, "protocol": "TCP"}, {"name": "udp", "port": 42, "protocol": "UDP"}],
            "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}},
            "ipFamilyPolicy": "PreferDualStack"}})
}

/// The suite's `newHelloServiceExport()`.
fn hello_export() -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
        "metadata": {"name": "hello", "annotations": {"dummy-svcexport": "dummy"}, "labels": {"dummy-svcexport": "dummy"}},
        "spec": {}})
}

impl<'a> Case<'a> {
    fn apply(&self, c: &Lab, mut obj: Value) -> Outcome {
        if obj["kind"] != "Namespace" {
            obj["metadata"]["namespace"] = json!(self.ns);
        }
        let out = c.apply(&obj.to_string());
        check(out.status.success(), || {
            format!(
                "{}: applying {}: {}",
                c.name,
                obj["kind"],
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The suite's JustBeforeEach: the namespace and a `request` pod in every cluster, the
    /// hello pods (`replicas`, unless none) and Service in c1, and its export when `export`.
    fn fixture(&self, svc: &Value, replicas: usize, export: Option<&Value>) -> Outcome {
        for c in self.c {
            self.apply(
                c,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}}),
            )?;
            self.apply(
                c,
                json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "request", "labels": {"app": "request"}},
                "spec": {"containers": [{"name": "request", "image": "netshoot"}]}}),
            )?;
        }
        self.deploy_hello(self.c[0], svc, replicas)?;
        // As the suite's startRequestPod: Running within 60 s, polled every second.
        for c in self.c {
            eventually(Duration::from_secs(60), || {
                let out =
                    run(&mut c.kubectl(&["get", "pod", "-n", &self.ns, "request", "-o", "json"]));
                let pod: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                check(pod["status"]["phase"] == "Running", || {
                    format!("{}: the request pod is {}", c.name, pod["status"]["phase"])
                })
            })?;
        }
        if let Some(e) = export {
            self.apply(self.c[0], e.clone())?;
        }
        Ok(())
    }

    /// The hello "Deployment" (pods answering on 42, TCP and UDP) and Service in `c`.
    fn deploy_hello(&self, c: &Lab, svc: &Value, replicas: usize) -> Outcome {
        for i in 0..replicas {
            self.apply(
                c,
                json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("hello-{i}"), "labels": {"app": "hello"}},
                "spec": {"containers": [{"name": "hello", "image": "socat",
                    "ports": [{"containerPort": 42}, {"containerPort": 42, "protocol": "UDP"}]}]}}),
            )?;
        }
        self.apply(c, svc.clone())
    }

    /// The two-cluster driver's JustBeforeEach: c1's export, its import awaited, a second so
    /// that c1's export is the older, then the Service `svc2` and export `export2` in c2.
    fn second_cluster(&self, export: &Value, svc2: &Value, export2: &Value) -> Outcome {
        self.apply(self.c[0], export.clone())?;
        self.await_import(self.c[0], |_| Ok(()))?;
        std::thread::sleep(Duration::from_millis(1100));
        self.deploy_hello(self.c[1], svc2, 1)?;
        self.apply(self.c[1], export2.clone())
    }

    fn get(&self, c: &Lab, what: &str) -> Option<Value> {
        let out = run(&mut c.kubectl(&["get", what, "-n", &self.ns, "hello", "-o", "json"]));
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn import(&self, c: &Lab) -> Option<Value> {
        self.get(c, SI)
    }

    fn await_import(&self, c: &Lab, mut verify: impl FnMut(&Value) -> Outcome) -> Outcome {
        eventually(AWAIT, || match self.import(c) {
            Some(si) => verify(&si),
            None => Err(format!("{}: no ServiceImport hello in {}", c.name, self.ns)),
        })
    }

    fn await_no_import(&self, c: &Lab) -> Outcome {
        eventually(AWAIT, || {
            check(self.import(c).is_none(), || {
                format!("{}: the ServiceImport still exists", c.name)
            })
        })
    }

    fn ensure_import(&self, c: &Lab, present: bool) -> Outcome {
        consistently(ENSURE, || {
            check(self.import(c).is_some() == present, || {
                format!("{}: ServiceImport present = {}", c.name, !present)
            })
        })
    }

    fn await_condition(&self, c: &Lab, type_: &str, status: &str) -> Outcome {
        eventually(AWAIT, || {
            let se = self.get(c, SE).unwrap_or_default();
            let cond = se["status"]["conditions"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["type"] == type_).cloned());
            check(cond.as_ref().is_some_and(|x| x["status"] == status), || {
                format!("{}: condition {type_} is {cond:?}, not {status}", c.name)
            })
        })
    }

    fn unexport(&self, c: &Lab) -> Outcome {
        ok(&mut c.kubectl(&["delete", SE, "-n", &self.ns, "hello"]));
        Ok(())
    }

    /// `spec.ipFamilies` of `c`'s import, once it has some.
    fn import_families(&self, c: &Lab) -> Result<Vec<String>, String> {
        let mut fams = Vec::new();
        self.await_import(c, |si| {
            check(
                si["spec"]["ipFamilies"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty()),
                || format!("{}: no ipFamilies yet", c.name),
            )
        })?;
        if let Some(si) = self.import(c) {
            fams = strings(&si["spec"]["ipFamilies"]);
        }
        Ok(fams)
    }

    /// The suite's `execPortConnectivityCommand`: from every cluster, for each family of its
    /// import, TCP connections to the address `hello.<ns>.svc.clusterset.local` resolves to
    /// in that family (A or AAAA, as the pod resolves it), answered by one of `want` (pod
    /// names such as `c1/<ns>/hello-0`), `times` probes in a row.
    fn connectivity(&self, port: u16, want: &[String], times: usize) -> Outcome {
        let name = format!("hello.{}.svc.clusterset.local.", self.ns);
        for c in self.c {
            for fam in self.import_families(c)? {
                let mut addr = String::new();
                eventually(AWAIT, || {
                    addr = self.dig(c, record_type(&fam), &name).join("");
                    check(!addr.is_empty(), || {
                        format!("{}: {name} has no {fam} address", c.name)
                    })
                })?;
                let to = if fam == "IPv6" {
                    format!("[{addr}]:{port}")
                } else {
                    format!("{addr}:{port}")
                };
                eventually(AWAIT, || {
                    let r = c.connect(&format!("{}/request", self.ns), &to, "tcp", times);
                    let who = keys(&r["responders"]);
                    check(
                        r["ok"] == times && who.iter().all(|w| want.contains(w)),
                        || format!("{}: {to} ({fam}): {r}", c.name),
                    )
                })?;
            }
        }
        Ok(())
    }

    /// `dig` as the `request` pod of `c`: the answer lines, sorted.
    fn dig(&self, c: &Lab, qtype: &str, name: &str) -> Vec<String> {
        let pod = format!("{}/request", self.ns);
        let out = run(&mut c.weir(&[
            "lab", "exec", &pod, "--", "dig", "+short", "+tries=1", "+time=2", "-t", qtype, name,
        ]));
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    }

    /// The EndpointSlices of namespace ns in `c` selected by `selector` (all without one).
    fn slices(&self, c: &Lab, selector: Option<&str>) -> Vec<Value> {
        let mut args = vec!["endpointslices", "-n", self.ns.as_str()];
        if let Some(s) = selector {
            args.extend(["-l", s]);
        }
        c.get_json(&args)["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The suite's `awaitMCSEndpointSlice`: a slice with both MCS label keys, of
    /// `address_type`, with endpoints.
    fn mcs_slice(&self, c: &Lab, address_type: &str) -> Result<Value, String> {
        let mut found = None;
        eventually(Duration::from_secs(60), || {
            found = self.slices(c, None).into_iter().find(|s| {
                let l = &s["metadata"]["labels"];
                l.get("multicluster.kubernetes.io/service-name").is_some()
                    && l.get("multicluster.kubernetes.io/source-cluster").is_some()
                    && s["addressType"] == address_type
                    && s["endpoints"].as_array().is_some_and(|e| !e.is_empty())
            });
            check(found.is_some(), || {
                format!("{}: no MCS EndpointSlice of {address_type}", c.name)
            })
        })?;
        Ok(found.unwrap_or_default())
    }

    /// The suite's `awaitK8sEndpoints`: (address, hostname or dashed address) of every
    /// endpoint of the cluster's own slices of hello of `address_type`, once there are `n`.
    fn k8s_endpoints(
        &self,
        c: &Lab,
        address_type: &str,
        n: usize,
    ) -> Result<Vec<(String, String)>, String> {
        let mut eps = Vec::new();
        eventually(Duration::from_secs(60), || {
            eps = self
                .slices(c, Some("kubernetes.io/service-name=hello"))
                .iter()
                .filter(|s| s["addressType"] == address_type)
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .filter(|e| e["conditions"]["ready"] != false)
                .flat_map(|e| {
                    strings(&e["addresses"])
                        .into_iter()
                        .map(|a| {
                            let host = e["hostname"]
                                .as_str()
                                .map(String::from)
                                .unwrap_or_else(|| a.replace(['.', ':'], "-"));
                            (a, host)
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            check(eps.len() == n, || {
                format!("{}: {} endpoints, not {n}", c.name, eps.len())
            })
        })?;
        Ok(eps)
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// `(name, protocol, port)` of each ServiceImport port, sorted by name.
fn ports(si: &Value) -> Vec<(String, String, u64)> {
    let mut v: Vec<(String, String, u64)> = si["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_lowercase(),
                p["protocol"].as_str().unwrap_or_default().to_string(),
                p["port"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn port(name: &str, protocol: &str, port: u64) -> (String, String, u64) {
    (name.into(), protocol.into(), port)
}

fn type_is(want: &'static str) -> impl Fn(&Value) -> Outcome {
    move |si| {
        check(si["spec"]["type"] == want, || {
            format!("spec.type {} is not {want}", si["spec"]["type"])
        })
    }
}

// ---- connectivity.go ----

/// #1 (Required) Connectivity to a service that is not exported should be inaccessible.
fn not_exported_is_inaccessible(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    let to = format!("hello.{}.svc.clusterset.local:42", t.ns);
    for c in t.c {
        let r = c.connect(&format!("{}/request", t.ns), &to, "tcp", 20);
        check(r["ok"] == 0, || format!("{}: {to} answered: {r}", c.name))?;
    }
    Ok(())
}

/// #2 Connectivity to an exported ClusterIP service should be accessible through DNS.
fn exported_is_accessible_through_dns(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    t.apply(t.c[0], hello_export())?;
    t.connectivity(42, &[format!("c1/{}/hello-0", t.ns)], 1)
}

/// #3 A ClusterIP service existing in two clusters but exported from one should only access
/// the exporting cluster.
fn only_the_exporting_cluster_answers(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    t.deploy_hello(t.c[1], &hello_service(), 1)?;
    t.apply(t.c[0], hello_export())?;
    t.connectivity(42, &[format!("c1/{}/hello-0", t.ns)], 10)
}

/// #4 (StrictPortConflict) Same port name, different numbers: traffic only to the cluster
/// that exposes the port.
fn same_port_name_other_number(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    let mut svc2 = hello_service();
    svc2["spec"]["ports"] =
        json!([{"name": "tcp", "port": 4242, "protocol": "TCP", "targetPort": 42}]);
    t.second_cluster(&hello_export(), &svc2, &hello_export())?;
    t.connectivity(42, &[format!("c1/{}/hello-0", t.ns)], 10)
}

/// #5 (StrictPortConflict) Different port names: each port reaches only the cluster that
/// exposes it.
fn different_port_names(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    let mut svc2 = hello_service();
    svc2["spec"]["ports"] =
        json!([{"name": "tcp2", "port": 4242, "protocol": "TCP", "targetPort": 42}]);
    t.second_cluster(&hello_export(), &svc2, &hello_export())?;
    t.connectivity(42, &[format!("c1/{}/hello-0", t.ns)], 10)?;
    t.connectivity(4242, &[format!("c2/{}/hello-0", t.ns)], 10)
}

// ---- service_import.go ----

/// #6 (Required) A ServiceImport should only exist as long as there's at least one exporting
/// cluster.
fn import_lives_while_exported(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    t.await_import(t.c[0], |_| Ok(()))?;
    t.deploy_hello(t.c[1], &hello_service(), 1)?;
    t.apply(t.c[1], hello_export())?;
    t.ensure_import(t.c[0], true)?;
    t.unexport(t.c[0])?;
    t.ensure_import(t.c[0], true)?;
    t.unexport(t.c[1])?;
    t.await_no_import(t.c[0])
}

fn exported_metadata(labels: &str, annotations: &str) -> Value {
    let mut e = hello_export();
    e["spec"] =
        json!({"exportedLabels": {labels: "true"}, "exportedAnnotations": {annotations: "true"}});
    e
}

/// #7 Only labels and annotations specified as exported in the ServiceExport should be
/// propagated to the ServiceImport.
fn exported_labels_propagate(t: &Case) -> Outcome {
    let e = exported_metadata("dummy-label", "dummy-annotation");
    t.fixture(&hello_service(), 1, Some(&e))?;
    t.await_import(t.c[0], |si| {
        let m = &si["metadata"];
        check(
            m["annotations"]["dummy-annotation"] == "true"
                && m["annotations"]["dummy-svc"] != "dummy"
                && m["labels"]["dummy-label"] == "true"
                && m["labels"]["dummy-svc"] != "dummy",
            || format!("metadata {m}"),
        )
    })
}

/// #8 Conflicting exported annotations and labels: Conflict on each ServiceExport, the
/// oldest's on the import.
fn exported_labels_conflict(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    t.second_cluster(
        &exported_metadata("dummy-label", "dummy-annotation"),
        &hello_service(),
        &exported_metadata("dummy-label2", "dummy-annotation2"),
    )?;
    t.await_condition(t.c[0], "Conflict", "True")?;
    t.await_condition(t.c[1], "Conflict", "True")?;
    t.await_import(t.c[0], |si| {
        let m = &si["metadata"];
        check(
            m["annotations"]["dummy-annotation"] == "true"
                && m["labels"]["dummy-label"] == "true"
                && m["annotations"].get("dummy-annotation2").is_none()
                && m["labels"].get("dummy-label2").is_none(),
            || format!("metadata {m}"),
        )
    })
}

/// #9 (Required) Exporting a ClusterIP service creates a ServiceImport of type ClusterSetIP
/// in every cluster; unexporting deletes it.
fn clusterip_import_lifecycle(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    t.await_condition(t.c[0], "Valid", "True")?;
    for c in t.c {
        t.await_import(c, type_is("ClusterSetIP"))?;
    }
    t.unexport(t.c[0])?;
    for c in t.c {
        t.await_no_import(c)?;
    }
    Ok(())
}

/// The Service c1's API server returned (defaulted).
fn served_service(t: &Case) -> Value {
    t.get(t.c[0], "services").unwrap_or_default()
}

/// #10-#12 (Required) sessionAffinity(+Config), internalTrafficPolicy and
/// trafficDistribution of the import equal the exported Service's.
fn import_fields_match_the_service(t: &Case) -> Outcome {
    let mut svc = hello_service();
    svc["spec"]["internalTrafficPolicy"] = json!("Cluster");
    svc["spec"]["trafficDistribution"] = json!("PreferClose");
    t.fixture(&svc, 1, Some(&hello_export()))?;
    let s = served_service(t);
    t.await_import(t.c[0], |si| {
        for f in [
            "sessionAffinity",
            "sessionAffinityConfig",
            "internalTrafficPolicy",
            "trafficDistribution",
        ] {
            check(si["spec"][f] == s["spec"][f], || {
                format!(
                    "spec.{f}: {} != the Service's {}",
                    si["spec"][f], s["spec"][f]
                )
            })?;
        }
        check(si["spec"]["sessionAffinity"] == "ClientIP", || {
            "sessionAffinity".into()
        })
    })
}

/// #13 (Required) An IP is allocated for each IP family, in their order.
fn an_ip_per_family(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    t.await_import(t.c[0], |si| {
        let (ips, fams) = (
            strings(&si["spec"]["ips"]),
            strings(&si["spec"]["ipFamilies"]),
        );
        check(!ips.is_empty() && ips.len() == fams.len(), || {
            format!("ips {ips:?} for families {fams:?}")
        })?;
        for (ip, fam) in ips.iter().zip(&fams) {
            let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("{ip} is no IP"))?;
            check((fam == "IPv4") == ip.is_ipv4(), || {
                format!("{ip} is not {fam}")
            })?;
        }
        Ok(())
    })
}

/// #14 (Required) The ports of the import are exactly the Service's.
fn ports_match(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    t.await_import(t.c[0], |si| {
        let want = vec![port("tcp", "TCP", 42), port("udp", "UDP", 42)];
        check(ports(si) == want, || format!("ports {:?}", ports(si)))?;
        check(
            si["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|p| p.get("appProtocol").is_none()),
            || "appProtocol set".into(),
        )
    })
}

/// #15 (Required) Exported from two clusters: the union of the ports, and a conflict.
fn port_union_and_conflict(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    let mut svc2 = hello_service();
    svc2["spec"]["ports"] = json!([{"name": "tcp", "port": 42, "protocol": "TCP"},
                                   {"name": "stcp", "port": 142, "protocol": "SCTP"}]);
    t.second_cluster(&hello_export(), &svc2, &hello_export())?;
    t.await_condition(t.c[0], "Conflict", "True")?;
    t.await_condition(t.c[1], "Conflict", "True")?;
    t.await_import(t.c[0], |si| {
        let want = vec![
            port("stcp", "SCTP", 142),
            port("tcp", "TCP", 42),
            port("udp", "UDP", 42),
        ];
        check(ports(si) == want, || format!("ports {:?}", ports(si)))
    })
}

/// #16 (Required) Conflicting port numbers: the oldest export's port, a conflict on each.
fn conflicting_ports(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    let mut svc2 = hello_service();
    svc2["spec"]["ports"] = json!([{"name": "tcp", "port": 43, "protocol": "TCP"}]);
    t.second_cluster(&hello_export(), &svc2, &hello_export())?;
    t.await_condition(t.c[0], "Conflict", "True")?;
    t.await_condition(t.c[1], "Conflict", "True")?;
    t.await_import(t.c[0], |si| {
        let want = vec![port("tcp", "TCP", 42), port("udp", "UDP", 42)];
        check(ports(si) == want, || {
            format!(
                "the service ports were not resolved correctly: {:?}",
                ports(si)
            )
        })
    })
}

fn headless() -> Value {
    let mut svc = hello_service();
    svc["spec"]["clusterIP"] = json!("None");
    svc
}

/// #17 (Required) A headless Service is imported as type Headless everywhere; unexporting
/// deletes the import.
fn headless_import_lifecycle(t: &Case) -> Outcome {
    t.fixture(&headless(), 1, Some(&hello_export()))?;
    for c in t.c {
        t.await_import(c, type_is("Headless"))?;
    }
    t.unexport(t.c[0])?;
    for c in t.c {
        t.await_no_import(c)?;
    }
    Ok(())
}

/// #18 (Required) No clusterset IP for a headless import.
fn headless_has_no_ips(t: &Case) -> Outcome {
    t.fixture(&headless(), 1, Some(&hello_export()))?;
    t.await_import(t.c[0], |_| Ok(()))?;
    consistently(ENSURE, || {
        let si = t.import(t.c[0]).ok_or("the import went")?;
        check(strings(&si["spec"]["ips"]).is_empty(), || {
            format!("ips {}", si["spec"]["ips"])
        })
    })
}

/// #19 (Required) Exporting an ExternalName Service: Valid False, no import.
fn external_name_is_not_valid(t: &Case) -> Outcome {
    let mut svc = hello_service();
    svc["spec"]["type"] = json!("ExternalName");
    svc["spec"]["externalName"] = json!("example.com");
    svc["spec"]
        .as_object_mut()
        .unwrap()
        .remove("ipFamilyPolicy");
    t.fixture(&svc, 1, Some(&hello_export()))?;
    t.await_condition(t.c[0], "Valid", "False")?;
    t.ensure_import(t.c[0], false)
}

/// #20 (Required) Conflicting headlessness: a conflict on each export, the oldest's type.
fn conflicting_headlessness(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, None)?;
    t.second_cluster(&hello_export(), &headless(), &hello_export())?;
    t.await_condition(t.c[0], "Conflict", "True")?;
    t.await_condition(t.c[1], "Conflict", "True")?;
    for c in t.c {
        t.await_import(c, type_is("ClusterSetIP"))?;
    }
    Ok(())
}

// ---- endpoint_slice.go ----

/// #21 An MCS EndpointSlice in every cluster with the MCS labels, managed by the
/// implementation; deleted on unexport.
fn mcs_endpoint_slices(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    for c in t.c {
        for fam in t.import_families(c)? {
            let s = t.mcs_slice(c, &fam)?;
            let l = &s["metadata"]["labels"];
            check(
                l["multicluster.kubernetes.io/service-name"] == "hello"
                    && l.get("endpointslice.kubernetes.io/managed-by").is_some()
                    && l["endpointslice.kubernetes.io/managed-by"]
                        != "endpointslice-controller.k8s.io",
                || format!("{}: labels {l}", c.name),
            )?;
        }
    }
    t.unexport(t.c[0])?;
    for c in t.c {
        eventually(AWAIT, || {
            let left = t
                .slices(c, Some("multicluster.kubernetes.io/service-name=hello"))
                .len();
            check(left == 0, || format!("{}: {left} MCS slices left", c.name))
        })?;
    }
    Ok(())
}

// ---- clusterip_service_dns.go ----

fn record_type(fam: &str) -> &'static str {
    if fam == "IPv4" {
        "A"
    } else {
        "AAAA"
    }
}

/// #22 The clusterset name resolves to the ClusterSetIP, in every cluster.
fn dns_clusterset_ip(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    for c in t.c {
        let mut ips = Vec::new();
        t.await_import(c, |si| {
            ips = strings(&si["spec"]["ips"]);
            check(!ips.is_empty(), || "no ips yet".into())
        })?;
        for ip in &ips {
            let ty = if ip.contains(':') { "AAAA" } else { "A" };
            let name = format!("hello.{}.svc.clusterset.local.", t.ns);
            eventually(AWAIT, || {
                let got = t.dig(c, ty, &name);
                check(got.contains(ip), || {
                    format!("{}: {name} {ty}: {got:?}", c.name)
                })
            })?;
        }
    }
    Ok(())
}

/// Parses `dig +short` SRV lines: (port, target without the final dot).
fn srv(lines: &[String]) -> Vec<(u64, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| {
                (
                    f[2].parse().unwrap_or(0),
                    f[3].trim_end_matches('.').to_string(),
                )
            })
        })
        .collect()
}

/// #23 SRV for the bare clusterset name: exactly one record, port 42, the service's name
/// (the tcp and udp ports share the number).
fn dns_clusterset_srv(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    let name = format!("hello.{}.svc.clusterset.local", t.ns);
    for c in t.c {
        eventually(AWAIT, || {
            let got = srv(&t.dig(c, "SRV", &format!("{name}.")));
            check(got == [(42, name.clone())], || {
                format!("{}: SRV {got:?}", c.name)
            })
        })?;
    }
    Ok(())
}

/// #24 The cluster.local name still resolves to the local ClusterIP.
fn dns_cluster_local(t: &Case) -> Outcome {
    t.fixture(&hello_service(), 1, Some(&hello_export()))?;
    let s = served_service(t);
    let ip = s["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ty = if ip.contains(':') { "AAAA" } else { "A" };
    let name = format!("hello.{}.svc.cluster.local.", t.ns);
    eventually(AWAIT, || {
        let got = t.dig(t.c[0], ty, &name);
        check(got.contains(&ip), || format!("{name}: {got:?}, not {ip}"))
    })
}

// ---- headless_service_dns.go ----

/// #25 The headless clusterset name resolves to exactly c1's ready endpoint addresses.
fn dns_headless_addresses(t: &Case) -> Outcome {
    t.fixture(&headless(), 2, Some(&hello_export()))?;
    for c in t.c {
        for fam in t.import_families(c)? {
            let mut want: Vec<String> = t
                .k8s_endpoints(t.c[0], &fam, 2)?
                .into_iter()
                .map(|(a, _)| a)
                .collect();
            want.sort();
            let name = format!("hello.{}.svc.clusterset.local.", t.ns);
            eventually(AWAIT, || {
                let got = t.dig(c, record_type(&fam), &name);
                check(got == want, || {
                    format!("{}: {name}: {got:?}, not {want:?}", c.name)
                })
            })?;
        }
    }
    Ok(())
}

/// #26 A StatefulSet's pods by `<hostname>.<clusterid>.hello.<ns>.svc.clusterset.local`.
fn dns_headless_statefulset(t: &Case) -> Outcome {
    t.fixture(&headless(), 0, Some(&hello_export()))?;
    for i in 0..2 {
        t.apply(
            t.c[0],
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("hello-ss-{i}"), "labels": {"app": "hello"}},
            "spec": {"hostname": format!("hello-ss-{i}"), "subdomain": "hello",
                "containers": [{"name": "hello", "image": "socat",
                    "ports": [{"containerPort": 42}, {"containerPort": 42, "protocol": "UDP"}]}]}}),
        )?;
    }
    for c in t.c {
        for fam in t.import_families(c)? {
            let mut slice = Value::Null;
            eventually(Duration::from_secs(60), || {
                slice = t.mcs_slice(c, &fam)?;
                let eps = slice["endpoints"].as_array().cloned().unwrap_or_default();
                check(
                    eps.len() == 2
                        && eps.iter().all(|e| {
                            e["conditions"]["ready"] != false
                                && e["hostname"].as_str().is_some_and(|h| !h.is_empty())
                        }),
                    || format!("{}: endpoints {}", c.name, slice["endpoints"]),
                )
            })?;
            let cluster = slice["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            for e in slice["endpoints"].as_array().cloned().unwrap_or_default() {
                let host = e["hostname"].as_str().unwrap_or_default();
                let name = format!("{host}.{cluster}.hello.{}.svc.clusterset.local.", t.ns);
                let mut want = strings(&e["addresses"]);
                want.sort();
                eventually(AWAIT, || {
                    let got = t.dig(c, record_type(&fam), &name);
                    check(got == want, || format!("{}: {name}: {got:?}", c.name))
                })?;
            }
        }
    }
    Ok(())
}

/// #27 SRV for the headless clusterset name: one record per endpoint (the tcp and udp ports
/// share the number), its target the endpoint's name, port 42.
fn dns_headless_srv(t: &Case) -> Outcome {
    t.fixture(&headless(), 2, Some(&hello_export()))?;
    let s = served_service(t);
    let mut all = Vec::new();
    for fam in strings(&s["spec"]["ipFamilies"]) {
        all.extend(t.k8s_endpoints(t.c[0], &fam, 2)?);
    }
    let name = format!("hello.{}.svc.clusterset.local", t.ns);
    for c in t.c {
        eventually(AWAIT, || {
            let got = srv(&t.dig(c, "SRV", &format!("{name}.")));
            check(got.len() == all.len(), || {
                format!(
                    "{}: {} SRV records, not {}: {got:?}",
                    c.name,
                    got.len(),
                    all.len()
                )
            })?;
            for (_, host) in &all {
                check(
                    got.iter()
                        .any(|(p, target)| *p == 42 && target.starts_with(host)),
                    || format!("{}: no SRV record for {host}: {got:?}", c.name),
                )?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

type CaseFn = fn(&Case) -> Outcome;

/// Every case of the suite: its number in the suite, its name there, and whether it is
/// labelled Required.
const CASES: &[(u32, &str, bool, CaseFn)] = &[
    (
        1,
        "not exported: inaccessible",
        true,
        not_exported_is_inaccessible,
    ),
    (
        2,
        "exported ClusterIP: accessible through DNS",
        false,
        exported_is_accessible_through_dns,
    ),
    (
        3,
        "in two clusters, exported from one: only the exporter",
        false,
        only_the_exporting_cluster_answers,
    ),
    (
        4,
        "same port name, other number: only the cluster exposing it",
        false,
        same_port_name_other_number,
    ),
    (
        5,
        "different port names: each port to its cluster",
        false,
        different_port_names,
    ),
    (
        6,
        "an import lives while one cluster exports",
        true,
        import_lives_while_exported,
    ),
    (
        7,
        "exported labels and annotations only",
        false,
        exported_labels_propagate,
    ),
    (
        8,
        "conflicting exported labels and annotations",
        false,
        exported_labels_conflict,
    ),
    (
        9,
        "ClusterSetIP import lifecycle",
        true,
        clusterip_import_lifecycle,
    ),
    (
        10,
        "sessionAffinity, internalTrafficPolicy, trafficDistribution (#10-#12)",
        true,
        import_fields_match_the_service,
    ),
    (13, "an IP per IP family", true, an_ip_per_family),
    (14, "the ports match", true, ports_match),
    (
        15,
        "the union of ports, a conflict",
        true,
        port_union_and_conflict,
    ),
    (
        16,
        "conflicting ports: oldest wins, conflict on each",
        true,
        conflicting_ports,
    ),
    (
        17,
        "Headless import lifecycle",
        true,
        headless_import_lifecycle,
    ),
    (18, "no IP for a headless import", true, headless_has_no_ips),
    (
        19,
        "ExternalName: Valid False, no import",
        true,
        external_name_is_not_valid,
    ),
    (
        20,
        "conflicting headlessness",
        true,
        conflicting_headlessness,
    ),
    (21, "MCS EndpointSlices", false, mcs_endpoint_slices),
    (22, "DNS: the ClusterSetIP", false, dns_clusterset_ip),
    (
        23,
        "DNS: SRV of a ClusterSetIP import",
        false,
        dns_clusterset_srv,
    ),
    (
        24,
        "DNS: cluster.local stays local",
        false,
        dns_cluster_local,
    ),
    (25, "DNS: headless addresses", false, dns_headless_addresses),
    (
        26,
        "DNS: a StatefulSet's pods by hostname and cluster id",
        false,
        dns_headless_statefulset,
    ),
    (27, "DNS: SRV of a headless import", false, dns_headless_srv),
];

/// Every case of the suite, three at a time (the suite runs them one after another; each has
/// its own namespace, so they do not meet), on one clusterset of two clusters.
#[test]
fn mcs_api_conformance_cases() {
    let set = ClusterSet::up("conf", 2, 1, "", &[]);
    let clusters = [set.c(1), set.c(2)];
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((n, name, required, f)) = CASES.get(i) else {
                    return;
                };
                let t = Case {
                    ns: format!("mcs-conformance-{n}"),
                    c: clusters,
                };
                let started = Instant::now();
                let r = f(&t);
                eprintln!(
                    "#{n} {name}{}: {} in {:.1} s",
                    if *required { " (Required)" } else { "" },
                    if r.is_ok() { "passed" } else { "FAILED" },
                    started.elapsed().as_secs_f64()
                );
                if let Err(e) = r {
                    failures.lock().unwrap().push(format!("#{n} {name}: {e}"));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}
