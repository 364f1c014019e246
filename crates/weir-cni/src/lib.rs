//! weir's CNI plugin: a container runtime (or the lab kubelet) executes `weir-cni` to add a
//! pod to the network, as the CNI specification 1.1 says; the plugin wires the pod's
//! interface, allocates its addresses from the node's pod CIDRs and hands the endpoint to the
//! node's weir agent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod ipam;
pub mod link;
pub mod plugin;
pub mod spec;
