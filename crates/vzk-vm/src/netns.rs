//! VMs in a network namespace of their own (Linux): [`NetnsRuntime`], a tokio runtime
//! whose threads live in the namespace, and [`InNetns`], a [`Hypervisor`] decorator that
//! runs every operation of a backend and of its VMs on that runtime.
//!
//! Everything that creates a network object for a VM (the NAT bridge, dnsmasq, TAPs, the
//! QEMU process, the IP sniffer, TCP sockets to the guest) must be created inside the
//! namespace. A socket keeps its namespace once created, so what [`Vm::connect`] returns
//! can be used from any thread; callers never enter the namespace themselves.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;

use crate::hypervisor::{
    Capabilities, HostUsage, Hypervisor, HypervisorError, Vm, VmError, VmState,
};
use crate::spec::VmSpec;

/// Why the namespace runtime could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("opening network namespace {path}")]
    Open {
        /// `/var/run/netns/<name>`.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The runtime could not be built.
    #[error("building the VM network namespace runtime")]
    Runtime(#[source] std::io::Error),
}

/// A two-thread tokio runtime whose worker and blocking threads all enter one `ip netns`
/// namespace on start (a thread that cannot enter it aborts the process: fail closed, a
/// thread outside would leak VM traffic into the host's namespace).
#[derive(Debug)]
pub struct NetnsRuntime {
    handle: Handle,
    owned: Option<Runtime>,
}

impl NetnsRuntime {
    /// A runtime inside the `ip netns` namespace `name` (`/var/run/netns/<name>`).
    pub fn enter(name: &str) -> Result<Self, NetnsError> {
        let path = PathBuf::from(format!("/var/run/netns/{name}"));
        // Check now so a wrong name is a clear start-up error.
        std::fs::File::open(&path).map_err(|source| NetnsError::Open {
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
                    tracing::error!(netns = %thread_path.display(), error = %e, "cannot enter the VM network namespace");
                    std::process::abort();
                }
            })
            .build()
            .map_err(NetnsError::Runtime)?;
        Ok(Self {
            handle: rt.handle().clone(),
            owned: Some(rt),
        })
    }

    /// Runs `fut` on the namespace's runtime and waits for it. A panic in `fut` is
    /// resumed here; the caller's span goes along.
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        use tracing::Instrument;
        match self
            .handle
            .spawn(fut.instrument(tracing::Span::current()))
            .await
        {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("VM network namespace runtime task cancelled: {e}"),
        }
    }
}

impl Drop for NetnsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.owned.take() {
            rt.shutdown_background();
        }
    }
}

/// A backend whose every operation (and every operation of its VMs) runs inside a
/// network namespace.
pub struct InNetns {
    inner: Arc<dyn Hypervisor>,
    rt: Arc<NetnsRuntime>,
}

impl std::fmt::Debug for InNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InNetns")
            .field("backend", &self.inner.capabilities().backend)
            .finish_non_exhaustive()
    }
}

impl InNetns {
    /// Builds a backend inside the namespace of `rt` with `make` (so the network it sets
    /// up at start, e.g. the NAT bridge and dnsmasq, lives there) and wraps it.
    pub async fn build<H, F, Fut>(rt: NetnsRuntime, make: F) -> Result<Self, HypervisorError>
    where
        H: Hypervisor,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<H, HypervisorError>> + Send + 'static,
    {
        let inner = rt.run(make()).await?;
        Ok(Self {
            inner: Arc::new(inner),
            rt: Arc::new(rt),
        })
    }

    fn wrap(&self, vm: Arc<dyn Vm>) -> Arc<dyn Vm> {
        Arc::new(NetnsVm {
            inner: vm,
            rt: self.rt.clone(),
        })
    }
}

#[async_trait]
impl Hypervisor for InNetns {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }

    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        let h = self.inner.clone();
        let vm = self.rt.run(async move { h.create(spec).await }).await?;
        Ok(self.wrap(vm))
    }

    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        let h = self.inner.clone();
        let vms = self.rt.run(async move { h.adopt_existing().await }).await?;
        Ok(vms.into_iter().map(|vm| self.wrap(vm)).collect())
    }

    async fn health(&self) -> Result<(), String> {
        self.inner.health().await
    }
}

/// A VM of an [`InNetns`] backend.
struct NetnsVm {
    inner: Arc<dyn Vm>,
    rt: Arc<NetnsRuntime>,
}

#[async_trait]
impl Vm for NetnsVm {
    fn spec(&self) -> &VmSpec {
        self.inner.spec()
    }

    fn state(&self) -> watch::Receiver<VmState> {
        self.inner.state()
    }

    fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>> {
        self.inner.ip_address()
    }

    fn console_log(&self) -> Option<PathBuf> {
        self.inner.console_log()
    }

    fn host_usage(&self) -> Option<HostUsage> {
        self.inner.host_usage()
    }

    async fn start(&self) -> Result<(), VmError> {
        let vm = self.inner.clone();
        self.rt.run(async move { vm.start().await }).await
    }

    async fn request_stop(&self) -> Result<(), VmError> {
        let vm = self.inner.clone();
        self.rt.run(async move { vm.request_stop().await }).await
    }

    async fn force_stop(&self) -> Result<(), VmError> {
        let vm = self.inner.clone();
        self.rt.run(async move { vm.force_stop().await }).await
    }

    async fn save_state(&self) -> Result<(), VmError> {
        let vm = self.inner.clone();
        self.rt.run(async move { vm.save_state().await }).await
    }

    async fn remove(&self) -> Result<(), VmError> {
        let vm = self.inner.clone();
        self.rt.run(async move { vm.remove().await }).await
    }

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let vm = self.inner.clone();
        self.rt.run(async move { vm.connect(addr).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let err = NetnsRuntime::enter("vzk-no-such-namespace").expect_err("must fail");
        assert!(
            err.to_string()
                .contains("/var/run/netns/vzk-no-such-namespace"),
            "{err}"
        );
    }
}
