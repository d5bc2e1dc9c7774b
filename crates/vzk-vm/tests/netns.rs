//! [`InNetns`]: a backend built, and its VMs operated and connected to, inside a network
//! namespace the caller never enters. Needs root (`ip netns add`).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use support::Netns;
use tokio::sync::watch;
use vzk_vm::netns::{InNetns, NetnsRuntime};
use vzk_vm::{
    BackendKind, BootSpec, Capabilities, Hypervisor, HypervisorError, Vm, VmError, VmSpec, VmState,
};

/// The network namespace of the calling thread.
fn current_netns() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .unwrap()
        .display()
        .to_string()
}

/// Records in which namespace each of its operations ran.
struct Recorder {
    caps: Capabilities,
    seen: Arc<Mutex<Vec<(&'static str, String)>>>,
}

struct RecVm {
    spec: VmSpec,
    state: watch::Sender<VmState>,
    ip: watch::Sender<Option<Ipv4Addr>>,
    seen: Arc<Mutex<Vec<(&'static str, String)>>>,
}

#[async_trait]
impl Hypervisor for Recorder {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        self.seen.lock().unwrap().push(("create", current_netns()));
        Ok(Arc::new(RecVm {
            spec,
            state: watch::channel(VmState::Created).0,
            ip: watch::channel(None).0,
            seen: self.seen.clone(),
        }))
    }
    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        self.seen.lock().unwrap().push(("adopt", current_netns()));
        Ok(Vec::new())
    }
}

#[async_trait]
impl Vm for RecVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }
    fn state(&self) -> watch::Receiver<VmState> {
        self.state.subscribe()
    }
    fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>> {
        self.ip.subscribe()
    }
    async fn start(&self) -> Result<(), VmError> {
        self.seen.lock().unwrap().push(("start", current_netns()));
        self.state.send_replace(VmState::Running);
        Ok(())
    }
    async fn request_stop(&self) -> Result<(), VmError> {
        Ok(())
    }
    async fn force_stop(&self) -> Result<(), VmError> {
        self.seen
            .lock()
            .unwrap()
            .push(("force_stop", current_netns()));
        self.state.send_replace(VmState::Stopped);
        Ok(())
    }
    async fn remove(&self) -> Result<(), VmError> {
        Ok(())
    }
}

fn caps() -> Capabilities {
    Capabilities {
        backend: BackendKind::Qemu,
        accelerator: "fake".into(),
        hardware_accelerated: false,
        cpus: (1, 4),
        memory_bytes: (64 << 20, 1 << 30),
        boot_kinds: vec![],
        disk_formats: vec![],
        nat: true,
        bridged: false,
        shared_dirs: false,
        max_running_vms: None,
        vms_outlive_agent: true,
        snapshots: false,
        snapshot_devices: vzk_vm::SnapshotDevices::HotPlug,
        version: String::new(),
    }
}

fn spec() -> VmSpec {
    VmSpec {
        id: "vzk-netns-test".into(),
        cpus: 1,
        memory_bytes: 64 << 20,
        boot: BootSpec::LinuxKernel {
            kernel: "/nonexistent".into(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_connection_happens_inside_the_namespace() {
    let ns = Netns::new();
    let host = current_netns();
    let inside = std::fs::metadata(format!("/var/run/netns/{}", ns.name)).unwrap();
    let inside_ino = std::os::unix::fs::MetadataExt::ino(&inside);
    let expect = format!("net:[{inside_ino}]");
    assert_ne!(host, expect, "the test must start outside the namespace");

    // A listener that exists only inside the namespace, on its loopback.
    let (tx, rx) = std::sync::mpsc::channel();
    let listener_ns = Netns {
        name: ns.name.clone(),
    };
    let server = std::thread::spawn(move || {
        listener_ns.run(move || async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"inside")
                .await
                .unwrap();
        });
        // Do not let this guard's Drop delete the namespace: the test's own guard does.
        std::mem::forget(listener_ns);
    });
    let addr: SocketAddr = rx.recv().unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec_seen = seen.clone();
    let made_in = Arc::new(Mutex::new(String::new()));
    let made = made_in.clone();
    let hv = InNetns::build(NetnsRuntime::enter(&ns.name).unwrap(), move || async move {
        *made.lock().unwrap() = current_netns();
        Ok(Recorder {
            caps: caps(),
            seen: rec_seen,
        })
    })
    .await
    .unwrap();
    assert_eq!(
        *made_in.lock().unwrap(),
        expect,
        "the backend is built inside"
    );

    let vm = hv.create(spec()).await.unwrap();
    vm.start().await.unwrap();
    hv.adopt_existing().await.unwrap();
    // The caller, outside, reaches the namespace's loopback only through the VM handle.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens on {addr} outside the namespace"
    );
    let mut s = vm.connect(addr).await.unwrap();
    let mut got = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut got)
        .await
        .unwrap();
    assert_eq!(got, "inside");
    vm.force_stop().await.unwrap();
    assert_eq!(
        current_netns(),
        host,
        "the caller never entered the namespace"
    );
    server.join().unwrap();

    let seen = seen.lock().unwrap().clone();
    let ops: Vec<_> = seen.iter().map(|(op, _)| *op).collect();
    assert_eq!(ops, ["create", "start", "adopt", "force_stop"]);
    for (op, netns) in seen {
        assert_eq!(netns, expect, "{op} ran outside the namespace");
    }
}
