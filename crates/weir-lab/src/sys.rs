//! Thin helpers over the system: running `ip`, entering namespaces and cgroups, finding and
//! stopping processes.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths;
use crate::LabError;

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| LabError::Command(format!("{cmd} {}", args.join(" ")), e.to_string()))?;
    if !out.status.success() {
        return Err(LabError::Command(
            format!("{cmd} {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<String, LabError> {
    run("ip", args)
}

/// Runs many `ip` commands at once with `ip -batch -` (one per line), in namespace `netns`
/// when given.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), LabError> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    run_with_stdin("ip", &args, &lines.join("\n"))
        .map(|_| ())
        .map_err(|e| match e {
            LabError::Command(_, err) => LabError::Command(
                format!(
                    "ip {} -batch: {}",
                    netns.map(|n| format!("-n {n}")).unwrap_or_default(),
                    lines.join("; ")
                ),
                err,
            ),
            e => e,
        })
}

/// Runs a command with `input` on its standard input, failing with its stderr when it exits
/// non-zero.
pub fn run_with_stdin(cmd: &str, args: &[&str], input: &str) -> Result<String, LabError> {
    use std::io::Write;
    let what = || format!("{cmd} {}", args.join(" "));
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command(what(), e.to_string()))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .map_err(|e| LabError::Command(what(), e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::Command(what(), e.to_string()))?;
    if !out.status.success() {
        return Err(LabError::Command(
            what(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes sysctls inside network namespace `netns` (`key` uses dots, e.g.
/// `net.ipv4.ip_forward`). Done from a thread that enters the namespace, since /proc/sys/net
/// shows the namespace of the reading thread.
pub fn sysctls(netns: &str, kv: &[(&str, &str)]) -> Result<(), LabError> {
    let path = paths::netns_path(netns);
    let kv: Vec<(String, String)> = kv
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::thread::spawn(move || -> Result<(), LabError> {
        enter_netns(&path)?;
        for (k, v) in kv {
            let file = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::write(&file, &v).map_err(|e| LabError::io(PathBuf::from(&file), e))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| LabError::Command("sysctl".into(), "thread panicked".into()))?
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> Result<(), LabError> {
    let f = std::fs::File::open(path).map_err(|e| LabError::io(path.to_path_buf(), e))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| LabError::Command(format!("setns {}", path.display()), e.to_string()))
}

/// Moves the calling process into the cgroup v2 directory `dir`.
pub fn enter_cgroup(dir: &Path) -> Result<(), LabError> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).map_err(|e| LabError::io(procs, e))
}

/// Makes sure cgroup v2 is mounted at `path` (mounting it there if not, never twice).
pub fn ensure_cgroup2(path: &Path) -> Result<(), LabError> {
    weir_bpf::mounts::ensure_cgroup2(path)
        .map(|_| ())
        .map_err(|e| {
            LabError::Command(
                format!("mount -t cgroup2 none {}", path.display()),
                e.to_string(),
            )
        })
}

/// Makes sure the BPF filesystem is mounted at /sys/fs/bpf before any agent starts, so that
/// the node agents of a lab find it there and none of them mounts one of its own.
pub fn ensure_bpffs() -> Result<(), LabError> {
    weir_bpf::ensure_bpffs()
        .map(|_| ())
        .map_err(|e| LabError::Command("mount -t bpf bpf /sys/fs/bpf".into(), e.to_string()))
}

/// Where `ip netns add` keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Makes /run/netns a shared mount point, as `ip netns add` does on its first call
/// (iproute2 ip/ipnetns.c: make it shared, and if it is not a mount point yet, bind it onto
/// itself first). Two first calls at once (two labs starting on a fresh machine) would each
/// bind it, stacking two mounts; done once here under the host-wide mount lock, every later
/// `ip netns add` finds the mount point in place.
pub fn ensure_netns_run_dir() -> Result<(), LabError> {
    use nix::mount::{mount, MsFlags};
    let dir = Path::new(NETNS_RUN_DIR);
    let err = |what: &str, e: nix::Error| {
        LabError::Command(format!("{what} {}", dir.display()), e.to_string())
    };
    let _lock = weir_bpf::mounts::mount_lock()
        .map_err(|e| LabError::Command("mount lock".into(), e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir.to_path_buf(), e))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, dir, None::<&str>, shared, None::<&str>) {
        Ok(()) => Ok(()),
        // EINVAL: not a mount point yet.
        Err(nix::Error::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err("mount --bind", e))?;
            mount(None::<&str>, dir, None::<&str>, shared, None::<&str>)
                .map_err(|e| err("mount --make-rshared", e))
        }
        Err(e) => Err(err("mount --make-rshared", e)),
    }
}

/// Unmounts the cgroup v2 mount at `path`, if mounted.
pub fn unmount_cgroup2(path: &Path) -> Result<(), LabError> {
    if !weir_bpf::mounts::is_cgroup2(path) {
        return Ok(());
    }
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| LabError::Command(format!("umount {}", path.display()), e.to_string()))
}

/// Removes a cgroup directory tree (children first). Processes must have left it.
pub fn remove_cgroup_tree(dir: &Path) -> Result<(), LabError> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    let mut last = None;
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    Err(LabError::io(dir.to_path_buf(), last.expect("error")))
}

/// Pids of every process whose command line has `needle` as consecutive arguments.
pub fn pids_with_args(needle: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args
            .windows(needle.len())
            .any(|w| w.iter().zip(needle).all(|(a, b)| *a == b.as_bytes()))
        {
            out.push(pid);
        }
    }
    out
}

/// Pids of every process in network namespace `netns` (as `ip netns pids`).
pub fn pids_in_netns(netns: &str) -> Vec<i32> {
    ip(&["netns", "pids", netns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of every process in the cgroup tree `dir`.
pub fn pids_in_cgroup_tree(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(pids_in_cgroup_tree(&e.path()));
        }
    }
    out
}

/// Whether process `pid` is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs whatever is left.
pub fn kill_all(pids: &[i32], grace: std::time::Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for p in pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for p in pids.iter().filter(|p| alive(**p)) {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether we run as root (every lab operation needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
