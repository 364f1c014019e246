//! TCP health (`bpf/tcp_health.bpf.c`): per-namespace counters of retransmits, resets,
//! connects, failed connects, connect time and smoothed RTT, from the TCP and socket
//! tracepoints. The namespaces watched (the node's, each local pod's) are given slots by the
//! caller. The programs are BTF-typed tracepoints (tp_btf): libbpf relocates the fields they
//! read against the running kernel's BTF, and the verifier checks every read.
//! A watched namespace's client sockets are counted per peer too (the address and port they
//! connected to: a Service's backend when the socket layer translated the connect).

use std::mem::MaybeUninit;
use std::path::Path;

use libbpf_rs::btf::{Btf, BtfKind};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags};

use crate::kernel_btf::{btf_err, tracepoint_args};
use crate::{from_bytes, lb, BpfError};

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    dead_code,
    unused_imports
)]
mod tcp_health_skel {
    include!(concat!(env!("OUT_DIR"), "/tcp_health.skel.rs"));
}

pub use tcp_health_skel::types::tcp_counters;
use tcp_health_skel::types::{tcp_netns_slot, tcp_peer_key};
use tcp_health_skel::{TcpHealthSkel, TcpHealthSkelBuilder};

/// How many namespaces can be watched.
pub const SLOTS: u32 = 4096;

/// The programs, attached (unless detached with [`TcpHealth::set_attached`]).
pub struct TcpHealth {
    skel: TcpHealthSkel<'static>,
    links: Vec<Link>,
}

/// Checks that `inet_sock_set_state`'s arguments are what the program reads: the socket,
/// then the old and new states (two ints).
fn state_args(btf: &Btf) -> Result<(), BpfError> {
    let args = tracepoint_args(btf, "inet_sock_set_state")?;
    let kinds: Vec<(BtfKind, Option<&str>)> = args
        .iter()
        .map(|a| (a.kind, a.pointee.as_deref()))
        .collect();
    match kinds.as_slice() {
        [(BtfKind::Ptr, Some("sock")), (BtfKind::Int, _), (BtfKind::Int, _), ..] => Ok(()),
        _ => Err(btf_err(
            "inet_sock_set_state's arguments are not (sock, oldstate, newstate)",
        )),
    }
}

impl TcpHealth {
    /// Loads and attaches the programs (no namespace watched yet), without the socket
    /// layer's translations (peers have no frontend).
    pub fn load() -> Result<Self, BpfError> {
        Self::load_sharing(None)
    }

    /// Loads and attaches the programs, reading the frontend each client socket asked for
    /// from the socket layer's maps pinned in `lb_pin_dir` (`weir_lb4_sock`,
    /// `weir_lb6_sock`), when they are there.
    pub fn load_sharing(lb_pin_dir: Option<&Path>) -> Result<Self, BpfError> {
        let btf = Btf::from_vmlinux().map_err(lb("reading the kernel's BTF"))?;
        state_args(&btf)?;
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = TcpHealthSkelBuilder::default()
            .open(storage)
            .map_err(lb("opening tcp_health.bpf.o"))?;
        if let Some(dir) = lb_pin_dir {
            for m in [&mut open.maps.weir_lb4_sock, &mut open.maps.weir_lb6_sock] {
                let path = dir.join(m.name());
                if path.exists() {
                    m.reuse_pinned_map(&path)
                        .map_err(lb(format!("sharing {}", path.display())))?;
                }
            }
        }
        let skel = open.load().map_err(lb("loading tcp_health.bpf.o"))?;
        let mut th = TcpHealth {
            skel,
            links: Vec::new(),
        };
        th.set_attached(true)?;
        Ok(th)
    }

    /// Attaches the programs to their tracepoints (`true`, if they are not) or detaches them
    /// (`false`: the tracepoints cost nothing again); the maps and what they count stay.
    pub fn set_attached(&mut self, on: bool) -> Result<(), BpfError> {
        if !on {
            self.links.clear();
            return Ok(());
        }
        if !self.links.is_empty() {
            return Ok(());
        }
        let p = &self.skel.progs;
        self.links = vec![
            p.tcp_retransmit
                .attach()
                .map_err(lb("attaching to tcp_retransmit_skb"))?,
            p.tcp_send_reset
                .attach()
                .map_err(lb("attaching to tcp_send_reset"))?,
            p.tcp_receive_reset
                .attach()
                .map_err(lb("attaching to tcp_receive_reset"))?,
            p.sock_set_state
                .attach()
                .map_err(lb("attaching to inet_sock_set_state"))?,
        ];
        Ok(())
    }

