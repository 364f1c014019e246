//! The lab's cluster DNS, answering as CoreDNS's `kubernetes` plugin does for `cluster.local`
//! (the Kubernetes DNS specification) and its `multicluster` plugin for `clusterset.local`
//! (the MCS DNS specification): records built from Services, ServiceImports and their
//! EndpointSlices. This module is the pure part: a [`View`] of the objects and the answer to
//! one question. The wire format is hickory-proto's.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

/// The cluster's own zone.
pub const CLUSTER_ZONE: &str = "cluster.local";
/// The clusterset's zone.
pub const CLUSTERSET_ZONE: &str = "clusterset.local";
/// The TTL of every record (CoreDNS's kubernetes plugin's default).
pub const TTL: u32 = 5;
/// The address each node's DNS server answers on (as NodeLocal DNSCache's), which pods'
/// resolv.conf names.
pub const NODE_LOCAL_DNS: &str = "169.254.20.10";

/// A port of a Service or EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Its name (empty when unnamed).
    pub name: String,
    /// TCP, UDP or SCTP.
    pub protocol: String,
    /// The number.
    pub port: u16,
}

/// A ready endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its address.
    pub ip: IpAddr,
    /// Its DNS label: the slice's hostname, else the dashed address.
    pub host: String,
    /// The cluster it lives in (imports only).
    pub cluster: Option<String>,
    /// Its slice's ports.
    pub ports: Vec<Port>,
}

/// What a name in a zone stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A virtual address per family (a ClusterIP, or an import's ClusterSetIPs).
    Virtual(Vec<IpAddr>),
    /// Headless: the ready endpoints' addresses.
    Headless,
    /// An alias (ExternalName).
    Alias(String),
}

/// A Service or ServiceImport as DNS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// Its ports.
    pub ports: Vec<Port>,
    /// Its ready endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// Everything the server answers from.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Namespaces of the cluster.
    pub namespaces: HashSet<String>,
    /// Services, by (namespace, name): `cluster.local`.
    pub services: BTreeMap<(String, String), Entry>,
    /// ServiceImports, by (namespace, name): `clusterset.local`.
    pub imports: BTreeMap<(String, String), Entry>,
    /// The SOA serial: when the view last changed (Unix seconds).
    pub serial: u32,
}

/// An address as a DNS label: `10-244-1-2`, `fd00-10--1` (CoreDNS's endpointHostname).
pub fn dashed(ip: &IpAddr) -> String {
    let s = ip.to_string().replace(['.', ':'], "-");
    if s.ends_with('-') {
        format!("{s}0")
    } else {
        s
    }
}

fn ports_of(v: Option<&Value>) -> Vec<Port> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Port {
                name: p
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                protocol: p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_string(),
                port: u16::try_from(p.get("port")?.as_i64()?).ok()?,
            })
        })
        .collect()
}

fn ready_endpoints(slices: &[&EndpointSlice], cluster_label: bool) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for s in slices {
        let v = serde_json::to_value(s).unwrap_or_default();
        let ports = ports_of(v.get("ports"));
        let cluster = cluster_label
            .then(|| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(weir_control::mcs::SOURCE_CLUSTER_LABEL).cloned())
            })
            .flatten();
        for e in s.endpoints.iter().flatten() {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                out.push(Endpoint {
                    ip,
                    host: e.hostname.clone().unwrap_or_else(|| dashed(&ip)),
                    cluster: cluster.clone(),
                    ports: ports.clone(),
                });
            }
        }
    }
    out
}

