//! The per-VM actor: a private serial dispatch queue that owns the framework objects
//! and executes [`Command`]s sent from any thread.
//!
//! Contract:
//! * The `VZVirtualMachine`, its configuration and its delegate are created by
//!   [`Actor::build`] *on* the queue and only touched by closures running on it
//!   ([`OnQueue`]); completion handlers and delegate callbacks also run there.
//! * [`Actor::send`] submits a command and awaits its `oneshot` reply, which the
//!   framework's completion handler sends for asynchronous operations. `None` means the
//!   VM was already released.
//! * State changes go to the shared [`StatePublisher`] as they are observed.
//! * Dropping the actor releases the framework objects on their own queue.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use block2::RcBlock;
use dispatch2::{DispatchQueue, DispatchRetained};
use objc2::AnyThread;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSError;
use objc2_virtualization::{VZMacOSInstaller, VZVirtualMachine};
use tokio::sync::oneshot;

use super::build::{self, BuildError};
use super::delegate::VmDelegate;
use super::ns::FrameworkError;
use crate::config::VzConfig;
use crate::state::{StatePublisher, StateTracker, VzState};

/// What the actor can be asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `startWithCompletionHandler:`.
    Start,
    /// `requestStopWithError:` (the guest's power button).
    RequestStop,
    /// `stopWithCompletionHandler:` (pull the plug).
    ForceStop,
    /// Drop the framework objects.
    Release,
    /// `pauseWithCompletionHandler:`, `saveMachineStateToURL:`, then a stop.
    SaveState,
    /// `restoreMachineStateFromURL:`, then `resumeWithCompletionHandler:`.
    Restore,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The framework reported an error.
    #[error("Virtualization.framework refused")]
    Framework(#[source] FrameworkError),
    /// The framework says the VM cannot do this in its current state.
    #[error("the VM's framework state does not allow {0:?}")]
    NotPossible(Command),
    /// A path could not be handed to the framework.
    #[error(transparent)]
    Url(super::ns::UrlError),
}

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Building the configuration failed.
    #[error("building the VM configuration failed")]
    Build(#[source] BuildError),
    /// The VM's queue went away before answering.
    #[error("the VM's dispatch queue dropped the request")]
    QueueGone,
}

type Reply = Result<(), CommandError>;

/// [`save`] or [`restore`]: a chain of framework calls on a state file, run on the queue.
type StateFileChain = fn(
    &Retained<VZVirtualMachine>,
    &Arc<StatePublisher>,
    &Retained<objc2_foundation::NSURL>,
    oneshot::Sender<Reply>,
);

/// Objects confined to one VM's serial dispatch queue.
struct OnQueue<T>(T);

// SAFETY: an `OnQueue` is only dereferenced inside closures submitted to the owning
// actor's serial queue (`Actor::build`, `Actor::send`, `Drop for Actor`), so its
// contents are never used from two threads at once; that confinement is exactly what
// Virtualization.framework requires of a `VZVirtualMachine` and its delegate.
unsafe impl<T> Send for OnQueue<T> {}
// SAFETY: as above: shared references are only used on the owning queue.
unsafe impl<T> Sync for OnQueue<T> {}

/// The framework objects of a built VM.
struct Machine {
    vm: Retained<VZVirtualMachine>,
    /// Retained here because the framework holds its delegate weakly.
    _delegate: Retained<VmDelegate>,
    /// The macOS installer running on this VM, if any (`image create macos`).
    installer: Option<Retained<VZMacOSInstaller>>,
}

type Slot = Arc<OnQueue<RefCell<Option<Machine>>>>;

/// The handle on one VM's queue. `Send + Sync`.
pub struct Actor {
    queue: DispatchRetained<DispatchQueue>,
    slot: Slot,
    states: Arc<StatePublisher>,
}

