//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use weir_lab::lab::{self, UpOptions, Via};
use weir_lab::{client, LabError};

/// weir: an eBPF dataplane for Kubernetes, and labs that build a cluster out of network
/// namespaces on one machine.
#[derive(Parser, Debug)]
#[command(name = "weir", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Lab cluster to talk to (its kubeconfig is used).
    #[arg(
        long,
        global = true,
        env = "WEIR_CLUSTER",
        conflicts_with = "kubeconfig"
    )]
    pub(crate) cluster: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create or update objects from manifests (server-side apply; every document is
    /// validated with a dry run before any is written).
    Apply {
        /// Files, directories or `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Validate on the server only; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete the objects named in manifests.
    Delete {
        /// Files, directories or `-`.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Do not fail on objects that do not exist.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// List or show objects: services, endpointslices, pods, namespaces, nodes,
    /// networkpolicies (and their short names).
    Get(crate::get::GetArgs),
    /// Run the Kubernetes-compatible API server.
    Apiserver(ApiserverArgs),
    /// Run the node agent: watch the API and program the eBPF datapath.
    Agent(crate::agent::AgentArgs),
    /// Run a cluster's mesh: publish its exported Services to the clusterset's etcd and write
    /// the clusterset's ServiceImports and their EndpointSlices into its API.
    Mesh(crate::mesh::MeshArgs),
    /// Show the agent's synchronisation, programs and maps.
    Status {
        #[command(flatten)]
        target: AgentTarget,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Inspect the eBPF datapath through the agent.
    #[command(subcommand)]
    Bpf(BpfCommand),
    /// Run a synthetic first packet of a flow through a node's tc programs
    /// (BPF_PROG_TEST_RUN) and print what they would do: verdict, chosen backend, NAT and
    /// reason. Nothing is written to conntrack and no counter moves.
    Explain {
        #[command(flatten)]
        target: AgentTarget,
        /// Source ADDRESS:PORT, IPv4 or [IPv6]:PORT (a local pod's address runs the pod
        /// program).
        #[arg(long)]
        from: String,
        /// Destination ADDRESS:PORT, of the source's family.
        #[arg(long)]
        to: String,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show NetworkPolicy verdicts as the datapath makes them: every flow judged for an
    /// isolated pod (allowed, or dropped with its reason), with pods, identities, ports and
    /// the direction whose policy decided; and the packets the kernel dropped on the nodes
    /// outside weir's programs, with the kernel's reason. Prints the last ones, or follows.
    Observe(ObserveArgs),
    /// Serve a live map of the cluster's namespaces, workloads and the traffic between them
    /// (coloured by verdict, with rates and drops; click an edge or a workload for its flows
    /// and drop reasons) on localhost, and print its URL. Runs until interrupted.
    Ui {
        /// Where to listen (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:9880")]
        listen: std::net::SocketAddr,
        /// A lab node whose agent to ask (repeatable; with --cluster, default: every node; a
        /// clusterset's nodes are CLUSTER/NODE).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// The agent's socket (default: the lab nodes', or /run/weir/agent.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// A node's prefilter: packets from listed source prefixes are dropped on the node's
    /// devices before anything else runs (deny lists against floods), with counters: an XDP
    /// program under eBPF, rules before conntrack under nftables and iptables.
    #[command(subcommand)]
    Prefilter(PrefilterCommand),
    /// The nodes' dataplane: switch it while established flows go on.
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
    /// Build and use lab clusters made of network namespaces.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Mount what the agent needs on this node, each at most once (the DaemonSet's
    /// mount-bpf-fs init container runs `weir mounts --bpffs`).
    Mounts {
        /// The BPF filesystem at /sys/fs/bpf.
        #[arg(long)]
        bpffs: bool,
        /// A cgroup v2 hierarchy at this directory.
        #[arg(long, value_name = "DIR")]
        cgroup2: Option<PathBuf>,
    },
    /// Install or remove the CNI plugin on this node (the DaemonSet's init container runs
    /// `weir cni install`).
    #[command(subcommand)]
    Cni(crate::cni_install::CniCommand),
    /// Print shell completions.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TunnelArg {
    Native,
    Vxlan,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LbModeArg {
    Snat,
    Dsr,
}

impl From<LbModeArg> for weir_control::lb::LbMode {
    fn from(a: LbModeArg) -> Self {
        match a {
            LbModeArg::Snat => weir_control::lb::LbMode::Snat,
            LbModeArg::Dsr => weir_control::lb::LbMode::Dsr,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DataplaneArg {
    /// BPF programs at the socket layer, tc and XDP.
    Ebpf,
    /// One nftables table per family (kube-proxy's nftables layout).
    Nftables,
    /// iptables chains written with iptables-restore (kube-proxy's iptables layout).
    Iptables,
}

impl From<DataplaneArg> for weir_dataplane::DataplaneKind {
    fn from(a: DataplaneArg) -> Self {
        match a {
            DataplaneArg::Ebpf => weir_dataplane::DataplaneKind::Ebpf,
            DataplaneArg::Nftables => weir_dataplane::DataplaneKind::Nftables,
            DataplaneArg::Iptables => weir_dataplane::DataplaneKind::Iptables,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IptablesBackendArg {
    /// The host's iptables-restore.
    Auto,
    /// iptables-legacy-restore (x_tables).
    Legacy,
    /// iptables-nft-restore (nf_tables).
    Nft,
}

impl From<IptablesBackendArg> for weir_dataplane::ipt::IptablesBackend {
    fn from(a: IptablesBackendArg) -> Self {
        match a {
            IptablesBackendArg::Auto => weir_dataplane::ipt::IptablesBackend::Auto,
            IptablesBackendArg::Legacy => weir_dataplane::ipt::IptablesBackend::Legacy,
            IptablesBackendArg::Nft => weir_dataplane::ipt::IptablesBackend::Nft,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AlgorithmArg {
    Random,
    Maglev,
}

impl From<AlgorithmArg> for weir_control::lb::Algorithm {
    fn from(a: AlgorithmArg) -> Self {
        match a {
            AlgorithmArg::Random => weir_control::lb::Algorithm::Random,
            AlgorithmArg::Maglev => weir_control::lb::Algorithm::Maglev,
        }
    }
}

/// Which agent to ask: a lab node (with --cluster) or a socket.
#[derive(Args, Debug)]
pub(crate) struct AgentTarget {
    /// The lab node whose agent to ask (with --cluster).
    #[arg(long, default_value = "node-1")]
    node: String,
    /// The agent's socket (default: the lab node's, or /run/weir/agent.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum BpfCommand {
    /// Load-balancing state.
    #[command(subcommand)]
    Lb(LbCommand),
    /// Local pods the per-packet datapath delivers to directly.
    #[command(subcommand)]
    Endpoint(ListOnly),
    /// Packets and bytes of the per-packet datapath by direction and reason (drops from 130).
    #[command(subcommand)]
    Metrics(ListOnly),
    /// Conntrack entries of load-balanced and masqueraded flows (both directions).
    #[command(subcommand)]
    Ct(ListOnly),
    /// Source NAT: NodePort flows sent to backends on other nodes, and pods' masqueraded
    /// flows (whose BACKEND and FRONTEND are their destination).
    #[command(subcommand)]
    Nat(ListOnly),
}

#[derive(Subcommand, Debug)]
pub(crate) enum ListOnly {
    /// List the entries.
    List {
        #[command(flatten)]
        target: AgentTarget,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum LbCommand {
    /// Frontends with their backends, Maglev tables and session affinity entries.
    List {
        #[command(flatten)]
        target: AgentTarget,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// `weir lab fault --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FaultArg {
    Refuse,
    Blackhole,
    None,
}

#[derive(Args, Debug)]
pub(crate) struct ApiserverArgs {
    /// Directory of the database.
    #[arg(long)]
    data_dir: PathBuf,
    /// Loopback ADDRESS:PORT or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: weir_apiserver::Listen,
    /// TLS certificate (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File holding the bearer token clients must send.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Service CIDRs, one per IP family, primary first.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10.96.0.0/16,fd00:10:96::/112"
    )]
    service_cidr: Vec<String>,
    /// NodePort range.
    #[arg(long, default_value = "30000-32767")]
    node_port_range: String,
    /// APIs turned off, as kube-apiserver's flag: `GROUP/VERSION=false` or
    /// `GROUP/VERSION/RESOURCE=false` (comma-separated), e.g.
    /// `multicluster.x-k8s.io/v1beta1=false` to answer as a cluster without the MCS CRDs.
    #[arg(long, default_value = "")]
    runtime_config: String,
}

#[derive(Subcommand, Debug)]
pub(crate) enum LabCommand {
    /// Create a lab: API server, controllers, nodes (each with a kubelet and a weir agent);
    /// apply manifests; wait until pods are Ready and every datapath matches the API.
    Up {
        /// Lab name.
        #[arg(long)]
        name: String,
        /// Number of nodes.
        #[arg(long, default_value_t = 1)]
        nodes: u8,
        /// Manifests to apply once the cluster is up.
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        /// How long to wait for pods to become Ready.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        /// The agents' backend selection for Services without the weir.dev/lb-algorithm
        /// annotation.
        #[arg(long, value_enum, default_value_t = AlgorithmArg::Random)]
        lb_algorithm: AlgorithmArg,
        /// Translate pods' Service traffic per packet at tc instead of at the socket layer
        /// (as Cilium's socketLB.hostNamespaceOnly).
        #[arg(long)]
        no_socket_lb: bool,
        /// The dataplane the agents render their node's Services, masquerading and
        /// NetworkPolicy with.
        #[arg(long, value_enum, default_value_t = DataplaneArg::Ebpf)]
        dataplane: DataplaneArg,
        /// How pods reach other nodes' pods: native routing on the fabric, or VXLAN
        /// encapsulation driven by the agents.
        #[arg(long, value_enum, default_value_t = TunnelArg::Native)]
        tunnel: TunnelArg,
        /// Accelerate NodePorts with XDP on the nodes' devices (the lab then turns off
        /// transmit checksum offload on its fabric links, as XDP_TX needs complete checksums).
        #[arg(long)]
        xdp: bool,
        /// Do not masquerade pods' flows to the external host and other non-pod addresses
        /// (by default they leave with their node's address, as with Cilium's defaults).
        #[arg(long)]
        no_masquerade: bool,
        /// How long the agents keep a SecurityIdentity no pod needs before deleting it.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        identity_gc_grace: Duration,
        /// The agents' service proxy name: they program only the Services labelled
        /// service.kubernetes.io/service-proxy-name=NAME (unset: only unlabelled ones).
        #[arg(long, value_name = "NAME")]
        service_proxy_name: Option<String>,
        /// Make a clusterset NAME of this many clusters (NAME/c1..NAME/cN, each with
        /// --nodes nodes and ranges of its own) on one fabric, with one etcd and a mesh per
        /// cluster; -f manifests go to every cluster.
        #[arg(long, value_name = "N")]
        clusters: Option<u8>,
        /// In a clusterset: how long a cluster's exported data outlives its mesh's last
        /// renewal before the other clusters withdraw it.
        #[arg(long, default_value = "60s", value_parser = parse_duration, requires = "clusters")]
        remote_ttl: Duration,
        /// In a clusterset: the meshes check their cluster's exported endpoints (a TCP
        /// connect from the cluster's first node) this often, publishing those failing 3
        /// times in a row not ready; 0s (the default): no checks.
        #[arg(long, default_value = "0s", value_parser = parse_duration, requires = "clusters")]
        mesh_health_check: Duration,
    },
    /// Cut a clusterset's cluster (--cluster SET/cK) off the other clusters: its nodes'
    /// fabric links to theirs and its mesh's connection to etcd.
    Partition,
    /// Undo `lab partition` for --cluster SET/cK.
    Heal,
    /// Stop a component of a clusterset: mesh, agents or apiserver of --cluster SET/cK, or
    /// etcd of --cluster SET. Returns once it is stopped.
    Stop {
        /// The component.
        #[arg(long, value_enum)]
        component: ComponentArg,
    },
    /// Start a stopped component again; returns once it serves.
    Start {
        /// The component.
        #[arg(long, value_enum)]
        component: ComponentArg,
    },
    /// Remove a lab and everything it made, even after a crash.
    Down {
        /// Lab name.
        #[arg(long)]
        name: String,
    },
    /// List labs.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// List a lab's nodes and external host with their addresses.
    Nodes {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Delete a pod with a long grace period: it keeps serving, its endpoint becomes
    /// serving+terminating.
    Terminate {
        /// The pod, as namespace/name.
        pod: String,
        /// Grace period in seconds.
        #[arg(long, default_value_t = 3600)]
        grace_period: i64,
    },
    /// Make a pod's servers fail without any API change: `refuse` (connections reset,
    /// datagrams answered port-unreachable, as a crashed process), `blackhole` (nothing
    /// answers, as a hung one) or `none` (back to normal). The pod's own outgoing
    /// connections keep working.
    Fault {
        /// The pod, as namespace/name.
        pod: String,
        /// What its servers do.
        #[arg(long, value_enum)]
        mode: FaultArg,
    },
    /// Run a command inside a pod's network namespace and cgroup (or a node's, or `external`).
    Exec {
        /// namespace/pod, a node name, or `external`.
        target: String,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Make fresh connections (or UDP request/replies) and count who answered.
    Connect {
        /// namespace/pod, a node name, or `external`.
        #[arg(long)]
        from: String,
        /// HOST:PORT; HOST is an IP, a Service as name[.namespace], or a name of two dots or
        /// more (e.g. hello.mcs.svc.clusterset.local) resolved through the source pod's
        /// resolv.conf once per attempt (a name that does not resolve counts as ENOTFOUND).
        #[arg(long)]
        to: String,
        /// Protocol.
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        protocol: Proto,
        /// Number of attempts.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Timeout per attempt.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        /// Instead of fresh connections, hold one for this long, exchanging a message every
        /// 100 ms and reconnecting after errors (TCP: a long-lived stream; UDP: a connected
        /// socket).
        #[arg(long, value_parser = parse_duration)]
        hold: Option<Duration>,
        /// N new attempts per second, evenly spaced, until --count have been made (each with
        /// its own --timeout); without it, attempts run 16 at a time as fast as they complete.
        #[arg(long, conflicts_with = "hold")]
        rate: Option<f64>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Probe every pod from every pod and print the reachability matrix.
    Probe {
        /// Port.
        #[arg(long)]
        port: u16,
        /// Protocol.
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        protocol: Proto,
        /// Dial pod IPs, or the ClusterIP of a Service selecting exactly that pod.
        #[arg(long, value_enum, default_value_t = ViaArg::PodIp)]
        via: ViaArg,
        /// Timeout per probe.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// (component) The lab's API server.
    #[command(hide = true)]
    Apiserver {
        /// APIs turned off, as `weir apiserver --runtime-config`.
        #[arg(long, default_value = "")]
        runtime_config: String,
    },
    /// (component) The lab's controller manager.
    #[command(hide = true)]
    Controller,
    /// (component) A node's kubelet.
    #[command(hide = true)]
    Kubelet {
        #[arg(long)]
        node: String,
    },
    /// (component) A node's weir agent.
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        node: String,
        #[arg(long, value_enum)]
        lb_algorithm: Option<AlgorithmArg>,
    },
    /// (component) A pod sandbox: the echo server inside the pod.
    #[command(hide = true)]
    Sandbox {
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        ready_file: PathBuf,
        #[arg(long = "port")]
        ports: Vec<weir_lab::echo::ServePort>,
    },
    /// (component) A cluster's DNS server.
    #[command(hide = true)]
    Dns,
    /// (component) A clusterset's etcd.
    #[command(hide = true)]
    Etcd,
    /// (component) The gate between a clusterset's meshes and its etcd.
    #[command(hide = true)]
    EtcdGate,
    /// (component) A clusterset cluster's mesh.
    #[command(hide = true)]
    Mesh,
    /// (helper) Connection attempts from inside a namespace; spec on stdin, JSON out.
    #[command(hide = true)]
    Attempts {
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        cgroup: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum DataplaneCommand {
    /// Switch node by node (every node of the lab by default) to another dataplane, in any
    /// direction, keeping established connections: the target is installed beside the
    /// current one, the translated flows are copied (into the kernel's conntrack, or from it
    /// into the BPF conntrack), then the old dataplane is taken away. A node that fails is
    /// rolled back and the switch stops there.
    Switch {
        /// The dataplane to switch to.
        #[arg(long, value_enum)]
        to: DataplaneArg,
        /// A lab node to switch (repeatable; default: every node, in order).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// The agent's socket (default: the lab nodes', or /run/weir/agent.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Test hook: each node fails on purpose after this phase (install or copy) and rolls
        /// back.
        #[arg(long, hide = true, value_name = "PHASE")]
        fail_after: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PrefilterCommand {
    /// Drop packets from these source prefixes (ADDRESS/LEN or one address; host bits are
    /// cleared). All are added or, on an error, none.
    Add(PrefilterCidrs),
    /// Stop dropping these source prefixes. All are removed or, when one is not in the list,
    /// none.
    Delete(PrefilterCidrs),
    /// The deny list, with the packets and bytes each prefix dropped.
    List {
        #[command(flatten)]
        target: AgentTarget,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

#[derive(Args, Debug)]
pub(crate) struct PrefilterCidrs {
    #[command(flatten)]
    target: AgentTarget,
    /// Source prefixes, e.g. 198.51.100.0/24 2001:db8::/48.
    #[arg(required = true, value_name = "CIDR")]
    cidrs: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct ObserveArgs {
    /// A lab node whose agent to ask (repeatable; with --cluster, default: every node; a
    /// clusterset's nodes are CLUSTER/NODE).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// The agent's socket (default: the lab nodes', or /run/weir/agent.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Keep printing flows as they come (until interrupted).
    #[arg(short, long)]
    follow: bool,
    /// Only flows from or to this pod: NAMESPACE/NAME, or NAME in namespace default. Filters
    /// of one flag are alternatives (repeat it); different flags must all hold.
    #[arg(long)]
    pod: Vec<String>,
    /// Only flows from this pod.
    #[arg(long)]
    from_pod: Vec<String>,
    /// Only flows to this pod.
    #[arg(long)]
    to_pod: Vec<String>,
    /// Only flows from or to pods of this namespace.
    #[arg(short, long)]
    namespace: Vec<String>,
    /// Only flows from pods of this namespace.
    #[arg(long)]
    from_namespace: Vec<String>,
    /// Only flows to pods of this namespace.
    #[arg(long)]
    to_namespace: Vec<String>,
    /// Only flows from or to pods these labels select (`app=web,tier!=db`, `app`, `!canary`).
    #[arg(short, long)]
    label: Vec<String>,
    /// Only flows from pods these labels select.
    #[arg(long)]
    from_label: Vec<String>,
    /// Only flows to pods these labels select.
    #[arg(long)]
    to_label: Vec<String>,
    /// Only flows to a backend of this Service (NAMESPACE/NAME, or NAME in default).
    #[arg(long)]
    service: Vec<String>,
    /// Only this protocol (tcp, udp, icmp, icmpv6, sctp).
    #[arg(long)]
    protocol: Vec<String>,
    /// Only flows with this port at either end.
    #[arg(long)]
    port: Vec<u16>,
    /// Only this verdict: `allowed` or `dropped` (policy verdicts, drops), `forwarded`
    /// (forwarding summaries), `translated` (the socket layer's Service translations),
    /// `traced` (TCP health: observed, not decided).
    #[arg(long, value_enum)]
    verdict: Option<VerdictArg>,
    /// Only this reason: weir's (`DROP_POLICY_DENIED`, or `POLICY_DENIED`) or the kernel's
    /// for packets it dropped outside weir's programs (`NETFILTER_DROP`, `NO_SOCKET`, ...).
    #[arg(long)]
    reason: Vec<String>,
    /// Only flows this event reported: `policy-verdict` (NetworkPolicy judged a new flow),
    /// `trace` (a forwarding summary of the tc/XDP programs), `trace-sock` (the socket layer
    /// translated a Service address), `drop` (weir's programs dropped a packet),
    /// `kernel-drop` (the kernel dropped it outside weir's programs), or `tcp-health` (what
    /// a pod's client sockets went through with one peer in the last seconds).
    #[arg(short = 't', long = "type", value_name = "TYPE")]
    event_type: Vec<String>,
    /// Only flows since this long ago (30s, 5m, 1h30m) or this RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Negate the filter that follows (`--not --namespace kube-system`).
    #[arg(long = "not")]
    not: bool,
    /// (`--not --FLAG VALUE` as the CLI rewrites it: FLAG=VALUE.)
    #[arg(long = "not-filter", hide = true)]
    not_filter: Vec<String>,
    /// How many past flows to print first (default 20, none with --follow).
    #[arg(long)]
    last: Option<usize>,
    /// Output: a line per flow (compact), aligned columns (table), or a JSON object per line.
    #[arg(short, long, value_enum, default_value_t = ObserveFormat::Compact)]
    output: ObserveFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ObserveFormat {
    Compact,
    Table,
    Json,
}

/// `--not --FLAG VALUE` (or `--not --FLAG=VALUE`, `--not -n VALUE`) becomes
/// `--not-filter FLAG=VALUE`, for `weir observe` to negate that filter. Other arguments are
/// left as they are.
pub fn rewrite_not(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if !args.iter().any(|a| a == "observe") {
        return args;
    }
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let next = args.get(i + 1).and_then(|a| a.to_str());
        let flag = next.and_then(|n| match n {
            "-n" => Some("namespace".to_string()),
            "-l" => Some("label".to_string()),
            "-t" => Some("type".to_string()),
            n if n.starts_with("--") && n != "--not" => Some(n[2..].to_string()),
            _ => None,
        });
        match (args[i] == "--not", flag) {
            (true, Some(flag)) => {
                let (flag, value) = match flag.split_once('=') {
                    Some((f, v)) => (f.to_string(), Some(v.to_string())),
                    None => (
                        flag,
                        args.get(i + 2).and_then(|a| a.to_str()).map(String::from),
                    ),
                };
                let consumed = if next.is_some_and(|n| n.contains('=')) {
                    2
                } else {
                    3
                };
                out.push("--not-filter".into());
                out.push(format!("{flag}={}", value.unwrap_or_default()).into());
                i += consumed;
            }
            _ => {
                out.push(args[i].clone());
                i += 1;
            }
        }
    }
    out
}

/// The filter `weir observe`'s flags ask for.
fn observe_filter(o: &ObserveArgs) -> Result<crate::observe::Filter> {
    use crate::observe::{parse_selector, pod_ref, Cond, End, Verdict};
    if o.not {
        bail!("--not must be followed by a filter (e.g. --not --namespace kube-system)");
    }
    let cond = |flag: &str, values: Vec<String>| -> Result<Option<Cond>> {
        if values.is_empty() {
            return Ok(None);
        }
        let pods = || values.iter().map(|p| pod_ref(p)).collect::<Vec<_>>();
        let sels = || -> Result<Vec<_>> { values.iter().map(|s| parse_selector(s)).collect() };
        Ok(Some(match flag {
            "pod" => Cond::Pod(End::Either, pods()),
            "from-pod" => Cond::Pod(End::From, pods()),
            "to-pod" => Cond::Pod(End::To, pods()),
            "namespace" => Cond::Namespace(End::Either, values),
            "from-namespace" => Cond::Namespace(End::From, values),
            "to-namespace" => Cond::Namespace(End::To, values),
            "label" => Cond::Label(End::Either, sels()?),
            "from-label" => Cond::Label(End::From, sels()?),
            "to-label" => Cond::Label(End::To, sels()?),
            "service" => Cond::Service(pods()),
            "protocol" => Cond::Protocol(values),
            "port" => Cond::Port(
                values
                    .iter()
                    .map(|p| p.parse().map_err(|_| anyhow!("--port {p:?}: not a port")))
                    .collect::<Result<_>>()?,
            ),
            "verdict" => {
                let v = values.last().expect("a value");
                Cond::Verdict(Verdict::parse(v).ok_or_else(|| {
                    anyhow!(
                        "--verdict {v:?}: expected allowed, dropped, forwarded, translated or traced"
                    )
                })?)
            }
            "type" => {
                const TYPES: [&str; 6] = [
                    "policy-verdict",
                    "trace",
                    "trace-sock",
                    "drop",
                    "kernel-drop",
                    "tcp-health",
                ];
                if let Some(bad) = values
                    .iter()
                    .find(|t| !TYPES.iter().any(|k| k.eq_ignore_ascii_case(t)))
                {
                    bail!("--type {bad:?}: expected one of {}", TYPES.join(", "));
                }
                Cond::Type(values)
            }
            "reason" => Cond::Reason(values),
            "since" => Cond::Since(crate::observe::parse_since(values.last().unwrap())?),
            other => bail!("--not --{other}: not a filter of weir observe"),
        }))
    };
    let verdict = o
        .verdict
        .and_then(|v| v.to_possible_value())
        .map(|v| v.get_name().to_string());
    let given: Vec<(&str, Vec<String>)> = vec![
        ("pod", o.pod.clone()),
        ("from-pod", o.from_pod.clone()),
        ("to-pod", o.to_pod.clone()),
        ("namespace", o.namespace.clone()),
        ("from-namespace", o.from_namespace.clone()),
        ("to-namespace", o.to_namespace.clone()),
        ("label", o.label.clone()),
        ("from-label", o.from_label.clone()),
        ("to-label", o.to_label.clone()),
        ("service", o.service.clone()),
        ("protocol", o.protocol.clone()),
        ("port", o.port.iter().map(|p| p.to_string()).collect()),
        ("verdict", verdict.into_iter().collect()),
        ("type", o.event_type.clone()),
        ("reason", o.reason.clone()),
        ("since", o.since.clone().into_iter().collect()),
    ];
    let mut conds = Vec::new();
    for (flag, values) in given {
        if let Some(c) = cond(flag, values)? {
            conds.push((false, c));
        }
    }
    // Negated ones, grouped by flag (values of one flag are alternatives).
    let mut negated: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for nf in &o.not_filter {
        let (flag, value) = nf.split_once('=').unwrap_or((nf.as_str(), ""));
        if value.is_empty() {
            bail!("--not --{flag}: needs a value");
        }
        negated
            .entry(flag.to_string())
            .or_default()
            .push(value.to_string());
    }
    for (flag, values) in negated {
        if let Some(c) = cond(&flag, values)? {
            conds.push((true, c));
        }
    }
    Ok(crate::observe::Filter { conds })
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ComponentArg {
    Mesh,
    Agents,
    Apiserver,
    Etcd,
}

impl From<ComponentArg> for weir_lab::clusterset::Component {
    fn from(c: ComponentArg) -> Self {
        use weir_lab::clusterset::Component;
        match c {
            ComponentArg::Mesh => Component::Mesh,
            ComponentArg::Agents => Component::Agents,
            ComponentArg::Apiserver => Component::Apiserver,
            ComponentArg::Etcd => Component::Etcd,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VerdictArg {
    Allowed,
    Dropped,
    Forwarded,
    Translated,
    Traced,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ViaArg {
    PodIp,
    Service,
}

/// Parses `500ms`, `1s`, `2m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 1s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?} is not a duration (e.g. 500ms, 1s, 2m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl Cli {
    /// Whether this invocation is a long-running component (logs at info by default).
    pub fn is_daemon(&self) -> bool {
        matches!(
            self.command,
            Command::Apiserver(_)
                | Command::Agent(_)
                | Command::Lab(
                    LabCommand::Apiserver { .. }
                        | LabCommand::Controller
                        | LabCommand::Kubelet { .. }
                        | LabCommand::Sandbox { .. }
                        | LabCommand::EtcdGate
                        | LabCommand::Dns
                        | LabCommand::Mesh
                )
                | Command::Mesh(_)
        )
    }

    fn lab_name(&self) -> Result<String> {
        self.cluster.clone().ok_or_else(|| {
            anyhow!("this command needs --cluster NAME (hint: `weir lab list` shows labs)")
        })
    }

    /// The kubeconfig to use: --kubeconfig, the lab's, or kube-rs' default inference.
    pub fn kubeconfig_path(&self) -> Result<Option<PathBuf>> {
        if let Some(k) = &self.kubeconfig {
            return Ok(Some(k.clone()));
        }
        if let Some(c) = &self.cluster {
            return Ok(Some(lab::kubeconfig_of(c)?));
        }
        Ok(None)
    }

    /// A client for the selected cluster.
    pub async fn client(&self) -> Result<kube::Client> {
        match self.kubeconfig_path()? {
            Some(p) => Ok(client::client_from_kubeconfig(&p).await?),
            None => kube::Client::try_default().await.context(
                "no cluster selected (hint: use --cluster NAME for a lab, or --kubeconfig FILE)",
            ),
        }
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Turns transport errors into one line with a hint.
pub fn explain_kube(e: anyhow::Error, cli: &Cli) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Connection refused")
        || text.contains("tcp connect error")
        || text.contains("error trying to connect")
        || text.contains("client error (Connect)")
    {
        let which = cli
            .cluster
            .as_ref()
            .map(|c| format!("of lab {c:?}"))
            .unwrap_or_else(|| "of the selected cluster".into());
        return anyhow!(
            "the API server {which} is not reachable (hint: `weir lab list` shows whether it runs)"
        );
    }
    e
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "weir", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Apiserver(a) => runtime()?.block_on(run_apiserver(a)),
        Command::Mesh(a) => runtime()?.block_on(crate::mesh::run(&cli, a)),
        Command::Apply { files, dry_run } => runtime()?.block_on(async {
            let docs = client::read_manifests(files, "default")?;
            let c = cli.client().await?;
            if *dry_run {
                let n = dry_run_all(&c, &docs)
                    .await
                    .map_err(|e| explain_kube(e, &cli))?;
                println!("{n} object(s) valid (server dry run)");
                return Ok(ExitCode::SUCCESS);
            }
            for line in client::apply(&c, &docs)
                .await
                .map_err(|e| explain_kube(e.into(), &cli))?
            {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Delete {
            files,
            ignore_not_found,
        } => runtime()?.block_on(async {
            let docs = client::read_manifests(files, "default")?;
            let c = cli.client().await?;
            for line in client::delete(&c, &docs, *ignore_not_found)
                .await
                .map_err(|e| explain_kube(e.into(), &cli))?
            {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Get(g) => runtime()?.block_on(async {
            let c = cli.client().await?;
            let mesh = crate::imports::lab_mesh_status(cli.cluster.as_deref());
            crate::get::run(&c, g, mesh.as_ref())
                .await
                .map_err(|e| explain_kube(e, &cli))?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Lab(l) => run_lab(&cli, l),
        Command::Prefilter(p) => {
            let (target, method, cidrs) = match p {
                PrefilterCommand::Add(a) => (&a.target, "POST", a.cidrs.as_slice()),
                PrefilterCommand::Delete(a) => (&a.target, "DELETE", a.cidrs.as_slice()),
                PrefilterCommand::List { target, output } => {
                    return runtime()?.block_on(crate::introspect::prefilter_list(
                        &agent_socket(&cli, target)?,
                        *output == Format::Json,
                    ))
                }
            };
            runtime()?.block_on(crate::introspect::prefilter_change(
                &agent_socket(&cli, target)?,
                method,
                cidrs,
            ))
        }
        Command::Dataplane(DataplaneCommand::Switch {
            to,
            nodes,
            socket,
            output,
            fail_after,
        }) => runtime()?.block_on(crate::switch::run(
            &cli,
            (*to).into(),
            &node_sockets(&cli, socket.as_ref(), nodes)?,
            *output == Format::Json,
            fail_after.as_deref(),
        )),
        Command::Observe(o) => {
            let sockets = observe_sockets(&cli, o)?;
            let filter = observe_filter(o)?;
            let last = o.last.unwrap_or(if o.follow { 0 } else { 20 });
            current_thread()?.block_on(crate::observe::run(
                &sockets,
                &filter,
                last,
                o.follow,
                match o.output {
                    ObserveFormat::Compact => crate::observe::Output::Compact,
                    ObserveFormat::Table => crate::observe::Output::Table,
                    ObserveFormat::Json => crate::observe::Output::Json,
                },
            ))
        }
        Command::Ui {
            listen,
            nodes,
            socket,
        } => {
            let sockets = flow_sockets(&cli, socket.as_ref(), nodes)?;
            runtime()?.block_on(crate::ui::run(cli.cluster.clone(), sockets, *listen))
        }
        Command::Agent(a) => runtime()?.block_on(crate::agent::run(&cli, a)),
        Command::Cni(c) => crate::cni_install::run(c),
        Command::Mounts { bpffs, cgroup2 } => {
            if !bpffs && cgroup2.is_none() {
                bail!("nothing to mount (hint: --bpffs and/or --cgroup2 DIR)");
            }
            if *bpffs {
                let made = weir_bpf::ensure_bpffs().context("mounting /sys/fs/bpf")?;
                eprintln!(
                    "/sys/fs/bpf: {}",
                    if made { "mounted" } else { "already mounted" }
                );
            }
            if let Some(d) = cgroup2 {
                let made = weir_bpf::mounts::ensure_cgroup2(d)
                    .with_context(|| format!("mounting cgroup v2 at {}", d.display()))?;
                eprintln!(
                    "{}: {}",
                    d.display(),
                    if made { "mounted" } else { "already mounted" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { target, output } => runtime()?.block_on(async {
            // A clusterset's cluster: the mesh's state and the imports come with the agent's.
            let mesh = match crate::imports::lab_mesh_status(cli.cluster.as_deref()) {
                Some(m) => {
                    let c = cli.client().await?;
                    Some((m, crate::imports::list(&c, None).await?))
                }
                None => None,
            };
            crate::introspect::status(&agent_socket(&cli, target)?, *output == Format::Json, mesh)
                .await
        }),
        Command::Bpf(BpfCommand::Lb(LbCommand::List { target, output })) => runtime()?.block_on(
            crate::introspect::lb_list(&agent_socket(&cli, target)?, *output == Format::Json),
        ),
        Command::Bpf(BpfCommand::Endpoint(ListOnly::List { target, output })) => runtime()?
            .block_on(crate::introspect::endpoint_list(
                &agent_socket(&cli, target)?,
                *output == Format::Json,
            )),
        Command::Bpf(BpfCommand::Metrics(ListOnly::List { target, output })) => runtime()?
            .block_on(crate::introspect::metrics_list(
                &agent_socket(&cli, target)?,
                *output == Format::Json,
            )),
        Command::Explain {
            target,
            from,
            to,
            protocol,
            output,
        } => runtime()?.block_on(crate::introspect::explain(
            &agent_socket(&cli, target)?,
            from,
            to,
            protocol,
            *output == Format::Json,
        )),
        Command::Bpf(BpfCommand::Ct(ListOnly::List { target, output })) => {
            runtime()?.block_on(crate::introspect::ct_list(
                &agent_socket(&cli, target)?,
                *output == Format::Json,
                false,
            ))
        }
        Command::Bpf(BpfCommand::Nat(ListOnly::List { target, output })) => runtime()?.block_on(
            crate::introspect::ct_list(&agent_socket(&cli, target)?, *output == Format::Json, true),
        ),
    }
}

/// The agents `weir observe` asks: --socket, the named lab nodes, or every node of the lab.
fn observe_sockets(cli: &Cli, o: &ObserveArgs) -> Result<Vec<(String, PathBuf)>> {
    flow_sockets(cli, o.socket.as_ref(), &o.nodes)
}

/// The agents whose flows `weir observe` and `weir ui` read: as [`node_sockets`], and for a
/// clusterset every node of every cluster, named `CLUSTER/NODE` (so are `--node` values).
pub(crate) fn flow_sockets(
    cli: &Cli,
    socket: Option<&PathBuf>,
    named: &[String],
) -> Result<Vec<(String, PathBuf)>> {
    let set = cli
        .cluster
        .as_deref()
        .filter(|_| socket.is_none())
        .and_then(weir_lab::clusterset::ClusterSetLayout::load);
    let (Some(set), Some(name)) = (set, cli.cluster.as_deref()) else {
        return node_sockets(cli, socket, named);
    };
    let mut all = Vec::new();
    for c in &set.clusters {
        let cluster = format!("{name}/{c}");
        let paths = weir_lab::paths::LabPaths::new(&cluster);
        for h in lab::nodes(&cluster)?
            .into_iter()
            .filter(|h| h.role == "node")
        {
            all.push((format!("{c}/{}", h.name), paths.agent_socket(&h.name)));
        }
    }
    if let Some(bad) = named.iter().find(|n| !all.iter().any(|(l, _)| l == *n)) {
        bail!(
            "--node {bad:?}: no such node in clusterset {name} (its nodes: {})",
            all.iter()
                .map(|(l, _)| l.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|(l, _)| named.is_empty() || named.contains(l))
        .collect())
}

/// The agents a command asks: `socket`, the named lab nodes, or every node of the lab
/// (without --cluster: this node's agent).
pub(crate) fn node_sockets(
    cli: &Cli,
    socket: Option<&PathBuf>,
    named: &[String],
) -> Result<Vec<(String, PathBuf)>> {
    if let Some(s) = socket {
        return Ok(vec![("agent".into(), s.clone())]);
    }
    let Some(c) = &cli.cluster else {
        return Ok(vec![(
            "agent".into(),
            PathBuf::from("/run/weir/agent.sock"),
        )]);
    };
    let paths = weir_lab::paths::LabPaths::new(c);
    let nodes: Vec<String> = if named.is_empty() {
        lab::nodes(c)?
            .into_iter()
            .filter(|h| h.role == "node")
            .map(|h| h.name)
            .collect()
    } else {
        named.to_vec()
    };
    Ok(nodes
        .into_iter()
        .map(|n| {
            let s = paths.agent_socket(&n);
            (n, s)
        })
        .collect())
}

fn agent_socket(cli: &Cli, t: &AgentTarget) -> Result<PathBuf> {
    if let Some(s) = &t.socket {
        return Ok(s.clone());
    }
    match &cli.cluster {
        Some(c) => {
            lab::kubeconfig_of(c)?;
            Ok(weir_lab::paths::LabPaths::new(c).agent_socket(&t.node))
        }
        None => Ok(PathBuf::from("/run/weir/agent.sock")),
    }
}

async fn dry_run_all(c: &kube::Client, docs: &[client::Doc]) -> Result<usize> {
    let mut pp = kube::api::PatchParams::apply("weir").force();
    pp.dry_run = true;
    for d in docs {
        let api = client::dynamic_api(c, d.kind, d.namespace.as_deref());
        api.patch(&d.name, &pp, &kube::api::Patch::Apply(&d.object))
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) => {
                    anyhow!("{}: {} {:?}: {}", d.origin, d.kind.kind, d.name, s.message)
                }
                e => anyhow!(e),
            })?;
    }
    Ok(docs.len())
}

async fn run_apiserver(a: &ApiserverArgs) -> Result<ExitCode> {
    let token = match &a.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let (lo, hi) = a.node_port_range.split_once('-').ok_or_else(|| {
        anyhow!(
            "--node-port-range {:?}: expected LOW-HIGH",
            a.node_port_range
        )
    })?;
    let (lo, hi): (u16, u16) = (
        lo.parse().context("--node-port-range")?,
        hi.parse().context("--node-port-range")?,
    );
    if lo > hi {
        bail!(
            "--node-port-range {:?}: LOW must not exceed HIGH",
            a.node_port_range
        );
    }
    let mut cidrs = Vec::new();
    for c in &a.service_cidr {
        cidrs.push(
            weir_model::validate::parse_cidr(c)
                .map_err(|e| anyhow!("--service-cidr {c:?}: {e}"))?,
        );
    }
    if cidrs.is_empty()
        || cidrs.len() > 2
        || (cidrs.len() == 2 && cidrs[0].addr().is_ipv4() == cidrs[1].addr().is_ipv4())
    {
        bail!("--service-cidr: give one CIDR, or two of different IP families");
    }
    let runtime_config =
        weir_apiserver::RuntimeConfig::parse(&a.runtime_config).map_err(|e| anyhow!(e))?;
    let cfg = weir_apiserver::ServerConfig {
        data_dir: a.data_dir.clone(),
        listen: a.listen.clone(),
        tls: match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => Some(weir_apiserver::TlsFiles {
                cert: c.clone(),
                key: k.clone(),
            }),
            _ => None,
        },
        token,
        store: weir_apiserver::StoreConfig {
            alloc: weir_apiserver::alloc::AllocConfig {
                service_cidrs: cidrs,
                node_ports: lo..=hi,
            },
            ..Default::default()
        },
        bookmark_interval: Duration::from_secs(5),
        runtime_config,
    };
    let running = weir_apiserver::start(cfg).await?;
    match running.addr {
        Some(a) => eprintln!("weir apiserver listening on {a}"),
        None => eprintln!("weir apiserver listening on {:?}", a.listen),
    }
    lab::wait_for_signal().await;
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn run_lab(cli: &Cli, cmd: &LabCommand) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up {
            name,
            nodes,
            files,
            timeout,
            lb_algorithm,
            no_socket_lb,
            dataplane,
            tunnel,
            xdp,
            no_masquerade,
            identity_gc_grace,
            service_proxy_name,
            clusters,
            remote_ttl,
            mesh_health_check,
        } => {
            match clusters {
                Some(n) => {
                    eprintln!("Creating clusterset {name:?} ({n} cluster(s) of {nodes} node(s))")
                }
                None => eprintln!("Creating lab {name:?} ({nodes} node(s))"),
            }
            let k = runtime()?.block_on(lab::up(&UpOptions {
                name: name.clone(),
                nodes: *nodes,
                manifests: files.clone(),
                timeout: *timeout,
                lb_algorithm: (*lb_algorithm).into(),
                socket_lb: !no_socket_lb,
                dataplane: (*dataplane).into(),
                tunnel: match tunnel {
                    TunnelArg::Native => "native".into(),
                    TunnelArg::Vxlan => "vxlan".into(),
                },
                xdp: *xdp,
                masquerade: !no_masquerade,
                identity_gc_grace: *identity_gc_grace,
                service_proxy_name: service_proxy_name.clone(),
                clusters: clusters.unwrap_or(0),
                remote_ttl: *remote_ttl,
                mesh_health_check: *mesh_health_check,
            }))?;
            if let Some(n) = clusters {
                eprintln!("Clusterset {name:?} is ready. Use its clusters with:");
                for k in 1..=*n {
                    let kc = weir_lab::paths::LabPaths::new(&format!("{name}/c{k}")).kubeconfig();
                    eprintln!(
                        "  weir --cluster {name}/c{k} get serviceimports -A    kubectl --kubeconfig {}",
                        kc.display()
                    );
                    println!("{}", kc.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("Lab {name:?} is ready. Use it with:\n  weir --cluster {name} get pods -A\n  kubectl --kubeconfig {} get pods -A", k.display());
            println!("{}", k.display());
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Down { name } => {
            let r = lab::down(name)?;
            eprintln!(
                "Lab {name:?} removed: {} process(es), {} network namespace(s){}{}",
                r.processes,
                r.namespaces,
                if r.cgroups { ", cgroups" } else { "" },
                if r.pins { ", BPF pins" } else { "" }
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::List { output } => {
            let labs = lab::list();
            if *output == Format::Json {
                println!("{}", serde_json::to_string_pretty(&labs)?);
            } else if labs.is_empty() {
                eprintln!("No labs. Create one with: weir lab up --name demo");
            } else {
                let rows: Vec<Vec<String>> = labs
                    .iter()
                    .map(|l| {
                        vec![
                            l.name.clone(),
                            l.nodes.to_string(),
                            if l.apiserver_running {
                                "Running".into()
                            } else {
                                "Stopped".into()
                            },
                            l.server.clone(),
                            l.kubeconfig.display().to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::get::render_table(
                        &["NAME", "NODES", "API SERVER", "SERVER", "KUBECONFIG"],
                        &rows
                    )
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Nodes { output } => {
            let hosts = lab::nodes(&cli.lab_name()?)?;
            if *output == Format::Json {
                println!("{}", serde_json::to_string_pretty(&hosts)?);
            } else {
                let rows: Vec<Vec<String>> = hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.name.clone(),
                            h.role.clone(),
                            h.ip.clone(),
                            h.ip6.clone(),
                            h.pod_cidrs.join(","),
                            h.netns.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::get::render_table(
                        &["NAME", "ROLE", "IP", "IPV6", "POD CIDRS", "NETNS"],
                        &rows
                    )
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Fault { pod, mode } => {
            let name = cli.lab_name()?;
            let m = match mode {
                FaultArg::Refuse => lab::FaultMode::Refuse,
                FaultArg::Blackhole => lab::FaultMode::Blackhole,
                FaultArg::None => lab::FaultMode::None,
            };
            runtime()?.block_on(lab::fault(&name, pod, m))?;
            println!("pod {pod}: fault {}", format!("{mode:?}").to_lowercase());
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Terminate { pod, grace_period } => {
            let name = cli.lab_name()?;
            runtime()?.block_on(lab::terminate(&name, pod, *grace_period))?;
            println!("pod {pod} terminating (grace period {grace_period}s)");
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Exec { target, command } => {
            let name = cli.lab_name()?;
            if !weir_lab::sys::is_root() {
                return Err(LabError::NotRoot.into());
            }
            // Resolve with a runtime that ends before this process enters the namespace.
            let src = current_thread()?.block_on(async {
                let c = lab::lab_client(&name).await?;
                lab::resolve_source(&name, target, &c).await
            })?;
            Err(lab::exec_in(&src, command).into())
        }
        LabCommand::Connect {
            from,
            to,
            protocol,
            count,
            timeout,
            hold,
            rate,
            output,
        } => {
            let name = cli.lab_name()?;
            let opts = lab::ConnectOpts {
                udp: *protocol == Proto::Udp,
                count: *count,
                timeout: *timeout,
                hold: *hold,
                rate: *rate,
            };
            let s = runtime()?.block_on(lab::connect(&name, from, to, &opts))?;
            if *output == Format::Json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "{} attempt(s): {} ok, {} failed",
                    s.attempts, s.ok, s.failed
                );
                for (who, n) in &s.responders {
                    println!(
                        "  {who:<30} {n:>6}  {}",
                        "#".repeat((n * 40).div_ceil(s.attempts.max(1)))
                    );
                }
                for (err, n) in &s.errors {
                    println!("  error {err:<24} {n:>6}");
                }
                for (peer, n) in &s.peers {
                    println!("  the socket saw its peer as {peer} ({n}x)");
                }
                for (client, n) in &s.seen_as {
                    println!("  the responder saw the client as {client} ({n}x)");
                }
                if let Some(r) = s.reconnects {
                    println!("  reconnects: {r}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Probe {
            port,
            protocol,
            via,
            timeout,
            output,
        } => {
            let name = cli.lab_name()?;
            let via = match via {
                ViaArg::PodIp => Via::PodIp,
                ViaArg::Service => Via::Service,
            };
            let m = runtime()?.block_on(lab::probe(
                &name,
                *port,
                *protocol == Proto::Udp,
                via,
                *timeout,
            ))?;
            if *output == Format::Json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                print!("{}", m.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Apiserver { runtime_config } => {
            let name = cli.lab_name()?;
            let rc =
                weir_apiserver::RuntimeConfig::parse(runtime_config).map_err(|e| anyhow!(e))?;
            runtime()?.block_on(lab::run_apiserver(&name, rc))?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Agent { node, lb_algorithm } => {
            let name = cli.lab_name()?;
            runtime()?.block_on(async {
                tokio::select! {
                    r = lab::run_agent(&name, node, lb_algorithm.map(Into::into)) => r,
                    _ = lab::wait_for_signal() => Ok(()),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Controller => {
            let name = cli.lab_name()?;
            runtime()?.block_on(async {
                let c = lab::lab_client(&name).await?;
                let layout = weir_lab::paths::Layout::load(&weir_lab::paths::LabPaths::new(&name))?;
                let pool = layout.lb_pool.parse().map_err(|_| {
                    LabError::Usage(format!("lab {name:?}: bad lbPool {:?}", layout.lb_pool))
                })?;
                tokio::select! {
                    r = weir_lab::controller::run(c, pool) => r,
                    _ = lab::wait_for_signal() => Ok(()),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Kubelet { node } => {
            let name = cli.lab_name()?;
            runtime()?.block_on(async {
                let c = lab::lab_client(&name).await?;
                let k = weir_lab::kubelet::Kubelet::new(
                    weir_lab::paths::LabPaths::new(&name),
                    node,
                    c,
                )?;
                tokio::select! {
                    r = k.run() => r,
                    _ = lab::wait_for_signal() => Ok(()),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Sandbox {
            netns,
            cgroup,
            identity,
            ready_file,
            ports,
        } => {
            lab::enter(netns, cgroup)?;
            current_thread()?.block_on(async {
                weir_lab::echo::serve(identity.clone(), ports)
                    .await
                    .with_context(|| format!("serving {identity}"))?;
                std::fs::write(ready_file, b"ready")
                    .with_context(|| format!("writing {}", ready_file.display()))?;
                lab::wait_for_signal().await;
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Partition => {
            let name = cli.lab_name()?;
            println!(
                "{}",
                runtime()?.block_on(weir_lab::clusterset::partition(&name))?
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Heal => {
            let name = cli.lab_name()?;
            println!(
                "{}",
                runtime()?.block_on(weir_lab::clusterset::heal(&name))?
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Stop { component } => {
            let name = cli.lab_name()?;
            println!(
                "{}",
                weir_lab::clusterset::stop(&name, (*component).into())?
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Start { component } => {
            let name = cli.lab_name()?;
            println!(
                "{}",
                runtime()?.block_on(weir_lab::clusterset::start(&name, (*component).into()))?
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Etcd => {
            let name = cli.lab_name()?;
            let (cgroup, mut cmd) = weir_lab::clusterset::etcd_command(&name)?;
            std::fs::create_dir_all(&cgroup)?;
            weir_lab::sys::enter_cgroup(&cgroup)?;
            use std::os::unix::process::CommandExt;
            let err = cmd.exec();
            bail!("starting etcd: {err} (hint: `make setup` installs Debian's etcd-server)")
        }
        LabCommand::Dns => {
            let name = cli.lab_name()?;
            runtime()?.block_on(async {
                tokio::select! {
                    r = weir_lab::dns_server::run(&name) => r,
                    _ = lab::wait_for_signal() => Ok(()),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::EtcdGate => {
            let name = cli.lab_name()?;
            runtime()?.block_on(async {
                tokio::select! {
                    r = weir_lab::clusterset::run_gate(&name) => r,
                    _ = lab::wait_for_signal() => Ok(()),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Mesh => {
            let name = cli.lab_name()?;
            runtime()?.block_on(crate::mesh::run_lab_mesh(&name))
        }
        LabCommand::Attempts { netns, cgroup } => {
            let mut input = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)?;
            let spec: weir_lab::connect::AttemptSpec =
                serde_json::from_str(&input).context("reading the attempt spec")?;
            lab::enter(netns, cgroup)?;
            let report = current_thread()?.block_on(weir_lab::connect::execute(&spec));
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn observe(args: &[&str]) -> Result<crate::observe::Filter> {
        let argv: Vec<std::ffi::OsString> = ["weir", "observe"]
            .iter()
            .chain(args)
            .map(|a| a.into())
            .collect();
        let cli = Cli::try_parse_from(rewrite_not(argv))?;
        let Command::Observe(o) = &cli.command else {
            panic!("not observe");
        };
        observe_filter(o)
    }

    #[test]
    fn observe_filters_and_not() {
        use crate::observe::{Cond, End};
        let f = observe(&["--from-pod", "a", "--pod", "x/b", "--pod", "x/c", "-n", "x"]).unwrap();
        let got: Vec<String> = f.conds.iter().map(|c| format!("{c:?}")).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&f.conds[0], (false, Cond::Pod(End::Either, p)) if p == &["x/b", "x/c"]));
        assert!(matches!(&f.conds[1], (false, Cond::Pod(End::From, p)) if p == &["default/a"]));
        // --not negates the flag that follows, long or short, with its value apart or not.
        let f = observe(&[
            "--not",
            "--namespace",
            "kube-system",
            "--not",
            "-l",
            "app=x",
            "--not",
            "--verdict=dropped",
            "--protocol",
            "tcp",
        ])
        .unwrap();
        let negated: Vec<bool> = f.conds.iter().map(|(n, _)| *n).collect();
        assert_eq!(negated, vec![false, true, true, true], "{:?}", f.conds);
        assert!(f.conds.iter().any(
            |c| matches!(c, (true, Cond::Namespace(End::Either, n)) if n == &["kube-system"])
        ));
        assert!(observe(&["--not"]).is_err());
        assert!(observe(&["--not", "--bogus", "1"]).is_err());
        assert!(observe(&["--since", "tomorrow"]).is_err());
        assert!(observe(&["-l", "=x"]).is_err());
        assert!(observe(&["-o", "table", "--since", "5m", "--port", "80"]).is_ok());
    }
}
