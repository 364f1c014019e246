//! The CNI protocol, by the specification (containernetworking/cni SPEC.md, version 1.1.0):
//! the environment a runtime sets, the network configuration on stdin, the result and error
//! objects on stdout, and version negotiation.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The versions this plugin speaks (SPEC.md "Version"): results for 1.1.0 and 1.0.0 have
/// one shape; 0.4.0 results carry each address's `version`.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// Well-known error codes (SPEC.md "Error").
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The plugin is not available (STATUS).
    pub const NOT_AVAILABLE: u32 = 50;
    /// First plugin-specific code: no free address in a range.
    pub const ADDRESSES_EXHAUSTED: u32 = 100;
    /// The weir agent refused or failed the endpoint.
    pub const AGENT: u32 = 101;
    /// Setting up the interface failed.
    pub const LINK: u32 = 102;
}

/// A CNI error: printed on stdout as `{cniVersion, code, msg, details}`, exit status non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    /// The code (0-99 well-known, 100+ this plugin's).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The same error with `details`.
    pub fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }

    /// The error object for stdout, in `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// The operations (SPEC.md "Parameters": CNI_COMMAND).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Add the container to the network.
    Add,
    /// Remove it.
    Del,
    /// Check it is as ADD left it.
    Check,
    /// Report the versions spoken.
    Version,
    /// Release what no valid attachment uses.
    Gc,
    /// Report readiness for ADD.
    Status,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            _ => return None,
        })
    }
}

/// The runtime's parameters, from the CNI_* environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// CNI_COMMAND.
    pub command: Option<Command>,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS (a path; may be empty for DEL).
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_ARGS as key/value pairs.
    pub args: Vec<(String, String)>,
    /// CNI_PATH.
    pub path: String,
}

/// Whether `id` is a valid container ID: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
fn valid_container_id(id: &str) -> bool {
    let mut b = id.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Whether `name` can be a Linux interface name (dev_valid_name: 1-15 bytes, no '/', ':' or
/// white space, not "." or "..").
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|c| c == b'/' || c == b':' || c.is_ascii_whitespace())
}

impl Env {
    /// Reads the CNI_* variables through `get`, checking those `command` requires (SPEC.md
    /// "Parameters"; a missing or bad one is error 4).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let var = |k: &str| get(k).unwrap_or_default();
        let command = var("CNI_COMMAND");
        let command = Command::parse(&command).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND: {command:?} is not ADD, DEL, CHECK, VERSION, GC or STATUS"),
            )
        })?;
        let env = Env {
            command: Some(command),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS")
                .split(';')
                .filter(|kv| !kv.is_empty())
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv.to_string(), String::new()),
                })
                .collect(),
            path: var("CNI_PATH"),
        };
        let missing = |k: &str| {
            CniError::new(
                code::INVALID_ENV,
                format!("{k} is required for {command:?}"),
            )
        };
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            if env.container_id.is_empty() {
                return Err(missing("CNI_CONTAINERID"));
            }
            if !valid_container_id(&env.container_id) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_CONTAINERID: {:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'",
                        env.container_id
                    ),
                ));
            }
            if env.ifname.is_empty() {
                return Err(missing("CNI_IFNAME"));
            }
            if !valid_ifname(&env.ifname) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_IFNAME: {:?} is not a valid interface name", env.ifname),
                ));
            }
            if command != Command::Del && env.netns.is_empty() {
                return Err(missing("CNI_NETNS"));
            }
        }
        Ok(env)
    }

    /// The value of CNI_ARGS key `k` (e.g. K8S_POD_NAMESPACE).
    pub fn arg(&self, k: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Compares two dotted versions.
fn version_key(v: &str) -> Option<(u32, u32, u32)> {
    let mut p = v.split('.').map(|x| x.parse::<u32>().ok());
    Some((p.next()??, p.next()??, p.next().unwrap_or(Some(0))?))
}

/// Whether `v` is at least `min`.
pub fn version_at_least(v: &str, min: &str) -> bool {
    matches!((version_key(v), version_key(min)), (Some(a), Some(b)) if a >= b)
}

/// Checks that this plugin speaks `version` (error 1 otherwise, naming what it speaks).
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "incompatible CNI versions: config is {version:?}, plugin supports {SUPPORTED_VERSIONS:?}"
        ),
    ))
}

/// The VERSION answer.
pub fn version_result(version: &str) -> Value {
    json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
}

