//! Logs, exec, attach, port-forward and stats of side-cars, through Docker.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use tracing::warn;
use vzk_core::ProviderError;
use vzk_core::stats::PodStats;
use vzk_core::streams::{AttachIo, ExitStatus, LogOptions, LogStream, PortStream};
use vzk_docker::DockerError;

use crate::engine::ContainerEngine;

use crate::pod::{PodEntry, error_chain, lock};
use crate::provider::Inner;

pub(super) fn to_provider(e: DockerError) -> ProviderError {
    match e {
        DockerError::NotFound(m) => ProviderError::NotFound(format!("container {m}")),
        DockerError::NotRunning(m) => ProviderError::invalid(
            "ContainerNotRunning",
            format!("container {m} is not running"),
        ),
        DockerError::Unreachable { .. } => ProviderError::Unavailable {
            message: error_chain(&e),
            retry_after: Some(Duration::from_secs(5)),
        },
        other => ProviderError::failed(other.reason(), error_chain(&other)),
    }
}

/// Whether `name` is a side-car of `e`.
pub(crate) fn is_sidecar(e: &PodEntry, name: &str) -> bool {
    e.sidecars.is_sidecar(name)
}

pub(super) async fn target(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    previous: bool,
) -> Result<(Arc<dyn ContainerEngine>, String), ProviderError> {
    let rt = inner
        .sidecars
        .connected()
        .ok_or_else(|| ProviderError::Unavailable {
            message: format!(
                "Docker is not available on this node: {}",
                lock(&inner.sidecars.unavailable)
            ),
            retry_after: Some(Duration::from_secs(5)),
        })?;
    let (id, prev) = e
        .sidecars
        .ids(name)
        .ok_or_else(|| ProviderError::NotFound(format!("container {name} of pod {}", e.key)))?;
    let id = if previous { prev } else { id };
    let id = id.ok_or_else(|| {
        if previous {
            ProviderError::NotFound(format!(
                "previous terminated container {name} of pod {}",
                e.key
            ))
        } else {
            ProviderError::Unavailable {
                message: format!("container {name} of pod {} is not created yet", e.key),
                retry_after: Some(Duration::from_secs(2)),
            }
        }
    })?;
    Ok((rt, id))
}

/// `kubectl logs` of a side-car.
pub(crate) async fn logs(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    opts: &LogOptions,
) -> Result<LogStream, ProviderError> {
    let (rt, id) = target(inner, e, name, opts.previous).await?;
    rt.logs(&id, opts).await.map_err(to_provider)
}

/// `kubectl exec` into a side-car.
pub(crate) async fn exec(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    command: Vec<String>,
    io: AttachIo,
) -> Result<ExitStatus, ProviderError> {
    let (rt, id) = target(inner, e, name, false).await?;
    rt.exec(&id, command, io).await.map_err(to_provider)
}

/// `kubectl attach` to a side-car.
pub(crate) async fn attach(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    io: AttachIo,
) -> Result<ExitStatus, ProviderError> {
    let (rt, id) = target(inner, e, name, false).await?;
    rt.attach(&id, io).await.map_err(to_provider)
}

/// The side-car (or native side-car) that should receive a port-forward to `port`: one
/// declaring the port when container 0 does not.
pub(crate) fn port_owner(e: &PodEntry, port: u16) -> Option<String> {
    let cs = &e.pod.spec.as_ref()?.containers;
    let declares = |c: &Container| {
        c.ports
            .iter()
            .flatten()
            .any(|p| p.container_port == i32::from(port))
    };
    if cs.first().is_some_and(declares) {
        return None;
    }
    crate::init::docker_containers(&e.pod)
        .find(|c| declares(c))
        .map(|c| c.name.clone())
}

/// `kubectl port-forward` to a side-car's port.
pub(crate) async fn port_forward(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    port: u16,
    stream: PortStream,
) -> Result<(), ProviderError> {
    let (rt, id) = target(inner, e, name, false).await?;
    rt.port_forward(&id, port, stream)
        .await
        .map_err(to_provider)
}

/// Adds side-car stats to `out` (creating the pod's entry when the VM has none) and
/// to the pod totals.
pub(crate) async fn add_stats(inner: &Inner, entries: &[Arc<PodEntry>], out: &mut Vec<PodStats>) {
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    for e in entries {
        let running: Vec<(String, String)> = lock(&e.sidecars.slots)
            .iter()
            .filter(|s| {
                s.status
                    .state
                    .as_ref()
                    .is_some_and(|st| st.running.is_some())
            })
            .filter_map(|s| Some((s.status.name.clone(), s.id.clone()?)))
            .collect();
        if running.is_empty() {
            continue;
        }
        let idx = match out.iter().position(|p| p.pod_ref.uid == e.key.uid) {
            Some(i) => i,
            None => {
                out.push(PodStats {
                    pod_ref: vzk_core::stats::PodReference {
                        name: e.key.name.clone(),
                        namespace: e.key.namespace.clone(),
                        uid: e.key.uid.clone(),
                    },
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        for (name, id) in running {
            let cs = match rt.stats(&id, &name).await {
                Ok(s) => s,
                Err(err) => {
                    warn!(pod = %e.key, container = %name, error = %error_chain(&err), "side-car stats");
                    continue;
                }
            };
            let p = &mut out[idx];
            if let Some(c) = &cs.cpu {
                let tot = p.cpu.get_or_insert_with(|| vzk_core::stats::CpuStats {
                    time: c.time,
                    ..Default::default()
                });
                tot.usage_nano_cores = sum(tot.usage_nano_cores, c.usage_nano_cores);
                tot.usage_core_nano_seconds =
                    sum(tot.usage_core_nano_seconds, c.usage_core_nano_seconds);
            }
            if let Some(m) = &cs.memory {
                let tot = p
                    .memory
                    .get_or_insert_with(|| vzk_core::stats::MemoryStats {
                        time: m.time,
                        ..Default::default()
                    });
                tot.usage_bytes = sum(tot.usage_bytes, m.usage_bytes);
                tot.working_set_bytes = sum(tot.working_set_bytes, m.working_set_bytes);
                tot.rss_bytes = sum(tot.rss_bytes, m.rss_bytes);
            }
            p.containers.push(cs);
        }
    }
}

pub(super) fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.saturating_add(y)),
        (x, None) => x,
        (None, y) => y,
    }
}
