//! The shell scripts that put a VM's shares at their `mountPath` in the guest, run over
//! SSH once the guest answers ([`crate::volumes::mount_in_guest`]). All are idempotent
//! (a re-adopted VM runs them again):
//! * Linux on QEMU ([`ShareFs::NineP`]): `mount -t 9p -o trans=virtio,version=9p2000.L[,ro]`.
//! * Linux on Virtualization.framework ([`ShareFs::VirtioFs`]): one virtio-fs device per
//!   tag, `mount -t virtiofs [-o ro]`.
//! * macOS ([`ShareFs::MacAutomount`]): macOS mounts the one automount device itself
//!   under `/Volumes/My Shared Files/<tag>` (once a user session exists); the script
//!   waits for each entry (up to 60 s) and links `mountPath` to it (`ln -sfn`, with
//!   `sudo -n` when the path needs it). A `mountPath` that exists and is not a link is
//!   refused, never replaced.
//!
//! A `subPath` naming a file shares its volume and bind-mounts (Linux) or links (macOS)
//! the file.

use std::path::Path;

use vzk_guest::quote::quote_word;
use vzk_vm::{BackendKind, BootSpec};

use crate::volumes::{GUEST_STAGING_DIR, GuestMount};

/// How a guest reaches its shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareFs {
    /// Linux on QEMU: 9p over virtio.
    NineP,
    /// Linux on Virtualization.framework: virtio-fs, one device per tag.
    VirtioFs,
    /// macOS: entries of the automount virtio-fs share.
    MacAutomount,
}

impl ShareFs {
    /// What a VM booted with `boot` on `backend` uses.
    pub fn of(backend: BackendKind, boot: &BootSpec) -> ShareFs {
        match (backend, boot) {
            (_, BootSpec::MacOs { .. }) => ShareFs::MacAutomount,
            (BackendKind::Vz, _) => ShareFs::VirtioFs,
            (BackendKind::Qemu, _) => ShareFs::NineP,
        }
    }
}

/// The shell function `mounted PATH` of the Linux scripts: whether PATH (escaped as in
/// `/proc/mounts`, see [`is_mounted`]) is a mount point. A loop of built-ins: busybox has no
/// `mountpoint`, and each process start costs tens of milliseconds in an emulated guest,
/// on the path a pod waits on.
const MOUNTED_FN: &str = r#"mounted() { while read -r _ m _; do [ "$m" = "$1" ] && return 0; done < /proc/mounts; return 1; }"#;

/// A call of [`MOUNTED_FN`] testing "`path` is a mount point": only for a script that
/// defines the function first, as [`linux_script`] does. The path as `/proc/mounts`
/// writes it, with octal escapes for space, tab, newline and backslash.
fn is_mounted(path: &str) -> String {
    let mut esc = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => esc.push_str("\\040"),
            '\t' => esc.push_str("\\011"),
            '\n' => esc.push_str("\\012"),
            '\\' => esc.push_str("\\134"),
            c => esc.push(c),
        }
    }
    format!("mounted {}", quote_word(&esc))
}

/// `mkdir -p DIR` unless it is a directory already (a test is a built-in; `mkdir` is a
/// process).
fn ensure_dir(quoted: &str) -> String {
    format!("{{ [ -d {quoted} ] || mkdir -p {quoted}; }}")
}

/// The 9p script (Linux on QEMU).
pub fn mount_script(mounts: &[GuestMount]) -> String {
    linux_script(ShareFs::NineP, mounts)
}

/// The script for `fs`; `automount_dir` is where macOS shows the automount share.
pub fn script(fs: ShareFs, mounts: &[GuestMount], automount_dir: &str) -> String {
    match fs {
        ShareFs::MacAutomount => mac_script(mounts, automount_dir),
        fs => linux_script(fs, mounts),
    }
}

/// Linux guests: mount each share (9p or virtio-fs), bind-mount file sub-paths.
fn linux_script(fs: ShareFs, mounts: &[GuestMount]) -> String {
    let mut lines = vec!["set -e".to_owned(), MOUNTED_FN.to_owned()];
    for m in mounts {
        let ro = if m.read_only { ",ro" } else { "" };
        let opts = match fs {
            ShareFs::VirtioFs => format!("virtiofs{}", if m.read_only { " -o ro" } else { "" }),
            _ => format!("9p -o trans=virtio,version=9p2000.L{ro}"),
        };
        let target = quote_word(&m.mount_path);
        let tag = quote_word(&m.tag);
        match &m.file {
            None => lines.push(format!(
                "{} || {{ {} && mount -t {opts} {tag} {target}; }}",
                is_mounted(&m.mount_path),
                ensure_dir(&target)
            )),
            Some(rel) => {
                let staging = format!("{GUEST_STAGING_DIR}/{}", m.tag);
                let st = quote_word(&staging);
                let src = quote_word(&format!("{staging}/{}", rel.display()));
                let parent = quote_word(
                    &Path::new(&m.mount_path)
                        .parent()
                        .map_or_else(|| "/".to_owned(), |p| p.display().to_string()),
                );
                lines.push(format!(
                    "{} || {{ {} && mount -t {opts} {tag} {st}; }}",
                    is_mounted(&staging),
                    ensure_dir(&st)
                ));
                lines.push(format!(
                    "{} || {{ {} && {{ [ -e {target} ] || touch {target}; }} && mount --bind {src} {target}; }}",
                    is_mounted(&m.mount_path),
                    ensure_dir(&parent)
                ));
            }
        }
    }
    lines.join("\n")
}

