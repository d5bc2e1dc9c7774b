//! Virtualization.framework VM states and their mapping to [`VmState`].
//!
//! `VZVirtualMachine.state` is an `NSInteger` enum ([`VzState`]). Two facts make the
//! mapping depend on history, so it is a small state machine, [`StateTracker`]:
//! * a VM that was never started reports `Stopped`, which for us is
//!   [`VmState::Created`];
//! * `Stopped` and `Failed` are final for us (a VZ VM can be started again, but the
//!   backend never does), so later observations cannot leave them.
//!
//! The framework's other states (`Paused`, `Pausing`, `Resuming`, `Saving`,
//! `Restoring`) belong to saving a template and restoring a pod from one: while a save is
//! under way ([`StateTracker::save_requested`]) they are [`VmState::Stopping`] (the VM
//! ends after it); while a restore is ([`StateTracker::restore_requested`]) they are
//! [`VmState::Starting`], until the VM runs. Seen at any other time, they map to
//! [`VmState::Failed`], as in the reference implementation. `Error` is `Failed`.
//! The delegate's `guestDidStop` is [`StopEvent::GuestStopped`] (→ `Stopped`);
//! `didStopWithError` is [`StopEvent::Error`] (→ `Failed` with the error's text).

use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;
use vzk_vm::VmState;

/// `VZVirtualMachineState`, by raw value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VzState {
    /// 0: not running (never started, or ended).
    Stopped,
    /// 1.
    Running,
    /// 2.
    Paused,
    /// 3: the VM hit an internal error.
    Error,
    /// 4.
    Starting,
    /// 5.
    Pausing,
    /// 6.
    Resuming,
    /// 7.
    Stopping,
    /// 8.
    Saving,
    /// 9.
    Restoring,
    /// A value this code does not know (a newer SDK).
    Unknown(isize),
}

impl VzState {
    /// The state of a raw `VZVirtualMachineState` value.
    pub fn from_raw(raw: isize) -> Self {
        match raw {
            0 => Self::Stopped,
            1 => Self::Running,
            2 => Self::Paused,
            3 => Self::Error,
            4 => Self::Starting,
            5 => Self::Pausing,
            6 => Self::Resuming,
            7 => Self::Stopping,
            8 => Self::Saving,
            9 => Self::Restoring,
            other => Self::Unknown(other),
        }
    }
}

/// A delegate callback reporting that the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopEvent {
    /// `guestDidStopVirtualMachine:`: the guest powered off.
    GuestStopped,
    /// `virtualMachine:didStopWithError:`, with the error's description.
    Error(String),
}

/// Folds framework observations into our [`VmState`].
#[derive(Debug, Clone)]
pub struct StateTracker {
    state: VmState,
    started: bool,
    suspend: Option<Suspend>,
}

/// A save or restore under way, during which paused states are expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspend {
    Saving,
    Restoring,
}

impl Default for StateTracker {
    fn default() -> Self {
        Self {
            state: VmState::Created,
            started: false,
            suspend: None,
        }
    }
}

impl StateTracker {
    /// The current state.
    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// Records that a start was issued (from now on `Stopped` means ended).
    pub fn start_requested(&mut self) -> Option<VmState> {
        self.started = true;
        self.set(VmState::Starting)
    }

    /// Records that a restore from a saved state was issued (instead of a start): the
    /// VM is `Starting` through `Restoring`, `Paused` and `Resuming` until it runs.
    pub fn restore_requested(&mut self) -> Option<VmState> {
        self.suspend = Some(Suspend::Restoring);
        self.start_requested()
    }

    /// Records that the running VM is being paused and saved, to be stopped after: it
    /// is `Stopping` through `Pausing`, `Paused` and `Saving`.
    pub fn save_requested(&mut self) -> Option<VmState> {
        self.suspend = Some(Suspend::Saving);
        match self.state {
            VmState::Running => self.set(VmState::Stopping),
            _ => None,
        }
    }

    /// Records that a save failed (the VM may still be paused): the VM is `Failed`, and
    /// the caller stops it.
    pub fn save_failed(&mut self, reason: String) -> Option<VmState> {
        self.suspend = None;
        self.set(VmState::Failed { reason })
    }

    /// Records that a stop was issued.
    pub fn stop_requested(&mut self) -> Option<VmState> {
        match self.state {
            VmState::Starting | VmState::Running => self.set(VmState::Stopping),
            _ => None,
        }
    }

