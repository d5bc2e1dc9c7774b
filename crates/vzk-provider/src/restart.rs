//! One supervision loop for every container of a pod: [`supervise`] runs a
//! [`Supervised`] container (the VM, [`crate::pod`]; a side-car or init container,
//! [`crate::sidecars`]) again and again under the rules they share: the `restartPolicy`
//! decision, CrashLoopBackOff (at once, then 10 s doubling to 5 min, reset after 10 min
//! of running), and the kubelet's texts for them (`Killing`, `BackOff`, the waiting
//! message). A VM and a side-car that fail the same way are restarted on the same
//! schedule with the same events; what differs (how to start, watch and kill) is the
//! implementation's.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ContainerStateTerminated;
use vzk_core::{PodEvent, PodKey};

use crate::probes::RestartBackoff;
use crate::status::should_restart;

/// How one run of a container ended.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    /// Its `lastState.terminated` (exit code, reason, message, times).
    pub(crate) terminated: ContainerStateTerminated,
    /// How long it ran (a run of 10 min resets the back-off).
    pub(crate) ran_for: Duration,
}

/// A container under [`supervise`].
#[async_trait]
pub(crate) trait Supervised: Send {
    /// Its name (for events).
    fn name(&self) -> &str;
    /// Its pod.
    fn pod(&self) -> &PodKey;
    /// Records an event about it.
    fn event(&self, ev: PodEvent);
    /// Starts its next run (`restart`: not the first); `false` when it can never be
    /// started (its status says why): supervision ends.
    async fn start(&mut self, restart: bool, restarts: &mut Restarts) -> bool;
    /// Watches the run until the container ends or has to be killed (a failed liveness
    /// or startup probe or postStart hook; the kill's `Killing` event says whether it
    /// will be restarted, from `restarts`); returns how it ended.
    async fn run(&mut self, restarts: &Restarts) -> Ended;
    /// It ended for good (its `restartPolicy`).
    fn finished(&mut self, ended: Ended);
    /// It will be run again after `delay` (zero: at once).
    fn restarting(&mut self, ended: &Ended, delay: Duration);
}

/// Runs `c` until it ends for good under `restarts`' policy (or cannot be started).
pub(crate) async fn supervise(c: &mut impl Supervised, mut restarts: Restarts) {
    let mut restart = false;
    loop {
        if !c.start(restart, &mut restarts).await {
            return;
        }
        let ended = c.run(&restarts).await;
        match restarts.after_exit(ended.terminated.exit_code, ended.ran_for) {
            Next::Stop => {
                c.finished(ended);
                return;
            }
            Next::Restart { delay } => {
                if !delay.is_zero() {
                    c.event(back_off_event(c.name(), c.pod()));
                }
                c.restarting(&ended, delay);
                tokio::time::sleep(delay).await;
                restart = true;
            }
        }
    }
}

/// What follows a container's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Not run again (`restartPolicy`): the container is terminated for good.
    Stop,
    /// Run again after `delay` (zero: at once).
    Restart {
        /// The back-off.
        delay: Duration,
    },
}

/// One container's restart state.
#[derive(Debug)]
pub(crate) struct Restarts {
    policy: Option<String>,
    backoff: RestartBackoff,
}

impl Restarts {
    /// Under `policy` (the pod's `restartPolicy`, or an init container's own).
    pub(crate) fn new(policy: Option<String>) -> Self {
        Self {
            policy,
            backoff: RestartBackoff::default(),
        }
    }

    /// Whether an exit with `exit_code` would be followed by a restart.
    pub(crate) fn restarts(&self, exit_code: i32) -> bool {
        should_restart(self.policy.as_deref(), exit_code)
    }

    /// The container exited with `exit_code` after running `ran_for`: advances the
    /// back-off when it is run again.
    pub(crate) fn after_exit(&mut self, exit_code: i32, ran_for: Duration) -> Next {
        if !self.restarts(exit_code) {
            return Next::Stop;
        }
        Next::Restart {
            delay: self.backoff.next_delay(ran_for),
        }
    }

    /// The next delay when the restart itself failed (the back-off advances).
    pub(crate) fn retry_delay(&mut self) -> Duration {
        self.backoff.next_delay(Duration::ZERO)
    }
}

/// The `Killing` event's message for a container killed because `why`.
pub(crate) fn killing_message(why: &str, restart: bool) -> String {
    if restart {
        format!("{why}, will be restarted")
    } else {
        why.to_owned()
    }
}

/// The kubelet's `BackOff` warning for container `name` of `pod`.
pub(crate) fn back_off_event(name: &str, pod: &PodKey) -> PodEvent {
    PodEvent::warning(
        "BackOff",
        format!(
            "Back-off restarting failed container {name} in pod {}_{}({})",
            pod.name, pod.namespace, pod.uid
        ),
    )
}

/// The `CrashLoopBackOff` waiting message.
pub(crate) fn crash_loop_message(delay: Duration, name: &str, pod: &PodKey) -> String {
    format!(
        "back-off {}s restarting failed container={name} pod={}_{}({})",
        delay.as_secs(),
        pod.name,
        pod.namespace,
        pod.uid
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_and_back_off() {
        let mut r = Restarts::new(None);
        let d = |n: Next| match n {
            Next::Restart { delay } => delay.as_secs(),
            Next::Stop => u64::MAX,
        };
        let short = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8).map(|_| d(r.after_exit(1, short))).collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(d(r.after_exit(0, Duration::from_secs(601))), 0, "reset");
        let mut on_failure = Restarts::new(Some("OnFailure".into()));
        assert_eq!(on_failure.after_exit(0, short), Next::Stop);
        assert_eq!(d(on_failure.after_exit(137, short)), 0);
        let mut never = Restarts::new(Some("Never".into()));
        assert_eq!(never.after_exit(1, short), Next::Stop);
        assert!(!never.restarts(137));
        assert_eq!(killing_message("x", true), "x, will be restarted");
        assert_eq!(killing_message("x", false), "x");
        let key = PodKey {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        };
        assert_eq!(
            back_off_event("vm", &key).message,
            "Back-off restarting failed container vm in pod p_ns(u)"
        );
        assert_eq!(
            crash_loop_message(Duration::from_secs(20), "vm", &key),
            "back-off 20s restarting failed container=vm pod=p_ns(u)"
        );
    }
}
