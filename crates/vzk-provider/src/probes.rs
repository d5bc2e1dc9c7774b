//! Container probes (startup, readiness, liveness) as the kubelet runs them, and the
//! restart back-off.
//!
//! # Contract
//! * [`ContainerProbes::from_container`] reads a container's three probes and checks
//!   them (a handler is given, gRPC is refused, a named port exists among the
//!   container's `ports`, `successThreshold` is 1 for liveness and startup). Defaults are
//!   the API's: period 10 s, timeout 1 s, success 1, failure 3.
//! * [`run`] drives the probes of one running container against a [`ProbeTarget`]:
//!   the startup probe first (until it succeeds, readiness is false and liveness does
//!   not run); then readiness and liveness, each every `periodSeconds` once
//!   `initialDelaySeconds` have passed since the container started. Results go through
//!   the [`Thresholds`] state machine (a result changes after `successThreshold`
//!   consecutive successes or `failureThreshold` consecutive failures, as the kubelet's
//!   worker does). Readiness changes and failures are reported through a callback;
//!   [`run`] returns a [`RestartRequest`] when liveness or startup fails, and never
//!   returns otherwise.
//! * Handlers: `exec` runs the command in the container (a timeout is a failure,
//!   output kept up to 10 KiB), `tcpSocket` succeeds when a TCP connection opens within
//!   the timeout, `httpGet` sends one HTTP/1.1 `GET` (HTTPS without certificate
//!   verification, as the kubelet does; host defaults to the pod IP; `httpHeaders` sent;
//!   success is 200 ≤ status < 400, redirects are not followed).
//! * Messages follow the kubelet's: `Readiness probe failed: <output>`,
//!   `dial tcp <ip>:<port>: <error>`, `HTTP probe failed with statuscode: <code>`.
//!
//! # Using it for another kind of container
//! The runner knows nothing of VMs: implement [`ProbeTarget`] (how to run a command in
//! the container, how to open a TCP connection to the pod's network, the pod IP) and
//! call [`run`] with the container's [`ContainerProbes`]. The VM's target lives in
//! [`crate::pod`] (exec over the guest's SSH, sockets opened in the VM network
//! namespace); a Docker side-car's lives in [`crate::sidecars`] (`docker exec`, killed
//! on timeout; sockets opened at 127.0.0.1 inside the side-car's own network namespace,
//! so only a loopback probe `host` is accepted).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

/// How much of an exec probe's output is kept (the kubelet's limit).
pub const MAX_OUTPUT: usize = 10 * 1024;
/// The `User-Agent` of HTTP probes (the kubelet sends `kube-probe/<major>.<minor>`).
pub const USER_AGENT: &str = "kube-probe/1.35";

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// `startupProbe`.
    Startup,
    /// `readinessProbe`.
    Readiness,
    /// `livenessProbe`.
    Liveness,
}

impl ProbeKind {
    /// `Startup`, `Readiness`, `Liveness` (the kubelet's capitalisation in messages).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "Startup",
            Self::Readiness => "Readiness",
            Self::Liveness => "Liveness",
        }
    }
}

impl std::fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HTTP or HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// TLS, certificate not verified.
    Https,
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a command in the container; exit 0 is success.
    Exec {
        /// The argv.
        command: Vec<String>,
    },
    /// Open a TCP connection.
    Tcp {
        /// Host (default: the pod IP).
        host: Option<String>,
        /// Port.
        port: u16,
    },
    /// One HTTP GET.
    Http {
        /// HTTP or HTTPS.
        scheme: Scheme,
        /// Host (default: the pod IP).
        host: Option<String>,
        /// Port.
        port: u16,
        /// Path (with query), starting with `/`.
        path: String,
        /// Extra request headers.
        headers: Vec<(String, String)>,
    },
}

/// One probe of a container, checked and with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Which probe.
    pub kind: ProbeKind,
    /// What it does.
    pub action: Action,
    /// `initialDelaySeconds` (default 0).
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
    /// The probe-level `terminationGracePeriodSeconds` (liveness and startup only).
    pub termination_grace: Option<Duration>,
}

