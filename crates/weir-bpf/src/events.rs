//! What the programs report besides verdicts and drops: forwarding summaries of the tc and XDP
//! programs (`struct trace_event4` for IPv4 flows, `struct trace_event` for IPv6,
//! bpf/lib/trace.h) and the socket layer's translations (`struct sock_event`,
//! bpf/lib/sock.h), decoded from their ring buffers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use crate::datapath::{AF_INET, AF_INET6};
use crate::BpfError;

/// `trace_event.flags`: a new flow at this observation point (a TCP connection's first SYN
/// or SYN-ACK there; another protocol's first packet there).
pub const TRACE_F_NEW: u8 = 1;
/// `trace_event.flags`: translated (`orig_src`/`orig_dst` are its addresses before).
pub const TRACE_F_XLATE: u8 = 2;
/// `trace_event.flags`: a reply (of a translated flow, or of a TCP flow whose first packet
/// there was a SYN-ACK).
pub const TRACE_F_REPLY: u8 = 4;

/// `sock_event.point`: connect() (TCP, connected UDP).
pub const SOCK_XLATE_CONNECT: u8 = 1;
/// `sock_event.point`: sendmsg() of unconnected UDP (a socket and backend's first).
pub const SOCK_XLATE_SENDMSG: u8 = 2;
/// `sock_event.point`: recvmsg() of unconnected UDP (a socket and backend's first reply).
pub const SOCK_XLATE_RECVMSG: u8 = 3;
/// `sock_config.flags`: report translations.
pub const SOCK_CFG_EVENTS: u32 = 1;

/// A forwarding summary: what a tc or XDP program did with a flow's packets at one
/// observation point since its previous summary there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// When (boot clock, nanoseconds).
    pub ts: u64,
    /// `REASON_*`: what the program did.
    pub reason: u32,
    /// `WEIR_DIR_*` of the hook.
    pub dir: u8,
    /// The device the program ran on.
    pub ifindex: u32,
    /// IP protocol.
    pub proto: u8,
    /// The packet's source as it left the program (port 0 without ports).
    pub src: SocketAddr,
    /// Its destination.
    pub dst: SocketAddr,
    /// This packet's TCP flags.
    pub tcp_flags: u8,
    /// The TCP flags (SYN, FIN, RST) seen on the flow there so far.
    pub tcp_seen: u8,
    /// Packets and bytes since the previous summary, this packet included.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// `TRACE_F_*`.
    pub flags: u8,
    /// Before translation (with `TRACE_F_XLATE`): source and destination.
    pub orig: Option<(SocketAddr, SocketAddr)>,
    /// The frontend's service id (translated flows; 0 for masquerade).
    pub svc_id: u32,
}

/// A translation at the socket layer, or its refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockEvent {
    /// When (boot clock, nanoseconds).
    pub ts: u64,
    /// The socket's cookie.
    pub cookie: u64,
    /// Its network namespace's cookie.
    pub netns: u64,
    /// `SOCK_XLATE_*`.
    pub point: u8,
    /// IP protocol.
    pub proto: u8,
    /// The service address asked for.
    pub vip: SocketAddr,
    /// The backend it became (None: refused).
    pub backend: Option<SocketAddr>,
    /// The frontend's service id.
    pub svc_id: u32,
    /// 0, or the `weir_reason` of a refusal.
    pub reason: u32,
}

fn u16_be(d: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([d[o], d[o + 1]])
}

