//! The node runtime against a real kube-apiserver (Node,RBAC + NodeRestriction), run as
//! the node's own identity, with an in-test provider double.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use support::{Agent, Call, Double, cp, node_name, wait_for};

const T: Duration = Duration::from_secs(30);

fn pod_manifest(name: &str, node: &str, extra_container: serde_json::Value) -> Pod {
    let mut container = serde_json::json!({ "name": "vm", "image": "example/vm:1" });
    if let (Some(c), Some(extra)) = (container.as_object_mut(), extra_container.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    match serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": { "nodeName": node, "containers": [container], "terminationGracePeriodSeconds": 7 }
    })) {
        Ok(p) => p,
        Err(e) => panic!("bad test pod: {e}"),
    }
}

async fn pod_phase(api: &Api<Pod>, name: &str) -> Option<String> {
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.status)
        .and_then(|s| s.phase)
}

#[tokio::test]
async fn node_registers_ready_with_labels_taint_capacity_and_a_renewed_lease() {
    let name = node_name("reg");
    let id = cp().node_identity(&name);
    let node_client = id.client().await;
    // The agent really runs as the node: the API server says who we are.
    let review = Api::<SelfSubjectReview>::all(node_client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await;
    let user = review
        .ok()
        .and_then(|r| r.status)
        .and_then(|s| s.user_info)
        .and_then(|u| u.username);
    assert_eq!(
        user.as_deref(),
        Some(format!("system:node:{name}").as_str())
    );

    let double = Double::new();
    let agent = Agent::start(&id, double, |c| c.kubelet_port = 10333).await;
    let admin = cp().admin_client().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = wait_for(T, "node Ready", || async {
        let n = nodes.get_opt(&name).await.ok().flatten()?;
        let ready = n
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(n)
    })
    .await;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("type").map(String::as_str),
        Some("virtual-kubelet")
    );
    assert_eq!(
        labels.get("kubernetes.io/os").map(String::as_str),
        Some("linux")
    );
    assert_eq!(
        labels.get("kubernetes.io/arch").map(String::as_str),
        Some("amd64")
    );
    assert_eq!(labels.get("kubernetes.io/hostname"), Some(&name));
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    // (TaintNodesByCondition admission also adds node.kubernetes.io/not-ready at creation.)
    let ours: Vec<_> = taints
        .iter()
        .filter(|t| t.key == "virtual-kubelet.io/provider")
        .collect();
    assert_eq!(ours.len(), 1, "{taints:?}");
    assert_eq!(
        (ours[0].value.as_deref(), ours[0].effect.as_str()),
        (Some("vz"), "NoSchedule")
    );
    let status = node.status.clone().unwrap_or_default();
    let cap = status.capacity.clone().unwrap_or_default();
    assert_eq!(cap.get("cpu").map(|q| q.0.as_str()), Some("4"));
    assert_eq!(cap.get("pods").map(|q| q.0.as_str()), Some("2"));
    assert_eq!(status.allocatable, status.capacity);
    let addrs: Vec<_> = status
        .addresses
        .iter()
        .flatten()
        .map(|a| (a.type_.as_str(), a.address.as_str()))
        .collect();
    assert!(addrs.contains(&("InternalIP", "127.0.0.1")), "{addrs:?}");
    assert!(addrs.contains(&("Hostname", name.as_str())), "{addrs:?}");
    let port = status
        .daemon_endpoints
        .and_then(|d| d.kubelet_endpoint)
        .map(|e| e.port);
    assert_eq!(port, Some(10333));
    let info = status.node_info.unwrap_or_default();
    assert_eq!(info.container_runtime_version, "double://1.0");
    assert!(!info.kernel_version.is_empty());
    let conds: BTreeMap<_, _> = status
        .conditions
        .iter()
        .flatten()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    for t in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert!(conds.contains_key(t), "{t} missing: {conds:?}");
    }

    let leases: Api<Lease> = Api::namespaced(admin, "kube-node-lease");
    let first = wait_for(T, "lease", || async {
        leases.get_opt(&name).await.ok().flatten()
    })
    .await;
    let spec = first.spec.clone().unwrap_or_default();
    assert_eq!(spec.holder_identity.as_deref(), Some(name.as_str()));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    let owner = first.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(
        owner.first().map(|o| (o.kind.as_str(), o.name.as_str())),
        Some(("Node", name.as_str()))
    );
    let t0 = spec.renew_time.map(|t| t.0);
    wait_for(T, "lease renewTime to advance", || async {
        let t = leases
            .get_opt(&name)
            .await
            .ok()
            .flatten()?
            .spec?
            .renew_time
            .map(|t| t.0);
        (t > t0).then_some(())
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn unhealthy_provider_stops_the_lease_and_turns_the_node_not_ready() {
    let name = node_name("sick");
    let id = cp().node_identity(&name);
    let double = Double::new();
    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    let admin = cp().admin_client().await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    wait_for(T, "lease", || async {
        leases.get_opt(&name).await.ok().flatten()
    })
    .await;
    double.unhealthy.store(true, Ordering::SeqCst);
    let nodes: Api<Node> = Api::all(admin);
    let reason = wait_for(T, "Ready=False", || async {
        let n = nodes.get_opt(&name).await.ok().flatten()?;
        let c = n
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        (c.status == "False").then_some(c.reason)
    })
    .await;
    assert_eq!(reason.as_deref(), Some("ProviderUnhealthy"));
    let before = leases
        .get_opt(&name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.renew_time);
    tokio::time::sleep(Duration::from_secs(5)).await; // > 2 renew intervals of this test
    let after = leases
        .get_opt(&name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.renew_time);
    assert_eq!(
        before, after,
        "the lease must not be renewed while the provider is unhealthy"
    );
    agent.stop().await;
}

#[tokio::test]
async fn pod_runs_and_is_deleted_with_its_grace_period_exactly_once() {
    let name = node_name("life");
    let id = cp().node_identity(&name);
    let double = Double::new();
    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    let ns = cp().create_namespace("life").await;
    let admin = cp().admin_client().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let created = pods
        .create(
            &PostParams::default(),
            &pod_manifest("p1", &name, serde_json::json!({})),
        )
        .await;
    let uid = created
        .ok()
        .and_then(|p| p.metadata.uid)
        .unwrap_or_default();
    let pod = wait_for(T, "pod Running", || async {
        let p = pods.get_opt("p1").await.ok().flatten()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    let status = pod.status.unwrap_or_default();
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    let cs = status.container_statuses.unwrap_or_default();
    assert_eq!(cs.len(), 1);
    assert!(
        cs[0].ready
            && cs[0]
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .is_some()
    );
    let types: Vec<_> = status
        .conditions
        .iter()
        .flatten()
        .map(|c| c.type_.clone())
        .collect();
    assert!(types.contains(&"Ready".to_owned()), "{types:?}");

    // The provider's event was recorded on the pod.
    let events: Api<Event> = Api::namespaced(admin, &ns);
    wait_for(T, "Started event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Started"))
            .then_some(())
    })
    .await;

    let dp = DeleteParams {
        grace_period_seconds: Some(5),
        ..Default::default()
    };
    assert!(pods.delete("p1", &dp).await.is_ok());
    wait_for(T, "pod gone", || async {
        pods.get_opt("p1").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(double.creates_of(&uid), 1, "{:?}", double.calls());
    assert_eq!(
        double.deletes_of(&uid),
        vec![Duration::from_secs(5)],
        "{:?}",
        double.calls()
    );
    agent.stop().await;
}

#[tokio::test]
async fn env_is_resolved_from_configmaps_secrets_and_the_downward_api() {
    let name = node_name("env");
    let id = cp().node_identity(&name);
    let double = Double::new();
    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    let ns = cp().create_namespace("env").await;
    let admin = cp().admin_client().await;
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "settings"}, "data": {"color": "blue", "SIZE": "L"}
    }))
    .unwrap_or_default();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}
    }))
    .unwrap_or_default();
    assert!(
        Api::<ConfigMap>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &cm)
            .await
            .is_ok()
    );
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await
            .is_ok()
    );
    let env = serde_json::json!({
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CM_"}],
        "env": [
            {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "GREETING", "value": "$(POD) is $(COLOR)"},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": true}}}
        ],
        "resources": {"limits": {"memory": "256Mi", "cpu": "2"}}
    });
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    assert!(
        pods.create(&PostParams::default(), &pod_manifest("envpod", &name, env))
            .await
            .is_ok()
    );
    let got = wait_for(T, "create with env", || async {
        double.calls().into_iter().find_map(|c| match c {
            Call::Create { key, env } if key.name == "envpod" => Some(env),
            _ => None,
        })
    })
    .await;
    let want = [
        ("CM_color", "blue"),
        ("CM_SIZE", "L"),
        ("COLOR", "blue"),
        ("TOKEN", "s3cret"),
        ("POD", "envpod"),
        ("NODE", name.as_str()),
        ("MEM_MI", "256"),
        ("GREETING", "envpod is blue"),
    ];
    for (k, v) in want {
        assert_eq!(got.get(k).map(String::as_str), Some(v), "{k} in {got:?}");
    }
    assert!(!got.contains_key("OPT"), "{got:?}");

    // A missing key: clear container state and a Warning event, nothing created.
    let missing = serde_json::json!({"env": [
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "missing"}}}
    ]});
    assert!(
        pods.create(
            &PostParams::default(),
            &pod_manifest("badenv", &name, missing)
        )
        .await
        .is_ok()
    );
    let msg = wait_for(T, "CreateContainerConfigError", || async {
        let p = pods.get_opt("badenv").await.ok().flatten()?;
        let w = p
            .status?
            .container_statuses?
            .first()?
            .state
            .clone()?
            .waiting?;
        (w.reason.as_deref() == Some("CreateContainerConfigError"))
            .then_some(w.message.unwrap_or_default())
    })
    .await;
    assert!(msg.contains("missing") && msg.contains("settings"), "{msg}");
    let events: Api<Event> = Api::namespaced(admin, &ns);
    wait_for(T, "Failed event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.note.as_deref().unwrap_or("").contains("missing")
            })
            .then_some(())
    })
    .await;
    // virtual-kubelet's reasons for a missing key: mandatory here, optional in envpod.
    wait_for(T, "MandatoryConfigMapKeyNotFound", || async {
        let w = pod_warnings(&events, "badenv").await;
        w.iter()
            .any(|(r, n, _)| r == "MandatoryConfigMapKeyNotFound" && n.contains("\"missing\""))
            .then_some(())
    })
    .await;
    wait_for(T, "OptionalSecretKeyNotFound", || async {
        let w = pod_warnings(&events, "envpod").await;
        w.iter()
            .any(|(r, n, _)| r == "OptionalSecretKeyNotFound" && n.contains("\"nope\""))
            .then_some(())
    })
    .await;
    assert!(
        !double
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Create { key, .. } if key.name == "badenv"))
    );
    agent.stop().await;
}

