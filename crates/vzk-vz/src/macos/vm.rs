//! [`VzVm`]: the `Send` handle of one Virtualization.framework VM.
//!
//! The handle owns the VM's private serial dispatch queue and a slot holding the
//! `VZVirtualMachine` and its delegate, which only closures running on that queue
//! touch ([`OnQueue`]). Each operation submits a closure and awaits its reply on a
//! `oneshot`; the framework's completion handlers send the reply. States are published
//! by the shared [`StatePublisher`]; the guest IP by the discovery task started with
//! the VM (see [`crate::discovery::watch`]).

use std::cell::{Cell, RefCell};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchRetained};
use objc2::AnyThread;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSError;
use objc2_virtualization::VZVirtualMachine;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use vzk_vm::{VmError, VmSpec, VmState};

use super::build::{self, BuildError};
use super::delegate::VmDelegate;
use super::ns::FrameworkError;
use crate::config::VzConfig;
use crate::discovery::watch::{Sources, discover};
use crate::state::{StatePublisher, StateTracker, VzState};

/// Objects confined to one VM's serial dispatch queue.
struct OnQueue<T>(T);

// SAFETY: an `OnQueue` is only dereferenced inside closures submitted to the owning
// VM's serial queue (`VzVm::run`, `VzVm::create`, `Drop for VzVm`), so its contents are
// never used from two threads at once; that confinement is exactly what
// Virtualization.framework requires of a `VZVirtualMachine` and its delegate.
unsafe impl<T> Send for OnQueue<T> {}
// SAFETY: as above: shared references are only used on the owning queue.
unsafe impl<T> Sync for OnQueue<T> {}

/// The framework objects of a created VM.
struct Machine {
    vm: Retained<VZVirtualMachine>,
    /// Retained here because the framework holds its delegate weakly.
    _delegate: Retained<VmDelegate>,
}

type Slot = Arc<OnQueue<RefCell<Option<Machine>>>>;

/// The reply of an operation run on the queue.
type Reply = Result<(), FrameworkError>;

/// A Virtualization.framework VM.
pub struct VzVm {
    spec: VmSpec,
    queue: DispatchRetained<DispatchQueue>,
    slot: Slot,
    states: Arc<StatePublisher>,
    ip: watch::Sender<Option<Ipv4Addr>>,
    discovery: Sources,
    discovery_task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for VzVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VzVm")
            .field("id", &self.spec.id)
            .field("state", &self.states.current())
            .finish()
    }
}

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Building the configuration failed.
    #[error("building the VM configuration failed")]
    Build(#[source] BuildError),
    /// The VM's queue went away before answering.
    #[error("the VM's dispatch queue dropped the request")]
    QueueGone,
}

impl VzVm {
    /// Builds the VM described by `config` on a new private queue. Not started.
    pub async fn create(
        spec: VmSpec,
        config: VzConfig,
        discovery: Sources,
    ) -> Result<Arc<Self>, CreateError> {
        let queue = DispatchQueue::new(&format!("io.vz-kubelet.vm.{}", spec.id), None);
        let slot: Slot = Arc::new(OnQueue(RefCell::new(None)));
        let states = Arc::new(StatePublisher::new(spec.id.clone()));
        let (tx, rx) = oneshot::channel::<Result<(), BuildError>>();
        {
            let slot = slot.clone();
            let states = states.clone();
            let vm_queue = queue.clone();
            queue.exec_async(move || {
                let result = build::configuration(&config).map(|cfg| {
                    // SAFETY: `initWithConfiguration:queue:` with a validated
                    // configuration and the serial queue we are running on; the VM is
                    // then only used on this queue.
                    let vm = unsafe {
                        VZVirtualMachine::initWithConfiguration_queue(
                            VZVirtualMachine::alloc(),
                            &cfg,
                            &vm_queue,
                        )
                    };
                    let delegate = VmDelegate::new(states);
                    // SAFETY: setter called on the VM's queue; the delegate is kept
                    // alive by `Machine` for as long as the VM.
                    unsafe { vm.setDelegate(Some(ProtocolObject::from_ref(&*delegate))) };
                    *slot.0.borrow_mut() = Some(Machine {
                        vm,
                        _delegate: delegate,
                    });
                });
                let _ = tx.send(result);
            });
        }
        rx.await
            .map_err(|_| CreateError::QueueGone)?
            .map_err(CreateError::Build)?;
        tracing::info!(vm.id = %spec.id, backend = "vz", "VM created");
        Ok(Arc::new(Self {
            spec,
            queue,
            slot,
            states,
            ip: watch::Sender::new(None),
            discovery,
            discovery_task: Mutex::new(None),
        }))
    }

