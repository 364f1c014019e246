//! The pod's interfaces: a veth pair whose host side stays in the node's network namespace
//! (where the plugin runs) and whose other side is the pod's `CNI_IFNAME`, with the pod's
//! addresses and routes to a link-local gateway the host side answers on (169.254.1.1 and
//! fe80::1, as Calico does), and a host route to each pod address. Done with iproute2's `ip`
//! (in the pod's namespace through `nsenter --net`).

use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::spec::{code, CniError};

/// The IPv4 gateway pods route through.
pub const GATEWAY4: &str = "169.254.1.1";
/// The IPv6 gateway pods route through.
pub const GATEWAY6: &str = "fe80::1";

/// The host-side veth of an attachment: `lxc` and 12 hex digits of a hash of the container
/// ID and interface name (15 bytes, the kernel's limit; stable, so DEL finds it again).
pub fn host_if_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("lxc{:012x}", h & 0xffff_ffff_ffff)
}

fn run(netns: Option<&str>, args: &[String], input: Option<&str>) -> Result<String, String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}")).arg("--").arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("ip: {e}"))?;
    if let Some(text) = input {
        use std::io::Write;
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(
        None,
        &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        None,
    )
}

fn link_err(e: String) -> CniError {
    CniError::new(code::LINK, "setting up the pod's interface failed").details(e)
}

/// Everything ADD sets up for one attachment.
pub struct PodLink<'a> {
    /// The pod's network namespace (a path).
    pub netns: &'a str,
    /// The pod-side interface name.
    pub ifname: &'a str,
    /// The host-side veth name.
    pub host_if: &'a str,
    /// The pod's addresses.
    pub ips: &'a [IpAddr],
    /// The node's own addresses, the source of its traffic to the pod.
    pub host_addresses: &'a [IpAddr],
    /// MTU of the pair, if set.
    pub mtu: Option<u32>,
}

impl PodLink<'_> {
    /// Creates the pair, addresses and routes. The pod's interface must not exist yet.
    pub fn create(&self) -> Result<(), CniError> {
        if !std::path::Path::new(self.netns).exists() {
            return Err(CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "CNI_NETNS: the network namespace {} does not exist",
                    self.netns
                ),
            ));
        }
        // A host side left by an earlier ADD of this attachment that failed half-way.
        let _ = ip(&["link", "del", self.host_if]);
        let mut add = vec!["link", "add", self.host_if];
        let mtu = self.mtu.map(|m| m.to_string());
        if let Some(m) = &mtu {
            add.extend(["mtu", m.as_str()]);
        }
        add.extend(["type", "veth", "peer", "name", self.ifname]);
        // Both ends get the MTU.
        if let Some(m) = &mtu {
            add.extend(["mtu", m.as_str()]);
        }
        add.extend(["netns", self.netns]);
        ip(&add).map_err(link_err)?;
        let result = self.configure();
        if result.is_err() {
            let _ = ip(&["link", "del", self.host_if]);
        }
        result
    }

    fn configure(&self) -> Result<(), CniError> {
        let h = self.host_if;
        ip(&["link", "set", h, "up"]).map_err(link_err)?;
        // The gateway of each family the pod has (a node without IPv6 takes no fe80::1).
        if self.ips.iter().any(IpAddr::is_ipv4) {
            ip(&["addr", "add", &format!("{GATEWAY4}/32"), "dev", h]).map_err(link_err)?;
        }
        if self.ips.iter().any(IpAddr::is_ipv6) {
            ip(&["addr", "add", &format!("{GATEWAY6}/64"), "dev", h, "nodad"]).map_err(link_err)?;
        }
        let i = self.ifname;
        let mut pod = vec!["link set lo up".to_string(), format!("link set {i} up")];
        for a in self.ips {
            match a {
                IpAddr::V4(_) => pod.push(format!("addr add {a}/32 dev {i}")),
                IpAddr::V6(_) => pod.push(format!("addr add {a}/128 dev {i} nodad")),
            }
        }
        if self.ips.iter().any(IpAddr::is_ipv4) {
            pod.push(format!("route add {GATEWAY4} dev {i} scope link"));
            pod.push(format!("route add default via {GATEWAY4} dev {i}"));
        }
        if self.ips.iter().any(IpAddr::is_ipv6) {
            pod.push(format!("route add ::/0 via {GATEWAY6} dev {i}"));
        }
        run(
            Some(self.netns),
            &["-batch".to_string(), "-".to_string()],
            Some(&pod.join("\n")),
        )
        .map_err(link_err)?;
        for a in self.ips {
            let (plen, src) = match a {
                IpAddr::V4(_) => (32, self.host_addresses.iter().find(|h| h.is_ipv4())),
                IpAddr::V6(_) => (128, self.host_addresses.iter().find(|h| h.is_ipv6())),
            };
            let dst = format!("{a}/{plen}");
            let mut args = vec!["route", "replace", dst.as_str(), "dev", h];
            let src = src.map(|s| s.to_string());
            if let Some(s) = &src {
                args.extend(["src", s.as_str()]);
            }
            ip(&args).map_err(link_err)?;
        }
        Ok(())
    }
}

