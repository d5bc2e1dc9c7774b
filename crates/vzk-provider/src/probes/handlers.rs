//! The probe handlers (exec, tcpSocket, httpGet) against a [`ProbeTarget`], and the
//! bounded output buffer of exec probes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
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
                let code = match scheme {
                    Scheme::Http => http_status(tcp, &url_host, *port, path, headers).await,
                    Scheme::Https => {
                        let tls = tls_connect(tcp, &url_host).await?;
                        http_status(tls, &url_host, *port, path, headers).await
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

/// Sends one `GET` over hyper's HTTP/1.1 client connection on `s` (the socket the
/// probe opened where the container's network is) and returns the response's status.
/// `Host`, `User-Agent` and `Accept` default as the kubelet's; a header whose name or
/// value is not valid (e.g. carries CR/LF) is dropped.
async fn http_status<S>(
    s: S,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use http::header::{ACCEPT, HOST, HeaderName, HeaderValue, USER_AGENT as UA};
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    // The connection is driven beside the request and dropped with it.
    let driver = AbortOnDrop(tokio::spawn(conn));
    let mut req = http::Request::get(path)
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("invalid probe path {path:?}: {e}"))?;
    let h = req.headers_mut();
    for (n, v) in headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(n, v);
        }
    }
    let defaults = [
        (HOST, host_port(host, port)),
        (UA, USER_AGENT.to_owned()),
        (ACCEPT, "*/*".to_owned()),
    ];
    for (name, value) in defaults {
        if !h.contains_key(&name)
            && let Ok(v) = HeaderValue::from_str(&value)
        {
            h.insert(name, v);
        }
    }
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    drop(driver);
    Ok(resp.status().as_u16())
}

/// Aborts a task when dropped (a probe's timeout cancels its work).
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
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
