//! The netfilter dataplanes (nftables, iptables with the host's backend and the legacy one) on
//! the real kernel, the same cases for each: a node namespace whose own processes reach
//! ClusterIPs (nat output) and a client namespace behind the node's device reaching NodePorts
//! and LoadBalancer IPs (nat prerouting); servers listen on the node's addresses.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use weir_control::lb::{Backend, Frontend, FrontendKey, LbState, Proto, Scope};
use weir_dataplane::ipt::{IptablesBackend, IptablesDataplane};
use weir_dataplane::nft::{NftDataplane, NodeNet};
use weir_dataplane::Dataplane;

/// Which dataplane a case runs on.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Nftables,
    Iptables(IptablesBackend),
}

/// Two namespaces, `node` and `client`, joined by a veth (`ext0` in the node, 10.1.0.1/24;
/// the client 10.1.0.2/24, routed to everything through the node). The node has the backend
/// addresses 10.0.0.1 and 10.0.0.2 on a veth of its own and a route for the VIPs.
struct Lab {
    node: String,
    client: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.node, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(ns: &str, cmd: &str) {
    let ok = Command::new("ip")
        .args(["-n", ns])
        .args(cmd.split_whitespace())
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip -n {ns} {cmd}");
}

fn lab(tag: &str) -> Lab {
    let id = format!("{tag}-{}", std::process::id());
    let l = Lab {
        node: format!("weir-nft-n-{id}"),
        client: format!("weir-nft-c-{id}"),
    };
    for ns in [&l.node, &l.client] {
        assert!(Command::new("ip")
            .args(["netns", "add", ns])
            .status()
            .unwrap()
            .success());
        sh(ns, "link set lo up");
    }
    sh(
        &l.node,
        &format!("link add ext0 type veth peer name eth0 netns {}", l.client),
    );
    sh(&l.node, "link set ext0 up");
    sh(&l.node, "addr add 10.1.0.1/24 dev ext0");
    sh(&l.node, "link add pods0 type veth peer name pods1");
    sh(&l.node, "link set pods0 up");
    sh(&l.node, "link set pods1 up");
    sh(&l.node, "addr add 10.0.0.1/24 dev pods0");
    sh(&l.node, "addr add 10.0.0.2/24 dev pods0");
    sh(&l.node, "route add 10.96.0.0/16 dev pods0");
    sh(&l.client, "link set eth0 up");
    sh(&l.client, "addr add 10.1.0.2/24 dev eth0");
    sh(&l.client, "route add default via 10.1.0.1");
    l
}

fn tag(kind: Kind) -> &'static str {
    match kind {
        Kind::Nftables => "n",
        Kind::Iptables(IptablesBackend::Legacy) => "l",
        Kind::Iptables(_) => "i",
    }
}

fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{ns}"))
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = netns_path(ns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// TCP and UDP servers on `ip`:8080 in `ns` answering with `tag`.
fn serve(ns: &str, ip: &'static str, tag: u8) {
    let (t, u) = in_ns(ns, move || {
        (
            TcpListener::bind((ip, 8080)).unwrap(),
            UdpSocket::bind((ip, 8080)).unwrap(),
        )
    });
    std::thread::spawn(move || {
        for mut s in t.incoming().flatten() {
            let _ = s.write_all(&[tag]);
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(&[tag], from);
        }
    });
}

/// `n` TCP connects from `ns` to `to`: the byte each answer carried, '-' when refused and
/// 't' when nothing answered.
fn connects(ns: &str, to: &str, n: usize) -> BTreeMap<char, usize> {
    let to: SocketAddr = to.parse().unwrap();
    in_ns(ns, move || {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let c = match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
                Ok(mut s) => {
                    let mut b = [0u8; 1];
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    match s.read_exact(&mut b) {
                        Ok(()) => b[0] as char,
                        Err(_) => '?',
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => '-',
                Err(_) => 't',
            };
            *out.entry(c).or_default() += 1;
        }
        out
    })
}

/// One UDP exchange from `ns` to `to` on a connected socket.
fn udp(ns: &str, to: &str) -> char {
    let to: SocketAddr = to.parse().unwrap();
    in_ns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = s.send(b"?");
        let mut b = [0u8; 4];
        match s.recv(&mut b) {
            Ok(_) => b[0] as char,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => '-',
            Err(_) => 't',
        }
    })
}

