//! CPU and memory of a container, as the kubelet's summary API reports them.

use std::time::Instant;

use bollard::query_parameters::StatsOptionsBuilder;
use chrono::Utc;
use futures::StreamExt as _;
use vzk_core::stats::{ContainerStats, CpuStats, MemoryStats};

use crate::runtime::lock;
use crate::{DockerError, RunState, SidecarRuntime};

impl SidecarRuntime {
    /// CPU and memory of the container (`name` is the Kubernetes container name).
    /// `usageNanoCores` is the average since the previous call for this container.
    pub async fn stats(&self, id: &str, name: &str) -> Result<ContainerStats, DockerError> {
        let opts = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let s = self
            .docker
            .stats(id, Some(opts))
            .next()
            .await
            .ok_or_else(|| DockerError::NotFound(id.to_owned()))?
            .map_err(|e| DockerError::api("stats", id, e))?;
        let now = Utc::now();
        let cpu_ns = s
            .cpu_stats
            .as_ref()
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage);
        let nano_cores = cpu_ns.and_then(|ns| {
            let t = Instant::now();
            let prev = lock(&self.cpu_samples).insert(id.to_owned(), (t, ns));
            prev.and_then(|(pt, pns)| {
                let dt = t.duration_since(pt).as_nanos();
                (dt > 0).then(|| {
                    let used = u128::from(ns.saturating_sub(pns));
                    u64::try_from(used * 1_000_000_000 / dt).unwrap_or(u64::MAX)
                })
            })
        });
        let mem = s.memory_stats.as_ref();
        let usage = mem.and_then(|m| m.usage);
        let stat = |k: &str| {
            mem.and_then(|m| m.stats.as_ref())
                .and_then(|s| s.get(k).copied())
        };
        // The kubelet's working set: usage minus inactive file pages (cgroup v2 / v1 keys).
        let inactive = stat("inactive_file").or_else(|| stat("total_inactive_file"));
        let working_set = usage.map(|u| u.saturating_sub(inactive.unwrap_or(0)));
        let rss = stat("anon")
            .or_else(|| stat("rss"))
            .or_else(|| stat("total_rss"));
        let started = self
            .inspect(id)
            .await
            .ok()
            .and_then(|st| match st.status {
                RunState::Running { started_at } => started_at,
                _ => None,
            })
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t.to_string()).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(ContainerStats {
            name: name.to_owned(),
            start_time: started,
            cpu: Some(CpuStats {
                time: now,
                usage_nano_cores: nano_cores,
                usage_core_nano_seconds: cpu_ns,
            }),
            memory: Some(MemoryStats {
                time: now,
                available_bytes: mem
                    .and_then(|m| m.limit)
                    .zip(working_set)
                    .map(|(l, w)| l.saturating_sub(w)),
                usage_bytes: usage,
                working_set_bytes: working_set,
                rss_bytes: rss,
                page_faults: stat("pgfault"),
                major_page_faults: stat("pgmajfault"),
            }),
            rootfs: None,
            logs: None,
        })
    }
}
