//! Test environment for vz-kubelet's integration tests: a real `etcd` and
//! `kube-apiserver` on loopback, as a real cluster runs them.
//!
//! * Binaries come from `KUBEBUILDER_ASSETS` (the envtest convention).
//! * The API server runs with `--authorization-mode=Node,RBAC` and the `NodeRestriction`
//!   admission plugin, ServiceAccount admission on, and an audit log of every request.
//! * Since no controller-manager runs, [`ControlPlane::create_namespace`] creates what it
//!   would: the `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap.
//! * Each node under test gets its own identity ([`ControlPlane::node_identity`]:
//!   `CN=system:node:<name>, O=system:nodes`); test code that plays the user uses
//!   [`ControlPlane::admin_client`] (`O=system:masters`).
//!
//! # Sharing and teardown
//! [`ControlPlane::shared`] starts one control plane per test binary on first use; tests
//! share it and isolate themselves by namespace and node name. Clients are built per test
//! (a `kube::Client` is tied to the tokio runtime it was made in). The daemons are spawned
//! with `PR_SET_PDEATHSIG` (on macOS: with a watchdog), so they die with the test process
//! even when a test panics.
//! [`ControlPlane::start`] gives a private control plane (for tests that stop the API
//! server); dropping it stops its daemons and removes its directory.
//!
//! # Aggregation layer and metrics-server
//! The API server always runs with the aggregation layer configured as kubeadm sets it up
//! (a front-proxy CA of its own, `--requestheader-*`, `--proxy-client-cert-file/key`); it
//! costs nothing until an APIService exists. [`ControlPlane::start_metrics_server`] (opt-in)
//! adds metrics-server v0.9 from `$KUBEBUILDER_ASSETS/extra`, so that `kubectl top` works;
//! see the [`metrics_server`] module for how it is wired.
//!
//! # Controller-manager, bootstrap tokens and CSRs
//! [`ControlPlane::start_with`] with [`ControlPlaneOptions::bootstrap_token_auth`] gives a
//! private control plane whose API server accepts bootstrap tokens (and, with
//! [`ControlPlaneOptions::kubelet_certificate_authority`], verifies kubelets' serving
//! certificates against the cluster CA); [`ControlPlane::start_controller_manager`] adds the
//! real kube-controller-manager (CSR approving, signing and cleaning) and
//! [`ControlPlane::bootstrap_token`] a kubeadm-style token with its RBAC; see the
//! [`controller_manager`] module.
//!
//! # Scheduler and node lifecycle
//! On a private control plane, [`ControlPlane::start_scheduler`] (opt-in) adds the real
//! kube-scheduler and [`ControlPlane::start_node_lifecycle_controller`] a
//! kube-controller-manager running only the node lifecycle and taint eviction controllers;
//! see the [`scheduler`] and [`node_lifecycle`] modules.

pub mod controller_manager;
pub mod fixtures;
pub mod metrics_server;
pub mod node_lifecycle;
mod pki;
mod process;
pub mod scheduler;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use fixtures::{
    Guest, Netns, Registry, RegistryConfig, debian_guest, free_port, guest, strip_ansi,
};
pub use pki::CertPair;

/// The environment variable naming the folder with `etcd` and `kube-apiserver`.
pub const ASSETS_ENV: &str = "KUBEBUILDER_ASSETS";

/// CN of the client certificate the API server's aggregation layer presents to extension
/// API servers (`--proxy-client-cert-file`), the one name `--requestheader-allowed-names`
/// accepts.
pub const FRONT_PROXY_CLIENT_CN: &str = "front-proxy-client";

