//! Writing connections into the kernel's conntrack with the NAT they carry, over ctnetlink
//! (as conntrackd commits its cache on failover): how a netfilter dataplane takes over flows
//! another datapath translated. An entry is created with its original tuple, the reply tuple
//! as the inverse (the kernel rewrites it from the NAT given), `CTA_NAT_DST` (the backend) and
//! `CTA_NAT_SRC` (the SNAT address and port), a timeout, the seen-reply and assured bits, and
//! for TCP the established state with liberal window tracking on both sides (the sequence
//! history is not known). NAT can only be set when an entry is created: an entry already
//! there is deleted and created again, once.
//!
//! Message layout (`linux/netfilter/nfnetlink_conntrack.h`): an `nlmsghdr` of type
//! `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW`, an `nfgenmsg`, then nested attributes,
//! addresses and ports in network byte order.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

use crate::DataplaneError;

mod dump;
pub use dump::{parse_entry, tcp_state, Entry, Events, STATUS_DYING, STATUS_SEEN_REPLY};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_NAT_SRC: u16 = 6;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_NAT_DST: u16 = 13;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_NAT_V6_MINIP: u16 = 4;
const CTA_NAT_V6_MAXIP: u16 = 5;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
/// IP_CT_TCP_FLAG_BE_LIBERAL (as `nf_ct_tcp_flags`: the flags, then the mask of those set).
const TCP_FLAG_BE_LIBERAL: u8 = 0x08;
/// IP_CT_TCP_FLAG_SACK_PERM | IP_CT_TCP_FLAG_BE_LIBERAL.
const TCP_FLAGS_LIBERAL: u8 = 0x02 | TCP_FLAG_BE_LIBERAL;
/// IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED (the kernel confirms a created entry itself,
/// and refuses a status that would take the bit away).
const STATUS_SEEN_ASSURED: u32 = (1 << 1) | (1 << 2) | (1 << 3);

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowProto {
    /// TCP (written as established).
    Tcp,
    /// UDP.
    Udp,
}

/// A translated connection to write into conntrack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Protocol.
    pub proto: FlowProto,
    /// The client, as the first packet came.
    pub src: SocketAddr,
    /// The address the client sent to (a frontend, or the external peer of a masqueraded
    /// flow).
    pub dst: SocketAddr,
    /// Where the flow was sent (destination NAT), if anywhere else.
    pub dnat: Option<SocketAddr>,
    /// What the client's address became (source NAT), if it changed.
    pub snat: Option<SocketAddr>,
    /// Seconds the entry lives without traffic.
    pub timeout: u32,
    /// A mark to tag the entry with (0: none).
    pub mark: u32,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align(buf.len()), 0);
}

fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let mut body = Vec::new();
    inner(&mut body);
    attr(buf, kind | NLA_F_NESTED, &body);
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn tuple(buf: &mut Vec<u8>, kind: u16, proto: u8, src: SocketAddr, dst: SocketAddr) {
    nested(buf, kind, |t| {
        nested(t, CTA_TUPLE_IP, |i| {
            let (s, d) = if src.is_ipv4() { (1, 2) } else { (3, 4) };
            attr(i, s, &ip_bytes(src.ip()));
            attr(i, d, &ip_bytes(dst.ip()));
        });
        nested(t, CTA_TUPLE_PROTO, |p| {
            attr(p, CTA_PROTO_NUM, &[proto]);
            attr(p, CTA_PROTO_SRC_PORT, &src.port().to_be_bytes());
            attr(p, CTA_PROTO_DST_PORT, &dst.port().to_be_bytes());
        });
    });
}

fn nat(buf: &mut Vec<u8>, kind: u16, to: SocketAddr) {
    nested(buf, kind, |n| {
        let (min, max) = if to.is_ipv4() {
            (CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP)
        } else {
            (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP)
        };
        attr(n, min, &ip_bytes(to.ip()));
        attr(n, max, &ip_bytes(to.ip()));
        nested(n, CTA_NAT_PROTO, |p| {
            attr(p, CTA_PROTONAT_PORT_MIN, &to.port().to_be_bytes());
            attr(p, CTA_PROTONAT_PORT_MAX, &to.port().to_be_bytes());
        });
    });
}