fn be(ip: &str) -> Backend {
    Backend {
        ip: ip.parse().unwrap(),
        port: 8080,
    }
}

fn fe(backends: Vec<Backend>) -> Frontend {
    Frontend::new("t/web:http", backends)
}

fn key(vip: [u8; 4], port: u16, proto: Proto, scope: Scope) -> FrontendKey {
    FrontendKey {
        vip: IpAddr::V4(Ipv4Addr::from(vip)),
        port,
        proto,
        scope,
    }
}

fn dataplane(l: &Lab, kind: Kind) -> Box<dyn Dataplane> {
    let node = NodeNet {
        devices: vec!["ext0".into()],
        snat_ports: (45056, 65535),
        masquerade: None,
    };
    let ns = Some(netns_path(&l.node));
    match kind {
        Kind::Nftables => Box::new(NftDataplane::new(ns, node).unwrap()),
        Kind::Iptables(b) => Box::new(IptablesDataplane::new(ns, node, b).unwrap()),
    }
}

fn remove(l: &Lab, kind: Kind) {
    let ns = netns_path(&l.node);
    match kind {
        Kind::Nftables => NftDataplane::remove(Some(&ns)).unwrap(),
        Kind::Iptables(b) => IptablesDataplane::remove(Some(&ns), b).unwrap(),
    }
}

#[test]
fn cluster_ips_through_nat_output_nftables() {
    cluster_ips_through_nat_output(Kind::Nftables);
}

#[test]
fn cluster_ips_through_nat_output_iptables() {
    cluster_ips_through_nat_output(Kind::Iptables(IptablesBackend::Auto));
}

#[test]
fn cluster_ips_through_nat_output_iptables_legacy() {
    cluster_ips_through_nat_output(Kind::Iptables(IptablesBackend::Legacy));
}

#[test]
fn nodeports_and_external_ips_through_nat_prerouting_nftables() {
    nodeports_and_external_ips_through_nat_prerouting(Kind::Nftables);
}

#[test]
fn nodeports_and_external_ips_through_nat_prerouting_iptables() {
    nodeports_and_external_ips_through_nat_prerouting(Kind::Iptables(IptablesBackend::Auto));
}

