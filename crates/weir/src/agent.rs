//! `weir agent`: the node agent on a real node (a DaemonSet pod with host networking, or a
//! systemd unit). Every setting has a default a DaemonSet can use unchanged and can also be
//! given as an environment variable (`WEIR_*`, e.g. from a ConfigMap): the API from the
//! in-cluster configuration, the node name from the downward API (`NODE_NAME`), the devices
//! from the routing table, cgroup v2 mounted under /run/weir/cgroupv2 when the host has none.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use weir_lab::{client, lab};

use crate::cli::{parse_duration, AlgorithmArg, Cli, DataplaneArg, IptablesBackendArg, LbModeArg};

/// Where the agent mounts cgroup v2 when the host's /sys/fs/cgroup is not cgroup v2.
pub const CGROUP2_FALLBACK: &str = "/run/weir/cgroupv2";

#[derive(Args, Debug)]
pub(crate) struct AgentArgs {
    /// This node's name (as in the Node object; in a DaemonSet, from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// cgroup v2 directory whose sockets are load-balanced (default: /sys/fs/cgroup when it
    /// is cgroup v2, else a cgroup v2 mount at /run/weir/cgroupv2).
    #[arg(long, env = "WEIR_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Where maps and links are pinned (default /sys/fs/bpf/weir/default/NODE).
    #[arg(long, env = "WEIR_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,
    /// Introspection socket (the CLI's and the CNI plugin's way in).
    #[arg(long, env = "WEIR_SOCKET", default_value = "/run/weir/agent.sock")]
    pub socket: PathBuf,
    /// Backend selection for Services without the weir.dev/lb-algorithm annotation.
    #[arg(long, env = "WEIR_LB_ALGORITHM", value_enum, default_value_t = AlgorithmArg::Random)]
    pub lb_algorithm: AlgorithmArg,
    /// Where the network plugin leaves endpoint records (one JSON file per local pod); their
    /// host-side veths get the pod programs.
    #[arg(long, env = "WEIR_ENDPOINT_DIR", default_value = "/run/weir/endpoints")]
    pub endpoint_dir: PathBuf,
    /// A node device that gets the node program, which hands packets for local pods straight
    /// to them (repeatable, or comma-separated in WEIR_DEVICES; default: the devices of the
    /// default routes).
    #[arg(long = "device", env = "WEIR_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Source ports for NodePort flows SNATed to the node (sent to a backend on another
    /// node); keep them outside net.ipv4.ip_local_port_range.
    #[arg(long, env = "WEIR_SNAT_PORTS", default_value = "61000-65535")]
    pub snat_ports: String,
    /// How NodePort/external traffic reaches a backend on another node, for Services without
    /// the weir.dev/lb-mode annotation: snat, or dsr (IPIP to the backend's node, which
    /// answers the client directly).
    #[arg(long, env = "WEIR_LB_MODE", value_enum, default_value_t = LbModeArg::Snat)]
    pub lb_mode: LbModeArg,
    /// Do not load-balance at the socket layer for the pods under --cgroup: their Service
    /// traffic is translated per packet at tc instead (as Cilium's hostNamespaceOnly).
    #[arg(long, env = "WEIR_NO_SOCKET_LB")]
    pub no_socket_lb: bool,
    /// The dataplane that renders the node's Services, masquerading and NetworkPolicy: ebpf
    /// (BPF programs at the socket layer, tc and XDP), nftables (tables `ip weir`, `ip6 weir`
    /// and `inet weir-policy`, as kube-proxy's nftables mode), or iptables (WEIR-* chains
    /// written with iptables-restore, as kube-proxy's iptables mode).
    #[arg(long, env = "WEIR_DATAPLANE", value_enum, default_value_t = DataplaneArg::Ebpf)]
    pub dataplane: DataplaneArg,
    /// With --dataplane iptables: the binaries that write the rules: auto (the host's
    /// iptables-restore), legacy (iptables-legacy-restore) or nft (iptables-nft-restore).
    #[arg(long, env = "WEIR_IPTABLES_BACKEND", value_enum, default_value_t = IptablesBackendArg::Auto)]
    pub iptables_backend: IptablesBackendArg,
    /// VXLAN mode: the collect-metadata VXLAN device (`ip link add DEV type vxlan external
    /// dstport 8472`) through which other nodes' pods are reached, routed from the Nodes'
    /// podCIDRs. Without it: native routing.
    #[arg(long, env = "WEIR_TUNNEL_DEVICE")]
    pub tunnel_device: Option<String>,
    /// Also attach the XDP program to the --device devices: NodePort flows SNATed to other
    /// nodes are completed at XDP (XDP_TX/XDP_REDIRECT); the rest goes on to tc.
    #[arg(long, env = "WEIR_XDP")]
    pub xdp: bool,
    /// Masquerade the IPv4 flows pods open to destinations outside every Node's podCIDRs
    /// (TCP, UDP, ICMP echo): they leave with the node's address and a port of
    /// --snat-ports, as iptables' MASQUERADE would do.
    #[arg(long, env = "WEIR_MASQUERADE")]
    pub masquerade: bool,
    /// With --masquerade: another IPv4 network pods reach with their own address
    /// (repeatable, or comma-separated in WEIR_NON_MASQUERADE_CIDRS).
    #[arg(
        long = "non-masquerade-cidr",
        env = "WEIR_NON_MASQUERADE_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub non_masquerade: Vec<ipnet::Ipv4Net>,
    /// Forwarding summaries and socket translation events for `weir observe`, `weir ui` and
    /// the flow metrics: the tc and XDP programs report each flow on its first packet, on
    /// new TCP flags and at most every 5 s; the socket layer each connect. `false` keeps the
    /// policy verdicts and drops alone.
    #[arg(long, env = "WEIR_FLOW_SUMMARIES", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub flow_summaries: bool,
    /// What `weir_flows_total` says of a flow's ends, as Hubble's labelsContext: `none`
    /// (the default: its labels take values from fixed lists), or `source` and
    /// `destination` labels naming each end's `namespace`, `workload` (namespace/workload)
    /// or `pod` (namespace/name: a series per pod pair, removed when a pod goes).
    #[arg(
        long,
        env = "WEIR_FLOW_METRICS_CONTEXT",
        default_value = "none",
        value_name = "CONTEXT"
    )]
    pub flow_metrics_context: weir_agent::flows::MetricsContext,
    /// How long a SecurityIdentity no pod needs (its labels gone, or a duplicate) stays
    /// before the agent deletes it.
    #[arg(long, env = "WEIR_IDENTITY_GC_GRACE", default_value = "5m", value_parser = parse_duration)]
    pub identity_gc_grace: Duration,
    /// Program only the Services labelled service.kubernetes.io/service-proxy-name=NAME
    /// (unset: only those without that label, as kube-proxy). Services labelled
    /// service.kubernetes.io/headless are never programmed.
    #[arg(long, env = "WEIR_SERVICE_PROXY_NAME", value_name = "NAME")]
    pub service_proxy_name: Option<String>,
    /// This cluster's id in a clusterset (its cluster.clusterset.k8s.io ClusterProperty):
    /// every security identity carries it as the label weir.dev/cluster, and NetworkPolicy
    /// peers of other clusters (the mesh's RemoteEndpoints) carry theirs; GlobalTrafficPolicies
    /// schedule ServiceImports for this cluster's clients (unset: they take the id from the
    /// ClusterProperty).
    #[arg(long, env = "WEIR_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// Where /healthz (alive) and /readyz (initial lists synced, datapath applied) are
    /// served for the kubelet's probes ("" for nowhere). /metrics is served here too.
    #[arg(
        long,
        env = "WEIR_HEALTH_LISTEN",
        default_value = "127.0.0.1:9879",
        value_name = "ADDR:PORT"
    )]
    pub health_listen: String,
    /// Where Prometheus scrapes /metrics ("" for nowhere). /healthz and /readyz are served
    /// here too.
    #[arg(
        long,
        env = "WEIR_METRICS_LISTEN",
        default_value = "0.0.0.0:9962",
        value_name = "ADDR:PORT"
    )]
    pub metrics_listen: String,
}

