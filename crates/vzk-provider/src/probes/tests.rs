#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::api::core::v1::{
    ContainerPort, ExecAction, HTTPGetAction, HTTPHeader, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::*;

const F: ProbeResult = ProbeResult::Failure;
const S: ProbeResult = ProbeResult::Success;

#[test]
fn thresholds_change_the_result_only_after_enough_consecutive_outcomes() {
    let mut t = Thresholds::new(Some(F), 2, 3);
    assert_eq!(t.record(S), None, "one success of two");
    assert_eq!(t.record(F), None, "a failure resets the success run");
    assert_eq!(t.record(S), None);
    assert_eq!(t.record(S), Some(S), "two consecutive successes");
    assert_eq!(t.record(S), None, "no change, no report");
    assert_eq!(t.result(), Some(S));
    assert_eq!(t.record(F), None);
    assert_eq!(t.record(F), None);
    assert_eq!(t.record(S), None, "success interrupts the failure run");
    assert_eq!(t.record(F), None);
    assert_eq!(t.record(F), None);
    assert_eq!(t.record(F), Some(F), "three consecutive failures");
    assert_eq!(t.result(), Some(F));
}

#[test]
fn initial_results_are_the_kubelets() {
    let spec = |kind| ProbeSpec {
        kind,
        action: Action::Tcp {
            host: None,
            port: 1,
        },
        initial_delay: Duration::ZERO,
        period: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        success_threshold: 1,
        failure_threshold: 1,
        termination_grace: None,
    };
    assert_eq!(
        Thresholds::for_spec(&spec(ProbeKind::Readiness)).result(),
        Some(F)
    );
    assert_eq!(
        Thresholds::for_spec(&spec(ProbeKind::Liveness)).result(),
        Some(S)
    );
    let mut startup = Thresholds::for_spec(&spec(ProbeKind::Startup));
    assert_eq!(startup.result(), None);
    // Unknown → failure is a change (startup threshold 1 fails at once).
    assert_eq!(startup.record(F), Some(F));
    // Liveness starting at Success: successes never report.
    let mut live = Thresholds::for_spec(&spec(ProbeKind::Liveness));
    assert_eq!(live.record(S), None);
    assert_eq!(live.record(F), Some(F));
}

#[test]
fn backoff_is_immediate_then_doubles_to_the_cap_and_resets_after_a_long_run() {
    let mut b = RestartBackoff::default();
    let short = Duration::from_secs(5);
    let got: Vec<u64> = (0..8).map(|_| b.next_delay(short).as_secs()).collect();
    assert_eq!(got, [0, 10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(b.next_delay(Duration::from_secs(600)), Duration::ZERO);
    assert_eq!(b.next_delay(short), Duration::from_secs(10));
    assert_eq!(
        b.next_delay(Duration::from_secs(599)),
        Duration::from_secs(20)
    );
}

#[tokio::test]
async fn a_response_that_is_not_http_fails_the_probe() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let _ = c.write_all(b"SSH-2.0-dropbear\r\n").await;
        }
    });
    let junk = spec(
        ProbeKind::Readiness,
        Action::Http {
            scheme: Scheme::Http,
            host: None,
            port,
            path: "/".into(),
            headers: vec![],
        },
    );
    let err = probe_once(&Local, &junk).await.unwrap_err();
    assert!(
        err.starts_with(&format!("Get \"http://127.0.0.1:{port}/\": ")),
        "{err}"
    );
}

fn container() -> Container {
    Container {
        name: "vm".into(),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: 8080,
            ..Default::default()
        }]),
        ..Default::default()
    }
}

