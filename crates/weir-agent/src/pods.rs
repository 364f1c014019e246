//! The pod datapath loop: a thread (in the node's network namespace, where the devices are)
//! that attaches the node program to the node's devices and keeps the endpoint map and the pod
//! programs in step with the network plugin's endpoint records.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use weir_dataplane::pods::{PodDataplane, PodSyncStats};
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
}

fn dir_mtime(cfg: &PodConfig) -> Option<SystemTime> {
    std::fs::metadata(&cfg.endpoint_dir)
        .and_then(|m| m.modified())
        .ok()
}

fn sync_once(pods: &Pods, cfg: &PodConfig) {
    let (records, bad) = EndpointRecord::read_dir(&cfg.endpoint_dir);
    for b in &bad {
        tracing::warn!(error = %b, "ignoring an endpoint record");
    }
    let result = pods.dataplane.lock().expect("pods").sync(&records);
    let mut st = pods.status.lock().expect("pod status");
    st.endpoints = records.len();
    st.bad_records = bad.iter().map(|b| b.to_string()).collect();
    match result {
        Ok(stats) => {
            if stats != PodSyncStats::default() {
                tracing::info!(?stats, "pod datapath updated");
            }
            st.last_sync = stats;
            st.last_error = None;
        }
        Err(e) => {
            tracing::error!(error = %e, "syncing the pod datapath; retrying");
            st.last_error = Some(e.to_string());
        }
    }
}

fn attach_devices(pods: &Pods, cfg: &PodConfig) -> Result<(), String> {
    let mut names = Vec::new();
    for dev in &cfg.devices {
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str())
            .map_err(|e| format!("device {dev:?}: {e}"))?;
        pods.dataplane
            .lock()
            .expect("pods")
            .attach_netdev(ifindex)
            .map_err(|e| format!("attaching to device {dev:?}: {e}"))?;
        names.push(dev.clone());
    }
    pods.status.lock().expect("pod status").devices = names;
    Ok(())
}

/// Starts the loop on its own thread. It enters `cfg.netns` first; failing that, or failing
/// to attach to a device, is an error at once (the agent does not run half-configured).
pub fn spawn(pods: Arc<Pods>, cfg: PodConfig) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("pod-datapath".into())
        .spawn(move || {
            if let Some(ns) = &cfg.netns {
                let entered = std::fs::File::open(ns)
                    .map_err(|e| format!("{}: {e}", ns.display()))
                    .and_then(|f| {
                        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| format!("entering {}: {e}", ns.display()))
                    });
                if let Err(e) = entered {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            if let Err(e) = attach_devices(&pods, &cfg) {
                let _ = tx.send(Err(e));
                return;
            }
            sync_once(&pods, &cfg);
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
                    seen = now;
                    since_full = Duration::ZERO;
                    sync_once(&pods, &cfg);
                }
            }
        })
        .map_err(|e| format!("starting the pod datapath thread: {e}"))?;
    rx.recv()
        .map_err(|_| "the pod datapath thread ended at start".to_string())?
}
