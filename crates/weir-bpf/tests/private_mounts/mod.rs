//! Tests that run in a private mount namespace: the test re-runs itself there.

use std::process::Command;

const INNER: &str = "WEIR_TEST_PRIVATE_MOUNT_NS";

/// Runs test `name` of this binary again inside `unshare --mount --propagation private`;
/// returns false when already inside (the caller then does the work).
pub fn reexec_in_private_mount_ns(name: &str) -> bool {
    if std::env::var_os(INNER).is_some() {
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "mount tests need root (they mount filesystems in a private mount namespace)"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed in its mount namespace");
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run in its mount namespace"
    );
    true
}
