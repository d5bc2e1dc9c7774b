//! kube-controller-manager running only the node lifecycle controllers beside a private
//! control plane ([`ControlPlane::start_node_lifecycle_controller`], opt-in), so that a
//! node that stops renewing its Lease is handled as in a real cluster.
//!
//! * **Controllers**: `node-lifecycle-controller` (a node silent for
//!   [`NodeLifecycleOptions::grace_period`] gets its conditions set to `Unknown`, the taints
//!   `node.kubernetes.io/unreachable:NoSchedule` and, while the cluster is not wholly
//!   disrupted, `node.kubernetes.io/unreachable:NoExecute`, and its pods' `Ready` condition
//!   set to False; a node that speaks again loses the taints) and, with
//!   [`NodeLifecycleOptions::taint_eviction`], `taint-eviction-controller` (deletes pods that
//!   do not tolerate a `NoExecute` taint, or once their `tolerationSeconds` are over; the
//!   API server's `DefaultTolerationSeconds` admission gives every pod 300 s for
//!   `unreachable` and `not-ready` unless it says otherwise).
//! * **A process of its own**, separate from the CSR controllers of
//!   [`ControlPlane::start_controller_manager`] (both may run): the same binary,
//!   `$KUBEBUILDER_ASSETS/extra/kube-controller-manager.xz`, as the admin, without leader
//!   election, its log in `<dir>/kube-controller-manager-nodelifecycle.log`. Stopped with the
//!   control plane (or by [`ControlPlane::stop_node_lifecycle_controller`]).
//! * **Only on a private control plane**: on the shared one it would taint and mark
//!   `Unknown` the nodes other tests leave behind.
//! * **A cluster is more than one node**: when every node of a zone (nodes without zone
//!   labels share one) is unhealthy, the controller assumes the control plane lost its
//!   network, not the nodes, and neither adds `NoExecute` taints nor evicts. A test of one
//!   node dropping out of a healthy cluster adds a [`StandInNode`]
//!   ([`ControlPlane::stand_in_node`]): a Node kept Ready by a Lease the test renews.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::scheduler::wait_serving;
use crate::{ControlPlane, TestEnvError, io_err};

/// The taint (`NoSchedule`) and label of a [`StandInNode`]: nothing is scheduled on it.
pub const STAND_IN_TAINT: &str = "vzk-testenv/stand-in";
/// How often a [`StandInNode`] renews its Lease.
const STAND_IN_RENEW: Duration = Duration::from_secs(5);

/// Settings of the node lifecycle controller.
#[derive(Debug, Clone, Copy)]
pub struct NodeLifecycleOptions {
    /// `--node-monitor-grace-period`: how long a node may be silent (no Lease renewal, no
    /// status heartbeat) before it is marked `Unknown`. vz-kubelet renews its Lease every
    /// 10 s, so keep this well above that.
    pub grace_period: Duration,
    /// `--node-monitor-period`: how often the controller looks.
    pub monitor_period: Duration,
    /// Also run `taint-eviction-controller` (pods evicted from `NoExecute`-tainted nodes
    /// per their tolerations).
    pub taint_eviction: bool,
}

impl Default for NodeLifecycleOptions {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(20),
            monitor_period: Duration::from_secs(2),
            taint_eviction: true,
        }
    }
}

