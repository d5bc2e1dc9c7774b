//! The provider's health: the hypervisor backend, dockerd and the data directory, each
//! checked on every `ping` (the node runtime pings every 10 s) and reported as a node
//! condition of its own, so `kubectl describe node` says which one failed. `ping` fails
//! while any check fails, which turns the node's Ready condition False with the reason.
//!
//! Checks are cheap: the backend's own `health` (its binary, its DHCP server), one Docker
//! `/_ping`, and a small file written, synced and removed in the data directory.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::NodeCondition;

/// Free space in the data directory below which new pods cannot be started: a pod needs
/// room for its disk clone's writes, its volumes and its console log.
pub const MIN_FREE_BYTES: u64 = 256 << 20;

/// How long one check may take (the node runtime gives `ping` 5 s in all; checks run at
/// once).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// One health check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The node condition type (`VMBackendReady`, `DockerReady`, `DataDirReady`).
    pub type_: &'static str,
    /// What is wrong, or `None` when healthy.
    pub problem: Option<String>,
}

impl Check {
    /// The verdict of `result` for condition `type_`.
    pub fn new(type_: &'static str, result: Result<(), String>) -> Self {
        Self {
            type_,
            problem: result.err(),
        }
    }

    /// The node condition (status `True` when healthy).
    pub fn condition(&self) -> NodeCondition {
        let subject = self.type_.trim_end_matches("Ready");
        let (status, reason, message) = match &self.problem {
            None => (
                "True",
                format!("{subject}Healthy"),
                format!("{subject} is healthy"),
            ),
            Some(p) => ("False", format!("{subject}Unhealthy"), p.clone()),
        };
        NodeCondition {
            type_: self.type_.to_owned(),
            status: status.to_owned(),
            reason: Some(reason),
            message: Some(message),
            last_heartbeat_time: None,
            last_transition_time: None,
        }
    }
}

/// `Err` naming every failed check, e.g. `DockerReady: dockerd does not answer`.
pub fn summary(checks: &[Check]) -> Result<(), String> {
    let failed: Vec<String> = checks
        .iter()
        .filter_map(|c| c.problem.as_ref().map(|p| format!("{}: {p}", c.type_)))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Runs `check` with [`CHECK_TIMEOUT`]; a check that does not answer in time fails.
pub async fn bounded<F>(what: &str, check: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("{what} did not answer within {CHECK_TIMEOUT:?}")))
}

/// The data directory is writable (a file is written, synced and removed) and has at
/// least `min_free` bytes available.
pub fn data_dir(path: &Path, min_free: u64) -> Result<(), String> {
    use std::io::Write as _;
    let probe = path.join(".health-check");
    let written = std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"ok").and_then(|()| f.sync_all()));
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = written {
        return Err(format!(
            "the data directory {} is not writable: {e}",
            path.display()
        ));
    }
    match vzk_node::host::disk(path) {
        Some(d) if d.available < min_free => Err(format!(
            "the data directory {} has {} MiB free, less than the {} MiB a pod needs",
            path.display(),
            d.available >> 20,
            min_free >> 20
        )),
        Some(_) => Ok(()),
        None => Err(format!(
            "the free space of the data directory {} cannot be read",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_say_which_check_failed() {
        let checks = [
            Check::new("VMBackendReady", Ok(())),
            Check::new("DockerReady", Err("dockerd does not answer".into())),
        ];
        let ok = checks[0].condition();
        assert_eq!(
            (ok.status.as_str(), ok.reason.as_deref()),
            ("True", Some("VMBackendHealthy"))
        );
        let bad = checks[1].condition();
        assert_eq!(
            (bad.status.as_str(), bad.reason.as_deref()),
            ("False", Some("DockerUnhealthy"))
        );
        assert_eq!(bad.message.as_deref(), Some("dockerd does not answer"));
        assert_eq!(
            summary(&checks),
            Err("DockerReady: dockerd does not answer".into())
        );
        assert_eq!(summary(&checks[..1]), Ok(()));
    }

    #[test]
    fn data_dir_must_be_writable_and_have_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(data_dir(dir.path(), 1), Ok(()));
        assert!(
            !dir.path().join(".health-check").exists(),
            "the probe file is removed"
        );
        let full = data_dir(dir.path(), u64::MAX).expect_err("no disk has that much room");
        assert!(full.contains("MiB free"), "{full}");
        let missing = data_dir(&dir.path().join("gone"), 1).expect_err("no such dir");
        assert!(missing.contains("not writable"), "{missing}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_hangs_fails_after_the_timeout() {
        let r = bounded("dockerd", std::future::pending()).await;
        assert_eq!(
            r,
            Err(format!("dockerd did not answer within {CHECK_TIMEOUT:?}"))
        );
    }
}
