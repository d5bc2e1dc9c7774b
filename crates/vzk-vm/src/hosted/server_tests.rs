//! Tests of [`super::run`] with the fake backend, over a real socket: garbage frames,
//! the hello, operations and events, removal, shutdown.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::*;
use crate::hosted::fake::{FAKE_IP, FakeHypervisor};
use crate::hosted::protocol::{ServerMessage, read_frame};
use crate::spec::{BootSpec, VmSpec};
use crate::{VmState, hypervisor::BackendKind};

pub(crate) fn spec(id: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        cpus: 1,
        memory_bytes: 64 << 20,
        boot: BootSpec::LinuxKernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        },
        disks: vec![],
        nics: vec![],
        shared_dirs: vec![],
        console_log: Some("/tmp/console.log".into()),
        snapshot: None,
    }
}

/// Runs a host for `id` in `dir` on this runtime; returns once it answers.
pub(crate) async fn host(
    dir: &Path,
    id: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (VmFiles, tokio::task::JoinHandle<Result<(), HostError>>) {
    let files = VmFiles::new(dir, id).expect("files");
    let f = files.clone();
    let spec = spec(id);
    let task =
        tokio::spawn(async move { run(Arc::new(FakeHypervisor::new()), spec, &f, shutdown).await });
    for _ in 0..500 {
        if files.state.exists() {
            return (files, task);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the host did not write {}", files.state.display());
}

struct Raw {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Raw {
    async fn connect(files: &VmFiles) -> Self {
        let s = UnixStream::connect(&files.socket).await.expect("connect");
        let (r, w) = s.into_split();
        Self {
            r: BufReader::new(r),
            w,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write");
        self.w.write_all(b"\n").await.expect("write");
    }

    /// The next message, `None` at end of stream.
    async fn next(&mut self) -> Option<ServerMessage> {
        let frame =
            tokio::time::timeout(Duration::from_secs(5), read_frame(&mut self.r, MAX_FRAME))
                .await
                .expect("a message in time")
                .expect("read");
        match frame? {
            Frame::Line(l) => Some(serde_json::from_slice(&l).expect("a readable message")),
            Frame::TooLong(n) => panic!("a {n}-byte message"),
        }
    }

    async fn reply(&mut self) -> (Option<u64>, Outcome) {
        loop {
            match self.next().await {
                Some(ServerMessage::Reply { id, result }) => return (id, result),
                Some(_) => continue,
                None => panic!("connection closed"),
            }
        }
    }

    async fn error(&mut self, frame: &[u8]) -> (Option<u64>, ErrorKind) {
        self.send(frame).await;
        match self.reply().await {
            (id, Outcome::Err(e)) => {
                assert!(!e.message.is_empty());
                (id, e.kind)
            }
            other => panic!("{:?} answered {other:?}", String::from_utf8_lossy(frame)),
        }
    }

    async fn ok(&mut self, op: Op, id: u64) -> Answer {
        self.send(&op.to_request(id)).await;
        match self.reply().await {
            (Some(i), Outcome::Ok(a)) if i == id => a,
            other => panic!("{op:?} answered {other:?}"),
        }
    }
}

#[tokio::test]
async fn garbage_gets_error_replies_and_the_host_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, task) = host(dir.path(), "vm-g", std::future::pending()).await;
    let state: StateFile =
        serde_json::from_slice(&std::fs::read(&files.state).expect("state file")).expect("json");
    assert_eq!(state.pid, std::process::id());
    assert_eq!(state.spec.id, "vm-g");
    assert_eq!(state.socket, files.socket);

    let mut c = Raw::connect(&files).await;
    assert_eq!(c.error(b"garbage").await, (None, ErrorKind::Malformed));
    assert_eq!(c.error(b"\xff\xfe\xfd").await, (None, ErrorKind::Malformed));
    assert_eq!(c.error(b"[]").await, (None, ErrorKind::Malformed));
    let huge = vec![b'x'; MAX_FRAME + 10];
    assert_eq!(c.error(&huge).await, (None, ErrorKind::Malformed));
    // Blank lines are skipped silently; the next answer is to the next request.
    c.send(b"   ").await;
    assert_eq!(
        c.error(br#"{"id":1,"op":"state"}"#).await,
        (Some(1), ErrorKind::HelloRequired)
    );
    assert_eq!(
        c.error(br#"{"id":2,"op":"nope"}"#).await,
        (Some(2), ErrorKind::UnknownOp)
    );
    let hello = c.ok(Op::Hello { version: VERSION }, 3).await;
    assert_eq!(
        hello,
        Answer::Hello {
            version: VERSION,
            vm_id: "vm-g".into(),
            pid: std::process::id()
        }
    );
    assert_eq!(
        c.error(br#"{"id":4,"op":"start","x":"#).await,
        (None, ErrorKind::Malformed)
    );
    assert_eq!(
        c.ok(Op::State, 5).await,
        Answer::State {
            state: VmState::Created
        }
    );
    assert_eq!(
        c.ok(Op::ConsolePath, 6).await,
        Answer::ConsolePath {
            path: Some("/tmp/console.log".into())
        }
    );
    match c.ok(Op::Usage, 7).await {
        Answer::Usage {
            host: Some(u),
            vm: None,
        } => assert!(u.rss_bytes > 0),
        other => panic!("usage: {other:?}"),
    }
    // Garbage on a second connection does not disturb the first.
    let mut other = Raw::connect(&files).await;
    assert_eq!(other.error(b"{{{{").await, (None, ErrorKind::Malformed));
    drop(other);
    assert_eq!(c.ok(Op::Ip, 8).await, Answer::Ip { ip: None });
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn subscribers_see_changes_and_remove_ends_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, task) = host(dir.path(), "vm-s", std::future::pending()).await;
    let mut c = Raw::connect(&files).await;
    c.ok(Op::Hello { version: VERSION }, 0).await;
    assert_eq!(
        c.ok(Op::Subscribe, 1).await,
        Answer::Subscribed {
            state: VmState::Created,
            ip: None
        }
    );
    c.send(&Op::Start.to_request(2)).await;
    let (mut done, mut running, mut ip) = (false, false, None::<Ipv4Addr>);
    while !(done && running && ip.is_some()) {
        match c.next().await.expect("open") {
            ServerMessage::Reply {
                id: Some(2),
                result,
            } => {
                assert_eq!(result, Outcome::Ok(Answer::Done));
                done = true;
            }
            ServerMessage::State { state } => running |= state == VmState::Running,
            ServerMessage::Ip { ip: a } => ip = a,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ip, Some(FAKE_IP));
    // Not final yet: remove is refused with the state.
    c.send(&Op::Remove.to_request(3)).await;
    match c.reply().await {
        (Some(3), Outcome::Err(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidState);
            assert_eq!(e.state, Some(VmState::Running));
        }
        other => panic!("{other:?}"),
    }
    c.send(&Op::Start.to_request(4)).await;
    assert!(
        matches!(c.reply().await, (Some(4), Outcome::Err(e)) if e.kind == ErrorKind::InvalidState)
    );
    assert_eq!(c.ok(Op::ForceStop, 5).await, Answer::Done);
    assert_eq!(c.ok(Op::Remove, 6).await, Answer::Done);
    // Files are gone once `done` arrives; the final state follows, then the end.
    assert!(!files.state.exists() && !files.socket.exists());
    let mut last = None;
    while let Some(msg) = c.next().await {
        if let ServerMessage::State { state } = msg {
            last = Some(state);
        }
    }
    assert_eq!(last, Some(VmState::Stopped));
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the host ends")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn a_version_mismatch_is_refused_and_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, task) = host(dir.path(), "vm-v", std::future::pending()).await;
    let mut c = Raw::connect(&files).await;
    assert_eq!(
        c.error(br#"{"id":0,"op":"hello","version":999}"#).await,
        (Some(0), ErrorKind::Version)
    );
    assert!(c.next().await.is_none(), "closed after the refusal");
    // A second host for the same VM is refused while this one answers.
    let again = run(
        Arc::new(FakeHypervisor::new()),
        spec("vm-v"),
        &files,
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(again, Err(HostError::AlreadyRunning { .. })),
        "{again:?}"
    );
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn shutdown_stops_and_removes_the_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (files, task) = host(dir.path(), "vm-t", async move {
        let _ = rx.await;
    })
    .await;
    let mut c = Raw::connect(&files).await;
    c.ok(Op::Hello { version: VERSION }, 0).await;
    c.ok(Op::Subscribe, 1).await;
    assert_eq!(c.ok(Op::Start, 2).await, Answer::Done);
    let _ = tx.send(());
    let mut last = None;
    while let Some(msg) = c.next().await {
        if let ServerMessage::State { state } = msg {
            last = Some(state);
        }
    }
    assert_eq!(last, Some(VmState::Stopped));
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the host ends")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(!files.state.exists() && !files.socket.exists() && !files.log.exists());
}

#[tokio::test]
async fn a_refused_spec_is_a_create_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = VmFiles::new(dir.path(), "vm-c").expect("files");
    let mut s = spec("vm-c");
    s.cpus = 0;
    let result = run(
        Arc::new(FakeHypervisor::new()),
        s,
        &files,
        std::future::pending(),
    )
    .await;
    match result {
        Err(HostError::Create(e)) => {
            let f = CreateFailure::from_error(&e, BackendKind::Qemu);
            assert_eq!(f.kind, "invalidSpec");
        }
        other => panic!("{other:?}"),
    }
    assert!(!files.state.exists() && !files.socket.exists());
}
