//! Serving the API: a loopback TCP listener with TLS, or a unix socket; plus the background
//! task that finishes graceful deletions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::http::Api;
use crate::store::{Store, StoreConfig};

/// Where the API server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A loopback TCP address (`127.0.0.1:6443`, `[::1]:6443`; port 0 picks one).
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>()
            .map(Listen::Tcp)
            .map_err(|_| format!("{s:?} is neither ADDRESS:PORT nor unix:PATH"))
    }
}

/// PEM files for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// API server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory of the database.
    pub data_dir: PathBuf,
    /// Listening address.
    pub listen: Listen,
    /// TLS; required for kubectl to send a bearer token.
    pub tls: Option<TlsFiles>,
    /// Bearer token every request must carry (but /healthz, /readyz, /livez and /version).
    pub token: Option<String>,
    /// Store settings (service CIDRs, NodePort range, watch history).
    pub store: StoreConfig,
    /// Interval of BOOKMARK events on idle watches.
    pub bookmark_interval: Duration,
    /// Which kinds are served (`--runtime-config`; everything by default).
    pub runtime_config: crate::RuntimeConfig,
}

/// The API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address is not loopback.
    #[error("refusing to listen on {0}: the API server listens on loopback addresses or unix sockets only")]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS files are unusable.
    #[error("loading TLS files: {0}")]
    Tls(String),
    /// The store could not be opened.
    #[error("opening the store in {dir}: {source}")]
    Store {
        /// Data directory.
        dir: PathBuf,
        /// Cause.
        source: crate::error::ApiError,
    },
}

/// A running API server. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    /// The TCP address bound (with the real port when 0 was asked), if TCP.
    pub addr: Option<SocketAddr>,
    /// The store, for in-process callers.
    pub store: Arc<Store>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, closes open connections (ending watches) and waits for the server.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn load_tls(t: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    let err = |e: String| ServeError::Tls(e);
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&t.cert).map_err(|e| err(format!("{}: {e}", t.cert.display())))?,
    ))
    .collect::<Result<_, _>>()
    .map_err(|e| err(format!("{}: {e}", t.cert.display())))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&t.key).map_err(|e| err(format!("{}: {e}", t.key.display())))?,
    ))
    .map_err(|e| err(format!("{}: {e}", t.key.display())))?
    .ok_or_else(|| err(format!("{}: no private key", t.key.display())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| err(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

fn serve_conn<S>(api: Arc<Api>, io: S, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| api.clone().handle(req));
        let builder = Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = stop.changed() => {}
        }
    });
}

/// Opens the store and starts serving. Returns once listening.
pub async fn start(cfg: ServerConfig) -> Result<Running, ServeError> {
    let store =
        Store::open(&cfg.data_dir, cfg.store.clone()).map_err(|source| ServeError::Store {
            dir: cfg.data_dir.clone(),
            source,
        })?;
    let tls = cfg.tls.as_ref().map(load_tls).transpose()?;
    let api = Arc::new(Api {
        store: store.clone(),
        token: cfg.token.clone(),
        bookmark_interval: cfg.bookmark_interval,
        runtime_config: cfg.runtime_config.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    let ticker_store = store.clone();
    let mut ticker_stop = stop_rx.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = every.tick() => {
                    let s = ticker_store.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.tick()).await {
                        tracing::warn!(error = %e, "finishing deletions");
                    }
                }
                _ = ticker_stop.changed() => return,
            }
        }
    });

    let (addr, task) = match &cfg.listen {
        Listen::Tcp(a) => {
            if !a.ip().is_loopback() {
                return Err(ServeError::NotLoopback(*a));
            }
            let l = tokio::net::TcpListener::bind(a)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: a.to_string(),
                    source,
                })?;
            let local = l.local_addr().map_err(|source| ServeError::Bind {
                addr: a.to_string(),
                source,
            })?;
            let mut stop = stop_rx.clone();
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = l.accept() => {
                            let Ok((sock, _)) = r else { continue };
                            let _ = sock.set_nodelay(true);
                            let (api, stop) = (api.clone(), stop_rx.clone());
                            match &tls {
                                Some(acc) => {
                                    let acc = acc.clone();
                                    tokio::spawn(async move {
                                        if let Ok(s) = acc.accept(sock).await {
                                            serve_conn(api, s, stop);
                                        }
                                    });
                                }
                                None => serve_conn(api, sock, stop),
                            }
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
            (Some(local), task)
        }
        Listen::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = tokio::net::UnixListener::bind(p).map_err(|source| ServeError::Bind {
                addr: p.display().to_string(),
                source,
            })?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
            let mut stop = stop_rx.clone();
            let task = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = l.accept() => {
                            let Ok((sock, _)) = r else { continue };
                            serve_conn(api.clone(), sock, stop_rx.clone());
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
            (None, task)
        }
    };
    Ok(Running {
        addr,
        store,
        stop: stop_tx,
        task,
    })
}