fn message(kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + attrs.len());
    let len = 16 + 4 + attrs.len();
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

fn proto_number(p: FlowProto) -> u8 {
    match p {
        FlowProto::Tcp => 6,
        FlowProto::Udp => 17,
    }
}

fn family(f: &Flow) -> u8 {
    if f.src.is_ipv4() {
        2
    } else {
        10
    }
}

/// The attributes creating `f`.
fn create_attrs(f: &Flow) -> Vec<u8> {
    let proto = proto_number(f.proto);
    let mut a = Vec::new();
    tuple(&mut a, CTA_TUPLE_ORIG, proto, f.src, f.dst);
    tuple(&mut a, CTA_TUPLE_REPLY, proto, f.dst, f.src);
    if let Some(to) = f.dnat {
        nat(&mut a, CTA_NAT_DST, to);
    }
    if let Some(to) = f.snat {
        nat(&mut a, CTA_NAT_SRC, to);
    }
    attr(&mut a, CTA_TIMEOUT, &f.timeout.to_be_bytes());
    attr(&mut a, CTA_STATUS, &STATUS_SEEN_ASSURED.to_be_bytes());
    if f.mark != 0 {
        attr(&mut a, CTA_MARK, &f.mark.to_be_bytes());
    }
    if f.proto == FlowProto::Tcp {
        nested(&mut a, CTA_PROTOINFO, |p| {
            nested(p, CTA_PROTOINFO_TCP, |t| {
                attr(t, CTA_PROTOINFO_TCP_STATE, &[TCP_CONNTRACK_ESTABLISHED]);
                let flags = [TCP_FLAGS_LIBERAL, TCP_FLAGS_LIBERAL];
                attr(t, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &flags);
                attr(t, CTA_PROTOINFO_TCP_FLAGS_REPLY, &flags);
            });
        });
    }
    a
}

/// A ctnetlink socket in one network namespace.
pub struct Conntrack {
    fd: OwnedFd,
    seq: u32,
}

fn nl_err(what: &str, e: nix::Error) -> DataplaneError {
    DataplaneError::Netfilter(format!("ctnetlink: {what}: {e}"))
}

/// A NETLINK_NETFILTER socket in the network namespace `netns` (None: this thread's),
/// member of the multicast `groups` (a bit mask), non-blocking with `nonblock`.
fn netlink_socket(
    netns: Option<&Path>,
    groups: u32,
    nonblock: bool,
) -> Result<OwnedFd, DataplaneError> {
    let make = move || -> Result<OwnedFd, DataplaneError> {
        let mut flags = SockFlag::SOCK_CLOEXEC;
        if nonblock {
            flags |= SockFlag::SOCK_NONBLOCK;
        }
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            flags,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| nl_err("socket", e))?;
        if groups != 0 {
            // Room for a burst of events while the reader is busy (root may exceed rmem_max).
            let _ = nix::sys::socket::setsockopt(
                &fd,
                nix::sys::socket::sockopt::RcvBufForce,
                &(8 << 20),
            );
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).map_err(|e| nl_err("bind", e))?;
        Ok(fd)
    };
    match netns {
        None => make(),
        Some(ns) => {
            let ns = ns.to_path_buf();
            // A socket belongs to the namespace it was made in: make it on a thread there.
            std::thread::spawn(move || {
                let f = std::fs::File::open(&ns).map_err(|e| {
                    DataplaneError::Netfilter(format!("opening {}: {e}", ns.display()))
                })?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| nl_err("setns", e))?;
                make()
            })
            .join()
            .map_err(|_| DataplaneError::Netfilter("ctnetlink: thread panicked".into()))?
        }
    }
}

impl Conntrack {
    /// Opens a socket in the network namespace `netns` (None: this thread's).
    pub fn open(netns: Option<&Path>) -> Result<Self, DataplaneError> {
        Ok(Conntrack {
            fd: netlink_socket(netns, 0, false)?,
            seq: 0,
        })
    }

