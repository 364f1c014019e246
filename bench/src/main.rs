//! weir benchmarks (not tests): every figure is printed with a baseline measured in the same
//! run.
//!
//! `weir-bench connect`: new-connection rate and connect latency (p50/p99) from a client
//! namespace to a 3-endpoint service behind a router namespace, for 1, 1,000 and 10,000
//! services: direct to pod IPs (no rules at all), weir's socket-level ClusterIP, kube-proxy's
//! iptables layout (legacy backend) and its nftables layout, and weir's own nftables and
//! iptables (legacy) dataplanes. Runs are interleaved, conntrack is flushed between them,
//! clients close with SO_LINGER 0 (no TIME_WAIT pile-up).
//!
//! `weir-bench nodeport`: the same from an external client to a NodePort, weir's tc datapath
//! against kube-proxy's iptables layout and the pod IPs routed with no rules.
//!
//! `weir-bench podpod`: pod-to-pod request/response rate and throughput on one node, routed by
//! the host stack vs weir's tc shortcut, in the same namespaces.
//!
//! `weir-bench policy`: pod-to-pod new-connection rate with 1,000 NetworkPolicies against
//! none, the time to apply them, and the policy entries and memory per endpoint.
//!
//! `weir-bench prefilter`: packets per second dropped from a denied source prefix, weir's XDP
//! prefilter against an iptables raw-table DROP rule on the same device.
//!
//! `weir-bench mesh`: export to programmed across clusters (p50/p99, against a cluster's own
//! propagation) and the connection rate to a ClusterSetIP against the remote pod IPs;
//! `weir-bench mesh-scale`: clusters x exported Services to converge, etcd and mesh memory.
//!
//! `weir-bench program`: time to program N services x 3 endpoints into weir's maps (full
//! apply and one-service change) against iptables-restore (legacy and nf_tables backends) and
//! nft -f, in scratch network namespaces.
#![forbid(unsafe_code)]

mod kubeproxy;
mod mesh;
mod nodeport;
mod podpod;
mod policy;
mod prefilter;
mod schedule;
mod switch;
mod visibility;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kubeproxy::Svc;
use weir_control::lb::{Backend, Frontend, FrontendKey, LbState, Proto, Scope};
use weir_dataplane::Dataplane;

/// `weir-nft` and `weir-ipt`: weir's nftables and iptables (legacy) dataplanes rendering the
/// same Services as kube-proxy's layouts (`nftables`, `iptables`), in routers of their own.
const MODES: &[&str] = &[
    "direct", "weir", "iptables", "nftables", "weir-nft", "weir-ipt",
];
const ENDPOINTS: [&str; 3] = ["10.244.1.2", "10.244.1.3", "10.244.1.4"];

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(ns: &str, args: &str) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend(args.split_whitespace());
    sh("ip", &a).map(|_| ())
}

fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["netns", "exec", ns, cmd];
    a.extend_from_slice(args);
    sh("ip", &a)
}

fn in_ns_stdin(ns: &str, cmd: &str, args: &[&str], input: &str) -> Result<Duration> {
    let mut a = vec!["netns", "exec", ns, cmd];
    a.extend_from_slice(args);
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(&a)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(started.elapsed())
}

/// The namespaces of one measured path: client -> router -> server.
struct Path3 {
    c: String,
    r: String,
    s: String,
}

