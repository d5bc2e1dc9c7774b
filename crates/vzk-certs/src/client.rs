//! The node's `kube::Client` on a client certificate that rotates in place, and the TLS
//! bootstrap that gets the first one.
//!
//! The client is built as kube-rs documents a custom client (`kube::client::ConfigExt`:
//! the rustls config from the kubeconfig, a hyper-rustls connector, the base-URI, auth and
//! header layers, kube's retry policy, `Client::new`), with three differences:
//!
//! * the rustls `ClientConfig`'s client identity is a [`RotatingClientCert`]
//!   (`ResolvesClientCert`), read at each handshake, so a new connection presents the
//!   certificate current at that moment;
//! * TLS session resumption is off: a resumed session would carry the identity of the
//!   certificate that made it (the kubelet's Go client does not resume either);
//! * every connection is marked with the certificate generation it was made with, and when a
//!   response on a connection of an older generation arrives or ends, the connection is
//!   poisoned: it finishes what it carries (a watch goes on) but is not reused. The API server checks the
//!   client certificate's validity on each request, so a pooled connection must not carry a
//!   request after the old certificate expired.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper_util::client::legacy::connect::{
    CaptureConnection, Connected, Connection, HttpConnector,
};
use kube::client::ConfigExt as _;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::csr::{CsrSpec, request_certificate};
use crate::files::{pki_path, read_optional, write_node_kubeconfig, write_private};
use crate::inspect::{CertInfo, check_leaf_pem};
use crate::rotation::{jittered_fraction, retry_delay, rotation_deadline, until};
use crate::{CLIENT_CERT_FILE, CertError, KUBECONFIG_FILE};

/// Parses a PEM file holding a certificate chain and its key into a rustls `CertifiedKey`,
/// checking that the key belongs to the leaf.
pub(crate) fn certified_key(pem: &[u8], name: &str) -> Result<CertifiedKey, CertError> {
    let invalid = |reason: String| CertError::Invalid {
        path: name.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("holds no certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| invalid(format!("no private key: {e}")))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|source| CertError::Tls {
        what: format!("{name}: the key does not fit the certificate, or is unusable"),
        source,
    })
}

/// The node's client certificate, swapped in place on rotation.
#[derive(Debug)]
pub struct RotatingClientCert {
    key: ArcSwap<CertifiedKey>,
    info: ArcSwap<CertInfo>,
    generation: AtomicU64,
}

impl RotatingClientCert {
    /// From a PEM file's content (chain + key); `name` names it in errors.
    pub fn from_pem(pem: &[u8], name: &str) -> Result<Arc<Self>, CertError> {
        let (key, info) = load(pem, name)?;
        Ok(Arc::new(Self {
            key: ArcSwap::from_pointee(key),
            info: ArcSwap::from_pointee(info),
            generation: AtomicU64::new(0),
        }))
    }

    /// Puts a new certificate in place: connections made from now on present it.
    pub fn swap(&self, pem: &[u8], name: &str) -> Result<CertInfo, CertError> {
        let (key, info) = load(pem, name)?;
        self.key.store(Arc::new(key));
        self.info.store(Arc::new(info.clone()));
        // After the store: a connection marked with the new generation has the new key.
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(info)
    }

    /// Facts of the current certificate.
    pub fn info(&self) -> Arc<CertInfo> {
        self.info.load_full()
    }

    /// How many times the certificate was swapped.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

fn load(pem: &[u8], name: &str) -> Result<(CertifiedKey, CertInfo), CertError> {
    let key = certified_key(pem, name)?;
    let info = check_leaf_pem(pem, name, "the node's client certificate", "")?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::Invalid {
            path: name.to_owned(),
            reason: "holds no certificate".into(),
        })?;
    Ok((key, info))
}

impl ResolvesClientCert for RotatingClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate generation a connection was made with (a hyper connection extra).
#[derive(Debug, Clone, Copy)]
struct CertGeneration(u64);

