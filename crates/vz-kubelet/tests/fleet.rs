//! A node in a fuller control plane: a private kube-apiserver with the real kube-scheduler
//! and kube-controller-manager's node lifecycle and taint eviction controllers, the
//! `vz-kubelet run` binary as `system:node:<name>` with `--max-vms 2`, the test guest in a
//! local `docker-registry`, QEMU (TCG) VMs in a network namespace the test owns.
//!
//! * **Scheduling by VM slots**: three pods without `nodeName`, each asking for one
//!   `vz-kubelet.io/vm`; the scheduler binds two, the third stays Pending
//!   (`PodScheduled=False`, `Unschedulable`, `Insufficient vz-kubelet.io/vm`) until one of the
//!   two is deleted, then it is bound and runs.
//! * **Node lifecycle**: the agent is stopped (SIGTERM; its VMs keep running by design); the
//!   node lifecycle controller marks the node `Unknown` (counting its grace from the last
//!   Lease renewal), taints it `node.kubernetes.io/unreachable` (`NoSchedule` and
//!   `NoExecute`) and its pods not Ready; the agent is started again with the same data dir
//!   and node name; the taints go, the node is Ready, and the pods are the same pods (UIDs,
//!   restartCount 0, the same QEMU processes), Ready again and reachable by `kubectl exec`.
//!   A stand-in node kept Ready by the test makes this one node lost from a healthy zone:
//!   with every node of a zone gone the controller suspects itself and adds no `NoExecute`
//!   taint.
//!   The pods tolerate `unreachable`/`not-ready` `NoExecute` for 600 s, explicitly (the API
//!   server's default would be 300 s), so the taint eviction controller leaves them alone
//!   through the outage (about half a minute here).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{
    Agent, pids_with, push_guest, run, tail, text, vz_kubelet, wait_until, wait_until_or,
};
use vzk_testenv::node_lifecycle::{NodeLifecycleOptions, StandInNode};
use vzk_testenv::{ControlPlane, Netns, NodeIdentity, Registry, free_port, guest};

/// The node lifecycle controller's `--node-monitor-grace-period` (the agent renews its
/// Lease every 10 s).
const GRACE: Duration = Duration::from_secs(20);
/// The pods' own `tolerationSeconds` for `unreachable` and `not-ready`.
const TOLERATION_SECS: u64 = 600;
const VM_RESOURCE: &str = "vz-kubelet.io/vm";

/// The cluster: a private control plane with the scheduler and the node lifecycle
/// controller, one node whose agent can be stopped and started again.
struct Fleet {
    /// Dropped first: the agent goes before its VMs' namespace and the control plane.
    agent: Option<Agent>,
    _netns: Netns,
    netns_name: String,
    ns: String,
    node: String,
    id: NodeIdentity,
    image: String,
    registry: Registry,
    kubelet_port: u16,
    runs: u32,
    work: tempfile::TempDir,
    /// Keeps the zone healthy while our node is gone.
    stand_in: StandInNode,
    /// Dropped last.
    cp: ControlPlane,
}

impl Fleet {
    async fn start() -> Fleet {
        let cp = ControlPlane::start()
            .unwrap_or_else(|e| panic!("control plane: {}", vzk_testenv::error_chain(&e)));
        cp.start_scheduler()
            .await
            .unwrap_or_else(|e| panic!("kube-scheduler: {}", vzk_testenv::error_chain(&e)));
        cp.start_node_lifecycle_controller(NodeLifecycleOptions {
            grace_period: GRACE,
            monitor_period: Duration::from_secs(2),
            taint_eviction: true,
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "kube-controller-manager (node lifecycle): {}",
                vzk_testenv::error_chain(&e)
            )
        });
        let ns = cp.create_namespace("fleet").await;
        // A healthy node beside ours, so that ours dropping out is one node lost, not the
        // whole zone (which the controller treats as a control plane cut off: no NoExecute
        // taint, no eviction).
        let stand_in = cp
            .stand_in_node(&format!(
                "stand-in-{:06x}",
                rand::random::<u32>() & 0xff_ffff
            ))
            .await
            .unwrap_or_else(|e| panic!("stand-in node: {}", vzk_testenv::error_chain(&e)));
        let node = format!("fleet-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let id = cp.node_identity(&node);
        let registry = Registry::start();
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let image = format!("{}/fleet/guest:v1", registry.addr);
        push_guest(work.path(), &image);
        let netns = Netns::new();
        let mut f = Fleet {
            agent: None,
            netns_name: netns.name.clone(),
            _netns: netns,
            ns,
            node,
            id,
            image,
            registry,
            kubelet_port: free_port(),
            runs: 0,
            work,
            stand_in,
            cp,
        };
        f.start_agent();
        f
    }

