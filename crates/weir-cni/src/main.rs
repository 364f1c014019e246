//! `weir-cni`: the CNI plugin binary. Parameters in CNI_* variables, the network
//! configuration on stdin, the result or error on stdout (SPEC.md "Protocol").
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::process::ExitCode;

use weir_cni::spec::{self, CniError, Env};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    // Errors are written in the configuration's version when it names one this plugin
    // speaks, else in the newest.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".into());
    let outcome =
        Env::read(|k| std::env::var(k).ok()).and_then(|env| weir_cni::plugin::run(&env, &stdin));
    let mut out = std::io::stdout();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let e: CniError = e;
            eprintln!("weir-cni: {e}");
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