#[test]
fn specs_apply_defaults_resolve_named_ports_and_reject_bad_ones() {
    let mut c = container();
    c.readiness_probe = Some(Probe {
        http_get: Some(HTTPGetAction {
            port: IntOrString::String("http".into()),
            path: Some("healthz".into()),
            http_headers: Some(vec![HTTPHeader {
                name: "X-A".into(),
                value: "b".into(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    c.liveness_probe = Some(Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(22),
            ..Default::default()
        }),
        period_seconds: Some(2),
        termination_grace_period_seconds: Some(7),
        ..Default::default()
    });
    let p = ContainerProbes::from_container(&c).unwrap();
    let r = p.readiness.unwrap();
    assert_eq!(
        r.action,
        Action::Http {
            scheme: Scheme::Http,
            host: None,
            port: 8080,
            path: "/healthz".into(),
            headers: vec![("X-A".into(), "b".into())],
        }
    );
    assert_eq!(
        (
            r.period,
            r.timeout,
            r.success_threshold,
            r.failure_threshold
        ),
        (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
    );
    let l = p.liveness.unwrap();
    assert_eq!(l.period, Duration::from_secs(2));
    assert_eq!(l.termination_grace, Some(Duration::from_secs(7)));
    assert!(p.startup.is_none());

    let mut bad = container();
    bad.liveness_probe = Some(Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("nope".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = ContainerProbes::from_container(&bad).unwrap_err();
    assert!(err.to_string().contains("\"nope\""), "{err}");
    bad.liveness_probe = Some(Probe::default());
    assert!(matches!(
        ContainerProbes::from_container(&bad),
        Err(ProbeConfigError::NoHandler { .. })
    ));
    bad.liveness_probe = Some(Probe {
        exec: Some(ExecAction {
            command: Some(vec!["true".into()]),
        }),
        success_threshold: Some(2),
        ..Default::default()
    });
    assert!(matches!(
        ContainerProbes::from_container(&bad),
        Err(ProbeConfigError::SuccessThreshold { .. })
    ));
}

/// A target on this host: exec runs the command as a local process, sockets are
/// plain loopback connections.
struct Local;

#[async_trait]
impl ProbeTarget for Local {
    async fn exec(&self, argv: &[String]) -> Result<ExecOutcome, String> {
        let out = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| e.to_string())?;
        let mut output = out.stdout;
        output.extend_from_slice(&out.stderr);
        Ok(ExecOutcome {
            code: out.status.code().unwrap_or(-1),
            output,
        })
    }
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        TcpStream::connect(addr).await
    }
    fn pod_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, 1]))
    }
}

fn spec(kind: ProbeKind, action: Action) -> ProbeSpec {
    ProbeSpec {
        kind,
        action,
        initial_delay: Duration::ZERO,
        period: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        success_threshold: 1,
        failure_threshold: 1,
        termination_grace: None,
    }
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn exec_probes_report_output_and_exit_codes() {
    let ok = spec(
        ProbeKind::Readiness,
        Action::Exec {
            command: vec!["true".into()],
        },
    );
    assert_eq!(probe_once(&Local, &ok).await, Ok(()));
    let fail = spec(
        ProbeKind::Readiness,
        Action::Exec {
            command: vec!["sh".into(), "-c".into(), "echo not yet; exit 3".into()],
        },
    );
    assert_eq!(probe_once(&Local, &fail).await, Err("not yet".into()));
    let silent = spec(
        ProbeKind::Readiness,
        Action::Exec {
            command: vec!["false".into()],
        },
    );
    assert_eq!(
        probe_once(&Local, &silent).await,
        Err("command \"false\" exited with 1".into())
    );
    let mut slow = spec(
        ProbeKind::Liveness,
        Action::Exec {
            command: vec!["sleep".into(), "30".into()],
        },
    );
    slow.timeout = Duration::from_secs(1);
    let err = probe_once(&Local, &slow).await.unwrap_err();
    assert!(err.contains("timed out"), "{err}");
}

#[tokio::test]
async fn tcp_probes_succeed_on_open_ports_only() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let open = spec(ProbeKind::Liveness, Action::Tcp { host: None, port });
    assert_eq!(probe_once(&Local, &open).await, Ok(()));
    let port = closed_port();
    let closed = spec(
        ProbeKind::Liveness,
        Action::Tcp {
            host: Some("127.0.0.1".into()),
            port,
        },
    );
    assert_eq!(
        probe_once(&Local, &closed).await,
        Err(format!(
            "dial tcp 127.0.0.1:{port}: connect: connection refused"
        ))
    );
}

/// A one-request-at-a-time HTTP server answering `status` and recording requests.
async fn http_server(status: u16) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            s.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf).into_owned());
            let _ = c
                .write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
        }
    });
    (port, seen)
}

#[tokio::test]
async fn http_probes_send_path_and_headers_and_judge_the_status() {
    let (port, seen) = http_server(204).await;
    let ok = spec(
        ProbeKind::Readiness,
        Action::Http {
            scheme: Scheme::Http,
            host: None,
            port,
            path: "/healthz?x=1".into(),
            headers: vec![
                ("X-Probe".into(), "yes".into()),
                ("Bad".into(), "a\r\nb".into()),
            ],
        },
    );
    assert_eq!(probe_once(&Local, &ok).await, Ok(()));
    let req = seen.lock().unwrap()[0].clone();
    assert!(req.starts_with("GET /healthz?x=1 HTTP/1.1\r\n"), "{req}");
    assert!(
        req.contains(&format!("Host: 127.0.0.1:{port}\r\n")),
        "{req}"
    );
    assert!(req.contains("X-Probe: yes\r\n"), "{req}");
    assert!(req.contains("User-Agent: kube-probe/"), "{req}");
    assert!(!req.contains("Bad:"), "header with CRLF dropped: {req}");

    let (port, _) = http_server(500).await;
    let fail = spec(
        ProbeKind::Readiness,
        Action::Http {
            scheme: Scheme::Http,
            host: None,
            port,
            path: "/".into(),
            headers: vec![],
        },
    );
    assert_eq!(
        probe_once(&Local, &fail).await,
        Err("HTTP probe failed with statuscode: 500".into())
    );
    let port = closed_port();
    let refused = spec(
        ProbeKind::Readiness,
        Action::Http {
            scheme: Scheme::Http,
            host: None,
            port,
            path: "/".into(),
            headers: vec![],
        },
    );
    let err = probe_once(&Local, &refused).await.unwrap_err();
    assert!(err.contains("connection refused"), "{err}");
}

