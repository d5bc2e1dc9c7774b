//! Exec semantics: exit codes, signals, stream separation, stdin, argv, PTY, cancel.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use vzk_core::streams::TermSize;

use crate::support::Dropbear;
use crate::{collected, pipes, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reports_real_exit_codes_and_signals() {
    let db = Dropbear::start();
    let s = db.session();
    within(60, async {
        let out = s
            .output(&["uname", "-a"])
            .await
            .unwrap_or_else(|e| panic!("uname: {e:?}"));
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("Linux "),
            "{out:?}"
        );

        let out = s
            .output(&["sh", "-c", "exit 7"])
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(out.status.code, 7);
        let out = s
            .output(&["sh", "-c", "kill -9 $$"])
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(out.status.code, 137, "SIGKILL must be 128+9");
        let out = s
            .output(&["sh", "-c", "kill -TERM $$"])
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(out.status.code, 143, "SIGTERM must be 128+15");
        let out = s
            .output(&["/nonexistent/program"])
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(out.status.code, 127, "missing program: {out:?}");
    })
    .await;
    // All of it over one connection.
    assert_eq!(s.dial_count(), 1);
    assert_eq!(db.connections(), 1, "{}", db.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_are_kept_apart() {
    let db = Dropbear::start();
    let s = db.session();
    let out = within(
        30,
        s.output(&[
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; echo more-out; exit 3",
        ]),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(out.status.code, 3);
    assert_eq!(out.stdout, b"to-out\nmore-out\n");
    assert_eq!(out.stderr, b"to-err\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_streamed_byte_for_byte_and_eof_ends_it() {
    let db = Dropbear::start();
    let s = db.session();
    // 4 MiB + 7 bytes of every byte value, in a pattern that catches reordering.
    let data: Vec<u8> = (0..(4usize << 20) + 7)
        .map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8)
        .collect();
    let (io, mut ends) = pipes(true);
    let mut stdin = ends.stdin.take().unwrap_or_else(|| panic!("no stdin end"));
    let payload = data.clone();
    let writer = tokio::spawn(async move {
        stdin
            .write_all(&payload)
            .await
            .unwrap_or_else(|e| panic!("stdin write: {e}"));
        // dropping `stdin` is the client's EOF
    });
    let status = within(120, s.exec(&["cat"], io))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    within(10, writer).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "cat must end on EOF with 0: {status:?}");
    let got = collected(ends.stdout).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "stdin did not arrive byte-for-byte");
    assert!(collected(ends.stderr).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argv_arrives_intact() {
    let db = Dropbear::start();
    let s = db.session();
    let args = [
        "plain",
        "with  two spaces",
        "single ' quote",
        "'quoted'",
        "double \" quote",
        "$HOME ${PATH} $(id -u) `id -u` $$ $0 $1",
        "back\\slash \\n \\\\",
        "new\nline\n",
        "",
        "*",
        "-n",
        "; exit 9 && echo pwned |",
        "tab\tsep",
        "ünïcødé ✓",
    ];
    let mut argv = vec!["printf", "%s\\0"];
    argv.extend(args);
    let out = within(30, s.output(&argv))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(out.status.success(), "{out:?}");
    let got: Vec<&[u8]> = out.stdout.split(|b| *b == 0).collect();
    let expect: Vec<&[u8]> = args
        .iter()
        .map(|a| a.as_bytes())
        .chain([&b""[..]])
        .collect();
    assert_eq!(
        got,
        expect,
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Environment variables are exported with the same quoting.
    let env = vec![("VZK_X".to_owned(), "a 'b' $c\nd".to_owned())];
    let (io, ends) = pipes(false);
    let st = within(
        30,
        s.exec_with_env(&["sh", "-c", "printf %s \"$VZK_X\""], &env, io),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(st.success());
    assert_eq!(collected(ends.stdout).await, b"a 'b' $c\nd");
    let bad = vec![("BAD-NAME".to_owned(), "x".to_owned())];
    let (io, _ends) = pipes(false);
    let err = s.exec_with_env(&["true"], &bad, io).await;
    assert!(
        matches!(err, Err(vzk_guest::GuestError::InvalidCommand(_))),
        "{err:?}"
    );
}

/// Reads the collected PTY output until `needle` shows up.
async fn wait_for(out: &mut tokio::io::DuplexStream, seen: &mut Vec<u8>, needle: &str) {
    use tokio::io::AsyncReadExt;
    within(20, async {
        while !String::from_utf8_lossy(seen).contains(needle) {
            let mut buf = [0u8; 4096];
            let n = out
                .read(&mut buf)
                .await
                .unwrap_or_else(|e| panic!("pty read: {e}"));
            assert!(
                n > 0,
                "PTY output ended before {needle:?}: {}",
                String::from_utf8_lossy(seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_starts_at_first_size_and_applies_every_resize() {
    let db = Dropbear::start();
    let s = db.session();
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    let (resize_tx, resize_rx) = tokio::sync::mpsc::channel(8);
    let (stdin_w, stdin_r) = tokio::io::duplex(1024);
    let io = vzk_core::streams::AttachIo {
        stdin: Some(Box::pin(stdin_r)),
        stdout: Some(Box::pin(out_w)),
        stderr: None,
        tty: true,
        resize: Some(resize_rx),
    };
    let send = |w: u16, h: u16| {
        let tx = resize_tx.clone();
        async move {
            tx.send(TermSize {
                width: w,
                height: h,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    send(100, 30).await;
    let s2 = s.clone();
    // Prints the terminal size whenever it changes, until stdin says "q".
    let script = "test -t 0 || exit 42; last=; while :; do cur=$(stty size); \
                  if [ \"$cur\" != \"$last\" ]; then echo \"size=$cur\"; last=$cur; fi; \
                  if read -t 0.1 line && [ \"$line\" = q ]; then exit 5; fi; done";
    let exec = tokio::spawn(async move { s2.exec(&["bash", "-c", script], io).await });
    let mut seen = Vec::new();
    wait_for(&mut out_r, &mut seen, "size=30 100").await;
    send(132, 40).await;
    wait_for(&mut out_r, &mut seen, "size=40 132").await;
    send(80, 24).await;
    wait_for(&mut out_r, &mut seen, "size=24 80").await;
    send(200, 50).await;
    wait_for(&mut out_r, &mut seen, "size=50 200").await;
    let mut stdin_w = stdin_w;
    stdin_w
        .write_all(b"q\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Keep draining so the exec is never blocked on output.
    let drain = tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut out_r, &mut rest).await;
    });
    let status = within(30, exec)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        status.code,
        5,
        "PTY output: {}",
        String::from_utf8_lossy(&seen)
    );
    let _ = drain.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_exec_kills_the_remote_process() {
    let db = Dropbear::start();
    let s = db.session();
    let (io, _ends) = pipes(true);
    let s2 = s.clone();
    // A shell that records its pid and waits on a child: the remote process to kill.
    let exec = tokio::spawn(async move {
        s2.exec(
            &[
                "sh",
                "-c",
                "echo $$ > \"$HOME/victim.pid\"; sleep 1000; echo survived",
            ],
            io,
        )
        .await
    });
    let pid_path = db.dir.path().join("home/victim.pid");
    let pid = within(20, async {
        loop {
            if let Ok(t) = std::fs::read_to_string(&pid_path)
                && let Ok(pid) = t.trim().parse::<u32>()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The remote process is alive (checked from inside the server's PID namespace).
    let alive = |pid: u32| {
        let s = s.clone();
        async move {
            let out = s.output(&["kill", "-0", &pid.to_string()]).await;
            out.unwrap_or_else(|e| panic!("{e:?}")).status.success()
        }
    };
    assert!(alive(pid).await, "victim should be running");
    // The client goes away: the kubelet API drops the exec future.
    exec.abort();
    let _ = exec.await;
    within(20, async {
        while alive(pid).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The session survives the cancel. Its connection does too, but now and then dropbear
    // drops the whole connection in the cancel race (as in
    // `commands_started_while_a_cancel_lands_still_run`; seen in CI on a loaded machine,
    // 2026-12-08): the session then re-dials once, transparently.
    assert!(s.ready().await);
    let dials = s.dial_count();
    assert!(
        dials <= 2,
        "{dials} dials: a cancel costs at most one re-dial"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_attach_exports_env_and_reads_stdin() {
    let db = Dropbear::start();
    let s = db.session();
    let (io, mut ends) = pipes(true);
    let mut stdin = ends.stdin.take().unwrap_or_else(|| panic!("no stdin"));
    stdin
        .write_all(b"echo \"attached:$VZK_GREETING\"; echo oops >&2; exit 4\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let env = vec![("VZK_GREETING".to_owned(), "hello world".to_owned())];
    let status = within(30, s.shell(&env, io))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    drop(stdin);
    assert_eq!(status.code, 4);
    let out = String::from_utf8_lossy(&collected(ends.stdout).await).into_owned();
    assert!(out.contains("attached:hello world"), "{out:?}");
    assert_eq!(collected(ends.stderr).await, b"oops\n");
}

/// Regression: dropbear closes a session opened while another session's process is
/// being killed by our cancel, before answering its exec. The command never ran, so
/// `output()` retries it on a new channel instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_started_while_a_cancel_lands_still_run() {
    let db = Dropbear::start();
    let s = db.session();
    for round in 0..6 {
        let (io, _ends) = pipes(true);
        let s2 = s.clone();
        let victim = tokio::spawn(async move { s2.exec(&["sleep", "1000"], io).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        victim.abort();
        let t = tokio::time::Instant::now();
        let mut n = 0;
        while t.elapsed() < Duration::from_millis(300) {
            let out = within(30, s.output(&["echo", "ok"])).await;
            n += 1;
            match out {
                Ok(o) => assert_eq!(o.stdout, b"ok\n", "round {round} probe {n}"),
                Err(e) => panic!("round {round} probe {n}: {e:?}"),
            }
        }
    }
    // The unstarted channel is retried on the same connection. Now and then dropbear drops
    // the whole connection in this race instead (seen once in CI, on a loaded machine); the
    // session then re-dials transparently, which is fine, as long as it stays the exception.
    let dials = s.dial_count();
    assert!(
        dials <= 3,
        "{dials} dials for 6 rounds: most rounds must not re-dial"
    );
}

/// The client goes away by closing its end of stdout: the next write fails, the exec
/// returns `WriteOutput` and the remote process is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_client_output_cancels_the_remote_process() {
    let db = Dropbear::start();
    let s = db.session();
    let (out_w, out_r) = tokio::io::duplex(64);
    let io = vzk_core::streams::AttachIo {
        stdin: None,
        stdout: Some(Box::pin(out_w)),
        stderr: None,
        tty: false,
        resize: None,
    };
    let s2 = s.clone();
    let exec = tokio::spawn(async move {
        s2.exec(
            &[
                "sh",
                "-c",
                "echo $$ > \"$HOME/chatty.pid\"; while :; do echo spam; sleep 0.05; done",
            ],
            io,
        )
        .await
    });
    let pid_path = db.dir.path().join("home/chatty.pid");
    let pid = within(20, async {
        loop {
            if let Ok(t) = std::fs::read_to_string(&pid_path)
                && let Ok(pid) = t.trim().parse::<u32>()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(out_r);
    let r = within(20, exec).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(
            &r,
            Err(vzk_guest::GuestError::Exec {
                source: vzk_guest::ExecError::WriteOutput {
                    stream: "stdout",
                    ..
                },
                ..
            })
        ),
        "{r:?}"
    );
    within(20, async {
        loop {
            let out = s.output(&["kill", "-0", &pid.to_string()]).await;
            if !out.unwrap_or_else(|e| panic!("{e:?}")).status.success() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
