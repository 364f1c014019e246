//! Columns for listing objects as tables, shared by the API server's `as=Table` replies
//! (what kubectl prints) and `weir get`.

use serde_json::Value;

use crate::kinds::ResourceKind;

/// One column: its name as kube-apiserver spells it, and whether it is shown only in wide
/// output (priority 1).
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Name, e.g. `Cluster-IP`.
    pub name: &'static str,
    /// 0: always shown; 1: only with `-o wide`.
    pub priority: u8,
}

/// The table columns of `kind`.
pub fn columns(kind: &ResourceKind) -> &'static [Column] {
    match kind.kind {
        "Namespace" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Status",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
        ],
        "Node" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Status",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
            Column {
                name: "Internal-IP",
                priority: 1,
            },
            Column {
                name: "Pod-CIDRs",
                priority: 1,
            },
        ],
        "Pod" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Ready",
                priority: 0,
            },
            Column {
                name: "Status",
                priority: 0,
            },
            Column {
                name: "Restarts",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
            Column {
                name: "IP",
                priority: 1,
            },
            Column {
                name: "Node",
                priority: 1,
            },
        ],
        "Service" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Type",
                priority: 0,
            },
            Column {
                name: "Cluster-IP",
                priority: 0,
            },
            Column {
                name: "External-IP",
                priority: 0,
            },
            Column {
                name: "Port(s)",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
            Column {
                name: "Selector",
                priority: 1,
            },
        ],
        "EndpointSlice" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "AddressType",
                priority: 0,
            },
            Column {
                name: "Ports",
                priority: 0,
            },
            Column {
                name: "Endpoints",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
        ],
        "NetworkPolicy" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Pod-Selector",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
        ],
        "SecurityIdentity" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Namespace",
                priority: 0,
            },
            Column {
                name: "Pod-Labels",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
            Column {
                name: "Namespace-Labels",
                priority: 1,
            },
        ],
        "RemoteEndpoint" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Cluster",
                priority: 0,
            },
            Column {
                name: "Namespace",
                priority: 0,
            },
            Column {
                name: "Pod",
                priority: 0,
            },
            Column {
                name: "IPs",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
            Column {
                name: "Labels",
                priority: 1,
            },
        ],
        "GlobalTrafficPolicy" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "LB-Type",
                priority: 0,
            },
            Column {
                name: "Clusters",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
            Column {
                name: "Shares",
                priority: 1,
            },
        ],
        "RemoteNode" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Cluster",
                priority: 0,
            },
            Column {
                name: "Node",
                priority: 0,
            },
            Column {
                name: "Addresses",
                priority: 0,
            },
            Column {
                name: "Pod-CIDRs",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
        ],
        // The mcs-api CRD's additionalPrinterColumns.
        "ServiceImport" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Type",
                priority: 0,
            },
            Column {
                name: "IP",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
        ],
        // The about-api CRD's additionalPrinterColumns (named in lower case there).
        "ClusterProperty" => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "value",
                priority: 0,
            },
            Column {
                name: "age",
                priority: 0,
            },
        ],
        _ => &[
            Column {
                name: "Name",
                priority: 0,
            },
            Column {
                name: "Age",
                priority: 0,
            },
        ],
    }
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn arr<'a>(v: &'a Value, p: &str) -> &'a [Value] {
    v.pointer(p)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn or_none(x: String) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x
    }
}

fn map_string(v: Option<&Value>) -> String {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// kubectl's short human duration: `45s`, `3m12s`, `25m`, `5h10m`, `3d4h`, `40d`.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        format!("{m}m{}s", secs % 60)
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        format!("{h}h{}m", m % 60)
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        format!("{d}d{}h", h % 24)
    } else {
        format!("{d}d")
    }
}

/// Age of an object from its `metadata.creationTimestamp`, as of `now`.
pub fn age(obj: &Value, now: jiff::Timestamp) -> String {
    match s(obj, "/metadata/creationTimestamp").parse::<jiff::Timestamp>() {
        Ok(t) => human_duration(now.duration_since(t).as_secs()),
        Err(_) => "<unknown>".into(),
    }
}

/// The Pod `STATUS` column: `Terminating` once deleted, else the phase.
pub fn pod_status(pod: &Value) -> String {
    if pod
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        return "Terminating".into();
    }
    s(pod, "/status/phase").to_string()
}

