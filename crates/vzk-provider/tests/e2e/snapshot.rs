//! Start by restore end to end (issue 18): a node started with `--snapshot-start` boots
//! the first pod of an image cold and makes a template of it in the background; two
//! pods created at once are then restored from it, each with its own MAC, address, host
//! name, clock and disk, with the pod's own volumes plugged in; a pod that opts out
//! boots cold; a template whose saved state was tampered with is refused with an event,
//! the pod boots cold, and the template is made again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use super::support::*;
use super::{BOOT, exec, is_ready, vm_pod};

async fn create_ready(pods: &Api<Pod>, pod: &Pod) -> Pod {
    pods.create(&PostParams::default(), pod).await.unwrap();
    let name = pod.metadata.name.clone().unwrap_or_default();
    wait_for(BOOT, &format!("{name} Ready"), || async {
        pods.get(&name).await.ok().filter(is_ready)
    })
    .await
}

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_start_by_restore_with_their_own_identity_and_fall_back_to_a_cold_boot() {
    let env = TestNode::start("snap", |a| {
        a.snapshot_start = true;
        a.max_vms = 3;
    })
    .await;
    let image = env.push_guest("snap-guest", "").await;
    let TestNode {
        ns,
        pods,
        events,
        provider,
        node,
        data,
        ..
    } = env;

    // 1. The first pod boots cold; its template is made meanwhile.
    let first = create_ready(&pods, &vm_pod("first", &node, &image)).await;
    let started = wait_event(&events, "first", "Started", Duration::from_secs(10)).await;
    assert!(!started.contains("restoring"), "{started}");
    let building = wait_event(
        &events,
        "first",
        "BuildingTemplate",
        Duration::from_secs(10),
    )
    .await;
    assert!(building.contains("1 vCPU, 256 MiB"), "{building}");
    let ready = wait_for(BOOT, "the template", || async {
        events_of(&events, "first")
            .await
            .into_iter()
            .find(|(r, _)| r == "TemplateReady" || r == "TemplateFailed")
    })
    .await;
    assert_eq!(ready.0, "TemplateReady", "{}", ready.1);
    eprintln!("template: {}", ready.1);
    let templates: Vec<_> = walk(&data.join("images"), "template.json");
    assert_eq!(templates.len(), 1, "{templates:?}");
    let tdir = templates[0].parent().unwrap().to_owned();
    let disk_sum = sha256_of(&tdir.join("disk"));
    delete_pod(&pods, "first", 0, Duration::from_secs(60)).await;

    // 2. Two pods at once, both restored.
    let t0 = std::time::Instant::now();
    for name in ["a", "b"] {
        pods.create(&PostParams::default(), &vm_pod(name, &node, &image))
            .await
            .unwrap();
    }
    let mut ready = Vec::new();
    for name in ["a", "b"] {
        ready.push(
            wait_for(BOOT, &format!("{name} Ready"), || async {
                pods.get(name).await.ok().filter(is_ready)
            })
            .await,
        );
    }
    eprintln!("a and b Ready {:?} after their creation", t0.elapsed());
    for name in ["a", "b"] {
        let started = wait_event(&events, name, "Started", Duration::from_secs(10)).await;
        assert!(
            started.contains("by restoring template"),
            "{name}: {started}"
        );
    }
    assert_ne!(pod_ip(&ready[0]), pod_ip(&ready[1]));
    assert_ne!(pod_ip(&ready[0]), pod_ip(&first));
    let mut macs = Vec::new();
    for name in ["a", "b"] {
        let before = unix_now();
        let (code, out) = exec(
            &provider,
            &ns,
            name,
            "hostname; cat /sys/class/net/eth0/address; date +%s",
        )
        .await;
        let after = unix_now();
        assert_eq!(code, 0, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.first().copied(), Some(name), "{out}");
        macs.push(lines[1].to_owned());
        let guest: f64 = lines[2].trim().parse().unwrap();
        // `date +%s` truncates: the guest's clock is right within a second.
        assert!(
            guest >= before.floor() - 1.0 && guest <= after + 1.0,
            "{name}: guest clock {guest}, host {before}..{after}"
        );
        // The pod's volumes were plugged in after the restore and mounted.
        let (code, out) = exec(
            &provider,
            &ns,
            name,
            "cat /var/run/secrets/kubernetes.io/serviceaccount/namespace",
        )
        .await;
        assert_eq!((code, out.trim()), (0, ns.as_str()), "{name}");
    }
    assert_ne!(macs[0], macs[1]);
    // Each guest made a new host key during its re-identification, and the agent pinned
    // that one for the pod's later dials (its session ran on the re-identification's
    // connection): not the template guest's key, and not the other pod's.
    let body = |line: &str| line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let template_host_key = body(&std::fs::read_to_string(tdir.join("ssh_host_key")).unwrap());
    let mut host_keys = Vec::new();
    for (name, pod) in ["a", "b"].iter().zip(&ready) {
        let uid = pod.metadata.uid.clone().unwrap();
        let pinned = std::fs::read_to_string(data.join("pods").join(&uid).join("ssh_host_key"))
            .unwrap_or_else(|e| panic!("{name}'s pinned host key: {e}"));
        let (code, out) = exec(
            &provider,
            &ns,
            name,
            "dropbearkey -y -f /etc/dropbear/dropbear_ed25519_host_key | grep '^ssh-ed25519'",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(
            body(&pinned),
            body(&out),
            "{name}: pinned {pinned} but the guest has {out}"
        );
        assert_ne!(
            body(&pinned),
            template_host_key,
            "{name} kept the template's host key"
        );
        host_keys.push(body(&pinned));
    }
    assert_ne!(host_keys[0], host_keys[1]);
    // The template's login key is gone from the guest; the pod's own is there.
    let (code, out) = exec(&provider, &ns, "a", "cat /root/.ssh/authorized_keys").await;
    assert_eq!(code, 0);
    assert!(!out.contains("vz-kubelet template"), "{out}");
    // Writes stay in each pod's own disk.
    let (code, _) = exec(&provider, &ns, "a", "echo from-a > /root/only-a; sync").await;
    assert_eq!(code, 0);
    let (code, _) = exec(&provider, &ns, "b", "test -e /root/only-a").await;
    assert_eq!(code, 1, "b sees a's file");
    assert_eq!(
        sha256_of(&tdir.join("disk")),
        disk_sum,
        "the template's disk changed"
    );
    for name in ["a", "b"] {
        delete_pod(&pods, name, 0, Duration::from_secs(60)).await;
    }

    // 3. A pod that opts out boots cold; a tampered template is refused and rebuilt.
    let state = tdir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let mut cold = vm_pod("cold", &node, &image);
    cold.metadata.annotations = Some(
        [(
            "vz-kubelet.io/snapshot-start".to_owned(),
            "false".to_owned(),
        )]
        .into_iter()
        .collect(),
    );
    create_ready(&pods, &cold).await;
    let started = wait_event(&events, "cold", "Started", Duration::from_secs(10)).await;
    assert!(!started.contains("restoring"), "{started}");
    assert!(
        !events_of(&events, "cold")
            .await
            .iter()
            .any(|(r, _)| r == "RestoreFailed"),
        "an opted-out pod never looks at a template"
    );
    create_ready(&pods, &vm_pod("c", &node, &image)).await;
    let refused = wait_event(&events, "c", "RestoreFailed", Duration::from_secs(10)).await;
    assert!(refused.contains("digest"), "{refused}");
    let started = wait_event(&events, "c", "Started", Duration::from_secs(10)).await;
    assert!(!started.contains("restoring"), "{started}");
    wait_event(&events, "c", "BuildingTemplate", Duration::from_secs(10)).await;
    wait_event(&events, "c", "TemplateReady", BOOT).await;
    for name in ["cold", "c"] {
        delete_pod(&pods, name, 0, Duration::from_secs(60)).await;
    }
    wait_all_released(&provider, Duration::from_secs(60)).await;
}

/// A template made ahead of time (`--snapshot-template IMAGE,cpu=…,memory=…`): the agent
/// makes it on its own once the image can be pulled (its first pulls fail here: the
/// image is pushed after the agent started), so the very first pod of that image and
/// shape starts by restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_made_ahead_of_time_restores_the_first_pod() {
    let env = TestNode::start("snapahead", |a| {
        a.snapshot_start = true;
        let image = format!("{}/vzk/ahead-guest:v1", a.insecure_registries[0]);
        let ask = vzk_provider::args::TemplateAsk::parse(&format!("{image},cpu=1,memory=256Mi"));
        a.snapshot_templates = vec![ask.unwrap()];
    })
    .await;
    let image = env.push_guest("ahead-guest", "").await;
    let TestNode {
        pods,
        events,
        node,
        data,
        ..
    } = env;
    let made = wait_for(
        Duration::from_secs(240),
        "the template made ahead",
        || async {
            walk(&data.join("images"), "template.json")
                .into_iter()
                .next()
        },
    )
    .await;
    eprintln!("template made ahead: {}", made.display());
    create_ready(&pods, &vm_pod("first", &node, &image)).await;
    let started = wait_event(&events, "first", "Started", Duration::from_secs(10)).await;
    assert!(started.contains("by restoring template"), "{started}");
    let said = events_of(&events, "first").await;
    assert!(
        !said
            .iter()
            .any(|(r, _)| r == "BuildingTemplate" || r == "RestoreFailed"),
        "{said:?}"
    );
    delete_pod(&pods, "first", 0, Duration::from_secs(60)).await;
}

