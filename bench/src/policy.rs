//! `weir-bench policy`: what NetworkPolicy costs. New-connection rate between two pods of one
//! node (weir's tc datapath on both veths, client closing with SO_LINGER 0) with no policy
//! against 1,000 NetworkPolicies over 100 pods that isolate both pods in both directions
//! (every new connection is judged on egress and ingress; its verdict is kept per flow).
//! Also: the time to compile and program 1,000 policies, to change one, and the policy map
//! entries and kernel memory per endpoint.
//!
//! The cluster: namespace `bench` with 100 pods (the client and server pods of this node,
//! 98 on another node), labels `pod=pod-N`, `app=app-(N%10)`; policy `p-I` selects every pod
//! and admits ingress from `pod=pod-(I%100)` on TCP port 10000+I, and egress to it on the same
//! port; `allow` admits client -> server on 8080 (egress of the client, ingress of the
//! server).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use weir_control::policy::{self, Cluster, IdentityLabels, LocalIds, NodeView, PodInfo};

use crate::podpod::{build, records, CLIENT, SERVER};
use crate::{median, spawn_in};

const NODE: &str = "bench-node";

fn pod(n: usize, ip: &str, node: &str, app: &str) -> PodInfo {
    PodInfo {
        namespace: "bench".into(),
        name: match n {
            0 => "lxcs".into(),
            1 => "lxcc".into(),
            _ => format!("pod-{n}"),
        },
        labels: BTreeMap::from([
            ("pod".to_string(), format!("pod-{n}")),
            ("app".to_string(), app.to_string()),
        ]),
        ips: vec![ip.parse().expect("ip")],
        ports: Vec::new(),
        node: Some(node.into()),
        host_network: false,
        cluster: None,
        namespace_labels: None,
    }
}

fn np(name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "bench"},
        "spec": spec,
    }))
    .expect("policy")
}

/// The cluster with `n` of the p-I policies (and `allow` when n > 0).
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::default();
    c.namespaces.insert(
        "bench".into(),
        BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            "bench".to_string(),
        )]),
    );
    c.pods.push(pod(0, SERVER, NODE, "server"));
    c.pods.push(pod(1, CLIENT, NODE, "client"));
    for i in 2..100 {
        c.pods.push(pod(
            i,
            &format!("10.244.2.{i}"),
            "other",
            &format!("app-{}", i % 10),
        ));
    }
    for i in 0..n {
        let peer = serde_json::json!([{"podSelector": {"matchLabels": {"pod": format!("pod-{}", i % 100)}}}]);
        let ports = serde_json::json!([{"port": 10000 + i, "protocol": "TCP"}]);
        c.policies.push(np(
            &format!("p-{i}"),
            serde_json::json!({
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": peer, "ports": ports}],
                "egress": [{"to": peer, "ports": ports}],
            }),
        ));
    }
    if n > 0 {
        c.policies.push(np(
            "allow",
            serde_json::json!({
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 8080}]}],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}], "ports": [{"port": 8080}]}],
            }),
        ));
    }
    c
}

fn compile(c: &Cluster, local: &mut LocalIds) -> policy::PolicyState {
    let ids: BTreeMap<IdentityLabels, u32> = c
        .identity_labels()
        .into_iter()
        .zip(policy::id::POD_MIN..)
        .collect();
    let view = NodeView {
        name: NODE.into(),
        own_addrs: vec!["169.254.1.1".parse().expect("ip")],
        other_addrs: Vec::new(),
    };
    policy::compile(c, &view, &|l| ids.get(l).copied(), local)
}

/// CPU time the machine spent busy so far (user, system, interrupts; not idle, not stolen by
/// the hypervisor), in seconds, from /proc/stat.
fn busy_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("reading /proc/stat")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Ok(busy as f64 / hz as f64)
}

pub(crate) fn run_client(ns: &str, threads: usize, secs: f64) -> Result<(f64, u64)> {
    let out = spawn_in(
        ns,
        None,
        &[
            "__client".into(),
            threads.to_string(),
            secs.to_string(),
            format!("{SERVER}:8080"),
        ],
    )?
    .wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    if f.len() < 4 {
        bail!("client printed {text:?}");
    }
    Ok((f[0].parse::<f64>()? / secs, f[3].parse()?))
}

