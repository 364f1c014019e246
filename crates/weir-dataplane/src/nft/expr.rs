//! Builders for libnftables JSON (`man libnftables-json`): the statements and expressions the
//! nftables dataplane writes, named after the nft syntax they stand for.
//!
//! weir writes this JSON itself: the `nftables` crate's schema cannot declare the verdict maps
//! service dispatch needs (`type ipv4_addr . inet_proto . inet_service : verdict`).

use serde_json::{json, Value};

/// `ip` or `ip6`: the table family, which is also the payload protocol of addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4 (`table ip weir`).
    Ip,
    /// IPv6 (`table ip6 weir`).
    Ip6,
}

impl Family {
    /// The family's name in nft.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }
    /// The nft type of an address of this family.
    pub fn addr_type(self) -> &'static str {
        match self {
            Family::Ip => "ipv4_addr",
            Family::Ip6 => "ipv6_addr",
        }
    }
    /// The family of `ip`.
    pub fn of(ip: std::net::IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::Ip
        } else {
            Family::Ip6
        }
    }
}

/// `ip daddr` / `ip6 saddr`...
pub fn addr(f: Family, field: &str) -> Value {
    json!({"payload": {"protocol": f.name(), "field": field}})
}

/// `th dport`: the transport header's destination port (TCP, UDP, SCTP alike).
pub fn th_dport() -> Value {
    json!({"payload": {"protocol": "th", "field": "dport"}})
}

/// `meta KEY`.
pub fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

/// `A . B . C`.
pub fn concat(parts: Vec<Value>) -> Value {
    json!({"concat": parts})
}

/// `@name`: a named set or map.
pub fn set_ref(name: &str) -> Value {
    Value::String(format!("@{name}"))
}

/// `LEFT OP RIGHT` (op `==`, `!=`, `in`).
pub fn matches(left: Value, op: &str, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

/// `LEFT == RIGHT`.
pub fn eq(left: Value, right: Value) -> Value {
    matches(left, "==", right)
}

/// `fib daddr type local`.
pub fn fib_daddr_local() -> Value {
    eq(
        json!({"fib": {"result": "type", "flags": ["daddr"]}}),
        json!("local"),
    )
}

/// `ct state new`.
pub fn ct_state_new() -> Value {
    matches(json!({"ct": {"key": "state"}}), "in", json!("new"))
}

/// `meta mark & BIT == BIT`.
pub fn mark_has(bit: u32) -> Value {
    eq(json!({"&": [meta("mark"), bit]}), json!(bit))
}

/// `meta mark set meta mark | BIT`.
pub fn mark_set(bit: u32) -> Value {
    json!({"mangle": {"key": meta("mark"), "value": {"|": [meta("mark"), bit]}}})
}

/// `KEY vmap DATA` (DATA a named map or an anonymous one).
pub fn vmap(key: Value, data: Value) -> Value {
    json!({"vmap": {"key": key, "data": data}})
}

/// `goto CHAIN` as a verdict.
pub fn goto(chain: &str) -> Value {
    json!({"goto": {"target": chain}})
}

/// `jump CHAIN`.
pub fn jump(chain: &str) -> Value {
    json!({"jump": {"target": chain}})
}

/// `drop`.
pub fn drop() -> Value {
    json!({"drop": null})
}

/// `update @SET { ELEM }`.
pub fn set_update(set: &str, elem: Value) -> Value {
    json!({"set": {"op": "update", "elem": elem, "set": set_ref(set)}})
}

/// `dnat ip to ADDR:PORT` (the rule must match the transport protocol first).
pub fn dnat(f: Family, ip: std::net::IpAddr, port: u16) -> Value {
    json!({"dnat": {"family": f.name(), "addr": ip.to_string(), "port": port}})
}

/// `masquerade to :MIN-MAX`.
pub fn masquerade(ports: (u16, u16)) -> Value {
    json!({"masquerade": {"port": {"range": [ports.0, ports.1]}}})
}

/// `numgen random mod N`.
pub fn numgen(n: u32) -> Value {
    json!({"numgen": {"mode": "random", "mod": n}})
}

/// A prefix as an element of an interval set.
pub fn prefix(net: &ipnet::IpNet) -> Value {
    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

/// An inclusive range `LO-HI`.
pub fn range(lo: Value, hi: Value) -> Value {
    json!({"range": [lo, hi]})
}

/// An anonymous set `{ A, B }`.
pub fn anon_set(items: Vec<Value>) -> Value {
    json!({"set": items})
}

/// A command `{VERB: {KIND: BODY}}` (`add`, `delete`, `flush`).
pub fn cmd(verb: &str, kind: &str, body: Value) -> Value {
    json!({ verb: { kind: body } })
}

/// The nft transport protocol name of `p`.
pub fn proto_name(p: weir_control::lb::Proto) -> &'static str {
    match p {
        weir_control::lb::Proto::Tcp => "tcp",
        weir_control::lb::Proto::Udp => "udp",
    }
}