    /// Starts `vz-kubelet run` (same node name, data dir and port every time) and waits
    /// until the node is Ready.
    fn start_agent(&mut self) {
        self.runs += 1;
        let log = self.work.path().join(format!("agent-{}.log", self.runs));
        let logf = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let g = guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
        let child = vz_kubelet()
            .args(["run", "--node-name", &self.node, "--node-ip", "127.0.0.1"])
            .args(["--accel", "tcg", "--max-vms", "2"])
            .arg("--kubeconfig")
            .arg(&self.id.kubeconfig)
            .arg("--client-ca-file")
            .arg(self.cp.ca_cert_path())
            .args(["--kubelet-port", &self.kubelet_port.to_string()])
            .args(["--listen-address", "127.0.0.1"])
            .arg("--data-dir")
            .arg(self.work.path().join("data"))
            .args(["--vm-netns", &self.netns_name])
            .args(["--insecure-registry", &self.registry.addr])
            .args(["--ssh-user", "root"])
            .arg("--ssh-private-key-path")
            .arg(&g.openssh_key)
            .env(
                "VZK_LOG",
                std::env::var("VZK_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("starting vz-kubelet: {e}"));
        self.agent = Some(Agent { child, log });
        wait_until(Duration::from_secs(60), "the node object", || {
            self.kubectl(&["get", "node", &self.node]).status.success()
        });
        self.wait_node_ready();
    }

    fn wait_node_ready(&self) {
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("node/{}", self.node),
            "--timeout=60s",
        ]);
        assert!(
            out.status.success(),
            "node Ready: {}\n{}",
            text(&out.stderr),
            self.describe(&format!("node/{}", self.node))
        );
    }

    fn stop_agent(&mut self) -> std::process::ExitStatus {
        let mut agent = self
            .agent
            .take()
            .unwrap_or_else(|| panic!("the agent is not running"));
        let status = agent.stop();
        assert!(status.success(), "agent exit {status:?}\n{}", agent.log());
        status
    }

    /// kubectl as the admin, in the test's namespace.
    fn kubectl(&self, args: &[&str]) -> Output {
        let mut c = self.cp.kubectl();
        c.args(["-n", &self.ns]).args(args);
        run(c)
    }

    fn jsonpath(&self, what: &str, path: &str) -> String {
        text(
            &self
                .kubectl(&["get", what, "-o", &format!("jsonpath={path}")])
                .stdout,
        )
    }

    fn describe(&self, what: &str) -> String {
        text(&self.kubectl(&["describe", what]).stdout)
    }

