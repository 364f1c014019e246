//! The pod datapath: local endpoints (from the network plugin's endpoint records) written to
//! the endpoint map, the pod programs attached to each endpoint's host-side veth and the node
//! program to the node's devices. Idempotent: `sync` makes the kernel match the records, so
//! a restarted agent picks up where the last one stopped (links and maps are pinned).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Serialize;
use weir_bpf::datapath::{
    ct4_entry, ct4_key, ct6_entry, ct6_key, endpoint_info, endpoint_key, ep_policy, node_config,
    Datapath, TcProgram, XdpProgram, AF_INET, AF_INET6, CT_F_CLOSING, CT_F_ESTABLISHED, CT_F_REPLY,
    CT_F_SEEN_REPLY, CT_F_SNAT,
};
use weir_control::policy::PolicyState;
use weir_model::endpoint::EndpointRecord;

use crate::{DataplaneError, MapUsage, ProgramDump};

/// A prefix of the prefilter's deny list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PrefilterEntry {
    /// The source prefix.
    pub cidr: ipnet::IpNet,
    /// Packets dropped.
    pub packets: u64,
    /// Bytes dropped.
    pub bytes: u64,
}

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
    /// Records left out because their device could not be given its programs (a veth that
    /// is gone): (record uid, why). The other records are applied all the same.
    pub failed: Vec<(String, String)>,
}

/// What applying the policy state changed.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct PolicyApplyStats {
    /// Local pods with a policy programmed (isolated in some direction).
    pub endpoints: usize,
    /// Policy entries in the map for them.
    pub entries: usize,
    /// Entries written by this apply.
    pub entries_added: usize,
    /// Entries removed.
    pub entries_removed: usize,
    /// Entries rewritten with new values (the policies they come from changed).
    pub entries_updated: usize,
    /// Pods whose device is not known yet (no endpoint record): programmed when it appears.
    pub pending: Vec<String>,
    /// Pods whose policy could not be written: their isolated directions deny everything.
    pub failed: Vec<String>,
    /// The policy revision after this apply (flows judged under an older one are judged
    /// again on their next packet).
    pub revision: u32,
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
    /// Protocol (`TCP`, `UDP`, `ICMP`, or the number).
    pub proto: String,
    /// Source address and port of the packets this entry matches (ICMP echo: the identifier
    /// is the source port of a request, the destination port of a reply).
    pub src: String,
    /// Destination address and port.
    pub dst: String,
    /// `original` (client to frontend) or `reply` (backend to client or SNAT address).
    pub direction: String,
    /// States and properties: `snat`, `seen-reply`, `established`, `closing`, `dsr`, `masq`, `backend-time-wait`, `reset`
    /// (a pod's flow leaving the cluster; a `masq` reply entry without `snat` is a flow from
    /// outside straight to a pod, whose answers keep the pod's address).
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

fn addr6_port(a: &[u32; 4], p: u16) -> String {
    format!("[{}]:{}", weir_bpf::ip6_from_words(*a), u16::from_be(p))
}

/// One conntrack entry of either family, addresses formatted.
struct CtView {
    proto: u8,
    src: String,
    dst: String,
    nat: String,
    snat: String,
    flags: u16,
    expires: u64,
    packets: u64,
    bytes: u64,
    svc_id: u32,
    backend_id: u32,
}

fn ct4_view(k: &ct4_key, v: &ct4_entry) -> CtView {
    CtView {
        proto: k.proto,
        src: addr_port(k.saddr, k.sport),
        dst: addr_port(k.daddr, k.dport),
        nat: addr_port(v.nat_addr, v.nat_port),
        snat: addr_port(v.snat_addr, v.snat_port),
        flags: v.flags,
        expires: v.expires,
        packets: v.packets,
        bytes: v.bytes,
        svc_id: v.svc_id,
        backend_id: v.backend_id,
    }
}

fn ct6_view(k: &ct6_key, v: &ct6_entry) -> CtView {
    CtView {
        proto: k.proto,
        src: addr6_port(&k.saddr, k.sport),
        dst: addr6_port(&k.daddr, k.dport),
        nat: addr6_port(&v.nat_addr, v.nat_port),
        snat: addr6_port(&v.snat_addr, v.snat_port),
        flags: v.flags,
        expires: v.expires,
        packets: v.packets,
        bytes: v.bytes,
        svc_id: v.svc_id,
        backend_id: v.backend_id,
    }
}

fn ct_dump(c: CtView, now: u64) -> CtDump {
    let mut flags = Vec::new();
    for (bit, name) in [
        (CT_F_SNAT, "snat"),
        (CT_F_SEEN_REPLY, "seen-reply"),
        (CT_F_ESTABLISHED, "established"),
        (CT_F_CLOSING, "closing"),
        (weir_bpf::datapath::CT_F_DSR, "dsr"),
        (weir_bpf::datapath::CT_F_MASQ, "masq"),
        (weir_bpf::datapath::CT_F_TIME_WAIT, "backend-time-wait"),
        (weir_bpf::datapath::CT_F_RST, "reset"),
        (weir_bpf::datapath::CT_F_WATCH, "outlier-watched"),
        (weir_bpf::datapath::CT_F_COUNTED, "outcome-counted"),
        (weir_bpf::datapath::CT_F_TAKEN, "taken-over"),
    ] {
        if c.flags & bit != 0 {
            flags.push(name.to_string());
        }
    }
    CtDump {
        proto: match c.proto {
            1 => "ICMP".into(),
            6 => "TCP".into(),
            17 => "UDP".into(),
            n => n.to_string(),
        },
        src: c.src,
        dst: c.dst,
        direction: if c.flags & CT_F_REPLY != 0 {
            "reply".into()
        } else {
            "original".into()
        },
        flags,
        nat: c.nat,
        snat: if c.flags & CT_F_SNAT != 0 {
            c.snat
        } else {
            String::new()
        },
        expires_in: c.expires as i64 - now as i64,
        packets: c.packets,
        bytes: c.bytes,
        svc_id: c.svc_id,
        backend_id: c.backend_id,
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
            k.addr = weir_bpf::ip6_words(a);
            k.family = AF_INET6;
        }
    }
    k
}

fn ip_of(k: &endpoint_key) -> IpAddr {
    weir_bpf::ip_from_words(k.family, k.addr)
}

fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A map key or value as a fixed array of its bytes (`N` its size).
fn bytes_of<T: Copy, const N: usize>(v: &T) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(weir_bpf::as_bytes(v));
    b
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    weir_bpf::from_bytes(b)
}

