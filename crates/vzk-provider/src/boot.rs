//! What a pod's VM boots: the boot loader and the per-pod files it needs, chosen from the
//! image (its `config.json` and layers) and what this node's backend can do. Pure; the
//! caller clones the files and builds the VM.
//!
//! | image | backend can | boots with |
//! |---|---|---|
//! | darwin (agoda, Tart, vzk) with hardware model, machine id and an aux layer | macOS | the macOS boot loader; `aux.img` cloned per pod (the guest writes it) |
//! | linux with a kernel layer | Linux kernel boot | the kernel (+ initrd, the image's command line) |
//! | linux without a kernel | EFI | EFI firmware from the disk, a per-pod variable store |
//!
//! Anything else is refused with reason `InvalidVMImage` and a message that says what is
//! missing or which kind of host the image needs.

use std::path::{Path, PathBuf};

use vzk_image::{GuestOs, VmConfig};
use vzk_vm::{BootKind, BootSpec, Capabilities};

/// The image's files a boot may use (paths in the image cache).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFiles {
    /// The Linux kernel layer.
    pub kernel: Option<PathBuf>,
    /// The initrd layer.
    pub initrd: Option<PathBuf>,
    /// The macOS auxiliary storage layer (`aux.img`, NVRAM).
    pub aux: Option<PathBuf>,
}

/// How the VM boots, and the per-pod copy the boot needs first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    /// The boot spec (its paths point into the pod's directory where per-pod).
    pub spec: BootSpec,
    /// `(from, to)`: a file of the image to clone into the pod before booting.
    pub clone: Option<(PathBuf, PathBuf)>,
}

/// Why an image cannot boot on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BootError(pub String);

impl BootError {
    /// The container's waiting reason.
    pub fn reason(&self) -> &'static str {
        "InvalidVMImage"
    }
}

