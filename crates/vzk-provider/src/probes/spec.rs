//! What a container asks for: its three probes, read and checked against the API's
//! rules and defaults.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// `startupProbe`.
    Startup,
    /// `readinessProbe`.
    Readiness,
    /// `livenessProbe`.
    Liveness,
}

impl ProbeKind {
    /// `Startup`, `Readiness`, `Liveness` (the kubelet's capitalisation in messages).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "Startup",
            Self::Readiness => "Readiness",
            Self::Liveness => "Liveness",
        }
    }
}

impl std::fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HTTP or HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// TLS, certificate not verified.
    Https,
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a command in the container; exit 0 is success.
    Exec {
        /// The argv.
        command: Vec<String>,
    },
    /// Open a TCP connection.
    Tcp {
        /// Host (default: the pod IP).
        host: Option<String>,
        /// Port.
        port: u16,
    },
    /// One HTTP GET.
    Http {
        /// HTTP or HTTPS.
        scheme: Scheme,
        /// Host (default: the pod IP).
        host: Option<String>,
        /// Port.
        port: u16,
        /// Path (with query), starting with `/`.
        path: String,
        /// Extra request headers.
        headers: Vec<(String, String)>,
    },
}

/// One probe of a container, checked and with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Which probe.
    pub kind: ProbeKind,
    /// What it does.
    pub action: Action,
    /// `initialDelaySeconds` (default 0).
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
    /// The probe-level `terminationGracePeriodSeconds` (liveness and startup only).
    pub termination_grace: Option<Duration>,
}

/// Why a probe of the pod spec cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeConfigError {
    /// No `exec`, `tcpSocket` or `httpGet`.
    #[error("{kind} probe of container {container:?} has no exec, tcpSocket or httpGet handler")]
    NoHandler {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
    /// gRPC probes are not run by this node.
    #[error("{kind} probe of container {container:?}: gRPC probes are not supported by this node")]
    Grpc {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
    /// An exec probe without a command.
    #[error("{kind} probe of container {container:?}: exec probe has an empty command")]
    EmptyCommand {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
    /// A port name not among the container's ports, or a number out of range.
    #[error("{kind} probe of container {container:?}: {message}")]
    BadPort {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
        /// What is wrong.
        message: String,
    },
    /// A scheme other than HTTP/HTTPS.
    #[error("{kind} probe of container {container:?}: unsupported scheme {scheme:?}")]
    BadScheme {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
        /// The scheme given.
        scheme: String,
    },
    /// `successThreshold` other than 1 on liveness/startup (the API rejects it too).
    #[error("{kind} probe of container {container:?}: successThreshold must be 1")]
    SuccessThreshold {
        /// Which probe.
        kind: ProbeKind,
        /// The container.
        container: String,
    },
}

fn secs(v: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(
        v.and_then(|s| u64::try_from(s).ok())
            .unwrap_or(default)
            .max(min),
    )
}

fn resolve_port(p: &IntOrString, c: &Container, kind: ProbeKind) -> Result<u16, ProbeConfigError> {
    let bad = |message: String| ProbeConfigError::BadPort {
        kind,
        container: c.name.clone(),
        message,
    };
    match p {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad(format!("port {n} is out of range"))),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<u16>()
                && n > 0
            {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(s.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| bad(format!("port {s:?} is not a named port of the container")))
        }
    }
}

impl ProbeSpec {
    /// Reads `probe` (the `kind` probe of container `c`), applying the API defaults.
    pub fn from_k8s(
        kind: ProbeKind,
        probe: &Probe,
        c: &Container,
    ) -> Result<Self, ProbeConfigError> {
        let container = c.name.clone();
        let action = if let Some(x) = &probe.exec {
            let command = x.command.clone().unwrap_or_default();
            if command.is_empty() {
                return Err(ProbeConfigError::EmptyCommand { kind, container });
            }
            Action::Exec { command }
        } else if let Some(t) = &probe.tcp_socket {
            Action::Tcp {
                host: t.host.clone().filter(|h| !h.is_empty()),
                port: resolve_port(&t.port, c, kind)?,
            }
        } else if let Some(h) = &probe.http_get {
            let scheme = match h.scheme.as_deref().unwrap_or("HTTP") {
                s if s.eq_ignore_ascii_case("http") => Scheme::Http,
                s if s.eq_ignore_ascii_case("https") => Scheme::Https,
                s => {
                    return Err(ProbeConfigError::BadScheme {
                        kind,
                        container,
                        scheme: s.to_owned(),
                    });
                }
            };
            let path = match h.path.as_deref().unwrap_or("") {
                "" => "/".to_owned(),
                p if p.starts_with('/') => p.to_owned(),
                p => format!("/{p}"),
            };
            Action::Http {
                scheme,
                host: h.host.clone().filter(|h| !h.is_empty()),
                port: resolve_port(&h.port, c, kind)?,
                path,
                headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if probe.grpc.is_some() {
            return Err(ProbeConfigError::Grpc { kind, container });
        } else {
            return Err(ProbeConfigError::NoHandler { kind, container });
        };
        let success_threshold = probe
            .success_threshold
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
            .max(1);
        if kind != ProbeKind::Readiness && success_threshold != 1 {
            return Err(ProbeConfigError::SuccessThreshold { kind, container });
        }
        Ok(Self {
            kind,
            action,
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold,
            failure_threshold: probe
                .failure_threshold
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(3)
                .max(1),
            termination_grace: (kind != ProbeKind::Readiness)
                .then_some(probe.termination_grace_period_seconds)
                .flatten()
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
        })
    }
}

/// The three probes of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerProbes {
    /// `startupProbe`.
    pub startup: Option<ProbeSpec>,
    /// `readinessProbe`.
    pub readiness: Option<ProbeSpec>,
    /// `livenessProbe`.
    pub liveness: Option<ProbeSpec>,
}

impl ContainerProbes {
    /// Reads and checks the probes of `c`.
    pub fn from_container(c: &Container) -> Result<Self, ProbeConfigError> {
        let read = |kind, p: &Option<Probe>| {
            p.as_ref()
                .map(|p| ProbeSpec::from_k8s(kind, p, c))
                .transpose()
        };
        Ok(Self {
            startup: read(ProbeKind::Startup, &c.startup_probe)?,
            readiness: read(ProbeKind::Readiness, &c.readiness_probe)?,
            liveness: read(ProbeKind::Liveness, &c.liveness_probe)?,
        })
    }

    /// Whether the container has no probe at all.
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.readiness.is_none() && self.liveness.is_none()
    }
}
