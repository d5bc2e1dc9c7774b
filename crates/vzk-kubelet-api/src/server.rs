//! The kubelet HTTPS server: builder, router, authentication middleware and the TLS
//! accept loop.
//!
//! The accept loop is hand-written (tokio-rustls, then hyper HTTP/1.1 with upgrades) so
//! the verified client certificate's identity can be put into each request's
//! extensions before axum routes it. Shutdown: stop accepting, ask open connections to
//! finish (graceful HTTP shutdown), cancel streaming sessions, wait at most 10 s.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use chrono::{DateTime, Utc};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{Instrument, debug, info, info_span, warn};
use vzk_core::StreamingRuntime;

use crate::auth::{Auth, Decision, Reviewer};
use crate::error::ApiError;
use crate::metrics::ApiMetrics;
use crate::tls::{self, CertReloader, ClientCertIdentity, TlsError, TlsPaths};

/// Where `/pods` gets the pods assigned to this node (e.g. the node's informer cache).
pub trait PodSource: Send + Sync + 'static {
    /// The pods bound to this node now.
    fn pods(&self) -> Vec<Pod>;
}

impl<F: Fn() -> Vec<Pod> + Send + Sync + 'static> PodSource for F {
    fn pods(&self) -> Vec<Pod> {
        self()
    }
}

/// Building or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A required builder field is missing.
    #[error("kubelet server: {0} not set")]
    Missing(&'static str),
    /// Loading TLS material.
    #[error("loading TLS material")]
    Tls(#[source] TlsError),
}

/// State shared by all handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) runtime: Arc<dyn StreamingRuntime>,
    pub(crate) node_name: String,
    pub(crate) pods: Arc<dyn PodSource>,
    pub(crate) auth: Auth,
    pub(crate) metrics: Arc<ApiMetrics>,
    pub(crate) started: DateTime<Utc>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) stream_creation_timeout: Duration,
}

/// Per-connection facts the accept loop attaches to every request.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub(crate) addr: SocketAddr,
    pub(crate) cert: Option<ClientCertIdentity>,
}

/// Builder of a [`KubeletServer`].
#[derive(Default)]
pub struct KubeletServerBuilder {
    runtime: Option<Arc<dyn StreamingRuntime>>,
    node_name: Option<String>,
    pods: Option<Arc<dyn PodSource>>,
    tls: Option<TlsPaths>,
    client: Option<kube::Client>,
    allow_anonymous: bool,
    reload_every: Option<Duration>,
    stream_creation_timeout: Option<Duration>,
    wait_for_serving_certificate: bool,
    registry: Option<prometheus_client::registry::Registry>,
}

impl std::fmt::Debug for KubeletServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletServerBuilder")
            .field("node_name", &self.node_name)
            .field("tls", &self.tls)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

