//! The node-local introspection API: HTTP over a unix socket (mode 0600), JSON answers.
//! `GET /status` (sync state), `GET /lb` (frontends, backends, affinity, counters,
//! programs, maps), `GET /datapath` (the per-packet datapath: endpoints, devices, counters by
//! reason, programs, maps), `GET /explain?from=IP:PORT&to=IP:PORT&protocol=tcp` (a synthetic
//! packet through the tc programs, changing nothing), `GET /policy` (NetworkPolicy status),
//! `GET /flows?since=SEQ[&last=N]` (the flows after SEQ, or the last N of them), `GET|POST|DELETE
//! /prefilter?cidr=...` (the XDP prefilter's deny list).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::Shared;

fn json(code: StatusCode, v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("json"))))
        .expect("response")
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    if req.uri().path() == "/endpoints" || req.uri().path() == "/cni" {
        return Ok(endpoints(&shared, req).await);
    }
    Ok(match req.uri().path() {
        "/prefilter" => prefilter(&shared, &method, req.uri().query().unwrap_or("")).await,
        "/dataplane" => dataplane(&shared, &method, req.uri().query().unwrap_or("")).await,
        "/status" => {
            let st = shared.status.lock().expect("status").clone();
            let s2 = shared.clone();
            let st = tokio::task::spawn_blocking(move || {
                let mut st = st;
                if let Some(sw) = st.switch.as_mut() {
                    crate::switch::count_draining(&s2, sw);
                }
                st.dsr_draining = crate::switch::count_dsr_draining(&s2);
                st
            })
            .await
            .expect("draining count");
            json(StatusCode::OK, &st)
        }
        "/lb" => {
            let dump = shared.dataplane.lock().expect("dataplane").dump();
            match dump {
                Ok(d) => json(StatusCode::OK, &d),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e.to_string()}),
                ),
            }
        }
        "/policy" => json(
            StatusCode::OK,
            &*shared.policy.lock().expect("policy report"),
        ),
        "/flows" => {
            let query = req.uri().query().unwrap_or("");
            let since = query_values(query, "since")
                .next()
                .map(|v| v.parse::<u64>());
            let last = query_values(query, "last")
                .next()
                .map(|v| v.parse::<usize>());
            match (&shared.pods, since, last) {
                (None, _, _) => json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "this agent runs no per-packet datapath"}),
                ),
                (_, Some(Err(_)), _) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "since: not a sequence number"}),
                ),
                (_, _, Some(Err(_))) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "last: not a number of flows"}),
                ),
                (Some(p), since, last) => {
                    let mut page = shared.flows.lock().expect("flow log").since_last(
                        since.and_then(Result::ok).unwrap_or(0),
                        last.and_then(Result::ok),
                    );
                    match p
                        .dataplane
                        .lock()
                        .expect("pods")
                        .datapath()
                        .metric_packets(weir_bpf::datapath::weir_reason::REASON_EVENT_LOST)
                    {
                        Ok(n) => {
                            page.events_lost = n;
                            json(StatusCode::OK, &page)
                        }
                        Err(e) => json(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &serde_json::json!({"error": e.to_string()}),
                        ),
                    }
                }
            }
        }
        "/datapath" => match &shared.pods {
            None => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "this agent runs no per-packet datapath"}),
            ),
            Some(p) => {
                let status = p.status.lock().expect("pod status").clone();
                match p.dataplane.lock().expect("pods").dump() {
                    Ok(d) => json(
                        StatusCode::OK,
                        &serde_json::json!({"status": status, "dump": d}),
                    ),
                    Err(e) => json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &serde_json::json!({"error": e.to_string()}),
                    ),
                }
            }
        },
        "/explain" => {
            let query = req.uri().query().unwrap_or("");
            let q = |k: &str| query_values(query, k).last();
            let parse = |k: &str| -> Result<std::net::SocketAddr, String> {
                let v = q(k).ok_or(format!("{k}: missing"))?;
                v.parse().map_err(|_| {
                    format!("{k}: {v:?} is not an ADDRESS:PORT (IPv6: [ADDRESS]:PORT)")
                })
            };
            let (from, to) = match (parse("from"), parse("to")) {
                (Ok(f), Ok(t)) if f.is_ipv4() != t.is_ipv4() => {
                    let e = format!("from {f} and to {t}: not of one address family");
                    (Err(e.clone()), Err(e))
                }
                pair => pair,
            };
            let tcp = match q("protocol").map(|p| p.to_ascii_lowercase()).as_deref() {
                None | Some("tcp") => Ok(true),
                Some("udp") => Ok(false),
                Some(other) => Err(format!("protocol: {other:?} is not tcp or udp")),
            };
            match (&shared.pods, from, to, tcp) {
                (None, ..) => json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "this agent runs no per-packet datapath"}),
                ),
                (Some(p), Ok(from), Ok(to), Ok(tcp)) => {
                    let p = p.clone();
                    match tokio::task::spawn_blocking(move || {
                        crate::pods::explain(&p, from, to, tcp)
                    })
                    .await
                    {
                        Ok(Ok(e)) => json(StatusCode::OK, &e),
                        Ok(Err(e)) => json(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &serde_json::json!({"error": e}),
                        ),
                        Err(e) => json(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &serde_json::json!({"error": e.to_string()}),
                        ),
                    }
                }
                (_, Err(e), ..) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
                    json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e}))
                }
            }
        }
        other => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no such path {other}")}),
        ),
    })
}

