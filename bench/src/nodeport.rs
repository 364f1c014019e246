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
use weir_control::lb::{FrontendKey, LbState, Proto, Scope};
use weir_dataplane::Dataplane;
use weir_model::endpoint::EndpointRecord;

use crate::kubeproxy::Svc;
use crate::{in_ns, ip, median, sh, spawn_in, ENDPOINTS};

/// The modes measured: with the backends behind another node (`remote`), also weir's XDP
/// program, which completes the SNATed flows before the stack.
fn modes(remote: bool) -> &'static [&'static str] {
    if remote {
        &["direct", "iptables", "weir-tc", "weir-xdp"]
    } else {
        &["direct", "iptables", "weir-tc"]
    }
}

/// Node A's address toward node B (remote mode), the SNAT address.
const NODE_B_LINK: &str = "172.31.1.1";

/// Per mode: conn/s, p50 and p99 of each run, and the errors.
type Runs = (Vec<f64>, Vec<f64>, Vec<f64>, u64);
const NODE_IP: &str = "172.31.0.1";

struct Ns {
    c: String,
    n: String,
    s: String,
    /// Remote mode: node B, where the pods are.
    m: Option<String>,
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
            if let Some(m) = &p.m {
                crate::remove_netns(&[m]);
            }
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

fn build(remote: bool) -> Result<Topo> {
    let prefix = format!("wnp{}", std::process::id());
    let mut t = Topo {
        prefix: prefix.clone(),
        modes: Vec::new(),
        cgroup_mount: format!("/run/{prefix}-cg").into(),
        pins: format!("/sys/fs/bpf/{prefix}").into(),
    };
    for mode in modes(remote) {
        let p = Ns {
            c: format!("{prefix}-{mode}-c"),
            n: format!("{prefix}-{mode}-n"),
            s: format!("{prefix}-{mode}-s"),
            m: remote.then(|| format!("{prefix}-{mode}-m")),
        };
        for ns in [&p.c, &p.n, &p.s].into_iter().chain(p.m.as_ref()) {
            sh("ip", &["netns", "add", ns])?;
            ip(ns, "link set lo up")?;
        }
        t.modes.push((mode.to_string(), p));
        let p = &t.modes.last().expect("mode").1;
        ip(
            &p.n,
            &format!("link add ext0 type veth peer name eth0 netns {}", p.c),
        )?;
        ip(&p.n, &format!("addr add {NODE_IP}/24 dev ext0"))?;
        ip(&p.n, "link set ext0 up")?;
        in_ns(&p.n, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // The pods' node: node A itself, or node B behind node A's second link.
        let pods_node = match &p.m {
            None => &p.n,
            Some(m) => {
                ip(
                    &p.n,
                    &format!("link add fab0 type veth peer name fab0 netns {m}"),
                )?;
                ip(&p.n, &format!("addr add {NODE_B_LINK}/24 dev fab0"))?;
                ip(&p.n, "link set fab0 up")?;
                ip(&p.n, "route add 10.244.1.0/24 via 172.31.1.2")?;
                ip(m, "addr add 172.31.1.2/24 dev fab0")?;
                ip(m, "link set fab0 up")?;
                ip(m, &format!("route add 172.31.0.0/24 via {NODE_B_LINK}"))?;
                in_ns(m, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
                m
            }
        };
        ip(
            pods_node,
            &format!("link add lxc0 type veth peer name eth0 netns {}", p.s),
        )?;
        ip(pods_node, "addr add 169.254.1.1/32 dev lxc0")?;
        ip(pods_node, "link set lxc0 up")?;
        for e in ENDPOINTS {
            ip(pods_node, &format!("route add {e}/32 dev lxc0"))?;
        }
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
        if let Some(m) = &p.m {
            // The same link settings for every mode: the far ends of node A's links compute
            // checksums in software and carry a pass-everything XDP program (a veth receives
            // XDP_REDIRECTed frames only then).
            for (ns, dev) in [(&p.c, "eth0"), (m, "fab0")] {
                in_ns(ns, "ethtool", &["-K", dev, "tx", "off"])?;
                let (ifindex, _) = link_of(ns, dev)?;
                in_netns(ns, || Ok(weir_bpf::datapath::attach_xdp_pass(ifindex)?))?;
            }
        }
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
            crate::frontend(s),
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

/// One weir mode's datapath: the socket layer's maps (programs hooked to an empty cgroup, so
/// unused) and the tc (and XDP) programs on its node A.
struct Weir {
    lb: weir_dataplane::ebpf::EbpfDataplane,
    pods: weir_dataplane::pods::PodDataplane,
}

fn weir_for(topo: &Topo, mi: usize, remote: bool) -> Result<Weir> {
    let (mode, ns) = &topo.modes[mi];
    let pins = topo.pins.join(mode);
    let cg = topo.cgroup_mount.join(&topo.prefix).join(mode);
    std::fs::create_dir_all(&cg)?;
    let lb = weir_dataplane::ebpf::EbpfDataplane::new(&pins, &cg)?;
    let mut pods = weir_dataplane::pods::PodDataplane::new(&pins.join("tc"), &pins)?;
    let (ext0, _) = link_of(&ns.n, "ext0")?;
    if remote {
        let (fab0, _) = link_of(&ns.n, "fab0")?;
        in_netns(&ns.n, || {
            for dev in [ext0, fab0] {
                pods.attach_netdev(dev)?;
                if mode == "weir-xdp" {
                    pods.attach_xdp(dev, weir_bpf::datapath::XdpProgram::NodePort)?;
                }
            }
            pods.configure_node(
                &[NODE_IP.parse()?, NODE_B_LINK.parse()?],
                Some(NODE_B_LINK.parse()?),
                (32768, 65535),
                None,
                false,
            )?;
            Ok(())
        })?;
    } else {
        let (lxc, lxc_mac) = link_of(&ns.n, "lxc0")?;
        let (_, pod_mac) = link_of(&ns.s, "eth0")?;
        let records = vec![EndpointRecord {
            pod: "bench/server".into(),
            uid: "server".into(),
            ips: ENDPOINTS.iter().map(|e| e.parse().expect("ip")).collect(),
            host_if: "lxc0".into(),
            host_ifindex: lxc,
            host_mac: lxc_mac,
            mac: pod_mac,
            container_id: String::new(),
            ifname: String::new(),
            netns_inode: 0,
            netns_cookie: 0,
        }];
        in_netns(&ns.n, || {
            pods.attach_netdev(ext0)?;
            pods.configure_node(
                &[NODE_IP.parse()?],
                Some(NODE_IP.parse()?),
                (61000, 65535),
                None,
                false,
            )?;
            pods.sync(&records)?;
            Ok(())
        })?;
    }
    Ok(Weir { lb, pods })
}

/// `weir-bench nodeport [N1,N2,..] [ROUNDS] [SECONDS] [remote]`.
pub fn bench(
    counts: &[usize],
    rounds: usize,
    secs: f64,
    threads: usize,
    remote: bool,
) -> Result<()> {
    let topo = build(remote)?;
    let modes = modes(remote);
    let mut servers = Vec::new();
    for (_, p) in &topo.modes {
        servers.push(spawn_in(
            &p.s,
            None,
            &["__serve".into(), threads.to_string()],
        )?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut weirs = Vec::new();
    for (mi, (mode, _)) in topo.modes.iter().enumerate() {
        if mode.starts_with("weir") {
            weirs.push(weir_for(&topo, mi, remote)?);
        }
    }
    println!("# weir-bench nodeport: {threads} client threads, {secs} s per run, {rounds} rounds (order rotating), medians");
    if remote {
        println!("# client 172.31.0.2 -> node A {NODE_IP}:NodePort -> node B -> 3 endpoints 10.244.1.{{2,3,4}}:8080 (SNAT); target Service last of N");
    } else {
        println!("# client 172.31.0.2 -> node {NODE_IP}:NodePort -> 3 endpoints 10.244.1.{{2,3,4}}:8080 on the node; target Service last of N");
    }
    println!(
        "{:>6} {:>9} {:>10} {:>8} {:>8} {:>8} {:>9} {:>7} {:>10}",
        "N", "mode", "conn/s", "p50 us", "p99 us", "errors", "vs direct", "vs ipt", "paired"
    );
    for &n in counts {
        let svcs = services(n);
        let target = svcs.last().expect("target").node_port.expect("port");
        for w in &mut weirs {
            w.lb.apply(&lb_state(&svcs))?;
        }
        let ipt = &topo
            .modes
            .iter()
            .find(|(m, _)| m == "iptables")
            .expect("m")
            .1;
        crate::load_kube_proxy_iptables(&ipt.n, &svcs)?;
        let mut res: Vec<Runs> = modes.iter().map(|_| (vec![], vec![], vec![], 0)).collect();
        for round in 0..=rounds {
            for k in 0..modes.len() {
                let mi = (k + round) % modes.len();
                let (mode, p) = &topo.modes[mi];
                let targets: Vec<String> = if mode == "direct" {
                    ENDPOINTS.iter().map(|e| format!("{e}:8080")).collect()
                } else {
                    vec![format!("{NODE_IP}:{target}")]
                };
                let _ = in_ns(&p.n, "conntrack", &["-F"]);
                if let Some(m) = &p.m {
                    let _ = in_ns(m, "conntrack", &["-F"]);
                }
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
            for w in &weirs {
                w.pods.ct_flush()?;
            }
        }
        let direct = median(&mut res[0].0.clone());
        let iptables = median(&mut res[1].0.clone());
        let direct_runs = res[0].0.clone();
        for (mi, (rates, p50, p99, errors)) in res.iter_mut().enumerate() {
            let mut paired: Vec<f64> = rates.iter().zip(&direct_runs).map(|(r, d)| r / d).collect();
            let m = median(rates);
            println!(
                "{n:>6} {:>9} {m:>10.0} {:>8.0} {:>8.0} {errors:>8} {:>9.2} {:>7.2} {:>10.2}",
                modes[mi],
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
    // Every packet weir dropped, by reason: errors above have their explanation here.
    for (w, mode) in weirs
        .iter()
        .zip(topo.modes.iter().filter(|(m, _)| m.starts_with("weir")))
    {
        for m in w.pods.dump()?.metrics.iter().filter(|m| m.reason >= 130) {
            println!("# {}: {} {} packets", mode.0, m.name, m.packets);
        }
    }
    drop(weirs);
    Ok(())
}
