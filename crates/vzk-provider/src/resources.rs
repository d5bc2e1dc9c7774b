//! CPU and memory of a VM from container 0's `resources`, checked against the
//! backend's bounds.
//!
//! # Contract
//! * CPU: `limits.cpu` wins over `requests.cpu`; the value must be a whole number of
//!   cores (`2`, `2000m`); a fractional value (`500m`, `1.5`) is rejected, because a VM
//!   gets whole vCPUs and silently rounding would lie to the scheduler.
//! * Memory: `limits.memory` wins over `requests.memory`, in bytes (binary and decimal
//!   suffixes, rounded up to a whole byte like `Quantity.Value()`).
//! * Missing values fall back to the image's `config.json` defaults, then to the
//!   provider defaults, raised to the image's minimums (`minCpus`, `minMemoryBytes`:
//!   what a macOS restore image requires). A request below a minimum is refused.
//! * The result must lie inside the backend's [`vzk_vm::Capabilities`] bounds; anything
//!   else is a [`ResourceError`] that the provider reports as a permanent
//!   `ProviderError::Invalid`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Why container 0's resources cannot be given to a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// A quantity could not be parsed.
    #[error("cannot parse {field} quantity {value:?}")]
    ParseQuantity {
        /// `cpu` or `memory`.
        field: &'static str,
        /// The text.
        value: String,
    },
    /// The CPU count is not a whole number of cores.
    #[error("a VM gets whole vCPUs; {value:?} is fractional")]
    FractionalCpu {
        /// The text.
        value: String,
    },
    /// The CPU count is outside the backend's bounds.
    #[error("{cpus} vCPUs is outside the backend's range [{min}, {max}]")]
    CpuOutOfBounds {
        /// Asked for.
        cpus: u64,
        /// Lowest allowed.
        min: u32,
        /// Highest allowed.
        max: u32,
    },
    /// Fewer vCPUs than the image's minimum.
    #[error("the image needs at least {min} vCPUs; {cpus} asked")]
    CpuBelowImageMinimum {
        /// Asked for.
        cpus: u64,
        /// The image's minimum.
        min: u32,
    },
    /// Less memory than the image's minimum.
    #[error(
        "the image needs at least {} of memory; {} asked",
        human_bytes(*min),
        human_bytes(*bytes)
    )]
    MemoryBelowImageMinimum {
        /// Asked for.
        bytes: u64,
        /// The image's minimum.
        min: u64,
    },
    /// The memory size is outside the backend's bounds.
    #[error(
        "{} of memory is outside the backend's range [{}, {}]",
        human_bytes(*bytes),
        human_bytes(*min),
        human_bytes(*max)
    )]
    MemoryOutOfBounds {
        /// Asked for.
        bytes: u64,
        /// Lowest allowed.
        min: u64,
        /// Highest allowed.
        max: u64,
    },
}

impl ResourceError {
    /// The CamelCase reason for status and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ParseQuantity { .. } => "InvalidResources",
            Self::FractionalCpu { .. }
            | Self::CpuOutOfBounds { .. }
            | Self::CpuBelowImageMinimum { .. } => "InvalidCPU",
            Self::MemoryOutOfBounds { .. } | Self::MemoryBelowImageMinimum { .. } => {
                "InvalidMemory"
            }
        }
    }
}

/// What a VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmResources {
    /// Whole vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// Defaults and bounds for [`vm_resources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourcePolicy {
    /// vCPUs when neither the pod nor the image says.
    pub default_cpus: u32,
    /// Memory when neither the pod nor the image says.
    pub default_memory_bytes: u64,
    /// Backend bounds (inclusive).
    pub cpus: (u32, u32),
    /// Backend bounds in bytes (inclusive).
    pub memory_bytes: (u64, u64),
}

fn pick<'a>(res: Option<&'a ResourceRequirements>, name: &str) -> Option<&'a Quantity> {
    let get = |m: Option<&'a BTreeMap<String, Quantity>>| m.and_then(|m| m.get(name));
    get(res.and_then(|r| r.limits.as_ref())).or_else(|| get(res.and_then(|r| r.requests.as_ref())))
}

