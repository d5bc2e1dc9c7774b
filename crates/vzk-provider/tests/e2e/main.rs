//! End to end: the VM provider inside the real node runtime (node + pod controllers as
//! `system:node:<name>` against a real kube-apiserver), a real `docker-registry` on
//! loopback holding the test guest as a VM image, and QEMU (TCG) VMs whose network
//! lives in a namespace the test creates.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod init;
mod lazy;
mod probes;
mod sidecars;
mod snapshot;
mod support;
mod volumes;

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vzk_core::streams::{ContainerRef, LogOptions};
use vzk_core::{NodeProvider as _, PodKey, PodLifecycle as _, StreamingRuntime as _};
use vzk_provider::{VM_RESOURCE, VmProvider};

use support::*;

const BOOT: Duration = Duration::from_secs(150);

fn vm_pod(name: &str, node: &str, image: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "nodeName": node,
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{
                "name": "vm", "image": image, "imagePullPolicy": "IfNotPresent",
                "resources": { "requests": { "cpu": "1", "memory": "256Mi" } },
                "lifecycle": { "preStop": { "exec": { "command": ["sh", "-c", "echo prestop-ran > /dev/console"] } } }
            }]
        }
    }))
    .unwrap()
}

fn container(ns: &str, pod: &str) -> ContainerRef {
    ContainerRef {
        namespace: ns.into(),
        pod: pod.into(),
        uid: None,
        container: "vm".into(),
    }
}

