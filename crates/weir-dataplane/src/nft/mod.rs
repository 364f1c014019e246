//! The nftables dataplane: the same desired state as the eBPF one, rendered into one table
//! per family (`ip weir`, `ip6 weir`, see [`render`]) and written with `nft -j -f -`, one
//! process and one atomic transaction per apply. The first apply (and the one after a failed
//! one) replaces the tables whole in one transaction; later ones touch only the objects of the
//! frontends that changed.

pub mod expr;
pub mod hold;
pub mod policy;
pub mod prefilter;
mod read;
pub mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use weir_control::lb::{FrontendKey, LbState};

pub use render::NodeNet;
use render::{FrontendObjects, TABLE};

use crate::{ApplyStats, Dataplane, DataplaneError, Dump};
use expr::Family;

/// Runs `nft ARGS` (in the network namespace `netns`, if given) with `input` on stdin.
fn nft(netns: Option<&Path>, args: &[&str], input: Option<&str>) -> Result<String, DataplaneError> {
    crate::exec::run(netns, "nft", args, input)
}

/// Runs `cmds` as one nft transaction.
fn transaction(netns: Option<&Path>, cmds: &[Value]) -> Result<(), DataplaneError> {
    if cmds.is_empty() {
        return Ok(());
    }
    let doc = json!({ "nftables": cmds }).to_string();
    nft(netns, &["-j", "-f", "-"], Some(&doc)).map(|_| ())
}

/// Replaces the NetworkPolicy table with `cmds` (from [`policy::render`]) in one transaction.
pub fn write_policy(netns: Option<&Path>, cmds: &[Value]) -> Result<(), DataplaneError> {
    transaction(netns, cmds)
}

/// The nftables dataplane of one node.
pub struct NftDataplane {
    netns: Option<PathBuf>,
    node: NodeNet,
    /// What the tables hold, per frontend, when known; None: the next apply writes them whole.
    applied: Option<BTreeMap<FrontendKey, FrontendObjects>>,
    udp: crate::conntrack::UdpReconciler,
}

impl NftDataplane {
    /// A dataplane writing into the network namespace `netns` (None: this process's). Nothing
    /// is written before the first apply; `nft` must run.
    pub fn new(netns: Option<PathBuf>, node: NodeNet) -> Result<Self, DataplaneError> {
        nft(netns.as_deref(), &["--version"], None)?;
        Ok(NftDataplane {
            netns,
            node,
            applied: None,
            udp: Default::default(),
        })
    }

    /// Changes the node's settings (devices, masquerading); written at once when the tables
    /// exist, else with the first apply.
    pub fn set_node(&mut self, node: NodeNet) -> Result<(), DataplaneError> {
        if node == self.node {
            return Ok(());
        }
        self.node = node;
        if self.applied.is_some() {
            let cmds: Vec<Value> = [Family::Ip, Family::Ip6]
                .into_iter()
                .flat_map(|f| render::node_settings(f, &self.node))
                .collect();
            if let Err(e) = transaction(self.netns.as_deref(), &cmds) {
                self.applied = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes weir's tables (the policy table too) from the namespace (a node leaving
    /// the nftables dataplane). Established flows keep their translation: it lives in the
    /// kernel's conntrack.
    pub fn remove(netns: Option<&Path>) -> Result<(), DataplaneError> {
        let cmds: Vec<Value> = [
            ("ip", TABLE),
            ("ip6", TABLE),
            ("inet", policy::TABLE),
            ("inet", prefilter::TABLE),
        ]
        .into_iter()
        .flat_map(|(family, name)| {
            let t = json!({"family": family, "name": name});
            [
                expr::cmd("add", "table", t.clone()),
                expr::cmd("delete", "table", t),
            ]
        })
        .collect();
        transaction(netns, &cmds)
    }

    /// The whole ruleset of the tables as nft prints it in JSON.
    fn listing(&self) -> Result<Vec<Value>, DataplaneError> {
        let mut out = Vec::new();
        for f in [Family::Ip, Family::Ip6] {
            let text = match nft(
                self.netns.as_deref(),
                &["-j", "list", "table", f.name(), TABLE],
                None,
            ) {
                Ok(t) => t,
                // Not written yet.
                Err(_) if self.applied.is_none() => continue,
                Err(e) => return Err(e),
            };
            let doc: Value = serde_json::from_str(&text)
                .map_err(|e| DataplaneError::Netfilter(format!("nft printed invalid JSON: {e}")))?;
            out.extend(doc["nftables"].as_array().cloned().unwrap_or_default());
        }
        Ok(out)
    }
}

impl Dataplane for NftDataplane {
    fn apply(&mut self, state: &LbState) -> Result<ApplyStats, DataplaneError> {
        let want = render::frontends(state);
        let mut stats = ApplyStats::default();
        let mut cmds = Vec::new();
        let no_chains = BTreeMap::new();
        match &self.applied {
            None => {
                for f in [Family::Ip, Family::Ip6] {
                    cmds.extend(render::skeleton(f, &self.node));
                }
                for fe in want.values() {
                    cmds.extend(render::add_frontend(fe));
                    stats.frontends_updated += 1;
                    stats.backends_added += fe.chains.len().saturating_sub(1);
                }
            }
            Some(old) => {
                for (k, new) in &want {
                    let before = old.get(k);
                    if before == Some(new) {
                        continue;
                    }
                    stats.frontends_updated += 1;
                    let had = before.map_or(&no_chains, |o| &o.chains);
                    stats.backends_added += new
                        .chains
                        .keys()
                        .filter(|c| c.starts_with("be-") && !had.contains_key(*c))
                        .count();
                    stats.backends_removed += had
                        .keys()
                        .filter(|c| c.starts_with("be-") && !new.chains.contains_key(*c))
                        .count();
                    cmds.extend(match before {
                        Some(o) => render::change_frontend(o, new),
                        None => render::add_frontend(new),
                    });
                }
                for (k, o) in old {
                    if !want.contains_key(k) {
                        stats.frontends_removed += 1;
                        stats.backends_removed +=
                            o.chains.keys().filter(|c| c.starts_with("be-")).count();
                        cmds.extend(render::delete_unused(o, None));
                    }
                }
            }
        }
        if let Err(e) = transaction(self.netns.as_deref(), &cmds) {
            self.applied = None;
            return Err(e);
        }
        self.applied = Some(want);
        stats.udp_flows_cleared = self.udp.after_apply(self.netns.as_deref(), state);
        Ok(stats)
    }

    fn dump(&self) -> Result<Dump, DataplaneError> {
        let listing = self.listing()?;
        Ok(read::dump(&listing))
    }

    fn limits(&self, state: &LbState) -> Vec<weir_control::lb::Warning> {
        render::limits(state)
    }

    fn kind(&self) -> crate::DataplaneKind {
        crate::DataplaneKind::Nftables
    }

    fn set_masquerade(&mut self, nets: Option<Vec<ipnet::Ipv4Net>>) -> Result<(), DataplaneError> {
        let node = NodeNet {
            masquerade: nets,
            ..self.node.clone()
        };
        self.set_node(node)
    }
}
