//! The built-in echo server every pod runs on each of its containerPorts, whatever the
//! image: a TCP connection or a UDP datagram gets the pod's `namespace/name` back; an HTTP
//! `GET /clientip` answers the peer's `ip:port` (as agnhost's netexec does).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A port to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServePort {
    /// true for UDP, false for TCP.
    pub udp: bool,
    /// Port number.
    pub port: u16,
}

impl std::str::FromStr for ServePort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (proto, port) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected tcp:PORT or udp:PORT"))?;
        let port = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        match proto.to_ascii_lowercase().as_str() {
            "tcp" => Ok(ServePort { udp: false, port }),
            "udp" => Ok(ServePort { udp: true, port }),
            _ => Err(format!("{s:?}: protocol must be tcp or udp")),
        }
    }
}

impl std::fmt::Display for ServePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", if self.udp { "udp" } else { "tcp" }, self.port)
    }
}

/// How long a TCP server waits for the client to speak first before it sends the name
/// unasked (so that `nc HOST PORT` with no input still gets an answer).
const WAIT_FOR_CLIENT: Duration = Duration::from_millis(200);

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The reply to a request `req` (possibly empty) from `peer`.
pub fn reply(identity: &str, req: &[u8], peer: SocketAddr) -> Vec<u8> {
    let text = String::from_utf8_lossy(req);
    let first = text.lines().next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    if matches!(method, "GET" | "HEAD" | "POST" | "PUT")
        && parts.next().is_some_and(|v| v.starts_with("HTTP/"))
    {
        let body = if path.starts_with("/clientip") {
            canonical(peer).to_string()
        } else {
            identity.to_string()
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut out = head.into_bytes();
        if method != "HEAD" {
            out.extend_from_slice(body.as_bytes());
        }
        return out;
    }
    if first.trim() == "clientip" {
        return format!("{}\n", canonical(peer)).into_bytes();
    }
    if first.trim() == "who" {
        // `weir lab connect`: the identity and the client address as seen here.
        return format!("{identity} {}\n", canonical(peer)).into_bytes();
    }
    format!("{identity}\n").into_bytes()
}

async fn serve_tcp_conn(identity: Arc<String>, mut s: TcpStream, peer: SocketAddr) {
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(WAIT_FOR_CLIENT, s.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => return,
        Err(_) => 0,
    };
    if buf[..n].starts_with(b"stream\n") {
        // Long-lived mode: answer every line with the identity until the client closes.
        let _ = s.write_all(format!("{identity}\n").as_bytes()).await;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let lines = buf[..n].iter().filter(|b| **b == b'\n').count().max(1);
                    let out = format!("{identity}\n").repeat(lines);
                    if s.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = s.write_all(&reply(&identity, &buf[..n], peer)).await;
    let _ = s.shutdown().await;
}

/// Binds every port (dual-stack, `[::]`) and serves until the process ends. Returns once all
/// ports are bound, so the caller can report readiness.
pub async fn serve(identity: String, ports: &[ServePort]) -> std::io::Result<()> {
    let identity = Arc::new(identity);
    for p in ports {
        let addr: SocketAddr = SocketAddr::new("::".parse().expect("ip"), p.port);
        if p.udp {
            let sock = UdpSocket::bind(addr).await?;
            let id = identity.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                        continue;
                    };
                    let _ = sock.send_to(&reply(&id, &buf[..n], peer), peer).await;
                }
            });
        } else {
            let l = TcpListener::bind(addr).await?;
            let id = identity.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((s, peer)) = l.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve_tcp_conn(id.clone(), s, peer));
                }
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let peer: SocketAddr = "[::ffff:10.0.0.1]:5555".parse().unwrap();
        assert_eq!(reply("x/a", b"weir\n", peer), b"x/a\n");
        assert_eq!(reply("x/a", b"", peer), b"x/a\n");
        assert_eq!(reply("x/a", b"clientip\n", peer), b"10.0.0.1:5555\n");
        assert_eq!(reply("x/a", b"who\n", peer), b"x/a 10.0.0.1:5555\n");
        let http = String::from_utf8(reply(
            "x/a",
            b"GET /clientip HTTP/1.1\r\nHost: h\r\n\r\n",
            peer,
        ))
        .unwrap();
        assert!(http.starts_with("HTTP/1.1 200 OK"));
        assert!(http.ends_with("\r\n\r\n10.0.0.1:5555"));
        assert!(
            String::from_utf8(reply("x/a", b"GET / HTTP/1.0\r\n\r\n", peer))
                .unwrap()
                .ends_with("x/a")
        );
        assert_eq!(
            "udp:53".parse::<ServePort>().unwrap(),
            ServePort {
                udp: true,
                port: 53
            }
        );
    }

    #[tokio::test]
    async fn serves_tcp_and_udp_on_loopback() {
        // Ports 0 cannot be asked back, so pick free ones first.
        let t = std::net::TcpListener::bind("[::]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let u = std::net::UdpSocket::bind("[::]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        serve(
            "ns/p".into(),
            &[
                ServePort {
                    udp: false,
                    port: t,
                },
                ServePort { udp: true, port: u },
            ],
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", t)).await.unwrap();
        s.write_all(b"weir\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "ns/p\n");
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(("127.0.0.1", u)).await.unwrap();
        c.send(b"clientip\n").await.unwrap();
        let mut buf = [0u8; 100];
        let n = c.recv(&mut buf).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]).trim(),
            c.local_addr().unwrap().to_string()
        );
    }
}
