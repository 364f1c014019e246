//! weir's Kubernetes-compatible API server: the part of the Kubernetes REST API that weir,
//! kube-rs and kubectl need (core Namespaces, Pods, Services and Nodes, EndpointSlices and
//! NetworkPolicies), with list/watch/CRUD/patch semantics, ClusterIP and NodePort allocation,
//! validation, persistence in redb, TLS and bearer-token authentication.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alloc;
pub mod error;
pub mod http;
pub mod patch;
pub mod pki;
pub mod runtime_config;
pub mod server;
pub mod store;

pub use error::ApiError;
pub use runtime_config::RuntimeConfig;
pub use server::{start, Listen, Running, ServerConfig, TlsFiles};
pub use store::{Store, StoreConfig};
