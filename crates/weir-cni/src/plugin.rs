//! The plugin's operations (SPEC.md "Operations"): ADD allocates the pod's addresses, wires
//! its interface and hands the endpoint to the weir agent, which attaches the pod's programs
//! before ADD returns; DEL undoes all of it and succeeds whatever is already gone (the agent
//! down included: its endpoint record is removed on disk, and the agent reads the directory
//! when it starts); CHECK, GC, STATUS and VERSION as the specification says.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{json, Value};
use weir_model::endpoint::EndpointRecord;

use crate::agent::{self, AgentError};
use crate::ipam::Store;
use crate::link::{self, PodLink};
use crate::spec::{
    self, code, CniError, CniResult, Command, Env, Interface, IpConfig, NetConf, Route,
};

/// How long ADD waits for the agent to attach the pod's programs.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

struct Settings {
    socket: PathBuf,
    endpoint_dir: PathBuf,
    ipam_dir: PathBuf,
}

fn settings(conf: &NetConf) -> Settings {
    Settings {
        socket: conf
            .agent_socket
            .clone()
            .unwrap_or_else(|| "/run/weir/agent.sock".into())
            .into(),
        endpoint_dir: conf
            .endpoint_dir
            .clone()
            .unwrap_or_else(|| "/run/weir/endpoints".into())
            .into(),
        ipam_dir: conf
            .ipam_data_dir
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new("/var/lib/cni/networks").join(&conf.name)),
    }
}

/// The endpoint record's key of an attachment (container IDs and interface names never hold
/// a ':').
pub fn endpoint_key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}:{ifname}")
}

fn agent_error(e: AgentError) -> CniError {
    match e {
        AgentError::Down(_) | AgentError::Failed(_) => {
            CniError::new(code::TRY_AGAIN_LATER, e.to_string())
        }
        AgentError::Refused(..) => CniError::new(code::AGENT, e.to_string()),
    }
}

/// Runs the operation of `env` on `stdin`; the JSON to print on success (None: print nothing).
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = env.command.expect("command");
    if command == Command::Version {
        // VERSION's stdin holds only `cniVersion`; an unknown one is still answered.
        let v: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
        let asked = v["cniVersion"].as_str().unwrap_or("1.1.0");
        return Ok(Some(spec::version_result(asked)));
    }
    let conf = NetConf::parse(stdin)?;
    if matches!(command, Command::Gc | Command::Status)
        && !spec::version_at_least(&conf.cni_version, "1.1.0")
    {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{command:?} needs cniVersion 1.1.0 or later, the configuration says {:?}",
                conf.cni_version
            ),
        ));
    }
    let s = settings(&conf);
    match command {
        Command::Add => add(env, &conf, &s).map(|r| Some(r.to_json(&conf.cni_version))),
        Command::Del => del(env, &s).map(|_| None),
        Command::Check => check(env, &conf, &s).map(|_| None),
        Command::Gc => gc(&conf, &s).map(|_| None),
        Command::Status => status(&s).map(|_| None),
        Command::Version => unreachable!(),
    }
}

/// What the agent tells the plugin about its node.
struct NodeNet {
    pod_cidrs: Vec<IpNet>,
    host_addresses: Vec<IpAddr>,
}

fn node_net(s: &Settings) -> Result<NodeNet, CniError> {
    let v = agent::request(&s.socket, "GET", "/cni", None, AGENT_TIMEOUT).map_err(agent_error)?;
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    let pod_cidrs: Vec<IpNet> = list("podCIDRs")
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    if pod_cidrs.is_empty() {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the node has no podCIDRs yet (spec.podCIDRs of its Node object)",
        ));
    }
    Ok(NodeNet {
        pod_cidrs,
        host_addresses: list("hostAddresses")
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect(),
    })
}

