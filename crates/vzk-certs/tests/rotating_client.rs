//! The rotating client against a real TLS server that requires client certificates and
//! records, per request, which connection carried it and which certificate that connection
//! presented: a swap leaves an open stream (a watch) running, a connection of the old
//! certificate carries at most the one request it was already checked out for, and every
//! new connection presents the new certificate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::AsyncBufReadExt as _;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use vzk_certs::client::{RotatingClientCert, build_client};

type Log = Arc<Mutex<Vec<(usize, String, String)>>>;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "test-ca");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        Self {
            ca: CertifiedIssuer::self_signed(p, key).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// (cert PEM, key PEM).
    fn issue(&self, cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut p = CertificateParams::new(sans).unwrap_or_else(|e| panic!("{e}"));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = p
            .signed_by(&key, &self.ca)
            .unwrap_or_else(|e| panic!("{e}"));
        (cert.pem(), key.serialize_pem())
    }
}

fn serial_of(der: &[u8]) -> String {
    vzk_certs::inspect::CertInfo::from_der(der)
        .map(|i| i.serial)
        .unwrap_or_default()
}

/// A TLS server requiring client certificates from `pki`'s CA. `/watch` sends `first`, then
/// `second` once `release` is notified, then ends; anything else answers `{}` at once.
async fn server(pki: &Pki, log: Log, release: Arc<tokio::sync::Notify>) -> std::net::SocketAddr {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (cert, key) = pki.issue(
        "127.0.0.1",
        vec!["127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(pki.ca.der().clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let chain =
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap_or_else(|e| panic!("{e}"))];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap_or_else(|e| panic!("{e}"));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let conns = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log, release) = (acceptor.clone(), log.clone(), release.clone());
            let id = conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let serial = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| serial_of(c.as_ref()))
                    .unwrap_or_default();
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let path = req.uri().path().to_owned();
                        if let Ok(mut l) = log.lock() {
                            l.push((id, serial.clone(), path.clone()));
                        }
                        let release = release.clone();
                        async move {
                            let body = if path == "/watch" {
                                let (tx, rx) = tokio::sync::mpsc::channel::<
                                    Result<Frame<Bytes>, Infallible>,
                                >(4);
                                tokio::spawn(async move {
                                    let _ = tx.send(Ok(Frame::data(Bytes::from("first\n")))).await;
                                    release.notified().await;
                                    let _ = tx.send(Ok(Frame::data(Bytes::from("second\n")))).await;
                                });
                                StreamBody::new(tokio_stream_of(rx)).boxed()
                            } else {
                                http_body_util::Full::new(Bytes::from("{}"))
                                    .map_err(|never| match never {})
                                    .boxed()
                            };
                            Ok::<_, Infallible>(hyper::Response::new(body))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn get(client: &kube::Client, path: &str) {
    let req = http::Request::get(path)
        .body(Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    client
        .request_text(req)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
}

#[tokio::test]
async fn a_rotated_certificate_is_used_by_new_connections_while_an_open_stream_stays() {
    let pki = Pki::new();
    let log: Log = Arc::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let addr = server(&pki, log.clone(), release.clone()).await;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, pki.ca.pem()).unwrap_or_else(|e| panic!("{e}"));
    let kubeconfig = dir.path().join("kubelet.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: 'https://{addr}', certificate-authority: '{}'}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\nusers:\n- name: u\n  user: {{}}\n",
            ca.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let pem = |(c, k): (String, String)| format!("{c}{k}");
    let first = pem(pki.issue("system:node:n", vec![], ExtendedKeyUsagePurpose::ClientAuth));
    let second = pem(pki.issue("system:node:n", vec![], ExtendedKeyUsagePurpose::ClientAuth));
    let identity =
        RotatingClientCert::from_pem(first.as_bytes(), "first").unwrap_or_else(|e| panic!("{e}"));
    let (serial_a, serial_b) = (
        identity.info().serial.clone(),
        vzk_certs::client::RotatingClientCert::from_pem(second.as_bytes(), "second")
            .map(|i| i.info().serial.clone())
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let client = build_client(&kubeconfig, identity.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // A request, then a long stream, both with the first certificate.
    get(&client, "/before").await;
    let watch = client
        .request_stream(
            http::Request::get("/watch")
                .body(Vec::new())
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await
        .unwrap_or_else(|e| panic!("watch: {e}"));
    let mut watch = Box::pin(watch);
    let mut line = String::new();
    watch
        .read_line(&mut line)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(line, "first\n");

    // Rotate: three requests; the first may ride the idle connection of the old
    // certificate (it was checked out before anything could retire it), none after it.
    identity
        .swap(second.as_bytes(), "second")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(identity.generation(), 1);
    for p in ["/after-1", "/after-2", "/after-3"] {
        get(&client, p).await;
    }

    // The stream opened before the rotation still delivers.
    release.notify_one();
    line.clear();
    watch
        .read_line(&mut line)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(line, "second\n", "the open stream survived the rotation");
    line.clear();
    let n = watch
        .read_line(&mut line)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 0, "the stream ended: {line:?}");
    get(&client, "/after-watch").await;

    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    let by_path: HashMap<&str, (usize, &str)> = log
        .iter()
        .map(|(c, s, p)| (p.as_str(), (*c, s.as_str())))
        .collect();
    let conn_of = |p: &str| by_path.get(p).map(|x| x.0);
    let serial = |p: &str| by_path.get(p).map(|x| x.1.to_owned()).unwrap_or_default();
    assert_eq!(serial("/before"), serial_a, "{log:?}");
    assert_eq!(serial("/watch"), serial_a, "{log:?}");
    // After the rotation, connections of the old certificate carry at most one request.
    let old_conns: Vec<usize> = log
        .iter()
        .filter(|(_, s, _)| *s == serial_a)
        .map(|(c, _, _)| *c)
        .collect();
    let late_on_old: Vec<&str> = ["/after-1", "/after-2", "/after-3", "/after-watch"]
        .into_iter()
        .filter(|p| conn_of(p).is_some_and(|c| old_conns.contains(&c)))
        .collect();
    assert!(
        late_on_old.len() <= 1 && late_on_old.iter().all(|p| *p == "/after-1"),
        "old-certificate connections reused after the rotation: {late_on_old:?} in {log:?}"
    );
    for p in ["/after-2", "/after-3", "/after-watch"] {
        assert_eq!(
            serial(p),
            serial_b,
            "{p} presented the new certificate: {log:?}"
        );
    }
    // And the pool still works: the new certificate's connection is reused.
    assert_eq!(conn_of("/after-2"), conn_of("/after-3"), "{log:?}");
}
