//! Translation of a [`VmSpec`] into a `qemu-system-x86_64` command line.
//!
//! Pure: no I/O, so every device mapping is unit-tested. Layout: q35 machine, no default
//! devices, no display; QMP on a Unix socket in the state dir; serial console appended to
//! the spec's log file; virtio-blk per disk, virtio-net per NIC on a TAP whose fd the
//! backend passes as `3 + nic index`; virtio-9p per shared directory.

use std::path::{Path, PathBuf};

use super::probe::Accel;
use crate::spec::{BootSpec, DiskFormat, NBD_EXPORT, SNAPSHOT_HOTPLUG_PORTS, SnapshotSpec, VmSpec};

/// The first fd number TAPs are passed on (NIC `i` is `TAP_FD_BASE + i`).
pub const TAP_FD_BASE: i32 = 3;
/// How long QEMU waits for an NBD disk's server to come back (an agent restarting)
/// before failing the guest's requests.
pub const NBD_RECONNECT_SECS: u32 = 60;

/// Host files the command line refers to besides the spec's.
#[derive(Debug, Clone)]
pub struct QemuPaths {
    /// The QMP socket.
    pub qmp_socket: PathBuf,
    /// If set, QEMU's fd number of a socket already bound at `qmp_socket` and listening
    /// (the agent's pre-bound listener); else QEMU binds `qmp_socket` itself.
    pub qmp_fd: Option<i32>,
    /// The pid file QEMU writes.
    pub pid_file: PathBuf,
    /// UEFI firmware code (for [`BootSpec::Efi`]), if available.
    pub ovmf_code: Option<PathBuf>,
}

/// Why a spec cannot be expressed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// macOS guests need Virtualization.framework.
    #[error("macOS guests are not supported by QEMU")]
    MacOsGuest,
    /// EFI boot without firmware.
    #[error("EFI boot needs OVMF firmware, none found")]
    NoFirmware,
    /// A path contains a comma, which QEMU's option syntax cannot carry safely here.
    #[error("path {0} contains a ','")]
    Comma(String),
}

fn opt_path(p: &Path) -> Result<String, CommandError> {
    let s = p.display().to_string();
    if s.contains(',') {
        return Err(CommandError::Comma(s));
    }
    Ok(s)
}

