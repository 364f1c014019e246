//! `weir status` and `weir bpf lb list`: the agent's view, through its unix socket.

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

/// `weir status`.
pub async fn status(socket: &Path, json: bool) -> Result<ExitCode> {
    let st = ask(socket, "/status").await?;
    let lb = ask(socket, "/lb").await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"status": st, "programs": lb["programs"], "maps": lb["maps"], "counters": lb["counters"]})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("Node:          {}", s(&st["node"]));
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
    println!("\nPrograms:");
    let rows: Vec<Vec<String>> = lb["programs"]
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
    print!(
        "{}",
        render_table(&["PROGRAM", "ID", "RUNS", "AVG NS"], &rows)
    );
    println!("(run counts and times are kept while sysctl kernel.bpf_stats_enabled=1)");
    println!("\nMaps:");
    let rows: Vec<Vec<String>> = lb["maps"]
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
    print!("{}", render_table(&["MAP", "ENTRIES/CAPACITY"], &rows));
    println!("\nCounters:");
    let rows: Vec<Vec<String>> = lb["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| vec![s(&c[0]), s(&c[1])])
        .collect();
    print!("{}", render_table(&["COUNTER", "VALUE"], &rows));
    Ok(ExitCode::SUCCESS)
}

fn key_string(k: &Value) -> String {
    let vip = s(&k["vip"]);
    let vip = if vip.contains(':') {
        format!("[{vip}]")
    } else {
        vip
    };
    format!("{vip}:{}/{}", s(&k["port"]), s(&k["proto"]).to_uppercase())
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
        if let Some(m) = f["maglev_size"].as_u64() {
            mode.push(format!("maglev M={m}"));
        }
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
                format!("{} ({}) [{}]", backend_string(&b[1]), s(&b[0]), i + 1),
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
