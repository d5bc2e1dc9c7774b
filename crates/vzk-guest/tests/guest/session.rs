//! The persistent connection: single-flight dial, reconnect, host-key pinning, close.

use std::sync::Arc;

use vzk_guest::{DialError, GuestError, GuestSession, HostKeyError, HostKeyStore};

use crate::support::{Dropbear, test_config};
use crate::within;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_dial() {
    let db = Dropbear::start();
    let s = db.session();
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.output(&["echo", &format!("caller-{i}")]).await })
        })
        .collect();
    let mut retried = 0u64;
    for (i, c) in calls.into_iter().enumerate() {
        let out = match within(60, c).await.unwrap_or_else(|e| panic!("{e}")) {
            Ok(out) => out,
            // Dropbear (the test server) now and then closes one of several concurrent
            // channels of a short command before sending its exit status (seen in
            // clean-clone CI runs, once with two of the eight), and may drop the
            // connection with it, failing a caller whose exec was in flight. That is the
            // server's race, not the dial's: such a call is run once more, and the
            // bounded-dial assertions below still hold.
            Err(GuestError::Exec {
                source:
                    e @ (vzk_guest::ExecError::NoExitStatus
                    | vzk_guest::ExecError::ClosedBeforeStart
                    | vzk_guest::ExecError::Start(_)),
                ..
            }) => {
                retried += 1;
                eprintln!("caller-{i}: {e:?}; run again");
                within(60, s.output(&["echo", &format!("caller-{i}")]))
                    .await
                    .unwrap_or_else(|e| panic!("{e:?}\nserver log:\n{}", db.log()))
            }
            Err(e) => panic!("caller-{i}: {e:?}\nserver log:\n{}", db.log()),
        };
        assert_eq!(out.stdout, format!("caller-{i}\n").as_bytes());
    }
    // Without the server's race, one dial for all eight (a broken single flight would
    // show up to eight). A call lost to that race may find the connection dropped with
    // it and re-dial once: seen locally as 2 retried calls and 2 dials, and 3 and 3, in
    // about 1 of 15 runs; never a second dial without a retry.
    let most = 1 + retried;
    assert!(
        s.dial_count() >= 1 && s.dial_count() <= most,
        "all callers must share one dial ({} dials, {retried} calls retried)",
        s.dial_count()
    );
    assert!(
        db.connections() as u64 <= most,
        "server saw {} connections ({retried} calls retried):\n{}",
        db.connections(),
        db.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_restarts() {
    let mut db = Dropbear::start();
    let s = db.session();
    echoes(&s, "before").await;
    // Kill the server and every connection it had; start it again.
    db.restart();
    echoes(&s, "after").await;
    assert_eq!(s.dial_count(), 2);
    assert_eq!(db.connections(), 2, "{}", db.log());
    // And it stays on the new connection.
    assert!(within(30, s.ready()).await);
    assert_eq!(s.dial_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_is_pinned_on_first_connect_and_a_change_is_rejected() {
    let mut db = Dropbear::start();
    let pin = db.dir.path().join("vm-hostkey.pub");
    let s = within(
        30,
        GuestSession::connect(db.addr(), db.creds(), HostKeyStore::file(&pin)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}"));
    let pinned = std::fs::read_to_string(&pin).unwrap_or_else(|e| panic!("pin file: {e}"));
    assert!(pinned.starts_with("ssh-ed25519 "), "{pinned}");
    s.close();
    // Same server, new agent process (new store instance): accepted.
    let s = GuestSession::new(
        db.addr(),
        db.creds(),
        HostKeyStore::file(&pin),
        test_config(),
    );
    assert!(within(30, s.ready()).await);
    s.close();
    // The "VM" now presents a different host key.
    db.restart_with_new_host_key();
    let s = GuestSession::new(
        db.addr(),
        db.creds(),
        HostKeyStore::file(&pin),
        test_config(),
    );
    let err = within(30, s.output(&["true"])).await;
    match &err {
        Err(GuestError::Dial { source, .. }) => {
            assert!(
                matches!(
                    source.as_ref(),
                    DialError::HostKey(HostKeyError::Mismatch { .. })
                ),
                "{source:?}"
            );
        }
        other => panic!("expected a host key mismatch, got {other:?}"),
    }
    let err = err.err().unwrap_or_else(|| panic!("no error"));
    assert!(err.is_permanent());
    assert_eq!(err.into_provider_error().reason(), "GuestHostKeyMismatch");
    // The pin was not overwritten.
    assert_eq!(std::fs::read_to_string(&pin).unwrap_or_default(), pinned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_a_failing_dial_and_close_is_final() {
    // A "guest" that accepts TCP but never speaks SSH: every dial hangs until the
    // dial timeout, so both callers are certainly waiting on the same dial.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = blackhole.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let cfg = vzk_guest::GuestConfig {
        dial_timeout: std::time::Duration::from_millis(1500),
        ..test_config()
    };
    let s = GuestSession::new(
        addr,
        vzk_guest::Credentials::with_password("root", "x"),
        HostKeyStore::in_memory(),
        cfg,
    );
    let (a, b) = within(30, async {
        tokio::join!(s.output(&["true"]), s.output(&["true"]))
    })
    .await;
    match (&a, &b) {
        (Err(GuestError::Dial { source: sa, .. }), Err(GuestError::Dial { source: sb, .. })) => {
            assert!(
                Arc::ptr_eq(sa, sb),
                "concurrent callers must share one dial result"
            );
            assert!(matches!(sa.as_ref(), DialError::Timeout(_)), "{sa:?}");
        }
        other => panic!("expected dial errors, got {other:?}"),
    }
    assert_eq!(s.dial_count(), 1);
    // A failed dial is not cached: the next call dials again.
    assert!(!within(30, s.ready()).await);
    assert_eq!(s.dial_count(), 2);
    // close() aborts a dial in flight and is final.
    let s2 = s.clone();
    let pending = tokio::spawn(async move { s2.output(&["true"]).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    s.close();
    s.close();
    let r = within(30, pending).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(&r, Err(GuestError::Dial { source, .. }) if matches!(source.as_ref(), DialError::Aborted)),
        "{r:?}"
    );
    assert!(matches!(s.output(&["true"]).await, Err(GuestError::Closed)));
    drop(blackhole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_through_the_given_connector() {
    let db = Dropbear::start();
    let s = db.session();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    s.connect_with(Arc::new(move |addr| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(tokio::net::TcpStream::connect(addr))
    }));
    let out = within(30, s.output(&["echo", "via-connector"]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(out.stdout, b"via-connector\n");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A connector that fails is the dial's failure, named as a connect error.
    let refused = db.session();
    refused.connect_with(Arc::new(|_| {
        Box::pin(async {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "no route into the namespace",
            ))
        })
    }));
    let err = within(30, refused.output(&["true"]))
        .await
        .expect_err("the connector refused");
    assert!(
        format!("{err:?}").contains("no route into the namespace"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_session_keeps_the_connection_and_redials_with_its_own_pin() {
    let mut db = Dropbear::start();
    let s = db.session();
    echoes(&s, "before").await;
    let pin = db.dir.path().join("handed-over.pub");
    let h = s.hand_over(db.creds(), HostKeyStore::file(&pin));
    // The old session is closed; the new one runs on the same connection.
    assert!(matches!(
        within(30, s.output(&["true"])).await,
        Err(GuestError::Closed)
    ));
    echoes(&h, "handed").await;
    assert_eq!(db.connections(), 1, "{}", db.log());
    assert!(!pin.exists(), "no dial, so nothing pinned yet");
    // When that connection ends, the new session dials with its own host-key store.
    db.restart();
    echoes(&h, "after").await;
    assert_eq!(db.connections(), 2, "{}", db.log());
    let pinned = std::fs::read_to_string(&pin).unwrap_or_else(|e| panic!("pin file: {e}"));
    assert!(pinned.starts_with("ssh-ed25519 "), "{pinned}");
    assert!(h.dial_count() > s.dial_count());
}

/// Runs `echo word` in the guest and checks what came back.
async fn echoes(s: &GuestSession, word: &str) {
    let out = within(30, s.output(&["echo", word]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(out.stdout, format!("{word}\n").as_bytes());
}
