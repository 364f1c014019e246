//! The per-packet datapath: the tc programs of pod.bpf.c (on each pod's host-side veth) and
//! node.bpf.c (on the node's device), their shared maps pinned under one directory, tcx links
//! pinned per device, and BPF_PROG_TEST_RUN for fixtures and `weir explain`.

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags};

use crate::{as_bytes, from_bytes, lb, BpfError};

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    dead_code,
    unused_imports
)]
mod pod_skel {
    include!(concat!(env!("OUT_DIR"), "/pod.skel.rs"));
}

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    dead_code,
    unused_imports
)]
mod node_skel {
    include!(concat!(env!("OUT_DIR"), "/node.skel.rs"));
}

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    dead_code,
    unused_imports
)]
mod xdp_skel {
    include!(concat!(env!("OUT_DIR"), "/xdp.skel.rs"));
}

pub use pod_skel::types::{
    ct4_entry, ct4_key, ct6_entry, ct6_key, endpoint_info, endpoint_key, ep_policy, flow_event,
    ipcache_info, ipcache_key, metrics_value, node_addr6, node_config, pct_entry, policy_entry,
    policy_key, tunnel_info, tunnel_key4, tunnel_key6, weir_reason,
};

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    dead_code,
    unused_imports
)]
mod xdp_pass_skel {
    include!(concat!(env!("OUT_DIR"), "/xdp_pass.skel.rs"));
}

use node_skel::{NodeSkel, NodeSkelBuilder};
use pod_skel::{PodSkel, PodSkelBuilder};
use xdp_skel::{XdpSkel, XdpSkelBuilder};

/// `endpoint_key.family` for IPv4.
pub const AF_INET: u8 = 4;
/// `endpoint_key.family` for IPv6.
pub const AF_INET6: u8 = 6;
/// `endpoint_info.flags`: deliver through the host stack, no shortcut.
pub const EP_HOST_STACK: u32 = 1;

/// A packet weir's programs dropped for a reason other than policy (`struct drop_event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropEvent {
    /// When (boot clock, nanoseconds).
    pub ts: u64,
    /// `DROP_*`.
    pub reason: u32,
    /// `WEIR_DIR_*` of the hook.
    pub dir: u8,
    /// The device the program ran on.
    pub ifindex: u32,
    /// IP protocol (0 when not IP).
    pub proto: u8,
    /// Source and destination with ports (None when not IP).
    pub src: Option<std::net::SocketAddr>,
    /// The destination.
    pub dst: Option<std::net::SocketAddr>,
    /// The packet's length.
    pub len: u32,
}

impl DropEvent {
    /// A `struct drop_event` (weir/api/datapath.h: 64 bytes, host order but for the
    /// addresses and ports).
    fn decode(d: &[u8]) -> Option<DropEvent> {
        if d.len() < 64 {
            return None;
        }
        let u32_at = |o: usize| u32::from_ne_bytes(d[o..o + 4].try_into().expect("4 bytes"));
        let port_at = |o: usize| u16::from_be_bytes([d[o], d[o + 1]]);
        let family = d[44];
        let addr = |o: usize| -> Option<std::net::IpAddr> {
            match family {
                AF_INET => Some(std::net::Ipv4Addr::new(d[o], d[o + 1], d[o + 2], d[o + 3]).into()),
                AF_INET6 => {
                    let b: [u8; 16] = d[o..o + 16].try_into().ok()?;
                    Some(std::net::Ipv6Addr::from(b).into())
                }
                _ => None,
            }
        };
        let sock = |o: usize, p: usize| addr(o).map(|a| std::net::SocketAddr::new(a, port_at(p)));
        Some(DropEvent {
            ts: u64::from_ne_bytes(d[0..8].try_into().expect("8 bytes")),
            src: sock(8, 40),
            dst: sock(24, 42),
            proto: d[45],
            dir: d[46],
            reason: u32_at(48),
            ifindex: u32_at(52),
            len: u32_at(56),
        })
    }
}

/// Names of the datapath maps (shared by the pod and node programs; the load-balancing maps
/// are the socket layer's, pinned in its directory).
pub const DATAPATH_MAPS: &[&str] = &[
    "weir_endpoints",
    "weir_metrics",
    "weir_ct4",
    "weir_ct6",
    "weir_config",
    "weir_node_addrs",
    "weir_tunnel4",
    "weir_tunnel6",
    "weir_nomasq4",
    "weir_ipcache",
    "weir_policy_cidrs",
    "weir_policy",
    "weir_policy_eps",
    "weir_pct4",
    "weir_pct6",
    "weir_prefilter",
    "weir_trace_flows",
];

/// The rings of the forwarding summaries: the programs write to the one of their CPU (its
/// number modulo their count).
pub const TRACE_RINGS: [&str; 4] = [
    "weir_trace_events",
    "weir_trace_events_1",
    "weir_trace_events_2",
    "weir_trace_events_3",
];

/// Which XDP program a node device gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpProgram {
    /// The prefilter alone (`xdp_prefilter`).
    Prefilter,
    /// The prefilter, then NodePort flows SNATed to other nodes (`xdp_nodeport`).
    NodePort,
}

/// `ep_policy.flags`: isolated for ingress.
pub const EP_POLICY_INGRESS: u32 = 1;
/// `ep_policy.flags`: isolated for egress.
pub const EP_POLICY_EGRESS: u32 = 2;
/// `ep_policy.flags`: programming failed, the isolated directions deny everything.
pub const EP_POLICY_DENY: u32 = 4;
/// `ep_policy.flags`: some entry's peer is "any" (a rule without peers).
pub const EP_POLICY_PEER_ANY: u32 = 8;
/// `ep_policy.flags`: some entry's peer is the cluster or a namespace class.
pub const EP_POLICY_PEER_CLASS: u32 = 16;
/// `ep_policy.flags`: some entry's peer is a CIDR identity.
pub const EP_POLICY_PEER_CIDR: u32 = 32;
/// `ep_policy.flags`: the `EP_POLICY_PEER_*` bits are set (else the datapath tries every
/// lookup, as for a value an older agent wrote).
pub const EP_POLICY_HINTS: u32 = 64;
/// `policy_key.dir` (and `flow_event.dir`): into the pod.
pub const POLICY_INGRESS: u8 = 0;
/// `policy_key.dir`: out of the pod.
pub const POLICY_EGRESS: u8 = 1;
/// Bits of a `policy_key` covering ep, peer and direction: an entry for every protocol.
pub const POLICY_PREFIX_ANY: u32 = 72;
/// `policy_entry.match` / `flow_event.match`: no entry (a denial, or the node's own traffic).
pub const POLICY_MATCH_NONE: u8 = 0;
/// An entry naming a peer, every port.
pub const POLICY_MATCH_L3_ONLY: u8 = 1;
/// An entry naming a peer and ports.
pub const POLICY_MATCH_L3_L4: u8 = 2;
/// An entry naming ports of any peer.
pub const POLICY_MATCH_L4_ONLY: u8 = 3;
/// An entry allowing everything.
pub const POLICY_MATCH_ALL: u8 = 4;

/// Which LPM trie of addresses: pods' and nodes' identities, or ipBlock prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrMap {
    /// `weir_ipcache`.
    Ipcache,
    /// `weir_policy_cidrs`.
    PolicyCidrs,
}

