//! Direct requests to the kubelet API (the API server refuses nodes/proxy to loopback
//! addresses, so stats and the authn/authz edge cases are tested here).

use std::sync::atomic::Ordering;

use rustls::pki_types::pem::PemObject;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::PostParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{FramedRead, FramedWrite};
use vzk_core::stats::{ContainerStats, CpuStats, MemoryStats, PodReference, PodStats};
use vzk_kubelet_api::spdy::{Frame, FrameDecoder, FrameEncoder, Headers};

use crate::load_client as lc;
use crate::support::{self, Opts, PANICS};

async fn sa_token(h: &support::Harness, sa: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(h.admin.clone(), &h.ns);
    if sa != "default" {
        let obj: ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": sa}})).expect("sa json");
        sas.create(&PostParams::default(), &obj)
            .await
            .expect("create sa");
    }
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            ..Default::default()
        },
        ..Default::default()
    };
    let out = sas
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .expect("token request");
    out.status.expect("token status").token
}

#[tokio::test]
async fn no_credentials_is_401_and_anonymous_needs_the_flag() {
    let h = support::start("kapi-anon", Opts::default()).await;
    let (code, body) = h.request(None, "GET", "/healthz", &[]).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("anonymous"), "{body}");
    let (code, _) = h
        .request(
            None,
            "GET",
            "/stats/summary",
            &[("Authorization", "Bearer not-a-real-token")],
        )
        .await;
    assert_eq!(code, 401);

    // With the flag, anonymous is authenticated but still authorized by SAR: denied.
    let open = support::start(
        "kapi-anon2",
        Opts {
            anonymous: true,
            ..Opts::default()
        },
    )
    .await;
    let (code, body) = open.request(None, "GET", "/stats/summary", &[]).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("user=system:anonymous"), "{body}");
}

#[tokio::test]
async fn service_account_tokens_are_authorized_per_subresource() {
    let h = support::start("kapi-sar", Opts::default()).await;
    // No RBAC at all: denied, with a body saying who and what.
    let token = sa_token(&h, "default").await;
    let bearer = format!("Bearer {token}");
    let (code, body) = h
        .request(None, "GET", "/stats/summary", &[("Authorization", &bearer)])
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(&format!("user=system:serviceaccount:{}:default", h.ns)),
        "{body}"
    );
    assert!(
        body.contains("verb=get, resource=nodes, subresource=stats"),
        "{body}"
    );

    // A reader allowed `get nodes/stats` only.
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{}-stats", h.ns)},
        "rules": [{"apiGroups": [""], "resources": ["nodes/stats"], "verbs": ["get"]}],
    }))
    .expect("role");
    Api::<ClusterRole>::all(h.admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .expect("role");
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{}-stats", h.ns)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{}-stats", h.ns)},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": h.ns}],
    }))
    .expect("binding");
    Api::<ClusterRoleBinding>::all(h.admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
    let reader = format!("Bearer {}", sa_token(&h, "reader").await);
    let (code, body) = h
        .request(None, "GET", "/stats/summary", &[("Authorization", &reader)])
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = h
        .request(
            None,
            "GET",
            "/containerLogs/a/b/c",
            &[("Authorization", &reader)],
        )
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("subresource=proxy"), "{body}");
}

