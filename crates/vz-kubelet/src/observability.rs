//! Logging and trace set-up: the only place a tracing subscriber is installed.
//!
//! Traces are off unless `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) names an
//! OTLP/HTTP collector: then the agent's own spans (`vzk*` and `vz_kubelet` targets, at
//! info and above, whatever `--log-level` says) are exported with a batch exporter as
//! service `vz-kubelet`, and [`Tracing::shutdown`] flushes them at exit. Without an
//! endpoint no exporter exists and the spans cost what they cost before.

use clap::{Args, ValueEnum};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

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
    /// Export traces (one per pod start, its phases as spans) over OTLP/HTTP (JSON) to
    /// this collector base URL, e.g. `http://127.0.0.1:4318` (`/v1/traces` is appended).
    /// Off when unset.
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    otlp_endpoint: Option<String>,
}

/// What [`init`] installed that must be flushed at exit.
pub(crate) struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports the spans still queued and stops the exporter (blocking: call it outside
    /// the async runtime).
    pub(crate) fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing traces: {e}");
        }
    }
}

/// Installs the log subscriber and, with an OTLP endpoint, the trace exporter; `node`
/// (the node name of `vz-kubelet run`) becomes the resource attribute `k8s.node.name`.
pub(crate) fn init(args: &LogArgs, node: Option<&str>) -> anyhow::Result<Tracing> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", args.log_level))?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match args.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let provider = match args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(tracer_provider(endpoint, node)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("vz-kubelet"))
            .with_filter(
                Targets::new()
                    .with_target("vzk", LevelFilter::INFO)
                    .with_target("vz_kubelet", LevelFilter::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(Tracing { provider })
}

/// An OTLP/HTTP batch exporter to `endpoint` (a base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`).
fn tracer_provider(endpoint: &str, node: Option<&str>) -> anyhow::Result<SdkTracerProvider> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(&url)
        .build()
        .map_err(|e| anyhow::anyhow!("invalid --otlp-endpoint {endpoint:?}: {e}"))?;
    let mut resource = Resource::builder().with_service_name("vz-kubelet");
    if let Some(node) = node {
        resource = resource.with_attribute(KeyValue::new("k8s.node.name", node.to_owned()));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}