impl Actor {
    /// Creates the queue `io.vz-kubelet.vm.<id>` and builds the VM on it.
    pub async fn build(
        id: &str,
        config: VzConfig,
        states: Arc<StatePublisher>,
    ) -> Result<Self, CreateError> {
        let queue = DispatchQueue::new(&format!("io.vz-kubelet.vm.{id}"), None);
        let slot: Slot = Arc::new(OnQueue(RefCell::new(None)));
        let (tx, rx) = oneshot::channel::<Result<(), BuildError>>();
        let (on_queue_slot, on_queue_states, vm_queue) =
            (slot.clone(), states.clone(), queue.clone());
        queue.exec_async(move || {
            let result = build::configuration(&config).map(|cfg| {
                // SAFETY: `initWithConfiguration:queue:` with a validated configuration
                // and the serial queue this closure runs on; the VM is then only used
                // on this queue.
                let vm = unsafe {
                    VZVirtualMachine::initWithConfiguration_queue(
                        VZVirtualMachine::alloc(),
                        &cfg,
                        &vm_queue,
                    )
                };
                let delegate = VmDelegate::new(on_queue_states);
                // SAFETY: setter called on the VM's queue; `Machine` keeps the
                // delegate alive as long as the VM.
                unsafe { vm.setDelegate(Some(ProtocolObject::from_ref(&*delegate))) };
                *on_queue_slot.0.borrow_mut() = Some(Machine {
                    vm,
                    _delegate: delegate,
                    installer: None,
                });
            });
            let _ = tx.send(result);
        });
        rx.await
            .map_err(|_| CreateError::QueueGone)?
            .map_err(CreateError::Build)?;
        Ok(Self {
            queue,
            slot,
            states,
        })
    }

    /// Installs macOS from the restore image at `ipsw` on this (stopped) VM with
    /// `VZMacOSInstaller`, calling `progress` with the fraction done about every second.
    /// `None` if the VM was released.
    pub async fn install_macos(
        &self,
        ipsw: &std::path::Path,
        progress: impl Fn(f64) + Send + 'static,
    ) -> Option<Result<(), CommandError>> {
        let (tx, rx) = oneshot::channel::<Reply>();
        let (slot, ipsw) = (self.slot.clone(), ipsw.to_path_buf());
        self.queue.exec_async(move || {
            let mut guard = slot.0.borrow_mut();
            let Some(machine) = guard.as_mut() else {
                return;
            };
            let url = match super::ns::file_url(&ipsw) {
                Ok(u) => u,
                Err(e) => {
                    let _ = tx.send(Err(CommandError::Url(e)));
                    return;
                }
            };
            // SAFETY: created and started on the VM's queue, with the VM stopped, as
            // the framework requires; the completion block has the declared
            // `Fn(*mut NSError)` signature and runs on this queue.
            let installer = unsafe {
                VZMacOSInstaller::initWithVirtualMachine_restoreImageURL(
                    VZMacOSInstaller::alloc(),
                    &machine.vm,
                    &url,
                )
            };
            let reply = Cell::new(Some(tx));
            let block = RcBlock::new(move |error: *mut NSError| {
                // SAFETY: the framework passes null or a valid `NSError`.
                let outcome = match unsafe { error.as_ref() } {
                    None => Ok(()),
                    Some(e) => Err(CommandError::Framework(FrameworkError::from_ns(e))),
                };
                if let Some(reply) = reply.take() {
                    let _ = reply.send(outcome);
                }
            });
            // SAFETY: see above.
            unsafe { installer.installWithCompletionHandler(&block) };
            machine.installer = Some(installer);
        });
        let done = rx;
        tokio::pin!(done);
        loop {
            tokio::select! {
                r = &mut done => return r.ok(),
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                    let (ptx, prx) = oneshot::channel::<f64>();
                    let slot = self.slot.clone();
                    self.queue.exec_async(move || {
                        if let Some(i) = slot.0.borrow().as_ref().and_then(|m| m.installer.as_ref()) {
                            // SAFETY: a property read on the VM's queue.
                            let fraction = unsafe { i.progress() }.fractionCompleted();
                            let _ = ptx.send(fraction);
                        }
                    });
                    if let Ok(f) = prx.await {
                        progress(f);
                    }
                }
            }
        }
    }

    /// Pauses the running VM, writes its machine state to `path` and stops it (a
    /// template's end). On failure the VM is `Failed` and may still be paused: stop it.
    /// `None` if the VM was released.
    pub async fn save_state(&self, path: &std::path::Path) -> Option<Result<(), CommandError>> {
        self.with_state_file(path, save).await
    }

    /// Restores this (never started) VM from the machine state at `path` and resumes it:
    /// the start of a VM restored from a template. `None` if the VM was released.
    pub async fn restore(&self, path: &std::path::Path) -> Option<Result<(), CommandError>> {
        self.with_state_file(path, restore).await
    }

    /// Runs `chain` (`save` or `restore`) on the VM's queue with the state file's URL.
    async fn with_state_file(
        &self,
        path: &std::path::Path,
        chain: StateFileChain,
    ) -> Option<Result<(), CommandError>> {
        let (tx, rx) = oneshot::channel::<Reply>();
        let (slot, states, path) = (self.slot.clone(), self.states.clone(), path.to_path_buf());
        self.queue.exec_async(move || {
            let guard = slot.0.borrow();
            let Some(machine) = guard.as_ref() else {
                return;
            };
            match super::ns::file_url(&path) {
                Ok(url) => chain(&machine.vm, &states, &url, tx),
                Err(e) => {
                    let _ = tx.send(Err(CommandError::Url(e)));
                }
            }
        });
        rx.await.ok()
    }

    /// Executes `command` on the queue and awaits its outcome; `None` if the VM was
    /// released.
    pub async fn send(&self, command: Command) -> Option<Result<(), CommandError>> {
        let (tx, rx) = oneshot::channel();
        let (slot, states) = (self.slot.clone(), self.states.clone());
        self.queue
            .exec_async(move || execute(&slot, &states, command, tx));
        rx.await.ok()
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        let slot = self.slot.clone();
        self.queue
            .exec_async(move || drop(slot.0.borrow_mut().take()));
    }
}

