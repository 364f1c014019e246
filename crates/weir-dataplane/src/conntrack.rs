//! Stale UDP conntrack entries under the netfilter dataplanes, reconciled the way kube-proxy
//! came to do it (kubernetes#127318): the kernel's UDP entries are listed, and an entry whose
//! original destination is a frontend weir programs, that was translated (its reply comes
//! from another address or port), and whose reply source is none of that frontend's backends
//! any more (nor a standby one, kept for its flows) is deleted, so the flow's next datagram
//! is translated again. A frontend without backends has all of its translated entries
//! deleted (the 0-endpoint case kube-proxy's first reconciler missed, #139628). Entries of
//! addresses weir does not serve, and untranslated ones, are left alone. (The eBPF dataplane
//! closes connected UDP sockets instead: see `sockets`.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use weir_control::lb::{Backend, LbState, Proto, Scope};

use crate::DataplaneError;

/// One UDP conntrack entry: its original tuple and where its replies come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpEntry {
    /// Original source.
    pub src: IpAddr,
    /// Original destination (the frontend, when weir translated it).
    pub dst: IpAddr,
    /// Original source port.
    pub sport: u16,
    /// Original destination port.
    pub dport: u16,
    /// Where replies come from (the backend, when translated).
    pub reply_src: Backend,
}

/// The entries of `conntrack -L -p udp` output.
pub fn parse(text: &str) -> Vec<UdpEntry> {
    text.lines()
        .filter_map(|l| {
            let fields: Vec<(&str, &str)> = l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            let get = |name: &str, nth: usize| {
                fields
                    .iter()
                    .filter(|(k, _)| *k == name)
                    .nth(nth)
                    .map(|(_, v)| *v)
            };
            Some(UdpEntry {
                src: get("src", 0)?.parse().ok()?,
                dst: get("dst", 0)?.parse().ok()?,
                sport: get("sport", 0)?.parse().ok()?,
                dport: get("dport", 0)?.parse().ok()?,
                reply_src: Backend {
                    ip: get("src", 1)?.parse().ok()?,
                    port: get("sport", 1)?.parse().ok()?,
                },
            })
        })
        .collect()
}

/// The entries of `entries` that are stale for `state` (see the module's text). `local`
/// holds the node's addresses (NodePorts answer on each).
pub fn stale<'a>(
    entries: &'a [UdpEntry],
    state: &LbState,
    local: &BTreeSet<IpAddr>,
) -> Vec<&'a UdpEntry> {
    // (address or unspecified, port) -> the backends still valid.
    let mut valid: BTreeMap<(IpAddr, u16), BTreeSet<Backend>> = BTreeMap::new();
    for (k, fe) in &state.frontends {
        if k.proto != Proto::Udp {
            continue;
        }
        valid
            .entry((k.vip, k.port))
            .or_default()
            .extend(fe.backends.iter().chain(&fe.standby).copied());
    }
    let unspecified = |ip: IpAddr| -> IpAddr {
        if ip.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        }
    };
    entries
        .iter()
        .filter(|e| {
            let translated = e.reply_src.ip != e.dst || e.reply_src.port != e.dport;
            if !translated {
                return false;
            }
            let served = valid.get(&(e.dst, e.dport)).or_else(|| {
                local
                    .contains(&e.dst)
                    .then(|| valid.get(&(unspecified(e.dst), e.dport)))
                    .flatten()
            });
            served.is_some_and(|backends| !backends.contains(&e.reply_src))
        })
        .collect()
}

fn conntrack(netns: Option<&Path>, args: &[&str]) -> Result<String, DataplaneError> {
    crate::exec::run(netns, "conntrack", args, None)
}

/// The addresses of the namespace `netns` (where NodePorts answer).
fn local_addresses(netns: Option<&Path>) -> Result<BTreeSet<IpAddr>, DataplaneError> {
    let text = crate::exec::run(netns, "ip", &["-o", "addr", "show"], None)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet" || *x == "inet6")?;
            w.get(i + 1)?.split('/').next()?.parse().ok()
        })
        .collect())
}