/// Kills what runs in the namespaces and deletes them (cleanup; errors ignored).
fn remove_netns(names: &[&String]) {
    for ns in names {
        for pid in sh("ip", &["netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
        {
            let _ = sh("kill", &["-9", pid]);
        }
        let _ = sh("ip", &["netns", "del", ns]);
    }
}

struct Topology {
    prefix: String,
    paths: Vec<(String, Path3)>,
    cgroup_mount: PathBuf,
    pins: PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, p) in &self.paths {
            remove_netns(&[&p.c, &p.r, &p.s]);
        }
        let _ = std::fs::remove_dir_all(&self.pins);
        let cg = self.cgroup_mount.join(&self.prefix);
        let _ = std::fs::remove_dir(&cg);
        let _ = sh("umount", &[self.cgroup_mount.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_dir(&self.cgroup_mount);
    }
}

fn build_topology() -> Result<Topology> {
    let prefix = format!("wb{}", std::process::id());
    let mut t = Topology {
        prefix: prefix.clone(),
        paths: Vec::new(),
        cgroup_mount: PathBuf::from(format!("/run/{prefix}-cg")),
        pins: PathBuf::from(format!("/sys/fs/bpf/{prefix}")),
    };
    for mode in MODES {
        let p = Path3 {
            c: format!("{prefix}-{mode}-c"),
            r: format!("{prefix}-{mode}-r"),
            s: format!("{prefix}-{mode}-s"),
        };
        for ns in [&p.c, &p.r, &p.s] {
            sh("ip", &["netns", "add", ns])?;
            ip(ns, "link set lo up")?;
        }
        t.paths.push((mode.to_string(), p));
        let p = &t.paths.last().expect("path").1;
        ip(
            &p.r,
            &format!("link add rc type veth peer name eth0 netns {}", p.c),
        )?;
        ip(
            &p.r,
            &format!("link add rs type veth peer name eth0 netns {}", p.s),
        )?;
        ip(&p.r, "addr add 10.244.2.1/24 dev rc")?;
        ip(&p.r, "addr add 10.244.1.1/24 dev rs")?;
        ip(&p.r, "link set rc up")?;
        ip(&p.r, "link set rs up")?;
        in_ns(&p.r, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        ip(&p.c, "addr add 10.244.2.2/24 dev eth0")?;
        ip(&p.c, "link set eth0 up")?;
        ip(&p.c, "route add default via 10.244.2.1")?;
        for e in ENDPOINTS {
            ip(&p.s, &format!("addr add {e}/24 dev eth0"))?;
        }
        ip(&p.s, "link set eth0 up")?;
        ip(&p.s, "route add default via 10.244.1.1")?;
        in_ns(&p.c, "sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        in_ns(
            &p.c,
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=1024 65000"],
        )?;
        in_ns(&p.s, "sysctl", &["-qw", "net.core.somaxconn=4096"])?;
    }
    std::fs::create_dir_all(&t.cgroup_mount)?;
    sh(
        "mount",
        &[
            "-t",
            "cgroup2",
            "none",
            t.cgroup_mount.to_str().expect("path"),
        ],
    )?;
    std::fs::create_dir_all(t.cgroup_mount.join(&prefix))?;
    Ok(t)
}

/// N services: service i has VIP 10.96.(i/250).(i%250+2) (10.97.x.x for kube-proxy's, so that
/// weir's socket layer never sees them) and 3 endpoints; the target is the last one.
fn services(n: usize, second_octet: u8, target_endpoints: bool) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let last = i + 1 == n;
            let endpoints = if last && target_endpoints {
                ENDPOINTS.iter().map(|e| (e.to_string(), 8080)).collect()
            } else {
                (0..3)
                    .map(|k| {
                        (
                            format!(
                                "10.{}.{}.{}",
                                100 + (i / 60000),
                                (i / 250) % 240,
                                (i % 250) + 2
                            ),
                            8080 + k as u16,
                        )
                    })
                    .collect()
            };
            Svc {
                name: format!("bench/svc-{i}:http"),
                vip: format!("10.{second_octet}.{}.{}", i / 250, i % 250 + 2),
                endpoints,
                node_port: None,
            }
        })
        .collect()
}

/// The frontend (random selection, no affinity) of one benchmark service.
fn frontend(s: &Svc) -> Frontend {
    let backends = s
        .endpoints
        .iter()
        .map(|(ip, port)| Backend {
            ip: ip.parse().expect("ip"),
            port: *port,
        })
        .collect();
    Frontend::new(s.name.clone(), backends)
}

/// The benchmark services as ClusterIP frontends (port 80).
fn lb_state(svcs: &[Svc]) -> LbState {
    let mut st = LbState::default();
    for s in svcs {
        st.frontends.insert(
            FrontendKey {
                vip: s.vip.parse().expect("vip"),
                port: 80,
                proto: Proto::Tcp,
                scope: Scope::Cluster,
            },
            frontend(s),
        );
    }
    st
}

/// Runs in the server namespace: accept, read a line, answer, close.
fn serve(threads: usize) -> Result<()> {
    let l = TcpListener::bind("0.0.0.0:8080")?;
    let mut hs = Vec::new();
    for _ in 0..threads {
        let l = l.try_clone()?;
        hs.push(std::thread::spawn(move || loop {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 16];
                let _ = s.read(&mut b);
                let _ = s.write_all(b"ok\n");
            }
        }));
    }
    for h in hs {
        let _ = h.join();
    }
    Ok(())
}