/// Runs on the VM's queue.
fn execute(
    slot: &Slot,
    states: &Arc<StatePublisher>,
    command: Command,
    reply: oneshot::Sender<Reply>,
) {
    if command == Command::Release {
        drop(slot.0.borrow_mut().take());
        let _ = reply.send(Ok(()));
        return;
    }
    let guard = slot.0.borrow();
    let Some(machine) = guard.as_ref() else {
        return;
    };
    let vm = &machine.vm;
    // SAFETY (all blocks below): framework calls made on the VM's queue, with
    // completion blocks of the declared `Fn(*mut NSError)` signature.
    match command {
        // SAFETY: see above.
        Command::Start if !unsafe { vm.canStart() } => {
            // A second start must not fail the running VM: refuse it here.
            let _ = reply.send(Err(CommandError::NotPossible(command)));
        }
        Command::Start => {
            states.apply(StateTracker::start_requested);
            let block = completion(vm, states, reply, StateTracker::start_failed);
            // SAFETY: see above.
            unsafe { vm.startWithCompletionHandler(&block) };
        }
        Command::RequestStop => {
            // SAFETY: see above.
            let outcome = if unsafe { vm.canRequestStop() } {
                // SAFETY: see above.
                unsafe { vm.requestStopWithError() }
                    .map_err(|e| CommandError::Framework(FrameworkError::from_ns(&e)))
            } else {
                Err(CommandError::NotPossible(command))
            };
            if outcome.is_ok() {
                states.apply(StateTracker::stop_requested);
            }
            let _ = reply.send(outcome);
        }
        Command::ForceStop => {
            // SAFETY: see above.
            if unsafe { vm.canStop() } {
                states.apply(StateTracker::stop_requested);
                // A failed stop keeps the state: the VM may still be running.
                let block = completion(vm, states, reply, |_, _| None);
                // SAFETY: see above.
                unsafe { vm.stopWithCompletionHandler(&block) };
            } else {
                // Already stopped (or never started): record what the framework says.
                // SAFETY: see above.
                let raw = unsafe { vm.state() }.0;
                states.apply(|t| t.observe(VzState::from_raw(raw)));
                let _ = reply.send(Ok(()));
            }
        }
        Command::Release | Command::SaveState | Command::Restore => {
            let _ = reply.send(Err(CommandError::NotPossible(command)));
        }
    }
}

/// A completion block that calls `then` once with the framework's outcome. Runs on the
/// VM's queue, as every completion handler of a VM created with a queue does.
fn once(then: impl FnOnce(Result<(), FrameworkError>) + 'static) -> RcBlock<dyn Fn(*mut NSError)> {
    let then = Cell::new(Some(then));
    RcBlock::new(move |error: *mut NSError| {
        // SAFETY: the framework passes null or a valid `NSError` for the duration of
        // the call.
        let outcome = match unsafe { error.as_ref() } {
            None => Ok(()),
            Some(e) => Err(FrameworkError::from_ns(e)),
        };
        if let Some(then) = then.take() {
            then(outcome);
        }
    })
}

