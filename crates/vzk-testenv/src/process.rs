//! Spawning the control plane's daemons so that they never outlive the test process.
//!
//! On Linux each daemon gets `PR_SET_PDEATHSIG = SIGKILL`. That signal fires when the
//! *thread* that forked the child exits, so all spawns go through one dedicated thread
//! that lives as long as the process: when a test binary ends (normally, by panic or by a
//! signal), the kernel kills its etcd and kube-apiserver.
//!
//! Other Unix hosts (macOS) have no parent-death signal. There each daemon gets a
//! watchdog, `/bin/sh` blocked reading a pipe whose only write end this process holds:
//! when the process ends, however it ends, the kernel closes that end, the read sees EOF
//! and the watchdog `kill -9`s the daemon.
#![allow(unsafe_code)]

use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, mpsc};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let spawned = std::thread::Builder::new()
            .name("vzk-testenv-spawner".into())
            .spawn(move || {
                for (cmd, reply) in rx {
                    let _ = reply.send(spawn_on_this_thread(cmd));
                }
            });
        if let Err(e) = spawned {
            panic!("vzk-testenv: cannot start the spawner thread: {e}");
        }
        Mutex::new(tx)
    })
}

#[cfg(target_os = "linux")]
fn spawn_on_this_thread(mut cmd: Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A daemon's watchdog and the write end of its pipe.
#[cfg(not(target_os = "linux"))]
type Watchdog = (Child, std::process::ChildStdin);

/// Watchdogs by the pid of their daemon.
#[cfg(not(target_os = "linux"))]
fn watchdogs() -> &'static Mutex<std::collections::HashMap<u32, Watchdog>> {
    static WATCHDOGS: OnceLock<Mutex<std::collections::HashMap<u32, Watchdog>>> = OnceLock::new();
    WATCHDOGS.get_or_init(Default::default)
}

#[cfg(not(target_os = "linux"))]
fn spawn_on_this_thread(mut cmd: Command) -> io::Result<Child> {
    use std::process::Stdio;
    let mut child = cmd.spawn()?;
    // std creates the pipe close-on-exec, so no other child inherits its write end. The
    // watchdog ignores the terminal's signals so that only EOF (or `kill`) ends it.
    let watchdog = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"trap '' HUP INT TERM; read -r line; kill -9 "$0" 2>/dev/null"#)
        .arg(child.id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut w| match w.stdin.take() {
            Some(end) => Ok((w, end)),
            None => Err(io::Error::other("the watchdog has no stdin pipe")),
        });
    match watchdog {
        Ok(w) => {
            watchdogs()
                .lock()
                .map_err(|_| io::Error::other("watchdog lock poisoned"))?
                .insert(child.id(), w);
            Ok(child)
        }
        Err(e) => {
            kill(&mut child);
            Err(io::Error::new(
                e.kind(),
                format!("starting the watchdog of a daemon: {e}"),
            ))
        }
    }
}

/// Spawns `cmd` so that it is killed when this process exits.
pub(crate) fn spawn_tied(cmd: Command) -> io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| io::Error::other("spawner lock poisoned"))?
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Kills a child and reaps it.
pub(crate) fn kill(child: &mut Child) {
    // The watchdog goes first, while the daemon is not yet reaped: its pid cannot have
    // been reused when the watchdog signals it.
    #[cfg(not(target_os = "linux"))]
    if let Some((mut watchdog, end)) = watchdogs()
        .lock()
        .ok()
        .and_then(|mut w| w.remove(&child.id()))
    {
        drop(end);
        let _ = watchdog.wait();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A free TCP port on 127.0.0.1 (bound and released: a small race tests accept).
pub(crate) fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
