//! Progress reporting: a trait the pull and push engines call, with a silent
//! implementation, one that logs through `tracing`, one that writes JSON lines, and
//! (feature `cli`) indicatif bars.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Receives progress of one operation (bytes transferred or processed).
pub trait Progress: Send + Sync {
    /// The operation starts; `total` bytes are expected.
    fn begin(&self, _label: &str, _total: u64) {}
    /// `n` more bytes done.
    fn advance(&self, _n: u64) {}
    /// The operation ended (successfully or not).
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Logs at `info` every 10% (for non-terminals).
#[derive(Debug, Default)]
pub struct LogProgress {
    total: AtomicU64,
    done: AtomicU64,
    state: Mutex<Option<(String, Instant, u64)>>,
}

impl Progress for LogProgress {
    fn begin(&self, label: &str, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut s) = self.state.lock() {
            *s = Some((label.to_string(), Instant::now(), 0));
        }
        tracing::info!(label, total_bytes = total, "started");
    }

    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let total = self.total.load(Ordering::Relaxed).max(1);
        let decile = done.saturating_mul(10) / total;
        if let Ok(mut s) = self.state.lock()
            && let Some((label, start, last)) = s.as_mut()
            && decile > *last
        {
            *last = decile;
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(label = %label, percent = decile * 10, mb_per_s = format!("{:.1}", done as f64 / secs / 1e6), "progress");
        }
    }

    fn finish(&self) {
        if let Ok(s) = self.state.lock()
            && let Some((label, start, _)) = s.as_ref()
        {
            let done = self.done.load(Ordering::Relaxed);
            tracing::info!(label = %label, bytes = done, seconds = format!("{:.2}", start.elapsed().as_secs_f64()), "done");
        }
    }
}

/// One JSON object per line on stderr (for programs driving the CLI): `begin` with the
/// total, `progress` at each whole percent, `done` with the bytes and seconds.
#[derive(Debug, Default)]
pub struct JsonLinesProgress {
    total: AtomicU64,
    done: AtomicU64,
    state: Mutex<Option<(String, Instant, u64)>>,
}

impl JsonLinesProgress {
    fn emit(v: serde_json::Value) {
        use std::io::Write as _;
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{v}");
    }
}

impl Progress for JsonLinesProgress {
    fn begin(&self, label: &str, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut s) = self.state.lock() {
            *s = Some((label.to_string(), Instant::now(), 0));
        }
        Self::emit(serde_json::json!({"event": "begin", "label": label, "total": total}));
    }

    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let total = self.total.load(Ordering::Relaxed).max(1);
        let percent = done.saturating_mul(100) / total;
        if let Ok(mut s) = self.state.lock()
            && let Some((label, start, last)) = s.as_mut()
            && percent > *last
        {
            *last = percent;
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            Self::emit(serde_json::json!({
                "event": "progress", "label": label, "done": done, "total": total,
                "percent": percent.min(100), "bytesPerSecond": (done as f64 / secs) as u64,
            }));
        }
    }

    fn finish(&self) {
        if let Ok(s) = self.state.lock()
            && let Some((label, start, _)) = s.as_ref()
        {
            Self::emit(serde_json::json!({
                "event": "done", "label": label, "done": self.done.load(Ordering::Relaxed),
                "seconds": start.elapsed().as_secs_f64(),
            }));
        }
    }
}

/// An indicatif progress bar on stderr.
#[cfg(feature = "cli")]
#[derive(Debug)]
pub struct BarProgress {
    bar: indicatif::ProgressBar,
}

#[cfg(feature = "cli")]
impl BarProgress {
    /// A hidden bar until `begin`.
    pub fn new() -> BarProgress {
        BarProgress {
            bar: indicatif::ProgressBar::hidden(),
        }
    }
}

#[cfg(feature = "cli")]
impl Default for BarProgress {
    fn default() -> Self {
        BarProgress::new()
    }
}

#[cfg(feature = "cli")]
impl Progress for BarProgress {
    fn begin(&self, label: &str, total: u64) {
        self.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.bar.set_length(total);
        self.bar.set_position(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:20} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            self.bar.set_style(style.progress_chars("=> "));
        }
        self.bar.set_message(label.to_string());
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    fn finish(&self) {
        self.bar.finish();
    }
}