fn waiting_reason(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn exec(provider: &VmProvider, ns: &str, pod: &str, script: &str) -> (i32, String) {
    let sh = ["sh", "-c", script];
    exec_argv(provider, &container(ns, pod), &sh).await.unwrap()
}

/// The guest's boot id (`/proc/sys/kernel/random/boot_id`), or `None` while exec fails.
async fn boot_id(provider: &VmProvider, ns: &str, pod: &str) -> Option<String> {
    let cat = ["cat", "/proc/sys/kernel/random/boot_id"];
    let (code, out) = exec_argv(provider, &container(ns, pod), &cat).await.ok()?;
    let id = out.trim().to_owned();
    (code == 0 && !id.is_empty()).then_some(id)
}

/// Polls pod `name` until `ok` holds for it; on timeout panics showing its last status.
async fn wait_pod(
    pods: &Api<Pod>,
    name: &str,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&Pod) -> bool,
) -> Pod {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let p = pods.get(name).await.ok();
        if let Some(p) = p.as_ref().filter(|p| ok(p)) {
            return p.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; status of {name}: {:#?}",
            p.and_then(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Container 0's `restartCount` and `lastState.terminated`.
fn vm_history(
    p: &Pod,
) -> (
    i32,
    Option<k8s_openapi::api::core::v1::ContainerStateTerminated>,
) {
    let cs = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first());
    (
        cs.map_or(0, |c| c.restart_count),
        cs.and_then(|c| c.last_state.as_ref())
            .and_then(|s| s.terminated.clone()),
    )
}

/// One pod at a time (1 VM slot): the second waits with a visible reason; the first
/// boots to Running/Ready with the VM's IP, serves exec (exit code kept), logs (boot
/// console), port-forward (sshd banner) and stats; its VM restarts once (the guest
/// powers off) and then survives an agent restart, re-adopted (same QEMU, same boot)
/// with its restartCount and lastState; it is deleted with grace leaving no QEMU, TAP
/// or disk; then the second starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_pod_lifecycle_streams_slots_restart_and_clean_deletion() {
    let env = TestNode::start("vmp", |_| {}).await;
    let image = env.push_guest("test-guest", "").await;
    let TestNode {
        ns,
        pods,
        events,
        agent,
        provider,
        provider_args,
        node,
        id,
        netns,
        data,
        ..
    } = env;
    let cap = provider.capacity().await.unwrap();
    assert_eq!(cap.get("pods").map(|q| q.0.as_str()), Some("1"));
    assert_eq!(cap.get(VM_RESOURCE).map(|q| q.0.as_str()), Some("1"));
    let a = pods
        .create(&PostParams::default(), &vm_pod("a", &node, &image))
        .await
        .unwrap();
    let a_uid = a.metadata.uid.clone().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = pods
        .create(&PostParams::default(), &vm_pod("b", &node, &image))
        .await
        .unwrap();
    let b_uid = b.metadata.uid.clone().unwrap();

    // The second pod waits for the only VM slot, visibly.
    wait_for(Duration::from_secs(60), "b WaitingForVMSlot", || async {
        let p = pods.get("b").await.ok()?;
        (waiting_reason(&p).as_deref() == Some("WaitingForVMSlot")).then_some(())
    })
    .await;

    // The first boots to Running and Ready with the VM's IP (inside the test's netns).
    let a_pod = wait_for(BOOT, "a Ready", || async {
        let p = pods.get("a").await.ok()?;
        is_ready(&p).then_some(p)
    })
    .await;
    let st = a_pod.status.clone().unwrap();
    assert_eq!(st.phase.as_deref(), Some("Running"));
    let ip = st.pod_ip.clone().unwrap();
    assert!(
        ip.starts_with("10.213.0."),
        "pod IP {ip} from the NAT network"
    );
    let b = pods.get("b").await.unwrap();
    assert_eq!(
        waiting_reason(&b).as_deref(),
        Some("WaitingForVMSlot"),
        "b still waits while a runs"
    );

    // Events of the start.
    let reasons = wait_for(Duration::from_secs(20), "start events", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let r: Vec<String> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|o| o.name.as_deref()) == Some("a"))
            .filter_map(|e| e.reason.clone())
            .collect();
        ["Pulling", "Pulled", "Created", "Started"]
            .iter()
            .all(|x| r.iter().any(|y| y == x))
            .then_some(r)
    })
    .await;
    assert!(!reasons.iter().any(|r| r == "Failed"), "{reasons:?}");

    // exec: exit codes and output intact.
    let (code, out) = exec(&provider, &ns, "a", "echo hello-from-vm; exit 7").await;
    assert_eq!((code, out.trim()), (7, "hello-from-vm"));
    let (code, out) = exec(&provider, &ns, "a", "ip -4 addr show eth0").await;
    assert_eq!(code, 0);
    assert!(out.contains(&ip), "guest has the pod IP {ip}: {out}");

    // logs: the boot console, with tail and limits.
    let read = |opts: LogOptions| {
        let p = provider.clone();
        let ns = ns.clone();
        async move {
            let mut s = p.logs(&container(&ns, "a"), &opts).await.unwrap();
            let mut all = Vec::new();
            while let Some(c) = s.next().await {
                all.extend_from_slice(&c.unwrap());
            }
            String::from_utf8_lossy(&all).into_owned()
        }
    };
    let console = read(LogOptions::default()).await;
    assert!(console.contains("VZK-SSHD-START"), "console: {console}");
    let limited = read(LogOptions {
        limit_bytes: Some(10),
        ..Default::default()
    })
    .await;
    assert_eq!(limited.len(), 10);
    let tail = read(LogOptions {
        tail_lines: Some(1),
        timestamps: true,
        ..Default::default()
    })
    .await;
    assert_eq!(tail.lines().count(), 1, "{tail}");

    // port-forward to the guest's sshd.
    let (mut client, server) = tokio::io::duplex(4096);
    let key = PodKey {
        namespace: ns.clone(),
        name: "a".into(),
        uid: a_uid.clone(),
    };
    let p = provider.clone();
    let fwd = tokio::spawn(async move { p.port_forward(&key, 22, Box::pin(server)).await });
    let mut banner = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    client.shutdown().await.unwrap();
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(10), fwd).await;

    // stats from the host side.
    let stats = provider.pod_stats().await.unwrap();
    let s = stats.iter().find(|s| s.pod_ref.uid == a_uid).unwrap();
    assert!(
        s.memory.as_ref().and_then(|m| m.rss_bytes).unwrap_or(0) > 16 << 20,
        "QEMU RSS: {:?}",
        s.memory
    );
    assert!(
        s.cpu
            .as_ref()
            .and_then(|c| c.usage_core_nano_seconds)
            .unwrap_or(0)
            > 0
    );

    // The VM restarts once: the guest powers itself off and restartPolicy Always
    // (the default) boots it again at once, from the same disk clone.
    let vm_id = format!("vzk-{a_uid}");
    let first_boot = boot_id(&provider, &ns, "a").await.unwrap();
    let first_qemu = pids_with(&vm_id);
    assert!(!first_qemu.is_empty(), "QEMU of a runs");
    let t = std::time::Instant::now();
    let (code, _) = exec(
        &provider,
        &ns,
        "a",
        "(sleep 1; poweroff) </dev/null >/dev/null 2>&1 &",
    )
    .await;
    assert_eq!(code, 0, "poweroff scheduled in the guest");
    let rebooted = wait_pod(&pods, "a", BOOT, "a restarted once and Ready again", |p| {
        vm_history(p).0 >= 1 && is_ready(p)
    })
    .await;
    println!("VM restart (poweroff to Ready again): {:.1?}", t.elapsed());
    let (restarts, last) = vm_history(&rebooted);
    assert_eq!(restarts, 1, "{:#?}", rebooted.status);
    let last = last.unwrap_or_else(|| panic!("lastState.terminated: {:#?}", rebooted.status));
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (0, Some("Completed")),
        "the guest powered off on its own: {last:?}"
    );
    assert!(
        last.started_at.is_some() && last.finished_at.is_some(),
        "{last:?}"
    );
    assert_eq!(
        rebooted.status.as_ref().and_then(|s| s.pod_ip.clone()),
        Some(ip.clone()),
        "a VM restart keeps the pod IP"
    );
    let second_boot = wait_for(
        Duration::from_secs(60),
        "a exec after its VM restart",
        || boot_id(&provider, &ns, "a"),
    )
    .await;
    assert_ne!(first_boot, second_boot, "the guest booted again");
    let second_qemu = pids_with(&vm_id);
    assert!(!second_qemu.is_empty(), "QEMU of a runs again");
    assert_ne!(first_qemu, second_qemu, "a new QEMU process");

    // Agent restart: the VM keeps running and is re-adopted, with its restart history.
    let t = std::time::Instant::now();
    let provider = restart_provider(agent, provider, provider_args, &netns, &id).await;
    let listed = provider.list_pods().await.unwrap();
    let a_key = listed
        .iter()
        .find(|k| k.uid == a_uid)
        .unwrap_or_else(|| panic!("a re-adopted: {listed:?}"))
        .clone();
    // The new provider's own view (from its data dir), before its agent runs.
    let adopted = provider.pod_status(&a_key).await.unwrap().unwrap();
    let adopted_cs = adopted.container_statuses.as_ref().and_then(|c| c.first());
    assert_eq!(
        adopted_cs.map(|c| c.restart_count),
        Some(1),
        "restartCount after re-adoption: {adopted:#?}"
    );
    let adopted_last = adopted_cs
        .and_then(|c| c.last_state.as_ref())
        .and_then(|s| s.terminated.clone());
    assert_eq!(
        serde_json::to_value(&adopted_last).unwrap(),
        serde_json::to_value(Some(&last)).unwrap(),
        "lastState after re-adoption: {adopted:#?}"
    );
    let agent = Agent::start(&id, provider.clone()).await;
    let after = wait_for(Duration::from_secs(60), "a exec after restart", || {
        boot_id(&provider, &ns, "a")
    })
    .await;
    println!(
        "agent restart (stop to exec in the re-adopted VM): {:.1?}",
        t.elapsed()
    );
    assert_eq!(after, second_boot, "re-adopted, not booted again");
    assert_eq!(pids_with(&vm_id), second_qemu, "the same QEMU process");
    wait_pod(
        &pods,
        "a",
        Duration::from_secs(60),
        "a Ready after the agent restart",
        is_ready,
    )
    .await;
    // The status the new agent reports keeps the history (checked over a few status
    // periods, so a regression written by the new agent would show).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let p = pods.get("a").await.unwrap();
        let (restarts, now_last) = vm_history(&p);
        assert_eq!(
            restarts, 1,
            "restartCount after the agent restart: {:#?}",
            p.status
        );
        assert_eq!(
            serde_json::to_value(&now_last).unwrap(),
            serde_json::to_value(Some(&last)).unwrap(),
            "lastState after the agent restart: {:#?}",
            p.status
        );
    }
    let a_now = pods.get("a").await.unwrap();
    assert_eq!(
        a_now.status.as_ref().and_then(|s| s.pod_ip.clone()),
        Some(ip.clone()),
        "same IP after restart"
    );
    assert_eq!(a_now.metadata.uid.as_deref(), Some(a_uid.as_str()));

    // Deletion with grace: preStop, ACPI power-off, then nothing left behind.
    assert!(!pids_with(&vm_id).is_empty(), "QEMU of a runs");
    // The TAP the backend recorded for the VM (TAP names are scoped to the data dir).
    let taps = vzk_vm::qemu::statedir::StateDir::new(&data.join("qemu"), &vm_id).read_taps();
    let tap = taps.first().cloned().unwrap_or_default();
    assert!(!tap.is_empty(), "the VM's state dir records its TAP");
    assert!(netns.has_link(&tap), "TAP {tap} exists while a runs");
    delete_pod(&pods, "a", 20, Duration::from_secs(60)).await;
    assert!(pids_with(&vm_id).is_empty(), "no QEMU left for {vm_id}");
    assert!(!netns.has_link(&tap), "TAP {tap} removed");
    assert!(
        !data.join("pods").join(&a_uid).exists(),
        "pod dir (disk clone, console) removed"
    );
    assert!(
        !data.join("qemu/vms").join(&vm_id).exists(),
        "VM state dir removed"
    );
    let list = events.list(&ListParams::default()).await.unwrap();
    let a_events: Vec<_> = list
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|o| o.uid.as_deref()) == Some(a_uid.as_str()))
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(a_events.iter().any(|r| r == "Killing"), "{a_events:?}");
    assert!(
        !a_events
            .iter()
            .any(|r| r == "FailedPreStopHook" || r == "FailedKillPod"),
        "{a_events:?}"
    );

    // The freed slot lets b start.
    wait_for(BOOT, "b Ready", || async {
        let p = pods.get("b").await.ok()?;
        is_ready(&p).then_some(())
    })
    .await;
    delete_pod(&pods, "b", 0, Duration::from_secs(60)).await;
    // Grace 0 removes the object at once; the provider's cleanup follows.
    wait_all_released(&provider, Duration::from_secs(60)).await;
    assert!(
        !data.join("pods").join(&b_uid).exists(),
        "b's pod dir removed"
    );
    agent.stop().await;
    drop(provider);
}
