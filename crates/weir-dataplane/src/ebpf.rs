//! The eBPF dataplane: frontends and backends in the pinned maps of the socket programs.
//!
//! Writes are ordered so that a lookup never finds a slot naming a missing backend: new
//! backends first, then a service's Maglev table and slots, then its master entry (which
//! makes the new slot count visible), then stale slots, and unreferenced backends last.
//! Frontend and backend ids are read back from the pinned maps on start, so a restarted
//! agent keeps them (and the affinity entries that refer to them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use weir_bpf::types::{
    lb4_backend, lb4_key, lb4_src_range_key, lb6_backend, lb6_key, lb_affinity, lb_affinity_key,
    lb_affinity_match, lb_group, lb_groups, lb_health, lb_outlier, lb_service,
};
use weir_bpf::{ip6_from_words as from_v6, ip6_words as v6, SockLb};
use weir_control::lb::{Algorithm, Backend, Frontend, FrontendKey, LbState, Proto, Scope};
use weir_control::maglev;

use crate::{
    AffinityDump, ApplyStats, Dataplane, DataplaneError, Dump, Ejection, FrontendDump, MapUsage,
};

const SVC_AFFINITY: u16 = 1;
const SVC_MAGLEV: u16 = 2;
const SVC_SOURCE_RANGES: u16 = 4;
const SVC_DSR: u16 = 8;
const SVC_WEIGHTED: u16 = 16;
const SVC_OUTLIER: u16 = 32;
/// Groups of distinct weights a frontend may have (WEIR_LB_MAX_GROUPS).
const MAX_GROUPS: usize = 64;

/// One group of a weighted frontend: (cumulative share, first slot, slots).
type Group = (u32, u16, u16);

/// A frontend as programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Programmed {
    id: u32,
    backends: Vec<u32>,
    flags: u16,
    timeout: u32,
    maglev_size: u32,
    /// Allowed client prefixes (IPv4 address in network order as stored, prefix length).
    ranges: BTreeSet<(u32, u8)>,
    /// Weighted frontends: the groups of slots and their shares.
    groups: Vec<Group>,
    /// Outlier detection: (consecutive failures, base ejection ms).
    outlier: Option<(u32, u32)>,
    /// Standby backends: in no slot, kept for their connections (and watched).
    standby: Vec<u32>,
}

/// Backends in slot order with their weights, and the groups of equal weight (none when all
/// are equal, or when there are more than the datapath holds: then all are equal, said in
/// the log).
fn slot_order(f: &Frontend) -> (Vec<(Backend, u32)>, Vec<Group>) {
    if f.weights.len() != f.backends.len() {
        return (f.backends.iter().map(|b| (*b, 1)).collect(), Vec::new());
    }
    let mut order: Vec<(Backend, u32)> = f
        .backends
        .iter()
        .copied()
        .zip(f.weights.iter().copied())
        .filter(|(_, w)| *w > 0)
        .collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut groups: Vec<Group> = Vec::new();
    let mut upto = 0u32;
    for (i, (_, w)) in order.iter().enumerate() {
        upto = upto.saturating_add(*w);
        match groups.last_mut() {
            Some(g) if order[i - 1].1 == *w => {
                g.0 = upto;
                g.2 += 1;
            }
            _ => groups.push((upto, (i + 1) as u16, 1)),
        }
    }
    if groups.len() > MAX_GROUPS {
        tracing::warn!(service = %f.service, groups = groups.len(),
            "more distinct shares than the datapath holds ({MAX_GROUPS}); spreading equally");
        groups.clear();
    }
    if groups.len() <= 1 {
        groups.clear();
    }
    (order, groups)
}

fn groups_value(groups: &[Group]) -> lb_groups {
    let mut v = lb_groups {
        n: groups.len() as u32,
        total: groups.last().map_or(0, |g| g.0),
        ..Default::default()
    };
    for (slot, (upto, first, count)) in v.g.iter_mut().zip(groups) {
        *slot = lb_group {
            upto: *upto,
            first: *first,
            count: *count,
        };
    }
    v
}

