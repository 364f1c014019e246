//! Kernel drops against the running kernel: packets netfilter and the UDP stack drop in a
//! scratch network namespace are counted under the kernel's own reason names (read from its
//! BTF), exactly, with an event each carrying the addresses; another namespace's drops are
//! not counted until it is watched (as the agent watches its pods'), nor after.

mod netns;

use std::net::UdpSocket;
use std::sync::{Arc, Mutex};

use netns::Netns;
use weir_bpf::kdrop::{netns_inum, KernelDrop, KernelDrops};

/// Sends `n` datagrams to 127.0.0.1:`port` (from inside whatever namespace runs it).
fn send(n: usize, port: u16) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for _ in 0..n {
        let _ = s.send_to(b"drop me", ("127.0.0.1", port));
    }
}

#[test]
fn netfilter_and_socket_drops_are_counted_by_the_kernels_reason_names() {
    let a = Netns::new("kd-a");
    let b = Netns::new("kd-b");
    let a_inum = netns_inum(a.path().as_ref()).expect("inum");
    let drops = KernelDrops::load(a_inum).expect("load");
    let seen: Arc<Mutex<Vec<KernelDrop>>> = Arc::default();
    let s2 = seen.clone();
    let events = drops
        .events(move |d| s2.lock().unwrap().push(d))
        .expect("events");
    // netfilter drops what goes to port 9999; nothing listens on 9998.
    for ns in [&a, &b] {
        ns.drop_output("udp", 9999);
    }
    a.inside(|| {
        send(5, 9999);
        send(3, 9998);
    });
    b.inside(|| {
        send(7, 9999);
        send(2, 9998);
    });
    let counts = drops.counts().expect("counts");
    assert_eq!(counts.get("NETFILTER_DROP"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("NO_SOCKET"), Some(&3), "{counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 8, "{counts:?}");
    assert!(drops.lost().expect("lost").is_empty());
    events.consume().expect("consume");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 8, "{seen:?}");
    let netfilter: Vec<_> = seen
        .iter()
        .filter(|d| d.reason == "NETFILTER_DROP")
        .collect();
    assert_eq!(netfilter.len(), 5);
    for d in &netfilter {
        assert_eq!(d.proto, 17);
        assert_eq!(d.dst, Some(("127.0.0.1".parse().unwrap(), 9999)));
        assert_eq!(d.src.map(|s| s.0), Some("127.0.0.1".parse().unwrap()));
    }
    // The received datagram nobody listens for arrived on loopback.
    let no_socket = seen.iter().find(|d| d.reason == "NO_SOCKET").unwrap();
    assert_eq!(no_socket.dst.map(|d| d.1), Some(9998));
    assert_eq!(no_socket.ifindex, 1, "{no_socket:?}");
    assert!(seen.iter().all(|d| d.netns == a_inum), "{seen:?}");
}

/// A namespace watched after the load (a pod's) has its drops counted from then on, and no
/// more once unwatched; the first one's are counted all along.
#[test]
fn a_watched_namespaces_drops_count_until_it_is_unwatched() {
    let node = Netns::new("kd-n");
    let pod = Netns::new("kd-p");
    let drops = KernelDrops::load(netns_inum(node.path().as_ref()).expect("inum")).expect("load");
    let pod_inum = netns_inum(pod.path().as_ref()).expect("inum");
    let no_socket = || drops.counts().expect("counts").get("NO_SOCKET").copied();
    pod.inside(|| send(2, 9998));
    assert_eq!(no_socket(), None, "the pod's drops before it is watched");
    drops.watch(pod_inum).expect("watch");
    pod.inside(|| send(3, 9998));
    node.inside(|| send(1, 9998));
    assert_eq!(no_socket(), Some(4));
    drops.unwatch(pod_inum);
    pod.inside(|| send(5, 9998));
    node.inside(|| send(1, 9998));
    assert_eq!(no_socket(), Some(5));
}
