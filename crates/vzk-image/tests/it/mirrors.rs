//! Registry hosts (`hosts.toml`) against real `docker-registry` processes: mirrors tried
//! in order with fallback to the upstream, capabilities, a mirror's bad content,
//! credentials per host, a private CA (and a client certificate), a pull-through cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use vzk_image::hosts::RegistryHosts;
use vzk_image::manifest::Manifest;
use vzk_image::media_types as mt;
use vzk_image::registry::{Registry, RegistryOptions};
use vzk_image::{
    Credentials, ImageError, ImageStore, Keyring, PullOptions, PullPolicy, PushOptions, Reference,
    push,
};
use vzk_testenv::RegistryConfig;

use crate::support::*;

/// A configuration directory with `hosts.toml` files: `(registry directory, contents)`.
fn config_dir(files: &[(&str, String)]) -> (tempfile::TempDir, RegistryHosts) {
    let d = tempfile::tempdir().expect("tmp");
    for (ns, text) in files {
        std::fs::create_dir_all(d.path().join(ns)).expect("mkdir");
        std::fs::write(d.path().join(ns).join("hosts.toml"), text).expect("hosts.toml");
    }
    let hosts = RegistryHosts::load(d.path()).expect("load hosts");
    (d, hosts)
}

/// A small Linux image pushed in several chunks; returns its source directory.
async fn push_image(tmp: &Path, r: &Reference, opts: RegistryOptions) -> PathBuf {
    let src = tmp.join("src");
    if !src.exists() {
        linux_image(&src, 5 << 20);
    }
    push(
        &src,
        r,
        &PushOptions {
            chunk_size: 1 << 20,
            registry: opts,
            ..Default::default()
        },
    )
    .await
    .expect("push");
    src
}

/// Copies `tag` of `from` to the same repository and tag on `to` (what a mirror holds).
async fn copy_image(from: &Reference, to: &str) -> Manifest {
    let src = Registry::new(from, &RegistryOptions::plain(), false).expect("client");
    let dst_ref = Reference::parse(&format!("{to}/{}:copied", from.repository)).expect("ref");
    let dst = Registry::new(&dst_ref, &RegistryOptions::plain(), true).expect("client");
    let fetched = src
        .get_manifest(from.manifest_ref())
        .await
        .expect("manifest");
    let m: Manifest = serde_json::from_slice(&fetched.bytes).expect("parse");
    for d in std::iter::once(&m.config).chain(&m.layers) {
        let (resp, _) = src.get_blob(&d.digest, 0).await.expect("blob");
        let bytes = resp.bytes().await.expect("body");
        dst.put_blob(&d.digest, d.size, move || bytes.into())
            .await
            .expect("put blob");
    }
    let tag = from.tag.as_deref().unwrap_or("latest");
    dst.put_manifest(tag, &fetched.bytes, mt::OCI_MANIFEST)
        .await
        .expect("put manifest");
    m
}

fn compressed(m: &Manifest) -> u64 {
    m.layers.iter().map(|l| l.size).sum()
}

fn pull_opts(hosts: &RegistryHosts) -> PullOptions {
    PullOptions {
        plain_http: true,
        policy: PullPolicy::Always,
        hosts: hosts.clone(),
        ..Default::default()
    }
}

fn assert_same_image(src: &Path, dir: &Path) {
    for f in ["kernel", "initrd", "disk.img", "config.json"] {
        assert_same_file(&src.join(f), &dir.join(f));
    }
}

