//! The pod datapath: local endpoints (from the network plugin's endpoint records) written to
//! the endpoint map, the pod programs attached to each endpoint's host-side veth and the node
//! program to the node's devices. Idempotent: `sync` makes the kernel match the records, so
//! a restarted agent picks up where the last one stopped (links and maps are pinned).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;
use weir_bpf::datapath::{
    ct4_entry, ct4_key, endpoint_info, endpoint_key, node_config, Datapath, TcProgram, AF_INET,
    AF_INET6, CT_F_CLOSING, CT_F_ESTABLISHED, CT_F_REPLY, CT_F_SEEN_REPLY, CT_F_SNAT,
};
use weir_model::endpoint::EndpointRecord;

use crate::{DataplaneError, MapUsage, ProgramDump};

/// What one sync changed.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct PodSyncStats {
    /// Endpoint map entries written.
    pub endpoints_updated: usize,
    /// Endpoint map entries removed.
    pub endpoints_removed: usize,
    /// Devices programs were attached to.
    pub devices_attached: usize,
    /// Devices programs were detached from.
    pub devices_detached: usize,
}

/// One endpoint map entry, as read back.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EndpointDump {
    /// The pod address.
    pub ip: IpAddr,
    /// The host-side veth's ifindex.
    pub ifindex: u32,
    /// The pod's MAC.
    pub mac: String,
    /// The host-side veth's MAC.
    pub node_mac: String,
    /// Flags (1: through the host stack).
    pub flags: u32,
}

/// One counter of the per-packet datapath.
#[derive(Debug, Clone, Serialize)]
pub struct MetricDump {
    /// `ingress` or `egress`.
    pub direction: String,
    /// Reason code.
    pub reason: u8,
    /// Reason name.
    pub name: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One conntrack entry, as read back.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CtDump {
    /// Protocol (`TCP`, `UDP`, or the number).
    pub proto: String,
    /// Source address and port of the packets this entry matches.
    pub src: String,
    /// Destination address and port.
    pub dst: String,
    /// `original` (client to frontend) or `reply` (backend to client or SNAT address).
    pub direction: String,
    /// States and properties: `snat`, `seen-reply`, `established`, `closing`.
    pub flags: Vec<String>,
    /// Original direction: the backend the flow goes to; reply: the frontend restored as source.
    pub nat: String,
    /// Original direction: the node's address and port the flow is SNATed to; reply: the client
    /// restored as destination. Empty without SNAT.
    pub snat: String,
    /// Seconds until the entry expires (negative: expired, waiting for the collector).
    pub expires_in: i64,
    /// Packets and bytes in this direction.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// The frontend's id.
    pub svc_id: u32,
    /// The backend's id.
    pub backend_id: u32,
}

fn addr_port(a: u32, p: u16) -> String {
    format!(
        "{}:{}",
        std::net::Ipv4Addr::from(a.to_ne_bytes()),
        u16::from_be(p)
    )
}

fn ct_dump(k: &ct4_key, v: &ct4_entry, now: u64) -> CtDump {
    let mut flags = Vec::new();
    for (bit, name) in [
        (CT_F_SNAT, "snat"),
        (CT_F_SEEN_REPLY, "seen-reply"),
        (CT_F_ESTABLISHED, "established"),
        (CT_F_CLOSING, "closing"),
    ] {
        if v.flags & bit != 0 {
            flags.push(name.to_string());
        }
    }
    CtDump {
        proto: match k.proto {
            6 => "TCP".into(),
            17 => "UDP".into(),
            n => n.to_string(),
        },
        src: addr_port(k.saddr, k.sport),
        dst: addr_port(k.daddr, k.dport),
        direction: if v.flags & CT_F_REPLY != 0 {
            "reply".into()
        } else {
            "original".into()
        },
        flags,
        nat: addr_port(v.nat_addr, v.nat_port),
        snat: if v.flags & CT_F_SNAT != 0 {
            addr_port(v.snat_addr, v.snat_port)
        } else {
            String::new()
        },
        expires_in: v.expires as i64 - now as i64,
        packets: v.packets,
        bytes: v.bytes,
        svc_id: v.svc_id,
        backend_id: v.backend_id,
    }
}

/// The pod datapath as read back.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PodDump {
    /// Conntrack entries (load-balanced flows).
    pub conntrack: Vec<CtDump>,
    /// Endpoint map entries.
    pub endpoints: Vec<EndpointDump>,
    /// Devices with weir programs, by ifindex.
    pub devices: Vec<u32>,
    /// Counters by direction and reason.
    pub metrics: Vec<MetricDump>,
    /// Programs.
    pub programs: Vec<ProgramDump>,
    /// Maps.
    pub maps: Vec<MapUsage>,
}