/// Why a probe of the pod spec cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeConfigError {
    /// No `exec`, `tcpSocket` or `httpGet`.
    #[error("{kind} probe of container {container:?} has no exec, tcpSocket or httpGet handler")]
    NoHandler {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
    /// gRPC probes are not run by this node.
    #[error("{kind} probe of container {container:?}: gRPC probes are not supported by this node")]
    Grpc {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
    /// An exec probe without a command.
    #[error("{kind} probe of container {container:?}: exec probe has an empty command")]
    EmptyCommand {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
    /// A port name not among the container's ports, or a number out of range.
    #[error("{kind} probe of container {container:?}: {message}")]
    BadPort {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
        /// What is wrong.
        message: String,
    },
    /// A scheme other than HTTP/HTTPS.
    #[error("{kind} probe of container {container:?}: unsupported scheme {scheme:?}")]
    BadScheme {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
        /// The scheme given.
        scheme: String,
    },
    /// `successThreshold` other than 1 on liveness/startup (the API rejects it too).
    #[error("{kind} probe of container {container:?}: successThreshold must be 1")]
    SuccessThreshold {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
}

fn secs(v: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(
        v.and_then(|s| u64::try_from(s).ok())
            .unwrap_or(default)
            .max(min),
    )
}

fn resolve_port(p: &IntOrString, c: &Container, kind: ProbeKind) -> Result<u16, ProbeConfigError> {
    let bad = |message: String| ProbeConfigError::BadPort {
        kind,
        container: c.name.clone(),
        message,
    };
    match p {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad(format!("port {n} is out of range"))),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<u16>()
                && n > 0
            {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(s.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| bad(format!("port {s:?} is not a named port of the container")))
        }
    }
}

impl ProbeSpec {
    /// Reads `probe` (the `kind` probe of container `c`), applying the API defaults.
    pub fn from_k8s(
        kind: ProbeKind,
        probe: &Probe,
        c: &Container,
    ) -> Result<Self, ProbeConfigError> {
        let container = c.name.clone();
        let action = if let Some(x) = &probe.exec {
            let command = x.command.clone().unwrap_or_default();
            if command.is_empty() {
                return Err(ProbeConfigError::EmptyCommand { kind, container });
            }
            Action::Exec { command }
        } else if let Some(t) = &probe.tcp_socket {
            Action::Tcp {
                host: t.host.clone().filter(|h| !h.is_empty()),
                port: resolve_port(&t.port, c, kind)?,
            }
        } else if let Some(h) = &probe.http_get {
            let scheme = match h.scheme.as_deref().unwrap_or("HTTP") {
                s if s.eq_ignore_ascii_case("http") => Scheme::Http,
                s if s.eq_ignore_ascii_case("https") => Scheme::Https,
                s => {
                    return Err(ProbeConfigError::BadScheme {
                        kind,
                        container,
                        scheme: s.to_owned(),
                    });
                }
            };
            let path = match h.path.as_deref().unwrap_or("") {
                "" => "/".to_owned(),
                p if p.starts_with('/') => p.to_owned(),
                p => format!("/{p}"),
            };
            Action::Http {
                scheme,
                host: h.host.clone().filter(|h| !h.is_empty()),
                port: resolve_port(&h.port, c, kind)?,
                path,
                headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if probe.grpc.is_some() {
            return Err(ProbeConfigError::Grpc { kind, container });
        } else {
            return Err(ProbeConfigError::NoHandler { kind, container });
        };
        let success_threshold = probe
            .success_threshold
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
            .max(1);
        if kind != ProbeKind::Readiness && success_threshold != 1 {
            return Err(ProbeConfigError::SuccessThreshold { kind, container });
        }
        Ok(Self {
            kind,
            action,
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold,
            failure_threshold: probe
                .failure_threshold
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(3)
                .max(1),
            termination_grace: (kind != ProbeKind::Readiness)
                .then_some(probe.termination_grace_period_seconds)
                .flatten()
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
        })
    }
}

/// The three probes of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerProbes {
    /// `startupProbe`.
    pub startup: Option<ProbeSpec>,
    /// `readinessProbe`.
    pub readiness: Option<ProbeSpec>,
    /// `livenessProbe`.
    pub liveness: Option<ProbeSpec>,
}

impl ContainerProbes {
    /// Reads and checks the probes of `c`.
    pub fn from_container(c: &Container) -> Result<Self, ProbeConfigError> {
        let read = |kind, p: &Option<Probe>| {
            p.as_ref()
                .map(|p| ProbeSpec::from_k8s(kind, p, c))
                .transpose()
        };
        Ok(Self {
            startup: read(ProbeKind::Startup, &c.startup_probe)?,
            readiness: read(ProbeKind::Readiness, &c.readiness_probe)?,
            liveness: read(ProbeKind::Liveness, &c.liveness_probe)?,
        })
    }

    /// Whether the container has no probe at all.
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.readiness.is_none() && self.liveness.is_none()
    }
}

/// A probe's reported result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// Passing.
    Success,
    /// Failing.
    Failure,
}

/// The threshold state machine of one probe (pure): the reported result changes only
/// after `success_threshold` consecutive successes or `failure_threshold` consecutive
/// failures. Starts from the kubelet's initial results: readiness `Failure`, liveness
/// `Success`, startup unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    result: Option<ProbeResult>,
    last: Option<ProbeResult>,
    run: u32,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Thresholds {
    /// The state machine of `spec`, with the kubelet's initial result for its kind.
    pub fn for_spec(spec: &ProbeSpec) -> Self {
        let initial = match spec.kind {
            ProbeKind::Readiness => Some(ProbeResult::Failure),
            ProbeKind::Liveness => Some(ProbeResult::Success),
            ProbeKind::Startup => None,
        };
        Self::new(initial, spec.success_threshold, spec.failure_threshold)
    }

    /// A state machine starting at `initial` (`None`: unknown).
    pub fn new(
        initial: Option<ProbeResult>,
        success_threshold: u32,
        failure_threshold: u32,
    ) -> Self {
        Self {
            result: initial,
            last: None,
            run: 0,
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
        }
    }

    /// The reported result (`None` while unknown).
    pub fn result(&self) -> Option<ProbeResult> {
        self.result
    }

    /// Records one probe outcome; returns the reported result when it changed.
    pub fn record(&mut self, outcome: ProbeResult) -> Option<ProbeResult> {
        if self.last == Some(outcome) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(outcome);
            self.run = 1;
        }
        let needed = match outcome {
            ProbeResult::Success => self.success_threshold,
            ProbeResult::Failure => self.failure_threshold,
        };
        if self.run < needed || self.result == Some(outcome) {
            return None;
        }
        self.result = Some(outcome);
        Some(outcome)
    }
}

