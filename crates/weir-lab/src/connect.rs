//! Traffic from inside a pod (or node, or the external host): fresh TCP connections or UDP
//! request/reply exchanges, each answered by the target's echo server with its identity.
//! The attempts run in a helper process that has entered the source's network namespace and
//! cgroup, so that they meet the same kernel hooks as the pod's own traffic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the helper is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptSpec {
    /// One entry per attempt.
    pub targets: Vec<SocketAddr>,
    /// UDP (connected socket) instead of TCP.
    pub udp: bool,
    /// Timeout per attempt, in milliseconds.
    pub timeout_ms: u64,
    /// How many attempts run at once.
    pub parallel: usize,
    /// Hold mode: instead of fresh connections, keep one connection (to `targets[0]`) and
    /// exchange a message every 100 ms for this many milliseconds, reconnecting after errors.
    #[serde(default)]
    pub hold_ms: u64,
    /// A name to resolve (through `resolv_conf`) before each attempt: the targets' addresses
    /// are then replaced by its first address (their ports kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve: Option<String>,
    /// The resolver configuration (resolv.conf text) for `resolve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
    /// Paced: attempt `i` starts `i x interval_us` microseconds after the first, whatever
    /// the others are doing (`parallel` is then no limit); 0: as fast as `parallel` allows.
    #[serde(default)]
    pub interval_us: u64,
}

/// The outcome of one attempt: who answered, or the error's name (`ECONNREFUSED`,
/// `timeout`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// Identity (`namespace/name`) of the responder.
    pub responder: Option<String>,
    /// Error name.
    pub error: Option<String>,
    /// The peer address the socket reported (getpeername), when connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The client's address as the responder saw it (`ip:port`), for fresh attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_as: Option<String>,
}

/// The summary `weir lab connect -o json` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectSummary {
    /// Attempts made.
    pub attempts: usize,
    /// Attempts answered.
    pub ok: usize,
    /// Attempts that failed.
    pub failed: usize,
    /// Failures by error name.
    pub errors: BTreeMap<String, usize>,
    /// Answers by responder.
    pub responders: BTreeMap<String, usize>,
    /// Peer addresses the sockets reported (getpeername): the address dialled, when the
    /// socket layer translates transparently.
    pub peers: BTreeMap<String, usize>,
    /// The client's IP as the responders saw it (after any SNAT or masquerading).
    #[serde(default)]
    pub seen_as: BTreeMap<String, usize>,
    /// Hold mode: how many times the connection was re-established after an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnects: Option<usize>,
}

impl ConnectSummary {
    /// Sums up outcomes.
    pub fn from_outcomes(outcomes: &[Outcome]) -> Self {
        let mut s = ConnectSummary {
            attempts: outcomes.len(),
            ..Default::default()
        };
        for o in outcomes {
            if let Some(p) = &o.peer {
                *s.peers.entry(p.clone()).or_default() += 1;
            }
            if let Some(a) = o
                .seen_as
                .as_ref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                *s.seen_as.entry(a.ip().to_string()).or_default() += 1;
            }
            match (&o.responder, &o.error) {
                (Some(r), None) => {
                    s.ok += 1;
                    *s.responders.entry(r.clone()).or_default() += 1;
                }
                (_, e) => {
                    s.failed += 1;
                    *s.errors
                        .entry(e.clone().unwrap_or_else(|| "unknown".into()))
                        .or_default() += 1;
                }
            }
        }
        s
    }
}

fn error_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None if e.kind() == std::io::ErrorKind::TimedOut => "timeout".into(),
        None => e.kind().to_string(),
    }
}

fn canonical(a: SocketAddr) -> String {
    SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
}

fn unspecified(to: SocketAddr) -> SocketAddr {
    if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    }
}

async fn attempt_tcp(to: SocketAddr, peer: &mut Option<String>) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(to)
        .await
        .map_err(|e| error_name(&e))?;
    *peer = s.peer_addr().ok().map(canonical);
    s.write_all(b"who\n").await.map_err(|e| error_name(&e))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| error_name(&e))?;
    let out = out.trim().to_string();
    if out.is_empty() {
        Err("empty reply".into())
    } else {
        Ok(out)
    }
}