/// macOS guests: wait for each automount entry, link `mountPath` to it.
fn mac_script(mounts: &[GuestMount], automount_dir: &str) -> String {
    // `run` tries a command as the SSH user, then with passwordless sudo.
    let mut lines = vec![
        "set -e".to_owned(),
        "run() { \"$@\" 2>/dev/null || sudo -n \"$@\"; }".to_owned(),
    ];
    for m in mounts {
        let entry = format!("{automount_dir}/{}", m.tag);
        let e = quote_word(&entry);
        let src = match &m.file {
            Some(rel) => quote_word(&format!("{entry}/{}", rel.display())),
            None => e.clone(),
        };
        let target = quote_word(&m.mount_path);
        let parent = quote_word(
            &Path::new(&m.mount_path)
                .parent()
                .map_or_else(|| "/".to_owned(), |p| p.display().to_string()),
        );
        lines.push(format!(
            "i=0; while [ ! -e {e} ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done"
        ));
        lines.push(format!(
            "[ -e {e} ] || {{ echo \"share {} is not at {entry} (macOS mounts it once a user is logged in)\" >&2; exit 1; }}",
            m.tag
        ));
        lines.push(format!(
            "if [ -L {target} ] || [ ! -e {target} ]; then run mkdir -p {parent} && run ln -sfn {src} {target}; else echo \"{}: exists and is not a link\" >&2; exit 1; fi",
            m.mount_path.replace(['"', '\\', '$', '`'], "_")
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn mount(tag: &str, path: &str, ro: bool, file: Option<&str>) -> GuestMount {
        GuestMount {
            tag: tag.into(),
            mount_path: path.into(),
            read_only: ro,
            file: file.map(PathBuf::from),
        }
    }

    #[test]
    fn the_share_kind_follows_the_guest_and_the_backend() {
        let linux = BootSpec::LinuxKernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let mac = BootSpec::MacOs {
            aux_storage: "/a".into(),
            hardware_model: vec![],
            machine_id: vec![],
        };
        assert_eq!(ShareFs::of(BackendKind::Qemu, &linux), ShareFs::NineP);
        assert_eq!(ShareFs::of(BackendKind::Vz, &linux), ShareFs::VirtioFs);
        assert_eq!(ShareFs::of(BackendKind::Vz, &mac), ShareFs::MacAutomount);
    }

    #[test]
    fn linux_on_vz_mounts_virtiofs() {
        let s = script(
            ShareFs::VirtioFs,
            &[
                mount("vzk0", "/data", false, None),
                mount("vzk1", "/cfg", true, None),
            ],
            "/unused",
        );
        assert!(
            s.contains("mkdir -p '/data'; } && mount -t virtiofs 'vzk0' '/data';"),
            "{s}"
        );
        assert!(s.contains("mount -t virtiofs -o ro 'vzk1' '/cfg';"), "{s}");
        assert!(!s.contains("9p"), "{s}");
    }

    /// `mounted`, run by a real `sh` against a stand-in mount table (the function's own
    /// text with `/proc/mounts` replaced), finds escaped paths and nothing else.
    #[test]
    fn mounted_reads_the_mount_table_with_builtins() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let table = dir.path().join("mounts");
        std::fs::write(
            &table,
            "proc /proc proc rw 0 0\nvzk0 /a\\040b\\134c 9p ro 0 0\nvzk1 /data 9p rw 0 0\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let f = MOUNTED_FN.replace("/proc/mounts", &table.display().to_string());
        let check = |path: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{f}\n{}", is_mounted(path)))
                .status()
                .unwrap_or_else(|e| panic!("{e}"))
                .success()
        };
        assert_eq!(is_mounted("/a b\\c"), "mounted '/a\\040b\\134c'");
        assert!(check("/data"));
        assert!(check("/a b\\c"), "an escaped path");
        assert!(check("/proc"));
        assert!(!check("/dat"), "a prefix is not a mount point");
        assert!(!check("/data/x"));
        assert!(!check("9p"), "other fields are not paths");
        assert!(!check("/a b"));
    }

    /// The macOS script, run by a real `sh` against a stand-in automount directory.
    #[test]
    fn macos_links_each_mount_path_to_its_automount_entry() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let auto = dir.path().join("My Shared Files");
        std::fs::create_dir_all(auto.join("vzk0")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(auto.join("vzk1/..data")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(auto.join("vzk1/..data/app.conf"), "x").unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path().join("guest");
        let data = root.join("it's data");
        let conf = root.join("etc/app.conf");
        let mounts = [
            mount("vzk0", &data.display().to_string(), false, None),
            mount(
                "vzk1",
                &conf.display().to_string(),
                true,
                Some("..data/app.conf"),
            ),
        ];
        let s = script(ShareFs::MacAutomount, &mounts, &auto.display().to_string());
        let run = || {
            std::process::Command::new("sh")
                .args(["-c", &s])
                .output()
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let out = run();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_link(&data).ok(), Some(auto.join("vzk0")));
        assert_eq!(
            std::fs::read(&conf).ok(),
            Some(b"x".to_vec()),
            "the file, through the link"
        );
        // Idempotent (a re-adopted VM runs it again).
        assert!(run().status.success());
        // A real directory at a mountPath is refused, not replaced.
        std::fs::remove_file(&data).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{e}"));
        let out = run();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("exists and is not a link"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_missing_automount_entry_is_a_clear_error() {
        let s = mac_script(
            &[mount("vzk7", "/x", false, None)],
            "/nonexistent-automount",
        );
        assert!(s.contains("[ $i -lt 60 ]"), "waits up to 60 s: {s}");
        assert!(
            s.contains("share vzk7 is not at /nonexistent-automount/vzk7"),
            "{s}"
        );
    }
}
