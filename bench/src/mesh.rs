//! `weir-bench mesh`: multi-cluster Services in a clusterset of labs.
//!
//! - Export to programmed: an EndpointSlice change in cluster c1 timed until the agent of c2
//!   has the new endpoint behind the ClusterSetIP, CHANGES times (p50/p99), against the same
//!   change reaching c1's own agent (its ClusterIP): the mesh's cost over a cluster's own
//!   propagation. New ServiceExports are timed the same way.
//! - Connection rate from a c2 pod to the ClusterSetIP whose endpoints are all in c1, against
//!   the same pod dialling c1's pod IPs directly (interleaved rounds, medians).
//!
//! `weir-bench mesh-scale CLUSTERS SERVICES`: CLUSTERS clusters each exporting SERVICES
//! Services of 3 endpoints; the time until every cluster imports every Service and every
//! agent has programmed them, etcd's keys and memory, and each mesh's memory.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use crate::{interleaved, percentile, rss_of, sh};

struct Down(String, String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = sh(&self.1, &["lab", "down", "--name", &self.0]);
    }
}

async fn lb_backends(socket: &std::path::Path) -> Vec<(String, Vec<String>)> {
    let dump = weir_agent::api::get(socket, "/lb")
        .await
        .unwrap_or_default();
    dump["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let key = f["key"].to_string();
            let b = f["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| {
                    serde_json::from_value::<weir_control::lb::Backend>(b[1].clone()).ok()
                })
                .map(|b| b.to_string())
                .collect();
            (key, b)
        })
        .collect()
}

/// Waits until some frontend of the agent at `socket` has a backend whose text contains
/// `addr` (an address and port, as the dump prints it).
async fn wait_backend(socket: &std::path::Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if lb_backends(socket)
            .await
            .iter()
            .any(|(_, b)| b.iter().any(|x| x.contains(needle)))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no backend {needle} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn service(name: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80}]}})
}

fn slice(name: &str, addrs: &[String]) -> Value {
    let eps: Vec<Value> = addrs.iter().map(|a| json!({"addresses": [a]})).collect();
    json!({"metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

fn export(name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
           "metadata": {"name": name}})
}

async fn create_exported(
    client: &kube::Client,
    ns: &str,
    name: &str,
    addrs: &[String],
) -> Result<()> {
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), ns);
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), ns);
    let ar = weir_lab::client::api_resource(&weir_model::kinds::SERVICE_EXPORT);
    let exports: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let pp = PostParams::default();
    svcs.create(&pp, &serde_json::from_value(service(name))?)
        .await?;
    slices
        .create(&pp, &serde_json::from_value(slice(name, addrs))?)
        .await?;
    exports
        .create(&pp, &serde_json::from_value(export(name))?)
        .await?;
    Ok(())
}

async fn create_namespace(client: &kube::Client, ns: &str) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    Ok(())
}

