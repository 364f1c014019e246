//! Health-check node ports, as kube-proxy serves them: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP listener on its `healthCheckNodePort` answers
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N}` with 200 when this node has
//! ready endpoints of the Service, 503 when it has none, so that an external load balancer
//! only sends to nodes that can serve.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_control::lb::HealthCheck;

type Checks = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The listeners of one node.
pub struct HealthServer {
    netns: Option<PathBuf>,
    checks: Checks,
    tasks: HashMap<u16, tokio::task::JoinHandle<()>>,
}

/// Binds a TCP listener on `port` of every address (IPv6 and IPv4), in network namespace
/// `netns` when given (a thread enters it; the socket stays in it).
fn bind_in(netns: Option<&Path>, port: u16) -> std::io::Result<std::net::TcpListener> {
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            let f = std::fs::File::open(&ns)?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| std::io::Error::other(format!("entering {}: {e}", ns.display())))?;
        }
        let l = std::net::TcpListener::bind(("::", port))
            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| std::io::Error::other("binding thread panicked"))?
}

/// The answer for `port`: status code and JSON body.
fn answer(checks: &Checks, port: u16) -> (u16, String) {
    let c = checks.lock().expect("checks").get(&port).cloned();
    match c {
        Some(c) => (
            if c.local_endpoints > 0 { 200 } else { 503 },
            serde_json::json!({
                "service": {"namespace": c.namespace, "name": c.name},
                "localEndpoints": c.local_endpoints,
            })
            .to_string(),
        ),
        None => (
            503,
            serde_json::json!({"error": "no such health check"}).to_string(),
        ),
    }
}

async fn serve(listener: tokio::net::TcpListener, port: u16, checks: Checks) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let checks = checks.clone();
        tokio::spawn(async move {
            // Read the request head (or give up after a second); any path gets the answer.
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            let (code, body) = answer(&checks, port);
            let reason = if code == 200 {
                "OK"
            } else {
                "Service Unavailable"
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

impl HealthServer {
    /// A server whose listeners live in `netns` (the agent's own namespace when None).
    pub fn new(netns: Option<PathBuf>) -> Self {
        HealthServer {
            netns,
            checks: Arc::new(Mutex::new(BTreeMap::new())),
            tasks: HashMap::new(),
        }
    }

    /// Serves exactly `want`: new ports get a listener, gone ones lose theirs, counts are
    /// updated in place. Returns the ports that could not be bound, with the reason.
    pub fn update(&mut self, want: BTreeMap<u16, HealthCheck>) -> Vec<String> {
        let mut errors = Vec::new();
        let gone: Vec<u16> = self
            .tasks
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(t) = self.tasks.remove(&p) {
                t.abort();
            }
        }
        for (port, c) in &want {
            if self.tasks.contains_key(port) {
                continue;
            }
            match bind_in(self.netns.as_deref(), *port).and_then(tokio::net::TcpListener::from_std)
            {
                Ok(l) => {
                    let t = tokio::spawn(serve(l, *port, self.checks.clone()));
                    self.tasks.insert(*port, t);
                }
                Err(e) => errors.push(format!(
                    "health check port {port} of {}/{}: {e}",
                    c.namespace, c.name
                )),
            }
        }
        *self.checks.lock().expect("checks") = want;
        errors
    }
}
