//! The side-car runtime against the real dockerd, with a busybox image imported locally
//! (scripts/build-sidecar-image.sh) and, for pulls, a real `docker-registry` on loopback.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Container;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use vzk_core::PodKey;
use vzk_core::streams::{AttachIo, LogOptions};
use vzk_docker::{
    Bind, DockerError, PullOutcome, PullPolicy, RunState, SidecarRuntime, SidecarSpec,
};

/// The locally imported busybox image (built once per test process).
fn image() -> &'static str {
    static IMG: OnceLock<String> = OnceLock::new();
    IMG.get_or_init(|| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-sidecar-image.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg("vzk/busybox:docker-tests")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build-sidecar-image.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
}

fn rand_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    format!("{:016x}", h.finish())
}

/// A runtime with a node name of its own, removing everything it labelled on drop.
struct Rt {
    rt: Arc<SidecarRuntime>,
}

impl Rt {
    async fn new() -> Self {
        let node = format!("dkt-{}", &rand_hex()[..10]);
        Rt {
            rt: Arc::new(SidecarRuntime::connect(&node).await.unwrap()),
        }
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        let node = self.rt.node().to_owned();
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=vz-kubelet.io/node={node}"))
            .output();
        if let Ok(o) = out {
            for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("docker")
                    .args(["rm", "-f", id])
                    .stdout(Stdio::null())
                    .status();
            }
        }
    }
}

fn pod(name: &str) -> PodKey {
    PodKey {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("{}-0000-4000-8000-000000000000", &rand_hex()[..8]),
    }
}

fn container(name: &str, script: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(image().to_owned()),
        command: Some(vec!["sh".into(), "-c".into()]),
        args: Some(vec![script.into()]),
        ..Default::default()
    }
}

async fn run(rt: &SidecarRuntime, pod: &PodKey, c: &Container, binds: &[Bind]) -> String {
    let spec = SidecarSpec {
        pod,
        container: c,
        binds,
        attempt: 0,
    };
    let id = rt.create(&spec).await.unwrap();
    rt.start(&id).await.unwrap();
    id
}

#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn io(out: &Capture, err: Option<&Capture>) -> AttachIo {
    AttachIo {
        stdin: None,
        stdout: Some(Box::pin(out.clone())),
        stderr: err.map(|e| Box::pin(e.clone()) as vzk_core::streams::BoxWriter),
        tty: false,
        resize: None,
    }
}

