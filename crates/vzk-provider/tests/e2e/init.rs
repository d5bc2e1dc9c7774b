//! Init containers end to end, in Docker before the VM boots. A hybrid pod
//! (`restartPolicy: OnFailure`) with a native side-car, an init container that writes a
//! file into an emptyDir and one that fails twice before it succeeds: the pod stays
//! Pending (`PodInitializing`, `Initialized` False) while they run, then the VM boots and
//! reads the file; `initContainerStatuses` show both Completed (restartCount 0 and 2),
//! the native side-car running and ready; logs (and `--previous`) of an init container
//! work; an agent restart runs none of them again; deletion removes their containers.
//! Under `restartPolicy: Never` a failing init container fails the pod and no VM boots.

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodCondition};
use kube::api::{ListParams, PostParams};
use vzk_core::StreamingRuntime as _;
use vzk_core::streams::{ContainerRef, LogOptions};
use vzk_provider::VmProvider;

use super::support::*;
use super::{BOOT, exec, is_ready};

async fn logs(provider: &VmProvider, ns: &str, pod: &str, c: &str, previous: bool) -> String {
    let target = ContainerRef {
        namespace: ns.into(),
        pod: pod.into(),
        uid: None,
        container: c.into(),
    };
    let opts = LogOptions {
        previous,
        ..Default::default()
    };
    let mut s = provider.logs(&target, &opts).await.unwrap();
    let mut all = Vec::new();
    while let Some(c) = s.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn init_status(p: &Pod, name: &str) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

fn app_status(p: &Pod, name: &str) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

fn condition(p: &Pod, t: &str) -> Option<PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .cloned()
}

