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
    /// Flows the policy dropped.
    Dropped,
}

/// What to show.
#[derive(Debug, Clone)]
pub struct Filter {
    /// `namespace/name`: flows from or to this pod.
    pub pod: Option<String>,
    /// Flows from or to pods of this namespace.
    pub namespace: Option<String>,
    /// Only this verdict.
    pub verdict: Option<Verdict>,
    /// Only this reason (any case; `POLICY_DENIED` matches `DROP_POLICY_DENIED`).
    pub reason: Option<String>,
}

impl Filter {
    fn matches(&self, r: &FlowRecord) -> bool {
        let ends = [&r.source.pod, &r.destination.pod];
        if let Some(p) = &self.pod {
            if !ends.iter().any(|e| e.as_deref() == Some(p.as_str())) {
                return false;
            }
        }
        if let Some(ns) = &self.namespace {
            let prefix = format!("{ns}/");
            if !ends
                .iter()
                .any(|e| e.as_deref().is_some_and(|p| p.starts_with(&prefix)))
            {
                return false;
            }
        }
        if let Some(want) = &self.reason {
            let (want, have) = (want.to_ascii_uppercase(), r.reason.to_ascii_uppercase());
            if have != want && !have.ends_with(&format!("_{want}")) {
                return false;
            }
        }
        match self.verdict {
            Some(Verdict::Allowed) => r.verdict == "allowed",
            Some(Verdict::Dropped) => r.verdict == "dropped",
            None => true,
        }
    }
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

/// One verdict as a line.
pub fn line(r: &FlowRecord) -> String {
    let time = r
        .time
        .parse::<jiff::Timestamp>()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|_| r.time.clone());
    let by = if r.event == "kernel-drop" {
        " by the kernel"
    } else {
        ""
    };
    format!(
        "{time} {}: {} -> {} {} {} {}{by} ({})",
        r.node,
        end(&r.source),
        end(&r.destination),
        r.protocol.to_uppercase(),
        r.direction,
        r.verdict.to_uppercase(),
        r.reason
    )
}

fn print(r: &FlowRecord, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!("{}", line(r));
    }
    Ok(())
}

async fn page(socket: &std::path::Path, since: u64) -> std::io::Result<FlowPage> {
    let v = weir_agent::api::get(socket, &format!("/flows?since={since}")).await?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(std::io::Error::other(e.to_string()));
    }
    serde_json::from_value(v).map_err(std::io::Error::other)
}

/// Prints the last `last` matching verdicts of the agents at `sockets` (node name, socket),
/// then, with `follow`, every new one until interrupted.
pub async fn run(
    sockets: &[(String, PathBuf)],
    filter: &Filter,
    last: usize,
    follow: bool,
    json: bool,
) -> Result<ExitCode> {
    let mut cursor: BTreeMap<String, u64> = BTreeMap::new();
    let mut events_lost: BTreeMap<String, u64> = BTreeMap::new();
    let mut past = Vec::new();
    for (node, socket) in sockets {
        let p = page(socket, 0).await.map_err(|e| {
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
        past.extend(p.flows.into_iter().filter(|r| filter.matches(r)));
    }
    past.sort_by(|a, b| a.time.cmp(&b.time));
    for r in &past[past.len().saturating_sub(last)..] {
        print(r, json)?;
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
                    new.extend(p.flows.into_iter().filter(|r| filter.matches(r)));
                }
                Err(e) => {
                    if failing.insert(node.clone(), true).is_none() {
                        eprintln!("(the agent of {node} does not answer: {e}; retrying)");
                    }
                }
            }
        }
        new.sort_by(|a, b| a.time.cmp(&b.time));
        for r in &new {
            print(r, json)?;
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
            protocol: "tcp".into(),
            source: end(src_pod, "10.244.1.2", 40000, 256, "pod"),
            destination: end(dst_pod, "10.244.2.3", 80, 2, "world"),
        }
    }

    #[test]
    fn filters_by_pod_namespace_and_verdict_and_prints_a_line() {
        let r = rec(Some("x/a"), None, "dropped");
        let f = |pod: Option<&str>, ns: Option<&str>, v| Filter {
            pod: pod.map(pod_ref),
            namespace: ns.map(str::to_string),
            verdict: v,
            reason: None,
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
        let by = |reason: &str| Filter {
            reason: Some(reason.into()),
            ..f(None, None, None)
        };
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
    }
}
