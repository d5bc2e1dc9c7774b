//! The per-VM state directory `<state_dir>/vms/<id>/`, which lets a restarted agent
//! re-adopt the VM.
//!
//! | file          | written by | content                                  |
//! |---------------|------------|------------------------------------------|
//! | `spec.json`   | agent      | the [`VmSpec`]                           |
//! | `taps`        | agent      | one TAP name per NIC, in order           |
//! | `mac`         | agent      | the first NIC's MAC                      |
//! | `qemu.pid`    | QEMU       | QEMU's pid (`-pidfile`)                  |
//! | `qmp.sock`    | QEMU       | the QMP socket                           |
//! | `qemu.log`    | QEMU       | QEMU's stdout/stderr                     |
//! | `ip`          | agent      | the last discovered IPv4 address         |
//! | `stopped`     | agent      | present once the agent asked for a stop  |

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::spec::VmSpec;

/// Paths of one VM's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state dir of VM `id` under the backend's `root`.
    pub fn new(root: &Path, id: &str) -> Self {
        Self {
            dir: root.join("vms").join(id),
        }
    }

    /// Wraps an existing directory.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `spec.json`.
    pub fn spec_file(&self) -> PathBuf {
        self.dir.join("spec.json")
    }

    /// `qmp.sock`.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// `qemu.pid`.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// `qemu.log`.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// Creates the directory and writes the spec (and its first MAC).
    pub fn create(&self, spec: &VmSpec) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let json = serde_json::to_vec_pretty(spec).map_err(io::Error::other)?;
        std::fs::write(self.spec_file(), json)?;
        if let Some(n) = spec.nics.first() {
            std::fs::write(self.dir.join("mac"), format!("{}\n", n.mac))?;
        }
        Ok(())
    }

    /// Reads the spec back.
    pub fn read_spec(&self) -> io::Result<VmSpec> {
        let bytes = std::fs::read(self.spec_file())?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Records the TAP names.
    pub fn write_taps(&self, taps: &[String]) -> io::Result<()> {
        std::fs::write(self.dir.join("taps"), taps.join("\n"))
    }

    /// The recorded TAP names.
    pub fn read_taps(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("taps"))
            .map(|s| {
                s.lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// QEMU's pid, if the pid file is there and well-formed.
    pub fn read_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Records the discovered address.
    pub fn write_ip(&self, ip: Ipv4Addr) -> io::Result<()> {
        std::fs::write(self.dir.join("ip"), format!("{ip}\n"))
    }

    /// The last recorded address.
    pub fn read_ip(&self) -> Option<Ipv4Addr> {
        std::fs::read_to_string(self.dir.join("ip"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Marks that the agent asked for this VM to stop (so its exit is not a failure).
    pub fn mark_stop_requested(&self) -> io::Result<()> {
        std::fs::write(self.dir.join("stopped"), b"")
    }

    /// Whether [`StateDir::mark_stop_requested`] was called.
    pub fn stop_requested(&self) -> bool {
        self.dir.join("stopped").exists()
    }

    /// Whether `pid` is alive and is the QEMU of this directory (guards against pid
    /// reuse; a zombie has an empty command line and counts as dead).
    pub fn is_our_qemu(&self, pid: i32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let pid_file = self.pid_file().display().to_string();
        String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == pid_file)
    }

    /// The last `max` bytes of QEMU's log, for failure reasons.
    pub fn qemu_log_tail(&self, max: usize) -> String {
        let bytes = std::fs::read(self.qemu_log()).unwrap_or_default();
        let tail = &bytes[bytes.len().saturating_sub(max)..];
        String::from_utf8_lossy(tail).trim().to_owned()
    }

    /// Deletes the directory.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}
