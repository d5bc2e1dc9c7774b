//! Docker side-cars end to end: a hybrid pod (VM + busybox side-car pulled from the
//! local registry by the real dockerd) reaches Ready; the side-car's logs, exec (exit
//! code kept), port-forward (to a port only the side-car declares) and stats work; a
//! side-car that exits is restarted per `restartPolicy: Always` with its previous
//! logs kept; an agent restart re-adopts the running side-car; deletion removes every
//! container labelled with the pod's UID. Probes: a readiness exec probe holds the pod
//! not Ready until a file exists in the side-car; a liveness tcpSocket probe whose port
//! closes restarts it (`Unhealthy` + `Killing` events on the side-car). After an agent
//! restart a re-created side-car gets its env (a secret among it) again, and no secret
//! value is on the node's disk.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vzk_core::streams::{ContainerRef, LogOptions};
use vzk_core::{PodKey, StreamingRuntime as _};
use vzk_provider::VmProvider;

use super::support::*;
use super::{BOOT, exec, is_ready};

fn side(ns: &str, pod: &str) -> ContainerRef {
    ContainerRef {
        namespace: ns.into(),
        pod: pod.into(),
        uid: None,
        container: "side".into(),
    }
}

async fn side_exec(provider: &VmProvider, ns: &str, pod: &str, script: &str) -> (i32, String) {
    let sh = ["sh", "-c", script];
    exec_argv(provider, &side(ns, pod), &sh).await.unwrap()
}

