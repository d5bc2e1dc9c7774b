//! A container's lifecycle: create (replacing a leftover of ours by the same name),
//! start, stop, remove.

use std::time::Duration;

use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use tracing::warn;

use crate::runtime::lock;
use crate::{DockerError, SidecarRuntime, SidecarSpec, container_name, spec};

impl SidecarRuntime {
    /// Creates (does not start) the container for `spec`. A leftover container with
    /// the same name (an agent that died between create and record) is removed first.
    pub async fn create(&self, spec: &SidecarSpec<'_>) -> Result<String, DockerError> {
        let body = spec::create_body(spec, &self.node)?;
        let name = container_name(spec.pod, &spec.container.name, spec.attempt);
        for round in 0..2 {
            let opts = CreateContainerOptionsBuilder::default().name(&name).build();
            match self.docker.create_container(Some(opts), body.clone()).await {
                Ok(r) => {
                    for w in r.warnings {
                        warn!(container = %name, warning = %w, "docker create");
                    }
                    return Ok(r.id);
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) if round == 0 => {
                    // Only a container of ours (this node's labels) is removed.
                    let theirs = self
                        .docker
                        .inspect_container(&name, None)
                        .await
                        .map_err(|e| DockerError::api("inspect", &name, e))?;
                    let node = theirs
                        .config
                        .and_then(|c| c.labels)
                        .and_then(|l| l.get(spec::LABEL_NODE).cloned());
                    if node.as_deref() != Some(self.node.as_str()) {
                        return Err(DockerError::InvalidSpec(format!(
                            "container name {name} is taken by a container that is not this node's"
                        )));
                    }
                    warn!(container = %name, "removing a leftover container with our name");
                    self.remove(&name).await?;
                }
                Err(e) => return Err(DockerError::api("create", &name, e)),
            }
        }
        Err(DockerError::InvalidSpec(format!(
            "container name {name} stays in use"
        )))
    }

    /// Starts a created container.
    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| DockerError::api("start", id, e))
    }

    /// Stops the container: SIGTERM (or the image's stop signal), SIGKILL after
    /// `grace` (whole seconds, rounded up). Stopping a stopped container is fine.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let secs = i32::try_from(grace.as_secs() + u64::from(grace.subsec_nanos() > 0))
            .unwrap_or(i32::MAX);
        let opts = StopContainerOptionsBuilder::default().t(secs).build();
        match self.docker.stop_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api("stop", id, e)),
        }
    }

    /// Removes the container (forced, with its anonymous volumes). A missing one is fine.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        lock(&self.cpu_samples).remove(id);
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) => match DockerError::api("remove", id, e) {
                DockerError::NotFound(_) => Ok(()),
                // 409 "removal already in progress".
                DockerError::Api {
                    source:
                        bollard::errors::Error::DockerResponseServerError {
                            status_code: 409, ..
                        },
                    ..
                } => Ok(()),
                other => Err(other),
            },
        }
    }
}
