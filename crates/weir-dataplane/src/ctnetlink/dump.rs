//! Reading the kernel's conntrack over ctnetlink: a dump of every entry (`IPCTNL_MSG_CT_GET`
//! with `NLM_F_DUMP`, both families), and the events of entries confirmed while the dump runs
//! (multicast group `NFNLGRP_CONNTRACK_NEW`), so that a reader who subscribes first and dumps
//! second misses nothing. This is how the eBPF datapath takes a netfilter dataplane's flows
//! over at a switch ([`crate::takeover`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{recv, MsgFlags};

use super::{
    align, message, netlink_socket, nl_err, Conntrack, CTA_MARK, CTA_PROTOINFO, CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_STATE, CTA_PROTO_DST_PORT, CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_STATUS,
    CTA_TIMEOUT, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY,
    NFNL_SUBSYS_CTNETLINK, NLMSG_ERROR,
};
use crate::DataplaneError;

const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
/// Multicast group NFNLGRP_CONNTRACK_NEW, as a bind mask.
const GROUP_CONNTRACK_NEW: u32 = 1;

/// `IPS_SEEN_REPLY`: a packet was seen in the reply direction.
pub const STATUS_SEEN_REPLY: u32 = 1 << 1;
/// `IPS_DYING`: the entry is being removed.
pub const STATUS_DYING: u32 = 1 << 9;

/// TCP conntrack states (`enum tcp_conntrack`) the takeover distinguishes.
pub mod tcp_state {
    /// SYN sent, no answer yet.
    pub const SYN_SENT: u8 = 1;
    /// SYN answered.
    pub const SYN_RECV: u8 = 2;
    /// Established.
    pub const ESTABLISHED: u8 = 3;
    /// FIN_WAIT, CLOSE_WAIT, LAST_ACK: closing.
    pub const FIN_WAIT: u8 = 4;
    /// Closing, the last state before TIME_WAIT.
    pub const LAST_ACK: u8 = 6;
    /// Both sides closed.
    pub const TIME_WAIT: u8 = 7;
    /// Reset or gone.
    pub const CLOSE: u8 = 8;
}

/// One connection as the kernel's conntrack holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// IP protocol number.
    pub proto: u8,
    /// The original direction: (source, destination) as the first packet came.
    pub orig: (SocketAddr, SocketAddr),
    /// The reply direction: (source, destination) as replies come, after NAT.
    pub reply: (SocketAddr, SocketAddr),
    /// `IPS_*` bits.
    pub status: u32,
    /// TCP: the conntrack state.
    pub tcp_state: Option<u8>,
    /// Seconds left.
    pub timeout: u32,
    /// The entry's mark.
    pub mark: u32,
}

/// The attributes in `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, payload))
    })
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?))
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

