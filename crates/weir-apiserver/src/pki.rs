//! Per-cluster credentials: a CA, a server certificate for loopback, a bearer token, and the
//! kubeconfig that carries them to kubectl and kube-rs.

use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// Files of one cluster's credentials.
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// Server certificate (PEM), valid for 127.0.0.1, ::1 and localhost.
    pub server_cert: PathBuf,
    /// Server private key (PEM).
    pub server_key: PathBuf,
    /// Bearer token file.
    pub token: PathBuf,
}

/// Credentials could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn write_private(path: &Path, data: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)
}

/// A new self-signed CA named `cn`: its certificate and the issuer that signs with it.
fn new_ca(cn: &str) -> Result<(rcgen::Certificate, Issuer<'static, KeyPair>), PkiError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, cn.to_string());
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    Ok((ca_cert, Issuer::new(ca_params, ca_key)))
}

impl Pki {
    /// The credential files under `dir` (whether or not they exist yet).
    pub fn in_dir(dir: &Path) -> Pki {
        Pki {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("apiserver.crt"),
            server_key: dir.join("apiserver.key"),
            token: dir.join("token"),
        }
    }

    /// Creates a CA, a server certificate and a random token under `dir`, unless they exist.
    pub fn ensure(dir: &Path, cluster: &str) -> Result<Pki, PkiError> {
        let pki = Pki::in_dir(dir);
        if pki.ca_cert.exists()
            && pki.server_cert.exists()
            && pki.server_key.exists()
            && pki.token.exists()
        {
            return Ok(pki);
        }
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let (ca_cert, issuer) = new_ca(&format!("weir-ca-{cluster}"))?;

        let server_key = KeyPair::generate()?;
        let mut sp = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        sp.distinguished_name
            .push(DnType::CommonName, format!("weir-apiserver-{cluster}"));
        let server_cert = sp.signed_by(&server_key, &issuer)?;

        let token: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        write_private(&pki.ca_cert, &ca_cert.pem())?;
        write_private(&pki.server_cert, &server_cert.pem())?;
        write_private(&pki.server_key, &server_key.serialize_pem())?;
        write_private(&pki.token, &token)?;
        Ok(pki)
    }

    /// The bearer token.
    pub fn read_token(&self) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(&self.token)?.trim().to_string())
    }

    /// Writes a kubeconfig for `server` (e.g. `https://127.0.0.1:6443`) with the CA and token.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        cluster: &str,
        server: &str,
    ) -> Result<(), PkiError> {
        let io = |source| PkiError::Io {
            path: self.ca_cert.clone(),
            source,
        };
        let ca = std::fs::read(&self.ca_cert).map_err(io)?;
        let token = self.read_token().map_err(io)?;
        let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca);
        let ctx = format!("weir-{cluster}");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {ctx}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_b64}\nusers:\n- name: {ctx}-admin\n  user:\n    token: {token}\ncontexts:\n- name: {ctx}\n  context:\n    cluster: {ctx}\n    user: {ctx}-admin\n    namespace: default\ncurrent-context: {ctx}\npreferences: {{}}\n"
        );
        write_private(path, &text)
    }
}

/// Credentials of a clusterset's etcd: a CA, a server certificate for loopback, and one
/// client certificate per cluster (common name: the cluster's id), as Cilium's clustermesh
/// gives every remote cluster a client certificate of its own.
#[derive(Debug, Clone)]
pub struct EtcdPki {
    dir: PathBuf,
}

impl EtcdPki {
    /// The files under `dir` (whether or not they exist yet).
    pub fn in_dir(dir: &Path) -> EtcdPki {
        EtcdPki {
            dir: dir.to_path_buf(),
        }
    }
    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The server certificate and key.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.crt"), self.dir.join("server.key"))
    }
    /// Cluster `id`'s client certificate and key.
    pub fn client(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("client-{id}.crt")),
            self.dir.join(format!("client-{id}.key")),
        )
    }

    /// Makes the CA, the server certificate and a client certificate for each of `clients`.
    pub fn create(dir: &Path, set: &str, clients: &[String]) -> Result<EtcdPki, PkiError> {
        use rcgen::ExtendedKeyUsagePurpose;
        let pki = EtcdPki::in_dir(dir);
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let (ca_cert, issuer) = new_ca(&format!("weir-etcd-ca-{set}"))?;
        write_private(&pki.ca_cert(), &ca_cert.pem())?;
        let issue = |cn: String,
                     sans: Vec<String>,
                     usage: ExtendedKeyUsagePurpose,
                     (crt, key): (PathBuf, PathBuf)|
         -> Result<(), PkiError> {
            let k = KeyPair::generate()?;
            let mut p = CertificateParams::new(sans)?;
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            let c = p.signed_by(&k, &issuer)?;
            write_private(&crt, &c.pem())?;
            write_private(&key, &k.serialize_pem())
        };
        issue(
            format!("weir-etcd-{set}"),
            vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            pki.server(),
        )?;
        for id in clients {
            issue(
                id.clone(),
                vec![],
                ExtendedKeyUsagePurpose::ClientAuth,
                pki.client(id),
            )?;
        }
        Ok(pki)
    }
}