/// A link's interface index and MAC address, in the pod's namespace (`netns`) or the
/// plugin's own (None).
pub fn link_info(netns: Option<&str>, ifname: &str) -> Result<(u32, String), CniError> {
    let out = run(
        netns,
        &["-j", "link", "show", "dev", ifname].map(String::from),
        None,
    )
    .map_err(link_err)?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| link_err(e.to_string()))?;
    match (v[0]["ifindex"].as_u64(), v[0]["address"].as_str()) {
        (Some(i), Some(mac)) => Ok((i as u32, mac.to_string())),
        _ => Err(link_err(format!(
            "no ifindex or address for {ifname} in {out}"
        ))),
    }
}

/// The addresses on `ifname` in the pod's namespace.
pub fn addresses(netns: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
    let out = run(
        Some(netns),
        &["-j", "addr", "show", "dev", ifname].map(String::from),
        None,
    )
    .map_err(link_err)?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| link_err(e.to_string()))?;
    Ok(v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}

/// Removes the host-side veth (its peer goes with it); true if it was there.
pub fn delete(host_if: &str) -> bool {
    ip(&["link", "del", host_if]).is_ok()
}

/// The cookie of the network namespace at `netns` (`SO_NETNS_COOKIE` of a socket made there,
/// on a thread of its own that enters it), which the socket layer's events carry.
pub fn netns_cookie(netns: &str) -> Option<u64> {
    let path = netns.to_string();
    std::thread::spawn(move || -> Option<u64> {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(&path).ok()?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        nix::sys::socket::getsockopt(&s, NetnsCookie).ok()
    })
    .join()
    .ok()
    .flatten()
}

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: nix::libc::c_int = 71;

use nix::libc;
use nix::{getsockopt_impl, sockopt_impl};

sockopt_impl!(
    /// The cookie of the socket's network namespace.
    NetnsCookie,
    GetOnly,
    nix::libc::SOL_SOCKET,
    SO_NETNS_COOKIE,
    u64,
    nix::sys::socket::sockopt::GetStruct<u64>
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_namespace_has_one_cookie_of_its_own() {
        let own = netns_cookie("/proc/self/ns/net").expect("own namespace");
        assert_ne!(own, 0);
        assert_eq!(netns_cookie("/proc/self/ns/net"), Some(own));
        let name = format!("wcni-cookie-{}", std::process::id());
        let added = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(added.success());
        let other = netns_cookie(&format!("/run/netns/{name}"));
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        assert!(other.is_some_and(|c| c != 0 && c != own), "{other:?}");
        assert_eq!(netns_cookie("/nonexistent"), None);
    }
}
