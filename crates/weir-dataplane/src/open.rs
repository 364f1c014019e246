//! Opening a node's dataplanes for the chosen kind: the Services dataplane and the pod
//! datapath set up to match, after the other dataplanes' leftovers are removed.

use std::path::PathBuf;

use crate::ipt::{IptablesBackend, IptablesDataplane};
use crate::nft::{NftDataplane, NodeNet};
use crate::pods::{NetfilterPolicy, PodDataplane};
use crate::{remove_other_dataplanes, Dataplane, DataplaneError, DataplaneKind};

/// How to open a node's dataplanes.
#[derive(Debug, Clone)]
pub struct NodeDataplanes {
    /// Which dataplane renders the node's state.
    pub kind: DataplaneKind,
    /// Where the BPF maps and links are pinned (the pod datapath's under `tc/`).
    pub pins: PathBuf,
    /// The cgroup v2 directory the socket programs attach to.
    pub cgroup: PathBuf,
    /// eBPF: load-balance at the socket layer.
    pub socket_lb: bool,
    /// The node's network namespace (None: this process's).
    pub netns: Option<PathBuf>,
    /// Netfilter: the node's devices, SNAT ports and masquerading.
    pub node: NodeNet,
    /// iptables: which binaries.
    pub iptables: IptablesBackend,
}

impl NodeDataplanes {
    /// Loads the BPF side (in every mode: under a netfilter dataplane the socket and pod
    /// programs are detached, an earlier agent's links removed), removes the other
    /// dataplanes' rules, and returns the Services dataplane and the pod datapath.
    pub fn open(&self) -> Result<(Box<dyn Dataplane>, PodDataplane), DataplaneError> {
        let ebpf = self.kind == DataplaneKind::Ebpf;
        let bpf =
            crate::ebpf::EbpfDataplane::new_with(&self.pins, &self.cgroup, self.socket_lb && ebpf)?;
        let mut pods = PodDataplane::new(&self.pins.join("tc"), &self.pins)?;
        remove_other_dataplanes(self.kind, self.netns.as_deref());
        let netns = self.netns.clone();
        let dp: Box<dyn Dataplane> = match self.kind {
            DataplaneKind::Ebpf => Box::new(bpf),
            DataplaneKind::Nftables => {
                pods.set_netfilter(netns.clone(), NetfilterPolicy::Nftables);
                Box::new(NftDataplane::new(netns, self.node.clone())?)
            }
            DataplaneKind::Iptables => {
                pods.set_netfilter(netns.clone(), NetfilterPolicy::Iptables(self.iptables));
                Box::new(IptablesDataplane::new(
                    netns,
                    self.node.clone(),
                    self.iptables,
                )?)
            }
        };
        Ok((dp, pods))
    }
}
