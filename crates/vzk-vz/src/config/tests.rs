//! Unit tests of [`super::derive`].

use vzk_vm::{
    BootKind, BootSpec, DiskFormat, DiskSpec, MacAddr, NetworkAttachment, NicSpec, SharedDirSpec,
    VmSpec,
};

use super::*;
use crate::limits::MIB;

const BOUNDS: Bounds = Bounds {
    min_cpus: 1,
    max_cpus: 8,
    min_memory: 128 * MIB,
    max_memory: 16 << 30,
};

fn mac_spec() -> VmSpec {
    VmSpec {
        id: "default-mac-0".into(),
        cpus: 4,
        memory_bytes: 8 << 30,
        boot: BootSpec::MacOs {
            aux_storage: "/cache/clone/aux.img".into(),
            hardware_model: b"bplist00hw".to_vec(),
            machine_id: b"bplist00id".to_vec(),
        },
        disks: vec![DiskSpec {
            path: "/cache/clone/disk.img".into(),
            read_only: false,
            format: DiskFormat::Raw,
        }],
        nics: vec![NicSpec {
            mac: MacAddr([0x0a, 1, 2, 3, 4, 5]),
            attachment: NetworkAttachment::Nat,
        }],
        shared_dirs: vec![],
        console_log: None,
        snapshot: None,
    }
}

fn linux_spec() -> VmSpec {
    VmSpec {
        id: "default-linux-0".into(),
        cpus: 2,
        memory_bytes: 512 * MIB,
        boot: BootSpec::LinuxKernel {
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd".into()),
            cmdline: "console=hvc0".into(),
        },
        disks: vec![DiskSpec {
            path: "/img/root.img".into(),
            read_only: false,
            format: DiskFormat::Raw,
        }],
        nics: vec![NicSpec {
            mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
            attachment: NetworkAttachment::Bridged {
                interface: "en0".into(),
            },
        }],
        shared_dirs: vec![],
        console_log: Some("/pods/uid/console.log".into()),
        snapshot: None,
    }
}

fn share(tag: &str, path: &str, read_only: bool) -> SharedDirSpec {
    SharedDirSpec {
        tag: tag.into(),
        host_path: path.into(),
        read_only,
    }
}

fn ok(spec: &VmSpec, options: &VzOptions) -> VzConfig {
    derive(spec, options, &BOUNDS).unwrap_or_else(|e| panic!("{e:?}"))
}

#[test]
fn macos_guest_gets_the_reference_machine() {
    let cfg = ok(&mac_spec(), &VzOptions::default());
    assert_eq!(cfg.cpus, 4);
    assert_eq!(cfg.memory_bytes, 8 << 30);
    assert_eq!(
        cfg.platform,
        Platform::Mac {
            aux_storage: "/cache/clone/aux.img".into(),
            hardware_model: b"bplist00hw".to_vec(),
            machine_identifier: MachineIdentifier::FromImage(b"bplist00id".to_vec()),
        }
    );
    assert_eq!(
        cfg.disks,
        vec![Disk {
            source: DiskSource::Image("/cache/clone/disk.img".into()),
            read_only: false
        }]
    );
    assert_eq!(
        cfg.nics,
        vec![Nic {
            mac: MacAddr([0x0a, 1, 2, 3, 4, 5]),
            attachment: NetworkAttachment::Nat
        }]
    );
    assert_eq!(
        cfg.graphics,
        Some(Graphics::Mac {
            width: 1920,
            height: 1200,
            ppi: 80
        })
    );
    assert!(cfg.is_mac() && cfg.input_devices && !cfg.entropy);
    assert!(cfg.shares.is_empty());
    assert_eq!(cfg.serial_log, None);
}

#[test]
fn fresh_machine_identifier_option_replaces_the_image_one() {
    let mut spec = mac_spec();
    if let BootSpec::MacOs { machine_id, .. } = &mut spec.boot {
        machine_id.clear(); // not needed when a fresh one is made
    }
    let cfg = ok(
        &spec,
        &VzOptions {
            fresh_machine_identifier: true,
            ..VzOptions::default()
        },
    );
    assert!(matches!(
        cfg.platform,
        Platform::Mac {
            machine_identifier: MachineIdentifier::Fresh,
            ..
        }
    ));
    let err = derive(&spec, &VzOptions::default(), &BOUNDS);
    assert!(
        matches!(
            err,
            Err(ConfigError::EmptyPlatformData {
                field: "machine identifier"
            })
        ),
        "{err:?}"
    );
}