fn u32_ne(d: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(d[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_ne(d: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(d[o..o + 8].try_into().expect("8 bytes"))
}

/// The address of `family` at `d[o..]` (network order), with the port at `d[p..]`.
fn sock_at(d: &[u8], family: u8, o: usize, p: usize) -> Option<SocketAddr> {
    let ip: IpAddr = match family {
        AF_INET => Ipv4Addr::new(d[o], d[o + 1], d[o + 2], d[o + 3]).into(),
        AF_INET6 => {
            let b: [u8; 16] = d[o..o + 16].try_into().ok()?;
            Ipv6Addr::from(b).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16_be(d, p)))
}

/// What the agent counts of a forwarding summary: a few fields, read from an IPv4 flow's
/// record as it is ([`TraceCount::of4`]: decoding the whole summary was a quarter of the
/// agent's time per summary), or from a decoded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceCount {
    /// When (boot clock, nanoseconds).
    pub ts: u64,
    /// The packet's source address as it left the program.
    pub src: IpAddr,
    /// Its destination address.
    pub dst: IpAddr,
    /// `REASON_*`.
    pub reason: u32,
    /// IP protocol.
    pub proto: u8,
    /// This packet's TCP flags.
    pub tcp_flags: u8,
    /// `TRACE_F_*`.
    pub flags: u8,
    /// The destination before translation (with `TRACE_F_XLATE`): the frontend a request
    /// asked for (a reply's: the client, or the address it was masqueraded to).
    pub frontend: Option<SocketAddr>,
}

impl TraceCount {
    /// Of a `struct trace_event4` (an IPv4 flow's summary, as [`TraceEvent::decode`] reads it).
    pub fn of4(d: &[u8; 64]) -> TraceCount {
        let flags = d[57];
        let v4 = |o: usize| IpAddr::V4(Ipv4Addr::new(d[o], d[o + 1], d[o + 2], d[o + 3]));
        TraceCount {
            ts: u64_ne(d, 0),
            src: v4(16),
            dst: v4(20),
            reason: u32::from(u16::from_ne_bytes([d[52], d[53]])),
            proto: d[54],
            tcp_flags: d[56],
            flags,
            frontend: (flags & TRACE_F_XLATE != 0).then(|| SocketAddr::new(v4(32), u16_be(d, 38))),
        }
    }

    /// Of a decoded summary.
    pub fn of(t: &TraceEvent) -> TraceCount {
        TraceCount {
            ts: t.ts,
            src: t.src.ip(),
            dst: t.dst.ip(),
            reason: t.reason,
            proto: t.proto,
            tcp_flags: t.tcp_flags,
            flags: t.flags,
            frontend: t.orig.map(|(_, frontend)| frontend),
        }
    }
}

impl TraceEvent {
    /// A `struct trace_event` (weir/api/datapath.h: 120 bytes) or an IPv4 flow's
    /// `struct trace_event4` (64 bytes), told apart by length; host order but for the
    /// addresses and ports.
    pub fn decode(d: &[u8]) -> Option<TraceEvent> {
        match d.len() {
            120.. => Self::decode_any(d),
            64.. => Self::decode4(d),
            _ => None,
        }
    }

    /// The `struct trace_event4` an IPv4 flow's summary is written as (what [`decode`]
    /// reads back), for those that keep or make records as the programs write them; `None`
    /// for an IPv6 flow's.
    ///
    /// [`decode`]: TraceEvent::decode
    pub fn encode4(&self) -> Option<[u8; 64]> {
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => Some((a.ip().octets(), a.port().to_be_bytes())),
            SocketAddr::V6(_) => None,
        };
        let (src, sport) = v4(self.src)?;
        let (dst, dport) = v4(self.dst)?;
        let mut d = [0u8; 64];
        d[0..8].copy_from_slice(&self.ts.to_ne_bytes());
        d[8..16].copy_from_slice(&self.bytes.to_ne_bytes());
        d[16..20].copy_from_slice(&src);
        d[20..24].copy_from_slice(&dst);
        d[24..26].copy_from_slice(&sport);
        d[26..28].copy_from_slice(&dport);
        if let Some((os, od)) = self.orig {
            let ((os, osp), (od, odp)) = (v4(os)?, v4(od)?);
            d[28..32].copy_from_slice(&os);
            d[32..36].copy_from_slice(&od);
            d[36..38].copy_from_slice(&osp);
            d[38..40].copy_from_slice(&odp);
        }
        d[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        d[44..48].copy_from_slice(&self.svc_id.to_ne_bytes());
        d[48..52].copy_from_slice(&u32::try_from(self.packets).ok()?.to_ne_bytes());
        d[52..54].copy_from_slice(&u16::try_from(self.reason).ok()?.to_ne_bytes());
        d[54] = self.proto;
        d[55] = self.dir;
        d[56] = self.tcp_flags;
        d[57] = self.flags;
        d[58] = self.tcp_seen;
        Some(d)
    }

    /// A `struct trace_event4`: an IPv4 flow's summary.
    fn decode4(d: &[u8]) -> Option<TraceEvent> {
        let flags = d[57];
        let orig = if flags & TRACE_F_XLATE != 0 {
            Some((sock_at(d, AF_INET, 28, 36)?, sock_at(d, AF_INET, 32, 38)?))
        } else {
            None
        };
        Some(TraceEvent {
            ts: u64_ne(d, 0),
            bytes: u64_ne(d, 8),
            src: sock_at(d, AF_INET, 16, 24)?,
            dst: sock_at(d, AF_INET, 20, 26)?,
            ifindex: u32_ne(d, 40),
            svc_id: u32_ne(d, 44),
            packets: u64::from(u32_ne(d, 48)),
            reason: u32::from(u16::from_ne_bytes([d[52], d[53]])),
            proto: d[54],
            dir: d[55],
            tcp_flags: d[56],
            orig,
            flags,
            tcp_seen: d[58],
        })
    }

    /// A `struct trace_event` (either family).
    fn decode_any(d: &[u8]) -> Option<TraceEvent> {
        let family = d[44];
        let flags = d[112];
        let orig = if flags & TRACE_F_XLATE != 0 {
            Some((sock_at(d, family, 72, 104)?, sock_at(d, family, 88, 106)?))
        } else {
            None
        };
        Some(TraceEvent {
            ts: u64_ne(d, 0),
            src: sock_at(d, family, 8, 40)?,
            dst: sock_at(d, family, 24, 42)?,
            proto: d[45],
            dir: d[46],
            tcp_flags: d[47],
            reason: u32_ne(d, 48),
            ifindex: u32_ne(d, 52),
            packets: u64_ne(d, 56),
            bytes: u64_ne(d, 64),
            orig,
            svc_id: u32_ne(d, 108),
            flags,
            tcp_seen: d[113],
        })
    }
}

impl SockEvent {
    /// A `struct sock_event` (weir/api/lb.h: 72 bytes, host order but for the addresses
    /// and ports).
    pub fn decode(d: &[u8]) -> Option<SockEvent> {
        if d.len() < 72 {
            return None;
        }
        let family = d[60];
        let backend = sock_at(d, family, 40, 58)?;
        Some(SockEvent {
            ts: u64_ne(d, 0),
            cookie: u64_ne(d, 8),
            netns: u64_ne(d, 16),
            vip: sock_at(d, family, 24, 56)?,
            backend: (!backend.ip().is_unspecified()).then_some(backend),
            proto: d[61],
            point: d[62],
            svc_id: u32_ne(d, 64),
            reason: u32_ne(d, 68),
        })
    }
}

/// The name of a `SOCK_XLATE_*` point.
pub fn sock_point_name(point: u8) -> &'static str {
    match point {
        SOCK_XLATE_CONNECT => "connect",
        SOCK_XLATE_SENDMSG => "sendmsg",
        SOCK_XLATE_RECVMSG => "recvmsg",
        _ => "socket",
    }
}

/// The TCP flags (SYN, FIN, RST, ACK, PSH, URG) in `f`, as Hubble names them (`SYN-ACK`
/// for a SYN with ACK), comma-separated.
pub fn tcp_flag_names(f: u8) -> String {
    let mut out = Vec::new();
    if f & 0x02 != 0 {
        out.push(if f & 0x10 != 0 { "SYN-ACK" } else { "SYN" });
    }
    for (bit, name) in [(0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x20, "URG")] {
        if f & bit != 0 {
            out.push(name);
        }
    }
    if f & 0x10 != 0 && f & 0x02 == 0 {
        out.push("ACK");
    }
    out.join(",")
}

/// A reader of the ring buffer pinned at `path` (the socket layer's `weir_sock_events`),
/// calling `f` with each translation (poll it on the thread that made it).
pub fn watch_sock_events<F: FnMut(&SockEvent) + 'static>(
    path: &Path,
    mut f: F,
) -> Result<libbpf_rs::RingBuffer<'static>, BpfError> {
    crate::watch_pinned_ring(path, move |data: &[u8]| {
        if let Some(ev) = SockEvent::decode(data) {
            f(&ev);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_summary_reads_back_as_it_was_written() {
        let ev = TraceEvent {
            ts: 123_456_789,
            reason: 7,
            dir: 1,
            ifindex: 42,
            proto: 6,
            src: "10.1.0.1:30080".parse().unwrap(),
            dst: "172.30.0.2:40000".parse().unwrap(),
            tcp_flags: 0x12,
            tcp_seen: 0x02,
            packets: 3,
            bytes: 180,
            flags: TRACE_F_NEW | TRACE_F_XLATE | TRACE_F_REPLY,
            orig: Some((
                "10.244.1.5:8080".parse().unwrap(),
                "172.30.0.2:40000".parse().unwrap(),
            )),
            svc_id: 9,
        };
        let record = ev.encode4().expect("an IPv4 flow's");
        assert_eq!(TraceEvent::decode(&record), Some(ev.clone()));
        // What is counted, read from the record as it is, is what the decoded one says.
        let counted = TraceCount::of4(&record);
        assert_eq!(counted, TraceCount::of(&ev));
        assert_eq!(counted.frontend, Some("172.30.0.2:40000".parse().unwrap()));
        let plain = TraceEvent {
            flags: TRACE_F_NEW,
            orig: None,
            ..ev.clone()
        };
        let plain4 = plain.encode4().expect("an IPv4 flow's");
        assert_eq!(TraceCount::of4(&plain4), TraceCount::of(&plain));
        assert_eq!(TraceCount::of4(&plain4).frontend, None);
        let v6 = TraceEvent {
            src: "[fd00::1]:1".parse().unwrap(),
            ..ev
        };
        assert_eq!(v6.encode4(), None);
    }

    #[test]
    fn tcp_flags_are_named_as_hubble_does() {
        assert_eq!(tcp_flag_names(0x02), "SYN");
        assert_eq!(tcp_flag_names(0x12), "SYN-ACK");
        assert_eq!(tcp_flag_names(0x11), "FIN,ACK");
        assert_eq!(tcp_flag_names(0x04), "RST");
        assert_eq!(tcp_flag_names(0x18), "PSH,ACK");
        assert_eq!(tcp_flag_names(0), "");
    }

    #[test]
    fn events_decode_from_their_c_layout() {
        let mut d = vec![0u8; 120];
        d[0..8].copy_from_slice(&7u64.to_ne_bytes());
        d[8..12].copy_from_slice(&[10, 244, 1, 2]);
        d[24..28].copy_from_slice(&[10, 244, 2, 3]);
        d[40..42].copy_from_slice(&40000u16.to_be_bytes());
        d[42..44].copy_from_slice(&8080u16.to_be_bytes());
        d[44] = AF_INET;
        d[45] = 6;
        d[46] = 1;
        d[47] = 0x02;
        d[48..52].copy_from_slice(&0x0107u32.to_ne_bytes());
        d[52..56].copy_from_slice(&9u32.to_ne_bytes());
        d[56..64].copy_from_slice(&3u64.to_ne_bytes());
        d[64..72].copy_from_slice(&180u64.to_ne_bytes());
        d[72..76].copy_from_slice(&[10, 244, 1, 2]);
        d[88..92].copy_from_slice(&[10, 96, 0, 10]);
        d[104..106].copy_from_slice(&40000u16.to_be_bytes());
        d[106..108].copy_from_slice(&80u16.to_be_bytes());
        d[108..112].copy_from_slice(&5u32.to_ne_bytes());
        d[112] = TRACE_F_NEW | TRACE_F_XLATE;
        d[113] = 0x02;
        let t = TraceEvent::decode(&d).expect("decodes");
        assert_eq!(t.src, "10.244.1.2:40000".parse().unwrap());
        assert_eq!(t.dst, "10.244.2.3:8080".parse().unwrap());
        assert_eq!((t.packets, t.bytes, t.svc_id), (3, 180, 5));
        assert_eq!((t.ifindex, t.dir, t.reason, t.ts), (9, 1, 0x0107, 7));
        assert_eq!(
            t.orig,
            Some((
                "10.244.1.2:40000".parse().unwrap(),
                "10.96.0.10:80".parse().unwrap()
            ))
        );
        // The same summary as an IPv4 flow's 64-byte record.
        let mut d4 = vec![0u8; 64];
        d4[0..8].copy_from_slice(&7u64.to_ne_bytes());
        d4[8..16].copy_from_slice(&180u64.to_ne_bytes());
        d4[16..20].copy_from_slice(&[10, 244, 1, 2]);
        d4[20..24].copy_from_slice(&[10, 244, 2, 3]);
        d4[24..26].copy_from_slice(&40000u16.to_be_bytes());
        d4[26..28].copy_from_slice(&8080u16.to_be_bytes());
        d4[28..32].copy_from_slice(&[10, 244, 1, 2]);
        d4[32..36].copy_from_slice(&[10, 96, 0, 10]);
        d4[36..38].copy_from_slice(&40000u16.to_be_bytes());
        d4[38..40].copy_from_slice(&80u16.to_be_bytes());
        d4[40..44].copy_from_slice(&9u32.to_ne_bytes());
        d4[44..48].copy_from_slice(&5u32.to_ne_bytes());
        d4[48..52].copy_from_slice(&3u32.to_ne_bytes());
        d4[52..54].copy_from_slice(&0x0107u16.to_ne_bytes());
        d4[54] = 6;
        d4[55] = 1;
        d4[56] = 0x02;
        d4[57] = TRACE_F_NEW | TRACE_F_XLATE;
        d4[58] = 0x02;
        assert_eq!(TraceEvent::decode(&d4), Some(t));
        assert_eq!(TraceEvent::decode(&d4[..60]), None);
        let mut s = vec![0u8; 72];
        s[24..28].copy_from_slice(&[10, 96, 0, 10]);
        s[56..58].copy_from_slice(&80u16.to_be_bytes());
        s[60] = AF_INET;
        s[61] = 17;
        s[62] = SOCK_XLATE_SENDMSG;
        s[68..72].copy_from_slice(&132u32.to_ne_bytes());
        let e = SockEvent::decode(&s).expect("decodes");
        assert_eq!(e.vip, "10.96.0.10:80".parse().unwrap());
        assert_eq!(
            (e.backend, e.reason, e.point),
            (None, 132, SOCK_XLATE_SENDMSG)
        );
    }
}
