//! One QEMU VM: launch, supervision through QMP, stop, and re-adoption.
//!
//! # Lifecycle
//! * [`QemuVm::start`] creates the NICs' TAPs (joined to their bridge), spawns
//!   `qemu-system-x86_64` in its own process group with stdout/stderr to `qemu.log` in
//!   the state dir (so it survives the agent), connects QMP, and spawns two tasks: the
//!   monitor (QMP events + process exit → states) and IP discovery on the first TAP.
//! * States: `Starting` until QMP reports `running`, then `Running`; `Stopping` on a stop
//!   request or the guest's `POWERDOWN`; at process exit `Stopped` if QEMU reported a
//!   clean `SHUTDOWN` (guest power-off, `quit`) or the agent asked for the stop, else
//!   `Failed` with the exit status and the tail of `qemu.log`.
//! * `QemuVm::adopt` rebuilds a handle from a state dir: a live QEMU (pid file + its
//!   command line naming this dir) is reattached over QMP with its recorded IP; a dead
//!   one is reported `Failed` with a reason (or `Stopped` if the agent had asked for it).
//! * Dropping the handle stops watching (aborts its tasks) but never the VM: VMs outlive
//!   the agent by design.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use command_fds::{CommandFdExt, FdMapping};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::Shared;
use super::command::{QemuPaths, TAP_FD_BASE, hotplug_devices, qemu_args, template_unplug_ids};
use super::qmp::{QmpClient, QmpEvent};
use super::statedir::StateDir;
use crate::hypervisor::{BackendKind, BoxError, HostUsage, Vm, VmError, VmState};
use crate::mac::MacAddr;
use crate::net::release::Lease;
use crate::net::{discovery, link, tap};
use crate::spec::{BootSpec, NetworkAttachment, SnapshotSpec, VmSpec};

/// How long QEMU may take to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `quit` / SIGKILL may take to end the process.
const FORCE_STOP_WAIT: Duration = Duration::from_secs(5);

/// Where [`Vm::start`] spent its time (the agent's side of a VM start; the guest's boot
/// runs in parallel once QEMU is spawned). See `examples/boot_bench.rs`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StartTimings {
    /// Creating the TAPs and joining them to their bridges.
    pub plug_nics: Duration,
    /// Building the command line and `fork`/`exec` of QEMU.
    pub spawn: Duration,
    /// From the spawn to a negotiated QMP connection (QEMU's own start-up included).
    pub qmp_connect: Duration,
    /// A restore only: loading the saved state, plugging the VM's own devices, `cont`.
    pub restore: Duration,
    /// `query-status` and the state change to `Running`.
    pub running: Duration,
    /// All of `start()`.
    pub total: Duration,
}

/// A QEMU VM handle.
pub struct QemuVm {
    spec: VmSpec,
    dir: StateDir,
    shared: Arc<Shared>,
    state: watch::Sender<VmState>,
    ip: watch::Sender<Option<Ipv4Addr>>,
    qmp: Mutex<Option<Arc<QmpClient>>>,
    pid: Mutex<Option<i32>>,
    start_lock: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    timings: Mutex<Option<StartTimings>>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("id", &self.spec.id)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(e)
}

fn msg(s: String) -> BoxError {
    s.into()
}

impl QemuVm {
    pub(super) fn new(spec: VmSpec, dir: StateDir, shared: Arc<Shared>, state: VmState) -> Self {
        Self {
            spec,
            dir,
            shared,
            state: watch::channel(state).0,
            ip: watch::channel(None).0,
            qmp: Mutex::new(None),
            pid: Mutex::new(None),
            start_lock: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            timings: Mutex::new(None),
        }
    }

    /// Where the last successful [`Vm::start`] of this handle spent its time.
    pub fn start_timings(&self) -> Option<StartTimings> {
        self.timings.lock().ok().and_then(|t| *t)
    }