async fn side_logs(provider: &VmProvider, ns: &str, pod: &str, opts: LogOptions) -> String {
    let mut s = provider.logs(&side(ns, pod), &opts).await.unwrap();
    let mut all = Vec::new();
    while let Some(c) = s.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn side_status(p: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "side")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_pod_with_a_docker_sidecar() {
    let env = TestNode::start("vmsc", |_| {}).await;
    let image = env.push_guest("test-guest", "").await;
    // The side-car image, pushed to the registry and not present locally: the node
    // has to pull it.
    let side_image = push_sidecar_image(
        &env.registry.addr,
        &format!("vzk/bb-e2e:{:06x}", std::process::id()),
    );
    let TestNode {
        ns,
        admin,
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
    let secret_value = format!("s3cr3t-{:06x}", std::process::id());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "side-env"},
                "stringData": {"token": secret_value}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hybrid"},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "vm", "image": image, "imagePullPolicy": "IfNotPresent",
                    "resources": {"requests": {"cpu": "1", "memory": "256Mi"}}
                },
                {
                    "name": "side", "image": side_image, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c"],
                    "args": ["mkdir -p /www && echo pong-$(GREETING) > /www/ping && httpd -p 127.0.0.1:8080 -h /www; echo hello-from-sidecar; trap 'exit 0' TERM; while true; do sleep 1; done"],
                    "env": [
                        {"name": "GREETING", "value": "sidecar"},
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "side-env", "key": "token"}}}
                    ],
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1},
                    "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 3}
                }
            ]
        }
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    // The VM becomes ready, the side-car runs, but its readiness probe fails: the pod
    // is not Ready, and says which container holds it back.
    let held = wait_for(BOOT, "VM ready, side-car running", || async {
        let p = pods.get("hybrid").await.ok()?;
        let cs = p.status.as_ref()?.container_statuses.clone()?;
        let vm = cs.iter().find(|c| c.name == "vm")?;
        let s = side_status(&p)?;
        (vm.ready && s.state.as_ref()?.running.is_some()).then_some(p)
    })
    .await;
    assert!(!is_ready(&held), "{:?}", held.status);
    let s = side_status(&held).unwrap();
    assert!(!s.ready, "{s:?}");
    let cond = held
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(cond.status, "False");
    assert_eq!(
        cond.message.as_deref(),
        Some("containers with unready status: [side]")
    );
    let side_events = |reason: &'static str| {
        let events = events.clone();
        let uid = uid.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            Some(
                list.items
                    .into_iter()
                    .filter(|e| {
                        e.regarding.as_ref().and_then(|o| o.uid.as_deref()) == Some(uid.as_str())
                            && e.regarding.as_ref().and_then(|o| o.field_path.as_deref())
                                == Some("spec.containers{side}")
                            && e.reason.as_deref() == Some(reason)
                    })
                    .filter_map(|e| e.note)
                    .collect::<Vec<String>>(),
            )
        }
    };
    wait_for(
        Duration::from_secs(30),
        "readiness Unhealthy event",
        || async {
            side_events("Unhealthy")
                .await?
                .iter()
                .any(|n| n.starts_with("Readiness probe failed:"))
                .then_some(())
        },
    )
    .await;
    let (code, _) = side_exec(&provider, &ns, "hybrid", "touch /tmp/ready").await;
    assert_eq!(code, 0);

    // Ready: the VM answers SSH and the side-car passes its readiness probe.
    let ready = wait_for(Duration::from_secs(30), "hybrid Ready", || async {
        let p = pods.get("hybrid").await.ok()?;
        is_ready(&p).then_some(p)
    })
    .await;
    let st = ready.status.clone().unwrap();
    assert_eq!(st.phase.as_deref(), Some("Running"));
    assert!(st.pod_ip.is_some(), "the VM's IP is the pod IP");
    let s = side_status(&ready).unwrap();
    assert!(
        s.ready && s.state.as_ref().unwrap().running.is_some(),
        "{s:?}"
    );
    assert!(s.container_id.unwrap().starts_with("docker://"));
    assert!(s.image_id.starts_with("sha256:"), "{}", s.image_id);
    assert_eq!(docker_ids(&uid).len(), 1);

    // Events of the side-car's start, each naming its container like the kubelet's
    // (`regarding.fieldPath`), so the VM's and the side-car's are separate events.
    wait_for(Duration::from_secs(30), "side-car events", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let mine: Vec<&Event> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|o| o.uid.as_deref()) == Some(uid.as_str()))
            .collect();
        let about = |reason: &str, container: &str| {
            let path = format!("spec.containers{{{container}}}");
            mine.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|o| o.field_path.as_deref())
                        == Some(path.as_str())
            })
        };
        let both = |reason: &str| about(reason, "vm") && about(reason, "side");
        let has = |reason: &str| mine.iter().any(|e| e.reason.as_deref() == Some(reason));
        (has("Pulling") && has("Pulled") && both("Created") && both("Started")).then_some(())
    })
    .await;

    // logs, exec with its exit code, and the VM still answers too.
    let logs = wait_for(Duration::from_secs(20), "side-car logs", || async {
        let l = side_logs(&provider, &ns, "hybrid", LogOptions::default()).await;
        l.contains("hello-from-sidecar").then_some(l)
    })
    .await;
    assert!(!logs.contains("TERM"), "{logs}");
    let (code, out) = side_exec(&provider, &ns, "hybrid", "echo in-sidecar; exit 3").await;
    assert_eq!((code, out.trim()), (3, "in-sidecar"));
    let (code, out) = exec(&provider, &ns, "hybrid", "echo in-vm; exit 7").await;
    assert_eq!((code, out.trim()), (7, "in-vm"));

    // The kube-api-access volume ServiceAccount admission added reaches the side-car
    // too (a read-only bind), and its token authenticates as the pod's service account.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let (code, out) = side_exec(&provider, &ns, "hybrid", &format!("cat {sa}/namespace")).await;
    assert_eq!((code, out.trim()), (0, ns.as_str()));
    let (code, out) = side_exec(
        &provider,
        &ns,
        "hybrid",
        &format!("grep -c BEGIN {sa}/ca.crt"),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "1"));
    let (code, token) = side_exec(&provider, &ns, "hybrid", &format!("cat {sa}/token")).await;
    assert_eq!(code, 0);
    let status = review_token(&admin, token.trim()).await;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(
        status.user.and_then(|u| u.username).as_deref(),
        Some(format!("system:serviceaccount:{ns}:default").as_str())
    );
    let (code, _) = side_exec(&provider, &ns, "hybrid", &format!("touch {sa}/x")).await;
    assert_ne!(code, 0, "the token volume is read-only in the side-car");

    // port-forward: 8080 is declared only by the side-car (its loopback).
    let (mut client, server) = tokio::io::duplex(4096);
    let key = PodKey {
        namespace: ns.clone(),
        name: "hybrid".into(),
        uid: uid.clone(),
    };
    let p = provider.clone();
    let fwd = tokio::spawn(async move { p.port_forward(&key, 8080, Box::pin(server)).await });
    client
        .write_all(b"GET /ping HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut resp))
        .await
        .unwrap()
        .unwrap();
    drop(client);
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.contains("pong-sidecar"), "{resp}");
    tokio::time::timeout(Duration::from_secs(10), fwd)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // stats include the side-car.
    let stats = provider.pod_stats().await.unwrap();
    let ps = stats.iter().find(|s| s.pod_ref.uid == uid).unwrap();
    let sc = ps.containers.iter().find(|c| c.name == "side").unwrap();
    assert!(
        sc.memory
            .as_ref()
            .and_then(|m| m.working_set_bytes)
            .unwrap_or(0)
            > 0,
        "{sc:?}"
    );
    assert!(ps.containers.iter().any(|c| c.name == "vm"));

    // The main process exits (0, on SIGTERM): restartPolicy Always restarts it as a new
    // container; the previous one's logs stay readable.
    let (code, _) = side_exec(&provider, &ns, "hybrid", "kill -TERM 1").await;
    assert_eq!(code, 0);
    let restarted = wait_for(Duration::from_secs(60), "side-car restarted", || async {
        let p = pods.get("hybrid").await.ok()?;
        let s = side_status(&p)?;
        (s.restart_count == 1 && s.state.as_ref()?.running.is_some()).then_some(s)
    })
    .await;
    // A new container: the readiness file is gone until created again.
    assert!(!restarted.ready, "{restarted:?}");
    let (code, _) = side_exec(&provider, &ns, "hybrid", "touch /tmp/ready").await;
    assert_eq!(code, 0);
    wait_for(Duration::from_secs(30), "hybrid Ready again", || async {
        is_ready(&pods.get("hybrid").await.ok()?).then_some(())
    })
    .await;
    let last = restarted.last_state.unwrap().terminated.unwrap();
    assert_eq!(last.exit_code, 0);
    assert_eq!(last.reason.as_deref(), Some("Completed"));
    let previous = side_logs(
        &provider,
        &ns,
        "hybrid",
        LogOptions {
            previous: true,
            ..Default::default()
        },
    )
    .await;
    assert!(previous.contains("hello-from-sidecar"), "{previous}");
    assert_eq!(docker_ids(&uid).len(), 2, "current and previous attempt");

    // Liveness: the side-car's port 8080 closes (httpd killed); the tcpSocket probe,
    // dialled in the side-car's network namespace, fails 3 times: the side-car is
    // killed and restarted (restartCount 2), with Unhealthy and Killing events on it.
    let (code, _) = side_exec(&provider, &ns, "hybrid", "killall httpd").await;
    assert_eq!(code, 0);
    let relived = wait_for(Duration::from_secs(90), "liveness restart", || async {
        let p = pods.get("hybrid").await.ok()?;
        let s = side_status(&p)?;
        (s.restart_count == 2 && s.state.as_ref()?.running.is_some()).then_some(s)
    })
    .await;
    let last = relived.last_state.unwrap().terminated.unwrap();
    let msg = last.message.unwrap_or_default();
    assert!(
        msg.starts_with("Container side failed liveness probe: dial tcp 127.0.0.1:8080:"),
        "{msg}"
    );
    // The probe's own failure text (the Unhealthy event's note is not checked: the
    // node's event recorder folds a second Unhealthy on the same container into the
    // first one's series, keeping the first note).
    assert!(
        msg.ends_with("dial tcp 127.0.0.1:8080: connect: connection refused"),
        "{msg}"
    );
    assert!(!side_events("Unhealthy").await.unwrap().is_empty());
    let killing = side_events("Killing").await.unwrap();
    assert!(
        killing
            .iter()
            .any(|n| n == "Container side failed liveness probe, will be restarted"),
        "{killing:?}"
    );
    let (code, _) = side_exec(&provider, &ns, "hybrid", "touch /tmp/ready").await;
    assert_eq!(code, 0);
    wait_for(
        Duration::from_secs(30),
        "hybrid Ready after liveness",
        || async { is_ready(&pods.get("hybrid").await.ok()?).then_some(()) },
    )
    .await;

    // Agent restart: the side-car keeps running and is re-adopted, not re-created.
    let before = docker_ids(&uid);
    let provider = restart_provider(agent, provider, provider_args, &netns, &id).await;
    let agent = Agent::start(&id, provider.clone()).await;
    let (code, out) = wait_for(
        Duration::from_secs(60),
        "side-car exec after restart",
        || async {
            let sh = ["sh", "-c", "echo again; exit 4"];
            exec_argv(&provider, &side(&ns, "hybrid"), &sh).await.ok()
        },
    )
    .await;
    assert_eq!((code, out.trim()), (4, "again"));
    let mut after = docker_ids(&uid);
    let mut b = before.clone();
    after.sort();
    b.sort();
    assert_eq!(after, b, "no container created or removed by the restart");
    wait_for(
        Duration::from_secs(30),
        "hybrid Ready after restart",
        || async {
            let p = pods.get("hybrid").await.ok()?;
            let s = side_status(&p)?;
            (is_ready(&p) && s.restart_count == 2).then_some(())
        },
    )
    .await;

    // A side-car re-created after the agent restart has its env again (the plain value
    // and the secret), though no secret value is stored on the node's disk.
    let (code, out) = side_exec(&provider, &ns, "hybrid", "echo $GREETING/$TOKEN").await;
    assert_eq!(
        (code, out.trim()),
        (0, format!("sidecar/{secret_value}").as_str())
    );
    let (code, _) = side_exec(&provider, &ns, "hybrid", "kill -TERM 1").await;
    assert_eq!(code, 0);
    wait_for(Duration::from_secs(60), "side-car re-created", || async {
        let p = pods.get("hybrid").await.ok()?;
        let s = side_status(&p)?;
        (s.restart_count == 3 && s.state.as_ref()?.running.is_some()).then_some(())
    })
    .await;
    let (code, out) = side_exec(&provider, &ns, "hybrid", "echo $GREETING/$TOKEN").await;
    assert_eq!(
        (code, out.trim()),
        (0, format!("sidecar/{secret_value}").as_str())
    );
    let grep = Command::new("grep")
        .args(["-rl", "--", &secret_value])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "secret value on disk: {}",
        String::from_utf8_lossy(&grep.stdout)
    );

    // Deletion with grace: the side-car stops (SIGTERM → exit 0) and every container
    // labelled with the pod's UID is removed.
    delete_pod(&pods, "hybrid", 20, Duration::from_secs(90)).await;
    assert!(docker_ids(&uid).is_empty(), "no container left for {uid}");
    let list = events.list(&ListParams::default()).await.unwrap();
    let reasons: Vec<String> = list
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|o| o.uid.as_deref()) == Some(uid.as_str()))
        .map(|e| {
            format!(
                "{} {}",
                e.reason.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default()
            )
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("Killing")),
        "{reasons:?}"
    );
    assert!(
        !reasons
            .iter()
            .any(|r| r.starts_with("FailedKillPod") || r.starts_with("Failed ")),
        "{reasons:?}"
    );
    agent.stop().await;
    drop(provider);
    let _ = Command::new("docker").args(["rmi", &side_image]).output();
}
