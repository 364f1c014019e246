//! The `weir` command: the API server, `kubectl`-style apply/get/delete, and `weir lab`.
#![forbid(unsafe_code)]

mod cli;
mod get;
mod introspect;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let default_level = if args.is_daemon() {
        "info,kube_client::client::builder=off"
    } else {
        "warn,kube_client::client::builder=off"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
