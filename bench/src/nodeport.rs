//! `weir-bench nodeport`: new-connection rate and connect latency from an external client to a
//! NodePort whose 3 endpoints sit behind the node, with N NodePort Services programmed (the
//! target last): straight to the pod IPs through the node (no rules: the baseline), kube-proxy's
//! iptables layout (legacy backend, externalTrafficPolicy Cluster: DNAT + masquerade), and
//! weir's tc datapath (DNAT at the node device's tc ingress, delivery with
//! bpf_redirect_peer). Each mode has its own namespaces; runs are interleaved with the order
//! rotating, conntrack flushed between runs.
//!
//! Topology per mode: client (172.31.0.2) — node (172.31.0.1, forwarding) — server namespace
//! (10.244.1.2-4 on one veth, as three pods), like a node with its pods.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use weir_control::lb::{Algorithm, Backend, Frontend, FrontendKey, LbMode, LbState, Proto, Scope};
use weir_dataplane::Dataplane;
use weir_model::endpoint::EndpointRecord;

use crate::kubeproxy::{self, Svc};
use crate::{in_ns, in_ns_stdin, ip, median, sh, spawn_in, ENDPOINTS};

const MODES: &[&str] = &["direct", "iptables", "weir-tc"];

/// Per mode: conn/s, p50 and p99 of each run, and the errors.
type Runs = (Vec<f64>, Vec<f64>, Vec<f64>, u64);
const NODE_IP: &str = "172.31.0.1";

struct Ns {
    c: String,
    n: String,
    s: String,
}

struct Topo {
    prefix: String,
    modes: Vec<(String, Ns)>,
    cgroup_mount: std::path::PathBuf,
    pins: std::path::PathBuf,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for (_, p) in &self.modes {
            crate::remove_netns(&[&p.c, &p.n, &p.s]);
        }
        let _ = weir_bpf_remove(&self.pins);
        let _ = std::fs::remove_dir(self.cgroup_mount.join(&self.prefix));
        let _ = sh("umount", &[self.cgroup_mount.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_dir(&self.cgroup_mount);
    }
}

fn weir_bpf_remove(pins: &std::path::Path) -> std::io::Result<()> {
    // Links first (they hold the programs), then the maps.
    if pins.exists() {
        std::fs::remove_dir_all(pins)?;
    }
    Ok(())
}

/// A link's ifindex and MAC address in namespace `ns`.
pub(crate) fn link_of(ns: &str, dev: &str) -> Result<(u32, String)> {
    let out = sh("ip", &["-j", "-n", ns, "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok((
        v[0]["ifindex"].as_u64().context("ifindex")? as u32,
        v[0]["address"].as_str().context("address")?.to_string(),
    ))
}

fn build() -> Result<Topo> {
    let prefix = format!("wnp{}", std::process::id());
    let mut t = Topo {
        prefix: prefix.clone(),
        modes: Vec::new(),
        cgroup_mount: format!("/run/{prefix}-cg").into(),
        pins: format!("/sys/fs/bpf/{prefix}").into(),
    };
    for mode in MODES {
        let p = Ns {
            c: format!("{prefix}-{mode}-c"),
            n: format!("{prefix}-{mode}-n"),
            s: format!("{prefix}-{mode}-s"),
        };
        for ns in [&p.c, &p.n, &p.s] {
            sh("ip", &["netns", "add", ns])?;
            ip(ns, "link set lo up")?;
        }
        t.modes.push((mode.to_string(), p));
        let p = &t.modes.last().expect("mode").1;
        ip(
            &p.n,
            &format!("link add ext0 type veth peer name eth0 netns {}", p.c),
        )?;
        ip(
            &p.n,
            &format!("link add lxc0 type veth peer name eth0 netns {}", p.s),
        )?;
        ip(&p.n, &format!("addr add {NODE_IP}/24 dev ext0"))?;
        ip(&p.n, "addr add 169.254.1.1/32 dev lxc0")?;
        ip(&p.n, "link set ext0 up")?;
        ip(&p.n, "link set lxc0 up")?;
        for e in ENDPOINTS {
            ip(&p.n, &format!("route add {e}/32 dev lxc0"))?;
        }
        in_ns(&p.n, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        ip(&p.c, "addr add 172.31.0.2/24 dev eth0")?;
        ip(&p.c, "link set eth0 up")?;
        ip(&p.c, &format!("route add default via {NODE_IP}"))?;
        for e in ENDPOINTS {
            ip(&p.s, &format!("addr add {e}/32 dev eth0"))?;
        }
        ip(&p.s, "link set eth0 up")?;
        ip(&p.s, "route add 169.254.1.1 dev eth0 scope link")?;
        ip(&p.s, "route add default via 169.254.1.1 dev eth0")?;
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

/// N NodePort Services (nodePort 30000 + i), 3 endpoints each; the target (last) has the
/// server's three addresses.
fn services(n: usize) -> Vec<Svc> {
    crate::services(n, 96, true)
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            s.node_port = Some(30000 + i as u16);
            s
        })
        .collect()
}

fn lb_state(svcs: &[Svc]) -> LbState {
    let mut st = LbState::default();
    for s in svcs {
        st.frontends.insert(
            FrontendKey {
                vip: IpAddr::from([0u8; 4]),
                port: s.node_port.expect("node port"),
                proto: Proto::Tcp,
                scope: Scope::External,
            },
            Frontend {
                service: s.name.clone(),
                backends: s
                    .endpoints
                    .iter()
                    .map(|(ip, port)| Backend {
                        ip: ip.parse().expect("ip"),
                        port: *port,
                    })
                    .collect(),
                terminating_fallback: false,
                affinity_timeout: None,
                algorithm: Algorithm::Random,
                source_ranges: Vec::new(),
                mode: LbMode::Snat,
            },
        );
    }
    st
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    })
}

