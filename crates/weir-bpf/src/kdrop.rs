//! Kernel drops (`bpf/kdrop.bpf.c`): packets the kernel frees with a drop reason, from the
//! `skb:kfree_skb` tracepoint, in the network namespaces it watches. Everything that changes
//! between kernels is read from the running kernel's BTF when loading: the tracepoint's
//! arguments (where the reason is), the offsets of the `sk_buff`, `net_device`, `sock` and
//! `net` fields the program reads, and the `enum skb_drop_reason` names and values. Nothing
//! of it is compiled in.

use std::collections::{BTreeMap, HashMap};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libbpf_rs::btf::types::Enum;
use libbpf_rs::btf::{Btf, BtfKind};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags};

use crate::kernel_btf::{btf_err, offset_of, tracepoint_args};
use crate::{lb, BpfError};

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    dead_code,
    unused_imports
)]
mod kdrop_skel {
    include!(concat!(env!("OUT_DIR"), "/kdrop.skel.rs"));
}

use kdrop_skel::types::kdrop_layout;
use kdrop_skel::{KdropSkel, KdropSkelBuilder};

/// The prefix of the kernel's reason names, left out of weir's.
const REASON_PREFIX: &str = "SKB_DROP_REASON_";

/// One packet the kernel dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDrop {
    /// When (boot clock, nanoseconds).
    pub ts: u64,
    /// The reason's name in the running kernel (`NETFILTER_DROP`, `NO_SOCKET`, ...).
    pub reason: String,
    /// The packet's device: its index in the namespace the drop happened in, a pod's
    /// possibly, so not necessarily a node device (0: none).
    pub ifindex: u32,
    /// The inode of the network namespace the drop happened in (the node's or a pod's).
    pub netns: u32,
    /// IP protocol (0 when the packet is not IP).
    pub proto: u8,
    /// Source and destination (None when the packet is not IP); ports 0 without ports.
    pub src: Option<(IpAddr, u16)>,
    /// The destination.
    pub dst: Option<(IpAddr, u16)>,
}

/// The program, attached (unless detached with [`KernelDrops::set_attached`]), counting the
/// drops of the network namespaces it watches (`weir_kdrop_netns`: the one given to
/// [`KernelDrops::load`] and those added with [`KernelDrops::watch`]).
pub struct KernelDrops {
    skel: KdropSkel<'static>,
    link: Option<Link>,
    names: HashMap<u32, String>,
}

/// `enum skb_drop_reason`: value -> name (without the prefix).
fn reasons(btf: &Btf) -> Result<HashMap<u32, String>, BpfError> {
    let e: Enum = btf
        .type_by_name("skb_drop_reason")
        .ok_or_else(|| btf_err("no enum skb_drop_reason in the kernel's BTF (kernel < 5.17?)"))?;
    Ok(e.iter()
        .filter_map(|m| {
            let name = m.name?.to_string_lossy();
            let name = name
                .strip_prefix(REASON_PREFIX)
                .unwrap_or(&name)
                .to_string();
            Some((m.value as u32, name))
        })
        .collect())
}

/// The position of the reason among the tracepoint's arguments (its raw form's: the
/// prototype `btf_trace_kfree_skb` has a context pointer first), checking that the skb and
/// the location come first as the program reads them.
fn reason_arg(btf: &Btf) -> Result<u32, BpfError> {
    let args = tracepoint_args(btf, "kfree_skb")?;
    let skb_first = args
        .first()
        .is_some_and(|a| a.pointee.as_deref() == Some("sk_buff"));
    let location_second = args.get(1).is_some_and(|a| a.kind == BtfKind::Ptr);
    if !skb_first || !location_second {
        return Err(btf_err(
            "kfree_skb's arguments do not start with the skb and the location",
        ));
    }
    args.iter()
        .position(|a| a.kind == BtfKind::Enum && a.name.as_deref() == Some("skb_drop_reason"))
        .map(|i| i as u32)
        .ok_or_else(|| btf_err("kfree_skb has no skb_drop_reason argument"))
}

/// What the program needs from the running kernel.
fn layout(btf: &Btf, names: &HashMap<u32, String>) -> Result<kdrop_layout, BpfError> {
    let not_specified = names
        .iter()
        .find(|(_, n)| n.as_str() == "NOT_SPECIFIED")
        .map(|(v, _)| *v)
        .ok_or_else(|| btf_err("no SKB_DROP_REASON_NOT_SPECIFIED in the kernel's BTF"))?;
    Ok(kdrop_layout {
        arg_reason: reason_arg(btf)?,
        reason_min: not_specified + 1,
        skb_dev: offset_of(btf, "sk_buff", &["dev"])?,
        skb_sk: offset_of(btf, "sk_buff", &["sk"])?,
        skb_head: offset_of(btf, "sk_buff", &["head"])?,
        skb_network_header: offset_of(btf, "sk_buff", &["network_header"])?,
        skb_transport_header: offset_of(btf, "sk_buff", &["transport_header"])?,
        skb_protocol: offset_of(btf, "sk_buff", &["protocol"])?,
        dev_net: offset_of(btf, "net_device", &["nd_net", "net"])?,
        dev_ifindex: offset_of(btf, "net_device", &["ifindex"])?,
        sk_net: offset_of(btf, "sock", &["__sk_common", "skc_net", "net"])?,
        net_inum: offset_of(btf, "net", &["ns", "inum"])?,
    })
}

/// The inode number of the network namespace at `path` (`/proc/self/ns/net`, or a bind
/// mount under /run/netns).
pub fn netns_inum(path: &std::path::Path) -> Result<u32, BpfError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.ino() as u32)
        .map_err(|source| BpfError::Io {
            path: path.into(),
            source,
        })
}

