//! `weir-bench schedule [TRIALS] [WEIR]`: cross-cluster traffic scheduling in a clusterset of
//! two labs, each with four pods of mcs/hello exported, and a client pod in c1.
//!
//! - Connection rate from the client to the ClusterSetIP under a GlobalTrafficPolicy
//!   (FailOver, outlier detection on: weighted selection and watched connects) against the
//!   same client dialling c1's own ClusterIP of the same four pods (interleaved rounds,
//!   medians).
//! - Share accuracy: ActiveActive 80/20 over 10,000 connections against the formula.
//! - Failover time: all of c1's pods start refusing (`weir lab fault`, no API change) while
//!   the client opens a connection every millisecond; the time from the last fault in place
//!   (and from the first fault's command) until 99% of the connections opened after succeed
//!   (in c2), p50/p99 over TRIALS trials. The probe's window (0.7 s after the faults) stays
//!   shorter than the first ejection (1 s), so re-admissions never fall inside it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::{interleaved, percentile, self_exe, sh};

struct Down(String, String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = sh(&self.1, &["lab", "down", "--name", &self.0]);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between the bench and its probe process.
fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The probe, inside the client pod: a TCP connect (1 s timeout) to `to` every `interval_us`
/// for `duration_ms`; prints `START_NS OK` per attempt.
pub fn probe(to: &str, duration_ms: u64, interval_us: u64) -> Result<()> {
    let to: std::net::SocketAddr = to.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results = rt.block_on(async move {
        let mut tasks = Vec::new();
        let end = Instant::now() + Duration::from_millis(duration_ms);
        let mut tick = tokio::time::interval(Duration::from_micros(interval_us));
        while Instant::now() < end {
            tick.tick().await;
            let started = mono_ns();
            tasks.push(tokio::spawn(async move {
                let o = weir_lab::connect::attempt(to, false, Duration::from_secs(1)).await;
                (started, o.error.is_none())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    });
    let mut s = String::new();
    for (t, ok) in results {
        s.push_str(&format!("{t} {}\n", u8::from(ok)));
    }
    print!("{s}");
    Ok(())
}

/// From attempts (start, ok) sorted by start: the earliest start after `from` such that at
/// least 99% of the attempts started from then on succeeded, in milliseconds after `from`.
fn failover_ms(attempts: &[(u64, bool)], from: u64) -> Option<f64> {
    let after: Vec<&(u64, bool)> = attempts.iter().filter(|(t, _)| *t >= from).collect();
    let (mut ok, mut total) = (0usize, 0usize);
    let mut best = None;
    for a in after.iter().rev() {
        total += 1;
        ok += usize::from(a.1);
        if ok * 100 >= total * 99 {
            best = Some(a.0);
        }
    }
    best.map(|t| (t - from) as f64 / 1e6)
}

fn app(weir: &str, set: &str, c: &str, client: bool) -> Result<()> {
    let mut m = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: mcs}\n");
    for k in 1..=4 {
        m.push_str(&format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello-{k}, namespace: mcs, labels: {{app: hello}}}}\nspec:\n  containers: [{{name: c, image: echo, ports: [{{containerPort: 8080}}]}}]\n"));
    }
    if client {
        m.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: mcs}\nspec:\n  containers: [{name: c, image: echo}]\n");
    }
    m.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: mcs}\nspec:\n  selector: {app: hello}\n  ports: [{name: tcp, port: 80, targetPort: 8080}]\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: hello, namespace: mcs}\n");
    apply(weir, &format!("{set}/{c}"), &m)
}

fn apply(weir: &str, cluster: &str, manifest: &str) -> Result<()> {
    let f = std::env::temp_dir().join(format!("wbs-{}.yaml", std::process::id()));
    std::fs::write(&f, manifest)?;
    sh(
        weir,
        &[
            "--cluster",
            cluster,
            "apply",
            "-f",
            &f.display().to_string(),
        ],
    )?;
    Ok(())
}

