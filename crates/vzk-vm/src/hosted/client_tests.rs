//! Tests of the agent side against in-process hosts ([`super::super::server`]), scripted
//! misbehaving hosts, and launchers that fail (`sh -c`).

use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::*;
use crate::hosted::fake::{FAKE_IP, FakeHypervisor};
use crate::hosted::protocol::{Frame, MAX_FRAME, Op, parse_request, read_frame};
use crate::hosted::server::tests::{host, spec};
use crate::{StopOutcome, VmError, VmState, stop_gracefully, wait_for_ip, wait_for_state};

const T: Duration = Duration::from_secs(5);

fn hosted(dir: &Path, launcher: Launcher) -> Hosted {
    Hosted::new(Arc::new(FakeHypervisor::new()), dir, launcher).expect("hosted")
}

fn refused(r: Result<Arc<dyn Vm>, HypervisorError>) -> HypervisorError {
    match r {
        Ok(vm) => panic!("{} was created", vm.id()),
        Err(e) => e,
    }
}

fn reason(vm: &dyn Vm) -> String {
    match &*vm.state().borrow() {
        VmState::Failed { reason } => reason.clone(),
        other => panic!("{} is {other:?}, not Failed", vm.id()),
    }
}

#[tokio::test]
async fn a_proxy_follows_its_host_and_removes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, task) = host(dir.path(), "vm-p", std::future::pending()).await;
    let vm = HostedVm::attach(spec("vm-p"), files.clone())
        .await
        .expect("attach");
    assert_eq!(*vm.state().borrow(), VmState::Created);
    assert_eq!(vm.console_log(), Some("/tmp/console.log".into()));
    assert_eq!(vm.host_pid(), Some(std::process::id()));
    vm.start().await.expect("start");
    wait_for_state(vm.as_ref(), T, "running", |s| *s == VmState::Running)
        .await
        .expect("running");
    assert_eq!(wait_for_ip(vm.as_ref(), T).await.ok(), Some(FAKE_IP));
    assert!(matches!(
        vm.start().await,
        Err(VmError::InvalidState {
            operation: "start",
            state: VmState::Running,
            ..
        })
    ));
    assert!(matches!(
        vm.remove().await,
        Err(VmError::InvalidState { .. })
    ));
    let mut usage = None;
    for _ in 0..100 {
        usage = vm.host_usage();
        if usage.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(usage.is_some_and(|u| u.rss_bytes > 1 << 20), "{usage:?}");
    assert_eq!(
        stop_gracefully(vm.as_ref(), T).await.ok(),
        Some(StopOutcome::Graceful)
    );
    assert_eq!(vm.host_usage(), None, "no usage once final");
    vm.remove().await.expect("remove");
    assert!(vm.is_removed());
    assert!(!files.state.exists() && !files.socket.exists());
    let ended = tokio::time::timeout(T, task).await.expect("host ends");
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    // A removed VM stays Stopped (the host's exit is not a failure).
    assert_eq!(*vm.state().borrow(), VmState::Stopped);
}

#[tokio::test]
async fn a_host_that_vanishes_fails_the_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, task) = host(dir.path(), "vm-x", std::future::pending()).await;
    std::fs::write(&files.log, "booting\nlast words\n").expect("log");
    let vm = HostedVm::attach(spec("vm-x"), files.clone())
        .await
        .expect("attach");
    vm.start().await.expect("start");
    wait_for_ip(vm.as_ref(), T).await.expect("ip");
    task.abort();
    wait_for_state(vm.as_ref(), T, "failure", |s| {
        matches!(s, VmState::Failed { .. })
    })
    .await
    .expect("failed");
    let why = reason(vm.as_ref());
    assert!(
        why.contains(&format!("pid {}", std::process::id())) && why.contains("last words"),
        "{why}"
    );
    assert!(matches!(
        vm.request_stop().await,
        Err(VmError::InvalidState { .. })
    ));
    vm.force_stop().await.expect("no-op when final");
    vm.remove().await.expect("remove cleans up");
    assert!(!files.state.exists() && !files.log.exists());
}

