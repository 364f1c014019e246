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
}

/// The outcome of one attempt: who answered, or the error's name (`ECONNREFUSED`,
/// `timeout`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// Identity (`namespace/name`) of the responder.
    pub responder: Option<String>,
    /// Error name.
    pub error: Option<String>,
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
}

impl ConnectSummary {
    /// Sums up outcomes.
    pub fn from_outcomes(outcomes: &[Outcome]) -> Self {
        let mut s = ConnectSummary {
            attempts: outcomes.len(),
            ..Default::default()
        };
        for o in outcomes {
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

async fn attempt_tcp(to: SocketAddr) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(to)
        .await
        .map_err(|e| error_name(&e))?;
    s.write_all(b"weir\n").await.map_err(|e| error_name(&e))?;
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

async fn attempt_udp(to: SocketAddr) -> Result<String, String> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    let s = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| error_name(&e))?;
    s.connect(to).await.map_err(|e| error_name(&e))?;
    s.send(b"weir\n").await.map_err(|e| error_name(&e))?;
    let mut buf = vec![0u8; 2048];
    let n = s.recv(&mut buf).await.map_err(|e| error_name(&e))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// One attempt with a timeout.
pub async fn attempt(to: SocketAddr, udp: bool, timeout: Duration) -> Outcome {
    let r = if udp {
        tokio::time::timeout(timeout, attempt_udp(to)).await
    } else {
        tokio::time::timeout(timeout, attempt_tcp(to)).await
    };
    match r {
        Ok(Ok(who)) => Outcome {
            responder: Some(who),
            error: None,
        },
        Ok(Err(e)) => Outcome {
            responder: None,
            error: Some(e),
        },
        Err(_) => Outcome {
            responder: None,
            error: Some("timeout".into()),
        },
    }
}

/// Runs every attempt of `spec`, `spec.parallel` at a time; outcomes in target order.
pub async fn run(spec: &AttemptSpec) -> Vec<Outcome> {
    use futures::stream::StreamExt;
    let timeout = Duration::from_millis(spec.timeout_ms);
    futures::stream::iter(spec.targets.iter().copied())
        .map(|t| attempt(t, spec.udp, timeout))
        .buffered(spec.parallel.max(1))
        .collect()
        .await
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
            targets: vec![SocketAddr::from(([127, 0, 0, 1], port)); 5],
            udp: false,
            timeout_ms: 1000,
            parallel: 2,
        })
        .await;
        let s = ConnectSummary::from_outcomes(&outs);
        assert_eq!((s.attempts, s.ok, s.failed), (5, 5, 0));
        assert_eq!(s.responders["x/a"], 5);
    }
}
