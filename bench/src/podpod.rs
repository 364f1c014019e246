//! `weir-bench podpod`: pod-to-pod TCP on one node, the same namespaces with and without
//! weir's tc programs: routed by the node's host stack (no BPF at all), and with `from_pod`
//! on the pods' veths handing packets straight to the peer pod (bpf_redirect_peer).
//! Request/response rate (persistent connections exchanging one byte back and forth, as
//! netperf's TCP_RR) and throughput (one connection streaming). Runs alternate between the two
//! modes, the order rotating; medians.
//!
//! Topology: client pod (10.244.1.10) and server pod (10.244.1.2), each a namespace joined to
//! the node namespace by a veth pair, with a /32 route per pod and a link-local gateway, as in a
//! lab.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use weir_model::endpoint::EndpointRecord;

use crate::nodeport::link_of;
use crate::{in_ns, ip, median, sh, spawn_in};

pub(crate) const CLIENT: &str = "10.244.1.10";
pub(crate) const SERVER: &str = "10.244.1.2";

pub(crate) struct Topo {
    pub(crate) c: String,
    pub(crate) n: String,
    pub(crate) s: String,
    pub(crate) pins: std::path::PathBuf,
}

impl Drop for Topo {
    fn drop(&mut self) {
        crate::remove_netns(&[&self.c, &self.n, &self.s]);
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

pub(crate) fn build(name: &str) -> Result<Topo> {
    let prefix = format!("{name}{}", std::process::id());
    let t = Topo {
        c: format!("{prefix}-c"),
        n: format!("{prefix}-n"),
        s: format!("{prefix}-s"),
        pins: format!("/sys/fs/bpf/{prefix}").into(),
    };
    for ns in [&t.c, &t.n, &t.s] {
        sh("ip", &["netns", "add", ns])?;
        ip(ns, "link set lo up")?;
    }
    in_ns(&t.n, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    for (pod, host_if, addr) in [(&t.c, "lxcc", CLIENT), (&t.s, "lxcs", SERVER)] {
        ip(
            &t.n,
            &format!("link add {host_if} type veth peer name eth0 netns {pod}"),
        )?;
        ip(&t.n, &format!("addr add 169.254.1.1/32 dev {host_if}"))?;
        ip(&t.n, &format!("link set {host_if} up"))?;
        ip(&t.n, &format!("route add {addr}/32 dev {host_if}"))?;
        ip(pod, &format!("addr add {addr}/32 dev eth0"))?;
        ip(pod, "link set eth0 up")?;
        ip(pod, "route add 169.254.1.1 dev eth0 scope link")?;
        ip(pod, "route add default via 169.254.1.1 dev eth0")?;
    }
    Ok(t)
}

/// The endpoint records of the client and server pods (`bench/lxcc`, `bench/lxcs`).
pub(crate) fn records(t: &Topo) -> Result<Vec<EndpointRecord>> {
    let mut records = Vec::new();
    for (pod, host_if, addr) in [(&t.c, "lxcc", CLIENT), (&t.s, "lxcs", SERVER)] {
        let (ifindex, host_mac) = link_of(&t.n, host_if)?;
        let (_, mac) = link_of(pod, "eth0")?;
        records.push(EndpointRecord {
            pod: format!("bench/{host_if}"),
            uid: host_if.into(),
            ips: vec![addr.parse()?],
            host_if: host_if.into(),
            host_ifindex: ifindex,
            host_mac,
            mac,
            container_id: String::new(),
            ifname: String::new(),
            netns_inode: 0,
            netns_cookie: 0,
        });
    }
    Ok(records)
}

/// Server side: port 9000 echoes every byte back (request/response), port 9001 discards.
pub fn serve() -> Result<()> {
    let rr = TcpListener::bind("0.0.0.0:9000")?;
    let sink = TcpListener::bind("0.0.0.0:9001")?;
    std::thread::spawn(move || {
        for s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 1 << 16];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    for s in rr.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = s;
            let _ = s.set_nodelay(true);
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() {
                if s.write_all(&b).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Client side: `threads` connections doing one-byte transactions for `secs`; prints the
/// transaction count.
pub fn rr(to: SocketAddr, threads: usize, secs: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> Result<u64> {
                let mut s = TcpStream::connect(to)?;
                s.set_nodelay(true)?;
                let mut n = 0u64;
                let mut b = [7u8; 1];
                while Instant::now() < deadline {
                    s.write_all(&b)?;
                    s.read_exact(&mut b)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for h in hs {
        total += h.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    }
    println!("{total}");
    Ok(())
}

/// Client side: one connection writing 64 KiB chunks for `secs`; prints the bytes sent.
pub fn stream(to: SocketAddr, secs: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut s = TcpStream::connect(to)?;
    let buf = vec![1u8; 1 << 16];
    let mut total = 0u64;
    while Instant::now() < deadline {
        s.write_all(&buf)?;
        total += buf.len() as u64;
    }
    println!("{total}");
    Ok(())
}

fn run_client(ns: &str, args: &[String]) -> Result<f64> {
    let out = spawn_in(ns, None, args)?.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().parse::<f64>() {
        Ok(v) => Ok(v),
        Err(_) => bail!("client printed {text:?}"),
    }
}

/// `weir-bench podpod [ROUNDS] [SECONDS]`.
pub fn bench(rounds: usize, secs: f64, threads: usize) -> Result<()> {
    let t = build("wpp")?;
    let mut server = spawn_in(&t.s, None, &["__podpod_serve".into()])?;
    std::thread::sleep(Duration::from_millis(300));
    let mut pods = weir_dataplane::pods::PodDataplane::new(&t.pins.join("tc"), &t.pins)?;
    let records = records(&t)?;
    // Attaching and detaching happen inside the node's namespace.
    let mut set_weir = |on: bool| -> Result<()> {
        let recs = if on { records.clone() } else { Vec::new() };
        crate::in_netns_thread(&t.n, || {
            pods.sync(&recs)?;
            Ok(())
        })
    };
    println!("# weir-bench podpod: client pod {CLIENT} -> server pod {SERVER} on one node; {rounds} rounds of {secs} s, order rotating, medians");
    println!(
        "# host stack: the node routes (no BPF); weir: from_pod on both veths, bpf_redirect_peer"
    );
    let modes = ["host-stack", "weir"];
    let mut rr_res: [Vec<f64>; 2] = [vec![], vec![]];
    let mut st_res: [Vec<f64>; 2] = [vec![], vec![]];
    for round in 0..=rounds {
        for k in 0..2 {
            let mi = (k + round) % 2;
            set_weir(mi == 1)?;
            let tr = run_client(
                &t.c,
                &[
                    "__podpod_rr".into(),
                    format!("{SERVER}:9000"),
                    threads.to_string(),
                    secs.to_string(),
                ],
            )?;
            let bytes = run_client(
                &t.c,
                &[
                    "__podpod_stream".into(),
                    format!("{SERVER}:9001"),
                    secs.to_string(),
                ],
            )?;
            if round > 0 {
                rr_res[mi].push(tr / secs);
                st_res[mi].push(bytes * 8.0 / secs / 1e9);
            }
        }
    }
    set_weir(false)?;
    let base_rr = median(&mut rr_res[0].clone());
    let base_st = median(&mut st_res[0].clone());
    println!(
        "{:>11} {:>14} {:>9} {:>12} {:>9}",
        "mode", "transactions/s", "ratio", "Gbit/s", "ratio"
    );
    for (mi, mode) in modes.iter().enumerate() {
        let r = median(&mut rr_res[mi]);
        let s = median(&mut st_res[mi]);
        println!(
            "{mode:>11} {r:>14.0} {:>9.2} {s:>12.2} {:>9.2}",
            r / base_rr,
            s / base_st
        );
    }
    println!("({threads} request/response connections; throughput: one connection, 64 KiB writes)");
    let _ = server.kill();
    let _ = server.wait();
    drop(pods);
    Ok(())
}
