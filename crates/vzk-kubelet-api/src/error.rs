//! The HTTP-facing error of request handlers, mapped to a status code in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use vzk_core::ProviderError;

use crate::auth::ReviewError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No acceptable identity (401).
    #[error("Unauthorized: {0}")]
    Unauthorized(String),
    /// The identity may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// The provider failed; the status follows the provider's error kind.
    #[error("provider")]
    Provider(#[source] ProviderError),
    /// An authentication or authorization review failed (500).
    #[error("reviewing the request's credentials")]
    Review(#[source] ReviewError),
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Review(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Provider(e) => match e {
                ProviderError::NotFound(_) => StatusCode::NOT_FOUND,
                ProviderError::Invalid { .. } => StatusCode::BAD_REQUEST,
                ProviderError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
                ProviderError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                ProviderError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %crate::error_chain(&self), %status, "kubelet api: request failed");
        }
        (status, format!("{}\n", crate::error_chain(&self))).into_response()
    }
}
