//! `weir dataplane switch`: switches nodes one at a time through their agents
//! (`POST /dataplane?to=KIND`), printing each node's report, and stops at the first node that
//! fails (that node has rolled back). In a lab each switched node's agent starts in its new
//! mode from then on, and a lab whose nodes all switched is in the new mode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use serde_json::Value;
use weir_dataplane::DataplaneKind;

use crate::cli::Cli;

fn line(r: &Value) -> String {
    format!(
        "{}: {} -> {}: {} flows copied ({} during the cut-over), {} failed; cut-over at {} ms, {} ms in all",
        r["node"].as_str().unwrap_or("?"),
        r["from"].as_str().unwrap_or("?"),
        r["to"].as_str().unwrap_or("?"),
        r["flows_copied"],
        r["flows_copied_after_cutover"],
        r["flows_failed"],
        r["cutover_ms"],
        r["total_ms"],
    )
}

/// Switches the agents of `nodes` to `to`, in order.
pub(crate) async fn run(
    cli: &Cli,
    to: DataplaneKind,
    nodes: &[(String, PathBuf)],
    json: bool,
    fail_after: Option<&str>,
) -> Result<ExitCode> {
    let path = match fail_after {
        Some(p) => format!("/dataplane?to={to}&fail-after={p}"),
        None => format!("/dataplane?to={to}"),
    };
    let mut reports = Vec::new();
    let mut failed = false;
    for (name, socket) in nodes {
        if !json {
            eprintln!("{name}: switching to {to} ...");
        }
        let r = weir_agent::api::request(socket, "POST", &path)
            .await
            .map_err(|e| {
                anyhow!(
                    "the agent of {name} does not answer on {}: {e}",
                    socket.display()
                )
            })?;
        if let Some(e) = r.get("error").filter(|e| !e.is_null()) {
            let what = e
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            if !json {
                eprintln!("{name}: the switch failed and was rolled back: {what}");
            }
            failed = true;
            reports.push(r);
            break;
        }
        if !json {
            println!("{}", line(&r));
        }
        reports.push(r);
        // A lab node's agent starts in the mode it was switched to.
        if let Some(c) = &cli.cluster {
            let paths = weir_lab::paths::LabPaths::new(c);
            let mut layout = weir_lab::paths::Layout::load(&paths)?;
            if let Some(n) = layout.nodes.iter_mut().find(|n| n.name == *name) {
                n.dataplane = Some(to);
                layout.save(&paths)?;
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    // A lab whose every node switched is in the new mode (agents started later, nodes added).
    if let Some(c) = &cli.cluster {
        let paths = weir_lab::paths::LabPaths::new(c);
        let mut layout = weir_lab::paths::Layout::load(&paths)?;
        if layout.nodes.iter().all(|n| n.dataplane == Some(to)) {
            layout.dataplane = to;
            for n in &mut layout.nodes {
                n.dataplane = None;
            }
            layout.save(&paths)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
