//! Crash points for the fault-matrix tests (`crates/vz-kubelet/tests/kill_points.rs`): with
//! `VZK_CRASH_POINT=<name>` in its environment, the agent sends itself SIGKILL when it
//! reaches the point of that name, exactly as an OOM kill or a power cut would end it
//! there: no clean-up, no flush. Without the variable (always, in production) a point is
//! one comparison against a value read once.
//!
//! | point | where |
//! |---|---|
//! | `create:recorded` | the pod's record written, nothing else done |
//! | `create:cloned` | the VM's disk cloned, no VM yet |
//! | `create:vm-created` | the VM created (its state dir written), not started |
//! | `create:vm-started` | the VM's process started, before address and SSH |
//! | `delete:vm-stopped` | on delete: the VM stopped, not removed |
//! | `delete:vm-removed` | on delete: the VM removed, the pod's dir and record not |

use std::sync::OnceLock;

/// The environment variable naming the point to crash at.
pub const ENV: &str = "VZK_CRASH_POINT";

/// Ends the process with SIGKILL if `name` is the configured crash point.
pub(crate) fn point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT.get_or_init(|| std::env::var(ENV).ok()).as_deref() == Some(name) {
        tracing::error!(point = name, "{ENV}: killing the agent here");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}