/// The CNI plugin's requests (see [`crate::cni`]).
async fn endpoints(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let err = |code: u16, e: String| {
        json(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &serde_json::json!({"error": e}),
        )
    };
    if req.uri().path() == "/cni" {
        return json(
            StatusCode::OK,
            &crate::cni::node_net(&shared.nodes, &shared.node_name),
        );
    }
    let Some(pods) = shared.pods.clone() else {
        return err(404, "this agent runs no per-packet datapath".into());
    };
    let method = req.method().clone();
    let id = query_values(req.uri().query().unwrap_or(""), "id").next();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return err(400, e.to_string()),
    };
    let result = match method {
        http::Method::GET => Ok(crate::cni::list(&pods)),
        http::Method::PUT | http::Method::POST => {
            tokio::task::spawn_blocking(move || crate::cni::put(&pods, &body))
                .await
                .unwrap_or_else(|e| Err((500, e.to_string())))
        }
        http::Method::DELETE => match id {
            Some(id) => tokio::task::spawn_blocking(move || crate::cni::delete(&pods, &id))
                .await
                .unwrap_or_else(|e| Err((500, e.to_string()))),
            None => Err((400, "id: missing".into())),
        },
        m => Err((405, format!("{m} is not allowed on /endpoints"))),
    };
    match result {
        Ok(v) => json(StatusCode::OK, &v),
        Err((code, e)) => err(code, e),
    }
}

/// The values of `key` in a query string, unescaped, in order.
fn query_values<'a>(query: &'a str, key: &'a str) -> impl Iterator<Item = String> + 'a {
    query
        .split('&')
        .filter_map(move |kv| kv.split_once('=').filter(|(k, _)| *k == key))
        .map(|(_, v)| unescape(v))
}

