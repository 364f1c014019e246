//! The filesystems a node needs before any program is loaded: the BPF filesystem at
//! /sys/fs/bpf (where maps and links are pinned) and a cgroup v2 hierarchy (where the socket
//! programs attach). Each is mounted at most once per mount namespace.
//!
//! On a fresh machine several weir processes (two lab agents, or an agent and its lab) may
//! find a filesystem missing at the same moment. A check-then-mount without a lock lets both
//! mount, and the second mount hides the first one's pins: the first agent keeps running
//! with maps nobody else can open. So the check is by filesystem type (`statfs`, not a look at
//! /proc/mounts, which a stacked mount would satisfy as well), and the check and the mount
//! happen under one host-wide lock, so a mount is never stacked on another.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, FsType, CGROUP2_SUPER_MAGIC};

use crate::BpfError;

/// Where the BPF filesystem is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The lock every weir process takes to check and make a mount (on /run, a tmpfs shared by
/// every mount namespace of the host, so processes in private mount namespaces serialise too).
pub const MOUNT_LOCK: &str = "/run/weir/mount.lock";

/// `BPF_FS_MAGIC` of include/uapi/linux/magic.h.
const BPF_FS_MAGIC: FsType = FsType(libc::BPF_FS_MAGIC as _);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BpfError + '_ {
    move |source| BpfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn nix_io(path: &Path) -> impl FnOnce(nix::Error) -> BpfError + '_ {
    move |e| BpfError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

/// An exclusive hold of [`MOUNT_LOCK`], released when dropped (the file is closed).
pub struct MountLock {
    _file: File,
}

/// Takes the host-wide mount lock, waiting for another holder to finish.
pub fn mount_lock() -> Result<MountLock, BpfError> {
    let path = Path::new(MOUNT_LOCK);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    loop {
        // SAFETY: flock on a file descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(MountLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io(path)(e));
        }
    }
}

/// Whether the filesystem at `path` is of type `magic` (false when `path` does not exist).
fn is_fs(path: &Path, magic: FsType) -> bool {
    statfs(path)
        .map(|s| s.filesystem_type() == magic)
        .unwrap_or(false)
}

/// Whether a BPF filesystem is mounted at `path`.
pub fn is_bpffs(path: &Path) -> bool {
    is_fs(path, BPF_FS_MAGIC)
}

/// Whether a cgroup v2 hierarchy is mounted at `path`.
pub fn is_cgroup2(path: &Path) -> bool {
    is_fs(path, CGROUP2_SUPER_MAGIC)
}

/// Mounts a filesystem of type `fstype` at `path` unless one of type `magic` is already
/// there, checking again under [`mount_lock`]. Returns whether this call mounted it.
fn ensure_fs(path: &Path, fstype: &str, magic: FsType) -> Result<bool, BpfError> {
    if is_fs(path, magic) {
        return Ok(false);
    }
    let _lock = mount_lock()?;
    if is_fs(path, magic) {
        return Ok(false);
    }
    std::fs::create_dir_all(path).map_err(io(path))?;
    nix::mount::mount(
        Some(fstype),
        path,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(nix_io(path))?;
    tracing::info!(path = %path.display(), fstype, "mounted");
    Ok(true)
}

/// Makes sure a BPF filesystem is mounted at /sys/fs/bpf, mounting one if there is none.
/// Never stacks a second one on a mounted one. Returns whether this call mounted it.
pub fn ensure_bpffs() -> Result<bool, BpfError> {
    ensure_fs(Path::new(BPFFS), "bpf", BPF_FS_MAGIC)
}

/// Makes sure a cgroup v2 hierarchy is mounted at `path` (creating the directory), mounting
/// one if there is none. Returns whether this call mounted it.
pub fn ensure_cgroup2(path: &Path) -> Result<bool, BpfError> {
    ensure_fs(path, "cgroup2", CGROUP2_SUPER_MAGIC)
}

/// The mount points at `path` in this mount namespace, as (filesystem type) in mount order
/// (from /proc/self/mountinfo; more than one means mounts are stacked there).
pub fn mounts_at(path: &Path) -> Result<Vec<String>, BpfError> {
    let info = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&info).map_err(io(&info))?;
    let want = path.to_string_lossy();
    Ok(text
        .lines()
        .filter_map(|l| {
            // "id parent major:minor root mountpoint options [optional...] - fstype source ..."
            let mut f = l.split_whitespace();
            let point = f.nth(4)?;
            let fstype = l.split(" - ").nth(1)?.split_whitespace().next()?;
            (point == want).then(|| fstype.to_string())
        })
        .collect())
}