async fn read_logs(rt: &SidecarRuntime, id: &str, opts: LogOptions) -> String {
    let mut s = rt.logs(id, &opts).await.unwrap();
    let mut all = Vec::new();
    while let Some(c) = s.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_exits_with_its_code_and_has_logs() {
    let rt = Rt::new().await;
    let p = pod("logs");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("msg"), "from-the-host").unwrap();
    let mut c = container(
        "side",
        "echo line-1; echo line-2 >&2; cat /mnt/msg; echo; echo \"$GREETING\"; pwd; exit 5",
    );
    c.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
        name: "GREETING".into(),
        value: Some("hello-env".into()),
        ..Default::default()
    }]);
    c.working_dir = Some("/tmp".into());
    let binds = [Bind {
        host_path: dir.path().to_owned(),
        container_path: "/mnt".into(),
        read_only: true,
    }];
    let id = run(&rt.rt, &p, &c, &binds).await;
    let st = rt.rt.wait(&id).await.unwrap();
    let RunState::Exited {
        exit_code,
        reason,
        started_at,
        finished_at,
        ..
    } = &st.status
    else {
        panic!("not exited: {st:?}")
    };
    assert_eq!((*exit_code, reason.as_str()), (5, "Error"));
    let (s, f) = (started_at.unwrap(), finished_at.unwrap());
    assert!(f >= s, "{s} .. {f}");
    let term = st.to_k8s().terminated.unwrap();
    assert_eq!(term.exit_code, 5);
    assert_eq!(term.container_id, Some(format!("docker://{id}")));

    let all = read_logs(&rt.rt, &id, LogOptions::default()).await;
    // stdout and stderr are separate pipes: their relative order is not kept.
    let lines: Vec<&str> = all.lines().filter(|l| *l != "line-2").collect();
    assert_eq!(
        lines,
        ["line-1", "from-the-host", "hello-env", "/tmp"],
        "{all:?}"
    );
    assert_eq!(all.lines().filter(|l| *l == "line-2").count(), 1, "{all:?}");
    let tail = read_logs(
        &rt.rt,
        &id,
        LogOptions {
            tail_lines: Some(2),
            timestamps: true,
            ..Default::default()
        },
    )
    .await;
    let tl: Vec<&str> = tail.lines().collect();
    assert_eq!(tl.len(), 2, "{tail:?}");
    // The tail is the log's last two lines, in the log's own order (stderr's
    // line-2 may land last: the two pipes are not ordered), each timestamped.
    let last_two: Vec<&str> = all.lines().skip(all.lines().count() - 2).collect();
    for (line, want) in tl.iter().zip(&last_two) {
        let (ts, text) = line.split_once(' ').unwrap_or(("", line));
        assert_eq!(text, *want, "{tail:?} vs {all:?}");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    }
    let limited = read_logs(
        &rt.rt,
        &id,
        LogOptions {
            limit_bytes: Some(9),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(limited, all[..9]);
    let future = read_logs(
        &rt.rt,
        &id,
        LogOptions {
            since_time: Some(chrono::Utc::now() + chrono::Duration::seconds(60)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(future, "");

    // Labels mark it as ours, with the pod's identity.
    let ours = rt.rt.list_ours(Some(&p.uid)).await.unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!(
        (
            ours[0].container.as_str(),
            ours[0].pod.as_str(),
            ours[0].running
        ),
        ("side", "logs", false)
    );
    assert_eq!(ours[0].name, vzk_docker::container_name(&p, "side", 0));
    rt.rt.remove(&id).await.unwrap();
    assert!(matches!(
        rt.rt.inspect(&id).await,
        Err(DockerError::NotFound(_))
    ));
    // Removing twice is fine.
    rt.rt.remove(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_keeps_exit_codes_and_streams_and_attach_sees_the_main_process() {
    let rt = Rt::new().await;
    let p = pod("exec");
    let mut c = container("side", "read line; echo got:$line; exit 4");
    c.stdin = Some(true);
    c.stdin_once = Some(true);
    let id = run(&rt.rt, &p, &c, &[]).await;

    let (out, err) = (Capture::default(), Capture::default());
    let cmd = |s: &str| vec!["sh".to_owned(), "-c".to_owned(), s.to_owned()];
    let st = rt
        .rt
        .exec(
            &id,
            cmd("echo to-out; echo to-err >&2; exit 3"),
            io(&out, Some(&err)),
        )
        .await
        .unwrap();
    assert_eq!(st.code, 3);
    assert_eq!(out.text(), "to-out\n");
    assert_eq!(err.text(), "to-err\n");

    // stdin reaches the exec'd process and its EOF ends it.
    let out = Capture::default();
    let (mut w, r) = tokio::io::duplex(64);
    let mut io2 = io(&out, None);
    io2.stdin = Some(Box::pin(r));
    let rt2 = rt.rt.clone();
    let id2 = id.clone();
    let task = tokio::spawn(async move { rt2.exec(&id2, cmd("tr a-z A-Z"), io2).await });
    w.write_all(b"shout\n").await.unwrap();
    drop(w);
    let st = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((st.code, out.text().as_str()), (0, "SHOUT\n"));

    // A TTY exec merges the streams into one terminal.
    let out = Capture::default();
    let mut io3 = io(&out, None);
    io3.tty = true;
    let st = rt
        .rt
        .exec(
            &id,
            vec!["sh".into(), "-c".into(), "tty; exit 2".into()],
            io3,
        )
        .await
        .unwrap();
    assert_eq!(st.code, 2);
    assert!(out.text().contains("/dev/pts/"), "{:?}", out.text());

    // attach: stdin to the main process, its output back, its exit code.
    let out = Capture::default();
    let (mut w, r) = tokio::io::duplex(64);
    let mut aio = io(&out, None);
    aio.stdin = Some(Box::pin(r));
    let rt2 = rt.rt.clone();
    let id2 = id.clone();
    let task = tokio::spawn(async move { rt2.attach(&id2, aio).await });
    w.write_all(b"attached\n").await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((st.code, out.text().trim()), (4, "got:attached"));

    // exec into a stopped container is a clear error.
    let e = rt
        .rt
        .exec(&id, vec!["true".into()], io(&Capture::default(), None))
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::NotRunning(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_honours_the_grace_period() {
    let rt = Rt::new().await;
    let p = pod("stop");
    // Handles SIGTERM: stops cleanly with exit 0 within the grace period.
    let polite = container(
        "polite",
        "trap 'echo got-term; exit 0' TERM; while true; do sleep 0.1; done",
    );
    // PID 1 without a handler ignores SIGTERM: killed when the grace is spent.
    let stubborn = container("stubborn", "while true; do sleep 0.1; done");
    let a = run(&rt.rt, &p, &polite, &[]).await;
    let b = run(&rt.rt, &p, &stubborn, &[]).await;
    assert!(rt.rt.inspect(&a).await.unwrap().is_running());
    // Let the shell install its trap.
    tokio::time::sleep(Duration::from_millis(500)).await;
    rt.rt.stop(&a, Duration::from_secs(30)).await.unwrap();
    let st = rt.rt.inspect(&a).await.unwrap();
    assert!(
        matches!(st.status, RunState::Exited { exit_code: 0, .. }),
        "{st:?}"
    );
    assert!(
        read_logs(&rt.rt, &a, LogOptions::default())
            .await
            .contains("got-term")
    );
    rt.rt.stop(&b, Duration::from_secs(1)).await.unwrap();
    let st = rt.rt.inspect(&b).await.unwrap();
    assert!(
        matches!(st.status, RunState::Exited { exit_code: 137, .. }),
        "{st:?}"
    );
    // Stopping a stopped container is fine.
    rt.rt.stop(&b, Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_only_our_leftovers() {
    let rt = Rt::new().await;
    let other = Rt::new().await;
    let keep = pod("keep");
    let gone = pod("gone");
    let c = container("side", "sleep 600");
    let kept = run(&rt.rt, &keep, &c, &[]).await;
    let leftover = run(&rt.rt, &gone, &c, &[]).await;
    // The same pod UID on another node: not ours to remove.
    let other_node = run(&other.rt, &gone, &container("other", "sleep 600"), &[]).await;
    // A container without our labels, named like ours (the Go reference's bug).
    let foreign_name = format!("vzk_ns_gone_side_{}_9", &gone.uid[..8]);
    let out = Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &foreign_name,
            image(),
            "sleep",
            "600",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let foreign = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // A name held by a container that is not ours is never taken over.
    let spec = SidecarSpec {
        pod: &gone,
        container: &c,
        binds: &[],
        attempt: 9,
    };
    let e = rt.rt.create(&spec).await.unwrap_err();
    assert!(matches!(e, DockerError::InvalidSpec(_)), "{e:?}");
    let removed = rt.rt.cleanup(|uid| uid == keep.uid).await.unwrap();
    assert_eq!(removed, [vzk_docker::container_name(&gone, "side", 0)]);
    assert!(matches!(
        rt.rt.inspect(&leftover).await,
        Err(DockerError::NotFound(_))
    ));
    assert!(rt.rt.inspect(&kept).await.unwrap().is_running());
    assert!(rt.rt.inspect(&other_node).await.unwrap().is_running());
    assert!(rt.rt.inspect(&foreign).await.unwrap().is_running());
    let _ = Command::new("docker")
        .args(["rm", "-f", &foreign])
        .stdout(Stdio::null())
        .status();
    // find() returns the newest attempt of a container.
    let spec = SidecarSpec {
        pod: &keep,
        container: &c,
        binds: &[],
        attempt: 1,
    };
    let second = rt.rt.create(&spec).await.unwrap();
    let found = rt.rt.find(&keep, "side").await.unwrap().unwrap();
    assert_eq!((found.id.as_str(), found.attempt), (second.as_str(), 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_reaches_the_sidecars_loopback_and_stats_are_reported() {
    let rt = Rt::new().await;
    let p = pod("pf");
    // Listens on the container's loopback only: reachable only from inside its netns.
    let c = container(
        "web",
        "mkdir -p /www && echo pong-from-sidecar > /www/ping && httpd -f -p 127.0.0.1:8080 -h /www",
    );
    let id = run(&rt.rt, &p, &c, &[]).await;
    let mut body = String::new();
    for _ in 0..50 {
        let (mut client, server) = tokio::io::duplex(4096);
        let rt2 = rt.rt.clone();
        let id2 = id.clone();
        let fwd = tokio::spawn(async move { rt2.port_forward(&id2, 8080, Box::pin(server)).await });
        client
            .write_all(b"GET /ping HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut resp)).await;
        // Closing our end ends the forward.
        drop(client);
        let r = tokio::time::timeout(Duration::from_secs(10), fwd)
            .await
            .unwrap()
            .unwrap();
        body = String::from_utf8_lossy(&resp).into_owned();
        if r.is_ok() && body.contains("pong-from-sidecar") {
            break;
        }
        // httpd may not listen yet.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(body.contains("pong-from-sidecar"), "{body:?}");
    // Nothing listens on 9: a clear connection error.
    let (_c, server) = tokio::io::duplex(64);
    let e = rt
        .rt
        .port_forward(&id, 9, Box::pin(server))
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::Io { .. }), "{e:?}");

    let s1 = rt.rt.stats(&id, "web").await.unwrap();
    let mem = s1.memory.unwrap();
    assert!(mem.working_set_bytes.unwrap_or(0) > 0, "{mem:?}");
    assert!(s1.cpu.unwrap().usage_core_nano_seconds.unwrap_or(0) > 0);
    let s2 = rt.rt.stats(&id, "web").await.unwrap();
    assert!(s2.cpu.unwrap().usage_nano_cores.is_some());
    assert_eq!(s2.name, "web");
}

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_follow_the_pull_policy_and_use_credentials() {
    let rt = Rt::new().await;
    let dir = tempfile::tempdir().unwrap();
    let reg = vzk_testenv::Registry::with_auth("puller", "s3cret");
    let tag = &rand_hex()[..8];
    let remote = format!("{}/vzk/bb-pull:{tag}", reg.addr);
    let good = vzk_docker::RegistryAuth {
        username: "puller".into(),
        password: "s3cret".into(),
        identity_token: None,
    };
    let bad = vzk_docker::RegistryAuth {
        username: "puller".into(),
        password: "wrong".into(),
        identity_token: None,
    };
    // Push with the docker CLI's own login (a temp config dir, not the user's).
    let cfg = dir.path().join("docker-config");
    std::fs::create_dir_all(&cfg).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let out = Command::new("docker")
        .args([
            "--config",
            cfg_s,
            "login",
            "-u",
            "puller",
            "--password-stdin",
            &reg.addr,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(b"s3cret")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    docker(&["tag", image(), &remote]);
    docker(&["--config", cfg_s, "push", &remote]);
    docker(&["rmi", &remote]);

    assert!(!rt.rt.image_present(&remote).await.unwrap());
    // Never: absent is an error, nothing is pulled.
    let e = rt
        .rt
        .ensure_image(&remote, PullPolicy::Never, std::slice::from_ref(&good))
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::ImageNeverPull { .. }), "{e:?}");
    assert_eq!(e.reason(), "ErrImageNeverPull");
    // Anonymous and wrong credentials are refused by the registry.
    let e = rt
        .rt
        .ensure_image(&remote, PullPolicy::IfNotPresent, &[])
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::Pull { .. }), "{e:?}");
    // Credentials are tried in order: the wrong one, then the right one.
    let outcome = rt
        .rt
        .ensure_image(
            &remote,
            PullPolicy::IfNotPresent,
            &[bad.clone(), good.clone()],
        )
        .await
        .unwrap();
    assert!(matches!(outcome, PullOutcome::Pulled { .. }), "{outcome:?}");
    assert!(rt.rt.image_present(&remote).await.unwrap());
    // IfNotPresent and Never now use the local image without asking the registry.
    let outcome = rt
        .rt
        .ensure_image(
            &remote,
            PullPolicy::IfNotPresent,
            std::slice::from_ref(&bad),
        )
        .await
        .unwrap();
    assert_eq!(outcome, PullOutcome::AlreadyPresent);
    assert_eq!(
        rt.rt
            .ensure_image(&remote, PullPolicy::Never, &[])
            .await
            .unwrap(),
        PullOutcome::AlreadyPresent
    );
    // Always asks the registry, so wrong credentials fail even though it is present.
    let e = rt
        .rt
        .ensure_image(&remote, PullPolicy::Always, &[bad])
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::Pull { .. }), "{e:?}");
    assert!(matches!(
        rt.rt
            .ensure_image(&remote, PullPolicy::Always, std::slice::from_ref(&good))
            .await
            .unwrap(),
        PullOutcome::Pulled { .. }
    ));
    // A tag the registry does not have.
    let missing = format!("{}/vzk/bb-pull:nope-{tag}", reg.addr);
    let e = rt
        .rt
        .ensure_image(&missing, PullPolicy::IfNotPresent, &[good])
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::Pull { .. }), "{e:?}");
    // An invalid name is rejected before Docker is asked.
    let e = rt
        .rt
        .ensure_image("Not A/Name", PullPolicy::Always, &[])
        .await
        .unwrap_err();
    assert!(matches!(e, DockerError::InvalidImage { .. }), "{e:?}");
    let _ = Command::new("docker")
        .args(["rmi", &remote])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[tokio::test]
async fn an_unreachable_docker_is_a_clear_error() {
    // A socket file nobody listens on: connecting is refused.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let docker =
        bollard::Docker::connect_with_unix(sock.to_str().unwrap(), 5, bollard::API_DEFAULT_VERSION)
            .unwrap();
    let e = SidecarRuntime::with_docker(docker, "n").await.unwrap_err();
    assert!(matches!(e, DockerError::Unreachable { .. }), "{e:?}");
    assert_eq!(e.reason(), "DockerUnavailable");
}

/// Whether the process whose PID the container wrote to `file` still exists.
async fn alive(rt: &SidecarRuntime, id: &str, file: &str) -> bool {
    let out = Capture::default();
    let argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!("kill -0 $(cat {file})"),
    ];
    rt.exec(id, argv, io(&out, None)).await.unwrap().code == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_probe_exec_is_killed_and_connect_in_dials_the_containers_loopback() {
    let rt = Rt::new().await;
    let p = pod("probe");
    let c = container(
        "web",
        "httpd -p 127.0.0.1:8080 -h /tmp; trap 'exit 0' TERM; while true; do sleep 1; done",
    );
    let id = run(&rt.rt, &p, &c, &[]).await;
    let slow = |file: &str| {
        vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo $$ > {file}; exec sleep 300"),
        ]
    };
    // A plain exec whose caller gives up keeps running (Docker has no exec kill)...
    let out = Capture::default();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        rt.rt.exec(&id, slow("/tmp/plain"), io(&out, None)),
    )
    .await;
    assert!(r.is_err(), "sleep 300 ended early: {r:?}");
    assert!(alive(&rt.rt, &id, "/tmp/plain").await);
    // ...a probe exec is killed when its timeout drops it.
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        rt.rt.exec_probe(&id, slow("/tmp/probe"), io(&out, None)),
    )
    .await;
    assert!(r.is_err(), "sleep 300 ended early: {r:?}");
    let mut gone = false;
    for _ in 0..100 {
        if !alive(&rt.rt, &id, "/tmp/probe").await {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the timed-out probe's process still runs");
    assert!(
        alive(&rt.rt, &id, "/tmp/plain").await,
        "only the probe's was killed"
    );
    // A probe exec that finishes reports its code as exec does.
    let st = rt
        .rt
        .exec_probe(
            &id,
            vec!["sh".into(), "-c".into(), "exit 5".into()],
            io(&out, None),
        )
        .await
        .unwrap();
    assert_eq!(st.code, 5);

    // connect_in: the container's loopback (httpd there), and a closed port is
    // ConnectionRefused, not a generic error.
    let mut ok = false;
    for _ in 0..50 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
        if rt
            .rt
            .connect_in(&id, addr, Duration::from_secs(2))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "httpd on the container's 127.0.0.1:8080 not reachable");
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
    match rt.rt.connect_in(&id, closed, Duration::from_secs(2)).await {
        Err(DockerError::Io { source, .. }) => {
            assert_eq!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{source}"
            )
        }
        other => panic!("{other:?}"),
    }
}
