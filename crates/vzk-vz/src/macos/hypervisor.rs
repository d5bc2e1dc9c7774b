//! [`VzHypervisor`]: the [`Hypervisor`] of macOS hosts.
//!
//! Contract: [`VzHypervisor::new`] fails with [`HypervisorError::Unavailable`] when
//! the framework says virtualization is not supported here (no entitlement, nested
//! virtualization, old OS). [`Hypervisor::create`] checks the spec against the
//! [`Capabilities`] and [`derive`]s the machine (errors become
//! [`HypervisorError::InvalidSpec`]), then builds and validates it on the VM's queue
//! (framework errors become [`HypervisorError::Create`]). VMs run inside the agent
//! process, so [`Hypervisor::adopt_existing`] finds none.

use std::sync::Arc;

use async_trait::async_trait;
use objc2_virtualization::VZVirtualMachine;
use vzk_vm::{BackendKind, Capabilities, Hypervisor, HypervisorError, ProbeReport, Vm, VmSpec};

use super::build::host_bounds;
use super::vm::VzVm;
use crate::capabilities::{HostFeatures, capabilities};
use crate::config::{VzOptions, derive};
use crate::discovery::watch::Sources;
use crate::limits::Bounds;

/// The Virtualization.framework backend.
#[derive(Debug)]
pub struct VzHypervisor {
    capabilities: Capabilities,
    bounds: Bounds,
    options: VzOptions,
    discovery: Sources,
}

/// Whether the framework has `VZNetworkBlockDeviceStorageDeviceAttachment` (macOS 14+).
fn nbd_attachment_available() -> bool {
    objc2::runtime::AnyClass::get(c"VZNetworkBlockDeviceStorageDeviceAttachment").is_some()
}

/// Whether `VZVirtualMachine` can save and restore its machine state (macOS 14+).
fn save_restore_available() -> bool {
    objc2::runtime::AnyClass::get(c"VZVirtualMachine").is_some_and(|c| {
        c.responds_to(objc2::sel!(restoreMachineStateFromURL:completionHandler:))
            && c.responds_to(objc2::sel!(saveMachineStateToURL:completionHandler:))
    })
}

/// The host's macOS build (`sysctl kern.osversion`, e.g. `23F79`); empty if unreadable.
#[cfg(target_os = "macos")]
fn os_build() -> String {
    let mut buf = [0u8; 64];
    let mut len = buf.len();
    // SAFETY: a NUL-terminated name, a buffer of `len` bytes and its length; no new value.
    let rc = unsafe {
        libc::sysctlbyname(
            c"kern.osversion".as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return String::new();
    }
    let text = buf.get(..len).unwrap_or_default();
    String::from_utf8_lossy(text)
        .trim_end_matches('\0')
        .to_owned()
}

/// (The type-check of this layer on other hosts: there is no macOS build.)
#[cfg(not(target_os = "macos"))]
fn os_build() -> String {
    String::new()
}

fn supported() -> bool {
    // SAFETY: class property without preconditions.
    unsafe { VZVirtualMachine::isSupported() }
}

impl VzHypervisor {
    /// The backend, if this host supports virtualization.
    pub fn new(options: VzOptions) -> Result<Self, HypervisorError> {
        if !supported() {
            return Err(HypervisorError::Unavailable {
                backend: BackendKind::Vz,
                detail: "VZVirtualMachine.isSupported is false".into(),
            });
        }
        let bounds = host_bounds();
        Ok(Self {
            capabilities: capabilities(
                &bounds,
                &HostFeatures {
                    apple_silicon: cfg!(target_arch = "aarch64"),
                    nbd_disks: nbd_attachment_available(),
                    save_restore: save_restore_available(),
                    os_build: os_build(),
                },
            ),
            bounds,
            options,
            discovery: Sources::macos(),
        })
    }

    /// Whether the backend can run here, and why.
    pub fn probe() -> ProbeReport {
        let available = supported();
        let detail = if available {
            let b = host_bounds();
            format!(
                "Virtualization.framework: {}-{} CPUs, {}-{} bytes per VM",
                b.min_cpus, b.max_cpus, b.min_memory, b.max_memory
            )
        } else {
            "VZVirtualMachine.isSupported is false".into()
        };
        ProbeReport {
            backend: BackendKind::Vz,
            available,
            detail,
        }
    }
}

use vzk_core::error_chain as chain;

#[async_trait]
impl Hypervisor for VzHypervisor {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        self.capabilities.check(&spec)?;
        let id = spec.id.clone();
        let config = derive(&spec, &self.options, &self.bounds).map_err(|e| {
            HypervisorError::InvalidSpec {
                id: id.clone(),
                message: chain(&e),
            }
        })?;
        let vm = VzVm::create(spec, config, self.discovery.clone())
            .await
            .map_err(|e| HypervisorError::Create {
                id,
                source: Box::new(e),
            })?;
        Ok(vm)
    }

    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        Ok(Vec::new())
    }
}
