//! One VM host process per VM (`vzk_vm::hosted`), end to end with the real binary: the
//! hosts are `vz-kubelet vm --fake-backend host` processes running the fake in-process
//! backend (a VM is Running with 192.0.2.10 once started, Stopped once stopped).
//!
//! * Through the library: create → start → Running and the IP through the proxy; the
//!   client side dropped entirely (an agent restart) → a new backend adopts the VM,
//!   Running with its IP; stop → the host exits and its files are gone; a host killed
//!   with SIGKILL → its proxy and a later adoption report the VM Failed with a reason.
//! * Through the CLI: `vm run` (the "agent") and its process group are killed with
//!   SIGKILL; `vm list` in a new process still sees the VM running; `vm stop` stops it
//!   and its host exits.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vzk_vm::hosted::fake::{FAKE_IP, FakeHypervisor};
use vzk_vm::hosted::{Hosted, Launcher, StateFile, VmFiles};
use vzk_vm::{
    BootSpec, Hypervisor, StopOutcome, Vm, VmSpec, VmState, stop_gracefully, wait_for_ip,
    wait_for_state,
};

const T: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_vz-kubelet");

fn backend(dir: &Path) -> Hosted {
    let launcher = Launcher::new(BIN, ["vm", "--fake-backend", "host"]);
    match Hosted::new(Arc::new(FakeHypervisor::new()), dir, launcher) {
        Ok(h) => h,
        Err(e) => panic!("hosted backend: {e}"),
    }
}

fn spec(id: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        cpus: 1,
        memory_bytes: 64 << 20,
        boot: BootSpec::LinuxKernel {
            kernel: "/nonexistent/kernel".into(),
            initrd: None,
            cmdline: String::new(),
        },
        disks: vec![],
        nics: vec![],
        shared_dirs: vec![],
        console_log: None,
        snapshot: None,
    }
}

fn host_pid(dir: &Path, id: &str) -> u32 {
    let files = VmFiles::new(dir, id).expect("files");
    let state: StateFile =
        serde_json::from_slice(&std::fs::read(&files.state).expect("state")).expect("state file");
    assert_ne!(state.pid, std::process::id());
    state.pid
}

/// Whether `pid` is a live process (a zombie is not).
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z')),
            Err(_) => false,
        }
    } else {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, None).is_ok()
    }
}

fn wait_exited(pid: u32) {
    let deadline = Instant::now() + T;
    while alive(pid) {
        assert!(Instant::now() < deadline, "VM host {pid} still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("hosts dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

fn reason(vm: &dyn Vm) -> String {
    match &*vm.state().borrow() {
        VmState::Failed { reason } => reason.clone(),
        other => panic!("{} is {other:?}, not Failed", vm.id()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_survive_their_client_and_dead_hosts_are_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("hosts");

    let hv = backend(&dir);
    let vm = match hv.create(spec("vm-a")).await {
        Ok(vm) => vm,
        Err(e) => panic!("create: {e:?}"),
    };
    assert_eq!(*vm.state().borrow(), VmState::Created);
    vm.start().await.expect("start");
    wait_for_state(vm.as_ref(), T, "running", |s| *s == VmState::Running)
        .await
        .expect("running");
    assert_eq!(wait_for_ip(vm.as_ref(), T).await.ok(), Some(FAKE_IP));
    let pid = host_pid(&dir, "vm-a");
    // Detached: a session of its own, so nothing aimed at the agent's reaches it.
    let raw = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    assert_eq!(nix::unistd::getsid(Some(raw)).ok(), Some(raw));
    let mut usage = None;
    for _ in 0..200 {
        usage = vm.host_usage();
        if usage.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(usage.is_some_and(|u| u.rss_bytes > 1 << 20), "{usage:?}");

    // The agent goes away: every handle and connection is dropped.
    drop(vm);
    drop(hv);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(pid), "the host outlives its client");

    let hv = backend(&dir);
    let vms = hv.adopt_existing().await.expect("adopt");
    assert_eq!(vms.len(), 1);
    let vm = vms[0].clone();
    assert_eq!(vm.id(), "vm-a");
    assert_eq!(*vm.state().borrow(), VmState::Running);
    assert_eq!(*vm.ip_address().borrow(), Some(FAKE_IP));

    // A second VM whose host is killed.
    let doomed = match hv.create(spec("vm-k")).await {
        Ok(vm) => vm,
        Err(e) => panic!("create: {e:?}"),
    };
    doomed.start().await.expect("start");
    wait_for_ip(doomed.as_ref(), T).await.expect("ip");
    let doomed_pid = host_pid(&dir, "vm-k");
    let raw = nix::unistd::Pid::from_raw(i32::try_from(doomed_pid).expect("pid"));
    nix::sys::signal::kill(raw, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    wait_for_state(doomed.as_ref(), T, "failure", |s| {
        matches!(s, VmState::Failed { .. })
    })
    .await
    .expect("the proxy sees the host die");
    assert!(reason(doomed.as_ref()).contains(&format!("pid {doomed_pid}")));
    wait_exited(doomed_pid);
    drop(doomed);

    // Stop the first VM through the adopted proxy: its host exits, its files go.
    assert_eq!(
        stop_gracefully(vm.as_ref(), T).await.ok(),
        Some(StopOutcome::Graceful)
    );
    vm.remove().await.expect("remove");
    wait_exited(pid);
    let vm_a = VmFiles::new(&dir, "vm-a").expect("files");
    assert!(!vm_a.state.exists() && !vm_a.socket.exists() && !vm_a.log.exists());

    // A new agent finds the killed host's files and reports it, then they are gone.
    let hv = backend(&dir);
    let vms = hv.adopt_existing().await.expect("adopt");
    assert_eq!(vms.len(), 1);
    let why = reason(vms[0].as_ref());
    assert!(
        why.contains(&format!("pid {doomed_pid}")) && why.contains("gone"),
        "{why}"
    );
    vms[0].remove().await.expect("remove");
    assert_eq!(listing(&dir), Vec::<PathBuf>::new());
}

fn vz_kubelet(state_dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["vm", "--fake-backend", "--state-dir"])
        .arg(state_dir);
    c
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run vz-kubelet");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn a_killed_agent_leaves_its_vm_running_for_the_next() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path();
    // The agent leads a process group of its own: killing that group is what a
    // terminal's Ctrl-C or a service manager does to everything the agent started.
    let mut agent = vz_kubelet(state)
        .args(["run", "--id", "cli-vm", "--kernel", "/nonexistent/kernel"])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vm run");
    let stdout = agent.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(T).expect("vm run prints the IP");
    assert_eq!(line, format!("cli-vm: ip {FAKE_IP}"));

    let hosts = state.join("hosts");
    let pid = host_pid(&hosts, "cli-vm");
    let group = nix::unistd::Pid::from_raw(i32::try_from(agent.id()).expect("pid"));
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL the agent's process group");
    agent.wait().expect("reap the agent");
    std::thread::sleep(Duration::from_millis(100));
    assert!(alive(pid), "the VM host outlives the killed agent");

    let list = run_ok(vz_kubelet(state).arg("list"));
    assert_eq!(list.trim(), format!("cli-vm\tRunning\t{FAKE_IP}"));
    let stop = run_ok(vz_kubelet(state).args(["stop", "cli-vm", "--grace", "5s"]));
    assert_eq!(stop.trim(), "cli-vm: Graceful");
    wait_exited(pid);
    assert_eq!(listing(&hosts), Vec::<PathBuf>::new());
    assert_eq!(run_ok(vz_kubelet(state).arg("list")).trim(), "");
}
