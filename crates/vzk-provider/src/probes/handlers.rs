//! The probe handlers (exec, tcpSocket, httpGet) against a [`ProbeTarget`], and the
//! bounded output buffer of exec probes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;

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
