//! Pods the API server accepts but a node cannot honour: each gets a clear reason and
//! event, takes no VM slot, and leaves the node healthy for the next pod.

use super::*;

fn with_c0(name: &str, c0: serde_json::Value) -> Pod {
    let mut container = serde_json::json!({"name": "vm", "image": "registry.test/vm:1"});
    if let (Some(base), Some(extra)) = (container.as_object_mut(), c0.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        "spec": {"restartPolicy": "Always", "containers": [container]}
    }))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn impossible_pods_are_refused_with_their_reason_and_the_node_stays_usable() {
    let h = harness(Opts {
        max_vms: 1,
        engine: true,
        ..Default::default()
    })
    .await;
    let cases = [
        (
            with_c0(
                "cpu",
                serde_json::json!({"resources": {"requests": {"cpu": "100000"}}}),
            ),
            "InvalidCPU",
            "100000",
        ),
        (
            with_c0(
                "memory",
                serde_json::json!({"resources": {"limits": {"memory": "1Ei"}}}),
            ),
            "InvalidMemory",
            "1 EiB",
        ),
        (
            with_c0(
                "name",
                serde_json::json!({"image": "Registry.test//vm::@@x"}),
            ),
            "InvalidImageName",
            "",
        ),
    ];
    // Refused at create (the node runtime turns that into the waiting reason and an
    // event), or accepted and then waiting with the reason: either way, said clearly.
    for (p, reason, names) in &cases {
        let msg = match h.provider.create_pod(p).await {
            Err(vzk_core::ProviderError::Invalid { reason: r, message }) => {
                assert_eq!(r, *reason);
                message
            }
            Err(e) => panic!("{reason}: unexpected error {e:?}"),
            Ok(()) => {
                let s = h
                    .until(p, reason, |s| waiting_reason(s).as_deref() == Some(*reason))
                    .await;
                assert_eq!(s.phase.as_deref(), Some("Pending"), "{reason}");
                c0(&s)
                    .state
                    .as_ref()
                    .and_then(|st| st.waiting.as_ref())
                    .and_then(|w| w.message.clone())
                    .unwrap_or_default()
            }
        };
        assert!(!msg.is_empty(), "{reason}: a message says why");
        assert!(msg.contains(names), "{reason}: {msg:?} names {names:?}");
    }
    assert!(
        h.reasons().iter().any(|r| r == "InspectFailed"),
        "{:?}",
        h.reasons()
    );
    // None of them created a VM or holds the node's one slot: a good pod runs.
    assert!(
        !h.hv.log.calls().iter().any(|c| c.starts_with("create")),
        "{:?}",
        h.hv.log.calls()
    );
    let good = pod("good", "Always");
    h.provider.create_pod(&good).await.unwrap();
    h.until(&good, "the good pod runs", running).await;
    vzk_core::NodeProvider::ping(h.provider.as_ref())
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pod_with_ten_thousand_env_vars_and_a_mebibyte_of_args_runs() {
    let h = harness(Opts::default()).await;
    let env: Vec<serde_json::Value> = (0..10_000)
        .map(|i| serde_json::json!({"name": format!("VAR_{i}"), "value": "x".repeat(32)}))
        .collect();
    let args = vec!["a".repeat(1024); 1024];
    let p = with_c0(
        "big",
        serde_json::json!({"env": env, "args": args, "command": ["sh", "-c"]}),
    );
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    // The pod's record on disk (for re-adoption) stays proportionate: no blow-up.
    let record_bytes: u64 = std::fs::read_dir(h.dir.path().join("data/pods"))
        .unwrap()
        .filter_map(Result::ok)
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten())
        .filter_map(Result::ok)
        .filter_map(|f| f.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
        .sum();
    assert!(
        record_bytes < 8 << 20,
        "pod state on disk: {record_bytes} bytes"
    );
}