async fn attempt_udp(to: SocketAddr, peer: &mut Option<String>) -> Result<String, String> {
    let s = tokio::net::UdpSocket::bind(unspecified(to))
        .await
        .map_err(|e| error_name(&e))?;
    s.connect(to).await.map_err(|e| error_name(&e))?;
    *peer = s.peer_addr().ok().map(canonical);
    s.send(b"who\n").await.map_err(|e| error_name(&e))?;
    let mut buf = vec![0u8; 2048];
    let n = s.recv(&mut buf).await.map_err(|e| error_name(&e))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// One attempt with a timeout.
pub async fn attempt(to: SocketAddr, udp: bool, timeout: Duration) -> Outcome {
    let mut peer = None;
    let r = if udp {
        tokio::time::timeout(timeout, attempt_udp(to, &mut peer)).await
    } else {
        tokio::time::timeout(timeout, attempt_tcp(to, &mut peer)).await
    };
    match r {
        Ok(Ok(reply)) => {
            // "identity client-address" (an older echo server answers the identity alone).
            let (who, seen_as) = match reply.split_once(' ') {
                Some((w, a)) => (w.to_string(), Some(a.to_string())),
                None => (reply, None),
            };
            Outcome {
                responder: Some(who),
                error: None,
                peer,
                seen_as,
            }
        }
        Ok(Err(e)) => Outcome {
            responder: None,
            error: Some(e),
            peer,
            seen_as: None,
        },
        Err(_) => Outcome {
            responder: None,
            error: Some("timeout".into()),
            peer,
            seen_as: None,
        },
    }
}

enum Conn {
    Tcp(tokio::io::BufReader<tokio::net::TcpStream>),
    Udp(tokio::net::UdpSocket),
}

async fn open(to: SocketAddr, udp: bool) -> Result<(Conn, Option<String>), String> {
    if udp {
        let s = tokio::net::UdpSocket::bind(unspecified(to))
            .await
            .map_err(|e| error_name(&e))?;
        s.connect(to).await.map_err(|e| error_name(&e))?;
        let peer = s.peer_addr().ok().map(canonical);
        Ok((Conn::Udp(s), peer))
    } else {
        let mut s = tokio::net::TcpStream::connect(to)
            .await
            .map_err(|e| error_name(&e))?;
        let peer = s.peer_addr().ok().map(canonical);
        s.write_all(b"stream\n").await.map_err(|e| error_name(&e))?;
        let mut r = tokio::io::BufReader::new(s);
        let mut first = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut r, &mut first)
            .await
            .map_err(|e| error_name(&e))?;
        Ok((Conn::Tcp(r), peer))
    }
}

async fn exchange(c: &mut Conn) -> Result<String, String> {
    match c {
        Conn::Udp(s) => {
            s.send(b"weir\n").await.map_err(|e| error_name(&e))?;
            let mut buf = vec![0u8; 2048];
            let n = s.recv(&mut buf).await.map_err(|e| error_name(&e))?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        }
        Conn::Tcp(r) => {
            r.get_mut()
                .write_all(b"weir\n")
                .await
                .map_err(|e| error_name(&e))?;
            let mut line = String::new();
            let n = tokio::io::AsyncBufReadExt::read_line(r, &mut line)
                .await
                .map_err(|e| error_name(&e))?;
            if n == 0 {
                return Err("closed by peer".into());
            }
            Ok(line.trim().to_string())
        }
    }
}