/// The Warning events of pod `pod` in `ns`, as (reason, note, series count).
async fn pod_warnings(events: &Api<Event>, pod: &str) -> Vec<(String, String, Option<i32>)> {
    let list = events.list(&ListParams::default()).await.map(|l| l.items);
    list.unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
        })
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.series.map(|s| s.count),
            )
        })
        .collect()
}

#[tokio::test]
async fn missing_configmaps_and_secrets_are_events_with_virtual_kubelets_reasons() {
    let name = node_name("refs");
    let id = cp().node_identity(&name);
    let double = Double::new();
    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    let ns = cp().create_namespace("refs").await;
    let admin = cp().admin_client().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    let created = |pod: &'static str| {
        let double = double.clone();
        move || {
            double.calls().into_iter().find_map(|c| match c {
                Call::Create { key, env } if key.name == pod => Some(env),
                _ => None,
            })
        }
    };

    // Optional references to objects that do not exist: events, and the pod runs without
    // them (the vars omitted, the envFrom source skipped, the volume empty).
    let mut optional = pod_manifest(
        "optional",
        &name,
        serde_json::json!({
            "envFrom": [{"secretRef": {"name": "no-such-secret", "optional": true}}],
            "env": [
                {"name": "A", "value": "kept"},
                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "no-such-cm", "key": "k", "optional": true}}},
                {"name": "C", "valueFrom": {"secretKeyRef": {"name": "no-such-secret", "key": "k", "optional": true}}}
            ]
        }),
    );
    if let Some(spec) = optional.spec.as_mut() {
        spec.volumes = serde_json::from_value(serde_json::json!([
            {"name": "opt-cm", "configMap": {"name": "no-such-cm-vol", "optional": true}}
        ]))
        .ok();
    }
    assert!(pods.create(&PostParams::default(), &optional).await.is_ok());
    let find = created("optional");
    let env = wait_for(T, "the optional pod created", || async { find() }).await;
    assert_eq!(env.get("A").map(String::as_str), Some("kept"), "{env:?}");
    assert!(!env.contains_key("B") && !env.contains_key("C"), "{env:?}");
    let warnings = wait_for(T, "the Optional*NotFound events", || async {
        let w = pod_warnings(&events, "optional").await;
        let has = |r: &str, what: &str| {
            w.iter()
                .any(|(reason, note, _)| reason == r && note.contains(what))
        };
        (has("OptionalSecretNotFound", "\"no-such-secret\"")
            && has("OptionalConfigMapNotFound", "\"no-such-cm\"")
            && has("OptionalConfigMapNotFound", "\"no-such-cm-vol\""))
        .then_some(w)
    })
    .await;
    // The Secret is referenced twice (envFrom and a var): one event.
    let secret_events = warnings
        .iter()
        .filter(|(r, _, _)| r == "OptionalSecretNotFound")
        .count();
    assert_eq!(secret_events, 1, "{warnings:?}");

    // Mandatory references: events, and nothing is created until the objects appear.
    let mut mandatory = pod_manifest(
        "mandatory",
        &name,
        serde_json::json!({
            "envFrom": [{"configMapRef": {"name": "later-cm"}}],
            "env": [{"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "later-secret", "key": "token"}}}]
        }),
    );
    if let Some(spec) = mandatory.spec.as_mut() {
        spec.volumes = serde_json::from_value(serde_json::json!([
            {"name": "creds", "secret": {"secretName": "later-secret"}}
        ]))
        .ok();
    }
    assert!(
        pods.create(&PostParams::default(), &mandatory)
            .await
            .is_ok()
    );
    wait_for(T, "the Mandatory*NotFound events", || async {
        let w = pod_warnings(&events, "mandatory").await;
        let has = |r: &str, what: &str| {
            w.iter()
                .any(|(reason, note, _)| reason == r && note.contains(what))
        };
        (has("MandatorySecretNotFound", "later-secret")
            && has("MandatoryConfigMapNotFound", "later-cm"))
        .then_some(())
    })
    .await;
    let waiting = wait_for(T, "the mandatory pod waiting", || async {
        let p = pods.get_opt("mandatory").await.ok().flatten()?;
        let w = p
            .status?
            .container_statuses?
            .first()?
            .state
            .clone()?
            .waiting?;
        w.reason
    })
    .await;
    assert_eq!(
        waiting, "ContainerCreating",
        "a missing volume Secret comes first"
    );
    // Several retries later (1 s each here): still not created, and each problem was said
    // once, not once per retry (no series).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(created("mandatory")().is_none(), "{:?}", double.calls());
    let w = pod_warnings(&events, "mandatory").await;
    for reason in [
        "MandatorySecretNotFound",
        "MandatoryConfigMapNotFound",
        "FailedMount",
    ] {
        let of: Vec<_> = w.iter().filter(|(r, _, _)| r == reason).collect();
        assert_eq!(of.len(), 1, "{reason}: {w:?}");
        assert_eq!(of[0].2, None, "{reason} repeated: {w:?}");
    }

    // The Secret appears: the volume is satisfied, the env's ConfigMap still missing.
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "later-secret"}, "stringData": {"token": "t0k"}
    }))
    .unwrap_or_default();
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await
            .is_ok()
    );
    wait_for(T, "CreateContainerConfigError", || async {
        let p = pods.get_opt("mandatory").await.ok().flatten()?;
        let w = p
            .status?
            .container_statuses?
            .first()?
            .state
            .clone()?
            .waiting?;
        (w.reason.as_deref() == Some("CreateContainerConfigError")).then_some(())
    })
    .await;
    assert!(created("mandatory")().is_none(), "{:?}", double.calls());
    // Then the ConfigMap: the pod is created with both.
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "later-cm"}, "data": {"FROM_CM": "yes"}
    }))
    .unwrap_or_default();
    assert!(
        Api::<ConfigMap>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &cm)
            .await
            .is_ok()
    );
    let find = created("mandatory");
    let env = wait_for(T, "the mandatory pod created", || async { find() }).await;
    assert_eq!(
        env.get("FROM_CM").map(String::as_str),
        Some("yes"),
        "{env:?}"
    );
    assert_eq!(
        env.get("FROM_SECRET").map(String::as_str),
        Some("t0k"),
        "{env:?}"
    );
    let w = pod_warnings(&events, "mandatory").await;
    assert_eq!(
        w.iter()
            .filter(|(r, _, _)| r == "MandatoryConfigMapNotFound")
            .count(),
        1,
        "{w:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn permanent_provider_error_fails_the_pod_with_a_reason_and_the_node_stays_ready() {
    let name = node_name("reject");
    let id = cp().node_identity(&name);
    let double = Double::new();
    if let Ok(mut r) = double.reject.lock() {
        *r = Some((
            "InvalidCPU".into(),
            "fractional CPUs are not supported".into(),
        ));
    }
    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    let ns = cp().create_namespace("reject").await;
    let admin = cp().admin_client().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    assert!(
        pods.create(
            &PostParams::default(),
            &pod_manifest("bad", &name, serde_json::json!({}))
        )
        .await
        .is_ok()
    );
    let status = wait_for(T, "pod Failed", || async {
        let s = pods.get_opt("bad").await.ok().flatten()?.status?;
        (s.phase.as_deref() == Some("Failed")).then_some(s)
    })
    .await;
    assert_eq!(status.reason.as_deref(), Some("InvalidCPU"));
    assert!(status.message.unwrap_or_default().contains("fractional"));
    let node = Api::<Node>::all(admin).get(&name).await.ok();
    let ready = node.and_then(|n| {
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")
    });
    assert_eq!(ready.map(|c| c.status).as_deref(), Some("True"));
    agent.stop().await;
}

