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
    /// The agent took the request but the exchange failed (a timeout, a broken answer).
    Failed(String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Down(e) => write!(f, "the weir agent is not reachable: {e}"),
            AgentError::Refused(code, msg) => write!(f, "the weir agent answered {code}: {msg}"),
            AgentError::Failed(e) => write!(f, "the request to the weir agent failed: {e}"),
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
    // Only a failed connect means the agent is not there; after that, it is.
    let failed = |e: std::io::Error| AgentError::Failed(format!("{}: {e}", socket.display()));
    let mut s = UnixStream::connect(socket).map_err(down)?;
    s.set_read_timeout(Some(timeout)).map_err(failed)?;
    s.set_write_timeout(Some(timeout)).map_err(failed)?;
    let body = body
        .map(|b| serde_json::to_vec(b).expect("json"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: weir-agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(failed)?;
    s.write_all(&body).map_err(failed)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(failed)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, payload) = match split {
        Some(i) => (&raw[..i], &raw[i + 4..]),
        None => (&raw[..], &raw[raw.len()..]),
    };
    let head = String::from_utf8_lossy(head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| AgentError::Failed(format!("{}: no HTTP answer", socket.display())))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        String::from_utf8_lossy(&dechunk(payload)).into_owned()
    } else {
        String::from_utf8_lossy(payload).into_owned()
    };
    let v: Value = serde_json::from_str(&payload).unwrap_or(Value::String(payload.clone()));
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        let msg = v["error"].as_str().map(String::from).unwrap_or(payload);
        Err(AgentError::Refused(status, msg))
    }
}

/// The body of a chunked transfer (RFC 9112 section 7.1), as bytes.
fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..i]);
        let size = size
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let Ok(n) = usize::from_str_radix(&size, 16) else {
            break;
        };
        let rest = &s[i + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined_as_bytes() {
        // "é" is two bytes (c3 a9): the first chunk ends inside the character.
        let raw = b"3\r\n{\"\xc3\r\n4\r\n\xa9\": \r\n2\r\n1}\r\n0\r\n\r\n";
        assert_eq!(super::dechunk(raw), "{\"é\": 1}".as_bytes());
    }
}
