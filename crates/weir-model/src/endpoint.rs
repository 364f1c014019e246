//! Endpoint records: what the network plugin (the lab kubelet today, weir's CNI plugin on a
//! real cluster) tells the node's agent about each local pod's interface, as Cilium's CNI
//! plugin tells cilium-agent. One JSON file per pod in the node's endpoint directory, written
//! when the pod's network is up and removed when it is torn down; the agent turns them into
//! the datapath's endpoint map and attaches the pod programs to `host_if`.

use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One local pod's network attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    /// The pod, as `namespace/name`.
    pub pod: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// The host-side veth's name in the node's network namespace.
    pub host_if: String,
    /// Its interface index.
    pub host_ifindex: u32,
    /// Its MAC address (`aa:bb:cc:dd:ee:ff`).
    pub host_mac: String,
    /// The MAC address of the pod's own interface.
    pub mac: String,
    /// The CNI attachment's container ID (records written by the CNI plugin).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// The CNI attachment's interface name in the pod.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
    /// The inode number of the pod's network namespace (0: not known), which the TCP
    /// health counters are kept by and the kernel drop program watches.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub netns_inode: u64,
    /// The cookie of the pod's network namespace (0: not known), which the socket layer's
    /// events name the client by.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub netns_cookie: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why an endpoint record could not be used.
#[derive(Debug, thiserror::Error)]
#[error("endpoint record {path}: {reason}")]
pub struct EndpointRecordError {
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

impl EndpointRecord {
    /// Parses a MAC address written as six colon-separated hex bytes.
    pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(out)
    }

    /// Reads and checks one record.
    pub fn read(path: &Path) -> Result<EndpointRecord, EndpointRecordError> {
        let err = |reason: String| EndpointRecordError {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let r: EndpointRecord = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        r.check().map_err(err)?;
        Ok(r)
    }

    /// Checks a record's fields; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        let r = self;
        let err = |s: String| s;
        if r.uid.is_empty() || r.uid.contains('/') || r.uid.starts_with('.') {
            return Err(format!("uid: {:?} cannot name a record file", r.uid));
        }
        if Self::parse_mac(&r.mac).is_none() {
            return Err(err(format!("mac: {:?} is not a MAC address", r.mac)));
        }
        if Self::parse_mac(&r.host_mac).is_none() {
            return Err(err(format!(
                "hostMac: {:?} is not a MAC address",
                r.host_mac
            )));
        }
        if r.host_ifindex == 0 {
            return Err(err("hostIfindex: must be greater than 0".into()));
        }
        Ok(())
    }

    /// Writes the record as `<dir>/<uid>.json`, atomically (a reader never sees half a file).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.json.tmp", self.uid));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("json"))?;
        std::fs::rename(&tmp, dir.join(format!("{}.json", self.uid)))
    }

    /// Removes the record `<dir>/<uid>.json`; true if it was there.
    pub fn remove(dir: &Path, uid: &str) -> std::io::Result<bool> {
        match std::fs::remove_file(dir.join(format!("{uid}.json"))) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every valid record in `dir`, and the errors of the invalid ones.
    pub fn read_dir(dir: &Path) -> (Vec<EndpointRecord>, Vec<EndpointRecordError>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let Ok(rd) = std::fs::read_dir(dir) else {
            return (ok, bad);
        };
        let mut paths: Vec<_> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        for p in paths {
            match Self::read(&p) {
                Ok(r) => ok.push(r),
                Err(e) => bad.push(e),
            }
        }
        (ok, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            EndpointRecord::parse_mac("02:42:ac:11:00:0a"),
            Some([2, 0x42, 0xac, 0x11, 0, 0x0a])
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:0a:01",
            "2:42:ac:11:00:0a",
            "zz:42:ac:11:00:0a",
        ] {
            assert_eq!(EndpointRecord::parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_name_the_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let r = EndpointRecord {
            pod: "default/a".into(),
            uid: "u1".into(),
            ips: vec!["10.244.1.5".parse().expect("ip")],
            host_if: "lxc1".into(),
            host_ifindex: 7,
            host_mac: "02:00:00:00:00:01".into(),
            mac: "02:00:00:00:00:02".into(),
            container_id: String::new(),
            ifname: String::new(),
            netns_inode: 4026532000,
            netns_cookie: 0,
        };
        r.write(dir.path()).expect("write");
        let bad = EndpointRecord {
            uid: "u2".into(),
            mac: "nope".into(),
            ..r.clone()
        };
        bad.write(dir.path()).expect("write");
        let (ok, errs) = EndpointRecord::read_dir(dir.path());
        assert_eq!(ok, vec![r]);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].to_string().contains("u2.json: mac: \"nope\""),
            "{}",
            errs[0]
        );
    }
}