#[tokio::test]
async fn adoption_attaches_live_hosts_and_fails_dead_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (live, task) = host(dir.path(), "vm-live", std::future::pending()).await;
    {
        let first = HostedVm::attach(spec("vm-live"), live.clone())
            .await
            .expect("attach");
        first.start().await.expect("start");
        wait_for_ip(first.as_ref(), T).await.expect("ip");
    }
    // A host that died: state file and log, nothing listening.
    let dead = VmFiles::new(dir.path(), "vm-dead").expect("files");
    let state = StateFile {
        version: crate::hosted::protocol::VERSION,
        pid: 999_999,
        socket: dead.socket.clone(),
        spec: spec("vm-dead"),
        backend: crate::BackendKind::Qemu,
    };
    std::fs::write(&dead.state, serde_json::to_vec(&state).expect("json")).expect("write");
    std::fs::write(&dead.log, "panicked at the framework\n").expect("write");
    // Junk is skipped and left alone.
    let junk = dir.path().join("vm-junk.state.json");
    std::fs::write(&junk, "{not json").expect("write");
    let other = dir.path().join("vm-other.state.json");
    std::fs::write(&other, serde_json::to_vec(&state).expect("json")).expect("write");

    let hv = hosted(
        dir.path(),
        Launcher::new("/bin/false", Vec::<String>::new()),
    );
    assert!(hv.capabilities().vms_outlive_agent);
    let vms = hv.adopt_existing().await.expect("adopt");
    let ids: Vec<&str> = vms.iter().map(|v| v.id()).collect();
    assert_eq!(ids, ["vm-dead", "vm-live"]);
    let why = reason(vms[0].as_ref());
    assert!(
        why.contains("pid 999999") && why.contains("panicked at the framework"),
        "{why}"
    );
    assert!(
        !dead.state.exists() && !dead.log.exists(),
        "dead files removed"
    );
    assert!(junk.exists() && other.exists());
    let vm = &vms[1];
    assert_eq!(*vm.state().borrow(), VmState::Running);
    assert_eq!(*vm.ip_address().borrow(), Some(FAKE_IP));
    // Known VMs are not adopted twice; creating one that exists is refused.
    assert!(hv.adopt_existing().await.expect("adopt").is_empty());
    assert!(matches!(
        hv.create(spec("vm-live")).await,
        Err(HypervisorError::AlreadyExists { .. })
    ));
    vms[0].remove().await.expect("remove dead");
    stop_gracefully(vm.as_ref(), T).await.expect("stop");
    vm.remove().await.expect("remove");
    assert!(tokio::time::timeout(T, task).await.is_ok());
}