#[test]
fn macos_shares_are_one_automount_device_keyed_by_tag() {
    let mut spec = mac_spec();
    spec.shared_dirs = vec![
        share("data", "/vol/a", false),
        share("config", "/vol/b", true),
    ];
    let cfg = ok(&spec, &VzOptions::default());
    assert_eq!(
        cfg.shares,
        vec![ShareDevice {
            tag: ShareTag::MacAutomount,
            entries: vec![
                ShareEntry {
                    name: "data".into(),
                    host_path: "/vol/a".into(),
                    read_only: false
                },
                ShareEntry {
                    name: "config".into(),
                    host_path: "/vol/b".into(),
                    read_only: true
                },
            ],
        }]
    );
}

#[test]
fn linux_guest_gets_kernel_boot_serial_entropy_and_one_device_per_share() {
    let mut spec = linux_spec();
    spec.shared_dirs = vec![share("data", "/vol/a", false), share("cfg", "/vol/b", true)];
    let cfg = ok(
        &spec,
        &VzOptions {
            linux_display: Some((1024, 768)),
            ..VzOptions::default()
        },
    );
    assert_eq!(
        cfg.platform,
        Platform::LinuxKernel {
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd".into()),
            cmdline: "console=hvc0".into()
        }
    );
    assert_eq!(cfg.serial_log, Some(PathBuf::from("/pods/uid/console.log")));
    assert_eq!(
        cfg.graphics,
        Some(Graphics::Virtio {
            width: 1024,
            height: 768
        })
    );
    assert!(!cfg.is_mac() && !cfg.input_devices && cfg.entropy);
    assert_eq!(cfg.shares.len(), 2);
    assert_eq!(cfg.shares[1].tag, ShareTag::Named("cfg".into()));
    assert_eq!(
        cfg.shares[1].entries,
        vec![ShareEntry {
            name: "cfg".into(),
            host_path: "/vol/b".into(),
            read_only: true
        }]
    );
    assert_eq!(
        cfg.nics[0].attachment,
        NetworkAttachment::Bridged {
            interface: "en0".into()
        }
    );
    // No display unless asked.
    assert_eq!(ok(&spec, &VzOptions::default()).graphics, None);
}

#[test]
fn efi_guest_needs_a_disk() {
    let mut spec = linux_spec();
    spec.boot = BootSpec::Efi {
        variable_store: "/pods/uid/efi-vars".into(),
    };
    let cfg = ok(&spec, &VzOptions::default());
    assert_eq!(
        cfg.platform,
        Platform::Efi {
            variable_store: "/pods/uid/efi-vars".into()
        }
    );
    spec.disks.clear();
    assert!(matches!(
        derive(&spec, &VzOptions::default(), &BOUNDS),
        Err(ConfigError::NoBootDisk {
            boot: BootKind::Efi
        })
    ));
    // A kernel-booted guest may run diskless (initramfs only).
    let mut diskless = linux_spec();
    diskless.disks.clear();
    assert!(derive(&diskless, &VzOptions::default(), &BOUNDS).is_ok());
}

#[test]
fn resources_are_checked_against_bounds() {
    let mut spec = mac_spec();
    spec.cpus = 9;
    let err = derive(&spec, &VzOptions::default(), &BOUNDS);
    assert!(
        matches!(
            err,
            Err(ConfigError::Resources(LimitsError::CpuOutOfBounds {
                cpus: 9,
                ..
            }))
        ),
        "{err:?}"
    );
    let mut spec = mac_spec();
    spec.memory_bytes = 4_000_000_000;
    let err = derive(&spec, &VzOptions::default(), &BOUNDS);
    assert!(
        matches!(
            err,
            Err(ConfigError::Resources(
                LimitsError::MemoryNotMibMultiple { .. }
            ))
        ),
        "{err:?}"
    );
}

