//! Errors a provider returns to the node runtime.
//!
//! The variants are what the runtime needs to decide: whether to retry, what to put in
//! the pod's status `reason`, and which HTTP status a kubelet API request gets.

use std::time::Duration;

/// An error from a [`crate::Provider`].
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The pod, container or port asked for does not exist (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is malformed or impossible for this provider (HTTP 400). Permanent:
    /// the pod gets `reason` and an event, and is not retried until it changes.
    #[error("invalid: {reason}: {message}")]
    Invalid {
        /// A CamelCase reason, used as the pod status / event reason.
        reason: String,
        /// Human-readable explanation.
        message: String,
    },
    /// The provider does not implement this operation (HTTP 501).
    #[error("not supported by this provider: {0}")]
    Unsupported(String),
    /// A temporary failure; the runtime retries after `retry_after` (or its own backoff).
    #[error("temporarily unavailable: {message}")]
    Unavailable {
        /// Human-readable explanation.
        message: String,
        /// Suggested delay before retrying.
        retry_after: Option<Duration>,
    },
    /// Any other failure, with a CamelCase reason for status and events.
    #[error("{reason}: {message}")]
    Failed {
        /// A CamelCase reason, used as the pod status / event reason.
        reason: String,
        /// Human-readable explanation.
        message: String,
    },
}

impl ProviderError {
    /// A permanent, user-caused error with a reason.
    pub fn invalid(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A generic failure with a reason.
    pub fn failed(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Failed {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// The CamelCase reason to record on the pod and in events.
    pub fn reason(&self) -> &str {
        match self {
            Self::NotFound(_) => "NotFound",
            Self::Invalid { reason, .. } | Self::Failed { reason, .. } => reason,
            Self::Unsupported(_) => "Unsupported",
            Self::Unavailable { .. } => "Unavailable",
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Failed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_retry_classification() {
        let e = ProviderError::invalid("InvalidCPU", "fractional CPUs are not supported");
        assert_eq!(e.reason(), "InvalidCPU");
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            "invalid: InvalidCPU: fractional CPUs are not supported"
        );
        let e = ProviderError::Unavailable {
            message: "busy".into(),
            retry_after: None,
        };
        assert!(e.is_retryable());
        assert_eq!(
            ProviderError::NotFound("pod a/b".into()).reason(),
            "NotFound"
        );
    }
}

/// Formats an error with its `source()` chain: `outer: cause: root cause`.
///
/// The one way every crate of vz-kubelet prints an error for a log line, an event or a
/// status message.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// [`ErrorChain`] as a `String`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    ErrorChain(e).to_string()
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_lists_every_source_in_order() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "outer: disk on fire");
    }
}