fn mirror_toml(mirror: &str, caps: &str) -> String {
    format!("[host.\"http://{mirror}\"]\n  capabilities = {caps}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_with_the_image_serves_the_pull_while_the_upstream_is_down() {
    let upstream = registry(false);
    let mirror = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/vm/m:1", upstream.addr)).expect("ref");
    let src = push_image(tmp.path(), &r, RegistryOptions::plain()).await;
    let m = copy_image(&r, &mirror.addr).await;
    let counted = DropProxy::start(mirror.addr.clone(), None).await;
    let (_d, hosts) = config_dir(&[(
        &upstream.addr,
        mirror_toml(&counted.addr, r#"["pull", "resolve"]"#),
    )]);
    drop(upstream); // connection refused from now on
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store
        .pull(&r, &pull_opts(&hosts))
        .await
        .expect("pull via mirror");
    assert_same_image(&src, &img.dir);
    // Every byte came through the mirror (zero chunks are never fetched).
    let served = counted.response_bytes.load(Ordering::SeqCst);
    assert!(served > compressed(&m) / 2, "mirror served {served} bytes");
    // The image keeps the name it was asked for, not the mirror's.
    assert_eq!(img.reference, r.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_is_down_or_lacks_the_image_falls_back_to_the_upstream() {
    let upstream = registry(false);
    let empty_mirror = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/vm/fb:1", upstream.addr)).expect("ref");
    let src = push_image(tmp.path(), &r, RegistryOptions::plain()).await;
    let up = DropProxy::start(upstream.addr.clone(), None).await;
    let empty = DropProxy::start(empty_mirror.addr.clone(), None).await;
    let down = format!("127.0.0.1:{}", vzk_testenv::free_port()); // nothing listens
    let r_via_proxy = Reference::parse(&format!("{}/vm/fb:1", up.addr)).expect("ref");
    // Both kinds of failure in one list: down first, then lacking the image.
    let (_d, hosts) = config_dir(&[(
        &up.addr,
        format!(
            "{}{}",
            mirror_toml(&down, r#"["pull", "resolve"]"#),
            mirror_toml(&empty.addr, r#"["pull", "resolve"]"#)
        ),
    )]);
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store
        .pull(&r_via_proxy, &pull_opts(&hosts))
        .await
        .expect("pull falls back to the upstream");
    assert_same_image(&src, &img.dir);
    let (asked_empty, from_upstream) = (
        empty.response_bytes.load(Ordering::SeqCst),
        up.response_bytes.load(Ordering::SeqCst),
    );
    assert!(asked_empty > 0, "the empty mirror was asked (and said 404)");
    assert!(
        asked_empty < 4096,
        "it served no content: {asked_empty} bytes"
    );
    assert!(
        from_upstream > 1 << 20,
        "the upstream served: {from_upstream}"
    );

    // Each case alone, with a fresh cache.
    for (name, mirror) in [("down", down.as_str()), ("404", empty.addr.as_str())] {
        let (_d, hosts) = config_dir(&[(&up.addr, mirror_toml(mirror, "[]"))]);
        let store = ImageStore::open(tmp.path().join(name), u64::MAX).expect("store");
        let img = store
            .pull(&r_via_proxy, &pull_opts(&hosts))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same_image(&src, &img.dir);
    }
    drop(upstream);
    // With the upstream gone too, the error is the upstream's.
    let (_d, hosts) = config_dir(&[(&up.addr, mirror_toml(&empty.addr, "[]"))]);
    let store = ImageStore::open(tmp.path().join("none"), u64::MAX).expect("store");
    let err = store
        .pull(&r_via_proxy, &pull_opts(&hosts))
        .await
        .expect_err("nobody has it");
    assert!(err.to_string().contains(&up.addr), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_resolve_hosts_resolve_tags_and_pushes_go_to_push_hosts() {
    let upstream = registry(false);
    let mirror = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/vm/caps:1", upstream.addr)).expect("ref");
    let src = push_image(tmp.path(), &r, RegistryOptions::plain()).await;
    copy_image(&r, &mirror.addr).await;
    let digest = Registry::new(&r, &RegistryOptions::plain(), false)
        .expect("client")
        .get_manifest("1")
        .await
        .expect("manifest")
        .digest;
    let (_d, hosts) = config_dir(&[(&upstream.addr, mirror_toml(&mirror.addr, r#"["pull"]"#))]);
    // Pushing with the mirror configured still goes to the upstream only.
    let r2 = Reference::parse(&format!("{}/vm/caps:2", upstream.addr)).expect("ref");
    push_image(
        tmp.path(),
        &r2,
        RegistryOptions {
            plain_http: true,
            hosts: hosts.clone(),
            ..Default::default()
        },
    )
    .await;
    let on_mirror = Reference::parse(&format!("{}/vm/caps:2", mirror.addr)).expect("ref");
    let err = Registry::new(&on_mirror, &RegistryOptions::plain(), false)
        .expect("client")
        .get_manifest("2")
        .await
        .expect_err("the mirror got no push");
    assert!(matches!(err, ImageError::NotFound { .. }), "{err:?}");
    drop(upstream);
    // A pull-only mirror is not trusted with the tag: with the upstream down, no host
    // can resolve it...
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let err = store
        .pull(&r, &pull_opts(&hosts))
        .await
        .expect_err("no resolver");
    assert!(err.to_string().contains(&r.registry), "{err}");
    // ...but by digest it serves the image.
    let by_digest = Reference::parse(&format!("{}/vm/caps@{digest}", r.registry)).expect("ref");
    let img = store
        .pull(&by_digest, &pull_opts(&hosts))
        .await
        .expect("by digest from the pull-only mirror");
    assert_same_image(&src, &img.dir);
    // A configuration without any push host refuses to push, naming the file.
    let (d, no_push) = config_dir(&[(
        "_default",
        format!(
            "server = \"http://{}\"\ncapabilities = [\"pull\", \"resolve\"]\n",
            mirror.addr
        ),
    )]);
    let err = Registry::new(
        &r2,
        &RegistryOptions {
            hosts: no_push,
            ..Default::default()
        },
        true,
    )
    .expect("client")
    .has_blob(mt::OCI_EMPTY_DIGEST)
    .await
    .expect_err("no push host");
    assert!(err.to_string().contains("push capability"), "{err}");
    assert!(
        err.to_string()
            .contains(&d.path().join("_default/hosts.toml").display().to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_with_bad_content_fails_the_pull_naming_it() {
    let upstream = registry(false);
    let mirror = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/vm/bad:1", upstream.addr)).expect("ref");
    push_image(tmp.path(), &r, RegistryOptions::plain()).await;
    let m = copy_image(&r, &mirror.addr).await;
    let victim = m
        .layers
        .iter()
        .filter(|l| l.media_type == mt::VZK_DISK)
        .max_by_key(|l| l.size)
        .expect("a disk chunk");
    let path = mirror.blob_path(&victim.digest);
    let mut bytes = std::fs::read(&path).expect("blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).expect("corrupt");
    let (_d, hosts) = config_dir(&[(&upstream.addr, mirror_toml(&mirror.addr, "[]"))]);
    let root = tmp.path().join("cache");
    let store = ImageStore::open(&root, u64::MAX).expect("store");
    // The upstream has good bytes, but a mirror's bad ones are an error, not a fallback.
    let err = store
        .pull(&r, &pull_opts(&hosts))
        .await
        .expect_err("corrupt on the mirror");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&victim.digest), "{msg}");
    assert!(
        msg.contains(&format!(
            "served by {} (mirror of {})",
            mirror.addr, r.registry
        )),
        "{msg}"
    );
    let installed = std::fs::read_dir(root.join("images/sha256"))
        .expect("ls")
        .count();
    assert_eq!(installed, 0, "nothing cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_follow_the_host_they_were_stored_for() {
    let upstream = TestRegistry::with_auth(USER, PASS);
    let mirror = TestRegistry::with_auth("bob", "mirror-pw");
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/vm/auth:1", upstream.addr)).expect("ref");
    let up_creds = vec![Credentials::basic(USER, PASS)];
    let src = push_image(
        tmp.path(),
        &r,
        RegistryOptions {
            credentials: up_creds.clone(),
            plain_http: true,
            ..Default::default()
        },
    )
    .await;
    // Copy with each side's own credentials.
    let from = Registry::new(
        &r,
        &RegistryOptions {
            credentials: up_creds.clone(),
            plain_http: true,
            ..Default::default()
        },
        false,
    )
    .expect("client");
    let to_ref = Reference::parse(&format!("{}/vm/auth:1", mirror.addr)).expect("ref");
    let to = Registry::new(
        &to_ref,
        &RegistryOptions {
            credentials: vec![Credentials::basic("bob", "mirror-pw")],
            plain_http: true,
            ..Default::default()
        },
        true,
    )
    .expect("client");
    let fetched = from.get_manifest("1").await.expect("manifest");
    let m: Manifest = serde_json::from_slice(&fetched.bytes).expect("parse");
    for d in std::iter::once(&m.config).chain(&m.layers) {
        let (resp, _) = from.get_blob(&d.digest, 0).await.expect("blob");
        let bytes = resp.bytes().await.expect("body");
        to.put_blob(&d.digest, d.size, move || bytes.into())
            .await
            .expect("put");
    }
    to.put_manifest("1", &fetched.bytes, mt::OCI_MANIFEST)
        .await
        .expect("put manifest");
    let (_d, hosts) = config_dir(&[(&upstream.addr, mirror_toml(&mirror.addr, "[]"))]);
    drop(upstream);
    // The upstream's credentials are not sent to the mirror: it refuses, the upstream
    // is down, the pull fails.
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let opts = PullOptions {
        credentials: up_creds.clone(),
        ..pull_opts(&hosts)
    };
    store
        .pull(&r, &opts)
        .await
        .expect_err("the mirror has other credentials");
    // Stored under the mirror's own name, they are used for it.
    let mut keyring = Keyring::new();
    keyring.add(&mirror.addr, Credentials::basic("bob", "mirror-pw"));
    let img = store
        .pull(&r, &PullOptions { keyring, ..opts })
        .await
        .expect("pull with the mirror's credentials");
    assert_same_image(&src, &img.dir);
}

/// A CA and a certificate it signed, written as PEM files into `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "vz-kubelet test registry CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    let sign = |sans: Vec<String>, cn: &str, eku| {
        let mut p = CertificateParams::new(sans).expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = sign(
        vec!["127.0.0.1".into(), "localhost".into()],
        "127.0.0.1",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = sign(
        Vec::new(),
        "vz-kubelet",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    };
    Pki {
        ca: write("ca.pem", &issuer.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_behind_a_private_ca_needs_its_ca_configured() {
    let tmp = tempfile::tempdir().expect("tmp");
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).expect("mkdir");
    let p = pki(&certs);
    let tls = TestRegistry::start_with(&RegistryConfig {
        tls: Some((p.server_cert.clone(), p.server_key.clone())),
        client_ca: Some(p.ca.clone()),
        ..Default::default()
    });
    let r = Reference::parse(&format!("{}/vm/tls:1", tls.addr)).expect("ref");
    // The CA, relative to the registry's directory, and the client certificate the
    // registry demands.
    let d = tempfile::tempdir().expect("cfg");
    let ns = d.path().join(&tls.addr);
    std::fs::create_dir(&ns).expect("mkdir");
    for f in [&p.ca, &p.client_cert, &p.client_key] {
        std::fs::copy(f, ns.join(f.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(
        ns.join("hosts.toml"),
        "ca = \"ca.pem\"\nclient = [[\"client.pem\", \"client-key.pem\"]]\n",
    )
    .expect("hosts.toml");
    let hosts = RegistryHosts::load(d.path()).expect("load");
    let with_ca = RegistryOptions {
        hosts: hosts.clone(),
        ..Default::default()
    };
    let src = push_image(tmp.path(), &r, with_ca).await;
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store
        .pull(
            &r,
            &PullOptions {
                hosts,
                policy: PullPolicy::Always,
                ..Default::default()
            },
        )
        .await
        .expect("pull over TLS with the CA");
    assert_same_image(&src, &img.dir);

    // Without the configuration the certificate is not trusted, and the error says where
    // to put the CA.
    let err = store
        .pull(
            &r,
            &PullOptions {
                policy: PullPolicy::Always,
                ..Default::default()
            },
        )
        .await
        .expect_err("untrusted certificate");
    let msg = err.to_string();
    assert!(msg.contains(&tls.addr), "{msg}");
    assert!(msg.contains("certificate"), "{msg}");
    assert!(msg.contains("ca = "), "{msg}");
    assert!(msg.contains(&format!("{}/hosts.toml", tls.addr)), "{msg}");
    // With the CA but without the client certificate the registry refuses us.
    std::fs::write(ns.join("hosts.toml"), "ca = \"ca.pem\"\n").expect("hosts.toml");
    let ca_only = RegistryHosts::load(d.path()).expect("load");
    store
        .pull(
            &r,
            &PullOptions {
                hosts: ca_only,
                policy: PullPolicy::Always,
                ..Default::default()
            },
        )
        .await
        .expect_err("no client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_through_cache_as_mirror_keeps_serving_when_the_upstream_is_gone() {
    let upstream = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/vm/cache:1", upstream.addr)).expect("ref");
    let src = push_image(tmp.path(), &r, RegistryOptions::plain()).await;
    let cache = TestRegistry::start_with(&RegistryConfig {
        proxy_remote_url: Some(format!("http://{}", upstream.addr)),
        ..Default::default()
    });
    let counted = DropProxy::start(cache.addr.clone(), None).await;
    let (_d, hosts) = config_dir(&[(
        &upstream.addr,
        mirror_toml(&counted.addr, r#"["pull", "resolve"]"#),
    )]);
    // The first pull goes through the cache, which fetches from the upstream.
    let store = ImageStore::open(tmp.path().join("first"), u64::MAX).expect("store");
    let img = store
        .pull(&r, &pull_opts(&hosts))
        .await
        .expect("first pull");
    assert_same_image(&src, &img.dir);
    let first = counted.response_bytes.load(Ordering::SeqCst);
    assert!(first > 1 << 20, "the cache served: {first}");
    drop(upstream);
    // The cache now has it: a fresh store pulls it with the upstream gone.
    let store = ImageStore::open(tmp.path().join("second"), u64::MAX).expect("store");
    let img = store
        .pull(&r, &pull_opts(&hosts))
        .await
        .expect("served from the cache");
    assert_same_image(&src, &img.dir);
    assert!(counted.response_bytes.load(Ordering::SeqCst) > 2 * first - (64 << 10));
}