/// Whole cores of a CPU quantity.
pub fn parse_cpus(text: &str) -> Result<u64, ResourceError> {
    let bad = || ResourceError::ParseQuantity {
        field: "cpu",
        value: text.to_owned(),
    };
    let millis = vzk_core::quantity::cpu_millis(text).map_err(|_| bad())?;
    if millis % 1000 != 0 {
        return Err(ResourceError::FractionalCpu {
            value: text.to_owned(),
        });
    }
    Ok(millis / 1000)
}

/// Bytes of a memory quantity, rounded up.
pub fn parse_bytes(text: &str) -> Result<u64, ResourceError> {
    vzk_core::quantity::bytes(text).map_err(|_| ResourceError::ParseQuantity {
        field: "memory",
        value: text.to_owned(),
    })
}

/// What an image's `config.json` says about resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageShape {
    /// Default vCPUs.
    pub cpus: Option<u32>,
    /// Default memory.
    pub memory_bytes: Option<u64>,
    /// Fewest vCPUs.
    pub min_cpus: Option<u32>,
    /// Least memory.
    pub min_memory_bytes: Option<u64>,
}

impl From<&vzk_image::VmConfig> for ImageShape {
    fn from(c: &vzk_image::VmConfig) -> Self {
        Self {
            cpus: c.cpus,
            memory_bytes: c.memory_bytes,
            min_cpus: c.min_cpus,
            min_memory_bytes: c.min_memory_bytes,
        }
    }
}

/// The VM's resources for container 0 with `resources`, image defaults
/// (`image_cpus`, `image_memory`) and `policy` (an image without minimums).
pub fn vm_resources(
    resources: Option<&ResourceRequirements>,
    image_cpus: Option<u32>,
    image_memory: Option<u64>,
    policy: &ResourcePolicy,
) -> Result<VmResources, ResourceError> {
    let image = ImageShape {
        cpus: image_cpus,
        memory_bytes: image_memory,
        ..ImageShape::default()
    };
    vm_resources_for(resources, image, policy)
}

/// The VM's resources for container 0 with `resources`, `image`'s defaults and
/// minimums, and `policy`.
pub fn vm_resources_for(
    resources: Option<&ResourceRequirements>,
    image: ImageShape,
    policy: &ResourcePolicy,
) -> Result<VmResources, ResourceError> {
    let min_cpus = image.min_cpus.unwrap_or(0);
    let min_memory = image.min_memory_bytes.unwrap_or(0);
    let cpus = match pick(resources, "cpu") {
        Some(q) => {
            let cpus = parse_cpus(&q.0)?;
            if cpus < u64::from(min_cpus) {
                return Err(ResourceError::CpuBelowImageMinimum {
                    cpus,
                    min: min_cpus,
                });
            }
            cpus
        }
        None => u64::from(image.cpus.unwrap_or(policy.default_cpus).max(min_cpus)),
    };
    let memory_bytes = match pick(resources, "memory") {
        Some(q) => {
            let bytes = parse_bytes(&q.0)?;
            if bytes < min_memory {
                return Err(ResourceError::MemoryBelowImageMinimum {
                    bytes,
                    min: min_memory,
                });
            }
            bytes
        }
        None => image
            .memory_bytes
            .unwrap_or(policy.default_memory_bytes)
            .max(min_memory),
    };
    let (lo, hi) = policy.cpus;
    if cpus < u64::from(lo) || cpus > u64::from(hi) {
        return Err(ResourceError::CpuOutOfBounds {
            cpus,
            min: lo,
            max: hi,
        });
    }
    let (mlo, mhi) = policy.memory_bytes;
    if memory_bytes < mlo || memory_bytes > mhi {
        return Err(ResourceError::MemoryOutOfBounds {
            bytes: memory_bytes,
            min: mlo,
            max: mhi,
        });
    }
    Ok(VmResources {
        cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
        memory_bytes,
    })
}