impl View {
    /// Builds the view from the cluster's objects.
    pub fn build(
        namespaces: impl IntoIterator<Item = String>,
        services: &[&Service],
        imports: &[(&kube::api::ObjectMeta, &Value)],
        slices: &[&EndpointSlice],
        serial: u32,
    ) -> View {
        let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
        let mut by_import: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
        for s in slices {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let labels = s.metadata.labels.clone().unwrap_or_default();
            if let Some(n) = labels.get(weir_control::lb::SERVICE_NAME_LABEL) {
                by_service.entry((ns, n.clone())).or_default().push(s);
            } else if let Some(n) = labels.get(weir_control::mcs::MCS_SERVICE_NAME_LABEL) {
                by_import.entry((ns, n.clone())).or_default().push(s);
            }
        }
        let mut view = View {
            namespaces: namespaces.into_iter().collect(),
            serial,
            ..Default::default()
        };
        for svc in services {
            let key = (
                svc.metadata.namespace.clone().unwrap_or_default(),
                svc.metadata.name.clone().unwrap_or_default(),
            );
            let spec = svc.spec.clone().unwrap_or_default();
            let v = serde_json::to_value(&spec).unwrap_or_default();
            let kind = if spec.type_.as_deref() == Some("ExternalName") {
                match spec.external_name.clone() {
                    // An address is no alias (CoreDNS answers NXDOMAIN).
                    Some(n) if n.parse::<IpAddr>().is_err() => Kind::Alias(n),
                    _ => continue,
                }
            } else if spec.cluster_ip.as_deref() == Some("None") {
                Kind::Headless
            } else {
                let ips: Vec<IpAddr> = spec
                    .cluster_ips
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|i| i.parse().ok())
                    .collect();
                if ips.is_empty() {
                    continue;
                }
                Kind::Virtual(ips)
            };
            let slices = by_service.remove(&key).unwrap_or_default();
            view.services.insert(
                key,
                Entry {
                    kind,
                    ports: ports_of(v.get("ports")),
                    endpoints: ready_endpoints(&slices, false),
                },
            );
        }
        for (meta, data) in imports {
            let key = (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            let spec = data.get("spec").cloned().unwrap_or_default();
            let kind = match spec.get("type").and_then(Value::as_str) {
                Some("Headless") => Kind::Headless,
                _ => Kind::Virtual(
                    spec.get("ips")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str()?.parse().ok())
                        .collect(),
                ),
            };
            let slices = by_import.remove(&key).unwrap_or_default();
            view.imports.insert(
                key,
                Entry {
                    kind,
                    ports: ports_of(spec.get("ports")),
                    endpoints: ready_endpoints(&slices, true),
                },
            );
        }
        view
    }
}

/// What the name asks for within its zone.
enum Target<'a> {
    Apex,
    Version,
    /// A name that exists but holds no records (`svc.zone`, `ns.svc.zone`).
    Empty,
    /// A Service or import, with an optional port filter (name, protocol).
    Entry(&'a Entry, Option<(String, String)>),
    /// Endpoints of an entry with label `host` (and cluster, in clusterset.local).
    Endpoint(&'a Entry, String, Option<String>),
    Missing,
}

struct Question<'a> {
    zone: &'static str,
    /// Labels left of the zone, lowercased, last first: `["svc", ns, svc, ...]`.
    labels: Vec<String>,
    view: &'a View,
}

impl<'a> Question<'a> {
    fn target(&self) -> Target<'a> {
        let l: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        let entries = if self.zone == CLUSTER_ZONE {
            &self.view.services
        } else {
            &self.view.imports
        };
        match l.as_slice() {
            [] => Target::Apex,
            ["dns-version"] => Target::Version,
            ["svc"] => Target::Empty,
            ["svc", ns] => {
                if self.view.namespaces.contains(*ns) {
                    Target::Empty
                } else {
                    Target::Missing
                }
            }
            ["svc", ns, svc, rest @ ..] => {
                if !self.view.namespaces.contains(*ns) {
                    return Target::Missing;
                }
                let Some(e) = entries.get(&(ns.to_string(), svc.to_string())) else {
                    return Target::Missing;
                };
                match rest {
                    [] => Target::Entry(e, None),
                    // `_proto._port` read left to right is `_port._proto`: labels are stored
                    // last first.
                    [proto, port] if port.starts_with('_') && proto.starts_with('_') => {
                        Target::Entry(
                            e,
                            Some((
                                port.trim_start_matches('_').to_string(),
                                proto.trim_start_matches('_').to_string(),
                            )),
                        )
                    }
                    [host] if self.zone == CLUSTER_ZONE => {
                        Target::Endpoint(e, host.to_string(), None)
                    }
                    [cluster, host] if self.zone == CLUSTERSET_ZONE => {
                        Target::Endpoint(e, host.to_string(), Some(cluster.to_string()))
                    }
                    _ => Target::Missing,
                }
            }
            _ => Target::Missing,
        }
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(format!("{}.", s.trim_end_matches('.'))).unwrap_or_else(|_| Name::root())
}