    /// Records that starting failed.
    pub fn start_failed(&mut self, reason: String) -> Option<VmState> {
        self.set(VmState::Failed { reason })
    }

    /// Records a polled `VZVirtualMachine.state`. Returns the new state if it changed.
    pub fn observe(&mut self, vz: VzState) -> Option<VmState> {
        let next = match (vz, self.suspend) {
            (VzState::Pausing | VzState::Paused | VzState::Saving, Some(Suspend::Saving)) => {
                VmState::Stopping
            }
            (
                VzState::Restoring | VzState::Paused | VzState::Resuming,
                Some(Suspend::Restoring),
            ) => VmState::Starting,
            _ => Self::plain(vz, self.started),
        };
        if matches!(vz, VzState::Running | VzState::Stopped | VzState::Error) {
            self.suspend = None;
        }
        self.set(next)
    }

    /// The state a framework state means outside a save or restore.
    fn plain(vz: VzState, started: bool) -> VmState {
        match vz {
            VzState::Stopped if !started => VmState::Created,
            VzState::Stopped => VmState::Stopped,
            VzState::Starting => VmState::Starting,
            VzState::Running => VmState::Running,
            VzState::Stopping => VmState::Stopping,
            VzState::Error => VmState::Failed {
                reason: "Virtualization.framework reported an error state".into(),
            },
            other => VmState::Failed {
                reason: format!("unexpected Virtualization.framework state {other:?}"),
            },
        }
    }

    /// Records a delegate stop callback. Returns the new state if it changed.
    pub fn stopped(&mut self, event: StopEvent) -> Option<VmState> {
        self.set(match event {
            StopEvent::GuestStopped => VmState::Stopped,
            StopEvent::Error(reason) => VmState::Failed { reason },
        })
    }

    fn set(&mut self, next: VmState) -> Option<VmState> {
        if self.state.is_final() || self.state == next {
            return None;
        }
        self.state = next.clone();
        Some(next)
    }
}

/// A [`StateTracker`] shared between the VM's dispatch queue (completion handlers,
/// delegate callbacks) and async callers, publishing every change on a watch channel.
#[derive(Debug)]
pub struct StatePublisher {
    vm_id: String,
    tracker: Mutex<StateTracker>,
    tx: watch::Sender<VmState>,
}

impl StatePublisher {
    /// A publisher for VM `vm_id`, starting in [`VmState::Created`].
    pub fn new(vm_id: impl Into<String>) -> Self {
        Self {
            vm_id: vm_id.into(),
            tracker: Mutex::new(StateTracker::default()),
            tx: watch::Sender::new(VmState::Created),
        }
    }

    /// The current state.
    pub fn current(&self) -> VmState {
        self.tx.borrow().clone()
    }

    /// A receiver of the current state and all later changes.
    pub fn subscribe(&self) -> watch::Receiver<VmState> {
        self.tx.subscribe()
    }