/// Pause, save to `url`, stop: runs on the VM's queue. Each step starts in the previous
/// one's completion handler; the first failure ends the chain with the VM `Failed`.
fn save(
    vm: &Retained<VZVirtualMachine>,
    states: &Arc<StatePublisher>,
    url: &Retained<objc2_foundation::NSURL>,
    reply: oneshot::Sender<Reply>,
) {
    // SAFETY: a property read on the VM's queue.
    if !unsafe { vm.canPause() } {
        let _ = reply.send(Err(CommandError::NotPossible(Command::SaveState)));
        return;
    }
    states.apply(StateTracker::save_requested);
    let fail = {
        let states = states.clone();
        move |e: FrameworkError, reply: oneshot::Sender<Reply>| {
            states.apply(|t| t.save_failed(e.to_string()));
            let _ = reply.send(Err(CommandError::Framework(e)));
        }
    };
    let (vm2, states2, url) = (vm.clone(), states.clone(), url.clone());
    let paused = once(move |outcome| {
        if let Err(e) = outcome {
            return fail(e, reply);
        }
        let (vm3, states3) = (vm2.clone(), states2.clone());
        let saved = once(move |outcome| {
            if let Err(e) = outcome {
                return fail(e, reply);
            }
            // The state is on disk: the template VM's part is over.
            let stopped = completion(&vm3, &states3, reply, |_, _| None);
            // SAFETY: on the VM's queue, with a block of the declared signature.
            unsafe { vm3.stopWithCompletionHandler(&stopped) };
        });
        // SAFETY: on the VM's queue (a completion handler), the VM paused, with a block
        // of the declared signature.
        unsafe { vm2.saveMachineStateToURL_completionHandler(&url, &saved) };
    });
    // SAFETY: on the VM's queue, with a block of the declared signature.
    unsafe { vm.pauseWithCompletionHandler(&paused) };
}

/// Restore from `url`, then resume: runs on the VM's queue.
fn restore(
    vm: &Retained<VZVirtualMachine>,
    states: &Arc<StatePublisher>,
    url: &Retained<objc2_foundation::NSURL>,
    reply: oneshot::Sender<Reply>,
) {
    // SAFETY: a property read on the VM's queue.
    if !unsafe { vm.canStart() } {
        let _ = reply.send(Err(CommandError::NotPossible(Command::Restore)));
        return;
    }
    states.apply(StateTracker::restore_requested);
    let (vm2, states2) = (vm.clone(), states.clone());
    let restored = once(move |outcome| {
        if let Err(e) = outcome {
            states2.apply(|t| t.start_failed(e.to_string()));
            let _ = reply.send(Err(CommandError::Framework(e)));
            return;
        }
        let resumed = completion(&vm2, &states2, reply, StateTracker::start_failed);
        // SAFETY: on the VM's queue (a completion handler), the VM paused by the
        // restore, with a block of the declared signature.
        unsafe { vm2.resumeWithCompletionHandler(&resumed) };
    });
    // SAFETY: on the VM's queue, the VM never started, with a block of the declared
    // signature.
    unsafe { vm.restoreMachineStateFromURL_completionHandler(url, &restored) };
}

/// A completion handler that records the outcome and replies once.
fn completion(
    vm: &Retained<VZVirtualMachine>,
    states: &Arc<StatePublisher>,
    reply: oneshot::Sender<Reply>,
    on_error: fn(&mut StateTracker, String) -> Option<vzk_vm::VmState>,
) -> RcBlock<dyn Fn(*mut NSError)> {
    let (vm, states, reply) = (vm.clone(), states.clone(), Cell::new(Some(reply)));
    RcBlock::new(move |error: *mut NSError| {
        // SAFETY: the framework passes null or a valid `NSError` for the duration of
        // the call.
        let outcome = match unsafe { error.as_ref() } {
            None => {
                // SAFETY: completion handlers run on the VM's queue.
                let raw = unsafe { vm.state() }.0;
                states.apply(|t| t.observe(VzState::from_raw(raw)));
                Ok(())
            }
            Some(e) => {
                let e = FrameworkError::from_ns(e);
                states.apply(|t| on_error(t, e.to_string()));
                Err(CommandError::Framework(e))
            }
        };
        if let Some(reply) = reply.take() {
            let _ = reply.send(outcome);
        }
    })
}