#[test]
fn an_nbd_disk_becomes_the_nbd_attachment_on_its_socket() {
    let mut spec = linux_spec();
    spec.disks[0] = DiskSpec {
        path: "/var/lib/vzk/images/tmp/nbd-pod-0123.sock".into(),
        read_only: false,
        format: DiskFormat::Nbd,
    };
    let cfg = derive(&spec, &VzOptions::default(), &BOUNDS).expect("derive");
    assert_eq!(
        cfg.disks,
        vec![Disk {
            source: DiskSource::Nbd(
                "nbd+unix:///disk?socket=/var/lib/vzk/images/tmp/nbd-pod-0123.sock".into()
            ),
            read_only: false
        }]
    );
    // Its socket is a path like any disk's: relative ones are refused.
    spec.disks[0].path = "nbd.sock".into();
    assert!(matches!(
        derive(&spec, &VzOptions::default(), &BOUNDS),
        Err(ConfigError::RelativePath { what: "disk", .. })
    ));
}

#[test]
fn qcow2_disks_are_rejected() {
    let mut spec = linux_spec();
    spec.disks[0].format = DiskFormat::Qcow2;
    let err = derive(&spec, &VzOptions::default(), &BOUNDS);
    assert!(
        matches!(
            err,
            Err(ConfigError::DiskFormat {
                index: 0,
                format: DiskFormat::Qcow2
            })
        ),
        "{err:?}"
    );
}

#[test]
fn relative_paths_are_rejected_by_name() {
    let mut spec = mac_spec();
    spec.disks[0].path = "disk.img".into();
    assert!(matches!(
        derive(&spec, &VzOptions::default(), &BOUNDS),
        Err(ConfigError::RelativePath { what: "disk", .. })
    ));
    let mut spec = linux_spec();
    spec.console_log = Some("console.log".into());
    assert!(matches!(
        derive(&spec, &VzOptions::default(), &BOUNDS),
        Err(ConfigError::RelativePath {
            what: "console log",
            ..
        })
    ));
}

#[test]
fn bad_nics_are_rejected() {
    let mut spec = linux_spec();
    spec.nics[0].mac = MacAddr([0x03, 0, 0, 0, 0, 1]);
    assert!(matches!(
        derive(&spec, &VzOptions::default(), &BOUNDS),
        Err(ConfigError::MulticastMac { index: 0, .. })
    ));
    let mut spec = linux_spec();
    spec.nics[0].attachment = NetworkAttachment::Bridged {
        interface: " ".into(),
    };
    assert!(matches!(
        derive(&spec, &VzOptions::default(), &BOUNDS),
        Err(ConfigError::EmptyBridgeInterface { index: 0 })
    ));
}

#[test]
fn bad_share_tags_are_rejected() {
    let cases: [(VmSpec, &str); 4] = [
        (mac_spec(), ""),
        (mac_spec(), "a/b"),
        (linux_spec(), "this-tag-is-definitely-longer-than-36-bytes"),
        (linux_spec(), ""),
    ];
    for (mut spec, tag) in cases {
        spec.shared_dirs = vec![share(tag, "/vol/a", false)];
        let err = derive(&spec, &VzOptions::default(), &BOUNDS);
        assert!(
            matches!(&err, Err(ConfigError::ShareTag { tag: t, .. }) if t == tag),
            "{tag:?}: {err:?}"
        );
    }
    // 36 bytes is fine for Linux; a macOS entry name has no such limit.
    let mut spec = linux_spec();
    spec.shared_dirs = vec![share(&"x".repeat(36), "/vol/a", false)];
    assert!(derive(&spec, &VzOptions::default(), &BOUNDS).is_ok());
    let mut spec = mac_spec();
    spec.shared_dirs = vec![share("d", "/a", false), share("d", "/b", false)];
    assert!(matches!(
        derive(&spec, &VzOptions::default(), &BOUNDS),
        Err(ConfigError::DuplicateShareTag { tag }) if tag == "d"
    ));
}

#[test]
fn a_saved_or_restored_machine_is_checked_for_saving_and_has_no_entropy_device() {
    let plain = ok(&linux_spec(), &VzOptions::default());
    assert!(plain.entropy);
    assert!(!plain.save_restore);
    for snapshot in [
        vzk_vm::SnapshotSpec::Template {
            state: "/t/state".into(),
        },
        vzk_vm::SnapshotSpec::Restore {
            state: "/t/state".into(),
        },
    ] {
        let mut spec = linux_spec();
        spec.snapshot = Some(snapshot);
        let cfg = ok(&spec, &VzOptions::default());
        assert!(!cfg.entropy, "{spec:?}");
        assert!(cfg.save_restore);
        // Everything a guest sees besides stays as in an ordinary boot.
        assert_eq!(cfg.nics, plain.nics);
        assert_eq!(cfg.disks, plain.disks);
    }
}
