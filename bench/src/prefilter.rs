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
//! CPU cannot keep up with overflows the veth's ring.
//!
//! Two figures per mode. Saturated: the generator at full speed. The frames that overflow the
//! ring go back to the generator's page pool on its CPU while the node returns the frames it
//! dropped to the same pool from the other CPU; that lock contention (most of the node's time
//! under perf) is an artefact of the generator, which a NIC, whose pages come from a pool of
//! its own queue, does not have. Peak: the most the node dropped over a sweep of lower offered
//! loads (the generator slowed by busy work per frame, `xdp_tx`'s pace), the same sweep for
//! both modes. Runs alternate, medians.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::nodeport::link_of;
use crate::{in_ns, ip, median, sh};

const NODE_IP: &str = "172.31.0.1";
/// The generator's paces for the peak drop rate: iterations of busy work per frame.
const PACES: [u32; 10] = [16, 32, 48, 64, 96, 128, 192, 256, 384, 512];
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

/// Transmits `frame` from the external host for about `secs`, with `pace` iterations of busy
/// work before each frame (0: as fast as the generator goes). Returns the frames sent and the
/// time it took.
fn generate(ext: &str, ifindex: u32, frame: &[u8], pace: u32, secs: f64) -> Result<(u64, f64)> {
    crate::in_netns_thread(ext, || {
        let mut cpus = nix::sched::CpuSet::new();
        cpus.set(0)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
        let mut g = weir_bpf::datapath::XdpGenerator::new()?;
        g.set_pace(pace);
        // Each run costs the kernel a page pool and an RCU grace period to free it (some 20 ms
        // here): runs of about a tenth of the time, sized by the rate seen so far, so that the
        // generator sends nearly all the time.
        let started = Instant::now();
        let mut chunk = 4_096u32;
        let mut sent = 0u64;
        loop {
            g.send(frame, ifindex, chunk)?;
            sent += u64::from(chunk);
            let elapsed = started.elapsed().as_secs_f64();
            if elapsed >= secs {
                return Ok((sent, elapsed));
            }
            let rate = sent as f64 / elapsed;
            chunk =
                (rate * secs / 10.0).clamp(1_024.0, (rate * (secs - elapsed)).max(1_024.0)) as u32;
        }
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

/// What drops the denied frames at the node.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// The baseline: a raw-table PREROUTING DROP rule, no XDP program.
    Iptables,
    /// weir's XDP prefilter.
    Prefilter,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables-raw",
            Mode::Prefilter => "weir-prefilter",
        }
    }
}

const RULE: [&str; 10] = [
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

/// Fields drop in order: the dataplane before the namespaces and pins it uses.
struct Bench {
    pods: weir_dataplane::pods::PodDataplane,
    t: Topo,
    eth0: u32,
    ext0: u32,
    frame: Vec<u8>,
}

/// One trial's figures: frames offered and dropped at the node, per second.
struct Trial {
    offered: f64,
    dropped: f64,
}

impl Bench {
    fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let (t, pods, eth0) = (&self.t, &mut self.pods, self.eth0);
        crate::in_netns_thread(&t.node, || -> Result<()> {
            pods.detach_xdp(eth0);
            let _ = sh(
                "ip",
                &["-n", &t.node, "link", "set", "dev", "eth0", "xdp", "off"],
            );
            let mut delete = RULE;
            delete[2] = "-D";
            let _ = in_ns(&t.node, "iptables", &delete);
            match mode {
                Mode::Iptables => {
                    in_ns(&t.node, "iptables", &RULE)?;
                }
                Mode::Prefilter => {
                    pods.attach_xdp(eth0, weir_bpf::datapath::XdpProgram::Prefilter)?;
                }
            }
            Ok(())
        })?;
        pin_napi_threads()
    }

    fn dropped(&self, mode: Mode) -> Result<u64> {
        Ok(match mode {
            Mode::Iptables => iptables_dropped(&self.t.node)?,
            Mode::Prefilter => self.pods.prefilter_list()?.iter().map(|e| e.packets).sum(),
        })
    }

    fn trial(&self, mode: Mode, pace: u32, secs: f64) -> Result<Trial> {
        let before = self.dropped(mode)?;
        let (sent, elapsed) = generate(&self.t.ext, self.ext0, &self.frame, pace, secs)?;
        // Let the node's thread drain its ring before reading the counter.
        std::thread::sleep(Duration::from_millis(20));
        let after = self.dropped(mode)?;
        if after <= before {
            bail!("{}: nothing was dropped", mode.name());
        }
        Ok(Trial {
            offered: sent as f64 / elapsed,
            dropped: (after - before) as f64 / elapsed,
        })
    }
}

