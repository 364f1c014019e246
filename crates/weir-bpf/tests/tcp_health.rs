//! TCP health against the running kernel: in a watched scratch network namespace, connects,
//! a connect refused (a reset each way), a connect whose SYNs netfilter drops (retransmits,
//! a failure) and the connections' smoothed RTT are counted; an unwatched namespace's are not.

mod netns;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use netns::Netns;
use weir_bpf::kdrop::netns_inum;
use weir_bpf::tcp_health::TcpHealth;

/// Three connects that work, one refused, one whose SYNs are dropped (port 7777).
fn traffic() {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = l.local_addr().unwrap();
    for _ in 0..3 {
        let c = TcpStream::connect(addr).expect("connect");
        let (s, _) = l.accept().expect("accept");
        drop(c);
        drop(s);
    }
    let closed = {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        t.local_addr().unwrap()
    };
    assert!(TcpStream::connect(closed).is_err());
    let dropped = "127.0.0.1:7777".parse().unwrap();
    assert!(TcpStream::connect_timeout(&dropped, Duration::from_millis(1500)).is_err());
}

#[test]
fn a_watched_namespaces_tcp_health_is_counted() {
    let a = Netns::new("th-a");
    let b = Netns::new("th-b");
    for ns in [&a, &b] {
        ns.drop_output("tcp", 7777);
    }
    let th = TcpHealth::load().expect("load");
    th.watch(netns_inum(a.path().as_ref()).unwrap(), 5)
        .expect("watch");
    a.inside(traffic);
    b.inside(traffic);
    let c = th.counters(5).expect("counters");
    assert_eq!(c.connects, 3, "{c:?}");
    assert_eq!(c.connect_failures, 2, "{c:?}");
    assert_eq!((c.resets_sent, c.resets_received), (1, 1), "{c:?}");
    assert!(c.retransmits >= 1, "{c:?}");
    assert!(c.connect_ns > 0, "{c:?}");
    // Both ends of the three connections left ESTABLISHED with an RTT sample.
    assert!(c.rtt_samples >= 3 && c.rtt_us > 0, "{c:?}");
    // Per peer: the listener's three connects, the closed port's failure (a reset
    // received), the dropped port's failure after retransmits; nothing of namespace b.
    let peers = th.peers().expect("peers");
    assert!(peers.iter().all(|(p, _)| p.slot == 5), "{peers:?}");
    let by_port = |port: u16| peers.iter().find(|(p, _)| p.addr.port() == port);
    let (_, dropped) = by_port(7777).expect("the dropped port's peer");
    assert_eq!((dropped.connects, dropped.connect_failures), (0, 1));
    assert!(dropped.retransmits >= 1, "{dropped:?}");
    let ok = peers
        .iter()
        .find(|(_, c)| c.connects == 3)
        .expect("the listener's peer");
    assert_eq!(ok.0.addr.ip().to_string(), "127.0.0.1");
    assert!(ok.1.rtt_samples >= 1 && ok.1.connect_ns > 0, "{ok:?}");
    let refused = peers
        .iter()
        .find(|(p, c)| c.resets_received == 1 && p.addr.port() != 7777)
        .expect("the closed port's peer");
    assert_eq!(refused.1.connect_failures, 1);
    assert_eq!(peers.len(), 3, "{peers:?}");
    // Nothing else is counted: another slot stays empty; unwatched, its peers go; watching
    // again starts from zero.
    assert_eq!(th.counters(6).unwrap().connects, 0);
    th.unwatch(netns_inum(a.path().as_ref()).unwrap(), 5);
    assert!(th.peers().unwrap().is_empty());
    th.watch(netns_inum(a.path().as_ref()).unwrap(), 5)
        .expect("watch");
    assert_eq!(th.counters(5).unwrap().connects, 0);
}

/// `n` connects that work, to a listener of their own.
fn connects(n: usize) {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    for _ in 0..n {
        let c = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
        let (s, _) = l.accept().expect("accept");
        drop((c, s));
    }
}

/// A namespace is found by its inode's low bits first (the fast entry), else in the hash of
/// all: one whose fast entry another namespace has is counted all the same, is given the
/// entry when that one goes, and is counted no more once unwatched itself.
#[test]
fn a_namespace_whose_fast_entry_is_taken_is_counted_all_the_same() {
    let a = Netns::new("th-fast");
    let th = TcpHealth::load().expect("load");
    let inum = netns_inum(a.path().as_ref()).unwrap();
    // Another inode with the same low bits (the fast entry's index), watched first.
    let other = inum ^ (1 << 24);
    th.watch(other, 3).expect("watch the other");
    th.watch(inum, 4).expect("watch");
    assert_eq!(th.fast_entry(inum).unwrap(), (other, 3));
    a.inside(|| connects(2));
    assert_eq!(th.counters(4).unwrap().connects, 2);
    assert_eq!(th.counters(3).unwrap().connects, 0);
    th.unwatch(other, 3);
    assert_eq!(th.fast_entry(inum).unwrap(), (inum, 4), "handed on");
    a.inside(|| connects(3));
    assert_eq!(th.counters(4).unwrap().connects, 5);
    th.unwatch(inum, 4);
    assert_eq!(th.fast_entry(inum).unwrap().0, 0, "freed");
    a.inside(|| connects(1));
    assert_eq!(th.counters(4).unwrap().connects, 5);
}

/// Many client connections open at once: every connect and every RTT sample is counted for
/// the namespace, and for their peer too. A socket's pair in the region where connects start
/// is its cookie's (4,096 pairs), and cookies come in runs of consecutive numbers: 9,000
/// open connections give some 800 pairs a third socket, so established sockets move to the
/// held region and are still counted for their peer when they close.
#[test]
fn many_open_client_connections_are_all_counted() {
    const N: usize = 9000;
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("rlimit");
    let want = (2 * N as u64 + 256).max(soft);
    setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).expect("raise the open files limit");
    let a = Netns::new("th-many");
    let th = TcpHealth::load().expect("load");
    th.watch(netns_inum(a.path().as_ref()).unwrap(), 9)
        .expect("watch");
    let port = a.inside(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = l.local_addr().unwrap().port();
        let mut open = Vec::new();
        for _ in 0..N {
            let c = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
            let (s, _) = l.accept().expect("accept");
            open.push((c, s));
        }
        drop(open);
        port
    });
    let c = th.counters(9).expect("counters");
    assert_eq!(c.connects, N as u64, "{c:?}");
    assert_eq!(c.connect_failures, 0, "{c:?}");
    // Both ends of each connection left ESTABLISHED with an RTT sample.
    assert_eq!(c.rtt_samples, 2 * N as u64, "{c:?}");
    let peers = th.peers().expect("peers");
    let (_, p) = peers
        .iter()
        .find(|(p, _)| p.slot == 9 && p.addr.port() == port)
        .expect("the listener's peer");
    assert_eq!(p.connects, N as u64, "{p:?}");
    assert_eq!(p.rtt_samples, N as u64, "{p:?}");
}