/// One interface of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The network namespace path it lives in; empty on the host.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// One address of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix (`10.244.1.5/32`).
    pub address: String,
    /// Its gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// The index into `interfaces` of the interface it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination prefix.
    pub dst: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// An ADD result (SPEC.md "Success").
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CniResult {
    /// The version it is written in.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Interfaces created.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes added in the container.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS settings (this plugin sets none; the runtime's own apply).
    #[serde(default)]
    pub dns: Value,
}

impl CniResult {
    /// The result as JSON in `version` (0.4.0 results name each address's IP version).
    pub fn to_json(&self, version: &str) -> Value {
        let mut r = self.clone();
        r.cni_version = version.to_string();
        if !r.dns.is_object() {
            r.dns = json!({});
        }
        let mut v = serde_json::to_value(&r).expect("json");
        if !version_at_least(version, "1.0.0") {
            for (i, ip) in v["ips"].as_array_mut().into_iter().flatten().enumerate() {
                let six = self.ips[i].address.contains(':');
                ip["version"] = json!(if six { "6" } else { "4" });
            }
        }
        v
    }
}

/// The network configuration a runtime sends on stdin: the plugin's object of the conflist,
/// with `cniVersion` and `name` inserted, and `prevResult` / `runtimeConfig` /
/// `cni.dev/valid-attachments` as the operation needs. Unknown keys are kept.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    /// The version the runtime chose.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The network's name.
    #[serde(default)]
    pub name: String,
    /// The plugin's name (`weir-cni`).
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The result of the plugins before this one (chaining), or of ADD (DEL, CHECK).
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// GC: the attachments still valid.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// GC: the same, under the key of the specification's first text.
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<Attachment>>,
    /// The weir agent's API socket (default /run/weir/agent.sock).
    #[serde(rename = "agentSocket", default)]
    pub agent_socket: Option<String>,
    /// Where the agent reads endpoint records (default /run/weir/endpoints).
    #[serde(rename = "endpointDir", default)]
    pub endpoint_dir: Option<String>,
    /// Where address allocations are kept (default /var/lib/cni/networks/NAME).
    #[serde(rename = "ipamDataDir", default)]
    pub ipam_data_dir: Option<String>,
    /// The MTU of pod interfaces (default: the kernel's, 1500).
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// An attachment named in GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    /// Its container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface name.
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin: error 6 when it is not JSON, 7 when it is not a plugin configuration,
    /// 1 when its version is not one this plugin speaks.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE, "the network configuration is not JSON")
                .details(e.to_string())
        })?;
        if !v.is_object() {
            return Err(CniError::new(
                code::DECODE,
                "the network configuration is not a JSON object",
            ));
        }
        let c: NetConf = serde_json::from_value(v).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "the network configuration is invalid")
                .details(e.to_string())
        })?;
        if c.cni_version.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "cniVersion: required"));
        }
        check_version(&c.cni_version)?;
        if c.name.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "name: required"));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::read(|k| vars.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn environment_is_checked_per_command() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (4, "CNI_NETNS is required for Add")
        );
        assert!(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0")
        ])
        .is_ok());
        assert_eq!(
            env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "-x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x")
            ])
            .unwrap_err()
            .code,
            4
        );
        assert_eq!(env(&[("CNI_COMMAND", "BOGUS")]).unwrap_err().code, 4);
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
            ),
        ])
        .unwrap();
        assert_eq!(e.arg("K8S_POD_NAME"), Some("p"));
    }

    #[test]
    fn versions_and_config_errors() {
        assert_eq!(NetConf::parse(b"{").unwrap_err().code, 6);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion": "9.9.9", "name": "n"}"#)
                .unwrap_err()
                .code,
            1
        );
        assert_eq!(NetConf::parse(br#"{"name": "n"}"#).unwrap_err().code, 7);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion": "1.1.0", "name": "n", "mtu": "x"}"#)
                .unwrap_err()
                .code,
            7
        );
        assert!(NetConf::parse(
            br#"{"cniVersion": "1.0.0", "name": "n", "type": "weir-cni", "other": 1}"#
        )
        .is_ok());
        assert!(version_at_least("1.1.0", "1.0.0") && !version_at_least("0.4.0", "1.0.0"));
    }

    #[test]
    fn results_in_each_version() {
        let r = CniResult {
            cni_version: String::new(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                sandbox: "/run/netns/x".into(),
            }],
            ips: vec![IpConfig {
                address: "10.244.1.2/32".into(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Value::Null,
        };
        let v = r.to_json("1.1.0");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["dns"], json!({}));
        assert_eq!(r.to_json("0.4.0")["ips"][0]["version"], "4");
    }
}
