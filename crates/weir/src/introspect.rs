//! `weir status`, `weir bpf lb list`, `weir bpf endpoint list`, `weir bpf metrics list`,
//! `weir bpf ct list`, `weir bpf nat list` and `weir prefilter`: the agent's view, through
//! its unix socket.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use serde_json::Value;

use crate::get::render_table;

async fn ask(socket: &Path, path: &str) -> Result<Value> {
    weir_agent::api::get(socket, path).await.map_err(|e| {
        anyhow!("the weir agent does not answer on {}: {e} (hint: is the agent running? for a lab, `weir lab list`; choose a node with --node)", socket.display())
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Programs with their kernel ids and run statistics, as a table.
fn programs_table(programs: &Value) -> String {
    let rows: Vec<Vec<String>> = programs
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                s(&p["name"]),
                s(&p["id"]),
                s(&p["run_count"]),
                s(&p["avg_run_ns"]),
            ]
        })
        .collect();
    render_table(&["PROGRAM", "ID", "RUNS", "AVG NS"], &rows)
}

/// Maps with their fill level, as a table.
fn maps_table(maps: &Value) -> String {
    let rows: Vec<Vec<String>> = maps
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                s(&m["name"]),
                format!("{}/{}", s(&m["entries"]), s(&m["capacity"])),
            ]
        })
        .collect();
    render_table(&["MAP", "ENTRIES/CAPACITY"], &rows)
}