    /// The VM's state directory.
    pub fn state_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// QEMU's pid once launched (or adopted).
    pub fn pid(&self) -> Option<i32> {
        self.pid.lock().ok().and_then(|p| *p)
    }

    /// The QMP client, for raw commands (`None` before start or after exit).
    pub fn qmp(&self) -> Option<Arc<QmpClient>> {
        self.qmp.lock().ok().and_then(|q| q.clone())
    }

    fn set_state(&self, s: VmState) {
        set_state(&self.state, &self.spec.id, s);
    }

    fn track(&self, t: JoinHandle<()>) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(t);
        }
    }

    fn fail_start(&self, reason: String) -> VmError {
        self.set_state(VmState::Failed {
            reason: reason.clone(),
        });
        VmError::Start {
            id: self.spec.id.clone(),
            source: msg(reason),
        }
    }

    /// Creates and plugs the TAPs; returns their fds in NIC order.
    async fn plug_nics(&self) -> Result<Vec<OwnedFd>, VmError> {
        let mut fds = Vec::new();
        let mut names = Vec::new();
        for (i, nic) in self.spec.nics.iter().enumerate() {
            let name = tap::tap_name(&self.shared.tap_scope, &self.spec.id, i);
            let bridge = match &nic.attachment {
                NetworkAttachment::Nat => self.shared.nat_bridge.clone().ok_or_else(|| {
                    self.fail_start("the nat network is not configured on this backend".into())
                })?,
                NetworkAttachment::Bridged { interface } => interface.clone(),
            };
            let fd = tap::create_tap(&name).map_err(|e| self.fail_start(chain(&e)))?;
            link::attach_to_bridge(&name, &bridge)
                .await
                .map_err(|e| self.fail_start(format!("plugging {name} into {bridge}: {e}")))?;
            fds.push(fd);
            names.push(name);
        }
        self.dir
            .write_taps(&names)
            .map_err(|e| self.fail_start(format!("writing the state dir: {e}")))?;
        Ok(fds)
    }

    /// Reattaches to (or reports the death of) the VM in `dir`.
    pub(super) async fn adopt(dir: StateDir, shared: Arc<Shared>) -> std::io::Result<Self> {
        let spec = dir.read_spec()?;
        let id = spec.id.clone();
        let alive_pid = dir.read_pid().filter(|&p| dir.is_our_qemu(p));
        let Some(pid) = alive_pid else {
            let state = if dir.stop_requested() {
                VmState::Stopped
            } else {
                let tail = dir.qemu_log_tail(300);
                VmState::Failed {
                    reason: format!(
                        "the QEMU process{} exited while the agent was not running{}",
                        dir.read_pid()
                            .map(|p| format!(" (pid {p})"))
                            .unwrap_or_default(),
                        if tail.is_empty() {
                            String::new()
                        } else {
                            format!("; qemu.log: {tail}")
                        }
                    ),
                }
            };
            tracing::warn!(vm.id = %id, ?state, "VM found dead on adoption");
            return Ok(Self::new(spec, dir, shared, state));
        };
        let vm = Self::new(spec, dir, shared, VmState::Starting);
        *vm.pid
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))? = Some(pid);
        if let Some(ip) = vm.dir.read_ip() {
            vm.ip.send_replace(Some(ip));
        }
        match QmpClient::connect(&vm.dir.qmp_socket()).await {
            Ok((qmp, events)) => {
                let qmp = Arc::new(qmp);
                let status = qmp
                    .query_status()
                    .await
                    .unwrap_or_else(|_| "unknown".into());
                vm.set_state(match status.as_str() {
                    "running" => VmState::Running,
                    "shutdown" => VmState::Stopping,
                    _ => VmState::Starting,
                });
                if let Ok(mut q) = vm.qmp.lock() {
                    *q = Some(qmp);
                }
                vm.spawn_tasks(None, pid, events);
                tracing::info!(vm.id = %id, pid, status = %status, "re-adopted running VM");
            }
            Err(e) => {
                vm.set_state(VmState::Failed {
                    reason: format!("cannot reattach to QEMU pid {pid}: {e}"),
                });
            }
        }
        Ok(vm)
    }

    /// Gives the NAT network's DHCP leases of this VM's NICs back to dnsmasq, so that
    /// removed VMs do not hold addresses of the pool until their leases expire: the
    /// leases of their MACs in the lease file, and the address IP discovery recorded for
    /// the first NIC if it is on the NAT network. Failures are logged only (the lease then
    /// expires on its own). A QEMU that still runs (a final state without its exit, e.g.
    /// no QMP on adoption) keeps its leases: its guest may still use the address.
    async fn release_nat_leases(&self) {
        let Some(releaser) = &self.shared.nat_leases else {
            return;
        };
        let macs: Vec<MacAddr> = self
            .spec
            .nics
            .iter()
            .filter(|n| n.attachment == NetworkAttachment::Nat)
            .map(|n| n.mac)
            .collect();
        if macs.is_empty() {
            return;
        }
        if let Some(pid) = self.dir.read_pid().filter(|&p| self.dir.is_our_qemu(p)) {
            tracing::warn!(vm.id = %self.spec.id, pid, "QEMU still runs: its NAT leases are not released");
            return;
        }
        let recorded = self.ip.borrow().or_else(|| self.dir.read_ip());
        let known: Vec<Lease> = self
            .spec
            .nics
            .first()
            .filter(|n| n.attachment == NetworkAttachment::Nat)
            .zip(recorded)
            .map(|(n, ip)| Lease { mac: n.mac, ip })
            .into_iter()
            .collect();
        match releaser.release(&macs, &known).await {
            Ok(leases) => {
                for lease in leases {
                    tracing::info!(vm.id = %self.spec.id, mac = %lease.mac, ip = %lease.ip, "released the NAT lease");
                }
            }
            Err(e) => tracing::warn!(
                vm.id = %self.spec.id,
                lease_file = %releaser.lease_file().display(),
                error = %chain(&e),
                "releasing the NAT leases failed; they expire on their own"
            ),
        }
    }

    fn spawn_tasks(
        &self,
        child: Option<Child>,
        pid: i32,
        events: mpsc::UnboundedReceiver<QmpEvent>,
    ) {
        let monitor = Monitor {
            id: self.spec.id.clone(),
            dir: self.dir.clone(),
            state: self.state.clone(),
            child,
            pid,
        };
        self.track(tokio::spawn(monitor.run(events)));
        if let (Some(nic), Some(tap)) = (
            self.spec.nics.first(),
            self.dir.read_taps().into_iter().next(),
        ) {
            let dir = self.dir.clone();
            self.track(discovery::spawn_discovery(
                tap,
                nic.mac,
                self.ip.clone(),
                move |ip| {
                    if let Err(e) = dir.write_ip(ip) {
                        tracing::warn!(error = %e, "recording the VM address failed");
                    }
                },
            ));
        }
    }
}

