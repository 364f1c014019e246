//! The `Dataplane` trait, which applies the control layer's desired state to a datapath, and
//! its implementations: eBPF (`ebpf`, with the pod datapath in `pods`), nftables (`nft`) and
//! iptables (`ipt`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conntrack;
pub mod ctnetlink;
pub mod ebpf;
mod exec;
pub mod handover;
pub mod ipt;
pub mod nft;
pub mod open;
pub mod pods;
pub mod sockets;
pub mod takeover;

use serde::Serialize;
use weir_control::lb::{Backend, FrontendKey, LbState, Proto};

/// A dataplane could not apply or read its state.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The BPF layer failed (the message names the map or program).
    #[error(transparent)]
    Bpf(#[from] weir_bpf::BpfError),
    /// An id space or map is full.
    #[error("{0}")]
    Full(String),
    /// The request names something that is not there (the message says what).
    #[error("{0}")]
    NotFound(String),
    /// nftables or iptables refused a change or could not be run (the message says which).
    #[error("{0}")]
    Netfilter(String),
}

/// Which dataplane renders a node's desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneKind {
    /// BPF programs at the socket layer, tc and XDP.
    #[default]
    Ebpf,
    /// One nftables table per family (`ip weir`, `ip6 weir`).
    Nftables,
    /// iptables chains and ipsets, written with iptables-restore.
    Iptables,
}

impl DataplaneKind {
    /// Its name on the command line and in status.
    pub fn name(self) -> &'static str {
        match self {
            DataplaneKind::Ebpf => "ebpf",
            DataplaneKind::Nftables => "nftables",
            DataplaneKind::Iptables => "iptables",
        }
    }
}

impl std::fmt::Display for DataplaneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DataplaneKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ebpf" => Ok(DataplaneKind::Ebpf),
            "nftables" => Ok(DataplaneKind::Nftables),
            "iptables" => Ok(DataplaneKind::Iptables),
            other => Err(format!(
                "unknown dataplane {other:?} (use ebpf, nftables or iptables)"
            )),
        }
    }
}

/// Removes what the other netfilter dataplanes left in the network namespace `netns` (None:
/// this process's): an agent starting with `kind` must not find a former agent's rules
/// translating or judging beside its own. Best effort: what cannot be removed is logged.
pub fn remove_other_dataplanes(kind: DataplaneKind, netns: Option<&std::path::Path>) {
    if kind != DataplaneKind::Nftables {
        if let Err(e) = nft::NftDataplane::remove(netns) {
            tracing::debug!(error = %e, "removing the nftables dataplane's tables");
        }
    }
    if kind != DataplaneKind::Iptables {
        for b in [ipt::IptablesBackend::Auto, ipt::IptablesBackend::Legacy] {
            if let Err(e) = ipt::IptablesDataplane::remove(netns, b) {
                tracing::debug!(error = %e, backend = ?b, "removing the iptables dataplane's chains");
            }
        }
    }
}

/// What an apply changed.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ApplyStats {
    /// Frontends created or changed.
    pub frontends_updated: usize,
    /// Frontends removed.
    pub frontends_removed: usize,
    /// Backends added to the backend table.
    pub backends_added: usize,
    /// Backends removed from the backend table.
    pub backends_removed: usize,
    /// Connected UDP sockets closed because their backend went away.
    pub sockets_destroyed: usize,
    /// UDP conntrack entries deleted because their backend went away (netfilter dataplanes).
    #[serde(skip_serializing_if = "is_zero")]
    pub udp_flows_cleared: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One programmed frontend, as read back from the datapath.
#[derive(Debug, Clone, Serialize)]
pub struct FrontendDump {
    /// Frontend address.
    pub key: FrontendKey,
    /// Datapath id of the frontend.
    pub id: u32,
    /// Backends in slot order, with their datapath ids.
    pub backends: Vec<(u32, Backend)>,
    /// Session affinity timeout, if any.
    pub affinity_timeout: Option<u32>,
    /// Maglev table size, if Maglev is used.
    pub maglev_size: Option<u32>,
    /// Allowed client prefixes (loadBalancerSourceRanges); empty: any.
    pub source_ranges: Vec<String>,
    /// Remote backends are reached with direct server return.
    pub dsr: bool,
    /// Per backend (in `backends` order), its percent of new connections, when the frontend
    /// is weighted (a GlobalTrafficPolicy); empty: all equal.
    pub shares: Vec<f64>,
    /// TCP connects to the backends are watched for outlier detection.
    pub outlier: bool,
}

impl FrontendDump {
    /// A frontend with no backend and nothing else set (id 0: a dataplane without ids).
    pub fn new(key: FrontendKey) -> Self {
        FrontendDump {
            key,
            id: 0,
            backends: Vec::new(),
            affinity_timeout: None,
            maglev_size: None,
            source_ranges: Vec::new(),
            dsr: false,
            shares: Vec::new(),
            outlier: false,
        }
    }
}