    /// Runs `op` on the VM's queue with the VM, the state publisher and a reply sender
    /// the framework's completion handler may keep; awaits the reply.
    async fn run(
        &self,
        operation: &'static str,
        op: impl FnOnce(&Retained<VZVirtualMachine>, &Arc<StatePublisher>, oneshot::Sender<Reply>)
        + Send
        + 'static,
    ) -> Result<(), VmError> {
        let (tx, rx) = oneshot::channel();
        let slot = self.slot.clone();
        let states = self.states.clone();
        self.queue.exec_async(move || {
            if let Some(machine) = slot.0.borrow().as_ref() {
                op(&machine.vm, &states, tx);
            }
        });
        let id = self.spec.id.clone();
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(operation_error(operation, id, Box::new(e))),
            Err(_) => Err(VmError::InvalidState {
                id,
                operation,
                state: self.states.current(),
            }),
        }
    }

    fn start_discovery(&self) {
        let Some(nic) = self.spec.nics.first() else {
            return;
        };
        let mac = nic.mac;
        let mut sources = self.discovery.clone();
        if !matches!(nic.attachment, vzk_vm::NetworkAttachment::Nat) {
            // bootpd only serves the NAT network; a bridged guest is found by ARP.
            sources.leases_file = None;
        }
        let ip = self.ip.clone();
        let mut states = self.states.subscribe();
        let id = self.spec.id.clone();
        let task = tokio::spawn(async move {
            let ended = async move {
                let _ = states.wait_for(VmState::is_final).await;
            };
            if let Some(addr) = discover(mac, &sources, ended).await {
                tracing::info!(vm.id = %id, ip = %addr, "guest IP discovered");
                ip.send_replace(Some(addr));
            }
        });
        *self
            .discovery_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
    }
}

fn operation_error(
    operation: &'static str,
    id: String,
    source: vzk_vm::hypervisor::BoxError,
) -> VmError {
    match operation {
        "start" => VmError::Start { id, source },
        "request stop" => VmError::RequestStop { id, source },
        _ => VmError::ForceStop { id, source },
    }
}

/// A completion handler block that records the outcome and replies once.
fn completion(
    vm: &Retained<VZVirtualMachine>,
    states: &Arc<StatePublisher>,
    tx: oneshot::Sender<Reply>,
    on_error: fn(&mut StateTracker, String) -> Option<VmState>,
) -> RcBlock<dyn Fn(*mut NSError)> {
    let vm = vm.clone();
    let states = states.clone();
    let tx = Cell::new(Some(tx));
    RcBlock::new(move |error: *mut NSError| {
        // SAFETY: the framework passes null or a valid `NSError` for the duration of
        // the call.
        let result = match unsafe { error.as_ref() } {
            None => Ok(()),
            Some(e) => Err(FrameworkError::from_ns(e)),
        };
        match &result {
            // SAFETY: completion handlers run on the VM's queue.
            Ok(()) => states.apply(|t| t.observe(VzState::from_raw(unsafe { vm.state() }.0))),
            Err(e) => states.apply(|t| on_error(t, e.to_string())),
        };
        if let Some(tx) = tx.take() {
            let _ = tx.send(result);
        }
    })
}

#[async_trait]
impl vzk_vm::Vm for VzVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn state(&self) -> watch::Receiver<VmState> {
        self.states.subscribe()
    }

    fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>> {
        self.ip.subscribe()
    }

    async fn start(&self) -> Result<(), VmError> {
        let state = self.states.current();
        if state != VmState::Created {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "start",
                state,
            });
        }
        self.run("start", |vm, states, tx| {
            states.apply(StateTracker::start_requested);
            let block = completion(vm, states, tx, StateTracker::start_failed);
            // SAFETY: called on the VM's queue with a completion block of the declared
            // signature.
            unsafe { vm.startWithCompletionHandler(&block) };
        })
        .await?;
        self.start_discovery();
        Ok(())
    }

    async fn request_stop(&self) -> Result<(), VmError> {
        self.run("request stop", |vm, states, tx| {
            // SAFETY: called on the VM's queue.
            let result = unsafe {
                if vm.canRequestStop() {
                    vm.requestStopWithError()
                } else {
                    Ok(())
                }
            };
            let reply = result.map_err(|e| FrameworkError::from_ns(&e));
            if reply.is_ok() {
                states.apply(StateTracker::stop_requested);
            }
            let _ = tx.send(reply);
        })
        .await
    }

    async fn force_stop(&self) -> Result<(), VmError> {
        if self.states.current().is_final() {
            return Ok(());
        }
        self.run("force stop", |vm, states, tx| {
            // SAFETY: called on the VM's queue.
            if unsafe { vm.canStop() } {
                states.apply(StateTracker::stop_requested);
                // Keep the state on a failed stop: the VM may still be running.
                let block = completion(vm, states, tx, |_, _| None);
                // SAFETY: called on the VM's queue with a completion block of the
                // declared signature.
                unsafe { vm.stopWithCompletionHandler(&block) };
            } else {
                // SAFETY: called on the VM's queue.
                states.apply(|t| t.observe(VzState::from_raw(unsafe { vm.state() }.0)));
                let _ = tx.send(Ok(()));
            }
        })
        .await
    }

    async fn remove(&self) -> Result<(), VmError> {
        let state = self.states.current();
        if !state.is_final() {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "remove",
                state,
            });
        }
        if let Some(task) = self
            .discovery_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        let slot = self.slot.clone();
        self.queue
            .exec_async(move || drop(slot.0.borrow_mut().take()));
        Ok(())
    }
}

impl Drop for VzVm {
    fn drop(&mut self) {
        if let Some(task) = self
            .discovery_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        // Release the framework objects on their own queue.
        let slot = self.slot.clone();
        self.queue
            .exec_async(move || drop(slot.0.borrow_mut().take()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handle_is_send_and_sync() {
        assert_send_sync::<VzVm>();
    }
}
