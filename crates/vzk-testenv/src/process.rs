//! Spawning the control plane's daemons so that they never outlive the test process.
//!
//! Each daemon gets `PR_SET_PDEATHSIG = SIGKILL`. That signal fires when the *thread*
//! that forked the child exits, so all spawns go through one dedicated thread that lives
//! as long as the process: when a test binary ends (normally, by panic or by a signal),
//! the kernel kills its etcd and kube-apiserver.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
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
                for (mut cmd, reply) in rx {
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
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            panic!("vzk-testenv: cannot start the spawner thread: {e}");
        }
        Mutex::new(tx)
    })
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
    let _ = child.kill();
    let _ = child.wait();
}

/// A free TCP port on 127.0.0.1 (bound and released: a small race tests accept).
pub(crate) fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