impl KubeletServerBuilder {
    /// The provider serving logs, exec, attach, port-forward and stats (required).
    #[must_use]
    pub fn provider(mut self, runtime: Arc<dyn StreamingRuntime>) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// This node's name, the object SubjectAccessReviews are about (required).
    #[must_use]
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = Some(name.into());
        self
    }

    /// The source of `/pods` (default: none).
    #[must_use]
    pub fn pods(mut self, pods: Arc<dyn PodSource>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// Serving certificate, key and client CA files (required). The pair is reloaded
    /// when the files change.
    #[must_use]
    pub fn tls(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
        client_ca: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls = Some(TlsPaths {
            cert: cert.into(),
            key: key.into(),
            client_ca: client_ca.into(),
        });
        self
    }

    /// The client used for TokenReview and SubjectAccessReview. Without it, tokens are
    /// refused and verified client certificates are trusted.
    #[must_use]
    pub fn authenticator(mut self, client: kube::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Whether requests without credentials are let through as `system:anonymous`
    /// (still subject to authorization). Default: refused with 401.
    #[must_use]
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.allow_anonymous = allow;
        self
    }

    /// Whether the serving certificate files may not exist yet (a certificate being
    /// requested by CSR, `--rotate-server-certificates`): then nothing is served, every
    /// handshake refused, until they appear. Default: they must exist at build.
    #[must_use]
    pub fn wait_for_serving_certificate(mut self, wait: bool) -> Self {
        self.wait_for_serving_certificate = wait;
        self
    }

    /// How often the certificate files are checked for changes (default 10 s).
    #[must_use]
    pub fn reload_interval(mut self, every: Duration) -> Self {
        self.reload_every = Some(every);
        self
    }

    /// The agent's metric registry, with what other components registered; `/metrics`
    /// serves it together with the kubelet API's own series (default: those alone).
    #[must_use]
    pub fn metrics_registry(mut self, registry: prometheus_client::registry::Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// How long exec/attach/port-forward wait for the client's streams (default 30 s).
    #[must_use]
    pub fn stream_creation_timeout(mut self, t: Duration) -> Self {
        self.stream_creation_timeout = Some(t);
        self
    }

    /// Validates the configuration and loads the TLS material.
    pub fn build(self) -> Result<KubeletServer, ServerError> {
        let runtime = self.runtime.ok_or(ServerError::Missing("provider"))?;
        let node_name = self.node_name.ok_or(ServerError::Missing("node_name"))?;
        let paths = self.tls.ok_or(ServerError::Missing("tls"))?;
        let reloader = if self.wait_for_serving_certificate {
            CertReloader::load_or_wait(&paths.cert, &paths.key)
        } else {
            CertReloader::load(&paths.cert, &paths.key)
        }
        .map_err(ServerError::Tls)?;
        let tls_config =
            tls::server_config(reloader.clone(), &paths.client_ca).map_err(ServerError::Tls)?;
        let reviewer = self.client.map(|c| Arc::new(Reviewer::new(c)));
        let pods = self.pods.unwrap_or_else(|| Arc::new(Vec::new));
        let state = AppState {
            runtime,
            auth: Auth::new(node_name.clone(), self.allow_anonymous, reviewer),
            node_name,
            pods,
            metrics: Arc::new(ApiMetrics::new(self.registry.unwrap_or_default())),
            started: Utc::now(),
            shutdown: CancellationToken::new(),
            stream_creation_timeout: self
                .stream_creation_timeout
                .unwrap_or(Duration::from_secs(30)),
        };
        Ok(KubeletServer {
            state,
            reloader,
            tls: Arc::new(tls_config),
            reload_every: self.reload_every.unwrap_or(Duration::from_secs(10)),
        })
    }

    /// Builds and serves until `shutdown` completes (see [`KubeletServer::serve`]).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        self.build()?.serve(listener, shutdown).await;
        Ok(())
    }
}

/// The kubelet HTTPS API server.
pub struct KubeletServer {
    state: AppState,
    reloader: Arc<CertReloader>,
    tls: Arc<rustls::ServerConfig>,
    reload_every: Duration,
}

impl std::fmt::Debug for KubeletServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletServer")
            .field("node_name", &self.state.node_name)
            .finish_non_exhaustive()
    }
}

impl KubeletServer {
    /// Starts a builder.
    pub fn builder() -> KubeletServerBuilder {
        KubeletServerBuilder::default()
    }

    /// Re-reads the serving certificate now (it is also reloaded on file change).
    pub fn reload_certificate(&self) -> Result<(), TlsError> {
        self.reloader.reload()
    }

    /// The serving certificate's reloader, to reload it at once from elsewhere (e.g. right
    /// after a renewed certificate was written) while the server runs.
    pub fn certificate_reloader(&self) -> Arc<CertReloader> {
        self.reloader.clone()
    }

