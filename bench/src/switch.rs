//! `weir-bench switch N,M`: the copy step of a dataplane switch, the part that grows with the
//! node's flows, in both directions.
//!
//! - To netfilter: N (then M) translated flows (TCP established with DNAT and SNAT, as
//!   NodePort flows to remote backends) written into the kernel's conntrack over weir's
//!   ctnetlink socket, in a namespace of their own; against `conntrack -I` (conntrack-tools,
//!   one process per flow, what a script would do) on a sample in the same run.
//! - To eBPF: the same N entries dumped from the kernel's conntrack and written into the BPF
//!   conntrack as translation pairs (a NodePort frontend with the flows' backends
//!   programmed); against `conntrack -L` listing the same entries (reading them alone, with
//!   conntrack-tools) in the same run.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Result};
use weir_control::lb::{Backend, Frontend, FrontendKey, LbState, Proto, Scope};
use weir_dataplane::ctnetlink::{Conntrack, Flow, FlowProto};
use weir_dataplane::Dataplane;

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn netns(tag: &str) -> Result<Ns> {
    let name = format!("weir-bench-ct-{tag}-{}", std::process::id());
    if !Command::new("ip")
        .args(["netns", "add", &name])
        .status()?
        .success()
    {
        bail!("ip netns add {name}");
    }
    let ns = Ns(name);
    // Conntrack and NAT are on where rules use them, as in a switch's target.
    let rules = "table ip t {\n chain pre { type nat hook prerouting priority -100; }\n chain post { type nat hook postrouting priority 100; }\n chain check { type filter hook forward priority 0; ct state invalid counter; }\n}\n";
    let mut c = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.0))
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut c.stdin.take().expect("stdin"), rules.as_bytes())?;
    if !c.wait()?.success() {
        bail!("nft in {}", ns.0);
    }
    Ok(ns)
}

/// The i-th synthetic NodePort flow: client 100.64.x.y:port to the node's 30080, DNAT to a
/// backend, SNAT to the node and a port of its own.
fn flow(i: u32) -> Flow {
    let client = std::net::Ipv4Addr::from(0x6440_0000 + (i / 40_000));
    let cport = 20_000 + (i % 40_000) as u16;
    Flow {
        proto: FlowProto::Tcp,
        src: std::net::SocketAddr::new(client.into(), cport),
        dst: "172.30.0.11:30080".parse().expect("addr"),
        dnat: Some(std::net::SocketAddr::new(
            std::net::Ipv4Addr::new(10, 244, 2, (i % 200) as u8 + 2).into(),
            8080,
        )),
        snat: Some(std::net::SocketAddr::new(
            std::net::Ipv4Addr::new(172, 30, 0, 11 + (i / 20_000) as u8).into(),
            45_056 + (i % 20_000) as u16,
        )),
        timeout: 3600,
        mark: 0,
    }
}

pub fn bench(counts: &[u32]) -> Result<()> {
    println!("# weir-bench switch: conntrack entries written with their NAT (TCP established, DNAT + SNAT)");
    // The baseline: conntrack-tools, one process per flow, on a sample.
    let sample = 300;
    let base_ns = netns("cli")?;
    let t = Instant::now();
    for i in 0..sample {
        let f = flow(i);
        let dnat = f.dnat.expect("dnat");
        let snat = f.snat.expect("snat");
        let ok = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", base_ns.0))
            .args([
                "conntrack",
                "-I",
                "-p",
                "tcp",
                "--state",
                "ESTABLISHED",
                "-t",
                "3600",
            ])
            .args(["-s", &f.src.ip().to_string(), "-d", &f.dst.ip().to_string()])
            .args([
                "--sport",
                &f.src.port().to_string(),
                "--dport",
                &f.dst.port().to_string(),
            ])
            .args([
                "--dst-nat",
                &dnat.to_string(),
                "--src-nat",
                &snat.to_string(),
            ])
            .stderr(std::process::Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("conntrack -I failed for flow {i}");
        }
    }
    let per_cli = t.elapsed().as_secs_f64() / f64::from(sample);
    println!(
        "conntrack -I (one process per flow, {sample} flows): {:.0} flows/s",
        1.0 / per_cli
    );
    drop(base_ns);
    for &n in counts {
        let ns = netns(&n.to_string())?;
        let mut ct = Conntrack::open(Some(std::path::Path::new(&format!("/run/netns/{}", ns.0))))?;
        let t = Instant::now();
        for i in 0..n {
            ct.insert(&flow(i))?;
        }
        let took = t.elapsed().as_secs_f64();
        let listed = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.0))
            .args(["conntrack", "-C"])
            .output()?;
        let count = String::from_utf8_lossy(&listed.stdout).trim().to_string();
        println!(
            "weir ctnetlink, {n} flows: {took:.3} s, {:.0} flows/s (entries in the namespace's table: {count}); ratio weir/conntrack-tools {:.1}x",
            f64::from(n) / took,
            per_cli * f64::from(n) / took
        );
        takeover(&ns, &mut ct, n)?;
    }
    Ok(())
}

/// Pins of a bench's own, removed on drop.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = weir_bpf::datapath::Datapath::remove_pins(&self.0.join("tc"));
        let _ = weir_bpf::SockLb::remove_pins(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The NodePort frontend the synthetic flows were sent to, with their backends.
fn nodeport_state() -> LbState {
    let backends = (0..200)
        .map(|i| Backend {
            ip: std::net::Ipv4Addr::new(10, 244, 2, i as u8 + 2).into(),
            port: 8080,
        })
        .collect();
    let mut st = LbState::default();
    st.frontends.insert(
        FrontendKey {
            vip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            port: 30080,
            proto: Proto::Tcp,
            scope: Scope::External,
        },
        Frontend::new("bench/np", backends),
    );
    st
}

/// The switch to eBPF's copy: the `n` entries in `ns` dumped and written into a BPF
/// conntrack of the bench's own; `conntrack -L` listing them as the baseline.
fn takeover(ns: &Ns, ct: &mut Conntrack, n: u32) -> Result<()> {
    let t = Instant::now();
    let listed = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.0))
        .args(["conntrack", "-L"])
        .stderr(std::process::Stdio::null())
        .output()?;
    let cli = t.elapsed().as_secs_f64();
    let cli_lines = listed
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    let pins = Pins(format!("/sys/fs/bpf/weir-bench-takeover-{}-{n}", std::process::id()).into());
    let mut lb =
        weir_dataplane::ebpf::EbpfDataplane::new_with(&pins.0, std::path::Path::new("/"), false)?;
    lb.apply(&nodeport_state())?;
    let pods = weir_dataplane::pods::PodDataplane::new(&pins.0.join("tc"), &pins.0)?;
    let t = Instant::now();
    let entries = ct.dump()?;
    let dumped = t.elapsed().as_secs_f64();
    let w = weir_dataplane::takeover::write(&pods, &lb, &entries, ct)?;
    let took = t.elapsed().as_secs_f64();
    let in_map = pods.datapath().ct_entries()?.len();
    if w.flows != n as usize || w.failed != 0 {
        bail!("took over {} of {n} flows ({} failed)", w.flows, w.failed);
    }
    println!(
        "weir takeover into BPF, {n} flows: {took:.3} s (dump {dumped:.3} s), {:.0} flows/s, {in_map} BPF entries; conntrack -L listing {cli_lines} entries: {cli:.3} s; ratio conntrack-tools listing / weir whole copy {:.1}x",
        f64::from(n) / took,
        cli / took
    );
    Ok(())
}
