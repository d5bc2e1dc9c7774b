//! Running one container's probes: the thresholds state machine, the probe loop and the
//! restart back-off.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// Passing.
    Success,
    /// Failing.
    Failure,
}

/// The threshold state machine of one probe (pure): the reported result changes only
/// after `success_threshold` consecutive successes or `failure_threshold` consecutive
/// failures. Starts from the kubelet's initial results: readiness `Failure`, liveness
/// `Success`, startup unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds {
    result: Option<ProbeResult>,
    last: Option<ProbeResult>,
    run: u32,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Thresholds {
    /// The state machine of `spec`, with the kubelet's initial result for its kind.
    pub fn for_spec(spec: &ProbeSpec) -> Self {
        let initial = match spec.kind {
            ProbeKind::Readiness => Some(ProbeResult::Failure),
            ProbeKind::Liveness => Some(ProbeResult::Success),
            ProbeKind::Startup => None,
        };
        Self::new(initial, spec.success_threshold, spec.failure_threshold)
    }

    /// A state machine starting at `initial` (`None`: unknown).
    pub fn new(
        initial: Option<ProbeResult>,
        success_threshold: u32,
        failure_threshold: u32,
    ) -> Self {
        Self {
            result: initial,
            last: None,
            run: 0,
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
        }
    }

    /// The reported result (`None` while unknown).
    pub fn result(&self) -> Option<ProbeResult> {
        self.result
    }

    /// Records one probe outcome; returns the reported result when it changed.
    pub fn record(&mut self, outcome: ProbeResult) -> Option<ProbeResult> {
        if self.last == Some(outcome) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(outcome);
            self.run = 1;
        }
        let needed = match outcome {
            ProbeResult::Success => self.success_threshold,
            ProbeResult::Failure => self.failure_threshold,
        };
        if self.run < needed || self.result == Some(outcome) {
            return None;
        }
        self.result = Some(outcome);
        Some(outcome)
    }
}

/// The restart back-off of a container (pure): the kubelet's policy. The first restart
/// is immediate; each further one waits 10 s, doubling up to 5 min; a container that
/// ran for 10 min or more starts the sequence again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartBackoff {
    current: Option<Duration>,
    initial: Duration,
    max: Duration,
    reset_after: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self::new(
            Duration::from_secs(10),
            Duration::from_secs(300),
            Duration::from_secs(600),
        )
    }
}

impl RestartBackoff {
    /// A back-off starting at `initial`, capped at `max`, reset after `reset_after` of
    /// running.
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Self {
            current: None,
            initial,
            max,
            reset_after,
        }
    }

    /// How long to wait before restarting a container that ran for `ran_for`, and
    /// advances the back-off.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.current = None;
        }
        match self.current {
            None => {
                self.current = Some(self.initial);
                Duration::ZERO
            }
            Some(d) => {
                self.current = Some((d * 2).min(self.max));
                d
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeUpdate {
    /// The startup probe succeeded (or there is none): the container is `started`.
    Started,
    /// The readiness result changed (without a readiness probe: `true` once started).
    Ready(bool),
    /// A probe failed; `message` is the kubelet's event text
    /// (`Readiness probe failed: …`), for an `Unhealthy` warning event.
    Unhealthy {
        /// Which probe.
        kind: ProbeKind,
        /// The event message.
        message: String,
    },
}

/// Liveness or startup failed: the container must be killed (and restarted per the
/// pod's `restartPolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartRequest {
    /// The probe that failed.
    pub kind: ProbeKind,
    /// Its last failure message.
    pub message: String,
    /// The probe-level `terminationGracePeriodSeconds`, if set.
    pub grace: Option<Duration>,
}

/// Unhealthy events: the same message of the same probe at most once per this period
/// (our events are not aggregated by a recorder as client-go's are).
const UNHEALTHY_EVENT_EVERY: Duration = Duration::from_secs(30);

struct Reporter<'a, F> {
    on: &'a F,
    last: std::sync::Mutex<Option<(String, Instant)>>,
}

