//! Each pod's own SSH identity (issue 17, item 5): the agent makes a key pair per pod,
//! hands the public half and the pod's host name to the guest on a cloud-init NoCloud
//! seed disk, and enters the guest with it. The test guest is busybox, not cloud-init:
//! its boot script reads the seed for what vz-kubelet puts there (`guest/rc`), so what
//! is proven here is the agent's side (the seed, the key, its use and its removal) on
//! a real guest; `tests/debian.rs` runs the real Debian guest with real cloud-init.
//!
//! Real components: a private kube-apiserver, the agent binary, QEMU (TCG) in a network
//! namespace of the test's, OpenSSH's client from inside that namespace.

mod support;

use std::path::PathBuf;

use support::{Cluster, public_of, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_gets_its_own_key_and_host_name_and_no_other_pods_key_opens_it() {
    let c = Cluster::start("ident", &["--max-vms", "2"]).await;
    for pod in ["alpha", "beta"] {
        c.apply(&c.vm_pod(pod, "Never"));
    }
    for pod in ["alpha", "beta"] {
        c.wait_pod_ready(pod);
    }
    let pods_dir = c.work.path().join("data/pods");
    let key_of = |pod: &str| -> PathBuf { pods_dir.join(c.uid(pod)).join("ssh_ed25519") };
    let (a_key, b_key) = (key_of("alpha"), key_of("beta"));
    use std::os::unix::fs::PermissionsExt as _;
    for k in [&a_key, &b_key] {
        let mode = std::fs::metadata(k)
            .unwrap_or_else(|e| panic!("{}: {e}", k.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", k.display());
    }
    let (a_pub, b_pub) = (public_of(&a_key), public_of(&b_key));
    assert_ne!(a_pub, b_pub);
    for (pod, own, other) in [("alpha", &a_pub, &b_pub), ("beta", &b_pub, &a_pub)] {
        let out = c.kubectl(&["exec", pod, "--", "hostname"]);
        assert!(out.status.success(), "exec hostname: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), pod, "the seed's host name");
        let out = c.kubectl(&["exec", pod, "--", "cat", "/root/.ssh/authorized_keys"]);
        let keys = text(&out.stdout);
        assert!(keys.contains(own.as_str()), "{pod}'s own key in {keys}");
        assert!(
            !keys.contains(other.as_str()),
            "the other pod's key in {keys}"
        );
    }
    // From the VMs' network: beta takes its own key and refuses alpha's.
    let b_ip = c.jsonpath("pod/beta", "{.status.podIP}");
    support::assert_only_own_key_opens(&c.netns.name, &b_ip, &b_key, &a_key);

    // The key goes with the pod.
    let a_dir = pods_dir.join(c.uid("alpha"));
    let out = c.kubectl(&["delete", "pod", "alpha", "--wait=true", "--timeout=120s"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    support::wait_until(
        std::time::Duration::from_secs(60),
        "alpha's pod dir removed",
        || !a_dir.exists(),
    );
}