/// Hold mode: one connection, a message every 100 ms, reconnect after an error.
/// Returns the outcomes and the number of reconnects.
pub async fn hold(
    to: SocketAddr,
    udp: bool,
    timeout: Duration,
    duration: Duration,
) -> (Vec<Outcome>, usize) {
    let deadline = tokio::time::Instant::now() + duration;
    let mut outcomes = Vec::new();
    let mut conn: Option<(Conn, Option<String>)> = None;
    let mut reconnects = 0;
    let mut opened = 0;
    while tokio::time::Instant::now() < deadline {
        if conn.is_none() {
            match tokio::time::timeout(timeout, open(to, udp)).await {
                Ok(Ok(c)) => {
                    if opened > 0 {
                        reconnects += 1;
                    }
                    opened += 1;
                    conn = Some(c);
                }
                Ok(Err(e)) => outcomes.push(Outcome {
                    responder: None,
                    error: Some(e),
                    peer: None,
                    seen_as: None,
                }),
                Err(_) => outcomes.push(Outcome {
                    responder: None,
                    error: Some("timeout".into()),
                    peer: None,
                    seen_as: None,
                }),
            }
        }
        if let Some((c, peer)) = conn.as_mut() {
            let peer = peer.clone();
            match tokio::time::timeout(timeout, exchange(c)).await {
                Ok(Ok(who)) => outcomes.push(Outcome {
                    responder: Some(who),
                    error: None,
                    peer,
                    seen_as: None,
                }),
                Ok(Err(e)) => {
                    outcomes.push(Outcome {
                        responder: None,
                        error: Some(e),
                        peer,
                        seen_as: None,
                    });
                    conn = None;
                }
                Err(_) => {
                    outcomes.push(Outcome {
                        responder: None,
                        error: Some("timeout".into()),
                        peer,
                        seen_as: None,
                    });
                    conn = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (outcomes, reconnects)
}

/// What the helper prints: the outcomes, and in hold mode the reconnect count.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttemptReport {
    /// One per attempt (or per message in hold mode).
    pub outcomes: Vec<Outcome>,
    /// Hold mode: reconnects after errors.
    pub reconnects: Option<usize>,
}

/// Runs `spec`: fresh attempts, or hold mode when `hold_ms` is set.
pub async fn execute(spec: &AttemptSpec) -> AttemptReport {
    if spec.hold_ms > 0 {
        let Some(to) = spec.targets.first() else {
            return AttemptReport::default();
        };
        let (outcomes, reconnects) = hold(
            *to,
            spec.udp,
            Duration::from_millis(spec.timeout_ms),
            Duration::from_millis(spec.hold_ms),
        )
        .await;
        return AttemptReport {
            outcomes,
            reconnects: Some(reconnects),
        };
    }
    AttemptReport {
        outcomes: run(spec).await,
        reconnects: None,
    }
}

/// Runs every attempt of `spec`, `spec.parallel` at a time; outcomes in target order.
pub async fn run(spec: &AttemptSpec) -> Vec<Outcome> {
    use futures::stream::StreamExt;
    let timeout = Duration::from_millis(spec.timeout_ms);
    let start = tokio::time::Instant::now();
    let interval = Duration::from_micros(spec.interval_us);
    // Paced attempts may overlap as much as the pace and their timeouts make them.
    let parallel = if spec.interval_us > 0 {
        spec.targets.len()
    } else {
        spec.parallel
    };
    futures::stream::iter(spec.targets.iter().copied().enumerate())
        .map(|(i, t)| async move {
            if spec.interval_us > 0 {
                tokio::time::sleep_until(start + interval * i as u32).await;
            }
            let t = match &spec.resolve {
                None => t,
                Some(name) => match lookup(
                    name,
                    spec.resolv_conf.as_deref().unwrap_or_default(),
                    timeout,
                )
                .await
                {
                    Some(ip) => SocketAddr::new(ip, t.port()),
                    None => {
                        return Outcome {
                            responder: None,
                            error: Some("ENOTFOUND".into()),
                            peer: None,
                            seen_as: None,
                        }
                    }
                },
            };
            attempt(t, spec.udp, timeout).await
        })
        .buffered(parallel.max(1))
        .collect()
        .await
}

/// Resolves `name` as a resolver configured by `resolv_conf` would (search path, ndots), with
/// no cache: its first address.
pub async fn lookup(name: &str, resolv_conf: &str, timeout: Duration) -> Option<std::net::IpAddr> {
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let (config, mut opts) = hickory_resolver::system_conf::parse_resolv_conf(resolv_conf).ok()?;
    opts.cache_size = 0;
    opts.timeout = timeout;
    let resolver =
        hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .ok()?;
    let found = tokio::time::timeout(timeout, resolver.lookup_ip(name))
        .await
        .ok()?
        .ok()?;
    found.iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_and_answered() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let o = attempt(
            SocketAddr::from(([127, 0, 0, 1], port)),
            false,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(o.error.as_deref(), Some("ECONNREFUSED"));
        crate::echo::serve("x/a".into(), &[crate::echo::ServePort { udp: false, port }])
            .await
            .unwrap();
        let outs = run(&AttemptSpec {
            hold_ms: 0,
            targets: vec![SocketAddr::from(([127, 0, 0, 1], port)); 5],
            udp: false,
            timeout_ms: 1000,
            parallel: 2,
            resolve: None,
            resolv_conf: None,
            interval_us: 0,
        })
        .await;
        let s = ConnectSummary::from_outcomes(&outs);
        assert_eq!((s.attempts, s.ok, s.failed), (5, 5, 0));
        assert_eq!(s.responders["x/a"], 5);
        // Paced: 10 attempts at 100 per second take about 90 ms from first to last start.
        let started = std::time::Instant::now();
        let outs = run(&AttemptSpec {
            hold_ms: 0,
            targets: vec![SocketAddr::from(([127, 0, 0, 1], port)); 10],
            udp: false,
            timeout_ms: 1000,
            parallel: 1,
            resolve: None,
            resolv_conf: None,
            interval_us: 10_000,
        })
        .await;
        assert_eq!(ConnectSummary::from_outcomes(&outs).ok, 10);
        assert!(started.elapsed() >= Duration::from_millis(90));
    }
}