/// `weir-bench nodeport [N1,N2,..] [ROUNDS] [SECONDS]`.
pub fn bench(counts: &[usize], rounds: usize, secs: f64, threads: usize) -> Result<()> {
    let topo = build()?;
    let mut servers = Vec::new();
    for (_, p) in &topo.modes {
        servers.push(spawn_in(
            &p.s,
            None,
            &["__serve".into(), threads.to_string()],
        )?);
    }
    std::thread::sleep(Duration::from_millis(300));
    // weir: the socket layer's maps (its programs hooked to an empty cgroup) and the tc
    // datapath on the node of its mode.
    let weir_ns = &topo
        .modes
        .iter()
        .find(|(m, _)| m == "weir-tc")
        .expect("mode")
        .1;
    let cg = topo.cgroup_mount.join(&topo.prefix);
    let mut lb = weir_dataplane::ebpf::EbpfDataplane::new(&topo.pins, &cg)?;
    let mut pods = weir_dataplane::pods::PodDataplane::new(&topo.pins.join("tc"), &topo.pins)?;
    let (lxc, lxc_mac) = link_of(&weir_ns.n, "lxc0")?;
    let (_, pod_mac) = link_of(&weir_ns.s, "eth0")?;
    let records = vec![EndpointRecord {
        pod: "bench/server".into(),
        uid: "server".into(),
        ips: ENDPOINTS.iter().map(|e| e.parse().expect("ip")).collect(),
        host_if: "lxc0".into(),
        host_ifindex: lxc,
        host_mac: lxc_mac,
        mac: pod_mac,
    }];
    let (ext0, _) = link_of(&weir_ns.n, "ext0")?;
    in_netns(&weir_ns.n, || {
        pods.attach_netdev(ext0)?;
        pods.configure_node(
            &[NODE_IP.parse()?],
            Some(NODE_IP.parse()?),
            (61000, 65535),
            None,
        )?;
        pods.sync(&records)?;
        Ok(())
    })?;
    println!("# weir-bench nodeport: {threads} client threads, {secs} s per run, {rounds} rounds (order rotating), medians");
    println!("# client 172.31.0.2 -> node {NODE_IP}:NodePort -> 3 endpoints 10.244.1.{{2,3,4}}:8080 on the node; target Service last of N");
    println!(
        "{:>6} {:>9} {:>10} {:>8} {:>8} {:>8} {:>9} {:>7} {:>10}",
        "N", "mode", "conn/s", "p50 us", "p99 us", "errors", "vs direct", "vs ipt", "paired"
    );
    for &n in counts {
        let svcs = services(n);
        let target = svcs.last().expect("target").node_port.expect("port");
        lb.apply(&lb_state(&svcs))?;
        let ipt = &topo
            .modes
            .iter()
            .find(|(m, _)| m == "iptables")
            .expect("m")
            .1;
        let _ = in_ns(&ipt.n, "iptables-legacy", &["-t", "nat", "-F"]);
        in_ns_stdin(
            &ipt.n,
            "iptables-legacy-restore",
            &["--noflush"],
            &kubeproxy::iptables(&svcs, "10.244.0.0/16"),
        )?;
        for j in kubeproxy::iptables_jumps() {
            let _ = in_ns(&ipt.n, "iptables-legacy", &j);
        }
        let mut res: Vec<Runs> = MODES.iter().map(|_| (vec![], vec![], vec![], 0)).collect();
        for round in 0..=rounds {
            for k in 0..MODES.len() {
                let mi = (k + round) % MODES.len();
                let (mode, p) = &topo.modes[mi];
                let targets: Vec<String> = if mode == "direct" {
                    ENDPOINTS.iter().map(|e| format!("{e}:8080")).collect()
                } else {
                    vec![format!("{NODE_IP}:{target}")]
                };
                let _ = in_ns(&p.n, "conntrack", &["-F"]);
                let mut args = vec![
                    "__client".to_string(),
                    threads.to_string(),
                    secs.to_string(),
                ];
                args.extend(targets);
                let out = spawn_in(&p.c, None, &args)?.wait_with_output()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let f: Vec<f64> = text
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if f.len() < 4 {
                    bail!("client for {mode} printed {text:?}");
                }
                if round == 0 {
                    continue;
                }
                let r = &mut res[mi];
                r.0.push(f[0] / secs);
                r.1.push(f[1]);
                r.2.push(f[2]);
                r.3 += f[3] as u64;
            }
            // Each run starts with empty conntrack tables, weir's as the kernel's.
            pods.ct_flush()?;
        }
        let direct = median(&mut res[0].0.clone());
        let iptables = median(&mut res[1].0.clone());
        let direct_runs = res[0].0.clone();
        for (mi, (rates, p50, p99, errors)) in res.iter_mut().enumerate() {
            let mut paired: Vec<f64> = rates.iter().zip(&direct_runs).map(|(r, d)| r / d).collect();
            let m = median(rates);
            println!(
                "{n:>6} {:>9} {m:>10.0} {:>8.0} {:>8.0} {errors:>8} {:>9.2} {:>7.2} {:>10.2}",
                MODES[mi],
                median(p50),
                median(p99),
                m / direct,
                m / iptables,
                median(&mut paired),
            );
        }
    }
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    drop(pods);
    drop(lb);
    Ok(())
}