    fn apply(&self, manifest: &serde_json::Value) {
        let mut c = self.cp.kubectl();
        c.args(["-n", &self.ns, "apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("kubectl apply: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin
                .write_all(manifest.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "kubectl apply: {}", text(&out.stderr));
    }

    /// The node each pod is bound to (`""`: none yet), by pod name.
    fn bindings(&self) -> BTreeMap<String, String> {
        self.jsonpath(
            "pods",
            r#"{range .items[*]}{.metadata.name}={.spec.nodeName}{"\n"}{end}"#,
        )
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(p, n)| (p.to_owned(), n.to_owned()))
        .collect()
    }

    /// What explains a pod that is not placed: the pods and their `PodScheduled`
    /// conditions, the nodes with their taints and allocatable VM slots, whether
    /// kube-scheduler still runs, and the end of its log.
    fn scheduling_dump(&self) -> String {
        let pods = self.jsonpath(
            "pods",
            r#"{range .items[*]}{.metadata.name} node={.spec.nodeName} phase={.status.phase} {.status.conditions[?(@.type=="PodScheduled")]}{"\n"}{end}"#,
        );
        let nodes = text(
            &run({
                let mut c = self.cp.kubectl();
                c.args([
                    "get",
                    "nodes",
                    "-o",
                    r#"jsonpath={range .items[*]}{.metadata.name} ready={.status.conditions[?(@.type=="Ready")].status} vm={.status.allocatable.vz-kubelet\.io/vm} taints={.spec.taints}{"\n"}{end}"#,
                ]);
                c
            })
            .stdout,
        );
        format!(
            "pods:\n{pods}\nnodes:\n{nodes}\nkube-scheduler: {:?} (None: not started; Some(None): running)\n\
             ---- kube-scheduler log, last 60 lines ----\n{}\n---- vz-kubelet log, last 30 lines ----\n{}",
            self.cp.scheduler_status(),
            tail(&self.cp.scheduler_log_path(), 60),
            self.agent
                .as_ref()
                .map(|a| tail(&a.log, 30))
                .unwrap_or_default(),
        )
    }

    /// The node's `Ready` condition status and its taints as `key:effect`.
    fn node_state(&self) -> (String, Vec<String>) {
        let node = format!("node/{}", self.node);
        let ready = self.jsonpath(&node, r#"{.status.conditions[?(@.type=="Ready")].status}"#);
        let taints = self
            .jsonpath(
                &node,
                r#"{range .spec.taints[*]}{.key}:{.effect}{"\n"}{end}"#,
            )
            .lines()
            .map(str::to_owned)
            .collect();
        (ready, taints)
    }

    /// `uid restartCount phase` of a pod.
    fn identity(&self, pod: &str) -> String {
        self.jsonpath(
            &format!("pod/{pod}"),
            "{.metadata.uid} {.status.containerStatuses[0].restartCount} {.status.phase}",
        )
    }

    fn wait_pod_ready(&self, pod: &str) {
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=300s",
        ]);
        assert!(
            out.status.success(),
            "pod {pod} Ready: {}\n{}",
            text(&out.stderr),
            self.describe(&format!("pod/{pod}"))
        );
    }

    /// Runs `echo` in the pod's VM over `kubectl exec`.
    fn exec_echo(&self, pod: &str) -> String {
        let out = self.kubectl(&["exec", pod, "-c", "vm", "--", "echo", pod]);
        assert!(
            out.status.success(),
            "exec into {pod}: {}",
            text(&out.stderr)
        );
        text(&out.stdout).trim().to_owned()
    }
}

fn timestamp(s: &str) -> k8s_openapi::jiff::Timestamp {
    s.parse()
        .unwrap_or_else(|e| panic!("a timestamp from the API server: {s:?}: {e}"))
}

fn jiff_secs(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or_default()
}

