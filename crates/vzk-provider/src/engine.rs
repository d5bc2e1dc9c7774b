//! [`ContainerEngine`]: what the provider asks of the engine that runs side-car and init
//! containers. The binary uses the Docker crate's [`SidecarRuntime`]; tests pass a fake.
//! The methods and types are the Docker crate's (the only engine today), so a second
//! engine speaks the same state model (`SidecarState`, our labels as `OwnedContainer`).

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use vzk_core::PodKey;
use vzk_core::stats::ContainerStats;
use vzk_core::streams::{AttachIo, ExitStatus, LogOptions, LogStream, PortStream};
use vzk_docker::{
    DockerError, OwnedContainer, PullOutcome, PullPolicy, RegistryAuth, SidecarRuntime,
    SidecarSpec, SidecarState,
};

/// A container engine for one node's side-car and init containers.
#[async_trait]
pub trait ContainerEngine: Send + Sync + 'static {
    /// Whether the engine answers.
    async fn ping(&self) -> Result<(), DockerError>;
    /// Makes `image` available per `policy`, trying each credential in order.
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: &[RegistryAuth],
    ) -> Result<PullOutcome, DockerError>;
    /// Whether `image` is present locally.
    async fn image_present(&self, image: &str) -> Result<bool, DockerError>;
    /// Creates (does not start) a container; returns its id.
    async fn create(&self, spec: &SidecarSpec<'_>) -> Result<String, DockerError>;
    /// Starts a created container.
    async fn start(&self, id: &str) -> Result<(), DockerError>;
    /// SIGTERM, SIGKILL after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError>;
    /// Removes the container (and its anonymous volumes); removing twice is fine.
    async fn remove(&self, id: &str) -> Result<(), DockerError>;
    /// Its state now.
    async fn inspect(&self, id: &str) -> Result<SidecarState, DockerError>;
    /// Waits until it is not running and returns its final state.
    async fn wait(&self, id: &str) -> Result<SidecarState, DockerError>;
    /// Our containers on this node (running or not), optionally of one pod.
    async fn list_ours(&self, pod_uid: Option<&str>) -> Result<Vec<OwnedContainer>, DockerError>;
    /// The latest attempt of `pod`'s container `container`, if any.
    async fn find(
        &self,
        pod: &PodKey,
        container: &str,
    ) -> Result<Option<OwnedContainer>, DockerError>;
    /// Removes our containers whose pod UID is not in `keep`; returns their names.
    async fn cleanup(&self, keep: &[String]) -> Result<Vec<String>, DockerError>;
    /// Runs `command` in the container (`kubectl exec`).
    async fn exec(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError>;
    /// Like `exec`, for probes: dropping the future kills the process.
    async fn exec_probe(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError>;
    /// Attaches to the container's main process.
    async fn attach(&self, id: &str, io: AttachIo) -> Result<ExitStatus, DockerError>;
    /// Its log, as `kubectl logs` asks.
    async fn logs(&self, id: &str, opts: &LogOptions) -> Result<LogStream, DockerError>;
    /// Forwards `stream` to `127.0.0.1:port` in the container's network namespace.
    async fn port_forward(
        &self,
        id: &str,
        port: u16,
        stream: PortStream,
    ) -> Result<(), DockerError>;
    /// A TCP connection to `addr` from inside the container's network namespace.
    async fn connect_in(
        &self,
        id: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, DockerError>;
    /// CPU and memory (`name`: the Kubernetes container name).
    async fn stats(&self, id: &str, name: &str) -> Result<ContainerStats, DockerError>;
}

#[async_trait]
impl ContainerEngine for SidecarRuntime {
    async fn ping(&self) -> Result<(), DockerError> {
        SidecarRuntime::ping(self).await
    }
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: &[RegistryAuth],
    ) -> Result<PullOutcome, DockerError> {
        SidecarRuntime::ensure_image(self, image, policy, credentials).await
    }
    async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        SidecarRuntime::image_present(self, image).await
    }
    async fn create(&self, spec: &SidecarSpec<'_>) -> Result<String, DockerError> {
        SidecarRuntime::create(self, spec).await
    }
    async fn start(&self, id: &str) -> Result<(), DockerError> {
        SidecarRuntime::start(self, id).await
    }
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        SidecarRuntime::stop(self, id, grace).await
    }
    async fn remove(&self, id: &str) -> Result<(), DockerError> {
        SidecarRuntime::remove(self, id).await
    }
    async fn inspect(&self, id: &str) -> Result<SidecarState, DockerError> {
        SidecarRuntime::inspect(self, id).await
    }
    async fn wait(&self, id: &str) -> Result<SidecarState, DockerError> {
        SidecarRuntime::wait(self, id).await
    }
    async fn list_ours(&self, pod_uid: Option<&str>) -> Result<Vec<OwnedContainer>, DockerError> {
        SidecarRuntime::list_ours(self, pod_uid).await
    }
    async fn find(
        &self,
        pod: &PodKey,
        container: &str,
    ) -> Result<Option<OwnedContainer>, DockerError> {
        SidecarRuntime::find(self, pod, container).await
    }
    async fn cleanup(&self, keep: &[String]) -> Result<Vec<String>, DockerError> {
        SidecarRuntime::cleanup(self, |uid| keep.iter().any(|k| k == uid)).await
    }
    async fn exec(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        SidecarRuntime::exec(self, id, command, io).await
    }
    async fn exec_probe(
        &self,
        id: &str,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        SidecarRuntime::exec_probe(self, id, command, io).await
    }
    async fn attach(&self, id: &str, io: AttachIo) -> Result<ExitStatus, DockerError> {
        SidecarRuntime::attach(self, id, io).await
    }
    async fn logs(&self, id: &str, opts: &LogOptions) -> Result<LogStream, DockerError> {
        SidecarRuntime::logs(self, id, opts).await
    }
    async fn port_forward(
        &self,
        id: &str,
        port: u16,
        stream: PortStream,
    ) -> Result<(), DockerError> {
        SidecarRuntime::port_forward(self, id, port, stream).await
    }
    async fn connect_in(
        &self,
        id: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, DockerError> {
        SidecarRuntime::connect_in(self, id, addr, timeout).await
    }
    async fn stats(&self, id: &str, name: &str) -> Result<ContainerStats, DockerError> {
        SidecarRuntime::stats(self, id, name).await
    }
}
