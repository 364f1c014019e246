//! `weir cni install|uninstall`: puts the CNI plugin on a node as the DaemonSet's init
//! container does (the binary into the runtime's plugin directory, the configuration list
//! into its configuration directory), or takes it away again. Both replace files atomically
//! (write beside, then rename), so a runtime never executes or reads half a file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub(crate) enum CniCommand {
    /// Install weir-cni into --bin-dir and its configuration list into --conf-dir.
    Install(CniDirs),
    /// Remove what install put there.
    Uninstall(CniDirs),
}

#[derive(Args, Debug)]
pub(crate) struct CniDirs {
    /// The runtime's plugin directory (in a DaemonSet: the host's /opt/cni/bin mounted).
    #[arg(long, env = "WEIR_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The runtime's configuration directory (the host's /etc/cni/net.d).
    #[arg(long, env = "WEIR_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The plugin binary to install (default: weir-cni beside this executable).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The agent's socket, as the plugin will reach it on the node.
    #[arg(long, env = "WEIR_SOCKET", default_value = "/run/weir/agent.sock")]
    pub agent_socket: PathBuf,
    /// The agent's endpoint directory on the node.
    #[arg(long, env = "WEIR_ENDPOINT_DIR", default_value = "/run/weir/endpoints")]
    pub endpoint_dir: PathBuf,
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.weir-tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn install(d: &CniDirs) -> Result<()> {
    let plugin = match &d.plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("weir-cni"),
    };
    let bytes = std::fs::read(&plugin).with_context(|| {
        format!(
            "reading the plugin {} (hint: --plugin PATH)",
            plugin.display()
        )
    })?;
    if !bytes.starts_with(b"\x7fELF") {
        bail!("{} is not an executable (ELF) file", plugin.display());
    }
    let bin = d.bin_dir.join("weir-cni");
    write_atomically(&bin, &bytes, 0o755)?;
    let conf = d.conf_dir.join(weir_cni::CONFLIST_NAME);
    // 1.0.0 declared, 1.1.0 offered in cniVersions: runtimes built on libcni before 1.2
    // (containerd 1.6, CRI-O of that time) refuse a 1.1.0 configuration; newer ones pick 1.1.0.
    let list = weir_cni::conflist("1.0.0", &d.agent_socket, &d.endpoint_dir, None);
    write_atomically(
        &conf,
        serde_json::to_string_pretty(&list)?.as_bytes(),
        0o644,
    )?;
    eprintln!("installed {} and {}", bin.display(), conf.display());
    Ok(())
}

fn uninstall(d: &CniDirs) -> Result<()> {
    for f in [
        d.conf_dir.join(weir_cni::CONFLIST_NAME),
        d.bin_dir.join("weir-cni"),
    ] {
        match std::fs::remove_file(&f) {
            Ok(()) => eprintln!("removed {}", f.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
        }
    }
    Ok(())
}

pub(crate) fn run(cmd: &CniCommand) -> Result<ExitCode> {
    match cmd {
        CniCommand::Install(d) => install(d)?,
        CniCommand::Uninstall(d) => uninstall(d)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_and_uninstall_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("weir-cni-src");
        std::fs::write(&plugin, b"\x7fELF fake").unwrap();
        let d = CniDirs {
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            plugin: Some(plugin.clone()),
            agent_socket: "/run/weir/agent.sock".into(),
            endpoint_dir: "/run/weir/endpoints".into(),
        };
        install(&d).unwrap();
        let list: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.conf_dir.join("05-weir.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(list["cniVersion"], "1.0.0");
        assert_eq!(list["cniVersions"], serde_json::json!(["1.0.0", "1.1.0"]));
        assert_eq!(list["plugins"][0]["type"], "weir-cni");
        assert_eq!(list["plugins"][0]["agentSocket"], "/run/weir/agent.sock");
        assert_eq!(
            std::fs::read(d.bin_dir.join("weir-cni")).unwrap(),
            b"\x7fELF fake"
        );
        // Again: replaced in place.
        install(&d).unwrap();
        uninstall(&d).unwrap();
        assert_eq!(std::fs::read_dir(&d.bin_dir).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(&d.conf_dir).unwrap().count(), 0);
        std::fs::write(&plugin, b"#!/bin/sh").unwrap();
        assert!(install(&d).is_err());
    }
}
