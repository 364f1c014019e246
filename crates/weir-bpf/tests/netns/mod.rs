//! A scratch network namespace for the tests that watch kernel events in one.

use std::process::Command;

/// A network namespace with loopback up, removed on drop.
pub struct Netns(String);

impl Netns {
    /// `wbt-TAG-PID`.
    pub fn new(tag: &str) -> Netns {
        let name = format!("wbt-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// Its bind mount under /run/netns.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("netns");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread")
        })
    }

    /// Adds an nft rule dropping what the namespace sends to TCP or UDP port `port`.
    pub fn drop_output(&self, l4: &str, port: u16) {
        run(
            "nsenter",
            &[
                &format!("--net={}", self.path()),
                "nft",
                &format!(
                    "add table inet t; add chain inet t o {{ type filter hook output priority 0; }}; add rule inet t o {l4} dport {port} drop"
                ),
            ],
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `cmd`, failing the test with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
