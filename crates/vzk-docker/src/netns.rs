//! Connections into a container's network namespace: port-forward and probes dialling
//! the side-car's loopback.

use std::time::Duration;

use tracing::debug;
use vzk_core::streams::PortStream;

use crate::{DockerError, SidecarRuntime};

impl SidecarRuntime {
    /// Forwards `stream` to `127.0.0.1:port` inside the container's network namespace.
    pub async fn port_forward(
        &self,
        id: &str,
        port: u16,
        mut stream: PortStream,
    ) -> Result<(), DockerError> {
        let r = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| DockerError::api("inspect", id, e))?;
        let pid = r
            .state
            .as_ref()
            .filter(|s| s.running == Some(true))
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| DockerError::NotRunning(id.to_owned()))?;
        let sock = connect_in_netns(
            pid,
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(10),
        )
        .await?;
        let mut tcp = tokio::net::TcpStream::from_std(sock).map_err(|source| DockerError::Io {
            what: "registering the port-forward socket".into(),
            source,
        })?;
        match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
            Ok((up, down)) => {
                debug!(container = id, port, up, down, "port-forward closed");
                Ok(())
            }
            // A reset by either side ends the connection; not the runtime's failure.
            Err(e) => {
                debug!(container = id, port, error = %e, "port-forward ended");
                Ok(())
            }
        }
    }

    /// Opens a TCP connection to `addr` from inside the network namespace of the running
    /// container `id` (probes of a side-car dial `127.0.0.1` there). Errors keep the
    /// [`std::io::ErrorKind`] of the connect (e.g. `ConnectionRefused`) in
    /// [`DockerError::Io`].
    pub async fn connect_in(
        &self,
        id: &str,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<tokio::net::TcpStream, DockerError> {
        let r = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| DockerError::api("inspect", id, e))?;
        let pid = r
            .state
            .as_ref()
            .filter(|s| s.running == Some(true))
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| DockerError::NotRunning(id.to_owned()))?;
        let sock = connect_in_netns(pid, addr, timeout).await?;
        tokio::net::TcpStream::from_std(sock).map_err(|source| DockerError::Io {
            what: "registering a socket".into(),
            source,
        })
    }
}

/// Opens a TCP connection to `addr` in the network namespace of process `pid`. Runs on
/// a thread of its own that enters the namespace and then exits, so no pooled thread
/// ever changes namespace; the socket keeps its namespace afterwards.
#[cfg(target_os = "linux")]
async fn connect_in_netns(
    pid: i64,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<std::net::TcpStream, DockerError> {
    let path = format!("/proc/{pid}/ns/net");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let p = path.clone();
    std::thread::Builder::new()
        .name("vzk-docker-netns".into())
        .spawn(move || {
            let result = (|| {
                let ns = std::fs::File::open(&p)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            })();
            let _ = tx.send(result);
        })
        .map_err(|source| DockerError::Io {
            what: "spawning the port-forward thread".into(),
            source,
        })?;
    rx.await
        .map_err(|_| DockerError::Io {
            what: format!("port-forward thread for {path} died"),
            source: std::io::Error::other("thread ended without an answer"),
        })?
        .map_err(|source| DockerError::Io {
            what: format!("connecting to {addr} in {path}"),
            source,
        })
}

/// Network namespaces are Linux's; elsewhere (Docker Desktop and the like run dockerd in
/// a Linux VM, so `pid` is not even a host process) a container's loopback cannot be
/// reached from the host.
#[cfg(not(target_os = "linux"))]
async fn connect_in_netns(
    pid: i64,
    addr: std::net::SocketAddr,
    _timeout: Duration,
) -> Result<std::net::TcpStream, DockerError> {
    Err(DockerError::Io {
        what: format!("connecting to {addr} in the network namespace of container process {pid}"),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "entering a container's network namespace needs a Linux host running dockerd",
        ),
    })
}
