//! `weir-bench prefilter`: how many packets per second a node drops from a denied source
//! prefix, weir's XDP prefilter against an iptables raw-table DROP rule (PREROUTING, the
//! earliest netfilter hook) on the same device, in the same run.
//!
//! Topology: an external host namespace joined to a node namespace by a veth pair. The
//! generator in the external host transmits a 64-byte UDP frame from 198.51.100.7 out of its
//! veth with BPF_PROG_TEST_RUN's live-frame mode (no skb on the sending side), pinned to the
//! first CPU. The node's veth receives the frames as a NIC queue would: as XDP frames,
//! processed by a threaded NAPI pinned to the last CPU. With the prefilter they are dropped in
//! XDP; for the baseline (no XDP program) each becomes an skb that the raw-table rule drops.
//! Counted at the receiver (the prefilter's counter, the rule's counter); what the receiving
//! CPU cannot keep up with overflows the veth's ring. Runs alternate, medians.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::nodeport::link_of;
use crate::{in_ns, ip, median, sh};

const NODE_IP: &str = "172.31.0.1";
const DENIED: &str = "198.51.100.0/24";

struct Topo {
    ext: String,
    node: String,
    pins: std::path::PathBuf,
}

impl Drop for Topo {
    fn drop(&mut self) {
        crate::remove_netns(&[&self.ext, &self.node]);
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

fn build() -> Result<Topo> {
    let prefix = format!("wpf{}", std::process::id());
    let t = Topo {
        ext: format!("{prefix}-ext"),
        node: format!("{prefix}-node"),
        pins: format!("/sys/fs/bpf/{prefix}").into(),
    };
    for ns in [&t.ext, &t.node] {
        sh("ip", &["netns", "add", ns])?;
        ip(ns, "link set lo up")?;
    }
    ip(
        &t.ext,
        &format!("link add ext0 type veth peer name eth0 netns {}", t.node),
    )?;
    ip(&t.ext, "addr add 172.31.0.2/24 dev ext0")?;
    ip(&t.ext, "link set ext0 up")?;
    ip(&t.node, &format!("addr add {NODE_IP}/24 dev eth0"))?;
    ip(&t.node, "link set eth0 up")?;
    // The node's receive processing in a NAPI thread of its own (a veth's NAPI exists with
    // GRO on), so that it runs on another CPU than the generator, as a NIC's would.
    in_ns(&t.node, "ethtool", &["-K", "eth0", "gro", "on"])?;
    in_ns(
        &t.node,
        "sh",
        &["-c", "echo 1 > /sys/class/net/eth0/threaded"],
    )?;
    Ok(t)
}

/// A 64-byte Ethernet frame: UDP 198.51.100.7:1234 -> NODE_IP:9 (checksummed, padded).
fn frame(dst_mac: &str, src_mac: &str) -> Result<Vec<u8>> {
    let mac = |m: &str| {
        weir_model::endpoint::EndpointRecord::parse_mac(m)
            .ok_or_else(|| anyhow::anyhow!("bad MAC {m}"))
    };
    let mut f = weir_dataplane::pods::synthetic_frame(
        "198.51.100.7:1234".parse()?,
        format!("{NODE_IP}:9").parse()?,
        false,
    );
    f[0..6].copy_from_slice(&mac(dst_mac)?);
    f[6..12].copy_from_slice(&mac(src_mac)?);
    f.resize(64, 0);
    Ok(f)
}

/// Transmits `frame` from the external host with `threads` generator threads for `secs`.
fn generate(ext: &str, ifindex: u32, frame: &[u8], threads: usize, secs: f64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let path = format!("/run/netns/{ext}");
    let batch = 65_536u32;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<u64> {
                    let file = std::fs::File::open(&path)?;
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let mut cpus = nix::sched::CpuSet::new();
                    cpus.set(0)?;
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
                    let g = weir_bpf::datapath::XdpGenerator::new()?;
                    let mut sent = 0u64;
                    while Instant::now() < deadline {
                        g.send(frame, ifindex, batch)?;
                        sent += u64::from(batch);
                    }
                    Ok(sent)
                })
            })
            .collect();
        let mut total = 0;
        for h in hs {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("generator panicked"))??;
        }
        Ok(total)
    })
}

