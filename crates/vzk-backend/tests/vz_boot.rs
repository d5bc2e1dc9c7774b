//! A VM booted through this host's backend exactly as `vz-kubelet run` opens it
//! (`vzk_backend::open`): on a Mac, Virtualization.framework. A small arm64 Linux guest
//! boots, gets an address on the NAT network, answers SSH, survives the loss of the
//! backend that started it (an agent restart: a second backend re-adopts it, same IP,
//! SSH still works) and is stopped and removed.
//!
//! Runs on a Mac that can virtualize (not GitHub's hosted runners), with the test binary
//! signed with the virtualization entitlement (`scripts/sign-macos.sh <test binary>`) and
//! `VZK_MAC_TEST_GUEST` naming a directory with `kernel` (arm64 `Image`), `initrd`,
//! `cmdline` and `id_ed25519` (the OpenSSH private key root's `authorized_keys` accepts):
//!
//! ```text
//! VZK_MAC_TEST_GUEST=/path/to/guest cargo test -p vzk-backend --test vz_boot -- --ignored
//! ```
//!
//! Compiled (and linted) on Linux by `.ci/run`'s aarch64-apple-darwin check.
#![cfg(target_os = "macos")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use vzk_backend::BackendArgs;
use vzk_guest::{CredentialSource, Credentials, GuestConfig, GuestSession, HostKeyStore};
use vzk_vm::{BootSpec, MacAddr, NetworkAttachment, NicSpec, VmSpec, stop_gracefully, wait_for_ip};

const ID: &str = "vzk-vz-boot-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Mac that can virtualize, a signed test binary and VZK_MAC_TEST_GUEST"]
async fn a_linux_guest_boots_answers_ssh_and_is_readopted_after_an_agent_restart() {
    let guest = PathBuf::from(
        std::env::var_os("VZK_MAC_TEST_GUEST")
            .expect("VZK_MAC_TEST_GUEST: a directory with kernel, initrd, cmdline, id_ed25519"),
    );
    let state = tempfile::tempdir().unwrap();
    let args = BackendArgs::default();
    let hv = vzk_backend::open(&args, state.path())
        .await
        .expect("Virtualization.framework backend (is the test binary signed?)");
    let cmdline = std::fs::read_to_string(guest.join("cmdline")).unwrap();
    let spec = VmSpec {
        id: ID.into(),
        cpus: 1,
        memory_bytes: 512 << 20,
        boot: BootSpec::LinuxKernel {
            kernel: guest.join("kernel"),
            initrd: Some(guest.join("initrd")),
            cmdline: cmdline.trim().to_owned(),
        },
        disks: vec![],
        nics: vec![NicSpec {
            mac: MacAddr::random(),
            attachment: NetworkAttachment::Nat,
        }],
        shared_dirs: vec![],
        console_log: Some(state.path().join("console.log")),
        snapshot: None,
    };
    let vm = hv.create(spec).await.expect("create");
    vm.start().await.expect("start");
    let ip = wait_for_ip(vm.as_ref(), Duration::from_secs(180))
        .await
        .expect("the guest's address from the NAT network");

    let key = guest.join("id_ed25519").display().to_string();
    let source = CredentialSource::from_lookup(|name| match name {
        "VZ_SSH_USER" => Some("root".to_owned()),
        "VZ_SSH_PRIVATE_KEY_PATH" => Some(key.clone()),
        _ => None,
    });
    let session = GuestSession::new(
        SocketAddr::from((ip, 22)),
        Credentials::load(&source).expect("credentials"),
        HostKeyStore::file(state.path().join("host_key")),
        GuestConfig::default(),
    );
    session
        .wait_ready(Duration::from_secs(120))
        .await
        .expect("SSH");
    let out = session.output(&["uname", "-m"]).await.expect("uname");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "aarch64");

    // The agent goes away; a new one re-adopts the running VM.
    drop(vm);
    drop(hv);
    let hv = vzk_backend::open(&args, state.path())
        .await
        .expect("reopen");
    let vm = hv
        .adopt_existing()
        .await
        .expect("adopt")
        .into_iter()
        .find(|v| v.id() == ID)
        .expect("the VM outlived the backend that started it");
    assert_eq!(
        wait_for_ip(vm.as_ref(), Duration::from_secs(30)).await.ok(),
        Some(ip),
        "same address after re-adoption"
    );
    let out = session
        .output(&["echo", "still-here"])
        .await
        .expect("SSH again");
    assert_eq!(out.stdout, b"still-here\n");

    session.close();
    stop_gracefully(vm.as_ref(), Duration::from_secs(30))
        .await
        .expect("stop");
    vm.remove().await.expect("remove");
}