#[tokio::test]
async fn restarted_agent_reconciles_without_creating_twice_or_losing_pods() {
    let name = node_name("restart");
    let id = cp().node_identity(&name);
    let double = Double::new();
    let ns = cp().create_namespace("restart").await;
    let admin = cp().admin_client().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);

    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    for p in ["keep", "doomed"] {
        assert!(
            pods.create(
                &PostParams::default(),
                &pod_manifest(p, &name, serde_json::json!({}))
            )
            .await
            .is_ok()
        );
    }
    for p in ["keep", "doomed"] {
        wait_for(T, "Running", || async {
            (pod_phase(&pods, p).await.as_deref() == Some("Running")).then_some(())
        })
        .await;
    }
    let uid = |p: &'static str| {
        let pods = pods.clone();
        async move {
            pods.get(p)
                .await
                .ok()
                .and_then(|p| p.metadata.uid)
                .unwrap_or_default()
        }
    };
    let (keep_uid, doomed_uid) = (uid("keep").await, uid("doomed").await);
    agent.stop().await; // "kill" the agent; the provider's pods keep running

    // While it is down: one pod is deleted (gracefully), one new pod arrives, and the
    // provider has a pod the API server never had.
    let dp = DeleteParams {
        grace_period_seconds: Some(30),
        ..Default::default()
    };
    assert!(pods.delete("doomed", &dp).await.is_ok());
    assert!(
        pods.create(
            &PostParams::default(),
            &pod_manifest("late", &name, serde_json::json!({}))
        )
        .await
        .is_ok()
    );
    let ghost: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ghost", "namespace": ns, "uid": "ghost-uid"},
        "spec": {"containers": [{"name": "c"}]}
    }))
    .unwrap_or_default();
    if let Ok(mut r) = double.running.lock() {
        let key = vzk_core::PodKey::of(&ghost).unwrap_or_else(|| panic!("ghost key"));
        r.insert("ghost-uid".into(), (key, ghost));
    }

    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    wait_for(T, "late Running", || async {
        (pod_phase(&pods, "late").await.as_deref() == Some("Running")).then_some(())
    })
    .await;
    wait_for(T, "doomed gone", || async {
        pods.get_opt("doomed").await.ok()?.is_none().then_some(())
    })
    .await;
    wait_for(T, "ghost deleted", || async {
        (!double.deletes_of("ghost-uid").is_empty()).then_some(())
    })
    .await;
    assert_eq!(pod_phase(&pods, "keep").await.as_deref(), Some("Running"));
    assert_eq!(
        double.creates_of(&keep_uid),
        1,
        "keep created twice: {:?}",
        double.calls()
    );
    assert_eq!(double.creates_of(&doomed_uid), 1);
    assert_eq!(double.deletes_of(&doomed_uid).len(), 1);
    assert!(
        double.deletes_of(&keep_uid).is_empty(),
        "keep must not be disturbed"
    );
    agent.stop().await;
}

