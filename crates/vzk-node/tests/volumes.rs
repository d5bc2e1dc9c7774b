//! Pod volumes against a real kube-apiserver (Node,RBAC + NodeRestriction, ServiceAccount
//! admission), materialised as the node's own identity: configMap, secret, downwardAPI,
//! emptyDir, hostPath and the `kube-api-access-*` projected volume admission adds;
//! refresh of content and tokens; refusals the Node authorizer makes.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use support::{cp, node_name, wait_for};
use vzk_node::volumes::{
    Clock, ObjectReader, VolumeConfig, VolumeError, VolumeKind, VolumeManager, binds_for,
};

const T: Duration = Duration::from_secs(30);

/// A clock the test moves by hand.
struct FakeClock(Mutex<SystemTime>);

impl FakeClock {
    fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap();
        *t += d;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "vzk-volumes-{tag}-{}-{:06x}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xff_ffff)
        .unwrap_or(0)
}

async fn create<K>(api: &Api<K>, v: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(v).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

async fn review(admin: &kube::Client, token: &str) -> (bool, Option<String>) {
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: None,
        },
        ..Default::default()
    };
    let r = Api::<TokenReview>::all(admin.clone())
        .create(&PostParams::default(), &tr)
        .await
        .unwrap();
    let s = r.status.unwrap_or_default();
    (
        s.authenticated.unwrap_or(false),
        s.user.and_then(|u| u.username),
    )
}

/// Sets up with retries while the Node authorizer's graph catches up with a new pod.
async fn setup(mgr: &VolumeManager, pod: &Pod) -> vzk_node::volumes::PodVolumes {
    wait_for(T, "volumes set up", || async {
        match mgr.setup(pod).await {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("setup: {}", vzk_testenv::error_chain(&e));
                None
            }
        }
    })
    .await
}