/// The restart back-off of a container (pure): the kubelet's policy. The first restart
/// is immediate; each further one waits 10 s, doubling up to 5 min; a container that
/// ran for 10 min or more starts the sequence again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartBackoff {
    current: Option<Duration>,
    initial: Duration,
    max: Duration,
    reset_after: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self::new(
            Duration::from_secs(10),
            Duration::from_secs(300),
            Duration::from_secs(600),
        )
    }
}

impl RestartBackoff {
    /// A back-off starting at `initial`, capped at `max`, reset after `reset_after` of
    /// running.
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Self {
            current: None,
            initial,
            max,
            reset_after,
        }
    }

    /// How long to wait before restarting a container that ran for `ran_for`, and
    /// advances the back-off.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.current = None;
        }
        match self.current {
            None => {
                self.current = Some(self.initial);
                Duration::ZERO
            }
            Some(d) => {
                self.current = Some((d * 2).min(self.max));
                d
            }
        }
    }
}

/// How an exec in the container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit code.
    pub code: i32,
    /// Standard output and error, at most [`MAX_OUTPUT`] bytes.
    pub output: Vec<u8>,
}

/// What a probe needs from the container it checks.
#[async_trait]
pub trait ProbeTarget: Send + Sync {
    /// Runs `argv` in the container (with the container's environment). The runner
    /// bounds the call with the probe's timeout; errors are probe failures.
    async fn exec(&self, argv: &[String]) -> Result<ExecOutcome, String>;

    /// Opens a TCP connection to `addr` from where the pod's network is reachable.
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream>;

    /// The pod IP: the default host of `tcpSocket` and `httpGet` probes.
    fn pod_ip(&self) -> Option<IpAddr>;
}

