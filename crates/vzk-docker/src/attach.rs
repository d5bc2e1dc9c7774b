//! Attach: the streams of a container's main process.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::{AttachContainerOptionsBuilder, ResizeContainerTTYOptionsBuilder};
use futures::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tracing::debug;
use vzk_core::streams::{AttachIo, ExitStatus};

use crate::exec::write_all;
use crate::{DockerError, RunState, SidecarRuntime};

impl SidecarRuntime {
    /// Attaches to the container's main process. Returns its exit code when it ended
    /// while attached, `0` when the client detached (stdin closed) and it still runs.
    pub async fn attach(&self, id: &str, io: AttachIo) -> Result<ExitStatus, DockerError> {
        let AttachIo {
            stdin,
            mut stdout,
            mut stderr,
            tty,
            resize,
        } = io;
        let opts = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdin(stdin.is_some())
            .stdout(stdout.is_some())
            .stderr(stderr.is_some() || tty)
            .build();
        let st = self.inspect(id).await?;
        if !st.is_running() {
            return Err(DockerError::NotRunning(id.to_owned()));
        }
        let res = self
            .docker
            .attach_container(id, Some(opts))
            .await
            .map_err(|e| DockerError::api("attach", id, e))?;
        let mut output = res.output;
        let stdin_task = stdin.map(|mut r| {
            let mut input = res.input;
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut r, &mut input).await;
                let _ = input.shutdown().await;
            })
        });
        let resize_task = resize.filter(|_| tty).map(|mut rx| {
            let docker = self.docker.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                while let Some(sz) = rx.recv().await {
                    let opts = ResizeContainerTTYOptionsBuilder::default()
                        .h(i32::from(sz.height))
                        .w(i32::from(sz.width))
                        .build();
                    if let Err(e) = docker.resize_container_tty(&id, opts).await {
                        debug!(error = %e, "attach resize");
                    }
                }
            })
        });
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdErr { message }) if stderr.is_some() => {
                    write_all(&mut stderr, &message).await;
                }
                Ok(
                    LogOutput::StdErr { message }
                    | LogOutput::StdOut { message }
                    | LogOutput::Console { message },
                ) => write_all(&mut stdout, &message).await,
                Ok(LogOutput::StdIn { .. }) => {}
                Err(_) => break,
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
        // The attach ends with the process; give Docker a moment to record it.
        for _ in 0..20 {
            let st = self.inspect(id).await?;
            if let RunState::Exited { exit_code, .. } = st.status {
                return Ok(ExitStatus { code: exit_code });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ExitStatus::SUCCESS)
    }
}