/// Deletes the stale UDP entries of the namespace `netns` for `state`; returns how many.
/// An entry gone meanwhile (it expired) is not an error.
pub fn reconcile_udp(netns: Option<&Path>, state: &LbState) -> Result<usize, DataplaneError> {
    let local = local_addresses(netns)?;
    let mut deleted = 0;
    for family in ["ipv4", "ipv6"] {
        let entries = parse(&conntrack(netns, &["-L", "-p", "udp", "-f", family])?);
        for e in stale(&entries, state, &local) {
            let (src, dst, sport, dport) = (
                e.src.to_string(),
                e.dst.to_string(),
                e.sport.to_string(),
                e.dport.to_string(),
            );
            let args = [
                "-D",
                "-p",
                "udp",
                "-f",
                family,
                "--orig-src",
                &src,
                "--orig-dst",
                &dst,
                "--orig-port-src",
                &sport,
                "--orig-port-dst",
                &dport,
            ];
            if conntrack(netns, &args).is_ok() {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// How many of the kernel's conntrack entries in `netns` carry `mark` (the flows a switch
/// handed over that are still there).
pub fn count_marked(netns: Option<&Path>, mark: u32) -> Result<usize, DataplaneError> {
    let mark = mark.to_string();
    let text = conntrack(netns, &["-L", "--mark", &mark])?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Runs the reconciliation when it can find something: after the first apply (a restarted
/// agent) and whenever a UDP frontend lost a backend or a frontend went away.
#[derive(Debug, Default)]
pub struct UdpReconciler {
    last: Option<BTreeMap<(IpAddr, u16, Scope), BTreeSet<Backend>>>,
}

impl UdpReconciler {
    /// After an apply of `state` in `netns`: deletes what became stale; returns how many
    /// (errors are logged: the next change tries again).
    pub fn after_apply(&mut self, netns: Option<&Path>, state: &LbState) -> usize {
        let now: BTreeMap<(IpAddr, u16, Scope), BTreeSet<Backend>> = state
            .frontends
            .iter()
            .filter(|(k, _)| k.proto == Proto::Udp)
            .map(|(k, fe)| {
                let valid = fe.backends.iter().chain(&fe.standby).copied().collect();
                ((k.vip, k.port, k.scope), valid)
            })
            .collect();
        let needed = match &self.last {
            None => !now.is_empty(),
            Some(last) => last
                .iter()
                .any(|(k, had)| now.get(k).is_none_or(|has| !had.is_subset(has))),
        };
        self.last = Some(now);
        if !needed {
            return 0;
        }
        match reconcile_udp(netns, state) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "clearing stale UDP conntrack entries");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_control::lb::{Frontend, FrontendKey};

    const LIST: &str = "\
udp      17 29 src=10.244.1.2 dst=10.96.0.7 sport=40000 dport=53 src=10.244.1.5 dst=10.244.1.2 sport=5353 dport=40000 mark=0 use=1
udp      17 25 src=10.244.1.2 dst=10.96.0.9 sport=40001 dport=53 [UNREPLIED] src=10.244.2.4 dst=10.244.1.2 sport=5353 dport=40001 mark=0 use=1
udp      17 20 src=172.30.0.2 dst=172.30.0.11 sport=5000 dport=30053 src=10.244.1.9 dst=172.30.0.2 sport=5353 dport=5000 mark=0 use=1
udp      17 20 src=10.244.1.2 dst=10.244.1.3 sport=5001 dport=53 src=10.244.1.3 dst=10.244.1.2 sport=53 dport=5001 mark=0 use=1
";

    fn fe(backends: &[&str]) -> Frontend {
        let backends = backends
            .iter()
            .map(|b| Backend {
                ip: b.parse().unwrap(),
                port: 5353,
            })
            .collect();
        Frontend::new("t/s:dns", backends)
    }

    fn key(vip: &str, port: u16, scope: Scope) -> FrontendKey {
        FrontendKey {
            vip: vip.parse().unwrap(),
            port,
            proto: Proto::Udp,
            scope,
        }
    }

    #[test]
    fn only_translated_entries_of_served_frontends_to_departed_backends_are_stale() {
        let entries = parse(LIST);
        assert_eq!(entries.len(), 4);
        let mut st = LbState::default();
        // 10.96.0.7: its backend is still there; 10.96.0.9: it left; the NodePort: no backend
        // at all (every translated entry goes); the pod-to-pod entry is nobody's.
        st.frontends
            .insert(key("10.96.0.7", 53, Scope::Cluster), fe(&["10.244.1.5"]));
        st.frontends
            .insert(key("10.96.0.9", 53, Scope::Cluster), fe(&["10.244.2.5"]));
        st.frontends
            .insert(key("0.0.0.0", 30053, Scope::External), fe(&[]));
        let local: BTreeSet<IpAddr> = ["172.30.0.11".parse().unwrap()].into();
        let gone: Vec<(IpAddr, u16)> = stale(&entries, &st, &local)
            .iter()
            .map(|e| (e.dst, e.dport))
            .collect();
        assert_eq!(
            gone,
            vec![
                ("10.96.0.9".parse().unwrap(), 53),
                ("172.30.0.11".parse().unwrap(), 30053)
            ]
        );
        // A standby backend keeps its flows.
        st.frontends
            .get_mut(&key("10.96.0.9", 53, Scope::Cluster))
            .unwrap()
            .standby = vec![Backend {
            ip: "10.244.2.4".parse().unwrap(),
            port: 5353,
        }];
        assert_eq!(stale(&entries, &st, &local).len(), 1);
    }
}
