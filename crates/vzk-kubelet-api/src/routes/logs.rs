//! `GET /containerLogs/{ns}/{pod}/{container}`: streams the provider's log stream as the
//! response body (follow streams, nothing is buffered).

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::DateTime;
use futures::StreamExt;
use vzk_core::streams::{ContainerRef, LogOptions};

use crate::error::ApiError;
use crate::query;
use crate::server::AppState;

/// Parses the kubelet's log query parameters.
pub(crate) fn log_options(raw: Option<&str>) -> Result<LogOptions, ApiError> {
    let p = query::pairs(raw)?;
    let non_negative = |key: &str| -> Result<Option<u64>, ApiError> {
        query::int_of(&p, key)?
            .map(|v| {
                u64::try_from(v)
                    .map_err(|_| ApiError::BadRequest(format!("{key} must not be negative")))
            })
            .transpose()
    };
    let mut tail_lines = non_negative("tailLines")?;
    if tail_lines.is_none()
        && let Some(t) = query::last(&p, "tail")
        && t != "all"
    {
        tail_lines = Some(
            t.parse()
                .map_err(|_| ApiError::BadRequest(format!("invalid tail={t:?}")))?,
        );
    }
    let since_seconds = non_negative("sinceSeconds")?;
    if since_seconds == Some(0) {
        return Err(ApiError::BadRequest(
            "sinceSeconds must be greater than 0".into(),
        ));
    }
    let since_time = query::last(&p, "sinceTime")
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.to_utc())
                .map_err(|e| ApiError::BadRequest(format!("invalid sinceTime {t:?}: {e}")))
        })
        .transpose()?;
    if since_seconds.is_some() && since_time.is_some() {
        return Err(ApiError::BadRequest(
            "at most one of sinceTime or sinceSeconds may be specified".into(),
        ));
    }
    let limit_bytes = non_negative("limitBytes")?;
    if limit_bytes == Some(0) {
        return Err(ApiError::BadRequest(
            "limitBytes must be greater than 0".into(),
        ));
    }
    Ok(LogOptions {
        follow: query::bool_of(&p, "follow")?,
        tail_lines,
        since_seconds,
        since_time,
        timestamps: query::bool_of(&p, "timestamps")?,
        limit_bytes,
        previous: query::bool_of(&p, "previous")?,
    })
}

pub(crate) async fn container_logs(
    State(st): State<AppState>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let opts = log_options(raw.as_deref())?;
    let target = ContainerRef {
        namespace,
        pod,
        uid: None,
        container,
    };
    let stream = st
        .runtime
        .logs(&target, &opts)
        .await
        .map_err(ApiError::Provider)?;
    let stream = match opts.limit_bytes {
        // The provider applies the limit too; this keeps the contract if it does not.
        Some(limit) => {
            let mut left = limit;
            stream
                .take_while(move |_| {
                    let more = left > 0;
                    futures::future::ready(more)
                })
                .map(move |chunk| {
                    chunk.map(|mut b| {
                        let keep = usize::try_from(left).unwrap_or(usize::MAX).min(b.len());
                        left -= keep as u64;
                        b.truncate(keep);
                        b
                    })
                })
                .boxed()
        }
        None => stream,
    };
    Ok((
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_log_options() {
        let o = log_options(Some(
            "follow=true&tailLines=5&timestamps=1&limitBytes=100&previous=false&sinceSeconds=30",
        ))
        .expect("valid");
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!(
            (o.tail_lines, o.limit_bytes, o.since_seconds),
            (Some(5), Some(100), Some(30))
        );
        let o = log_options(Some("sinceTime=2026-01-01T00:00:00Z&tail=all")).expect("valid");
        assert_eq!(o.tail_lines, None);
        assert_eq!(o.since_time.map(|t| t.timestamp()), Some(1_767_225_600));
        assert_eq!(
            log_options(Some("tail=3")).expect("valid").tail_lines,
            Some(3)
        );
        for bad in [
            "tailLines=-1",
            "sinceSeconds=1&sinceTime=2026-01-01T00:00:00Z",
            "limitBytes=0",
            "sinceTime=yesterday",
            "follow=perhaps",
        ] {
            assert!(log_options(Some(bad)).is_err(), "{bad} must be rejected");
        }
    }
}