/// `bytes` in the largest binary unit that divides it (`512 MiB`, `1 EiB`), else bytes.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut best = None;
    for (i, unit) in UNITS.iter().enumerate() {
        let size = 1u64 << (10 * (i + 1));
        if bytes >= size && bytes.is_multiple_of(size) {
            best = Some(format!("{} {unit}", bytes / size));
        }
    }
    best.unwrap_or_else(|| format!("{bytes} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ResourcePolicy {
        ResourcePolicy {
            default_cpus: 1,
            default_memory_bytes: 256 << 20,
            cpus: (1, 4),
            memory_bytes: (64 << 20, 4 << 30),
        }
    }

    fn req(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
        let m = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                    .collect()
            })
        };
        ResourceRequirements {
            requests: m(requests),
            limits: m(limits),
            ..Default::default()
        }
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_cpus("2"), Ok(2));
        assert_eq!(parse_cpus("3000m"), Ok(3));
        assert_eq!(parse_cpus("1.0"), Ok(1));
        assert!(matches!(
            parse_cpus("500m"),
            Err(ResourceError::FractionalCpu { .. })
        ));
        assert!(matches!(
            parse_cpus("1.5"),
            Err(ResourceError::FractionalCpu { .. })
        ));
        assert!(matches!(
            parse_cpus("two"),
            Err(ResourceError::ParseQuantity { .. })
        ));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("1500m"), Ok(2), "rounded up");
        assert!(parse_bytes("12Qi").is_err());
    }

    #[test]
    fn limits_win_then_requests_then_image_then_defaults() {
        let p = policy();
        let r = req(&[("cpu", "1"), ("memory", "128Mi")], &[("cpu", "2")]);
        assert_eq!(
            vm_resources(Some(&r), Some(3), Some(1 << 30), &p),
            Ok(VmResources {
                cpus: 2,
                memory_bytes: 128 << 20
            })
        );
        assert_eq!(
            vm_resources(None, Some(3), Some(1 << 30), &p),
            Ok(VmResources {
                cpus: 3,
                memory_bytes: 1 << 30
            })
        );
        assert_eq!(
            vm_resources(None, None, None, &p),
            Ok(VmResources {
                cpus: 1,
                memory_bytes: 256 << 20
            })
        );
    }

    #[test]
    fn impossible_requests_name_the_reason() {
        let p = policy();
        let e = vm_resources(Some(&req(&[("cpu", "250m")], &[])), None, None, &p);
        assert_eq!(e.as_ref().map_err(ResourceError::reason), Err("InvalidCPU"));
        let e = vm_resources(Some(&req(&[("cpu", "16")], &[])), None, None, &p);
        assert!(matches!(
            e,
            Err(ResourceError::CpuOutOfBounds { cpus: 16, .. })
        ));
        let e = vm_resources(Some(&req(&[], &[("memory", "1Mi")])), None, None, &p);
        assert_eq!(
            e.as_ref().map_err(ResourceError::reason),
            Err("InvalidMemory")
        );
    }

    #[test]
    fn image_minimums_raise_defaults_and_refuse_smaller_requests() {
        let p = ResourcePolicy {
            cpus: (1, 8),
            memory_bytes: (64 << 20, 16 << 30),
            ..policy()
        };
        let mac = ImageShape {
            cpus: None,
            memory_bytes: None,
            min_cpus: Some(4),
            min_memory_bytes: Some(8 << 30),
        };
        // No request: the defaults (1 vCPU, 256 MiB) are raised to the minimums.
        assert_eq!(
            vm_resources_for(None, mac, &p),
            Ok(VmResources {
                cpus: 4,
                memory_bytes: 8 << 30
            })
        );
        let Err(e) = vm_resources_for(Some(&req(&[("cpu", "2")], &[])), mac, &p) else {
            panic!("2 vCPUs granted below the minimum of 4")
        };
        assert_eq!(e, ResourceError::CpuBelowImageMinimum { cpus: 2, min: 4 });
        assert_eq!(e.reason(), "InvalidCPU");
        assert_eq!(e.to_string(), "the image needs at least 4 vCPUs; 2 asked");
        let Err(e) = vm_resources_for(Some(&req(&[("memory", "4Gi")], &[])), mac, &p) else {
            panic!("4 GiB granted below the minimum of 8 GiB")
        };
        assert_eq!(e.reason(), "InvalidMemory");
        assert!(e.to_string().contains("at least 8 GiB of memory"), "{e}");
        // Enough: granted as asked.
        assert_eq!(
            vm_resources_for(Some(&req(&[("cpu", "6"), ("memory", "8Gi")], &[])), mac, &p),
            Ok(VmResources {
                cpus: 6,
                memory_bytes: 8 << 30
            })
        );
    }
}
