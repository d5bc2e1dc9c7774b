//! `/stats/summary` (stats/v1alpha1 JSON) and `/metrics/resource` (the Prometheus text
//! metrics-server scrapes: node_/container_/pod_ CPU and memory with timestamps).

use std::fmt::Write as _;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use vzk_core::stats::{NodeStats, Summary};

use crate::error::ApiError;
use crate::server::AppState;

async fn summary(st: &AppState) -> Result<Summary, ApiError> {
    let pods = st.runtime.pod_stats().await.map_err(ApiError::Provider)?;
    let (cpu, memory) = crate::host::host_usage(Utc::now());
    Ok(Summary {
        node: NodeStats {
            node_name: st.node_name.clone(),
            start_time: Some(st.started),
            cpu,
            memory,
            ..Default::default()
        },
        pods,
    })
}

pub(crate) async fn stats_summary(State(st): State<AppState>) -> Result<Json<Summary>, ApiError> {
    Ok(Json(summary(&st).await?))
}

pub(crate) async fn metrics_resource(State(st): State<AppState>) -> Result<Response, ApiError> {
    let s = summary(&st).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_resource_metrics(&s),
    )
        .into_response())
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} [STABLE] {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders a summary as the kubelet's `/metrics/resource` text.
pub(crate) fn render_resource_metrics(s: &Summary) -> String {
    let mut out = String::new();
    let secs = |ns: u64| ns as f64 / 1e9;
    family(
        &mut out,
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
    );
    if let Some(c) = &s.node.cpu
        && let Some(ns) = c.usage_core_nano_seconds
    {
        let _ = writeln!(
            out,
            "node_cpu_usage_seconds_total {} {}",
            secs(ns),
            c.time.timestamp_millis()
        );
    }
    family(
        &mut out,
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
    );
    if let Some(m) = &s.node.memory
        && let Some(ws) = m.working_set_bytes
    {
        let _ = writeln!(
            out,
            "node_memory_working_set_bytes {ws} {}",
            m.time.timestamp_millis()
        );
    }
    family(
        &mut out,
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
    );
    for p in &s.pods {
        for c in &p.containers {
            if let Some(cpu) = &c.cpu
                && let Some(ns) = cpu.usage_core_nano_seconds
            {
                let _ = writeln!(
                    out,
                    "container_cpu_usage_seconds_total{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {} {}",
                    esc(&c.name),
                    esc(&p.pod_ref.namespace),
                    esc(&p.pod_ref.name),
                    secs(ns),
                    cpu.time.timestamp_millis()
                );
            }
        }
    }
    family(
        &mut out,
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
    );
    for p in &s.pods {
        for c in &p.containers {
            if let Some(m) = &c.memory
                && let Some(ws) = m.working_set_bytes
            {
                let _ = writeln!(
                    out,
                    "container_memory_working_set_bytes{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {ws} {}",
                    esc(&c.name),
                    esc(&p.pod_ref.namespace),
                    esc(&p.pod_ref.name),
                    m.time.timestamp_millis()
                );
            }
        }
    }
    family(
        &mut out,
        "container_start_time_seconds",
        "gauge",
        "Start time of the container since unix epoch in seconds",
    );
    for p in &s.pods {
        for c in &p.containers {
            if let Some(t) = c.start_time {
                let _ = writeln!(
                    out,
                    "container_start_time_seconds{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {}",
                    esc(&c.name),
                    esc(&p.pod_ref.namespace),
                    esc(&p.pod_ref.name),
                    t.timestamp()
                );
            }
        }
    }
    family(
        &mut out,
        "pod_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
    );
    for p in &s.pods {
        if let Some(cpu) = &p.cpu
            && let Some(ns) = cpu.usage_core_nano_seconds
        {
            let _ = writeln!(
                out,
                "pod_cpu_usage_seconds_total{{namespace=\"{}\",pod=\"{}\"}} {} {}",
                esc(&p.pod_ref.namespace),
                esc(&p.pod_ref.name),
                secs(ns),
                cpu.time.timestamp_millis()
            );
        }
    }
    family(
        &mut out,
        "pod_memory_working_set_bytes",
        "gauge",
        "Current working set of the pod in bytes",
    );
    for p in &s.pods {
        if let Some(m) = &p.memory
            && let Some(ws) = m.working_set_bytes
        {
            let _ = writeln!(
                out,
                "pod_memory_working_set_bytes{{namespace=\"{}\",pod=\"{}\"}} {ws} {}",
                esc(&p.pod_ref.namespace),
                esc(&p.pod_ref.name),
                m.time.timestamp_millis()
            );
        }
    }
    family(
        &mut out,
        "scrape_error",
        "gauge",
        "1 if there was an error while getting container metrics, 0 otherwise",
    );
    out.push_str("scrape_error 0\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vzk_core::stats::{ContainerStats, CpuStats, MemoryStats, PodReference, PodStats};

    #[test]
    fn resource_metrics_have_the_series_metrics_server_reads() {
        let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("valid");
        let s = Summary {
            node: NodeStats {
                node_name: "n".into(),
                cpu: Some(CpuStats {
                    time: t,
                    usage_nano_cores: None,
                    usage_core_nano_seconds: Some(2_500_000_000),
                }),
                memory: Some(MemoryStats {
                    time: t,
                    working_set_bytes: Some(1024),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pods: vec![PodStats {
                pod_ref: PodReference {
                    name: "p".into(),
                    namespace: "ns".into(),
                    uid: "u".into(),
                },
                containers: vec![ContainerStats {
                    name: "vm".into(),
                    cpu: Some(CpuStats {
                        time: t,
                        usage_nano_cores: None,
                        usage_core_nano_seconds: Some(1_000_000_000),
                    }),
                    memory: Some(MemoryStats {
                        time: t,
                        working_set_bytes: Some(77),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let text = render_resource_metrics(&s);
        assert!(
            text.contains("node_cpu_usage_seconds_total 2.5 1700000000000\n"),
            "{text}"
        );
        assert!(text.contains("node_memory_working_set_bytes 1024 1700000000000\n"));
        assert!(text.contains("container_cpu_usage_seconds_total{container=\"vm\",namespace=\"ns\",pod=\"p\"} 1 1700000000000\n"));
        assert!(text.contains("container_memory_working_set_bytes{container=\"vm\",namespace=\"ns\",pod=\"p\"} 77 1700000000000\n"));
        assert!(text.contains("# TYPE container_cpu_usage_seconds_total counter\n"));
        assert!(text.ends_with("scrape_error 0\n"));
    }
}