fn add(env: &Env, conf: &NetConf, s: &Settings) -> Result<CniResult, CniError> {
    if conf.prev_result.is_some() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "weir-cni creates the pod's interface: it must be the first plugin of the list (a prevResult was given)",
        ));
    }
    let t0 = std::time::Instant::now();
    let node = node_net(s)?;
    let ips =
        Store::lock(&s.ipam_dir)?.allocate(&node.pod_cidrs, &env.container_id, &env.ifname)?;
    let t_ipam = t0.elapsed();
    let mut t_link = Duration::ZERO;
    let host_if = link::host_if_name(&env.container_id, &env.ifname);
    let undo = |s: &Settings| {
        link::delete(&host_if);
        if let Ok(mut st) = Store::lock(&s.ipam_dir) {
            st.release(&env.container_id, &env.ifname);
        }
    };
    let wired = (|| {
        PodLink {
            netns: &env.netns,
            ifname: &env.ifname,
            host_if: &host_if,
            ips: &ips,
            host_addresses: &node.host_addresses,
            mtu: conf.mtu,
        }
        .create()?;
        let (host_ifindex, host_mac) = link::link_info(None, &host_if)?;
        t_link = t0.elapsed();
        let (_, mac) = link::link_info(Some(&env.netns), &env.ifname)?;
        let pod = match (env.arg("K8S_POD_NAMESPACE"), env.arg("K8S_POD_NAME")) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => String::new(),
        };
        let record = EndpointRecord {
            pod,
            uid: endpoint_key(&env.container_id, &env.ifname),
            ips: ips.clone(),
            host_if: host_if.clone(),
            host_ifindex,
            host_mac: host_mac.clone(),
            mac: mac.clone(),
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            netns_inode: {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(&env.netns).map(|m| m.ino()).unwrap_or(0)
            },
            netns_cookie: link::netns_cookie(&env.netns).unwrap_or(0),
        };
        let body = serde_json::to_value(&record).expect("json");
        agent::request(&s.socket, "PUT", "/endpoints", Some(&body), AGENT_TIMEOUT)
            .map_err(agent_error)?;
        Ok::<_, CniError>((host_mac, mac))
    })();
    let (host_mac, mac) = match wired {
        Ok(m) => m,
        Err(e) => {
            let _ = remove_endpoint(s, &endpoint_key(&env.container_id, &env.ifname));
            undo(s);
            return Err(e);
        }
    };
    // Runtimes keep plugins' stderr in their logs: one line per ADD with where time went.
    eprintln!(
        "weir-cni: ADD {}:{} {:?}: agent and addresses {} ms, interface {} ms, endpoint attached at {} ms",
        env.container_id,
        env.ifname,
        ips,
        t_ipam.as_millis(),
        t_link.saturating_sub(t_ipam).as_millis(),
        t0.elapsed().as_millis()
    );
    Ok(result(env, &ips, (host_if, host_mac), mac))
}

/// The ADD result: the host side of the pair (`host`: name and MAC), the pod's interface,
/// its addresses with their gateways, and the default routes.
fn result(env: &Env, ips: &[IpAddr], host: (String, String), mac: String) -> CniResult {
    let gw4: IpAddr = link::GATEWAY4.parse().expect("gateway");
    let gw6: IpAddr = link::GATEWAY6.parse().expect("gateway");
    let (host_if, host_mac) = host;
    let mut routes = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        routes.push(Route {
            dst: "0.0.0.0/0".into(),
            gw: Some(gw4),
        });
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        routes.push(Route {
            dst: "::/0".into(),
            gw: Some(gw6),
        });
    }
    CniResult {
        cni_version: String::new(),
        interfaces: vec![
            Interface {
                name: host_if,
                mac: host_mac,
                sandbox: String::new(),
            },
            Interface {
                name: env.ifname.clone(),
                mac,
                sandbox: env.netns.clone(),
            },
        ],
        ips: ips
            .iter()
            .map(|a| IpConfig {
                address: match a {
                    IpAddr::V4(_) => format!("{a}/32"),
                    IpAddr::V6(_) => format!("{a}/128"),
                },
                gateway: Some(if a.is_ipv4() { gw4 } else { gw6 }),
                interface: Some(1),
            })
            .collect(),
        routes,
        dns: json!({}),
    }
}