fn linger0(s: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        &s.as_fd(),
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// One connection to `to`: connect (1 s at most), request, reply (within `read_timeout`, if
/// given), close with SO_LINGER 0. Returns how long the connect took, or None on a failure.
fn exchange(to: SocketAddr, read_timeout: Option<Duration>) -> Option<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok()?;
    let connected = started.elapsed();
    linger0(&s);
    if read_timeout.is_some() {
        let _ = s.set_read_timeout(read_timeout);
    }
    let mut b = [0u8; 8];
    (s.write_all(b"x\n").is_ok() && s.read(&mut b).unwrap_or(0) > 0).then_some(connected)
}

/// Runs in the client namespace: `threads` loops of connect/request/reply/close for `secs`.
/// Prints `connections p50_us p99_us errors`.
fn client(targets: Vec<SocketAddr>, threads: usize, secs: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut hs = Vec::new();
    for t in 0..threads {
        let targets = targets.clone();
        hs.push(std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = t;
            while Instant::now() < deadline {
                let to = targets[i % targets.len()];
                i += 1;
                match exchange(to, None) {
                    Some(connected) => lat.push(connected.as_micros() as u64),
                    None => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for h in hs {
        let (l, e) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!("{} {} {} {}", all.len(), pct(0.5), pct(0.99), errors);
    Ok(())
}

/// Runs in the client namespace: `threads` loops of connect/request/reply/close (as
/// [`client`]) until stdin closes; at each line read from stdin, prints the connections
/// completed and failed so far and when (`connections errors nanoseconds-since-start`), so
/// that the caller can count them over intervals of its own.
fn client_live(target: SocketAddr, threads: usize) -> Result<()> {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    static DONE: AtomicU64 = AtomicU64::new(0);
    static FAILED: AtomicU64 = AtomicU64::new(0);
    static STOP: AtomicBool = AtomicBool::new(false);
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                while !STOP.load(Ordering::Relaxed) {
                    let ok = exchange(target, Some(Duration::from_secs(1))).is_some();
                    let n = if ok { &DONE } else { &FAILED };
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        line?;
        writeln!(
            out,
            "{} {} {}",
            DONE.load(Ordering::Relaxed),
            FAILED.load(Ordering::Relaxed),
            start.elapsed().as_nanos()
        )?;
        out.flush()?;
    }
    STOP.store(true, Ordering::Relaxed);
    for h in hs {
        h.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    }
    Ok(())
}

/// Replaces the nat rules of namespace `ns` with kube-proxy's iptables layout for `svcs`
/// (legacy backend) and its jumps from the built-in chains.
fn load_kube_proxy_iptables(ns: &str, svcs: &[Svc]) -> Result<()> {
    let _ = in_ns(ns, "iptables-legacy", &["-t", "nat", "-F"]);
    in_ns_stdin(
        ns,
        "iptables-legacy-restore",
        &["--noflush"],
        &kubeproxy::iptables(svcs, "10.244.0.0/16"),
    )?;
    for j in kubeproxy::iptables_jumps() {
        let _ = in_ns(ns, "iptables-legacy", &j);
    }
    Ok(())
}

fn self_exe() -> PathBuf {
    std::env::current_exe().expect("exe")
}

/// A helper process, killed (if it still runs) and waited for when dropped.
pub(crate) struct Reap(pub(crate) std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs this binary inside a namespace (and cgroup) with `args`.
fn spawn_in(ns: &str, cgroup: Option<&Path>, args: &[String]) -> Result<std::process::Child> {
    let mut a: Vec<String> = vec![
        "__in".into(),
        format!("/run/netns/{ns}"),
        cgroup
            .map(|c| c.display().to_string())
            .unwrap_or_else(|| "-".into()),
    ];
    a.extend_from_slice(args);
    Ok(Command::new(self_exe())
        .args(&a)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?)
}

fn enter(netns: &str, cgroup: &str) -> Result<()> {
    if cgroup != "-" {
        std::fs::write(
            Path::new(cgroup).join("cgroup.procs"),
            std::process::id().to_string(),
        )?;
    }
    let f = std::fs::File::open(netns)?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` (device names and ifindexes are that
/// namespace's).
fn in_netns_thread<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    })
}

fn median(v: &mut [f64]) -> f64 {
    percentile(v, 0.5)
}

/// The `p` quantile (0..1) of `v` (sorted in place), nearest rank.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Rounds of two measurements `a` and `b`, alternating which goes first so that drift on the
/// machine favours neither: the median of each and the median of the rounds' ratios b/a.
fn interleaved(
    rounds: usize,
    mut a: impl FnMut(usize) -> Result<f64>,
    mut b: impl FnMut(usize) -> Result<f64>,
) -> Result<(f64, f64, f64)> {
    let (mut va, mut vb, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = a(round)?;
            (x, b(round)?)
        } else {
            let y = b(round)?;
            (a(round)?, y)
        };
        va.push(x);
        vb.push(y);
        ratios.push(y / x.max(1.0));
    }
    Ok((
        percentile(&mut va, 0.5),
        percentile(&mut vb, 0.5),
        percentile(&mut ratios, 0.5),
    ))
}

/// weir's netfilter dataplanes for the modes asked for, each in its path's router.
fn netfilter_dataplanes(
    topo: &Topology,
    modes: &[&str],
) -> Result<Vec<(String, Box<dyn Dataplane>)>> {
    let mut out: Vec<(String, Box<dyn Dataplane>)> = Vec::new();
    for (mode, p) in &topo.paths {
        if !modes.contains(&mode.as_str()) {
            continue;
        }
        let netns = Some(PathBuf::from(format!("/run/netns/{}", p.r)));
        let node = weir_dataplane::nft::NodeNet {
            devices: Vec::new(),
            snat_ports: (61000, 65535),
            masquerade: None,
        };
        match mode.as_str() {
            "weir-nft" => out.push((
                mode.clone(),
                Box::new(weir_dataplane::nft::NftDataplane::new(netns, node)?),
            )),
            "weir-ipt" => out.push((
                mode.clone(),
                Box::new(weir_dataplane::ipt::IptablesDataplane::new(
                    netns,
                    node,
                    weir_dataplane::ipt::IptablesBackend::Legacy,
                )?),
            )),
            _ => {}
        }
    }
    Ok(out)
}

/// Per mode: name, conn/s per run, p50 per run, p99 per run, errors.
type ModeResults = (String, Vec<f64>, Vec<f64>, Vec<f64>, u64);

fn connect_bench(
    counts: &[usize],
    rounds: usize,
    secs: f64,
    threads: usize,
    modes: &[&str],
) -> Result<()> {
    if !modes.contains(&"direct") {
        bail!("the modes must include direct, the baseline");
    }
    if let Some(m) = modes.iter().find(|m| !MODES.contains(m)) {
        bail!("unknown mode {m:?}; modes are {}", MODES.join(","));
    }
    let topo = build_topology()?;
    let cg = topo.cgroup_mount.join(&topo.prefix);
    let mut servers = Vec::new();
    for (_, p) in &topo.paths {
        servers.push(spawn_in(
            &p.s,
            None,
            &["__serve".into(), threads.to_string()],
        )?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut dp = weir_dataplane::ebpf::EbpfDataplane::new(&topo.pins, &cg)?;
    let mut netfilter = netfilter_dataplanes(&topo, modes)?;
    println!("# weir-bench connect: {threads} client threads, {secs} s per run, {rounds} interleaved rounds, medians");
    println!("# client 10.244.2.2 -> router -> 3 endpoints 10.244.1.{{2,3,4}}:8080; target service last of N");
    println!(
        "{:>6} {:>9} {:>10} {:>8} {:>8} {:>8} {:>9} {:>7} {:>10}",
        "N", "mode", "conn/s", "p50 us", "p99 us", "errors", "vs direct", "paired", "range"
    );
    for &n in counts {
        // weir: N frontends in the maps (VIPs 10.96.x.x).
        let weir_svcs = services(n, 96, true);
        dp.apply(&lb_state(&weir_svcs))?;
        let weir_vip: Ipv4Addr = weir_svcs.last().expect("target").vip.parse()?;
        // kube-proxy layouts: N services in the routers (VIPs 10.97.x.x).
        let kp = services(n, 97, true);
        let kp_vip: Ipv4Addr = kp.last().expect("target").vip.parse()?;
        if modes.contains(&"iptables") {
            let ipt = &topo
                .paths
                .iter()
                .find(|(m, _)| m == "iptables")
                .expect("p")
                .1;
            load_kube_proxy_iptables(&ipt.r, &kp)?;
        }
        if modes.contains(&"nftables") {
            let nft = &topo
                .paths
                .iter()
                .find(|(m, _)| m == "nftables")
                .expect("p")
                .1;
            let _ = in_ns(&nft.r, "nft", &["delete", "table", "ip", "kube-proxy"]);
            in_ns_stdin(
                &nft.r,
                "nft",
                &["-f", "-"],
                &kubeproxy::nftables(&kp, "10.244.0.0/16", "10.97.0.0/16"),
            )?;
        }
        // weir's netfilter dataplanes: the same N services in their routers.
        for (mode, dp) in netfilter.iter_mut() {
            let t = Instant::now();
            dp.apply(&lb_state(&kp))?;
            println!(
                "# {mode}: {n} services programmed in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        let mut results: Vec<ModeResults> = MODES
            .iter()
            .map(|m| (m.to_string(), vec![], vec![], vec![], 0))
            .collect();
        for round in 0..=rounds {
            // Rotate the order every round so that no mode always runs first or after another.
            let order: Vec<usize> = (0..topo.paths.len())
                .map(|k| (k + round) % topo.paths.len())
                .filter(|&mi| modes.contains(&topo.paths[mi].0.as_str()))
                .collect();
            for mi in order {
                let (mode, p) = &topo.paths[mi];
                let targets: Vec<String> = match mode.as_str() {
                    "direct" => ENDPOINTS.iter().map(|e| format!("{e}:8080")).collect(),
                    "weir" => vec![format!("{weir_vip}:80")],
                    _ => vec![format!("{kp_vip}:80")],
                };
                let _ = in_ns(&p.r, "conntrack", &["-F"]);
                let mut args = vec![
                    "__client".to_string(),
                    threads.to_string(),
                    secs.to_string(),
                ];
                args.extend(targets);
                let cgroup = (mode == "weir").then_some(cg.as_path());
                let out = spawn_in(&p.c, cgroup, &args)?.wait_with_output()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let f: Vec<f64> = text
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if f.len() < 4 {
                    bail!("client for {mode} printed {text:?}");
                }
                if round == 0 {
                    continue; // warm-up, discarded
                }
                let r = &mut results[mi];
                r.1.push(f[0] / secs);
                r.2.push(f[1]);
                r.3.push(f[2]);
                r.4 += f[3] as u64;
            }
        }
        let direct = median(&mut results[0].1.clone());
        let direct_rates = results[0].1.clone();
        for (mode, rate, p50, p99, errors) in results.iter_mut() {
            if rate.is_empty() {
                continue;
            }
            // Paired: each run against the direct run of the same round.
            let mut paired: Vec<f64> = rate.iter().zip(&direct_rates).map(|(r, d)| r / d).collect();
            let (lo, hi) = paired
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            let m = median(rate);
            println!(
                "{n:>6} {mode:>9} {m:>10.0} {:>8.0} {:>8.0} {errors:>8} {:>9.2} {:>7.2} {lo:>5.2}-{hi:.2}",
                median(p50),
                median(p99),
                m / direct,
                median(&mut paired),
            );
        }
    }
    // With kernel.bpf_stats_enabled=1 the kernel times every program run: show what the
    // socket hooks cost per call over the whole benchmark.
    for p in dp.lb().programs() {
        if p.run_count > 0 {
            println!(
                "# {}: {} runs, {} ns per run (kernel.bpf_stats_enabled)",
                p.name,
                p.run_count,
                p.run_time_ns / p.run_count
            );
        }
    }
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    drop(dp);
    Ok(())
}

fn rss_kib() -> u64 {
    rss_of("self")
}

fn program_bench(n: usize) -> Result<()> {
    let topo = build_topology()?;
    let cg = topo.cgroup_mount.join(&topo.prefix);
    println!("# weir-bench program: {n} services x 3 endpoints");
    let rss0 = rss_kib();
    let mut dp = weir_dataplane::ebpf::EbpfDataplane::new(&topo.pins, &cg)?;
    let svcs = services(n, 96, true);
    let state = lb_state(&svcs);
    let t = Instant::now();
    let stats = dp.apply(&state)?;
    let full = t.elapsed();
    let rss1 = rss_kib();
    let mut changed = state.clone();
    let key = *changed.frontends.keys().next().expect("one");
    changed.frontends.get_mut(&key).expect("one").backends[0] = Backend {
        ip: "10.250.0.9".parse()?,
        port: 8080,
    };
    let t = Instant::now();
    dp.apply(&changed)?;
    let one = t.elapsed();
    let t = Instant::now();
    dp.apply(&changed)?;
    let noop = t.elapsed();
    println!(
        "(no-change apply over {n} services: {:.3} ms)",
        noop.as_secs_f64() * 1000.0
    );
    println!("weir: full apply {:.3} s ({} frontends, {} backends added); one-service change {:.3} ms; process RSS +{} KiB", full.as_secs_f64(), stats.frontends_updated, stats.backends_added, one.as_secs_f64() * 1000.0, rss1.saturating_sub(rss0));
    let kp = services(n, 97, true);
    let r = &topo.paths[2].1.r;
    let text = kubeproxy::iptables(&kp, "10.244.0.0/16");
    let legacy = in_ns_stdin(r, "iptables-legacy-restore", &["--noflush"], &text)?;
    println!(
        "iptables-legacy-restore: {:.3} s ({} lines)",
        legacy.as_secs_f64(),
        text.lines().count()
    );
    let r2 = &topo.paths[3].1.r;
    let nft_text = kubeproxy::nftables(&kp, "10.244.0.0/16", "10.97.0.0/16");
    let nft = in_ns_stdin(r2, "nft", &["-f", "-"], &nft_text)?;
    println!(
        "nft -f: {:.3} s ({} lines)",
        nft.as_secs_f64(),
        nft_text.lines().count()
    );
    let r3 = &topo.paths[1].1.r;
    if std::env::var_os("WEIR_BENCH_SKIP_IPTABLES_NFT").is_none() {
        match in_ns_stdin(r3, "iptables-nft-restore", &["--noflush"], &text) {
            Ok(d) => println!(
                "iptables-nft-restore (the host's default iptables backend): {:.3} s",
                d.as_secs_f64()
            ),
            Err(e) => println!("iptables-nft-restore: failed: {e}"),
        }
    }
    // weir's own nftables dataplane, the same desired state (as weir's services, not
    // kube-proxy's), in a namespace of its own.
    let r4 = &topo.paths[0].1.r;
    let mut nft_dp = weir_dataplane::nft::NftDataplane::new(
        Some(PathBuf::from(format!("/run/netns/{r4}"))),
        weir_dataplane::nft::NodeNet {
            devices: Vec::new(),
            snat_ports: (61000, 65535),
            masquerade: None,
        },
    )?;
    let t = Instant::now();
    nft_dp.apply(&state)?;
    let nft_full = t.elapsed();
    let t = Instant::now();
    nft_dp.apply(&changed)?;
    let nft_one = t.elapsed();
    weir_dataplane::nft::NftDataplane::remove(Some(&PathBuf::from(format!("/run/netns/{r4}"))))?;
    println!(
        "weir --dataplane nftables: full apply {:.3} s; one-service change {:.3} ms",
        nft_full.as_secs_f64(),
        nft_one.as_secs_f64() * 1000.0
    );
    // weir's iptables dataplane, in the same namespace (its nft tables removed), with the
    // legacy binaries (the kube-proxy baseline above is iptables-legacy-restore).
    let mut ipt_dp = weir_dataplane::ipt::IptablesDataplane::new(
        Some(PathBuf::from(format!("/run/netns/{r4}"))),
        weir_dataplane::nft::NodeNet {
            devices: Vec::new(),
            snat_ports: (61000, 65535),
            masquerade: None,
        },
        weir_dataplane::ipt::IptablesBackend::Legacy,
    )?;
    let t = Instant::now();
    ipt_dp.apply(&state)?;
    let ipt_full = t.elapsed();
    let t = Instant::now();
    ipt_dp.apply(&changed)?;
    let ipt_one = t.elapsed();
    weir_dataplane::ipt::IptablesDataplane::remove(
        Some(&PathBuf::from(format!("/run/netns/{r4}"))),
        weir_dataplane::ipt::IptablesBackend::Legacy,
    )?;
    println!(
        "weir --dataplane iptables (legacy): full apply {:.3} s; one-service change {:.3} ms",
        ipt_full.as_secs_f64(),
        ipt_one.as_secs_f64() * 1000.0
    );
    println!(
        "ratios: iptables-legacy-restore/weir {:.1}x, nft/weir {:.1}x, weir-nftables/weir {:.1}x, kube-proxy-nft/weir-nftables {:.2}x, kube-proxy-legacy/weir-iptables-legacy {:.2}x",
        legacy.as_secs_f64() / full.as_secs_f64(),
        nft.as_secs_f64() / full.as_secs_f64(),
        nft_full.as_secs_f64() / full.as_secs_f64(),
        nft.as_secs_f64() / nft_full.as_secs_f64(),
        legacy.as_secs_f64() / ipt_full.as_secs_f64()
    );
    Ok(())
}

fn agent_pid(lab: &str) -> Option<String> {
    sh(
        "pgrep",
        &["-f", "--", &format!("lab agent --cluster {lab} ")],
    )
    .ok()
    .and_then(|s| s.split_whitespace().next().map(String::from))
}

fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// From the API: N selectorless Services with hand-written 3-endpoint EndpointSlices in a lab;
/// then the agent is restarted with empty maps and timed until it has programmed them all;
/// then one EndpointSlice changes and the agent is timed until it has applied it.
fn api_bench(n: usize, weir: &str) -> Result<()> {
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let lab = format!("wbapi{}", std::process::id() % 10000);
    sh(weir, &["lab", "up", "--name", &lab])?;
    struct Down(String, String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = sh(&self.1, &["lab", "down", "--name", &self.0]);
        }
    }
    let _down = Down(lab.clone(), weir.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let socket = weir_lab::paths::LabPaths::new(&lab).agent_socket("node-1");
    rt.block_on(async {
        let client = weir_lab::lab::lab_client(&lab).await?;
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        ns.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "bench"}}))?).await?;
        let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), "bench");
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = Api::namespaced(client.clone(), "bench");
        let started = Instant::now();
        use futures::StreamExt;
        let results: Vec<Result<()>> = futures::stream::iter(0..n)
            .map(|i| {
                let (svcs, slices) = (svcs.clone(), slices.clone());
                async move {
                    let svc = serde_json::json!({"metadata": {"name": format!("svc-{i}")}, "spec": {"ports": [{"name": "http", "port": 80}]}});
                    svcs.create(&PostParams::default(), &serde_json::from_value(svc)?).await?;
                    let eps: Vec<_> = (0..3).map(|k| serde_json::json!({"addresses": [format!("10.{}.{}.{}", 100 + k, i / 250, i % 250 + 2)]})).collect();
                    let sl = serde_json::json!({"metadata": {"name": format!("svc-{i}-1"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps});
                    slices.create(&PostParams::default(), &serde_json::from_value(sl)?).await?;
                    Ok(())
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r?;
        }
        println!("created {n} Services + {n} EndpointSlices through the API in {:.1} s", started.elapsed().as_secs_f64());
        let status = || async { weir_agent::api::get(&socket, "/status").await.unwrap_or_default() };
        while status().await["frontends"].as_u64().unwrap_or(0) < n as u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = agent_pid(&lab).context("agent pid")?;
        println!("agent RSS with {n} Services programmed: {} MiB", rss_of(&pid) / 1024);
        // Restart from empty maps: API -> maps, timed.
        sh("kill", &["-9", &pid])?;
        std::fs::remove_dir_all(weir_lab::paths::LabPaths::new(&lab).node_bpf_dir("node-1"))?;
        let _ = std::fs::remove_file(&socket);
        let started = Instant::now();
        let log = std::fs::File::create(format!("/run/weir/labs/{lab}/logs/agent-bench.log"))?;
        Command::new(weir).args(["lab", "agent", "--cluster", &lab, "--node", "node-1"]).stdout(log.try_clone()?).stderr(log).spawn()?;
        loop {
            let st = status().await;
            if st["synced"] == true && st["frontends"].as_u64().unwrap_or(0) >= n as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st = status().await;
        println!("agent start -> {n} Services x 3 endpoints programmed from the API: {:.2} s (of which the map writes: {:.3} s)", started.elapsed().as_secs_f64(), st["last_apply_micros"].as_f64().unwrap_or(0.0) / 1e6);
        let pid = agent_pid(&lab).context("agent pid")?;
        println!("agent RSS after a cold start with {n} Services: {} MiB", rss_of(&pid) / 1024);
        // One Service change.
        let applies = st["applies"].as_u64().unwrap_or(0);
        let started = Instant::now();
        let patch = serde_json::json!({"endpoints": [{"addresses": ["10.250.0.1"]}, {"addresses": ["10.250.0.2"]}, {"addresses": ["10.250.0.3"]}]});
        slices.patch("svc-7-1", &PatchParams::default(), &Patch::Merge(patch)).await?;
        let written = started.elapsed();
        loop {
            let st = status().await;
            if st["applies"].as_u64().unwrap_or(0) > applies {
                println!("one EndpointSlice change: API write {:.1} ms; on the agent, build {:.1} ms + apply {:.1} ms; write -> applied {:.1} ms",
                    written.as_secs_f64() * 1000.0, st["last_build_micros"].as_f64().unwrap_or(0.0) / 1000.0, st["last_apply_micros"].as_f64().unwrap_or(0.0) / 1000.0, started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok::<_, anyhow::Error>(())
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__in") => {
            enter(&args[1], &args[2])?;
            match args[3].as_str() {
                "__serve" => serve(args[4].parse()?),
                "__podpod_serve" => podpod::serve(),
                "__probe" => schedule::probe(&args[4], args[5].parse()?, args[6].parse()?),
                "__podpod_rr" => podpod::rr(args[4].parse()?, args[5].parse()?, args[6].parse()?),
                "__podpod_stream" => podpod::stream(args[4].parse()?, args[5].parse()?),
                "__client_live" => client_live(args[5].parse()?, args[4].parse()?),
                "__client" => client(
                    args[6..]
                        .iter()
                        .map(|a| a.parse())
                        .collect::<Result<_, _>>()?,
                    args[4].parse()?,
                    args[5].parse()?,
                ),
                other => bail!("unknown helper {other}"),
            }
        }
        Some("connect") => {
            let counts: Vec<usize> = args
                .get(1)
                .map(|s| s.split(',').map(|x| x.parse()).collect::<Result<_, _>>())
                .transpose()?
                .unwrap_or_else(|| vec![1, 1000, 10000]);
            let rounds = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let secs = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2.0);
            let modes: Vec<&str> = args
                .get(4)
                .map(|m| m.split(',').collect())
                .unwrap_or_else(|| MODES.to_vec());
            connect_bench(&counts, rounds, secs, 4, &modes)
        }
        Some("nodeport") => {
            let counts: Vec<usize> = args
                .get(1)
                .map(|s| s.split(',').map(|x| x.parse()).collect::<Result<_, _>>())
                .transpose()?
                .unwrap_or_else(|| vec![1, 1000]);
            let rounds = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let secs = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2.0);
            let remote = args.get(4).map(String::as_str) == Some("remote");
            nodeport::bench(&counts, rounds, secs, 4, remote)
        }
        Some("podpod") => {
            let rounds = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let secs = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2.0);
            podpod::bench(rounds, secs, 4)
        }
        Some("policy") => {
            let n = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
            let rounds = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let secs = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2.0);
            policy::bench(n, rounds, secs)
        }
        Some("visibility") => {
            let rounds = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let secs = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2.0);
            let threads = std::env::var("WEIR_BENCH_THREADS")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(4);
            visibility::bench(rounds, secs, threads)
        }
        Some("prefilter") => {
            let rounds = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let secs = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2.0);
            prefilter::bench(rounds, secs)
        }
        Some("program") => {
            program_bench(args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10000))
        }
        Some("mesh") => mesh::bench(
            args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(200),
            args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(20),
            args.get(3)
                .map(String::as_str)
                .unwrap_or("target/release/weir"),
        ),
        Some("mesh-scale") => mesh::scale(
            args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10),
            args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1000),
            args.get(3)
                .map(String::as_str)
                .unwrap_or("target/release/weir"),
        ),
        Some("switch") => switch::bench(
            &args
                .get(1)
                .map(String::as_str)
                .unwrap_or("10000,100000")
                .split(',')
                .map(|s| s.parse())
                .collect::<Result<Vec<u32>, _>>()?,
        ),
        Some("schedule") => schedule::bench(
            args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(20),
            args.get(2)
                .map(String::as_str)
                .unwrap_or("target/release/weir"),
        ),
        Some("api") => api_bench(
            args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(10000),
            args.get(2)
                .map(String::as_str)
                .unwrap_or("target/release/weir"),
        ),
        _ => {
            eprintln!(
                "usage: weir-bench connect [N1,N2,..] [ROUNDS] [SECONDS] [MODES] | weir-bench nodeport [N1,N2,..] [ROUNDS] [SECONDS] [remote] | weir-bench podpod [ROUNDS] [SECONDS] | weir-bench policy [N] [ROUNDS] [SECONDS] | weir-bench prefilter [ROUNDS] [SECONDS] | weir-bench visibility [ROUNDS] [SECONDS] | weir-bench program [N] | weir-bench api [N] [WEIR] | weir-bench mesh [CHANGES] [EXPORTS] [WEIR] | weir-bench mesh-scale [CLUSTERS] [SERVICES] [WEIR] | weir-bench schedule [TRIALS] [WEIR] | weir-bench switch [N1,N2,..]"
            );
            std::process::exit(2)
        }
    }
}