fn address(owner: &Name, ip: &IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(a) => RData::A(A(*a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(*a)),
    };
    Record::from_rdata(owner.clone(), TTL, rdata)
}

fn family(ip: &IpAddr, qtype: RecordType) -> bool {
    (qtype == RecordType::A && ip.is_ipv4()) || (qtype == RecordType::AAAA && ip.is_ipv6())
}

fn soa(zone: &str, serial: u32) -> Record {
    Record::from_rdata(
        name(zone),
        TTL,
        RData::SOA(SOA::new(
            name(&format!("ns.dns.{zone}")),
            name(&format!("hostmaster.{zone}")),
            serial,
            7200,
            1800,
            86400,
            TTL,
        )),
    )
}

/// The parts of an answer: its code, records, additional records.
#[derive(Debug, Default)]
struct Answer {
    nxdomain: bool,
    answers: Vec<Record>,
    additionals: Vec<Record>,
}

fn nx() -> Answer {
    Answer {
        nxdomain: true,
        ..Default::default()
    }
}

/// Answers one question about `qname` (absolute or not, any case).
fn answer_question(view: &View, qname: &Name, qtype: RecordType) -> Option<(Answer, &'static str)> {
    let owner = qname.clone();
    let text = qname.to_ascii().to_ascii_lowercase();
    let text = text.trim_end_matches('.');
    let (zone, rest) = [CLUSTERSET_ZONE, CLUSTER_ZONE].iter().find_map(|z| {
        if text == *z {
            Some((*z, ""))
        } else {
            text.strip_suffix(&format!(".{z}")).map(|r| (*z, r))
        }
    })?;
    let labels: Vec<String> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.rsplit('.').map(String::from).collect()
    };
    let q = Question { zone, labels, view };
    let svc_name = || {
        let l = &q.labels;
        format!(
            "{}.{}.svc.{zone}",
            l.get(2).cloned().unwrap_or_default(),
            l.get(1).cloned().unwrap_or_default()
        )
    };
    let ans = match q.target() {
        Target::Missing => nx(),
        Target::Apex => match qtype {
            RecordType::SOA => Answer {
                answers: vec![soa(zone, view.serial)],
                ..Default::default()
            },
            RecordType::NS => Answer {
                answers: vec![Record::from_rdata(
                    owner,
                    TTL,
                    RData::NS(NS(name(&format!("ns.dns.{zone}")))),
                )],
                ..Default::default()
            },
            _ => Answer::default(),
        },
        Target::Version => match qtype {
            RecordType::TXT => Answer {
                answers: vec![Record::from_rdata(
                    owner,
                    28800,
                    // The Kubernetes DNS schema is 1.1.0; the MCS one 1.0.0.
                    RData::TXT(TXT::new(vec![if zone == CLUSTER_ZONE {
                        "1.1.0".into()
                    } else {
                        "1.0.0".into()
                    }])),
                )],
                ..Default::default()
            },
            _ => nx(),
        },
        Target::Empty => Answer::default(),
        Target::Endpoint(e, host, cluster) => {
            let eps: Vec<&Endpoint> = e
                .endpoints
                .iter()
                .filter(|p| p.host == host && (cluster.is_none() || p.cluster == cluster))
                .collect();
            if eps.is_empty() {
                nx()
            } else {
                let mut seen = BTreeSet::new();
                Answer {
                    answers: eps
                        .iter()
                        .filter(|p| family(&p.ip, qtype) && seen.insert(p.ip))
                        .map(|p| address(&owner, &p.ip))
                        .collect(),
                    ..Default::default()
                }
            }
        }
        Target::Entry(e, filter) => entry_answer(e, filter, &owner, qtype, &svc_name()),
    };
    Some((ans, zone))
}

