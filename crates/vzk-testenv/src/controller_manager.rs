//! The real kube-controller-manager beside the control plane, for certificate signing
//! requests (opt-in: [`ControlPlane::start_controller_manager`]), and kubeadm-style
//! bootstrap tokens ([`ControlPlane::bootstrap_token`]).
//!
//! * **Binary**: `$KUBEBUILDER_ASSETS/extra/kube-controller-manager.xz` (v1.37), unpacked
//!   with `xz -dc` into the control plane's directory on first use.
//! * **Controllers**: `csrapproving` (approves node client CSRs whose requester may create
//!   `certificatesigningrequests/nodeclient` or, for a node renewing its own,
//!   `.../selfnodeclient`; never `kubernetes.io/kubelet-serving` CSRs: those are approved by
//!   hand, `kubectl certificate approve`), `csrsigning` (signs approved CSRs with the
//!   cluster CA, `--cluster-signing-cert-file/--cluster-signing-key-file`, for at most
//!   [`ControllerManagerOptions::signing_duration`]) and `csrcleaner`. It runs as the admin
//!   (`--kubeconfig`), without leader election and without a serving port.
//! * **Bootstrap tokens** need a control plane started with
//!   [`ControlPlaneOptions::bootstrap_token_auth`](crate::ControlPlaneOptions). A token is a
//!   Secret `kube-system/bootstrap-token-<id>` of type `bootstrap.kubernetes.io/token`; it
//!   authenticates as `system:bootstrap:<id>` in the groups `system:bootstrappers` and
//!   `system:bootstrappers:kubeadm:default-node-token`. RBAC as kubeadm lays it out, for the
//!   group `system:bootstrappers`: `system:node-bootstrapper` (create and watch CSRs) and
//!   auto-approval of node client certificates
//!   (`system:certificates.k8s.io:certificatesigningrequests:nodeclient`); for the group
//!   `system:nodes`: auto-approval of a node's renewal of its own client certificate
//!   (`...:selfnodeclient`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::metrics_server::apply;
use crate::{ControlPlane, TestEnvError, io_err};

/// Group of users who may join as nodes but whose CSRs the controller-manager does not
/// approve ([`ControlPlane::bootstrap_kubeconfig_without_auto_approval`]).
pub const MANUAL_APPROVAL_GROUP: &str = "vzk:bootstrappers-manual-approval";

/// Settings of the controller-manager.
#[derive(Debug, Clone, Copy)]
pub struct ControllerManagerOptions {
    /// `--cluster-signing-duration`: the longest certificate the signer issues.
    pub signing_duration: Duration,
}

impl Default for ControllerManagerOptions {
    fn default() -> Self {
        Self {
            signing_duration: Duration::from_secs(24 * 3600),
        }
    }
}

/// A bootstrap token and a kubeconfig that presents it.
#[derive(Debug, Clone)]
pub struct BootstrapToken {
    /// `<id>.<secret>`.
    pub token: String,
    /// The token id (the user is `system:bootstrap:<id>`).
    pub id: String,
    /// Kubeconfig: the API server, the cluster CA, the token.
    pub kubeconfig: PathBuf,
}

fn rbac(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind),
        plural,
    )
}

fn binding(name: &str, role: &str, group: &str) -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group }],
    })
}

/// A random string of `n` characters of `[a-z0-9]` (the bootstrap token alphabet).
fn token_chars(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}

