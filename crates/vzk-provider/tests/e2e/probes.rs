//! Probes, restartPolicy and the graceful-stop fallback, end to end: two VM pods at a
//! time (2 slots), real kube-apiserver, real registry, QEMU (TCG) in the test's netns.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use vzk_provider::{ProviderArgs, VmProvider};

use super::support::*;
use super::{BOOT, exec, is_ready};

fn pod(name: &str, node: &str, image: &str, extra: serde_json::Value) -> Pod {
    let mut v = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "nodeName": node,
            "tolerations": [{ "operator": "Exists" }],
            "containers": [{
                "name": "vm", "image": image, "imagePullPolicy": "IfNotPresent",
                "resources": { "requests": { "cpu": "1", "memory": "256Mi" } }
            }]
        }
    });
    for (k, val) in extra.as_object().unwrap() {
        if k == "restartPolicy" {
            v["spec"][k] = val.clone();
        } else {
            v["spec"]["containers"][0][k] = val.clone();
        }
    }
    serde_json::from_value(v).unwrap()
}

fn c0(p: &Pod) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()
        .cloned()
}

/// `(reason, message)` of the events about the pod with `uid`.
async fn events_of(events: &Api<Event>, uid: &str) -> Vec<(String, String)> {
    let list = events.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|o| o.uid.as_deref()) == Some(uid))
        .map(|e| {
            (
                e.reason.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// The node of these tests: two VM slots (two pods at a time).
async fn setup(tag: &str) -> TestNode {
    setup_with(tag, |_| {}).await
}

async fn setup_with(tag: &str, tweak: impl FnOnce(&mut ProviderArgs)) -> TestNode {
    TestNode::start(tag, |a| {
        a.max_vms = 2;
        tweak(a);
    })
    .await
}

async fn delete_now(env: &TestNode, name: &str) {
    env.pods
        .delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

/// A readiness probe `test -f /tmp/ready` keeps one pod not Ready until the file is
/// created; a liveness tcpSocket probe on a closed port gets the other pod's VM killed
/// and booted again (restartCount, lastState, Killing/Unhealthy events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_probe_gates_ready_and_failing_liveness_restarts_the_vm() {
    let env = setup("prb").await;
    let image = env.push_guest("guest", "").await;
    let gated = env
        .pods
        .create(
            &PostParams::default(),
            &pod(
                "gated",
                &env.node,
                &image,
                serde_json::json!({
                    "readinessProbe": { "exec": { "command": ["test", "-f", "/tmp/ready"] }, "periodSeconds": 1 },
                    "livenessProbe": { "tcpSocket": { "port": 22 }, "periodSeconds": 5 },
                }),
            ),
        )
        .await
        .unwrap();
    let crashy = env
        .pods
        .create(
            &PostParams::default(),
            &pod(
                "crashy",
                &env.node,
                &image,
                serde_json::json!({
                    "ports": [{ "name": "app", "containerPort": 8080 }],
                    "livenessProbe": {
                        "tcpSocket": { "port": "app" }, "periodSeconds": 2, "failureThreshold": 2,
                        "terminationGracePeriodSeconds": 10
                    },
                }),
            ),
        )
        .await
        .unwrap();
    let gated_uid = gated.metadata.uid.unwrap();
    let crashy_uid = crashy.metadata.uid.unwrap();

    // gated: the readiness probe runs (the guest answers SSH) and fails: not Ready.
    let msg = wait_for(BOOT, "gated readiness failure event", || async {
        events_of(&env.events, &gated_uid)
            .await
            .into_iter()
            .find(|(r, m)| r == "Unhealthy" && m.starts_with("Readiness probe failed:"))
            .map(|(_, m)| m)
    })
    .await;
    assert!(msg.contains("test -f /tmp/ready"), "{msg}");
    let p = env.pods.get("gated").await.unwrap();
    assert!(!is_ready(&p), "not Ready while /tmp/ready is missing");
    let cs = c0(&p).unwrap();
    assert!(!cs.ready);
    assert_eq!(cs.started, Some(true), "no startup probe: started");
    assert_eq!(p.status.as_ref().unwrap().phase.as_deref(), Some("Running"));

    let (code, _) = exec(&env.provider, &env.ns, "gated", "touch /tmp/ready").await;
    assert_eq!(code, 0);
    wait_for(Duration::from_secs(60), "gated Ready", || async {
        let p = env.pods.get("gated").await.ok()?;
        is_ready(&p).then_some(())
    })
    .await;

    // crashy: killed by its liveness probe and booted again.
    let cs = wait_for(BOOT * 2, "crashy restarted", || async {
        let p = env.pods.get("crashy").await.ok()?;
        c0(&p).filter(|c| c.restart_count >= 1)
    })
    .await;
    let last = cs.last_state.and_then(|s| s.terminated).unwrap();
    assert!(
        [137, 143].contains(&last.exit_code),
        "killed by the agent: {last:?}"
    );
    assert_eq!(last.reason.as_deref(), Some("Error"));
    assert!(
        last.message
            .as_deref()
            .unwrap_or("")
            .contains("failed liveness probe"),
        "{last:?}"
    );
    let ev = events_of(&env.events, &crashy_uid).await;
    assert!(
        ev.iter()
            .any(|(r, m)| r == "Killing"
                && m == "Container vm failed liveness probe, will be restarted"),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|(r, m)| r == "Unhealthy"
            && m.starts_with("Liveness probe failed: dial tcp ")
            && m.ends_with(":8080: connect: connection refused")),
        "{ev:?}"
    );
    // The new VM runs (from the same disk clone).
    wait_for(BOOT, "crashy running again", || async {
        let p = env.pods.get("crashy").await.ok()?;
        let c = c0(&p)?;
        (c.restart_count >= 1 && c.state?.running.is_some()).then_some(())
    })
    .await;
    // `logs --previous`: the first boot's console (it reached sshd before the probe
    // killed it); the current console is the new boot's own.
    let previous = console(&env.provider, &env.ns, "crashy", true)
        .await
        .unwrap_or_else(|e| panic!("previous console of crashy: {e}"));
    assert!(previous.contains("VZK-SSHD-START"), "previous: {previous}");
    wait_for(BOOT, "the new boot's sshd", || async {
        let now = console(&env.provider, &env.ns, "crashy", false)
            .await
            .ok()?;
        now.contains("VZK-SSHD-START").then_some(())
    })
    .await;
    // gated, meanwhile, was never restarted: it has no previous console.
    let p = env.pods.get("gated").await.unwrap();
    assert_eq!(c0(&p).unwrap().restart_count, 0);
    let none = console(&env.provider, &env.ns, "gated", true).await;
    assert!(
        matches!(&none, Err(vzk_core::ProviderError::NotFound(m)) if m.contains("has not been booted again")),
        "{none:?}"
    );

    for name in ["gated", "crashy"] {
        delete_now(&env, name).await;
    }
    wait_all_released(&env.provider, Duration::from_secs(90)).await;
    assert!(pids_with(&format!("vzk-{crashy_uid}")).is_empty());
    env.agent.stop().await;
    drop(env.netns);
}

/// restartPolicy Never + the guest powering off → terminated with exit code 0, phase
/// Succeeded, no restart. A guest that ignores the ACPI power button is stopped on
/// delete by `poweroff` over SSH before the grace period ends (issue 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_policy_poweroff_succeeds_and_ssh_poweroff_backs_up_acpi() {
    let env = setup("rpn").await;
    let image = env.push_guest("guest", "").await;
    let deaf_image = env.push_guest("deaf", "vzk.ignore_acpi=1").await;
    env.pods
        .create(
            &PostParams::default(),
            &pod(
                "oneshot",
                &env.node,
                &image,
                serde_json::json!({ "restartPolicy": "Never" }),
            ),
        )
        .await
        .unwrap();
    let deaf = env
        .pods
        .create(
            &PostParams::default(),
            &pod("deaf", &env.node, &deaf_image, serde_json::json!({})),
        )
        .await
        .unwrap();
    let deaf_uid = deaf.metadata.uid.unwrap();

    for name in ["oneshot", "deaf"] {
        wait_for(BOOT, "Ready", || async {
            let p = env.pods.get(name).await.ok()?;
            is_ready(&p).then_some(())
        })
        .await;
    }

    // The guest powers itself off: Never → terminated 0, Succeeded.
    let _ = tokio::time::timeout(
        Duration::from_secs(20),
        exec(&env.provider, &env.ns, "oneshot", "poweroff"),
    )
    .await;
    let p = wait_for(Duration::from_secs(60), "oneshot Succeeded", || async {
        let p = env.pods.get("oneshot").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Succeeded")).then_some(p)
    })
    .await;
    let cs = c0(&p).unwrap();
    let t = cs.state.and_then(|s| s.terminated).unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    assert_eq!(cs.restart_count, 0);
    assert!(!is_ready(&p));

    // Delete with grace 16 s: ACPI gets half of what is left and is ignored, then
    // `poweroff` over SSH.
    delete_pod(&env.pods, "deaf", 16, Duration::from_secs(90)).await;
    let ev = events_of(&env.events, &deaf_uid).await;
    let stopped: Vec<_> = ev.iter().filter(|(r, _)| r == "VMStopped").collect();
    assert_eq!(stopped.len(), 1, "{ev:?}");
    assert!(
        stopped[0].1.contains("ignored the ACPI power button for ")
            && stopped[0].1.contains("over SSH"),
        "{ev:?}"
    );
    assert!(pids_with(&format!("vzk-{deaf_uid}")).is_empty());

    delete_now(&env, "oneshot").await;
    wait_all_released(&env.provider, Duration::from_secs(60)).await;
    env.agent.stop().await;
    drop(env.netns);
}

/// The VM console of `pod` (`previous`: the boot before the current one), read to its end.
async fn console(
    provider: &VmProvider,
    ns: &str,
    pod: &str,
    previous: bool,
) -> Result<String, vzk_core::ProviderError> {
    use futures::StreamExt as _;
    use vzk_core::StreamingRuntime as _;
    let opts = vzk_core::streams::LogOptions {
        previous,
        ..Default::default()
    };
    let mut s = provider.logs(&super::container(ns, pod), &opts).await?;
    let mut all = Vec::new();
    while let Some(c) = s.next().await {
        all.extend_from_slice(
            &c.map_err(|e| vzk_core::ProviderError::failed("Read", e.to_string()))?,
        );
    }
    Ok(String::from_utf8_lossy(&all).into_owned())
}

/// `--ready-timeout-secs`: a VM that is not ready in time (here 2 s: not even an address)
/// is killed with an Unhealthy and a Killing event, and under restartPolicy Never its pod
/// fails, naming the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_not_ready_within_the_ready_timeout_is_killed_and_the_pod_fails_under_never() {
    let env = setup_with("rto", |a| a.ready_timeout_secs = 2).await;
    let image = env.push_guest("guest", "").await;
    let p = env
        .pods
        .create(
            &PostParams::default(),
            &pod(
                "slow",
                &env.node,
                &image,
                serde_json::json!({ "restartPolicy": "Never", "terminationGracePeriodSeconds": 2 }),
            ),
        )
        .await
        .unwrap();
    let uid = p.metadata.uid.unwrap();
    let t = wait_for(BOOT, "slow terminated", || async {
        let p = env.pods.get("slow").await.ok()?;
        c0(&p)?.state?.terminated
    })
    .await;
    assert!([137, 143].contains(&t.exit_code), "{t:?}");
    assert!(
        t.message
            .as_deref()
            .unwrap_or("")
            .contains("was not ready within 2s (--ready-timeout-secs)"),
        "{t:?}"
    );
    wait_for(Duration::from_secs(30), "slow Failed", || async {
        let p = env.pods.get("slow").await.ok()?;
        (p.status?.phase.as_deref() == Some("Failed")).then_some(())
    })
    .await;
    let ev = events_of(&env.events, &uid).await;
    assert!(ev.iter().any(|(r, _)| r == "Unhealthy"), "{ev:?}");
    assert!(
        ev.iter().any(|(r, m)| r == "Killing"
            && m == "Container vm was not ready within 2s (--ready-timeout-secs)"),
        "{ev:?}"
    );
    delete_now(&env, "slow").await;
    env.agent.stop().await;
}
