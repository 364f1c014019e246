//! `weir observe`: the policy verdicts of one or more agents (allowed and dropped flows, with
//! the pods, identities and reason) and the packets the kernel dropped on their nodes (with
//! the kernel's reason), printed once or followed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Result};
use weir_agent::flows::{FlowEnd, FlowPage, FlowRecord};

/// Which verdicts to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Flows the policy let through.
    Allowed,
    /// Flows the policy (or the kernel) dropped.
    Dropped,
    /// Flows the tc and XDP programs forwarded (their summaries).
    Forwarded,
    /// Service addresses the socket layer translated.
    Translated,
    /// What was observed without a decision (TCP health).
    Traced,
}

impl Verdict {
    /// The verdict's name in flow records.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Dropped => "dropped",
            Verdict::Forwarded => "forwarded",
            Verdict::Translated => "translated",
            Verdict::Traced => "traced",
        }
    }

    /// The verdict named `s` (any case).
    pub fn parse(s: &str) -> Option<Verdict> {
        [
            Verdict::Allowed,
            Verdict::Dropped,
            Verdict::Forwarded,
            Verdict::Translated,
            Verdict::Traced,
        ]
        .into_iter()
        .find(|v| v.name().eq_ignore_ascii_case(s))
    }
}

/// Which end of a flow a condition looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source or the destination.
    Either,
    /// The source.
    From,
    /// The destination.
    To,
}

/// One requirement of a label selector (`k=v`, `k!=v`, `k`, `!k`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelReq {
    /// The label has this value.
    Is(String, String),
    /// The label is absent or has another value.
    IsNot(String, String),
    /// The label is there.
    Exists(String),
    /// The label is not there.
    Absent(String),
}

/// A label selector as kubectl writes one: requirements separated by commas, all to hold.
pub fn parse_selector(s: &str) -> Result<Vec<LabelReq>> {
    s.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            let req = if let Some((k, v)) = r.split_once("!=") {
                LabelReq::IsNot(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                LabelReq::Is(k.trim().into(), v.trim().into())
            } else if let Some(k) = r.strip_prefix('!') {
                LabelReq::Absent(k.trim().into())
            } else {
                LabelReq::Exists(r.into())
            };
            match &req {
                LabelReq::Is(k, _)
                | LabelReq::IsNot(k, _)
                | LabelReq::Exists(k)
                | LabelReq::Absent(k)
                    if k.is_empty() || k.contains(char::is_whitespace) =>
                {
                    Err(anyhow!("label selector {s:?}: {r:?} names no label"))
                }
                _ => Ok(req),
            }
        })
        .collect()
}

/// One condition on a flow; the values of one condition are alternatives.
#[derive(Debug, Clone)]
pub enum Cond {
    /// A pod (`namespace/name`) at that end.
    Pod(End, Vec<String>),
    /// A pod of the namespace at that end.
    Namespace(End, Vec<String>),
    /// A pod at that end whose labels match one of the selectors.
    Label(End, Vec<Vec<LabelReq>>),
    /// The Service (`namespace/name`) the flow went to.
    Service(Vec<String>),
    /// The protocol (`tcp`, `udp`, `icmp`, ...).
    Protocol(Vec<String>),
    /// A port at either end.
    Port(Vec<u16>),
    /// The verdict.
    Verdict(Verdict),
    /// The event that reported it: `policy-verdict`, `trace`, `trace-sock`, `drop`,
    /// `kernel-drop`.
    Type(Vec<String>),
    /// The reason (any case; `POLICY_DENIED` matches `DROP_POLICY_DENIED`).
    Reason(Vec<String>),
    /// Not before this time.
    Since(jiff::Timestamp),
}

fn ends(r: &FlowRecord, end: End) -> Vec<&FlowEnd> {
    match end {
        End::Either => vec![&r.source, &r.destination],
        End::From => vec![&r.source],
        End::To => vec![&r.destination],
    }
}