/// Errors starting or using the test environment.
#[derive(Debug, thiserror::Error)]
pub enum TestEnvError {
    /// `KUBEBUILDER_ASSETS` is not set or does not hold the binaries.
    #[error(
        "{ASSETS_ENV} must name a folder holding `etcd` and `kube-apiserver` (e.g. ../shared/k8s); {0}"
    )]
    AssetsMissing(String),
    /// Generating a certificate or key failed.
    #[error("generating the {what} certificate")]
    Certificate {
        /// Which certificate.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A daemon did not become ready in time.
    #[error("{what} did not become ready within {secs} s; its log: {log}")]
    NotReady {
        /// Which daemon.
        what: &'static str,
        /// How long we waited.
        secs: u64,
        /// Path of its log file.
        log: String,
    },
    /// A request to the API server failed.
    #[error("{what}")]
    Api {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// An APIService did not turn Available in time.
    #[error(
        "APIService {name} was not Available within {secs} s ({condition}); metrics-server's log: {log}"
    )]
    ApiServiceUnavailable {
        /// The APIService.
        name: &'static str,
        /// How long we waited.
        secs: u64,
        /// Its last Available condition (reason: message).
        condition: String,
        /// Path of the backing server's log file.
        log: String,
    },
    /// A daemon exited while we waited for it.
    #[error("{what} exited ({status}); its log: {log}")]
    Exited {
        /// Which daemon.
        what: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Path of its log file.
        log: String,
    },
    /// Building a client failed.
    #[error("building a client from {path}")]
    Client {
        /// Kubeconfig used.
        path: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TestEnvError {
    let what = what.into();
    move |source| TestEnvError::Io { what, source }
}

/// A node's identity: its client certificate and a kubeconfig that uses it.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node name.
    pub node_name: String,
    /// `system:node:<node_name>`.
    pub user: String,
    /// Path of the node's kubeconfig (client certificate, not the admin's).
    pub kubeconfig: PathBuf,
    /// The client certificate and key.
    pub cert: CertPair,
}

impl NodeIdentity {
    /// A client authenticated as the node.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig).await
    }
}

/// Opt-in API server settings of a private control plane ([`ControlPlane::start_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ControlPlaneOptions {
    /// `--enable-bootstrap-token-auth`: bootstrap tokens (Secrets of type
    /// `bootstrap.kubernetes.io/token` in kube-system) authenticate as
    /// `system:bootstrap:<id>`, group `system:bootstrappers`.
    pub bootstrap_token_auth: bool,
    /// `--kubelet-certificate-authority=<cluster CA>`: the API server verifies each
    /// kubelet's serving certificate (logs, exec, attach, port-forward) against the cluster
    /// CA, so a node's self-signed certificate is refused.
    pub kubelet_certificate_authority: bool,
}

