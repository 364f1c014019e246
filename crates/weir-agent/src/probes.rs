//! The agent's HTTP endpoints on TCP, for kubelet probes and Prometheus: `/healthz` (the
//! process is alive and serving), `/readyz` (the initial lists are in and the datapath has
//! been applied from them: Services, the pod datapath and NetworkPolicy), `/metrics` (see
//! [`crate::metrics`]). Each address given is served with all three paths.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::Shared;

/// Whether the agent is ready; otherwise what it is still waiting for.
pub fn ready(shared: &Shared) -> Result<(), String> {
    let st = shared.status.lock().expect("status").clone();
    if !st.synced {
        return Err(match st.last_error {
            Some(e) => format!("services: the last apply failed: {e}"),
            None => "services: waiting for the initial lists of Services and EndpointSlices".into(),
        });
    }
    if let Some(p) = &shared.pods {
        if let Some(e) = &p.status.lock().expect("pod status").last_error {
            return Err(format!("endpoints: the last sync failed: {e}"));
        }
        let policy = shared.policy.lock().expect("policy");
        if !policy.synced {
            return Err(match &policy.last_error {
                Some(e) => format!("policy: {e}"),
                None => {
                    "policy: waiting for the initial lists of NetworkPolicies, Pods and Namespaces"
                        .into()
                }
            });
        }
    }
    Ok(())
}

fn text(code: StatusCode, body: String, content_type: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => match ready(&shared) {
            Ok(()) => text(StatusCode::OK, "ok\n".into(), PLAIN),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                PLAIN,
            ),
        },
        "/metrics" => {
            let body = tokio::task::spawn_blocking(move || crate::metrics::encode(shared))
                .await
                .unwrap_or_default();
            text(
                StatusCode::OK,
                body,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!("no such path {other}\n"),
            PLAIN,
        ),
    })
}

/// Binds `addr` (failing at once when it cannot) and serves it in the background.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("listening on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(shared.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}
