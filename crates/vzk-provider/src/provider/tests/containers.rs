//! Side-car and init containers, in the fake engine.

use super::*;

fn hybrid(name: &str, policy: &str, init: &[&str]) -> Pod {
    let init: Vec<serde_json::Value> = init
        .iter()
        .map(|n| serde_json::json!({"name": n, "image": "bb"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        "spec": {
            "restartPolicy": policy,
            "initContainers": init,
            "containers": [
                {"name": "vm", "image": "registry.test/vm:1"},
                {"name": "side", "image": "bb"}
            ]
        }
    }))
    .unwrap()
}

fn named<'a>(list: Option<&'a Vec<ContainerStatus>>, name: &str) -> Option<&'a ContainerStatus> {
    list?.iter().find(|c| c.name == name)
}

fn is_running(c: Option<&ContainerStatus>) -> bool {
    c.and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

#[tokio::test(start_paused = true)]
async fn a_failing_side_car_restarts_with_the_same_back_off_as_the_vm() {
    let h = harness(Opts {
        engine: true,
        ..Opts::default()
    })
    .await;
    h.engine
        .script("side", &[Some(1), Some(1), Some(1), Some(1)]);
    let p = hybrid("side-crash", "Always", &[]);
    h.provider.create_pod(&p).await.unwrap();
    let back_off = h
        .until(&p, "side-car in back-off", |s| {
            let side = named(s.container_statuses.as_ref(), "side");
            side.and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
                == Some("CrashLoopBackOff")
        })
        .await;
    assert_eq!(
        back_off.phase.as_deref(),
        Some("Running"),
        "restarting, not failed"
    );
    let s = h
        .until(&p, "side-car running after 4 failures", |s| {
            let side = named(s.container_statuses.as_ref(), "side");
            is_running(side) && side.is_some_and(|c| c.restart_count == 4)
        })
        .await;
    let side = named(s.container_statuses.as_ref(), "side").unwrap();
    let last = side
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(last.exit_code, 1);
    // The same rule as the VM's: at once, then 10 s, 20 s, 40 s.
    assert_eq!(gaps(&h.hv.log.times("start side")), [0, 10, 20, 40]);
    let side_back_offs = h
        .events("BackOff")
        .iter()
        .filter(|(_, e)| e.container.as_deref() == Some("side"))
        .count();
    assert_eq!(side_back_offs, 3, "one per delayed restart, as for the VM");
    // The VM was never touched by the side-car's failures.
    assert_eq!(h.hv.log.times("start vzk-").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn init_containers_run_in_order_to_completion_before_the_vm_boots() {
    let h = harness(Opts {
        engine: true,
        ..Opts::default()
    })
    .await;
    h.engine.script("seed", &[Some(0)]);
    h.engine.script("flaky", &[Some(1), Some(1), Some(0)]);
    let p = hybrid("inits", "OnFailure", &["seed", "flaky"]);
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "initialized and running", |s| {
            running(s) && is_running(named(s.container_statuses.as_ref(), "side"))
        })
        .await;
    let init = s.init_container_statuses.as_ref();
    let flaky = named(init, "flaky").unwrap();
    assert_eq!(flaky.restart_count, 2);
    assert!(flaky.ready, "completed");
    assert_eq!(named(init, "seed").unwrap().restart_count, 0);
    let initialized = s
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Initialized")
        .unwrap();
    assert_eq!(initialized.status, "True");
    // Order: seed, flaky (three times, with back-off), then the VM's pull and boot and
    // the side-car.
    let calls = h.hv.log.calls();
    let order: Vec<&str> = calls
        .iter()
        .filter(|c| c.starts_with("start ") || c.starts_with("pull "))
        .map(String::as_str)
        .collect();
    assert_eq!(
        order[..5],
        [
            "start seed",
            "start flaky",
            "start flaky",
            "start flaky",
            "pull registry.test/vm:1"
        ],
        "{calls:?}"
    );
    let vm = calls
        .iter()
        .position(|c| c.starts_with("start vzk-"))
        .unwrap();
    let side = calls.iter().position(|c| c == "start side").unwrap();
    assert!(vm > 4 && side > 4, "{calls:?}");
    assert_eq!(gaps(&h.hv.log.times("start flaky")), [0, 10]);
}

#[tokio::test(start_paused = true)]
async fn an_init_container_failing_under_never_fails_the_pod_before_any_vm() {
    let h = harness(Opts {
        engine: true,
        ..Opts::default()
    })
    .await;
    h.engine.script("explode", &[Some(3)]);
    let p = hybrid("boom", "Never", &["explode"]);
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    assert_eq!(s.reason.as_deref(), Some("InitContainerFailed"));
    assert_eq!(
        s.message.as_deref(),
        Some("Init container explode failed with exit code 3 (Error)")
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = h.hv.log.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("pull ") || c.starts_with("create vzk-")),
        "no VM image pulled, no VM created: {calls:?}"
    );
    assert!(!calls.iter().any(|c| c == "start side"), "{calls:?}");
    assert_eq!(h.engine_starts("explode"), 1, "never retried");
}

#[tokio::test(start_paused = true)]
async fn without_a_container_engine_side_cars_wait_naming_why() {
    let h = harness(Opts::default()).await;
    let p = hybrid("no-engine", "Always", &[]);
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "side-car waiting", |s| {
            let side = named(s.container_statuses.as_ref(), "side");
            side.and_then(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
                .is_some_and(|m| m.contains("no container engine"))
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Pending"));
}
