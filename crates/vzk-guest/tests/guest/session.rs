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
    for (i, c) in calls.into_iter().enumerate() {
        let out = within(60, c)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(out.stdout, format!("caller-{i}\n").as_bytes());
    }
    assert_eq!(s.dial_count(), 1, "all callers must share one dial");
    assert_eq!(
        db.connections(),
        1,
        "server saw more than one connection:\n{}",
        db.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_restarts() {
    let mut db = Dropbear::start();
    let s = db.session();
    let out = within(30, s.output(&["echo", "before"]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(out.stdout, b"before\n");
    // Kill the server and every connection it had; start it again.
    db.restart();
    let out = within(30, s.output(&["echo", "after"]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(out.stdout, b"after\n");
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
async fn closed_session_fails_fast_and_shared_dial_errors_are_shared() {
    // Nothing listens on this port: every caller gets the same refused dial.
    let db = Dropbear::start();
    let addr = db.addr();
    drop(db);
    let s = GuestSession::new(
        addr,
        vzk_guest::Credentials::with_password("root", "x"),
        HostKeyStore::in_memory(),
        test_config(),
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
            assert!(matches!(sa.as_ref(), DialError::Handshake(_)), "{sa:?}");
        }
        other => panic!("expected dial errors, got {other:?}"),
    }
    assert_eq!(s.dial_count(), 1);
    assert!(!within(30, s.ready()).await);
    s.close();
    s.close();
    assert!(matches!(s.output(&["true"]).await, Err(GuestError::Closed)));
}
