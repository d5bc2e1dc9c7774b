//! The provider's metrics, kept by `prometheus-client` and registered into the
//! agent's one registry (the kubelet API serves it on `/metrics`):
//!
//! * `vzk_image_pulls_total{format,result}`: image pulls by format and result
//!   (`pulled`, `cached`, `failed`); `vzk_image_pull_seconds{format}` (histogram) and
//!   `vzk_image_pulled_bytes_total{format}` (the bytes of image files a pull wrote) of
//!   the pulls that fetched.
//! * `vzk_pod_start_phase_seconds{phase}` (histogram): one observation per phase of
//!   each pod start: `pull`, `clone` (the disk), `boot` (create + start), `ip` (start →
//!   address), `ssh` (address → SSH answers), `ready` (the whole way, pod admitted →
//!   container 0 Ready). A re-adopted VM or a restart adds none.
//! * `vzk_vm_boots_total`, `vzk_vm_restarts_total`.
//! * `vzk_vm_slots` and `vzk_vm_slots_in_use`, `vzk_pods{phase}`: read at scrape time.
//!
//! The same clock traces each pod start ([`StartClock`]): a root span `pod_start` (its
//! attributes the pod's namespace, name, UID and image) with one child span per phase,
//! `pull`, `clone`, `boot`, `ip` and `ssh`, each from the end of the one before, as the
//! histogram measures them. They are exported only when the binary installs an exporter
//! (`--otlp-endpoint`).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PullLabels {
    format: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FormatLabels {
    format: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// A pod start's phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPhase {
    /// The image (cached or fetched).
    Pull,
    /// The per-pod disk clone.
    Clone,
    /// Create and start.
    Boot,
    /// Start → the guest's address.
    Ip,
    /// Address → SSH answers.
    Ssh,
}

impl StartPhase {
    fn as_str(self) -> &'static str {
        match self {
            StartPhase::Pull => "pull",
            StartPhase::Clone => "clone",
            StartPhase::Boot => "boot",
            StartPhase::Ip => "ip",
            StartPhase::Ssh => "ssh",
        }
    }

    /// The span of this phase, a child of `start` (the pod start's root span).
    fn span(self, start: &tracing::Span) -> tracing::Span {
        match self {
            StartPhase::Pull => tracing::info_span!(parent: start, "pull"),
            StartPhase::Clone => tracing::info_span!(parent: start, "clone"),
            StartPhase::Boot => tracing::info_span!(parent: start, "boot"),
            StartPhase::Ip => tracing::info_span!(parent: start, "ip"),
            StartPhase::Ssh => tracing::info_span!(parent: start, "ssh"),
        }
    }

    /// The phase after this one.
    fn next(self) -> Option<StartPhase> {
        match self {
            StartPhase::Pull => Some(StartPhase::Clone),
            StartPhase::Clone => Some(StartPhase::Boot),
            StartPhase::Boot => Some(StartPhase::Ip),
            StartPhase::Ip => Some(StartPhase::Ssh),
            StartPhase::Ssh => None,
        }
    }
}

fn seconds_histogram() -> Histogram {
    // 50 ms .. ~7 h: a cached pull to a 100 GB fetch.
    Histogram::new(exponential_buckets(0.05, 2.0, 20))
}

/// What the provider counts.
#[derive(Clone)]
pub struct ProviderMetrics {
    pulls: Family<PullLabels, Counter>,
    pull_seconds: Family<FormatLabels, Histogram>,
    pulled_bytes: Family<FormatLabels, Counter>,
    start_phase: Family<PhaseLabels, Histogram>,
    boots: Counter,
    restarts: Counter,
}

impl std::fmt::Debug for ProviderMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderMetrics").finish_non_exhaustive()
    }
}

impl Default for ProviderMetrics {
    fn default() -> Self {
        Self {
            pulls: Family::default(),
            pull_seconds: Family::new_with_constructor(seconds_histogram),
            pulled_bytes: Family::default(),
            start_phase: Family::new_with_constructor(seconds_histogram),
            boots: Counter::default(),
            restarts: Counter::default(),
        }
    }
}