/// The source-range map key of a frontend's prefix.
fn range_key(svc_id: u32, (addr, len): (u32, u8)) -> lb4_src_range_key {
    lb4_src_range_key {
        prefixlen: 32 + len as u32,
        svc_id,
        addr,
    }
}

/// The services-map key of one slot of a frontend, in its family's layout.
enum SlotKey {
    V4(lb4_key),
    V6(lb6_key),
}

fn slot_key(key: &FrontendKey, slot: u16) -> SlotKey {
    let (dport, proto, scope) = (key.port.to_be(), key.proto.number(), key.scope.number());
    match key.vip {
        IpAddr::V4(a) => SlotKey::V4(lb4_key {
            address: v4(a),
            dport,
            proto,
            scope,
            slot,
            ..Default::default()
        }),
        IpAddr::V6(a) => SlotKey::V6(lb6_key {
            address: v6(a),
            dport,
            proto,
            scope,
            slot,
            ..Default::default()
        }),
    }
}

/// The eBPF dataplane of one node.
pub struct EbpfDataplane {
    lb: SockLb,
    cgroup: PathBuf,
    frontends: BTreeMap<FrontendKey, Programmed>,
    backends: BTreeMap<(Backend, Proto), u32>,
    backend_ids: BTreeSet<u32>,
    frontend_ids: BTreeSet<u32>,
    /// How many frontends use each backend id.
    refs: std::collections::HashMap<u32, u32>,
    /// The desired state last applied, so that an apply only touches what changed.
    applied: BTreeMap<FrontendKey, Frontend>,
    next_backend: u32,
    next_frontend: u32,
    /// Backends under outlier detection, with their settings as written.
    watched: BTreeMap<u32, lb_outlier>,
}

