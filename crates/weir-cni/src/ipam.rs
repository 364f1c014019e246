//! Address allocation from the node's pod CIDRs, with state on disk: one file per address in
//! use, named by the address and holding the attachment (`containerID` and interface), as
//! host-local keeps them (containernetworking/plugins plugins/ipam/host-local/backend/disk).
//! Every change happens under an exclusive lock of the directory, so concurrent ADDs never
//! hand out one address twice; a released address is free for the next ADD at once.

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::spec::{code, CniError};

/// The allocation state of one network on one node.
pub struct Store {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CniError + '_ {
    move |e| CniError::new(code::IO, format!("{}: {e}", path.display()))
}

/// The attachment an address belongs to, as written in its file.
fn owner(container_id: &str, ifname: &str) -> String {
    format!("{container_id}\n{ifname}")
}

impl Store {
    /// Opens `dir` (creating it) and takes its lock, waiting for another holder.
    pub fn lock(dir: &Path) -> Result<Store, CniError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock =
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
                CniError::new(code::IO, format!("locking {}: {e}", lock_path.display()))
            })?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn path_of(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// Every address in use with its attachment `(containerID, ifname)`.
    pub fn allocations(&self) -> Vec<(IpAddr, String, String)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<_> = rd
            .flatten()
            .filter_map(|e| {
                let ip: IpAddr = e.file_name().to_str()?.parse().ok()?;
                let text = std::fs::read_to_string(e.path()).ok()?;
                let (c, i) = text.split_once('\n').unwrap_or((text.as_str(), ""));
                Some((ip, c.trim().to_string(), i.trim().to_string()))
            })
            .collect();
        out.sort();
        out
    }

    /// The addresses held by an attachment.
    pub fn held_by(&self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        self.allocations()
            .into_iter()
            .filter(|(_, c, i)| c == container_id && i == ifname)
            .map(|(ip, _, _)| ip)
            .collect()
    }

    /// One address from each range for an attachment: the lowest free one of the range
    /// (network address and the first host address left out). An attachment that already holds
    /// addresses gets them again. On a full range nothing is allocated and the error names it.
    pub fn allocate(
        &mut self,
        ranges: &[IpNet],
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<IpAddr>, CniError> {
        let held = self.held_by(container_id, ifname);
        let in_use: std::collections::BTreeSet<IpAddr> = self
            .allocations()
            .into_iter()
            .map(|(ip, _, _)| ip)
            .collect();
        let mut picked = Vec::new();
        for range in ranges {
            if let Some(ip) = held.iter().find(|ip| range.contains(*ip)) {
                picked.push(*ip);
                continue;
            }
            let free = candidates(range).find(|ip| !in_use.contains(ip));
            match free {
                Some(ip) => picked.push(ip),
                None => {
                    return Err(CniError::new(
                        code::ADDRESSES_EXHAUSTED,
                        format!("no free address in range {range}"),
                    ))
                }
            }
        }
        let mut written: Vec<PathBuf> = Vec::new();
        for ip in &picked {
            if held.contains(ip) {
                continue;
            }
            let path = self.path_of(*ip);
            let wrote = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)
                .and_then(|mut f| {
                    f.write_all(owner(container_id, ifname).as_bytes())?;
                    f.sync_all()
                });
            if let Err(e) = wrote {
                // All or nothing: what this call wrote goes again.
                let _ = std::fs::remove_file(&path);
                for w in &written {
                    let _ = std::fs::remove_file(w);
                }
                return Err(io(&path)(e));
            }
            written.push(path);
        }
        Ok(picked)
    }

    /// Releases every address of an attachment; returns them.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        let held = self.held_by(container_id, ifname);
        for ip in &held {
            let _ = std::fs::remove_file(self.path_of(*ip));
        }
        held
    }

    /// Releases the addresses of every attachment `keep` rejects; returns them.
    pub fn release_unless(&mut self, keep: impl Fn(&str, &str) -> bool) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (ip, c, i) in self.allocations() {
            if !keep(&c, &i) {
                let _ = std::fs::remove_file(self.path_of(ip));
                out.push(ip);
            }
        }
        out
    }
}

/// The host addresses of `range` handed out, in order: from the second host address up (the
/// first is left for a node address), IPv4's broadcast address left out.
fn candidates(range: &IpNet) -> Box<dyn Iterator<Item = IpAddr>> {
    match range {
        IpNet::V4(n) => {
            let base = u32::from(n.network());
            let size: u64 = 1u64 << (32 - n.prefix_len());
            Box::new((2..size.saturating_sub(1)).map(move |i| IpAddr::V4((base + i as u32).into())))
        }
        IpNet::V6(n) => {
            let base = u128::from(n.network());
            let bits = 128 - n.prefix_len() as u32;
            let size: u128 = if bits >= 64 {
                1u128 << 64
            } else {
                1u128 << bits
            };
            Box::new((2..size).map(move |i| IpAddr::V6((base + i).into())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_reuse_and_exhaustion() {
        let dir = tempfile::tempdir().unwrap();
        let ranges: Vec<IpNet> = vec![
            "10.0.0.0/29".parse().unwrap(),
            "fd00::/120".parse().unwrap(),
        ];
        let mut s = Store::lock(dir.path()).unwrap();
        let a = s.allocate(&ranges, "a", "eth0").unwrap();
        assert_eq!(
            a,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        // The same attachment again: the same addresses.
        assert_eq!(s.allocate(&ranges, "a", "eth0").unwrap(), a);
        let b = s.allocate(&ranges, "b", "eth0").unwrap();
        assert_eq!(b[0], "10.0.0.3".parse::<IpAddr>().unwrap());
        // A released address is handed out again at once.
        assert_eq!(s.release("a", "eth0"), a);
        assert_eq!(s.allocate(&ranges, "c", "eth0").unwrap(), a);
        // .2 to .6 (five addresses; .7 is broadcast): c, b, then three more, then full.
        for id in ["d", "e", "f"] {
            s.allocate(&ranges, id, "eth0").unwrap();
        }
        let e = s.allocate(&ranges, "g", "eth0").unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (100, "no free address in range 10.0.0.0/29")
        );
        // Nothing of the failed ADD was kept.
        assert!(s.held_by("g", "eth0").is_empty());
        let gone = s.release_unless(|c, _| c == "b");
        assert_eq!(gone.len(), 8);
        assert_eq!(s.allocations().len(), 2);
    }
}