fn port_matches(p: &Port, filter: &Option<(String, String)>) -> bool {
    filter.as_ref().is_none_or(|(n, proto)| {
        p.name.eq_ignore_ascii_case(n) && p.protocol.eq_ignore_ascii_case(proto)
    })
}

fn entry_answer(
    e: &Entry,
    filter: Option<(String, String)>,
    owner: &Name,
    qtype: RecordType,
    svc: &str,
) -> Answer {
    if filter.is_some() && !e.ports.iter().any(|p| port_matches(p, &filter)) {
        return nx();
    }
    match &e.kind {
        Kind::Alias(target) => match qtype {
            RecordType::CNAME | RecordType::A | RecordType::AAAA => Answer {
                answers: vec![Record::from_rdata(
                    owner.clone(),
                    TTL,
                    RData::CNAME(CNAME(name(target))),
                )],
                ..Default::default()
            },
            _ => Answer::default(),
        },
        Kind::Virtual(ips) => match qtype {
            RecordType::A | RecordType::AAAA => {
                let mut seen = BTreeSet::new();
                Answer {
                    answers: ips
                        .iter()
                        .filter(|ip| family(ip, qtype) && seen.insert(**ip))
                        .map(|ip| address(owner, ip))
                        .collect(),
                    ..Default::default()
                }
            }
            RecordType::SRV => {
                let ports: Vec<&Port> = e
                    .ports
                    .iter()
                    .filter(|p| port_matches(p, &filter))
                    .collect();
                let n = (ports.len() * ips.len()).max(1);
                let weight = (100 / n).max(1) as u16;
                let target = name(svc);
                let mut seen = BTreeSet::new();
                let answers = ports
                    .iter()
                    .filter(|p| seen.insert(p.port))
                    .map(|p| {
                        Record::from_rdata(
                            owner.clone(),
                            TTL,
                            RData::SRV(SRV::new(0, weight, p.port, target.clone())),
                        )
                    })
                    .collect();
                Answer {
                    answers,
                    additionals: ips.iter().map(|ip| address(&target, ip)).collect(),
                    ..Default::default()
                }
            }
            _ => Answer::default(),
        },
        Kind::Headless => {
            if e.endpoints.is_empty() {
                return nx();
            }
            match qtype {
                RecordType::A | RecordType::AAAA => {
                    let mut seen = BTreeSet::new();
                    Answer {
                        answers: e
                            .endpoints
                            .iter()
                            .filter(|p| family(&p.ip, qtype) && seen.insert(p.ip))
                            .map(|p| address(owner, &p.ip))
                            .collect(),
                        ..Default::default()
                    }
                }
                RecordType::SRV => {
                    let mut entries = Vec::new();
                    for ep in &e.endpoints {
                        for p in ep.ports.iter().filter(|p| port_matches(p, &filter)) {
                            let host = match &ep.cluster {
                                Some(c) => format!("{}.{c}.{svc}", ep.host),
                                None => format!("{}.{svc}", ep.host),
                            };
                            entries.push((host, p.port, ep.ip));
                        }
                    }
                    let weight = (100 / entries.len().max(1)).max(1) as u16;
                    let mut seen = BTreeSet::new();
                    let mut ans = Answer::default();
                    for (host, port, ip) in entries {
                        let target = name(&host);
                        if seen.insert((host.clone(), port)) {
                            ans.answers.push(Record::from_rdata(
                                owner.clone(),
                                TTL,
                                RData::SRV(SRV::new(0, weight, port, target.clone())),
                            ));
                        }
                        ans.additionals.push(address(&target, &ip));
                    }
                    ans
                }
                _ => Answer::default(),
            }
        }
    }
}

