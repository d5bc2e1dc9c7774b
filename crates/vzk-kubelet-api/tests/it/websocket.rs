//! The WebSocket protocols kubectl does not use, with a direct client: the base64
//! remotecommand variant and the port-forward channel protocol.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{self, Harness, Opts};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn connect(h: &Harness, path: &str, protocol: &str) -> Ws {
    let tls = h.tls(Some(&h.apiserver_identity())).await;
    let mut req = format!("wss://127.0.0.1:{}{path}", h.port)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().expect("header"));
    let (ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("websocket handshake");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some(protocol)
    );
    ws
}

async fn next(ws: &mut Ws) -> Option<Message> {
    tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("message in time")
        .map(|m| m.expect("valid message"))
}

#[tokio::test]
async fn base64_remotecommand_keeps_channels_apart_and_ends_with_the_status() {
    let h = support::start("kapi-ws64", Opts::default()).await;
    let path = "/exec/ns/p/c?command=sh&command=-c&command=echo%20out%3B%20echo%20err%20%3E%262%3B%20exit%207&output=1&error=1";
    let mut ws = connect(&h, path, "v4.base64.channel.k8s.io").await;
    let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = None;
    while let Some(m) = next(&mut ws).await {
        let Message::Text(t) = m else { continue };
        let (ch, data) = t.as_str().split_at(1);
        first.get_or_insert_with(|| t.as_str().to_owned());
        let data = B64.decode(data).expect("base64 payload");
        match ch {
            "1" => stdout.extend(data),
            "2" => stderr.extend(data),
            "3" => status.extend(data),
            other => panic!("unexpected channel {other}"),
        }
    }
    assert_eq!(
        first.as_deref(),
        Some("1"),
        "readiness: an empty stdout message first"
    );
    assert_eq!(stdout, b"out\n");
    assert_eq!(stderr, b"err\n");
    let v: serde_json::Value = serde_json::from_slice(&status).expect("status json");
    assert_eq!(v["reason"], "NonZeroExitCode");
    assert_eq!(v["details"]["causes"][0]["message"], "7");
}

#[tokio::test]
async fn port_forward_channel_protocol_announces_ports_and_echoes() {
    let h = support::start("kapi-wspf", Opts::default()).await;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut ws = connect(
        &h,
        &format!("/portForward/ns/p?port={port}"),
        "v4.channel.k8s.io",
    )
    .await;
    let mut announced = Vec::new();
    while announced.len() < 2 {
        if let Some(Message::Binary(b)) = next(&mut ws).await {
            announced.push(b.to_vec());
        }
    }
    let le = port.to_le_bytes();
    assert_eq!(
        announced,
        vec![vec![0, le[0], le[1]], vec![1, le[0], le[1]]]
    );
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    for chunk in payload.chunks(10_000) {
        let mut m = vec![0u8];
        m.extend_from_slice(chunk);
        ws.send(Message::Binary(m.into())).await.expect("send");
    }
    let mut got = Vec::new();
    while got.len() < payload.len() {
        match next(&mut ws).await {
            Some(Message::Binary(b)) if b.first() == Some(&0) => got.extend_from_slice(&b[1..]),
            Some(_) => {}
            None => break,
        }
    }
    assert!(got == payload, "echoed byte for byte over channel 0");
}
