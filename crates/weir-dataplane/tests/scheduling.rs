//! Weighted backend selection and outlier ejection at the socket layer, on the real kernel: a
//! shell in a hooked cgroup connects to a VIP programmed through the eBPF dataplane.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

use weir_control::lb::{Backend, Frontend, FrontendKey, LbState, Outlier, Proto, Scope};
use weir_dataplane::ebpf::EbpfDataplane;
use weir_dataplane::Dataplane;

struct Guard {
    pins: PathBuf,
    mount: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = weir_bpf::SockLb::remove_pins(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

fn setup(tag: &str) -> Guard {
    weir_bpf::ensure_bpffs().unwrap();
    let id = format!("{tag}-{}", std::process::id());
    let mount = PathBuf::from(format!("/run/weir-test-cg-{id}"));
    std::fs::create_dir_all(&mount).unwrap();
    assert!(Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(&mount)
        .status()
        .unwrap()
        .success());
    let cgroup = mount.join(format!("weir-test-{id}"));
    std::fs::create_dir_all(&cgroup).unwrap();
    Guard {
        pins: PathBuf::from(format!("/sys/fs/bpf/weir-test-{id}")),
        mount,
        cgroup,
    }
}

/// A server on loopback answering every connection with `tag` and closing it.
fn server(tag: u8) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(&[tag]);
        }
    });
    port
}

fn loopback(port: u16) -> Backend {
    Backend {
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
    }
}

fn frontend(backends: Vec<Backend>, weights: Vec<u32>, outlier: Option<Outlier>) -> Frontend {
    Frontend {
        weights,
        outlier,
        ..Frontend::new("t/scheduled@clusterset:80", backends)
    }
}

fn vip(last: u8) -> FrontendKey {
    FrontendKey {
        vip: IpAddr::V4(Ipv4Addr::new(10, 201, 0, last)),
        port: 80,
        proto: Proto::Tcp,
        scope: Scope::Cluster,
    }
}

