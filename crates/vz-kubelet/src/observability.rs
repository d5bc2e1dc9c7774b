//! Logging set-up: the only place a tracing subscriber is installed.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging flags shared by all subcommands.
#[derive(Debug, Args)]
pub(crate) struct LogArgs {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,vzk_node=debug`).
    #[arg(long, global = true, env = "VZK_LOG", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "VZK_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

pub(crate) fn init(args: &LogArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