fn waiting_reason(c: &ContainerStatus) -> Option<&str> {
    c.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

/// (exit code, reason, restartCount) of a terminated container.
fn terminated(c: &ContainerStatus) -> Option<(i32, String, i32)> {
    let t = c.state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone()?, c.restart_count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_in_order_before_the_vm() {
    let env = TestNode::start("vminit", |_| {}).await;
    let image = env.push_guest("test-guest", "").await;
    let bb = push_sidecar_image(
        &env.registry.addr,
        &format!("vzk/bb-init:{:06x}", std::process::id()),
    );
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
        ..
    } = env;
    let work = serde_json::json!([{"name": "work", "mountPath": "/work"}]);
    let loop_forever = "trap 'exit 0' TERM; while true; do sleep 1; done";
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "inits"},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "restartPolicy": "OnFailure",
            "volumes": [{"name": "work", "emptyDir": {}}],
            "initContainers": [
                {
                    "name": "proxy", "image": bb, "imagePullPolicy": "IfNotPresent",
                    "restartPolicy": "Always",
                    "command": ["sh", "-c", format!("echo proxy-up; {loop_forever}")]
                },
                {
                    "name": "seed", "image": bb, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "echo seeded-by-init > /work/file && echo seed-done"],
                    "volumeMounts": work
                },
                {
                    // Counts its attempts in the emptyDir: fails on the first two.
                    "name": "flaky", "image": bb, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c",
                        "n=`cat /work/attempts 2>/dev/null || echo 0`; n=`expr $n + 1`; echo $n > /work/attempts; echo attempt $n; test $n -ge 3"],
                    "volumeMounts": work
                }
            ],
            "containers": [
                {
                    "name": "vm", "image": image, "imagePullPolicy": "IfNotPresent",
                    "resources": {"requests": {"cpu": "1", "memory": "256Mi"}},
                    "volumeMounts": work
                },
                {
                    "name": "side", "image": bb, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", format!("echo side-sees-`cat /work/attempts`; {loop_forever}")],
                    "volumeMounts": work
                }
            ]
        }
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    // While flaky waits in back-off after its second failure: the pod is Pending and
    // not initialized, the VM and the side-car wait with PodInitializing, seed has
    // completed and the native side-car runs.
    let initializing = wait_for(
        Duration::from_secs(120),
        "flaky in CrashLoopBackOff",
        || async {
            let p = pods.get("inits").await.ok()?;
            let f = init_status(&p, "flaky")?;
            (waiting_reason(&f) == Some("CrashLoopBackOff")).then_some(p)
        },
    )
    .await;
    let st = initializing.status.clone().unwrap();
    assert_eq!(st.phase.as_deref(), Some("Pending"), "{st:?}");
    let c = condition(&initializing, "Initialized").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_deref()),
        ("False", Some("ContainersNotInitialized"))
    );
    assert_eq!(
        c.message.as_deref(),
        Some("containers with incomplete status: [flaky]")
    );
    for name in ["vm", "side"] {
        let s = app_status(&initializing, name).unwrap();
        assert_eq!(waiting_reason(&s), Some("PodInitializing"), "{s:?}");
    }
    let flaky = init_status(&initializing, "flaky").unwrap();
    assert_eq!(flaky.restart_count, 1, "{flaky:?}");
    let last = flaky.last_state.unwrap().terminated.unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
    let seed = init_status(&initializing, "seed").unwrap();
    assert_eq!(terminated(&seed), Some((0, "Completed".into(), 0)));
    let proxy = init_status(&initializing, "proxy").unwrap();
    assert!(
        proxy.ready && proxy.state.as_ref().unwrap().running.is_some(),
        "{proxy:?}"
    );
    assert!(
        pids_with(&format!("vzk-{uid}")).is_empty(),
        "no VM before initialization"
    );

    // Initialized, then the VM boots: Ready.
    let ready = wait_for(BOOT, "inits Ready", || async {
        let p = pods.get("inits").await.ok()?;
        is_ready(&p).then_some(p)
    })
    .await;
    assert_eq!(
        ready.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(condition(&ready, "Initialized").unwrap().status, "True");
    let seed = init_status(&ready, "seed").unwrap();
    let flaky = init_status(&ready, "flaky").unwrap();
    assert_eq!(terminated(&seed), Some((0, "Completed".into(), 0)));
    assert_eq!(terminated(&flaky), Some((0, "Completed".into(), 2)));
    assert!(
        seed.ready && flaky.ready,
        "completed init containers are ready"
    );
    let proxy = init_status(&ready, "proxy").unwrap();
    assert!(proxy.ready && proxy.restart_count == 0, "{proxy:?}");
    let names: Vec<_> = ready
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["proxy", "seed", "flaky"]);
    // The VM and the side-car started only after the last init container finished.
    let flaky_done = flaky
        .state
        .unwrap()
        .terminated
        .unwrap()
        .finished_at
        .unwrap();
    for name in ["vm", "side"] {
        let s = app_status(&ready, name).unwrap();
        let started = s.state.unwrap().running.unwrap().started_at.unwrap();
        assert!(
            started >= flaky_done,
            "{name} started {started:?} before {flaky_done:?}"
        );
    }

    // What the init containers wrote is in the VM (9p) and the side-car (bind).
    let (code, out) = exec(&provider, &ns, "inits", "cat /work/file /work/attempts").await;
    assert_eq!((code, out.as_str()), (0, "seeded-by-init\n3\n"));
    assert!(
        logs(&provider, &ns, "inits", "side", false)
            .await
            .contains("side-sees-3")
    );

    // kubectl logs -c of init containers, --previous too.
    assert_eq!(
        logs(&provider, &ns, "inits", "seed", false).await,
        "seed-done\n"
    );
    assert_eq!(
        logs(&provider, &ns, "inits", "flaky", false).await,
        "attempt 3\n"
    );
    assert_eq!(
        logs(&provider, &ns, "inits", "flaky", true).await,
        "attempt 2\n"
    );
    assert!(
        logs(&provider, &ns, "inits", "proxy", false)
            .await
            .contains("proxy-up")
    );

    // Events of init containers name them as the kubelet does.
    wait_for(Duration::from_secs(30), "init container events", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let about = |reason: &str, path: &str| {
            list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|o| o.uid.as_deref()) == Some(uid.as_str())
                    && e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|o| o.field_path.as_deref()) == Some(path)
            })
        };
        (about("BackOff", "spec.initContainers{flaky}")
            && about("Started", "spec.initContainers{seed}")
            && about("Started", "spec.containers{side}"))
        .then_some(())
    })
    .await;

    // Agent restart: the VM is re-adopted and no init container runs again.
    let mut before = docker_ids(&uid);
    assert_eq!(
        before.len(),
        5,
        "proxy, seed, flaky (this and the previous attempt), side"
    );
    let provider = restart_provider(agent, provider, provider_args, &netns, &id).await;
    let agent = Agent::start(&id, provider.clone()).await;
    let again = wait_for(
        Duration::from_secs(60),
        "Ready after the agent restart",
        || async {
            let p = pods.get("inits").await.ok()?;
            let f = init_status(&p, "flaky")?;
            (is_ready(&p) && terminated(&f)?.2 == 2).then_some(p)
        },
    )
    .await;
    assert_eq!(condition(&again, "Initialized").unwrap().status, "True");
    assert_eq!(
        terminated(&init_status(&again, "seed").unwrap()),
        Some((0, "Completed".into(), 0))
    );
    assert_eq!(
        logs(&provider, &ns, "inits", "seed", false).await,
        "seed-done\n"
    );
    let (code, out) = exec(&provider, &ns, "inits", "cat /work/attempts").await;
    assert_eq!((code, out.trim()), (0, "3"), "flaky did not run again");
    let mut after = docker_ids(&uid);
    before.sort();
    after.sort();
    assert_eq!(
        after, before,
        "no container created or removed by the restart"
    );

    // Deletion removes every container of the pod.
    delete_pod(&pods, "inits", 20, Duration::from_secs(90)).await;
    assert!(docker_ids(&uid).is_empty(), "no container left for {uid}");
    agent.stop().await;
    drop(provider);
    let _ = std::process::Command::new("docker")
        .args(["rmi", &bb])
        .output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_container_failing_under_restart_policy_never_fails_the_pod() {
    let env = TestNode::start("vminitn", |_| {}).await;
    let bb = push_sidecar_image(
        &env.registry.addr,
        &format!("vzk/bb-init-never:{:06x}", std::process::id()),
    );
    let TestNode {
        ns,
        pods,
        events,
        agent,
        provider,
        node,
        registry,
        ..
    } = env;
    // The VM image does not exist: it must never be needed.
    let vm_image = format!("{}/vzk/never-pulled:v1", registry.addr);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "boom"},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "restartPolicy": "Never",
            "initContainers": [{
                "name": "explode", "image": bb, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "echo exploding; exit 3"]
            }],
            "containers": [{
                "name": "vm", "image": vm_image, "imagePullPolicy": "IfNotPresent",
                "resources": {"requests": {"cpu": "1", "memory": "256Mi"}}
            }]
        }
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    let failed = wait_for(Duration::from_secs(90), "boom Failed", || async {
        let p = pods.get("boom").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Failed")).then_some(p)
    })
    .await;
    let st = failed.status.clone().unwrap();
    assert_eq!(st.reason.as_deref(), Some("InitContainerFailed"));
    assert_eq!(
        st.message.as_deref(),
        Some("Init container explode failed with exit code 3 (Error)")
    );
    let explode = init_status(&failed, "explode").unwrap();
    assert_eq!(terminated(&explode), Some((3, "Error".into(), 0)));
    assert_eq!(condition(&failed, "Initialized").unwrap().status, "False");
    let vm = app_status(&failed, "vm").unwrap();
    assert_eq!(waiting_reason(&vm), Some("PodInitializing"));
    assert_eq!(
        logs(&provider, &ns, "boom", "explode", false).await,
        "exploding\n"
    );
    // No VM, and its image was never pulled; the pod stays Failed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pids_with(&format!("vzk-{uid}")).is_empty());
    let list = events.list(&ListParams::default()).await.unwrap();
    let vm_pulls = list
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|o| o.uid.as_deref()) == Some(uid.as_str()))
        .filter(|e| e.note.as_deref().is_some_and(|n| n.contains(&vm_image)))
        .count();
    assert_eq!(vm_pulls, 0);
    let p = pods.get("boom").await.unwrap();
    assert_eq!(p.status.as_ref().unwrap().phase.as_deref(), Some("Failed"));

    delete_pod(&pods, "boom", 5, Duration::from_secs(60)).await;
    // A terminal pod's object goes at once (no graceful deletion); the provider's
    // cleanup follows.
    wait_all_released(&provider, Duration::from_secs(60)).await;
    assert!(docker_ids(&uid).is_empty(), "no container left for {uid}");
    agent.stop().await;
    drop(provider);
    let _ = std::process::Command::new("docker")
        .args(["rmi", &bb])
        .output();
}