/// An error and its causes, `: `-joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn set_state(tx: &watch::Sender<VmState>, id: &str, s: VmState) {
    tx.send_if_modified(|cur| {
        if cur.is_final() || *cur == s {
            return false;
        }
        tracing::info!(vm.id = %id, from = ?cur, to = ?s, "VM state");
        *cur = s;
        true
    });
}

/// Watches QMP events and the process; turns them into states.
struct Monitor {
    id: String,
    dir: StateDir,
    state: watch::Sender<VmState>,
    child: Option<Child>,
    pid: i32,
}

impl Monitor {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<QmpEvent>) {
        let mut shutdown: Option<String> = None;
        while let Some(ev) = events.recv().await {
            tracing::debug!(vm.id = %self.id, event = %ev.name, data = %ev.data, "QMP event");
            match ev.name.as_str() {
                "SHUTDOWN" => {
                    let reason = ev
                        .data
                        .get("reason")
                        .and_then(|r| r.as_str())
                        .unwrap_or("unknown");
                    shutdown = Some(reason.to_owned());
                    if reason != "guest-panic" {
                        set_state(&self.state, &self.id, VmState::Stopping);
                    }
                }
                "POWERDOWN" => set_state(&self.state, &self.id, VmState::Stopping),
                "RESUME" => set_state(&self.state, &self.id, VmState::Running),
                _ => {}
            }
        }
        // QMP closed: QEMU is exiting. Reap it (our child) or wait for the pid to vanish.
        let status = match self.child.as_mut() {
            Some(c) => c.wait().await.ok().map(|s| s.to_string()),
            None => {
                let deadline = Instant::now() + FORCE_STOP_WAIT;
                while self.dir.is_our_qemu(self.pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None
            }
        };
        let clean = matches!(
            shutdown.as_deref(),
            Some("guest-shutdown" | "host-qmp-quit" | "host-signal" | "host-ui")
        );
        let final_state = if clean || self.dir.stop_requested() {
            VmState::Stopped
        } else {
            let tail = self.dir.qemu_log_tail(300);
            VmState::Failed {
                reason: format!(
                    "QEMU exited unexpectedly ({}{}){}",
                    status.unwrap_or_else(|| "not our child; exit status unknown".into()),
                    shutdown
                        .map(|r| format!(", shutdown reason {r}"))
                        .unwrap_or_default(),
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!("; qemu.log: {tail}")
                    }
                ),
            }
        };
        set_state(&self.state, &self.id, final_state);
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn state(&self) -> watch::Receiver<VmState> {
        self.state.subscribe()
    }

    fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>> {
        self.ip.subscribe()
    }

    fn host_usage(&self) -> Option<HostUsage> {
        if self.state.borrow().is_final() {
            return None;
        }
        // The pid is ours only while the state dir says so (a recycled pid is not QEMU).
        let pid = self.pid().filter(|&p| self.dir.is_our_qemu(p))?;
        crate::procinfo::usage(pid)
    }

    async fn start(&self) -> Result<(), VmError> {
        let _guard = self.start_lock.lock().await;
        let current = self.state.borrow().clone();
        if current != VmState::Created {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "start",
                state: current,
            });
        }
        self.set_state(VmState::Starting);
        let started = Instant::now();
        let fds = self.plug_nics().await?;
        let plugged = Instant::now();
        // The QMP socket is bound here and handed to QEMU: the connection below is
        // queued at once and answered as soon as QEMU's main loop runs (no polling for
        // the socket file).
        let qmp_socket = self.dir.qmp_socket();
        let _ = std::fs::remove_file(&qmp_socket);
        let listener = std::os::unix::net::UnixListener::bind(&qmp_socket)
            .map_err(|e| self.fail_start(format!("binding {}: {e}", qmp_socket.display())))?;
        let qmp_fd = TAP_FD_BASE + i32::try_from(fds.len()).unwrap_or(0);
        // A restore's state is read by QEMU itself from this fd (`fd:` migration), not
        // through a `cat` and a pipe.
        let state_file = match &self.spec.snapshot {
            Some(SnapshotSpec::Restore { state }) => {
                Some(std::fs::File::open(state).map_err(|e| {
                    self.fail_start(format!("opening the saved state {}: {e}", state.display()))
                })?)
            }
            _ => None,
        };
        let state_fd = state_file.as_ref().map(|_| qmp_fd + 1);
        if let (BootSpec::Efi { variable_store }, Some(ovmf)) = (&self.spec.boot, &self.shared.ovmf)
        {
            ovmf.ensure_variable_store(variable_store).map_err(|e| {
                self.fail_start(format!(
                    "making the EFI variable store {} from {}: {e}",
                    variable_store.display(),
                    ovmf.vars_template.display()
                ))
            })?;
        }
        let paths = QemuPaths {
            qmp_socket,
            qmp_fd: Some(qmp_fd),
            pid_file: self.dir.pid_file(),
            ovmf_code: self.shared.ovmf.as_ref().map(|o| o.code.clone()),
        };
        let args = qemu_args(&self.spec, self.shared.accel, &paths)
            .map_err(|e| self.fail_start(e.to_string()))?;
        let _ = std::fs::remove_file(paths.pid_file.as_path());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.qemu_log())
            .map_err(|e| self.fail_start(format!("opening qemu.log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| self.fail_start(format!("opening qemu.log: {e}")))?;
        let mut cmd = Command::new(&self.shared.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let mappings = fds
            .into_iter()
            .chain(std::iter::once(OwnedFd::from(listener)))
            .chain(state_file.map(OwnedFd::from))
            .zip(TAP_FD_BASE..)
            .map(|(parent_fd, child_fd)| FdMapping {
                parent_fd,
                child_fd,
            })
            .collect();
        cmd.fd_mappings(mappings)
            .map_err(|e| self.fail_start(e.to_string()))?;
        let spawned = cmd.spawn();
        // Our copies of the TAP fds, the QMP listener and the state file close with the
        // command; QEMU holds its own.
        drop(cmd);
        let mut child = spawned.map_err(|e| {
            self.fail_start(format!("spawning {}: {e}", self.shared.binary.display()))
        })?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_default();
        if let Ok(mut p) = self.pid.lock() {
            *p = Some(pid);
        }
        let spawned_at = Instant::now();
        let (qmp, events) = match connect_qmp(&self.dir, &mut child).await {
            Ok(x) => x,
            Err(reason) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(self.fail_start(format!(
                    "{reason}; qemu.log: {}",
                    self.dir.qemu_log_tail(500)
                )));
            }
        };
        let connected = Instant::now();
        let qmp = Arc::new(qmp);
        if let Ok(mut q) = self.qmp.lock() {
            *q = Some(qmp.clone());
        }
        self.spawn_tasks(Some(child), pid, events);
        if let (Some(SnapshotSpec::Restore { state }), Some(fd)) = (&self.spec.snapshot, state_fd)
            && let Err(e) = self.restore(&qmp, fd).await
        {
            let _ = qmp.quit().await;
            let reason = format!("restoring {}: {e}", state.display());
            self.set_state(VmState::Failed {
                reason: reason.clone(),
            });
            return Err(VmError::Snapshot {
                id: self.spec.id.clone(),
                operation: "restoring the state",
                source: msg(reason),
            });
        }
        let restored = Instant::now();
        if qmp.query_status().await.is_ok_and(|s| s == "running") {
            self.set_state(VmState::Running);
        }
        let done = Instant::now();
        let timings = StartTimings {
            plug_nics: plugged - started,
            spawn: spawned_at - plugged,
            qmp_connect: connected - spawned_at,
            restore: restored - connected,
            running: done - restored,
            total: done - started,
        };
        if let Ok(mut t) = self.timings.lock() {
            *t = Some(timings);
        }
        tracing::info!(
            vm.id = %self.spec.id,
            pid,
            accel = self.shared.accel.as_str(),
            elapsed_ms = timings.total.as_millis() as u64,
            plug_nics_ms = timings.plug_nics.as_millis() as u64,
            spawn_ms = timings.spawn.as_millis() as u64,
            qmp_ms = timings.qmp_connect.as_millis() as u64,
            "VM started"
        );
        Ok(())
    }

    async fn request_stop(&self) -> Result<(), VmError> {
        let state = self.state.borrow().clone();
        if state.is_final() || state == VmState::Created {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "request stop",
                state,
            });
        }
        let qmp = self.qmp().ok_or_else(|| VmError::RequestStop {
            id: self.spec.id.clone(),
            source: msg("no QMP connection".into()),
        })?;
        let _ = self.dir.mark_stop_requested();
        qmp.system_powerdown()
            .await
            .map_err(|e| VmError::RequestStop {
                id: self.spec.id.clone(),
                source: boxed(e),
            })?;
        self.set_state(VmState::Stopping);
        Ok(())
    }

    async fn force_stop(&self) -> Result<(), VmError> {
        if self.state.borrow().is_final() {
            return Ok(());
        }
        if *self.state.borrow() == VmState::Created {
            self.set_state(VmState::Stopped);
            return Ok(());
        }
        let _ = self.dir.mark_stop_requested();
        self.set_state(VmState::Stopping);
        let mut rx = self.state.subscribe();
        let ended = |rx: &mut watch::Receiver<VmState>| {
            let mut rx = rx.clone();
            async move { rx.wait_for(VmState::is_final).await.is_ok() }
        };
        if let Some(qmp) = self.qmp() {
            if let Err(e) = qmp.quit().await {
                tracing::warn!(vm.id = %self.spec.id, error = %e, "QMP quit failed; killing");
            }
            if tokio::time::timeout(FORCE_STOP_WAIT, ended(&mut rx))
                .await
                .is_ok_and(|ok| ok)
            {
                return Ok(());
            }
        }
        if let Some(pid) = self.pid() {
            // The process group is QEMU's own (process_group(0) at spawn).
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if tokio::time::timeout(FORCE_STOP_WAIT, ended(&mut rx))
            .await
            .is_ok_and(|ok| ok)
        {
            return Ok(());
        }
        Err(VmError::ForceStop {
            id: self.spec.id.clone(),
            source: msg("QEMU did not exit after SIGKILL".into()),
        })
    }

    async fn save_state(&self) -> Result<(), VmError> {
        let fail = |e: String| VmError::Snapshot {
            id: self.spec.id.clone(),
            operation: "saving the state",
            source: msg(e),
        };
        let state = self.state.borrow().clone();
        let path = match &self.spec.snapshot {
            Some(SnapshotSpec::Template { state: path }) if state == VmState::Running => path,
            _ => {
                return Err(VmError::InvalidState {
                    id: self.spec.id.clone(),
                    operation: "save the state of (a running template VM only)",
                    state,
                });
            }
        };
        let qmp = self.qmp().ok_or_else(|| fail("no QMP connection".into()))?;
        let tmp = path.with_extension("partial");
        let uri = exec_uri("cat > ", &tmp).map_err(fail)?;
        // 1. The guest lets go of the devices that are each VM's own.
        let ids = template_unplug_ids(&self.spec);
        for id in &ids {
            qmp.execute("device_del", Some(serde_json::json!({ "id": id })))
                .await
                .map_err(|e| fail(format!("unplugging {id}: {e}")))?;
        }
        let deadline = Instant::now() + UNPLUG_TIMEOUT;
        loop {
            let present = qmp
                .execute(
                    "qom-list",
                    Some(serde_json::json!({ "path": "/machine/peripheral" })),
                )
                .await
                .map_err(|e| fail(format!("listing devices: {e}")))?;
            let names: Vec<&str> = present
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("name").and_then(serde_json::Value::as_str))
                .collect();
            let left: Vec<&String> = ids
                .iter()
                .filter(|id| names.contains(&id.as_str()))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "the guest did not release {left:?} within {UNPLUG_TIMEOUT:?} \
                     (does its kernel support PCI hot-unplug?)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 2. vCPUs stopped, then one pass of memory and devices into the file.
        qmp.execute("stop", None)
            .await
            .map_err(|e| fail(format!("stop: {e}")))?;
        let _ = qmp
            .execute(
                "migrate-set-parameters",
                Some(serde_json::json!({ "max-bandwidth": 1u64 << 40 })),
            )
            .await;
        qmp.execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await
            .map_err(|e| fail(format!("migrate: {e}")))?;
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let info = qmp
                .execute("query-migrate", None)
                .await
                .map_err(|e| fail(format!("query-migrate: {e}")))?;
            match info.get("status").and_then(serde_json::Value::as_str) {
                Some("completed") => break,
                Some(s @ ("failed" | "cancelled")) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(fail(format!(
                        "migration {s}: {}",
                        info.get("error-desc")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("no reason given")
                    )));
                }
                _ if Instant::now() > deadline => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(fail(format!("not done within {MIGRATE_TIMEOUT:?}")));
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| fail(format!("keeping {}: {e}", path.display())))?;
        tracing::info!(vm.id = %self.spec.id, path = %path.display(), "machine state saved");
        // 3. The template VM has done its work.
        self.force_stop().await
    }

    async fn remove(&self) -> Result<(), VmError> {
        let state = self.state.borrow().clone();
        if !state.is_final() && state != VmState::Created {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "remove",
                state,
            });
        }
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        self.release_nat_leases().await;
        self.dir.remove().map_err(|e| VmError::Remove {
            id: self.spec.id.clone(),
            source: boxed(e),
        })
    }
}

