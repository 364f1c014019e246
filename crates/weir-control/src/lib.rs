//! weir's control logic, pure and without a kernel: Kubernetes Services and EndpointSlices
//! become load-balancing frontends and backends (with Kubernetes' endpoint semantics), and
//! Maglev tables are computed identically on every node, and Nodes give the tunnel routes of
//! VXLAN mode.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod import_schedule;
pub mod lb;
pub mod maglev;
pub mod mcs;
pub mod policy;
pub mod schedule;
pub mod tunnel;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// What no watcher of weir reads, left out of its stores: `managedFields` (server-side apply
/// keeps one entry per writer, often larger than the object's spec) and kubectl's copy of the
/// whole object in `last-applied-configuration`. With ten thousand imports and their slices,
/// they were most of a store's memory.
pub fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}
