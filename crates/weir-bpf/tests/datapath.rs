//! BPF_PROG_TEST_RUN fixtures for the tc programs: a crafted frame in, seeded maps, the
//! expected verdict and the expected frame out (checksums included), with a per-field diff on
//! failure. FIB lookups run in a scratch network namespace with real devices and routes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

mod private_mounts;

use weir_bpf::datapath::{
    endpoint_info, endpoint_key, Datapath, TcProgram, XdpProgram, AF_INET, AF_INET6,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const NEXTHOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xcc];

static SEQ: AtomicU32 = AtomicU32::new(0);

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch namespace with devices for the FIB, and a pin directory; both removed on drop.
struct Fixture {
    netns: String,
    pins: PathBuf,
    dp: Datapath,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Datapath::remove_pins(&self.pins);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

impl Fixture {
    /// Namespace layout: `in0` (the device packets arrive on; 10.1.0.1/24, fd01::1/64),
    /// `out0` (10.2.0.1/24, fd02::1/64) with routes 10.50.0.0/24 via 10.2.0.2 (neighbour
    /// known) and 10.60.0.0/24 via 10.2.0.3 (neighbour unknown), fd50::/64 via fd02::2.
    fn new() -> Fixture {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let netns = format!("wbt-dp-{}-{n}", std::process::id());
        let pins = PathBuf::from(format!("/sys/fs/bpf/wbt-dp-{}-{n}", std::process::id()));
        weir_bpf::ensure_bpffs().expect("bpffs");
        sh("ip", &["netns", "add", &netns]);
        let batch = [
            "link set lo up",
            "link add in0 type veth peer name in0p",
            "link add out0 type veth peer name out0p",
            "link set in0 up",
            "link set in0p up",
            "link set out0 up",
            "link set out0p up",
            "addr add 10.1.0.1/24 dev in0",
            "addr add 10.2.0.1/24 dev out0",
            "addr add fd01::1/64 dev in0 nodad",
            "addr add fd02::1/64 dev out0 nodad",
            "route add 10.50.0.0/24 via 10.2.0.2",
            "route add 10.60.0.0/24 via 10.2.0.3",
            "route add fd50::/64 via fd02::2",
            "neigh add 10.2.0.2 lladdr 02:00:00:00:00:cc dev out0 nud permanent",
            "neigh add fd02::2 lladdr 02:00:00:00:00:cc dev out0 nud permanent",
        ];
        let mut child = Command::new("ip")
            .args(["-n", &netns, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("ip");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(batch.join("\n").as_bytes())
            .expect("write");
        assert!(child.wait().expect("ip").success());
        for kv in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            sh("ip", &["netns", "exec", &netns, "sysctl", "-qw", kv]);
        }
        let dp = match Datapath::load(&pins.join("tc"), &pins) {
            Ok(dp) => dp,
            Err(e) => {
                // No Fixture yet to clean up on drop: remove what was made before failing.
                let _ = Datapath::remove_pins(&pins);
                let _ = Command::new("ip").args(["netns", "del", &netns]).status();
                panic!("load: {e:?}");
            }
        };
        Fixture { netns, pins, dp }
    }

    fn ifindex(&self, dev: &str) -> u32 {
        let out = sh("ip", &["-j", "-n", &self.netns, "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v[0]["ifindex"].as_u64().expect("ifindex") as u32
    }

    fn mac(&self, dev: &str) -> [u8; 6] {
        let out = sh("ip", &["-j", "-n", &self.netns, "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let s = v[0]["address"].as_str().expect("address");
        weir_model_mac(s)
    }

    fn endpoint(&self, ip: IpAddr, ifindex: u32) {
        let mut k = endpoint_key::default();
        match ip {
            IpAddr::V4(a) => {
                k.addr[0] = u32::from_ne_bytes(a.octets());
                k.family = AF_INET;
            }
            IpAddr::V6(a) => {
                k.addr = weir_bpf::ip6_words(a);
                k.family = AF_INET6;
            }
        }
        let v = endpoint_info {
            ifindex,
            mac: POD_MAC,
            node_mac: VETH_MAC,
            ..Default::default()
        };
        self.dp.put_endpoint(&k, &v).expect("endpoint");
    }

    /// Runs `prog` on `frame` from inside the fixture's namespace (on a thread of its own).
    fn run(&self, prog: TcProgram, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).expect("netns");
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let r = self.dp.test_run(prog, frame, ingress).expect("test run");
                (r.verdict, r.packet)
            })
            .join()
            .expect("thread")
        })
    }

    /// Like `run`, in explain mode.
    fn explain(&self, prog: TcProgram, frame: &[u8], ingress: u32) -> weir_bpf::datapath::TestRun {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).expect("netns");
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                self.dp.explain(prog, frame, ingress).expect("explain")
            })
            .join()
            .expect("thread")
        })
    }

    fn metric(&self, name: &str) -> u64 {
        self.dp
            .metrics()
            .expect("metrics")
            .iter()
            .filter(|m| m.name == name)
            .map(|m| m.packets)
            .sum()
    }
}

fn weir_model_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

fn csum16(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + TCP SYN frame with a valid IP header checksum.
fn frame4(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![
        0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, ttl, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum16(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    // TCP: ports 40000 -> 80, SYN, a fixed checksum (no program touches L4 here).
    f.extend_from_slice(&[
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0xab, 0xcd, 0, 0,
    ]);
    f
}

/// An Ethernet + IPv6 + TCP SYN frame.
fn frame6(src: Ipv6Addr, dst: Ipv6Addr, hlim: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, hlim]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0xab, 0xcd, 0, 0,
    ]);
    f
}

/// Named fields of a frame, for a readable diff.
fn fields(f: &[u8]) -> Vec<(String, String)> {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut out = vec![];
    if f.len() < 14 {
        return vec![("frame".into(), hex(f))];
    }
    out.push(("eth.dst".into(), hex(&f[0..6])));
    out.push(("eth.src".into(), hex(&f[6..12])));
    out.push(("eth.type".into(), hex(&f[12..14])));
    let l3 = &f[14..];
    if f[12..14] == [0x08, 0x00] && l3.len() >= 20 {
        out.push(("ip.ttl".into(), l3[8].to_string()));
        out.push(("ip.proto".into(), l3[9].to_string()));
        out.push(("ip.check".into(), hex(&l3[10..12])));
        out.push((
            "ip.src".into(),
            Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15]).to_string(),
        ));
        out.push((
            "ip.dst".into(),
            Ipv4Addr::new(l3[16], l3[17], l3[18], l3[19]).to_string(),
        ));
        out.push(("l4".into(), hex(&l3[20..])));
    } else if f[12..14] == [0x86, 0xdd] && l3.len() >= 40 {
        out.push(("ip6.hlim".into(), l3[7].to_string()));
        out.push(("ip6.next".into(), l3[6].to_string()));
        let a = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16")).to_string();
        out.push(("ip6.src".into(), a(&l3[8..24])));
        out.push(("ip6.dst".into(), a(&l3[24..40])));
        out.push(("l4".into(), hex(&l3[40..])));
    } else {
        out.push(("payload".into(), hex(l3)));
    }
    out
}

fn assert_frame(case: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let (g, w) = (fields(got), fields(want));
    let mut diff = String::new();
    for i in 0..g.len().max(w.len()) {
        let gf = g.get(i).cloned().unwrap_or_default();
        let wf = w.get(i).cloned().unwrap_or_default();
        if gf != wf {
            diff.push_str(&format!(
                "  {}: got {} want {}\n",
                if wf.0.is_empty() { &gf.0 } else { &wf.0 },
                gf.1,
                wf.1
            ));
        }
    }
    panic!("{case}: output frame differs\n{diff}");
}

/// What a router makes of `f`: new MACs, TTL - 1 and the IPv4 checksum recomputed.
fn routed4(f: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut o = f.to_vec();
    o[0..6].copy_from_slice(&dst);
    o[6..12].copy_from_slice(&src);
    o[14 + 8] -= 1;
    o[14 + 10] = 0;
    o[14 + 11] = 0;
    let c = csum16(&o[14..34]);
    o[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    o
}

fn routed6(f: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut o = f.to_vec();
    o[0..6].copy_from_slice(&dst);
    o[6..12].copy_from_slice(&src);
    o[14 + 7] -= 1;
    o
}

#[test]
fn from_pod_to_a_local_pod_is_redirected_to_its_peer_with_router_headers() {
    let fx = Fixture::new();
    let in0 = fx.ifindex("in0");
    let target = fx.ifindex("out0");
    fx.endpoint("10.244.1.7".parse().expect("ip"), target);
    fx.endpoint("fd00:10:244:1::7".parse().expect("ip"), target);

    let f = frame4(
        "10.244.1.5".parse().expect("ip"),
        "10.244.1.7".parse().expect("ip"),
        64,
    );
    let (v, out) = fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_frame("ipv4 to local pod", &out, &routed4(&f, POD_MAC, VETH_MAC));
    assert_eq!(csum16(&out[14..34]), 0, "the IPv4 header checksum verifies");

    let f = frame6(
        "fd00:10:244:1::5".parse().expect("ip"),
        "fd00:10:244:1::7".parse().expect("ip"),
        64,
    );
    let (v, out) = fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_frame("ipv6 to local pod", &out, &routed6(&f, POD_MAC, VETH_MAC));
    assert_eq!(fx.metric("REASON_FORWARD_PEER"), 2);

    // The node program does the same for packets from the network.
    let f = frame4(
        "10.244.2.5".parse().expect("ip"),
        "10.244.1.7".parse().expect("ip"),
        63,
    );
    let (v, out) = fx.run(TcProgram::FromNetdev, &f, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_frame(
        "ipv4 from the network to local pod",
        &out,
        &routed4(&f, POD_MAC, VETH_MAC),
    );
}

#[test]
fn from_pod_to_a_remote_address_follows_the_fib() {
    let fx = Fixture::new();
    let in0 = fx.ifindex("in0");
    let out_mac = fx.mac("out0");

    // Neighbour known: MACs from the FIB, sent out of out0.
    let f = frame4(
        "10.1.0.5".parse().expect("ip"),
        "10.50.0.9".parse().expect("ip"),
        64,
    );
    let (v, out) = fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_frame("ipv4 via fib", &out, &routed4(&f, NEXTHOP_MAC, out_mac));
    let f = frame6(
        "fd01::5".parse().expect("ip"),
        "fd50::9".parse().expect("ip"),
        64,
    );
    let (v, out) = fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_frame("ipv6 via fib", &out, &routed6(&f, NEXTHOP_MAC, out_mac));
    assert_eq!(fx.metric("REASON_FORWARD_FIB"), 2);

    // Neighbour unknown: bpf_redirect_neigh resolves it; only the TTL changes here.
    let f = frame4(
        "10.1.0.5".parse().expect("ip"),
        "10.60.0.9".parse().expect("ip"),
        64,
    );
    let (v, out) = fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    let mut want = routed4(&f, GW_MAC, SRC_MAC);
    want[0..12].copy_from_slice(&f[0..12]);
    assert_frame("ipv4 via redirect_neigh", &out, &want);
    assert_eq!(fx.metric("REASON_FORWARD_NEIGH"), 1);

    // The node program never uses the FIB: non-pod traffic goes to the stack untouched.
    let f = frame4(
        "10.1.0.5".parse().expect("ip"),
        "10.50.0.9".parse().expect("ip"),
        64,
    );
    let (v, out) = fx.run(TcProgram::FromNetdev, &f, in0);
    assert_eq!(v, TC_ACT_OK, "verdict");
    assert_frame("from the network, not a pod", &out, &f);
}

#[test]
fn what_the_stack_must_handle_is_left_untouched() {
    let fx = Fixture::new();
    let in0 = fx.ifindex("in0");
    fx.endpoint("10.244.1.7".parse().expect("ip"), fx.ifindex("out0"));

    let cases: Vec<(&str, Vec<u8>, u32, &str)> = vec![
        (
            "for the node itself",
            frame4(
                "10.1.0.5".parse().expect("ip"),
                "10.2.0.1".parse().expect("ip"),
                64,
            ),
            TC_ACT_OK,
            "REASON_PASS_STACK",
        ),
        (
            "no route",
            frame4(
                "10.1.0.5".parse().expect("ip"),
                "192.0.2.1".parse().expect("ip"),
                64,
            ),
            TC_ACT_OK,
            "REASON_PASS_STACK",
        ),
        (
            "ttl expiring (the stack sends time exceeded)",
            frame4(
                "10.1.0.5".parse().expect("ip"),
                "10.244.1.7".parse().expect("ip"),
                1,
            ),
            TC_ACT_OK,
            "REASON_PASS_TTL",
        ),
        (
            "multicast",
            frame4(
                "10.1.0.5".parse().expect("ip"),
                "224.0.0.251".parse().expect("ip"),
                1,
            ),
            TC_ACT_OK,
            "REASON_PASS_NOT_IP",
        ),
        (
            "ipv6 link-local (neighbour discovery)",
            frame6(
                "fe80::5".parse().expect("ip"),
                "fe80::1".parse().expect("ip"),
                255,
            ),
            TC_ACT_OK,
            "REASON_PASS_NOT_IP",
        ),
    ];
    for (case, f, verdict, reason) in cases {
        let before = fx.metric(reason);
        let (v, out) = fx.run(TcProgram::FromPod, &f, in0);
        assert_eq!(v, verdict, "{case}: verdict");
        assert_frame(case, &out, &f);
        assert_eq!(fx.metric(reason), before + 1, "{case}: counted as {reason}");
    }

    // ARP goes to the stack.
    let mut arp = Vec::new();
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&SRC_MAC);
    arp.extend_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0u8; 28]);
    let (v, out) = fx.run(TcProgram::FromPod, &arp, in0);
    assert_eq!(v, TC_ACT_OK);
    assert_frame("arp", &out, &arp);

    // A malformed IPv4 header (IHL below 5) is dropped with a reason. (Frames shorter than
    // the headers they announce are refused by BPF_PROG_TEST_RUN itself.)
    let mut f = frame4(
        "10.1.0.5".parse().expect("ip"),
        "10.244.1.7".parse().expect("ip"),
        64,
    );
    f[14] = 0x44;
    let (v, _) = fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(v, TC_ACT_SHOT, "malformed: verdict");
    assert_eq!(fx.metric("DROP_INVALID_PACKET"), 1);
}

// ---- North-south load balancing: NodePort DNAT, SNAT for remote backends, reverse NAT ----

use weir_bpf::types::{lb4_backend, lb4_key, lb_service};

