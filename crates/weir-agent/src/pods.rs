//! The pod datapath loop: a thread (in the node's network namespace, where the devices are)
//! that attaches the node program to the node's devices, writes the node's addresses and SNAT
//! settings, keeps the endpoint map and the pod programs in step with the network plugin's
//! endpoint records, and collects expired conntrack entries every 10 s.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use weir_bpf::datapath::XdpProgram;
use weir_dataplane::pods::{PodDataplane, PodSyncStats, PrefilterEntry};
use weir_model::endpoint::EndpointRecord;

/// Settings of the pod datapath.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// Where the network plugin leaves endpoint records.
    pub endpoint_dir: PathBuf,
    /// The node's devices that get the node program (packets for local pods go straight to
    /// them).
    pub devices: Vec<String>,
    /// The network namespace the devices and pods' veths live in, when it is not the agent's
    /// own (a lab node).
    pub netns: Option<PathBuf>,
    /// Source ports for flows SNATed to the node (inclusive). Keep it outside the node's
    /// ephemeral port range (net.ipv4.ip_local_port_range, 32768-60999 by default).
    pub snat_ports: (u16, u16),
    /// VXLAN mode: the collect-metadata VXLAN device through which other nodes' pods are
    /// reached (None: native routing).
    pub tunnel: Option<String>,
    /// Also attach the XDP program to `devices` (NodePort acceleration).
    pub xdp: bool,
    /// Masquerade pods' IPv4 flows to destinations outside every node's pod CIDR (and
    /// outside `non_masquerade`) behind the node's address, with ports from `snat_ports`.
    pub masquerade: bool,
    /// More IPv4 networks pods reach with their own address when masquerading.
    pub non_masquerade: Vec<ipnet::Ipv4Net>,
    /// How the node's dataplanes were opened: a dataplane switch opens its target alike.
    pub dataplanes: Option<weir_dataplane::open::NodeDataplanes>,
    /// Forwarding summaries of the tc and XDP programs, and the socket layer's translation
    /// events.
    pub flow_summaries: bool,
}

/// The default SNAT source port range: above Linux's default ephemeral range.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);

/// Parses `LOW-HIGH`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LOW-HIGH, e.g. 61000-65535"))?;
    let lo: u16 = lo
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {lo:?} is not a port"))?;
    let hi: u16 = hi
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {hi:?} is not a port"))?;
    if lo == 0 || lo > hi {
        return Err(format!(
            "{s:?}: the range must be non-empty and start above 0"
        ));
    }
    Ok((lo, hi))
}

/// What the pod datapath reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PodStatus {
    /// Endpoint records in use.
    pub endpoints: usize,
    /// Records that could not be used, with the reason.
    pub bad_records: Vec<String>,
    /// Node devices with the node program.
    pub devices: Vec<String>,
    /// The node's addresses a NodePort answers on.
    pub node_addresses: Vec<String>,
    /// Conntrack entries removed by the collector so far.
    pub ct_collected: u64,
    /// VXLAN mode: the tunnel device, and the other nodes' pod CIDRs routed through it.
    pub tunnel: Option<String>,
    /// Whether the XDP NodePort program is on the node devices (--xdp).
    pub xdp: bool,
    /// The XDP program on the node devices: `NodePort`, `Prefilter` (while the prefilter has
    /// entries), or none.
    pub xdp_program: Option<String>,
    /// Tunnel routes programmed.
    pub tunnel_routes: usize,
    /// Whether pods' flows leaving the cluster are masqueraded.
    pub masquerade: bool,
    /// Networks left unmasqueraded (every node's pod CIDR, and the configured ones).
    pub non_masquerade: Vec<String>,
    /// Every address of the node's network namespace (the node itself to NetworkPolicy: its
    /// traffic to its pods is always allowed).
    pub host_addresses: Vec<std::net::IpAddr>,
    /// What the last sync changed.
    pub last_sync: PodSyncStats,
    /// The last error, if the last sync failed.
    pub last_error: Option<String>,
}

