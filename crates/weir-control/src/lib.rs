//! weir's control logic, pure and without a kernel: Kubernetes Services and EndpointSlices
//! become load-balancing frontends and backends (with Kubernetes' endpoint semantics), and
//! Maglev tables are computed identically on every node, and Nodes give the tunnel routes of
//! VXLAN mode.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod lb;
pub mod maglev;
pub mod mcs;
pub mod policy;
pub mod tunnel;
