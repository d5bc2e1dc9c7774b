//! Volumes end to end: a VM pod created WITHOUT a token volume gets the
//! `kube-api-access-*` projected volume from ServiceAccount admission; with a configMap
//! volume it reaches Ready, and inside the VM the token, `ca.crt` and `namespace` are
//! at `/var/run/secrets/kubernetes.io/serviceaccount`, the token authenticates as the
//! pod's service account, the configMap is at its mountPath, read-only; deletion
//! removes the volumes.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, PostParams};

use super::support::*;
use super::{BOOT, exec, is_ready};

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_api_access_and_config_map_volumes_inside_the_vm() {
    let env = TestNode::start("vmvol", |_| {}).await;
    let image = env.push_guest("test-guest", "").await;
    let TestNode {
        cp,
        ns,
        admin,
        pods,
        agent,
        provider,
        node,
        data,
        ..
    } = env;
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app"},
        "data": {"greeting": "hello from a configmap\n"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "vol"},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "vm", "image": image, "imagePullPolicy": "IfNotPresent",
                "resources": {"requests": {"cpu": "1", "memory": "256Mi"}},
                "volumeMounts": [
                    {"name": "cfg", "mountPath": "/etc/app"},
                    // One key as a file, into a directory the guest does not have.
                    {"name": "cfg", "mountPath": "/opt/greet/hello.txt", "subPath": "greeting"}
                ]
            }],
            "volumes": [{"name": "cfg", "configMap": {"name": "app"}}]
        }
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    // ServiceAccount admission added the projected volume and its mount.
    let spec = created.spec.clone().unwrap();
    let ka = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name.starts_with("kube-api-access-"))
        .expect("admission adds kube-api-access-*");
    let sources = ka.projected.as_ref().unwrap().sources.clone().unwrap();
    assert!(sources.iter().any(|s| s.service_account_token.is_some()));
    assert!(
        spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == SA_DIR && m.name == ka.name)
    );

    wait_for(BOOT, "pod Ready", || async {
        let p = pods.get("vol").await.ok()?;
        is_ready(&p).then_some(())
    })
    .await;

    // Inside the VM: the service-account files and the configMap at their mountPaths.
    let (code, token) = exec(&provider, &ns, "vol", &format!("cat {SA_DIR}/token")).await;
    assert_eq!(code, 0, "{token}");
    assert!(token.split('.').count() == 3, "a JWT: {token}");
    let (code, ca) = exec(&provider, &ns, "vol", &format!("cat {SA_DIR}/ca.crt")).await;
    assert_eq!((code, ca.as_str()), (0, cp.ca_cert_pem()));
    let (code, got_ns) = exec(&provider, &ns, "vol", &format!("cat {SA_DIR}/namespace")).await;
    assert_eq!((code, got_ns.as_str()), (0, ns.as_str()));
    let (code, greeting) = exec(&provider, &ns, "vol", "cat /etc/app/greeting").await;
    assert_eq!((code, greeting.as_str()), (0, "hello from a configmap\n"));
    let (code, file) = exec(&provider, &ns, "vol", "cat /opt/greet/hello.txt").await;
    assert_eq!((code, file.as_str()), (0, "hello from a configmap\n"));
    // Mounted with 9p, read-only.
    let (code, mounts) = exec(&provider, &ns, "vol", "cat /proc/mounts").await;
    assert_eq!(code, 0);
    let line = mounts
        .lines()
        .find(|l| l.contains(" /etc/app "))
        .unwrap_or_else(|| panic!("/etc/app not mounted: {mounts}"));
    assert!(line.contains(" 9p ") && line.contains("ro,"), "{line}");
    let (code, _) = exec(&provider, &ns, "vol", "touch /etc/app/x 2>/dev/null").await;
    assert_ne!(code, 0, "the configMap volume is read-only");

    // The token authenticates as the pod's service account.
    let status = review_token(&admin, token.trim()).await;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:default").as_str())
    );
    // Bound to this pod.
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra
            .get("authentication.kubernetes.io/pod-uid")
            .and_then(|v| v.first())
            .map(String::as_str),
        Some(uid.as_str()),
        "{extra:?}"
    );

    // Deletion removes the VM and the volumes on the host.
    let vol_dir = data.join("pods").join(&uid).join("volumes");
    assert!(vol_dir.join(&ka.name).join("token").exists());
    delete_pod(&pods, "vol", 10, Duration::from_secs(60)).await;
    wait_for(Duration::from_secs(30), "pod dir removed", || async {
        (!data.join("pods").join(&uid).exists()).then_some(())
    })
    .await;
    agent.stop().await;
    drop(provider);
}
