//! `kubectl logs` of a VM: its serial console log file.
//!
//! # Contract
//! * `tail_lines`: only the last N lines of what is in the file now.
//! * `since_seconds`/`since_time`: the console has no per-line times; the existing
//!   content counts as written at the file's modification time (all of it passes or
//!   none does), lines that arrive while following are timed on arrival.
//! * `timestamps`: each line is prefixed with an RFC 3339 time (the same rule).
//! * `limit_bytes`: the stream ends after that many bytes (prefixes included).
//! * `follow`: new output is streamed (checked every 100 ms) until `stop` fires (the
//!   VM ended) or the reader goes away; a rotation (the file cut to 0) is followed from
//!   its new start.
//!
//! # Size
//! The hypervisor appends to the console file and a guest can write to its console as
//! fast as it likes, so [`keep_console_within`] copies the file to `console.log.1` and
//! cuts it to empty once it passes [`CONSOLE_MAX_BYTES`] (the kubelet's default
//! `containerLogMaxSize`), checked every [`CONSOLE_CHECK`]: a pod's console takes at most
//! about twice that on disk and `kubectl logs` never reads more than that into memory.
//! As with logrotate's copytruncate, a line written between the copy and the cut is lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::sync::CancellationToken;
use vzk_core::streams::{LogOptions, LogStream};

const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The size past which a console log is rotated.
pub const CONSOLE_MAX_BYTES: u64 = 10 << 20;

/// How often a running VM's console log size is checked.
pub const CONSOLE_CHECK: Duration = Duration::from_secs(5);

/// Rotates the log at `path` when it is over `max` bytes: its content goes to
/// `<path>.1` (replacing an older one) and the file is cut to empty, in place, so a writer
/// that appends (`O_APPEND`) goes on at its new start. Returns whether it rotated.
pub fn rotate_if_over(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    std::fs::copy(path, &rotated)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// Keeps the console log at `path` within `max` bytes until `stop` fires.
pub async fn keep_console_within(path: PathBuf, max: u64, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CONSOLE_CHECK) => {}
        }
        let p = path.clone();
        match tokio::task::spawn_blocking(move || rotate_if_over(&p, max)).await {
            Ok(Ok(true)) => tracing::info!(
                path = %path.display(),
                max,
                "console log rotated (the guest wrote past the size limit)"
            ),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "checking the console log size")
            }
            Err(e) => tracing::warn!(error = %e, "console log check task failed"),
        }
    }
}

/// The cut-off time of `opts` (`since_time` wins over `since_seconds`).
fn since(opts: &LogOptions, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    opts.since_time.or_else(|| {
        opts.since_seconds
            .and_then(|s| i64::try_from(s).ok())
            .map(|s| now - chrono::Duration::seconds(s))
    })
}