/// The checksum of an IPv4 TCP/UDP segment over its pseudo-header: 0 when valid.
fn l4_csum(frame: &[u8]) -> u16 {
    let ip = &frame[14..34];
    let l4 = &frame[34..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.push(0);
    pseudo.push(ip[9]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    csum16(&pseudo)
}

/// An IPv4 TCP frame with the given ports and flags, all checksums valid.
fn tcp4(src: (&str, u16), dst: (&str, u16), flags: u8) -> Vec<u8> {
    let mut f = frame4(src.0.parse().expect("ip"), dst.0.parse().expect("ip"), 64);
    f[34..36].copy_from_slice(&src.1.to_be_bytes());
    f[36..38].copy_from_slice(&dst.1.to_be_bytes());
    f[34 + 13] = flags;
    f[34 + 16] = 0;
    f[34 + 17] = 0;
    let c = l4_csum(&f);
    f[34 + 16..34 + 18].copy_from_slice(&c.to_be_bytes());
    assert_eq!(l4_csum(&f), 0);
    f
}

/// Ethernet + IPv4 headers for protocol `proto` carrying `l4` (IP checksum valid), the
/// ports of `src` and `dst` first.
fn ip4_with(src: (&str, u16), dst: (&str, u16), proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = frame4(src.0.parse().expect("ip"), dst.0.parse().expect("ip"), 64);
    f.truncate(34);
    f[14 + 9] = proto;
    f[14 + 2..14 + 4].copy_from_slice(&(20 + 4 + l4.len() as u16).to_be_bytes());
    f[14 + 10] = 0;
    f[14 + 11] = 0;
    let c = csum16(&f[14..34]);
    f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(l4);
    f
}

/// An IPv4 SCTP frame: the common header (ports, verification tag, a CRC32c no program
/// checks) and an INIT chunk (type 1, length 20, tag, a_rwnd, streams out/in, initial TSN).
fn sctp4(src: (&str, u16), dst: (&str, u16)) -> Vec<u8> {
    let mut l4 = vec![0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
    l4.extend_from_slice(&[1, 0, 0, 20, 0, 0, 0, 7, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]);
    ip4_with(src, dst, 132, &l4)
}

/// An IPv4 UDP frame (8-byte payload), all checksums valid.
fn udp4(src: (&str, u16), dst: (&str, u16)) -> Vec<u8> {
    let mut l4 = 16u16.to_be_bytes().to_vec();
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(b"ping\n\0\0\0");
    let mut f = ip4_with(src, dst, 17, &l4);
    let c = l4_csum(&f);
    f[40..42].copy_from_slice(&c.to_be_bytes());
    f
}

fn ip4_at(f: &[u8], off: usize) -> String {
    Ipv4Addr::new(f[off], f[off + 1], f[off + 2], f[off + 3]).to_string()
}

/// (source, destination) of an IPv4 TCP/UDP frame as `a.b.c.d:port`.
fn endpoints_of(f: &[u8]) -> (String, String) {
    (
        format!("{}:{}", ip4_at(f, 26), u16::from_be_bytes([f[34], f[35]])),
        format!("{}:{}", ip4_at(f, 30), u16::from_be_bytes([f[36], f[37]])),
    )
}

impl Fixture {
    /// A NodePort frontend (address 0, external scope) with one backend.
    fn node_port(&self, port: u16, proto: u8, svc_id: u32, backend: Option<(u32, &str, u16)>) {
        self.node_port_with(port, proto, svc_id, backend, 0)
    }

    /// Same, with master flags (WEIR_SVC_*).
    fn node_port_with(
        &self,
        port: u16,
        proto: u8,
        svc_id: u32,
        backend: Option<(u32, &str, u16)>,
        flags: u16,
    ) {
        let lb = weir_bpf::SockLb::load(&self.pins).expect("socket maps");
        let mut key = lb4_key {
            address: 0,
            dport: port.to_be(),
            proto,
            scope: 1,
            ..Default::default()
        };
        let master = lb_service {
            svc_id,
            count: backend.is_some() as u16,
            flags,
            ..Default::default()
        };
        if let Some((id, ip, bport)) = backend {
            let a: Ipv4Addr = ip.parse().expect("ip");
            lb.put(
                "weir_lb4_backends",
                &id,
                &lb4_backend {
                    address: u32::from_ne_bytes(a.octets()),
                    port: bport.to_be(),
                    proto,
                    ..Default::default()
                },
            )
            .expect("backend");
            key.slot = 1;
            lb.put(
                "weir_lb4_svc",
                &key,
                &lb_service {
                    backend_id: id,
                    svc_id,
                    ..Default::default()
                },
            )
            .expect("slot");
            key.slot = 0;
        }
        lb.put("weir_lb4_svc", &key, &master).expect("master");
    }

    fn node_setup(&self) {
        let k = |ip: &str| {
            let mut k = endpoint_key::default();
            let a: Ipv4Addr = ip.parse().expect("ip");
            k.addr[0] = u32::from_ne_bytes(a.octets());
            k.family = AF_INET;
            k
        };
        self.dp
            .set_node_addrs(&[k("10.1.0.1"), k("10.2.0.1")])
            .expect("node addrs");
        let a: Ipv4Addr = "10.2.0.1".parse().expect("ip");
        self.dp
            .set_config(&weir_bpf::datapath::node_config {
                snat4: u32::from_ne_bytes(a.octets()),
                snat_port_min: 61000,
                snat_port_max: 61010,
                ..Default::default()
            })
            .expect("config");
    }
}

#[test]
fn node_port_to_a_local_backend_keeps_the_client_address_and_replies_are_reversed() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    let veth = fx.ifindex("out0");
    fx.endpoint("10.244.1.7".parse().expect("ip"), veth);
    fx.node_port(30080, 6, 7, Some((3, "10.244.1.7", 8080)));

    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30080), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &syn, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(
        endpoints_of(&out),
        ("10.1.0.5:40000".into(), "10.244.1.7:8080".into())
    );
    assert_eq!(&out[0..6], &POD_MAC, "delivered to the pod");
    assert_eq!(out[22], 63, "ttl");
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(l4_csum(&out), 0, "tcp checksum");

    // The backend's SYN-ACK, leaving through the pod's veth: the NodePort is the source again.
    let synack = tcp4(("10.244.1.7", 8080), ("10.1.0.5", 40000), 0x12);
    let (v, out) = fx.run(TcProgram::FromPod, &synack, veth);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(
        endpoints_of(&out),
        ("10.1.0.1:30080".into(), "10.1.0.5:40000".into())
    );
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(l4_csum(&out), 0, "tcp checksum");

    // The client's ACK follows the same entry; the flow is established, on both entries.
    let ack = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30080), 0x10);
    let (v, out) = fx.run(TcProgram::FromNetdev, &ack, in0);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(endpoints_of(&out).1, "10.244.1.7:8080");
    let ct = fx.dp.ct_entries().expect("ct");
    assert_eq!(ct.len(), 2, "{ct:?}");
    for (_, e) in &ct {
        assert_ne!(e.flags & weir_bpf::datapath::CT_F_ESTABLISHED, 0, "{e:?}");
        let left = e.expires as i64 - weir_bpf::datapath::boot_seconds() as i64;
        assert!(
            (21590..=21600).contains(&left),
            "established lifetime: {left}"
        );
    }
    // A FIN moves the flow to the closing lifetime (10 s).
    let fin = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30080), 0x11);
    fx.run(TcProgram::FromNetdev, &fin, in0);
    for (_, e) in fx.dp.ct_entries().expect("ct") {
        let left = e.expires as i64 - weir_bpf::datapath::boot_seconds() as i64;
        assert!((0..=10).contains(&left), "closing lifetime: {left}");
    }
    // The collector removes entries once they expire.
    let removed = fx
        .dp
        .ct_gc(weir_bpf::datapath::boot_seconds() + 11, false)
        .expect("gc");
    assert_eq!(removed, 2);
}

#[test]
fn node_port_to_a_remote_backend_is_snated_and_replies_go_back_to_the_client() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    let out_mac = fx.mac("out0");
    fx.node_port(30081, 6, 8, Some((4, "10.50.0.9", 8080)));
    fx.node_port(30053, 17, 9, Some((5, "10.50.0.9", 5353)));

    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30081), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &syn, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    let (src, dst) = endpoints_of(&out);
    assert_eq!(dst, "10.50.0.9:8080");
    let snat_port: u16 = src
        .strip_prefix("10.2.0.1:")
        .expect(&src)
        .parse()
        .expect("port");
    assert!((61000..=61010).contains(&snat_port), "{src}");
    assert_eq!(&out[0..6], &NEXTHOP_MAC);
    assert_eq!(&out[6..12], &out_mac);
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(l4_csum(&out), 0, "tcp checksum");

    // The backend's reply arrives at the node's device, to the SNAT address and port.
    let synack = tcp4(("10.50.0.9", 8080), ("10.2.0.1", snat_port), 0x12);
    let (v, out) = fx.run(TcProgram::FromNetdev, &synack, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(
        endpoints_of(&out),
        ("10.1.0.1:30081".into(), "10.1.0.5:40000".into())
    );
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(l4_csum(&out), 0, "tcp checksum");
    // Another client port gets another SNAT port.
    let syn2 = tcp4(("10.1.0.5", 40001), ("10.1.0.1", 30081), 0x02);
    let (_, out2) = fx.run(TcProgram::FromNetdev, &syn2, in0);
    assert_ne!(endpoints_of(&out2).0, src);

    // UDP, checksums kept valid.
    let dgram = udp4(("10.1.0.5", 5000), ("10.1.0.1", 30053));
    let (v, out) = fx.run(TcProgram::FromNetdev, &dgram, in0);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(endpoints_of(&out).1, "10.50.0.9:5353");
    assert_eq!(l4_csum(&out), 0, "udp checksum");
}

/// Forwarding summaries (`CFG_TRACE`): a flow is reported on its first packet, on new TCP
/// flags and not in between, with the packets since; a translated flow names its addresses
/// before translation, in both directions; nothing is reported while the flag is off.
#[test]
fn forwarding_is_summarized_per_flow_with_its_translation() {
    use weir_bpf::events::{TRACE_F_NEW, TRACE_F_REPLY, TRACE_F_XLATE};
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    fx.node_port(30081, 6, 8, Some((4, "10.50.0.9", 8080)));
    let summaries = Summaries::reading(&fx);
    let take = || summaries.take();
    // Off: nothing.
    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30081), 0x02);
    fx.run(TcProgram::FromNetdev, &syn, in0);
    assert!(take().is_empty());
    Summaries::turn_on(&fx);

    let syn = tcp4(("10.1.0.5", 40002), ("10.1.0.1", 30081), 0x02);
    let (_, out) = fx.run(TcProgram::FromNetdev, &syn, in0);
    let snat = endpoints_of(&out).0;
    let got = take();
    assert_eq!(got.len(), 1, "{got:?}");
    let t = &got[0];
    assert_eq!(
        weir_bpf::datapath::reason_name(t.reason as u8),
        "REASON_FORWARD_FIB"
    );
    assert_eq!(
        (t.flags, t.packets, t.svc_id),
        (TRACE_F_NEW | TRACE_F_XLATE, 1, 8)
    );
    assert_eq!(
        (t.src.to_string(), t.dst.to_string()),
        (snat.clone(), "10.50.0.9:8080".into())
    );
    assert_eq!(
        t.orig,
        Some((
            "10.1.0.5:40002".parse().unwrap(),
            "10.1.0.1:30081".parse().unwrap()
        ))
    );
    assert_eq!((t.ifindex, t.proto, t.tcp_seen), (in0, 6, 0x02));

    // The reply: reverse-translated, reported as such.
    let port: u16 = snat.rsplit_once(':').unwrap().1.parse().unwrap();
    let synack = tcp4(("10.50.0.9", 8080), ("10.2.0.1", port), 0x12);
    fx.run(TcProgram::FromNetdev, &synack, in0);
    let got = take();
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(r.flags, TRACE_F_NEW | TRACE_F_XLATE | TRACE_F_REPLY);
    assert_eq!(r.src.to_string(), "10.1.0.1:30081");
    assert_eq!(
        r.orig,
        Some(("10.50.0.9:8080".parse().unwrap(), snat.parse().unwrap()))
    );

    // ACK and data: nothing new. FIN: a summary with the three packets since the SYN's.
    for flags in [0x10, 0x18] {
        let p = tcp4(("10.1.0.5", 40002), ("10.1.0.1", 30081), flags);
        fx.run(TcProgram::FromNetdev, &p, in0);
    }
    assert!(
        take().is_empty(),
        "no summary for packets without new flags"
    );
    let fin = tcp4(("10.1.0.5", 40002), ("10.1.0.1", 30081), 0x11);
    fx.run(TcProgram::FromNetdev, &fin, in0);
    let got = take();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].flags, got[0].packets, got[0].tcp_seen),
        (TRACE_F_XLATE, 3, 0x03)
    );
    assert_eq!(got[0].bytes, 3 * fin.len() as u64);
    assert!(fx.dp.traces_lost().expect("lost").is_empty());
}

/// Forwarding summaries turned on in a fixture, and what its rings hold.
struct Summaries {
    events: libbpf_rs::RingBuffer<'static>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<weir_bpf::events::TraceEvent>>>,
}

impl Summaries {
    /// Summaries turned on, and read.
    fn on(fx: &Fixture) -> Summaries {
        Summaries::turn_on(fx);
        Summaries::reading(fx)
    }

    fn turn_on(fx: &Fixture) {
        let mut cfg = fx.dp.config().expect("config");
        cfg.flags |= weir_bpf::datapath::CFG_TRACE;
        fx.dp.set_config(&cfg).expect("config");
    }

    /// A reader of the summaries, which stay off if they were.
    fn reading(fx: &Fixture) -> Summaries {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let events = fx
            .dp
            .trace_events(move |e| s2.lock().unwrap().push(e))
            .expect("trace events");
        Summaries { events, seen }
    }

    /// The summaries reported since the last call, by time (a summary goes into the ring
    /// of the CPU that wrote it, and the rings are read one after the other).
    fn take(&self) -> Vec<weir_bpf::events::TraceEvent> {
        self.events.consume().expect("consume");
        let mut got = std::mem::take(&mut *self.seen.lock().unwrap());
        got.sort_by_key(|e| e.ts);
        got
    }
}

/// The set of `weir_trace_flows` an IPv4 TCP flow's records are in: trace.h's trace_set_of
/// (murmur3's 64-bit finaliser over the two addresses added, as the program loads them, and
/// the protocol above them; then the two ports added).
fn trace_set_of(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> u64 {
    fn hash64(mut k: u64) -> u64 {
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51afd7ed558ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ceb9fe1a85ec53);
        k ^ (k >> 33)
    }
    let addr = |a: Ipv4Addr| u64::from(u32::from_ne_bytes(a.octets()));
    let base = hash64(addr(src.0) + addr(dst.0) + (6 << 48));
    base.wrapping_add(u64::from(src.1) + u64::from(dst.1)) & (4096 - 1)
}