/// ClusterIPs from the node's own processes: both backends used, a change touches only its
/// frontend, no endpoints is refused (TCP and UDP), session affinity sticks, weights hold, and
/// the dump reads back what is programmed.
fn cluster_ips_through_nat_output(kind: Kind) {
    let l = lab(&format!("cip{}", tag(kind)));
    serve(&l.node, "10.0.0.1", b'A');
    serve(&l.node, "10.0.0.2", b'B');
    let mut dp = dataplane(&l, kind);
    let web = key([10, 96, 0, 1], 80, Proto::Tcp, Scope::Cluster);
    let dns = key([10, 96, 0, 1], 53, Proto::Udp, Scope::Cluster);
    let mut st = LbState::default();
    st.frontends
        .insert(web, fe(vec![be("10.0.0.1"), be("10.0.0.2")]));
    let mut udp_fe = fe(vec![be("10.0.0.2")]);
    udp_fe.service = "t/dns:dns".into();
    st.frontends.insert(dns, udp_fe);
    let stats = dp.apply(&st).unwrap();
    assert_eq!(stats.frontends_updated, 2);

    let got = connects(&l.node, "10.96.0.1:80", 40);
    assert!(
        got.get(&'A') > Some(&0) && got.get(&'B') > Some(&0),
        "{got:?}"
    );
    assert_eq!(
        got.values().sum::<usize>(),
        got[&'A'] + got[&'B'],
        "{got:?}"
    );
    let dns_addr = "10.96.0.1:53";
    assert_eq!(udp(&l.node, dns_addr), 'B');

    let dump = dp.dump().unwrap();
    let web_dump = dump.frontends.iter().find(|f| f.key == web).unwrap();
    let backends: Vec<Backend> = web_dump.backends.iter().map(|(_, b)| *b).collect();
    assert_eq!(backends, vec![be("10.0.0.1"), be("10.0.0.2")]);

    // One backend leaves: only its frontend's objects change.
    st.frontends.get_mut(&web).unwrap().backends = vec![be("10.0.0.1")];
    let stats = dp.apply(&st).unwrap();
    assert_eq!((stats.frontends_updated, stats.backends_removed), (1, 1));
    assert_eq!(
        connects(&l.node, "10.96.0.1:80", 10),
        BTreeMap::from([('A', 10)])
    );
    // The other frontend's chains, left out of that (partial) restore, still serve.
    assert_eq!(udp(&l.node, dns_addr), 'B');
    let dump = dp.dump().unwrap();
    let dns_dump = dump.frontends.iter().find(|f| f.key == dns).unwrap();
    assert_eq!(dns_dump.backends.len(), 1);
    assert_eq!(
        dp.apply(&st).unwrap(),
        Default::default(),
        "nothing left to do"
    );

    // No endpoints: refused, as kube-proxy rejects.
    st.frontends.get_mut(&web).unwrap().backends.clear();
    st.frontends.get_mut(&dns).unwrap().backends.clear();
    dp.apply(&st).unwrap();
    assert_eq!(
        connects(&l.node, "10.96.0.1:80", 3),
        BTreeMap::from([('-', 3)])
    );
    let dump = dp.dump().unwrap();
    assert!(dump
        .frontends
        .iter()
        .any(|f| f.key == web && f.backends.is_empty()));

    // Session affinity: every connection of a client goes to the same backend.
    let f = st.frontends.get_mut(&web).unwrap();
    f.backends = vec![be("10.0.0.1"), be("10.0.0.2")];
    f.affinity_timeout = Some(600);
    dp.apply(&st).unwrap();
    let got = connects(&l.node, "10.96.0.1:80", 20);
    assert_eq!(got.len(), 1, "{got:?}");
    let dump = dp.dump().unwrap();
    assert_eq!(
        dump.frontends
            .iter()
            .find(|f| f.key == web)
            .unwrap()
            .affinity_timeout,
        Some(600)
    );

    // Weights: nearly every new connection to the heavy backend.
    let f = st.frontends.get_mut(&web).unwrap();
    f.affinity_timeout = None;
    f.weights = vec![1, 1_000_000];
    dp.apply(&st).unwrap();
    let got = connects(&l.node, "10.96.0.1:80", 20);
    assert!(got.get(&'B') >= Some(&19), "{got:?}");

    // A new dataplane (an agent restart) replaces the tables whole, with the same result.
    let mut again = dataplane(&l, kind);
    again.apply(&st).unwrap();
    assert!(connects(&l.node, "10.96.0.1:80", 5).get(&'B') >= Some(&4));
    remove(&l, kind);
    assert_eq!(
        connects(&l.node, "10.96.0.1:80", 1),
        BTreeMap::from([('t', 1)])
    );
}

/// External traffic arriving on a node device: NodePorts on the node's addresses, a
/// LoadBalancer IP whose source ranges leave the client out, and an externalTrafficPolicy:
/// Local frontend without a local endpoint (dropped).
fn nodeports_and_external_ips_through_nat_prerouting(kind: Kind) {
    let l = lab(&format!("ext{}", tag(kind)));
    serve(&l.node, "10.0.0.1", b'A');
    let mut dp = dataplane(&l, kind);
    let np = key([0, 0, 0, 0], 30080, Proto::Tcp, Scope::External);
    let np_udp = key([0, 0, 0, 0], 30053, Proto::Udp, Scope::External);
    let lb = key([10, 1, 0, 100], 80, Proto::Tcp, Scope::External);
    let local = key([0, 0, 0, 0], 30081, Proto::Tcp, Scope::External);
    let mut st = LbState::default();
    st.frontends.insert(np, fe(vec![be("10.0.0.1")]));
    st.frontends.insert(np_udp, fe(vec![be("10.0.0.1")]));
    let mut ranged = fe(vec![be("10.0.0.1")]);
    ranged.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    st.frontends.insert(lb, ranged);
    st.frontends.insert(local, fe(vec![]));
    dp.apply(&st).unwrap();
    sh(&l.node, "addr add 10.1.0.100/32 dev ext0");

    assert_eq!(
        connects(&l.client, "10.1.0.1:30080", 5),
        BTreeMap::from([('A', 5)])
    );
    assert_eq!(udp(&l.client, "10.1.0.1:30053"), 'A');
    assert_eq!(
        connects(&l.client, "10.1.0.100:80", 1),
        BTreeMap::from([('t', 1)])
    );
    assert_eq!(
        connects(&l.client, "10.1.0.1:30081", 1),
        BTreeMap::from([('t', 1)])
    );

    // The client's prefix admitted.
    st.frontends
        .get_mut(&lb)
        .unwrap()
        .source_ranges
        .push("10.1.0.0/24".parse().unwrap());
    dp.apply(&st).unwrap();
    assert_eq!(
        connects(&l.client, "10.1.0.100:80", 3),
        BTreeMap::from([('A', 3)])
    );
    let dump = dp.dump().unwrap();
    let mut ranges = dump
        .frontends
        .iter()
        .find(|f| f.key == lb)
        .unwrap()
        .source_ranges
        .clone();
    ranges.sort();
    assert_eq!(ranges, vec!["10.1.0.0/24", "192.0.2.0/24"]);
    let nodeports: Vec<FrontendKey> = dump
        .frontends
        .iter()
        .map(|f| f.key)
        .filter(|k| k.vip.is_unspecified())
        .collect();
    assert_eq!(nodeports.len(), 3);
}