fn labels_match(e: &FlowEnd, sel: &[LabelReq]) -> bool {
    e.pod.is_some()
        && sel.iter().all(|req| match req {
            LabelReq::Is(k, v) => e.labels.get(k) == Some(v),
            LabelReq::IsNot(k, v) => e.labels.get(k) != Some(v),
            LabelReq::Exists(k) => e.labels.contains_key(k),
            LabelReq::Absent(k) => !e.labels.contains_key(k),
        })
}

fn reason_matches(have: &str, want: &str) -> bool {
    let (want, have) = (want.to_ascii_uppercase(), have.to_ascii_uppercase());
    have == want || have.ends_with(&format!("_{want}"))
}

impl Cond {
    fn matches(&self, r: &FlowRecord) -> bool {
        match self {
            Cond::Pod(end, pods) => ends(r, *end)
                .iter()
                .any(|e| e.pod.as_ref().is_some_and(|p| pods.contains(p))),
            Cond::Namespace(end, nss) => ends(r, *end).iter().any(|e| {
                e.pod
                    .as_deref()
                    .and_then(|p| p.split_once('/'))
                    .is_some_and(|(ns, _)| nss.iter().any(|n| n == ns))
            }),
            Cond::Label(end, sels) => ends(r, *end)
                .iter()
                .any(|e| sels.iter().any(|s| labels_match(e, s))),
            Cond::Service(svcs) => r.service.as_ref().is_some_and(|s| svcs.contains(s)),
            Cond::Protocol(ps) => ps.iter().any(|p| p.eq_ignore_ascii_case(&r.protocol)),
            Cond::Port(ports) => ports
                .iter()
                .any(|p| *p == r.source.port || *p == r.destination.port),
            Cond::Verdict(v) => r.verdict == v.name(),
            Cond::Type(ts) => ts.iter().any(|t| t.eq_ignore_ascii_case(&r.event)),
            Cond::Reason(rs) => rs.iter().any(|w| reason_matches(&r.reason, w)),
            Cond::Since(t) => r.time.parse::<jiff::Timestamp>().is_ok_and(|rt| rt >= *t),
        }
    }
}

/// What to show: every condition holds (a negated one must not).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// (negated, condition).
    pub conds: Vec<(bool, Cond)>,
}

impl Filter {
    fn matches(&self, r: &FlowRecord) -> bool {
        self.conds.iter().all(|(not, c)| c.matches(r) != *not)
    }

    /// Whether every flow matches.
    fn is_empty(&self) -> bool {
        self.conds.is_empty()
    }
}

/// `--since`: a duration back from now (`30s`, `5m`, `1h30m`) or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<jiff::Timestamp> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let d: jiff::SignedDuration = s.parse().map_err(|_| {
        anyhow!("--since {s:?}: expected a duration (30s, 5m, 1h30m) or an RFC 3339 time")
    })?;
    jiff::Timestamp::now()
        .checked_sub(d)
        .map_err(|e| anyhow!("--since {s:?}: {e}"))
}

/// `NAME` is a pod of namespace `default`, as kubectl reads it.
pub fn pod_ref(s: &str) -> String {
    if s.contains('/') {
        s.to_string()
    } else {
        format!("default/{s}")
    }
}

fn end(e: &FlowEnd) -> String {
    let who = e.pod.clone().unwrap_or_else(|| match e.ip {
        std::net::IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    });
    let port = if e.port != 0 {
        format!(":{}", e.port)
    } else {
        String::new()
    };
    let id = match e.identity_kind.as_str() {
        "pod" => format!("id {}", e.identity),
        "unknown" => "id ?".to_string(),
        k => k.to_string(),
    };
    if e.pod.is_some() {
        format!("{who}{port} ({}, {id})", e.ip)
    } else {
        format!("{who}{port} ({id})")
    }
}