/// The pod datapath, shared between its loop and the introspection API.
pub struct Pods {
    /// The programs and maps.
    pub dataplane: Mutex<PodDataplane>,
    /// Status.
    pub status: Mutex<PodStatus>,
    /// Settings.
    pub config: PodConfig,
    /// Whether the kernel is kept translating flows the node's processes opened through
    /// netfilter before a switch to eBPF (`weir_dataplane::nft::hold`); None until checked.
    pub nat_hold: Mutex<Option<bool>>,
}

/// Runs `weir explain`'s synthetic packet (see [`PodDataplane::explain`]) in the node's
/// network namespace, on a thread of its own.
pub fn explain(
    pods: &Arc<Pods>,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    tcp: bool,
) -> Result<weir_dataplane::pods::Explanation, String> {
    in_node_netns(pods, move |pods| {
        let dev = pods
            .config
            .devices
            .first()
            .ok_or("the agent has no node device (--device)")?;
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str())
            .map_err(|e| format!("device {dev:?}: {e}"))?;
        pods.dataplane
            .lock()
            .expect("pods")
            .explain(from, to, tcp, ifindex)
            .map_err(|e| e.to_string())
    })
}

/// Under a netfilter dataplane, after a policy change: the flows the new policy denies are cut
/// (see [`PodDataplane::cut_denied_flows`]), in the node's network namespace.
pub fn cut_denied_flows(pods: &Arc<Pods>) -> Result<usize, String> {
    // Under eBPF the programs judge flows again themselves: no thread for nothing.
    if pods.dataplane.lock().expect("pods").runs_programs() {
        return Ok(0);
    }
    in_node_netns(pods, |pods| {
        let Some(dev) = pods.config.devices.first() else {
            return Ok(0);
        };
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str())
            .map_err(|e| format!("device {dev:?}: {e}"))?;
        pods.dataplane
            .lock()
            .expect("pods")
            .cut_denied_flows(ifindex)
            .map_err(|e| e.to_string())
    })
}

/// Runs `f` on a thread of its own in the node's network namespace (where device names and
/// ifindexes mean the node's devices).
pub fn in_node_netns<T: Send + 'static>(
    pods: &Arc<Pods>,
    f: impl FnOnce(&Pods) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let pods = pods.clone();
    std::thread::spawn(move || {
        enter_node_netns(&pods.config)?;
        f(&pods)
    })
    .join()
    .map_err(|_| "a node namespace thread panicked".to_string())?
}

/// Moves the calling thread into the node's network namespace (`cfg.netns`; nothing to do
/// when the agent runs in it).
fn enter_node_netns(cfg: &PodConfig) -> Result<(), String> {
    let Some(ns) = &cfg.netns else {
        return Ok(());
    };
    let file = std::fs::File::open(ns).map_err(|e| format!("{}: {e}", ns.display()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("entering {}: {e}", ns.display()))
}

/// The XDP program the node's devices need: the NodePort one with --xdp, the prefilter
/// alone while its deny list has entries, or none.
fn xdp_program(cfg: &PodConfig, prefilter_entries: usize) -> Option<XdpProgram> {
    if cfg.xdp {
        Some(XdpProgram::NodePort)
    } else if prefilter_entries > 0 {
        Some(XdpProgram::Prefilter)
    } else {
        None
    }
}

/// Gives every node device the XDP program it needs with `prefilter_entries` prefixes
/// listed (or takes weir's away), in the current network namespace, and reports it.
fn program_device_xdp(
    pods: &Pods,
    dp: &mut PodDataplane,
    prefilter_entries: usize,
) -> Result<(), String> {
    let which = xdp_program(&pods.config, prefilter_entries);
    for dev in &pods.config.devices {
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str())
            .map_err(|e| format!("device {dev:?}: {e}"))?;
        match which {
            Some(w) => dp
                .attach_xdp(ifindex, w)
                .map_err(|e| format!("attaching XDP to device {dev:?}: {e}"))?,
            None => dp.detach_xdp(ifindex),
        }
    }
    let which = which.filter(|_| dp.runs_programs());
    pods.status.lock().expect("pod status").xdp_program = which.map(|w| format!("{w:?}"));
    Ok(())
}

