//! `weir mesh`: a cluster's mesh between its API server and the clusterset's etcd (see
//! weir-mesh); `weir lab mesh` runs one for a lab cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;

/// Flags of `weir mesh`; every one can come from the environment (`WEIR_MESH_*`), as in the
/// mesh Deployment in deploy/.
#[derive(Args, Debug)]
pub(crate) struct MeshArgs {
    /// The clusterset's name (the prefix of its keys in etcd).
    #[arg(long, env = "WEIR_MESH_CLUSTERSET")]
    clusterset: String,
    /// This cluster's id in the clusterset (its cluster.clusterset.k8s.io ClusterProperty).
    #[arg(long, env = "WEIR_MESH_CLUSTER_ID")]
    cluster_id: String,
    /// etcd endpoints, comma-separated (https://HOST:PORT).
    #[arg(
        long,
        env = "WEIR_MESH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    etcd_endpoints: Vec<String>,
    /// The CA of etcd's server certificate (PEM).
    #[arg(long, env = "WEIR_MESH_ETCD_CA", requires_all = ["etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    /// This cluster's etcd client certificate (PEM).
    #[arg(long, env = "WEIR_MESH_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, env = "WEIR_MESH_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// The name etcd's certificate must carry (default: each endpoint's host).
    #[arg(long, env = "WEIR_MESH_ETCD_SERVER_NAME")]
    etcd_server_name: Option<String>,
    /// How long this cluster's exports outlive the mesh's last renewal in etcd before the
    /// other clusters withdraw them.
    #[arg(long, env = "WEIR_MESH_REMOTE_TTL", default_value = "60s", value_parser = crate::cli::parse_duration)]
    remote_ttl: Duration,
    /// The ranges ClusterSetIPs are allocated from, one per family (distinct from the
    /// cluster's Service CIDRs).
    #[arg(
        long,
        env = "WEIR_MESH_CLUSTERSET_CIDRS",
        value_delimiter = ',',
        default_value = "10.90.0.0/16,fd00:10:90::/112"
    )]
    clusterset_cidr: Vec<String>,
    /// Write the mesh's status (JSON) to this file.
    #[arg(long, env = "WEIR_MESH_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// Serve /healthz (the process runs) and /readyz (connected to etcd and synced, from the
    /// status file) on this address for the kubelet's probes (unset: nowhere).
    #[arg(long, env = "WEIR_MESH_HEALTH_LISTEN", requires = "status_file")]
    health_listen: Option<std::net::SocketAddr>,
    /// Active health checks of this cluster's exported endpoints: a TCP connect to each
    /// (at its slice's first TCP port) this often; 0s (the default) turns them off. An
    /// endpoint failing --health-check-threshold times in a row is published not ready.
    #[arg(long, env = "WEIR_MESH_HEALTH_CHECK_INTERVAL", default_value = "0s", value_parser = crate::cli::parse_duration)]
    health_check_interval: Duration,
    /// How long each check's connect may take.
    #[arg(long, env = "WEIR_MESH_HEALTH_CHECK_TIMEOUT", default_value = "1s", value_parser = crate::cli::parse_duration)]
    health_check_timeout: Duration,
    /// Consecutive failed checks that make an endpoint not ready (one answer makes it ready).
    #[arg(long, env = "WEIR_MESH_HEALTH_CHECK_THRESHOLD", default_value_t = 3)]
    health_check_threshold: u32,
    /// Check from this network namespace (a path such as /run/netns/NAME) instead of the
    /// mesh's own.
    #[arg(long, env = "WEIR_MESH_HEALTH_CHECK_NETNS")]
    health_check_netns: Option<PathBuf>,
}

impl MeshArgs {
    fn config(&self) -> Result<weir_mesh::MeshConfig> {
        // The id names etcd keys and DNS labels (`<host>.<clusterid>.<svc>...`).
        let id = &self.cluster_id;
        let label = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-');
        if !label {
            anyhow::bail!(
                "--cluster-id {id:?}: a cluster id must be a DNS label (lowercase letters, digits and '-', at most 63)"
            );
        }
        let mut cidrs = Vec::new();
        for c in &self.clusterset_cidr {
            cidrs.push(
                weir_model::validate::parse_cidr(c)
                    .map_err(|e| anyhow!("--clusterset-cidr {c:?}: {e}"))?,
            );
        }
        Ok(weir_mesh::MeshConfig {
            clusterset: self.clusterset.clone(),
            cluster: self.cluster_id.clone(),
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_tls: match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
                (Some(ca), Some(cert), Some(key)) => Some(weir_mesh::EtcdTls {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    server_name: self.etcd_server_name.clone(),
                }),
                _ => None,
            },
            remote_ttl: self.remote_ttl,
            clusterset_cidrs: cidrs,
            status_file: self.status_file.clone(),
            health_check: self.health_check()?,
        })
    }

    fn health_check(&self) -> Result<Option<weir_mesh::health::HealthCheckConfig>> {
        if self.health_check_interval.is_zero() {
            return Ok(None);
        }
        if self.health_check_threshold == 0 {
            anyhow::bail!("--health-check-threshold 0: give at least 1");
        }
        if self.health_check_timeout.is_zero() {
            anyhow::bail!("--health-check-timeout 0s: give a positive duration");
        }
        Ok(Some(weir_mesh::health::HealthCheckConfig {
            interval: self.health_check_interval,
            timeout: self.health_check_timeout,
            threshold: self.health_check_threshold,
            netns: self.health_check_netns.clone(),
        }))
    }
}