#[tokio::test]
async fn the_node_cannot_read_a_secret_no_pod_of_its_own_references() {
    let name = node_name("scope");
    let id = cp().node_identity(&name);
    let ns = cp().create_namespace("scope").await;
    let admin = cp().admin_client().await;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "unrelated"}, "stringData": {"k": "v"}
    }))
    .unwrap_or_default();
    assert!(
        Api::<Secret>::namespaced(admin, &ns)
            .create(&PostParams::default(), &secret)
            .await
            .is_ok()
    );
    let node = id.client().await;
    match Api::<Secret>::namespaced(node.clone(), &ns)
        .get("unrelated")
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403, got {other:?}"),
    }
    match Api::<Secret>::namespaced(node, &ns)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 listing secrets, got {other:?}"),
    }
}

#[tokio::test]
async fn agent_recovers_by_itself_after_a_20_second_api_server_outage() {
    let cp = match vzk_testenv::ControlPlane::start() {
        Ok(cp) => cp,
        Err(e) => panic!("private control plane: {}", vzk_testenv::error_chain(&e)),
    };
    let name = node_name("outage");
    let id = cp.node_identity(&name);
    let double = Double::new();
    let agent = Agent::start(&id, double.clone(), |_| {}).await;
    let admin = cp.admin_client().await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    wait_for(T, "lease", || async {
        leases.get_opt(&name).await.ok().flatten()
    })
    .await;

    cp.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let restarted = tokio::task::spawn_blocking(move || cp.start_apiserver().map(|()| cp)).await;
    let cp = match restarted {
        Ok(Ok(cp)) => cp,
        other => panic!(
            "restarting kube-apiserver: {:?}",
            other.map(|r| r.err().map(|e| e.to_string()))
        ),
    };
    let back = k8s_openapi::jiff::Timestamp::now();
    let admin = cp.admin_client().await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    wait_for(
        Duration::from_secs(60),
        "lease renewed after the outage",
        || async {
            let t = leases
                .get_opt(&name)
                .await
                .ok()
                .flatten()?
                .spec?
                .renew_time?
                .0;
            (t > back).then_some(())
        },
    )
    .await;
    let ns = cp.create_namespace("outage").await;
    let pods: Api<Pod> = Api::namespaced(admin, &ns);
    assert!(
        pods.create(
            &PostParams::default(),
            &pod_manifest("after", &name, serde_json::json!({}))
        )
        .await
        .is_ok()
    );
    wait_for(
        Duration::from_secs(60),
        "pod Running after the outage",
        || async { (pod_phase(&pods, "after").await.as_deref() == Some("Running")).then_some(()) },
    )
    .await;
    agent.stop().await;
}