fn dir_mtime(cfg: &PodConfig) -> Option<SystemTime> {
    std::fs::metadata(&cfg.endpoint_dir)
        .and_then(|m| m.modified())
        .ok()
}

/// Brings the endpoint map and pod programs in step with the endpoint records (in the node
/// namespace). Returns what the sync changed and left out, or why it failed.
pub fn sync_once(pods: &Pods, cfg: &PodConfig) -> Result<PodSyncStats, String> {
    // The directory is read under the dataplane's lock: two syncs at once (the loop and the
    // CNI plugin's requests) must not let an older read undo a newer one.
    let mut dp = pods.dataplane.lock().expect("pods");
    let (records, bad) = EndpointRecord::read_dir(&cfg.endpoint_dir);
    for b in &bad {
        tracing::warn!(error = %b, "ignoring an endpoint record");
    }
    let started = std::time::Instant::now();
    let result = dp.sync(&records);
    drop(dp);
    crate::metrics::record_apply("endpoints", started.elapsed().as_secs_f64(), result.is_ok());
    let host = host_addresses();
    let mut st = pods.status.lock().expect("pod status");
    st.host_addresses = host;
    st.endpoints = records.len();
    st.bad_records = bad.iter().map(|b| b.to_string()).collect();
    match result {
        Ok(stats) => {
            for (uid, why) in &stats.failed {
                tracing::warn!(endpoint = %uid, error = %why, "leaving out an endpoint whose device cannot take its programs");
                st.bad_records.push(format!("endpoint record {uid}: {why}"));
            }
            if stats != PodSyncStats::default() {
                tracing::info!(?stats, "pod datapath updated");
            }
            st.last_sync = stats.clone();
            st.last_error = None;
            Ok(stats)
        }
        Err(e) => {
            tracing::error!(error = %e, "syncing the pod datapath; retrying");
            st.last_error = Some(e.to_string());
            Err(e.to_string())
        }
    }
}

/// [`sync_once`] right away, on a thread in the node's network namespace (for requests that
/// must see the datapath in step before they answer).
pub fn sync_now(pods: &Arc<Pods>) -> Result<PodSyncStats, String> {
    in_node_netns(pods, |p| sync_once(p, &p.config))
}

