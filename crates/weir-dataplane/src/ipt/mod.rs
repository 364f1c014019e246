//! The iptables dataplane: the same desired state rendered as iptables-restore text
//! ([`render`]) in kube-proxy's layout, written with `iptables-restore --noflush` (and
//! `ip6tables-restore`): each table is replaced atomically (weir's chains declared, so
//! emptied, and filled in one restore), chains of removed frontends deleted in the same
//! restore. The kernel chains get one jump each to weir's chains, added once. The backend is
//! the host's `iptables-restore` (legacy or nft, whichever the distribution chose) or one
//! named explicitly.

pub mod policy;
pub mod prefilter;
mod read;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use weir_control::lb::{FrontendKey, LbState};

use crate::nft::expr::Family;
use crate::nft::NodeNet;
use crate::{ApplyStats, Dataplane, DataplaneError, Dump};
use render::FrontendRules;

/// Which iptables binaries write the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IptablesBackend {
    /// The host's `iptables-restore` (Debian's default is the nf_tables one).
    #[default]
    Auto,
    /// `iptables-legacy-restore` (the x_tables kernel interface).
    Legacy,
    /// `iptables-nft-restore`.
    Nft,
}

impl std::str::FromStr for IptablesBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IptablesBackend::Auto),
            "legacy" => Ok(IptablesBackend::Legacy),
            "nft" => Ok(IptablesBackend::Nft),
            other => Err(format!(
                "unknown iptables backend {other:?} (use auto, legacy or nft)"
            )),
        }
    }
}

impl IptablesBackend {
    /// The binary for `tool` (`iptables`, `iptables-restore`, `iptables-save`) of family `f`.
    fn binary(self, f: Family, tool: &str) -> String {
        let base = if f == Family::Ip {
            "iptables"
        } else {
            "ip6tables"
        };
        let rest = tool.trim_start_matches("iptables");
        match self {
            IptablesBackend::Auto => format!("{base}{rest}"),
            IptablesBackend::Legacy => format!("{base}-legacy{rest}"),
            IptablesBackend::Nft => format!("{base}-nft{rest}"),
        }
    }
}

use crate::exec::run;

/// The chains of an `iptables-save` text whose names `keep` accepts.
fn chains_in(saved: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| keep(n))
        .map(str::to_string)
        .collect()
}

/// The arguments of `iptables OP KCHAIN -j CHAIN` (commented `weir`) in `table`.
fn jump_rule<'a>(
    op: &'a str,
    (table, kchain, chain): (&'a str, &'a str, &'a str),
) -> [&'a str; 11] {
    [
        "-w",
        "-t",
        table,
        op,
        kchain,
        "-j",
        chain,
        "-m",
        "comment",
        "--comment",
        "weir",
    ]
}

/// The jump `-A KCHAIN -j CHAIN` (commented `weir`) in `table`, added at the top of the
/// kernel chain unless there (`-C` first, so a restarted agent adds none twice).
fn ensure_jump(
    netns: Option<&Path>,
    bin: &str,
    (table, kchain, chain): (&str, &str, &str),
) -> Result<(), DataplaneError> {
    let rule = jump_rule("-C", (table, kchain, chain));
    if run(netns, bin, &rule, None).is_ok() {
        return Ok(());
    }
    run(netns, bin, &jump_rule("-I", (table, kchain, chain)), None).map(|_| ())
}

/// Writes NetworkPolicy (see [`policy`]) for both families: each family's filter table in
/// one restore (the policy's chains replaced, chains of pods no longer isolated deleted), and
/// the jumps from FORWARD and INPUT added once.
pub fn write_policy(
    netns: Option<&Path>,
    backend: IptablesBackend,
    state: &weir_control::policy::PolicyState,
    ip_dev: &std::collections::HashMap<std::net::IpAddr, String>,
) -> Result<(), DataplaneError> {
    for f in [Family::Ip, Family::Ip6] {
        let saved = run(
            netns,
            &backend.binary(f, "iptables-save"),
            &["-t", "filter"],
            None,
        )?;
        let stale = chains_in(&saved, policy::is_policy_chain);
        let text = policy::render(f, state, ip_dev, &stale);
        run(
            netns,
            &backend.binary(f, "iptables-restore"),
            &["-w", "--noflush"],
            Some(&text),
        )?;
        let bin = backend.binary(f, "iptables");
        for (kchain, chain) in policy::HOOKS {
            ensure_jump(netns, &bin, ("filter", kchain, chain))?;
        }
    }
    Ok(())
}