/// `weir-bench mesh`.
pub fn bench(changes: usize, exports: usize, weir: &str) -> Result<()> {
    let set = format!("wbm{}", std::process::id() % 10000);
    let app = "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: bench, labels: {app: web}}\nspec:\n  containers: [{name: c, image: echo, ports: [{containerPort: 8080}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-2, namespace: bench, labels: {app: web}}\nspec:\n  containers: [{name: c, image: echo, ports: [{containerPort: 8080}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench}\nspec:\n  containers: [{name: c, image: echo}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: bench}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";
    let dir = std::env::temp_dir().join(format!("{set}.yaml"));
    std::fs::write(&dir, app)?;
    let f = dir.display().to_string();
    sh(
        weir,
        &["lab", "up", "--name", &set, "--clusters", "2", "-f", &f],
    )?;
    let _down = Down(set.clone(), weir.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let c1 = format!("{set}/c1");
    let c2 = format!("{set}/c2");
    let sock1 = weir_lab::paths::LabPaths::new(&c1).agent_socket("node-1");
    let sock2 = weir_lab::paths::LabPaths::new(&c2).agent_socket("node-1");
    rt.block_on(async {
        let client1 = weir_lab::lab::lab_client(&c1).await?;
        create_namespace(&client1, "mb").await.ok();
        let client2 = weir_lab::lab::lab_client(&c2).await?;
        create_namespace(&client2, "mb").await.ok();
        // One exported selectorless Service whose slice the benchmark rewrites.
        let addrs = |i: usize| -> Vec<String> {
            (0..3).map(|k| format!("10.{}.{}.{}", 200 + k, i / 250, i % 250 + 2)).collect()
        };
        create_exported(&client1, "mb", "svc", &addrs(0)).await?;
        wait_backend(&sock2, "10.200.0.2:8080", Duration::from_secs(30)).await?;
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::namespaced(client1.clone(), "mb");
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for i in 1..=changes {
            let a = addrs(i);
            let started = Instant::now();
            let eps: Vec<Value> = a.iter().map(|x| json!({"addresses": [x]})).collect();
            slices
                .patch("svc-1", &PatchParams::default(), &Patch::Merge(json!({"endpoints": eps})))
                .await?;
            let needle = format!("{}:8080", a[0]);
            // The same change, seen by c1's own agent (ClusterIP) and by c2's (ClusterSetIP).
            let (l, r) = tokio::join!(
                async {
                    wait_backend(&sock1, &needle, Duration::from_secs(30)).await?;
                    Ok::<_, anyhow::Error>(started.elapsed())
                },
                async {
                    wait_backend(&sock2, &needle, Duration::from_secs(30)).await?;
                    Ok::<_, anyhow::Error>(started.elapsed())
                }
            );
            local.push(l?.as_secs_f64() * 1000.0);
            remote.push(r?.as_secs_f64() * 1000.0);
        }
        let (l50, l99) = (percentile(&mut local, 0.5), percentile(&mut local, 0.99));
        let (r50, r99) = (percentile(&mut remote, 0.5), percentile(&mut remote, 0.99));
        println!("endpoint change -> programmed, {changes} changes:");
        println!("  in the same cluster (ClusterIP, baseline):  p50 {l50:.1} ms  p99 {l99:.1} ms");
        println!("  in the other cluster (ClusterSetIP, mesh):  p50 {r50:.1} ms  p99 {r99:.1} ms  (x{:.2} / x{:.2} the baseline)", r50 / l50.max(0.001), r99 / l99.max(0.001));
        // New exports: Service + slice + ServiceExport in c1, timed to c2's datapath.
        let mut fresh = Vec::new();
        for i in 0..exports {
            let name = format!("new-{i}");
            let a = addrs(1000 + i);
            let started = Instant::now();
            create_exported(&client1, "mb", &name, &a).await?;
            wait_backend(&sock2, &format!("{}:8080", a[0]), Duration::from_secs(30)).await?;
            fresh.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let (e50, e99) = (percentile(&mut fresh, 0.5), percentile(&mut fresh, 0.99));
        println!("new ServiceExport -> programmed in the other cluster, {exports} exports: p50 {e50:.1} ms  p99 {e99:.1} ms");
        Ok::<_, anyhow::Error>(())
    })?;
    // Connection rate: ClusterSetIP (every endpoint in c1) against c1's pod IPs directly.
    let export_web = std::env::temp_dir().join(format!("{set}-export.yaml"));
    std::fs::write(&export_web, "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: bench}\n")?;
    sh(
        weir,
        &[
            "--cluster",
            &c1,
            "apply",
            "-f",
            &export_web.display().to_string(),
        ],
    )?;
    let import = rt.block_on(async {
        let client2 = weir_lab::lab::lab_client(&c2).await?;
        let ar = weir_lab::client::api_resource(&weir_model::kinds::SERVICE_IMPORT);
        let api: Api<DynamicObject> = Api::namespaced_with(client2, "bench", &ar);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(i) = api.get("web").await {
                if let Some(ip) = i.data["spec"]["ips"][0].as_str() {
                    return Ok::<_, anyhow::Error>(ip.to_string());
                }
            }
            if Instant::now() > deadline {
                bail!("no import of bench/web in c2");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })?;
    // c2's own pods of bench/web are not exported: the ClusterSetIP reaches c1's only.
    let pods: Value = serde_json::from_str(&sh(
        weir,
        &["--cluster", &c1, "get", "pods", "-n", "bench", "-o", "json"],
    )?)?;
    let pod_ips: Vec<String> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["labels"]["app"] == "web")
        .filter_map(|p| p["status"]["podIP"].as_str().map(String::from))
        .collect();
    let rate = |to: &str| -> Result<f64> {
        let started = Instant::now();
        let out = sh(
            weir,
            &[
                "--cluster",
                &c2,
                "lab",
                "connect",
                "--from",
                "bench/client",
                "--to",
                to,
                "--count",
                "3000",
                "-o",
                "json",
            ],
        )?;
        let s: Value = serde_json::from_str(&out)?;
        let ok = s["ok"].as_f64().unwrap_or(0.0);
        if s["failed"].as_u64() != Some(0) {
            bail!("failed connections to {to}: {s}");
        }
        Ok(ok / started.elapsed().as_secs_f64())
    };
    let (d, v, p) = interleaved(
        9,
        |round| rate(&format!("{}:8080", pod_ips[round % pod_ips.len()])),
        |_| rate(&format!("{import}:80")),
    )?;
    println!("new connections/s from a c2 pod, endpoints all in c1 (median of 9 rounds of 3,000, alternating order):");
    println!("  to the remote pod IPs directly (baseline): {d:.0}/s");
    println!(
        "  to the ClusterSetIP:                        {v:.0}/s  (ratio {:.3}; median of the rounds' ratios {p:.3})",
        v / d.max(1.0)
    );
    Ok(())
}

/// `weir-bench mesh-scale`.
pub fn scale(clusters: u8, services: usize, weir: &str) -> Result<()> {
    let set = format!("wbs{}", std::process::id() % 10000);
    let started = Instant::now();
    sh(
        weir,
        &[
            "lab",
            "up",
            "--name",
            &set,
            "--clusters",
            &clusters.to_string(),
        ],
    )?;
    let _down = Down(set.clone(), weir.to_string());
    println!(
        "{clusters} clusters up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let names: Vec<String> = (1..=clusters).map(|k| format!("{set}/c{k}")).collect();
    rt.block_on(async {
        let mut clients = Vec::new();
        for n in &names {
            let c = weir_lab::lab::lab_client(n).await?;
            create_namespace(&c, "ms").await?;
            clients.push(c);
        }
        // Every cluster exports its own Services (distinct names, addresses per cluster).
        let started = Instant::now();
        for (k, c) in clients.iter().enumerate() {
            let results: Vec<Result<()>> = futures::stream::iter(0..services)
                .map(|i| {
                    let c = c.clone();
                    async move {
                        let a: Vec<String> = (0..3)
                            .map(|e| format!("10.{}.{}.{}", 150 + k, (i * 3 + e) / 250, (i * 3 + e) % 250 + 2))
                            .collect();
                        create_exported(&c, "ms", &format!("c{}-svc-{i}", k + 1), &a).await
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            for r in results {
                r?;
            }
        }
        let created = started.elapsed();
        println!("created {} exported Services x 3 endpoints ({services} per cluster) in {:.1} s", services * clusters as usize, created.as_secs_f64());
        let total = services * clusters as usize;
        // Each agent: the Services of its own cluster and every import.
        let want = services + total;
        loop {
            let (mut imports, mut frontends) = (usize::MAX, usize::MAX);
            for n in &names {
                let p = weir_lab::paths::LabPaths::new(n);
                let st = weir_mesh::read_status(&weir_lab::clusterset::mesh_status_file(&p)).unwrap_or_default();
                let agent = weir_agent::api::get(&p.agent_socket("node-1"), "/status").await.unwrap_or_default();
                imports = imports.min(st.imports);
                frontends = frontends.min(agent["frontends"].as_u64().unwrap_or(0) as usize);
            }
            if imports >= total && frontends >= want {
                println!(
                    "every cluster imports all {total} Services and every agent has them programmed: {:.1} s after the first write, {:.1} s after the last",
                    started.elapsed().as_secs_f64(),
                    (started.elapsed() - created).as_secs_f64()
                );
                break;
            }
            if started.elapsed() > Duration::from_secs(900) {
                println!("NOT converged 15 minutes after the first write: the slowest mesh had written {imports} of {total} imports, the slowest agent had {frontends} of {want} frontends");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let p = weir_lab::paths::LabPaths::new(&set);
    let shape = weir_lab::clusterset::ClusterSetLayout::load(&set).context("clusterset layout")?;
    let pki = weir_lab::clusterset::etcd_pki(&p);
    let (cert, key) = pki.client("c1");
    let keys = sh(
        "etcdctl",
        &[
            "--endpoints",
            &format!("https://127.0.0.1:{}", shape.etcd_port),
            "--cacert",
            &pki.ca_cert().display().to_string(),
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "get",
            "--prefix",
            "weir/",
            "--keys-only",
        ],
    )?;
    let count = keys.lines().filter(|l| !l.trim().is_empty()).count();
    let du = sh(
        "du",
        &[
            "-sb",
            &weir_lab::clusterset::etcd_dir(&p)
                .join("data")
                .display()
                .to_string(),
        ],
    )?;
    let bytes: u64 = du
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    println!(
        "etcd keys: {count}; etcd data directory: {} MiB",
        bytes >> 20
    );
    let etcd_pid = std::fs::read_to_string(p.pid_dir().join("etcd.pid")).unwrap_or_default();
    println!("etcd RSS: {} MiB", rss_of(etcd_pid.trim()) / 1024);
    for n in &names {
        let pid_dir = weir_lab::paths::LabPaths::new(n).pid_dir();
        let rss = |c: &str| {
            let pid = std::fs::read_to_string(pid_dir.join(format!("{c}.pid"))).unwrap_or_default();
            rss_of(pid.trim()) / 1024
        };
        println!(
            "RSS in {n}: mesh {} MiB, agent {} MiB, DNS {} MiB, API server {} MiB",
            rss("mesh"),
            rss("agent-node-1"),
            rss("dns"),
            rss("apiserver")
        );
    }
    Ok(())
}
