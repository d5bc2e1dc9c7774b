//! cloud-init's NoCloud seed: a small FAT volume labelled `CIDATA` holding `meta-data`
//! (the instance id and host name) and `user-data`, attached to a Linux guest as a
//! read-only disk, as KubeVirt does. cloud-init finds it by its label on any backend
//! (QEMU or Virtualization.framework) and installs the pod's SSH key and host name.
//!
//! `user-data` is a `#cloud-config` that gives the SSH user the pod's public key (root:
//! `disable_root: false` and the key; another user: created with the key and
//! passwordless sudo) and sets the host name (also in `/etc/hosts`, so `sudo` resolves
//! it). Checked against real cloud-init 22.4.2 (Debian 12) by hand: host name, root
//! login with the key, a created user with sudo, a pod's `#!` user-data run. A user-data document of the pod's own is
//! sent beside it as a MIME multipart message, which cloud-init merges.

use std::io::Write as _;
use std::path::Path;

/// What the seed carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoCloudSeed {
    /// `instance-id` (the pod UID: a new pod is a new instance).
    pub instance_id: String,
    /// `local-hostname` and `hostname` (the pod name, cut to a valid host name).
    pub hostname: String,
    /// The user the agent logs in as.
    pub user: String,
    /// Keys for that user's `authorized_keys`.
    pub authorized_keys: Vec<String>,
    /// The pod's own user-data, if any.
    pub user_data: Option<String>,
}

/// The size of the volume: FAT12 needs a few hundred clusters; the files are small.
const VOLUME_BYTES: u64 = 2 << 20;
const BOUNDARY: &str = "==vz-kubelet-cloud-init==";

/// A valid host name from a pod name: lower case letters, digits and `-`, at most 63
/// characters, not starting or ending with `-`.
pub fn hostname_of(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .take(63)
        .collect();
    let s = s.trim_matches('-');
    if s.is_empty() {
        "vm".into()
    } else {
        s.to_string()
    }
}

fn yaml_str(s: &str) -> String {
    // JSON strings are YAML flow scalars.
    serde_json::Value::String(s.to_string()).to_string()
}

impl NoCloudSeed {
    /// The `meta-data` file.
    pub fn meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            yaml_str(&self.instance_id),
            yaml_str(&self.hostname)
        )
    }

    /// Our `#cloud-config`.
    pub fn cloud_config(&self) -> String {
        let keys: String = self
            .authorized_keys
            .iter()
            .map(|k| format!("      - {}\n", yaml_str(k)))
            .collect();
        let mut out = format!(
            "#cloud-config\nhostname: {}\npreserve_hostname: false\nmanage_etc_hosts: true\n",
            yaml_str(&self.hostname)
        );
        if self.user == "root" {
            out.push_str("disable_root: false\nssh_authorized_keys:\n");
            out.push_str(&keys.replace("      - ", "  - "));
        } else {
            out.push_str(&format!(
                "users:\n  - default\n  - name: {}\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    shell: /bin/sh\n    ssh_authorized_keys:\n{keys}",
                yaml_str(&self.user)
            ));
        }
        out
    }

    /// The `user-data` file: our cloud-config, or a multipart message with the pod's.
    pub fn user_data(&self) -> String {
        let ours = self.cloud_config();
        let Some(theirs) = &self.user_data else {
            return ours;
        };
        let kind = |doc: &str| {
            if doc.starts_with("#!") {
                "text/x-shellscript"
            } else {
                "text/cloud-config"
            }
        };
        format!(
            "Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\nMIME-Version: 1.0\n\n--{BOUNDARY}\nContent-Type: text/cloud-config; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Disposition: attachment; filename=\"vz-kubelet.cfg\"\n\n{ours}\n--{BOUNDARY}\nContent-Type: {}; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Disposition: attachment; filename=\"pod-user-data\"\n\n{theirs}\n--{BOUNDARY}--\n",
            kind(theirs)
        )
    }

    /// Write the seed volume to `path` (replaced if it exists).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let res = self
            .write_to(&tmp)
            .and_then(|()| std::fs::rename(&tmp, path));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(VOLUME_BYTES)?;
        fatfs::format_volume(
            &file,
            fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
        )?;
        {
            let fs = fatfs::FileSystem::new(&file, fatfs::FsOptions::new())?;
            for (name, body) in [
                ("meta-data", self.meta_data()),
                ("user-data", self.user_data()),
            ] {
                let mut f = fs.root_dir().create_file(name)?;
                f.truncate()?;
                f.write_all(body.as_bytes())?;
                f.flush()?;
            }
            fs.unmount()?;
        }
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read as _;

    fn seed(user: &str, user_data: Option<&str>) -> NoCloudSeed {
        NoCloudSeed {
            instance_id: "0b5c-uid".into(),
            hostname: hostname_of("Build_Runner.7"),
            user: user.into(),
            authorized_keys: vec!["ssh-ed25519 AAAAC3Nza pod-a".into()],
            user_data: user_data.map(str::to_string),
        }
    }

    #[test]
    fn host_names_are_valid() {
        assert_eq!(hostname_of("Build_Runner.7"), "build-runner-7");
        assert_eq!(hostname_of("--"), "vm");
        assert_eq!(hostname_of(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn the_volume_is_a_cidata_fat_with_both_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cidata.img");
        let s = seed("root", None);
        s.write(&p).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let fs = fatfs::FileSystem::new(&f, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let mut meta = String::new();
        fs.root_dir()
            .open_file("meta-data")
            .unwrap()
            .read_to_string(&mut meta)
            .unwrap();
        assert_eq!(
            meta,
            "instance-id: \"0b5c-uid\"\nlocal-hostname: \"build-runner-7\"\n"
        );
        let mut user = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut user)
            .unwrap();
        assert!(user.starts_with("#cloud-config\n"), "{user}");
        assert!(
            user.contains(
                "disable_root: false\nssh_authorized_keys:\n  - \"ssh-ed25519 AAAAC3Nza pod-a\"\n"
            ),
            "{user}"
        );
        // An independent checker (dosfstools, which scripts/install-deps.sh installs).
        let out = std::process::Command::new("fsck.fat")
            .arg("-n")
            .arg(&p)
            .output()
            .expect("fsck.fat runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "fsck.fat: {text}");
        // The two files and the volume label entry.
        assert!(text.contains("3 files"), "fsck.fat: {text}");
    }

    #[test]
    fn a_user_other_than_root_is_created_and_the_pods_user_data_merged() {
        let s = seed("debian", Some("#cloud-config\npackages: [git]\n"));
        let c = s.cloud_config();
        assert!(c.contains("  - name: \"debian\"\n"), "{c}");
        assert!(
            c.contains("    ssh_authorized_keys:\n      - \"ssh-ed25519 AAAAC3Nza pod-a\"\n"),
            "{c}"
        );
        assert!(!c.contains("disable_root"), "{c}");
        let u = s.user_data();
        assert!(u.starts_with("Content-Type: multipart/mixed"), "{u}");
        assert_eq!(
            u.matches("Content-Type: text/cloud-config").count(),
            2,
            "{u}"
        );
        assert!(u.contains("packages: [git]"));
        let script = seed("root", Some("#!/bin/sh\necho hi\n")).user_data();
        assert!(
            script.contains("Content-Type: text/x-shellscript"),
            "{script}"
        );
    }
}