impl AddrMap {
    fn name(self) -> &'static str {
        match self {
            AddrMap::Ipcache => "weir_ipcache",
            AddrMap::PolicyCidrs => "weir_policy_cidrs",
        }
    }
}

/// The `weir_policy` entry of pod `ep` allowing `peer` in direction `dir` on IP protocol
/// `proto` (0: every protocol) and the ports whose first `port_bits` bits are those of `port`
/// (host order; 0 bits: every port).
pub fn policy_key_of(
    ep: u32,
    dir: u8,
    peer: u32,
    proto: u8,
    port: u16,
    port_bits: u8,
) -> policy_key {
    policy_key {
        prefixlen: if proto == 0 {
            POLICY_PREFIX_ANY
        } else {
            POLICY_PREFIX_ANY + 8 + u32::from(port_bits)
        },
        ep,
        peer,
        dir,
        proto,
        dport: port.to_be(),
    }
}

/// The key of an address prefix in `weir_ipcache` / `weir_policy_cidrs`.
pub fn ipcache_key_of(addr: std::net::IpAddr, len: u8) -> ipcache_key {
    let mut k = ipcache_key {
        prefixlen: 32 + u32::from(len),
        ..Default::default()
    };
    match addr {
        std::net::IpAddr::V4(a) => {
            k.family = AF_INET;
            k.addr[0] = u32::from_ne_bytes(a.octets());
        }
        std::net::IpAddr::V6(a) => {
            k.family = AF_INET6;
            k.addr = crate::ip6_words(a);
        }
    }
    k
}

/// `node_config.flags`: VXLAN mode.
pub const CFG_VXLAN: u32 = 1;
/// `node_config.flags`: masquerade pods' flows leaving the cluster.
pub const CFG_MASQUERADE: u32 = 2;
/// `node_config.flags`: drain (under a netfilter dataplane the tc programs stay for the DSR
/// flows established before the switch, and pass every other packet to the host stack).
pub const CFG_DRAIN: u32 = 4;
/// `node_config.flags`: forwarding summaries (into the [`TRACE_RINGS`]).
pub const CFG_TRACE: u32 = 8;

/// Loads xdp_pass.bpf.o (no maps; its open object is leaked, as for every loaded program set).
fn load_xdp_pass() -> Result<xdp_pass_skel::XdpPassSkel<'static>, BpfError> {
    let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
        Box::leak(Box::new(MaybeUninit::uninit()));
    xdp_pass_skel::XdpPassSkelBuilder::default()
        .open(storage)
        .map_err(lb("opening xdp_pass.bpf.o"))?
        .load()
        .map_err(lb("loading xdp_pass.bpf.o"))
}

/// Attaches an XDP program that passes everything to device `ifindex` (in the caller's
/// network namespace), through netlink so that it stays after this process ends. A veth only
/// receives what its peer sends with XDP_TX/XDP_REDIRECT when it has an XDP program itself.
pub fn attach_xdp_pass(ifindex: u32) -> Result<(), BpfError> {
    let skel = load_xdp_pass()?;
    let fd = skel.progs.xdp_pass.as_fd().as_raw_fd();
    // SAFETY: a valid ifindex and program fd; no options.
    let rc = unsafe { libbpf_sys::bpf_xdp_attach(ifindex as i32, fd, 0, std::ptr::null()) };
    if rc < 0 {
        return Err(BpfError::Io {
            path: PathBuf::from(format!("ifindex {ifindex}")),
            source: std::io::Error::from_raw_os_error(-rc),
        });
    }
    Ok(())
}

/// The `struct xdp_md` BPF_PROG_TEST_RUN gives an XDP program for a frame of `len` bytes that
/// arrived on `ifindex`: data 0, data_end, data_meta 0, ingress_ifindex, rx queue 0, egress 0.
fn xdp_test_ctx(len: usize, ifindex: u32) -> [u8; std::mem::size_of::<libbpf_sys::xdp_md>()] {
    let mut ctx = [0u8; std::mem::size_of::<libbpf_sys::xdp_md>()];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// A packet generator: `xdp_tx` run by BPF_PROG_TEST_RUN in live-frame mode transmits a frame
/// out of a device without building an skb, as xdp-trafficgen does (the benchmarks' traffic
/// source: what it costs is small next to what the receiver does).
pub struct XdpGenerator {
    skel: xdp_pass_skel::XdpPassSkel<'static>,
}

impl XdpGenerator {
    /// Loads the generator program.
    pub fn new() -> Result<Self, BpfError> {
        Ok(XdpGenerator {
            skel: load_xdp_pass()?,
        })
    }

    /// Slows the generator down: `iterations` of an empty loop before each frame (0: as fast
    /// as it goes). The rate this gives depends on the CPU; callers measure it.
    pub fn set_pace(&mut self, iterations: u32) {
        if let Some(bss) = self.skel.maps.bss_data.as_deref_mut() {
            bss.tx_spin = iterations;
        }
    }

    /// Transmits `frame` `count` times out of device `ifindex` (of the caller's network
    /// namespace).
    pub fn send(&self, frame: &[u8], ifindex: u32, count: u32) -> Result<(), BpfError> {
        let mut ctx = xdp_test_ctx(frame.len(), ifindex);
        let input = libbpf_rs::ProgramInput {
            context_in: Some(&mut ctx),
            data_in: Some(frame),
            flags: libbpf_sys::BPF_F_TEST_XDP_LIVE_FRAMES,
            repeat: count,
            ..Default::default()
        };
        self.skel
            .progs
            .xdp_tx
            .test_run(input)
            .map_err(lb("BPF_PROG_TEST_RUN (live frames) of xdp_tx"))?;
        Ok(())
    }
}

/// `ct4_entry.flags`: keyed by the reply direction.
pub const CT_F_REPLY: u16 = 1;
/// `ct4_entry.flags`: source-NATed to the node.
pub const CT_F_SNAT: u16 = 2;
/// `ct4_entry.flags`: a reply was seen.
pub const CT_F_SEEN_REPLY: u16 = 4;
/// `ct4_entry.flags`: TCP established.
pub const CT_F_ESTABLISHED: u16 = 8;
/// `ct4_entry.flags`: TCP FIN or RST seen.
pub const CT_F_CLOSING: u16 = 16;
/// `ct4_entry.flags`: direct server return.
pub const CT_F_DSR: u16 = 32;
/// `ct4_entry.flags`: a pod's flow out of the cluster (masquerading, no backend).
pub const CT_F_MASQ: u16 = 64;
/// `CT_F_FIN_CLIENT`: the client sent a FIN.
pub const CT_F_FIN_CLIENT: u16 = 1 << 7;
/// `CT_F_TIME_WAIT`: the backend closed first and holds TIME_WAIT (the entry, and a SNAT
/// port, live `CT_LIFETIME_TCP_TIME_WAIT`).
pub const CT_F_TIME_WAIT: u16 = 1 << 8;
/// `CT_F_RST`: a RST was seen.
pub const CT_F_RST: u16 = 1 << 9;
/// `CT_F_WATCH`: the flow's backend is under outlier detection.
pub const CT_F_WATCH: u16 = 1 << 10;
/// `CT_F_COUNTED`: the outcome of the flow's connect was counted.
pub const CT_F_COUNTED: u16 = 1 << 11;
/// `CT_F_TAKEN`: the flow was taken over from the kernel's conntrack at a dataplane switch
/// (written by the agent; the programs keep the bit).
pub const CT_F_TAKEN: u16 = 1 << 12;

/// Switches the link an earlier agent pinned at `path` to `prog` atomically, so that an upgrade
/// never leaves the device without a program. Returns false when there is none to reuse (a
/// stale pin, whose device is gone, is removed; ifindexes are not reused at once), with the
/// pin's directory made for a new link.
fn reuse_pinned_link(path: &Path, prog: &libbpf_rs::Program<'_>) -> Result<bool, BpfError> {
    if path.exists() {
        match Link::open(path).and_then(|mut l| l.update_prog(prog)) {
            Ok(()) => return Ok(true),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "replacing a stale link");
                let _ = std::fs::remove_file(path);
            }
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| BpfError::Io {
            path: parent.into(),
            source,
        })?;
    }
    Ok(false)
}