    /// The programs with their run statistics (counted while `kernel.bpf_stats_enabled` is
    /// 1).
    pub fn programs(&self) -> Vec<crate::ProgramInfo> {
        use std::os::fd::{AsFd, AsRawFd};
        let p = &self.skel.progs;
        [
            ("tcp_retransmit", p.tcp_retransmit.as_fd().as_raw_fd()),
            ("tcp_send_reset", p.tcp_send_reset.as_fd().as_raw_fd()),
            ("tcp_receive_reset", p.tcp_receive_reset.as_fd().as_raw_fd()),
            ("sock_set_state", p.sock_set_state.as_fd().as_raw_fd()),
        ]
        .into_iter()
        .map(|(n, fd)| crate::prog_info(n, fd))
        .collect()
    }

    /// Watches network namespace `inum` (see [`crate::kdrop::netns_inum`]) in `slot`
    /// (< [`SLOTS`]), its counters starting from zero.
    pub fn watch(&self, inum: u32, slot: u32) -> Result<(), BpfError> {
        let zero = vec![
            vec![0u8; std::mem::size_of::<tcp_counters>()];
            libbpf_rs::num_possible_cpus().map_err(lb("counting CPUs"))?
        ];
        self.skel
            .maps
            .weir_tcp_counters
            .update_percpu(&slot.to_ne_bytes(), &zero, MapFlags::ANY)
            .map_err(lb("clearing weir_tcp_counters"))?;
        self.skel
            .maps
            .weir_tcp_netns
            .update(&inum.to_ne_bytes(), &slot.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("updating weir_tcp_netns"))?;
        // In the fast entry too, unless another watched namespace has it. Only a shortcut:
        // the hash just written is what counts, so a failure here fails nothing.
        if let Ok((held, _)) = self.fast_entry(inum) {
            if held == 0 || held == inum || !self.is_watched(held) {
                let _ = self.set_fast_entry(inum, inum, slot);
            }
        }
        Ok(())
    }

    /// Stops watching network namespace `inum` (in `slot`): its peers' counters go too, so
    /// that the slot's next namespace starts from nothing.
    pub fn unwatch(&self, inum: u32, slot: u32) {
        // The fast entry first: while it is there, the namespace is found by it.
        if matches!(self.fast_entry(inum), Ok((held, _)) if held == inum) {
            let _ = self.set_fast_entry(inum, 0, 0);
        }
        let _ = self.skel.maps.weir_tcp_netns.delete(&inum.to_ne_bytes());
        let _ = self.refill_fast_entry(inum);
        let peers = &self.skel.maps.weir_tcp_peers;
        let keys: Vec<Vec<u8>> = peers
            .keys()
            .filter(|k| from_bytes::<tcp_peer_key>(k).slot == slot)
            .collect();
        for k in keys {
            let _ = peers.delete(&k);
        }
    }

    /// Whether namespace `inum` is watched (in `weir_tcp_netns`).
    fn is_watched(&self, inum: u32) -> bool {
        matches!(
            self.skel
                .maps
                .weir_tcp_netns
                .lookup(&inum.to_ne_bytes(), MapFlags::ANY),
            Ok(Some(_))
        )
    }

    /// The namespace and slot in the fast entry of namespace `inum` (namespace 0: the entry
    /// is free). For tests: the entry is a shortcut the counts do not depend on.
    #[doc(hidden)]
    pub fn fast_entry(&self, inum: u32) -> Result<(u32, u32), BpfError> {
        let v = self
            .skel
            .maps
            .weir_tcp_netns_fast
            .lookup(&self.fast_index(inum).to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("reading weir_tcp_netns_fast"))?
            .unwrap_or_default();
        let e: tcp_netns_slot = from_bytes(&v);
        Ok((e.inum, e.slot))
    }

    /// Makes the fast entry of `inum` hold namespace `held` (0: none) in `slot`. The kernel
    /// copies an entry in without a guarantee of one 8-byte store, and a program reads it as
    /// one: each write changes one of its halves only (the namespace cleared before the slot
    /// changes, set after), so that a program sees a namespace only with its own slot.
    fn set_fast_entry(&self, inum: u32, held: u32, slot: u32) -> Result<(), BpfError> {
        let (cur, cur_slot) = self.fast_entry(inum)?;
        if (cur, cur_slot) == (held, slot) {
            return Ok(());
        }
        let write = |held: u32, slot: u32| {
            let value = tcp_netns_slot { inum: held, slot };
            self.skel
                .maps
                .weir_tcp_netns_fast
                .update(
                    &self.fast_index(inum).to_ne_bytes(),
                    crate::as_bytes(&value),
                    MapFlags::ANY,
                )
                .map_err(lb("updating weir_tcp_netns_fast"))
        };
        if cur != 0 {
            write(0, cur_slot)?;
        }
        if slot != cur_slot {
            write(0, slot)?;
        }
        if held != 0 {
            write(held, slot)?;
        }
        Ok(())
    }