    /// Sends one request and reads its acknowledgement: Ok, or the kernel's errno.
    fn request(&mut self, kind: u16, flags: u16, fam: u8, attrs: &[u8]) -> Result<(), nix::Error> {
        self.seq = self.seq.wrapping_add(1);
        let m = message(kind, flags, self.seq, fam, attrs);
        sendto(
            self.fd.as_raw_fd(),
            &m,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut buf = [0u8; 8192];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
                let typ = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().expect("4 bytes"));
                if typ == NLMSG_ERROR && seq == self.seq && at + 20 <= n {
                    let err =
                        i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4 bytes"));
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(nix::Error::from_raw(-err))
                    };
                }
                if len < 16 {
                    break;
                }
                at += align(len);
            }
        }
    }

    /// Writes `f` (replacing an entry of the same original tuple).
    pub fn insert(&mut self, f: &Flow) -> Result<(), DataplaneError> {
        let attrs = create_attrs(f);
        let create = NLM_F_CREATE | NLM_F_EXCL;
        match self.request(IPCTNL_MSG_CT_NEW, create, family(f), &attrs) {
            Ok(()) => Ok(()),
            Err(nix::Error::EEXIST) => {
                self.delete(f)?;
                self.request(IPCTNL_MSG_CT_NEW, create, family(f), &attrs)
                    .map_err(|e| nl_err(&format!("creating {f:?}"), e))
            }
            Err(e) => Err(nl_err(&format!("creating {f:?}"), e)),
        }
    }

    /// Turns on liberal window tracking for both directions of the TCP entry `e` (its
    /// state otherwise kept): while a switch moves a flow's two directions onto another
    /// datapath one after the other, conntrack sees one direction acknowledge data it never
    /// saw from the other, and would mark such packets invalid and leave them untranslated.
    pub fn loosen(&mut self, e: &Entry) -> Result<(), DataplaneError> {
        let mut a = Vec::new();
        tuple(&mut a, CTA_TUPLE_ORIG, e.proto, e.orig.0, e.orig.1);
        nested(&mut a, CTA_PROTOINFO, |p| {
            nested(p, CTA_PROTOINFO_TCP, |t| {
                let liberal = [TCP_FLAG_BE_LIBERAL, TCP_FLAG_BE_LIBERAL];
                attr(t, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &liberal);
                attr(t, CTA_PROTOINFO_TCP_FLAGS_REPLY, &liberal);
            });
        });
        let fam = if e.orig.0.is_ipv4() { 2 } else { 10 };
        match self.request(IPCTNL_MSG_CT_NEW, 0, fam, &a) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(err) => Err(nl_err(&format!("loosening {e:?}"), err)),
        }
    }

    /// Deletes the kernel's entry `e` (gone already is not an error).
    pub fn delete_entry(&mut self, e: &Entry) -> Result<(), DataplaneError> {
        self.delete_tuple(e.proto, e.orig)
            .map_err(|err| nl_err(&format!("deleting {e:?}"), err))
    }

    /// Deletes the entry of original tuple `(src, dst)` (none there is not an error).
    fn delete_tuple(
        &mut self,
        proto: u8,
        (src, dst): (SocketAddr, SocketAddr),
    ) -> Result<(), nix::Error> {
        let mut a = Vec::new();
        tuple(&mut a, CTA_TUPLE_ORIG, proto, src, dst);
        let fam = if src.is_ipv4() { 2 } else { 10 };
        match self.request(IPCTNL_MSG_CT_DELETE, 0, fam, &a) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Deletes the entry of `f`'s original tuple (none there is not an error).
    pub fn delete(&mut self, f: &Flow) -> Result<(), DataplaneError> {
        self.delete_tuple(proto_number(f.proto), (f.src, f.dst))
            .map_err(|e| nl_err(&format!("deleting {f:?}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested() {
        let f = Flow {
            proto: FlowProto::Udp,
            src: "10.1.0.2:5000".parse().unwrap(),
            dst: "10.1.0.1:30053".parse().unwrap(),
            dnat: Some("10.0.0.1:8080".parse().unwrap()),
            snat: None,
            timeout: 60,
            mark: 0,
        };
        let a = create_attrs(&f);
        assert_eq!(a.len() % 4, 0);
        // The first attribute is the original tuple, nested.
        let kind = u16::from_ne_bytes([a[2], a[3]]);
        assert_eq!(kind, CTA_TUPLE_ORIG | NLA_F_NESTED);
        let m = message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE, 7, 2, &a);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
    }
}
