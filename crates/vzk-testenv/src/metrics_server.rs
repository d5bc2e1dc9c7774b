//! metrics-server beside the control plane, so that `kubectl top node|pod` works
//! ([`ControlPlane::start_metrics_server`], opt-in).
//!
//! How it is wired, everything on loopback:
//!
//! * **Binary**: `$KUBEBUILDER_ASSETS/extra/metrics-server.xz` (v0.9), unpacked with `xz -dc`
//!   into the control plane's directory on first use.
//! * **Its identity**: a client certificate `CN=system:metrics-server` from the cluster CA,
//!   in its own kubeconfig. It uses it towards the API server (list nodes and pods,
//!   TokenReview/SubjectAccessReview for its callers, the
//!   `kube-system/extension-apiserver-authentication` ConfigMap) and towards each node's
//!   kubelet API, which verifies it against the cluster CA and asks the API server by
//!   SubjectAccessReview whether it may `get nodes/metrics`. RBAC grants exactly that: the
//!   ClusterRole `system:metrics-server` (`nodes/metrics` get, `nodes` and `pods`
//!   get/list/watch), `system:auth-delegator`, and the Role
//!   `extension-apiserver-authentication-reader` in `kube-system`.
//! * **Serving**: `127.0.0.1:<free port>` with a serving certificate from the cluster CA for
//!   `metrics-server.kube-system.svc` (the name the aggregator verifies), `localhost` and
//!   `127.0.0.1`. Requests proxied by the API server are authenticated by the front-proxy
//!   client certificate (`--requestheader-client-ca-file`, allowed name
//!   [`FRONT_PROXY_CLIENT_CN`](crate::FRONT_PROXY_CLIENT_CN)) and the `X-Remote-*` headers.
//! * **Routing**: the APIService `v1beta1.metrics.k8s.io` names the Service
//!   `kube-system/metrics-server` and metrics-server's port, with the cluster CA as its
//!   `caBundle`. That Service is of type `ExternalName` (`localhost`): Endpoints and
//!   EndpointSlices may not hold loopback addresses, and the aggregator (with its default
//!   cluster routing, no `--enable-aggregator-routing`) resolves an ExternalName Service to
//!   `https://<externalName>:<APIService port>`.
//! * **Scraping**: `--kubelet-preferred-address-types=InternalIP
//!   --kubelet-use-node-status-port` (each node's InternalIP and the port in its
//!   `status.daemonEndpoints`), `--kubelet-insecure-tls` (kubelets serve self-signed
//!   certificates unless given one), `--metric-resolution=10s` (the minimum) with
//!   `--kubelet-request-timeout=5s` (it must be shorter): a node has figures after two
//!   scrapes, 10 to 20 s after it registers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::{ControlPlane, FRONT_PROXY_CLIENT_CN, TestEnvError, io_err, process, write_kubeconfig};

/// The user metrics-server authenticates as (its client certificate's CN).
pub const METRICS_SERVER_USER: &str = "system:metrics-server";
/// The APIService metrics-server backs.
pub const METRICS_APISERVICE: &str = "v1beta1.metrics.k8s.io";
/// Namespace and name of the Service the APIService points at.
pub const METRICS_SERVICE: (&str, &str) = ("kube-system", "metrics-server");
/// metrics-server's scrape interval.
pub const METRIC_RESOLUTION: Duration = Duration::from_secs(10);

