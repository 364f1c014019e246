//! `weir lab`: Kubernetes-shaped clusters built from network namespaces on one machine.
//!
//! A lab runs weir's API server, a controller manager (EndpointSlice controller and a
//! round-robin scheduler) and one lab kubelet per node, each a process of its own talking to
//! the API server like its real counterpart. Nodes, pods and an external host are network
//! namespaces joined by veth pairs; every pod also gets a cgroup v2 directory and runs the
//! built-in echo server on its containerPorts.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::path::PathBuf;

pub mod client;
pub mod clusterset;
pub mod cni;
pub mod connect;
pub mod controller;
pub mod dns;
pub mod dns_server;
pub mod echo;
pub mod endpoints;
pub mod kubelet;
pub mod lab;
pub mod net;
pub mod paths;
pub mod sys;

/// What can go wrong in a lab operation. Messages name the lab, node, pod or file.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab name is unusable.
    #[error("invalid lab name {0:?}: use 1 to 20 lowercase letters, digits and '-', starting and ending with a letter or digit")]
    BadName(String),
    /// No such lab.
    #[error("no lab named {0:?} (hint: `weir lab list` shows labs; `weir lab up --name {0}` creates one)")]
    NoSuchLab(String),
    /// The lab exists already.
    #[error("a lab named {0:?} exists already (hint: `weir lab down --name {0}` removes it)")]
    LabExists(String),
    /// No such node in the lab.
    #[error("lab {0:?} has no node {1:?} (hint: `weir lab nodes --cluster {0}` lists them)")]
    NoSuchNode(String, String),
    /// No such pod, or it is not running.
    #[error("{0}")]
    NoSuchPod(String),
    /// Not running as root.
    #[error("weir lab needs root: it creates network namespaces, veth pairs and cgroups (hint: run it with sudo)")]
    NotRoot,
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{0}` failed: {1}")]
    Command(String, String),
    /// The API server refused or could not be reached.
    #[error("{0}")]
    Kube(String),
    /// A manifest could not be read.
    #[error("{0}")]
    Manifest(String),
    /// The API server rejected a document.
    #[error("{0}")]
    Apply(String),
    /// A lab file is damaged.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An address range is used up.
    #[error("no free address in {0}")]
    Exhausted(String),
    /// Waiting timed out.
    #[error("{0}")]
    Timeout(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

impl LabError {
    /// An I/O error on `path`.
    pub fn io(path: PathBuf, source: std::io::Error) -> Self {
        LabError::Io { path, source }
    }
}