/// Chooses the boot of `image` (named `name` in messages) on a backend with `caps`,
/// with per-pod files under `pod_dir`.
pub fn plan(
    name: &str,
    config: &VmConfig,
    files: &ImageFiles,
    caps: &Capabilities,
    pod_dir: &Path,
) -> Result<BootPlan, BootError> {
    let can = |k: BootKind| caps.boot_kinds.contains(&k);
    match config.os {
        GuestOs::Darwin => {
            if !can(BootKind::MacOs) {
                return Err(BootError(format!(
                    "image {name} is a macOS image: it boots only on an Apple Silicon Mac \
                     (Virtualization.framework); this node runs the {} backend",
                    caps.backend
                )));
            }
            let platform = config.mac_platform().map_err(|e| {
                BootError(format!(
                    "image {name} is a macOS image but its config.json cannot boot it: {}",
                    vzk_core::error_chain(&e)
                ))
            })?;
            let Some(aux) = &files.aux else {
                return Err(BootError(format!(
                    "image {name} is a macOS image without an auxiliary storage (aux.img) layer"
                )));
            };
            let aux_storage = pod_dir.join("aux.img");
            Ok(BootPlan {
                spec: BootSpec::MacOs {
                    aux_storage: aux_storage.clone(),
                    hardware_model: platform.hardware_model,
                    machine_id: platform.machine_identifier,
                },
                clone: Some((aux.clone(), aux_storage)),
            })
        }
        GuestOs::Linux => match &files.kernel {
            Some(kernel) if can(BootKind::LinuxKernel) => Ok(BootPlan {
                spec: BootSpec::LinuxKernel {
                    kernel: kernel.clone(),
                    initrd: files.initrd.clone(),
                    cmdline: config
                        .kernel_cmdline
                        .clone()
                        .unwrap_or_else(|| "console=ttyS0".into()),
                },
                clone: None,
            }),
            None if can(BootKind::Efi) => Ok(BootPlan {
                spec: BootSpec::Efi {
                    variable_store: pod_dir.join("efi-vars.fd"),
                },
                clone: None,
            }),
            None => Err(BootError(format!(
                "image {name} has no kernel layer and the {} backend here cannot boot EFI \
                 (install OVMF, or push the image with a kernel)",
                caps.backend
            ))),
            Some(_) => Err(BootError(format!(
                "image {name} boots a Linux kernel, which the {} backend cannot do",
                caps.backend
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vzk_vm::BackendKind;

    /// The reference's `example/config.json` platform fields (macOS-vz-kubelet).
    const HW: &str = "YnBsaXN0MDDTAQIDBAUGXxAZRGF0YVJlcHJlc2VudGF0aW9uVmVyc2lvbl8QD1BsYXRmb3JtVmVyc2lvbl8QEk1pbmltdW1TdXBwb3J0ZWRPUxQAAAAAAAAAAAAAAAAAAAABEAKjBwgIEA0QAAgPKz1SY2VpawAAAAAAAAEBAAAAAAAAAAkAAAAAAAAAAAAAAAAAAABt";
    const ID: &str =
        "YnBsaXN0MDDRAQJURUNJRBMWYaHTD7Jo1QgLEAAAAAAAAAEBAAAAAAAAAAMAAAAAAAAAAAAAAAAAAAAZ";

    fn caps(backend: BackendKind, boot_kinds: Vec<BootKind>) -> Capabilities {
        Capabilities {
            backend,
            accelerator: "test".into(),
            hardware_accelerated: true,
            cpus: (1, 8),
            memory_bytes: (1 << 30, 16 << 30),
            boot_kinds,
            disk_formats: vec![],
            nat: true,
            bridged: true,
            shared_dirs: true,
            max_running_vms: None,
            vms_outlive_agent: true,
            snapshots: false,
            snapshot_devices: vzk_vm::SnapshotDevices::HotPlug,
            version: String::new(),
        }
    }

    fn vz() -> Capabilities {
        caps(
            BackendKind::Vz,
            vec![BootKind::MacOs, BootKind::LinuxKernel, BootKind::Efi],
        )
    }

    fn qemu(efi: bool) -> Capabilities {
        let mut kinds = vec![BootKind::LinuxKernel];
        if efi {
            kinds.push(BootKind::Efi);
        }
        caps(BackendKind::Qemu, kinds)
    }

    fn config(json: &str) -> VmConfig {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
    }

    fn darwin() -> VmConfig {
        config(&format!(
            r#"{{"mediatype":"application/vnd.agoda.macosvz.config.v1+json","os":"darwin","hardwareModelData":"{HW}","machineIdData":"{ID}"}}"#
        ))
    }

    fn mac_files() -> ImageFiles {
        ImageFiles {
            aux: Some("/cache/sha256-aux/aux.img".into()),
            ..ImageFiles::default()
        }
    }

    #[test]
    fn a_macos_image_boots_the_mac_loader_from_a_per_pod_aux_clone() {
        let p = plan(
            "mac:14",
            &darwin(),
            &mac_files(),
            &vz(),
            Path::new("/pods/u1"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let BootSpec::MacOs {
            aux_storage,
            hardware_model,
            machine_id,
        } = &p.spec
        else {
            panic!("{p:?}")
        };
        assert_eq!(aux_storage, Path::new("/pods/u1/aux.img"));
        assert!(hardware_model.starts_with(b"bplist00"));
        assert!(
            machine_id.windows(4).any(|w| w == b"ECID"),
            "the image's machine identifier"
        );
        assert_eq!(
            p.clone,
            Some((
                PathBuf::from("/cache/sha256-aux/aux.img"),
                PathBuf::from("/pods/u1/aux.img")
            ))
        );
    }

    #[test]
    fn a_tart_config_reaches_the_same_boot() {
        // Tart's own field names, converted by vzk-image's Tart reader.
        let tart = vzk_image::tart::convert_config(
            format!(
                r#"{{"version":1,"os":"darwin","arch":"arm64","cpuCount":4,"memorySize":8589934592,"hardwareModel":"{HW}","ecid":"{ID}"}}"#
            )
            .as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let p = plan("tart", &tart, &mac_files(), &vz(), Path::new("/p"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.spec.kind(), BootKind::MacOs);
    }

    #[test]
    fn a_macos_image_on_linux_names_the_host_it_needs() {
        let e = plan(
            "mac:14",
            &darwin(),
            &mac_files(),
            &qemu(true),
            Path::new("/p"),
        )
        .expect_err("QEMU cannot boot macOS");
        assert!(e.0.contains("Apple Silicon Mac"), "{e}");
        assert!(e.0.contains("qemu"), "{e}");
        assert_eq!(e.reason(), "InvalidVMImage");
    }

    #[test]
    fn broken_macos_images_say_what_is_missing() {
        let e = plan(
            "m",
            &darwin(),
            &ImageFiles::default(),
            &vz(),
            Path::new("/p"),
        )
        .expect_err("no aux");
        assert!(e.0.contains("aux.img"), "{e}");
        let no_id = config(&format!(r#"{{"os":"darwin","hardwareModelData":"{HW}"}}"#));
        let e = plan("m", &no_id, &mac_files(), &vz(), Path::new("/p")).expect_err("no id");
        assert!(e.0.contains("machineIdData"), "{e}");
        let not_plist =
            config(r#"{"os":"darwin","hardwareModelData":"aGVsbG8=","machineIdData":"aGVsbG8="}"#);
        let e = plan("m", &not_plist, &mac_files(), &vz(), Path::new("/p")).expect_err("junk");
        assert!(e.0.contains("property list"), "{e}");
    }

    #[test]
    fn linux_images_boot_their_kernel_or_efi() {
        let linux = config(r#"{"os":"linux","kernelCmdline":"console=hvc0 quiet"}"#);
        let kernel = ImageFiles {
            kernel: Some("/c/k".into()),
            initrd: Some("/c/i".into()),
            aux: None,
        };
        for caps in [qemu(false), vz()] {
            let p = plan("l", &linux, &kernel, &caps, Path::new("/p"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                p.spec,
                BootSpec::LinuxKernel {
                    kernel: "/c/k".into(),
                    initrd: Some("/c/i".into()),
                    cmdline: "console=hvc0 quiet".into()
                }
            );
        }
        let bare = ImageFiles::default();
        let p = plan("l", &linux, &bare, &vz(), Path::new("/p")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.spec,
            BootSpec::Efi {
                variable_store: "/p/efi-vars.fd".into()
            }
        );
        let e = plan("l", &linux, &bare, &qemu(false), Path::new("/p")).expect_err("no OVMF");
        assert!(e.0.contains("cannot boot EFI"), "{e}");
        let no_cmdline = config(r#"{"os":"linux"}"#);
        let p = plan("l", &no_cmdline, &kernel, &qemu(false), Path::new("/p"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(&p.spec, BootSpec::LinuxKernel { cmdline, .. } if cmdline == "console=ttyS0")
        );
    }
}