/// Runs one probe once: `Ok` on success, `Err(message)` on failure.
pub async fn probe_once(target: &dyn ProbeTarget, spec: &ProbeSpec) -> Result<(), String> {
    match &spec.action {
        Action::Exec { command } => {
            match tokio::time::timeout(spec.timeout, target.exec(command)).await {
                Err(_) => Err(format!(
                    "command {:?} timed out after {}s",
                    command.join(" "),
                    spec.timeout.as_secs()
                )),
                Ok(Err(e)) => Err(e),
                Ok(Ok(o)) if o.code == 0 => Ok(()),
                Ok(Ok(o)) => {
                    let out = String::from_utf8_lossy(&o.output).trim_end().to_owned();
                    Err(if out.is_empty() {
                        format!("command {:?} exited with {}", command.join(" "), o.code)
                    } else {
                        out
                    })
                }
            }
        }
        Action::Tcp { host, port } => {
            let addr = resolve(target, host.as_deref(), *port).await?;
            dial(target, addr, spec.timeout).await.map(drop)
        }
        Action::Http {
            scheme,
            host,
            port,
            path,
            headers,
        } => {
            let addr = resolve(target, host.as_deref(), *port).await?;
            let url_host = host.clone().unwrap_or_else(|| addr.ip().to_string());
            let scheme_s = match scheme {
                Scheme::Http => "http",
                Scheme::Https => "https",
            };
            let url = format!("{scheme_s}://{}{path}", host_port(&url_host, *port));
            let fut = async {
                let tcp = dial(target, addr, spec.timeout).await?;
                let req = http_request(&url_host, *port, path, headers);
                let code = match scheme {
                    Scheme::Http => http_status(tcp, &req).await,
                    Scheme::Https => {
                        let tls = tls_connect(tcp, &url_host).await?;
                        http_status(tls, &req).await
                    }
                };
                code.map_err(|e| format!("Get {url:?}: {e}"))
            };
            match tokio::time::timeout(spec.timeout, fut).await {
                Err(_) => Err(format!(
                    "Get {url:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
                )),
                Ok(Err(e)) => Err(e),
                Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
                Ok(Ok(code)) => Err(format!("HTTP probe failed with statuscode: {code}")),
            }
        }
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn resolve(
    target: &dyn ProbeTarget,
    host: Option<&str>,
    port: u16,
) -> Result<SocketAddr, String> {
    let ip = match host {
        None => target
            .pod_ip()
            .ok_or_else(|| "the pod has no IP address yet".to_owned())?,
        Some(h) => match h.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => tokio::net::lookup_host((h, port))
                .await
                .map_err(|e| format!("lookup {h}: {e}"))?
                .next()
                .map(|a| a.ip())
                .ok_or_else(|| format!("lookup {h}: no such host"))?,
        },
    };
    Ok(SocketAddr::new(ip, port))
}

async fn dial(
    target: &dyn ProbeTarget,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, target.connect(addr)).await {
        Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(format!("dial tcp {addr}: connect: connection refused"))
        }
        Ok(Err(e)) => Err(format!("dial tcp {addr}: connect: {e}")),
        Ok(Ok(s)) => Ok(s),
    }
}

fn http_request(host: &str, port: u16, path: &str, headers: &[(String, String)]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    if !has("host") {
        req.push_str(&format!("Host: {}\r\n", host_port(host, port)));
    }
    if !has("user-agent") {
        req.push_str(&format!("User-Agent: {USER_AGENT}\r\n"));
    }
    if !has("accept") {
        req.push_str("Accept: */*\r\n");
    }
    for (n, v) in headers {
        // Header injection: a name or value with CR/LF is dropped.
        if n.is_empty() || [n, v].iter().any(|s| s.contains(['\r', '\n'])) {
            continue;
        }
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    req.into_bytes()
}

/// Sends `req` and reads the status code of the response.
async fn http_status<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &[u8],
) -> Result<u16, String> {
    s.write_all(req).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    let line = loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            break String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        if buf.len() > 8192 {
            return Err("malformed HTTP response: status line too long".into());
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("EOF".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    parse_status_line(&line)
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status_line(line: &str) -> Result<u16, String> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("malformed HTTP response {line:?}"));
    }
    code.parse::<u16>()
        .ok()
        .filter(|c| (100..1000).contains(c))
        .ok_or_else(|| format!("malformed HTTP status code {code:?}"))
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS over `tcp` without verifying the server's certificate (the kubelet's
/// `InsecureSkipVerify` for HTTPS probes).
async fn tls_connect(
    tcp: TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("TLS server name {host:?}: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// What the runner reports while the container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeUpdate {
    /// The startup probe succeeded (or there is none): the container is `started`.
    Started,
    /// The readiness result changed (without a readiness probe: `true` once started).
    Ready(bool),
    /// A probe failed; `message` is the kubelet's event text
    /// (`Readiness probe failed: …`), for an `Unhealthy` warning event.
    Unhealthy {
        /// Which probe.
        kind: ProbeKind,
        /// The event message.
        message: String,
    },
}

/// Liveness or startup failed: the container must be killed (and restarted per the
/// pod's `restartPolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartRequest {
    /// The probe that failed.
    pub kind: ProbeKind,
    /// Its last failure message.
    pub message: String,
    /// The probe-level `terminationGracePeriodSeconds`, if set.
    pub grace: Option<Duration>,
}

/// Unhealthy events: the same message of the same probe at most once per this period
/// (our events are not aggregated by a recorder as client-go's are).
const UNHEALTHY_EVENT_EVERY: Duration = Duration::from_secs(30);

struct Reporter<'a, F> {
    on: &'a F,
    last: std::sync::Mutex<Option<(String, Instant)>>,
}

