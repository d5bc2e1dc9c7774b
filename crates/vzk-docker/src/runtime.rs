//! The runtime itself and its connection to dockerd: connect (negotiating the API
//! version down to the daemon's), ping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bollard::Docker;
use tracing::info;

use crate::DockerError;

/// The side-car runtime of one node.
pub struct SidecarRuntime {
    pub(crate) docker: Docker,
    pub(crate) node: String,
    /// The previous CPU sample of each container (for `usageNanoCores`).
    pub(crate) cpu_samples: Mutex<HashMap<String, (Instant, u64)>>,
}

impl std::fmt::Debug for SidecarRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarRuntime")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SidecarRuntime {
    /// Connects to the local dockerd for node `node` (its name goes into every label).
    pub async fn connect(node: &str) -> Result<Self, DockerError> {
        let docker =
            Docker::connect_with_local_defaults().map_err(|e| DockerError::Unreachable {
                message: "connecting to the local Docker socket".into(),
                source: Some(e),
            })?;
        Self::with_docker(docker, node).await
    }

    /// Wraps an existing bollard client (e.g. `Docker::connect_with_unix`).
    pub async fn with_docker(docker: Docker, node: &str) -> Result<Self, DockerError> {
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| DockerError::Unreachable {
                message: "dockerd did not answer /version within 10 s".into(),
                source: None,
            })?
            .map_err(|e| DockerError::Unreachable {
                message: "asking dockerd for its version".into(),
                source: Some(e),
            })?;
        info!(node, api = %docker.client_version(), "connected to Docker");
        Ok(Self {
            docker,
            node: node.to_owned(),
            cpu_samples: Mutex::new(HashMap::new()),
        })
    }

    /// The bollard client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The node name in our labels.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether dockerd answers.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| DockerError::api("ping", "dockerd", e))
    }
}
