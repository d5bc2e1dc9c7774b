//! TLS for the kubelet port: a serving certificate hot-reloaded from files and client
//! certificates verified against a CA file.
//!
//! * [`CertReloader`] implements rustls' `ResolvesServerCert`; [`CertReloader::watch`]
//!   polls the files' modification times and swaps the key pair in without touching
//!   the listener. A bad new pair is logged and the old one kept. Connections already
//!   open keep the certificate they were made with. [`CertReloader::load_or_wait`] also
//!   accepts files that do not exist yet (a serving certificate still being requested by
//!   CSR): until they appear no certificate is served and every handshake is refused.
//! * Refused handshakes are logged at warn level with the client's address and the reason
//!   in words ([`refusal_reason`]: e.g. an X.509 v1 client certificate, an unknown issuer,
//!   a client that does not trust our serving certificate), at most once per client
//!   address per 10 s ([`HandshakeLog`]).
//! * Client certificates are *optional* at the TLS layer (bearer-token clients have
//!   none) but, when sent, must chain to the client CA. The identity of a verified
//!   client certificate is its CN (user) and O's (groups): [`ClientCertIdentity`].
//! * Only HTTP/1.1 is offered (ALPN), since upgrades need it. Crypto: aws-lc-rs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    current: ArcSwapOption<CertifiedKey>,
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
            current: ArcSwapOption::from_pointee(ck),
        }))
    }

    /// Like [`CertReloader::load`], but files that do not exist yet (or do not load) are no
    /// error: nothing is served (handshakes are refused) until they appear and
    /// [`CertReloader::watch`] or [`CertReloader::reload`] picks them up.
    pub fn load_or_wait(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        if cert.exists() && key.exists() {
            match Self::load(cert, key) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "kubelet api: the stored serving certificate is unusable; waiting for a new one");
                }
            }
        }
        info!(cert = %cert.display(), "kubelet api: no serving certificate yet; refusing connections until it is written");
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwapOption::empty(),
        }))
    }

    /// Re-reads the files now; on error the previous pair stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ck = load_key_pair(&self.cert, &self.key)?;
        self.current.store(Some(Arc::new(ck)));
        info!(cert = %self.cert.display(), "kubelet api: serving certificate reloaded");
        Ok(())
    }

    /// The certificate chain now served (leaf first); empty while there is none.
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current
            .load()
            .as_ref()
            .map(|ck| ck.cert.clone())
            .unwrap_or_default()
    }

    /// Whether a certificate is being served.
    pub fn has_certificate(&self) -> bool {
        self.current.load().is_some()
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
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
        self.current.load_full()
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

/// Why a handshake was refused, in words an operator can act on.
pub fn refusal_reason(err: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(C::Other(other))
            if matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::UnsupportedCertVersion)
            ) =>
        {
            "its client certificate is X.509 v1 (no extensions), and rustls requires X.509 v3 \
             (rustls: UnsupportedCertVersion); re-issue it with v3 extensions (`openssl x509 -req ... \
             -extfile` with extendedKeyUsage=clientAuth); for the API server that is its \
             --kubelet-client-certificate"
                .into()
        }
        E::InvalidCertificate(C::UnknownIssuer) => {
            "its client certificate is not signed by a CA in --client-ca-file".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("its client certificate has expired ({err})")
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            format!("its client certificate is not valid yet, are the clocks apart? ({err})")
        }
        E::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "its client certificate is not for client authentication (extendedKeyUsage lacks clientAuth)"
                .into()
        }
        E::InvalidCertificate(c) => format!("its client certificate was refused: {c}"),
        E::AlertReceived(alert) => format!(
            "it refused this node's serving certificate (TLS alert {alert:?}): it does not trust the \
             certificate's issuer or name; the API server verifies kubelets against \
             --kubelet-certificate-authority, so serve a certificate from that CA (--tls-cert-file, or \
             --rotate-server-certificates and an approved CSR)"
        ),
        E::PeerIncompatible(p) => format!("no TLS version or cipher suite in common ({p:?})"),
        E::InvalidMessage(m) => {
            format!("it does not speak TLS (plain HTTP to the HTTPS port?): {m:?}")
        }
        other => other.to_string(),
    }
}

/// Logs refused handshakes at warn level, at most once per client address per `every`.
#[derive(Debug)]
pub struct HandshakeLog {
    every: Duration,
    last: Mutex<HashMap<IpAddr, Instant>>,
}