fn v4(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl EbpfDataplane {
    /// Loads the socket programs with maps pinned in `pin_dir`, attaches them to the cgroup v2
    /// directory `cgroup`, and reads back what earlier runs programmed.
    pub fn new(pin_dir: &Path, cgroup: &Path) -> Result<Self, DataplaneError> {
        Self::new_with(pin_dir, cgroup, true)
    }

    /// Like [`EbpfDataplane::new`]; with `socket_lb` false the socket programs are not
    /// attached (and links an earlier agent pinned are removed): Services are then translated
    /// per packet, at tc, for the pods under `cgroup`.
    pub fn new_with(
        pin_dir: &Path,
        cgroup: &Path,
        socket_lb: bool,
    ) -> Result<Self, DataplaneError> {
        weir_bpf::ensure_bpffs()?;
        let mut lb = SockLb::load(pin_dir)?;
        if socket_lb {
            lb.attach(cgroup)?;
        } else {
            lb.detach()?;
        }
        let mut dp = EbpfDataplane {
            lb,
            cgroup: cgroup.to_path_buf(),
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            backend_ids: BTreeSet::new(),
            frontend_ids: BTreeSet::new(),
            refs: std::collections::HashMap::new(),
            applied: BTreeMap::new(),
            next_backend: 1,
            next_frontend: 1,
            watched: BTreeMap::new(),
        };
        dp.read_back()?;
        Ok(dp)
    }

    /// The ids the datapath knows a flow by: its frontend's (as a ClusterIP, an external
    /// address, or a NodePort on any address) and its backend's, if both are programmed.
    pub fn flow_ids(
        &self,
        frontend: std::net::SocketAddr,
        proto: Proto,
        backend: std::net::SocketAddr,
    ) -> Option<(u32, u32)> {
        let any = match frontend.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        let key = |vip, scope| FrontendKey {
            vip,
            port: frontend.port(),
            proto,
            scope,
        };
        let svc = [
            key(frontend.ip(), Scope::Cluster),
            key(frontend.ip(), Scope::External),
            key(any, Scope::External),
        ]
        .iter()
        .find_map(|k| self.frontends.get(k))?;
        let be = Backend {
            ip: backend.ip(),
            port: backend.port(),
        };
        let id = *self.backends.get(&(be, proto))?;
        Some((svc.id, id))
    }

    /// Attaches the socket programs to the cgroup (a switch to eBPF, at the cut-over).
    pub fn attach_socket_programs(&mut self) -> Result<(), DataplaneError> {
        Ok(self.lb.attach(&self.cgroup)?)
    }

    /// The socket programs and maps, for introspection.
    pub fn lb(&self) -> &SockLb {
        &self.lb
    }

    fn read_back(&mut self) -> Result<(), DataplaneError> {
        for (id, b) in self.lb.entries::<u32, lb4_backend>("weir_lb4_backends")? {
            if let Some(p) = Proto::from_number(b.proto) {
                self.backends.insert(
                    (
                        Backend {
                            ip: IpAddr::V4(Ipv4Addr::from(b.address.to_ne_bytes())),
                            port: u16::from_be(b.port),
                        },
                        p,
                    ),
                    id,
                );
            }
        }
        for (id, b) in self.lb.entries::<u32, lb6_backend>("weir_lb6_backends")? {
            if let Some(p) = Proto::from_number(b.proto) {
                self.backends.insert(
                    (
                        Backend {
                            ip: IpAddr::V6(from_v6(b.address)),
                            port: u16::from_be(b.port),
                        },
                        p,
                    ),
                    id,
                );
            }
        }
        let mut slots: BTreeMap<FrontendKey, BTreeMap<u16, lb_service>> = BTreeMap::new();
        for (k, v) in self.lb.entries::<lb4_key, lb_service>("weir_lb4_svc")? {
            let Some(proto) = Proto::from_number(k.proto) else {
                continue;
            };
            let key = FrontendKey {
                vip: IpAddr::V4(Ipv4Addr::from(k.address.to_ne_bytes())),
                port: u16::from_be(k.dport),
                proto,
                scope: Scope::from_number(k.scope),
            };
            slots.entry(key).or_default().insert(k.slot, v);
        }
        for (k, v) in self.lb.entries::<lb6_key, lb_service>("weir_lb6_svc")? {
            let Some(proto) = Proto::from_number(k.proto) else {
                continue;
            };
            let key = FrontendKey {
                vip: IpAddr::V6(from_v6(k.address)),
                port: u16::from_be(k.dport),
                proto,
                scope: Scope::from_number(k.scope),
            };
            slots.entry(key).or_default().insert(k.slot, v);
        }
        for (key, s) in slots {
            let Some(master) = s.get(&0) else {
                // Slots without a master: leftovers of an interrupted removal.
                for slot in s.keys() {
                    self.delete_slot(&key, *slot)?;
                }
                continue;
            };
            let backends = (1..=master.count)
                .filter_map(|i| s.get(&i).map(|v| v.backend_id))
                .collect();
            self.frontends.insert(
                key,
                Programmed {
                    id: master.svc_id,
                    backends,
                    flags: master.flags,
                    timeout: master.affinity_timeout,
                    maglev_size: master.backend_id,
                    ranges: BTreeSet::new(),
                    groups: Vec::new(),
                    outlier: None,
                    standby: Vec::new(),
                },
            );
        }
        let groups: BTreeMap<u32, lb_groups> = self
            .lb
            .entries::<u32, lb_groups>("weir_lb_groups")?
            .into_iter()
            .collect();
        let outlier: BTreeMap<u32, lb_outlier> = self
            .lb
            .entries::<u32, lb_outlier>("weir_lb_outlier")?
            .into_iter()
            .collect();
        for f in self.frontends.values_mut() {
            if let Some(g) = groups.get(&f.id).filter(|_| f.flags & SVC_WEIGHTED != 0) {
                f.groups = g.g[..(g.n as usize).min(MAX_GROUPS)]
                    .iter()
                    .map(|g| (g.upto, g.first, g.count))
                    .collect();
            }
            if f.flags & SVC_OUTLIER != 0 {
                f.outlier = f
                    .backends
                    .first()
                    .and_then(|b| outlier.get(b))
                    .map(|o| (o.threshold, o.base_ms));
            }
        }
        for id in groups.keys() {
            if !self
                .frontends
                .values()
                .any(|f| f.id == *id && !f.groups.is_empty())
            {
                self.lb.remove("weir_lb_groups", id)?;
            }
        }
        self.watched = outlier.into_iter().collect();
        let mut ranges: BTreeMap<u32, BTreeSet<(u32, u8)>> = BTreeMap::new();
        for (k, _) in self
            .lb
            .entries::<lb4_src_range_key, u8>("weir_lb4_src_range")?
        {
            ranges
                .entry(k.svc_id)
                .or_default()
                .insert((k.addr, k.prefixlen.saturating_sub(32) as u8));
        }
        for f in self.frontends.values_mut() {
            if let Some(r) = ranges.remove(&f.id) {
                f.ranges = r;
            }
        }
        // Prefixes of frontends that no longer exist: leftovers of an interrupted removal.
        for (id, rs) in ranges {
            for r in rs {
                self.lb.remove("weir_lb4_src_range", &range_key(id, r))?;
            }
        }
        self.backend_ids = self.backends.values().copied().collect();
        self.frontend_ids = self.frontends.values().map(|f| f.id).collect();
        for f in self.frontends.values() {
            for b in &f.backends {
                *self.refs.entry(*b).or_default() += 1;
            }
        }
        self.next_backend = self.backend_ids.last().map_or(1, |m| m + 1);
        self.next_frontend = self.frontend_ids.last().map_or(1, |m| m + 1);
        Ok(())
    }

    fn alloc_frontend_id(&mut self) -> u32 {
        while self.frontend_ids.contains(&self.next_frontend) || self.next_frontend == 0 {
            self.next_frontend = self.next_frontend.wrapping_add(1);
        }
        let id = self.next_frontend;
        self.frontend_ids.insert(id);
        self.next_frontend = self.next_frontend.wrapping_add(1);
        id
    }

    fn backend_id(
        &mut self,
        b: Backend,
        proto: Proto,
        stats: &mut ApplyStats,
    ) -> Result<u32, DataplaneError> {
        if let Some(id) = self.backends.get(&(b, proto)) {
            return Ok(*id);
        }
        while self.backend_ids.contains(&self.next_backend) || self.next_backend == 0 {
            self.next_backend = self.next_backend.wrapping_add(1);
        }
        let id = self.next_backend;
        self.backend_ids.insert(id);
        self.next_backend = self.next_backend.wrapping_add(1);
        match b.ip {
            IpAddr::V4(a) => self.lb.put(
                "weir_lb4_backends",
                &id,
                &lb4_backend {
                    address: v4(a),
                    port: b.port.to_be(),
                    proto: proto.number(),
                    flags: 0,
                },
            )?,
            IpAddr::V6(a) => self.lb.put(
                "weir_lb6_backends",
                &id,
                &lb6_backend {
                    address: v6(a),
                    port: b.port.to_be(),
                    proto: proto.number(),
                    flags: 0,
                },
            )?,
        }
        self.backends.insert((b, proto), id);
        stats.backends_added += 1;
        Ok(id)
    }

    fn put_slot(&self, key: &FrontendKey, slot: u16, v: &lb_service) -> Result<(), DataplaneError> {
        match slot_key(key, slot) {
            SlotKey::V4(k) => self.lb.put("weir_lb4_svc", &k, v)?,
            SlotKey::V6(k) => self.lb.put("weir_lb6_svc", &k, v)?,
        }
        Ok(())
    }

    fn delete_slot(&self, key: &FrontendKey, slot: u16) -> Result<(), DataplaneError> {
        match slot_key(key, slot) {
            SlotKey::V4(k) => self.lb.remove("weir_lb4_svc", &k)?,
            SlotKey::V6(k) => self.lb.remove("weir_lb6_svc", &k)?,
        }
        Ok(())
    }

    fn program(
        &mut self,
        key: &FrontendKey,
        f: &Frontend,
        stats: &mut ApplyStats,
    ) -> Result<(), DataplaneError> {
        if f.backends.len() > u16::MAX as usize {
            return Err(DataplaneError::Full(format!(
                "service {} has {} backends; at most 65535 are supported",
                f.service,
                f.backends.len()
            )));
        }
        let (order, groups) = slot_order(f);
        let mut ids = Vec::with_capacity(order.len());
        for (b, _) in &order {
            ids.push(self.backend_id(*b, key.proto, stats)?);
        }
        let mut flags = 0;
        if f.affinity_timeout.is_some() {
            flags |= SVC_AFFINITY;
        }
        if !groups.is_empty() {
            flags |= SVC_WEIGHTED;
        }
        let outlier = f
            .outlier
            .filter(|_| key.proto == Proto::Tcp)
            .map(|o| (o.consecutive_failures, o.base_ejection_ms));
        if outlier.is_some() {
            flags |= SVC_OUTLIER;
        }
        let mut standby = Vec::with_capacity(f.standby.len());
        for b in &f.standby {
            standby.push(self.backend_id(*b, key.proto, stats)?);
        }
        let maglev_size = if f.algorithm == Algorithm::Maglev && !ids.is_empty() {
            flags |= SVC_MAGLEV;
            maglev::table_size(ids.len())
        } else {
            0
        };
        // loadBalancerSourceRanges: the IPv4 prefixes of an IPv4 frontend go into the LPM
        // trie; a frontend with ranges but none of its family admits no client (the IPv6
        // datapath cannot check prefixes yet and refuses every flow): fail closed.
        let ranges: BTreeSet<(u32, u8)> = if key.vip.is_ipv4() {
            f.source_ranges
                .iter()
                .filter_map(|r| match r {
                    ipnet::IpNet::V4(n) => Some((v4(n.network()), n.prefix_len())),
                    ipnet::IpNet::V6(_) => None,
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        if !f.source_ranges.is_empty() {
            flags |= SVC_SOURCE_RANGES;
        }
        if f.mode == weir_control::lb::LbMode::Dsr && key.vip.is_ipv4() {
            flags |= SVC_DSR;
        }
        let old = self.frontends.get(key).cloned();
        let id = match &old {
            Some(o) => o.id,
            None => self.alloc_frontend_id(),
        };
        let want = Programmed {
            id,
            backends: ids.clone(),
            flags,
            timeout: f.affinity_timeout.unwrap_or(0),
            maglev_size,
            ranges: ranges.clone(),
            groups: groups.clone(),
            outlier,
            standby: standby.clone(),
        };
        if old.as_ref() == Some(&want) {
            return Ok(());
        }
        // Health entries before a master that asks for outcomes to be counted.
        if let Some(o) = outlier {
            for id in ids.iter().chain(&standby) {
                self.watch(*id, o)?;
            }
        }
        // The prefixes go in before a master that asks for them.
        for r in &ranges {
            self.lb
                .put("weir_lb4_src_range", &range_key(id, *r), &1u8)?;
        }
        if maglev_size > 0 {
            let names: Vec<String> = order.iter().map(|(b, _)| b.to_string()).collect();
            let weights: Vec<u32> = order.iter().map(|(_, w)| *w).collect();
            let table: Vec<u32> = maglev::build_weighted(&names, &weights, maglev_size)
                .into_iter()
                .map(|i| ids[i])
                .collect();
            self.lb.set_maglev(id, &table)?;
        }
        for (i, bid) in ids.iter().enumerate() {
            self.put_slot(
                key,
                (i + 1) as u16,
                &lb_service {
                    backend_id: *bid,
                    svc_id: id,
                    ..Default::default()
                },
            )?;
            self.lb.put(
                "weir_lb_affinity_match",
                &lb_affinity_match {
                    svc_id: id,
                    backend_id: *bid,
                },
                &1u8,
            )?;
        }
        if !groups.is_empty() {
            self.lb.put("weir_lb_groups", &id, &groups_value(&groups))?;
        }
        self.put_slot(
            key,
            0,
            &lb_service {
                backend_id: maglev_size,
                svc_id: id,
                count: ids.len() as u16,
                flags,
                affinity_timeout: want.timeout,
            },
        )?;
        if let Some(o) = &old {
            for slot in ids.len() + 1..=o.backends.len() {
                self.delete_slot(key, slot as u16)?;
            }
            let now: BTreeSet<u32> = ids.iter().copied().collect();
            for gone in o.backends.iter().filter(|b| !now.contains(b)) {
                self.lb.remove(
                    "weir_lb_affinity_match",
                    &lb_affinity_match {
                        svc_id: id,
                        backend_id: *gone,
                    },
                )?;
            }
            if o.maglev_size > 0 && maglev_size == 0 {
                self.lb.remove("weir_lb_maglev", &id)?;
            }
            if !o.groups.is_empty() && groups.is_empty() {
                self.lb.remove("weir_lb_groups", &id)?;
            }
            for r in o.ranges.difference(&ranges) {
                self.lb.remove("weir_lb4_src_range", &range_key(id, *r))?;
            }
        }
        for b in want.backends.iter().chain(&want.standby) {
            *self.refs.entry(*b).or_default() += 1;
        }
        if let Some(o) = &old {
            for b in o.backends.iter().chain(&o.standby) {
                if let Some(r) = self.refs.get_mut(b) {
                    *r = r.saturating_sub(1);
                }
            }
        }
        self.frontends.insert(*key, want);
        stats.frontends_updated += 1;
        Ok(())
    }

    /// Puts backend `id` under outlier detection with `(failures, base ms)`. The datapath's
    /// counts live in their own map (weir_lb_health), which only the datapath writes.
    fn watch(&mut self, id: u32, (threshold, base_ms): (u32, u32)) -> Result<(), DataplaneError> {
        let old = self.watched.get(&id).copied().unwrap_or_default();
        let want = lb_outlier {
            threshold,
            base_ms,
            ..old
        };
        let same = |a: &lb_outlier, b: &lb_outlier| {
            (a.threshold, a.base_ms, a.acked) == (b.threshold, b.base_ms, b.acked)
        };
        if self.watched.contains_key(&id) && same(&old, &want) {
            return Ok(());
        }
        // The counts' entry, zeroed, unless the datapath has one already.
        self.lb
            .put_new("weir_lb_health", &id, &lb_health::default())?;
        self.lb.put("weir_lb_outlier", &id, &want)?;
        self.watched.insert(id, want);
        Ok(())
    }

    /// The backends under outlier detection with their counts; `by_id` names them.
    fn health_of(
        &self,
        by_id: &BTreeMap<u32, (Backend, Proto)>,
    ) -> Result<Vec<Ejection>, DataplaneError> {
        let now = boot_nanos();
        let counts: BTreeMap<u32, lb_health> = self
            .lb
            .entries::<u32, lb_health>("weir_lb_health")?
            .into_iter()
            .collect();
        Ok(self
            .watched
            .iter()
            .filter_map(|(id, o)| {
                let (backend, proto) = *by_id.get(id)?;
                let h = counts.get(id).copied().unwrap_or_default();
                Some(Ejection {
                    id: *id,
                    backend,
                    proto,
                    remaining_ms: h.ejected_until.saturating_sub(now) / 1_000_000,
                    ejections: h.ejections,
                    failures: h.failures,
                    failures_total: h.failures_total,
                    successes_total: h.successes_total,
                    threshold: o.threshold,
                    base_ms: o.base_ms,
                })
            })
            .collect())
    }

    /// Ends outlier detection of the backends no frontend watches any more.
    fn unwatch_stale(&mut self) -> Result<(), DataplaneError> {
        let live: BTreeSet<u32> = self
            .frontends
            .values()
            .filter(|f| f.outlier.is_some())
            .flat_map(|f| f.backends.iter().chain(&f.standby).copied())
            .collect();
        let stale: Vec<u32> = self
            .watched
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in stale {
            // Settings first: the datapath counts only backends that have them.
            self.lb.remove("weir_lb_outlier", &id)?;
            self.lb.remove("weir_lb_health", &id)?;
            self.watched.remove(&id);
        }
        Ok(())
    }

    fn unprogram(&mut self, key: &FrontendKey) -> Result<(), DataplaneError> {
        let Some(o) = self.frontends.remove(key) else {
            return Ok(());
        };
        for b in o.backends.iter().chain(&o.standby) {
            if let Some(r) = self.refs.get_mut(b) {
                *r = r.saturating_sub(1);
            }
        }
        self.delete_slot(key, 0)?;
        for slot in 1..=o.backends.len() {
            self.delete_slot(key, slot as u16)?;
        }
        for b in &o.backends {
            self.lb.remove(
                "weir_lb_affinity_match",
                &lb_affinity_match {
                    svc_id: o.id,
                    backend_id: *b,
                },
            )?;
        }
        if o.maglev_size > 0 {
            self.lb.remove("weir_lb_maglev", &o.id)?;
        }
        if !o.groups.is_empty() {
            self.lb.remove("weir_lb_groups", &o.id)?;
        }
        for r in &o.ranges {
            self.lb.remove("weir_lb4_src_range", &range_key(o.id, *r))?;
        }
        self.frontend_ids.remove(&o.id);
        Ok(())
    }
}

impl Dataplane for EbpfDataplane {
    fn retire(&mut self) -> Result<(), DataplaneError> {
        Ok(self.lb.detach()?)
    }

    fn apply(&mut self, state: &LbState) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        for (key, f) in &state.frontends {
            // Unchanged frontends cost one comparison: a one-Service change touches one.
            if self.applied.get(key) == Some(f) {
                continue;
            }
            self.program(key, f, &mut stats)?;
            self.applied.insert(*key, f.clone());
        }
        let stale: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !state.frontends.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            self.unprogram(&key)?;
            self.applied.remove(&key);
            stats.frontends_removed += 1;
        }
        if stats.frontends_updated + stats.frontends_removed > 0 {
            self.unwatch_stale()?;
        }
        let mut unused: Vec<((Backend, Proto), u32)> = Vec::new();
        if stats.frontends_updated + stats.frontends_removed > 0
            || self.backends.len() > self.refs.values().filter(|r| **r > 0).count()
        {
            unused = self
                .backends
                .iter()
                .filter(|(_, id)| self.refs.get(id).copied().unwrap_or(0) == 0)
                .map(|(k, id)| (*k, *id))
                .collect();
        }
        for (_, id) in &unused {
            self.refs.remove(id);
        }
        let mut gone_udp = Vec::new();
        for ((b, proto), id) in unused {
            match b.ip {
                IpAddr::V4(_) => self.lb.remove("weir_lb4_backends", &id)?,
                IpAddr::V6(_) => self.lb.remove("weir_lb6_backends", &id)?,
            }
            self.backends.remove(&(b, proto));
            self.backend_ids.remove(&id);
            stats.backends_removed += 1;
            if proto == Proto::Udp {
                gone_udp.push(b);
            }
        }
        if !gone_udp.is_empty() {
            stats.sockets_destroyed =
                crate::sockets::destroy_connected_udp(&self.cgroup, &gone_udp);
        }
        Ok(stats)
    }

    fn dump(&self) -> Result<Dump, DataplaneError> {
        let by_id: BTreeMap<u32, (Backend, Proto)> =
            self.backends.iter().map(|(k, id)| (*id, *k)).collect();
        let frontends = self
            .frontends
            .iter()
            .map(|(k, p)| FrontendDump {
                key: *k,
                id: p.id,
                backends: p
                    .backends
                    .iter()
                    .filter_map(|id| by_id.get(id).map(|(b, _)| (*id, *b)))
                    .collect(),
                affinity_timeout: (p.flags & SVC_AFFINITY != 0).then_some(p.timeout),
                maglev_size: (p.maglev_size > 0).then_some(p.maglev_size),
                dsr: p.flags & SVC_DSR != 0,
                shares: shares_of(&p.groups, p.backends.len()),
                outlier: p.flags & SVC_OUTLIER != 0,
                source_ranges: p
                    .ranges
                    .iter()
                    .map(|(a, l)| format!("{}/{l}", Ipv4Addr::from(a.to_ne_bytes())))
                    .collect(),
            })
            .collect();
        let boot_now = boot_seconds();
        let affinity = self
            .lb
            .entries::<lb_affinity_key, lb_affinity>("weir_lb_affinity")?
            .into_iter()
            .map(|(k, v)| AffinityDump {
                client: k.client,
                frontend_id: k.svc_id,
                backend_id: v.backend_id,
                idle_seconds: boot_now.saturating_sub(v.last_used),
            })
            .collect();
        Ok(Dump {
            frontends,
            backends: by_id.iter().map(|(id, (b, p))| (*id, *b, *p)).collect(),
            affinity,
            counters: self
                .lb
                .stats()?
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            events_lost: self
                .lb
                .events_lost()?
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            programs: self
                .lb
                .programs()
                .into_iter()
                .map(|p| crate::ProgramDump {
                    name: p.name.to_string(),
                    id: p.id,
                    run_count: p.run_count,
                    avg_run_ns: p.run_time_ns.checked_div(p.run_count).unwrap_or(0),
                })
                .collect(),
            maps: weir_bpf::SOCK_MAPS
                .iter()
                .map(|m| {
                    let (entries, capacity) = self.lb.usage(m);
                    MapUsage {
                        name: m.to_string(),
                        entries,
                        capacity,
                    }
                })
                .collect(),
            health: self.health_of(&by_id)?,
        })
    }

    fn health(&self) -> Result<Vec<Ejection>, DataplaneError> {
        // Only the watched backends' addresses, not a map of every backend.
        let by_id: BTreeMap<u32, (Backend, Proto)> = self
            .backends
            .iter()
            .filter(|(_, id)| self.watched.contains_key(id))
            .map(|(k, id)| (*id, *k))
            .collect();
        self.health_of(&by_id)
    }

    fn acknowledge(&mut self, health: &[Ejection]) -> Result<(), DataplaneError> {
        for h in health {
            let Some(o) = self.watched.get(&h.id).copied() else {
                continue;
            };
            if o.acked != h.ejections {
                let want = lb_outlier {
                    acked: h.ejections,
                    ..o
                };
                self.lb.put("weir_lb_outlier", &h.id, &want)?;
                self.watched.insert(h.id, want);
            }
        }
        Ok(())
    }

    fn ejection_events(&self) -> Option<PathBuf> {
        Some(self.lb.pin_path("weir_lb_events"))
    }

    fn set_translation_events(&mut self, on: bool) -> Result<(), DataplaneError> {
        Ok(self.lb.set_events(on)?)
    }

    fn translation_events(&self) -> Option<PathBuf> {
        Some(self.lb.pin_path("weir_sock_events"))
    }
}

/// Each slot's percent of new connections, from the groups of a weighted frontend.
fn shares_of(groups: &[Group], slots: usize) -> Vec<f64> {
    let Some(total) = groups.last().map(|g| f64::from(g.0)).filter(|t| *t > 0.0) else {
        return Vec::new();
    };
    let mut out = vec![0.0; slots];
    let mut before = 0u32;
    for (upto, first, count) in groups {
        let each = 100.0 * f64::from(upto - before) / total / f64::from((*count).max(1));
        for s in out
            .iter_mut()
            .skip(*first as usize - 1)
            .take(*count as usize)
        {
            *s = each;
        }
        before = *upto;
    }
    out
}

/// Nanoseconds since boot (CLOCK_BOOTTIME), the clock of ejection deadlines.
fn boot_nanos() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME);
    t.map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// Seconds since boot, the clock the datapath stamps affinity entries with.
fn boot_seconds() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split('.').next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}
