//! `vz-kubelet`: a Kubernetes node agent that runs virtual machines as pods.
//!
//! The binary is thin: it parses flags, installs logging and the TLS crypto provider,
//! runs one subcommand and prints any error chain once.

mod cmd;
mod memory;
mod observability;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    let cli = Cli::parse();
    if let Err(e) = observability::init(&cli.log) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    // One rustls crypto provider for the whole process (kube, the kubelet API, registries).
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
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
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