fn time_of(r: &FlowRecord) -> String {
    r.time
        .parse::<jiff::Timestamp>()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|_| r.time.clone())
}

/// How `weir observe` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A line per flow.
    Compact,
    /// Aligned columns under a header.
    Table,
    /// A JSON object per line.
    Json,
}

/// The header of the table output.
pub const TABLE_HEADER: &str = "TIME                      NODE       SOURCE                          DESTINATION                     PROTO  VERDICT                  REASON";

/// One flow as a table row (under [`TABLE_HEADER`]).
pub fn row(r: &FlowRecord) -> String {
    let short = |e: &FlowEnd| {
        let who = e.pod.clone().unwrap_or_else(|| match e.ip {
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        });
        if e.port != 0 {
            format!("{who}:{}", e.port)
        } else {
            who
        }
    };
    let verdict = if r.event == "kernel-drop" {
        "DROPPED (kernel)".to_string()
    } else {
        r.verdict.to_uppercase()
    };
    format!(
        "{:<25} {:<10} {:<31} {:<31} {:<6} {:<24} {}",
        time_of(r),
        r.node,
        short(&r.source),
        short(&r.destination),
        r.protocol.to_uppercase(),
        verdict,
        r.reason
    )
}

/// One verdict as a line.
pub fn line(r: &FlowRecord) -> String {
    let time = time_of(r);
    let by = if r.event == "kernel-drop" {
        " by the kernel"
    } else {
        ""
    };
    let policies = if r.policies.is_empty() {
        String::new()
    } else {
        format!(" by {}", r.policies.join(", "))
    };
    let policies = match r.policy_match.as_deref() {
        Some(m) if m != "none" => format!("{policies} [{m}]"),
        _ => policies,
    };
    format!(
        "{time} {}: {} -> {} {} {} {}{by} ({}){policies}{}",
        r.node,
        end(&r.source),
        end(&r.destination),
        r.protocol.to_uppercase(),
        r.direction,
        r.verdict.to_uppercase(),
        r.reason,
        detail(r)
    )
}

/// What a summary or translation adds to a line: flags, packets, the Service and the
/// addresses before translation.
fn detail(r: &FlowRecord) -> String {
    let d = &r.detail;
    let mut out = String::new();
    if let Some(t) = &d.tcp {
        let svc = r
            .service
            .as_ref()
            .map(|s| format!(" to {s}"))
            .unwrap_or_default();
        return format!("{svc}: {}", t.text());
    }
    if !d.tcp_flags.is_empty() {
        out.push_str(&format!(" [{}]", d.tcp_flags));
    }
    if let (Some(p), Some(b)) = (d.packets, d.bytes) {
        out.push_str(&format!(" {p} pkt{} {b} B", if p == 1 { "" } else { "s" }));
    }
    if let Some(t) = &d.translation {
        let svc = r
            .service
            .as_ref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        if d.is_reply == Some(true) {
            out.push_str(&format!(" reply of{svc} {}", t.source));
        } else {
            out.push_str(&format!(" via{svc} {} at {}", t.destination, t.point));
        }
    }
    out
}

fn print(r: &FlowRecord, out: Output) -> Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string(r)?),
        Output::Compact => println!("{}", line(r)),
        Output::Table => println!("{}", row(r)),
    }
    Ok(())
}

pub(crate) async fn page(socket: &std::path::Path, since: u64) -> std::io::Result<FlowPage> {
    page_last(socket, since, None).await
}

/// The flows after `since`, only the last `last` of them when given (the agent spells out
/// those alone).
async fn page_last(
    socket: &std::path::Path,
    since: u64,
    last: Option<usize>,
) -> std::io::Result<FlowPage> {
    let path = match last {
        Some(n) => format!("/flows?since={since}&last={n}"),
        None => format!("/flows?since={since}"),
    };
    let v = weir_agent::api::get(socket, &path).await?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(std::io::Error::other(e.to_string()));
    }
    serde_json::from_value(v).map_err(std::io::Error::other)
}