/// Map keys are compared as bytes; the generated types are not `Ord`.
fn key_bytes(k: &endpoint_key) -> Vec<u8> {
    weir_bpf::as_bytes(k).to_vec()
}

/// A pod device's policy flags and entries (policy_key bytes -> policy_entry bytes).
type EpPolicyState = (ep_policy, PolicyEntryBytes);
type PolicyEntryBytes = BTreeMap<[u8; 16], [u8; 8]>;
/// The ipcache (prefix -> identity, namespace class) and the CIDR identities.
type AddrTries = (
    BTreeMap<ipnet::IpNet, (u32, u32)>,
    BTreeMap<ipnet::IpNet, u32>,
);

/// Which netfilter dataplane enforces NetworkPolicy when the pod programs are off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetfilterPolicy {
    /// Table `inet weir-policy`.
    Nftables,
    /// `WEIR-POLICY-*` chains in the filter table, with these binaries.
    Iptables(crate::ipt::IptablesBackend),
}

/// The pod datapath of one node.
pub struct PodDataplane {
    dp: Datapath,
    /// Node devices (ifindexes) that carry the node program.
    netdevs: BTreeSet<u32>,
    /// Devices attached since this agent started (links from before are re-pointed once).
    attached: BTreeSet<u32>,
    /// The node settings last written, and whether masquerading was asked for (it is turned
    /// on only once the destinations it must leave alone are known).
    config: node_config,
    masquerade: bool,
    /// Whether the programs summarize forwarding (`CFG_TRACE`).
    trace: bool,
    /// The policy state last asked for (re-applied when endpoints change).
    policy: Option<PolicyState>,
    /// Pod address -> host-side ifindex, from the last endpoint sync.
    ip_ifindex: HashMap<IpAddr, u32>,
    /// What weir_policy and weir_policy_eps hold per pod device (read back once, then kept).
    policy_shadow: Option<HashMap<u32, EpPolicyState>>,
    /// The address tries last written: ipcache (identity, namespace class) and CIDRs.
    ipcache_written: Option<AddrTries>,
    /// Whether programs go on the devices (false under a netfilter dataplane).
    programs: bool,
    /// Without programs: the network namespace of the node, where policy is written, and
    /// the netfilter dataplane that renders it.
    netns: Option<std::path::PathBuf>,
    netfilter: Option<NetfilterPolicy>,
    /// Without programs: the policy rendering last written.
    nf_policy: Option<String>,
    /// Pod address -> host-side device name, from the last endpoint sync.
    ip_ifname: HashMap<IpAddr, String>,
    /// The node's devices by name (where the prefilter drops, under netfilter).
    devices: Vec<String>,
    /// Under netfilter: the policy rules changed since established flows were last judged.
    judge_flows: bool,
    /// The node's own addresses, as configured.
    node_addrs: Vec<IpAddr>,
    /// Under netfilter: the tc programs stay on for the DSR flows established before the
    /// switch, and for nothing else (`CFG_DRAIN`), until those flows end.
    draining: bool,
}

/// The `EP_POLICY_PEER_*` hint an entry naming `peer` gives its pod (0 for a pod identity,
/// host, world or remote node, which the datapath always looks up).
fn peer_hint(peer: u32) -> u32 {
    use weir_bpf::datapath::{EP_POLICY_PEER_ANY, EP_POLICY_PEER_CIDR, EP_POLICY_PEER_CLASS};
    use weir_control::policy::id;
    match peer {
        id::ANY => EP_POLICY_PEER_ANY,
        id::CLUSTER => EP_POLICY_PEER_CLASS,
        p if p >= id::NS_BASE => EP_POLICY_PEER_CLASS,
        p if p >= id::CIDR_BASE => EP_POLICY_PEER_CIDR,
        _ => 0,
    }
}

impl PodDataplane {
    /// Loads the programs with their maps pinned in `pin_dir` (kept across restarts); the
    /// load-balancing maps are the socket layer's, in `lb_pin_dir`.
    pub fn new(pin_dir: &Path, lb_pin_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(PodDataplane {
            dp: Datapath::load(pin_dir, lb_pin_dir)?,
            netdevs: BTreeSet::new(),
            attached: BTreeSet::new(),
            config: node_config::default(),
            masquerade: false,
            trace: false,
            policy: None,
            ip_ifindex: HashMap::new(),
            policy_shadow: None,
            ipcache_written: None,
            programs: true,
            netns: None,
            netfilter: None,
            nf_policy: None,
            ip_ifname: HashMap::new(),
            devices: Vec::new(),
            judge_flows: false,
            node_addrs: Vec::new(),
            draining: false,
        })
    }

    /// Under a netfilter dataplane (whose network namespace is `netns`): no program goes on
    /// any device, and the links an earlier agent pinned are removed as devices are synced;
    /// the kernel routes the pods' packets and `policy` renders NetworkPolicy. The maps are
    /// kept up to date all the same (the endpoints for the CNI plugin and introspection).
    /// An earlier agent's drain (see [`PodDataplane::leave_programs`]) goes on while its DSR
    /// flows are open.
    pub fn set_netfilter(&mut self, netns: Option<std::path::PathBuf>, policy: NetfilterPolicy) {
        use weir_bpf::datapath::CFG_DRAIN;
        self.programs = false;
        self.netns = netns;
        self.netfilter = Some(policy);
        let pinned = self.dp.config().is_ok_and(|c| c.flags & CFG_DRAIN != 0);
        self.draining = pinned && self.dsr_flows_open() > 0;
    }

    /// A switch to a netfilter dataplane, before the cut-over: NetworkPolicy is written into
    /// netfilter too (the programs stay, so both judge until they go).
    pub fn prepare_netfilter(
        &mut self,
        netns: Option<std::path::PathBuf>,
        policy: NetfilterPolicy,
    ) -> Result<(), DataplaneError> {
        self.netns = netns;
        self.netfilter = Some(policy);
        self.nf_policy = None;
        self.write_netfilter_policy()?;
        self.write_netfilter_prefilter()
    }

    /// Names the node's devices (the prefilter drops what arrives on them); under netfilter
    /// the prefilter's rules are written for them.
    pub fn set_devices(&mut self, names: &[String]) -> Result<(), DataplaneError> {
        self.devices = names.to_vec();
        self.write_netfilter_prefilter()
    }

    /// Whether programs go on the devices (false under a netfilter dataplane).
    pub fn runs_programs(&self) -> bool {
        self.programs
    }