/// A connector marking each connection with the current certificate generation.
#[derive(Clone)]
struct MarkingConnector<C> {
    inner: C,
    identity: Arc<RotatingClientCert>,
}

impl<C> tower::Service<http::Uri> for MarkingConnector<C>
where
    C: tower::Service<http::Uri> + Send,
    C::Future: Send + 'static,
{
    type Response = Marked<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        // Read before the handshake: at worst a new-certificate connection is marked old
        // and retired early, never the other way round.
        let generation = self.identity.generation();
        let fut = self.inner.call(uri);
        Box::pin(async move {
            let io = fut.await?;
            Ok(Marked { io, generation })
        })
    }
}

/// A connection and the certificate generation it was made with.
struct Marked<T> {
    io: T,
    generation: u64,
}

impl<T: Connection> Connection for Marked<T> {
    fn connected(&self) -> Connected {
        self.io.connected().extra(CertGeneration(self.generation))
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Marked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Marked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// Retires connections of an older certificate generation: checked when the response
/// arrives and again when its body ends (a watch opened before a rotation gives its
/// connection back only then), so such a connection is never checked out again.
#[derive(Clone)]
struct RetireOldConnections<S> {
    inner: S,
    identity: Arc<RotatingClientCert>,
}

/// What is needed to poison the connection a response came on.
struct Retire {
    captured: CaptureConnection,
    generation: Option<u64>,
    identity: Arc<RotatingClientCert>,
}

impl Retire {
    fn if_old(&self) {
        if let Some(g) = self.generation
            && g < self.identity.generation()
            && let Some(conn) = self.captured.connection_metadata().as_ref()
        {
            conn.poison();
        }
    }
}

/// A response body that retires its connection (see [`Retire`]) when it ends.
struct RetireOnEnd<B> {
    inner: B,
    retire: Retire,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for RetireOnEnd<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.retire.if_old();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for RetireOldConnections<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: hyper::body::Body + Unpin,
{
    type Response = http::Response<RetireOnEnd<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let captured = hyper_util::client::legacy::connect::capture_connection(&mut req);
        let identity = self.identity.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let retire = Retire {
                captured,
                generation: res.extensions().get::<CertGeneration>().map(|g| g.0),
                identity,
            };
            retire.if_old();
            Ok(res.map(|inner| RetireOnEnd { inner, retire }))
        })
    }
}

/// Builds a client from `kubeconfig` (server, CA, TLS server name, headers) whose client
/// certificate is `identity`, whatever the kubeconfig's user says.
pub async fn build_client(
    kubeconfig: &Path,
    identity: Arc<RotatingClientCert>,
) -> Result<kube::Client, CertError> {
    let kc_err = |reason: String| CertError::Kubeconfig {
        path: kubeconfig.to_owned(),
        reason,
    };
    let kc =
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| kc_err(crate::chain(&e)))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| kc_err(crate::chain(&e)))?;
    // The identity comes from the resolver, not from these.
    let auth = &mut config.auth_info;
    auth.client_certificate = None;
    auth.client_certificate_data = None;
    auth.client_key = None;
    auth.client_key_data = None;
    let mut tls = config
        .rustls_client_config()
        .map_err(|e| kc_err(crate::chain(&e)))?;
    tls.client_auth_cert_resolver = identity.clone();
    tls.resumption = rustls::client::Resumption::disabled();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = rustls_pki_types::ServerName::try_from(name.clone())
                .map_err(|e| kc_err(format!("tls-server-name {name:?}: {e}")))?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let https = builder.enable_http1().wrap_connector(http);
    let connector = MarkingConnector {
        inner: https,
        identity: identity.clone(),
    };
    let hyper_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            // An idle connection made with an old certificate goes well before that expires.
            .pool_idle_timeout(Duration::from_secs(30))
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer().map_err(|e| kc_err(crate::chain(&e)))?)
        .layer(
            config
                .extra_headers_layer()
                .map_err(|e| kc_err(crate::chain(&e)))?,
        )
        .map_err(tower::BoxError::from)
        .service(RetireOldConnections {
            inner: hyper_client,
            identity,
        });
    Ok(kube::Client::new(service, config.default_namespace))
}