/// What one family's tables hold.
struct Applied {
    frontends: BTreeMap<FrontendKey, FrontendRules>,
    text: (String, String),
    /// When the tables were last restored whole.
    full_at: std::time::Instant,
}

/// How long partial restores go on before the tables are restored whole again (what another
/// writer changed in a frontend's chains is then undone), as kube-proxy's hourly full sync.
const FULL_RESTORE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The iptables dataplane of one node.
pub struct IptablesDataplane {
    netns: Option<PathBuf>,
    node: NodeNet,
    backend: IptablesBackend,
    /// Per family, what was last written; None: not known (the next apply reads the kernel's
    /// chains to delete stale ones).
    applied: BTreeMap<Family, Applied>,
    hooked: bool,
    udp: crate::conntrack::UdpReconciler,
}

impl IptablesDataplane {
    /// A dataplane writing into the network namespace `netns` (None: this process's).
    pub fn new(
        netns: Option<PathBuf>,
        node: NodeNet,
        backend: IptablesBackend,
    ) -> Result<Self, DataplaneError> {
        run(
            netns.as_deref(),
            &backend.binary(Family::Ip, "iptables-restore"),
            &["--version"],
            None,
        )?;
        Ok(IptablesDataplane {
            netns,
            node,
            backend,
            applied: BTreeMap::new(),
            hooked: false,
            udp: Default::default(),
        })
    }

    fn save(&self, f: Family, table: &str) -> Result<String, DataplaneError> {
        run(
            self.netns.as_deref(),
            &self.backend.binary(f, "iptables-save"),
            &["-t", table],
            None,
        )
    }

    /// weir's per-frontend chains in family `f`'s nat table now.
    fn kernel_frontend_chains(&self, f: Family) -> Result<BTreeSet<String>, DataplaneError> {
        Ok(chains_in(&self.save(f, "nat")?, |n| {
            n.starts_with("WEIR-FE-") || n.starts_with("WEIR-BE-")
        })
        .into_iter()
        .collect())
    }

    /// Jumps from the kernel chains to weir's (once per process; `-C` first, so a restarted
    /// agent adds none twice).
    fn hook(&mut self) -> Result<(), DataplaneError> {
        if self.hooked {
            return Ok(());
        }
        for f in [Family::Ip, Family::Ip6] {
            let bin = self.backend.binary(f, "iptables");
            for hook in render::HOOKS {
                ensure_jump(self.netns.as_deref(), &bin, hook)?;
            }
        }
        self.hooked = true;
        Ok(())
    }

    fn restore(&self, f: Family, text: &str) -> Result<(), DataplaneError> {
        run(
            self.netns.as_deref(),
            &self.backend.binary(f, "iptables-restore"),
            &["-w", "--noflush"],
            Some(text),
        )
        .map(|_| ())
    }

    /// Removes weir's jumps and chains from the namespace (a node leaving the iptables
    /// dataplane), with the binaries of `backend`; what is not there is skipped.
    pub fn remove(netns: Option<&Path>, backend: IptablesBackend) -> Result<(), DataplaneError> {
        for f in [Family::Ip, Family::Ip6] {
            let mut found = Vec::new();
            for table in ["nat", "filter", "raw"] {
                let saved = run(
                    netns,
                    &backend.binary(f, "iptables-save"),
                    &["-t", table],
                    None,
                )?;
                let chains = chains_in(&saved, |n| n.starts_with("WEIR-"));
                if !chains.is_empty() {
                    found.push((table, chains));
                }
            }
            // No chain of weir's, no jump to one (a jump needs its target): nothing to do.
            if found.is_empty() {
                continue;
            }
            let bin = backend.binary(f, "iptables");
            let hooks = render::HOOKS
                .iter()
                .copied()
                .chain(policy::HOOKS.iter().map(|(k, c)| ("filter", *k, *c)))
                .chain([("raw", "PREROUTING", prefilter::CHAIN)]);
            for (table, kchain, chain) in hooks {
                let rule = jump_rule("-D", (table, kchain, chain));
                let _ = run(netns, &bin, &rule, None);
            }
            for (table, chains) in found {
                let mut text = format!("*{table}\n");
                for c in &chains {
                    text.push_str(&format!(":{c} - [0:0]\n"));
                }
                for c in &chains {
                    text.push_str(&format!("-X {c}\n"));
                }
                text.push_str("COMMIT\n");
                run(
                    netns,
                    &backend.binary(f, "iptables-restore"),
                    &["-w", "--noflush"],
                    Some(&text),
                )?;
            }
        }
        Ok(())
    }