impl HandshakeLog {
    /// At most one message per client address per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a refusal from `ip` at `now` is to be logged (and remembers it if so).
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return true;
        };
        if last.len() > 4096 {
            let every = self.every;
            last.retain(|_, t| now.saturating_duration_since(*t) < every);
        }
        match last.get(&ip) {
            Some(t) if now.saturating_duration_since(*t) < self.every => false,
            _ => {
                last.insert(ip, now);
                true
            }
        }
    }

    /// Why a handshake failed, in words: `None` if the client merely closed or broke the
    /// connection (no TLS refusal).
    pub fn reason(error: &std::io::Error, reloader: &CertReloader) -> Option<String> {
        if !reloader.has_certificate() {
            return Some(format!(
                "this node has no serving certificate yet ({} does not exist: its CSR awaits approval, \
                 `kubectl get csr`)",
                reloader.cert_path().display()
            ));
        }
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .map(refusal_reason)
    }

    /// Reports a failed handshake from `peer`: TLS refusals at warn level (rate-limited),
    /// connections that merely closed or broke at debug level.
    pub fn report(
        &self,
        peer: std::net::SocketAddr,
        error: &std::io::Error,
        reloader: &CertReloader,
    ) {
        let Some(reason) = Self::reason(error, reloader) else {
            debug!(%peer, %error, "kubelet api: connection closed during the TLS handshake");
            return;
        };
        if self.allow(peer.ip(), Instant::now()) {
            warn!(client = %peer, reason = %reason, "kubelet api: refused a TLS handshake");
        } else {
            debug!(client = %peer, reason = %reason, "kubelet api: refused a TLS handshake");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    use rustls::pki_types::ServerName;

    const V1_LEAF: &[u8] = include_bytes!("../../vzk-certs/testdata/v1-leaf.pem");
    const V1_KEY: &[u8] = include_bytes!("../../vzk-certs/testdata/v1-leaf.key");

    fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        CertifiedIssuer::self_signed(p, key).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A kubelet-API server config (serving cert for `localhost` from `ca`, client CA `ca`)
    /// and its reloader, files in `dir`.
    fn server(
        dir: &Path,
        ca: &CertifiedIssuer<'static, KeyPair>,
    ) -> (rustls::ServerConfig, Arc<CertReloader>) {
        let mut p =
            CertificateParams::new(vec!["localhost".to_owned()]).unwrap_or_else(|e| panic!("{e}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = p.signed_by(&key, ca).unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str, data: &str| {
            let path = dir.join(name);
            std::fs::write(&path, data).unwrap_or_else(|e| panic!("{e}"));
            path
        };
        let (crt, key, ca_file) = (
            write("kubelet.crt", &cert.pem()),
            write("kubelet.key", &key.serialize_pem()),
            write("ca.crt", &ca.pem()),
        );
        let reloader = CertReloader::load(&crt, &key).unwrap_or_else(|e| panic!("{e}"));
        let cfg = server_config(reloader.clone(), &ca_file).unwrap_or_else(|e| panic!("{e}"));
        (cfg, reloader)
    }

    /// A client trusting `roots`, presenting `identity` if given.
    fn client(
        roots: &CertifiedIssuer<'static, KeyPair>,
        identity: Option<Arc<CertifiedKey>>,
    ) -> rustls::ClientConfig {
        #[derive(Debug)]
        struct Fixed(Arc<CertifiedKey>);
        impl rustls::client::ResolvesClientCert for Fixed {
            fn resolve(
                &self,
                _: &[&[u8]],
                _: &[rustls::SignatureScheme],
            ) -> Option<Arc<CertifiedKey>> {
                Some(self.0.clone())
            }
            fn has_certs(&self) -> bool {
                true
            }
        }
        let mut store = RootCertStore::empty();
        store
            .add(roots.der().clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_root_certificates(store);
        match identity {
            Some(id) => builder.with_client_cert_resolver(Arc::new(Fixed(id))),
            None => builder.with_no_client_auth(),
        }
    }

    /// Runs a handshake in memory; the server's error, if it failed.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Option<rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), name).unwrap_or_else(|e| panic!("{e}"));
        let mut s =
            rustls::ServerConnection::new(Arc::new(server)).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..20 {
            let mut buf = Vec::new();
            let _ = c.write_tls(&mut buf);
            let _ = s.read_tls(&mut buf.as_slice());
            if let Err(e) = s.process_new_packets() {
                return Some(e);
            }
            let mut buf = Vec::new();
            let _ = s.write_tls(&mut buf);
            let _ = c.read_tls(&mut buf.as_slice());
            let _ = c.process_new_packets();
            if !c.is_handshaking() && !s.is_handshaking() {
                return None;
            }
        }
        None
    }

    fn v1_identity() -> Arc<CertifiedKey> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let cert = CertificateDer::from_pem_slice(V1_LEAF).unwrap_or_else(|e| panic!("{e}"));
        let key = PrivateKeyDer::from_pem_slice(V1_KEY).unwrap_or_else(|e| panic!("{e}"));
        let signer = provider
            .key_provider
            .load_private_key(key)
            .unwrap_or_else(|e| panic!("{e}"));
        // CertifiedKey::new does not parse the certificate (from_der would refuse it).
        Arc::new(CertifiedKey::new(vec![cert], signer))
    }

    #[test]
    fn a_v1_client_certificate_is_refused_and_the_reason_says_so() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ca = ca("cluster-ca");
        let (server_cfg, _) = server(dir.path(), &ca);
        let err = handshake(client(&ca, Some(v1_identity())), server_cfg)
            .unwrap_or_else(|| panic!("a v1 client certificate was accepted"));
        assert!(
            format!("{err:?}").contains("UnsupportedCertVersion"),
            "rustls' own words: {err:?}"
        );
        let reason = refusal_reason(&err);
        assert!(reason.contains("X.509 v1"), "{reason}");
        assert!(reason.contains("--kubelet-client-certificate"), "{reason}");
    }

    #[test]
    fn a_client_that_distrusts_the_serving_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (server_cfg, _) = server(dir.path(), &ca("cluster-ca"));
        // The client trusts another CA (an API server with --kubelet-certificate-authority).
        let err = handshake(client(&ca("other-ca"), None), server_cfg)
            .unwrap_or_else(|| panic!("the handshake succeeded"));
        let reason = refusal_reason(&err);
        assert!(
            reason.contains("refused this node's serving certificate"),
            "{reason}"
        );
        assert!(
            reason.contains("--kubelet-certificate-authority"),
            "{reason}"
        );
    }

    #[test]
    fn a_client_certificate_from_another_ca_is_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cluster = ca("cluster-ca");
        let (server_cfg, _) = server(dir.path(), &cluster);
        let other = ca("other-ca");
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "someone");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = p.signed_by(&key, &other).unwrap_or_else(|e| panic!("{e}"));
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let id = CertifiedKey::from_der(
            vec![cert.der().clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .unwrap_or_else(|e| panic!("{e}")),
            &provider,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let err = handshake(client(&cluster, Some(Arc::new(id))), server_cfg)
            .unwrap_or_else(|| panic!("accepted"));
        assert!(
            refusal_reason(&err).contains("not signed by a CA in --client-ca-file"),
            "{err:?}"
        );
    }

    #[test]
    fn without_a_serving_certificate_yet_handshakes_are_refused_naming_the_pending_csr() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ca = ca("cluster-ca");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap_or_else(|e| panic!("{e}"));
        let pem = dir.path().join("kubelet-server-current.pem");
        // A damaged leftover is no certificate either (the manager writes a new one).
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\ngarbage\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let damaged = CertReloader::load_or_wait(&pem, &pem).unwrap_or_else(|e| panic!("{e}"));
        assert!(!damaged.has_certificate());
        std::fs::remove_file(&pem).unwrap_or_else(|e| panic!("{e}"));
        let reloader = CertReloader::load_or_wait(&pem, &pem).unwrap_or_else(|e| panic!("{e}"));
        assert!(!reloader.has_certificate());
        let cfg = server_config(reloader.clone(), &ca_file).unwrap_or_else(|e| panic!("{e}"));
        let err = handshake(client(&ca, None), cfg).unwrap_or_else(|| panic!("served"));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
        let reason = HandshakeLog::reason(&io, &reloader).unwrap_or_default();
        assert!(reason.contains("no serving certificate yet"), "{reason}");
        assert!(reason.contains("kubelet-server-current.pem"), "{reason}");

        // Once the file appears (cert + key in one file) it is served.
        let (crt_pem, key_pem) = {
            let mut p = CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap_or_else(|e| panic!("{e}"));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
            let cert = p.signed_by(&key, &ca).unwrap_or_else(|e| panic!("{e}"));
            (cert.pem(), key.serialize_pem())
        };
        std::fs::write(&pem, format!("{crt_pem}{key_pem}")).unwrap_or_else(|e| panic!("{e}"));
        reloader.reload().unwrap_or_else(|e| panic!("{e}"));
        let cfg = server_config(reloader.clone(), &ca_file).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            handshake(client(&ca, None), cfg).is_none(),
            "handshake after the reload"
        );
        // A connection that just closes is no refusal.
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(HandshakeLog::reason(&eof, &reloader), None);
    }

    #[test]
    fn refusals_are_logged_once_per_client_address_per_window() {
        let log = HandshakeLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let (a, b): (IpAddr, IpAddr) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        assert!(log.allow(a, t0));
        assert!(!log.allow(a, t0 + Duration::from_secs(1)));
        assert!(!log.allow(a, t0 + Duration::from_millis(9_999)));
        assert!(
            log.allow(b, t0 + Duration::from_secs(1)),
            "another client is its own"
        );
        assert!(log.allow(a, t0 + Duration::from_secs(10)));
    }
}
