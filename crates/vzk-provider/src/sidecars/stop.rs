//! Stopping a pod's side-cars within its grace period, and removing our leftovers.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Container;
use tracing::{info, warn};
use vzk_core::PodEvent;
use vzk_core::streams::AttachIo;

use crate::pod::{PodEntry, error_chain, lock};
use crate::provider::Inner;

/// Stops the pod's side-car and init containers by `deadline` (preStop, graceful stop,
/// then force). The pod's tasks must have returned already ([`PodEntry::cancel_tasks`]).
pub(crate) async fn stop_all(inner: Arc<Inner>, e: Arc<PodEntry>, deadline: tokio::time::Instant) {
    if lock(&e.sidecars.slots).is_empty() {
        return;
    }
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    let containers: Vec<Container> = crate::init::docker_containers(&e.pod).cloned().collect();
    let stops = containers.into_iter().filter_map(|c| {
        let (id, _) = e.sidecars.ids(&c.name)?;
        let id = id?;
        let (rt, inner, e) = (rt.clone(), inner.clone(), e.clone());
        Some(async move {
            match rt.inspect(&id).await {
                Ok(st) if st.is_running() => {}
                _ => return,
            }
            inner.container_event(&e, &c.name, PodEvent::normal("Killing", format!("Stopping container {}", c.name)));
            if let Some(cmd) = c
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|x| x.command.clone())
            {
                let sink = AttachIo {
                    stdin: None,
                    stdout: Some(Box::pin(tokio::io::sink())),
                    stderr: Some(Box::pin(tokio::io::sink())),
                    tty: false,
                    resize: None,
                };
                match tokio::time::timeout_at(deadline, rt.exec(&id, cmd, sink)).await {
                    Ok(Ok(st)) if st.success() => {}
                    Ok(Ok(st)) => inner.container_event(&e, &c.name,
                        PodEvent::warning("FailedPreStopHook", format!("PreStopHook of {} exited with {}", c.name, st.code)),
                    ),
                    Ok(Err(err)) => inner.container_event(&e, &c.name,
                        PodEvent::warning("FailedPreStopHook", format!("PreStopHook of {}: {}", c.name, error_chain(&err))),
                    ),
                    Err(_) => inner.container_event(&e, &c.name,
                        PodEvent::warning("FailedPreStopHook", format!("PreStopHook of {} did not finish within the grace period", c.name)),
                    ),
                }
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Err(err) = rt.stop(&id, remaining).await {
                warn!(pod = %e.key, container = %c.name, error = %error_chain(&err), "stopping side-car");
            }
        })
    });
    futures::future::join_all(stops).await;
    remove_all(&inner, &e).await;
}

pub(super) async fn remove_all(inner: &Inner, e: &PodEntry) {
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    match rt.list_ours(Some(&e.key.uid)).await {
        Ok(list) => {
            for c in list {
                if let Err(err) = rt.remove(&c.id).await {
                    let msg = format!("removing container {}: {}", c.name, error_chain(&err));
                    warn!(pod = %e.key, error = %msg, "side-car cleanup incomplete");
                    inner.container_event(e, &c.name, PodEvent::warning("FailedKillPod", msg));
                }
            }
        }
        Err(err) => warn!(pod = %e.key, error = %error_chain(&err), "listing side-cars to remove"),
    }
}

/// Removes side-car containers of this node whose pod the provider does not run.
pub(crate) async fn cleanup_leftovers(inner: &Inner) {
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    let known: Vec<String> = lock(&inner.pods).keys().cloned().collect();
    match rt.cleanup(&known).await {
        Ok(removed) if !removed.is_empty() => info!(?removed, "removed leftover side-cars"),
        Ok(_) => {}
        Err(err) => warn!(error = %error_chain(&err), "side-car leftover cleanup"),
    }
}
