//! A container's state: `docker inspect` mapped to a [`SidecarState`] and the
//! Kubernetes container state, and waiting for the container to end.

use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::WaitContainerOptionsBuilder;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tracing::warn;

use crate::{DockerError, SidecarRuntime, error_chain};

/// A side-car's state from `docker inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarState {
    /// Docker id.
    pub id: String,
    /// The image id (`sha256:…`).
    pub image_id: String,
    /// Where the container is.
    pub status: RunState,
}

/// Created, running or ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// Created, never started.
    Created,
    /// Running since `started_at`.
    Running {
        /// When the process started.
        started_at: Option<Timestamp>,
    },
    /// Ended.
    Exited {
        /// Exit code (128 + signal for a signal).
        exit_code: i32,
        /// `Completed`, `Error` or `OOMKilled`.
        reason: String,
        /// Docker's error message, if any.
        message: Option<String>,
        /// When it started.
        started_at: Option<Timestamp>,
        /// When it ended.
        finished_at: Option<Timestamp>,
    },
}

impl SidecarState {
    /// The Kubernetes container state.
    pub fn to_k8s(&self) -> ContainerState {
        match &self.status {
            RunState::Created => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
            RunState::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: started_at.map(Time),
                }),
                ..Default::default()
            },
            RunState::Exited {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
            } => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    reason: Some(reason.clone()),
                    message: message.clone(),
                    started_at: started_at.map(Time),
                    finished_at: finished_at.map(Time),
                    container_id: Some(format!("docker://{}", self.id)),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }

    /// Whether the container runs.
    pub fn is_running(&self) -> bool {
        matches!(self.status, RunState::Running { .. })
    }
}

fn docker_time(s: Option<&str>) -> Option<Timestamp> {
    let s = s?;
    // Docker reports "0001-01-01T00:00:00Z" for "never".
    if s.starts_with("0001-") {
        return None;
    }
    s.parse::<Timestamp>().ok()
}

impl SidecarState {
    fn from_inspect(r: &ContainerInspectResponse) -> Self {
        let st = r.state.clone().unwrap_or_default();
        let started_at = docker_time(st.started_at.as_deref());
        let status = match st.status {
            Some(ContainerStateStatusEnum::RUNNING)
            | Some(ContainerStateStatusEnum::PAUSED)
            | Some(ContainerStateStatusEnum::RESTARTING) => RunState::Running { started_at },
            Some(ContainerStateStatusEnum::CREATED)
            | None
            | Some(ContainerStateStatusEnum::EMPTY)
                if started_at.is_none() =>
            {
                RunState::Created
            }
            _ => {
                let exit_code = i32::try_from(st.exit_code.unwrap_or(0)).unwrap_or(255);
                let oom = st.oom_killed.unwrap_or(false);
                let reason = if oom {
                    "OOMKilled"
                } else if exit_code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                RunState::Exited {
                    exit_code,
                    reason: reason.into(),
                    message: st.error.filter(|e| !e.is_empty()),
                    started_at,
                    // Docker stamps start and finish in different components: a process that
                    // exits at once can "finish" microseconds before it "started".
                    finished_at: docker_time(st.finished_at.as_deref())
                        .map(|f| started_at.map_or(f, |s| f.max(s))),
                }
            }
        };
        SidecarState {
            id: r.id.clone().unwrap_or_default(),
            image_id: r.image.clone().unwrap_or_default(),
            status,
        }
    }
}

impl SidecarRuntime {
    /// The container's state.
    pub async fn inspect(&self, id: &str) -> Result<SidecarState, DockerError> {
        let r = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| DockerError::api("inspect", id, e))?;
        Ok(SidecarState::from_inspect(&r))
    }

    /// Waits until the container is not running, then returns its state.
    pub async fn wait(&self, id: &str) -> Result<SidecarState, DockerError> {
        let opts = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut s = self.docker.wait_container(id, Some(opts));
        match s.next().await {
            // A non-zero exit comes back as an error from bollard: not a failure here.
            Some(Ok(_))
            | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. }))
            | None => self.inspect(id).await,
            Some(Err(e)) => {
                let err = DockerError::api("wait", id, e);
                if matches!(
                    err,
                    DockerError::NotFound(_) | DockerError::Unreachable { .. }
                ) {
                    return Err(err);
                }
                // Anything else: fall back to polling.
                warn!(container = id, error = %error_chain(&err), "docker wait failed; polling");
                loop {
                    let st = self.inspect(id).await?;
                    if !st.is_running() {
                        return Ok(st);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