/// The full argument vector (without the binary).
pub fn qemu_args(
    spec: &VmSpec,
    accel: Accel,
    paths: &QemuPaths,
) -> Result<Vec<String>, CommandError> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    let cpu = accel.cpu_model();
    push(&["-name", &format!("vzk-{},process=vzk-{}", spec.id, spec.id)]);
    push(&[
        "-machine",
        &format!("q35,accel={}", accel.as_str()),
        "-cpu",
        cpu,
    ]);
    push(&[
        "-smp",
        &spec.cpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_bytes.div_ceil(1 << 20)),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
    ]);
    match paths.qmp_fd {
        // A socket the agent bound and listens on: it can connect before QEMU is up.
        Some(fd) => push(&[
            "-chardev",
            &format!("socket,id=qmp,fd={fd},server=on,wait=off"),
            "-mon",
            "chardev=qmp,mode=control",
        ]),
        None => push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", opt_path(&paths.qmp_socket)?),
        ]),
    }
    push(&["-pidfile", &opt_path(&paths.pid_file)?]);
    match &spec.console_log {
        Some(log) => push(&[
            "-chardev",
            &format!("file,id=console,path={},append=on", opt_path(log)?),
            "-serial",
            "chardev:console",
        ]),
        None => push(&["-serial", "null"]),
    }
    match &spec.boot {
        BootSpec::LinuxKernel {
            kernel,
            initrd,
            cmdline,
        } => {
            push(&["-kernel", &opt_path(kernel)?]);
            if let Some(i) = initrd {
                push(&["-initrd", &opt_path(i)?]);
            }
            push(&["-append", cmdline]);
        }
        BootSpec::Efi { variable_store } => {
            let code = paths.ovmf_code.as_deref().ok_or(CommandError::NoFirmware)?;
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    opt_path(code)?
                ),
            ]);
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    opt_path(variable_store)?
                ),
            ]);
        }
        BootSpec::MacOs { .. } => return Err(CommandError::MacOsGuest),
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let file = match d.format {
            // QEMU's NBD client, reconnecting while the server restarts.
            DiskFormat::Nbd => format!(
                "format=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={NBD_EXPORT},file.reconnect-delay={NBD_RECONNECT_SECS}",
                opt_path(&d.path)?
            ),
            f => format!("file={},format={f}", opt_path(&d.path)?),
        };
        push(&[
            "-drive",
            &format!(
                "{file},if=none,id=disk{i},readonly={},cache=writeback,discard=unmap",
                if d.read_only { "on" } else { "off" }
            ),
            "-device",
            &format!("virtio-blk-pci,drive=disk{i}"),
        ]);
    }
    // A snapshot layout: the same hot-plug ports and VM generation ID device for a
    // template and every VM restored from it, so the saved device tree matches.
    if spec.snapshot.is_some() {
        for port in 0..SNAPSHOT_HOTPLUG_PORTS {
            push(&[
                "-device",
                &format!(
                    "pcie-root-port,id={},chassis={},port={}",
                    hotplug_port(port),
                    port + 1,
                    port + 0x10
                ),
            ]);
        }
        push(&["-device", "vmgenid,id=vmgenid0,guid=auto"]);
    }
    // A restored VM gets its devices plugged after the state is loaded
    // (`hotplug_devices`): here only their host ends.
    let plugged_later = matches!(spec.snapshot, Some(SnapshotSpec::Restore { .. }));
    for (i, n) in spec.nics.iter().enumerate() {
        let fd = TAP_FD_BASE + i32::try_from(i).unwrap_or(i32::MAX - TAP_FD_BASE);
        push(&["-netdev", &format!("tap,id=net{i},fd={fd}")]);
        if !plugged_later {
            let bus = match spec.snapshot {
                Some(_) => format!(",id={},bus={}", nic_id(i), hotplug_port(i)),
                None => String::new(),
            };
            push(&[
                "-device",
                &format!("virtio-net-pci,netdev=net{i},mac={}{bus}", n.mac),
            ]);
        }
    }
    for (i, s) in spec.shared_dirs.iter().enumerate() {
        if s.tag.contains(',') {
            return Err(CommandError::Comma(s.tag.clone()));
        }
        push(&[
            "-fsdev",
            &format!(
                "local,id=fs{i},path={},security_model=none{}",
                opt_path(&s.host_path)?,
                if s.read_only { ",readonly=on" } else { "" }
            ),
        ]);
        if !plugged_later {
            let bus = match spec.snapshot {
                Some(_) => format!(
                    ",id={},bus={}",
                    share_id(i),
                    hotplug_port(spec.nics.len() + i)
                ),
                None => String::new(),
            };
            push(&[
                "-device",
                &format!("virtio-9p-pci,fsdev=fs{i},mount_tag={}{bus}", s.tag),
            ]);
        }
    }
    if plugged_later {
        // Paused until the state is loaded and the devices plugged (then `cont`).
        push(&["-incoming", "defer", "-S"]);
    }
    Ok(a)
}

/// The id of hot-plug port `i` of a snapshot layout.
pub fn hotplug_port(i: usize) -> String {
    format!("vzkport{i}")
}

/// The device id of NIC `i` in a snapshot layout.
pub fn nic_id(i: usize) -> String {
    format!("vzknic{i}")
}

/// The device id of shared directory `i` in a snapshot layout.
pub fn share_id(i: usize) -> String {
    format!("vzkshare{i}")
}

/// The `device_add` arguments that plug a restored VM's NICs and shared directories into
/// its hot-plug ports, in port order (NICs first). Empty for other VMs.
pub fn hotplug_devices(spec: &VmSpec) -> Vec<serde_json::Value> {
    if !matches!(spec.snapshot, Some(SnapshotSpec::Restore { .. })) {
        return Vec::new();
    }
    let nics = spec.nics.iter().enumerate().map(|(i, n)| {
        serde_json::json!({
            "driver": "virtio-net-pci",
            "id": nic_id(i),
            "netdev": format!("net{i}"),
            "mac": n.mac.to_string(),
            "bus": hotplug_port(i),
        })
    });
    let shares = spec.shared_dirs.iter().enumerate().map(|(i, s)| {
        serde_json::json!({
            "driver": "virtio-9p-pci",
            "id": share_id(i),
            "fsdev": format!("fs{i}"),
            "mount_tag": s.tag,
            "bus": hotplug_port(spec.nics.len() + i),
        })
    });
    nics.chain(shares).collect()
}