/// Runs `script` in bash inside `cgroup`; returns its output.
fn in_cgroup(cgroup: &Path, script: &str) -> String {
    let full = format!("echo $$ > {}/cgroup.procs; {script}", cgroup.display());
    let out = Command::new("bash").args(["-c", &full]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `n` connects to `ip`:80, printing the byte each backend answers with ('-' when refused).
fn connects(cgroup: &Path, ip: &str, n: usize) -> BTreeMap<char, usize> {
    let script = format!(
        "for i in $(seq {n}); do if exec 3<>/dev/tcp/{ip}/80; then read -r -n1 x <&3; \
         printf %s \"$x\"; exec 3<&-; else printf -; fi; done 2>/dev/null"
    );
    let mut counts = BTreeMap::new();
    for c in in_cgroup(cgroup, &script).chars() {
        *counts.entry(c).or_default() += 1;
    }
    counts
}

#[test]
fn weights_split_new_connections() {
    let g = setup("weights");
    let mut dp = EbpfDataplane::new(&g.pins, &g.cgroup).unwrap();
    let (a, b) = (server(b'A'), server(b'B'));
    let mut st = LbState::default();
    st.frontends.insert(
        vip(1),
        frontend(vec![loopback(a), loopback(b)], vec![800_000, 200_000], None),
    );
    dp.apply(&st).unwrap();
    let d = dp.dump().unwrap();
    assert_eq!(d.frontends[0].shares, [80.0, 20.0]);
    let n = 4000;
    let c = connects(&g.cgroup, "10.201.0.1", n);
    let b_share = 100.0 * c.get(&'B').copied().unwrap_or(0) as f64 / n as f64;
    // Binomial: sd = sqrt(0.2 x 0.8 / 4000) = 0.63 points; 3 points is over 4 sd.
    assert!((b_share - 20.0).abs() < 3.0, "{c:?}");
    // Equal weights again: one group, no weighting.
    st.frontends.get_mut(&vip(1)).unwrap().weights = vec![1, 1];
    dp.apply(&st).unwrap();
    assert!(dp.dump().unwrap().frontends[0].shares.is_empty());
    let c = connects(&g.cgroup, "10.201.0.1", 400);
    assert!(c[&'A'] > 100 && c[&'B'] > 100, "{c:?}");
}

#[test]
fn refused_connects_eject_a_backend_after_the_threshold() {
    let g = setup("eject");
    let mut dp = EbpfDataplane::new(&g.pins, &g.cgroup).unwrap();
    let a = server(b'A');
    // A port nobody listens on: every connect to it is reset.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let ev2 = events.clone();
    let rb = weir_bpf::watch_ejections(&dp.ejection_events().unwrap(), move |e| {
        ev2.lock().unwrap().push((e.backend_id, e.ejections))
    })
    .unwrap();
    let outlier = Outlier {
        consecutive_failures: 3,
        base_ejection_ms: 60_000,
    };
    let mut st = LbState::default();
    st.frontends.insert(
        vip(2),
        frontend(vec![loopback(a), loopback(dead)], Vec::new(), Some(outlier)),
    );
    dp.apply(&st).unwrap();
    let c = connects(&g.cgroup, "10.201.0.2", 60);
    assert!(c.get(&'-').copied().unwrap_or(0) >= 3, "{c:?}");
    let health = dp.health().unwrap();
    let dead_h = health.iter().find(|h| h.backend.port == dead).unwrap();
    let live_h = health.iter().find(|h| h.backend.port == a).unwrap();
    assert_eq!(dead_h.ejections, 1, "{health:?}");
    assert!(dead_h.remaining_ms > 50_000, "{health:?}");
    assert!(dead_h.failures_total >= 3);
    assert_eq!((live_h.ejections, live_h.failures_total), (0, 0));
    assert!(live_h.successes_total > 0);
    rb.poll(std::time::Duration::from_millis(100)).unwrap();
    assert_eq!(events.lock().unwrap().as_slice(), [(dead_h.id, 1)]);
    // Still in the slots (the agent has not rescheduled): new connects pass over it, but for
    // the 1 in 16 whose four draws all land on it.
    let before = connects(&g.cgroup, "10.201.0.2", 80)
        .get(&'-')
        .copied()
        .unwrap_or(0);
    assert!(
        before < 20,
        "passed over while ejected: {before} of 80 refused"
    );
    // Acknowledged while still in the slots (kept under maxEjectionPercent): reached again.
    dp.acknowledge(&health).unwrap();
    let after = connects(&g.cgroup, "10.201.0.2", 80)
        .get(&'-')
        .copied()
        .unwrap_or(0);
    assert!(
        after > 20,
        "kept on purpose: {after} of 80 refused (about half)"
    );
    // Backends no frontend watches lose their health entries.
    st.frontends.get_mut(&vip(2)).unwrap().outlier = None;
    dp.apply(&st).unwrap();
    assert!(dp.health().unwrap().is_empty());
}

#[test]
fn an_unanswered_syn_fails_at_its_first_retransmission() {
    let g = setup("blackhole");
    let mut dp = EbpfDataplane::new(&g.pins, &g.cgroup).unwrap();
    let outlier = Outlier {
        consecutive_failures: 2,
        base_ejection_ms: 10_000,
    };
    let mut st = LbState::default();
    st.frontends.insert(
        vip(3),
        frontend(vec![loopback(9)], Vec::new(), Some(outlier)),
    );
    dp.apply(&st).unwrap();
    // In a network namespace of its own whose SYNs to port 9 are dropped: two connects give
    // up after 2 s, one second after their SYN's first retransmission timer.
    let script = "unshare -n bash -c 'ip link set lo up; \
        nft add table inet t; nft add chain inet t o \"{ type filter hook output priority 0; }\"; \
        nft add rule inet t o tcp dport 9 drop; \
        for i in 1 2; do timeout 2 bash -c \"exec 3<>/dev/tcp/10.201.0.3/80\" & done; wait'";
    in_cgroup(&g.cgroup, script);
    let h = dp.health().unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!((h[0].failures_total, h[0].ejections), (2, 1), "{h:?}");
}
