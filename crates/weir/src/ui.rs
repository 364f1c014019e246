//! `weir ui`: the live service map in the browser. A task asks every node's agent for new
//! flows (`GET /flows`, as `weir observe` does) twice a second and keeps the last ones of
//! all nodes in one sequence; an HTTP server on localhost serves the page (`ui/`, built with
//! esbuild and embedded in the binary: no Node.js at run time) and `/api/flows?since=SEQ`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use weir_agent::flows::FlowRecord;

const INDEX: &str = include_str!("../../../ui/index.html");
const APP: &str = include_str!("../../../ui/dist/app.js");

/// How many flows the page can catch up on.
const KEEP: usize = 20_000;

/// The flows of every node, in one sequence.
#[derive(Default)]
struct Flows {
    next: u64,
    kept: VecDeque<(u64, FlowRecord)>,
    unreachable: BTreeSet<String>,
}

/// What `/api/flows` answers.
#[derive(Serialize)]
struct Page<'a> {
    /// Pass as `since` next time.
    next: u64,
    cluster: Option<&'a str>,
    /// How many nodes are asked.
    nodes: usize,
    /// Nodes whose agent does not answer.
    unreachable: Vec<String>,
    flows: Vec<&'a FlowRecord>,
}

/// Asks every agent for what came since the last time, forever.
async fn collect(sockets: Vec<(String, PathBuf)>, flows: Arc<Mutex<Flows>>) {
    let mut cursor: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let mut new = Vec::new();
        for (node, socket) in &sockets {
            let since = cursor.get(node).copied().unwrap_or(0);
            match crate::observe::page(socket, since).await {
                Ok(p) => {
                    flows.lock().expect("flows").unreachable.remove(node);
                    // The agent restarted: its log starts again at 1.
                    let p = if p.next < since {
                        match crate::observe::page(socket, 0).await {
                            Ok(p) => p,
                            Err(_) => continue,
                        }
                    } else {
                        p
                    };
                    cursor.insert(node.clone(), p.next);
                    new.extend(crate::observe::named(node, p.flows));
                }
                Err(_) => {
                    flows
                        .lock()
                        .expect("flows")
                        .unreachable
                        .insert(node.clone());
                }
            }
        }
        crate::observe::sort_by_time(&mut new);
        {
            let mut f = flows.lock().expect("flows");
            for r in new {
                f.next += 1;
                let seq = f.next;
                f.kept.push_back((seq, r));
                if f.kept.len() > KEEP {
                    f.kept.pop_front();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn respond(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("response")
}

fn handle(
    req: &Request<Incoming>,
    flows: &Mutex<Flows>,
    cluster: Option<&str>,
    nodes: usize,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        "/app.js" => respond(StatusCode::OK, "text/javascript; charset=utf-8", APP),
        "/api/flows" => {
            let since: u64 = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("since="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let f = flows.lock().expect("flows");
            let page = Page {
                next: f.next,
                cluster,
                nodes,
                unreachable: f.unreachable.iter().cloned().collect(),
                flows: f
                    .kept
                    .iter()
                    .filter(|(seq, _)| *seq > since)
                    .map(|(_, r)| r)
                    .collect(),
            };
            let body = serde_json::to_vec(&page).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n",
        ),
    }
}

/// Serves the map on `listen` for the agents at `sockets` (node name, socket) until
/// interrupted; prints its URL first.
pub async fn run(
    cluster: Option<String>,
    sockets: Vec<(String, PathBuf)>,
    listen: SocketAddr,
) -> Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow!("--listen {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let flows = Arc::new(Mutex::new(Flows::default()));
    let nodes = sockets.len();
    tokio::spawn(collect(sockets, flows.clone()));
    println!("weir ui: http://{addr}/");
    let cluster: Arc<Option<String>> = Arc::new(cluster);
    loop {
        let (sock, _) = listener.accept().await?;
        let (flows, cluster) = (flows.clone(), cluster.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = handle(&req, &flows, cluster.as_deref(), nodes);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
    }
}
