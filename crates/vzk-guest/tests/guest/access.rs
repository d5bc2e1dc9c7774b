//! Credentials (key file, base64 key with passphrase, password, wrong key) and
//! readiness, against the real server.

use std::time::Duration;

use base64::Engine as _;
use vzk_guest::credentials::{
    ENV_PASSWORD, ENV_PRIVATE_KEY_BASE64, ENV_PRIVATE_KEY_PASSPHRASE, ENV_USER,
};
use vzk_guest::{CredentialSource, Credentials, DialError, GuestError, GuestSession, HostKeyStore};

use crate::support::{Dropbear, PASSPHRASE, PASSWORD, test_config, user_key};
use crate::within;

fn session(db: &Dropbear, creds: Credentials) -> GuestSession {
    GuestSession::new(db.addr(), creds, HostKeyStore::in_memory(), test_config())
}

fn from_env_vars(vars: &[(&str, String)]) -> Credentials {
    let vars = vars.to_vec();
    let src = CredentialSource::from_lookup(|k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    });
    Credentials::load(&src).unwrap_or_else(|e| panic!("credentials: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_encrypted_key_with_passphrase_and_password_both_work() {
    let db = Dropbear::start();
    let pem = std::fs::read(db.dir.path().join("id_enc")).unwrap_or_else(|e| panic!("{e}"));
    let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
    // Line-wrapped base64, as it often arrives from a Secret.
    let wrapped: String = b64
        .as_bytes()
        .chunks(60)
        .map(|c| String::from_utf8_lossy(c) + "\n")
        .collect();
    let creds = from_env_vars(&[
        (ENV_USER, "root".into()),
        (ENV_PRIVATE_KEY_BASE64, wrapped.clone()),
        (ENV_PRIVATE_KEY_PASSPHRASE, PASSPHRASE.into()),
    ]);
    let out = within(30, session(&db, creds).output(&["id", "-u"]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(out.stdout, b"0\n");
    assert!(db.log().contains("Pubkey auth succeeded"), "{}", db.log());

    // Wrong passphrase: a typed error at load time, not at the first exec.
    let src = CredentialSource::from_lookup(|k| match k {
        ENV_USER => Some("root".into()),
        ENV_PRIVATE_KEY_BASE64 => Some(wrapped.clone()),
        ENV_PRIVATE_KEY_PASSPHRASE => Some("wrong".into()),
        _ => None,
    });
    assert!(matches!(
        Credentials::load(&src),
        Err(vzk_guest::CredentialsError::ParseKey { .. })
    ));

    let creds = from_env_vars(&[(ENV_USER, "root".into()), (ENV_PASSWORD, PASSWORD.into())]);
    let out = within(30, session(&db, creds).output(&["echo", "pw"]))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(out.stdout, b"pw\n");
    assert!(db.log().contains("Password auth succeeded"), "{}", db.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_a_clear_permanent_auth_error() {
    let db = Dropbear::start();
    let stranger = db.dir.path().join("stranger");
    user_key(&stranger, "");
    let src = CredentialSource {
        user: Some("root".into()),
        private_key_path: Some(stranger),
        password: Some("not the password".into()),
        ..CredentialSource::default()
    };
    let creds = Credentials::load(&src).unwrap_or_else(|e| panic!("{e}"));
    let s = session(&db, creds);
    let err = within(30, s.output(&["true"]))
        .await
        .err()
        .unwrap_or_else(|| panic!("auth passed"));
    match &err {
        GuestError::Dial { source, .. } => match source.as_ref() {
            DialError::AuthRejected { user, tried } => {
                assert_eq!(user, "root");
                assert_eq!(tried, "publickey,password");
            }
            other => panic!("expected AuthRejected, got {other:?}"),
        },
        other => panic!("expected a dial error, got {other:?}"),
    }
    let text = vzk_guest::ErrorChain(&err).to_string();
    assert!(
        text.contains("authentication rejected for user \"root\""),
        "{text}"
    );
    assert!(err.is_permanent());
    // wait_ready gives up at once instead of polling until its deadline.
    let started = tokio::time::Instant::now();
    let r = within(30, s.wait_ready(Duration::from_secs(20))).await;
    assert!(matches!(r, Err(ref e) if e.is_permanent()), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_succeeds_once_the_guest_starts_sshd() {
    let mut db = Dropbear::start();
    db.stop();
    let s = db.session();
    assert!(!within(30, s.ready()).await, "nothing listens yet");
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { s.wait_ready(Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    db.restart();
    let r = within(40, waiter).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(r.is_ok(), "{r:?}");
    assert!(s.ready().await);
    // And a guest that never comes up makes wait_ready fail with NotReady.
    db.stop();
    s.close();
    let s = db.session();
    let r = within(30, s.wait_ready(Duration::from_secs(1))).await;
    assert!(matches!(r, Err(GuestError::NotReady { .. })), "{r:?}");
}