/// QEMU seen as a backend that keeps a template's NIC in its saved machine, as
/// Virtualization.framework does (its restore refuses another MAC). QEMU itself still
/// plugs the NIC after the restore, which is how a restore with the template's MAC is
/// checked here end to end.
struct KeptNics {
    qemu: std::sync::Arc<dyn vzk_vm::Hypervisor>,
    caps: vzk_vm::Capabilities,
}

#[async_trait::async_trait]
impl vzk_vm::Hypervisor for KeptNics {
    fn capabilities(&self) -> &vzk_vm::Capabilities {
        &self.caps
    }
    async fn create(
        &self,
        spec: vzk_vm::VmSpec,
    ) -> Result<std::sync::Arc<dyn vzk_vm::Vm>, vzk_vm::HypervisorError> {
        self.caps.check(&spec)?;
        self.qemu.create(spec).await
    }
    async fn adopt_existing(
        &self,
    ) -> Result<Vec<std::sync::Arc<dyn vzk_vm::Vm>>, vzk_vm::HypervisorError> {
        self.qemu.adopt_existing().await
    }
    async fn health(&self) -> Result<(), String> {
        self.qemu.health().await
    }
}

/// The MAC a template recorded for its kept NIC.
fn template_mac(meta: &std::path::Path) -> String {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
    json["macs"][0].as_str().unwrap_or_default().to_owned()
}