/// A list of strings as `a,b`.
fn list_string(v: Option<&Value>) -> String {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// A GlobalTrafficPolicy's shares as its mesh last wrote them: `c1=70%,c2=30%` (with `!` after
/// a cluster whose level is in panic).
fn traffic_shares(status: &Value) -> String {
    status["clusters"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    format!(
                        "{}={}%{}",
                        c["cluster"].as_str().unwrap_or_default(),
                        c["share"],
                        if c["panic"] == true { "!" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// A GlobalTrafficPolicy's clusters as written: `c2=80,c3=20` (targets) or its priority levels
/// in order, `[c1] [same:region.weir.dev] [*]`.
fn traffic_clusters(spec: &Value) -> String {
    if let Some(t) = spec["targets"].as_array().filter(|a| !a.is_empty()) {
        return t
            .iter()
            .map(|x| {
                format!(
                    "{}={}",
                    x["cluster"].as_str().unwrap_or_default(),
                    x["weight"]
                )
            })
            .collect::<Vec<_>>()
            .join(",");
    }
    let levels = spec["priorities"].as_array().cloned().unwrap_or_default();
    levels
        .iter()
        .map(|l| {
            if let Some(c) = l["clusters"].as_array() {
                let names: Vec<&str> = c.iter().filter_map(Value::as_str).collect();
                format!("[{}]", names.join(","))
            } else {
                let same: Vec<&str> = l["selector"]["sameAsImporter"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if same.is_empty() {
                    "[*]".to_string()
                } else {
                    format!("[same:{}]", same.join(","))
                }
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The cells of one row for `obj`, one per column of [`columns`].
pub fn row(kind: &ResourceKind, obj: &Value, now: jiff::Timestamp) -> Vec<String> {
    let name = s(obj, "/metadata/name").to_string();
    let age = age(obj, now);
    match kind.kind {
        "Namespace" => vec![name, s(obj, "/status/phase").to_string(), age],
        "Node" => {
            let ready = arr(obj, "/status/conditions")
                .iter()
                .find(|c| s(c, "/type") == "Ready")
                .map(|c| {
                    if s(c, "/status") == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("NotReady");
            let ip = arr(obj, "/status/addresses")
                .iter()
                .filter(|a| s(a, "/type") == "InternalIP")
                .map(|a| s(a, "/address"))
                .collect::<Vec<_>>()
                .join(",");
            let cidrs = arr(obj, "/spec/podCIDRs")
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",");
            vec![name, ready.into(), age, or_none(ip), or_none(cidrs)]
        }
        "Pod" => {
            let total = arr(obj, "/spec/containers").len();
            let ready = arr(obj, "/status/containerStatuses")
                .iter()
                .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            let restarts: i64 = arr(obj, "/status/containerStatuses")
                .iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .sum();
            vec![
                name,
                format!("{ready}/{total}"),
                pod_status(obj),
                restarts.to_string(),
                age,
                or_none(s(obj, "/status/podIP").to_string()),
                or_none(s(obj, "/spec/nodeName").to_string()),
            ]
        }
        "Service" => {
            let ty = s(obj, "/spec/type").to_string();
            let mut ext: Vec<String> = arr(obj, "/status/loadBalancer/ingress")
                .iter()
                .map(|i| {
                    let ip = s(i, "/ip");
                    if ip.is_empty() {
                        s(i, "/hostname").to_string()
                    } else {
                        ip.to_string()
                    }
                })
                .collect();
            ext.extend(
                arr(obj, "/spec/externalIPs")
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from)),
            );
            let external = if !ext.is_empty() {
                ext.join(",")
            } else if ty == "LoadBalancer" {
                "<pending>".into()
            } else if ty == "ExternalName" {
                s(obj, "/spec/externalName").to_string()
            } else {
                "<none>".into()
            };
            let ports = arr(obj, "/spec/ports")
                .iter()
                .map(|p| {
                    let port = p.get("port").map(|v| v.to_string()).unwrap_or_default();
                    let proto = s(p, "/protocol");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) if np != 0 => format!("{port}:{np}/{proto}"),
                        _ => format!("{port}/{proto}"),
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            let ips = arr(obj, "/spec/clusterIPs")
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",");
            vec![
                name,
                ty,
                or_none(ips),
                external,
                or_none(ports),
                age,
                or_none(map_string(obj.pointer("/spec/selector"))),
            ]
        }
        "EndpointSlice" => {
            let ports = arr(obj, "/ports")
                .iter()
                .map(|p| {
                    p.get("port")
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "<unset>".into())
                })
                .collect::<Vec<_>>()
                .join(",");
            let addrs: Vec<&str> = arr(obj, "/endpoints")
                .iter()
                .flat_map(|e| arr(e, "/addresses").iter().filter_map(Value::as_str))
                .collect();
            let shown = if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else {
                addrs.join(",")
            };
            vec![
                name,
                s(obj, "/addressType").to_string(),
                or_none(ports),
                or_none(shown),
                age,
            ]
        }
        "NetworkPolicy" => {
            let sel = map_string(obj.pointer("/spec/podSelector/matchLabels"));
            vec![
                name,
                if sel.is_empty() { "<none>".into() } else { sel },
                age,
            ]
        }
        "SecurityIdentity" => vec![
            name,
            s(obj, "/spec/namespace").to_string(),
            or_none(map_string(obj.pointer("/spec/podLabels"))),
            age,
            or_none(map_string(obj.pointer("/spec/namespaceLabels"))),
        ],
        "RemoteEndpoint" => vec![
            name,
            s(obj, "/spec/cluster").to_string(),
            s(obj, "/spec/namespace").to_string(),
            s(obj, "/spec/pod").to_string(),
            or_none(list_string(obj.pointer("/spec/ips"))),
            age,
            or_none(map_string(obj.pointer("/spec/labels"))),
        ],
        "GlobalTrafficPolicy" => vec![
            name,
            s(obj, "/spec/lbType").to_string(),
            or_none(traffic_clusters(&obj["spec"])),
            age,
            or_none(traffic_shares(&obj["status"])),
        ],
        "RemoteNode" => vec![
            name,
            s(obj, "/spec/cluster").to_string(),
            s(obj, "/spec/node").to_string(),
            or_none(list_string(obj.pointer("/spec/addresses"))),
            or_none(list_string(obj.pointer("/spec/podCIDRs"))),
            age,
        ],
        "ServiceImport" => vec![
            name,
            s(obj, "/spec/type").to_string(),
            // A JSONPath cell of a list, as kube-apiserver prints a CRD column.
            obj.pointer("/spec/ips")
                .filter(|v| !v.is_null())
                .map(|v| v.to_string())
                .unwrap_or_default(),
            age,
        ],
        "ClusterProperty" => vec![name, s(obj, "/spec/value").to_string(), age],
        _ => vec![name, age],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::*;
    use serde_json::json;

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(190), "3m10s");
        assert_eq!(human_duration(3600), "60m");
        assert_eq!(human_duration(4 * 3600 + 60), "4h1m");
        assert_eq!(human_duration(3 * 86400 + 7200), "3d2h");
    }

    #[test]
    fn security_identity_row() {
        let id = json!({"metadata": {"name": "256", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"namespace": "x", "podLabels": {"app": "web", "tier": "front"},
                "namespaceLabels": {"kubernetes.io/metadata.name": "x"}}});
        let now: jiff::Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        assert_eq!(
            row(&SECURITY_IDENTITY, &id, now),
            [
                "256",
                "x",
                "app=web,tier=front",
                "60s",
                "kubernetes.io/metadata.name=x"
            ]
        );
        assert_eq!(columns(&SECURITY_IDENTITY).len(), 5);
    }

    #[test]
    fn service_row() {
        let svc = json!({"metadata": {"name": "web", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"type": "NodePort", "clusterIPs": ["10.96.0.10"], "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}], "selector": {"app": "web"}}});
        let now: jiff::Timestamp = "2026-01-01T00:00:30Z".parse().unwrap();
        let r = row(&SERVICE, &svc, now);
        assert_eq!(
            r,
            vec![
                "web",
                "NodePort",
                "10.96.0.10",
                "<none>",
                "80:30080/TCP",
                "30s",
                "app=web"
            ]
        );
        assert_eq!(r.len(), columns(&SERVICE).len());
    }
}
