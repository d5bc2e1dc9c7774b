//! `kubectl top pod` through metrics-server v0.9: the provider's container figures, served
//! on `/metrics/resource`, reach kubectl through the API server's aggregation layer.

use std::time::{Duration, Instant};

use chrono::Utc;
use vzk_core::stats::{ContainerStats, CpuStats, MemoryStats, PodReference, PodStats};

use crate::support::{self, Opts};

/// What the provider double reports for container `vm`: a steady 250 millicores, 77 MiB.
const CPU_NANOS_PER_SEC: u64 = 250_000_000;
const WORKING_SET: u64 = 77 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_top_pod_shows_the_providers_container_figures() {
    let h = support::start(
        "kapi-top",
        Opts {
            metrics_server: true,
            ..Opts::default()
        },
    )
    .await;
    // Fresh figures every second, as a provider reading /proc would give: cumulative CPU
    // growing at 250m, stamped with the time they were read.
    let (runtime, ns, pod) = (h.runtime.clone(), h.ns.clone(), h.pod.clone());
    let started = Utc::now();
    let feeder = tokio::spawn(async move {
        loop {
            let now = Utc::now();
            let elapsed =
                u64::try_from((now - started).num_nanoseconds().unwrap_or(0)).unwrap_or(0);
            // 1 s of CPU before the first read (metrics-server drops a zero counter).
            let used = 1_000_000_000 + elapsed / 1_000 * (CPU_NANOS_PER_SEC / 1_000_000);
            let cpu = CpuStats {
                time: now,
                usage_nano_cores: Some(CPU_NANOS_PER_SEC),
                usage_core_nano_seconds: Some(used),
            };
            let memory = MemoryStats {
                time: now,
                working_set_bytes: Some(WORKING_SET),
                ..Default::default()
            };
            let stats = PodStats {
                pod_ref: PodReference {
                    name: pod.clone(),
                    namespace: ns.clone(),
                    uid: "u-top".into(),
                },
                start_time: Some(started),
                containers: vec![ContainerStats {
                    name: "vm".into(),
                    start_time: Some(started),
                    cpu: Some(cpu.clone()),
                    memory: Some(memory.clone()),
                    ..Default::default()
                }],
                cpu: Some(cpu),
                memory: Some(memory),
                ..Default::default()
            };
            if let Ok(mut s) = runtime.stats.lock() {
                *s = vec![stats];
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    // metrics-server needs two scrapes (10 s apart) before it has a rate.
    let deadline = Instant::now() + Duration::from_secs(90);
    let row = loop {
        let out = h
            .kubectl()
            .args(["top", "pod", &h.pod, "--containers", "--no-headers"])
            .output()
            .await
            .expect("kubectl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success()
            && let Some(line) = stdout.lines().find(|l| {
                let mut c = l.split_whitespace();
                c.next() == Some(h.pod.as_str()) && c.next() == Some("vm")
            })
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "kubectl top pod {}: no row for container vm within 90 s; last answer: {stdout}{}\n---- metrics-server log ----\n{}",
            h.pod,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(h.cp.metrics_server_log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    feeder.abort();

    // POD  NAME  CPU(cores)  MEMORY(bytes)
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols.len() >= 4, "row {row:?}");
    let millis: u64 = cols[2]
        .strip_suffix('m')
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("CPU {:?} in {row:?}", cols[2]));
    assert!(
        (240..=260).contains(&millis),
        "CPU {millis}m, the provider reports 250m: {row:?}"
    );
    assert_eq!(cols[3], "77Mi", "memory in {row:?}");
    eprintln!("kubectl top pod --containers: {row}");
}
