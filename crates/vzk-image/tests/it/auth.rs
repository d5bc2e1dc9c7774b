//! The bearer-token challenge flow against a scripted token server: username/password
//! on the token endpoint, an identity (refresh) token, and refusal.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vzk_image::registry::{Registry, RegistryOptions};
use vzk_image::{Credentials, ImageError, Reference};

const MANIFEST: &str = r#"{"schemaVersion":2}"#;

/// Serves `/token` (Basic alice:s3cret, or refresh token `rt-1`) and a manifest that
/// needs `Bearer tok-1`. Records the requests it saw.
async fn token_registry() -> (String, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, s) = (addr.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let (addr, seen) = (a.clone(), s.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                let head_end = loop {
                    let Ok(n) = sock.read(&mut tmp).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let Ok(n) = sock.read(&mut tmp).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                let auth = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("authorization: ")
                            .or_else(|| l.strip_prefix("Authorization: "))
                    })
                    .unwrap_or("")
                    .to_string();
                seen.lock()
                    .expect("lock")
                    .push(format!("{line} | {auth} | {body}"));
                let (status, extra, resp) = if line.contains("/token") {
                    // base64("alice:s3cret") = YWxpY2U6czNjcmV0
                    let ok =
                        auth == "Basic YWxpY2U6czNjcmV0" || body.contains("refresh_token=rt-1");
                    if ok
                        && (line.contains("scope=repository%3Avm%2Fx%3Apull")
                            || body.contains("scope=repository%3Avm%2Fx%3Apull"))
                    {
                        (
                            "200 OK",
                            String::new(),
                            r#"{"token":"tok-1","access_token":"tok-1"}"#.to_string(),
                        )
                    } else {
                        (
                            "401 Unauthorized",
                            String::new(),
                            r#"{"errors":[{"code":"DENIED"}]}"#.to_string(),
                        )
                    }
                } else if auth == "Bearer tok-1" {
                    (
                        "200 OK",
                        format!("Content-Type: {}\r\n", vzk_image::media_types::OCI_MANIFEST),
                        MANIFEST.to_string(),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        format!(
                            "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"fake\",scope=\"repository:vm/x:pull\"\r\n"
                        ),
                        r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_string(),
                    )
                };
                let out = format!(
                    "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{resp}",
                    resp.len()
                );
                let _ = sock.write_all(out.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

fn opts(credentials: Vec<Credentials>) -> RegistryOptions {
    RegistryOptions {
        credentials,
        plain_http: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn bearer_token_with_password_and_with_identity_token() {
    let (addr, seen) = token_registry().await;
    let r = Reference::parse(&format!("{addr}/vm/x:1")).expect("ref");
    let reg = Registry::new(
        &r,
        &opts(vec![Credentials::basic("alice", "s3cret")]),
        false,
    )
    .expect("client");
    let m = reg.get_manifest("1").await.expect("manifest via token");
    assert_eq!(&m.bytes[..], MANIFEST.as_bytes());
    // The token is cached: a second request goes straight through.
    let before = seen.lock().expect("lock").len();
    reg.get_manifest("1").await.expect("again");
    assert_eq!(seen.lock().expect("lock").len(), before + 1);

    let refresh = Credentials {
        identity_token: Some("rt-1".into()),
        ..Credentials::basic("<token>", "")
    };
    let reg = Registry::new(&r, &opts(vec![refresh]), false).expect("client");
    reg.get_manifest("1")
        .await
        .expect("manifest via refresh token");
    assert!(
        seen.lock()
            .expect("lock")
            .iter()
            .any(|l| l.starts_with("POST /token") && l.contains("grant_type=refresh_token"))
    );
}

#[tokio::test]
async fn refused_token_names_the_registry_and_later_credentials_are_tried() {
    let (addr, _) = token_registry().await;
    let r = Reference::parse(&format!("{addr}/vm/x:1")).expect("ref");
    let reg =
        Registry::new(&r, &opts(vec![Credentials::basic("alice", "nope")]), false).expect("client");
    let err = reg.get_manifest("1").await.expect_err("refused");
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
    // Like the kubelet's keyring: the next matching credential is tried.
    let reg = Registry::new(
        &r,
        &opts(vec![
            Credentials::basic("alice", "nope"),
            Credentials::basic("alice", "s3cret"),
        ]),
        false,
    )
    .expect("client");
    reg.get_manifest("1")
        .await
        .expect("second credential works");
}