/// The ids of the devices a template unplugs before its state is saved.
pub fn template_unplug_ids(spec: &VmSpec) -> Vec<String> {
    if !matches!(spec.snapshot, Some(SnapshotSpec::Template { .. })) {
        return Vec::new();
    }
    (0..spec.nics.len())
        .map(nic_id)
        .chain((0..spec.shared_dirs.len()).map(share_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::MacAddr;
    use crate::spec::{DiskFormat, DiskSpec, NetworkAttachment, NicSpec, SharedDirSpec};

    fn paths() -> QemuPaths {
        QemuPaths {
            qmp_socket: "/s/qmp.sock".into(),
            qmp_fd: None,
            pid_file: "/s/qemu.pid".into(),
            ovmf_code: None,
        }
    }

    #[test]
    fn a_pre_bound_qmp_socket_is_passed_by_fd() {
        let p = QemuPaths {
            qmp_fd: Some(5),
            ..paths()
        };
        let a = qemu_args(&spec(), Accel::Tcg, &p)
            .unwrap_or_default()
            .join(" ");
        assert!(
            a.contains(
                "-chardev socket,id=qmp,fd=5,server=on,wait=off -mon chardev=qmp,mode=control"
            ),
            "{a}"
        );
        assert!(!a.contains("-qmp"), "{a}");
    }

    fn spec() -> VmSpec {
        VmSpec {
            id: "vm1".into(),
            cpus: 2,
            memory_bytes: 300 << 20,
            boot: BootSpec::LinuxKernel {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: "console=ttyS0 x=1".into(),
            },
            disks: vec![DiskSpec {
                path: "/d.qcow2".into(),
                read_only: false,
                format: DiskFormat::Qcow2,
            }],
            nics: vec![
                NicSpec {
                    mac: "02:00:00:00:00:01"
                        .parse()
                        .unwrap_or(MacAddr([2, 0, 0, 0, 0, 1])),
                    attachment: NetworkAttachment::Nat,
                },
                NicSpec {
                    mac: MacAddr([2, 0, 0, 0, 0, 2]),
                    attachment: NetworkAttachment::Nat,
                },
            ],
            shared_dirs: vec![SharedDirSpec {
                tag: "data".into(),
                host_path: "/srv".into(),
                read_only: true,
            }],
            console_log: Some("/log/console.log".into()),
            snapshot: None,
        }
    }

    #[test]
    fn maps_every_device() {
        let a = qemu_args(&spec(), Accel::Tcg, &paths())
            .unwrap_or_default()
            .join(" ");
        for want in [
            "-machine q35,accel=tcg -cpu max",
            "-smp 2 -m 300M",
            "-qmp unix:/s/qmp.sock,server=on,wait=off",
            "-pidfile /s/qemu.pid",
            "file,id=console,path=/log/console.log,append=on -serial chardev:console",
            "-kernel /k -initrd /i -append console=ttyS0 x=1",
            "file=/d.qcow2,format=qcow2,if=none,id=disk0,readonly=off",
            "-netdev tap,id=net0,fd=3 -device virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01",
            "-netdev tap,id=net1,fd=4 -device virtio-net-pci,netdev=net1,mac=02:00:00:00:00:02",
            "local,id=fs0,path=/srv,security_model=none,readonly=on -device virtio-9p-pci,fsdev=fs0,mount_tag=data",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        let kvm = qemu_args(&spec(), Accel::Kvm, &paths())
            .unwrap_or_default()
            .join(" ");
        assert!(kvm.contains("accel=kvm -cpu host"));
    }

    #[test]
    fn an_nbd_disk_is_qemus_nbd_client_on_the_socket() {
        let mut s = spec();
        s.disks[0] = DiskSpec {
            path: "/run/nbd-pod-1.sock".into(),
            read_only: false,
            format: DiskFormat::Nbd,
        };
        let a = qemu_args(&s, Accel::Tcg, &paths())
            .unwrap_or_default()
            .join(" ");
        let want = "-drive format=raw,file.driver=nbd,file.server.type=unix,\
            file.server.path=/run/nbd-pod-1.sock,file.export=disk,file.reconnect-delay=60,\
            if=none,id=disk0,readonly=off";
        assert!(a.contains(want), "missing {want:?} in {a}");
        assert!(!a.contains("file=/run"), "{a}");
    }

    #[test]
    fn a_template_and_its_restore_share_one_machine_layout() {
        let mut t = spec();
        t.snapshot = Some(SnapshotSpec::Template {
            state: "/t/state".into(),
        });
        let mut r = spec();
        r.snapshot = Some(SnapshotSpec::Restore {
            state: "/t/state".into(),
        });
        r.nics[0].mac = MacAddr([2, 0, 0, 0, 0, 9]);
        let ta = qemu_args(&t, Accel::Tcg, &paths()).unwrap_or_default();
        let ra = qemu_args(&r, Accel::Tcg, &paths()).unwrap_or_default();
        // What QEMU puts on the root bus (in command-line order) is the same for both:
        // every -device that has no bus= of a hot-plug port.
        let root_devices = |a: &[String]| -> Vec<String> {
            a.windows(2)
                .filter(|w| w[0] == "-device" && !w[1].contains("bus=vzkport"))
                .map(|w| w[1].clone())
                .collect()
        };
        assert_eq!(root_devices(&ta), root_devices(&ra));
        let ta = ta.join(" ");
        let ra = ra.join(" ");
        assert!(
            ta.contains("pcie-root-port,id=vzkport0,chassis=1,port=16"),
            "{ta}"
        );
        assert!(
            ta.contains("pcie-root-port,id=vzkport5,chassis=6,port=21"),
            "{ta}"
        );
        assert!(ta.contains("vmgenid,id=vmgenid0,guid=auto"), "{ta}");
        assert!(
            ta.contains("virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01,id=vzknic0,bus=vzkport0"),
            "{ta}"
        );
        assert!(
            ta.contains("mount_tag=data,id=vzkshare0,bus=vzkport2"),
            "{ta}"
        );
        assert!(!ta.contains("-incoming"), "{ta}");
        // The restore has the host ends only, and waits for its state.
        assert!(ra.contains("-netdev tap,id=net0,fd=3"), "{ra}");
        assert!(!ra.contains("virtio-net-pci"), "{ra}");
        assert!(!ra.contains("virtio-9p-pci"), "{ra}");
        assert!(ra.contains("-fsdev local,id=fs0,path=/srv"), "{ra}");
        assert!(ra.ends_with("-incoming defer -S"), "{ra}");
        let plug = hotplug_devices(&r);
        assert_eq!(plug.len(), 3);
        assert_eq!(plug[0]["mac"], "02:00:00:00:00:09");
        assert_eq!(plug[0]["bus"], "vzkport0");
        assert_eq!(plug[1]["id"], "vzknic1");
        assert_eq!(plug[2]["driver"], "virtio-9p-pci");
        assert_eq!(plug[2]["mount_tag"], "data");
        assert_eq!(plug[2]["bus"], "vzkport2");
        assert!(hotplug_devices(&t).is_empty());
        assert_eq!(
            template_unplug_ids(&t),
            vec!["vzknic0", "vzknic1", "vzkshare0"]
        );
        assert!(template_unplug_ids(&r).is_empty());
        // An ordinary VM has no snapshot layout.
        let plain = qemu_args(&spec(), Accel::Tcg, &paths())
            .unwrap_or_default()
            .join(" ");
        assert!(
            !plain.contains("pcie-root-port") && !plain.contains("vmgenid"),
            "{plain}"
        );
    }

    #[test]
    fn rejects_what_qemu_cannot_do() {
        let mut s = spec();
        s.boot = BootSpec::MacOs {
            aux_storage: "/a".into(),
            hardware_model: vec![],
            machine_id: vec![],
        };
        assert_eq!(
            qemu_args(&s, Accel::Tcg, &paths()).err(),
            Some(CommandError::MacOsGuest)
        );
        s.boot = BootSpec::Efi {
            variable_store: "/v".into(),
        };
        assert_eq!(
            qemu_args(&s, Accel::Tcg, &paths()).err(),
            Some(CommandError::NoFirmware)
        );
        let mut s = spec();
        s.disks[0].path = "/a,b".into();
        assert!(matches!(
            qemu_args(&s, Accel::Tcg, &paths()),
            Err(CommandError::Comma(_))
        ));
    }
}
