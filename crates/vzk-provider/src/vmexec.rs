//! Where VM work runs: the tokio runtime whose threads sit in the VM network namespace.
//!
//! Everything that creates a network object for a VM (the NAT bridge, dnsmasq, TAPs,
//! the QEMU process, the IP sniffer, SSH sockets to the guest) must be created in the
//! namespace the VMs live in. With `--vm-netns` the provider owns a small runtime whose
//! worker and blocking threads all enter that namespace on start; without it the work
//! runs on the caller's runtime. A socket keeps its namespace once created, so the
//! result can be used from any thread.

use std::future::Future;
use std::path::PathBuf;

use tokio::runtime::{Handle, Runtime};

/// Why the VM runtime could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmExecError {
    /// The namespace file could not be opened.
    #[error("opening network namespace {path}")]
    OpenNetns {
        /// `/var/run/netns/<name>`.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The runtime could not be built.
    #[error("building the VM runtime")]
    Runtime(#[source] std::io::Error),
}

/// Runs futures in the VM network namespace.
#[derive(Debug)]
pub struct VmExec {
    handle: Handle,
    owned: Option<Runtime>,
}

impl VmExec {
    /// On the current runtime (the agent's own namespace). Must be called within a
    /// tokio runtime.
    pub fn current() -> Self {
        Self {
            handle: Handle::current(),
            owned: None,
        }
    }

    /// On a new two-thread runtime inside the `ip netns` namespace `name`.
    pub fn in_netns(name: &str) -> Result<Self, VmExecError> {
        let path = PathBuf::from(format!("/var/run/netns/{name}"));
        // Check now so a wrong name is a clear start-up error.
        std::fs::File::open(&path).map_err(|source| VmExecError::OpenNetns {
            path: path.clone(),
            source,
        })?;
        let thread_path = path.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vzk-vm-netns")
            .enable_all()
            .on_thread_start(move || {
                let entered = std::fs::File::open(&thread_path).and_then(|f| {
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
                if let Err(e) = entered {
                    // Fail closed: a thread outside the namespace would leak VM traffic
                    // into the host's.
                    tracing::error!(netns = %thread_path.display(), error = %e, "cannot enter the VM network namespace");
                    std::process::abort();
                }
            })
            .build()
            .map_err(VmExecError::Runtime)?;
        Ok(Self {
            handle: rt.handle().clone(),
            owned: Some(rt),
        })
    }

    /// Runs `fut` on the VM runtime and waits for it. A panic in `fut` is resumed here.
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.handle.spawn(fut).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("VM runtime task cancelled: {e}"),
        }
    }

    /// Spawns `fut` on the VM runtime.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }
}

impl Drop for VmExec {
    fn drop(&mut self) {
        if let Some(rt) = self.owned.take() {
            rt.shutdown_background();
        }
    }
}