impl<F: Fn(ProbeUpdate) + Send + Sync> Reporter<'_, F> {
    fn failed(&self, kind: ProbeKind, msg: &str) {
        let message = format!("{kind} probe failed: {msg}");
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let repeat = last
            .as_ref()
            .is_some_and(|(m, t)| *m == message && now.duration_since(*t) < UNHEALTHY_EVENT_EVERY);
        if !repeat {
            *last = Some((message.clone(), now));
            drop(last);
            (self.on)(ProbeUpdate::Unhealthy { kind, message });
        }
    }
}

/// A ticker of `spec.period`, first tick at `started_at + initial_delay`.
fn ticker(spec: &ProbeSpec, started_at: Instant) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(started_at + spec.initial_delay, spec.period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Probes one running container until liveness or startup fails (then returns what to
/// do); `started_at` is when the container started. Without a startup probe the
/// container is started at once; without a readiness probe it is ready once started.
pub async fn run<F>(
    target: Arc<dyn ProbeTarget>,
    probes: ContainerProbes,
    started_at: Instant,
    on: F,
) -> RestartRequest
where
    F: Fn(ProbeUpdate) + Send + Sync,
{
    let (started_tx, started_rx) = watch::channel(false);
    let startup_rep = Reporter {
        on: &on,
        last: std::sync::Mutex::new(None),
    };
    let readiness_rep = Reporter {
        on: &on,
        last: std::sync::Mutex::new(None),
    };
    let liveness_rep = Reporter {
        on: &on,
        last: std::sync::Mutex::new(None),
    };
    let startup = async {
        if let Some(spec) = &probes.startup {
            let mut th = Thresholds::for_spec(spec);
            let mut tick = ticker(spec, started_at);
            loop {
                tick.tick().await;
                let r = probe_once(target.as_ref(), spec).await;
                debug!(probe = %spec.kind, ok = r.is_ok(), "probe");
                let outcome = match &r {
                    Ok(()) => ProbeResult::Success,
                    Err(m) => {
                        startup_rep.failed(spec.kind, m);
                        ProbeResult::Failure
                    }
                };
                match th.record(outcome) {
                    Some(ProbeResult::Success) => break,
                    Some(ProbeResult::Failure) => {
                        return RestartRequest {
                            kind: spec.kind,
                            message: r.err().unwrap_or_default(),
                            grace: spec.termination_grace,
                        };
                    }
                    None => {}
                }
            }
        }
        let _ = started_tx.send(true);
        on(ProbeUpdate::Started);
        std::future::pending().await
    };
    let wait_started = || {
        let mut rx = started_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let readiness = async {
        wait_started().await;
        let Some(spec) = &probes.readiness else {
            on(ProbeUpdate::Ready(true));
            return std::future::pending().await;
        };
        let mut th = Thresholds::for_spec(spec);
        let mut tick = ticker(spec, started_at);
        loop {
            tick.tick().await;
            let r = probe_once(target.as_ref(), spec).await;
            debug!(probe = %spec.kind, ok = r.is_ok(), "probe");
            let outcome = match &r {
                Ok(()) => ProbeResult::Success,
                Err(m) => {
                    readiness_rep.failed(spec.kind, m);
                    ProbeResult::Failure
                }
            };
            if let Some(res) = th.record(outcome) {
                on(ProbeUpdate::Ready(res == ProbeResult::Success));
            }
        }
    };
    let liveness = async {
        wait_started().await;
        let Some(spec) = &probes.liveness else {
            return std::future::pending().await;
        };
        let mut th = Thresholds::for_spec(spec);
        let mut tick = ticker(spec, started_at);
        loop {
            tick.tick().await;
            let r = probe_once(target.as_ref(), spec).await;
            debug!(probe = %spec.kind, ok = r.is_ok(), "probe");
            let outcome = match &r {
                Ok(()) => ProbeResult::Success,
                Err(m) => {
                    liveness_rep.failed(spec.kind, m);
                    ProbeResult::Failure
                }
            };
            if th.record(outcome) == Some(ProbeResult::Failure) {
                return RestartRequest {
                    kind: spec.kind,
                    message: r.err().unwrap_or_default(),
                    grace: spec.termination_grace,
                };
            }
        }
    };
    tokio::select! {
        r = startup => r,
        r = liveness => r,
        r = readiness => r,
    }
}
