//! TLS for the kubelet port: a serving certificate hot-reloaded from files and client
//! certificates verified against a CA file.
//!
//! * [`CertReloader`] implements rustls' `ResolvesServerCert`; [`CertReloader::watch`]
//!   polls the files' modification times and swaps the key pair in without touching
//!   the listener. A bad new pair is logged and the old one kept.
//! * Client certificates are *optional* at the TLS layer (bearer-token clients have
//!   none) but, when sent, must chain to the client CA. The identity of a verified
//!   client certificate is its CN (user) and O's (groups): [`ClientCertIdentity`].
//! * Only HTTP/1.1 is offered (ALPN), since upgrades need it. Crypto: aws-lc-rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Paths of the TLS material.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// Serving certificate chain (PEM).
    pub cert: PathBuf,
    /// Serving private key (PEM).
    pub key: PathBuf,
    /// CA bundle client certificates must chain to (PEM).
    pub client_ca: PathBuf,
}

/// Loading TLS material failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or parsing a PEM certificate file.
    #[error("reading certificates from {path}")]
    ReadCerts {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// Reading or parsing a PEM private key file.
    #[error("reading the private key from {path}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    /// The key is not usable by rustls (or does not match the certificate).
    #[error("loading the serving key pair")]
    KeyPair(#[source] rustls::Error),
    /// Adding a CA certificate to the trust store.
    #[error("adding a client CA certificate from {path}")]
    AddClientCa {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// Building the client certificate verifier.
    #[error("building the client certificate verifier")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    /// Building the server config.
    #[error("building the TLS server config")]
    ServerConfig(#[source] rustls::Error),
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCerts {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn load_key_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        path: key.to_owned(),
        source,
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(TlsError::KeyPair)
}

/// The serving certificate, swapped in place when its files change.
#[derive(Debug)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl CertReloader {
    /// Loads the pair once; fails if it is unusable.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let ck = load_key_pair(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(ck),
        }))
    }

    /// Re-reads the files now; on error the previous pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = load_key_pair(&self.cert, &self.key)?;
        self.current.store(Arc::new(ck));
        info!(cert = %self.cert.display(), "kubelet api: serving certificate reloaded");
        Ok(())
    }

    /// The certificate chain now served (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }

    /// Polls the files every `every` and reloads on change, until `stop`.
    pub fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut seen = (mtime(&self.cert), mtime(&self.key));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let now = (mtime(&self.cert), mtime(&self.key));
                if now != seen {
                    match self.reload() {
                        Ok(()) => seen = now,
                        Err(error) => {
                            warn!(error = %crate::error_chain(&error), "kubelet api: keeping the old serving certificate")
                        }
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Builds the rustls server config: hot-reloaded serving cert, optional client certs
/// verified against `client_ca`, HTTP/1.1 only.
pub fn server_config(
    reloader: Arc<CertReloader>,
    client_ca: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in read_certs(client_ca)? {
        roots.add(cert).map_err(|source| TlsError::AddClientCa {
            path: client_ca.to_owned(),
            source,
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(TlsError::ClientVerifier)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ServerConfig)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(reloader);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The identity carried by a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertIdentity {
    /// Subject CN.
    pub user: String,
    /// Subject O's.
    pub groups: Vec<String>,
}

/// Reads CN and O's of a (rustls-verified) leaf certificate; `None` without a CN.
pub fn identity_of(leaf: &CertificateDer<'_>) -> Option<ClientCertIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = cert.subject();
    let user = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Some(ClientCertIdentity { user, groups })
}
