//! The weir agent: one per node. It watches Services and EndpointSlices through kube-rs
//! reflectors (the same code against a lab's API server and a real one), turns them into
//! load-balancing state with weir-control, and applies the difference through a
//! `Dataplane`. It serves a node-local introspection API on a unix socket (mode 0600) for
//! `weir status` and `weir bpf lb list`, as cilium-dbg talks to its agent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::Notify;
use weir_control::lb::{self, Algorithm, Options, Warning};
use weir_dataplane::{ApplyStats, Dataplane};

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// Where the introspection socket goes.
    pub socket: PathBuf,
    /// Backend selection for Services without the algorithm annotation.
    pub default_algorithm: Algorithm,
}

/// What the agent reports about its synchronisation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncStatus {
    /// Node name.
    pub node: String,
    /// True once the datapath matches a complete view of the API.
    pub synced: bool,
    /// Number of applies so far.
    pub applies: u64,
    /// When the last apply finished (RFC 3339).
    pub last_apply: Option<String>,
    /// How long the last apply took, in microseconds.
    pub last_apply_micros: u64,
    /// How long building the desired state from the API objects took, in microseconds.
    pub last_build_micros: u64,
    /// What the last apply changed.
    pub last_stats: ApplyStats,
    /// Frontends programmed.
    pub frontends: usize,
    /// The last error, if the last apply failed.
    pub last_error: Option<String>,
    /// Inputs not acted on.
    pub warnings: Vec<Warning>,
    /// Whether the API server watches are healthy.
    pub api_connected: bool,
}

/// Shared between the reconcile loop and the introspection API.
pub struct Shared {
    /// The dataplane.
    pub dataplane: Mutex<Box<dyn Dataplane>>,
    /// Sync status.
    pub status: Mutex<SyncStatus>,
}

/// Starts a kube-rs reflector for `api` in the background and returns its store. After
/// every watch event (or error) `on_event(ok)` runs, so that callers can wake their
/// reconcile loop and record the watch's health. Watch errors are retried with kube-rs'
/// default backoff; the store keeps its last complete view meanwhile.
pub fn spawn_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    on_event: impl Fn(bool) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = &ev {
                tracing::warn!(error = %e, "watch failed; retrying");
            }
            on_event(ev.is_ok());
        }
    });
    reader
}

fn wake(notify: &Arc<Notify>, shared: &Arc<Shared>) -> impl Fn(bool) + Send + 'static {
    let (notify, shared) = (notify.clone(), shared.clone());
    move |ok| {
        if let Ok(mut s) = shared.status.lock() {
            s.api_connected = ok;
        }
        notify.notify_one();
    }
}

/// Runs the agent until the process is stopped. The dataplane was created (and its pinned
/// state read back) before, so traffic keeps flowing while the API is out of reach.
pub async fn run(
    client: Client,
    dataplane: Box<dyn Dataplane>,
    cfg: AgentConfig,
) -> Result<(), std::io::Error> {
    let shared = Arc::new(Shared {
        dataplane: Mutex::new(dataplane),
        status: Mutex::new(SyncStatus {
            node: cfg.node_name.clone(),
            ..Default::default()
        }),
    });
    let api_task = tokio::spawn(api::serve(cfg.socket.clone(), shared.clone()));
    let notify = Arc::new(Notify::new());
    let services = spawn_reflector(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        wake(&notify, &shared),
    );
    let slices = spawn_reflector(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        wake(&notify, &shared),
    );
    // Apply only from a complete view: until both initial lists are in, the pinned state
    // stays as the previous agent left it (stale entries are removed by the first apply).
    let _ = services.wait_until_ready().await;
    let _ = slices.wait_until_ready().await;
    tracing::info!(node = %cfg.node_name, "initial lists received; programming the datapath");
    let opts = Options {
        node_name: cfg.node_name.clone(),
        default_algorithm: cfg.default_algorithm,
    };
    loop {
        // The stores hand out Arcs: no object is copied to build the state.
        let build_started = std::time::Instant::now();
        let svcs = services.state();
        let sls = slices.state();
        let (state, warnings) = lb::build(&svcs, &sls, &opts);
        let build_micros = build_started.elapsed().as_micros() as u64;
        let started = std::time::Instant::now();
        let result = {
            let mut dp = shared.dataplane.lock().expect("dataplane lock");
            dp.apply(&state)
        };
        {
            let mut st = shared.status.lock().expect("status lock");
            st.applies += 1;
            st.last_apply = Some(jiff::Timestamp::now().to_string());
            st.last_apply_micros = started.elapsed().as_micros() as u64;
            st.last_build_micros = build_micros;
            st.frontends = state.frontends.len();
            st.warnings = warnings;
            match result {
                Ok(stats) => {
                    if stats != ApplyStats::default() {
                        tracing::info!(?stats, micros = st.last_apply_micros, "datapath updated");
                    }
                    st.last_stats = stats;
                    st.synced = true;
                    st.last_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "applying the datapath state; retrying");
                    st.last_error = Some(e.to_string());
                    st.synced = false;
                }
            }
        }
        let failed = shared
            .status
            .lock()
            .map(|s| s.last_error.is_some())
            .unwrap_or(false);
        if failed {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        // Coalesce a burst of events into one apply.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if api_task.is_finished() {
            return Err(std::io::Error::other("the introspection API stopped"));
        }
    }
}