    /// Gives the fast entry of `inum`, which its namespace left, to another watched
    /// namespace of the same entry, if there is one (a walk of `weir_tcp_netns`: up to
    /// [`SLOTS`] keys, at a namespace's end only).
    fn refill_fast_entry(&self, inum: u32) -> Result<(), BpfError> {
        if self.fast_entry(inum)?.0 != 0 {
            return Ok(());
        }
        let netns = &self.skel.maps.weir_tcp_netns;
        let next = netns
            .keys()
            .map(|k| from_bytes::<u32>(&k))
            .find(|&other| other != inum && self.fast_index(other) == self.fast_index(inum));
        let Some(other) = next else {
            return Ok(());
        };
        let slot = netns
            .lookup(&other.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("reading weir_tcp_netns"))?
            .map(|v| from_bytes::<u32>(&v));
        match slot {
            Some(slot) => self.set_fast_entry(inum, other, slot),
            None => Ok(()), // unwatched meanwhile
        }
    }

    /// The entry of `weir_tcp_netns_fast` where namespace `inum` is looked for first (its
    /// inode's low bits: the map's entries are a power of two).
    fn fast_index(&self, inum: u32) -> u32 {
        inum & (self.skel.maps.weir_tcp_netns_fast.max_entries() - 1)
    }

    /// Every peer of a watched namespace's client sockets (once each: an IPv4 address an
    /// IPv6 socket connected to, IPv4-mapped, is the same peer as for an IPv4 socket), with
    /// its counters summed over CPUs.
    pub fn peers(&self) -> Result<Vec<(TcpPeer, tcp_counters)>, BpfError> {
        let map = &self.skel.maps.weir_tcp_peers;
        // A walk the programs' evictions restart may give a key twice.
        let keys: std::collections::BTreeSet<Vec<u8>> = map.keys().collect();
        let mut out: std::collections::BTreeMap<TcpPeer, tcp_counters> = Default::default();
        for k in keys {
            let Some(per_cpu) = map
                .lookup_percpu(&k, MapFlags::ANY)
                .map_err(lb("reading weir_tcp_peers"))?
            else {
                continue; // gone since the walk found it
            };
            let key: tcp_peer_key = from_bytes(&k);
            let family = if key.family == 10 {
                crate::datapath::AF_INET6
            } else {
                crate::datapath::AF_INET
            };
            let ip = crate::ip_from_words(family, key.addr);
            let vip = crate::ip_from_words(family, key.vip);
            // An IPv6 socket connected to an IPv4 address has it IPv4-mapped.
            let peer = TcpPeer {
                slot: key.slot,
                addr: std::net::SocketAddr::new(ip.to_canonical(), u16::from_be(key.port)),
                frontend: (key.vport != 0).then(|| {
                    std::net::SocketAddr::new(vip.to_canonical(), u16::from_be(key.vport))
                }),
            };
            let now = sum(per_cpu.iter().map(|v| from_bytes(v)));
            let total = out.entry(peer).or_default();
            *total = sum([*total, now].into_iter());
        }
        Ok(out.into_iter().collect())
    }

    /// The counters of `slot`, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<tcp_counters, BpfError> {
        let per_cpu = self
            .skel
            .maps
            .weir_tcp_counters
            .lookup_percpu(&slot.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("reading weir_tcp_counters"))?
            .unwrap_or_default();
        Ok(sum(per_cpu.iter().map(|v| from_bytes(v))))
    }
}

/// A peer of a watched namespace's client sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpPeer {
    /// The namespace's slot.
    pub slot: u32,
    /// The address and port its sockets connected to.
    pub addr: std::net::SocketAddr,
    /// The frontend the socket layer translated their connects from (a Service's), if it
    /// did (and the programs were loaded with its maps).
    pub frontend: Option<std::net::SocketAddr>,
}

/// Per-CPU counters summed.
fn sum(per_cpu: impl Iterator<Item = tcp_counters>) -> tcp_counters {
    let mut sum = tcp_counters::default();
    for c in per_cpu {
        sum.retransmits += c.retransmits;
        sum.resets_sent += c.resets_sent;
        sum.resets_received += c.resets_received;
        sum.connects += c.connects;
        sum.connect_failures += c.connect_failures;
        sum.connect_ns += c.connect_ns;
        sum.rtt_us += c.rtt_us;
        sum.rtt_samples += c.rtt_samples;
    }
    sum
}
