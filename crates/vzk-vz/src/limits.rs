//! CPU and memory checked against Virtualization.framework's bounds.
//!
//! `VZVirtualMachineConfiguration` accepts a whole number of CPUs between
//! `minimumAllowedCPUCount` and `maximumAllowedCPUCount`, and a memory size between
//! `minimumAllowedMemorySize` and `maximumAllowedMemorySize` that is a multiple of 1 MiB.
//! The framework reports a violation only at `validate()` time with a generic message;
//! [`Bounds::check`] rejects it up front with an error naming the value and the bound.
//!
//! Contract: CPU arrives in millicores (Kubernetes quantities: `2` is 2000m); anything
//! that is not a whole CPU is rejected, never rounded. Memory arrives in bytes and is
//! never rounded either (rounding would silently give the guest a different size).

use crate::quantity::{self, QuantityError};

/// One MiB, the granularity of VM memory.
pub const MIB: u64 = 1 << 20;

/// An out-of-bounds or malformed CPU/memory request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    /// A request is not a usable Kubernetes quantity.
    #[error("the {resource} request is not usable")]
    Quantity {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// Why.
        #[source]
        source: QuantityError,
    },
    /// The CPU request is not a whole number of CPUs.
    #[error(
        "{millicpus}m CPU is not a whole number of CPUs: Virtualization.framework VMs take integer CPU counts"
    )]
    FractionalCpu {
        /// The request in millicores.
        millicpus: u64,
    },
    /// The CPU count is outside the framework's bounds.
    #[error("{cpus} CPUs is outside the allowed range {min}..={max}")]
    CpuOutOfBounds {
        /// The requested count.
        cpus: u64,
        /// `minimumAllowedCPUCount`.
        min: u64,
        /// `maximumAllowedCPUCount`.
        max: u64,
    },
    /// The memory size is not a multiple of 1 MiB.
    #[error(
        "memory of {bytes} bytes is not a multiple of 1 MiB (nearest: {lower_mib}Mi or {upper_mib}Mi)"
    )]
    MemoryNotMibMultiple {
        /// The requested size.
        bytes: u64,
        /// The nearest valid size below, in MiB.
        lower_mib: u64,
        /// The nearest valid size above, in MiB.
        upper_mib: u64,
    },
    /// The memory size is outside the framework's bounds.
    #[error("memory of {bytes} bytes is outside the allowed range {min}..={max} bytes")]
    MemoryOutOfBounds {
        /// The requested size.
        bytes: u64,
        /// `minimumAllowedMemorySize`.
        min: u64,
        /// `maximumAllowedMemorySize`.
        max: u64,
    },
}

/// The framework's bounds on CPU count and memory size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// `VZVirtualMachineConfiguration.minimumAllowedCPUCount`.
    pub min_cpus: u64,
    /// `VZVirtualMachineConfiguration.maximumAllowedCPUCount`.
    pub max_cpus: u64,
    /// `VZVirtualMachineConfiguration.minimumAllowedMemorySize`, bytes.
    pub min_memory: u64,
    /// `VZVirtualMachineConfiguration.maximumAllowedMemorySize`, bytes.
    pub max_memory: u64,
}

/// A checked CPU count and memory size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Whole CPUs.
    pub cpus: u64,
    /// Bytes, a multiple of [`MIB`].
    pub memory_bytes: u64,
}

impl Bounds {
    /// Checks a request of `millicpus` CPU and `memory_bytes` memory.
    pub fn check(&self, millicpus: u64, memory_bytes: u64) -> Result<Resources, LimitsError> {
        Ok(Resources {
            cpus: self.check_cpus(millicpus)?,
            memory_bytes: self.check_memory(memory_bytes)?,
        })
    }

    /// Checks container 0's requests given as Kubernetes quantities (`"2"`, `"4Gi"`).
    pub fn check_quantities(&self, cpu: &str, memory: &str) -> Result<Resources, LimitsError> {
        let millicpus = quantity::cpu_millis(cpu).map_err(|source| LimitsError::Quantity {
            resource: "cpu",
            source,
        })?;
        let bytes = quantity::bytes(memory).map_err(|source| LimitsError::Quantity {
            resource: "memory",
            source,
        })?;
        self.check(millicpus, bytes)
    }

    /// The whole CPU count of `millicpus`, within bounds.
    pub fn check_cpus(&self, millicpus: u64) -> Result<u64, LimitsError> {
        if !millicpus.is_multiple_of(1000) {
            return Err(LimitsError::FractionalCpu { millicpus });
        }
        let cpus = millicpus / 1000;
        if cpus < self.min_cpus || cpus > self.max_cpus {
            return Err(LimitsError::CpuOutOfBounds {
                cpus,
                min: self.min_cpus,
                max: self.max_cpus,
            });
        }
        Ok(cpus)
    }

    /// `bytes`, if it is a MiB multiple within bounds.
    pub fn check_memory(&self, bytes: u64) -> Result<u64, LimitsError> {
        if !bytes.is_multiple_of(MIB) {
            let lower_mib = bytes / MIB;
            return Err(LimitsError::MemoryNotMibMultiple {
                bytes,
                lower_mib,
                upper_mib: lower_mib + 1,
            });
        }
        if bytes < self.min_memory || bytes > self.max_memory {
            return Err(LimitsError::MemoryOutOfBounds {
                bytes,
                min: self.min_memory,
                max: self.max_memory,
            });
        }
        Ok(bytes)
    }
}

