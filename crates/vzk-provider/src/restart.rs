//! The restart rules the VM's supervisor ([`crate::pod`]) and the side-car and init
//! container supervisor ([`crate::sidecars`]) share: the `restartPolicy` decision,
//! CrashLoopBackOff (at once, then 10 s doubling to 5 min, reset after 10 min of
//! running), and the kubelet's texts for them (`Killing`, `BackOff`, the waiting
//! message). Both loops call [`Restarts::after_exit`], so a VM and a side-car that fail
//! the same way are restarted on the same schedule with the same events.

use std::time::Duration;

use vzk_core::{PodEvent, PodKey};

use crate::probes::RestartBackoff;
use crate::status::should_restart;

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