    /// Binds the kubelet API's listener with a listen backlog of [`LISTEN_BACKLOG`]
    /// (the kernel caps it at `net.core.somaxconn`), as Go's kubelet does; a plain
    /// `TcpListener::bind` gets 128. Connections the accept loop has not taken yet wait
    /// there: a burst larger than the backlog while the agent is busy has its final ACKs
    /// dropped, and a client that then sends nothing waits on a connection the server
    /// never had.
    pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    }

    /// Accepts TLS connections on `listener` until `shutdown` completes, then drains.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let acceptor = TlsAcceptor::from(self.tls.clone());
        let router = app(self.state.clone());
        let stop = self.state.shutdown.clone();
        let watcher = self
            .reloader
            .clone()
            .watch(self.reload_every, stop.child_token());
        let tracker = TaskTracker::new();
        let handshakes = Arc::new(tls::HandshakeLog::new(Duration::from_secs(10)));
        info!(addr = ?listener.local_addr().ok(), node = %self.state.node_name, "kubelet api: serving");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        let span = info_span!("kubelet_conn", peer = %addr);
                        let refused = (handshakes.clone(), self.reloader.clone());
                        tracker.spawn(serve_conn(tcp, addr, acceptor.clone(), router.clone(), stop.clone(), refused).instrument(span));
                    }
                    Err(error) => {
                        warn!(%error, "kubelet api: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        info!("kubelet api: shutting down");
        stop.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
        {
            warn!("kubelet api: connections still open after 10 s, leaving them");
        }
        let _ = watcher.await;
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    stop: CancellationToken,
    (handshakes, reloader): (Arc<tls::HandshakeLog>, Arc<CertReloader>),
) {
    let _ = tcp.set_nodelay(true);
    let tcp = crate::readahead::ReadAhead::new(tcp);
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            handshakes.report(addr, &error, &reloader);
            return;
        }
        Err(_) => {
            debug!("kubelet api: TLS handshake timed out");
            return;
        }
    };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::identity_of);
    let peer = PeerInfo { addr, cert };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        router.clone().oneshot(req.map(Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(tls), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(error) = res {
                debug!(%error, "kubelet api: connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// The listen backlog of [`KubeletServer::bind`] (Linux caps it at `net.core.somaxconn`,
/// 4096 by default).
pub const LISTEN_BACKLOG: u32 = 4096;

/// The router with every kubelet route behind authentication.
pub(crate) fn app(state: AppState) -> Router {
    use crate::routes::{logs, misc, stats};
    use crate::streaming::{attach, exec, port_forward};
    Router::new()
        .route("/healthz", get(misc::healthz))
        .route("/pods", get(misc::pods))
        .route("/runningpods", get(misc::running_pods))
        .route("/runningpods/", get(misc::running_pods))
        .route("/metrics", get(misc::metrics))
        .route("/metrics/resource", get(stats::metrics_resource))
        .route("/stats/summary", get(stats::stats_summary))
        .route(
            "/containerLogs/{ns}/{pod}/{container}",
            get(logs::container_logs),
        )
        .route("/exec/{ns}/{pod}/{container}", any(exec))
        .route("/exec/{ns}/{pod}/{uid}/{container}", any(exec))
        .route("/attach/{ns}/{pod}/{container}", any(attach))
        .route("/attach/{ns}/{pod}/{uid}/{container}", any(attach))
        .route("/portForward/{ns}/{pod}", any(port_forward))
        .route("/portForward/{ns}/{pod}/{uid}", any(port_forward))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

fn route_label(path: Option<&MatchedPath>) -> &'static str {
    let Some(p) = path else { return "unknown" };
    let p = p.as_str();
    [
        "healthz",
        "runningpods",
        "pods",
        "metrics/resource",
        "metrics",
        "stats",
        "containerLogs",
        "exec",
        "attach",
        "portForward",
    ]
    .into_iter()
    .find(|r| p.trim_start_matches('/').starts_with(r))
    .unwrap_or("unknown")
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = route_label(req.extensions().get::<MatchedPath>());
    let peer = req.extensions().get::<PeerInfo>().cloned();
    let cert = peer.as_ref().and_then(|p| p.cert.clone());
    let decision = st
        .auth
        .check(
            cert.as_ref(),
            bearer(req.headers()),
            req.method(),
            req.uri().path(),
        )
        .await;
    let resp = match decision {
        Ok(Decision::Allow(identity)) => {
            debug!(user = %identity.user, peer = ?peer.map(|p| p.addr), method = %req.method(), path = req.uri().path(), "kubelet api: request");
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Ok(Decision::Unauthenticated(why)) => ApiError::Unauthorized(why).into_response(),
        Ok(Decision::Forbidden(why)) => ApiError::Forbidden(why).into_response(),
        Err(e) => ApiError::Review(e).into_response(),
    };
    st.metrics.request(route, resp.status().as_u16());
    resp
}