/// The devices of the default routes (IPv4 and IPv6), from /proc/net/route and
/// /proc/net/ipv6_route, in that order, without duplicates.
pub fn default_route_devices() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/proc/net/route") {
        // Iface Destination Gateway Flags ... Mask ...
        for l in t.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 7
                && f[1] == "00000000"
                && f[7] == "00000000"
                && !out.iter().any(|d| d == f[0])
            {
                out.push(f[0].to_string());
            }
        }
    }
    if let Ok(t) = std::fs::read_to_string("/proc/net/ipv6_route") {
        // dst dst_len src src_len next_hop metric refcnt use flags device
        for l in t.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 10
                && f[0] == "00000000000000000000000000000000"
                && f[1] == "00"
                && f[9] != "lo"
                && !out.iter().any(|d| d == f[9])
            {
                out.push(f[9].to_string());
            }
        }
    }
    out
}

/// The cgroup v2 directory to attach the socket programs to: the one given, the host's
/// /sys/fs/cgroup when it is cgroup v2, else [`CGROUP2_FALLBACK`] (mounted if need be).
fn cgroup_root(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let host = Path::new("/sys/fs/cgroup");
    if weir_bpf::mounts::is_cgroup2(host) {
        return Ok(host.to_path_buf());
    }
    let p = Path::new(CGROUP2_FALLBACK);
    weir_bpf::mounts::ensure_cgroup2(p)
        .with_context(|| format!("mounting cgroup v2 at {}", p.display()))?;
    Ok(p.to_path_buf())
}