/// Every address of the current network namespace but loopback and IPv6 link-local ones.
fn host_addresses() -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().into_iter().flatten() {
        let Some(a) = ifa.address else { continue };
        let ip = if let Some(v4) = a.as_sockaddr_in() {
            std::net::IpAddr::V4(v4.ip())
        } else if let Some(v6) = a.as_sockaddr_in6() {
            std::net::IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let skip = match ip {
            std::net::IpAddr::V4(v4) => v4.is_loopback(),
            std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
        };
        if !skip && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The addresses of the node's devices (in the current network namespace).
fn device_addresses(devices: &[String]) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().into_iter().flatten() {
        if !devices.contains(&ifa.interface_name) {
            continue;
        }
        let Some(a) = ifa.address else { continue };
        if let Some(v4) = a.as_sockaddr_in() {
            out.push(std::net::IpAddr::V4(v4.ip()));
        } else if let Some(v6) = a.as_sockaddr_in6() {
            let ip = v6.ip();
            // Link-local addresses are not where a NodePort is reached.
            if (ip.segments()[0] & 0xffc0) != 0xfe80 {
                out.push(std::net::IpAddr::V6(ip));
            }
        }
    }
    out
}

/// Attaches the programs to the node's devices and to every pod's (a switch to eBPF, after
/// [`PodDataplane::resume_programs`]), in the node's network namespace.
pub fn attach_all(pods: &Arc<Pods>) -> Result<(), String> {
    in_node_netns(pods, |p| {
        attach_devices(p, &p.config)?;
        let stats = sync_once(p, &p.config)?;
        match stats.failed.first() {
            Some((uid, why)) => Err(format!("attaching to the device of endpoint {uid}: {why}")),
            None => Ok(()),
        }
    })
}

fn attach_devices(pods: &Pods, cfg: &PodConfig) -> Result<(), String> {
    pods.dataplane
        .lock()
        .expect("pods")
        .set_devices(&cfg.devices)
        .map_err(|e| format!("writing the prefilter's rules: {e}"))?;
    let mut names = Vec::new();
    for dev in &cfg.devices {
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str())
            .map_err(|e| format!("device {dev:?}: {e}"))?;
        let mut dp = pods.dataplane.lock().expect("pods");
        dp.attach_netdev(ifindex)
            .map_err(|e| format!("attaching to device {dev:?}: {e}"))?;
        drop(dp);
        names.push(dev.clone());
    }
    {
        let mut dp = pods.dataplane.lock().expect("pods");
        let prefilter = dp
            .prefilter_list()
            .map_err(|e| format!("reading the prefilter: {e}"))?
            .len();
        program_device_xdp(pods, &mut dp, prefilter)?;
    }
    // VXLAN mode: decapsulated packets arrive on the tunnel device, for the node program.
    let tunnel_ifindex = match &cfg.tunnel {
        Some(dev) => {
            let ifindex = nix::net::if_::if_nametoindex(dev.as_str())
                .map_err(|e| format!("tunnel device {dev:?}: {e}"))?;
            pods.dataplane
                .lock()
                .expect("pods")
                .attach_netdev(ifindex)
                .map_err(|e| format!("attaching to tunnel device {dev:?}: {e}"))?;
            Some(ifindex)
        }
        None => None,
    };
    let addrs = device_addresses(&cfg.devices);
    let snat4 = addrs.iter().find_map(|a| match a {
        std::net::IpAddr::V4(v4) => Some(*v4),
        _ => None,
    });
    let mut dp = pods.dataplane.lock().expect("pods");
    dp.set_flow_summaries(cfg.flow_summaries);
    dp.configure_node(
        &addrs,
        snat4,
        cfg.snat_ports,
        tunnel_ifindex,
        cfg.masquerade,
    )
    .map_err(|e| format!("writing the node's addresses: {e}"))?;
    drop(dp);
    let mut st = pods.status.lock().expect("pod status");
    st.tunnel = cfg.tunnel.clone();
    st.xdp = cfg.xdp;
    st.masquerade = cfg.masquerade;
    st.devices = names;
    st.node_addresses = addrs.iter().map(|a| a.to_string()).collect();
    Ok(())
}

/// Releases the kernel's NAT hold once the node's processes' flows it kept have ended (checked
/// on the first pass, then only while held). In the node's network namespace.
fn release_nat_hold(pods: &Pods) {
    use weir_dataplane::nft::hold;
    let mut held = pods.nat_hold.lock().expect("nat hold");
    if *held == Some(false) {
        return;
    }
    if !hold::held(None).unwrap_or(false) {
        *held = Some(false);
        return;
    }
    let node: std::collections::HashSet<std::net::IpAddr> = pods
        .dataplane
        .lock()
        .expect("pods")
        .node_addrs()
        .iter()
        .copied()
        .collect();
    let left = weir_dataplane::ctnetlink::Conntrack::open(None)
        .and_then(|mut ct| ct.dump())
        .map(|entries| weir_dataplane::takeover::node_nat_flows(&entries, &node));
    match left {
        Ok(0) => {
            tracing::info!("the node's flows NATed by netfilter ended: releasing the NAT hold");
            if let Err(e) = hold::release(None) {
                tracing::warn!(error = %e, "removing the NAT hold tables");
                return;
            }
            *held = Some(false);
        }
        Ok(_) => *held = Some(true),
        Err(e) => tracing::warn!(error = %e, "reading the kernel's conntrack"),
    }
}

fn collect_ct(pods: &Pods) {
    pods.dataplane.lock().expect("pods").drain();
    release_nat_hold(pods);
    match pods.dataplane.lock().expect("pods").ct_gc() {
        Ok(n) => {
            if n > 0 {
                tracing::debug!(removed = n, "conntrack entries expired");
            }
            pods.status.lock().expect("pod status").ct_collected += n as u64;
        }
        Err(e) => tracing::warn!(error = %e, "conntrack garbage collection"),
    }
}