/// The boot clock in seconds, as the programs read it (`bpf_ktime_get_boot_ns`).
pub fn boot_seconds() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64
}

/// Where a tc program runs on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Packets the device receives.
    Ingress,
    /// Packets the device sends.
    Egress,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// The tc programs by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcProgram {
    /// Ingress of a pod's host-side veth: what the pod sends.
    FromPod,
    /// Egress of a pod's host-side veth: what the host stack delivers to the pod.
    ToPod,
    /// Ingress of the node's device: what arrives from the network.
    FromNetdev,
}

impl TcProgram {
    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            TcProgram::FromPod => "from_pod",
            TcProgram::ToPod => "to_pod",
            TcProgram::FromNetdev => "from_netdev",
        }
    }

    fn direction(self) -> Direction {
        match self {
            TcProgram::FromPod | TcProgram::FromNetdev => Direction::Ingress,
            TcProgram::ToPod => Direction::Egress,
        }
    }
}

/// The reason codes with their names. The values come from the skeleton (BTF), so a renamed
/// or removed C reason fails to compile here; a test checks that none is missing.
pub const REASONS: &[(weir_reason, &str)] = &[
    (weir_reason::REASON_FORWARD_PEER, "REASON_FORWARD_PEER"),
    (weir_reason::REASON_FORWARD_FIB, "REASON_FORWARD_FIB"),
    (weir_reason::REASON_FORWARD_NEIGH, "REASON_FORWARD_NEIGH"),
    (weir_reason::REASON_PASS_STACK, "REASON_PASS_STACK"),
    (weir_reason::REASON_PASS_NOT_IP, "REASON_PASS_NOT_IP"),
    (weir_reason::REASON_PASS_TTL, "REASON_PASS_TTL"),
    (weir_reason::REASON_TO_POD, "REASON_TO_POD"),
    (weir_reason::REASON_FORWARD_TUNNEL, "REASON_FORWARD_TUNNEL"),
    (weir_reason::REASON_XDP_TX, "REASON_XDP_TX"),
    (weir_reason::REASON_XDP_REDIRECT, "REASON_XDP_REDIRECT"),
    (weir_reason::DROP_INVALID_PACKET, "DROP_INVALID_PACKET"),
    (weir_reason::DROP_HEADER_WRITE, "DROP_HEADER_WRITE"),
    (
        weir_reason::DROP_NO_SERVICE_BACKEND,
        "DROP_NO_SERVICE_BACKEND",
    ),
    (weir_reason::DROP_BACKEND_MISSING, "DROP_BACKEND_MISSING"),
    (weir_reason::DROP_CT_CREATE_FAILED, "DROP_CT_CREATE_FAILED"),
    (weir_reason::DROP_NAT_NO_PORT, "DROP_NAT_NO_PORT"),
    (weir_reason::DROP_SOURCE_RANGE, "DROP_SOURCE_RANGE"),
    (weir_reason::DROP_NO_ROUTE, "DROP_NO_ROUTE"),
    (weir_reason::REASON_POLICY_ALLOWED, "REASON_POLICY_ALLOWED"),
    (weir_reason::REASON_EVENT_LOST, "REASON_EVENT_LOST"),
    (weir_reason::DROP_POLICY_DENIED, "DROP_POLICY_DENIED"),
    (weir_reason::DROP_POLICY_FAILED, "DROP_POLICY_FAILED"),
    (weir_reason::DROP_PREFILTER, "DROP_PREFILTER"),
];

/// A reason code's name as the C enum spells it (e.g. `DROP_INVALID_PACKET`).
pub fn reason_name(code: u8) -> String {
    reason_str(code)
        .map(str::to_string)
        .unwrap_or_else(|| format!("REASON_{code}"))
}

/// [`reason_name`] without an allocation, for the codes the enum has.
pub fn reason_str(code: u8) -> Option<&'static str> {
    REASONS
        .iter()
        .find(|(r, _)| r.0 == code as u32)
        .map(|(_, n)| *n)
}

/// Reason `code` in words: its comment in weir/api/datapath.h (one source for both).
pub fn reason_description(code: u8) -> String {
    static TEXT: std::sync::LazyLock<std::collections::HashMap<String, String>> =
        std::sync::LazyLock::new(|| {
            let h = include_str!("../../../bpf/include/weir/api/datapath.h");
            let body = &h[h.find("enum weir_reason {").expect("enum")..];
            let body = &body[..body.find("};").expect("end")];
            body.lines()
                .filter_map(|l| {
                    let name = l.trim().split([' ', '\t', '=', ',']).next()?;
                    let c = l.split_once("/*")?.1.split_once("*/")?.0.trim();
                    (!name.is_empty()).then(|| (name.to_string(), c.to_string()))
                })
                .collect()
        });
    TEXT.get(&reason_name(code)).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_in_words_come_from_the_header() {
        let code = super::REASONS
            .iter()
            .find(|(_, n)| *n == "DROP_SOURCE_RANGE")
            .unwrap()
            .0
             .0 as u8;
        assert_eq!(
            super::reason_description(code),
            "client outside the loadBalancerSourceRanges"
        );
    }

    #[test]
    fn every_c_reason_has_a_name() {
        let h = include_str!("../../../bpf/include/weir/api/datapath.h");
        let body = &h[h.find("enum weir_reason {").expect("enum")..];
        let body = &body[..body.find("};").expect("end")];
        for line in body.lines().skip(1) {
            let name = line.trim().split([' ', '=', ',']).next().unwrap_or("");
            if name.is_empty() || name.starts_with("/*") || name == "REASON_MAX" {
                continue;
            }
            assert!(
                super::REASONS.iter().any(|(_, n)| *n == name),
                "{name} is missing from REASONS"
            );
        }
    }
}

/// One counter of `weir_metrics`: packets and bytes seen under a reason in a direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// `ingress` or `egress` of the device the program runs on.
    pub direction: &'static str,
    /// The reason code (0-127 verdicts, 130+ drops).
    pub reason: u8,
    /// Its name.
    pub name: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What BPF_PROG_TEST_RUN gave back.