/// The client pod 10.244.1.5 at in0 and the server pod 10.244.1.7 at out0: their devices'
/// indexes (in0, out0).
fn client_and_server(fx: &Fixture) -> (u32, u32) {
    let (in0, out0) = (fx.ifindex("in0"), fx.ifindex("out0"));
    fx.endpoint("10.244.1.7".parse().expect("ip"), out0);
    fx.endpoint("10.244.1.5".parse().expect("ip"), in0);
    (in0, out0)
}

/// A summary's key takes the ports of TCP and UDP (and TCP's flags), read from the header in
/// place; other protocols' are 0 whatever their header holds.
#[test]
fn summaries_key_tcp_and_udp_flows_by_their_ports_and_others_without() {
    let fx = Fixture::new();
    let (in0, _) = client_and_server(&fx);
    let summaries = Summaries::on(&fx);
    let (client, server) = (("10.244.1.5", 40000), ("10.244.1.7", 5353));
    for frame in [
        tcp4(client, server, 0x02),
        udp4(client, server),
        sctp4(client, server),
    ] {
        let (v, _) = fx.run(TcProgram::FromPod, &frame, in0);
        assert_eq!(v, TC_ACT_REDIRECT);
    }
    let got: Vec<(u8, u16, u16, u8)> = summaries
        .take()
        .iter()
        .map(|e| (e.proto, e.src.port(), e.dst.port(), e.tcp_flags))
        .collect();
    assert_eq!(
        got,
        [(6, 40000, 5353, 0x02), (17, 40000, 5353, 0), (132, 0, 0, 0)]
    );
}

/// The flow table is set-associative (four records a set, a connection's both ways in one):
/// a flow whose set is full takes the record of a connection that ended before that of a live
/// one, and one with nothing unreported before one with packets pending; a TCP flow that lost
/// its record is reported again on its next packet, but not as new (only a SYN starts a
/// connection).
#[test]
fn the_flow_table_keeps_live_flows_over_ended_ones() {
    use weir_bpf::events::TRACE_F_NEW;
    let fx = Fixture::new();
    let (in0, out0) = client_and_server(&fx);
    let summaries = Summaries::on(&fx);
    let take = || summaries.take();
    let (client, server) = ("10.244.1.5", "10.244.1.7");
    let send = |port: u16, flags: u8| {
        let (v, _) = fx.run(
            TcProgram::FromPod,
            &tcp4((client, port), (server, 8080), flags),
            in0,
        );
        assert_eq!(v, TC_ACT_REDIRECT);
    };
    let ip = |a: &str| a.parse::<Ipv4Addr>().expect("ip");
    let set = |port| trace_set_of((ip(client), port), (ip(server), 8080));
    let mates: Vec<u16> = (40001..=u16::MAX)
        .filter(|&p| set(p) == set(40000))
        .take(4)
        .collect();
    assert_eq!(mates.len(), 4, "flows sharing the set of port 40000");
    // The long-lived flow.
    send(40000, 0x02);
    assert_eq!(take().len(), 1);
    // A short connection in the same set: reported at its SYN and its RST.
    send(mates[0], 0x02);
    send(mates[0], 0x14);
    assert_eq!(take().len(), 2);
    // Two more live flows fill the set; the next takes the ended connection's record, not a
    // live flow's.
    send(mates[1], 0x02);
    send(mates[2], 0x02);
    send(mates[3], 0x02);
    assert_eq!(take().len(), 3);
    for p in [40000, mates[1], mates[2]] {
        send(p, 0x10);
    }
    assert!(take().is_empty(), "the live flows kept their records");
    // Four live flows fill the set, all but mates[3] with a packet unreported. The server's
    // answer to port 40000 (the other way, at the server's device) is a fifth flow in the
    // same set: it takes the record with nothing unreported (mates[3]'s), and the others keep
    // theirs.
    let (v, _) = fx.run(
        TcProgram::FromPod,
        &tcp4((server, 8080), (client, 40000), 0x12),
        out0,
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let got = take();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].src.port(), got[0].ifindex), (8080, out0));
    for p in [40000, mates[1], mates[2]] {
        send(p, 0x10);
    }
    assert!(take().is_empty(), "the live flows kept their records");
    // The flow that lost its record is reported again at its next packet, not as new.
    send(mates[3], 0x10);
    let got = take();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].src.port(), mates[3]);
    assert_eq!((got[0].flags & TRACE_F_NEW, got[0].packets), (0, 1));
    assert!(fx.dp.traces_lost().expect("lost").is_empty());
}

/// Sets the time of the last summary of flow `src` -> `dst` (IPv4 TCP) back by `by` ticks of
/// the flow table's clock, in its record (64 bytes: the source port at 32, the family at 40,
/// the time at 56).
fn age_flow(fx: &Fixture, src: (&str, u16), dst: (&str, u16), by: u32) {
    use libbpf_rs::{MapCore, MapFlags};
    let ip = |a: &str| a.parse::<Ipv4Addr>().expect("ip");
    let set = trace_set_of((ip(src.0), src.1), (ip(dst.0), dst.1)) as u32;
    let flows = libbpf_rs::MapHandle::from_pinned_path(fx.pins.join("tc").join("weir_trace_flows"))
        .expect("pinned flow table");
    let mut value = flows
        .lookup(&set.to_ne_bytes(), MapFlags::ANY)
        .expect("lookup")
        .expect("the set");
    let rec = value
        .chunks_mut(64)
        .find(|r| r[40] != 0 && u16::from_be_bytes([r[32], r[33]]) == src.1)
        .expect("the flow's record");
    let last = u32::from_ne_bytes(rec[56..60].try_into().unwrap()).wrapping_sub(by);
    rec[56..60].copy_from_slice(&last.to_ne_bytes());
    flows
        .update(&set.to_ne_bytes(), &value, MapFlags::ANY)
        .expect("update");
}

/// A flow with nothing new is summarized again once TRACE_INTERVAL_NS has passed since its
/// last summary, with the packets since (its record's clock set back past the interval).
#[test]
fn a_flow_is_summarized_again_once_its_interval_has_passed() {
    summarized_again_once_the_interval_has_passed();
}

/// The same where the system has no kernel config to give the programs CONFIG_HZ (an empty
/// one, /dev/null, where /proc/config.gz and /boot/config-RELEASE are, in a private mount
/// namespace): the flow table keeps time by the coarse clock.
#[test]
fn without_a_kernel_config_the_flow_table_keeps_time_by_the_coarse_clock() {
    const NAME: &str = "without_a_kernel_config_the_flow_table_keeps_time_by_the_coarse_clock";
    if private_mounts::reexec_in_private_mount_ns(NAME) {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
    for config in [
        "/proc/config.gz".to_string(),
        format!("/boot/config-{}", release.trim()),
    ] {
        if std::path::Path::new(&config).exists() {
            nix::mount::mount(
                Some("/dev/null"),
                config.as_str(),
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("hiding the kernel config");
        }
    }
    summarized_again_once_the_interval_has_passed();
}

fn summarized_again_once_the_interval_has_passed() {
    use weir_bpf::events::TRACE_F_NEW;
    let fx = Fixture::new();
    let (in0, _) = client_and_server(&fx);
    let summaries = Summaries::on(&fx);
    let (client, server) = (("10.244.1.5", 40000), ("10.244.1.7", 8080));
    let send = |flags: u8| {
        let (v, _) = fx.run(TcProgram::FromPod, &tcp4(client, server, flags), in0);
        assert_eq!(v, TC_ACT_REDIRECT);
    };
    send(0x02);
    assert_eq!(summaries.take().len(), 1);
    send(0x10);
    send(0x10);
    assert!(
        summaries.take().is_empty(),
        "nothing new within the interval"
    );
    // Far past the interval in any of the clock's units (jiffies, or 2^20 ns).
    age_flow(&fx, client, server, 1 << 20);
    send(0x10);
    let got = summaries.take();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].packets, got[0].flags & TRACE_F_NEW), (3, 0));
    send(0x10);
    assert!(summaries.take().is_empty(), "the interval starts again");
}

/// A connection's two directions search their set from opposite ends, so that each finds its
/// own record first: the client's SYN and the server's SYN-ACK, in an empty set, take its
/// first and last records (which one takes which depends on the ends' hashes).
#[test]
fn a_connections_two_directions_take_opposite_ends_of_their_set() {
    let fx = Fixture::new();
    let (in0, out0) = client_and_server(&fx);
    Summaries::turn_on(&fx);
    let (client, server) = (("10.244.1.5", 40000), ("10.244.1.7", 8080));
    for (pkt, dev) in [
        (tcp4(client, server, 0x02), in0),
        (tcp4(server, client, 0x12), out0),
    ] {
        assert_eq!(fx.run(TcProgram::FromPod, &pkt, dev).0, TC_ACT_REDIRECT);
    }
    let ip = |a: &str| a.parse::<Ipv4Addr>().expect("ip");
    let set = trace_set_of((ip(client.0), client.1), (ip(server.0), server.1)) as u32;
    let flows = libbpf_rs::MapHandle::from_pinned_path(fx.pins.join("tc").join("weir_trace_flows"))
        .expect("pinned flow table");
    let value = libbpf_rs::MapCore::lookup(&flows, &set.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
        .expect("lookup")
        .expect("the set");
    // Per record (64 bytes): the source port at 32 (network order), the family at 40.
    let sports: Vec<Option<u16>> = value
        .chunks(64)
        .map(|r| (r[40] != 0).then(|| u16::from_be_bytes([r[32], r[33]])))
        .collect();
    assert!(
        sports == [Some(40000), None, None, Some(8080)]
            || sports == [Some(8080), None, None, Some(40000)],
        "the records of set {set}: {sports:?}"
    );
}

/// Each CPU writes its summaries into the ring of its number modulo the rings' count, and
/// a reader of them all sees those of every CPU.
#[test]
fn each_cpu_writes_its_summaries_into_its_own_ring() {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    use weir_bpf::datapath::TRACE_RINGS;
    let fx = Fixture::new();
    let in0 = fx.ifindex("in0");
    fx.endpoint("10.244.1.7".parse().expect("ip"), fx.ifindex("out0"));
    Summaries::turn_on(&fx);
    let allowed = sched_getaffinity(Pid::from_raw(0)).expect("affinity");
    /// Puts the test thread back on the CPUs it had.
    struct Restore(CpuSet);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = sched_setaffinity(Pid::from_raw(0), &self.0);
        }
    }
    let _restore = Restore(allowed);
    // One CPU for each ring there are CPUs for.
    let cpus: Vec<usize> = (0..TRACE_RINGS.len())
        .filter_map(|ring| {
            (0..CpuSet::count())
                .find(|&c| c % TRACE_RINGS.len() == ring && allowed.is_set(c).unwrap_or(false))
        })
        .collect();
    assert!(cpus.len() >= 2, "two CPUs at least: {cpus:?}");
    for &cpu in &cpus {
        let mut one = CpuSet::new();
        one.set(cpu).expect("cpu");
        sched_setaffinity(Pid::from_raw(0), &one).expect("pin");
        // fx.run's thread (made now) inherits the mask: the program runs on `cpu`.
        let syn = tcp4(
            ("10.244.1.5", 41000 + cpu as u16),
            ("10.244.1.7", 8080),
            0x02,
        );
        let (v, _) = fx.run(TcProgram::FromPod, &syn, in0);
        assert_eq!(v, TC_ACT_REDIRECT);
    }
    // Each ring read on its own: (ring, client port) of what it holds.
    let maps: Vec<libbpf_rs::MapHandle> = TRACE_RINGS
        .iter()
        .map(|name| libbpf_rs::MapHandle::from_pinned_path(fx.pins.join("tc").join(name)))
        .collect::<Result<_, _>>()
        .expect("pinned rings");
    let held = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let mut b = libbpf_rs::RingBufferBuilder::new();
    for (ring, map) in maps.iter().enumerate() {
        let held = held.clone();
        b.add(map, move |d: &[u8]| {
            let e = weir_bpf::events::TraceEvent::decode(d).expect("a summary");
            held.borrow_mut().push((ring, e.src.port()));
            0
        })
        .expect("ring");
    }
    b.build().expect("reader").consume().expect("consume");
    let mut got = held.borrow().clone();
    got.sort();
    let want: Vec<(usize, u16)> = cpus
        .iter()
        .map(|&c| (c % TRACE_RINGS.len(), 41000 + c as u16))
        .collect();
    assert_eq!(
        got, want,
        "the summary of each of CPUs {cpus:?} in its ring"
    );
}

/// Whether a new flow from client port `port` gets a SNAT port (else the NodePort drops it).
fn snat_flow(fx: &Fixture, in0: u32, port: u16) -> Option<u16> {
    let syn = tcp4(("10.1.0.5", port), ("10.1.0.1", 30081), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &syn, in0);
    (v == TC_ACT_REDIRECT).then(|| {
        let (src, _) = endpoints_of(&out);
        src.rsplit_once(':').unwrap().1.parse().unwrap()
    })
}