/// Decodes the %XX escapes of a query value.
fn unescape(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(c)) => {
                out.push(c);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /dataplane` (the dataplane and the last switch), `POST /dataplane?to=KIND` (switch
/// this node, answered with the switch's report once it is done or rolled back).
async fn dataplane(
    shared: &Arc<Shared>,
    method: &http::Method,
    query: &str,
) -> Response<Full<Bytes>> {
    let err = |code, e: String| json(code, &serde_json::json!({ "error": e }));
    if method == http::Method::GET {
        let st = shared.status.lock().expect("status");
        return json(
            StatusCode::OK,
            &serde_json::json!({"dataplane": st.dataplane, "switch": st.switch}),
        );
    }
    if method != http::Method::POST {
        return err(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST".into());
    }
    let Some(to) = query_values(query, "to").next() else {
        return err(
            StatusCode::BAD_REQUEST,
            "POST /dataplane needs ?to=ebpf|nftables|iptables".into(),
        );
    };
    let to: weir_dataplane::DataplaneKind = match to.parse() {
        Ok(k) => k,
        Err(e) => return err(StatusCode::BAD_REQUEST, e),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    {
        let mut pending = shared.switch.lock().expect("switch");
        if pending.is_some() {
            return err(
                StatusCode::CONFLICT,
                "a switch is already under way on this node".into(),
            );
        }
        *pending = Some(crate::switch::SwitchRequest {
            to,
            fail_after: query_values(query, "fail-after").next(),
            reply: tx,
        });
    }
    shared.switch_wake.notify_one();
    match tokio::time::timeout(std::time::Duration::from_secs(300), rx).await {
        Ok(Ok(report)) if report.error.is_none() => json(StatusCode::OK, &report),
        Ok(Ok(report)) => json(StatusCode::INTERNAL_SERVER_ERROR, &report),
        _ => err(
            StatusCode::GATEWAY_TIMEOUT,
            "the switch did not finish within 300 s".into(),
        ),
    }
}

/// `GET /prefilter` (the deny list with counters), `POST /prefilter?cidr=A,B` (add),
/// `DELETE /prefilter?cidr=A,B` (remove): all of the prefixes or none.
async fn prefilter(
    shared: &Arc<Shared>,
    method: &http::Method,
    query: &str,
) -> Response<Full<Bytes>> {
    let err = |code, e: String| json(code, &serde_json::json!({ "error": e }));
    let Some(pods) = shared.pods.clone() else {
        return err(
            StatusCode::NOT_FOUND,
            "this agent runs no per-packet datapath".into(),
        );
    };
    if method == http::Method::GET {
        return match crate::pods::prefilter_list(&pods) {
            Ok(l) => json(StatusCode::OK, &l),
            Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
    }
    let cidrs: Vec<String> = query_values(query, "cidr")
        .flat_map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|c| !c.is_empty())
        .collect();
    let nets = match crate::pods::parse_prefixes(&cidrs) {
        Ok(n) => n,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("cidr: {e}")),
    };
    let result = if method == http::Method::POST {
        tokio::task::spawn_blocking(move || {
            crate::pods::prefilter_add(&pods, nets)
                .map(|added| serde_json::json!({ "added": added }))
        })
        .await
    } else if method == http::Method::DELETE {
        tokio::task::spawn_blocking(move || {
            let n = nets.clone();
            crate::pods::prefilter_delete(&pods, nets).map(|()| serde_json::json!({ "deleted": n }))
        })
        .await
    } else {
        return err(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} /prefilter: use GET, POST or DELETE"),
        );
    };
    match result {
        Ok(Ok(v)) => json(StatusCode::OK, &v),
        Ok(Err(e)) if e.contains("is not in the prefilter") => err(StatusCode::NOT_FOUND, e),
        Ok(Err(e)) => err(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Serves the API on `path` until the process ends.
pub async fn serve(path: PathBuf, shared: Arc<Shared>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (sock, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
    }
}

/// A client call: GET `path` on the agent socket, returning the JSON body.
pub async fn get(socket: &Path, path: &str) -> std::io::Result<serde_json::Value> {
    request(socket, "GET", path).await
}

/// A client call: `method` `path` on the agent socket, returning the JSON body (errors are
/// `{"error": ...}` bodies).
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
) -> std::io::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: agent\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    serde_json::from_str(body)
        .map_err(|e| std::io::Error::other(format!("bad answer from {}: {e}", socket.display())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_unescaped() {
        assert_eq!(
            super::unescape("10.0.0.0%2F8%2C2001%3adb8::%2f32"),
            "10.0.0.0/8,2001:db8::/32"
        );
        assert_eq!(super::unescape("100%"), "100%");
        assert_eq!(super::unescape("%zz"), "%zz");
    }
}