/// A VM pod without `nodeName`: one VM slot (requests = limits), 256 MiB, tolerating the
/// node's registration taint and, for [`TOLERATION_SECS`], an unreachable or not-ready
/// node.
fn vm_pod(name: &str, image: &str) -> serde_json::Value {
    let resources = serde_json::json!({ VM_RESOURCE: "1", "memory": "256Mi" });
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "fleet" } },
        "spec": {
            "tolerations": [
                { "key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "vz", "effect": "NoSchedule" },
                { "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": TOLERATION_SECS },
                { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": TOLERATION_SECS },
            ],
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "vm", "image": image,
                "resources": { "requests": resources, "limits": resources },
            }]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_places_vm_pods_by_slot_and_the_node_survives_an_agent_outage() {
    let t0 = Instant::now();
    let mut f = Fleet::start().await;
    let t_setup = t0.elapsed();
    let node = f.node.clone();
    let capacity = f.jsonpath(
        &format!("node/{node}"),
        r"{.status.allocatable.vz-kubelet\.io/vm}",
    );
    assert_eq!(
        capacity, "2",
        "allocatable {VM_RESOURCE} of a --max-vms 2 node"
    );

    // Three pods, two slots: the scheduler binds two and leaves one Pending.
    let names = ["vm-a", "vm-b", "vm-c"];
    for name in names {
        f.apply(&vm_pod(name, &f.image));
    }
    let mut unscheduled = String::new();
    wait_until_or(
        Duration::from_secs(90),
        "two pods bound, one unschedulable",
        || {
            let b = f.bindings();
            let bound = b.values().filter(|n| **n == node).count();
            let pending: Vec<_> = b.iter().filter(|(_, n)| n.is_empty()).collect();
            if bound == 2 && pending.len() == 1 {
                unscheduled = pending[0].0.clone();
                let reason = f.jsonpath(
                &format!("pod/{unscheduled}"),
                r#"{.status.conditions[?(@.type=="PodScheduled")].status}/{.status.conditions[?(@.type=="PodScheduled")].reason}"#,
            );
                return reason == "False/Unschedulable";
            }
            assert!(bound <= 2, "more pods bound than VM slots: {b:?}");
            false
        },
        || f.scheduling_dump(),
    );
    let message = f.jsonpath(
        &format!("pod/{unscheduled}"),
        r#"{.status.conditions[?(@.type=="PodScheduled")].message}"#,
    );
    assert!(
        message.contains("Insufficient vz-kubelet.io/vm"),
        "the scheduler's message for {unscheduled}: {message:?}"
    );
    let running: Vec<String> = names
        .iter()
        .map(|n| (*n).to_owned())
        .filter(|n| *n != unscheduled)
        .collect();
    let t_bound = t0.elapsed();
    for pod in &running {
        f.wait_pod_ready(pod);
    }
    let t_two_ready = t0.elapsed();
    // Still Pending and unbound while both slots are taken.
    assert_eq!(
        f.jsonpath(
            &format!("pod/{unscheduled}"),
            "{.spec.nodeName}|{.status.phase}"
        ),
        "|Pending",
        "{unscheduled} while both slots are taken"
    );

    // Deleting one running pod frees its slot: the third is bound and runs.
    let (gone, kept) = (&running[0], running[1].clone());
    let out = f.kubectl(&["delete", "pod", gone, "--wait=true", "--timeout=120s"]);
    assert!(out.status.success(), "delete {gone}: {}", text(&out.stderr));
    let t_deleted = t0.elapsed();
    wait_until_or(
        Duration::from_secs(90),
        "the third pod bound",
        || f.bindings().get(&unscheduled).is_some_and(|n| *n == node),
        || f.scheduling_dump(),
    );
    f.wait_pod_ready(&unscheduled);
    let t_third_ready = t0.elapsed();
    let survivors = [kept, unscheduled.clone()];

    // The agent stops; its VMs keep running.
    let before: Vec<(String, Vec<u32>)> = survivors
        .iter()
        .map(|p| {
            let id = f.identity(p);
            let uid = id.split_whitespace().next().unwrap_or_default().to_owned();
            let pids = pids_with(&uid);
            assert!(!pids.is_empty(), "a QEMU process for {p} ({uid})");
            assert!(id.ends_with(" 0 Running"), "{p} before the outage: {id}");
            (id, pids)
        })
        .collect();
    f.stop_agent();
    let t_stopped = Instant::now();
    let mut seen = (String::new(), Vec::new());
    wait_until(
        GRACE + Duration::from_secs(40),
        "the node Unknown and tainted unreachable (NoSchedule and NoExecute)",
        || {
            seen = f.node_state();
            seen.0 == "Unknown"
                && ["NoSchedule", "NoExecute"].iter().all(|effect| {
                    seen.1
                        .contains(&format!("node.kubernetes.io/unreachable:{effect}"))
                })
        },
    );
    let t_unknown = t_stopped.elapsed();
    // The controller counts the grace from the node's last Lease renewal.
    let node_ref = format!("node/{node}");
    let renewed = timestamp(&text(
        &f.kubectl(&[
            "get",
            "lease",
            &node,
            "--namespace=kube-node-lease",
            "-o",
            "jsonpath={.spec.renewTime}",
        ])
        .stdout,
    ));
    let unknown_at = timestamp(&f.jsonpath(
        &node_ref,
        r#"{.status.conditions[?(@.type=="Ready")].lastTransitionTime}"#,
    ));
    let silent = unknown_at.duration_since(renewed);
    assert!(
        silent >= jiff_secs(GRACE) - k8s_openapi::jiff::SignedDuration::from_secs(1),
        "the node turned Unknown {silent:?} after its last Lease renewal, within the {GRACE:?} grace"
    );
    assert_eq!(
        f.jsonpath(
            &format!("node/{}", f.stand_in.name),
            r#"{.status.conditions[?(@.type=="Ready")].status}"#,
        ),
        "True",
        "the stand-in node while ours is gone"
    );
    // The controller marks the node's pods not Ready; the agent will have to say otherwise.
    for p in &survivors {
        wait_until(
            Duration::from_secs(20),
            &format!("{p} marked not Ready"),
            || {
                f.jsonpath(
                    &format!("pod/{p}"),
                    r#"{.status.conditions[?(@.type=="Ready")].status}"#,
                ) == "False"
            },
        );
    }
    // The VMs do not depend on the agent.
    for (p, (_, pids)) in survivors.iter().zip(&before) {
        let uid = f.identity(p);
        let uid = uid.split_whitespace().next().unwrap_or_default();
        assert_eq!(&pids_with(uid), pids, "{p}'s QEMU during the outage");
    }

    // The agent comes back with the same data dir and node name.
    f.start_agent();
    wait_until(
        Duration::from_secs(30),
        "the unreachable taints removed",
        || {
            seen = f.node_state();
            seen.0 == "True" && !seen.1.iter().any(|t| t.starts_with("node.kubernetes.io/"))
        },
    );
    let outage = t_stopped.elapsed();
    assert!(
        outage < Duration::from_secs(TOLERATION_SECS),
        "the outage ({outage:?}) outlasted the pods' tolerations"
    );
    assert_eq!(
        seen.1,
        ["virtual-kubelet.io/provider:NoSchedule"],
        "the node's taints after the agent is back"
    );
    for (p, (id, pids)) in survivors.iter().zip(&before) {
        f.wait_pod_ready(p);
        assert_eq!(&f.identity(p), id, "{p}: same UID, restartCount and phase");
        let uid = id.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            &pids_with(uid),
            pids,
            "{p}: the same QEMU process, re-adopted"
        );
        assert_eq!(f.exec_echo(p), *p, "exec into {p} after the restart");
    }
    let pods = f.jsonpath("pods", "{.items[*].metadata.name}");
    assert_eq!(
        pods.split_whitespace().count(),
        2,
        "no pod evicted or created: {pods}"
    );
    eprintln!(
        "fleet timings: setup {t_setup:.1?}, two bound {t_bound:.1?}, two Ready {t_two_ready:.1?}, \
         one deleted {t_deleted:.1?}, third Ready {t_third_ready:.1?}; node Unknown {t_unknown:.1?} \
         after SIGTERM, outage {outage:.1?}; total {:.1?}",
        t0.elapsed()
    );

    // Clean up the VMs through the agent.
    let out = f.kubectl(&["delete", "pods", "--all", "--wait=true", "--timeout=120s"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    f.stop_agent();
}