#[test]
fn a_snat_port_stays_with_a_flow_the_backend_closed_for_its_time_wait() {
    let fx = Fixture::new();
    fx.node_setup();
    // One SNAT port, so reuse is visible.
    let a: Ipv4Addr = "10.2.0.1".parse().expect("ip");
    fx.dp
        .set_config(&weir_bpf::datapath::node_config {
            snat4: u32::from_ne_bytes(a.octets()),
            snat_port_min: 61000,
            snat_port_max: 61000,
            ..Default::default()
        })
        .expect("config");
    let in0 = fx.ifindex("in0");
    fx.node_port(30081, 6, 8, Some((4, "10.50.0.9", 8080)));
    let lifetimes = |fx: &Fixture| -> Vec<i64> {
        fx.dp
            .ct_entries()
            .expect("ct")
            .iter()
            .map(|(_, e)| e.expires as i64 - weir_bpf::datapath::boot_seconds() as i64)
            .collect()
    };

    // The backend closes first (its FIN before the client's): it holds TIME_WAIT for the
    // tuple (node:61000 -> backend), so the port stays taken for 60 s.
    let p = snat_flow(&fx, in0, 41000).expect("a port");
    let from_backend = |flags: u8| tcp4(("10.50.0.9", 8080), ("10.2.0.1", p), flags);
    fx.run(TcProgram::FromNetdev, &from_backend(0x12), in0);
    fx.run(
        TcProgram::FromNetdev,
        &tcp4(("10.1.0.5", 41000), ("10.1.0.1", 30081), 0x10),
        in0,
    );
    fx.run(TcProgram::FromNetdev, &from_backend(0x11), in0);
    fx.run(
        TcProgram::FromNetdev,
        &tcp4(("10.1.0.5", 41000), ("10.1.0.1", 30081), 0x11),
        in0,
    );
    for left in lifetimes(&fx) {
        assert!((50..=60).contains(&left), "TIME_WAIT lifetime: {left}");
    }
    for e in fx.dp.ct_entries().expect("ct").iter().map(|(_, e)| e.flags) {
        assert_ne!(e & weir_bpf::datapath::CT_F_TIME_WAIT, 0);
    }
    assert_eq!(
        snat_flow(&fx, in0, 41001),
        None,
        "the port is still the old flow's"
    );
    assert_eq!(fx.metric("DROP_NAT_NO_PORT"), 1);

    // The client closes first (it keeps TIME_WAIT, the backend does not): 10 s, and the
    // port is free 2 s after the close, as after a RST.
    fx.dp.ct_gc(0, true).expect("flush");
    let p = snat_flow(&fx, in0, 41002).expect("a port");
    let from_backend = |flags: u8| tcp4(("10.50.0.9", 8080), ("10.2.0.1", p), flags);
    fx.run(TcProgram::FromNetdev, &from_backend(0x12), in0);
    fx.run(
        TcProgram::FromNetdev,
        &tcp4(("10.1.0.5", 41002), ("10.1.0.1", 30081), 0x11),
        in0,
    );
    fx.run(TcProgram::FromNetdev, &from_backend(0x11), in0);
    for left in lifetimes(&fx) {
        assert!((0..=10).contains(&left), "closing lifetime: {left}");
    }
    std::thread::sleep(std::time::Duration::from_millis(2600));
    assert_eq!(
        snat_flow(&fx, in0, 41003),
        Some(61000),
        "taken over 2 s after the close"
    );
}

#[test]
fn node_port_without_backends_is_dropped_with_a_reason_and_other_ports_pass() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    fx.node_port(30090, 6, 10, None);
    let drops = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let d2 = drops.clone();
    let events = fx
        .dp
        .drop_events(move |e| d2.lock().unwrap().push(e.clone()))
        .expect("drop events");
    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30090), 0x02);
    let (v, _) = fx.run(TcProgram::FromNetdev, &syn, in0);
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(fx.metric("DROP_NO_SERVICE_BACKEND"), 1);
    // The drop is reported, with the packet's addresses and the device.
    events.consume().expect("consume");
    let drops = drops.lock().unwrap();
    assert_eq!(drops.len(), 1, "{drops:?}");
    let d = &drops[0];
    assert_eq!(
        weir_bpf::datapath::reason_name(d.reason as u8),
        "DROP_NO_SERVICE_BACKEND"
    );
    assert_eq!(d.src, Some("10.1.0.5:40000".parse().unwrap()));
    assert_eq!(d.dst, Some("10.1.0.1:30090".parse().unwrap()));
    assert_eq!((d.proto, d.ifindex), (6, in0));
    assert!(fx.dp.drops_lost().expect("lost").is_empty());
    // Not a NodePort: the node's own traffic goes to its stack untouched.
    let ssh = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 22), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &ssh, in0);
    assert_eq!(v, TC_ACT_OK);
    assert_frame("not a node port", &out, &ssh);
    assert!(fx.dp.ct_entries().expect("ct").is_empty());
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    fx.endpoint("10.244.1.7".parse().expect("ip"), fx.ifindex("out0"));
    // A LoadBalancer IP frontend (external scope) allowing 10.1.0.0/28 only.
    let lb = weir_bpf::SockLb::load(&fx.pins).expect("socket maps");
    let vip: Ipv4Addr = "198.51.100.7".parse().expect("ip");
    let be: Ipv4Addr = "10.244.1.7".parse().expect("ip");
    lb.put(
        "weir_lb4_backends",
        &9u32,
        &lb4_backend {
            address: u32::from_ne_bytes(be.octets()),
            port: 8080u16.to_be(),
            proto: 6,
            ..Default::default()
        },
    )
    .expect("backend");
    let mut key = lb4_key {
        address: u32::from_ne_bytes(vip.octets()),
        dport: 80u16.to_be(),
        proto: 6,
        scope: 1,
        slot: 1,
        ..Default::default()
    };
    lb.put(
        "weir_lb4_svc",
        &key,
        &lb_service {
            backend_id: 9,
            svc_id: 11,
            ..Default::default()
        },
    )
    .expect("slot");
    let net: Ipv4Addr = "10.1.0.0".parse().expect("ip");
    lb.put(
        "weir_lb4_src_range",
        &weir_bpf::types::lb4_src_range_key {
            prefixlen: 32 + 28,
            svc_id: 11,
            addr: u32::from_ne_bytes(net.octets()),
        },
        &1u8,
    )
    .expect("range");
    key.slot = 0;
    lb.put(
        "weir_lb4_svc",
        &key,
        &lb_service {
            svc_id: 11,
            count: 1,
            flags: 4,
            ..Default::default()
        },
    )
    .expect("master");

    let inside = tcp4(("10.1.0.5", 40000), ("198.51.100.7", 80), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &inside, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "a client in the range");
    assert_eq!(endpoints_of(&out).1, "10.244.1.7:8080");
    let outside = tcp4(("10.1.0.20", 40000), ("198.51.100.7", 80), 0x02);
    let (v, _) = fx.run(TcProgram::FromNetdev, &outside, in0);
    assert_eq!(v, TC_ACT_SHOT, "a client outside the range");
    assert_eq!(fx.metric("DROP_SOURCE_RANGE"), 1);
}

#[test]
fn explain_mode_translates_but_writes_and_counts_nothing() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    fx.node_port(30081, 6, 8, Some((4, "10.50.0.9", 8080)));
    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30081), 0x02);
    let r = fx.explain(TcProgram::FromNetdev, &syn, in0);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        r.reason.map(weir_bpf::datapath::reason_name).as_deref(),
        Some("REASON_FORWARD_FIB")
    );
    assert_eq!(
        endpoints_of(&r.packet),
        ("10.2.0.1:61000".into(), "10.50.0.9:8080".into()),
        "the first SNAT port of the range, shown not taken"
    );
    assert!(
        fx.dp.ct_entries().expect("ct").is_empty(),
        "no conntrack entry"
    );
    assert!(
        fx.dp.metrics().expect("metrics").is_empty(),
        "no counter moved"
    );
}

/// An outer IPv4 header (IPIP) around `inner` (an Ethernet frame), as DSR sends it.
fn ipip(inner: &[u8], src: &str, dst: &str, id: u16) -> Vec<u8> {
    let mut f = inner[..14].to_vec();
    let len = (inner.len() - 14 + 20) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 4, 0, 0];
    ip[2..4].copy_from_slice(&len.to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip.extend_from_slice(&src.parse::<Ipv4Addr>().expect("ip").octets());
    ip.extend_from_slice(&dst.parse::<Ipv4Addr>().expect("ip").octets());
    let c = csum16(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&inner[14..]);
    f
}

/// A node with a DSR NodePort (30082) whose backend is behind 10.2.0.2; (fixture, the node
/// device, a pod's device).
fn dsr_node() -> (Fixture, u32, u32) {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    let veth = fx.ifindex("out0");
    fx.node_port_with(30082, 6, 12, Some((6, "10.50.0.9", 8080)), 8);
    (fx, in0, veth)
}

/// On the backend's node, the summary of a DSR flow decapsulated for a local pod names the
/// frontend the client asked for (from the reply entry DSR made), though nothing was
/// translated there.
#[test]
fn a_dsr_flows_summary_on_the_backends_node_names_its_frontend() {
    use weir_bpf::events::TRACE_F_XLATE;
    let (fx, in0, veth) = dsr_node();
    fx.endpoint("10.244.1.7".parse().expect("ip"), veth);
    let summaries = Summaries::on(&fx);
    let to_pod = tcp4(("10.1.0.5", 40001), ("10.244.1.7", 8080), 0x02);
    let (v, _) = fx.run(
        TcProgram::FromNetdev,
        &ipip(&to_pod, "10.1.0.1", "10.2.0.1", 30082),
        in0,
    );
    assert_eq!(v, TC_ACT_REDIRECT, "delivered");
    let got = summaries.take();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].flags & TRACE_F_XLATE, TRACE_F_XLATE, "{got:?}");
    assert_eq!(
        got[0].orig,
        Some((
            "10.1.0.5:40001".parse().unwrap(),
            "10.1.0.1:30082".parse().unwrap()
        ))
    );
}

#[test]
fn dsr_tunnels_to_the_backends_node_which_answers_the_client_directly() {
    // The receiving node: a DSR NodePort whose backend is behind 10.2.0.2.
    let (fx, in0, veth) = dsr_node();
    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30082), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &syn, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    // Outer header: from the frontend address to the backend's node, the frontend port as
    // the identification, DF, valid checksum; inner: DNATed, client address kept.
    let outer = &out[14..34];
    assert_eq!(outer[9], 4, "IPIP");
    assert_eq!(ip4_at(&out, 26), "10.1.0.1");
    assert_eq!(ip4_at(&out, 30), "10.2.0.2");
    assert_eq!(u16::from_be_bytes([outer[4], outer[5]]), 30082);
    assert_eq!(outer[6] & 0x40, 0x40, "DF");
    assert_eq!(csum16(outer), 0, "outer checksum");
    assert_eq!(
        u16::from_be_bytes([outer[2], outer[3]]) as usize,
        out.len() - 14
    );
    let inner: Vec<u8> = [&out[..14], &out[34..]].concat();
    assert_eq!(
        endpoints_of(&inner),
        ("10.1.0.5:40000".into(), "10.50.0.9:8080".into())
    );
    assert_eq!(csum16(&inner[14..34]), 0, "inner ip checksum");
    assert_eq!(l4_csum(&inner), 0, "inner tcp checksum");
    let ct = fx.dp.ct_entries().expect("ct");
    assert_eq!(
        ct.len(),
        1,
        "only the original entry on the receiving node: {ct:?}"
    );
    assert_ne!(ct[0].1.flags & weir_bpf::datapath::CT_F_DSR, 0);

    // The backend's node (here the same namespace, 10.2.0.1): the tunnelled packet for a
    // local pod is decapsulated and delivered, and the reply entry is made from the header.
    fx.endpoint("10.244.1.7".parse().expect("ip"), veth);
    let to_pod = tcp4(("10.1.0.5", 40001), ("10.244.1.7", 8080), 0x02);
    let tunnelled = ipip(&to_pod, "10.1.0.1", "10.2.0.1", 30082);
    let (v, out) = fx.run(TcProgram::FromNetdev, &tunnelled, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "delivered");
    assert_eq!(out.len(), to_pod.len(), "outer header gone");
    assert_eq!(&out[0..6], &POD_MAC);
    assert_eq!(
        endpoints_of(&out),
        ("10.1.0.5:40001".into(), "10.244.1.7:8080".into())
    );
    // The pod's reply leaves with the frontend as its source, straight to the client.
    let synack = tcp4(("10.244.1.7", 8080), ("10.1.0.5", 40001), 0x12);
    let (v, out) = fx.run(TcProgram::FromPod, &synack, veth);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        endpoints_of(&out),
        ("10.1.0.1:30082".into(), "10.1.0.5:40001".into())
    );
    assert_eq!(l4_csum(&out), 0, "tcp checksum");
    // With masquerading on, a UDP flow from outside keeps DSR's reply entry: the answer
    // still comes from the frontend.
    fx.dp
        .set_nomasq_cidrs(&[("10.244.0.0".parse().expect("ip"), 16)])
        .expect("nomasq");
    fx.dp
        .set_config(&weir_bpf::datapath::node_config {
            snat4: u32::from_ne_bytes([10, 2, 0, 1]),
            snat_port_min: 61000,
            snat_port_max: 61010,
            flags: weir_bpf::datapath::CFG_MASQUERADE,
            ..Default::default()
        })
        .expect("config");
    let q = udp4(("10.1.0.5", 5000), ("10.244.1.7", 5353));
    let (v, _) = fx.run(
        TcProgram::FromNetdev,
        &ipip(&q, "10.1.0.1", "10.2.0.1", 30053),
        in0,
    );
    assert_eq!(v, TC_ACT_REDIRECT, "delivered");
    let (_, out) = fx.run(
        TcProgram::FromPod,
        &udp4(("10.244.1.7", 5353), ("10.1.0.5", 5000)),
        veth,
    );
    assert_eq!(
        endpoints_of(&out),
        ("10.1.0.1:30053".into(), "10.1.0.5:5000".into())
    );
    // IPIP for something that is not a local pod is left to the stack untouched.
    let other = ipip(
        &tcp4(("10.1.0.5", 1), ("10.9.9.9", 2), 0x02),
        "10.1.0.1",
        "10.2.0.1",
        1,
    );
    let (v, out) = fx.run(TcProgram::FromNetdev, &other, in0);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(out, other);
}