#[derive(Debug, Clone)]
pub struct TestRun {
    /// The program's return value (a tc verdict).
    pub verdict: u32,
    /// The packet after the program.
    pub packet: Vec<u8>,
    /// In explain mode: the reason the packet was counted under.
    pub reason: Option<u8>,
}

/// `skb->mark` of explain packets (`WEIR_MARK_EXPLAIN`): the programs change no state.
pub const MARK_EXPLAIN: u32 = 0x7765_6972;

const METRICS_STRIDE: u32 = 256;

/// The tc datapath: both objects loaded, their maps pinned in one directory.
pub struct Datapath {
    pod: PodSkel<'static>,
    node: NodeSkel<'static>,
    xdp: XdpSkel<'static>,
    pin_dir: PathBuf,
    lb_pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the programs, reusing maps pinned in `pin_dir` (so state survives restarts and
    /// upgrades) and pinning the ones that do not exist yet; the load-balancing maps are the
    /// socket layer's, in `lb_pin_dir`.
    pub fn load(pin_dir: &Path, lb_pin_dir: &Path) -> Result<Datapath, BpfError> {
        let pod = crate::load_pinned(PodSkelBuilder::default(), "pod.bpf.o", pin_dir, lb_pin_dir)?;
        let node = crate::load_pinned(
            NodeSkelBuilder::default(),
            "node.bpf.o",
            pin_dir,
            lb_pin_dir,
        )?;
        let xdp = crate::load_pinned(XdpSkelBuilder::default(), "xdp.bpf.o", pin_dir, lb_pin_dir)?;
        Ok(Datapath {
            pod,
            node,
            xdp,
            pin_dir: pin_dir.to_path_buf(),
            lb_pin_dir: lb_pin_dir.to_path_buf(),
        })
    }

    /// The directory of the load-balancing maps (the socket layer's).
    pub fn lb_pin_dir(&self) -> &Path {
        &self.lb_pin_dir
    }

    fn prog(&self, p: TcProgram) -> &libbpf_rs::ProgramMut<'static> {
        match p {
            TcProgram::FromPod => &self.pod.progs.from_pod,
            TcProgram::ToPod => &self.pod.progs.to_pod,
            TcProgram::FromNetdev => &self.node.progs.from_netdev,
        }
    }