    /// Applies `f` to the tracker and publishes the change it reports, if any.
    pub fn apply(&self, f: impl FnOnce(&mut StateTracker) -> Option<VmState>) -> Option<VmState> {
        let changed = {
            let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut tracker)
        };
        if let Some(state) = &changed {
            tracing::info!(vm.id = %self.vm_id, ?state, "VM state changed");
            self.tx.send_replace(state.clone());
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_follow_the_sdk_header() {
        let expected = [
            VzState::Stopped,
            VzState::Running,
            VzState::Paused,
            VzState::Error,
            VzState::Starting,
            VzState::Pausing,
            VzState::Resuming,
            VzState::Stopping,
            VzState::Saving,
            VzState::Restoring,
        ];
        for (raw, want) in expected.into_iter().enumerate() {
            assert_eq!(VzState::from_raw(raw as isize), want);
        }
        assert_eq!(VzState::from_raw(42), VzState::Unknown(42));
    }

    #[test]
    fn stopped_before_start_is_created_after_start_is_final() {
        let mut t = StateTracker::default();
        assert_eq!(t.observe(VzState::Stopped), None);
        assert_eq!(t.state(), &VmState::Created);
        assert_eq!(t.start_requested(), Some(VmState::Starting));
        assert_eq!(t.observe(VzState::Starting), None);
        assert_eq!(t.observe(VzState::Running), Some(VmState::Running));
        assert_eq!(t.stop_requested(), Some(VmState::Stopping));
        assert_eq!(t.observe(VzState::Stopped), Some(VmState::Stopped));
        // Final: nothing moves it any more.
        assert_eq!(t.observe(VzState::Running), None);
        assert_eq!(t.stopped(StopEvent::Error("late".into())), None);
        assert_eq!(t.state(), &VmState::Stopped);
    }

    #[test]
    fn delegate_error_fails_with_its_reason() {
        let mut t = StateTracker::default();
        t.start_requested();
        t.observe(VzState::Running);
        let s = t.stopped(StopEvent::Error(
            "The virtual machine stopped unexpectedly.".into(),
        ));
        assert_eq!(
            s,
            Some(VmState::Failed {
                reason: "The virtual machine stopped unexpectedly.".into()
            })
        );
        assert_eq!(t.stopped(StopEvent::GuestStopped), None);
    }

    #[test]
    fn guest_power_off_is_stopped() {
        let mut t = StateTracker::default();
        t.start_requested();
        assert_eq!(t.stopped(StopEvent::GuestStopped), Some(VmState::Stopped));
    }

    #[test]
    fn error_and_unrequested_states_are_failed() {
        for vz in [
            VzState::Error,
            VzState::Paused,
            VzState::Saving,
            VzState::Unknown(77),
        ] {
            let mut t = StateTracker::default();
            t.start_requested();
            assert!(
                matches!(t.observe(vz), Some(VmState::Failed { .. })),
                "{vz:?}"
            );
        }
    }

    #[test]
    fn a_restore_is_starting_until_the_vm_runs() {
        let mut t = StateTracker::default();
        assert_eq!(t.restore_requested(), Some(VmState::Starting));
        for vz in [VzState::Restoring, VzState::Paused, VzState::Resuming] {
            assert_eq!(t.observe(vz), None, "{vz:?}");
            assert_eq!(t.state(), &VmState::Starting);
        }
        assert_eq!(t.observe(VzState::Running), Some(VmState::Running));
        // Running, a pause nobody asked for is a failure again.
        assert!(matches!(
            t.observe(VzState::Paused),
            Some(VmState::Failed { .. })
        ));
        // A restore the framework refused: the VM stays stopped, which is final.
        let mut t = StateTracker::default();
        t.restore_requested();
        assert_eq!(
            t.start_failed("VZErrorRestore".into()),
            Some(VmState::Failed {
                reason: "VZErrorRestore".into()
            })
        );
    }

    #[test]
    fn a_save_is_stopping_until_the_vm_stops() {
        let mut t = StateTracker::default();
        t.start_requested();
        t.observe(VzState::Running);
        assert_eq!(t.save_requested(), Some(VmState::Stopping));
        for vz in [
            VzState::Pausing,
            VzState::Paused,
            VzState::Saving,
            VzState::Paused,
        ] {
            assert_eq!(t.observe(vz), None, "{vz:?}");
        }
        assert_eq!(t.stop_requested(), None);
        assert_eq!(t.observe(VzState::Stopped), Some(VmState::Stopped));
        // A failed save fails the VM (paused, it is then stopped by the caller).
        let mut t = StateTracker::default();
        t.start_requested();
        t.observe(VzState::Running);
        t.save_requested();
        t.observe(VzState::Paused);
        assert!(matches!(
            t.save_failed("VZErrorSave".into()),
            Some(VmState::Failed { .. })
        ));
    }

    #[test]
    fn start_failure_is_final() {
        let mut t = StateTracker::default();
        t.start_requested();
        assert_eq!(
            t.start_failed("no entitlement".into()),
            Some(VmState::Failed {
                reason: "no entitlement".into()
            })
        );
        assert_eq!(t.stop_requested(), None);
        assert_eq!(t.observe(VzState::Stopped), None);
    }

    #[test]
    fn publisher_sends_only_changes() {
        let p = StatePublisher::new("vm-1");
        let mut rx = p.subscribe();
        assert_eq!(*rx.borrow_and_update(), VmState::Created);
        assert_eq!(p.apply(|t| t.observe(VzState::Stopped)), None);
        assert!(!rx.has_changed().unwrap_or(true));
        p.apply(StateTracker::start_requested);
        p.apply(|t| t.observe(VzState::Running));
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!(*rx.borrow_and_update(), VmState::Running);
        p.apply(|t| t.stopped(StopEvent::GuestStopped));
        assert_eq!(p.current(), VmState::Stopped);
    }
}