/// Drain (`CFG_DRAIN`, under a netfilter dataplane after a switch): the programs still carry
/// the DSR flows established before, and hand every other packet to the host stack untouched
/// (a NodePort's new flow, a local pod's traffic, to_pod's policy).
#[test]
fn drain_mode_carries_dsr_flows_alone() {
    use weir_bpf::datapath::{CFG_DRAIN, CT_F_CLOSING, CT_F_DSR};
    let (fx, in0, veth) = dsr_node();
    fx.endpoint("10.244.1.7".parse().expect("ip"), veth);
    // Flows established before the switch: one through this node as the frontend, one
    // tunnelled to it as the backend's node.
    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30082), 0x02);
    assert_eq!(fx.run(TcProgram::FromNetdev, &syn, in0).0, TC_ACT_REDIRECT);
    let to_pod = tcp4(("10.1.0.5", 40001), ("10.244.1.7", 8080), 0x02);
    let tunnelled = ipip(&to_pod, "10.1.0.1", "10.2.0.1", 30082);
    assert_eq!(
        fx.run(TcProgram::FromNetdev, &tunnelled, in0).0,
        TC_ACT_REDIRECT
    );
    let mut cfg = fx.dp.config().expect("config");
    cfg.flags |= CFG_DRAIN;
    fx.dp.set_config(&cfg).expect("config");
    let now = weir_bpf::datapath::boot_seconds();
    assert_eq!(fx.dp.dsr_flows_open(now).expect("count"), 2);

    // The established flows: tunnelled, decapsulated, answered from the frontend.
    let ack = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30082), 0x10);
    let (v, out) = fx.run(TcProgram::FromNetdev, &ack, in0);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(out[14 + 9], 4, "IPIP");
    let ack = ipip(
        &tcp4(("10.1.0.5", 40001), ("10.244.1.7", 8080), 0x10),
        "10.1.0.1",
        "10.2.0.1",
        30082,
    );
    let (v, out) = fx.run(TcProgram::FromNetdev, &ack, in0);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(out.len(), to_pod.len(), "decapsulated");
    let reply = tcp4(("10.244.1.7", 8080), ("10.1.0.5", 40001), 0x10);
    let (v, out) = fx.run(TcProgram::FromPod, &reply, veth);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        endpoints_of(&out),
        ("10.1.0.1:30082".into(), "10.1.0.5:40001".into())
    );

    // Everything else is the stack's, untouched: a new flow to the NodePort, a pod's own
    // traffic, what the stack delivers to a pod; and no new entry.
    let before = fx.dp.ct_entries().expect("ct").len();
    for (prog, pkt, dev) in [
        (
            TcProgram::FromNetdev,
            tcp4(("10.1.0.5", 40002), ("10.1.0.1", 30082), 0x02),
            in0,
        ),
        (
            TcProgram::FromPod,
            tcp4(("10.244.1.7", 1234), ("10.9.9.9", 80), 0x02),
            veth,
        ),
        (
            TcProgram::ToPod,
            tcp4(("10.9.9.9", 80), ("10.244.1.7", 1234), 0x12),
            veth,
        ),
    ] {
        let (v, out) = fx.run(prog, &pkt, dev);
        assert_eq!(v, TC_ACT_OK, "{prog:?}");
        assert_eq!(out, pkt, "{prog:?}");
    }
    assert_eq!(fx.dp.ct_entries().expect("ct").len(), before);

    // A switch back to eBPF keeps the DSR entries when it clears the rest; closing flows
    // are no longer waited for.
    fx.dp.ct_flush_but_dsr(now).expect("flush");
    let left = fx.dp.ct_entries().expect("ct");
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|(_, e)| e.flags & CT_F_DSR != 0));
    let fin = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30082), 0x11);
    assert_eq!(fx.run(TcProgram::FromNetdev, &fin, in0).0, TC_ACT_REDIRECT);
    assert_eq!(fx.dp.dsr_flows_open(now).expect("count"), 1);
    let e = fx.dp.ct_entries().expect("ct");
    assert!(e.iter().any(|(_, e)| e.flags & CT_F_CLOSING != 0));
}

#[test]
fn vxlan_mode_sends_other_nodes_pods_through_the_tunnel_device() {
    let fx = Fixture::new();
    let in0 = fx.ifindex("in0");
    let tun = fx.ifindex("out0");
    let a: Ipv4Addr = "10.2.0.1".parse().expect("ip");
    fx.dp
        .set_config(&weir_bpf::datapath::node_config {
            snat4: u32::from_ne_bytes(a.octets()),
            snat_port_min: 61000,
            snat_port_max: 61010,
            flags: weir_bpf::datapath::CFG_VXLAN,
            tunnel_ifindex: tun,
        })
        .expect("config");
    fx.dp
        .set_tunnel_routes(&[(
            "10.244.2.0".parse().expect("ip"),
            24,
            "10.2.0.2".parse().expect("ip"),
        )])
        .expect("routes");
    let f = frame4(
        "10.244.1.5".parse().expect("ip"),
        "10.244.2.9".parse().expect("ip"),
        64,
    );
    let (v, out) = fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(out[22], 63, "ttl");
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(fx.metric("REASON_FORWARD_TUNNEL"), 1);
    // Outside every pod CIDR of the tunnel map: the FIB as usual.
    let f = frame4(
        "10.244.1.5".parse().expect("ip"),
        "10.50.0.9".parse().expect("ip"),
        64,
    );
    fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(fx.metric("REASON_FORWARD_FIB"), 1);
    // Routes follow the nodes: removing them stops the tunnel.
    fx.dp.set_tunnel_routes(&[]).expect("routes");
    let f = frame4(
        "10.244.1.5".parse().expect("ip"),
        "10.244.2.9".parse().expect("ip"),
        64,
    );
    fx.run(TcProgram::FromPod, &f, in0);
    assert_eq!(fx.metric("REASON_FORWARD_TUNNEL"), 1);
}

/// An ICMP error of `icmp_type` from `src` to `dst` quoting the first 28 bytes of `quoted`'s IP
/// packet (an Ethernet frame).
fn icmp4_error(src: &str, dst: &str, icmp_type: u8, quoted: &[u8]) -> Vec<u8> {
    let q = &quoted[14..14 + 28];
    let mut icmp = vec![icmp_type, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(q);
    let c = csum16(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = frame4(src.parse().expect("ip"), dst.parse().expect("ip"), 64);
    f.truncate(34);
    f[14 + 9] = 1;
    f[14 + 2..14 + 4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    f[14 + 10] = 0;
    f[14 + 11] = 0;
    let c = csum16(&f[14..34]);
    f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    fx.node_port(30053, 17, 9, Some((5, "10.50.0.9", 5353)));
    let dgram = udp4(("10.1.0.5", 5000), ("10.1.0.1", 30053));
    let (v, sent) = fx.run(TcProgram::FromNetdev, &dgram, in0);
    assert_eq!(v, TC_ACT_REDIRECT);
    let snat = endpoints_of(&sent).0;
    // The backend answers "port unreachable" to the SNAT address, quoting what it received.
    let err = icmp4_error("10.50.0.9", "10.2.0.1", 3, &sent);
    let (v, out) = fx.run(TcProgram::FromNetdev, &err, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(ip4_at(&out, 26), "10.1.0.1", "from the frontend");
    assert_eq!(ip4_at(&out, 30), "10.1.0.5", "to the client");
    assert_eq!(csum16(&out[14..34]), 0, "outer ip checksum");
    assert_eq!(csum16(&out[34..]), 0, "icmp checksum");
    // The quoted packet is the client's own, as it sent it.
    let quoted = &out[42..70];
    assert_eq!(ip4_at(quoted, 12), "10.1.0.5");
    assert_eq!(ip4_at(quoted, 16), "10.1.0.1");
    assert_eq!(u16::from_be_bytes([quoted[20], quoted[21]]), 5000);
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 30053);
    assert_eq!(csum16(&quoted[..20]), 0, "quoted ip checksum");
    // An error about no tracked flow is left to the stack.
    let other = icmp4_error(
        "10.50.0.9",
        "10.2.0.1",
        3,
        &udp4(("10.2.0.1", 1), ("10.50.0.9", 2)),
    );
    let (v, out) = fx.run(TcProgram::FromNetdev, &other, in0);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(out, other);
    let _ = snat;
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

impl Fixture {
    /// Runs the XDP NodePort program on `frame` from inside the fixture's namespace.
    fn run_xdp(&self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        self.run_xdp_prog(XdpProgram::NodePort, frame, ingress)
    }

    fn run_xdp_prog(&self, which: XdpProgram, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).expect("netns");
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                self.dp
                    .test_run_xdp(which, frame, ingress)
                    .expect("xdp test run")
            })
            .join()
            .expect("thread")
        })
    }
}

const XDP_DROP: u32 = 1;

#[test]
fn the_prefilter_drops_listed_sources_of_both_families_first_and_counts_them() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    let from = |src: &str| tcp4((src, 40000), ("10.1.0.1", 80), 0x02);
    let from6 = |src: &str| tcp6((src, 40000), ("fd00:1::1", 80), 0x02);
    let nets = |v: &[&str]| -> Vec<ipnet::IpNet> { v.iter().map(|n| n.parse().unwrap()).collect() };
    for which in [XdpProgram::Prefilter, XdpProgram::NodePort] {
        assert_eq!(
            fx.run_xdp_prog(which, &from("198.51.100.7"), in0).0,
            XDP_PASS,
            "empty list"
        );
    }
    for (n, slot) in [
        ("198.51.100.0/24", 0),
        ("2001:db8::/32", 1),
        ("203.0.113.9/32", 2),
    ] {
        fx.dp.prefilter_put(n.parse().unwrap(), slot).unwrap();
    }
    let frame = from("198.51.100.7");
    for which in [XdpProgram::Prefilter, XdpProgram::NodePort] {
        assert_eq!(fx.run_xdp_prog(which, &frame, in0).0, XDP_DROP, "{which:?}");
        let cases = [
            (from("198.51.101.7"), XDP_PASS, "outside the /24"),
            (from("203.0.113.9"), XDP_DROP, "the /32"),
            (from("203.0.113.8"), XDP_PASS, "next to the /32"),
            (from6("2001:db8:1::5"), XDP_DROP, "IPv6"),
            (from6("2001:db9::5"), XDP_PASS, "other IPv6"),
        ];
        for (f, want, case) in &cases {
            assert_eq!(fx.run_xdp_prog(which, f, in0).0, *want, "{which:?}: {case}");
        }
        // A destination in the list does not count: the source is what is filtered.
        assert_eq!(
            fx.run_xdp_prog(
                which,
                &tcp4(("10.1.0.5", 1), ("198.51.100.7", 80), 0x02),
                in0
            )
            .0,
            XDP_PASS
        );
    }
    let entries = fx.dp.prefilter_entries().unwrap();
    let get = |n: &str| {
        let n: ipnet::IpNet = n.parse().unwrap();
        entries
            .iter()
            .find(|e| e.0 == n)
            .map(|e| (e.2, e.3))
            .unwrap()
    };
    assert_eq!(get("198.51.100.0/24"), (2, 2 * frame.len() as u64));
    assert_eq!(get("203.0.113.9/32").0, 2);
    assert_eq!(get("2001:db8::/32").0, 2);
    // Every drop is also counted under its reason.
    let m = fx.dp.metrics().unwrap();
    let dropped = m
        .iter()
        .find(|m| m.name == "DROP_PREFILTER")
        .map(|m| m.packets);
    assert_eq!(dropped, Some(6));
    // Taken out: passes again; put back in a slot: counters start at zero.
    fx.dp
        .prefilter_delete(nets(&["198.51.100.0/24"])[0])
        .unwrap();
    assert_eq!(
        fx.run_xdp_prog(XdpProgram::Prefilter, &frame, in0).0,
        XDP_PASS
    );
    fx.dp
        .prefilter_put(nets(&["198.51.100.0/25"])[0], 0)
        .unwrap();
    assert_eq!(
        fx.run_xdp_prog(XdpProgram::Prefilter, &frame, in0).0,
        XDP_DROP
    );
    let entries = fx.dp.prefilter_entries().unwrap();
    assert_eq!(
        entries
            .iter()
            .find(|e| e.1 == 0)
            .map(|e| (e.0.to_string(), e.2)),
        Some(("198.51.100.0/25".into(), 1))
    );
}

#[test]
fn xdp_completes_snat_flows_and_gives_the_same_answers_as_tc() {
    let fx = Fixture::new();
    fx.node_setup();
    let in0 = fx.ifindex("in0");
    let out_mac = fx.mac("out0");
    sh(
        "ip",
        &[
            "-n",
            &fx.netns,
            "neigh",
            "add",
            "10.1.0.5",
            "lladdr",
            "02:00:00:00:00:05",
            "dev",
            "in0",
            "nud",
            "permanent",
        ],
    );
    fx.node_port(30081, 6, 8, Some((4, "10.50.0.9", 8080)));
    let syn = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30081), 0x02);
    let (v, out) = fx.run_xdp(&syn, in0);
    assert_eq!(v, XDP_REDIRECT, "out of another device");
    let (src, dst) = endpoints_of(&out);
    assert_eq!(dst, "10.50.0.9:8080");
    assert!(src.starts_with("10.2.0.1:"), "{src}");
    assert_eq!(&out[0..6], &NEXTHOP_MAC);
    assert_eq!(&out[6..12], &out_mac);
    assert_eq!(out[22], 63, "ttl");
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(l4_csum(&out), 0, "tcp checksum");
    assert_eq!(fx.metric("REASON_XDP_REDIRECT"), 1);
    // The entries XDP made are the ones tc uses: the next packet of the flow through tc
    // gets the same translation...
    let ack = tcp4(("10.1.0.5", 40000), ("10.1.0.1", 30081), 0x10);
    let (_, tc_out) = fx.run(TcProgram::FromNetdev, &ack, in0);
    assert_eq!(endpoints_of(&tc_out), (src.clone(), dst.clone()));
    // ...and the backend's reply is translated back identically by XDP (sent back out of
    // the receiving device) and by tc.
    let port: u16 = src.rsplit(':').next().unwrap().parse().unwrap();
    let synack = tcp4(("10.50.0.9", 8080), ("10.2.0.1", port), 0x12);
    let (v, x) = fx.run_xdp(&synack, in0);
    assert_eq!(v, XDP_TX, "back out of the receiving device");
    let (_, t) = fx.run(TcProgram::FromNetdev, &synack, in0);
    assert_eq!(
        endpoints_of(&x),
        ("10.1.0.1:30081".into(), "10.1.0.5:40000".into())
    );
    assert_eq!(endpoints_of(&x), endpoints_of(&t));
    assert_eq!(&x[14..], &t[14..], "same IP packet from XDP and tc");
    assert_eq!(l4_csum(&x), 0, "tcp checksum");

    // A local backend, pod traffic, anything else: passed on to tc, untouched, nothing made.
    fx.endpoint("10.244.1.7".parse().expect("ip"), fx.ifindex("out0"));
    fx.node_port(30080, 6, 7, Some((3, "10.244.1.7", 8080)));
    let before = fx.dp.ct_entries().expect("ct").len();
    for f in [
        tcp4(("10.1.0.5", 40001), ("10.1.0.1", 30080), 0x02),
        tcp4(("10.1.0.5", 40001), ("10.244.1.7", 8080), 0x02),
        tcp4(("10.1.0.5", 40001), ("10.1.0.1", 22), 0x02),
    ] {
        let (v, out) = fx.run_xdp(&f, in0);
        assert_eq!(v, XDP_PASS);
        assert_eq!(out, f);
    }
    assert_eq!(fx.dp.ct_entries().expect("ct").len(), before);
}

// ---- Masquerading: pods' flows leaving the cluster, ICMP echo in conntrack ----