impl ControlPlane {
    /// Starts kube-controller-manager v1.37 with the node lifecycle controllers (see the
    /// module docs); returns once it serves its health port. Calling it again restarts it
    /// with `options`. Refused on the shared control plane.
    pub async fn start_node_lifecycle_controller(
        &self,
        options: NodeLifecycleOptions,
    ) -> Result<(), TestEnvError> {
        self.stop_node_lifecycle_controller();
        if !self.private {
            return Err(TestEnvError::Io {
                what: "starting the node lifecycle controller".into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the node lifecycle controller runs only beside a private control plane \
                     (ControlPlane::start or start_with), never the shared one",
                ),
            });
        }
        let exe = self.unpack_extra_exe("kube-controller-manager").await?;
        let port = crate::process::free_port().map_err(io_err("picking a free port"))?;
        let (d, kc) = (self.dir.display(), self.admin_kubeconfig.display());
        let controllers = if options.taint_eviction {
            "node-lifecycle-controller,taint-eviction-controller"
        } else {
            "node-lifecycle-controller"
        };
        let args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={d}/kube-controller-manager-nodelifecycle-certs"),
            "--leader-elect=false".into(),
            format!("--controllers={controllers}"),
            "--use-service-account-credentials=false".into(),
            format!(
                "--node-monitor-grace-period={}ms",
                options.grace_period.as_millis()
            ),
            format!(
                "--node-monitor-period={}ms",
                options.monitor_period.as_millis()
            ),
        ];
        let child = self.spawn_exe(&exe, "kube-controller-manager-nodelifecycle", &args)?;
        crate::set(&self.node_lifecycle, child);
        wait_serving(
            &self.node_lifecycle,
            port,
            "kube-controller-manager (node lifecycle)",
            self.node_lifecycle_log_path(),
        )
        .await
    }

    /// Stops the node lifecycle controller-manager if it runs.
    pub fn stop_node_lifecycle_controller(&self) {
        if let Ok(mut g) = self.node_lifecycle.lock()
            && let Some(mut c) = g.take()
        {
            crate::process::kill(&mut c);
        }
    }

    /// The node lifecycle controller-manager's log (stdout and stderr).
    pub fn node_lifecycle_log_path(&self) -> PathBuf {
        self.dir.join("kube-controller-manager-nodelifecycle.log")
    }
}

/// A Node with no agent behind it, kept Ready by renewing its Lease
/// (`kube-node-lease/<name>`) every 5 s from a task of the caller's runtime, as the admin.
/// It has no capacity (`pods: 0`) and the taint [`STAND_IN_TAINT`]`:NoSchedule`, so the
/// scheduler places nothing on it. Dropping it stops the renewals (the Node object stays;
/// the node lifecycle controller then marks it `Unknown` after its grace period).
#[derive(Debug)]
pub struct StandInNode {
    /// The node name.
    pub name: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for StandInNode {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl ControlPlane {
    /// Registers a [`StandInNode`] named `name`, Ready, and starts renewing its Lease.
    pub async fn stand_in_node(&self, name: &str) -> Result<StandInNode, TestEnvError> {
        let client = self.admin_client().await;
        let api_err = |what: String| move |source| TestEnvError::Api { what, source };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": { "kubernetes.io/hostname": name, STAND_IN_TAINT: "true" },
            },
            "spec": { "taints": [{ "key": STAND_IN_TAINT, "effect": "NoSchedule" }] },
        }))
        .map_err(|e| TestEnvError::Io {
            what: format!("building Node {name}"),
            source: std::io::Error::other(e),
        })?;
        let nodes: Api<Node> = Api::all(client.clone());
        nodes
            .create(&PostParams::default(), &node)
            .await
            .map_err(api_err(format!("creating Node {name}")))?;
        let status = json!({ "status": {
            "capacity": { "pods": "0" },
            "allocatable": { "pods": "0" },
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "StandIn",
                "message": "a stand-in node of vzk-testenv, kept Ready by its Lease",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
        }});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(api_err(format!("setting Node {name} Ready")))?;
        let lease: Lease = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": "kube-node-lease" },
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": 40,
                "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
            },
        }))
        .map_err(|e| TestEnvError::Io {
            what: format!("building Lease {name}"),
            source: std::io::Error::other(e),
        })?;
        let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
        leases
            .create(&PostParams::default(), &lease)
            .await
            .map_err(api_err(format!("creating Lease kube-node-lease/{name}")))?;
        let lease_name = name.to_owned();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(STAND_IN_RENEW).await;
                let renew = json!({ "spec": {
                    "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
                }});
                if let Err(e) = leases
                    .patch(&lease_name, &PatchParams::default(), &Patch::Merge(&renew))
                    .await
                {
                    tracing::warn!(node = %lease_name, error = %e, "renewing a stand-in node's Lease");
                }
            }
        });
        Ok(StandInNode {
            name: name.to_owned(),
            heartbeat,
        })
    }
}