/// On a backend that keeps the NIC in the saved machine, a pod restored from a template
/// runs with the template's MAC; while one pod holds it, the next pod boots cold and a
/// second template (its own MAC) is made; a deleted pod gives its MAC back; a pod with
/// volumes (shared directories) boots cold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kept_nics_each_template_mac_runs_in_one_pod_at_a_time() {
    let env = TestNode::start_on(
        "snapkept",
        |a| {
            a.snapshot_start = true;
            // Two pods and a template build at once.
            a.max_vms = 3;
        },
        |qemu| {
            let mut caps = qemu.capabilities().clone();
            caps.snapshot_devices = vzk_vm::SnapshotDevices::Kept;
            std::sync::Arc::new(KeptNics { qemu, caps })
        },
    )
    .await;
    let image = env.push_guest("kept-guest", "").await;
    let TestNode {
        ns,
        pods,
        events,
        provider,
        node,
        data,
        ..
    } = &env;
    let plain = |name: &str| {
        let mut p = vm_pod(name, node, &image);
        if let Some(s) = p.spec.as_mut() {
            s.automount_service_account_token = Some(false);
        }
        p
    };
    let guest_mac = |name: &'static str| async move {
        let (code, out) = exec(provider, ns, name, "cat /sys/class/net/eth0/address").await;
        assert_eq!(code, 0, "{out}");
        out.trim().to_owned()
    };
    let restored = |name: &'static str| async move {
        let started = wait_event(events, name, "Started", Duration::from_secs(10)).await;
        let all = events_of(events, name).await;
        eprintln!("{name}: {all:?}");
        started.contains("by restoring template")
    };
    let template_ready = |name: &'static str| async move {
        let r = wait_for(BOOT, "the template", || async {
            events_of(events, name)
                .await
                .into_iter()
                .find(|(r, _)| r == "TemplateReady" || r == "TemplateFailed")
        })
        .await;
        assert_eq!(r.0, "TemplateReady", "{}", r.1);
    };

    // 1. The first pod boots cold and template slot 0 is made, recording its MAC.
    create_ready(pods, &plain("first")).await;
    assert!(!restored("first").await);
    template_ready("first").await;
    let metas = walk(&data.join("images"), "template.json");
    assert_eq!(metas.len(), 1, "{metas:?}");
    let mac0 = template_mac(&metas[0]);
    assert_eq!(mac0.len(), 17, "{mac0:?}");
    delete_pod(pods, "first", 0, Duration::from_secs(60)).await;

    // A deleted pod holds its MAC until its VM is gone (the API object goes at once:
    // grace 0), which is when the provider removes the pod's directory.
    let gone = |pod: Pod| async move {
        let dir = data.join("pods").join(pod.metadata.uid.unwrap_or_default());
        wait_for(Duration::from_secs(60), "the VM gone", || async {
            (!dir.exists()).then_some(())
        })
        .await;
    };

    // 2. a is restored with slot 0's MAC; b, while a holds it, boots cold with a MAC of
    // its own, and slot 1 is made.
    let a = create_ready(pods, &plain("a")).await;
    assert!(restored("a").await);
    assert_eq!(guest_mac("a").await, mac0);
    let (code, out) = exec(provider, ns, "a", "hostname").await;
    assert_eq!((code, out.trim()), (0, "a"));
    let b = create_ready(pods, &plain("b")).await;
    assert!(!restored("b").await);
    assert_ne!(guest_mac("b").await, mac0);
    template_ready("b").await;
    let metas = walk(&data.join("images"), "template.json");
    assert_eq!(metas.len(), 2, "{metas:?}");
    let macs: Vec<String> = metas.iter().map(|m| template_mac(m)).collect();
    assert!(macs.contains(&mac0), "{macs:?}");
    let mac1 = macs.into_iter().find(|m| *m != mac0).unwrap();

    // 3. b gone, c takes slot 1 (a still holds slot 0); a gone, d gets slot 0 back.
    delete_pod(pods, "b", 0, Duration::from_secs(60)).await;
    gone(b).await;
    create_ready(pods, &plain("c")).await;
    assert!(restored("c").await);
    assert_eq!(guest_mac("c").await, mac1);
    delete_pod(pods, "a", 0, Duration::from_secs(60)).await;
    gone(a).await;
    create_ready(pods, &plain("d")).await;
    assert!(restored("d").await);
    assert_eq!(guest_mac("d").await, mac0);
    delete_pod(pods, "d", 0, Duration::from_secs(60)).await;

    // 4. A pod with a volume boots cold (a restored VM here gets no shared directories),
    // though slot 0 is free.
    create_ready(pods, &vm_pod("vol", node, &image)).await;
    assert!(!restored("vol").await);
    assert_ne!(guest_mac("vol").await, mac0);
    for name in ["c", "vol"] {
        delete_pod(pods, name, 0, Duration::from_secs(60)).await;
    }
    wait_all_released(provider, Duration::from_secs(60)).await;
}
