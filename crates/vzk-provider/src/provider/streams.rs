//! `kubectl logs/exec/attach/port-forward` and stats: the VM's over its console and SSH,
//! side-cars' through Docker.

use std::time::Instant;

use async_trait::async_trait;
use chrono::Utc;
use vzk_core::stats::{ContainerStats, CpuStats, MemoryStats, PodReference, PodStats};
use vzk_core::streams::{AttachIo, ContainerRef, ExitStatus, LogOptions, LogStream, PortStream};
use vzk_core::{PodKey, ProviderError, StreamingRuntime};

use crate::pod::{detached, lock};

use super::*;

#[async_trait]
impl StreamingRuntime for VmProvider {
    async fn logs(
        &self,
        target: &ContainerRef,
        opts: &LogOptions,
    ) -> Result<LogStream, ProviderError> {
        if let Some(e) = self.sidecar_entry(target) {
            return crate::sidecars::logs(&self.inner, &e, &target.container, opts).await;
        }
        let e = self.entry(target)?;
        if opts.previous {
            // The previous boot has ended: nothing to follow.
            let ended = tokio_util::sync::CancellationToken::new();
            ended.cancel();
            return crate::logs::console_logs(e.previous_console_log(), opts.clone(), ended)
                .await
                .map_err(|err| match err.kind() {
                    std::io::ErrorKind::NotFound => ProviderError::NotFound(format!(
                        "previous terminated container {:?} of pod {}: the VM has not been booted again",
                        e.container, e.key
                    )),
                    _ => ProviderError::failed("ReadLogsFailed", err.to_string()),
                });
        }
        crate::logs::console_logs(e.console_log(), opts.clone(), e.ended.clone())
            .await
            .map_err(|err| match err.kind() {
                std::io::ErrorKind::NotFound => ProviderError::NotFound(format!(
                    "console log of {} (VM not started yet)",
                    e.key
                )),
                _ => ProviderError::failed("ReadLogsFailed", err.to_string()),
            })
    }

    async fn exec(
        &self,
        target: &ContainerRef,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, ProviderError> {
        if let Some(e) = self.sidecar_entry(target) {
            return crate::sidecars::exec(&self.inner, &e, &target.container, command, io).await;
        }
        let e = self.entry(target)?;
        let s = Self::session(&e)?;
        detached(async move { s.exec(&command, io).await })
            .await
            .map_err(vzk_guest::GuestError::into_provider_error)
    }

    async fn attach(
        &self,
        target: &ContainerRef,
        io: AttachIo,
    ) -> Result<ExitStatus, ProviderError> {
        if let Some(e) = self.sidecar_entry(target) {
            return crate::sidecars::attach(&self.inner, &e, &target.container, io).await;
        }
        let e = self.entry(target)?;
        let s = Self::session(&e)?;
        detached(async move { s.shell(&[], io).await })
            .await
            .map_err(vzk_guest::GuestError::into_provider_error)
    }

    async fn port_forward(
        &self,
        pod: &PodKey,
        port: u16,
        stream: PortStream,
    ) -> Result<(), ProviderError> {
        let e = lock(&self.inner.pods)
            .values()
            .find(|e| {
                e.key.namespace == pod.namespace
                    && e.key.name == pod.name
                    && (pod.uid.is_empty() || pod.uid == e.key.uid)
            })
            .cloned()
            .ok_or_else(|| ProviderError::NotFound(pod.to_string()))?;
        // VM first; a port only a side-car declares goes to that side-car.
        if let Some(name) = crate::sidecars::port_owner(&e, port) {
            return crate::sidecars::port_forward(&self.inner, &e, &name, port, stream).await;
        }
        let s = Self::session(&e)?;
        detached(async move { s.forward_tcp(port, stream).await })
            .await
            .map(|_| ())
            .map_err(vzk_guest::GuestError::into_provider_error)
    }

    async fn pod_stats(&self) -> Result<Vec<PodStats>, ProviderError> {
        let entries: Vec<_> = lock(&self.inner.pods).values().cloned().collect();
        let now = Utc::now();
        let mut out = Vec::new();
        for e in entries.iter().cloned() {
            let Some(vm) = e.vm() else { continue };
            let Some(u) = vm.host_usage() else {
                continue;
            };
            let nano_cores = {
                let mut samples = lock(&self.inner.cpu_samples);
                let t = Instant::now();
                let prev = samples.insert(e.key.uid.clone(), (t, u.cpu_ns));
                prev.and_then(|(pt, pns)| {
                    let dt = t.duration_since(pt).as_nanos();
                    (dt > 0).then(|| {
                        let used = u128::from(u.cpu_ns.saturating_sub(pns));
                        u64::try_from(used * 1_000_000_000 / dt).unwrap_or(u64::MAX)
                    })
                })
            };
            let cpu = CpuStats {
                time: now,
                usage_nano_cores: nano_cores,
                usage_core_nano_seconds: Some(u.cpu_ns),
            };
            let memory = MemoryStats {
                time: now,
                available_bytes: None,
                usage_bytes: Some(u.rss_bytes),
                working_set_bytes: Some(u.rss_bytes),
                rss_bytes: Some(u.rss_bytes),
                page_faults: None,
                major_page_faults: None,
            };
            let start = chrono::DateTime::parse_from_rfc3339(&e.start_time.0.to_string())
                .ok()
                .map(|t| t.with_timezone(&Utc));
            out.push(PodStats {
                pod_ref: PodReference {
                    name: e.key.name.clone(),
                    namespace: e.key.namespace.clone(),
                    uid: e.key.uid.clone(),
                },
                start_time: start,
                containers: vec![ContainerStats {
                    name: e.container.clone(),
                    start_time: start,
                    cpu: Some(cpu.clone()),
                    memory: Some(memory.clone()),
                    rootfs: None,
                    logs: None,
                }],
                cpu: Some(cpu),
                memory: Some(memory),
                network: None,
                ephemeral_storage: None,
            });
        }
        crate::sidecars::add_stats(&self.inner, &entries, &mut out).await;
        Ok(out)
    }
}
