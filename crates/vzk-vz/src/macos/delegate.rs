//! The `VZVirtualMachineDelegate` of a VM: turns guest stops and stop errors into state
//! changes on the VM's [`StatePublisher`].
//!
//! Contract: the delegate is retained by the VM's handle (the framework holds it
//! weakly) and its methods run on the VM's queue.

use std::sync::Arc;

use objc2::rc::Retained;
use objc2::{AnyThread, DefinedClass, define_class, msg_send};
use objc2_foundation::{NSError, NSObject, NSObjectProtocol};
use objc2_virtualization::{VZNetworkDevice, VZVirtualMachine, VZVirtualMachineDelegate};

use super::ns::FrameworkError;
use crate::state::{StatePublisher, StopEvent};

define_class!(
    // SAFETY:
    // - NSObject has no subclassing requirements.
    // - `VmDelegate` does not implement `Drop`.
    // - Its ivar (an `Arc<StatePublisher>`) is `Send + Sync`.
    #[unsafe(super = NSObject)]
    #[name = "VzkVmDelegate"]
    #[ivars = Arc<StatePublisher>]
    pub struct VmDelegate;

    // SAFETY: `NSObjectProtocol` has no safety requirements.
    unsafe impl NSObjectProtocol for VmDelegate {}

    // SAFETY: the selectors and signatures below are those of `VZVirtualMachineDelegate`.
    unsafe impl VZVirtualMachineDelegate for VmDelegate {
        #[unsafe(method(guestDidStopVirtualMachine:))]
        fn guest_did_stop(&self, _vm: &VZVirtualMachine) {
            self.ivars().apply(|t| t.stopped(StopEvent::GuestStopped));
        }

        #[unsafe(method(virtualMachine:didStopWithError:))]
        fn did_stop_with_error(&self, _vm: &VZVirtualMachine, error: &NSError) {
            let error = FrameworkError::from_ns(error);
            tracing::warn!(%error, "VM stopped with an error");
            self.ivars().apply(|t| t.stopped(StopEvent::Error(error.to_string())));
        }

        #[unsafe(method(virtualMachine:networkDevice:attachmentWasDisconnectedWithError:))]
        fn attachment_disconnected(&self, _vm: &VZVirtualMachine, _device: &VZNetworkDevice, error: &NSError) {
            let error = FrameworkError::from_ns(error);
            tracing::warn!(%error, "VM network attachment was disconnected");
        }
    }
);

impl VmDelegate {
    /// A delegate reporting to `publisher`.
    pub fn new(publisher: Arc<StatePublisher>) -> Retained<Self> {
        let this = Self::alloc().set_ivars(publisher);
        // SAFETY: `init` of NSObject takes no arguments and returns an initialised object.
        unsafe { msg_send![super(this), init] }
    }
}