impl ProviderMetrics {
    /// Registers every series into `registry` (clones share the values).
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "vzk_image_pulls",
            "VM image pulls by format and result (pulled, cached, failed)",
            self.pulls.clone(),
        );
        registry.register(
            "vzk_image_pull_seconds",
            "Duration of VM image pulls that fetched, by format",
            self.pull_seconds.clone(),
        );
        registry.register(
            "vzk_image_pulled_bytes",
            "Bytes of image files written by VM image pulls, by format",
            self.pulled_bytes.clone(),
        );
        registry.register(
            "vzk_pod_start_phase_seconds",
            "Duration of each phase of a VM pod's start (pull, clone, boot, ip, ssh; ready is the whole way)",
            self.start_phase.clone(),
        );
        registry.register("vzk_vm_boots", "VM boots", self.boots.clone());
        registry.register(
            "vzk_vm_restarts",
            "VM restarts (restartPolicy, probes)",
            self.restarts.clone(),
        );
    }

    /// One pull: `fetched` is false when the cache served it.
    pub(crate) fn pull(&self, format: &'static str, fetched: bool, took: Duration, bytes: u64) {
        let result = if fetched { "pulled" } else { "cached" };
        self.pulls
            .get_or_create(&PullLabels { format, result })
            .inc();
        if fetched {
            self.pull_seconds
                .get_or_create(&FormatLabels { format })
                .observe(took.as_secs_f64());
            self.pulled_bytes
                .get_or_create(&FormatLabels { format })
                .inc_by(bytes);
        }
    }

    /// One failed pull (its format is not known yet).
    pub(crate) fn pull_failed(&self) {
        self.pulls
            .get_or_create(&PullLabels {
                format: "unknown",
                result: "failed",
            })
            .inc();
    }

    /// One VM boot; `restart` when it is a restart of the pod's VM.
    pub(crate) fn boot(&self, restart: bool) {
        self.boots.inc();
        if restart {
            self.restarts.inc();
        }
    }

    fn phase(&self, phase: &'static str, took: Duration) {
        self.start_phase
            .get_or_create(&PhaseLabels { phase })
            .observe(took.as_secs_f64());
    }
}

/// The clock of one pod start: each phase is observed once, from the end of the one
/// before; `ready` from the start. Restarts and re-adoptions have no clock.
///
/// It also holds the start's trace: the root span given to [`StartClock::start`] and the
/// span of the phase under way (`pull` first). Each phase's span closes when the phase is
/// observed and the next one opens; the root closes at `ready` (or `stop`, marked as an
/// error).
#[derive(Debug)]
pub(crate) struct StartClock {
    metrics: ProviderMetrics,
    /// `None` once the start is over (ready or stopped).
    run: Mutex<Option<Run>>,
}

/// A start under way: its times and its spans.
#[derive(Debug)]
struct Run {
    started: Instant,
    /// The end of the last phase observed.
    last: Instant,
    /// The span of the phase under way (declared first: it closes before the root).
    current: Option<tracing::Span>,
    root: tracing::Span,
}

/// The root span of one pod start: a trace of its own (no parent), named `pod_start`.
pub(crate) fn pod_start_span(key: &vzk_core::PodKey, image: &str) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "pod_start",
        k8s.namespace.name = %key.namespace,
        k8s.pod.name = %key.name,
        k8s.pod.uid = %key.uid,
        container.image.name = %image,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    )
}

impl StartClock {
    /// A clock started now; `root` is the start's span ([`pod_start_span`]).
    pub(crate) fn start(metrics: ProviderMetrics, root: tracing::Span) -> Self {
        let now = Instant::now();
        let current = Some(StartPhase::Pull.span(&root));
        Self {
            metrics,
            run: Mutex::new(Some(Run {
                started: now,
                last: now,
                root,
                current,
            })),
        }
    }

    fn run(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `phase` ended now: observed, its span closed and the next one opened.
    pub(crate) fn phase(&self, phase: StartPhase) {
        if let Some(run) = self.run().as_mut() {
            let now = Instant::now();
            self.metrics.phase(phase.as_str(), now - run.last);
            run.last = now;
            drop(run.current.take());
            run.current = phase.next().map(|next| next.span(&run.root));
        }
    }

    /// The pod became ready: observes the whole way and stops the clock.
    pub(crate) fn ready(&self) {
        if let Some(run) = self.run().take() {
            self.metrics.phase("ready", run.started.elapsed());
        }
    }

    /// The first start failed or was cut short: later phases are not this start's, and
    /// the trace's root is marked as an error.
    pub(crate) fn stop(&self) {
        if let Some(run) = self.run().take() {
            drop(run.current);
            run.root.record("otel.status_code", "ERROR");
            run.root.record(
                "otel.status_description",
                "the pod start failed or was cut short",
            );
        }
    }
}

/// Stops a start clock when dropped: a start that ends before Ready (an early return of
/// the create path, a ready timeout, a failed postStart hook, the task cancelled) closes
/// its trace as an error. After [`StartClock::ready`] it does nothing.
#[derive(Debug)]
pub(crate) struct StopClock(pub(crate) Option<Arc<StartClock>>);

impl Drop for StopClock {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.stop();
        }
    }
}