    /// Under netfilter (with the devices known), the prefilter's deny list (the map stays
    /// the list's record) written as the dataplane's rules.
    fn write_netfilter_prefilter(&self) -> Result<(), DataplaneError> {
        let Some(nf) = self.netfilter else {
            return Ok(());
        };
        if self.devices.is_empty() {
            return Ok(());
        }
        let want: BTreeSet<ipnet::IpNet> = self
            .dp
            .prefilter_entries()?
            .into_iter()
            .map(|(n, ..)| n)
            .collect();
        let netns = self.netns.as_deref();
        match nf {
            NetfilterPolicy::Nftables => crate::nft::prefilter::write(netns, &want, &self.devices),
            NetfilterPolicy::Iptables(b) => {
                crate::ipt::prefilter::write(netns, b, &want, &self.devices)
            }
        }
    }

    /// Takes back [`PodDataplane::prepare_netfilter`] (a switch rolled back): policy is no
    /// longer written into netfilter. (The rules already written go with the target's
    /// tables, which the caller removes.)
    pub fn abandon_netfilter(&mut self) {
        self.netfilter = None;
        self.nf_policy = None;
    }

    /// The cut-over of a switch to a netfilter dataplane: every tc and XDP program of the
    /// node is detached now, and none is attached again; unless DSR flows are open. Netfilter
    /// cannot carry those (their packets never passed it, and it cannot tunnel them to the
    /// backend's node or give a reply the frontend's address), so the tc programs stay for
    /// them alone (`CFG_DRAIN`: every other packet goes to the host stack untouched) until
    /// they end ([`PodDataplane::drain`]); XDP goes now. Returns the DSR flows left draining.
    pub fn leave_programs(&mut self) -> usize {
        let open = self.dsr_flows_open();
        if open == 0 {
            self.detach_programs();
            return 0;
        }
        self.programs = false;
        self.draining = true;
        let links: BTreeSet<u32> = self.dp.attached().into_iter().collect();
        for ifindex in links.union(&self.netdevs.clone()) {
            self.dp.detach_xdp(*ifindex);
        }
        if let Err(e) = self.write_drain_flag(true) {
            tracing::error!(error = %e, "keeping the programs for DSR flows; detaching them");
            self.detach_programs();
            return 0;
        }
        open
    }

    /// While draining: the DSR flows still open; when none is left, the programs go.
    pub fn drain(&mut self) -> usize {
        if !self.draining {
            return 0;
        }
        let open = self.dsr_flows_open();
        if open == 0 {
            tracing::info!("the DSR flows left by a switch ended: detaching the programs");
            self.detach_programs();
        }
        open
    }

    /// The IPv4 DSR flows open (0 when they cannot be read).
    pub fn dsr_flows_open(&self) -> usize {
        let now = weir_bpf::datapath::boot_seconds();
        self.dp.dsr_flows_open(now).unwrap_or(0)
    }

    /// Whether the programs summarize forwarding (`CFG_TRACE`): written with the node's
    /// settings (configure_node).
    pub fn set_flow_summaries(&mut self, on: bool) {
        self.trace = on;
    }

    /// Sets or clears `CFG_DRAIN` in the node's settings.
    fn write_drain_flag(&mut self, on: bool) -> Result<(), DataplaneError> {
        use weir_bpf::datapath::CFG_DRAIN;
        let mut cfg = self.dp.config()?;
        if on {
            cfg.flags |= CFG_DRAIN;
            self.config.flags |= CFG_DRAIN;
        } else {
            cfg.flags &= !CFG_DRAIN;
            self.config.flags &= !CFG_DRAIN;
        }
        Ok(self.dp.set_config(&cfg)?)
    }

    /// Whether DSR flows left by a switch to netfilter keep the programs on.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Every tc and XDP program of the node detached now, none attached again (the drain
    /// over, if there was one).
    pub fn detach_programs(&mut self) {
        self.programs = false;
        let pinned: BTreeSet<u32> = self.dp.attached().into_iter().collect();
        for ifindex in pinned.union(&self.attached.clone()) {
            self.dp.detach(*ifindex);
        }
        self.attached.clear();
        self.netdevs.clear();
        if self.draining {
            self.draining = false;
            if let Err(e) = self.write_drain_flag(false) {
                tracing::warn!(error = %e, "clearing the drain flag");
            }
        }
    }

    /// The cut-over of a switch to the eBPF dataplane: programs go on the devices again as
    /// they are synced (the caller attaches the node's devices and syncs the pods), and
    /// NetworkPolicy is no longer written into netfilter (the rules there go with the old
    /// dataplane's removal).
    pub fn resume_programs(&mut self) {
        if self.draining {
            self.draining = false;
            if let Err(e) = self.write_drain_flag(false) {
                tracing::error!(error = %e, "clearing the drain flag");
            }
        }
        self.programs = true;
        self.netfilter = None;
        self.nf_policy = None;
    }

    /// Without programs, NetworkPolicy is enforced by the netfilter dataplane (nftables:
    /// `inet weir-policy`; iptables: `WEIR-POLICY-*` chains), rendered from the same state
    /// and rewritten whole when the rendering changes.
    fn write_netfilter_policy(&mut self) -> Result<(), DataplaneError> {
        let Some(nf) = self.netfilter else {
            return Ok(());
        };
        let empty = PolicyState::default();
        let state = self.policy.as_ref().unwrap_or(&empty);
        let netns = self.netns.as_deref();
        // nftables: the commands themselves; iptables: the chains' text (the restore adds
        // the deletion of the kernel's stale chains, read when it is written).
        let nft_cmds = (nf == NetfilterPolicy::Nftables)
            .then(|| crate::nft::policy::render(state, &self.ip_ifindex));
        let key = match nf {
            NetfilterPolicy::Nftables => serde_json::to_string(&nft_cmds).unwrap_or_default(),
            NetfilterPolicy::Iptables(_) => {
                [crate::nft::expr::Family::Ip, crate::nft::expr::Family::Ip6]
                    .into_iter()
                    .map(|f| crate::ipt::policy::render(f, state, &self.ip_ifname, &[]))
                    .collect()
            }
        };
        if self.nf_policy.as_ref() == Some(&key) {
            return Ok(());
        }
        self.nf_policy = None;
        match nf {
            NetfilterPolicy::Nftables => {
                crate::nft::write_policy(netns, nft_cmds.as_deref().unwrap_or_default())?
            }
            NetfilterPolicy::Iptables(b) => {
                crate::ipt::write_policy(netns, b, state, &self.ip_ifname)?
            }
        }
        self.nf_policy = Some(key);
        self.judge_flows = true;
        Ok(())
    }