/// The response to `req`: authoritative answers for both zones, NXDOMAIN or NODATA with the
/// zone's SOA, REFUSED for names outside them.
pub fn respond(view: &View, req: &Message) -> Message {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.queries = req.queries.clone();
    let Some(q) = req.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    if req.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return resp;
    }
    let Some((ans, zone)) = answer_question(view, q.name(), q.query_type()) else {
        resp.metadata.response_code = ResponseCode::Refused;
        return resp;
    };
    resp.metadata.authoritative = true;
    if ans.nxdomain {
        resp.metadata.response_code = ResponseCode::NXDomain;
    }
    if ans.nxdomain || ans.answers.is_empty() {
        resp.authorities.push(soa(zone, view.serial));
    }
    if !ans.answers.is_empty() {
        let mut seen = BTreeSet::new();
        resp.additionals = ans
            .additionals
            .into_iter()
            .filter(|r| seen.insert((r.name.to_ascii(), r.data.to_string())))
            .collect();
    }
    resp.answers = ans.answers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use serde_json::json;

    fn view() -> View {
        let svc = |v: Value| -> Service { serde_json::from_value(v).unwrap() };
        let services = [
            svc(json!({"metadata": {"name": "web", "namespace": "ns"},
                "spec": {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00:10:96::5"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]}})),
            svc(json!({"metadata": {"name": "hs", "namespace": "ns"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})),
            svc(json!({"metadata": {"name": "empty", "namespace": "ns"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}})),
            svc(json!({"metadata": {"name": "ext", "namespace": "ns"},
                "spec": {"type": "ExternalName", "externalName": "example.com"}})),
        ];
        let slice = |v: Value| -> EndpointSlice { serde_json::from_value(v).unwrap() };
        let slices = [
            slice(
                json!({"metadata": {"name": "hs-a", "namespace": "ns", "labels": {"kubernetes.io/service-name": "hs"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.1.2"], "hostname": "db-0"},
                              {"addresses": ["10.244.1.3"]},
                              {"addresses": ["10.244.1.4"], "conditions": {"ready": false}}]}),
            ),
            slice(
                json!({"metadata": {"name": "hello-c2-0", "namespace": "ns", "labels": {
                    "multicluster.kubernetes.io/service-name": "hsi", "multicluster.kubernetes.io/source-cluster": "c2"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.245.1.2"], "hostname": "db-0"}]}),
            ),
        ];
        let imp = |name: &str, spec: Value| {
            (
                kube::api::ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("ns".into()),
                    ..Default::default()
                },
                json!({"spec": spec}),
            )
        };
        let imports = [
            imp(
                "web",
                json!({"type": "ClusterSetIP", "ips": ["10.90.0.1"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
            ),
            imp(
                "hsi",
                json!({"type": "Headless", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
            ),
        ];
        let s: Vec<&Service> = services.iter().collect();
        let sl: Vec<&EndpointSlice> = slices.iter().collect();
        let im: Vec<(&kube::api::ObjectMeta, &Value)> =
            imports.iter().map(|(m, v)| (m, v)).collect();
        View::build(["ns".to_string()], &s, &im, &sl, 42)
    }

    fn ask(v: &View, q: &str, t: RecordType) -> Message {
        let mut req = Message::query();
        req.add_query(Query::query(Name::from_ascii(q).unwrap(), t));
        // Through the wire format both ways, as a client would.
        let bytes = respond(v, &Message::from_vec(&req.to_vec().unwrap()).unwrap())
            .to_vec()
            .unwrap();
        Message::from_vec(&bytes).unwrap()
    }

    fn rdata(m: &Message) -> Vec<String> {
        let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn cluster_ips_by_family() {
        let v = view();
        let m = ask(&v, "web.ns.svc.cluster.local.", RecordType::A);
        assert_eq!(rdata(&m), ["10.96.0.5"]);
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers[0].ttl, TTL);
        assert_eq!(
            rdata(&ask(&v, "WEB.ns.svc.cluster.local.", RecordType::AAAA)),
            ["fd00:10:96::5"]
        );
        // The same name in the clusterset zone is the import's.
        assert_eq!(
            rdata(&ask(&v, "web.ns.svc.clusterset.local.", RecordType::A)),
            ["10.90.0.1"]
        );
        let nodata = ask(&v, "web.ns.svc.clusterset.local.", RecordType::AAAA);
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn srv_records() {
        let v = view();
        let m = ask(&v, "_http._tcp.web.ns.svc.cluster.local.", RecordType::SRV);
        assert_eq!(rdata(&m), ["0 50 80 web.ns.svc.cluster.local."]);
        assert_eq!(m.additionals.len(), 2);
        // The bare name: every port.
        let m = ask(&v, "web.ns.svc.cluster.local.", RecordType::SRV);
        assert_eq!(
            rdata(&m),
            [
                "0 25 53 web.ns.svc.cluster.local.",
                "0 25 80 web.ns.svc.cluster.local."
            ]
        );
        let m = ask(&v, "_nope._tcp.web.ns.svc.cluster.local.", RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(
            &v,
            "_http._tcp.web.ns.svc.clusterset.local.",
            RecordType::SRV,
        );
        assert_eq!(rdata(&m), ["0 100 80 web.ns.svc.clusterset.local."]);
    }

    #[test]
    fn headless_services() {
        let v = view();
        let m = ask(&v, "hs.ns.svc.cluster.local.", RecordType::A);
        assert_eq!(
            rdata(&m),
            ["10.244.1.2", "10.244.1.3"],
            "not-ready endpoints are left out"
        );
        let m = ask(&v, "hs.ns.svc.cluster.local.", RecordType::SRV);
        assert_eq!(
            rdata(&m),
            [
                "0 50 8080 10-244-1-3.hs.ns.svc.cluster.local.",
                "0 50 8080 db-0.hs.ns.svc.cluster.local."
            ]
        );
        assert_eq!(
            rdata(&ask(&v, "db-0.hs.ns.svc.cluster.local.", RecordType::A)),
            ["10.244.1.2"]
        );
        assert_eq!(
            rdata(&ask(
                &v,
                "10-244-1-3.hs.ns.svc.cluster.local.",
                RecordType::A
            )),
            ["10.244.1.3"]
        );
        let m = ask(&v, "empty.ns.svc.cluster.local.", RecordType::A);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NXDomain,
            "no ready endpoint"
        );
        // Across the clusterset: <hostname>.<clusterid>.<svc>...; the cluster id alone is reserved.
        assert_eq!(
            rdata(&ask(
                &v,
                "db-0.c2.hsi.ns.svc.clusterset.local.",
                RecordType::A
            )),
            ["10.245.1.2"]
        );
        assert_eq!(
            rdata(&ask(&v, "hsi.ns.svc.clusterset.local.", RecordType::SRV)),
            ["0 100 8080 db-0.c2.hsi.ns.svc.clusterset.local."]
        );
        let m = ask(&v, "c2.hsi.ns.svc.clusterset.local.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn names_that_are_not_there() {
        let v = view();
        for (q, code) in [
            ("nope.ns.svc.cluster.local.", ResponseCode::NXDomain),
            ("web.other.svc.cluster.local.", ResponseCode::NXDomain),
            ("ns.svc.cluster.local.", ResponseCode::NoError),
            ("svc.cluster.local.", ResponseCode::NoError),
            ("foo.cluster.local.", ResponseCode::NXDomain),
            ("example.com.", ResponseCode::Refused),
        ] {
            let m = ask(&v, q, RecordType::A);
            assert_eq!(m.metadata.response_code, code, "{q}");
            if code != ResponseCode::Refused {
                assert!(m.answers.is_empty(), "{q}");
                assert_eq!(m.authorities.len(), 1, "{q}: SOA in the authority section");
            }
        }
        let m = ask(&v, "dns-version.clusterset.local.", RecordType::TXT);
        assert_eq!(rdata(&m), ["1.0.0"]);
        let m = ask(&v, "ext.ns.svc.cluster.local.", RecordType::A);
        assert_eq!(rdata(&m), ["example.com."]);
    }

    #[test]
    fn dashed_addresses() {
        assert_eq!(dashed(&"10.244.1.2".parse().unwrap()), "10-244-1-2");
        assert_eq!(dashed(&"fd00::".parse().unwrap()), "fd00--0");
    }
}