/// Steady-state API traffic of an idle node with the production intervals (lease every
/// 10 s, status every 10 s but written only on change). Prints the table by verb and
/// resource; asserts at most one write per 10 s (plus one for a window boundary).
#[tokio::test]
async fn idle_node_makes_at_most_one_write_per_ten_seconds() {
    let name = node_name("idle");
    let id = cp().node_identity(&name);
    let double = Double::new();
    let agent = Agent::start(&id, double, |c| {
        c.lease_renew_interval = Duration::from_secs(10);
        c.status_check_interval = Duration::from_secs(10);
    })
    .await;
    let admin = cp().admin_client().await;
    let leases: Api<Lease> = Api::namespaced(admin, "kube-node-lease");
    wait_for(T, "lease", || async {
        leases.get_opt(&name).await.ok().flatten()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await; // past registration
    let from = k8s_openapi::jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let to = k8s_openapi::jiff::Timestamp::now();
    agent.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await; // let the audit log flush
    let counts = cp().audit_counts(&id.user, from, to);
    println!("API requests by {} over 60 s idle:", id.user);
    println!("{:<8} {:<28} {:>5}", "verb", "resource", "count");
    for ((verb, res), n) in &counts {
        println!("{verb:<8} {res:<28} {n:>5}");
    }
    let writes: usize = counts
        .iter()
        .filter(|((verb, _), _)| matches!(verb.as_str(), "create" | "update" | "patch" | "delete"))
        .map(|(_, n)| n)
        .sum();
    println!(
        "writes: {writes} in 60 s = {:.2} per 10 s",
        writes as f64 / 6.0
    );
    assert!(
        writes >= 5,
        "the lease must be renewed while idle: {counts:?}"
    );
    assert!(
        writes <= 7,
        "more than one write per 10 s while idle: {counts:?}"
    );
}

#[tokio::test]
async fn a_counted_client_counts_requests_by_verb_and_code_and_keeps_api_errors() {
    let metrics = vzk_node::api_metrics::ApiRequestMetrics::default();
    let client = metrics.wrap(cp().admin_client().await);
    let ns = cp().create_namespace("counted").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "counted" }, "data": { "k": "v" }
    }))
    .expect("configmap");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create through the counted client");
    // A 404 still arrives as kube's own API error.
    match cms.get("missing").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404, "{s:?}"),
        other => panic!("expected a 404 API error, got {other:?}"),
    }
    let listed = cms.list(&ListParams::default()).await.expect("list");
    // (create_namespace also made kube-root-ca.crt, as a controller-manager would.)
    assert!(
        listed
            .items
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some("counted"))
    );
    assert_eq!(metrics.count("create", 201), 1);
    assert_eq!(metrics.count("get", 404), 1);
    assert_eq!(metrics.count("list", 200), 1);
    assert_eq!(metrics.count("patch", 200), 0);
}