    /// The local pods' addresses, from the last endpoint sync.
    pub fn local_pod_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip_ifindex.keys().copied()
    }

    /// The node's own addresses, as configured.
    pub fn node_addrs(&self) -> &[IpAddr] {
        &self.node_addrs
    }

    /// The node's IPv4 address for SNAT, as configured.
    pub fn snat4(&self) -> Option<std::net::Ipv4Addr> {
        (self.config.snat4 != 0).then(|| std::net::Ipv4Addr::from(self.config.snat4.to_ne_bytes()))
    }

    /// Under netfilter, after a policy change: the kernel's conntrack entries of TCP and UDP
    /// flows (both families) of a local policed pod that the policy now denies are deleted,
    /// as the eBPF datapath judges every flow again on a policy change and cuts the ones it
    /// denies. Each flow is judged in its original direction, after DNAT, by the pod programs
    /// run on a synthetic first packet (BPF_PROG_TEST_RUN: the same verdict the programs
    /// would give, read from the same maps, which stay current under netfilter);
    /// `netdev_ifindex` is the device packets from outside arrive on. A deleted flow's next packet meets the policy
    /// rules as a new one, and is dropped. Runs when the policy rules changed since the last
    /// time. Returns how many flows were cut.
    pub fn cut_denied_flows(&mut self, netdev_ifindex: u32) -> Result<usize, DataplaneError> {
        if self.netfilter.is_none() || self.policy.is_none() || !self.judge_flows {
            return Ok(0);
        }
        self.judge_flows = false;
        let policed: BTreeSet<u32> = self
            .dp
            .ep_policies()?
            .into_iter()
            .map(|(ifindex, _)| ifindex)
            .collect();
        let policed_ip = |ip: IpAddr| {
            self.ip_ifindex
                .get(&ip)
                .is_some_and(|i| policed.contains(i))
        };
        let mut ct = crate::ctnetlink::Conntrack::open(self.netns.as_deref())?;
        let mut cut = 0;
        for e in ct.dump()? {
            // The flow after DNAT: the client, and where its replies come from.
            let (src, dst) = (e.orig.0, e.reply.0);
            if !matches!(e.proto, 6 | 17) || !(policed_ip(src.ip()) || policed_ip(dst.ip())) {
                continue;
            }
            // The program that would see it: the source pod's, else the node device's.
            let at = match self.ip_ifindex.get(&src.ip()) {
                Some(i) => (TcProgram::FromPod, *i),
                None => (TcProgram::FromNetdev, netdev_ifindex),
            };
            let x = self.explain_at(at, src, dst, e.proto == 6)?;
            if x.verdict == "drop" && x.reason.starts_with("DROP_POLICY") {
                ct.delete_entry(&e)?;
                cut += 1;
            }
        }
        Ok(cut)
    }

    /// The loaded programs, for BPF_PROG_TEST_RUN.
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// Attaches an XDP program to device `ifindex`: the prefilter alone, or the prefilter
    /// followed by the completion of NodePort flows SNATed to other nodes; everything else
    /// goes on to the tc program.
    pub fn attach_xdp(&mut self, ifindex: u32, which: XdpProgram) -> Result<(), DataplaneError> {
        if !self.programs {
            self.dp.detach_xdp(ifindex);
            return Ok(());
        }
        Ok(self.dp.attach_xdp(ifindex, which)?)
    }

    /// The prefilter's deny list with what each prefix dropped.
    pub fn prefilter_list(&self) -> Result<Vec<PrefilterEntry>, DataplaneError> {
        let entries = self.dp.prefilter_entries()?;
        // Under netfilter the rules count (the XDP program's counters are from before).
        let counted = match self.netfilter {
            Some(NetfilterPolicy::Nftables) => {
                Some(crate::nft::prefilter::counters(self.netns.as_deref())?)
            }
            Some(NetfilterPolicy::Iptables(b)) => {
                Some(crate::ipt::prefilter::counters(self.netns.as_deref(), b)?)
            }
            None => None,
        };
        Ok(entries
            .into_iter()
            .map(|(cidr, _, packets, bytes)| {
                let (packets, bytes) = match &counted {
                    Some(c) => c.get(&cidr).copied().unwrap_or_default(),
                    None => (packets, bytes),
                };
                PrefilterEntry {
                    cidr,
                    packets,
                    bytes,
                }
            })
            .collect())
    }

    /// Adds `nets` (host bits cleared) to the prefilter's deny list: all of them or, on an
    /// error, none. Prefixes already there keep their counters. Returns the new ones.
    pub fn prefilter_add(
        &mut self,
        nets: &[ipnet::IpNet],
    ) -> Result<Vec<ipnet::IpNet>, DataplaneError> {
        let have = self.dp.prefilter_entries()?;
        let mut used: BTreeSet<u32> = have.iter().map(|(_, slot, ..)| *slot).collect();
        let known: BTreeSet<ipnet::IpNet> = have.iter().map(|(n, ..)| *n).collect();
        let new: Vec<ipnet::IpNet> = nets
            .iter()
            .map(|n| n.trunc())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|n| !known.contains(n))
            .collect();
        let capacity = self.dp.capacity("weir_prefilter");
        if have.len() + new.len() > capacity as usize {
            return Err(DataplaneError::Full(format!(
                "the prefilter holds {} of {capacity} prefixes: {} more do not fit",
                have.len(),
                new.len()
            )));
        }
        let mut slot = 0;
        for (i, n) in new.iter().enumerate() {
            while used.contains(&slot) {
                slot += 1;
            }
            used.insert(slot);
            if let Err(e) = self.dp.prefilter_put(*n, slot) {
                for done in &new[..i] {
                    let _ = self.dp.prefilter_delete(*done);
                }
                return Err(e.into());
            }
        }
        if let Err(e) = self.write_netfilter_prefilter() {
            for done in &new {
                let _ = self.dp.prefilter_delete(*done);
            }
            let _ = self.write_netfilter_prefilter();
            return Err(e);
        }
        Ok(new)
    }

    /// Takes `nets` (host bits cleared) out of the prefilter's deny list: all of them, or
    /// none when one is not there.
    pub fn prefilter_delete(&mut self, nets: &[ipnet::IpNet]) -> Result<(), DataplaneError> {
        let known: BTreeSet<ipnet::IpNet> = self
            .dp
            .prefilter_entries()?
            .into_iter()
            .map(|(n, ..)| n)
            .collect();
        if let Some(missing) = nets.iter().map(|n| n.trunc()).find(|n| !known.contains(n)) {
            return Err(DataplaneError::NotFound(format!(
                "{missing} is not in the prefilter"
            )));
        }
        for n in nets {
            self.dp.prefilter_delete(n.trunc())?;
        }
        self.write_netfilter_prefilter()
    }

    /// Detaches the XDP program from device `ifindex` (if weir attached one).
    pub fn detach_xdp(&mut self, ifindex: u32) {
        self.dp.detach_xdp(ifindex)
    }

    /// Attaches the node program to device `ifindex` (packets for local pods go straight to
    /// them).
    pub fn attach_netdev(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        if !self.programs && self.draining && self.dp.attached().contains(&ifindex) {
            self.netdevs.insert(ifindex);
            return Ok(());
        }
        if !self.programs {
            self.dp.detach(ifindex);
            return Ok(());
        }
        self.dp.attach(TcProgram::FromNetdev, ifindex)?;
        self.netdevs.insert(ifindex);
        self.attached.insert(ifindex);
        Ok(())
    }

    /// Sets the node's own addresses (a NodePort answers on each) and the SNAT address and
    /// source port range for flows sent to backends on other nodes (and, with `masquerade`,
    /// for pods' flows leaving the cluster).
    pub fn configure_node(
        &mut self,
        addrs: &[IpAddr],
        snat4: Option<std::net::Ipv4Addr>,
        snat_ports: (u16, u16),
        tunnel_ifindex: Option<u32>,
        masquerade: bool,
    ) -> Result<(), DataplaneError> {
        use weir_bpf::datapath::{CFG_MASQUERADE, CFG_VXLAN};
        let keys: Vec<endpoint_key> = addrs.iter().map(|a| endpoint_key_of(*a)).collect();
        self.dp.set_node_addrs(&keys)?;
        self.node_addrs = addrs.to_vec();
        let mut flags = 0;
        if tunnel_ifindex.is_some() {
            flags |= CFG_VXLAN;
        }
        // Until the pod CIDRs are known (a restarted agent finds them pinned), masquerading
        // would translate flows between pods too: it waits for set_nomasq_cidrs.
        self.masquerade = masquerade;
        if masquerade && self.dp.usage("weir_nomasq4").0 > 0 {
            flags |= CFG_MASQUERADE;
        }
        if self.draining {
            flags |= weir_bpf::datapath::CFG_DRAIN;
        }
        if self.trace {
            flags |= weir_bpf::datapath::CFG_TRACE;
        }
        self.config = node_config {
            snat4: snat4.map(|a| u32::from_ne_bytes(a.octets())).unwrap_or(0),
            snat_port_min: snat_ports.0,
            snat_port_max: snat_ports.1,
            flags,
            tunnel_ifindex: tunnel_ifindex.unwrap_or(0),
        };
        self.dp.set_config(&self.config)?;
        // IPv6 flows to other nodes' backends are SNATed to the node's first global IPv6
        // address.
        let snat6 = addrs.iter().find_map(|a| match a {
            IpAddr::V6(v6) if !v6.is_unicast_link_local() && !v6.is_loopback() => Some(*v6),
            _ => None,
        });
        self.dp.set_snat6(snat6)?;
        Ok(())
    }

    /// Masquerading: the IPv4 destinations pods reach with their own address (every node's
    /// pod CIDR, and any configured network). Turns masquerading on once they are written, if
    /// configure_node asked for it.
    pub fn set_nomasq_cidrs(
        &mut self,
        cidrs: &[(std::net::Ipv4Addr, u8)],
    ) -> Result<(), DataplaneError> {
        use weir_bpf::datapath::CFG_MASQUERADE;
        self.dp.set_nomasq_cidrs(cidrs)?;
        if self.masquerade && !cidrs.is_empty() && self.config.flags & CFG_MASQUERADE == 0 {
            self.config.flags |= CFG_MASQUERADE;
            self.dp.set_config(&self.config)?;
        }
        Ok(())
    }

    /// VXLAN mode: the other nodes' pod CIDRs (network, prefix length) and the underlay
    /// address of the node that has each.
    pub fn set_tunnel_routes(
        &self,
        routes: &[(IpAddr, u8, std::net::Ipv4Addr)],
    ) -> Result<(), DataplaneError> {
        Ok(self.dp.set_tunnel_routes(routes)?)
    }

    /// Removes expired conntrack entries. Returns how many.
    pub fn ct_gc(&self) -> Result<usize, DataplaneError> {
        Ok(self.dp.ct_gc(weir_bpf::datapath::boot_seconds(), false)?)
    }

    /// Removes every conntrack entry, policy ones included (benchmarks, and a switch to eBPF
    /// before it takes the kernel's flows over; on a node the programs run on, flows would
    /// lose their NAT). While draining, the DSR flows' entries stay (netfilter has no state
    /// for them).
    pub fn ct_flush(&self) -> Result<usize, DataplaneError> {
        if self.draining {
            let now = weir_bpf::datapath::boot_seconds();
            return Ok(self.dp.ct_flush_but_dsr(now)?);
        }
        Ok(self.dp.ct_gc(0, true)?)
    }

    /// Makes the endpoint map and the pod devices' programs match `records`. Programs are
    /// attached before a pod's address enters the map, and the address leaves the map
    /// before the programs go.
    pub fn sync(&mut self, records: &[EndpointRecord]) -> Result<PodSyncStats, DataplaneError> {
        let mut stats = PodSyncStats::default();
        let mut want: BTreeMap<Vec<u8>, (endpoint_key, endpoint_info)> = BTreeMap::new();
        // Programs first, device by device: one record whose device is gone (a pod's
        // namespace removed without a DEL) must not keep every other pod from its datapath.
        let mut broken: BTreeMap<u32, String> = BTreeMap::new();
        for ifindex in records
            .iter()
            .map(|r| r.host_ifindex)
            .collect::<BTreeSet<_>>()
        {
            if self.attached.contains(&ifindex) || !self.programs {
                continue;
            }
            let attached = self
                .dp
                .attach(TcProgram::FromPod, ifindex)
                .and_then(|_| self.dp.attach(TcProgram::ToPod, ifindex));
            match attached {
                Ok(()) => {
                    self.attached.insert(ifindex);
                    stats.devices_attached += 1;
                }
                Err(e) => {
                    broken.insert(ifindex, e.to_string());
                }
            }
        }
        let records: Vec<&EndpointRecord> = records
            .iter()
            .filter(|r| match broken.get(&r.host_ifindex) {
                Some(why) => {
                    stats.failed.push((r.uid.clone(), why.clone()));
                    false
                }
                None => true,
            })
            .collect();
        for r in &records {
            let (Some(mac), Some(node_mac)) = (
                EndpointRecord::parse_mac(&r.mac),
                EndpointRecord::parse_mac(&r.host_mac),
            ) else {
                continue; // EndpointRecord::read refuses these.
            };
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
        // A new pod's policy is programmed before its address enters the endpoint map (its
        // packets already pass the attached programs, which judge by device).
        let ip_ifindex: HashMap<IpAddr, u32> = records
            .iter()
            .flat_map(|r| r.ips.iter().map(move |ip| (*ip, r.host_ifindex)))
            .collect();
        self.ip_ifname = records
            .iter()
            .flat_map(|r| r.ips.iter().map(move |ip| (*ip, r.host_if.clone())))
            .collect();
        if ip_ifindex != self.ip_ifindex {
            self.ip_ifindex = ip_ifindex;
            if self.policy.is_some() {
                if let Err(e) = self.apply_policy() {
                    tracing::error!(error = %e, "re-applying NetworkPolicy after endpoints changed");
                }
            }
        }
        // Without programs, a new pod's policy is written before its address is in the map.
        self.write_netfilter_policy()?;
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
        let devices: BTreeSet<u32> = records.iter().map(|r| r.host_ifindex).collect();
        let pinned: BTreeSet<u32> = self.dp.attached().into_iter().collect();
        for ifindex in pinned.union(&self.attached.clone()) {
            let stays = self.programs || self.draining;
            if !stays || (!devices.contains(ifindex) && !self.netdevs.contains(ifindex)) {
                self.dp.detach(*ifindex);
                self.attached.remove(ifindex);
                stats.devices_detached += 1;
            }
        }
        Ok(stats)
    }

    /// Programs the NetworkPolicy state (ipcache, CIDR identities, every local pod's entries)
    /// and keeps it, to program pods whose device appears later. A pod whose entries cannot
    /// be written is failed closed (its isolated directions deny everything).
    pub fn set_policy(&mut self, state: PolicyState) -> Result<PolicyApplyStats, DataplaneError> {
        self.policy = Some(state);
        let stats = self.apply_policy()?;
        self.write_netfilter_policy()?;
        Ok(stats)
    }

    fn apply_policy(&mut self) -> Result<PolicyApplyStats, DataplaneError> {
        use weir_bpf::datapath::{ipcache_info, AddrMap};
        let Some(state) = self.policy.as_ref() else {
            return Ok(PolicyApplyStats::default());
        };
        let mut stats = PolicyApplyStats::default();
        let mut changed = false;

        // The address tries, rewritten only when they change.
        let ipc: BTreeMap<ipnet::IpNet, (u32, u32)> = state
            .ipcache
            .iter()
            .map(|(n, e)| (*n, (e.identity, e.ns_class)))
            .collect();
        let written = self
            .ipcache_written
            .as_ref()
            .is_some_and(|(i, c)| *i == ipc && *c == state.cidrs);
        if !written {
            let entries = |m: &mut dyn Iterator<Item = (ipnet::IpNet, u32, u32)>| {
                m.map(|(n, identity, ns_class)| {
                    (
                        n.addr(),
                        n.prefix_len(),
                        ipcache_info { identity, ns_class },
                    )
                })
                .collect::<Vec<_>>()
            };
            self.dp.set_addr_map(
                AddrMap::Ipcache,
                &entries(&mut ipc.iter().map(|(n, (i, c))| (*n, *i, *c))),
            )?;
            self.dp.set_addr_map(
                AddrMap::PolicyCidrs,
                &entries(&mut state.cidrs.iter().map(|(n, i)| (*n, *i, 0))),
            )?;
            self.ipcache_written = Some((ipc, state.cidrs.clone()));
            changed = true;
        }

        let want = self.wanted_ep_policies(state, &mut stats);

        // What they hold (read back once: a restarted agent finds the pinned maps).
        if self.policy_shadow.is_none() {
            let mut shadow: HashMap<u32, EpPolicyState> = HashMap::new();
            for (ifindex, v) in self.dp.ep_policies()? {
                shadow.entry(ifindex).or_default().0 = v;
            }
            for (k, v) in self.dp.policy_entries()? {
                let e = shadow.entry(k.ep).or_default();
                e.1.insert(bytes_of(&k), bytes_of(&v));
            }
            self.policy_shadow = Some(shadow);
        }
        for (ifindex, (pod, v, entries)) in &want {
            changed |= self.sync_ep_policy(*ifindex, pod, *v, entries, &mut stats)?;
        }
        let shadow = self.policy_shadow.as_mut().expect("shadow");
        let gone: Vec<u32> = shadow
            .keys()
            .filter(|i| !want.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            // No longer isolated (or no longer here): the flag goes first, then the entries.
            self.dp.set_ep_policy(ifindex, None)?;
            let (_, entries) = shadow.remove(&ifindex).expect("present");
            for k in entries.keys() {
                self.dp.policy_delete(&from_bytes(k))?;
                stats.entries_removed += 1;
            }
            changed = true;
        }
        changed |= stats.entries_added + stats.entries_removed > 0;
        let mut rev = self.dp.policy_revision()?;
        if changed {
            rev = rev.wrapping_add(1);
            self.dp.set_policy_revision(rev)?;
        }
        stats.revision = rev;
        Ok(stats)
    }

    /// The largest policy entry origin in the (pinned) policy map: a restarted agent numbers
    /// its origins above it. 0 when none or unreadable.
    pub fn largest_policy_origin(&self) -> u32 {
        match self.dp.policy_entries() {
            Ok(entries) => entries.iter().map(|(_, v)| v.origin).max().unwrap_or(0),
            Err(e) => {
                tracing::warn!(error = %e, "reading the policy entries' origins");
                0
            }
        }
    }

    /// What each isolated local pod's device should hold: its flags and entries, by
    /// host-side ifindex (pods without a device yet are noted as pending).
    fn wanted_ep_policies(
        &self,
        state: &PolicyState,
        stats: &mut PolicyApplyStats,
    ) -> BTreeMap<u32, (String, ep_policy, PolicyEntryBytes)> {
        use weir_bpf::datapath::{
            policy_entry, EP_POLICY_EGRESS, EP_POLICY_HINTS, EP_POLICY_INGRESS, POLICY_EGRESS,
            POLICY_INGRESS,
        };
        let mut want = BTreeMap::new();
        for (pod, ep) in &state.endpoints {
            if ep.ingress.is_none() && ep.egress.is_none() {
                continue;
            }
            let Some(ifindex) = ep.ips.iter().find_map(|ip| self.ip_ifindex.get(ip)) else {
                stats.pending.push(pod.clone());
                continue;
            };
            let mut flags = EP_POLICY_HINTS;
            let mut entries = PolicyEntryBytes::new();
            for (dir, set, flag) in [
                (POLICY_INGRESS, &ep.ingress, EP_POLICY_INGRESS),
                (POLICY_EGRESS, &ep.egress, EP_POLICY_EGRESS),
            ] {
                let Some(set) = set else { continue };
                flags |= flag;
                for (e, origin) in set {
                    flags |= peer_hint(e.peer);
                    let k = weir_bpf::datapath::policy_key_of(
                        *ifindex,
                        dir,
                        e.peer,
                        e.proto,
                        e.port,
                        e.port_bits,
                    );
                    let v = policy_entry {
                        r#match: e.match_kind().number(),
                        origin: *origin,
                        ..Default::default()
                    };
                    entries.insert(bytes_of(&k), bytes_of(&v));
                }
            }
            let v = ep_policy {
                flags,
                identity: ep.identity.unwrap_or(0),
            };
            want.insert(*ifindex, (pod.clone(), v, entries));
        }
        want
    }

    /// Brings one pod device's policy to `v` and `entries`. Allow first, then isolate, then
    /// take away: no moment denies what both the old and the new policy allow; an entry that
    /// cannot be written fails the pod closed. Returns whether its flags changed.
    fn sync_ep_policy(
        &mut self,
        ifindex: u32,
        pod: &str,
        mut v: ep_policy,
        entries: &PolicyEntryBytes,
        stats: &mut PolicyApplyStats,
    ) -> Result<bool, DataplaneError> {
        let have = self
            .policy_shadow
            .as_mut()
            .expect("shadow")
            .entry(ifindex)
            .or_default();
        let mut failed = false;
        for (k, val) in entries {
            if have.1.get(k) == Some(val) {
                continue;
            }
            match self.dp.policy_put(&from_bytes(k), &from_bytes(val)) {
                Ok(()) => {
                    if have.1.insert(*k, *val).is_none() {
                        stats.entries_added += 1;
                    } else {
                        stats.entries_updated += 1;
                    }
                }
                Err(e) => {
                    tracing::error!(pod, error = %e, "writing a policy entry; failing closed");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            v.flags |= weir_bpf::datapath::EP_POLICY_DENY;
            stats.failed.push(pod.to_string());
        }
        let mut changed = false;
        if weir_bpf::as_bytes(&have.0) != weir_bpf::as_bytes(&v) {
            self.dp.set_ep_policy(ifindex, Some(&v))?;
            have.0 = v;
            changed = true;
        }
        if !failed {
            let stale: Vec<[u8; 16]> = have
                .1
                .keys()
                .filter(|k| !entries.contains_key(*k))
                .copied()
                .collect();
            for k in stale {
                self.dp.policy_delete(&from_bytes(&k))?;
                have.1.remove(&k);
                stats.entries_removed += 1;
            }
        }
        stats.endpoints += 1;
        stats.entries += have.1.len();
        Ok(changed)
    }

    /// Every counter of `weir_metrics` (a per-CPU array: cheap to read).
    pub fn metrics(&self) -> Result<Vec<weir_bpf::datapath::Metric>, DataplaneError> {
        Ok(self.dp.metrics()?)
    }

    /// Every map's entries and capacity (walks each map's keys: the conntrack table can hold
    /// 262,144 entries, so callers do this seldom).
    pub fn map_usage(&self) -> Vec<MapUsage> {
        weir_bpf::datapath::DATAPATH_MAPS
            .iter()
            .map(|name| {
                let (entries, capacity) = self.dp.usage(name);
                MapUsage {
                    name: name.to_string(),
                    entries,
                    capacity,
                }
            })
            .collect()
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
            .map(|(k, v)| ct_dump(ct4_view(k, v), now))
            .collect();
        conntrack.extend(
            self.dp
                .ct6_entries()?
                .iter()
                .map(|(k, v)| ct_dump(ct6_view(k, v), now)),
        );
        conntrack.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
        let metrics: Vec<MetricDump> = self
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
            .collect();
        // The maps just read are counted from what was read, not walked a second time (the
        // conntrack table can hold 262,144 entries).
        let read = [
            ("weir_endpoints", endpoints.len()),
            ("weir_ct4", conntrack.len()),
            ("weir_metrics", metrics.len()),
        ];
        let maps = weir_bpf::datapath::DATAPATH_MAPS
            .iter()
            .map(|name| {
                let (entries, capacity) = match read.iter().find(|(n, _)| n == name) {
                    Some((_, n)) => (*n, self.dp.capacity(name)),
                    None => self.dp.usage(name),
                };
                MapUsage {
                    name: name.to_string(),
                    entries,
                    capacity,
                }
            })
            .collect();
        Ok(PodDump {
            conntrack,
            endpoints,
            devices: self.dp.attached(),
            metrics,
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
            maps,
        })
    }
}

/// What `weir explain` reports: a synthetic packet run through the loaded programs.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The program that ran (`from_pod` when the source is a local pod, else `from_netdev`).
    pub program: String,
    /// The interface index the packet was taken to arrive on.
    pub ingress_ifindex: u32,
    /// The packet in: `PROTO src -> dst`.
    pub packet: String,
    /// `redirect`, `pass` (to the host stack) or `drop`.
    pub verdict: String,
    /// The reason the packet would be counted under.
    pub reason: String,
    /// Its code (0-127 verdicts, 130+ drops).
    pub reason_code: u8,
    /// The packet out, when the program let it go on: `PROTO src -> dst, ttl N`.
    pub output: Option<String>,
    /// The backend chosen, when the destination was translated.
    pub backend: Option<String>,
    /// The source the packet was given (SNAT), when translated.
    pub snat: Option<String>,
}

fn csum16(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 or IPv6 + TCP SYN (or UDP) frame with valid checksums (`from` and `to`
/// of one family; an IPv4 `to` is taken for IPv6 `from` as its mapped form).
pub fn synthetic_frame(from: SocketAddr, to: SocketAddr, tcp: bool) -> Vec<u8> {
    let proto = if tcp { 6u8 } else { 17 };
    let mut l4 = Vec::new();
    l4.extend_from_slice(&from.port().to_be_bytes());
    l4.extend_from_slice(&to.port().to_be_bytes());
    if tcp {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&16u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(b"explain\n");
    }
    let l4_len = l4.len() as u16;
    let (ethertype, ip, pseudo_addrs) = match (from.ip(), to.ip()) {
        (IpAddr::V4(f), IpAddr::V4(t)) => {
            let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
            ip[2..4].copy_from_slice(&(20 + l4_len).to_be_bytes());
            ip.extend_from_slice(&f.octets());
            ip.extend_from_slice(&t.octets());
            let c = csum16(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let addrs = ip[12..20].to_vec();
            (0x0800u16, ip, addrs)
        }
        (f, t) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&l4_len.to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(&v6(f).octets());
            ip.extend_from_slice(&v6(t).octets());
            let addrs = ip[8..40].to_vec();
            (0x86dd, ip, addrs)
        }
    };
    // The L4 checksum over the pseudo-header (its length field is 16 bits for IPv4 and 32
    // for IPv6; with a zero upper half, both sum alike).
    let mut pseudo = pseudo_addrs;
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&l4_len.to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let c = csum16(&pseudo);
    let off = if tcp { 16 } else { 6 };
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// `(src, dst, ttl or hop limit)` of an IPv4 or IPv6 TCP/UDP frame (no IPv6 extension
/// headers).
fn addrs_of(f: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    match f.get(12..14)? {
        [0x08, 0x00] if f.len() >= 38 => {
            let ip = |o: usize| std::net::Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
            Some((
                SocketAddr::new(ip(26).into(), port(34)),
                SocketAddr::new(ip(30).into(), port(36)),
                f[22],
            ))
        }
        [0x86, 0xdd] if f.len() >= 58 => {
            let ip = |o: usize| {
                let b: [u8; 16] = f[o..o + 16].try_into().expect("16 bytes");
                std::net::Ipv6Addr::from(b)
            };
            Some((
                SocketAddr::new(ip(22).into(), port(54)),
                SocketAddr::new(ip(38).into(), port(56)),
                f[21],
            ))
        }
        _ => None,
    }
}

impl PodDataplane {
    /// Runs a synthetic first packet of a flow from `from` to `to` through the program that
    /// would see it (`from_pod` on the source pod's veth, else `from_netdev` on
    /// `netdev_ifindex`) in explain mode: nothing is written, nothing counted. Must run in the
    /// node's network namespace (the FIB is consulted).
    pub fn explain(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        tcp: bool,
        netdev_ifindex: u32,
    ) -> Result<Explanation, DataplaneError> {
        let src_key = endpoint_key_of(from.ip());
        let src_ep = self
            .dp
            .endpoints()?
            .into_iter()
            .find(|(k, _)| weir_bpf::as_bytes(k) == weir_bpf::as_bytes(&src_key));
        let at = match src_ep {
            Some((_, ep)) => (TcProgram::FromPod, ep.ifindex),
            None => (TcProgram::FromNetdev, netdev_ifindex),
        };
        self.explain_at(at, from, to, tcp)
    }

    /// [`PodDataplane::explain`] through program `prog` with ingress device `ingress`.
    fn explain_at(
        &self,
        (prog, ingress): (TcProgram, u32),
        from: SocketAddr,
        to: SocketAddr,
        tcp: bool,
    ) -> Result<Explanation, DataplaneError> {
        let frame = synthetic_frame(from, to, tcp);
        let r = self.dp.explain(prog, &frame, ingress)?;
        let proto = if tcp { "TCP" } else { "UDP" };
        let verdict = match r.verdict {
            0 => "pass",
            2 => "drop",
            7 => "redirect",
            _ => "other",
        };
        let code = r.reason.unwrap_or(0);
        let (mut output, mut backend, mut snat) = (None, None, None);
        if r.verdict != 2 {
            if let Some((s, d, ttl)) = addrs_of(&r.packet) {
                output = Some(format!("{proto} {s} -> {d}, ttl {ttl}"));
                if d != to {
                    backend = Some(d.to_string());
                }
                if s != from {
                    snat = Some(s.to_string());
                }
            }
        }
        Ok(Explanation {
            program: prog.name().into(),
            ingress_ifindex: ingress,
            packet: format!("{proto} {from} -> {to}"),
            verdict: verdict.into(),
            reason: weir_bpf::datapath::reason_name(code),
            reason_code: code,
            output,
            backend,
            snat,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_frames_of_both_families_parse_back_with_valid_checksums() {
        for (from, to) in [
            ("10.1.0.5:40000", "10.1.0.1:30080"),
            ("[fd00::5]:40000", "[fd00:10:244:1::7]:8080"),
        ] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
            for tcp in [true, false] {
                let f = synthetic_frame(from, to, tcp);
                assert_eq!(addrs_of(&f), Some((from, to, 64)), "{from} {tcp}");
                // The L4 checksum sums to zero over the pseudo-header and the segment.
                let (addrs, l4) = if from.is_ipv4() {
                    assert_eq!(csum16(&f[14..34]), 0, "IPv4 header checksum");
                    (&f[26..34], &f[34..])
                } else {
                    (&f[22..54], &f[54..])
                };
                let mut pseudo = addrs.to_vec();
                pseudo.extend_from_slice(&[0, if tcp { 6 } else { 17 }]);
                pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                pseudo.extend_from_slice(l4);
                assert_eq!(csum16(&pseudo), 0, "{from} tcp={tcp}");
            }
        }
    }

    #[test]
    fn peer_hints_name_the_lookups_a_pods_entries_need() {
        use weir_bpf::datapath::{EP_POLICY_PEER_ANY, EP_POLICY_PEER_CIDR, EP_POLICY_PEER_CLASS};
        use weir_control::policy::id;
        assert_eq!(peer_hint(id::ANY), EP_POLICY_PEER_ANY);
        assert_eq!(peer_hint(id::CLUSTER), EP_POLICY_PEER_CLASS);
        assert_eq!(peer_hint(id::NS_BASE + 3), EP_POLICY_PEER_CLASS);
        assert_eq!(peer_hint(id::CIDR_BASE + 3), EP_POLICY_PEER_CIDR);
        for peer in [
            id::HOST,
            id::WORLD,
            id::REMOTE_NODE,
            id::POD_MIN,
            id::POD_MAX,
        ] {
            assert_eq!(peer_hint(peer), 0, "{peer}");
        }
    }
}
