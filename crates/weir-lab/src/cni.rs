//! The lab kubelet's container-runtime side of CNI, as libcni does it: take the
//! lexicographically first `.conflist` of the node's configuration directory, and for ADD run
//! its plugins in order (each after the first gets the result so far as `prevResult`), for DEL
//! in reverse order with the final ADD result. Each plugin is executed from the node's
//! network namespace with the CNI_* environment and its configuration on stdin, and its
//! stdout parsed, exactly as a runtime executes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::LabError;

/// One node's CNI setup.
pub struct Runtime {
    /// The configuration directory.
    pub conf_dir: PathBuf,
    /// Where plugins are found (CNI_PATH).
    pub bin_dir: PathBuf,
    /// The node's network namespace (a path), where plugins run.
    pub node_netns: PathBuf,
}

/// A pod attachment.
pub struct Attachment<'a> {
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_NETNS (a path).
    pub netns: &'a Path,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// The pod's namespace, name and uid, passed in CNI_ARGS as the CRI runtimes do.
    pub pod: (&'a str, &'a str, &'a str),
}

fn err(what: impl Into<String>, e: impl ToString) -> LabError {
    LabError::Command(what.into(), e.to_string())
}

impl Runtime {
    /// The network configuration list in use: the lexicographically first `*.conflist`.
    pub fn conflist(&self) -> Result<Value, LabError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| LabError::io(self.conf_dir.clone(), e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
            .collect();
        files.sort();
        let f = files.first().ok_or_else(|| {
            err(
                "CNI",
                format!("no .conflist in {}", self.conf_dir.display()),
            )
        })?;
        let text = std::fs::read_to_string(f).map_err(|e| LabError::io(f.clone(), e))?;
        serde_json::from_str(&text).map_err(|e| err(format!("CNI config {}", f.display()), e))
    }

    /// The configuration one plugin of `list` receives.
    fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["cniVersion"] = list["cniVersion"].clone();
        c["name"] = list["name"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// Executes plugin `ty` with `command` for `a` and `conf`; its parsed stdout.
    fn exec(
        &self,
        ty: &str,
        command: &str,
        a: &Attachment<'_>,
        conf: &Value,
    ) -> Result<Value, LabError> {
        let bin = self.bin_dir.join(ty);
        let (ns, name, uid) = a.pod;
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.node_netns.display()))
            .arg("--")
            .arg(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", a.container_id)
            .env("CNI_NETNS", a.netns)
            .env("CNI_IFNAME", a.ifname)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={uid}", a.container_id),
            )
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("CNI {command} {}", bin.display()), e))?;
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes());
        let out = child
            .wait_with_output()
            .map_err(|e| err(format!("CNI {command} {}", bin.display()), e))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.trim().is_empty() {
            tracing::info!(plugin = ty, command, "{}", stderr.trim());
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() {
            Ok(v)
        } else {
            Err(err(
                format!("CNI {command} of {ns}/{name} by {ty}"),
                format!(
                    "error {}: {} {}",
                    v["code"],
                    v["msg"].as_str().unwrap_or(""),
                    v["details"].as_str().unwrap_or("")
                )
                .trim()
                .to_string(),
            ))
        }
    }

    /// ADD through every plugin of the list; the final result.
    pub fn add(&self, a: &Attachment<'_>) -> Result<Value, LabError> {
        let list = self.conflist()?;
        let mut prev: Option<Value> = None;
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            let ty = plugin["type"].as_str().unwrap_or_default();
            let conf = Self::plugin_conf(&list, plugin, prev.as_ref());
            prev = Some(self.exec(ty, "ADD", a, &conf)?);
        }
        prev.ok_or_else(|| err("CNI", "the configuration list has no plugins"))
    }

    /// DEL through every plugin of the list, last first, with the final ADD result (when there
    /// was one). Every plugin is asked even if one fails; the first error is returned.
    pub fn del(&self, a: &Attachment<'_>, result: Option<&Value>) -> Result<(), LabError> {
        let list = self.conflist()?;
        let mut first_err = None;
        let plugins: Vec<&Value> = list["plugins"].as_array().into_iter().flatten().collect();
        for plugin in plugins.into_iter().rev() {
            let ty = plugin["type"].as_str().unwrap_or_default();
            let conf = Self::plugin_conf(&list, plugin, result.filter(|r| !r.is_null()));
            if let Err(e) = self.exec(ty, "DEL", a, &conf) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The pod's addresses and host-side interface in an ADD result: the addresses, and the
/// interface without a sandbox (the host side of the pair).
pub fn parse_result(r: &Value) -> (Vec<std::net::IpAddr>, Option<String>) {
    let ips = r["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    let host_if = r["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .and_then(|i| i["name"].as_str().map(String::from));
    (ips, host_if)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn results_give_addresses_and_the_host_side() {
        let r = json!({"cniVersion": "1.1.0",
            "interfaces": [{"name": "lxc1"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.244.1.2/32", "interface": 1}, {"address": "fd00::2/128", "interface": 1}]});
        let (ips, host) = parse_result(&r);
        assert_eq!(ips.len(), 2);
        assert_eq!(host.as_deref(), Some("lxc1"));
    }
}
