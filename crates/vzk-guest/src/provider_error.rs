//! Mapping of [`GuestError`] onto the node runtime's [`ProviderError`], so a
//! provider can return guest failures with a meaningful reason and HTTP status.

use std::time::Duration;

use vzk_core::ProviderError;

use crate::dial::DialError;
use crate::exec::ExecError;
use crate::session::{ErrorChain, GuestError};

impl GuestError {
    /// The [`ProviderError`] for this failure. Rejected credentials and a changed
    /// host key are `Failed` with reasons `GuestAuthFailed` / `GuestHostKeyMismatch`
    /// (retrying will not help); an invalid command is `Invalid`; transport problems
    /// are `Unavailable` (retry later).
    pub fn into_provider_error(self) -> ProviderError {
        let message = ErrorChain(&self).to_string();
        match &self {
            GuestError::Dial { source, .. } => match source.as_ref() {
                DialError::AuthRejected { .. } => ProviderError::failed("GuestAuthFailed", message),
                DialError::HostKey(_) => ProviderError::failed("GuestHostKeyMismatch", message),
                _ => ProviderError::Unavailable {
                    message,
                    retry_after: Some(Duration::from_secs(1)),
                },
            },
            GuestError::InvalidCommand(_) => ProviderError::invalid("InvalidCommand", message),
            GuestError::ChannelRefused { .. } => {
                ProviderError::failed("GuestChannelRefused", message)
            }
            GuestError::Forward { .. } => ProviderError::failed("PortForwardFailed", message),
            GuestError::Exec {
                source: ExecError::ClosedBeforeStart | ExecError::NoExitStatus,
                ..
            } => ProviderError::Unavailable {
                message,
                retry_after: Some(Duration::from_secs(1)),
            },
            GuestError::Exec { .. } => ProviderError::failed("GuestExecFailed", message),
            GuestError::Closed => ProviderError::NotFound(message),
            GuestError::OpenChannel { .. }
            | GuestError::OpenChannelTimeout { .. }
            | GuestError::ProbeFailed(_)
            | GuestError::NotReady { .. } => ProviderError::Unavailable {
                message,
                retry_after: Some(Duration::from_secs(1)),
            },
        }
    }
}

impl From<GuestError> for ProviderError {
    fn from(e: GuestError) -> Self {
        e.into_provider_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn permanent_failures_are_not_retryable() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 22));
        let e = GuestError::Dial {
            addr,
            source: Arc::new(DialError::AuthRejected {
                user: "u".into(),
                tried: "publickey".into(),
            }),
        };
        assert!(e.is_permanent());
        let p = e.into_provider_error();
        assert_eq!(p.reason(), "GuestAuthFailed");
        assert!(p.to_string().contains("authentication rejected"), "{p}");
        let e = GuestError::Dial {
            addr,
            source: Arc::new(DialError::Timeout(Duration::from_secs(5))),
        };
        assert!(!e.is_permanent());
        assert!(e.into_provider_error().is_retryable());
        assert_eq!(
            GuestError::InvalidCommand("x".into())
                .into_provider_error()
                .reason(),
            "InvalidCommand"
        );
    }
}