/// A client from a kubeconfig, as kube-rs builds it (the bootstrap credentials, or a
/// `--kubeconfig` given as is).
pub async fn static_client(kubeconfig: &Path) -> Result<kube::Client, CertError> {
    let kc_err = |reason: String| CertError::Kubeconfig {
        path: kubeconfig.to_owned(),
        reason,
    };
    let kc =
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| kc_err(crate::chain(&e)))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| kc_err(crate::chain(&e)))?;
    kube::Client::try_from(config).map_err(|e| kc_err(crate::chain(&e)))
}

/// How the node gets its client certificate.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// The node name (`CN=system:node:<node>`).
    pub node_name: String,
    /// The data dir: `pki/kubelet-client-current.pem` and `kubelet.kubeconfig` live there.
    pub data_dir: PathBuf,
    /// Credentials allowed to create a CSR (a bootstrap token).
    pub bootstrap_kubeconfig: PathBuf,
    /// How long to wait for a CSR to be approved and issued.
    pub csr_timeout: Duration,
}

/// The node's client and the task that renews its certificate.
pub struct NodeClient {
    /// The client (its certificate rotates in place).
    pub client: kube::Client,
    /// The kubeconfig written for it (`<data-dir>/kubelet.kubeconfig`).
    pub kubeconfig: PathBuf,
    /// Whether this start requested a new certificate (bootstrap).
    pub bootstrapped: bool,
    /// Run it to renew the certificate before it expires.
    pub rotation: ClientRotation,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("kubeconfig", &self.kubeconfig)
            .field("bootstrapped", &self.bootstrapped)
            .finish_non_exhaustive()
    }
}

/// The stored certificate, if it is usable: cert + key that fit, X.509 v3, for this node,
/// valid now. Why not, otherwise.
fn stored_certificate(path: &Path, node: &str) -> Result<Option<Vec<u8>>, String> {
    let Some(pem) = read_optional(path).map_err(|e| crate::chain(&e))? else {
        return Ok(None);
    };
    let name = path.display().to_string();
    let (_, info) = load(&pem, &name).map_err(|e| crate::chain(&e))?;
    let want = format!("system:node:{node}");
    if info.common_name.as_deref() != Some(want.as_str()) {
        return Err(format!(
            "it is for {:?}, not {want:?}",
            info.common_name.unwrap_or_default()
        ));
    }
    if !info.valid_at(SystemTime::now()) {
        return Err(format!(
            "it is valid from {} to {}, not now",
            show(info.not_before),
            show(info.not_after)
        ));
    }
    Ok(Some(pem))
}