/// A running etcd + kube-apiserver pair.
pub struct ControlPlane {
    dir: PathBuf,
    assets: PathBuf,
    ca: pki::Ca,
    ca_pem: String,
    api_port: u16,
    apiserver_args: Vec<String>,
    etcd: Mutex<Option<Child>>,
    apiserver: Mutex<Option<Child>>,
    metrics_server: Mutex<Option<Child>>,
    controller_manager: Mutex<Option<Child>>,
    scheduler: Mutex<Option<Child>>,
    node_lifecycle: Mutex<Option<Child>>,
    /// Serialises [`ControlPlane::start_metrics_server`] (tests may call it at once).
    metrics_server_start: tokio::sync::Mutex<()>,
    admin_kubeconfig: PathBuf,
    private: bool,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir)
            .field("api_port", &self.api_port)
            .finish()
    }
}

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use.
    ///
    /// # Panics
    /// If it cannot start (e.g. `KUBEBUILDER_ASSETS` is missing): a test cannot go on.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(
            || match Self::start_inner(false, ControlPlaneOptions::default()) {
                Ok(cp) => cp,
                Err(e) => panic!(
                    "vzk-testenv: cannot start the control plane: {}",
                    error_chain(&e)
                ),
            },
        )
    }

    /// Starts a private control plane, stopped and removed when dropped.
    pub fn start() -> Result<ControlPlane, TestEnvError> {
        Self::start_inner(true, ControlPlaneOptions::default())
    }

    /// Starts a private control plane with opt-in API server settings, stopped and removed
    /// when dropped.
    pub fn start_with(options: ControlPlaneOptions) -> Result<ControlPlane, TestEnvError> {
        Self::start_inner(true, options)
    }

    fn start_inner(
        private: bool,
        options: ControlPlaneOptions,
    ) -> Result<ControlPlane, TestEnvError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let assets = assets_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "vzk-testenv-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let write = |name: &str, data: &str| -> Result<PathBuf, TestEnvError> {
            let p = dir.join(name);
            std::fs::write(&p, data).map_err(io_err(format!("writing {}", p.display())))?;
            Ok(p)
        };

        let ca = pki::Ca::named("vzk-testenv-ca")?;
        let ca_pem = ca.cert_pem();
        write("ca.crt", &ca_pem)?;
        let serving = ca.serving_cert(&[
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default.svc",
            "10.0.0.1",
        ])?;
        write("serving.crt", &serving.cert_pem)?;
        write("serving.key", &serving.key_pem)?;
        let kubelet_client =
            ca.client_cert("kube-apiserver-kubelet-client", &["system:masters"])?;
        write("kubelet-client.crt", &kubelet_client.cert_pem)?;
        write("kubelet-client.key", &kubelet_client.key_pem)?;
        // The aggregation layer: the API server proves itself to extension API servers
        // (metrics-server) with a client certificate from a CA of its own, and they trust
        // the user named in its X-Remote-* headers only from that certificate.
        let front_proxy_ca = pki::Ca::named("vzk-testenv-front-proxy-ca")?;
        write("front-proxy-ca.crt", &front_proxy_ca.cert_pem())?;
        let front_proxy_client = front_proxy_ca.client_cert(FRONT_PROXY_CLIENT_CN, &[])?;
        write("front-proxy-client.crt", &front_proxy_client.cert_pem)?;
        write("front-proxy-client.key", &front_proxy_client.key_pem)?;
        let (sa_key, sa_pub) = pki::service_account_keys()?;
        write("sa.key", &sa_key)?;
        write("sa.pub", &sa_pub)?;
        write(
            "audit-policy.yaml",
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )?;

        let pick = || process::free_port().map_err(io_err("picking a free port"));
        let (etcd_port, peer_port, api_port) = (pick()?, pick()?, pick()?);
        let d = dir.display();
        let etcd_args = vec![
            format!("--data-dir={d}/etcd"),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let mut apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={d}/serving.crt"),
            format!("--tls-private-key-file={d}/serving.key"),
            format!("--client-ca-file={d}/ca.crt"),
            format!("--service-account-issuer=https://127.0.0.1:{api_port}"),
            format!("--service-account-key-file={d}/sa.pub"),
            format!("--service-account-signing-key-file={d}/sa.key"),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            format!("--kubelet-client-certificate={d}/kubelet-client.crt"),
            format!("--kubelet-client-key={d}/kubelet-client.key"),
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--requestheader-client-ca-file={d}/front-proxy-ca.crt"),
            format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT_CN}"),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={d}/front-proxy-client.crt"),
            format!("--proxy-client-key-file={d}/front-proxy-client.key"),
            // No --enable-aggregator-routing: the aggregator then resolves an APIService's
            // Service by its cluster IP, or, for type ExternalName, by its externalName host,
            // which is how it reaches metrics-server on loopback (Endpoints and
            // EndpointSlices may not hold loopback addresses; endpoint routing refuses
            // ExternalName services).
            format!("--audit-policy-file={d}/audit-policy.yaml"),
            format!("--audit-log-path={d}/audit.log"),
            "--audit-log-maxsize=0".into(),
        ];
        if options.bootstrap_token_auth {
            apiserver_args.push("--enable-bootstrap-token-auth".into());
        }
        if options.kubelet_certificate_authority {
            apiserver_args.push(format!("--kubelet-certificate-authority={d}/ca.crt"));
        }

        let admin = ca.client_cert("vzk-admin", &["system:masters"])?;
        let admin_kubeconfig = write_kubeconfig(&dir, "admin", api_port, "vzk-admin", &admin)?;

        let cp = ControlPlane {
            dir: dir.clone(),
            assets,
            ca,
            ca_pem,
            api_port,
            apiserver_args,
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
            metrics_server: Mutex::new(None),
            controller_manager: Mutex::new(None),
            scheduler: Mutex::new(None),
            node_lifecycle: Mutex::new(None),
            metrics_server_start: tokio::sync::Mutex::new(()),
            admin_kubeconfig,
            private,
        };
        let etcd = cp.spawn("etcd", &etcd_args)?;
        set(&cp.etcd, etcd);
        cp.start_apiserver()?;
        Ok(cp)
    }

    fn spawn(&self, bin: &str, args: &[String]) -> Result<Child, TestEnvError> {
        self.spawn_exe(&self.assets.join(bin), bin, args)
    }

    /// Spawns `exe`, tied to this process, logging to `<dir>/<name>.log`.
    fn spawn_exe(&self, exe: &Path, name: &str, args: &[String]) -> Result<Child, TestEnvError> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(io_err(format!("creating {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io_err("cloning a log handle"))?;
        let mut cmd = Command::new(exe);
        cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
        process::spawn_tied(cmd).map_err(io_err(format!("starting {}", exe.display())))
    }

    /// Starts (or restarts) kube-apiserver and waits until `/readyz` answers.
    pub fn start_apiserver(&self) -> Result<(), TestEnvError> {
        self.stop_apiserver();
        let child = self.spawn("kube-apiserver", &self.apiserver_args)?;
        set(&self.apiserver, child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Stops kube-apiserver (etcd keeps running), as an outage would.
    pub fn stop_apiserver(&self) {
        if let Ok(mut g) = self.apiserver.lock()
            && let Some(mut c) = g.take()
        {
            process::kill(&mut c);
        }
    }

    fn wait_ready(&self, timeout: Duration) -> Result<(), TestEnvError> {
        // A runtime of our own on a thread of our own: callers may be inside a runtime.
        let kubeconfig = self.admin_kubeconfig.clone();
        let ready = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let client = client_from(&kubeconfig).await;
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    let req = http_get("/readyz");
                    if let Some(req) = req
                        && client
                            .request_text(req)
                            .await
                            .is_ok_and(|t| t.trim() == "ok")
                    {
                        return Some(());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None
            })
        })
        .join()
        .ok()
        .flatten();
        ready.ok_or_else(|| TestEnvError::NotReady {
            what: "kube-apiserver",
            secs: timeout.as_secs(),
            log: self.dir.join("kube-apiserver.log").display().to_string(),
        })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The admin kubeconfig (`O=system:masters`). Never give it to the agent.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A client with admin rights, made in the caller's runtime.
    pub async fn admin_client(&self) -> kube::Client {
        client_from(&self.admin_kubeconfig).await
    }

    /// The cluster CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of the cluster CA certificate. It also signs the API server's kubelet client
    /// certificate (`CN=kube-apiserver-kubelet-client, O=system:masters`), so a kubelet
    /// API verifies client certificates against it.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The API server's audit log (one JSON event per line, level Metadata).
    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Counts `user`'s API requests in the audit log received in `[from, to)`, by
    /// `(verb, resource[/subresource])`, each request once (unique audit ID).
    pub fn audit_counts(
        &self,
        user: &str,
        from: k8s_openapi::jiff::Timestamp,
        to: k8s_openapi::jiff::Timestamp,
    ) -> std::collections::BTreeMap<(String, String), usize> {
        let text = std::fs::read_to_string(self.audit_log_path()).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let mut counts = std::collections::BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["user"]["username"] != user {
                continue;
            }
            let Some(at) = v["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            else {
                continue;
            };
            if at < from
                || at >= to
                || !seen.insert(v["auditID"].as_str().unwrap_or_default().to_owned())
            {
                continue;
            }
            let mut resource = v["objectRef"]["resource"]
                .as_str()
                .unwrap_or("-")
                .to_owned();
            if let Some(sub) = v["objectRef"]["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            let verb = v["verb"].as_str().unwrap_or("-").to_owned();
            *counts.entry((verb, resource)).or_insert(0) += 1;
        }
        counts
    }

    /// This control plane's working directory (certificates, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a serving certificate signed by the cluster CA.
    ///
    /// # Panics
    /// If certificate generation fails (a broken test environment).
    pub fn issue_serving_cert(&self, sans: &[&str]) -> CertPair {
        match self.ca.serving_cert(sans) {
            Ok(c) => c,
            Err(e) => panic!("vzk-testenv: {}", error_chain(&e)),
        }
    }

    /// Issues a client certificate `CN=user, O=group` signed by the cluster CA.
    ///
    /// # Panics
    /// If certificate generation fails (a broken test environment).
    pub fn issue_client_cert(&self, user: &str, group: Option<&str>) -> CertPair {
        let groups: Vec<&str> = group.into_iter().collect();
        match self.ca.client_cert(user, &groups) {
            Ok(c) => c,
            Err(e) => panic!("vzk-testenv: {}", error_chain(&e)),
        }
    }

    /// The identity of node `node_name`: `CN=system:node:<node_name>, O=system:nodes`,
    /// with its own kubeconfig.
    ///
    /// # Panics
    /// If the certificate or kubeconfig cannot be written (a broken test environment).
    pub fn node_identity(&self, node_name: &str) -> NodeIdentity {
        let user = format!("system:node:{node_name}");
        let cert = self.issue_client_cert(&user, Some("system:nodes"));
        let kubeconfig = match write_kubeconfig(
            &self.dir,
            &format!("node-{node_name}"),
            self.api_port,
            &user,
            &cert,
        ) {
            Ok(p) => p,
            Err(e) => panic!("vzk-testenv: {}", error_chain(&e)),
        };
        NodeIdentity {
            node_name: node_name.to_owned(),
            user,
            kubeconfig,
            cert,
        }
    }

    /// Creates a namespace named `<prefix>-<random>` with what a controller-manager would
    /// add: the `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap.
    ///
    /// # Panics
    /// If the API server refuses (a broken test environment).
    pub async fn create_namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        if let Err(e) = self.prepare_namespace(&name).await {
            panic!("vzk-testenv: preparing namespace {name}: {e}");
        }
        name
    }

    /// Makes sure namespace `name` exists with the `default` ServiceAccount and the
    /// `kube-root-ca.crt` ConfigMap (what a controller-manager would create).
    pub async fn prepare_namespace(&self, name: &str) -> Result<(), kube::Error> {
        let client = self.admin_client().await;
        let pp = PostParams::default();
        let ignore_exists = |r: Result<(), kube::Error>| match r {
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            other => other,
        };
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }
        }))
        .unwrap_or_default();
        ignore_exists(
            Api::<Namespace>::all(client.clone())
                .create(&pp, &ns)
                .await
                .map(drop),
        )?;
        let sa: ServiceAccount =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": "default" } }))
                .unwrap_or_default();
        let sas = Api::<ServiceAccount>::namespaced(client.clone(), name);
        ignore_exists(sas.create(&pp, &sa).await.map(drop))?;
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "kube-root-ca.crt" },
            "data": { "ca.crt": self.ca_pem }
        }))
        .unwrap_or_default();
        let cms = Api::<ConfigMap>::namespaced(client, name);
        ignore_exists(cms.create(&pp, &cm).await.map(drop))
    }

    /// A `kubectl` command using the admin kubeconfig (kubectl must be on PATH).
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.admin_kubeconfig);
        cmd
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_scheduler();
        self.stop_node_lifecycle_controller();
        self.stop_controller_manager();
        self.stop_metrics_server();
        self.stop_apiserver();
        if let Ok(mut g) = self.etcd.lock()
            && let Some(mut c) = g.take()
        {
            process::kill(&mut c);
        }
        if self.private {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn set(slot: &Mutex<Option<Child>>, child: Child) {
    match slot.lock() {
        Ok(mut g) => *g = Some(child),
        Err(p) => *p.into_inner() = Some(child),
    }
}

fn http_get(path: &str) -> Option<http::Request<Vec<u8>>> {
    http::Request::get(path).body(Vec::new()).ok()
}

fn assets_dir() -> Result<PathBuf, TestEnvError> {
    let Some(dir) = std::env::var_os(ASSETS_ENV) else {
        return Err(TestEnvError::AssetsMissing("it is not set".into()));
    };
    let dir = PathBuf::from(dir);
    for bin in ["etcd", "kube-apiserver"] {
        if !dir.join(bin).is_file() {
            return Err(TestEnvError::AssetsMissing(format!(
                "{} has no `{bin}`",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

fn write_kubeconfig(
    dir: &Path,
    name: &str,
    api_port: u16,
    user: &str,
    cert: &CertPair,
) -> Result<PathBuf, TestEnvError> {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&crt, &cert.cert_pem).map_err(io_err(format!("writing {}", crt.display())))?;
    std::fs::write(&key, &cert.key_pem).map_err(io_err(format!("writing {}", key.display())))?;
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "vzk-test", "cluster": {
            "server": format!("https://127.0.0.1:{api_port}"),
            "certificate-authority": dir.join("ca.crt"),
        }}],
        "users": [{ "name": user, "user": {
            "client-certificate": crt,
            "client-key": key,
        }}],
        "contexts": [{ "name": "vzk-test", "context": { "cluster": "vzk-test", "user": user }}],
        "current-context": "vzk-test",
    });
    let path = dir.join(format!("{name}.kubeconfig"));
    let yaml = serde_yaml::to_string(&config).map_err(|e| TestEnvError::Io {
        what: format!("serialising {}", path.display()),
        source: io::Error::other(e),
    })?;
    std::fs::write(&path, yaml).map_err(io_err(format!("writing {}", path.display())))?;
    Ok(path)
}

/// Builds a client from a kubeconfig file, in the caller's runtime.
///
/// # Panics
/// If the kubeconfig is unusable (a broken test environment).
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    match try_client_from(kubeconfig).await {
        Ok(c) => c,
        Err(e) => panic!("vzk-testenv: {}", error_chain(&e)),
    }
}

async fn try_client_from(kubeconfig: &Path) -> Result<kube::Client, TestEnvError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let err = |source: Box<dyn std::error::Error + Send + Sync>| TestEnvError::Client {
        path: kubeconfig.display().to_string(),
        source,
    };
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| err(Box::new(e)))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(Box::new(e)))?;
    kube::Client::try_from(config).map_err(|e| err(Box::new(e)))
}

/// Formats an error and its sources on one line.
pub use vzk_core::error_chain;