    fn apply_family(
        &mut self,
        f: Family,
        state: &LbState,
        stats: &mut ApplyStats,
    ) -> Result<(), DataplaneError> {
        let want = render::frontends(state, f);
        let had: BTreeSet<String> = match self.applied.get(&f) {
            Some(a) => a
                .frontends
                .values()
                .flat_map(|r| r.chains.keys().cloned())
                .collect(),
            None => self.kernel_frontend_chains(f)?,
        };
        let now: BTreeSet<String> = want
            .values()
            .flat_map(|r| r.chains.keys().cloned())
            .collect();
        let stale: Vec<String> = had.difference(&now).cloned().collect();
        let text = render::tables(f, &self.node, &want, &stale);
        let old = self.applied.get(&f);
        for (k, r) in &want {
            if old.and_then(|a| a.frontends.get(k)) != Some(r) {
                stats.frontends_updated += 1;
            }
        }
        if let Some(a) = old {
            stats.frontends_removed += a
                .frontends
                .keys()
                .filter(|k| !want.contains_key(*k))
                .count();
            if a.text == text {
                return Ok(());
            }
        }
        stats.backends_added += now
            .iter()
            .filter(|c| c.starts_with("WEIR-BE-") && !had.contains(*c))
            .count();
        stats.backends_removed += stale.iter().filter(|c| c.starts_with("WEIR-BE-")).count();
        // Partial: only the chains of frontends that changed are written (the dispatch chains
        // whole), while the kernel's are known to be this agent's last restore.
        let partial = old
            .filter(|a| a.full_at.elapsed() < FULL_RESTORE_EVERY)
            .map(|a| {
                let only: BTreeSet<String> = want
                    .iter()
                    .filter(|(k, r)| a.frontends.get(*k) != Some(*r))
                    .flat_map(|(_, r)| r.chains.keys().cloned())
                    .collect();
                (
                    render::tables_partial(f, &self.node, &want, &stale, &only),
                    a.full_at,
                )
            });
        self.write(f, want, text, partial)
    }

    /// Restores family `f`'s tables from `text` (or from `partial`'s text, keeping its time of
    /// the last whole restore) and records what they hold (nothing, until the restore
    /// succeeded).
    fn write(
        &mut self,
        f: Family,
        frontends: BTreeMap<FrontendKey, FrontendRules>,
        text: (String, String),
        partial: Option<((String, String), std::time::Instant)>,
    ) -> Result<(), DataplaneError> {
        self.applied.remove(&f);
        let full_at = match partial {
            Some((p, at)) => {
                self.restore(f, &format!("{}{}", p.0, p.1))?;
                at
            }
            None => {
                self.restore(f, &format!("{}{}", text.0, text.1))?;
                std::time::Instant::now()
            }
        };
        self.applied.insert(
            f,
            Applied {
                frontends,
                text,
                full_at,
            },
        );
        Ok(())
    }
}

impl Dataplane for IptablesDataplane {
    fn apply(&mut self, state: &LbState) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        for f in [Family::Ip, Family::Ip6] {
            self.apply_family(f, state, &mut stats)?;
        }
        self.hook()?;
        stats.udp_flows_cleared = self.udp.after_apply(self.netns.as_deref(), state);
        Ok(stats)
    }

    fn dump(&self) -> Result<Dump, DataplaneError> {
        let mut saved = Vec::new();
        for f in [Family::Ip, Family::Ip6] {
            saved.push((f, self.save(f, "nat")?, self.save(f, "filter")?));
        }
        Ok(read::dump(&saved))
    }

    fn limits(&self, state: &LbState) -> Vec<weir_control::lb::Warning> {
        crate::nft::render::limits(state)
    }

    fn kind(&self) -> crate::DataplaneKind {
        crate::DataplaneKind::Iptables
    }

    fn set_masquerade(&mut self, nets: Option<Vec<ipnet::Ipv4Net>>) -> Result<(), DataplaneError> {
        if self.node.masquerade == nets {
            return Ok(());
        }
        self.node.masquerade = nets;
        // The base chains written so far are written again with the new settings (the
        // frontends' chains do not change).
        for (f, a) in std::mem::take(&mut self.applied) {
            let text = render::tables(f, &self.node, &a.frontends, &[]);
            let base = render::tables_partial(f, &self.node, &a.frontends, &[], &BTreeSet::new());
            self.write(f, a.frontends, text, Some((base, a.full_at)))?;
        }
        Ok(())
    }
}