/// A time for humans (RFC 3339, UTC).
pub(crate) fn show(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| {
            t.round(k8s_openapi::jiff::Unit::Second)
                .unwrap_or(t)
                .to_string()
        })
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// The node's client: the stored certificate while it is valid (no CSR), else a new one
/// through a CSR made with the bootstrap credentials (TLS bootstrap).
pub async fn node_client(opts: &BootstrapOptions) -> Result<NodeClient, CertError> {
    let cert_path = pki_path(&opts.data_dir, CLIENT_CERT_FILE);
    let kubeconfig = opts.data_dir.join(KUBECONFIG_FILE);
    let stored = match stored_certificate(&cert_path, &opts.node_name) {
        Ok(Some(pem)) if kubeconfig.is_file() => Some(pem),
        Ok(_) => None,
        Err(why) => {
            warn!(file = %cert_path.display(), %why, "not using the stored client certificate; requesting a new one");
            None
        }
    };
    let spec = CsrSpec::node_client(&opts.node_name);
    let (pem, bootstrapped) = match stored {
        Some(pem) => {
            info!(file = %cert_path.display(), "using the stored client certificate");
            (pem, false)
        }
        None => {
            info!(
                bootstrap_kubeconfig = %opts.bootstrap_kubeconfig.display(),
                "no valid client certificate in the data dir: requesting one (TLS bootstrap)"
            );
            let boot = static_client(&opts.bootstrap_kubeconfig).await?;
            let (pem, _) = request_certificate(&boot, &spec, opts.csr_timeout).await?;
            write_private(&cert_path, &pem)?;
            write_node_kubeconfig(&kubeconfig, &opts.bootstrap_kubeconfig, &cert_path)?;
            info!(file = %cert_path.display(), kubeconfig = %kubeconfig.display(), "client certificate stored");
            (pem, true)
        }
    };
    let identity = RotatingClientCert::from_pem(&pem, &cert_path.display().to_string())?;
    let client = build_client(&kubeconfig, identity.clone()).await?;
    Ok(NodeClient {
        rotation: ClientRotation {
            client: client.clone(),
            identity,
            path: cert_path,
            spec,
            csr_timeout: opts.csr_timeout,
        },
        client,
        kubeconfig,
        bootstrapped,
    })
}

/// Renews the node's client certificate before it expires, with a CSR made as the node.
pub struct ClientRotation {
    client: kube::Client,
    identity: Arc<RotatingClientCert>,
    path: PathBuf,
    spec: CsrSpec,
    csr_timeout: Duration,
}

impl ClientRotation {
    /// The certificate in use.
    pub fn identity(&self) -> Arc<RotatingClientCert> {
        self.identity.clone()
    }

    /// Renews at a jittered 70–90 % of each certificate's lifetime until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut earliest = SystemTime::now();
        loop {
            let cur = self.identity.info();
            let deadline =
                rotation_deadline(cur.not_before, cur.not_after, jittered_fraction()).max(earliest);
            info!(serial = %cur.serial, not_after = %show(cur.not_after), renew_at = %show(deadline), "client certificate: next renewal");
            if !sleep_until(deadline, &stop).await {
                return;
            }
            let mut attempt = 0;
            loop {
                match request_certificate(&self.client, &self.spec, self.csr_timeout).await {
                    Ok((pem, _)) => {
                        let stored = write_private(&self.path, &pem).and_then(|()| {
                            self.identity.swap(&pem, &self.path.display().to_string())
                        });
                        match stored {
                            Ok(info) => {
                                info!(serial = %info.serial, not_after = %show(info.not_after), "client certificate rotated; new connections use it");
                                break;
                            }
                            Err(e) => {
                                warn!(error = %crate::chain(&e), "client certificate: keeping the old one")
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %crate::chain(&e), "client certificate: renewal failed")
                    }
                }
                attempt += 1;
                let wait = retry_delay(attempt, SystemTime::now(), self.identity.info().not_after);
                info!(retry_in = ?wait, "client certificate: retrying the renewal");
                if !sleep_until(SystemTime::now() + wait, &stop).await {
                    return;
                }
            }
            // A signer that backdates (the kube-controller-manager backdates by 5 min) can
            // hand out a short certificate whose deadline has already passed: not at once again.
            let left = until(self.identity.info().not_after, SystemTime::now());
            earliest = SystemTime::now() + (left / 2).min(Duration::from_secs(30));
        }
    }
}

/// Sleeps until the wall-clock `deadline` (re-checked at least every minute, so a clock
/// jump or a suspended host does not oversleep); false if `stop` fired.
pub(crate) async fn sleep_until(deadline: SystemTime, stop: &CancellationToken) -> bool {
    loop {
        let left = until(deadline, SystemTime::now());
        if left.is_zero() {
            return true;
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(left.min(Duration::from_secs(60))) => {}
        }
    }
}