/// Starts the loop on its own thread. It enters `cfg.netns` first; failing that, or failing
/// to attach to a device, is an error at once (the agent does not run half-configured).
pub fn spawn(pods: Arc<Pods>, cfg: PodConfig) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("pod-datapath".into())
        .spawn(move || {
            if let Err(e) = enter_node_netns(&cfg) {
                let _ = tx.send(Err(e));
                return;
            }
            if let Err(e) = attach_devices(&pods, &cfg) {
                let _ = tx.send(Err(e));
                return;
            }
            let _ = sync_once(&pods, &cfg);
            let _ = tx.send(Ok(()));
            let mut seen = dir_mtime(&cfg);
            let mut since_full = Duration::ZERO;
            let tick = Duration::from_millis(100);
            loop {
                std::thread::sleep(tick);
                since_full += tick;
                let now = dir_mtime(&cfg);
                let failed = pods.status.lock().expect("pod status").last_error.is_some();
                // A record written or removed changes the directory's mtime; a full pass every
                // 10 s also repairs anything changed behind the agent's back.
                if now != seen || failed || since_full >= Duration::from_secs(10) {
                    if since_full >= Duration::from_secs(10) {
                        collect_ct(&pods);
                    }
                    seen = now;
                    since_full = Duration::ZERO;
                    let _ = sync_once(&pods, &cfg);
                }
            }
        })
        .map_err(|e| format!("starting the pod datapath thread: {e}"))?;
    rx.recv()
        .map_err(|_| "the pod datapath thread ended at start".to_string())?
}

/// Parses prefixes for the prefilter: `ADDRESS/LEN` or a single address; host bits are
/// cleared. The error names the first bad one.
pub fn parse_prefixes<S: AsRef<str>>(items: &[S]) -> Result<Vec<ipnet::IpNet>, String> {
    if items.is_empty() {
        return Err("no prefix given".into());
    }
    items
        .iter()
        .map(|s| {
            let s = s.as_ref().trim();
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    format!("{s:?} is not an IP prefix (e.g. 192.0.2.0/24, 2001:db8::/32 or one address)")
                })
        })
        .collect()
}

/// Adds `nets` to the prefilter (all or none) and makes sure the node's devices run it.
/// Returns the prefixes that were new.
pub fn prefilter_add(
    pods: &Arc<Pods>,
    nets: Vec<ipnet::IpNet>,
) -> Result<Vec<ipnet::IpNet>, String> {
    in_node_netns(pods, move |pods| {
        let cfg = &pods.config;
        if cfg.devices.is_empty() {
            return Err("the agent has no node device (--device) to filter on".into());
        }
        // One lock over the whole change: the program and the entries move together.
        let mut dp = pods.dataplane.lock().expect("pods");
        let listed = dp.prefilter_list().map_err(|e| e.to_string())?.len();
        // The program first: entries never wait in a map that nothing reads.
        program_device_xdp(pods, &mut dp, listed + 1)?;
        match dp.prefilter_add(&nets) {
            Ok(added) => Ok(added),
            Err(e) => {
                // Nothing was added: the devices go back to what the old list needed.
                program_device_xdp(pods, &mut dp, listed)?;
                Err(e.to_string())
            }
        }
    })
}

/// Takes `nets` out of the prefilter (all, or none when one is not there); the prefilter
/// program leaves the devices with the last entry (unless --xdp keeps XDP there).
pub fn prefilter_delete(pods: &Arc<Pods>, nets: Vec<ipnet::IpNet>) -> Result<(), String> {
    in_node_netns(pods, move |pods| {
        let mut dp = pods.dataplane.lock().expect("pods");
        dp.prefilter_delete(&nets).map_err(|e| e.to_string())?;
        let n = dp.prefilter_list().map_err(|e| e.to_string())?.len();
        program_device_xdp(pods, &mut dp, n)
    })
}

/// The prefilter's deny list with its counters.
pub fn prefilter_list(pods: &Pods) -> Result<Vec<PrefilterEntry>, String> {
    pods.dataplane
        .lock()
        .expect("pods")
        .prefilter_list()
        .map_err(|e| e.to_string())
}