/// `weir status`; `mesh` adds a clusterset cluster's mesh state and imports.
pub async fn status(
    socket: &Path,
    json: bool,
    mesh: Option<(weir_mesh::MeshStatus, Vec<crate::imports::ImportInfo>)>,
) -> Result<ExitCode> {
    let st = ask(socket, "/status").await?;
    let lb = ask(socket, "/lb").await?;
    if json {
        let dp = ask(socket, "/datapath").await.ok();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "status": st,
                "programs": lb["programs"],
                "maps": lb["maps"],
                "counters": lb["counters"],
                "datapath": dp.as_ref().map(|d| d["status"].clone()),
                "mesh": mesh.as_ref().map(|(m, _)| m),
                "imports": mesh.as_ref().map(|(_, i)| i),
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("Node:          {}", s(&st["node"]));
    println!("Dataplane:     {}", s(&st["dataplane"]));
    if let Some(n) = st["dsr_draining"].as_u64() {
        println!("               the tc programs still carry {n} DSR flows, until they end");
    }
    let sw = &st["switch"];
    let under_way = sw["phase"]
        .as_str()
        .is_some_and(|p| p != "done" && p != "rolled-back");
    if under_way {
        println!(
            "Switching:     {} -> {}, {} ({} flows copied so far, {} failed)",
            s(&sw["from"]),
            s(&sw["to"]),
            s(&sw["phase"]),
            s(&sw["flows_copied"]),
            s(&sw["flows_failed"]),
        );
    } else if sw.is_object() {
        println!(
            "Last switch:   {} -> {} at {}: {} flows copied ({} during the cut-over), {} failed, cut-over at {} ms{}",
            s(&sw["from"]),
            s(&sw["to"]),
            s(&sw["finished"]),
            s(&sw["flows_copied"]),
            s(&sw["flows_copied_after_cutover"]),
            s(&sw["flows_failed"]),
            s(&sw["cutover_ms"]),
            sw["error"]
                .as_str()
                .map(|e| format!("; FAILED and rolled back: {e}"))
                .unwrap_or_default()
        );
        if sw["verdicts_copied"].as_u64().unwrap_or(0) > 0 {
            println!(
                "               {} flows' policy verdicts carried (judged again on their next packet)",
                s(&sw["verdicts_copied"])
            );
        }
        if let Some(n) = sw["node_flows_held"].as_u64().filter(|n| *n > 0) {
            println!(
                "               {n} flows of the node's own processes left to the kernel's NAT (held until they end)"
            );
        }
        if let Some(n) = sw["draining"].as_u64() {
            let place = if sw["to"] == "ebpf" {
                "in the BPF conntrack"
            } else {
                "in the kernel's conntrack"
            };
            println!("               {n} handed-over flows still draining ({place})");
        }
    }
    println!(
        "API server:    {}",
        if st["api_connected"] == true {
            "connected"
        } else {
            "not connected (the datapath keeps its last state)"
        }
    );
    println!(
        "Sync:          {} ({} applies, last {}: built in {} µs, applied in {} µs)",
        if st["synced"] == true {
            "in sync"
        } else {
            "NOT in sync"
        },
        s(&st["applies"]),
        s(&st["last_apply"]),
        s(&st["last_build_micros"]),
        s(&st["last_apply_micros"])
    );
    println!("Frontends:     {}", s(&st["frontends"]));
    if let Some(e) = st["last_error"].as_str() {
        println!("Last error:    {e}");
    }
    for w in st["warnings"].as_array().into_iter().flatten() {
        println!("Warning:       {}: {}", s(&w["service"]), s(&w["message"]));
    }
    let schedules = st["schedules"].as_array().cloned().unwrap_or_default();
    if !schedules.is_empty() {
        println!("\nScheduled ServiceImports (share of new connections per cluster):");
        print!("{}", schedules_table(&schedules));
    }
    println!("\nPrograms:");
    print!("{}", programs_table(&lb["programs"]));
    println!("(run counts and times are kept while sysctl kernel.bpf_stats_enabled=1)");
    println!("\nMaps:");
    print!("{}", maps_table(&lb["maps"]));
    println!("\nCounters:");
    let rows: Vec<Vec<String>> = lb["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| vec![s(&c[0]), s(&c[1])])
        .collect();
    print!("{}", render_table(&["COUNTER", "VALUE"], &rows));
    if let Ok(dp) = ask(socket, "/datapath").await {
        if dp.get("error").is_none() {
            let st = &dp["status"];
            println!(
                "\nPod datapath:  {} endpoints, {} devices attached, node devices {}",
                s(&st["endpoints"]),
                dp["dump"]["devices"]
                    .as_array()
                    .map(|a| a.len())
                    .unwrap_or(0),
                st["devices"]
                    .as_array()
                    .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            );
            if let Some(t) = st["tunnel"].as_str() {
                println!(
                    "Tunnel:        VXLAN on {t}, {} routes to other nodes' pods",
                    s(&st["tunnel_routes"])
                );
            }
            if st["masquerade"] == true {
                let keep: Vec<String> = st["non_masquerade"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!(
                    "Masquerade:    pods' IPv4 flows leaving the cluster, except to {}",
                    if keep.is_empty() {
                        "(pod CIDRs not known yet: off)".to_string()
                    } else {
                        keep.join(",")
                    }
                );
            }
            if let Some(e) = st["last_error"].as_str() {
                println!("Last error:    {e}");
            }
            for b in st["bad_records"].as_array().into_iter().flatten() {
                println!("Ignored:       {}", s(b));
            }
            print!("{}", programs_table(&dp["dump"]["programs"]));
            print!("{}", maps_table(&dp["dump"]["maps"]));
        }
    }
    if let Some((m, imports)) = &mesh {
        print!("{}", crate::imports::render(m, imports));
    }
    Ok(ExitCode::SUCCESS)
}

async fn datapath(socket: &Path) -> Result<Value> {
    let dp = ask(socket, "/datapath").await?;
    if let Some(e) = dp.get("error") {
        return Err(anyhow!("{}: {}", socket.display(), s(e)));
    }
    Ok(dp)
}

/// `weir bpf endpoint list`: the local pods the per-packet datapath delivers to directly.
pub async fn endpoint_list(socket: &Path, json: bool) -> Result<ExitCode> {
    let dp = datapath(socket).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&dp["dump"]["endpoints"])?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = dp["dump"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["ip"]),
                s(&e["ifindex"]),
                s(&e["mac"]),
                s(&e["node_mac"]),
                if e["flags"].as_u64().unwrap_or(0) & 1 != 0 {
                    "host-stack".into()
                } else {
                    "redirect-peer".into()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(
            &["ADDRESS", "IFINDEX", "POD MAC", "HOST MAC", "DELIVERY"],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// `weir bpf metrics list`: packets and bytes by direction and reason (verdicts below 128,
/// drops from 130), as `cilium-dbg bpf metrics list`.
pub async fn metrics_list(socket: &Path, json: bool) -> Result<ExitCode> {
    let dp = datapath(socket).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&dp["dump"]["metrics"])?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = dp["dump"]["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                s(&m["name"]),
                s(&m["reason"]),
                s(&m["direction"]),
                s(&m["packets"]),
                s(&m["bytes"]),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(&["REASON", "CODE", "DIRECTION", "PACKETS", "BYTES"], &rows)
    );
    Ok(ExitCode::SUCCESS)
}

fn key_string(k: &Value) -> String {
    let vip = s(&k["vip"]);
    let nodeport = vip == "0.0.0.0" || vip == "::";
    let vip = match vip.as_str() {
        "0.0.0.0" => "*".to_string(),
        "::" => "[*]".to_string(),
        v if v.contains(':') => format!("[{v}]"),
        _ => vip,
    };
    let what = if nodeport {
        " (NodePort)"
    } else if k["scope"] == "External" {
        " (external)"
    } else {
        ""
    };
    format!(
        "{vip}:{}/{}{what}",
        s(&k["port"]),
        s(&k["proto"]).to_uppercase()
    )
}

fn backend_string(b: &Value) -> String {
    let ip = s(&b["ip"]);
    let ip = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    format!("{ip}:{}", s(&b["port"]))
}

/// The backends under outlier detection: answered and failed connects, the failure streak
/// and the ejection state.
fn health_table(health: &[Value]) -> String {
    let rows: Vec<Vec<String>> = health
        .iter()
        .map(|h| {
            let left = h["remaining_ms"].as_u64().unwrap_or(0);
            vec![
                format!("{} ({})", backend_string(&h["backend"]), s(&h["id"])),
                s(&h["successes_total"]),
                s(&h["failures_total"]),
                format!("{}/{}", s(&h["failures"]), s(&h["threshold"])),
                if left > 0 {
                    format!(
                        "ejected for {:.1}s more ({} failed connects in a row; ejection {})",
                        left as f64 / 1000.0,
                        s(&h["threshold"]),
                        s(&h["ejections"])
                    )
                } else if h["ejections"].as_u64().unwrap_or(0) > 0 {
                    format!("admitted (ejected {} times)", s(&h["ejections"]))
                } else {
                    "admitted".into()
                },
            ]
        })
        .collect();
    render_table(
        &["BACKEND (ID)", "ANSWERED", "FAILED", "STREAK", "STATE"],
        &rows,
    )
}

/// The shares of the ServiceImports under a GlobalTrafficPolicy (or with ejected backends).
fn schedules_table(schedules: &[Value]) -> String {
    let mut rows = Vec::new();
    for sc in schedules {
        for (i, c) in sc["clusters"].as_array().into_iter().flatten().enumerate() {
            rows.push(vec![
                if i == 0 {
                    s(&sc["import"])
                } else {
                    String::new()
                },
                if i == 0 {
                    s(&sc["frontend"])
                } else {
                    String::new()
                },
                if i == 0 {
                    sc["policy"].as_str().unwrap_or("(none)").to_string()
                } else {
                    String::new()
                },
                s(&c["cluster"]),
                c["level"].as_u64().map_or("-".into(), |l| l.to_string()),
                format!("{}/{}", s(&c["healthy"]), s(&c["total"])),
                format!("{}%", s(&c["share"])),
                s(&c["reason"]),
            ]);
        }
        for e in sc["ejected"].as_array().into_iter().flatten() {
            rows.push(vec![
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                format!("{} ejected by outlier detection", s(e)),
            ]);
        }
    }
    render_table(
        &[
            "IMPORT", "FRONTEND", "POLICY", "CLUSTER", "LEVEL", "HEALTHY", "SHARE", "WHY",
        ],
        &rows,
    )
}

/// `weir bpf lb list`, as `cilium bpf lb list` prints it: one row per backend slot.
pub async fn lb_list(socket: &Path, json: bool) -> Result<ExitCode> {
    let lb = ask(socket, "/lb").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&lb)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    for f in lb["frontends"].as_array().into_iter().flatten() {
        let fe = key_string(&f["key"]);
        let mut mode = vec![format!("id {}", s(&f["id"]))];
        if let Some(t) = f["affinity_timeout"].as_u64() {
            mode.push(format!("affinity {t}s"));
        }
        let ranges: Vec<String> = f["source_ranges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        if !ranges.is_empty() {
            mode.push(format!("from {}", ranges.join(" ")));
        }
        if f["dsr"] == true {
            mode.push("dsr".into());
        }
        if let Some(m) = f["maglev_size"].as_u64() {
            mode.push(format!("maglev M={m}"));
        }
        if f["outlier"] == true {
            mode.push("outlier detection".into());
        }
        let shares: Vec<f64> = f["shares"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        let backends = f["backends"].as_array().cloned().unwrap_or_default();
        if backends.is_empty() {
            rows.push(vec![
                fe.clone(),
                "0.0.0.0:0 (no endpoints: connections refused)".into(),
                mode.join(", "),
            ]);
        }
        for (i, b) in backends.iter().enumerate() {
            rows.push(vec![
                if i == 0 { fe.clone() } else { String::new() },
                match shares.get(i) {
                    Some(p) => format!(
                        "{} ({}) [{}] {:.2}%",
                        backend_string(&b[1]),
                        s(&b[0]),
                        i + 1,
                        p
                    ),
                    None => format!("{} ({}) [{}]", backend_string(&b[1]), s(&b[0]), i + 1),
                },
                if i == 0 {
                    mode.join(", ")
                } else {
                    String::new()
                },
            ]);
        }
    }
    print!(
        "{}",
        render_table(
            &["SERVICE ADDRESS", "BACKEND ADDRESS (ID) [SLOT]", "MODE"],
            &rows
        )
    );
    let health = lb["health"].as_array().cloned().unwrap_or_default();
    if !health.is_empty() {
        println!("\nOutlier detection (TCP connects to ClusterSetIP backends):");
        print!("{}", health_table(&health));
    }
    let aff = lb["affinity"].as_array().cloned().unwrap_or_default();
    if !aff.is_empty() {
        println!("\nSession affinity:");
        let rows: Vec<Vec<String>> = aff
            .iter()
            .map(|a| {
                vec![
                    s(&a["client"]),
                    s(&a["frontend_id"]),
                    s(&a["backend_id"]),
                    format!("{}s", s(&a["idle_seconds"])),
                ]
            })
            .collect();
        print!(
            "{}",
            render_table(
                &["CLIENT (NETNS COOKIE)", "FRONTEND ID", "BACKEND ID", "IDLE"],
                &rows
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `weir bpf ct list` (every conntrack entry) and `weir bpf nat list` (the SNATed flows: the
/// node's address and port each client flow was given).
pub async fn ct_list(socket: &Path, json: bool, nat_only: bool) -> Result<ExitCode> {
    let dp = datapath(socket).await?;
    let entries: Vec<Value> = dp["dump"]["conntrack"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| !nat_only || (e["direction"] == "original" && !s(&e["snat"]).is_empty()))
        .cloned()
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    let dash = |v: String| if v.is_empty() { "-".to_string() } else { v };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let flags: Vec<String> = e["flags"].as_array().into_iter().flatten().map(s).collect();
            if nat_only {
                vec![
                    s(&e["proto"]),
                    s(&e["src"]),
                    s(&e["snat"]),
                    s(&e["nat"]),
                    s(&e["dst"]),
                    s(&e["expires_in"]),
                ]
            } else {
                vec![
                    s(&e["proto"]),
                    s(&e["src"]),
                    s(&e["dst"]),
                    s(&e["direction"]),
                    s(&e["nat"]),
                    dash(s(&e["snat"])),
                    dash(flags.join(",")),
                    s(&e["expires_in"]),
                    s(&e["packets"]),
                ]
            }
        })
        .collect();
    let header: &[&str] = if nat_only {
        &[
            "PROTO",
            "CLIENT",
            "SNAT",
            "BACKEND",
            "FRONTEND",
            "EXPIRES IN",
        ]
    } else {
        &[
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "DIRECTION",
            "NAT",
            "SNAT",
            "STATE",
            "EXPIRES IN",
            "PACKETS",
        ]
    };
    print!("{}", render_table(header, &rows));
    Ok(ExitCode::SUCCESS)
}

/// `weir explain`: a synthetic packet through the node's tc programs, changing nothing.
pub async fn explain(
    socket: &Path,
    from: &str,
    to: &str,
    protocol: &str,
    json: bool,
) -> Result<ExitCode> {
    let mut family = Vec::new();
    for (flag, v) in [("--from", from), ("--to", to)] {
        match v.parse::<std::net::SocketAddr>() {
            Ok(a) => family.push(a.is_ipv4()),
            Err(_) => {
                return Err(anyhow!(
                    "{flag} {v:?}: expected ADDRESS:PORT, e.g. 172.30.0.2:40000 or [fd00::2]:40000"
                ))
            }
        }
    }
    if family[0] != family[1] {
        return Err(anyhow!(
            "--from {from:?} and --to {to:?}: both IPv4 or both IPv6"
        ));
    }
    if !matches!(protocol.to_ascii_lowercase().as_str(), "tcp" | "udp") {
        return Err(anyhow!("--protocol {protocol:?}: expected tcp or udp"));
    }
    let esc = |v: &str| v.replace('[', "%5B").replace(']', "%5D");
    let e = ask(
        socket,
        &format!(
            "/explain?from={}&to={}&protocol={protocol}",
            esc(from),
            esc(to)
        ),
    )
    .await?;
    if let Some(err) = e.get("error") {
        return Err(anyhow!("{}: {}", socket.display(), s(err)));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Program:   {} (ingress of ifindex {})",
        s(&e["program"]),
        s(&e["ingress_ifindex"])
    );
    println!("Packet:    {} (first packet of a flow)", s(&e["packet"]));
    let verdict = match e["verdict"].as_str().unwrap_or("") {
        "redirect" => "REDIRECT (forwarded by the program, bypassing the host stack)",
        "pass" => "PASS (handed to the host stack)",
        "drop" => "DROP",
        other => other,
    };
    println!("Verdict:   {verdict}");
    println!("Reason:    {} ({})", s(&e["reason"]), s(&e["reason_code"]));
    if let Some(b) = e["backend"].as_str() {
        println!("Backend:   {b}");
    }
    if let Some(n) = e["snat"].as_str() {
        println!("SNAT:      {n}");
    }
    if let Some(o) = e["output"].as_str() {
        println!("Output:    {o}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `weir prefilter list`.
pub async fn prefilter_list(socket: &Path, json: bool) -> Result<ExitCode> {
    let v = ask(socket, "/prefilter").await?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(anyhow!("{e}"));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| vec![s(&e["cidr"]), s(&e["packets"]), s(&e["bytes"])])
        .collect();
    if rows.is_empty() {
        eprintln!("The prefilter is empty.");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_table(&["CIDR", "PACKETS", "BYTES"], &rows));
    Ok(ExitCode::SUCCESS)
}

/// `weir prefilter add` (`POST`) and `weir prefilter delete` (`DELETE`).
pub async fn prefilter_change(socket: &Path, method: &str, cidrs: &[String]) -> Result<ExitCode> {
    let nets = weir_agent::pods::parse_prefixes(cidrs).map_err(|e| anyhow!("{e}"))?;
    let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
    let v = weir_agent::api::request(socket, method, &format!("/prefilter?cidr={}", list.join(",")))
        .await
        .map_err(|e| {
            anyhow!("the weir agent does not answer on {}: {e} (hint: is the agent running? for a lab, `weir lab list`; choose a node with --node)", socket.display())
        })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(anyhow!("prefilter: {e}; nothing was changed"));
    }
    if method == "POST" {
        let added: Vec<String> = v["added"].as_array().into_iter().flatten().map(s).collect();
        for n in &list {
            if added.contains(n) {
                println!("prefilter: {n} added");
            } else {
                println!("prefilter: {n} unchanged (already listed)");
            }
        }
    } else {
        for n in &list {
            println!("prefilter: {n} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}