    fn map(&self, name: &str) -> &libbpf_rs::Map<'static> {
        match name {
            "weir_endpoints" => &self.pod.maps.weir_endpoints,
            "weir_metrics" => &self.pod.maps.weir_metrics,
            "weir_ct4" => &self.pod.maps.weir_ct4,
            "weir_ct6" => &self.pod.maps.weir_ct6,
            "weir_snat6" => &self.pod.maps.weir_snat6,
            "weir_config" => &self.pod.maps.weir_config,
            "weir_node_addrs" => &self.pod.maps.weir_node_addrs,
            "weir_tunnel4" => &self.pod.maps.weir_tunnel4,
            "weir_tunnel6" => &self.pod.maps.weir_tunnel6,
            "weir_nomasq4" => &self.pod.maps.weir_nomasq4,
            "weir_ipcache" => &self.pod.maps.weir_ipcache,
            "weir_policy_cidrs" => &self.pod.maps.weir_policy_cidrs,
            "weir_policy" => &self.pod.maps.weir_policy,
            "weir_policy_eps" => &self.pod.maps.weir_policy_eps,
            "weir_policy_rev" => &self.pod.maps.weir_policy_rev,
            "weir_pct4" => &self.pod.maps.weir_pct4,
            "weir_pct6" => &self.pod.maps.weir_pct6,
            "weir_events" => &self.pod.maps.weir_events,
            "weir_drop_events" => &self.pod.maps.weir_drop_events,
            "weir_drop_lost" => &self.pod.maps.weir_drop_lost,
            "weir_trace_flows" => &self.pod.maps.weir_trace_flows,
            "weir_trace_events" => &self.pod.maps.weir_trace_events,
            "weir_trace_events_1" => &self.pod.maps.weir_trace_events_1,
            "weir_trace_events_2" => &self.pod.maps.weir_trace_events_2,
            "weir_trace_events_3" => &self.pod.maps.weir_trace_events_3,
            "weir_trace_lost" => &self.pod.maps.weir_trace_lost,
            "weir_prefilter" => &self.xdp.maps.weir_prefilter,
            "weir_prefilter_stats" => &self.xdp.maps.weir_prefilter_stats,
            other => panic!("no datapath map named {other}"),
        }
    }

    fn link_path(&self, ifindex: u32, dir: Direction) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("tc-{ifindex}-{}", dir.name()))
    }

    /// Attaches `prog` to device `ifindex` (in the caller's network namespace) with a pinned
    /// tcx link. A link pinned by an earlier agent is switched to the new program atomically,
    /// so an upgrade never leaves the device without a program.
    pub fn attach(&self, prog: TcProgram, ifindex: u32) -> Result<(), BpfError> {
        let dir = prog.direction();
        let path = self.link_path(ifindex, dir);
        let p = self.prog(prog);
        if reuse_pinned_link(&path, p)? {
            return Ok(());
        }
        let attach_type = match dir {
            Direction::Ingress => libbpf_sys::BPF_TCX_INGRESS,
            Direction::Egress => libbpf_sys::BPF_TCX_EGRESS,
        };
        let opts = libbpf_sys::bpf_link_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _,
            ..Default::default()
        };
        // SAFETY: a valid program fd, a plain ifindex and a properly sized options struct.
        let fd = unsafe {
            libbpf_sys::bpf_link_create(p.as_fd().as_raw_fd(), ifindex as i32, attach_type, &opts)
        };
        if fd < 0 {
            return Err(BpfError::Io {
                path: path.clone(),
                source: std::io::Error::from_raw_os_error(-fd),
            });
        }
        // SAFETY: bpf_link_create returned a new file descriptor that nothing else owns.
        let link = unsafe { OwnedFd::from_raw_fd(fd) };
        let cpath = std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|_| {
            BpfError::Io {
                path: path.clone(),
                source: std::io::Error::other("path contains a NUL byte"),
            }
        })?;
        // SAFETY: a valid link fd and a NUL-terminated path.
        let rc = unsafe { libbpf_sys::bpf_obj_pin(link.as_raw_fd(), cpath.as_ptr()) };
        if rc < 0 {
            return Err(BpfError::Io {
                path,
                source: std::io::Error::from_raw_os_error(-rc),
            });
        }
        Ok(())
    }

    /// Detaches whatever weir attached to device `ifindex` (unpins its links); links of a
    /// device that no longer exists are just unpinned.
    pub fn detach(&self, ifindex: u32) {
        let paths = [
            self.link_path(ifindex, Direction::Ingress),
            self.link_path(ifindex, Direction::Egress),
            self.xdp_link_path(ifindex),
        ];
        for path in paths {
            if let Ok(l) = Link::open(&path) {
                let _ = l.detach();
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    fn xdp_link_path(&self, ifindex: u32) -> PathBuf {
        self.pin_dir.join("links").join(format!("xdp-{ifindex}"))
    }

    /// Attaches XDP program `which` to device `ifindex` (native mode) with a pinned link, or
    /// switches an earlier agent's link to it.
    pub fn attach_xdp(&self, ifindex: u32, which: XdpProgram) -> Result<(), BpfError> {
        let path = self.xdp_link_path(ifindex);
        let prog = match which {
            XdpProgram::Prefilter => &self.xdp.progs.xdp_prefilter,
            XdpProgram::NodePort => &self.xdp.progs.xdp_nodeport,
        };
        if reuse_pinned_link(&path, prog)? {
            return Ok(());
        }
        let mut link = prog
            .attach_xdp(ifindex as i32)
            .map_err(lb(format!("attaching XDP to ifindex {ifindex}")))?;
        link.pin(&path)
            .map_err(lb(format!("pinning link {}", path.display())))?;
        Ok(())
    }

    /// Detaches the XDP program from device `ifindex`.
    pub fn detach_xdp(&self, ifindex: u32) {
        let path = self.xdp_link_path(ifindex);
        if let Ok(l) = Link::open(&path) {
            let _ = l.detach();
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Runs XDP program `which` once on `packet` as if it had arrived on `ingress_ifindex`
    /// (BPF_PROG_TEST_RUN; the FIB is the caller's namespace's). Returns the XDP verdict and
    /// the packet after the program.
    pub fn test_run_xdp(
        &self,
        which: XdpProgram,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<(u32, Vec<u8>), BpfError> {
        let mut ctx = xdp_test_ctx(packet.len(), ingress_ifindex);
        let mut out = vec![0u8; packet.len() + 256];
        let input = libbpf_rs::ProgramInput {
            context_in: Some(&mut ctx),
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let prog = match which {
            XdpProgram::Prefilter => &self.xdp.progs.xdp_prefilter,
            XdpProgram::NodePort => &self.xdp.progs.xdp_nodeport,
        };
        let output = prog
            .test_run(input)
            .map_err(lb(format!("BPF_PROG_TEST_RUN of {which:?} XDP program")))?;
        let verdict = output.return_value;
        let n = output.data.as_ref().map(|d| d.len()).unwrap_or(0);
        out.truncate(n);
        Ok((verdict, out))
    }

    /// The devices with pinned tc links, by ifindex.
    pub fn attached(&self) -> Vec<u32> {
        let mut out: Vec<u32> = std::fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("tc-")?.split('-').next()?.parse().ok()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Writes a local endpoint.
    pub fn put_endpoint(&self, key: &endpoint_key, info: &endpoint_info) -> Result<(), BpfError> {
        self.map("weir_endpoints")
            .update(as_bytes(key), as_bytes(info), MapFlags::ANY)
            .map_err(lb("updating map weir_endpoints"))
    }

    /// Removes a local endpoint; a missing one is not an error.
    pub fn remove_endpoint(&self, key: &endpoint_key) -> Result<(), BpfError> {
        match self.map("weir_endpoints").delete(as_bytes(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(lb("deleting from map weir_endpoints")(e)),
        }
    }

    /// Every local endpoint in the map.
    pub fn endpoints(&self) -> Result<Vec<(endpoint_key, endpoint_info)>, BpfError> {
        crate::map_entries(self.map("weir_endpoints"), "weir_endpoints")
    }

    /// (entries, capacity) of map `name` (one of [`DATAPATH_MAPS`]).
    pub fn usage(&self, name: &str) -> (usize, u32) {
        let map = self.map(name);
        let n = match name {
            "weir_metrics" => self.metrics().map(|m| m.len()).unwrap_or(0),
            "weir_config" => 1,
            _ => map.keys().count(),
        };
        (n, map.max_entries())
    }

    /// The kernel memory map `name` takes (the `memlock` of its fdinfo), in bytes.
    pub fn map_memory(&self, name: &str) -> Option<u64> {
        let fd = self.map(name).as_fd().as_raw_fd();
        std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))?
            .trim()
            .parse()
            .ok()
    }

    /// The capacity of map `name` (one of [`DATAPATH_MAPS`]).
    pub fn capacity(&self, name: &str) -> u32 {
        self.map(name).max_entries()
    }

    /// Writes the node-wide settings.
    pub fn set_config(&self, cfg: &node_config) -> Result<(), BpfError> {
        self.map("weir_config")
            .update(&0u32.to_ne_bytes(), as_bytes(cfg), MapFlags::ANY)
            .map_err(lb("updating map weir_config"))
    }

    /// The node-wide settings last written (an earlier agent's, after a restart).
    pub fn config(&self) -> Result<node_config, BpfError> {
        let v = self
            .map("weir_config")
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("reading map weir_config"))?;
        Ok(v.map(|b| crate::from_bytes::<node_config>(&b))
            .unwrap_or_default())
    }

    /// Makes `weir_node_addrs` hold exactly `addrs` (the node's own addresses, on which a
    /// NodePort answers).
    pub fn set_node_addrs(&self, addrs: &[endpoint_key]) -> Result<(), BpfError> {
        let map = self.map("weir_node_addrs");
        let want: Vec<Vec<u8>> = addrs.iter().map(|k| as_bytes(k).to_vec()).collect();
        for k in &want {
            map.update(k, &1u32.to_ne_bytes(), MapFlags::ANY)
                .map_err(lb("updating map weir_node_addrs"))?;
        }
        self.remove_other_keys("weir_node_addrs", &want);
        Ok(())
    }

    /// Makes the tunnel maps hold exactly `routes`: other nodes' pod CIDRs and the underlay
    /// IPv4 address of the node that has each.
    pub fn set_tunnel_routes(
        &self,
        routes: &[(std::net::IpAddr, u8, std::net::Ipv4Addr)],
    ) -> Result<(), BpfError> {
        let mut want4: Vec<Vec<u8>> = Vec::new();
        let mut want6: Vec<Vec<u8>> = Vec::new();
        for (net, len, node) in routes {
            let v = tunnel_info {
                node: u32::from_ne_bytes(node.octets()),
                ..Default::default()
            };
            match net {
                std::net::IpAddr::V4(a) => {
                    let k = tunnel_key4 {
                        prefixlen: *len as u32,
                        addr: u32::from_ne_bytes(a.octets()),
                    };
                    self.map("weir_tunnel4")
                        .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
                        .map_err(lb("updating map weir_tunnel4"))?;
                    want4.push(as_bytes(&k).to_vec());
                }
                std::net::IpAddr::V6(a) => {
                    let k = tunnel_key6 {
                        prefixlen: *len as u32,
                        addr: crate::ip6_words(*a),
                    };
                    self.map("weir_tunnel6")
                        .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
                        .map_err(lb("updating map weir_tunnel6"))?;
                    want6.push(as_bytes(&k).to_vec());
                }
            }
        }
        for (name, want) in [("weir_tunnel4", want4), ("weir_tunnel6", want6)] {
            self.remove_other_keys(name, &want);
        }
        Ok(())
    }

    /// Makes `weir_nomasq4` hold exactly `cidrs`: the IPv4 destinations pods reach with their
    /// own address (every node's pod CIDR); flows to anything else are masqueraded when the
    /// node config says so.
    pub fn set_nomasq_cidrs(&self, cidrs: &[(std::net::Ipv4Addr, u8)]) -> Result<(), BpfError> {
        let mut want: Vec<Vec<u8>> = Vec::new();
        for (net, len) in cidrs {
            let k = tunnel_key4 {
                prefixlen: *len as u32,
                addr: u32::from_ne_bytes(net.octets()),
            };
            self.map("weir_nomasq4")
                .update(as_bytes(&k), &1u32.to_ne_bytes(), MapFlags::ANY)
                .map_err(lb("updating map weir_nomasq4"))?;
            want.push(as_bytes(&k).to_vec());
        }
        self.remove_other_keys("weir_nomasq4", &want);
        Ok(())
    }

    /// Deletes the keys of map `name` that are not in `want`.
    fn remove_other_keys(&self, name: &str, want: &[Vec<u8>]) {
        let map = self.map(name);
        let want: std::collections::HashSet<&[u8]> = want.iter().map(Vec::as_slice).collect();
        let stale: Vec<Vec<u8>> = map
            .keys()
            .filter(|k| !want.contains(k.as_slice()))
            .collect();
        for k in stale {
            let _ = map.delete(&k);
        }
    }

    /// Every conntrack entry.
    pub fn ct_entries(&self) -> Result<Vec<(ct4_key, ct4_entry)>, BpfError> {
        crate::map_entries(self.map("weir_ct4"), "weir_ct4")
    }

    fn put<K: Copy, V: Copy>(&self, name: &str, key: &K, value: &V) -> Result<(), BpfError> {
        self.map(name)
            .update(as_bytes(key), as_bytes(value), MapFlags::ANY)
            .map_err(lb(&format!("updating map {name}")))
    }

    /// Writes a conntrack entry (the flows a switch takes over from the kernel's conntrack).
    pub fn ct_put(&self, key: &ct4_key, e: &ct4_entry) -> Result<(), BpfError> {
        self.put("weir_ct4", key, e)
    }

    /// Writes an IPv6 conntrack entry.
    pub fn ct6_put(&self, key: &ct6_key, e: &ct6_entry) -> Result<(), BpfError> {
        self.put("weir_ct6", key, e)
    }

    /// Writes a policy conntrack entry.
    pub fn pct4_put(&self, key: &ct4_key, e: &pct_entry) -> Result<(), BpfError> {
        self.put("weir_pct4", key, e)
    }

    /// Writes an IPv6 policy conntrack entry.
    pub fn pct6_put(&self, key: &ct6_key, e: &pct_entry) -> Result<(), BpfError> {
        self.put("weir_pct6", key, e)
    }

    /// Every IPv6 conntrack entry.
    pub fn ct6_entries(&self) -> Result<Vec<(ct6_key, ct6_entry)>, BpfError> {
        crate::map_entries(self.map("weir_ct6"), "weir_ct6")
    }

    /// The IPv4 DSR flows still open (entries with `CT_F_DSR`, live at `now`, boot clock
    /// seconds, neither closing nor reset): what a node draining after a switch to netfilter
    /// waits for.
    pub fn dsr_flows_open(&self, now: u64) -> Result<usize, BpfError> {
        Ok(self
            .ct_entries()?
            .iter()
            .filter(|(_, v)| {
                v.flags & CT_F_DSR != 0 && v.flags & CT_F_CLOSING == 0 && v.expires >= now
            })
            .count())
    }

    /// Removes every conntrack entry but the live IPv4 DSR ones (netfilter has no state for
    /// those: a switch back to eBPF while they drain keeps them).
    pub fn ct_flush_but_dsr(&self, now: u64) -> Result<usize, BpfError> {
        self.ct_remove(|v| v.flags & CT_F_DSR == 0 || v.expires < now, |_| true)
    }

    /// Removes the conntrack entries (IPv4 and IPv6) that expired before `now` (boot clock
    /// seconds), or all of them with `all`. Returns how many were removed.
    pub fn ct_gc(&self, now: u64, all: bool) -> Result<usize, BpfError> {
        self.ct_remove(|v| all || v.expires < now, |expires| all || expires < now)
    }

    /// Removes the conntrack entries `ct4` picks (IPv4 service conntrack) and, of the others
    /// (IPv6 service conntrack, policy conntrack of both families), those whose expiry
    /// (boot clock seconds) `other` picks. Returns how many were removed.
    fn ct_remove(
        &self,
        ct4: impl Fn(&ct4_entry) -> bool,
        other: impl Fn(u64) -> bool,
    ) -> Result<usize, BpfError> {
        fn stale<K: Copy, V>(entries: Vec<(K, V)>, expired: impl Fn(&V) -> bool) -> Vec<Vec<u8>> {
            entries
                .iter()
                .filter(|(_, v)| expired(v))
                .map(|(k, _)| as_bytes(k).to_vec())
                .collect()
        }
        let maps = [
            ("weir_ct4", stale(self.ct_entries()?, &ct4)),
            ("weir_ct6", stale(self.ct6_entries()?, |v| other(v.expires))),
            (
                "weir_pct4",
                stale(self.pct4_entries()?, |v| other(v.expires)),
            ),
            (
                "weir_pct6",
                stale(self.pct6_entries()?, |v| other(v.expires)),
            ),
        ];
        let mut removed = 0;
        for (name, keys) in maps {
            for k in keys {
                match self.map(name).delete(&k) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                    Err(e) => return Err(lb("deleting a conntrack entry")(e)),
                }
            }
        }
        Ok(removed)
    }

    /// Writes the node's IPv6 address for SNAT (None: IPv6 flows to other nodes' backends
    /// are dropped, `DROP_NAT_NO_PORT`).
    pub fn set_snat6(&self, addr: Option<std::net::Ipv6Addr>) -> Result<(), BpfError> {
        let v = node_addr6 {
            addr: addr.map(crate::ip6_words).unwrap_or_default(),
        };
        self.map("weir_snat6")
            .update(&0u32.to_ne_bytes(), as_bytes(&v), MapFlags::ANY)
            .map_err(lb("updating map weir_snat6"))
    }

    /// Makes `map` hold exactly `entries` (prefix, identity, namespace class).
    pub fn set_addr_map(
        &self,
        map: AddrMap,
        entries: &[(std::net::IpAddr, u8, ipcache_info)],
    ) -> Result<(), BpfError> {
        let name = map.name();
        let mut want: Vec<Vec<u8>> = Vec::with_capacity(entries.len());
        for (addr, len, info) in entries {
            let k = ipcache_key_of(*addr, *len);
            self.map(name)
                .update(as_bytes(&k), as_bytes(info), MapFlags::ANY)
                .map_err(lb(format!("updating map {name}")))?;
            want.push(as_bytes(&k).to_vec());
        }
        self.remove_other_keys(name, &want);
        Ok(())
    }

    /// Every entry of `map`.
    pub fn addr_map(&self, map: AddrMap) -> Result<Vec<(ipcache_key, ipcache_info)>, BpfError> {
        crate::map_entries(self.map(map.name()), map.name())
    }

    /// Puts `net` (a canonical prefix) into the prefilter with counter slot `slot`, whose
    /// counters start at zero.
    pub fn prefilter_put(&self, net: ipnet::IpNet, slot: u32) -> Result<(), BpfError> {
        let zero = vec![
            vec![0u8; std::mem::size_of::<metrics_value>()];
            libbpf_rs::num_possible_cpus().map_err(lb("counting CPUs"))?
        ];
        self.map("weir_prefilter_stats")
            .update_percpu(&slot.to_ne_bytes(), &zero, MapFlags::ANY)
            .map_err(lb("updating map weir_prefilter_stats"))?;
        let k = ipcache_key_of(net.network(), net.prefix_len());
        self.map("weir_prefilter")
            .update(as_bytes(&k), &slot.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("updating map weir_prefilter"))
    }

    /// Takes `net` out of the prefilter; a missing one is not an error.
    pub fn prefilter_delete(&self, net: ipnet::IpNet) -> Result<(), BpfError> {
        let k = ipcache_key_of(net.network(), net.prefix_len());
        match self.map("weir_prefilter").delete(as_bytes(&k)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(lb("deleting from map weir_prefilter")(e)),
        }
    }

    /// Every prefix of the prefilter with its counter slot and the packets and bytes it
    /// dropped.
    pub fn prefilter_entries(&self) -> Result<Vec<(ipnet::IpNet, u32, u64, u64)>, BpfError> {
        let mut out = Vec::new();
        for k in self.map("weir_prefilter").keys() {
            let Some(v) = self
                .map("weir_prefilter")
                .lookup(&k, MapFlags::ANY)
                .map_err(lb("reading map weir_prefilter"))?
            else {
                continue;
            };
            let key: ipcache_key = from_bytes(&k);
            let slot: u32 = from_bytes(&v);
            let len = (key.prefixlen - 32) as u8;
            let addr = crate::ip_from_words(key.family, key.addr);
            let Ok(net) = ipnet::IpNet::new(addr, len) else {
                continue; // not a key this code writes
            };
            let (mut packets, mut bytes) = (0, 0);
            if let Some(per_cpu) = self
                .map("weir_prefilter_stats")
                .lookup_percpu(&slot.to_ne_bytes(), MapFlags::ANY)
                .map_err(lb("reading map weir_prefilter_stats"))?
            {
                for v in per_cpu {
                    let m: metrics_value = from_bytes(&v);
                    packets += m.packets;
                    bytes += m.bytes;
                }
            }
            out.push((net, slot, packets, bytes));
        }
        out.sort();
        Ok(out)
    }

    /// Adds (or rewrites the value of) one policy entry.
    pub fn policy_put(&self, key: &policy_key, value: &policy_entry) -> Result<(), BpfError> {
        self.map("weir_policy")
            .update(as_bytes(key), as_bytes(value), MapFlags::ANY)
            .map_err(lb("updating map weir_policy"))
    }

    /// Removes one policy entry; a missing one is not an error.
    pub fn policy_delete(&self, key: &policy_key) -> Result<(), BpfError> {
        match self.map("weir_policy").delete(as_bytes(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(lb("deleting from map weir_policy")(e)),
        }
    }

    /// Every policy entry.
    pub fn policy_entries(&self) -> Result<Vec<(policy_key, policy_entry)>, BpfError> {
        crate::map_entries(self.map("weir_policy"), "weir_policy")
    }

    /// Writes (or with `None` removes) the policy state of the pod at `ifindex`.
    pub fn set_ep_policy(&self, ifindex: u32, v: Option<&ep_policy>) -> Result<(), BpfError> {
        let map = self.map("weir_policy_eps");
        match v {
            Some(v) => map
                .update(&ifindex.to_ne_bytes(), as_bytes(v), MapFlags::ANY)
                .map_err(lb("updating map weir_policy_eps")),
            None => match map.delete(&ifindex.to_ne_bytes()) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(lb("deleting from map weir_policy_eps")(e)),
            },
        }
    }

    /// Every pod's policy state, by host-side ifindex.
    pub fn ep_policies(&self) -> Result<Vec<(u32, ep_policy)>, BpfError> {
        crate::map_entries(self.map("weir_policy_eps"), "weir_policy_eps")
    }

    /// The policy revision flows' verdicts are kept for.
    pub fn policy_revision(&self) -> Result<u32, BpfError> {
        let v = self
            .map("weir_policy_rev")
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("reading map weir_policy_rev"))?;
        Ok(v.map(|b| crate::from_bytes::<u32>(&b)).unwrap_or(0))
    }

    /// Sets the policy revision: every tracked flow's next packet is judged again.
    pub fn set_policy_revision(&self, rev: u32) -> Result<(), BpfError> {
        self.map("weir_policy_rev")
            .update(&0u32.to_ne_bytes(), &rev.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("updating map weir_policy_rev"))
    }

    /// Every IPv4 policy conntrack entry.
    pub fn pct4_entries(&self) -> Result<Vec<(ct4_key, pct_entry)>, BpfError> {
        crate::map_entries(self.map("weir_pct4"), "weir_pct4")
    }

    /// Every IPv6 policy conntrack entry.
    pub fn pct6_entries(&self) -> Result<Vec<(ct6_key, pct_entry)>, BpfError> {
        crate::map_entries(self.map("weir_pct6"), "weir_pct6")
    }

    /// A reader of the policy verdict events (`weir_events`); `f` gets each event.
    pub fn events<F: FnMut(&flow_event) + 'static>(
        &self,
        mut f: F,
    ) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
        let map = self.map("weir_events");
        crate::ring_reader(&[map], "reading map weir_events", move |data: &[u8]| {
            if data.len() >= std::mem::size_of::<flow_event>() {
                f(&crate::from_bytes::<flow_event>(data));
            }
        })
    }

    /// A reader of the drop events (drops for reasons other than policy), calling `f` with
    /// each (poll it on the thread that made it).
    pub fn drop_events<F: FnMut(&DropEvent) + 'static>(
        &self,
        mut f: F,
    ) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
        let map = self.map("weir_drop_events");
        crate::ring_reader(
            &[map],
            "reading map weir_drop_events",
            move |data: &[u8]| {
                if let Some(ev) = DropEvent::decode(data) {
                    f(&ev);
                }
            },
        )
    }

    /// Drop events the full ring buffer refused, per reason (name), summed over CPUs.
    pub fn drops_lost(&self) -> Result<Vec<(String, u64)>, BpfError> {
        self.lost_per_reason(
            "weir_drop_lost",
            weir_reason::DROP_INVALID_PACKET.0..weir_reason::REASON_MAX.0,
        )
    }

    /// The non-zero counts of a per-CPU array of refused events (`map`), per reason in
    /// `reasons`.
    fn lost_per_reason(
        &self,
        map: &str,
        reasons: std::ops::Range<u32>,
    ) -> Result<Vec<(String, u64)>, BpfError> {
        let what = format!("reading {map}");
        let map = self.map(map);
        let mut out = Vec::new();
        for reason in reasons {
            let per_cpu = map
                .lookup_percpu(&reason.to_ne_bytes(), MapFlags::ANY)
                .map_err(lb(&what))?
                .unwrap_or_default();
            let n: u64 = per_cpu.iter().map(|v| from_bytes::<u64>(v)).sum();
            if n > 0 {
                out.push((reason_name(reason as u8), n));
            }
        }
        Ok(out)
    }

    /// A reader of the forwarding summaries (the rings of [`TRACE_RINGS`], read together),
    /// calling `f` with each (poll it on the thread that made it).
    pub fn trace_events<F: FnMut(crate::events::TraceEvent) + 'static>(
        &self,
        mut f: F,
    ) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
        self.trace_records(move |data| {
            if let Some(ev) = crate::events::TraceEvent::decode(data) {
                f(ev);
            }
        })
    }

    /// A reader of the forwarding summaries as the programs write them (a `struct
    /// trace_event4` of 64 bytes or a `struct trace_event` of 120: see
    /// [`crate::events::TraceEvent::decode`]), calling `f` with each record's bytes (poll it
    /// on the thread that made it).
    pub fn trace_records<F: FnMut(&[u8]) + 'static>(
        &self,
        f: F,
    ) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
        let maps = TRACE_RINGS.map(|name| self.map(name) as &dyn MapCore);
        crate::ring_reader(&maps, "reading the forwarding summaries", f)
    }

    /// Forwarding summaries their full ring buffers refused, per reason (name), summed over
    /// CPUs.
    pub fn traces_lost(&self) -> Result<Vec<(String, u64)>, BpfError> {
        self.lost_per_reason("weir_trace_lost", 0..weir_reason::REASON_POLICY_ALLOWED.0)
    }

    /// Packets and bytes of one `weir_metrics` slot, summed over CPUs.
    fn metric_at(&self, idx: u32) -> Result<(u64, u64), BpfError> {
        let per_cpu = self
            .map("weir_metrics")
            .lookup_percpu(&idx.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("reading weir_metrics"))?;
        let (mut packets, mut bytes) = (0u64, 0u64);
        for v in per_cpu.into_iter().flatten() {
            let m: metrics_value = from_bytes(&v);
            packets += m.packets;
            bytes += m.bytes;
        }
        Ok((packets, bytes))
    }

    /// The packets (or events) counted under `reason`, both directions.
    pub fn metric_packets(&self, reason: weir_reason) -> Result<u64, BpfError> {
        Ok(self.metric_at(reason.0)?.0 + self.metric_at(METRICS_STRIDE + reason.0)?.0)
    }

    /// Every non-zero counter, summed over CPUs.
    pub fn metrics(&self) -> Result<Vec<Metric>, BpfError> {
        let mut out = Vec::new();
        for idx in 0..self.map("weir_metrics").max_entries() {
            let (packets, bytes) = self.metric_at(idx)?;
            if packets == 0 {
                continue;
            }
            let reason = (idx % METRICS_STRIDE) as u8;
            out.push(Metric {
                direction: if idx / METRICS_STRIDE == 0 {
                    "ingress"
                } else {
                    "egress"
                },
                reason,
                name: reason_name(reason),
                packets,
                bytes,
            });
        }
        Ok(out)
    }

    /// Runs `prog` once on `packet` (an Ethernet frame) with BPF_PROG_TEST_RUN, as if it had
    /// arrived on `ingress_ifindex`. Helpers that consult the kernel (the FIB) see the caller's
    /// network namespace. Redirects are not carried out: the verdict says what would happen.
    pub fn test_run(
        &self,
        prog: TcProgram,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<TestRun, BpfError> {
        self.run_packet(prog, packet, ingress_ifindex, false, 1)
            .map(|(r, _)| r)
    }

    /// Runs `prog` on `packet` `repeat` times in the kernel (for benchmarks: the same skb
    /// each time, state and counters as for real packets). Returns the last run's verdict and
    /// the average time of a run.
    pub fn test_run_repeat(
        &self,
        prog: TcProgram,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), BpfError> {
        self.run_packet(prog, packet, ingress_ifindex, false, repeat)
            .map(|(r, d)| (r.verdict, d))
    }

    /// Like [`Datapath::test_run`], for `weir explain`: the packet carries
    /// [`MARK_EXPLAIN`], so the programs write no conntrack or affinity entry and move no
    /// counter, and the reason they would count it under comes back.
    pub fn explain(
        &self,
        prog: TcProgram,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<TestRun, BpfError> {
        self.run_packet(prog, packet, ingress_ifindex, true, 1)
            .map(|(r, _)| r)
    }

    fn run_packet(
        &self,
        prog: TcProgram,
        packet: &[u8],
        ingress_ifindex: u32,
        explain: bool,
        repeat: u32,
    ) -> Result<(TestRun, std::time::Duration), BpfError> {
        type Ctx = pod_skel::types::__sk_buff;
        // The kernel refuses a context with any byte set outside the fields it accepts, so
        // padding must be zero too: start from zeroed memory, not `Default`.
        // SAFETY: __sk_buff is plain data (integers and a raw pointer): all-zero is valid.
        let mut ctx: Ctx = unsafe { std::mem::zeroed() };
        ctx.ingress_ifindex = ingress_ifindex;
        ctx.ifindex = ingress_ifindex;
        ctx.mark = if explain { MARK_EXPLAIN } else { 0 };
        // SAFETY: as above.
        let mut ctx_out: Ctx = unsafe { std::mem::zeroed() };
        let mut out = vec![0u8; packet.len() + 256];
        let mut input = libbpf_rs::ProgramInput::default();
        let size = std::mem::size_of::<Ctx>();
        // SAFETY: __sk_buff is a plain C struct; the kernel reads and writes its bytes.
        let (ctx_in_bytes, ctx_out_bytes) = unsafe {
            (
                std::slice::from_raw_parts_mut((&mut ctx as *mut Ctx).cast::<u8>(), size),
                std::slice::from_raw_parts_mut((&mut ctx_out as *mut Ctx).cast::<u8>(), size),
            )
        };
        input.context_in = Some(ctx_in_bytes);
        input.context_out = Some(ctx_out_bytes);
        input.data_in = Some(packet);
        input.data_out = Some(&mut out);
        input.repeat = repeat;
        let output = self
            .prog(prog)
            .test_run(input)
            .map_err(lb(format!("BPF_PROG_TEST_RUN of {}", prog.name())))?;
        let verdict = output.return_value;
        let duration = output.duration;
        let n = output.data.as_ref().map(|d| d.len()).unwrap_or(0);
        out.truncate(n);
        let reason = (explain && ctx_out.cb[0] > 0).then(|| (ctx_out.cb[0] - 1) as u8);
        Ok((
            TestRun {
                verdict,
                packet: out,
                reason,
            },
            duration,
        ))
    }

    /// Programs with their kernel ids and run statistics, for status.
    pub fn programs(&self) -> Vec<crate::ProgramInfo> {
        let mut out: Vec<crate::ProgramInfo> =
            [TcProgram::FromPod, TcProgram::ToPod, TcProgram::FromNetdev]
                .into_iter()
                .map(|p| crate::prog_info(p.name(), self.prog(p).as_fd().as_raw_fd()))
                .collect();
        out.push(crate::prog_info(
            "xdp_nodeport",
            self.xdp.progs.xdp_nodeport.as_fd().as_raw_fd(),
        ));
        out.push(crate::prog_info(
            "xdp_prefilter",
            self.xdp.progs.xdp_prefilter.as_fd().as_raw_fd(),
        ));
        out
    }

    /// Detaches every pinned link and removes the pinned maps under `pin_dir`.
    pub fn remove_pins(pin_dir: &Path) -> Result<(), BpfError> {
        crate::remove_pin_dir(pin_dir)
    }
}