/// The endpoint map key of a pod address.
pub fn endpoint_key_of(ip: IpAddr) -> endpoint_key {
    let mut k = endpoint_key::default();
    match ip {
        IpAddr::V4(a) => {
            k.addr[0] = u32::from_ne_bytes(a.octets());
            k.family = AF_INET;
        }
        IpAddr::V6(a) => {
            let o = a.octets();
            for (i, w) in k.addr.iter_mut().enumerate() {
                *w = u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            }
            k.family = AF_INET6;
        }
    }
    k
}

fn ip_of(k: &endpoint_key) -> IpAddr {
    if k.family == AF_INET {
        IpAddr::from(k.addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in k.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Map keys are compared as bytes; the generated types are not `Ord`.
fn key_bytes(k: &endpoint_key) -> Vec<u8> {
    weir_bpf::as_bytes(k).to_vec()
}

/// The pod datapath of one node.
pub struct PodDataplane {
    dp: Datapath,
    /// Node devices (ifindexes) that carry the node program.
    netdevs: BTreeSet<u32>,
    /// Devices attached since this agent started (links from before are re-pointed once).
    attached: BTreeSet<u32>,
}

impl PodDataplane {
    /// Loads the programs with their maps pinned in `pin_dir` (kept across restarts); the
    /// load-balancing maps are the socket layer's, in `lb_pin_dir`.
    pub fn new(pin_dir: &Path, lb_pin_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(PodDataplane {
            dp: Datapath::load(pin_dir, lb_pin_dir)?,
            netdevs: BTreeSet::new(),
            attached: BTreeSet::new(),
        })
    }

    /// The loaded programs, for BPF_PROG_TEST_RUN.
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// Attaches the node program to device `ifindex` (packets for local pods go straight to
    /// them).
    pub fn attach_netdev(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.dp.attach(TcProgram::FromNetdev, ifindex)?;
        self.netdevs.insert(ifindex);
        self.attached.insert(ifindex);
        Ok(())
    }

    /// Sets the node's own addresses (a NodePort answers on each) and the SNAT address and
    /// source port range for flows sent to backends on other nodes.
    pub fn configure_node(
        &mut self,
        addrs: &[IpAddr],
        snat4: Option<std::net::Ipv4Addr>,
        snat_ports: (u16, u16),
    ) -> Result<(), DataplaneError> {
        let keys: Vec<endpoint_key> = addrs.iter().map(|a| endpoint_key_of(*a)).collect();
        self.dp.set_node_addrs(&keys)?;
        self.dp.set_config(&node_config {
            snat4: snat4.map(|a| u32::from_ne_bytes(a.octets())).unwrap_or(0),
            snat_port_min: snat_ports.0,
            snat_port_max: snat_ports.1,
            ..Default::default()
        })?;
        Ok(())
    }

    /// Removes expired conntrack entries. Returns how many.
    pub fn ct_gc(&self) -> Result<usize, DataplaneError> {
        Ok(self
            .dp
            .ct_gc(weir_bpf::datapath::boot_seconds(), |_, _| false)?)
    }

    /// Makes the endpoint map and the pod devices' programs match `records`. Programs are
    /// attached before a pod's address enters the map, and the address leaves the map
    /// before the programs go.
    pub fn sync(&mut self, records: &[EndpointRecord]) -> Result<PodSyncStats, DataplaneError> {
        let mut stats = PodSyncStats::default();
        let mut want: BTreeMap<Vec<u8>, (endpoint_key, endpoint_info)> = BTreeMap::new();
        let mut devices = BTreeSet::new();
        for r in records {
            let (Some(mac), Some(node_mac)) = (
                EndpointRecord::parse_mac(&r.mac),
                EndpointRecord::parse_mac(&r.host_mac),
            ) else {
                continue; // EndpointRecord::read refuses these.
            };
            devices.insert(r.host_ifindex);
            for ip in &r.ips {
                let k = endpoint_key_of(*ip);
                let v = endpoint_info {
                    ifindex: r.host_ifindex,
                    mac,
                    node_mac,
                    ..Default::default()
                };
                want.insert(key_bytes(&k), (k, v));
            }
        }
        for &ifindex in &devices {
            if self.attached.contains(&ifindex) {
                continue;
            }
            self.dp.attach(TcProgram::FromPod, ifindex)?;
            self.dp.attach(TcProgram::ToPod, ifindex)?;
            self.attached.insert(ifindex);
            stats.devices_attached += 1;
        }
        let have: BTreeMap<Vec<u8>, (endpoint_key, endpoint_info)> = self
            .dp
            .endpoints()?
            .into_iter()
            .map(|(k, v)| (key_bytes(&k), (k, v)))
            .collect();
        for (kb, (k, v)) in &want {
            let same = have
                .get(kb)
                .is_some_and(|(_, h)| weir_bpf::as_bytes(h) == weir_bpf::as_bytes(v));
            if !same {
                self.dp.put_endpoint(k, v)?;
                stats.endpoints_updated += 1;
            }
        }
        for (kb, (k, _)) in &have {
            if !want.contains_key(kb) {
                self.dp.remove_endpoint(k)?;
                stats.endpoints_removed += 1;
            }
        }
        // Pinned links of devices that are neither a pod's nor the node's.
        let pinned: BTreeSet<u32> = self.dp.attached().into_iter().collect();
        for ifindex in pinned.union(&self.attached.clone()) {
            if !devices.contains(ifindex) && !self.netdevs.contains(ifindex) {
                self.dp.detach(*ifindex);
                self.attached.remove(ifindex);
                stats.devices_detached += 1;
            }
        }
        Ok(stats)
    }

    /// Reads back the endpoint map, devices, counters, programs and maps.
    pub fn dump(&self) -> Result<PodDump, DataplaneError> {
        let mut endpoints: Vec<EndpointDump> = self
            .dp
            .endpoints()?
            .iter()
            .map(|(k, v)| EndpointDump {
                ip: ip_of(k),
                ifindex: v.ifindex,
                mac: mac_string(&v.mac),
                node_mac: mac_string(&v.node_mac),
                flags: v.flags,
            })
            .collect();
        endpoints.sort_by_key(|e| e.ip);
        let now = weir_bpf::datapath::boot_seconds();
        let mut conntrack: Vec<CtDump> = self
            .dp
            .ct_entries()?
            .iter()
            .map(|(k, v)| ct_dump(k, v, now))
            .collect();
        conntrack.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
        Ok(PodDump {
            conntrack,
            endpoints,
            devices: self.dp.attached(),
            metrics: self
                .dp
                .metrics()?
                .into_iter()
                .map(|m| MetricDump {
                    direction: m.direction.into(),
                    reason: m.reason,
                    name: m.name,
                    packets: m.packets,
                    bytes: m.bytes,
                })
                .collect(),
            programs: self
                .dp
                .programs()
                .into_iter()
                .map(|p| ProgramDump {
                    name: p.name.into(),
                    id: p.id,
                    run_count: p.run_count,
                    avg_run_ns: p.run_time_ns.checked_div(p.run_count).unwrap_or(0),
                })
                .collect(),
            maps: weir_bpf::datapath::DATAPATH_MAPS
                .iter()
                .map(|name| {
                    let (entries, capacity) = self.dp.usage(name);
                    MapUsage {
                        name: name.to_string(),
                        entries,
                        capacity,
                    }
                })
                .collect(),
        })
    }
}