/// `weir-bench policy [N] [ROUNDS] [SECONDS]`.
pub fn bench(n: usize, rounds: usize, secs: f64) -> Result<()> {
    let t = build("wpo")?;
    let mut server = spawn_in(&t.s, None, &["__serve".into(), "2".into()])?;
    std::thread::sleep(Duration::from_millis(300));
    let mut pods = weir_dataplane::pods::PodDataplane::new(&t.pins.join("tc"), &t.pins)?;
    let recs = records(&t)?;
    crate::in_netns_thread(&t.n, || {
        pods.sync(&recs)?;
        Ok(())
    })?;

    let mut local = LocalIds::default();
    let none = cluster(0);
    let mut full = cluster(n);
    let started = Instant::now();
    let state = compile(&full, &mut local);
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let stats = pods.set_policy(state.clone())?;
    let program_ms = started.elapsed().as_secs_f64() * 1e3;
    if !stats.failed.is_empty() || stats.endpoints != 2 {
        bail!("policy not programmed: {stats:?}");
    }
    let entries = stats.entries;
    let dp = pods.datapath();
    let memory = dp.map_memory("weir_policy").unwrap_or(0);
    // One more policy (one new port for everybody) on top.
    full.policies.push(np(
        "one-more",
        serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 9999}]}]}),
    ));
    let started = Instant::now();
    let one = compile(&full, &mut local);
    let changed = pods.set_policy(one)?;
    let one_ms = started.elapsed().as_secs_f64() * 1e3;
    full.policies.pop();
    let state_none = compile(&none, &mut local);

    println!("# weir-bench policy: pod -> pod new connections (4 client threads, SO_LINGER 0) on one node; {rounds} rounds of {secs} s, alternating, medians (and the median of the ratios within rounds)");
    println!("# {n} NetworkPolicies over 100 pods isolating both pods both ways (one allows client -> server:8080) vs none");
    println!(
        "apply {n} policies: compile {compile_ms:.1} ms + program {program_ms:.1} ms; one policy more: {one_ms:.1} ms ({} entries added)",
        changed.entries_added
    );
    println!(
        "policy map: {entries} entries for {} endpoints ({} per endpoint), {} KiB of kernel memory ({} bytes per entry)",
        stats.endpoints,
        entries / stats.endpoints.max(1),
        memory / 1024,
        memory / entries.max(1) as u64
    );
    let modes = ["no policy".to_string(), format!("{n} policies")];
    let mut rate: [Vec<f64>; 2] = [vec![], vec![]];
    // CPU time per connection, the whole machine (client, server, stack, programs).
    let mut cpu: [Vec<f64>; 2] = [vec![], vec![]];
    let mut conns = [0f64; 2];
    let mut errors = [0u64; 2];
    // The pod program's run time per packet in each mode (kernel.bpf_stats_enabled).
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_default()
        .trim()
        .to_string();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let from_pod = |pods: &weir_dataplane::pods::PodDataplane| {
        pods.datapath()
            .programs()
            .into_iter()
            .find(|p| p.name == "from_pod")
            .map(|p| (p.run_count, p.run_time_ns))
            .unwrap_or_default()
    };
    let mut run: [(u64, u64); 2] = [(0, 0); 2];
    for round in 0..=rounds {
        for k in 0..2 {
            let mi = (k + round) % 2;
            pods.set_policy(if mi == 0 {
                state_none.clone()
            } else {
                state.clone()
            })?;
            let before = from_pod(&pods);
            let busy = busy_secs()?;
            let (r, e) = run_client(&t.c, 4, secs)?;
            let busy = busy_secs()? - busy;
            let after = from_pod(&pods);
            if round > 0 {
                rate[mi].push(r);
                cpu[mi].push(busy / (r * secs).max(1.0) * 1e6);
                conns[mi] += r * secs;
                errors[mi] += e;
                run[mi].0 += after.0 - before.0;
                run[mi].1 += after.1 - before.1;
            }
        }
    }
    if !stats_before.is_empty() {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before);
    }
    let judged = pods.datapath().pct4_entries()?.len();
    if judged == 0 {
        bail!("no flow was judged by policy");
    }
    let base = median(&mut rate[0].clone());
    let base_cpu = median(&mut cpu[0].clone());
    println!(
        "{:>14} {:>10} {:>9} {:>8} {:>22} {:>14} {:>10}",
        "mode", "conn/s", "ratio", "errors", "from_pod ns/packet", "CPU us/conn", "cpu ratio"
    );
    for (mi, mode) in modes.iter().enumerate() {
        let r = median(&mut rate[mi]);
        let c = median(&mut cpu[mi]);
        println!(
            "{mode:>14} {r:>10.0} {:>9.3} {:>8} {:>22.0} {c:>14.1} {:>10.3}",
            r / base,
            errors[mi],
            run[mi].1 as f64 / run[mi].0.max(1) as f64,
            base_cpu / c
        );
    }
    // Each round measured both modes back to back: the ratio within a round cancels the
    // machine's drift between rounds.
    let mut paired: Vec<f64> = rate[1].iter().zip(&rate[0]).map(|(p, n)| p / n).collect();
    if !paired.is_empty() {
        let (lo, hi) = paired
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        println!(
            "ratio within rounds: median {:.3} (from {lo:.3} to {hi:.3} over {} rounds)",
            median(&mut paired),
            paired.len()
        );
    }
    println!("(cpu ratio: the machine's busy CPU time per connection without policy over with it, from /proc/stat: time stolen by the hypervisor and idle time do not count)");
    // What policy adds to each connection, from the program's own run time (bpf_stats),
    // against what a connection costs the machine without policy: the ratio policy would
    // give if nothing else changed between the modes.
    let per_conn = |mi: usize| run[mi].1 as f64 / conns[mi].max(1.0) / 1e3;
    let added = per_conn(1) - per_conn(0);
    println!(
        "from_pod per connection: {:.2} us without policy, {:.2} us with: policy adds {added:.2} us to the {base_cpu:.1} us of CPU a connection takes, {:.1}%, a connection rate ratio of {:.3}",
        per_conn(0),
        per_conn(1),
        added / base_cpu * 100.0,
        base_cpu / (base_cpu + added)
    );
    println!("(from_pod judges a new flow's egress and, for a pod of this node, its ingress; later packets find the verdict kept per flow)");
    let _ = server.kill();
    let _ = server.wait();
    drop(pods);
    Ok(())
}
