//! Fetching a restore image for `image create macos`: a dropped download resumes with
//! `Range`, a finished one is reused, a missing one fails at once.

use std::sync::atomic::Ordering;

use vzk_image::Reference;
use vzk_image::create::{IpswSource, fetch_ipsw};
use vzk_image::progress::NoProgress;
use vzk_image::registry::{Registry, RegistryOptions, sha256_digest};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_image_download_resumes_and_is_reused() {
    let reg = registry(false);
    // The registry serves a blob with Range like a CDN serves an IPSW.
    let data = random_bytes(77, 5 << 20);
    let digest = sha256_digest(&data);
    let r = Reference::parse(&format!("{}/ipsw/restore:1", reg.addr)).expect("ref");
    let opts = RegistryOptions {
        plain_http: true,
        ..Default::default()
    };
    let body = data.clone();
    Registry::new(&r, &opts, true)
        .expect("registry")
        .put_blob(&digest, data.len() as u64, move || {
            reqwest::Body::from(body.clone())
        })
        .await
        .expect("put blob");
    let proxy = DropProxy::start(reg.addr.clone(), Some(2 << 20)).await;
    let url = format!(
        "http://{}/v2/ipsw/restore/blobs/{digest}?name=UniversalMac_14.6.1_23G93_Restore.ipsw",
        proxy.addr
    );
    let cache = tempfile::tempdir().expect("tmp");
    let got = fetch_ipsw(&IpswSource::Url(url.clone()), cache.path(), &NoProgress)
        .await
        .expect("download");
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the first response was cut"
    );
    assert_eq!(std::fs::read(&got).expect("read"), data);
    // Resumed, not restarted: about 5 MiB crossed the proxy, not 7.
    let passed = proxy.response_bytes.load(Ordering::SeqCst);
    assert!(passed < (5 << 20) + (1 << 20), "{passed} bytes");
    assert!(got.starts_with(cache.path().join("ipsw")));
    // No partial file is left.
    let names: Vec<String> = std::fs::read_dir(cache.path().join("ipsw"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // Downloaded once: the registry gone, the same file is found.
    drop(reg);
    let again = fetch_ipsw(&IpswSource::Url(url), cache.path(), &NoProgress)
        .await
        .expect("reused");
    assert_eq!(again, got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_restore_image_fails_at_once_naming_it() {
    let reg = registry(false);
    let url = format!(
        "http://{}/v2/ipsw/none/blobs/sha256:{}",
        reg.addr,
        "0".repeat(64)
    );
    let cache = tempfile::tempdir().expect("tmp");
    let started = std::time::Instant::now();
    let e = fetch_ipsw(&IpswSource::Url(url.clone()), cache.path(), &NoProgress)
        .await
        .expect_err("404")
        .to_string();
    assert!(e.contains("HTTP 404") && e.contains(&url), "{e}");
    // Retries would wait 2 + 4 + 8 + 16 s.
    assert!(started.elapsed().as_secs() < 20, "no retries on a 404");
    let e = fetch_ipsw(
        &IpswSource::Path(cache.path().join("nope.ipsw")),
        cache.path(),
        &NoProgress,
    )
    .await
    .expect_err("no file")
    .to_string();
    assert!(e.contains("nope.ipsw"), "{e}");
}