#[tokio::test]
async fn https_probes_do_not_verify_the_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let Ok(mut tls) = acceptor.accept(c).await else {
                continue;
            };
            let mut buf = [0u8; 1024];
            let _ = tls.read(&mut buf).await;
            let _ = tls
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
            let _ = tls.shutdown().await;
        }
    });
    let s = spec(
        ProbeKind::Liveness,
        Action::Http {
            scheme: Scheme::Https,
            host: None,
            port,
            path: "/".into(),
            headers: vec![],
        },
    );
    assert_eq!(probe_once(&Local, &s).await, Ok(()));
}

#[tokio::test]
async fn the_runner_gates_on_startup_reports_readiness_and_returns_on_liveness_failure() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = l.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    let probes = ContainerProbes {
        startup: Some(spec(
            ProbeKind::Startup,
            Action::Tcp {
                host: None,
                port: open,
            },
        )),
        readiness: Some(spec(
            ProbeKind::Readiness,
            Action::Exec {
                command: vec!["test".into(), "-f".into(), flag.display().to_string()],
            },
        )),
        liveness: Some(ProbeSpec {
            failure_threshold: 2,
            termination_grace: Some(Duration::from_secs(3)),
            ..spec(
                ProbeKind::Liveness,
                Action::Exec {
                    command: vec![
                        "test".into(),
                        "!".into(),
                        "-f".into(),
                        dir.path().join("dead").display().to_string(),
                    ],
                },
            )
        }),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn(run(Arc::new(Local), probes, Instant::now(), move |u| {
        let _ = tx.send(u);
    }));
    assert_eq!(rx.recv().await, Some(ProbeUpdate::Started));
    // Not ready until the file exists: a failure event, no Ready(true).
    match rx.recv().await {
        Some(ProbeUpdate::Unhealthy { kind, message }) => {
            assert_eq!(kind, ProbeKind::Readiness);
            assert!(message.starts_with("Readiness probe failed: "), "{message}");
        }
        other => panic!("expected a readiness failure, got {other:?}"),
    }
    std::fs::write(&flag, b"").unwrap();
    loop {
        match rx.recv().await {
            Some(ProbeUpdate::Ready(true)) => break,
            Some(ProbeUpdate::Unhealthy {
                kind: ProbeKind::Readiness,
                ..
            }) => {}
            other => panic!("expected Ready(true), got {other:?}"),
        }
    }
    std::fs::write(dir.path().join("dead"), b"").unwrap();
    let req = run.await.unwrap();
    assert_eq!(req.kind, ProbeKind::Liveness);
    assert_eq!(req.grace, Some(Duration::from_secs(3)));
    assert!(req.message.contains("exited with 1"), "{}", req.message);
}

#[tokio::test]
async fn a_failing_startup_probe_requests_a_restart_and_never_starts() {
    let port = closed_port();
    let probes = ContainerProbes {
        startup: Some(ProbeSpec {
            failure_threshold: 2,
            ..spec(ProbeKind::Startup, Action::Tcp { host: None, port })
        }),
        readiness: None,
        liveness: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = run(Arc::new(Local), probes, Instant::now(), move |u| {
        let _ = tx.send(u);
    })
    .await;
    assert_eq!(req.kind, ProbeKind::Startup);
    assert!(
        req.message.contains("connection refused"),
        "{}",
        req.message
    );
    let mut updates = Vec::new();
    while let Ok(u) = rx.try_recv() {
        updates.push(u);
    }
    assert!(!updates.contains(&ProbeUpdate::Started), "{updates:?}");
    assert!(
        !updates.iter().any(|u| matches!(u, ProbeUpdate::Ready(_))),
        "{updates:?}"
    );
    // Same message twice within the event period: one event.
    assert_eq!(updates.len(), 1, "{updates:?}");
}