#[tokio::test]
async fn volumes_are_materialised_as_the_node_and_kept_current() {
    let node = node_name("vol");
    let id = cp().node_identity(&node);
    let admin = cp().admin_client().await;
    let ns = cp().create_namespace("vol").await;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    create(
        &cms,
        serde_json::json!({
            "metadata": {"name": "app"},
            "data": {"app.conf": "x=1\n"},
            "binaryData": {"blob.bin": "AAEC/w=="}
        }),
    )
    .await;
    create(
        &secrets,
        serde_json::json!({
            "metadata": {"name": "creds"},
            "stringData": {"user": "admin", "pass": "s3cret"}
        }),
    )
    .await;
    let host = tmpdir("host");
    std::fs::write(host.join("keep"), "host data").unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    // Created WITHOUT a token volume: ServiceAccount admission adds kube-api-access-*.
    let pod = create(
        &pods,
        serde_json::json!({
            "metadata": {"name": "web", "labels": {"app": "web", "tier": "front"}},
            "spec": {
                "nodeName": node,
                "containers": [{
                    "name": "vm", "image": "example/vm:1",
                    "resources": {"limits": {"memory": "128Mi"}},
                    "volumeMounts": [
                        {"name": "cfg", "mountPath": "/etc/app"},
                        {"name": "creds", "mountPath": "/creds"},
                        {"name": "scratch", "mountPath": "/scratch", "subPath": "sub"},
                        {"name": "host", "mountPath": "/host", "readOnly": true}
                    ]
                }],
                "volumes": [
                    {"name": "cfg", "configMap": {"name": "app"}},
                    {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400,
                        "items": [{"key": "user", "path": "u/name"}, {"key": "pass", "path": "pw", "mode": 0o440}]}},
                    {"name": "info", "downwardAPI": {"items": [
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                        {"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}},
                        {"path": "mem", "resourceFieldRef": {"containerName": "vm", "resource": "limits.memory", "divisor": "1Mi"}}
                    ]}},
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "host", "hostPath": {"path": host.display().to_string(), "type": "Directory"}}
                ]
            }
        }),
    )
    .await;
    let uid = pod.metadata.uid.clone().unwrap();
    let spec = pod.spec.clone().unwrap();
    let token_vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name.starts_with("kube-api-access-"))
        .cloned()
        .expect("ServiceAccount admission adds the kube-api-access volume");
    assert!(token_vol.projected.is_some());

    let root = tmpdir("root");
    let clock = Arc::new(FakeClock(Mutex::new(SystemTime::now())));
    let mgr = VolumeManager::with_config(
        id.client().await,
        &root,
        VolumeConfig {
            resync_period: Duration::from_millis(300),
            clock: clock.clone(),
            ..Default::default()
        },
    );
    let vols = setup(&mgr, &pod).await;
    let dir = root.join(&uid).join("volumes");
    assert_eq!(vols.volumes.len(), 6, "{vols:?}");

    // configMap: data and binaryData, 0644 by default, through `..data` links.
    assert_eq!(read(&dir.join("cfg/app.conf")), "x=1\n");
    assert_eq!(
        std::fs::read(dir.join("cfg/blob.bin")).unwrap(),
        vec![0, 1, 2, 255]
    );
    assert_eq!(mode(&dir.join("cfg/app.conf")), 0o644);
    assert_eq!(
        std::fs::read_link(dir.join("cfg/app.conf")).unwrap(),
        PathBuf::from("..data/app.conf")
    );
    // secret: items, nested paths, defaultMode and per-item mode.
    assert_eq!(read(&dir.join("creds/u/name")), "admin");
    assert_eq!(mode(&dir.join("creds/u/name")), 0o400);
    assert_eq!(read(&dir.join("creds/pw")), "s3cret");
    assert_eq!(mode(&dir.join("creds/pw")), 0o440);
    assert!(!dir.join("creds/user").exists());
    // downwardAPI.
    assert_eq!(
        read(&dir.join("info/labels")),
        "app=\"web\"\ntier=\"front\"\n"
    );
    assert_eq!(read(&dir.join("info/name")), "web");
    assert_eq!(read(&dir.join("info/uid")), uid);
    assert_eq!(read(&dir.join("info/mem")), "128");
    // emptyDir and hostPath.
    assert_eq!(vols.volumes["scratch"].kind, VolumeKind::EmptyDir);
    assert!(dir.join("scratch").is_dir());
    assert_eq!(vols.volumes["host"].host_path, host);
    // kube-api-access: token, ca.crt, namespace; 0644 (not the reference's 0755).
    let ka = dir.join(&token_vol.name);
    let token = read(&ka.join("token"));
    assert_eq!(mode(&ka.join("token")), 0o644);
    assert_eq!(read(&ka.join("ca.crt")), cp().ca_cert_pem());
    assert_eq!(read(&ka.join("namespace")), ns);
    let (ok, user) = review(&admin, &token).await;
    assert!(ok, "the projected token authenticates");
    assert_eq!(
        user.as_deref(),
        Some(format!("system:serviceaccount:{ns}:default").as_str())
    );

    // Binds for a side-car: subPath created in the emptyDir, read-only flags.
    let binds = binds_for(&vols, &spec.containers[0]).unwrap();
    // (admission added the token mount to the container too)
    assert_eq!(binds.len(), 5, "{binds:?}");
    assert_eq!(
        binds[4].container_path,
        "/var/run/secrets/kubernetes.io/serviceaccount"
    );
    assert!(binds[4].read_only && binds[4].host_path == ka);
    assert!(binds[0].read_only, "configMap binds are read-only");
    assert!(binds[2].host_path.ends_with("scratch/sub") && binds[2].host_path.is_dir());
    assert!(binds[3].read_only && binds[3].host_path == host);

    // No refresh before 80% of the token's lifetime, however many passes run.
    wait_for(T, "three refresh passes", || async {
        (mgr.stats(&uid)?.passes >= 4).then_some(())
    })
    .await;
    assert_eq!(mgr.stats(&uid).unwrap().token_requests, 1);
    assert_eq!(read(&ka.join("token")), token);

    // A changed ConfigMap reaches the volume by the periodic re-sync.
    cms.patch(
        "app",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"app.conf": "x=2\n"}})),
    )
    .await
    .unwrap();
    wait_for(T, "configMap update in the volume", || async {
        (std::fs::read_to_string(dir.join("cfg/app.conf")).ok()? == "x=2\n").then_some(())
    })
    .await;
    // Only one version directory is left behind the swap.
    let versions = std::fs::read_dir(dir.join("cfg"))
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("..") && n != "..data"
        })
        .count();
    assert_eq!(versions, 1);

    // 80% of the token's lifetime later (on the injected clock), a new token is
    // requested from the real API server and swapped in.
    clock.advance(Duration::from_secs(3607 * 8 / 10 + 1));
    let new_token = wait_for(T, "token refresh", || async {
        let t = std::fs::read_to_string(ka.join("token")).ok()?;
        (t != token && !t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(mgr.stats(&uid).unwrap().token_requests, 2);
    let (ok, user) = review(&admin, &new_token).await;
    assert!(ok);
    assert_eq!(
        user.as_deref(),
        Some(format!("system:serviceaccount:{ns}:default").as_str())
    );

    // Teardown: refresh stops, the volume dir goes, links are not followed into the
    // hostPath (a link to it inside the emptyDir must not take its content along).
    std::os::unix::fs::symlink(&host, dir.join("scratch/link-to-host")).unwrap();
    mgr.teardown(&uid).await.unwrap();
    assert!(!dir.exists());
    assert!(mgr.stats(&uid).is_none());
    assert_eq!(read(&host.join("keep")), "host data");
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&host);
}

#[tokio::test]
async fn the_api_server_refuses_what_no_pod_of_this_node_references() {
    let node = node_name("volr");
    let other = node_name("volo");
    let id = cp().node_identity(&node);
    let admin = cp().admin_client().await;
    let ns = cp().create_namespace("volr").await;
    let ns2 = cp().create_namespace("volr2").await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    create(
        &secrets,
        serde_json::json!({"metadata": {"name": "theirs"}, "stringData": {"k": "v"}}),
    )
    .await;
    create(
        &Api::<Secret>::namespaced(admin.clone(), &ns2),
        serde_json::json!({"metadata": {"name": "elsewhere"}, "stringData": {"k": "v"}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    // Our own pod: a missing ConfigMap (not optional) and an optional one.
    let ours = create(
        &pods,
        serde_json::json!({
            "metadata": {"name": "ours"},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": false,
                "containers": [{"name": "vm", "image": "example/vm:1"}],
                "volumes": [
                    {"name": "maybe", "configMap": {"name": "absent-too", "optional": true}},
                    {"name": "cfg", "configMap": {"name": "absent"}}
                ]
            }
        }),
    )
    .await;
    // A pod of another node referencing a Secret.
    let theirs = create(
        &pods,
        serde_json::json!({
            "metadata": {"name": "theirs"},
            "spec": {
                "nodeName": other,
                "containers": [{"name": "vm", "image": "example/vm:1"}],
                "volumes": [{"name": "s", "secret": {"secretName": "theirs"}}]
            }
        }),
    )
    .await;
    let root = tmpdir("refuse");
    let client = id.client().await;
    let mgr = VolumeManager::new(client.clone(), &root);

    // Not found: a clear error naming volume and object (once the graph knows our pod).
    let msg = wait_for(T, "configmap not found", || async {
        match mgr.setup(&ours).await {
            Err(e @ VolumeError::ObjectNotFound { .. }) => Some(e.to_string()),
            _ => None,
        }
    })
    .await;
    assert_eq!(msg, "volume \"cfg\": configmap \"absent\" not found");

    // The Node authorizer refuses a Secret only another node's pod references...
    match mgr.setup(&theirs).await {
        Err(VolumeError::Fetch {
            volume,
            kind,
            source,
            ..
        }) => match *source {
            kube::Error::Api(s) => {
                assert_eq!((volume.as_str(), kind, s.code), ("s", "secret", 403));
            }
            other => panic!("expected a 403 on the secret, got {other:?}"),
        },
        other => panic!("expected a 403 on the secret, got {other:?}"),
    }
    // ... and one of another namespace that no pod of ours references.
    let mut reader = ObjectReader::new(client.clone());
    match reader.secret(&ns2, "elsewhere").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("expected 403, got {other:?}"),
    }
    // The admin can read both: the refusals are the authorizer's, not missing objects.
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &ns2)
            .get("elsewhere")
            .await
            .is_ok()
    );

    // Unsupported types and sources are named.
    let local: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x", "namespace": ns, "uid": "local-1"},
        "spec": {"containers": [], "volumes": [
            {"name": "bundle", "projected": {"sources": [
                {"clusterTrustBundle": {"signerName": "example.com/x", "path": "b.pem"}}
            ]}}
        ]}
    }))
    .unwrap();
    let e = mgr.setup(&local).await.err().map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some(
            "volume \"bundle\": projected clusterTrustBundle source is not supported by this node"
        )
    );
    let local: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x", "namespace": ns, "uid": "local-2"},
        "spec": {"containers": [], "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "c"}}
        ]}
    }))
    .unwrap();
    let e = mgr.setup(&local).await.err().map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("volume \"data\": volume type persistentVolumeClaim is not supported by this node")
    );
    let _ = std::fs::remove_dir_all(&root);
}