impl ControlPlane {
    /// Starts kube-controller-manager v1.37 with the CSR controllers (see the module
    /// docs); returns once it runs. Calling it again restarts it with `options`.
    pub async fn start_controller_manager(
        &self,
        options: ControllerManagerOptions,
    ) -> Result<(), TestEnvError> {
        self.stop_controller_manager();
        let exe = self.unpack_extra_exe("kube-controller-manager").await?;
        let ca_key = self.dir.join("ca.key");
        std::fs::write(&ca_key, self.ca.key_pem())
            .map_err(io_err(format!("writing {}", ca_key.display())))?;
        let port = crate::process::free_port().map_err(io_err("picking a free port"))?;
        let (d, kc) = (self.dir.display(), self.admin_kubeconfig.display());
        let args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={d}/controller-manager-certs"),
            "--leader-elect=false".into(),
            "--controllers=csrapproving,csrsigning,csrcleaner".into(),
            format!("--service-account-private-key-file={d}/sa.key"),
            format!("--root-ca-file={d}/ca.crt"),
            "--use-service-account-credentials=false".into(),
            format!("--cluster-signing-cert-file={d}/ca.crt"),
            format!("--cluster-signing-key-file={}", ca_key.display()),
            format!(
                "--cluster-signing-duration={}s",
                options.signing_duration.as_secs()
            ),
        ];
        let child = self.spawn_exe(&exe, "kube-controller-manager", &args)?;
        crate::set(&self.controller_manager, child);
        // It serves its health port once its controllers are set up.
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            let exited = self
                .controller_manager
                .lock()
                .ok()
                .and_then(|mut g| g.as_mut().and_then(|c| c.try_wait().ok().flatten()));
            if let Some(status) = exited {
                return Err(TestEnvError::Exited {
                    what: "kube-controller-manager",
                    status,
                    log: self.controller_manager_log_path().display().to_string(),
                });
            }
            if Instant::now() > deadline {
                return Err(TestEnvError::NotReady {
                    what: "kube-controller-manager",
                    secs: 60,
                    log: self.controller_manager_log_path().display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Stops kube-controller-manager if it runs.
    pub fn stop_controller_manager(&self) {
        if let Ok(mut g) = self.controller_manager.lock()
            && let Some(mut c) = g.take()
        {
            crate::process::kill(&mut c);
        }
    }

    /// kube-controller-manager's log (stdout and stderr).
    pub fn controller_manager_log_path(&self) -> PathBuf {
        self.dir.join("kube-controller-manager.log")
    }

    /// Creates a bootstrap token (valid for an hour) and the RBAC kubeadm sets up for
    /// joining nodes (see the module docs); needs
    /// [`ControlPlaneOptions::bootstrap_token_auth`](crate::ControlPlaneOptions).
    pub async fn bootstrap_token(&self) -> Result<BootstrapToken, TestEnvError> {
        let client = self.admin_client().await;
        let crb = rbac("ClusterRoleBinding", "clusterrolebindings");
        for obj in [
            binding(
                "kubeadm:kubelet-bootstrap",
                "system:node-bootstrapper",
                "system:bootstrappers",
            ),
            binding(
                "kubeadm:node-autoapprove-bootstrap",
                "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
                "system:bootstrappers",
            ),
            binding(
                "kubeadm:node-autoapprove-certificate-rotation",
                "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
                "system:nodes",
            ),
        ] {
            apply(&client, &crb, obj).await?;
        }
        let (id, secret) = (token_chars(6), token_chars(16));
        let expiration = k8s_openapi::jiff::Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_hours(1))
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
        let secrets = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("", "v1", "Secret"),
            "secrets",
        );
        apply(
            &client,
            &secrets,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": format!("bootstrap-token-{id}"), "namespace": "kube-system" },
                "type": "bootstrap.kubernetes.io/token",
                "stringData": {
                    "token-id": id,
                    "token-secret": secret,
                    "expiration": expiration.to_string(),
                    "usage-bootstrap-authentication": "true",
                    "usage-bootstrap-signing": "true",
                    "auth-extra-groups": "system:bootstrappers:kubeadm:default-node-token",
                },
            }),
        )
        .await?;
        let token = format!("{id}.{secret}");
        let kubeconfig = self.write_token_kubeconfig(&format!("bootstrap-{id}"), &token)?;
        Ok(BootstrapToken {
            token,
            id,
            kubeconfig,
        })
    }

    /// A kubeconfig for a joining node whose CSRs are *not* auto-approved: a client
    /// certificate `CN=<user>, O=`[`MANUAL_APPROVAL_GROUP`], a group bound only to
    /// `system:node-bootstrapper` (create and watch CSRs). Its CSRs stay pending until a
    /// test approves or denies them.
    pub async fn bootstrap_kubeconfig_without_auto_approval(
        &self,
        user: &str,
    ) -> Result<PathBuf, TestEnvError> {
        let client = self.admin_client().await;
        apply(
            &client,
            &rbac("ClusterRoleBinding", "clusterrolebindings"),
            binding(
                "vzk:manual-approval-bootstrap",
                "system:node-bootstrapper",
                MANUAL_APPROVAL_GROUP,
            ),
        )
        .await?;
        let cert = self.ca.client_cert(user, &[MANUAL_APPROVAL_GROUP])?;
        crate::write_kubeconfig(
            &self.dir,
            &format!("joiner-{user}"),
            self.api_port,
            user,
            &cert,
        )
    }

    fn write_token_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf, TestEnvError> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "vzk-test", "cluster": {
                "server": self.server_url(),
                "certificate-authority": self.ca_cert_path(),
            }}],
            "users": [{ "name": name, "user": { "token": token } }],
            "contexts": [{ "name": "vzk-test", "context": { "cluster": "vzk-test", "user": name }}],
            "current-context": "vzk-test",
        });
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let yaml = serde_yaml::to_string(&config).map_err(|e| TestEnvError::Io {
            what: format!("serialising {}", path.display()),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&path, yaml).map_err(io_err(format!("writing {}", path.display())))?;
        Ok(path)
    }
}