#[tokio::test]
async fn a_pod_whose_vm_comes_back_at_a_new_address_gets_its_new_ip_alone() {
    let name = node_name("moved");
    let id = cp().node_identity(&name);
    let double = Double::new();
    let _agent = Agent::start(&id, double.clone(), |_| {}).await;
    let ns = cp().create_namespace("moved").await;
    let admin = cp().admin_client().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let uid = pods
        .create(
            &PostParams::default(),
            &pod_manifest("moved", &name, serde_json::json!({})),
        )
        .await
        .ok()
        .and_then(|p| p.metadata.uid)
        .unwrap_or_default();
    let ips = |p: &Pod| {
        let s = p.status.clone().unwrap_or_default();
        let all: Vec<String> = s
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.ip)
            .collect();
        (s.pod_ip.unwrap_or_default(), all)
    };
    wait_for(T, "the first address", || async {
        let p = pods.get_opt("moved").await.ok().flatten()?;
        (ips(&p).0 == "127.0.0.1").then_some(())
    })
    .await;
    double.move_to(&uid, "127.0.0.2");
    let p = wait_for(T, "the new address", || async {
        let p = pods.get_opt("moved").await.ok().flatten()?;
        (ips(&p).0 == "127.0.0.2").then_some(p)
    })
    .await;
    assert_eq!(ips(&p).1, vec!["127.0.0.2".to_owned()], "{:?}", p.status);
}
