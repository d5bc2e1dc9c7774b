//! `vz-kubelet`: a Kubernetes node agent that runs virtual machines as pods.
//!
//! The binary is thin: it parses flags, installs logging and the TLS crypto provider,
//! runs one subcommand and prints any error chain once.

mod cmd;
mod memory;
mod observability;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "vz-kubelet", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    log: observability::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: register the node and run its pods.
    Run(Box<cmd::run::RunArgs>),
    /// Drive the VM runtime by hand: probe, run, list, stop VMs.
    Vm(Box<cmd::vm::VmArgs>),
    /// VM images: push, pull, ls, inspect, rm, prune.
    Image(Box<cmd::image::ImageArgs>),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // One rustls crypto provider for the whole process (kube, the kubelet API, registries,
    // the trace exporter).
    let had_provider = rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err();
    let traces = match observability::init(&cli.log, run_node_name(&matches).as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if had_provider {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => cmd::run::run(*args).await,
            Command::Vm(args) => cmd::vm::run(*args).await,
            Command::Image(args) => cmd::image::run(*args).await,
        }
    });
    // The async runtime is done: the trace exporter's blocking flush may run now.
    traces.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The node name of `vz-kubelet run` (its `--node-name`, else the host name, lowercased, as
/// `run` resolves it), for the trace resource; none for other subcommands.
fn run_node_name(matches: &clap::ArgMatches) -> Option<String> {
    let run = matches.subcommand_matches("run")?;
    match run.get_one::<String>("node_name") {
        Some(n) => Some(n.clone()),
        None => nix::unistd::gethostname()
            .ok()
            .map(|h| h.to_string_lossy().to_lowercase()),
    }
}
