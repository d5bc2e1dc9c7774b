//! The real kube-scheduler beside a private control plane ([`ControlPlane::start_scheduler`],
//! opt-in), so that pods without `spec.nodeName` are placed as in a real cluster
//! (extended resources such as `vz-kubelet.io/vm`, taints and tolerations, node selectors).
//!
//! * **Binary**: `$KUBEBUILDER_ASSETS/extra/kube-scheduler.xz` (v1.37), unpacked with
//!   `xz -dc` into the control plane's directory on first use.
//! * **How it runs**: as the admin (`--kubeconfig`, also for delegated authentication and
//!   authorization of its own port), without leader election, its health port on a free
//!   loopback port with a self-signed certificate in `<dir>/kube-scheduler-certs`, its log
//!   in `<dir>/kube-scheduler.log`. Stopped with the control plane (or by
//!   [`ControlPlane::stop_scheduler`]).
//! * **Only on a private control plane** ([`ControlPlane::start`] or
//!   [`ControlPlane::start_with`]): on the shared one it would place other tests' pods
//!   that are meant to stay unscheduled; [`ControlPlane::start_scheduler`] refuses.

use std::path::PathBuf;
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics_server::unpack_xz;
use crate::{ControlPlane, TestEnvError, io_err};

/// How long a daemon may take to open its health port.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl ControlPlane {
    /// Starts kube-scheduler v1.37 (see the module docs); returns once it serves its health
    /// port. Calling it again restarts it. Refused on the shared control plane.
    pub async fn start_scheduler(&self) -> Result<(), TestEnvError> {
        self.stop_scheduler();
        if !self.private {
            return Err(TestEnvError::Io {
                what: "starting kube-scheduler".into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the scheduler runs only beside a private control plane \
                     (ControlPlane::start or start_with), never the shared one",
                ),
            });
        }
        let exe = self.unpack_extra_exe("kube-scheduler").await?;
        let port = crate::process::free_port().map_err(io_err("picking a free port"))?;
        let (d, kc) = (self.dir.display(), self.admin_kubeconfig.display());
        let args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={d}/kube-scheduler-certs"),
            "--leader-elect=false".into(),
            // Every scheduling attempt and binding in the log: what a failed test reads.
            "-v=2".into(),
        ];
        let child = self.spawn_exe(&exe, "kube-scheduler", &args)?;
        crate::set(&self.scheduler, child);
        wait_serving(
            &self.scheduler,
            port,
            "kube-scheduler",
            self.scheduler_log_path(),
        )
        .await
    }

    /// Stops kube-scheduler if it runs.
    pub fn stop_scheduler(&self) {
        if let Ok(mut g) = self.scheduler.lock()
            && let Some(mut c) = g.take()
        {
            crate::process::kill(&mut c);
        }
    }

    /// Whether kube-scheduler runs: `None` if it was never started (or was stopped), else
    /// `Some(None)` while it runs and `Some(Some(status))` once it has exited.
    pub fn scheduler_status(&self) -> Option<Option<std::process::ExitStatus>> {
        let mut g = self.scheduler.lock().ok()?;
        let child = g.as_mut()?;
        Some(child.try_wait().ok().flatten())
    }

    /// kube-scheduler's log (stdout and stderr).
    pub fn scheduler_log_path(&self) -> PathBuf {
        self.dir.join("kube-scheduler.log")
    }

    /// `<dir>/<name>`, unpacked from `$KUBEBUILDER_ASSETS/extra/<name>.xz` unless already
    /// there (the unpacking writes a temporary name and renames it).
    pub(crate) async fn unpack_extra_exe(&self, name: &str) -> Result<PathBuf, TestEnvError> {
        let exe = self.dir.join(name);
        if exe.is_file() {
            return Ok(exe);
        }
        let xz = self.assets.join(format!("extra/{name}.xz"));
        if !xz.is_file() {
            return Err(TestEnvError::AssetsMissing(format!(
                "{} is missing (xz-compressed)",
                xz.display()
            )));
        }
        let (src, dst) = (xz.clone(), exe.clone());
        tokio::task::spawn_blocking(move || unpack_xz(&src, &dst))
            .await
            .map_err(|e| TestEnvError::Io {
                what: format!("unpacking {name}"),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err(format!("unpacking {} (xz -dc)", xz.display())))?;
        Ok(exe)
    }
}

/// Waits until the daemon in `slot` accepts connections on `127.0.0.1:port` (Kubernetes
/// components open their health port once set up); an error if it exits first or takes
/// longer than [`START_TIMEOUT`].
pub(crate) async fn wait_serving(
    slot: &Mutex<Option<Child>>,
    port: u16,
    what: &'static str,
    log: PathBuf,
) -> Result<(), TestEnvError> {
    let deadline = Instant::now() + START_TIMEOUT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        let exited = slot
            .lock()
            .ok()
            .and_then(|mut g| g.as_mut().and_then(|c| c.try_wait().ok().flatten()));
        if let Some(status) = exited {
            return Err(TestEnvError::Exited {
                what,
                status,
                log: log.display().to_string(),
            });
        }
        if Instant::now() > deadline {
            return Err(TestEnvError::NotReady {
                what,
                secs: START_TIMEOUT.as_secs(),
                log: log.display().to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The port answering is not proof enough: another process may have taken the free
    // port first, and this daemon then exits ("address already in use").
    tokio::time::sleep(Duration::from_millis(200)).await;
    let exited = slot
        .lock()
        .ok()
        .and_then(|mut g| g.as_mut().and_then(|c| c.try_wait().ok().flatten()));
    if let Some(status) = exited {
        return Err(TestEnvError::Exited {
            what,
            status,
            log: log.display().to_string(),
        });
    }
    Ok(())
}
