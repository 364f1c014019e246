//! Running the netfilter tools (`nft`, `iptables-restore`, `conntrack`, `ip`) in a node's
//! network namespace (through `nsenter --net`), input on stdin, errors naming the command.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::DataplaneError;

/// Runs `bin ARGS` (in the network namespace `netns`, if given) with `input` on stdin;
/// returns its stdout, or an error with its stderr.
pub(crate) fn run(
    netns: Option<&Path>,
    bin: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, DataplaneError> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{bin} {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|e| {
        DataplaneError::Netfilter(format!("running {what}: {e} (is {bin} installed?)"))
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| DataplaneError::Netfilter(format!("writing to {what}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| DataplaneError::Netfilter(format!("running {what}: {e}")))?;
    if !out.status.success() {
        return Err(DataplaneError::Netfilter(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