/// How long a template's guest may take to release its unplugged devices.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long saving or loading a machine state may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);

/// An `exec:` migration URI running `/bin/sh -c '<command>'<path>'` (the path single-quoted).
fn exec_uri(command: &str, path: &std::path::Path) -> Result<String, String> {
    let p = path.display().to_string();
    if p.contains('\'') || p.contains('\n') {
        return Err(format!("path {p:?} cannot be quoted for QEMU's exec: URI"));
    }
    Ok(format!("exec:{command}'{p}'"))
}

impl QemuVm {
    /// Loads the saved state into the QEMU just launched (`-incoming defer -S`) from the
    /// file it was given on fd `state_fd`, plugs in this VM's own NICs and shared
    /// directories, and lets the vCPUs run.
    async fn restore(&self, qmp: &QmpClient, state_fd: i32) -> Result<(), String> {
        let uri = format!("fd:{state_fd}");
        let t0 = Instant::now();
        qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
            .await
            .map_err(|e| format!("migrate-incoming: {e}"))?;
        // QEMU exits if the stream cannot be loaded; else the run state leaves `inmigrate`.
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            match qmp.query_status().await {
                Ok(s) if s == "inmigrate" => {}
                Ok(_) => break,
                Err(e) => {
                    return Err(format!(
                        "QEMU did not load it ({e}); qemu.log: {}",
                        self.dir.qemu_log_tail(500)
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not loaded within {MIGRATE_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let loaded = t0.elapsed();
        for dev in hotplug_devices(&self.spec) {
            let id = dev.get("id").cloned().unwrap_or_default();
            qmp.execute("device_add", Some(dev))
                .await
                .map_err(|e| format!("plugging {id}: {e}"))?;
        }
        qmp.execute("cont", None)
            .await
            .map_err(|e| format!("cont: {e}"))?;
        tracing::info!(
            vm.id = %self.spec.id,
            load_ms = loaded.as_millis(),
            plug_and_run_ms = (t0.elapsed() - loaded).as_millis(),
            "VM restored"
        );
        Ok(())
    }
}

/// Waits for QEMU's QMP socket and negotiates; fails early if QEMU exits.
async fn connect_qmp(
    dir: &StateDir,
    child: &mut Child,
) -> Result<(QmpClient, mpsc::UnboundedReceiver<QmpEvent>), String> {
    let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("QEMU exited at start ({status})"));
        }
        match QmpClient::connect(&dir.qmp_socket()).await {
            Ok(x) => return Ok(x),
            Err(e) if Instant::now() > deadline => return Err(format!("QMP not reachable: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The backend kind of these handles (for `Unsupported` errors).
pub const BACKEND: BackendKind = BackendKind::Qemu;