impl<F: Fn(ProbeUpdate) + Send + Sync> Reporter<'_, F> {
    fn failed(&self, kind: ProbeKind, msg: &str) {
        let message = format!("{kind} probe failed: {msg}");
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let repeat = last
            .as_ref()
            .is_some_and(|(m, t)| *m == message && now.duration_since(*t) < UNHEALTHY_EVENT_EVERY);
        if !repeat {
            *last = Some((message.clone(), now));
            drop(last);
            (self.on)(ProbeUpdate::Unhealthy { kind, message });
        }
    }
}

/// A ticker of `spec.period`, first tick at `started_at + initial_delay`.
fn ticker(spec: &ProbeSpec, started_at: Instant) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(started_at + spec.initial_delay, spec.period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Probes one running container until liveness or startup fails (then returns what to
/// do); `started_at` is when the container started. Without a startup probe the
/// container is started at once; without a readiness probe it is ready once started.
pub async fn run<F>(
    target: Arc<dyn ProbeTarget>,
    probes: ContainerProbes,
    started_at: Instant,
    on: F,
) -> RestartRequest
where
    F: Fn(ProbeUpdate) + Send + Sync,
{
    let (started_tx, started_rx) = watch::channel(false);
    let startup_rep = Reporter {
        on: &on,
        last: std::sync::Mutex::new(None),
    };
    let readiness_rep = Reporter {
        on: &on,
        last: std::sync::Mutex::new(None),
    };
    let liveness_rep = Reporter {
        on: &on,
        last: std::sync::Mutex::new(None),
    };
    let startup = async {
        if let Some(spec) = &probes.startup {
            let mut th = Thresholds::for_spec(spec);
            let mut tick = ticker(spec, started_at);
            loop {
                tick.tick().await;
                let r = probe_once(target.as_ref(), spec).await;
                debug!(probe = %spec.kind, ok = r.is_ok(), "probe");
                let outcome = match &r {
                    Ok(()) => ProbeResult::Success,
                    Err(m) => {
                        startup_rep.failed(spec.kind, m);
                        ProbeResult::Failure
                    }
                };
                match th.record(outcome) {
                    Some(ProbeResult::Success) => break,
                    Some(ProbeResult::Failure) => {
                        return RestartRequest {
                            kind: spec.kind,
                            message: r.err().unwrap_or_default(),
                            grace: spec.termination_grace,
                        };
                    }
                    None => {}
                }
            }
        }
        let _ = started_tx.send(true);
        on(ProbeUpdate::Started);
        std::future::pending().await
    };
    let wait_started = || {
        let mut rx = started_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let readiness = async {
        wait_started().await;
        let Some(spec) = &probes.readiness else {
            on(ProbeUpdate::Ready(true));
            return std::future::pending().await;
        };
        let mut th = Thresholds::for_spec(spec);
        let mut tick = ticker(spec, started_at);
        loop {
            tick.tick().await;
            let r = probe_once(target.as_ref(), spec).await;
            debug!(probe = %spec.kind, ok = r.is_ok(), "probe");
            let outcome = match &r {
                Ok(()) => ProbeResult::Success,
                Err(m) => {
                    readiness_rep.failed(spec.kind, m);
                    ProbeResult::Failure
                }
            };
            if let Some(res) = th.record(outcome) {
                on(ProbeUpdate::Ready(res == ProbeResult::Success));
            }
        }
    };
    let liveness = async {
        wait_started().await;
        let Some(spec) = &probes.liveness else {
            return std::future::pending().await;
        };
        let mut th = Thresholds::for_spec(spec);
        let mut tick = ticker(spec, started_at);
        loop {
            tick.tick().await;
            let r = probe_once(target.as_ref(), spec).await;
            debug!(probe = %spec.kind, ok = r.is_ok(), "probe");
            let outcome = match &r {
                Ok(()) => ProbeResult::Success,
                Err(m) => {
                    liveness_rep.failed(spec.kind, m);
                    ProbeResult::Failure
                }
            };
            if th.record(outcome) == Some(ProbeResult::Failure) {
                return RestartRequest {
                    kind: spec.kind,
                    message: r.err().unwrap_or_default(),
                    grace: spec.termination_grace,
                };
            }
        }
    };
    tokio::select! {
        r = startup => r,
        r = liveness => r,
        r = readiness => r,
    }
}

/// An `AsyncWrite` keeping the first [`MAX_OUTPUT`] bytes and discarding the rest (a
/// chatty probe still reports its exit status).
#[derive(Debug, Clone, Default)]
pub struct OutputBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl OutputBuf {
    /// Exec I/O writing stdout and stderr into this buffer, no stdin, no TTY.
    pub fn io(&self) -> vzk_core::streams::AttachIo {
        vzk_core::streams::AttachIo {
            stdin: None,
            stdout: Some(Box::pin(self.clone())),
            stderr: Some(Box::pin(self.clone())),
            tty: false,
            resize: None,
        }
    }

    /// What was kept.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl AsyncWrite for OutputBuf {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_OUTPUT.saturating_sub(b.len());
        b.extend_from_slice(&data[..data.len().min(room)]);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerPort, ExecAction, HTTPGetAction, HTTPHeader, TCPSocketAction,
    };
    use tokio::net::TcpListener;

    use super::*;

    const F: ProbeResult = ProbeResult::Failure;
    const S: ProbeResult = ProbeResult::Success;

    #[test]
    fn thresholds_change_the_result_only_after_enough_consecutive_outcomes() {
        let mut t = Thresholds::new(Some(F), 2, 3);
        assert_eq!(t.record(S), None, "one success of two");
        assert_eq!(t.record(F), None, "a failure resets the success run");
        assert_eq!(t.record(S), None);
        assert_eq!(t.record(S), Some(S), "two consecutive successes");
        assert_eq!(t.record(S), None, "no change, no report");
        assert_eq!(t.result(), Some(S));
        assert_eq!(t.record(F), None);
        assert_eq!(t.record(F), None);
        assert_eq!(t.record(S), None, "success interrupts the failure run");
        assert_eq!(t.record(F), None);
        assert_eq!(t.record(F), None);
        assert_eq!(t.record(F), Some(F), "three consecutive failures");
        assert_eq!(t.result(), Some(F));
    }

    #[test]
    fn initial_results_are_the_kubelets() {
        let spec = |kind| ProbeSpec {
            kind,
            action: Action::Tcp {
                host: None,
                port: 1,
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 1,
            termination_grace: None,
        };
        assert_eq!(
            Thresholds::for_spec(&spec(ProbeKind::Readiness)).result(),
            Some(F)
        );
        assert_eq!(
            Thresholds::for_spec(&spec(ProbeKind::Liveness)).result(),
            Some(S)
        );
        let mut startup = Thresholds::for_spec(&spec(ProbeKind::Startup));
        assert_eq!(startup.result(), None);
        // Unknown → failure is a change (startup threshold 1 fails at once).
        assert_eq!(startup.record(F), Some(F));
        // Liveness starting at Success: successes never report.
        let mut live = Thresholds::for_spec(&spec(ProbeKind::Liveness));
        assert_eq!(live.record(S), None);
        assert_eq!(live.record(F), Some(F));
    }

    #[test]
    fn backoff_is_immediate_then_doubles_to_the_cap_and_resets_after_a_long_run() {
        let mut b = RestartBackoff::default();
        let short = Duration::from_secs(5);
        let got: Vec<u64> = (0..8).map(|_| b.next_delay(short).as_secs()).collect();
        assert_eq!(got, [0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.next_delay(Duration::from_secs(600)), Duration::ZERO);
        assert_eq!(b.next_delay(short), Duration::from_secs(10));
        assert_eq!(
            b.next_delay(Duration::from_secs(599)),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn status_lines_parse_strictly() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(parse_status_line("HTTP/1.0 302 Found"), Ok(302));
        assert_eq!(parse_status_line("HTTP/1.1 503"), Ok(503));
        assert!(parse_status_line("SSH-2.0-dropbear").is_err());
        assert!(parse_status_line("HTTP/1.1 2000 OK").is_err());
        assert!(parse_status_line("HTTP/1.1 abc OK").is_err());
    }

    fn container() -> Container {
        Container {
            name: "vm".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn specs_apply_defaults_resolve_named_ports_and_reject_bad_ones() {
        let mut c = container();
        c.readiness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("healthz".into()),
                http_headers: Some(vec![HTTPHeader {
                    name: "X-A".into(),
                    value: "b".into(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        c.liveness_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(22),
                ..Default::default()
            }),
            period_seconds: Some(2),
            termination_grace_period_seconds: Some(7),
            ..Default::default()
        });
        let p = ContainerProbes::from_container(&c).unwrap();
        let r = p.readiness.unwrap();
        assert_eq!(
            r.action,
            Action::Http {
                scheme: Scheme::Http,
                host: None,
                port: 8080,
                path: "/healthz".into(),
                headers: vec![("X-A".into(), "b".into())],
            }
        );
        assert_eq!(
            (
                r.period,
                r.timeout,
                r.success_threshold,
                r.failure_threshold
            ),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
        let l = p.liveness.unwrap();
        assert_eq!(l.period, Duration::from_secs(2));
        assert_eq!(l.termination_grace, Some(Duration::from_secs(7)));
        assert!(p.startup.is_none());

        let mut bad = container();
        bad.liveness_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("nope".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let err = ContainerProbes::from_container(&bad).unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
        bad.liveness_probe = Some(Probe::default());
        assert!(matches!(
            ContainerProbes::from_container(&bad),
            Err(ProbeConfigError::NoHandler { .. })
        ));
        bad.liveness_probe = Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec!["true".into()]),
            }),
            success_threshold: Some(2),
            ..Default::default()
        });
        assert!(matches!(
            ContainerProbes::from_container(&bad),
            Err(ProbeConfigError::SuccessThreshold { .. })
        ));
    }

    /// A target on this host: exec runs the command as a local process, sockets are
    /// plain loopback connections.
    struct Local;

    #[async_trait]
    impl ProbeTarget for Local {
        async fn exec(&self, argv: &[String]) -> Result<ExecOutcome, String> {
            let out = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| e.to_string())?;
            let mut output = out.stdout;
            output.extend_from_slice(&out.stderr);
            Ok(ExecOutcome {
                code: out.status.code().unwrap_or(-1),
                output,
            })
        }
        async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
            TcpStream::connect(addr).await
        }
        fn pod_ip(&self) -> Option<IpAddr> {
            Some(IpAddr::from([127, 0, 0, 1]))
        }
    }

    fn spec(kind: ProbeKind, action: Action) -> ProbeSpec {
        ProbeSpec {
            kind,
            action,
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            success_threshold: 1,
            failure_threshold: 1,
            termination_grace: None,
        }
    }

    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn exec_probes_report_output_and_exit_codes() {
        let ok = spec(
            ProbeKind::Readiness,
            Action::Exec {
                command: vec!["true".into()],
            },
        );
        assert_eq!(probe_once(&Local, &ok).await, Ok(()));
        let fail = spec(
            ProbeKind::Readiness,
            Action::Exec {
                command: vec!["sh".into(), "-c".into(), "echo not yet; exit 3".into()],
            },
        );
        assert_eq!(probe_once(&Local, &fail).await, Err("not yet".into()));
        let silent = spec(
            ProbeKind::Readiness,
            Action::Exec {
                command: vec!["false".into()],
            },
        );
        assert_eq!(
            probe_once(&Local, &silent).await,
            Err("command \"false\" exited with 1".into())
        );
        let mut slow = spec(
            ProbeKind::Liveness,
            Action::Exec {
                command: vec!["sleep".into(), "30".into()],
            },
        );
        slow.timeout = Duration::from_secs(1);
        let err = probe_once(&Local, &slow).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }

    #[tokio::test]
    async fn tcp_probes_succeed_on_open_ports_only() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let open = spec(ProbeKind::Liveness, Action::Tcp { host: None, port });
        assert_eq!(probe_once(&Local, &open).await, Ok(()));
        let port = closed_port();
        let closed = spec(
            ProbeKind::Liveness,
            Action::Tcp {
                host: Some("127.0.0.1".into()),
                port,
            },
        );
        assert_eq!(
            probe_once(&Local, &closed).await,
            Err(format!(
                "dial tcp 127.0.0.1:{port}: connect: connection refused"
            ))
        );
    }

    /// A one-request-at-a-time HTTP server answering `status` and recording requests.
    async fn http_server(status: u16) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let _ = c
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        (port, seen)
    }

    #[tokio::test]
    async fn http_probes_send_path_and_headers_and_judge_the_status() {
        let (port, seen) = http_server(204).await;
        let ok = spec(
            ProbeKind::Readiness,
            Action::Http {
                scheme: Scheme::Http,
                host: None,
                port,
                path: "/healthz?x=1".into(),
                headers: vec![
                    ("X-Probe".into(), "yes".into()),
                    ("Bad".into(), "a\r\nb".into()),
                ],
            },
        );
        assert_eq!(probe_once(&Local, &ok).await, Ok(()));
        let req = seen.lock().unwrap()[0].clone();
        assert!(req.starts_with("GET /healthz?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("Host: 127.0.0.1:{port}\r\n")),
            "{req}"
        );
        assert!(req.contains("X-Probe: yes\r\n"), "{req}");
        assert!(req.contains("User-Agent: kube-probe/"), "{req}");
        assert!(!req.contains("Bad:"), "header with CRLF dropped: {req}");

        let (port, _) = http_server(500).await;
        let fail = spec(
            ProbeKind::Readiness,
            Action::Http {
                scheme: Scheme::Http,
                host: None,
                port,
                path: "/".into(),
                headers: vec![],
            },
        );
        assert_eq!(
            probe_once(&Local, &fail).await,
            Err("HTTP probe failed with statuscode: 500".into())
        );
        let port = closed_port();
        let refused = spec(
            ProbeKind::Readiness,
            Action::Http {
                scheme: Scheme::Http,
                host: None,
                port,
                path: "/".into(),
                headers: vec![],
            },
        );
        let err = probe_once(&Local, &refused).await.unwrap_err();
        assert!(err.contains("connection refused"), "{err}");
    }

    #[tokio::test]
    async fn https_probes_do_not_verify_the_certificate() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let Ok(mut tls) = acceptor.accept(c).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            }
        });
        let s = spec(
            ProbeKind::Liveness,
            Action::Http {
                scheme: Scheme::Https,
                host: None,
                port,
                path: "/".into(),
                headers: vec![],
            },
        );
        assert_eq!(probe_once(&Local, &s).await, Ok(()));
    }

    #[tokio::test]
    async fn the_runner_gates_on_startup_reports_readiness_and_returns_on_liveness_failure() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ready");
        let probes = ContainerProbes {
            startup: Some(spec(
                ProbeKind::Startup,
                Action::Tcp {
                    host: None,
                    port: open,
                },
            )),
            readiness: Some(spec(
                ProbeKind::Readiness,
                Action::Exec {
                    command: vec!["test".into(), "-f".into(), flag.display().to_string()],
                },
            )),
            liveness: Some(ProbeSpec {
                failure_threshold: 2,
                termination_grace: Some(Duration::from_secs(3)),
                ..spec(
                    ProbeKind::Liveness,
                    Action::Exec {
                        command: vec![
                            "test".into(),
                            "!".into(),
                            "-f".into(),
                            dir.path().join("dead").display().to_string(),
                        ],
                    },
                )
            }),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn(run(Arc::new(Local), probes, Instant::now(), move |u| {
            let _ = tx.send(u);
        }));
        assert_eq!(rx.recv().await, Some(ProbeUpdate::Started));
        // Not ready until the file exists: a failure event, no Ready(true).
        match rx.recv().await {
            Some(ProbeUpdate::Unhealthy { kind, message }) => {
                assert_eq!(kind, ProbeKind::Readiness);
                assert!(message.starts_with("Readiness probe failed: "), "{message}");
            }
            other => panic!("expected a readiness failure, got {other:?}"),
        }
        std::fs::write(&flag, b"").unwrap();
        loop {
            match rx.recv().await {
                Some(ProbeUpdate::Ready(true)) => break,
                Some(ProbeUpdate::Unhealthy {
                    kind: ProbeKind::Readiness,
                    ..
                }) => {}
                other => panic!("expected Ready(true), got {other:?}"),
            }
        }
        std::fs::write(dir.path().join("dead"), b"").unwrap();
        let req = run.await.unwrap();
        assert_eq!(req.kind, ProbeKind::Liveness);
        assert_eq!(req.grace, Some(Duration::from_secs(3)));
        assert!(req.message.contains("exited with 1"), "{}", req.message);
    }

    #[tokio::test]
    async fn a_failing_startup_probe_requests_a_restart_and_never_starts() {
        let port = closed_port();
        let probes = ContainerProbes {
            startup: Some(ProbeSpec {
                failure_threshold: 2,
                ..spec(ProbeKind::Startup, Action::Tcp { host: None, port })
            }),
            readiness: None,
            liveness: None,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let req = run(Arc::new(Local), probes, Instant::now(), move |u| {
            let _ = tx.send(u);
        })
        .await;
        assert_eq!(req.kind, ProbeKind::Startup);
        assert!(
            req.message.contains("connection refused"),
            "{}",
            req.message
        );
        let mut updates = Vec::new();
        while let Ok(u) = rx.try_recv() {
            updates.push(u);
        }
        assert!(!updates.contains(&ProbeUpdate::Started), "{updates:?}");
        assert!(
            !updates.iter().any(|u| matches!(u, ProbeUpdate::Ready(_))),
            "{updates:?}"
        );
        // Same message twice within the event period: one event.
        assert_eq!(updates.len(), 1, "{updates:?}");
    }
}