/// Removes an endpoint through the agent. When the agent is down, or refuses (it answers
/// but cannot sync), the record is removed on disk: the agent reads the directory when it
/// starts and on every change. A request the agent took but did not finish is an error (the
/// runtime retries DEL), so that the file is never removed behind a working agent.
fn remove_endpoint(s: &Settings, key: &str) -> Result<(), CniError> {
    let path = format!("/endpoints?id={}", key.replace(':', "%3A"));
    match agent::request(&s.socket, "DELETE", &path, None, AGENT_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(e @ AgentError::Failed(_)) => Err(agent_error(e)),
        Err(e) => {
            if let AgentError::Refused(..) = e {
                eprintln!("weir-cni: {e}; removing the endpoint record on disk");
            }
            let f = s.endpoint_dir.join(format!("{key}.json"));
            match std::fs::remove_file(&f) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(CniError::new(code::IO, format!("{}: {e}", f.display()))),
            }
        }
    }
}

fn del(env: &Env, s: &Settings) -> Result<(), CniError> {
    // The endpoint first (the agent stops using the interface), then the addresses and the
    // interface; each step succeeds when there is nothing to undo.
    remove_endpoint(s, &endpoint_key(&env.container_id, &env.ifname))?;
    Store::lock(&s.ipam_dir)?.release(&env.container_id, &env.ifname);
    link::delete(&link::host_if_name(&env.container_id, &env.ifname));
    Ok(())
}

fn check(env: &Env, conf: &NetConf, s: &Settings) -> Result<(), CniError> {
    let key = endpoint_key(&env.container_id, &env.ifname);
    let list =
        agent::request(&s.socket, "GET", "/endpoints", None, AGENT_TIMEOUT).map_err(agent_error)?;
    let known = list
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["uid"] == key.as_str());
    if !known {
        return Err(CniError::new(
            code::AGENT,
            format!("the weir agent has no endpoint {key}"),
        ));
    }
    if !Path::new(&env.netns).exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "CNI_NETNS: the network namespace {} does not exist",
                env.netns
            ),
        ));
    }
    let have = link::addresses(&env.netns, &env.ifname)?;
    let want: Vec<IpAddr> = conf
        .prev_result
        .as_ref()
        .and_then(|r| r["ips"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    if let Some(missing) = want.iter().find(|a| !have.contains(a)) {
        return Err(CniError::new(
            code::LINK,
            format!("{} in {} has lost address {missing}", env.ifname, env.netns),
        ));
    }
    Ok(())
}

fn gc(conf: &NetConf, s: &Settings) -> Result<(), CniError> {
    // The list is required: GC without it would remove every pod's network. (The spec's
    // first text named the key cni.dev/attachments; runtimes written then send that one.)
    let Some(list) = conf
        .valid_attachments
        .clone()
        .or_else(|| conf.attachments.clone())
    else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments (the attachments still in use)",
        ));
    };
    let valid: Vec<(String, String)> = list
        .into_iter()
        .map(|a| (a.container_id, a.ifname))
        .collect();
    let keep = |c: &str, i: &str| valid.iter().any(|(vc, vi)| vc == c && vi == i);
    // Endpoints this plugin made for attachments no longer valid; continue past errors.
    let (records, _) = EndpointRecord::read_dir(&s.endpoint_dir);
    for r in records.iter().filter(|r| !r.container_id.is_empty()) {
        if !keep(&r.container_id, &r.ifname) {
            let _ = remove_endpoint(s, &r.uid);
            link::delete(&r.host_if);
        }
    }
    Store::lock(&s.ipam_dir)?.release_unless(keep);
    Ok(())
}

fn status(s: &Settings) -> Result<(), CniError> {
    agent::request(&s.socket, "GET", "/status", None, Duration::from_secs(5))
        .map(|_| ())
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.to_string()))
}