/// A tuple: (protocol, source, destination). Entries without ports (ICMP) give None.
fn tuple(b: &[u8]) -> Option<(u8, SocketAddr, SocketAddr)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for (k, v) in attrs(b) {
        match k {
            CTA_TUPLE_IP => {
                for (k, v) in attrs(v) {
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = ip(v),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = ip(v),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attrs(v) {
                    match k {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = be16(v),
                        CTA_PROTO_DST_PORT => dport = be16(v),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        proto?,
        SocketAddr::new(src?, sport?),
        SocketAddr::new(dst?, dport?),
    ))
}

/// The entry in a ctnetlink message's payload (after the `nlmsghdr`: `nfgenmsg`, then
/// attributes), if it has ports.
pub fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let mut e = Entry {
        proto: 0,
        orig: (SocketAddr::from(([0; 4], 0)), SocketAddr::from(([0; 4], 0))),
        reply: (SocketAddr::from(([0; 4], 0)), SocketAddr::from(([0; 4], 0))),
        status: 0,
        tcp_state: None,
        timeout: 0,
        mark: 0,
    };
    let (mut orig, mut reply) = (None, None);
    for (k, v) in attrs(payload.get(4..)?) {
        match k {
            CTA_TUPLE_ORIG => orig = tuple(v),
            CTA_TUPLE_REPLY => reply = tuple(v),
            CTA_STATUS => e.status = be32(v)?,
            CTA_TIMEOUT => e.timeout = be32(v)?,
            CTA_MARK => e.mark = be32(v)?,
            CTA_PROTOINFO => {
                for (k, v) in attrs(v) {
                    if k == CTA_PROTOINFO_TCP {
                        e.tcp_state = attrs(v)
                            .find(|(k, _)| *k == CTA_PROTOINFO_TCP_STATE)
                            .and_then(|(_, v)| v.first().copied());
                    }
                }
            }
            _ => {}
        }
    }
    let (proto, s, d) = orig?;
    let (_, rs, rd) = reply?;
    e.proto = proto;
    e.orig = (s, d);
    e.reply = (rs, rd);
    Some(e)
}

/// What one read of a netlink socket held: entries, and whether the dump ended.
struct Batch {
    entries: Vec<Entry>,
    done: bool,
}

/// Reads the messages of one datagram into `out`; `Err` for an error message.
fn read_messages(buf: &[u8], out: &mut Batch) -> Result<(), DataplaneError> {
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let typ = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
        if len < 16 || at + len > buf.len() {
            break;
        }
        let body = &buf[at + 16..at + len];
        match typ {
            NLMSG_DONE => out.done = true,
            NLMSG_ERROR => {
                let err = i32::from_ne_bytes(body.get(..4).unwrap_or(&[0; 4]).try_into().unwrap());
                if err != 0 {
                    return Err(nl_err("dump", nix::Error::from_raw(-err)));
                }
            }
            t if t >> 8 == NFNL_SUBSYS_CTNETLINK => out.entries.extend(parse_entry(body)),
            _ => {}
        }
        at += align(len);
    }
    Ok(())
}

/// Netlink dumps come in datagrams of up to 32 KiB (more is cut off).
const RECV_BUFFER: usize = 1 << 17;

impl Conntrack {
    /// Every entry of the kernel's conntrack with ports (TCP, UDP, SCTP...), both families.
    pub fn dump(&mut self) -> Result<Vec<Entry>, DataplaneError> {
        self.seq = self.seq.wrapping_add(1);
        let m = message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, self.seq, 0, &[]);
        nix::sys::socket::sendto(
            self.fd.as_raw_fd(),
            &m,
            &nix::sys::socket::NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|e| nl_err("dump request", e))?;
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut out = Batch {
            entries: Vec::new(),
            done: false,
        };
        while !out.done {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| nl_err("dump", e))?;
            read_messages(&buf[..n], &mut out)?;
        }
        Ok(out.entries)
    }
}

/// A subscription to the entries the kernel confirms (new connections), in one network
/// namespace.
pub struct Events {
    fd: OwnedFd,
}

impl Events {
    /// Subscribes in the network namespace `netns` (None: this thread's).
    pub fn subscribe(netns: Option<&Path>) -> Result<Self, DataplaneError> {
        Ok(Events {
            fd: netlink_socket(netns, GROUP_CONNTRACK_NEW, true)?,
        })
    }

    /// The entries confirmed since the last call. An error when events were lost (the
    /// socket's buffer overran): the caller dumps again.
    pub fn drain(&mut self) -> Result<Vec<Entry>, DataplaneError> {
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut out = Batch {
            entries: Vec::new(),
            done: false,
        };
        loop {
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) | Err(nix::Error::EAGAIN) => return Ok(out.entries),
                Ok(n) => read_messages(&buf[..n], &mut out)?,
                Err(e) => return Err(nl_err("reading events", e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{create_attrs, Flow, FlowProto};
    use super::*;

    #[test]
    fn an_entry_written_is_read_back() {
        let f = Flow {
            proto: FlowProto::Tcp,
            src: "10.1.0.2:5000".parse().unwrap(),
            dst: "10.96.0.10:80".parse().unwrap(),
            dnat: Some("10.244.1.5:8080".parse().unwrap()),
            snat: None,
            timeout: 60,
            mark: 7,
        };
        // The payload as the kernel sends it: nfgenmsg, then attributes.
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(create_attrs(&f));
        let e = parse_entry(&payload).unwrap();
        assert_eq!(e.proto, 6);
        assert_eq!(e.orig, (f.src, f.dst));
        // What we write as the reply tuple is the inverse (the kernel applies the NAT).
        assert_eq!(e.reply, (f.dst, f.src));
        assert_eq!((e.timeout, e.mark), (60, 7));
        assert_eq!(e.tcp_state, Some(tcp_state::ESTABLISHED));
        assert_ne!(e.status & STATUS_SEEN_REPLY, 0);
        // Truncated input is refused, not misread.
        assert!(parse_entry(&payload[..payload.len() / 2]).is_none());
    }
}
