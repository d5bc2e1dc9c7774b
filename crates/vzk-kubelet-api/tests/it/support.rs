//! Test harness: a kubelet API server on loopback in front of the [`ProcessRuntime`]
//! double, registered with the real API server as a Node (InternalIP 127.0.0.1, the
//! server's port) with one Running pod; plus a raw TLS client for direct requests.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use vzk_kubelet_api::KubeletServer;
use vzk_testenv::{CertPair, ControlPlane};

use crate::runtime::ProcessRuntime;

/// Panics seen anywhere in this test binary (server tasks included).
pub(crate) static PANICS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

/// The control plane a harness runs against.
pub(crate) enum Cp {
    /// The one every test of this binary shares.
    Shared(&'static ControlPlane),
    /// One of the harness's own, stopped with it.
    Own(Box<ControlPlane>),
}

impl std::ops::Deref for Cp {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        match self {
            Cp::Shared(cp) => cp,
            Cp::Own(cp) => cp,
        }
    }
}

/// One kubelet API server + its Node and Pod in the real API server.
pub(crate) struct Harness {
    pub(crate) cp: Cp,
    pub(crate) admin: kube::Client,
    pub(crate) node: String,
    pub(crate) port: u16,
    pub(crate) ns: String,
    pub(crate) pod: String,
    pub(crate) runtime: Arc<ProcessRuntime>,
    pub(crate) dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Options of a harness.
#[derive(Default, Clone, Copy)]
pub(crate) struct Opts {
    /// Declare `ExtendWebSocketsToKubelet` on the Node.
    pub(crate) websocket: bool,
    /// Allow anonymous requests.
    pub(crate) anonymous: bool,
    /// Check the certificate files every 100 ms.
    pub(crate) fast_reload: bool,
    /// A 1 s stream-creation timeout.
    pub(crate) short_stream_timeout: bool,
    /// A control plane of the harness's own with metrics-server (which scrapes every
    /// node of its cluster: kept away from the other tests' nodes and request counts).
    pub(crate) metrics_server: bool,
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write test file");
    p
}

pub(crate) async fn start(prefix: &str, opts: Opts) -> Harness {
    count_panics();
    let cp = if opts.metrics_server {
        let cp = ControlPlane::start().expect("a control plane of the harness's own");
        if let Err(e) = cp.start_metrics_server().await {
            panic!(
                "metrics-server: {}\n{}",
                vzk_testenv::error_chain(&e),
                std::fs::read_to_string(cp.metrics_server_log_path()).unwrap_or_default()
            );
        }
        Cp::Own(Box::new(cp))
    } else {
        Cp::Shared(ControlPlane::shared())
    };
    let admin = cp.admin_client().await;
    let node = format!("{prefix}-{:06x}", rand_u32() & 0xff_ffff);
    let dir = tempfile::tempdir().expect("tempdir");
    let serving = cp.issue_serving_cert(&["127.0.0.1", "localhost"]);
    let cert = write(dir.path(), "kubelet.crt", &serving.cert_pem);
    let key = write(dir.path(), "kubelet.key", &serving.key_pem);
    let node_client = cp.node_identity(&node).client().await;
    let runtime = Arc::new(ProcessRuntime::new());
    let listener = KubeletServer::bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut builder = KubeletServer::builder();
    if opts.fast_reload {
        builder = builder.reload_interval(std::time::Duration::from_millis(100));
    }
    if opts.short_stream_timeout {
        builder = builder.stream_creation_timeout(std::time::Duration::from_secs(1));
    }
    let server = builder
        .provider(runtime.clone())
        .node_name(node.clone())
        .tls(cert, key, cp.ca_cert_path())
        .authenticator(node_client)
        .allow_anonymous(opts.anonymous)
        .build()
        .expect("server builds");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));

    let nodes: Api<Node> = Api::all(admin.clone());
    let n: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": node}})).expect("node json");
    nodes
        .create(&PostParams::default(), &n)
        .await
        .expect("create node");
    let mut status = serde_json::json!({
        "status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "localhost"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}],
        }
    });
    if opts.websocket {
        status["status"]["declaredFeatures"] =
            serde_json::json!([vzk_kubelet_api::EXTEND_WEBSOCKETS_TO_KUBELET]);
    }
    nodes
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch node status");

    let ns = cp.create_namespace(prefix).await;
    let pod = "vm-pod".to_owned();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let p: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pod},
        "spec": {"nodeName": node, "containers": [{"name": "vm", "image": "example.invalid/vm:1"}, {"name": "side", "image": "example.invalid/side:1"}]},
    }))
    .expect("pod json");
    pods.create(&PostParams::default(), &p)
        .await
        .expect("create pod");
    let st = serde_json::json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(&pod, &PatchParams::default(), &Patch::Merge(&st))
        .await
        .expect("patch pod status");
    Harness {
        cp,
        admin,
        node,
        port,
        ns,
        pod,
        runtime,
        dir,
        stop: Some(stop),
    }
}

pub(crate) fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

impl Harness {
    /// kubectl with the admin kubeconfig, in the harness namespace.
    pub(crate) fn kubectl(&self) -> tokio::process::Command {
        let mut c = self.cp.kubectl();
        c.args(["-n", &self.ns]);
        c.stdin(std::process::Stdio::null());
        tokio::process::Command::from(c)
    }

    /// A TLS connection to the server, optionally with a client certificate.
    pub(crate) async fn tls(&self, client: Option<&CertPair>) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.cp.ca_cert_pem().as_bytes()) {
            roots.add(c.expect("ca pem")).expect("add ca");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let cfg = match client {
            Some(cp) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(cp.cert_pem.as_bytes())
                        .map(|c| c.expect("cert"))
                        .collect();
                let key = PrivateKeyDer::from_pem_slice(cp.key_pem.as_bytes()).expect("key");
                b.with_client_auth_cert(chain, key).expect("client auth")
            }
            None => b.with_no_client_auth(),
        };
        let tcp = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("ip name");
        TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("tls handshake")
    }

    /// Sends a raw request (`Connection: close`) and returns (status, body).
    pub(crate) async fn request(
        &self,
        client: Option<&CertPair>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut s = self.tls(client).await;
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        parse_response(&out)
    }

    /// The API server's kubelet client identity (`system:masters`).
    pub(crate) fn apiserver_identity(&self) -> CertPair {
        self.cp
            .issue_client_cert("kube-apiserver-kubelet-client", Some("system:masters"))
    }
}

pub(crate) fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, dechunk(&body))
}

/// Best-effort removal of chunked transfer framing.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 || after.len() < n {
            return if n == 0 { out } else { body.to_owned() };
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}
