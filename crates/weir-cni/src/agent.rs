//! The plugin's side of the weir agent's API: plain HTTP/1.1 requests over the agent's unix
//! socket (`Connection: close`, one request per connection), so the plugin stays a small
//! binary without an async runtime.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// What a request to the agent came to.
#[derive(Debug)]
pub enum AgentError {
    /// Nobody answers on the socket: the agent is not running.
    Down(String),
    /// The agent answered with an error status.
    Refused(u16, String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Down(e) => write!(f, "the weir agent is not reachable: {e}"),
            AgentError::Refused(code, msg) => write!(f, "the weir agent answered {code}: {msg}"),
        }
    }
}

/// Sends `method path` with an optional JSON body; returns the JSON answer of a 2xx status.
/// `timeout` bounds the whole exchange (ADD waits while the agent attaches programs).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value, AgentError> {
    let down = |e: std::io::Error| AgentError::Down(format!("{}: {e}", socket.display()));
    let mut s = UnixStream::connect(socket).map_err(down)?;
    s.set_read_timeout(Some(timeout)).map_err(down)?;
    s.set_write_timeout(Some(timeout)).map_err(down)?;
    let body = body
        .map(|b| serde_json::to_vec(b).expect("json"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: weir-agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(down)?;
    s.write_all(&body).map_err(down)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(down)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| AgentError::Down(format!("{}: no HTTP answer", socket.display())))?;
    let payload = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload)
    } else {
        payload.to_string()
    };
    let v: Value = serde_json::from_str(&payload).unwrap_or(Value::String(payload.clone()));
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        let msg = v["error"].as_str().map(String::from).unwrap_or(payload);
        Err(AgentError::Refused(status, msg))
    }
}

/// The body of a chunked transfer.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
