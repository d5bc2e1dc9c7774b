//! `kubectl logs` of a side-car from Docker's log stream.
//!
//! Docker is always asked for timestamps (RFC 3339 with nanoseconds, one per log
//! line), so `sinceTime`/`sinceSeconds` are applied to the nanosecond here (Docker's
//! own `since` takes whole seconds and only narrows what it sends); the prefix is kept
//! when the client asked for timestamps (the kubelet's format, `<ts> <line>`) and
//! stripped otherwise. `tailLines` is Docker's `tail`; `limitBytes` cuts the stream
//! after exactly that many bytes.

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use vzk_core::streams::{LogOptions, LogStream};

use crate::{DockerError, SidecarRuntime};

/// The earliest instant wanted, from `sinceTime` or `sinceSeconds` (relative to `now`).
pub fn since(opts: &LogOptions, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match (opts.since_time, opts.since_seconds) {
        (Some(t), _) => Some(t),
        (None, Some(s)) => Some(
            now - chrono::Duration::seconds(
                i64::try_from(s).unwrap_or(i64::MAX / 1000).min(1 << 40),
            ),
        ),
        (None, None) => None,
    }
}

/// Filters and formats timestamped Docker log lines per `opts`.
#[derive(Debug)]
pub struct LogFilter {
    since: Option<DateTime<Utc>>,
    timestamps: bool,
    remaining: Option<u64>,
    partial: BytesMut,
}

impl LogFilter {
    /// A filter for `opts`, with `since` already resolved (see [`since`]).
    pub fn new(opts: &LogOptions, since: Option<DateTime<Utc>>) -> Self {
        Self {
            since,
            timestamps: opts.timestamps,
            remaining: opts.limit_bytes,
            partial: BytesMut::new(),
        }
    }

    /// Whether `limitBytes` is used up.
    pub fn done(&self) -> bool {
        self.remaining == Some(0)
    }

    /// Feeds a chunk of Docker output; returns what to send.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.partial.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line = self.partial.split_to(i + 1);
            self.line(&line, &mut out);
        }
        self.limit(out)
    }

    /// The stream ended: a last line without newline.
    pub fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, &mut out);
        }
        self.limit(out)
    }

    fn line(&self, line: &[u8], out: &mut BytesMut) {
        let (ts, body) = match line.iter().position(|b| *b == b' ') {
            Some(i) => match std::str::from_utf8(&line[..i])
                .ok()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            {
                Some(t) => (Some(t.with_timezone(&Utc)), &line[i + 1..]),
                None => (None, line),
            },
            None => (None, line),
        };
        if let (Some(since), Some(ts)) = (self.since, ts)
            && ts < since
        {
            return;
        }
        if self.timestamps {
            out.extend_from_slice(line);
        } else {
            out.extend_from_slice(body);
        }
    }

    fn limit(&mut self, mut out: BytesMut) -> Bytes {
        if let Some(rem) = self.remaining.as_mut() {
            let n = usize::try_from(*rem).unwrap_or(usize::MAX).min(out.len());
            out.truncate(n);
            *rem -= n as u64;
        }
        out.freeze()
    }
}

/// Applies `filter` to a stream of Docker log chunks.
pub fn filtered<S>(
    inner: S,
    filter: LogFilter,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static,
{
    futures::stream::unfold(
        (inner, filter, false),
        |(mut inner, mut filter, finished)| async move {
            if finished || filter.done() {
                return None;
            }
            loop {
                match inner.next().await {
                    Some(Ok(chunk)) => {
                        let out = filter.push(&chunk);
                        if !out.is_empty() {
                            let done = filter.done();
                            return Some((Ok(out), (inner, filter, done)));
                        }
                        if filter.done() {
                            return None;
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (inner, filter, true))),
                    None => {
                        let out = filter.finish();
                        return (!out.is_empty()).then_some((Ok(out), (inner, filter, true)));
                    }
                }
            }
        },
    )
}

impl SidecarRuntime {
    /// The container's logs as `kubectl logs` wants them (see [`logs`](crate::logs)).
    pub async fn logs(&self, id: &str, opts: &LogOptions) -> Result<LogStream, DockerError> {
        // Fail now (not mid-stream) when the container does not exist.
        self.inspect(id).await?;
        let since = since(opts, Utc::now());
        let mut b = LogsOptionsBuilder::default()
            .follow(opts.follow)
            .stdout(true)
            .stderr(true)
            .timestamps(true);
        if let Some(n) = opts.tail_lines {
            b = b.tail(&n.to_string());
        }
        if let Some(s) = since {
            let secs = i32::try_from(s.timestamp()).unwrap_or(i32::MAX).max(0);
            b = b.since(secs);
        }
        let id_owned = id.to_owned();
        let raw = self
            .docker
            .logs(id, Some(b.build()))
            .map_ok(LogOutput::into_bytes)
            .map_err(move |e| std::io::Error::other(format!("docker logs {id_owned}: {e}")));
        let filter = LogFilter::new(opts, since);
        Ok(Box::pin(filtered(Box::pin(raw), filter)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts() -> LogOptions {
        LogOptions::default()
    }

    #[test]
    fn timestamps_are_stripped_unless_asked_for() {
        let mut f = LogFilter::new(&opts(), None);
        let out = f.push(b"2026-01-01T00:00:00.123456789Z hello\n2026-01-01T00:00:01Z wor");
        assert_eq!(&out[..], b"hello\n");
        assert_eq!(&f.finish()[..], b"wor");
        let mut f = LogFilter::new(
            &LogOptions {
                timestamps: true,
                ..opts()
            },
            None,
        );
        let out = f.push(b"2026-01-01T00:00:00.5Z a\n");
        assert_eq!(&out[..], b"2026-01-01T00:00:00.5Z a\n");
    }

    #[test]
    fn since_is_exact_to_the_nanosecond() {
        let since = DateTime::parse_from_rfc3339("2026-01-01T00:00:00.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut f = LogFilter::new(&opts(), Some(since));
        let out = f.push(
            b"2026-01-01T00:00:00.499999999Z old\n2026-01-01T00:00:00.5Z new\n2026-01-01T00:00:02Z newer\n",
        );
        assert_eq!(&out[..], b"new\nnewer\n");
    }

    #[test]
    fn limit_bytes_cuts_exactly() {
        let mut f = LogFilter::new(
            &LogOptions {
                limit_bytes: Some(4),
                ..opts()
            },
            None,
        );
        assert_eq!(&f.push(b"2026-01-01T00:00:00Z abc\n")[..], b"abc\n");
        assert!(f.done());
        assert!(f.push(b"2026-01-01T00:00:00Z x\n").is_empty());
    }

    #[test]
    fn since_seconds_counts_back_from_now() {
        let now = Utc::now();
        let s = since(
            &LogOptions {
                since_seconds: Some(10),
                ..opts()
            },
            now,
        );
        assert_eq!(s, Some(now - chrono::Duration::seconds(10)));
    }
}
