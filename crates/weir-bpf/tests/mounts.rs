//! First-run mounts: many processes finding /sys/fs/bpf (or a cgroup v2 directory) unmounted
//! at the same moment mount it exactly once. Run in a private mount namespace, where
//! /sys/fs/bpf starts unmounted as on a fresh machine, so the host's mounts are not touched.

use std::path::Path;
use std::sync::{Arc, Barrier};

use weir_bpf::mounts;

mod private_mounts;
use private_mounts::reexec_in_private_mount_ns;

/// Unmounts everything mounted at `path` in this (private) mount namespace.
fn unmount_all(path: &Path) {
    while !mounts::mounts_at(path).unwrap().is_empty() {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
}

/// `threads` callers of `ensure` at once, `rounds` times over, each round from an unmounted
/// `path`: exactly one caller mounts, and exactly one mount of `fstype` is there after.
fn race(path: &Path, fstype: &str, ensure: fn(&Path) -> bool, threads: usize, rounds: usize) {
    for round in 0..rounds {
        unmount_all(path);
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = barrier.clone();
                let path = path.to_path_buf();
                std::thread::spawn(move || {
                    barrier.wait();
                    ensure(&path)
                })
            })
            .collect();
        let mounted = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|m| *m)
            .count();
        assert_eq!(
            mounts::mounts_at(path).unwrap(),
            vec![fstype.to_string()],
            "round {round}: mounts at {}",
            path.display()
        );
        assert_eq!(mounted, 1, "round {round}: callers that mounted");
    }
    unmount_all(path);
}

#[test]
fn bpffs_is_mounted_once_by_concurrent_agents() {
    if reexec_in_private_mount_ns("bpffs_is_mounted_once_by_concurrent_agents") {
        return;
    }
    let bpffs = Path::new(mounts::BPFFS);
    unmount_all(bpffs);
    assert!(!mounts::is_bpffs(bpffs));
    race(bpffs, "bpf", |_| weir_bpf::ensure_bpffs().unwrap(), 8, 25);
    // Mounted once, a later call changes nothing.
    assert!(weir_bpf::ensure_bpffs().unwrap());
    assert!(!weir_bpf::ensure_bpffs().unwrap());
    assert_eq!(mounts::mounts_at(bpffs).unwrap(), vec!["bpf".to_string()]);
}

#[test]
fn cgroup2_is_mounted_once_by_concurrent_agents() {
    if reexec_in_private_mount_ns("cgroup2_is_mounted_once_by_concurrent_agents") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cgroupv2");
    race(
        &path,
        "cgroup2",
        |p| mounts::ensure_cgroup2(p).unwrap(),
        8,
        25,
    );
}