const FIELD_MANAGER: &str = "vzk-testenv";
/// How long to wait for the APIService to turn Available.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl ControlPlane {
    /// Starts metrics-server v0.9 (from `$KUBEBUILDER_ASSETS/extra/metrics-server.xz`) and
    /// registers it as the `v1beta1.metrics.k8s.io` APIService; returns once the API server
    /// reports that APIService Available. Stopped with the control plane (or by
    /// [`ControlPlane::stop_metrics_server`]). Calling it while it runs does nothing.
    ///
    /// `kubectl top node <n>` answers for a node about two scrapes
    /// ([`METRIC_RESOLUTION`]) after the node's kubelet API can be scraped.
    pub async fn start_metrics_server(&self) -> Result<(), TestEnvError> {
        let _one_at_a_time = self.metrics_server_start.lock().await;
        if self.metrics_server_running() {
            return Ok(());
        }
        let started = self.try_start_metrics_server().await;
        if started.is_err() {
            // Not half-started: the next call tries again from scratch.
            self.stop_metrics_server();
        }
        started
    }

    async fn try_start_metrics_server(&self) -> Result<(), TestEnvError> {
        let exe = self.unpack_extra_exe("metrics-server").await?;

        let user_cert = self.ca.client_cert(METRICS_SERVER_USER, &[])?;
        let kubeconfig = write_kubeconfig(
            &self.dir,
            "metrics-server",
            self.api_port,
            METRICS_SERVER_USER,
            &user_cert,
        )?;
        let (ns, svc) = METRICS_SERVICE;
        let svc_host = format!("{svc}.{ns}.svc");
        let serving = self
            .ca
            .serving_cert(&[svc_host.as_str(), "localhost", "127.0.0.1"])?;
        let write = |name: &str, data: &str| -> Result<PathBuf, TestEnvError> {
            let p = self.dir.join(name);
            std::fs::write(&p, data).map_err(io_err(format!("writing {}", p.display())))?;
            Ok(p)
        };
        let serving_crt = write("metrics-server-serving.crt", &serving.cert_pem)?;
        let serving_key = write("metrics-server-serving.key", &serving.key_pem)?;

        let client = self.admin_client().await;
        for (res, obj) in rbac() {
            apply(&client, &res, obj).await?;
        }

        let port = process::free_port().map_err(io_err("picking a free port"))?;
        let (d, kc) = (self.dir.display(), kubeconfig.display());
        let args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", serving_crt.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--requestheader-client-ca-file={d}/front-proxy-ca.crt"),
            format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT_CN}"),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--kubelet-client-certificate={d}/metrics-server.crt"),
            format!("--kubelet-client-key={d}/metrics-server.key"),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--kubelet-use-node-status-port".into(),
            "--kubelet-insecure-tls".into(),
            format!("--metric-resolution={}s", METRIC_RESOLUTION.as_secs()),
            // Must stay below the resolution; a loopback kubelet answers in milliseconds.
            "--kubelet-request-timeout=5s".into(),
        ];
        let child = self.spawn_exe(&exe, "metrics-server", &args)?;
        crate::set(&self.metrics_server, child);

        // Register it only once it listens: the aggregator backs off from a failing
        // discovery check (up to 30 s between tries).
        let deadline = Instant::now() + READY_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            self.check_metrics_server_alive()?;
            if Instant::now() > deadline {
                return Err(TestEnvError::NotReady {
                    what: "metrics-server (listening)",
                    secs: READY_TIMEOUT.as_secs(),
                    log: self.metrics_server_log_path().display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ca_bundle =
            serde_json::to_value(k8s_openapi::ByteString(self.ca_pem.as_bytes().to_vec()))
                .unwrap_or_default();
        apply(
            &client,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("", "v1", "Service"),
                "services",
            ),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": svc, "namespace": ns },
                "spec": { "type": "ExternalName", "externalName": "localhost" },
            }),
        )
        .await?;
        let apiservice = apiservice_resource();
        apply(
            &client,
            &apiservice,
            json!({
                "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
                "metadata": { "name": METRICS_APISERVICE },
                "spec": {
                    "group": "metrics.k8s.io", "version": "v1beta1",
                    "service": { "namespace": ns, "name": svc, "port": port },
                    "caBundle": ca_bundle,
                    "groupPriorityMinimum": 100, "versionPriority": 100,
                },
            }),
        )
        .await?;

        let api: Api<DynamicObject> = Api::all_with(client, &apiservice);
        let mut condition: String;
        loop {
            self.check_metrics_server_alive()?;
            match api.get(METRICS_APISERVICE).await {
                Ok(o) => match available(&o) {
                    Ok(()) => return Ok(()),
                    Err(c) => condition = c,
                },
                Err(e) => condition = format!("reading it: {e}"),
            }
            if Instant::now() > deadline {
                return Err(TestEnvError::ApiServiceUnavailable {
                    name: METRICS_APISERVICE,
                    secs: READY_TIMEOUT.as_secs(),
                    condition,
                    log: self.metrics_server_log_path().display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops metrics-server if it runs (the APIService stays, unavailable).
    pub fn stop_metrics_server(&self) {
        if let Ok(mut g) = self.metrics_server.lock()
            && let Some(mut c) = g.take()
        {
            process::kill(&mut c);
        }
    }

    /// metrics-server's log (stdout and stderr).
    pub fn metrics_server_log_path(&self) -> PathBuf {
        self.dir.join("metrics-server.log")
    }

    fn metrics_server_running(&self) -> bool {
        self.metrics_server
            .lock()
            .map(|mut g| g.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))))
            .unwrap_or(false)
    }

    fn check_metrics_server_alive(&self) -> Result<(), TestEnvError> {
        let exited = self
            .metrics_server
            .lock()
            .ok()
            .and_then(|mut g| g.as_mut().and_then(|c| c.try_wait().ok().flatten()));
        match exited {
            Some(status) => Err(TestEnvError::Exited {
                what: "metrics-server",
                status,
                log: self.metrics_server_log_path().display().to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// `xz -dc src > dst`, made executable; written under a temporary name first.
pub(crate) fn unpack_xz(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = dst.with_extension("partial");
    let out = std::fs::File::create(&tmp)?;
    let status = std::process::Command::new("xz")
        .arg("-dc")
        .arg(src)
        .stdout(out)
        .status()?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::other(format!("xz exited with {status}")));
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dst)
}

fn apiservice_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    )
}

/// Ok if the APIService is Available, else its Available condition as `reason: message`.
fn available(o: &DynamicObject) -> Result<(), String> {
    let conditions = o.data["status"]["conditions"].as_array();
    let Some(c) = conditions.and_then(|cs| cs.iter().find(|c| c["type"] == "Available")) else {
        return Err("no Available condition yet".into());
    };
    if c["status"] == "True" {
        return Ok(());
    }
    Err(format!(
        "{}: {}",
        c["reason"].as_str().unwrap_or("-"),
        c["message"].as_str().unwrap_or("-")
    ))
}

/// What metrics-server may do, as its upstream manifest grants it, for a user instead of
/// a service account.
fn rbac() -> Vec<(ApiResource, serde_json::Value)> {
    let rbac = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind),
            plural,
        )
    };
    let user = json!([{
        "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": METRICS_SERVER_USER,
    }]);
    vec![
        (
            rbac("ClusterRole", "clusterroles"),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": { "name": "system:metrics-server" },
                "rules": [
                    { "apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"] },
                    { "apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"] },
                ],
            }),
        ),
        (
            rbac("ClusterRoleBinding", "clusterrolebindings"),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": "system:metrics-server" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:metrics-server" },
                "subjects": user,
            }),
        ),
        (
            rbac("ClusterRoleBinding", "clusterrolebindings"),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": "metrics-server:system:auth-delegator" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator" },
                "subjects": user,
            }),
        ),
        (
            rbac("RoleBinding", "rolebindings"),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": { "name": "metrics-server-auth-reader", "namespace": "kube-system" },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "extension-apiserver-authentication-reader" },
                "subjects": user,
            }),
        ),
    ]
}

/// Server-side apply of `obj` (named by its `metadata`).
pub(crate) async fn apply(
    client: &kube::Client,
    res: &ApiResource,
    obj: serde_json::Value,
) -> Result<(), TestEnvError> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, res),
        None => Api::all_with(client.clone(), res),
    };
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map(drop)
    .map_err(|source| TestEnvError::Api {
        what: format!("applying {} {name}", res.kind),
        source,
    })
}
