//! Exec: a command in a running container, keeping its exit code; for probes, the
//! process is killed when the caller gives up on it.

use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use futures::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tracing::{debug, warn};
use vzk_core::streams::{AttachIo, ExitStatus};

use crate::{DockerError, SidecarRuntime};

pub(crate) async fn write_all(w: &mut Option<vzk_core::streams::BoxWriter>, data: &[u8]) {
    if let Some(out) = w.as_mut()
        && (out.write_all(data).await.is_err() || out.flush().await.is_err())
    {
        // The client went away: stop writing to it, keep draining Docker.
        *w = None;
    }
}

impl SidecarRuntime {
    /// Runs `command` in the running container with `io`; returns the command's exit
    /// code. With a TTY, resize events resize the exec's terminal.
    pub async fn exec(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        self.exec_inner(id, command, io, false).await
    }

    /// Like [`Self::exec`], for probes: if the returned future is dropped before the
    /// process ends (the probe's timeout), the process is killed (`SIGKILL` to the host
    /// PID Docker reports for the exec), so a timed-out probe leaves nothing running.
    pub async fn exec_probe(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        self.exec_inner(id, command, io, true).await
    }

    async fn exec_inner(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
        kill_on_drop: bool,
    ) -> Result<ExitStatus, DockerError> {
        if command.is_empty() {
            return Err(DockerError::InvalidSpec("exec: empty command".into()));
        }
        let AttachIo {
            stdin,
            mut stdout,
            mut stderr,
            tty,
            resize,
        } = io;
        let config = ExecConfig {
            attach_stdin: Some(stdin.is_some()),
            attach_stdout: Some(stdout.is_some()),
            attach_stderr: Some(stderr.is_some() && !tty),
            tty: Some(tty),
            cmd: Some(command),
            ..Default::default()
        };
        let created = self
            .docker
            .create_exec(id, config)
            .await
            .map_err(|e| DockerError::api("exec", id, e))?;
        let exec_id = created.id;
        let mut guard = kill_on_drop.then(|| KillExecOnDrop {
            docker: self.docker.clone(),
            exec_id: exec_id.clone(),
        });
        let started = self
            .docker
            .start_exec(
                &exec_id,
                Some(StartExecOptions {
                    detach: false,
                    tty,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| DockerError::api("exec start", id, e))?;
        let StartExecResults::Attached { mut output, input } = started else {
            return Err(DockerError::InvalidSpec("exec started detached".into()));
        };
        let stdin_task = stdin.map(|mut r| {
            let mut input = input;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut r, &mut input).await;
                let _ = input.shutdown().await;
            })
        });
        let resize_task = resize.filter(|_| tty).map(|mut rx| {
            let docker = self.docker.clone();
            let exec_id = exec_id.clone();
            tokio::spawn(async move {
                while let Some(sz) = rx.recv().await {
                    let opts = bollard::exec::ResizeExecOptions {
                        height: sz.height,
                        width: sz.width,
                    };
                    if let Err(e) = docker.resize_exec(&exec_id, opts).await {
                        debug!(error = %e, "exec resize");
                    }
                }
            })
        });
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdErr { message }) => {
                    if stderr.is_some() {
                        write_all(&mut stderr, &message).await;
                    } else {
                        write_all(&mut stdout, &message).await;
                    }
                }
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    write_all(&mut stdout, &message).await;
                }
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) => {
                    debug!(error = %e, "exec output ended with an error");
                    break;
                }
            }
        }
        if let Some(t) = stdin_task {
            t.abort();
        }
        if let Some(t) = resize_task {
            t.abort();
        }
        for w in [&mut stdout, &mut stderr].into_iter().flatten() {
            let _ = w.shutdown().await;
        }
        // The output ends when the process does; Docker records the code just after.
        for _ in 0..100 {
            let r = self
                .docker
                .inspect_exec(&exec_id)
                .await
                .map_err(|e| DockerError::api("exec inspect", id, e))?;
            if r.running != Some(true) {
                if let Some(g) = guard.as_mut() {
                    g.exec_id.clear();
                }
                let code = r.exit_code.unwrap_or(0);
                return Ok(ExitStatus {
                    code: i32::try_from(code).unwrap_or(255),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(DockerError::InvalidSpec(format!(
            "exec in {id}: output ended but the process still runs"
        )))
    }
}

/// Kills a probe's exec process when its future is dropped before the process ended.
struct KillExecOnDrop {
    docker: Docker,
    exec_id: String,
}

impl Drop for KillExecOnDrop {
    fn drop(&mut self) {
        if self.exec_id.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (docker, exec_id) = (self.docker.clone(), std::mem::take(&mut self.exec_id));
        handle.spawn(async move {
            let pid = match docker.inspect_exec(&exec_id).await {
                Ok(r) if r.running == Some(true) => r.pid.and_then(|p| i32::try_from(p).ok()),
                Ok(_) => None,
                Err(e) => {
                    debug!(exec = %exec_id, error = %e, "inspecting a timed-out exec");
                    None
                }
            };
            if let Some(pid) = pid.filter(|p| *p > 1) {
                kill_exec_process(&exec_id, pid);
            }
        });
    }
}

/// Kills the process of a timed-out exec by the pid dockerd reports (a host pid: dockerd
/// runs on this Linux host).
#[cfg(target_os = "linux")]
fn kill_exec_process(exec_id: &str, pid: i32) {
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        Ok(()) => debug!(exec = %exec_id, pid, "killed a timed-out exec"),
        Err(e) => warn!(exec = %exec_id, pid, error = %e, "could not kill a timed-out exec"),
    }
}

/// Elsewhere dockerd runs in a Linux VM (Docker Desktop and the like): its pids are the
/// VM's, and signalling that number here would hit an unrelated host process.
#[cfg(not(target_os = "linux"))]
fn kill_exec_process(exec_id: &str, pid: i32) {
    warn!(
        exec = %exec_id,
        pid,
        "a timed-out exec keeps running: dockerd is not on this host, so its pid cannot be signalled"
    );
}
