//! Container probes (startup, readiness, liveness) as the kubelet runs them, and the
//! restart back-off.
//!
//! # Contract
//! * [`ContainerProbes::from_container`] reads a container's three probes and checks
//!   them (a handler is given, gRPC is refused, a named port exists among the
//!   container's `ports`, `successThreshold` is 1 for liveness and startup). Defaults are
//!   the API's: period 10 s, timeout 1 s, success 1, failure 3.
//! * [`run`] drives the probes of one running container against a [`ProbeTarget`]:
//!   the startup probe first (until it succeeds, readiness is false and liveness does
//!   not run); then readiness and liveness, each every `periodSeconds` once
//!   `initialDelaySeconds` have passed since the container started. Results go through
//!   the [`Thresholds`] state machine (a result changes after `successThreshold`
//!   consecutive successes or `failureThreshold` consecutive failures, as the kubelet's
//!   worker does). Readiness changes and failures are reported through a callback;
//!   [`run`] returns a [`RestartRequest`] when liveness or startup fails, and never
//!   returns otherwise.
//! * Handlers: `exec` runs the command in the container (a timeout is a failure,
//!   output kept up to 10 KiB), `tcpSocket` succeeds when a TCP connection opens within
//!   the timeout, `httpGet` sends one HTTP/1.1 `GET` (HTTPS without certificate
//!   verification, as the kubelet does; host defaults to the pod IP; `httpHeaders` sent;
//!   success is 200 ≤ status < 400, redirects are not followed).
//! * Messages follow the kubelet's: `Readiness probe failed: <output>`,
//!   `dial tcp <ip>:<port>: <error>`, `HTTP probe failed with statuscode: <code>`.
//!
//! # Using it for another kind of container
//! The runner knows nothing of VMs: implement [`ProbeTarget`] (how to run a command in
//! the container, how to open a TCP connection to the pod's network, the pod IP) and
//! call [`run`] with the container's [`ContainerProbes`]. The VM's target lives in
//! [`crate::pod`] (exec over the guest's SSH, sockets opened in the VM network
//! namespace); a Docker side-car's lives in [`crate::sidecars`] (`docker exec`, killed
//! on timeout; sockets opened at 127.0.0.1 inside the side-car's own network namespace,
//! so only a loopback probe `host` is accepted).
//!
//! Layout: [`spec`] (what a container asks for, checked), [`handlers`] (exec, tcpSocket,
//! httpGet against a [`ProbeTarget`]), [`runner`] (thresholds, the probe loop, the
//! restart back-off).

pub mod handlers;
pub mod runner;
pub mod spec;

pub use handlers::*;
pub use runner::*;
pub use spec::*;

/// How much of an exec probe's output is kept (the kubelet's limit).
pub const MAX_OUTPUT: usize = 10 * 1024;
/// The `User-Agent` of HTTP probes (the kubelet sends `kube-probe/<major>.<minor>`).
pub const USER_AGENT: &str = "kube-probe/1.35";

#[cfg(test)]
mod tests;