/// Orders flows by their time (as instants: RFC 3339 texts with fractions of different
/// lengths do not sort as strings), keeping each agent's order among equal times.
pub(crate) fn sort_by_time(flows: &mut [FlowRecord]) {
    flows.sort_by_cached_key(|r| r.time.parse::<jiff::Timestamp>().ok());
}

/// The flows of the agent listed as `node`, under that name (a clusterset's nodes are
/// `CLUSTER/NODE`; each agent knows only its own node's name).
pub(crate) fn named(node: &str, flows: Vec<FlowRecord>) -> impl Iterator<Item = FlowRecord> + '_ {
    flows.into_iter().map(move |mut r| {
        if node.contains('/') {
            r.node = node.to_string();
        }
        r
    })
}

/// Prints the last `last` matching verdicts of the agents at `sockets` (node name, socket),
/// then, with `follow`, every new one until interrupted.
pub async fn run(
    sockets: &[(String, PathBuf)],
    filter: &Filter,
    last: usize,
    follow: bool,
    out: Output,
) -> Result<ExitCode> {
    let mut cursor: BTreeMap<String, u64> = BTreeMap::new();
    let mut events_lost: BTreeMap<String, u64> = BTreeMap::new();
    let mut past = Vec::new();
    // Without a filter, each agent sends its last `last` flows alone.
    let wanted = filter.is_empty().then_some(last);
    for (node, socket) in sockets {
        let p = page_last(socket, 0, wanted).await.map_err(|e| {
            anyhow!(
                "the weir agent of {node} does not answer on {}: {e} (hint: is the agent running? for a lab, `weir lab list`)",
                socket.display()
            )
        })?;
        cursor.insert(node.clone(), p.next);
        if p.events_lost > 0 && !follow {
            eprintln!("(the datapath of {node} has lost {} verdict events since it was loaded: its ring buffer was full)", p.events_lost);
        }
        events_lost.insert(node.clone(), p.events_lost);
        past.extend(named(node, p.flows).filter(|r| filter.matches(r)));
    }
    sort_by_time(&mut past);
    if out == Output::Table {
        println!("{TABLE_HEADER}");
    }
    for r in &past[past.len().saturating_sub(last)..] {
        print(r, out)?;
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut failing: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut new = Vec::new();
        for (node, socket) in sockets {
            let since = cursor.get(node).copied().unwrap_or(0);
            match page(socket, since).await {
                Ok(p) => {
                    if failing.remove(node).is_some() {
                        eprintln!("(the agent of {node} answers again)");
                    }
                    if p.next < since {
                        // The agent restarted: its log starts again at 1.
                        cursor.insert(node.clone(), 0);
                        continue;
                    }
                    if p.lost > 0 {
                        eprintln!("({} verdicts of {node} were lost: they came faster than this command read them)", p.lost);
                    }
                    let before = events_lost.insert(node.clone(), p.events_lost);
                    if let Some(n) = before.and_then(|b| p.events_lost.checked_sub(b)) {
                        if n > 0 {
                            eprintln!("({n} verdicts of {node} were lost in the datapath: its ring buffer was full)");
                        }
                    }
                    cursor.insert(node.clone(), p.next);
                    new.extend(named(node, p.flows).filter(|r| filter.matches(r)));
                }
                Err(e) => {
                    if failing.insert(node.clone(), true).is_none() {
                        eprintln!("(the agent of {node} does not answer: {e}; retrying)");
                    }
                }
            }
        }
        sort_by_time(&mut new);
        for r in &new {
            print(r, out)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(src_pod: Option<&str>, dst_pod: Option<&str>, verdict: &str) -> FlowRecord {
        let end = |pod: Option<&str>, ip: &str, port, identity, kind: &str| FlowEnd {
            ip: ip.parse().unwrap(),
            port,
            pod: pod.map(str::to_string),
            namespace: pod.map(|p| p.split('/').next().unwrap().to_string()),
            workload: None,
            labels: pod
                .map(|_| [("app".to_string(), "web".to_string())].into())
                .unwrap_or_default(),
            identity,
            identity_kind: kind.into(),
        };
        FlowRecord {
            seq: 1,
            time: "2026-11-22T10:00:00.123456Z".into(),
            node: "node-1".into(),
            event: "policy-verdict".into(),
            verdict: verdict.into(),
            reason: if verdict == "dropped" {
                "DROP_POLICY_DENIED".into()
            } else {
                "REASON_POLICY_ALLOWED".into()
            },
            direction: "ingress".into(),
            reason_text: String::new(),
            protocol: "tcp".into(),
            source: end(src_pod, "10.244.1.2", 40000, 256, "pod"),
            destination: end(dst_pod, "10.244.2.3", 80, 2, "world"),
            service: Some("x/web".into()),
            policies: Vec::new(),
            policy_match: None,
            detail: Default::default(),
        }
    }

    #[test]
    fn summaries_print_flags_packets_and_translation_and_filter_by_type() {
        let mut r = rec(Some("x/a"), None, "forwarded");
        r.event = "trace".into();
        r.reason = "REASON_FORWARD_FIB".into();
        r.detail = weir_agent::flows::FlowDetail {
            translation: Some(weir_agent::flows::Translation {
                point: "packet".into(),
                source: "10.244.1.2:40000".into(),
                destination: "10.96.0.10:80".into(),
            }),
            packets: Some(3),
            bytes: Some(180),
            tcp_flags: "SYN".into(),
            is_reply: Some(false),
            interface: Some(4),
            tcp: None,
        };
        let l = line(&r);
        assert!(
            l.ends_with("FORWARDED (REASON_FORWARD_FIB) [SYN] 3 pkts 180 B via x/web 10.96.0.10:80 at packet"),
            "{l}"
        );
        let only = |t: &str| filter(vec![(false, Cond::Type(vec![t.into()]))]);
        assert!(only("trace").matches(&r));
        assert!(!only("policy-verdict").matches(&r));
        let v = |v| filter(vec![(false, Cond::Verdict(v))]);
        assert!(v(Verdict::Forwarded).matches(&r));
        assert!(!v(Verdict::Allowed).matches(&r));
        assert_eq!(Verdict::parse("TRANSLATED"), Some(Verdict::Translated));
        // Replies name where they came from.
        r.detail.is_reply = Some(true);
        assert!(
            line(&r).ends_with("reply of x/web 10.244.1.2:40000"),
            "{}",
            line(&r)
        );
    }

    fn filter(conds: Vec<(bool, Cond)>) -> Filter {
        Filter { conds }
    }

    #[test]
    fn filters_by_pod_namespace_and_verdict_and_prints_a_line() {
        let r = rec(Some("x/a"), None, "dropped");
        let f = |pod: Option<&str>, ns: Option<&str>, v: Option<Verdict>| {
            let mut c = Vec::new();
            if let Some(p) = pod {
                c.push((false, Cond::Pod(End::Either, vec![pod_ref(p)])));
            }
            if let Some(n) = ns {
                c.push((false, Cond::Namespace(End::Either, vec![n.to_string()])));
            }
            if let Some(v) = v {
                c.push((false, Cond::Verdict(v)));
            }
            filter(c)
        };
        assert!(f(None, None, None).matches(&r));
        assert!(f(Some("x/a"), None, Some(Verdict::Dropped)).matches(&r));
        assert!(!f(Some("x/b"), None, None).matches(&r));
        assert!(!f(Some("a"), None, None).matches(&r), "a is default/a");
        assert!(f(None, Some("x"), None).matches(&r));
        assert!(!f(None, Some("y"), None).matches(&r));
        assert!(!f(None, None, Some(Verdict::Allowed)).matches(&r));
        assert_eq!(
            line(&r),
            "2026-11-22T10:00:00.123Z node-1: x/a:40000 (10.244.1.2, id 256) -> 10.244.2.3:80 (world) TCP ingress DROPPED (DROP_POLICY_DENIED)"
        );
        // By reason, whole or without its prefix, any case.
        let by = |reason: &str| filter(vec![(false, Cond::Reason(vec![reason.into()]))]);
        assert!(by("DROP_POLICY_DENIED").matches(&r));
        assert!(by("policy_denied").matches(&r));
        assert!(!by("DENIED_X").matches(&r));
        assert!(!by("NETFILTER_DROP").matches(&r));
        let mut k = r.clone();
        k.event = "kernel-drop".into();
        k.reason = "NETFILTER_DROP".into();
        assert!(by("netfilter_drop").matches(&k));
        assert!(
            line(&k).ends_with("DROPPED by the kernel (NETFILTER_DROP)"),
            "{}",
            line(&k)
        );
        assert!(row(&k).contains("DROPPED (kernel)"), "{}", row(&k));
    }

    #[test]
    fn ends_labels_services_ports_protocols_time_and_negation() {
        let r = rec(Some("x/a"), Some("y/b"), "allowed");
        let one = |c: Cond| filter(vec![(false, c)]);
        let not = |c: Cond| filter(vec![(true, c)]);
        assert!(one(Cond::Pod(End::From, vec!["x/a".into()])).matches(&r));
        assert!(!one(Cond::Pod(End::To, vec!["x/a".into()])).matches(&r));
        assert!(one(Cond::Pod(End::To, vec!["z/c".into(), "y/b".into()])).matches(&r));
        assert!(one(Cond::Namespace(End::To, vec!["y".into()])).matches(&r));
        assert!(!one(Cond::Namespace(End::From, vec!["y".into()])).matches(&r));
        let sel = |s: &str| parse_selector(s).unwrap();
        assert!(one(Cond::Label(End::From, vec![sel("app=web")])).matches(&r));
        assert!(one(Cond::Label(End::Either, vec![sel("app,!tier")])).matches(&r));
        assert!(!one(Cond::Label(End::Either, vec![sel("app!=web")])).matches(&r));
        assert!(one(Cond::Label(End::Either, vec![sel("x=1"), sel("app==web")])).matches(&r));
        assert!(parse_selector("=v").is_err());
        assert!(one(Cond::Service(vec!["x/web".into()])).matches(&r));
        assert!(!one(Cond::Service(vec!["x/other".into()])).matches(&r));
        assert!(one(Cond::Protocol(vec!["TCP".into()])).matches(&r));
        assert!(one(Cond::Port(vec![80])).matches(&r));
        assert!(!one(Cond::Port(vec![81])).matches(&r));
        let before: jiff::Timestamp = "2026-11-22T09:00:00Z".parse().unwrap();
        let after: jiff::Timestamp = "2026-11-22T11:00:00Z".parse().unwrap();
        assert!(one(Cond::Since(before)).matches(&r));
        assert!(!one(Cond::Since(after)).matches(&r));
        // --not negates the next filter; conditions AND.
        assert!(!not(Cond::Pod(End::From, vec!["x/a".into()])).matches(&r));
        assert!(not(Cond::Protocol(vec!["udp".into()])).matches(&r));
        let both = filter(vec![
            (false, Cond::Namespace(End::Either, vec!["x".into()])),
            (true, Cond::Verdict(Verdict::Dropped)),
        ]);
        assert!(both.matches(&r));
        assert!(parse_since("5m").is_ok() && parse_since("1h30m").is_ok());
        assert!(parse_since("2026-11-22T09:00:00Z").unwrap() == before);
        assert!(parse_since("yesterday").is_err());
    }
}