/// A host that completes the hello, then answers every request with `answer(op, id)`.
async fn scripted(
    files: &VmFiles,
    answer: fn(Op, u64) -> Vec<String>,
) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(&files.socket).expect("bind");
    tokio::spawn(async move {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        while let Ok(Some(Frame::Line(l))) = read_frame(&mut r, MAX_FRAME).await {
            let Ok((id, op)) = parse_request(&l) else {
                continue;
            };
            for line in answer(op, id) {
                if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
}

fn hello(id: u64) -> String {
    format!(
        r#"{{"type":"reply","id":{id},"result":{{"ok":{{"kind":"hello","version":1,"vmId":"vm-s","pid":4242}}}}}}"#
    )
}

#[tokio::test]
async fn garbage_from_a_host_never_breaks_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = VmFiles::new(dir.path(), "vm-s").expect("files");
    let task = scripted(&files, |op, id| match op {
        Op::Hello { .. } => vec![hello(id)],
        Op::Subscribe => vec![
            "nonsense".into(),
            "\u{fffd}\u{fffd}".into(),
            r#"{"type":"mystery"}"#.into(),
            r#"{"type":"state","state":{"state":"dancing"}}"#.into(),
            format!(
                r#"{{"type":"reply","id":{id},"result":{{"ok":{{"kind":"subscribed","state":{{"state":"running"}},"ip":null}}}}}}"#
            ),
            r#"{"type":"ip","ip":"not-an-ip"}"#.into(),
            r#"{"type":"ip","ip":"192.0.2.77"}"#.into(),
        ],
        Op::ConsolePath => vec![format!(
            r#"{{"type":"reply","id":{id},"result":{{"ok":{{"kind":"fromTheFuture"}}}}}}"#
        )],
        Op::Start => vec![format!(
            r#"{{"type":"reply","id":{id},"result":{{"err":{{"kind":"failed","message":"no entitlement"}}}}}}"#
        )],
        _ => vec![format!(r#"{{"type":"reply","id":{id},"result":"#)],
    })
    .await;
    let vm = HostedVm::attach(spec("vm-s"), files.clone())
        .await
        .expect("attach survives garbage");
    assert_eq!(*vm.state().borrow(), VmState::Running);
    assert_eq!(
        wait_for_ip(vm.as_ref(), T).await.ok(),
        Some(std::net::Ipv4Addr::new(192, 0, 2, 77))
    );
    // The unreadable consolePath answer fell back to the spec's.
    assert_eq!(vm.console_log(), Some("/tmp/console.log".into()));
    let err = vm.start().await.expect_err("refused");
    assert!(
        matches!(&err, VmError::Start { .. }) && chain(&err).contains("no entitlement"),
        "{}",
        chain(&err)
    );
    // A truncated reply ends its request with an error instead of hanging.
    let err = tokio::time::timeout(T, vm.request_stop())
        .await
        .expect("no hang")
        .expect_err("unreadable");
    assert!(chain(&err).contains("unreadable reply"), "{}", chain(&err));
    task.abort();
}

#[tokio::test]
async fn a_host_of_another_protocol_is_failed_not_adopted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = VmFiles::new(dir.path(), "vm-s").expect("files");
    let state = StateFile {
        version: 2,
        pid: 4242,
        socket: files.socket.clone(),
        spec: spec("vm-s"),
        backend: crate::BackendKind::Vz,
    };
    std::fs::write(&files.state, serde_json::to_vec(&state).expect("json")).expect("write");
    let task = scripted(&files, |_, id| {
        vec![format!(
            r#"{{"type":"reply","id":{id},"result":{{"err":{{"kind":"version","message":"this VM host speaks protocol version 2"}}}}}}"#
        )]
    })
    .await;
    let hv = hosted(
        dir.path(),
        Launcher::new("/bin/false", Vec::<String>::new()),
    );
    let vms = hv.adopt_existing().await.expect("adopt");
    assert_eq!(vms.len(), 1);
    let why = reason(vms[0].as_ref());
    assert!(why.contains("protocol version 2"), "{why}");
    assert!(files.state.exists(), "files stay until remove");
    // The peer is this test process: remove must not signal it, only clean up.
    vms[0].remove().await.expect("remove");
    assert!(!files.state.exists());
    task.abort();
}

fn sh(script: &str) -> Launcher {
    // `sh -c SCRIPT sh --dir D --spec F`: $2 is the directory.
    Launcher::new("/bin/sh", ["-c", script, "sh"])
}

#[tokio::test]
async fn create_reports_why_a_host_did_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hv = hosted(
        dir.path(),
        sh(
            r#"printf '{"kind":"invalidSpec","message":"no such kernel","backend":"qemu"}' > "$2/vm-e.error.json"; exit 3"#,
        ),
    );
    let err = refused(hv.create(spec("vm-e")).await);
    assert!(
        matches!(&err, HypervisorError::InvalidSpec { message, .. } if message == "no such kernel"),
        "{err:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let hv = hosted(
        dir.path(),
        sh(r#"test -f "$4" && echo 'dying words'; exit 7"#),
    );
    let err = refused(hv.create(spec("vm-f")).await);
    let text = chain(&err);
    assert!(
        text.contains("exit status: 7") && text.contains("dying words"),
        "{text}"
    );

    let hv = hosted(dir.path(), sh("exec sleep 30")).with_start_timeout(Duration::from_millis(300));
    let err = refused(hv.create(spec("vm-t")).await);
    assert!(
        chain(&err).contains("did not answer within"),
        "{}",
        chain(&err)
    );

    let hv = hosted(dir.path(), Launcher::new("/no/such/program", ["x"]));
    let err = refused(hv.create(spec("vm-n")).await);
    assert!(chain(&err).contains("/no/such/program"), "{}", chain(&err));
    let mut bad = spec("vm-b");
    bad.cpus = 0;
    assert!(matches!(
        hv.create(bad).await,
        Err(HypervisorError::InvalidSpec { .. })
    ));
}