/// An IPv4 ICMP echo request (`reply` false) or reply with identifier `id`, checksums valid.
fn echo4(src: &str, dst: &str, reply: bool, id: u16) -> Vec<u8> {
    let mut icmp = vec![if reply { 0 } else { 8 }, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"weir-ping");
    let c = csum16(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = frame4(src.parse().expect("ip"), dst.parse().expect("ip"), 64);
    f.truncate(34);
    f[14 + 9] = 1;
    f[14 + 2..14 + 4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    f[14 + 10] = 0;
    f[14 + 11] = 0;
    let c = csum16(&f[14..34]);
    f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

/// (source, destination, identifier) of an ICMP echo frame.
fn echo_of(f: &[u8]) -> (String, String, u16) {
    (
        ip4_at(f, 26),
        ip4_at(f, 30),
        u16::from_be_bytes([f[38], f[39]]),
    )
}

impl Fixture {
    /// node_setup with masquerading on; pods are 10.244.0.0/16 and 10.60.0.0/24 is a routed
    /// network left unmasqueraded. Returns the pod's veth (in0) ifindex.
    fn masq_setup(&self) -> u32 {
        self.node_setup();
        let mut cfg = weir_bpf::datapath::node_config {
            snat4: u32::from_ne_bytes([10, 2, 0, 1]),
            snat_port_min: 61000,
            snat_port_max: 61010,
            ..Default::default()
        };
        cfg.flags = weir_bpf::datapath::CFG_MASQUERADE;
        self.dp.set_config(&cfg).expect("config");
        self.dp
            .set_nomasq_cidrs(&[
                ("10.244.0.0".parse().expect("ip"), 16),
                ("10.60.0.0".parse().expect("ip"), 24),
            ])
            .expect("nomasq");
        let veth = self.ifindex("in0");
        self.endpoint("10.244.1.7".parse().expect("ip"), veth);
        veth
    }
}

#[test]
fn pods_flows_leaving_the_cluster_are_masqueraded_and_answers_come_back() {
    let fx = Fixture::new();
    let veth = fx.masq_setup();
    let out0 = fx.ifindex("out0");
    let in_range = |p: u16| (61000..=61010).contains(&p);

    // TCP: the SYN leaves from the node's address and a port of the range.
    let syn = tcp4(("10.244.1.7", 40000), ("10.50.0.9", 80), 0x02);
    let (v, out) = fx.run(TcProgram::FromPod, &syn, veth);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    let (src, dst) = endpoints_of(&out);
    assert_eq!(dst, "10.50.0.9:80");
    let port: u16 = src.strip_prefix("10.2.0.1:").expect(&src).parse().unwrap();
    assert!(in_range(port), "{src}");
    assert_eq!(&out[0..6], &NEXTHOP_MAC);
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(l4_csum(&out), 0, "tcp checksum");
    // The answer comes back to the pod.
    let synack = tcp4(("10.50.0.9", 80), ("10.2.0.1", port), 0x12);
    let (v, out) = fx.run(TcProgram::FromNetdev, &synack, out0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(
        endpoints_of(&out),
        ("10.50.0.9:80".into(), "10.244.1.7:40000".into())
    );
    assert_eq!(&out[0..6], &POD_MAC, "delivered to the pod");
    assert_eq!(l4_csum(&out), 0, "tcp checksum");

    // ICMP echo: the identifier is the port; request and reply are tracked.
    let req = echo4("10.244.1.7", "10.50.0.9", false, 0x1234);
    let (v, out) = fx.run(TcProgram::FromPod, &req, veth);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    let (s, d, id) = echo_of(&out);
    assert_eq!((s.as_str(), d.as_str()), ("10.2.0.1", "10.50.0.9"));
    assert!(in_range(id), "identifier {id}");
    assert_eq!(csum16(&out[14..34]), 0, "ip checksum");
    assert_eq!(csum16(&out[34..]), 0, "icmp checksum");
    let rep = echo4("10.50.0.9", "10.2.0.1", true, id);
    let (v, out) = fx.run(TcProgram::FromNetdev, &rep, out0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(
        echo_of(&out),
        ("10.50.0.9".into(), "10.244.1.7".into(), 0x1234)
    );
    assert_eq!(csum16(&out[34..]), 0, "icmp checksum");
    // A second request of the same ping follows the same entry.
    let (_, again) = fx.run(TcProgram::FromPod, &req, veth);
    assert_eq!(echo_of(&again).2, id);
    let ct = fx.dp.ct_entries().expect("ct");
    let icmp: Vec<_> = ct.iter().filter(|(k, _)| k.proto == 1).collect();
    assert_eq!(icmp.len(), 2, "{icmp:?}");
    for (_, e) in &icmp {
        assert_ne!(e.flags & weir_bpf::datapath::CT_F_MASQ, 0);
        assert_ne!(e.flags & weir_bpf::datapath::CT_F_SEEN_REPLY, 0);
        let left = e.expires as i64 - weir_bpf::datapath::boot_seconds() as i64;
        assert!((55..=60).contains(&left), "ICMP lifetime {left}");
    }

    // Not masqueraded: a TCP segment that opens nothing, a pod CIDR, a configured network.
    for f in [
        tcp4(("10.244.1.7", 40001), ("10.50.0.9", 80), 0x10),
        tcp4(("10.244.1.7", 40002), ("10.60.0.4", 80), 0x02),
    ] {
        let (_, out) = fx.run(TcProgram::FromPod, &f, veth);
        assert_eq!(endpoints_of(&out).0, endpoints_of(&f).0, "source kept");
    }
    // An ICMP error about a masqueraded UDP flow reaches the pod, quoting its own packet.
    let (_, sent) = fx.run(
        TcProgram::FromPod,
        &udp4(("10.244.1.7", 6000), ("10.50.0.9", 7000)),
        veth,
    );
    let err = icmp4_error("10.50.0.9", "10.2.0.1", 3, &sent);
    let (v, out) = fx.run(TcProgram::FromNetdev, &err, out0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(ip4_at(&out, 30), "10.244.1.7", "to the pod");
    assert_eq!(csum16(&out[34..]), 0, "icmp checksum");
    assert_eq!(ip4_at(&out[42..70], 12), "10.244.1.7", "quoted source");
    assert_eq!(u16::from_be_bytes([out[62], out[63]]), 6000, "quoted port");

    // Nothing is made when explaining; the translation is shown.
    let before = fx.dp.ct_entries().expect("ct").len();
    let e = fx.explain(
        TcProgram::FromPod,
        &udp4(("10.244.1.7", 5353), ("10.50.0.9", 53)),
        veth,
    );
    assert_eq!(endpoints_of(&e.packet).0, "10.2.0.1:61000");
    assert_eq!(fx.dp.ct_entries().expect("ct").len(), before);
}

#[test]
fn answers_to_clients_that_reach_a_pod_directly_keep_the_pods_address() {
    let fx = Fixture::new();
    let veth = fx.masq_setup();
    let out0 = fx.ifindex("out0");

    // UDP from outside straight to the pod, and the pod's answer.
    let q = udp4(("10.50.0.9", 5000), ("10.244.1.7", 53));
    let (v, out) = fx.run(TcProgram::FromNetdev, &q, out0);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(endpoints_of(&out), endpoints_of(&q), "untranslated");
    let a = udp4(("10.244.1.7", 53), ("10.50.0.9", 5000));
    let (v, out) = fx.run(TcProgram::FromPod, &a, veth);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        endpoints_of(&out),
        endpoints_of(&a),
        "the pod's own address"
    );
    // The same for a ping of the pod (and an identifier 0).
    for id in [7, 0] {
        let (_, out) = fx.run(
            TcProgram::FromNetdev,
            &echo4("10.50.0.9", "10.244.1.7", false, id),
            out0,
        );
        assert_eq!(echo_of(&out).1, "10.244.1.7");
        let (v, out) = fx.run(
            TcProgram::FromPod,
            &echo4("10.244.1.7", "10.50.0.9", true, id),
            veth,
        );
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(echo_of(&out), ("10.244.1.7".into(), "10.50.0.9".into(), id));
    }
    // TCP: the pod's SYN-ACK opens nothing.
    let (_, out) = fx.run(
        TcProgram::FromPod,
        &tcp4(("10.244.1.7", 80), ("10.50.0.9", 40000), 0x12),
        veth,
    );
    assert_eq!(endpoints_of(&out).0, "10.244.1.7:80");
    // No SNAT entry was made for any of it.
    let ct = fx.dp.ct_entries().expect("ct");
    assert!(
        ct.iter()
            .all(|(_, e)| e.flags & weir_bpf::datapath::CT_F_SNAT == 0),
        "{ct:?}"
    );
}

// ---- IPv6 north-south ----

/// The checksum of an IPv6 TCP segment over its pseudo-header: 0 when valid.
fn l4_csum6(frame: &[u8]) -> u16 {
    let ip = &frame[14..54];
    let l4 = &frame[54..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
    pseudo.extend_from_slice(l4);
    csum16(&pseudo)
}

/// An IPv6 TCP frame with the given ports and flags, checksum valid.
fn tcp6(src: (&str, u16), dst: (&str, u16), flags: u8) -> Vec<u8> {
    let mut f = frame6(src.0.parse().expect("ip"), dst.0.parse().expect("ip"), 64);
    f[54..56].copy_from_slice(&src.1.to_be_bytes());
    f[56..58].copy_from_slice(&dst.1.to_be_bytes());
    f[54 + 13] = flags;
    f[54 + 16] = 0;
    f[54 + 17] = 0;
    let c = l4_csum6(&f);
    f[54 + 16..54 + 18].copy_from_slice(&c.to_be_bytes());
    assert_eq!(l4_csum6(&f), 0);
    f
}

/// An IPv6 echo request (or reply) with identifier `id`, checksum valid.
fn echo6(src: &str, dst: &str, reply: bool, id: u16) -> Vec<u8> {
    let mut f = frame6(src.parse().expect("ip"), dst.parse().expect("ip"), 64);
    f.truncate(54);
    f[14 + 4..14 + 6].copy_from_slice(&12u16.to_be_bytes());
    f[14 + 6] = 58;
    f.extend_from_slice(&[if reply { 129 } else { 128 }, 0, 0, 0]);
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&[0, 1]);
    f.extend_from_slice(b"ping");
    let c = l4_csum6(&f);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    assert_eq!(l4_csum6(&f), 0);
    f
}

/// (source, destination) of an IPv6 TCP/UDP frame as `[a]:port`.
fn endpoints6_of(f: &[u8]) -> (String, String) {
    let a = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&f[o..o + 16]).unwrap());
    (
        format!("[{}]:{}", a(22), u16::from_be_bytes([f[54], f[55]])),
        format!("[{}]:{}", a(38), u16::from_be_bytes([f[56], f[57]])),
    )
}

impl Fixture {
    /// An IPv6 NodePort frontend (address ::, external scope) with one TCP backend.
    fn node_port6(&self, port: u16, svc_id: u32, backend: (u32, &str, u16)) {
        use weir_bpf::types::{lb6_backend, lb6_key};
        let lb = weir_bpf::SockLb::load(&self.pins).expect("socket maps");
        let addr = weir_bpf::ip6_words(backend.1.parse().expect("ip"));
        lb.put(
            "weir_lb6_backends",
            &backend.0,
            &lb6_backend {
                address: addr,
                port: backend.2.to_be(),
                proto: 6,
                ..Default::default()
            },
        )
        .expect("backend");
        let mut key = lb6_key {
            dport: port.to_be(),
            proto: 6,
            scope: 1,
            slot: 1,
            ..Default::default()
        };
        lb.put(
            "weir_lb6_svc",
            &key,
            &lb_service {
                backend_id: backend.0,
                svc_id,
                ..Default::default()
            },
        )
        .expect("slot");
        key.slot = 0;
        lb.put(
            "weir_lb6_svc",
            &key,
            &lb_service {
                svc_id,
                count: 1,
                ..Default::default()
            },
        )
        .expect("master");
    }

    fn node_setup6(&self) {
        let k = |ip: &str| endpoint_key {
            addr: weir_bpf::ip6_words(ip.parse().expect("ip")),
            family: AF_INET6,
            ..Default::default()
        };
        self.node_setup();
        self.dp
            .set_node_addrs(&[k("fd01::1"), k("fd02::1")])
            .expect("node addrs");
        self.dp
            .set_snat6(Some("fd02::1".parse().expect("ip")))
            .expect("snat6");
    }
}

#[test]
fn ipv6_node_ports_reach_local_and_remote_backends_and_replies_go_back() {
    let fx = Fixture::new();
    fx.node_setup6();
    let in0 = fx.ifindex("in0");
    let veth = fx.ifindex("out0");

    // A backend on another node: DNAT + SNAT to the node's IPv6 address, a port of the range.
    fx.node_port6(30081, 8, (4, "fd50::9", 8080));
    let summaries = Summaries::on(&fx);
    let syn = tcp6(("fd01::5", 40000), ("fd01::1", 30081), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &syn, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    let (src, dst) = endpoints6_of(&out);
    assert_eq!(dst, "[fd50::9]:8080");
    let port: u16 = src.strip_prefix("[fd02::1]:").expect(&src).parse().unwrap();
    assert!((61000..=61010).contains(&port), "{src}");
    assert_eq!(out[21], 63, "hop limit");
    assert_eq!(&out[0..6], &NEXTHOP_MAC);
    assert_eq!(l4_csum6(&out), 0, "tcp checksum");
    let synack = tcp6(("fd50::9", 8080), ("fd02::1", port), 0x12);
    let (v, out) = fx.run(TcProgram::FromNetdev, &synack, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(
        endpoints6_of(&out),
        ("[fd01::1]:30081".into(), "[fd01::5]:40000".into())
    );
    assert_eq!(l4_csum6(&out), 0, "tcp checksum");
    // Summarized in the full layout (IPv6 addresses), both ways named before translation.
    use weir_bpf::events::{TRACE_F_NEW, TRACE_F_REPLY, TRACE_F_XLATE};
    let got = summaries.take();
    assert_eq!(got.len(), 2, "{got:?}");
    let frontend = (
        "[fd01::5]:40000".parse().unwrap(),
        "[fd01::1]:30081".parse().unwrap(),
    );
    assert_eq!(
        (got[0].src.to_string(), got[0].dst.to_string(), got[0].orig),
        (src.clone(), dst.clone(), Some(frontend))
    );
    assert_eq!(
        (got[0].flags, got[0].svc_id, got[0].packets),
        (TRACE_F_NEW | TRACE_F_XLATE, 8, 1)
    );
    assert_eq!(got[1].flags, TRACE_F_NEW | TRACE_F_XLATE | TRACE_F_REPLY);
    assert_eq!(
        got[1].orig,
        Some(("[fd50::9]:8080".parse().unwrap(), src.parse().unwrap()))
    );
    let ct = fx.dp.ct6_entries().expect("ct6");
    assert_eq!(ct.len(), 2, "{ct:?}");
    assert!(ct
        .iter()
        .all(|(_, e)| e.flags & weir_bpf::datapath::CT_F_SEEN_REPLY != 0));

    // A local backend: DNAT only, the pod sees the client; its reply is translated back.
    fx.endpoint("fd00:10:244:1::7".parse().expect("ip"), veth);
    fx.node_port6(30080, 7, (3, "fd00:10:244:1::7", 8080));
    let syn = tcp6(("fd01::5", 40001), ("fd01::1", 30080), 0x02);
    let (v, out) = fx.run(TcProgram::FromNetdev, &syn, in0);
    assert_eq!(v, TC_ACT_REDIRECT, "verdict");
    assert_eq!(&out[0..6], &POD_MAC, "delivered to the pod");
    assert_eq!(
        endpoints6_of(&out),
        ("[fd01::5]:40001".into(), "[fd00:10:244:1::7]:8080".into())
    );
    assert_eq!(l4_csum6(&out), 0, "tcp checksum");
    let synack = tcp6(("fd00:10:244:1::7", 8080), ("fd01::5", 40001), 0x12);
    let (_, out) = fx.run(TcProgram::FromPod, &synack, veth);
    assert_eq!(
        endpoints6_of(&out),
        ("[fd01::1]:30080".into(), "[fd01::5]:40001".into())
    );
    assert_eq!(l4_csum6(&out), 0, "tcp checksum");

    // The collector sees IPv6 entries too.
    let removed = fx
        .dp
        .ct_gc(weir_bpf::datapath::boot_seconds() + 100, false)
        .expect("gc");
    assert_eq!(removed, 4);
}

// NetworkPolicy: identities and classes as weir-control's policy::id.
const ID_HOST: u32 = 1;
const ID_CLUSTER: u32 = 4;
const CIDR_BASE: u32 = 1 << 24;
const NS_BASE: u32 = 2 << 24;

impl Fixture {
    fn ipcache(&self, entries: &[(&str, u8, u32, u32)]) {
        use weir_bpf::datapath::{ipcache_info, AddrMap};
        let e: Vec<(IpAddr, u8, ipcache_info)> = entries
            .iter()
            .map(|(a, l, id, ns)| {
                (
                    a.parse().expect("ip"),
                    *l,
                    ipcache_info {
                        identity: *id,
                        ns_class: *ns,
                    },
                )
            })
            .collect();
        let (pods, cidrs): (Vec<_>, Vec<_>) =
            e.into_iter().partition(|(_, _, i)| i.identity < CIDR_BASE);
        self.dp
            .set_addr_map(AddrMap::Ipcache, &pods)
            .expect("ipcache");
        self.dp
            .set_addr_map(AddrMap::PolicyCidrs, &cidrs)
            .expect("cidrs");
    }

    /// An allow entry: pod `ep`, direction, peer, protocol (0: all) and port prefix.
    fn allow(&self, ep: u32, dir: u8, peer: u32, proto: u8, port: u16, bits: u8) {
        self.allow_from(ep, dir, (peer, proto, port, bits), 0);
    }

    /// An allow entry with its origin (the policies it comes from) and kind of match.
    fn allow_from(
        &self,
        ep: u32,
        dir: u8,
        (peer, proto, port, bits): (u32, u8, u16, u8),
        origin: u32,
    ) {
        let entry = weir_control::policy::PolicyEntry {
            peer,
            proto,
            port,
            port_bits: bits,
        };
        let v = weir_bpf::datapath::policy_entry {
            r#match: entry.match_kind().number(),
            origin,
            ..Default::default()
        };
        self.dp
            .policy_put(
                &weir_bpf::datapath::policy_key_of(ep, dir, peer, proto, port, bits),
                &v,
            )
            .expect("policy entry");
    }

    /// Isolates pod `ep` (`flags`: EP_POLICY_INGRESS/EGRESS/DENY) without peer-kind hints:
    /// all the lookups are tried, whatever its entries.
    fn isolate(&self, ep: u32, flags: u32, identity: u32) {
        self.set_ep_policy(ep, flags, identity);
    }

    fn set_ep_policy(&self, ep: u32, flags: u32, identity: u32) {
        self.dp
            .set_ep_policy(ep, Some(&weir_bpf::datapath::ep_policy { flags, identity }))
            .expect("ep policy");
    }

    fn events(&self) -> Vec<weir_bpf::datapath::flow_event> {
        let got = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let g = got.clone();
        let rb = self
            .dp
            .events(move |e| g.borrow_mut().push(*e))
            .expect("ring buffer");
        rb.consume().expect("consume");
        drop(rb);
        let v = got.borrow().clone();
        v
    }
}

/// A fixture with pod a (identity 300) on in0 and pod b (identity 301) on out0, at addresses
/// `a` and `b` of one family; no policy yet. Returns it with a's and b's ifindexes.
fn policy_pair(a: &str, b: &str) -> (Fixture, u32, u32) {
    let fx = Fixture::new();
    let a_if = fx.ifindex("in0");
    let b_if = fx.ifindex("out0");
    let a_ip: IpAddr = a.parse().expect("ip");
    let bits = if a_ip.is_ipv4() { 32 } else { 128 };
    fx.endpoint(a_ip, a_if);
    fx.endpoint(b.parse().expect("ip"), b_if);
    fx.ipcache(&[(a, bits, 300, 0), (b, bits, 301, 0)]);
    (fx, a_if, b_if)
}

/// A verdict event names, per direction judged, the origin and kind of the entry that
/// allowed the flow; a denial names none for the direction that denied.
#[test]
fn policy_verdicts_name_the_entries_that_allowed_them() {
    use weir_bpf::datapath::{
        EP_POLICY_EGRESS, EP_POLICY_INGRESS, POLICY_EGRESS, POLICY_INGRESS, POLICY_MATCH_L3_ONLY,
        POLICY_MATCH_L4_ONLY,
    };
    let (fx, a_if, b_if) = policy_pair("10.244.1.5", "10.244.1.7");
    // a may send to anyone on TCP 80 (origin 5); b admits identity 300 on anything (6).
    fx.allow_from(a_if, POLICY_EGRESS, (0, 6, 80, 16), 5);
    fx.isolate(a_if, EP_POLICY_EGRESS, 300);
    fx.allow_from(b_if, POLICY_INGRESS, (300, 0, 0, 0), 6);
    fx.isolate(b_if, EP_POLICY_INGRESS, 301);
    let syn = tcp4(("10.244.1.5", 40000), ("10.244.1.7", 80), 0x02);
    assert_eq!(fx.run(TcProgram::FromPod, &syn, a_if).0, TC_ACT_REDIRECT);
    let syn = tcp4(("10.244.1.5", 40001), ("10.244.1.7", 81), 0x02);
    assert_eq!(fx.run(TcProgram::FromPod, &syn, a_if).0, TC_ACT_SHOT);
    // b -> a: b's egress and a's ingress are open; no verdict to report.
    let syn = tcp4(("10.244.1.7", 40002), ("10.244.1.5", 22), 0x02);
    assert_eq!(fx.run(TcProgram::FromPod, &syn, b_if).0, TC_ACT_REDIRECT);
    let evs = fx.events();
    assert_eq!(evs.len(), 2, "{evs:?}");
    let (ok, denied) = (&evs[0], &evs[1]);
    let both = (1 << POLICY_INGRESS) | (1 << POLICY_EGRESS);
    assert_eq!((ok.reason, ok.dir, ok.judged), (10, POLICY_INGRESS, both));
    assert_eq!(ok.origin[usize::from(POLICY_EGRESS)], 5);
    assert_eq!(ok.origin[usize::from(POLICY_INGRESS)], 6);
    assert_eq!(ok.r#match[usize::from(POLICY_EGRESS)], POLICY_MATCH_L4_ONLY);
    assert_eq!(
        ok.r#match[usize::from(POLICY_INGRESS)],
        POLICY_MATCH_L3_ONLY
    );
    // Port 81: a's egress denies it; b's ingress is not asked.
    assert_eq!((denied.reason, denied.dir), (138, POLICY_EGRESS));
    assert_eq!(denied.judged, 1 << POLICY_EGRESS);
    assert_eq!((denied.origin, denied.r#match), ([0, 0], [0, 0]));
}

/// An IPv6 echo is tracked by its identifier: the reply to a request the policy allowed
/// passes on the request's entry; other replies and requests are judged.
#[test]
fn network_policy_tracks_ipv6_echo_by_identifier() {
    use weir_bpf::datapath::EP_POLICY_INGRESS;
    let (a, b) = ("fd00:10:244:1::5", "fd00:10:244:1::7");
    let (fx, a_if, b_if) = policy_pair(a, b);
    // a admits nothing; its egress is open.
    fx.isolate(a_if, EP_POLICY_INGRESS, 300);
    for (name, f, dev, want) in [
        ("a pings b", echo6(a, b, false, 7), a_if, TC_ACT_REDIRECT),
        ("b answers", echo6(b, a, true, 7), b_if, TC_ACT_REDIRECT),
        ("again", echo6(a, b, false, 7), a_if, TC_ACT_REDIRECT),
        (
            "answer to no request",
            echo6(b, a, true, 8),
            b_if,
            TC_ACT_SHOT,
        ),
        ("b pings a", echo6(b, a, false, 9), b_if, TC_ACT_SHOT),
    ] {
        assert_eq!(fx.run(TcProgram::FromPod, &f, dev).0, want, "{name}");
    }
    let pct = fx.dp.pct6_entries().expect("pct");
    assert_eq!(pct.len(), 1, "one entry, for a's echo: {pct:?}");
    assert_eq!((pct[0].0.proto, u16::from_be(pct[0].0.sport)), (58, 7));
    assert_eq!(fx.metric("DROP_POLICY_DENIED"), 2);
}

/// SCTP is judged by its ports like TCP and UDP, and its answers pass on the flow's entry.
#[test]
fn network_policy_judges_sctp_by_port() {
    use weir_bpf::datapath::{EP_POLICY_INGRESS, POLICY_INGRESS};
    let (fx, a_if, b_if) = policy_pair("10.244.1.5", "10.244.1.7");
    // b admits identity 300 on SCTP 5000 only (not on TCP 5000).
    fx.allow(b_if, POLICY_INGRESS, 300, 132, 5000, 16);
    fx.isolate(b_if, EP_POLICY_INGRESS, 301);
    let run = |f: &[u8], dev| fx.run(TcProgram::FromPod, f, dev).0;
    for (name, f, want) in [
        (
            "SCTP 5000",
            sctp4(("10.244.1.5", 40000), ("10.244.1.7", 5000)),
            TC_ACT_REDIRECT,
        ),
        (
            "SCTP 5001",
            sctp4(("10.244.1.5", 40000), ("10.244.1.7", 5001)),
            TC_ACT_SHOT,
        ),
        (
            "TCP 5000",
            tcp4(("10.244.1.5", 40000), ("10.244.1.7", 5000), 0x02),
            TC_ACT_SHOT,
        ),
        // b's answer (INIT ACK) and a's next packet pass on the flow's entry.
        (
            "answer",
            sctp4(("10.244.1.7", 5000), ("10.244.1.5", 40000)),
            TC_ACT_REDIRECT,
        ),
        (
            "again",
            sctp4(("10.244.1.5", 40000), ("10.244.1.7", 5000)),
            TC_ACT_REDIRECT,
        ),
    ] {
        let dev = if name == "answer" { b_if } else { a_if };
        assert_eq!(run(&f, dev), want, "{name}");
    }
    let pct = fx.dp.pct4_entries().expect("pct");
    assert_eq!(pct.len(), 1, "one entry, for the allowed flow: {pct:?}");
    let (k, v) = &pct[0];
    assert_eq!((k.proto, u16::from_be(k.dport)), (132, 5000));
    assert!(v.flags & 4 != 0, "the answer was seen: {v:?}");
    assert_eq!(fx.metric("DROP_POLICY_DENIED"), 2);
}

/// The peer-kind hints of a pod decide which lookups its new flows try: an entry of a kind the
/// hints do not announce is not consulted (the agent sets them from the entries it writes).
/// Without EP_POLICY_HINTS (a value an older agent wrote) every lookup is tried.
#[test]
fn network_policy_tries_only_the_peer_kinds_a_pod_names() {
    use weir_bpf::datapath::{
        EP_POLICY_HINTS, EP_POLICY_INGRESS, EP_POLICY_PEER_ANY, EP_POLICY_PEER_CIDR,
        EP_POLICY_PEER_CLASS, POLICY_INGRESS,
    };
    let (fx, a_if, b_if) = policy_pair("10.244.1.5", "10.244.1.7");
    fx.ipcache(&[
        ("10.244.1.5", 32, 300, NS_BASE + 1),
        ("10.244.1.7", 32, 301, NS_BASE + 1),
        ("10.244.1.0", 24, CIDR_BASE + 1, 0),
    ]);
    // b admits "any" on 81, namespace class 1 on 82, the cluster on 83, the CIDR on 84.
    fx.allow(b_if, POLICY_INGRESS, 0, 6, 81, 16);
    fx.allow(b_if, POLICY_INGRESS, NS_BASE + 1, 6, 82, 16);
    fx.allow(b_if, POLICY_INGRESS, ID_CLUSTER, 6, 83, 16);
    fx.allow(b_if, POLICY_INGRESS, CIDR_BASE + 1, 6, 84, 16);
    let mut sport = 40000;
    let mut verdict = |port: u16| {
        sport += 1;
        let f = tcp4(("10.244.1.5", sport), ("10.244.1.7", port), 0x02);
        fx.run(TcProgram::FromPod, &f, a_if).0
    };
    let h = EP_POLICY_HINTS;
    for (hints, allowed) in [
        (h, [false, false, false, false]),
        (h | EP_POLICY_PEER_ANY, [true, false, false, false]),
        (h | EP_POLICY_PEER_CLASS, [false, true, true, false]),
        (h | EP_POLICY_PEER_CIDR, [false, false, false, true]),
        (0, [true, true, true, true]),
    ] {
        fx.set_ep_policy(b_if, EP_POLICY_INGRESS | hints, 301);
        for (port, ok) in [81, 82, 83, 84].into_iter().zip(allowed) {
            let want = if ok { TC_ACT_REDIRECT } else { TC_ACT_SHOT };
            assert_eq!(verdict(port), want, "hints {hints:#x}, port {port}");
        }
    }
}

/// A verdict event the full ring buffer cannot take is counted (REASON_EVENT_LOST), and the
/// packet's verdict does not change.
#[test]
fn verdict_events_lost_to_a_full_ring_buffer_are_counted() {
    use weir_bpf::datapath::EP_POLICY_INGRESS;
    let (fx, a_if, b_if) = policy_pair("10.244.1.5", "10.244.1.7");
    fx.isolate(b_if, EP_POLICY_INGRESS, 301);
    // A denied flow leaves no entry: every packet is judged and emits an event. The ring
    // (1 MiB) holds 13,107 records of 72 + 8 bytes.
    let f = tcp4(("10.244.1.5", 40000), ("10.244.1.7", 80), 0x02);
    let sent = 14_000;
    for _ in 0..sent {
        assert_eq!(fx.run(TcProgram::FromPod, &f, a_if).0, TC_ACT_SHOT);
    }
    let lost = fx.metric("REASON_EVENT_LOST");
    assert_eq!(fx.metric("DROP_POLICY_DENIED"), sent);
    let kept = fx.events().len() as u64;
    assert!(lost > 0, "the ring buffer did not fill: {kept} events kept");
    assert_eq!(kept + lost, sent);
    // Drained, it takes events again.
    assert_eq!(fx.run(TcProgram::FromPod, &f, a_if).0, TC_ACT_SHOT);
    assert_eq!(fx.events().len(), 1);
    assert_eq!(fx.metric("REASON_EVENT_LOST"), lost);
}

#[test]
fn network_policy_is_judged_on_the_first_packet_and_kept_per_flow() {
    use weir_bpf::datapath::{
        EP_POLICY_DENY, EP_POLICY_EGRESS, EP_POLICY_INGRESS, POLICY_EGRESS, POLICY_INGRESS,
    };
    let fx = Fixture::new();
    let a_if = fx.ifindex("in0"); // pod a's host-side device: its packets arrive here
    let b_if = fx.ifindex("out0"); // pod b's
    fx.endpoint("10.244.1.5".parse().expect("ip"), a_if);
    fx.endpoint("10.244.1.7".parse().expect("ip"), b_if);
    fx.endpoint("fd00:10:244:1::7".parse().expect("ip"), b_if);
    let ns_x = NS_BASE + 1;
    fx.ipcache(&[
        ("10.244.1.5", 32, 300, ns_x),
        ("10.244.1.7", 32, 301, ns_x),
        ("fd00:10:244:1::5", 128, 300, ns_x),
        ("10.1.0.1", 32, ID_HOST, 0),
        ("10.9.0.0", 16, CIDR_BASE + 1, 0),
        ("10.9.1.0", 24, CIDR_BASE + 2, 0),
    ]);
    // b: ingress from identity 300 on TCP 8000-9000 (port prefixes, as weir-control writes
    // them), from 10.9.0.0/16 except 10.9.1.0/24 on any port.
    let prefixes = weir_control::policy::port_prefixes(8000, 9000);
    assert_eq!(prefixes.len(), 7, "{prefixes:?}");
    for (port, bits) in &prefixes {
        fx.allow(b_if, POLICY_INGRESS, 300, 6, *port, *bits);
    }
    fx.allow(b_if, POLICY_INGRESS, CIDR_BASE + 1, 0, 0, 0);
    fx.isolate(b_if, EP_POLICY_INGRESS, 301);

    let run = |prog, f: &[u8], dev| fx.run(prog, f, dev).0;
    // Allowed, port range edges.
    let syn = tcp4(("10.244.1.5", 40000), ("10.244.1.7", 8080), 0x02);
    assert_eq!(
        run(TcProgram::FromPod, &syn, a_if),
        TC_ACT_REDIRECT,
        "a -> b:8080"
    );
    for (port, ok) in [(7999, false), (8000, true), (9000, true), (9001, false)] {
        let f = tcp4(("10.244.1.5", 40001), ("10.244.1.7", port), 0x02);
        let want = if ok { TC_ACT_REDIRECT } else { TC_ACT_SHOT };
        assert_eq!(run(TcProgram::FromPod, &f, a_if), want, "a -> b:{port}");
    }
    assert_eq!(fx.metric("DROP_POLICY_DENIED"), 2);
    // The reply direction and the established flow pass on the entry, whatever the rules.
    let synack = tcp4(("10.244.1.7", 8080), ("10.244.1.5", 40000), 0x12);
    assert_eq!(
        run(TcProgram::FromPod, &synack, b_if),
        TC_ACT_REDIRECT,
        "reply"
    );
    let pct = fx.dp.pct4_entries().expect("pct");
    assert!(
        pct.iter()
            .any(|(k, v)| u16::from_be(k.dport) == 8080 && v.flags & 4 != 0),
        "one entry in the original direction, reply seen: {pct:?}"
    );
    assert!(
        pct.iter().all(|(k, _)| u16::from_be(k.dport) != 7999),
        "no entry for a denied flow"
    );
    // CIDR with except, from the network.
    for (src, ok) in [("10.9.2.1", true), ("10.9.1.1", false), ("8.8.8.8", false)] {
        let f = tcp4((src, 5555), ("10.244.1.7", 80), 0x02);
        let want = if ok { TC_ACT_REDIRECT } else { TC_ACT_SHOT };
        assert_eq!(run(TcProgram::FromNetdev, &f, a_if), want, "{src} -> b:80");
    }
    // The node itself reaches its pods through the stack (to_pod); others do not.
    let f = tcp4(("10.1.0.1", 5555), ("10.244.1.7", 80), 0x02);
    assert_eq!(run(TcProgram::ToPod, &f, b_if), TC_ACT_OK, "host -> b");
    let f = tcp4(("10.50.0.9", 5555), ("10.244.1.7", 80), 0x02);
    assert_eq!(
        run(TcProgram::ToPod, &f, b_if),
        TC_ACT_SHOT,
        "elsewhere -> b via the stack"
    );

    // Events: each judged flow, with identities, direction and reason.
    let evs = fx.events();
    let denied: Vec<_> = evs.iter().filter(|e| e.reason == 138).collect();
    assert!(
        denied.iter().any(|e| u16::from_be(e.dport) == 7999
            && e.src_identity == 300
            && e.dst_identity == 301
            && e.dir == POLICY_INGRESS
            && e.ifindex == b_if),
        "{denied:?}"
    );
    assert!(
        denied.iter().any(|e| e.src_identity == 2),
        "world, from 8.8.8.8"
    );
    assert!(evs
        .iter()
        .any(|e| e.reason == 10 && u16::from_be(e.dport) == 8080));

    // explain judges without recording anything.
    let f = tcp4(("10.244.1.5", 40009), ("10.244.1.7", 8500), 0x02);
    let r = fx.explain(TcProgram::FromPod, &f, a_if);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let f = tcp4(("10.244.1.5", 40009), ("10.244.1.7", 22), 0x02);
    let r = fx.explain(TcProgram::FromPod, &f, a_if);
    assert_eq!((r.verdict, r.reason), (TC_ACT_SHOT, Some(138)));
    assert!(fx
        .dp
        .pct4_entries()
        .expect("pct")
        .iter()
        .all(|(k, _)| u16::from_be(k.sport) != 40009));

    // A policy change: the flow's next packet is judged again, and cut.
    for (port, bits) in &prefixes {
        fx.dp
            .policy_delete(&weir_bpf::datapath::policy_key_of(
                b_if,
                POLICY_INGRESS,
                300,
                6,
                *port,
                *bits,
            ))
            .expect("delete");
    }
    fx.allow(b_if, POLICY_INGRESS, 300, 17, 0, 0);
    fx.dp
        .set_policy_revision(fx.dp.policy_revision().expect("rev") + 1)
        .expect("rev");
    let ack = tcp4(("10.244.1.5", 40000), ("10.244.1.7", 8080), 0x10);
    assert_eq!(
        run(TcProgram::FromPod, &ack, a_if),
        TC_ACT_SHOT,
        "an established flow is cut"
    );
    assert!(fx
        .dp
        .pct4_entries()
        .expect("pct")
        .iter()
        .all(|(k, _)| u16::from_be(k.dport) != 8080));
    // UDP from a is now allowed on any port; replies pass.
    let u = udp4(("10.244.1.5", 5353), ("10.244.1.7", 53));
    assert_eq!(run(TcProgram::FromPod, &u, a_if), TC_ACT_REDIRECT, "udp");
    let u = udp4(("10.244.1.7", 53), ("10.244.1.5", 5353));
    assert_eq!(
        run(TcProgram::FromPod, &u, b_if),
        TC_ACT_REDIRECT,
        "udp reply"
    );
    // An ICMP error about the UDP flow is related to it; one about nothing is judged as ICMP.
    let q = udp4(("10.244.1.5", 5353), ("10.244.1.7", 53));
    let err = icmp4_error("10.244.1.7", "10.244.1.5", 3, &q);
    assert_eq!(
        run(TcProgram::FromPod, &err, b_if),
        TC_ACT_REDIRECT,
        "related icmp error"
    );

    // Egress: a may reach its own namespace's pods only; the world is denied.
    fx.allow(a_if, POLICY_EGRESS, ns_x, 0, 0, 0);
    fx.isolate(a_if, EP_POLICY_EGRESS, 300);
    let f = udp4(("10.244.1.5", 5354), ("10.244.1.7", 53));
    assert_eq!(
        run(TcProgram::FromPod, &f, a_if),
        TC_ACT_REDIRECT,
        "egress to a namespace peer"
    );
    let f = udp4(("10.244.1.5", 5354), ("10.50.0.9", 53));
    assert_eq!(
        run(TcProgram::FromPod, &f, a_if),
        TC_ACT_SHOT,
        "egress to the world"
    );
    let f = udp4(("10.244.1.5", 5354), ("10.9.2.1", 53));
    assert_eq!(
        run(TcProgram::FromPod, &f, a_if),
        TC_ACT_SHOT,
        "egress to a cidr"
    );
    fx.allow(a_if, POLICY_EGRESS, ID_CLUSTER, 0, 0, 0);

    // IPv6: the same lookups (a's IPv6 address has identity 300).
    let f = tcp6(("fd00:10:244:1::5", 40000), ("fd00:10:244:1::7", 22), 0x02);
    assert_eq!(
        run(TcProgram::FromNetdev, &f, a_if),
        TC_ACT_SHOT,
        "ipv6 tcp not allowed"
    );
    fx.allow(b_if, POLICY_INGRESS, 300, 6, 22, 16);
    assert_eq!(
        run(TcProgram::FromNetdev, &f, a_if),
        TC_ACT_REDIRECT,
        "ipv6 tcp/22 allowed"
    );
    assert_eq!(fx.dp.pct6_entries().expect("pct6").len(), 1);

    // Fail closed: a pod whose policy could not be programmed gets nothing.
    fx.isolate(b_if, EP_POLICY_INGRESS | EP_POLICY_DENY, 301);
    let f = udp4(("10.244.1.5", 7000), ("10.244.1.7", 53));
    assert_eq!(
        run(TcProgram::FromPod, &f, a_if),
        TC_ACT_SHOT,
        "fail closed"
    );
    assert_eq!(fx.metric("DROP_POLICY_FAILED"), 1);

    // GC removes expired entries of the policy conntrack too.
    let n = fx.dp.pct4_entries().expect("pct").len();
    assert!(n >= 2);
    let far = weir_bpf::datapath::boot_seconds() + 100_000;
    assert_eq!(fx.dp.ct_gc(far, false).expect("gc"), n + 1);
}

/// An upgrade whose maps changed layout: the new agent replaces the maps an older one pinned
/// with another type, key, value or size (their state is unreadable to it), and keeps the
/// others with their entries.
#[test]
fn maps_an_older_agent_pinned_with_another_layout_are_replaced() {
    use libbpf_rs::{MapCore, MapHandle, MapType};
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let pins = PathBuf::from(format!("/sys/fs/bpf/wbt-up-{}-{n}", std::process::id()));
    weir_bpf::ensure_bpffs().expect("bpffs");
    struct Pins(PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = Datapath::remove_pins(&self.0);
        }
    }
    let _guard = Pins(pins.clone());
    let tc = pins.join("tc");
    // A first agent: an endpoint recorded.
    let dp = Datapath::load(&tc, &pins).expect("first load");
    let mut k = endpoint_key::default();
    k.addr[0] = u32::from_ne_bytes([10, 244, 0, 7]);
    k.family = AF_INET;
    let info = endpoint_info {
        ifindex: 42,
        ..Default::default()
    };
    dp.put_endpoint(&k, &info).expect("endpoint");
    drop(dp);
    let ids = |dir: &std::path::Path| -> std::collections::BTreeMap<String, u32> {
        std::fs::read_dir(dir)
            .expect("pins")
            .filter_map(|e| {
                let e = e.ok()?;
                let m = MapHandle::from_pinned_path(e.path()).ok()?;
                let info = libbpf_rs::MapInfo::new(m.as_fd()).ok()?;
                Some((e.file_name().to_string_lossy().into_owned(), info.info.id))
            })
            .collect()
    };
    let all = || {
        let mut m = ids(&tc);
        m.extend(ids(&pins).into_iter().map(|(k, v)| (format!("lb/{k}"), v)));
        m
    };
    let before = all();
    assert!(
        before.len() > 10 && before.keys().any(|k| k.starts_with("lb/")),
        "{before:?}"
    );
    // Two of its maps as an older version had them: another value size, another type.
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    for (name, ty, value) in [
        ("weir_trace_scratch", MapType::PercpuArray, 8),
        ("weir_trace_flows", MapType::Hash, 40),
    ] {
        let path = tc.join(name);
        std::fs::remove_file(&path).expect("unpin");
        let key = if name == "weir_trace_flows" { 48 } else { 4 };
        let mut old = MapHandle::create(ty, Some(name), key, value, 16, &opts).expect("old map");
        old.pin(&path).expect("pin old map");
    }
    let dp = Datapath::load(&tc, &pins).expect("load over maps of another layout");
    for name in ["weir_trace_scratch", "weir_trace_flows"] {
        let m = MapHandle::from_pinned_path(tc.join(name)).expect("pinned");
        assert_ne!(
            m.value_size(),
            if name == "weir_trace_flows" { 40 } else { 8 },
            "{name}"
        );
    }
    // The old maps set aside are gone once the load succeeded.
    let left: Vec<_> = std::fs::read_dir(&tc)
        .expect("pins")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with("-replaced"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Every other map is the one pinned before (reused, not replaced).
    let after = all();
    for (name, id) in &before {
        let replaced = name == "weir_trace_scratch" || name == "weir_trace_flows";
        assert_eq!(after.get(name) == Some(id), !replaced, "{name}");
    }
    let eps = dp.endpoints().expect("endpoints");
    assert!(
        eps.iter()
            .any(|(ek, ei)| ek.addr == k.addr && ei.ifindex == 42),
        "the compatible map kept its entries: {eps:?}"
    );
    drop(dp);
}