/// Applies tail and timestamps to existing text written at `written`.
pub fn format_existing(text: &[u8], opts: &LogOptions, written: DateTime<Utc>) -> Vec<u8> {
    if since(opts, Utc::now()).is_some_and(|s| written < s) {
        return Vec::new();
    }
    let mut lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
    if let Some(n) = opts.tail_lines {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    prefix(&lines, opts.timestamps, written)
}

fn prefix(lines: &[&[u8]], timestamps: bool, at: DateTime<Utc>) -> Vec<u8> {
    let stamp = at.to_rfc3339_opts(SecondsFormat::Nanos, true);
    let mut out = Vec::new();
    for l in lines {
        if timestamps {
            out.extend_from_slice(stamp.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(l);
    }
    out
}

/// Streams the console log at `path` according to `opts`.
pub async fn console_logs(
    path: PathBuf,
    opts: LogOptions,
    stop: CancellationToken,
) -> std::io::Result<LogStream> {
    let mut file = tokio::fs::File::open(&path).await?;
    let meta = file.metadata().await?;
    let written: DateTime<Utc> = meta
        .modified()
        .map(DateTime::from)
        .unwrap_or_else(|_| Utc::now());
    let mut text = Vec::new();
    file.read_to_end(&mut text).await?;
    let mut offset = u64::try_from(text.len()).unwrap_or(u64::MAX);
    let first = format_existing(&text, &opts, written);
    let mut budget = opts.limit_bytes.unwrap_or(u64::MAX);
    let mut take = move |mut chunk: Vec<u8>| -> Option<Bytes> {
        if budget == 0 {
            return None;
        }
        let n = usize::try_from(budget)
            .unwrap_or(usize::MAX)
            .min(chunk.len());
        chunk.truncate(n);
        budget -= n as u64;
        Some(Bytes::from(chunk))
    };
    let first = take(first);
    let follow = opts.follow;
    let stream = async_stream_follow(file, &mut offset, follow, opts.timestamps, stop);
    let head = futures::stream::iter(first.into_iter().map(Ok));
    let tail = stream
        .map(move |r| r.map(&mut take))
        .take_while(|r| futures::future::ready(!matches!(r, Ok(None))));
    let tail = tail.filter_map(|r| {
        futures::future::ready(match r {
            Ok(Some(b)) if b.is_empty() => None,
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    });
    Ok(head.chain(tail).boxed())
}

/// Appends what `file` holds from `off` on to `buf`; returns how many bytes.
async fn append_from(
    file: &mut tokio::fs::File,
    off: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    file.seek(std::io::SeekFrom::Start(off)).await?;
    file.read_to_end(buf).await
}

/// `text` line by line, each prefixed as `timestamps` asks (the last may lack its `\n`).
fn prefixed_lines(text: &[u8], timestamps: bool) -> Vec<u8> {
    let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
    prefix(&lines, timestamps, Utc::now())
}

/// New content of `file` from `offset` while following; empty when not following.
fn async_stream_follow(
    file: tokio::fs::File,
    offset: &mut u64,
    follow: bool,
    timestamps: bool,
    stop: CancellationToken,
) -> futures::stream::BoxStream<'static, std::io::Result<Vec<u8>>> {
    if !follow {
        return futures::stream::empty().boxed();
    }
    let state = (file, *offset, Vec::<u8>::new(), stop, false);
    futures::stream::unfold(
        state,
        move |(mut file, mut off, mut partial, stop, done)| async move {
            if done {
                return None;
            }
            loop {
                // Rotated (cut to empty) since the last read: go on from its start.
                if let Ok(m) = file.metadata().await
                    && m.len() < off
                {
                    off = 0;
                }
                match append_from(&mut file, off, &mut partial).await {
                    Err(e) => return Some((Err(e), (file, off, partial, stop, true))),
                    Ok(0) => {}
                    Ok(n) => {
                        off += n as u64;
                        // Emit complete lines; keep a partial line for the next round.
                        if let Some(end) = partial.iter().rposition(|b| *b == b'\n') {
                            let rest = partial.split_off(end + 1);
                            let out = prefixed_lines(&partial, timestamps);
                            return Some((Ok(out), (file, off, rest, stop, false)));
                        }
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => {
                        // The VM has ended: what it wrote since the last read is the end
                        // of its console (the guest's power-down lines), read before ending.
                        if let Ok(n) = append_from(&mut file, off, &mut partial).await {
                            off += n as u64;
                        }
                        let out = prefixed_lines(&partial, timestamps);
                        return Some((Ok(out), (file, off, Vec::new(), stop, true)));
                    }
                    () = tokio::time::sleep(FOLLOW_POLL) => {}
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_and_timestamps_apply_to_existing_text() {
        let text = b"one\ntwo\nthree\n";
        let at = Utc::now();
        let opts = LogOptions {
            tail_lines: Some(2),
            ..Default::default()
        };
        assert_eq!(format_existing(text, &opts, at), b"two\nthree\n");
        let opts = LogOptions {
            tail_lines: Some(1),
            timestamps: true,
            ..Default::default()
        };
        let out = String::from_utf8(format_existing(text, &opts, at)).unwrap_or_default();
        assert!(out.ends_with("Z three\n"), "{out}");
        let opts = LogOptions {
            since_seconds: Some(10),
            ..Default::default()
        };
        let old = at - chrono::Duration::seconds(60);
        assert!(format_existing(text, &opts, old).is_empty());
        assert_eq!(format_existing(text, &opts, at), text);
    }

    #[tokio::test]
    async fn follow_streams_new_lines_until_stopped_within_the_limit() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir") };
        let path = dir.path().join("console.log");
        std::fs::write(&path, "boot\n").ok();
        let stop = CancellationToken::new();
        let opts = LogOptions {
            follow: true,
            limit_bytes: Some(12),
            ..Default::default()
        };
        let mut s = match console_logs(path.clone(), opts, stop.clone()).await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let first = s.next().await.and_then(Result::ok);
        assert_eq!(first.as_deref(), Some(&b"boot\n"[..]));
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).ok();
        if let Some(f) = f.as_mut() {
            f.write_all(b"login: ok\nmore\n").ok();
        }
        let next = s.next().await.and_then(Result::ok);
        assert_eq!(next.as_deref(), Some(&b"login: "[..]), "cut at 12 bytes");
        stop.cancel();
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn follow_delivers_what_the_vm_wrote_just_before_it_ended() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let path = dir.path().join("console.log");
        std::fs::write(&path, "boot\n").ok();
        let stop = CancellationToken::new();
        let opts = LogOptions {
            follow: true,
            ..Default::default()
        };
        let mut s = match console_logs(path.clone(), opts, stop.clone()).await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            s.next().await.and_then(Result::ok).as_deref(),
            Some(&b"boot\n"[..])
        );
        // The follow has read everything and waits for its next poll.
        let waiting = tokio::time::timeout(Duration::from_millis(30), s.next()).await;
        assert!(waiting.is_err(), "nothing new yet");
        // The guest's last lines land, then the VM ends before that poll.
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        f.write_all(b"System Power Off\nreboot: Power down")
            .unwrap_or_else(|e| panic!("{e}"));
        stop.cancel();
        let mut rest = Vec::new();
        while let Some(chunk) = s.next().await {
            rest.extend_from_slice(&chunk.unwrap_or_else(|e| panic!("{e}")));
        }
        assert_eq!(rest, b"System Power Off\nreboot: Power down");
    }

    #[test]
    fn a_console_over_the_limit_is_copied_aside_and_cut_in_place() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let path = dir.path().join("console.log");
        std::fs::write(&path, "0123456789\n").ok();
        assert!(
            !rotate_if_over(&path, 11).unwrap_or(true),
            "at the limit: kept"
        );
        // An appending writer (as QEMU's file chardev) keeps its descriptor across the cut.
        use std::io::Write as _;
        let mut writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        writer
            .write_all(b"flood\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(rotate_if_over(&path, 11).unwrap_or(false));
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap_or_default(),
            b"0123456789\nflood\n"
        );
        assert_eq!(std::fs::metadata(&path).map(|m| m.len()).ok(), Some(0));
        writer
            .write_all(b"after\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::fs::read(&path).unwrap_or_default(),
            b"after\n",
            "no hole"
        );
        // No file yet: nothing to do.
        assert!(!rotate_if_over(&dir.path().join("none"), 1).unwrap_or(true));
    }

    #[tokio::test]
    async fn follow_goes_on_from_the_start_of_a_rotated_console() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let path = dir.path().join("console.log");
        std::fs::write(&path, "boot line one\nboot line two\n").ok();
        let stop = CancellationToken::new();
        let opts = LogOptions {
            follow: true,
            ..Default::default()
        };
        let mut s = console_logs(path.clone(), opts, stop.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let first = s.next().await.and_then(Result::ok);
        assert_eq!(
            first.as_deref(),
            Some(&b"boot line one\nboot line two\n"[..])
        );
        assert!(rotate_if_over(&path, 1).unwrap_or(false));
        use std::io::Write as _;
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        w.write_all(b"new\n").unwrap_or_else(|e| panic!("{e}"));
        let next = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .ok()
            .flatten()
            .and_then(Result::ok);
        assert_eq!(next.as_deref(), Some(&b"new\n"[..]));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn the_keeper_rotates_a_flooded_console_until_stopped() {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'x'; 100]).ok();
        let stop = CancellationToken::new();
        let keeper = tokio::spawn(keep_console_within(path.clone(), 64, stop.clone()));
        tokio::time::sleep(CONSOLE_CHECK + Duration::from_millis(100)).await;
        // The check runs on a blocking thread: give it a moment of real time.
        for _ in 0..50 {
            if std::fs::metadata(&path).map(|m| m.len()).ok() == Some(0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            tokio::task::yield_now().await;
        }
        assert_eq!(std::fs::metadata(&path).map(|m| m.len()).ok(), Some(0));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), keeper)
            .await
            .unwrap_or_else(|_| panic!("the keeper did not stop"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