impl KernelDrops {
    /// Loads and attaches the program for the drops of network namespace `inum` (see
    /// [`netns_inum`]); [`KernelDrops::watch`] adds others.
    pub fn load(inum: u32) -> Result<Self, BpfError> {
        let btf = Btf::from_vmlinux().map_err(lb("reading the kernel's BTF"))?;
        let names = reasons(&btf)?;
        let layout = layout(&btf, &names)?;
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = KdropSkelBuilder::default()
            .open(storage)
            .map_err(lb("opening kdrop.bpf.o"))?;
        open.maps
            .rodata_data
            .as_deref_mut()
            .ok_or_else(|| btf_err("kdrop.bpf.o has no read-only data"))?
            .layout = layout;
        let skel = open.load().map_err(lb("loading kdrop.bpf.o"))?;
        let mut kd = KernelDrops {
            skel,
            link: None,
            names,
        };
        kd.watch(inum)?;
        kd.set_attached(true)?;
        Ok(kd)
    }

    /// Counts the drops of network namespace `inum` too (at most `KDROP_NETNS_MAX`
    /// namespaces).
    pub fn watch(&self, inum: u32) -> Result<(), BpfError> {
        self.skel
            .maps
            .weir_kdrop_netns
            .update(&inum.to_ne_bytes(), &1u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(lb("updating weir_kdrop_netns"))
    }

    /// Counts the drops of network namespace `inum` no more (those counted stay).
    pub fn unwatch(&self, inum: u32) {
        let _ = self.skel.maps.weir_kdrop_netns.delete(&inum.to_ne_bytes());
    }

    /// Attaches the program to `kfree_skb` (`true`, if it is not) or detaches it (`false`);
    /// the maps and what they count stay.
    pub fn set_attached(&mut self, on: bool) -> Result<(), BpfError> {
        if !on {
            self.link = None;
        } else if self.link.is_none() {
            let link = self
                .skel
                .progs
                .kfree_skb
                .attach_raw_tracepoint("kfree_skb")
                .map_err(lb("attaching to the kfree_skb tracepoint"))?;
            self.link = Some(link);
        }
        Ok(())
    }

    /// The program with its run statistics (counted while `kernel.bpf_stats_enabled` is 1).
    pub fn programs(&self) -> Vec<crate::ProgramInfo> {
        use std::os::fd::{AsFd, AsRawFd};
        vec![crate::prog_info(
            "kfree_skb",
            self.skel.progs.kfree_skb.as_fd().as_raw_fd(),
        )]
    }

    /// The name of reason `value` in the running kernel.
    pub fn reason_name(&self, value: u32) -> String {
        self.names
            .get(&value)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{value}"))
    }

    fn per_reason(
        &self,
        map: &libbpf_rs::Map<'_>,
        what: &str,
    ) -> Result<BTreeMap<String, u64>, BpfError> {
        let mut out = BTreeMap::new();
        for k in map.keys() {
            let Some(per_cpu) = map
                .lookup_percpu(&k, MapFlags::ANY)
                .map_err(lb(format!("reading {what}")))?
            else {
                continue;
            };
            let n: u64 = per_cpu.iter().map(|v| crate::from_bytes::<u64>(v)).sum();
            let reason = u32::from_ne_bytes(k[..4].try_into().expect("u32 key"));
            *out.entry(self.reason_name(reason)).or_default() += n;
        }
        Ok(out)
    }

    /// Drops counted per reason since the program was loaded.
    pub fn counts(&self) -> Result<BTreeMap<String, u64>, BpfError> {
        self.per_reason(&self.skel.maps.weir_kdrops, "weir_kdrops")
    }

    /// Drop events the full ring buffer refused, per reason.
    pub fn lost(&self) -> Result<BTreeMap<String, u64>, BpfError> {
        self.per_reason(&self.skel.maps.weir_kdrops_lost, "weir_kdrops_lost")
    }

    /// A reader of the drop events, calling `f` with each (poll it on the thread that made
    /// it).
    pub fn events<F: FnMut(KernelDrop) + 'static>(
        &self,
        mut f: F,
    ) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
        let names = self.names.clone();
        let map = &self.skel.maps.weir_kdrop_events;
        crate::ring_reader(
            &[map],
            "reading map weir_kdrop_events",
            move |data: &[u8]| {
                if let Some(d) = decode(data, &names) {
                    f(d);
                }
            },
        )
    }
}

/// A `struct kdrop_event` (weir/api/kdrop.h: 72 bytes, host order but for the addresses and
/// ports).
fn decode(d: &[u8], names: &HashMap<u32, String>) -> Option<KernelDrop> {
    if d.len() < 72 {
        return None;
    }
    let u64_at = |o: usize| u64::from_ne_bytes(d[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_ne_bytes(d[o..o + 4].try_into().expect("4 bytes"));
    let port_at = |o: usize| u16::from_be_bytes([d[o], d[o + 1]]);
    let reason = u32_at(16);
    let (family, proto) = (d[60], d[61]);
    let addr = |o: usize| -> Option<IpAddr> {
        match family {
            4 => Some(Ipv4Addr::new(d[o], d[o + 1], d[o + 2], d[o + 3]).into()),
            6 => {
                let b: [u8; 16] = d[o..o + 16].try_into().ok()?;
                Some(Ipv6Addr::from(b).into())
            }
            _ => None,
        }
    };
    Some(KernelDrop {
        ts: u64_at(0),
        reason: names
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{reason}")),
        ifindex: u32_at(20),
        netns: u32_at(64),
        proto,
        src: addr(24).map(|a| (a, port_at(56))),
        dst: addr(40).map(|a| (a, port_at(58))),
    })
}