/// `weir-bench prefilter [ROUNDS] [SECONDS]`.
pub fn bench(rounds: usize, secs: f64) -> Result<()> {
    let t = build()?;
    let (eth0, node_mac) = link_of(&t.node, "eth0")?;
    let (ext0, ext_mac) = link_of(&t.ext, "ext0")?;
    let frame = frame(&node_mac, &ext_mac)?;
    let mut pods = weir_dataplane::pods::PodDataplane::new(&t.pins.join("tc"), &t.pins)?;
    pods.prefilter_add(&[DENIED.parse()?])?;
    let mut b = Bench {
        pods,
        t,
        eth0,
        ext0,
        frame,
    };
    let iptables_version = sh("iptables", &["--version"])?.trim().to_string();
    println!("# weir-bench prefilter: UDP 64-byte frames from {DENIED} to a node; the generator (BPF_PROG_TEST_RUN live frames, no skb on the sender) on CPU 0, the node's threaded NAPI on the last CPU; {rounds} rounds of {secs} s, alternating, medians");
    println!("# saturated: {secs} s at the generator's full speed; peak: the best of 1 s trials at lower offered loads");
    println!("# iptables: a raw-table PREROUTING DROP rule ({iptables_version}), no XDP program; weir: the XDP prefilter (xdp_prefilter)");
    let modes = [Mode::Iptables, Mode::Prefilter];
    let mut saturated: [Vec<f64>; 2] = [vec![], vec![]];
    let mut offered: [Vec<f64>; 2] = [vec![], vec![]];
    let mut peak: [Vec<f64>; 2] = [vec![], vec![]];
    for round in 0..=rounds {
        for k in 0..2 {
            let mi = (k + round) % 2;
            b.set_mode(modes[mi])?;
            let t = b.trial(modes[mi], 0, secs)?;
            if round == 0 {
                continue; // warm-up
            }
            saturated[mi].push(t.dropped);
            offered[mi].push(t.offered);
            let mut best = t.dropped;
            for pace in PACES {
                best = best.max(b.trial(modes[mi], pace, 1.0)?.dropped);
            }
            peak[mi].push(best);
        }
    }
    let (eth0, node) = (b.eth0, b.t.node.clone());
    crate::in_netns_thread(&node, || {
        b.pods.detach_xdp(eth0);
        Ok(())
    })?;
    let base_sat = median(&mut saturated[0].clone());
    let base_peak = median(&mut peak[0].clone());
    println!(
        "{:>15} {:>14} {:>7} {:>14} {:>7} {:>14}",
        "mode", "saturated pps", "ratio", "peak pps", "ratio", "generated pps"
    );
    for (mi, mode) in modes.iter().enumerate() {
        let s = median(&mut saturated[mi]);
        let p = median(&mut peak[mi]);
        let o = median(&mut offered[mi]);
        println!(
            "{:>15} {s:>14.0} {:>7.2} {p:>14.0} {:>7.2} {o:>14.0}",
            mode.name(),
            s / base_sat,
            p / base_peak
        );
    }
    println!("(saturated: the generator at full speed; what overflows the veth's ring goes back to the generator's page pool from both CPUs at once, and that contention costs the node's CPU too. peak: the most the node dropped over offered loads, the generator slowed by {PACES:?} iterations of busy work per frame, 1 s each)");
    Ok(())
}