/// Moves the veth NAPI threads ("napi/eth0-N") to the last CPU, away from the generator.
fn pin_napi_threads() -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return Ok(());
    }
    for e in std::fs::read_dir("/proc")?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("napi/eth0-") {
            let pid = e.file_name().to_string_lossy().into_owned();
            let _ = sh("taskset", &["-pc", &(cpus - 1).to_string(), &pid]);
        }
    }
    Ok(())
}

/// The packets counter of the raw-table rule.
fn iptables_dropped(node: &str) -> Result<u64> {
    let out = in_ns(node, "iptables", &["-t", "raw", "-nvxL", "PREROUTING"])?;
    out.lines()
        .find(|l| l.contains("DROP") && l.contains("198.51.100.0/24"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("reading the raw-table rule's counter")
}

/// `weir-bench prefilter [ROUNDS] [SECONDS]`.
pub fn bench(rounds: usize, secs: f64) -> Result<()> {
    let t = build()?;
    let (eth0, node_mac) = link_of(&t.node, "eth0")?;
    let (ext0, ext_mac) = link_of(&t.ext, "ext0")?;
    let f = frame(&node_mac, &ext_mac)?;
    let threads = 1;
    let mut pods = weir_dataplane::pods::PodDataplane::new(&t.pins.join("tc"), &t.pins)?;
    pods.prefilter_add(&[DENIED.parse()?])?;
    let rule = [
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-i",
        "eth0",
        "-s",
        DENIED,
        "-j",
        "DROP",
    ];
    let iptables_version = sh("iptables", &["--version"])?.trim().to_string();
    println!("# weir-bench prefilter: UDP 64-byte frames from {DENIED} to a node; the generator (BPF_PROG_TEST_RUN live frames, no skb on the sender) on CPU 0, the node's threaded NAPI on the last CPU; {rounds} rounds of {secs} s, alternating, medians");
    println!("# iptables: a raw-table PREROUTING DROP rule ({iptables_version}), no XDP program; weir: the XDP prefilter (xdp_prefilter)");
    let modes = ["iptables-raw", "weir-prefilter"];
    let mut pps: [Vec<f64>; 2] = [vec![], vec![]];
    let mut sent_pps: [Vec<f64>; 2] = [vec![], vec![]];
    for round in 0..=rounds {
        for k in 0..2 {
            let mi = (k + round) % 2;
            // Set the mode up in the node's namespace.
            crate::in_netns_thread(&t.node, || -> Result<()> {
                pods.detach_xdp(eth0);
                let _ = sh(
                    "ip",
                    &["-n", &t.node, "link", "set", "dev", "eth0", "xdp", "off"],
                );
                let _ = in_ns(&t.node, "iptables", &{
                    let mut d = rule;
                    d[2] = "-D";
                    d
                });
                if mi == 0 {
                    in_ns(&t.node, "iptables", &rule)?;
                } else {
                    pods.attach_xdp(eth0, weir_bpf::datapath::XdpProgram::Prefilter)?;
                }
                Ok(())
            })?;
            pin_napi_threads()?;
            let before = if mi == 0 {
                iptables_dropped(&t.node)?
            } else {
                pods.prefilter_list()?.iter().map(|e| e.packets).sum()
            };
            let started = Instant::now();
            let sent = generate(&t.ext, ext0, &f, threads, secs)?;
            let elapsed = started.elapsed().as_secs_f64();
            let after = if mi == 0 {
                iptables_dropped(&t.node)?
            } else {
                pods.prefilter_list()?.iter().map(|e| e.packets).sum()
            };
            if after <= before {
                bail!("{}: nothing was dropped", modes[mi]);
            }
            if round > 0 {
                pps[mi].push((after - before) as f64 / elapsed);
                sent_pps[mi].push(sent as f64 / elapsed);
            }
        }
    }
    crate::in_netns_thread(&t.node, || {
        pods.detach_xdp(eth0);
        Ok(())
    })?;
    let base = median(&mut pps[0].clone());
    println!(
        "{:>15} {:>14} {:>9} {:>14}",
        "mode", "dropped pps", "ratio", "generated pps"
    );
    for (mi, mode) in modes.iter().enumerate() {
        let p = median(&mut pps[mi]);
        let g = median(&mut sent_pps[mi]);
        println!("{mode:>15} {p:>14.0} {:>9.2} {g:>14.0}", p / base);
    }
    println!("(frames the node could not take in time overflow the veth's ring: dropped pps is what one receiving CPU keeps up with)");
    drop(pods);
    Ok(())
}
