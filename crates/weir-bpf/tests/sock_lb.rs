//! The socket programs on the real kernel: a process in a hooked cgroup connects to a VIP
//! and reaches the backend programmed in the maps.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;

use weir_bpf::events::{
    watch_sock_events, SockEvent, SOCK_XLATE_CONNECT, SOCK_XLATE_RECVMSG, SOCK_XLATE_SENDMSG,
};
use weir_bpf::types::{lb4_backend, lb4_key, lb_service};
use weir_bpf::SockLb;

/// The cookie of this process's network namespace (SO_NETNS_COOKIE).
fn netns_cookie() -> u64 {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut v = 0u64;
    let mut len = 8u32;
    // SAFETY: a valid socket and an 8-byte buffer with its length.
    let rc = unsafe {
        nix::libc::getsockopt(
            s.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            71, // SO_NETNS_COOKIE
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    v
}

struct Guard {
    pins: PathBuf,
    mount: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = SockLb::remove_pins(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

fn setup(tag: &str) -> Guard {
    assert!(
        nix_is_root(),
        "this test needs root (BPF programs and cgroups)"
    );
    weir_bpf::ensure_bpffs().unwrap();
    let id = format!("{tag}-{}", std::process::id());
    let mount = PathBuf::from(format!("/run/weir-test-cg-{id}"));
    std::fs::create_dir_all(&mount).unwrap();
    assert!(std::process::Command::new("mount")
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

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs bash inside the cgroup: connect to the VIP and print what the server sent.
fn connect_from_cgroup(cgroup: &std::path::Path, ip: &str, port: u16) -> std::process::Output {
    let script = format!(
        "echo $$ > {}/cgroup.procs; exec 3<>/dev/tcp/{ip}/{port} && echo hi >&3 && head -c 2 <&3",
        cgroup.display()
    );
    std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap()
}

#[test]
fn connect_to_vip_reaches_backend_and_empty_service_is_refused() {
    let g = setup("conn");
    let mut lb = SockLb::load(&g.pins).unwrap();
    lb.attach(&g.cgroup).unwrap();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut b = [0u8; 3];
        let _ = s.read(&mut b);
        s.write_all(b"ok").unwrap();
    });
    let vip = Ipv4Addr::new(10, 200, 0, 1);
    let key = lb4_key {
        address: u32::from_ne_bytes(vip.octets()),
        dport: 80u16.to_be(),
        proto: 6,
        ..Default::default()
    };
    lb.put(
        "weir_lb4_backends",
        &7u32,
        &lb4_backend {
            address: u32::from_ne_bytes([127, 0, 0, 1]),
            port: port.to_be(),
            proto: 6,
            flags: 0,
        },
    )
    .unwrap();
    lb.put(
        "weir_lb4_svc",
        &lb4_key { slot: 1, ..key },
        &lb_service {
            backend_id: 7,
            svc_id: 1,
            ..Default::default()
        },
    )
    .unwrap();
    lb.put(
        "weir_lb4_svc",
        &key,
        &lb_service {
            count: 1,
            svc_id: 1,
            ..Default::default()
        },
    )
    .unwrap();
    // Translations are reported (one event per connect, refusals too).
    lb.set_events(true).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<SockEvent>::new()));
    let s2 = seen.clone();
    let events = watch_sock_events(&lb.pin_path("weir_sock_events"), move |e| {
        s2.lock().unwrap().push(e.clone())
    })
    .unwrap();
    let out = connect_from_cgroup(&g.cgroup, "10.200.0.1", 80);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.join().unwrap();
    // No endpoints: refused at once.
    lb.put(
        "weir_lb4_svc",
        &key,
        &lb_service {
            count: 0,
            svc_id: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let out = connect_from_cgroup(&g.cgroup, "10.200.0.1", 80);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Connection refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    events.consume().unwrap();
    let got = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].point, SOCK_XLATE_CONNECT);
    assert_eq!(got[0].vip, "10.200.0.1:80".parse().unwrap());
    assert_eq!(
        got[0].backend,
        Some(format!("127.0.0.1:{port}").parse().unwrap())
    );
    assert_eq!((got[0].svc_id, got[0].proto, got[0].reason), (1, 6, 0));
    assert_eq!(
        got[0].netns,
        netns_cookie(),
        "the client's network namespace"
    );
    assert_eq!(
        (got[1].backend, got[1].reason),
        (None, 132),
        "refused: no backend"
    );
    assert!(lb.events_lost().unwrap().is_empty());
    unconnected_udp_reports_a_backends_first_datagram_and_reply(&g, &lb, &seen, &events);
    let stats: std::collections::BTreeMap<_, _> = lb.stats().unwrap().into_iter().collect();
    assert_eq!(stats["xlate_connect"], 1);
    assert_eq!(stats["no_backend"], 1);
    // A second load reuses the pinned maps and upgrades the pinned links in place.
    drop(lb);
    let mut again = SockLb::load(&g.pins).unwrap();
    again.attach(&g.cgroup).unwrap();
    assert_eq!(
        again
            .entries::<lb4_key, lb_service>("weir_lb4_svc")
            .unwrap()
            .len(),
        4,
        "the TCP and UDP services, master and slot each"
    );
    // Maglev tables round-trip.
    again.set_maglev(1, &[7, 7, 7, 7, 7]).unwrap();
    assert_eq!(again.maglev(1).unwrap(), Some(vec![7; 5]));
}

/// Unconnected UDP: two datagrams to a UDP service and their echoes give one `sendmsg` event
/// (the socket and backend's first datagram) and one `recvmsg` event (its first reply).
fn unconnected_udp_reports_a_backends_first_datagram_and_reply(
    g: &Guard,
    lb: &SockLb,
    seen: &std::sync::Mutex<Vec<SockEvent>>,
    events: &weir_bpf::RingBuffer<'static>,
) {
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 64];
        for _ in 0..2 {
            let (n, from) = echo.recv_from(&mut b).unwrap();
            echo.send_to(&b[..n], from).unwrap();
        }
    });
    let vip = Ipv4Addr::new(10, 200, 0, 2);
    let key = lb4_key {
        address: u32::from_ne_bytes(vip.octets()),
        dport: 53u16.to_be(),
        proto: 17,
        ..Default::default()
    };
    lb.put(
        "weir_lb4_backends",
        &8u32,
        &lb4_backend {
            address: u32::from_ne_bytes([127, 0, 0, 1]),
            port: port.to_be(),
            proto: 17,
            flags: 0,
        },
    )
    .unwrap();
    let slot = lb_service {
        backend_id: 8,
        svc_id: 2,
        ..Default::default()
    };
    lb.put("weir_lb4_svc", &lb4_key { slot: 1, ..key }, &slot)
        .unwrap();
    let master = lb_service {
        count: 1,
        svc_id: 2,
        ..Default::default()
    };
    lb.put("weir_lb4_svc", &key, &master).unwrap();
    // Python's sendto/recvfrom: an unconnected socket, in the hooked cgroup.
    let script = format!(
        "import os, socket\n\
         open('{}/cgroup.procs', 'w').write(str(os.getpid()))\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(5)\n\
         for _ in range(2):\n    s.sendto(b'ping', ('10.200.0.2', 53))\n    d, a = s.recvfrom(64)\n\
         print(a[0], a[1], d.decode())\n",
        g.cgroup.display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.200.0.2 53 ping",
        "the reply shows the service's address"
    );
    t.join().unwrap();
    events.consume().unwrap();
    let got = std::mem::take(&mut *seen.lock().unwrap());
    let points: Vec<u8> = got.iter().map(|e| e.point).collect();
    assert_eq!(points, [SOCK_XLATE_SENDMSG, SOCK_XLATE_RECVMSG], "{got:?}");
    for e in &got {
        assert_eq!(e.vip, "10.200.0.2:53".parse().unwrap());
        assert_eq!(
            e.backend,
            Some(format!("127.0.0.1:{port}").parse().unwrap())
        );
        assert_eq!((e.svc_id, e.proto, e.reason), (2, 17, 0));
    }
}