fn policy(weir: &str, cluster: &str, spec: &str) -> Result<()> {
    apply(weir, cluster, &format!("apiVersion: weir.dev/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {{name: hello, namespace: mcs}}\nspec: {spec}\n"))
}

/// The agent's programmed share of cluster `c` for mcs/hello.
fn share(weir: &str, cluster: &str, c: &str) -> Option<f64> {
    let st: Value =
        serde_json::from_str(&sh(weir, &["--cluster", cluster, "status", "-o", "json"]).ok()?)
            .ok()?;
    st["status"]["schedules"]
        .as_array()?
        .iter()
        .filter(|s| s["import"] == "mcs/hello")
        .flat_map(|s| s["clusters"].as_array().cloned().unwrap_or_default())
        .find(|r| r["cluster"] == c)
        .and_then(|r| r["share"].as_f64())
}

fn wait_share(weir: &str, cluster: &str, c: &str, want: f64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while share(weir, cluster, c) != Some(want) {
        if Instant::now() > deadline {
            bail!("{c} never got {want}% in {cluster}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn connect(weir: &str, cluster: &str, to: &str, count: usize) -> Result<Value> {
    Ok(serde_json::from_str(&sh(
        weir,
        &[
            "--cluster",
            cluster,
            "lab",
            "connect",
            "--from",
            "mcs/client",
            "--to",
            to,
            "--count",
            &count.to_string(),
            "-o",
            "json",
        ],
    )?)?)
}

fn fault_all(weir: &str, cluster: &str, mode: &str) -> Result<()> {
    let handles: Vec<_> = (1..=4)
        .map(|k| {
            let (w, c, m) = (weir.to_string(), cluster.to_string(), mode.to_string());
            std::thread::spawn(move || {
                sh(
                    &w,
                    &[
                        "--cluster",
                        &c,
                        "lab",
                        "fault",
                        &format!("mcs/hello-{k}"),
                        "--mode",
                        &m,
                    ],
                )
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("fault thread"))??;
    }
    Ok(())
}

/// `weir-bench schedule`.
pub fn bench(trials: usize, weir: &str) -> Result<()> {
    let set = format!("wbs{}", std::process::id() % 10000);
    sh(weir, &["lab", "up", "--name", &set, "--clusters", "2"])?;
    let _down = Down(set.clone(), weir.to_string());
    let c1 = format!("{set}/c1");
    app(weir, &set, "c1", true)?;
    app(weir, &set, "c2", false)?;
    policy(
        weir,
        &c1,
        "{lbType: FailOver, outlierDetection: {consecutiveFailures: 5, baseEjectionTime: 1s}}",
    )?;
    wait_share(weir, &c1, "c2", 0.0, Duration::from_secs(60))?;
    wait_share(weir, &c1, "c1", 100.0, Duration::from_secs(60))?;
    let get = |what: &[&str]| -> Result<Value> {
        let mut a = vec!["--cluster", c1.as_str(), "get"];
        a.extend_from_slice(what);
        a.extend_from_slice(&["-n", "mcs", "-o", "json"]);
        Ok(serde_json::from_str(&sh(weir, &a)?)?)
    };
    let setip = get(&["serviceimports", "hello"])?["spec"]["ips"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let clusterip = get(&["services", "hello"])?["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // Connection rate: scheduled ClusterSetIP against the plain ClusterIP.
    let rate = |to: &str| -> Result<f64> {
        let started = Instant::now();
        let r = connect(weir, &c1, to, 3000)?;
        if r["failed"].as_u64() != Some(0) {
            bail!("failed connections to {to}: {r}");
        }
        Ok(r["ok"].as_f64().unwrap_or(0.0) / started.elapsed().as_secs_f64())
    };
    let (p, s, paired) = interleaved(
        15,
        |_| rate(&format!("{clusterip}:80")),
        |_| rate(&format!("{setip}:80")),
    )?;
    println!("new connections/s from a c1 pod to the same four c1 pods (median of 15 rounds of 3,000, alternating order):");
    println!("  plain ClusterIP (baseline):                          {p:.0}/s");
    println!(
        "  ClusterSetIP, FailOver policy with outlier detection: {s:.0}/s  (ratio {:.3}; median of the rounds' ratios {:.3})",
        s / p.max(1.0),
        paired
    );

    // Share accuracy.
    policy(
        weir,
        &c1,
        "{lbType: ActiveActive, targets: [{cluster: c1, weight: 80}, {cluster: c2, weight: 20}]}",
    )?;
    wait_share(weir, &c1, "c2", 20.0, Duration::from_secs(30))?;
    let n = 10_000;
    let r = connect(weir, &c1, &format!("{setip}:80"), n)?;
    let to_c2: u64 = r["responders"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("c2/"))
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    let measured = 100.0 * to_c2 as f64 / n as f64;
    println!(
        "share accuracy, ActiveActive 80/20 over {n} connections: {measured:.2}% to c2 (formula 20%, off by {:.2} points; binomial sd 0.40)",
        (measured - 20.0).abs()
    );

    // Failover time.
    policy(
        weir,
        &c1,
        "{lbType: FailOver, outlierDetection: {consecutiveFailures: 5, baseEjectionTime: 1s}}",
    )?;
    wait_share(weir, &c1, "c1", 100.0, Duration::from_secs(30))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let src = rt.block_on(async {
        let client = weir_lab::lab::lab_client(&c1).await?;
        weir_lab::lab::resolve_source(&c1, "mcs/client", &client).await
    })?;
    let (mut times, mut from_first, mut apply_ms) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 1..=trials {
        let probe = std::process::Command::new(self_exe())
            .arg("__in")
            .arg(&src.netns)
            .arg(&src.cgroup)
            .args(["__probe", &format!("{setip}:80"), "1000", "1000"])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        let t0 = mono_ns();
        fault_all(weir, &c1, "refuse")?;
        let t1 = mono_ns();
        let out = probe.wait_with_output()?;
        let mut attempts: Vec<(u64, bool)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (t, ok) = l.split_once(' ')?;
                Some((t.parse().ok()?, ok == "1"))
            })
            .collect();
        attempts.sort();
        let Some(ms) = failover_ms(&attempts, t1) else {
            bail!("trial {trial}: never 99% successful");
        };
        times.push(ms);
        from_first.push(failover_ms(&attempts, t0).unwrap_or(ms));
        apply_ms.push((t1 - t0) as f64 / 1e6);
        fault_all(weir, &c1, "none")?;
        // Ejections last 1 s x their count: wait for the local pods to be admitted again.
        wait_share(
            weir,
            &c1,
            "c1",
            100.0,
            Duration::from_secs(5 + 2 * trial as u64),
        )?;
    }
    println!(
        "failover, all 4 local pods refusing (no API change) -> 99% of new connections succeed in c2, {trials} trials:"
    );
    println!(
        "  from the last fault in place:   p50 {:.1} ms  p99 {:.1} ms",
        percentile(&mut times.clone(), 0.5),
        percentile(&mut times, 0.99)
    );
    println!(
        "  from the first fault's command: p50 {:.1} ms  p99 {:.1} ms  (the four faults take {:.0} ms to put in place; a TTL-driven path takes the remote TTL)",
        percentile(&mut from_first.clone(), 0.5),
        percentile(&mut from_first, 0.99),
        percentile(&mut apply_ms, 0.5)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_is_where_99_percent_succeed_from_then_on() {
        let mut a: Vec<(u64, bool)> = (0..100).map(|i| (i * 1_000_000, true)).collect();
        for x in a.iter_mut().take(20) {
            x.1 = false;
        }
        assert_eq!(failover_ms(&a, 0), Some(20.0));
        assert_eq!(failover_ms(&a, 50_000_000), Some(0.0));
    }
}