/// `weir mesh`.
pub(crate) async fn run(cli: &crate::cli::Cli, a: &MeshArgs) -> Result<ExitCode> {
    let cfg = a.config()?;
    let client = cli.client().await?;
    if let (Some(addr), Some(file)) = (a.health_listen, cfg.status_file.clone()) {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-listen {addr}"))?;
        tokio::spawn(probes(l, file));
    }
    serve(client, cfg).await
}

/// Answers the kubelet's probes: /healthz while the process runs, /readyz while the mesh's
/// status says it is connected to etcd and synced.
async fn probes(l: tokio::net::TcpListener, status: PathBuf) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = match path {
                "/healthz" => (200, "ok".to_string()),
                "/readyz" => match weir_mesh::read_status(&status) {
                    Some(st) if st.connected && st.synced => (200, "ok".to_string()),
                    Some(st) => (
                        503,
                        format!("not ready: connected={} synced={}", st.connected, st.synced),
                    ),
                    None => (503, "no status yet".to_string()),
                },
                _ => (404, "not found".to_string()),
            };
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// `weir lab mesh --cluster SET/cK`.
pub(crate) async fn run_lab_mesh(name: &str) -> Result<ExitCode> {
    let (cfg, kubeconfig) = weir_lab::clusterset::mesh_settings(name)?;
    let client = weir_lab::client::client_from_kubeconfig(&kubeconfig).await?;
    serve(client, cfg).await
}

async fn serve(client: kube::Client, cfg: weir_mesh::MeshConfig) -> Result<ExitCode> {
    tracing::info!(cluster = %cfg.cluster, clusterset = %cfg.clusterset, "mesh starting");
    tokio::select! {
        r = weir_mesh::run(client, cfg) => r.map_err(|e| anyhow!(e)).context("the mesh stopped")?,
        _ = weir_lab::lab::wait_for_signal() => {}
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use serde_json::Value;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    /// The mesh Deployment (deploy/mesh/) runs `weir mesh` with settings it accepts: every
    /// ConfigMap key and container variable is a flag's environment variable and parses, and
    /// the credential files it names are mounted from the Secret.
    #[test]
    fn the_deployment_agrees_with_the_meshs_flags() {
        let d = yaml(include_str!("../../../deploy/mesh/mesh-deployment.yaml"));
        let cm = yaml(include_str!("../../../deploy/mesh/mesh-config.yaml"));
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let mut argv: Vec<String> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .chain(c["args"].as_array().unwrap())
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(argv, ["weir", "mesh"]);
        let cmd = crate::cli::Cli::command();
        let mesh = cmd.find_subcommand("mesh").unwrap();
        let mut vars: Vec<(String, String)> = cm["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        for e in c["env"].as_array().unwrap() {
            vars.push((
                e["name"].as_str().unwrap().into(),
                e["value"].as_str().unwrap().into(),
            ));
        }
        for (k, v) in &vars {
            let arg = mesh
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == k.as_str()))
                .unwrap_or_else(|| panic!("{k} is no flag's environment variable"));
            argv.push(format!("--{}={v}", arg.get_long().unwrap()));
        }
        let cli =
            crate::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let crate::cli::Command::Mesh(a) = &cli.command else {
            panic!("not weir mesh")
        };
        let cfg = a.config().unwrap();
        let tls = cfg.etcd_tls.expect("TLS settings");
        let mounts = c["volumeMounts"].as_array().unwrap();
        for f in [&tls.ca, &tls.cert, &tls.key] {
            assert!(
                mounts
                    .iter()
                    .any(|m| f.starts_with(m["mountPath"].as_str().unwrap())),
                "{} is not mounted",
                f.display()
            );
        }
        assert!(cfg.status_file.unwrap().starts_with("/run/weir-mesh"));
        // The probes ask the port the mesh serves them on.
        let port = a.health_listen.expect("--health-listen").port();
        assert_eq!(c["ports"][0]["containerPort"], port);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(cfg.clusterset_cidrs.len(), 2);
    }
}