/// The TCP addresses to serve probes and metrics on.
fn listen_addrs(a: &AgentArgs) -> Result<Vec<std::net::SocketAddr>> {
    [
        ("--health-listen", &a.health_listen),
        ("--metrics-listen", &a.metrics_listen),
    ]
    .into_iter()
    .filter(|(_, s)| !s.is_empty())
    .map(|(flag, s)| {
        s.parse()
            .map_err(|_| anyhow!("{flag}: {s:?} is not ADDRESS:PORT"))
    })
    .collect()
}

/// Runs the agent until SIGTERM or SIGINT (pinned state stays for the next one).
pub(crate) async fn run(cli: &Cli, a: &AgentArgs) -> Result<ExitCode> {
    let listen = listen_addrs(a)?;
    let snat_ports = weir_agent::pods::parse_port_range(&a.snat_ports)
        .map_err(|e| anyhow!("--snat-ports {e}"))?;
    let devices = if a.devices.is_empty() {
        let d = default_route_devices();
        if d.is_empty() {
            bail!("no --device given and no default route to take one from (hint: --device eth0)");
        }
        tracing::info!(devices = ?d, "node devices from the default routes");
        d
    } else {
        a.devices.clone()
    };
    let cgroup = cgroup_root(a.cgroup.as_deref())?;
    let pins = a
        .bpf_pin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/weir/default/{}", a.node_name)));
    let kind: weir_dataplane::DataplaneKind = a.dataplane.into();
    let ebpf = kind == weir_dataplane::DataplaneKind::Ebpf;
    if !ebpf && (a.tunnel_device.is_some() || a.xdp) {
        bail!("--dataplane {kind}: --tunnel-device and --xdp need the eBPF dataplane");
    }
    let opener = weir_dataplane::open::NodeDataplanes {
        kind,
        pins: pins.clone(),
        cgroup,
        socket_lb: !a.no_socket_lb,
        netns: None,
        node: weir_dataplane::nft::NodeNet {
            devices: devices.clone(),
            snat_ports,
            masquerade: None,
        },
        iptables: a.iptables_backend.into(),
    };
    let (dp, pods) = opener
        .open()
        .with_context(|| format!("loading the {kind} dataplane (pins in {})", pins.display()))?;
    let pod_cfg = weir_agent::pods::PodConfig {
        endpoint_dir: a.endpoint_dir.clone(),
        devices,
        netns: None,
        snat_ports,
        tunnel: a.tunnel_device.clone(),
        xdp: a.xdp,
        masquerade: a.masquerade,
        non_masquerade: a.non_masquerade.iter().map(|n| n.trunc()).collect(),
        dataplanes: Some(opener),
        flow_summaries: a.flow_summaries,
    };
    let client = match cli.kubeconfig_path()? {
        Some(p) => client::client_from_kubeconfig(&p).await?,
        None => kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?,
    };
    let cfg = weir_agent::AgentConfig {
        node_name: a.node_name.clone(),
        socket: a.socket.clone(),
        default_algorithm: a.lb_algorithm.into(),
        default_mode: a.lb_mode.into(),
        identity_gc_grace: a.identity_gc_grace,
        service_proxy_name: a.service_proxy_name.clone(),
        listen,
        cluster_id: a.cluster_id.clone(),
        listen_file: None,
        flow_metrics_context: a.flow_metrics_context,
    };
    tokio::select! {
        r = weir_agent::run(client, dp, Some((pods, pod_cfg)), cfg) => r?,
        _ = lab::wait_for_signal() => {}
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use serde_json::Value;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).expect("YAML")
    }

    /// Every path `prefix` of the container mounts, and how.
    fn mounts(c: &Value) -> Vec<(String, String)> {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap().to_string(),
                    m["name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn mounted(c: &Value, path: &Path) -> bool {
        mounts(c).iter().any(|(m, _)| path.starts_with(m))
    }

    /// The DaemonSet (deploy/agent-daemonset.yaml) and its ConfigMap run `weir agent` with
    /// settings it accepts, mount every path those settings name, and probe and expose the
    /// ports it listens on; its init containers' commands parse too.
    #[test]
    fn the_daemonset_agrees_with_the_agents_flags() {
        let ds = yaml(include_str!("../../../deploy/agent-daemonset.yaml"));
        let cm = yaml(include_str!("../../../deploy/agent-config.yaml"));
        let spec = &ds["spec"]["template"]["spec"];
        let agent = &spec["containers"][0];
        let mut argv: Vec<String> = agent["command"]
            .as_array()
            .unwrap()
            .iter()
            .chain(agent["args"].as_array().unwrap())
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(argv[..2], ["weir".to_string(), "agent".to_string()]);
        // Each ConfigMap key is the environment variable of one of the agent's flags; its
        // value must parse as that flag's.
        let cmd = Cli::command();
        let agent_cmd = cmd.find_subcommand("agent").unwrap();
        let data = cm["data"].as_object().unwrap();
        for (k, v) in data {
            // The in-cluster configuration's own variables (for clusters without kube-proxy).
            if k == "KUBERNETES_SERVICE_HOST" || k == "KUBERNETES_SERVICE_PORT" {
                continue;
            }
            let arg = agent_cmd
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == k.as_str()))
                .unwrap_or_else(|| panic!("ConfigMap key {k} is no flag's environment variable"));
            let long = arg.get_long().unwrap();
            let v = v.as_str().unwrap();
            let is_flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            if is_flag {
                assert!(["true", "false"].contains(&v), "{k}: {v:?}");
                if v == "true" {
                    argv.push(format!("--{long}"));
                }
            } else if !v.is_empty() {
                for part in v.split(',') {
                    argv.push(format!("--{long}={part}"));
                }
            }
        }
        argv.extend(["--node-name".into(), "n1".into()]);
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let crate::cli::Command::Agent(a) = &cli.command else {
            panic!("not weir agent")
        };
        // NODE_NAME comes from the downward API.
        let env = agent["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
        assert_eq!(
            agent["envFrom"][0]["configMapRef"]["name"],
            cm["metadata"]["name"]
        );
        // Paths the agent uses are mounted from the host.
        for p in [
            a.socket.parent().unwrap(),
            a.endpoint_dir.as_path(),
            Path::new(weir_bpf::mounts::BPFFS),
            Path::new("/sys/fs/cgroup"),
            Path::new(weir_bpf::mounts::MOUNT_LOCK).parent().unwrap(),
            Path::new(CGROUP2_FALLBACK).parent().unwrap(),
        ] {
            assert!(mounted(agent, p), "{} is not mounted", p.display());
        }
        // Probes on the health address; the metrics port exposed.
        let health: std::net::SocketAddr = a.health_listen.parse().unwrap();
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let g = &agent[probe]["httpGet"];
            assert_eq!(g["host"], health.ip().to_string(), "{probe}");
            assert_eq!(g["port"], health.port(), "{probe}");
        }
        assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
        let metrics: std::net::SocketAddr = a.metrics_listen.parse().unwrap();
        let port = agent["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "metrics")
            .unwrap();
        assert_eq!(port["containerPort"], metrics.port());
        assert_eq!(
            ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
            metrics.port().to_string()
        );
        // The init containers: their commands parse, and what they write is mounted.
        for init in spec["initContainers"].as_array().unwrap() {
            let argv: Vec<&str> = init["command"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            match &cli.command {
                crate::cli::Command::Cni(crate::cni_install::CniCommand::Install(d)) => {
                    assert!(mounted(init, &d.bin_dir) && mounted(init, &d.conf_dir));
                }
                crate::cli::Command::Mounts { bpffs: true, .. } => {
                    assert!(mounted(init, Path::new(weir_bpf::mounts::BPFFS)));
                    assert_eq!(init["securityContext"]["privileged"], true);
                }
                other => panic!("unexpected init container command {other:?}"),
            }
        }
        // Host networking, every node, one node at a time.
        assert_eq!(spec["hostNetwork"], true);
        assert_eq!(spec["tolerations"][0]["operator"], "Exists");
        assert_eq!(
            ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            1
        );
        assert!(agent["securityContext"].get("privileged").is_none());
    }

    #[test]
    fn default_route_devices_of_this_namespace_exclude_loopback() {
        assert!(!default_route_devices().iter().any(|d| d == "lo"));
    }
}
