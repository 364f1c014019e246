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

/// The name of weir's CNI configuration file (runtimes use the lexicographically first file
/// of their configuration directory, hence the number).
pub const CONFLIST_NAME: &str = "05-weir.conflist";

/// weir's network configuration list: weir alone, declaring `cni_version` (and 1.0.0 and
/// 1.1.0 in `cniVersions`, from which a runtime picks the highest it knows), naming the
/// agent's socket, the endpoint directory and (when not the default
/// /var/lib/cni/networks/weir) where allocations are kept.
pub fn conflist(
    cni_version: &str,
    agent_socket: &std::path::Path,
    endpoint_dir: &std::path::Path,
    ipam_data_dir: Option<&std::path::Path>,
) -> serde_json::Value {
    let mut plugin = serde_json::json!({
        "type": "weir-cni",
        "agentSocket": agent_socket,
        "endpointDir": endpoint_dir,
    });
    if let Some(d) = ipam_data_dir {
        plugin["ipamDataDir"] = serde_json::json!(d);
    }
    serde_json::json!({
        "cniVersion": cni_version,
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": "weir",
        "plugins": [plugin],
    })
}