/// `VZErrorDomain`, the domain of Virtualization.framework's own errors.
pub const VZ_ERROR_DOMAIN: &str = "VZErrorDomain";
/// `VZErrorVirtualMachineLimitExceeded`: the host already runs as many VMs as the
/// framework allows (two macOS guests).
pub const VZ_ERROR_VM_LIMIT_EXCEEDED: isize = 6;

/// Whether a framework error (by domain and code) is the "too many VMs" refusal.
pub fn is_vm_limit_error(domain: &str, code: isize) -> bool {
    domain == VZ_ERROR_DOMAIN && code == VZ_ERROR_VM_LIMIT_EXCEEDED
}

#[cfg(test)]
mod tests {
    use super::*;

    // The values an M1 with 8 cores and 16 GiB reports.
    const M1: Bounds = Bounds {
        min_cpus: 1,
        max_cpus: 8,
        min_memory: 128 * MIB,
        max_memory: 16 << 30,
    };

    #[test]
    fn whole_cpus_and_mib_memory_within_bounds_pass() {
        assert_eq!(
            M1.check(4000, 8 << 30),
            Ok(Resources {
                cpus: 4,
                memory_bytes: 8 << 30
            })
        );
        assert_eq!(
            M1.check(1000, 128 * MIB),
            Ok(Resources {
                cpus: 1,
                memory_bytes: 128 * MIB
            })
        );
        assert_eq!(
            M1.check(8000, 16 << 30),
            Ok(Resources {
                cpus: 8,
                memory_bytes: 16 << 30
            })
        );
    }

    #[test]
    fn fractional_cpu_is_rejected_with_its_value() {
        let err = M1.check_cpus(1500).err();
        assert_eq!(err, Some(LimitsError::FractionalCpu { millicpus: 1500 }));
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("1500m") && msg.contains("whole number"),
            "{msg}"
        );
        assert_eq!(
            M1.check_cpus(500),
            Err(LimitsError::FractionalCpu { millicpus: 500 })
        );
    }

    #[test]
    fn cpu_outside_bounds_is_rejected() {
        assert_eq!(
            M1.check_cpus(0),
            Err(LimitsError::CpuOutOfBounds {
                cpus: 0,
                min: 1,
                max: 8
            })
        );
        assert_eq!(
            M1.check_cpus(9000),
            Err(LimitsError::CpuOutOfBounds {
                cpus: 9,
                min: 1,
                max: 8
            })
        );
    }

    #[test]
    fn memory_must_be_a_mib_multiple() {
        // "4G" in Kubernetes is 4e9 bytes, not a MiB multiple.
        let err = M1.check_memory(4_000_000_000);
        assert_eq!(
            err,
            Err(LimitsError::MemoryNotMibMultiple {
                bytes: 4_000_000_000,
                lower_mib: 3814,
                upper_mib: 3815
            })
        );
    }

    #[test]
    fn memory_outside_bounds_is_rejected() {
        assert!(matches!(
            M1.check_memory(64 * MIB),
            Err(LimitsError::MemoryOutOfBounds { .. })
        ));
        assert!(matches!(
            M1.check_memory(17 << 30),
            Err(LimitsError::MemoryOutOfBounds { .. })
        ));
        // CPU is checked first, memory second.
        assert!(matches!(
            M1.check(1500, 1),
            Err(LimitsError::FractionalCpu { .. })
        ));
        assert!(matches!(
            M1.check(1000, 1),
            Err(LimitsError::MemoryNotMibMultiple { .. })
        ));
    }

    #[test]
    fn kubernetes_quantities_are_checked() {
        assert_eq!(
            M1.check_quantities("2", "4Gi"),
            Ok(Resources {
                cpus: 2,
                memory_bytes: 4 << 30
            })
        );
        assert_eq!(
            M1.check_quantities("2000m", "4096Mi"),
            Ok(Resources {
                cpus: 2,
                memory_bytes: 4 << 30
            })
        );
        assert_eq!(
            M1.check_quantities("1.5", "4Gi"),
            Err(LimitsError::FractionalCpu { millicpus: 1500 })
        );
        assert!(matches!(
            M1.check_quantities("2", "4G"),
            Err(LimitsError::MemoryNotMibMultiple { .. })
        ));
        assert!(matches!(
            M1.check_quantities("two", "4Gi"),
            Err(LimitsError::Quantity {
                resource: "cpu",
                source: QuantityError::Parse { .. }
            })
        ));
        assert!(matches!(
            M1.check_quantities("2", "-4Gi"),
            Err(LimitsError::Quantity {
                resource: "memory",
                ..
            })
        ));
    }

    #[test]
    fn only_vz_error_6_is_the_vm_limit() {
        assert!(is_vm_limit_error("VZErrorDomain", 6));
        assert!(!is_vm_limit_error("VZErrorDomain", 2));
        assert!(!is_vm_limit_error("NSPOSIXErrorDomain", 6));
    }
}
