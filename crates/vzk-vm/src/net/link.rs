//! Link plumbing: bridges, addresses and enslaving TAPs, through iproute2's `ip` command
//! (enslaving by ioctl first, see [`attach_to_bridge`]).
//!
//! Runs `ip` as a child process, so it acts in the network namespace of the calling
//! thread. Each helper is idempotent where the operation allows it ("already exists" is
//! success for the ensure-style helpers).

use std::net::Ipv4Addr;
use std::process::Stdio;

use tokio::process::Command;

/// A failed `ip` invocation.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// `ip` could not be run.
    #[error("running `ip {args}` failed")]
    Spawn {
        /// The arguments.
        args: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `ip` exited non-zero.
    #[error("`ip {args}` failed: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
}

/// Runs `ip ARGS`, returning its stdout.
pub async fn ip(args: &[&str]) -> Result<String, LinkError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| LinkError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LinkError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether interface `name` exists.
pub async fn exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).await.is_ok()
}

/// Whether interface `name` is a Linux bridge (`ip -d link` shows its `bridge` info).
pub async fn is_bridge(name: &str) -> bool {
    ip(&["-d", "-o", "link", "show", "dev", name])
        .await
        .is_ok_and(|out| out.split_whitespace().any(|w| w == "bridge"))
}

/// Creates bridge `name` (no STP, no forwarding delay) if missing and brings it up.
pub async fn ensure_bridge(name: &str) -> Result<(), LinkError> {
    if !exists(name).await {
        ip(&[
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])
        .await?;
    }
    ip(&["link", "set", "dev", name, "up"]).await.map(drop)
}

/// Adds `addr/prefix` to `dev` unless it is already there.
pub async fn ensure_address(dev: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
    let cidr = format!("{addr}/{prefix}");
    let current = ip(&["-4", "-o", "addr", "show", "dev", dev]).await?;
    if current.split_whitespace().any(|w| w == cidr) {
        return Ok(());
    }
    ip(&["addr", "add", &cidr, "dev", dev]).await.map(drop)
}

/// Enslaves `port` to `bridge` and brings it up: by ioctl (no process spawn on the VM
/// start path), falling back to `ip link set` if the kernel refuses the ioctl (e.g. a
/// bridge that is not a Linux bridge), so the error then is iproute2's own.
pub async fn attach_to_bridge(port: &str, bridge: &str) -> Result<(), LinkError> {
    match super::tap::enslave_and_up(port, bridge) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::debug!(port, bridge, error = %e, "bridge ioctl refused; using ip link");
            ip(&["link", "set", "dev", port, "master", bridge, "up"])
                .await
                .map(drop)
        }
    }
}

/// Deletes interface `name`; a missing interface is success.
pub async fn delete(name: &str) -> Result<(), LinkError> {
    if !exists(name).await {
        return Ok(());
    }
    ip(&["link", "del", "dev", name]).await.map(drop)
}