/// What the provider's state says at scrape time (slots, pods by phase).
pub(crate) struct StateCollector {
    pub(crate) inner: Weak<crate::provider::Inner>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

/// The pod phases reported, each even at 0.
const PHASES: [&str; 5] = ["Pending", "Running", "Succeeded", "Failed", "Unknown"];

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let (capacity, in_use) = (inner.slots.capacity(), inner.slots.in_use());
        let entries: Vec<Arc<crate::pod::PodEntry>> =
            crate::pod::lock(&inner.pods).values().cloned().collect();
        let mut by_phase = [0i64; PHASES.len()];
        for e in entries {
            let phase = e.status().phase.unwrap_or_default();
            let i = PHASES.iter().position(|p| *p == phase).unwrap_or(4);
            by_phase[i] += 1;
        }
        let g = ConstGauge::new(i64::from(capacity));
        g.encode(encoder.encode_descriptor(
            "vzk_vm_slots",
            "VM slots of this node (--max-vms, less a leaked hypervisor limit)",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(i64::from(in_use));
        g.encode(encoder.encode_descriptor(
            "vzk_vm_slots_in_use",
            "VM slots held by pods",
            None,
            g.metric_type(),
        )?)?;
        let mut family = encoder.encode_descriptor(
            "vzk_pods",
            "Pods of this node by phase",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (phase, n) in PHASES.iter().zip(by_phase) {
            let labels = PhaseLabels { phase };
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(m: &ProviderMetrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        out
    }

    #[test]
    fn pulls_count_by_result_and_observe_only_fetches() {
        let m = ProviderMetrics::default();
        m.pull("vzk", true, Duration::from_millis(1500), 1000);
        m.pull("vzk", false, Duration::from_millis(1), 1000);
        m.pull_failed();
        let t = render(&m);
        assert!(
            t.contains("vzk_image_pulls_total{format=\"vzk\",result=\"pulled\"} 1"),
            "{t}"
        );
        assert!(t.contains("vzk_image_pulls_total{format=\"vzk\",result=\"cached\"} 1"));
        assert!(t.contains("vzk_image_pulls_total{format=\"unknown\",result=\"failed\"} 1"));
        assert!(
            t.contains("vzk_image_pull_seconds_count{format=\"vzk\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("vzk_image_pull_seconds_sum{format=\"vzk\"} 1.5"),
            "{t}"
        );
        assert!(t.contains("vzk_image_pulled_bytes_total{format=\"vzk\"} 1000"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_clock_observes_each_phase_once() {
        let m = ProviderMetrics::default();
        let clock = StartClock::start(m.clone(), tracing::Span::none());
        tokio::time::advance(Duration::from_secs(2)).await;
        clock.phase(StartPhase::Pull);
        tokio::time::advance(Duration::from_secs(1)).await;
        clock.phase(StartPhase::Clone);
        tokio::time::advance(Duration::from_secs(4)).await;
        clock.phase(StartPhase::Boot);
        clock.ready();
        // After ready, nothing more is observed (a restart's phases are not a start's).
        clock.phase(StartPhase::Ip);
        clock.ready();
        let t = render(&m);
        assert!(
            t.contains("vzk_pod_start_phase_seconds_sum{phase=\"pull\"} 2.0"),
            "{t}"
        );
        assert!(t.contains("vzk_pod_start_phase_seconds_sum{phase=\"clone\"} 1.0"));
        assert!(t.contains("vzk_pod_start_phase_seconds_sum{phase=\"boot\"} 4.0"));
        assert!(t.contains("vzk_pod_start_phase_seconds_sum{phase=\"ready\"} 7.0"));
        assert!(t.contains("vzk_pod_start_phase_seconds_count{phase=\"ready\"} 1"));
        assert!(!t.contains("phase=\"ip\""), "{t}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_that_ends_before_ready_is_stopped_and_one_after_is_kept() {
        let m = ProviderMetrics::default();
        // Ended before Ready (a ready timeout): no ready observation, later calls ignored.
        let clock = Arc::new(StartClock::start(m.clone(), tracing::Span::none()));
        clock.phase(StartPhase::Pull);
        drop(StopClock(Some(clock.clone())));
        tokio::time::advance(Duration::from_secs(3)).await;
        clock.phase(StartPhase::Clone);
        clock.ready();
        let t = render(&m);
        assert!(!t.contains("phase=\"ready\""), "{t}");
        assert!(!t.contains("phase=\"clone\""), "{t}");
        // Ready first: the guard dropped afterwards changes nothing.
        let clock = Arc::new(StartClock::start(m.clone(), tracing::Span::none()));
        let guard = StopClock(Some(clock.clone()));
        tokio::time::advance(Duration::from_secs(5)).await;
        clock.ready();
        drop(guard);
        let t = render(&m);
        assert!(
            t.contains("vzk_pod_start_phase_seconds_count{phase=\"ready\"} 1"),
            "{t}"
        );
    }
}
