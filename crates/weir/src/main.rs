//! The `weir` command: the API server, `kubectl`-style apply/get/delete, and `weir lab`.
#![forbid(unsafe_code)]

mod agent;
mod cli;
mod cni_install;
mod get;
mod imports;
mod introspect;
mod mesh;
mod observe;
mod switch;
mod ui;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `weir ... | head` closes our stdout early: end quietly, as other tools do, instead of
    // panicking on the next print.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info)
    }));
    let args = cli::Cli::parse_from(cli::rewrite_not(std::env::args_os().collect()));
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