#[tokio::test]
async fn stats_metrics_pods_and_healthz_with_the_apiserver_certificate() {
    let h = support::start("kapi-stats", Opts::default()).await;
    let t = chrono::Utc::now();
    if let Ok(mut s) = h.runtime.stats.lock() {
        s.push(PodStats {
            pod_ref: PodReference {
                name: h.pod.clone(),
                namespace: h.ns.clone(),
                uid: "u1".into(),
            },
            containers: vec![ContainerStats {
                name: "vm".into(),
                cpu: Some(CpuStats {
                    time: t,
                    usage_nano_cores: Some(5_000_000),
                    usage_core_nano_seconds: Some(3_000_000_000),
                }),
                memory: Some(MemoryStats {
                    time: t,
                    working_set_bytes: Some(123_456),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            cpu: Some(CpuStats {
                time: t,
                usage_nano_cores: Some(5_000_000),
                usage_core_nano_seconds: Some(3_000_000_000),
            }),
            memory: Some(MemoryStats {
                time: t,
                working_set_bytes: Some(123_456),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let id = h.apiserver_identity();
    let (code, body) = h.request(Some(&id), "GET", "/healthz", &[]).await;
    assert_eq!((code, body.as_str()), (200, "ok"));

    let (code, body) = h.request(Some(&id), "GET", "/stats/summary", &[]).await;
    assert_eq!(code, 200, "{body}");
    let summary: vzk_core::stats::Summary = serde_json::from_str(&body).expect("summary parses");
    assert_eq!(summary.node.node_name, h.node);
    assert!(
        summary
            .node
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes)
            .is_some_and(|b| b > 0)
    );
    assert_eq!(
        summary.pods[0].containers[0]
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes),
        Some(123_456)
    );

    let (code, body) = h.request(Some(&id), "GET", "/metrics/resource", &[]).await;
    assert_eq!(code, 200, "{body}");
    let line = format!(
        "container_memory_working_set_bytes{{container=\"vm\",namespace=\"{}\",pod=\"{}\"}} 123456 ",
        h.ns, h.pod
    );
    assert!(body.contains(&line), "{body}");
    assert!(body.contains(&format!(
        "container_cpu_usage_seconds_total{{container=\"vm\",namespace=\"{}\",pod=\"{}\"}} 3 ",
        h.ns, h.pod
    )));
    // Every sample line is `name{labels} value timestamp_ms`.
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("scrape_error"))
    {
        let parts: Vec<&str> = l.rsplitn(3, ' ').collect();
        assert_eq!(parts.len(), 3, "{l}");
        assert!(
            parts[0]
                .parse::<i64>()
                .is_ok_and(|ms| ms > 1_600_000_000_000),
            "{l}"
        );
        assert!(parts[1].parse::<f64>().is_ok(), "{l}");
    }
    assert!(body.contains("node_cpu_usage_seconds_total "));

    let (code, body) = h.request(Some(&id), "GET", "/pods", &[]).await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("pod list");
    assert_eq!(v["kind"], "PodList");

    // What the runtime runs, as the kubelet's debugging handler lists it.
    let (code, body) = h.request(Some(&id), "GET", "/runningpods/", &[]).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("running pod list");
    assert_eq!(v["kind"], "PodList");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["items"][0]["metadata"]["name"], h.pod.as_str());
    assert_eq!(v["items"][0]["metadata"]["namespace"], h.ns.as_str());
    assert_eq!(v["items"][0]["spec"]["containers"][0]["name"], "vm");

    let (code, body) = h.request(Some(&id), "GET", "/metrics", &[]).await;
    assert_eq!(code, 200);
    assert!(
        body.contains("vzk_kubelet_api_requests_total{route=\"stats\",code=\"200\"} 1"),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_upgrades_get_clean_errors() {
    let h = support::start("kapi-bad", Opts::default()).await;
    let id = h.apiserver_identity();
    let exec = "/exec/ns/p/c?command=ls&output=1";
    let (code, body) = h.request(Some(&id), "POST", exec, &[]).await;
    assert_eq!(code, 400, "not an upgrade: {body}");
    let up = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];
    let (code, body) = h.request(Some(&id), "POST", exec, &up).await;
    assert_eq!(code, 400, "no protocol header: {body}");
    let mut s = h.tls(Some(&id)).await;
    s.write_all(format!("POST {exec} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v9.channel.k8s.io\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_lowercase();
    assert!(text.starts_with("http/1.1 403"), "{text}");
    assert!(
        text.contains("x-accepted-stream-protocol-versions: v5.channel.k8s.io"),
        "{text}"
    );
    let (code, body) = h
        .request(Some(&id), "POST", "/exec/ns/p/c?command=ls", &up)
        .await;
    assert_eq!(code, 400, "no stream requested: {body}");
    let ws = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Protocol", "v9.channel.k8s.io"),
    ];
    let (code, body) = h.request(Some(&id), "GET", exec, &ws).await;
    assert_eq!(code, 403, "unknown websocket protocol: {body}");
    let (code, _) = h
        .request(Some(&id), "GET", "/portForward/ns/p", &ws[..4])
        .await;
    assert_eq!(code, 400, "channel port-forward without ports");
}

/// Upgrades to SPDY and returns the stream plus bytes already read past the headers.
async fn spdy_upgrade(
    h: &support::Harness,
    path: &str,
    protocol: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let id = h.apiserver_identity();
    let mut s = h.tls(Some(&id)).await;
    s.write_all(format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(
            n > 0,
            "closed during upgrade: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(&format!("x-stream-protocol-version: {protocol}")),
        "{head}"
    );
    (s, buf[end..].to_vec())
}

/// A RST_STREAM with a 12-byte payload (it has 8) and two stray bytes.
const GARBAGE: [u8; 22] = [
    0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0c, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0xde,
    0xad,
];

#[tokio::test]
async fn garbage_frames_end_the_session_without_a_panic() {
    let h = support::start("kapi-garbage", Opts::default()).await;
    let (mut s, _) = spdy_upgrade(
        &h,
        "/exec/ns/p/c?command=cat&input=1&output=1",
        "v4.channel.k8s.io",
    )
    .await;
    s.write_all(&GARBAGE).await.expect("send garbage");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "server must close a session with a corrupt frame"
    );
    let id = h.apiserver_identity();
    // The same garbage in the middle of a running exec (streams open, `cat` echoing) and
    // of a port-forward with a live stream pair ends those sessions too, and a bystander
    // session keeps working.
    let cfg = lc::client_config(&h, &id).expect("client config");
    let echo = lc::echo_server().await.expect("echo server");
    let exec = lc::exec_cat(h.port, &cfg).await.expect("exec");
    let pf = lc::port_forward(h.port, &cfg, echo)
        .await
        .expect("port-forward");
    for (what, (mut out, mut inp), from) in [("exec", exec, 5), ("port-forward", pf, 3)] {
        let echoed = lc::round_trip(&mut out, &mut inp, 3, from, b"before")
            .await
            .expect("echo before the garbage");
        assert_eq!(echoed, b"before", "{what}");
        let w = out.get_mut();
        w.write_all(&GARBAGE).await.expect("send garbage");
        w.flush().await.expect("flush");
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = inp.next().await {}
        })
        .await;
        assert!(ended.is_ok(), "server must end the {what} session");
    }
    let p = lc::payload(5, 256 * 1024);
    let got = tokio::time::timeout(Duration::from_secs(30), lc::exec_echo(h.port, &cfg, &p))
        .await
        .expect("bystander in time")
        .expect("bystander exec");
    assert!(got == p, "bystander echoed its own bytes");
    let (code, _) = h.request(Some(&id), "GET", "/healthz", &[]).await;
    assert_eq!(code, 200, "server still serves");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "no panic anywhere");
}

#[tokio::test]
async fn spdy_port_forward_with_our_codec_as_client_pairs_streams_and_echoes_pings() {
    let h = support::start("kapi-pf", Opts::default()).await;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo");
    let echo_port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (s, leftover) = spdy_upgrade(&h, "/portForward/ns/p", "portforward.k8s.io").await;
    let (rd, wr) = tokio::io::split(s);
    let mut out = FramedWrite::new(wr, FrameEncoder::new().expect("encoder"));
    let mut inp = FramedRead::new(rd, FrameDecoder::new());
    inp.read_buffer_mut().extend_from_slice(&leftover);
    let port = echo_port.to_string();
    for (id, kind) in [(1u32, "error"), (3, "data")] {
        let headers = Headers::new()
            .with("streamType", kind)
            .with("port", &port)
            .with("requestID", "0");
        out.send(Frame::SynStream {
            stream_id: id,
            assoc_stream_id: 0,
            priority: 0,
            flags: 0,
            headers,
        })
        .await
        .expect("syn");
    }
    // Half-close the error stream at once, as client-go does.
    out.send(Frame::Data {
        stream_id: 1,
        fin: true,
        data: Bytes::new(),
    })
    .await
    .expect("fin");
    out.send(Frame::Ping { id: 7 }).await.expect("ping");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for chunk in payload.chunks(16 * 1024) {
        out.send(Frame::Data {
            stream_id: 3,
            fin: false,
            data: Bytes::copy_from_slice(chunk),
        })
        .await
        .expect("data");
    }
    let mut got = BytesMut::new();
    let (mut replies, mut pong) = (0, false);
    while got.len() < payload.len() {
        let f = tokio::time::timeout(Duration::from_secs(20), inp.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("valid frame");
        match f {
            Frame::SynReply { .. } => replies += 1,
            Frame::Ping { id } => pong = id == 7,
            Frame::Data {
                stream_id: 3, data, ..
            } => got.extend_from_slice(&data),
            _ => {}
        }
    }
    assert_eq!(replies, 2, "both streams accepted");
    assert!(pong, "ping echoed");
    assert_eq!(&got[..], &payload[..], "echoed byte for byte");
    // A stream with a bad port is refused with RST_STREAM.
    let bad = Headers::new()
        .with("streamType", "data")
        .with("port", "0")
        .with("requestID", "1");
    out.send(Frame::SynStream {
        stream_id: 5,
        assoc_stream_id: 0,
        priority: 0,
        flags: 0,
        headers: bad,
    })
    .await
    .expect("syn");
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), inp.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("valid");
        if let Frame::RstStream { stream_id, status } = f {
            assert_eq!((stream_id, status), (5, 1));
            break;
        }
    }
}

#[tokio::test]
async fn serving_certificate_files_are_hot_reloaded() {
    let h = support::start(
        "kapi-reload",
        Opts {
            fast_reload: true,
            ..Opts::default()
        },
    )
    .await;
    let served = |s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        s.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .expect("server cert")
    };
    let before = served(&h.tls(None).await);
    let fresh = h.cp.issue_serving_cert(&["127.0.0.1"]);
    // Key first, then the certificate: a reload between the two writes fails and keeps the old pair.
    std::fs::write(h.dir.path().join("kubelet.key"), &fresh.key_pem).expect("write key");
    std::fs::write(h.dir.path().join("kubelet.crt"), &fresh.cert_pem).expect("write cert");
    let fresh_der = rustls::pki_types::CertificateDer::from_pem_slice(fresh.cert_pem.as_bytes())
        .expect("pem")
        .to_vec();
    let mut now = before.clone();
    for _ in 0..100 {
        now = served(&h.tls(None).await);
        if now != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(now, fresh_der, "new connections get the new certificate");
}

#[tokio::test]
async fn missing_streams_time_out_and_close_the_session() {
    let h = support::start(
        "kapi-timeout",
        Opts {
            short_stream_timeout: true,
            ..Opts::default()
        },
    )
    .await;
    let (mut s, _) = spdy_upgrade(
        &h,
        "/exec/ns/p/c?command=cat&input=1&output=1",
        "v4.channel.k8s.io",
    )
    .await;
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "session closed after the stream-creation timeout"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the timeout"
    );
}

#[tokio::test]
async fn port_forward_failure_is_reported_as_json_on_the_error_stream() {
    let h = support::start("kapi-pferr", Opts::default()).await;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (s, leftover) = spdy_upgrade(&h, "/portForward/ns/p", "portforward.k8s.io").await;
    let (rd, wr) = tokio::io::split(s);
    let mut out = FramedWrite::new(wr, FrameEncoder::new().expect("encoder"));
    let mut inp = FramedRead::new(rd, FrameDecoder::new());
    inp.read_buffer_mut().extend_from_slice(&leftover);
    let port = closed_port.to_string();
    for (id, kind) in [(1u32, "error"), (3, "data")] {
        let headers = Headers::new()
            .with("streamType", kind)
            .with("port", &port)
            .with("requestID", "0");
        out.send(Frame::SynStream {
            stream_id: id,
            assoc_stream_id: 0,
            priority: 0,
            flags: 0,
            headers,
        })
        .await
        .expect("syn");
    }
    let mut err = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), inp.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("valid");
        if let Frame::Data {
            stream_id: 1,
            data,
            fin,
        } = f
        {
            err.extend_from_slice(&data);
            if fin {
                break;
            }
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&err).expect("error stream carries JSON");
    assert_eq!(v["closeConnection"], true);
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with(&format!("error forwarding port {closed_port} to pod ns/p")),
        "{msg}"
    );
}