/// A TCP server on `ip`:`port` in `ns` echoing what it reads, connection by connection.
fn echo_server(ns: &str, ip: &'static str, port: u16) {
    let l = in_ns(ns, move || TcpListener::bind((ip, port)).unwrap());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One exchange on `s`: whether the byte came back.
fn echoes(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"x"
}

fn run_in(ns: &str, cmd: &[&str]) {
    let ok = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(ns).display()))
        .args(cmd)
        .status()
        .unwrap()
        .success();
    assert!(ok, "{cmd:?} in {ns}");
}

/// Runs `nft -f -` with `text` in namespace `ns`.
fn nft_in(ns: &str, text: &str) {
    let mut c = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(ns).display()))
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
}

/// Flows written into the kernel's conntrack with their NAT (ctnetlink) are translated with
/// no NAT rule (only empty nat chains): UDP with DNAT, UDP with DNAT and SNAT, and a TCP
/// connection whose entry was lost (flushed with its rule) and written again, which goes on
/// where one that was not written is reset.
#[test]
fn flows_written_with_their_nat_are_translated_without_rules() {
    use weir_dataplane::ctnetlink::{Conntrack, Flow, FlowProto};
    let l = lab("ctn");
    serve(&l.node, "10.0.0.1", b'A');
    serve(&l.node, "10.0.0.2", b'B');
    // NAT happens where a dataplane has nat chains, and conntrack runs where a rule uses it
    // (the kernel registers those hooks for a namespace only then): a table with empty nat
    // chains and one conntrack rule, as a switch's target installed first has.
    let nft = |text: &str| nft_in(&l.node, text);
    nft("table ip t {\n chain pre { type nat hook prerouting priority -100; }\n chain post { type nat hook postrouting priority 100; }\n chain check { type filter hook forward priority 0; ct state invalid counter; }\n}\n");
    let mut ct = Conntrack::open(Some(&netns_path(&l.node))).unwrap();
    let udp_flow = |sport: u16, dnat: &str, snat: Option<&str>| Flow {
        proto: FlowProto::Udp,
        src: format!("10.1.0.2:{sport}").parse().unwrap(),
        dst: "10.1.0.1:30053".parse().unwrap(),
        dnat: Some(dnat.parse().unwrap()),
        snat: snat.map(|s| s.parse().unwrap()),
        timeout: 60,
        mark: 0,
    };
    ct.insert(&udp_flow(5000, "10.0.0.1:8080", None)).unwrap();
    ct.insert(&udp_flow(5002, "10.0.0.2:8080", Some("10.0.0.1:45000")))
        .unwrap();
    // Written twice: the second replaces the first.
    ct.insert(&udp_flow(5000, "10.0.0.1:8080", None)).unwrap();
    let from = |sport: u16| {
        in_ns(&l.client, move || {
            let s = UdpSocket::bind(("10.1.0.2", sport)).unwrap();
            s.connect("10.1.0.1:30053").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let _ = s.send(b"?");
            let mut b = [0u8; 4];
            match s.recv(&mut b) {
                Ok(_) => b[0] as char,
                Err(_) => '-',
            }
        })
    };
    assert_eq!(from(5000), 'A');
    assert_eq!(from(5002), 'B');
    assert_eq!(from(5001), '-', "a flow nobody wrote is not translated");

    // TCP: a connection DNATed by a rule; the rule and the conntrack entry go; the entry is
    // written again and the connection goes on.
    echo_server(&l.node, "10.0.0.1", 8081);
    nft("add rule ip t pre tcp dport 30080 dnat to 10.0.0.1:8081");
    let connect = || {
        in_ns(&l.client, || {
            let s = TcpStream::connect_timeout(
                &"10.1.0.1:30080".parse().unwrap(),
                Duration::from_secs(1),
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        })
    };
    let (mut kept, mut lost) = (connect(), connect());
    assert!(echoes(&mut kept) && echoes(&mut lost));
    nft("flush chain ip t pre");
    run_in(&l.node, &["conntrack", "-F"]);
    ct.insert(&Flow {
        proto: FlowProto::Tcp,
        src: kept.local_addr().unwrap(),
        dst: "10.1.0.1:30080".parse().unwrap(),
        dnat: Some("10.0.0.1:8081".parse().unwrap()),
        snat: None,
        timeout: 300,
        mark: 0,
    })
    .unwrap();
    assert!(echoes(&mut kept), "the written connection goes on");
    assert!(!echoes(&mut lost), "the other is reset");
}

/// The kernel's conntrack read back (what a switch to eBPF takes over): a dump lists a
/// DNATed TCP connection with its reply tuple after NAT and its state, and a subscription
/// made before sees the entries confirmed after it (a connection, and an entry written over
/// ctnetlink with DNAT and SNAT).
#[test]
fn kernel_entries_are_dumped_and_followed() {
    use weir_dataplane::ctnetlink::{tcp_state, Conntrack, Events, Flow, FlowProto};
    let l = lab("ctd");
    echo_server(&l.node, "10.0.0.1", 8081);
    let nft = |text: &str| nft_in(&l.node, text);
    nft("table ip t {\n chain pre { type nat hook prerouting priority -100; tcp dport 30080 dnat to 10.0.0.1:8081; }\n}\n");
    let ns = netns_path(&l.node);
    let mut events = Events::subscribe(Some(&ns)).unwrap();
    let mut s = in_ns(&l.client, || {
        TcpStream::connect_timeout(&"10.1.0.1:30080".parse().unwrap(), Duration::from_secs(1))
            .unwrap()
    });
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(echoes(&mut s));
    let client = s.local_addr().unwrap();
    let orig = (client, "10.1.0.1:30080".parse().unwrap());
    let reply = ("10.0.0.1:8081".parse().unwrap(), client);
    let mut ct = Conntrack::open(Some(&ns)).unwrap();
    let dumped = ct.dump().unwrap();
    let e = dumped
        .iter()
        .find(|e| e.orig == orig)
        .unwrap_or_else(|| panic!("{client} in {dumped:?}"));
    assert_eq!((e.proto, e.reply), (6, reply));
    assert_eq!(e.tcp_state, Some(tcp_state::ESTABLISHED));
    assert!(e.timeout > 0);
    // Liberal window tracking set on the live entry: accepted, the connection goes on.
    ct.loosen(e).unwrap();
    assert!(echoes(&mut s));
    ct.insert(&Flow {
        proto: FlowProto::Udp,
        src: "10.1.0.2:5002".parse().unwrap(),
        dst: "10.1.0.1:30053".parse().unwrap(),
        dnat: Some("10.0.0.2:8080".parse().unwrap()),
        snat: Some("10.0.0.1:45000".parse().unwrap()),
        timeout: 60,
        mark: 0,
    })
    .unwrap();
    let seen = events.drain().unwrap();
    assert!(seen.iter().any(|e| e.orig == orig), "{seen:?}");
    let u = seen
        .iter()
        .find(|e| e.proto == 17)
        .unwrap_or_else(|| panic!("the written UDP entry in {seen:?}"));
    assert_eq!(
        u.reply,
        (
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:45000".parse().unwrap()
        )
    );
    assert!(events.drain().unwrap().is_empty(), "read once");
}