/// A backend under outlier detection, as the datapath counts it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Ejection {
    /// Datapath id of the backend.
    pub id: u32,
    /// The backend.
    pub backend: Backend,
    /// Its protocol.
    pub proto: Proto,
    /// Milliseconds of ejection left (0: admitted).
    pub remaining_ms: u64,
    /// Times ejected.
    pub ejections: u32,
    /// Consecutive failed connects now.
    pub failures: u32,
    /// Failed connects counted.
    pub failures_total: u64,
    /// Answered connects counted.
    pub successes_total: u64,
    /// Consecutive failures that eject it.
    pub threshold: u32,
    /// Base ejection time, milliseconds.
    pub base_ms: u32,
}

/// One session affinity entry.
#[derive(Debug, Clone, Serialize)]
pub struct AffinityDump {
    /// Client (network namespace cookie).
    pub client: u64,
    /// Frontend id.
    pub frontend_id: u32,
    /// Backend id.
    pub backend_id: u32,
    /// Seconds since the entry was last used.
    pub idle_seconds: u64,
}

/// A loaded program.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramDump {
    /// Name.
    pub name: String,
    /// Kernel id.
    pub id: u32,
    /// Runs counted while kernel.bpf_stats_enabled is 1.
    pub run_count: u64,
    /// Average run time of those runs, in nanoseconds.
    pub avg_run_ns: u64,
}

/// A map's fill level.
#[derive(Debug, Clone, Serialize)]
pub struct MapUsage {
    /// Map name.
    pub name: String,
    /// Entries in use.
    pub entries: usize,
    /// Capacity.
    pub capacity: u32,
}

/// The whole datapath as read back.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Dump {
    /// Frontends.
    pub frontends: Vec<FrontendDump>,
    /// Backends by id, with protocol.
    pub backends: Vec<(u32, Backend, Proto)>,
    /// Session affinity entries.
    pub affinity: Vec<AffinityDump>,
    /// Counters by name.
    pub counters: Vec<(String, u64)>,
    /// Translation events the socket layer's full ring buffer refused, per point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events_lost: Vec<(String, u64)>,
    /// Programs.
    pub programs: Vec<ProgramDump>,
    /// Maps.
    pub maps: Vec<MapUsage>,
    /// Backends under outlier detection.
    pub health: Vec<Ejection>,
}

impl Dump {
    /// Sorts the frontends and lists their backends (by protocol) with ids in that order:
    /// the backend table of a dataplane that has no ids of its own (netfilter).
    pub fn index_backends(&mut self) {
        self.frontends.sort_by_key(|f| f.key);
        let mut backends: Vec<(Backend, Proto)> = self
            .frontends
            .iter()
            .flat_map(|f| f.backends.iter().map(move |(_, b)| (*b, f.key.proto)))
            .collect();
        backends.sort();
        backends.dedup();
        self.backends = backends
            .into_iter()
            .enumerate()
            .map(|(i, (b, p))| (i as u32, b, p))
            .collect();
    }
}

/// A datapath that load-balances Services.
pub trait Dataplane: Send {
    /// Makes the datapath match `state`, touching only what differs.
    fn apply(&mut self, state: &LbState) -> Result<ApplyStats, DataplaneError>;
    /// Reads back what is programmed.
    fn dump(&self) -> Result<Dump, DataplaneError>;
    /// The backends under outlier detection, with their ejection state.
    fn health(&self) -> Result<Vec<Ejection>, DataplaneError> {
        Ok(Vec::new())
    }
    /// Tells the datapath that the state in `health` has been scheduled around: a backend
    /// still selectable after its ejection is one kept on purpose (maxEjectionPercent), which
    /// new connections no longer pass over.
    fn acknowledge(&mut self, _health: &[Ejection]) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Stops translating new flows, leaving its state for the flows it translated (the old
    /// side of a switch, after the new one took over): the eBPF dataplane detaches its
    /// socket programs. (Netfilter dataplanes are removed with their own `remove`.)
    fn retire(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Which dataplane this is.
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Ebpf
    }
    /// What this dataplane cannot do for `state` (Maglev, DSR, outlier detection in the
    /// netfilter dataplanes), said per Service.
    fn limits(&self, _state: &LbState) -> Vec<weir_control::lb::Warning> {
        Vec::new()
    }
    /// Pods' IPv4 flows to anything but `nets` (every node's pod CIDR and the configured
    /// networks) leave masqueraded; None: none is. The eBPF dataplane masquerades in the pod
    /// datapath instead.
    fn set_masquerade(&mut self, _nets: Option<Vec<ipnet::Ipv4Net>>) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Turns the socket layer's translation events on or off (a dataplane without a
    /// socket layer has none).
    fn set_translation_events(&mut self, _on: bool) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Where the socket layer reports its translations (a pinned ring buffer of
    /// `sock_event`s), if the dataplane has one.
    fn translation_events(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Where the datapath announces ejections (a pinned ring buffer of
    /// `lb_ejection_event`s), if it has such a place.
    fn ejection_events(&self) -> Option<std::path::PathBuf> {
        None
    }
}
