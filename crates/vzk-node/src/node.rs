//! The node controller: registers the Node, keeps its status live and renews its Lease.
//!
//! # Protocol
//! * **Registration**: `GET` the Node; if absent, `CREATE` it with labels, taint, and
//!   status (NodeRestriction lets a node set taints only at creation, so an existing
//!   Node's spec is never touched).
//! * **Status**: every `status_check_interval` (10 s) the status is recomputed from the
//!   host (memory, disk) and the provider (capacity, conditions, ping). It is written
//!   (server-side apply on `nodes/status`) only when it differs from what was last
//!   written, or when `status_report_ceiling` (5 min) has passed.
//! * **Lease**: renewed every `lease_renew_interval` (10 s) with an optimistic `UPDATE`
//!   from the last written object (no `GET`), except in a tick where the status was just
//!   written (its `lastHeartbeatTime` is a heartbeat too), and never while the provider's
//!   ping fails: the control plane then sees the node go NotReady.
//!
//! So a healthy idle node makes exactly one write per 10 s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vzk_core::NodeProvider;

use crate::config::NodeConfig;
use crate::host;

const FIELD_MANAGER: &str = "vz-kubelet";
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Errors of the node controller.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Reading or creating the Node failed.
    #[error("registering node {node}")]
    Register {
        /// Node name.
        node: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Writing the node status failed.
    #[error("patching the status of node {node}")]
    PatchStatus {
        /// Node name.
        node: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Creating or renewing the Lease failed.
    #[error("renewing lease {LEASE_NAMESPACE}/{node}")]
    Lease {
        /// Node name.
        node: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The provider could not report the node's capacity.
    #[error("reading node capacity from the provider")]
    Capacity(#[source] vzk_core::ProviderError),
}

/// The status fields the controller owns, without heartbeat times: comparing two of
/// these says whether the status really changed.
#[derive(Debug, Clone, PartialEq)]
struct StatusCore {
    capacity: BTreeMap<String, Quantity>,
    conditions: Vec<(String, String, String, String)>, // type, status, reason, message
    addresses: Vec<(String, String)>,
    node_info: NodeSystemInfo,
    kubelet_port: u16,
    declared_features: Vec<String>,
}

/// Registers and maintains one Node.
pub struct NodeController {
    client: kube::Client,
    config: NodeConfig,
    provider: Arc<dyn NodeProvider>,
    last_written: Option<(StatusCore, Instant)>,
    transitions: BTreeMap<String, (String, Timestamp)>,
    lease: Option<Lease>,
    node_uid: Option<String>,
    /// Why the provider's last health check failed (`None` while it passes).
    unhealthy: Option<String>,
}

impl NodeController {
    /// A controller for the node described by `config`.
    pub fn new(client: kube::Client, config: NodeConfig, provider: Arc<dyn NodeProvider>) -> Self {
        Self {
            client,
            config,
            provider,
            last_written: None,
            transitions: BTreeMap::new(),
            lease: None,
            node_uid: None,
            unhealthy: None,
        }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Registers the node (creating it if absent) and writes its first status.
    pub async fn register(&mut self) -> Result<(), NodeError> {
        let name = self.config.node_name.clone();
        let reg = |source| NodeError::Register {
            node: name.clone(),
            source,
        };
        let existing = self.nodes().get_opt(&name).await.map_err(reg)?;
        let node = match existing {
            Some(node) => {
                info!(node = %name, "node already registered; keeping its spec");
                node
            }
            None => {
                let healthy = self.ping().await;
                let (core, status) = self.desired_status(healthy).await?;
                let node = Node {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(self.labels()),
                        ..Default::default()
                    },
                    spec: Some(NodeSpec {
                        taints: self.taints(),
                        ..Default::default()
                    }),
                    status: Some(status),
                };
                let created = self.nodes().create(&PostParams::default(), &node).await;
                let created = match created {
                    Ok(n) => n,
                    // Lost a race with another registration of the same name: use it.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        self.nodes().get(&name).await.map_err(reg)?
                    }
                    Err(e) => return Err(reg(e)),
                };
                info!(node = %name, "node registered");
                self.last_written = Some((core, Instant::now()));
                created
            }
        };
        self.node_uid = node.metadata.uid.clone();
        self.write_status(true).await?;
        Ok(())
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("type".to_owned(), "virtual-kubelet".to_owned()),
            ("kubernetes.io/os".to_owned(), host::k8s_os().to_owned()),
            ("kubernetes.io/arch".to_owned(), host::k8s_arch().to_owned()),
            (
                "kubernetes.io/hostname".to_owned(),
                self.config.hostname.clone(),
            ),
            ("node.kubernetes.io/role".to_owned(), "agent".to_owned()),
        ]);
        labels.extend(self.config.labels.clone());
        labels
    }

    fn taints(&self) -> Option<Vec<Taint>> {
        self.config.taint.as_ref().map(|t| {
            vec![Taint {
                key: t.key.clone(),
                value: Some(t.value.clone()).filter(|v| !v.is_empty()),
                effect: t.effect.clone(),
                time_added: None,
            }]
        })
    }

    async fn ping(&mut self) -> bool {
        let failure = match tokio::time::timeout(Duration::from_secs(5), self.provider.ping()).await
        {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the provider's health check did not answer within 5 s".to_owned()),
        };
        if let Some(why) = &failure {
            if self.unhealthy.as_ref() != Some(why) {
                warn!(error = %why, "provider health check failed");
            }
        } else if self.unhealthy.is_some() {
            info!("provider healthy again");
        }
        self.unhealthy = failure;
        self.unhealthy.is_none()
    }

    /// The status the node should have now, and its comparable core.
    async fn desired_status(
        &mut self,
        healthy: bool,
    ) -> Result<(StatusCore, NodeStatus), NodeError> {
        let capacity = self
            .provider
            .capacity()
            .await
            .map_err(NodeError::Capacity)?;
        let mut conditions = vec![ready_condition(healthy, self.unhealthy.as_deref())];
        conditions.push(memory_condition(
            host::memory(),
            self.config.pressure.memory_available_bytes,
        ));
        conditions.push(disk_condition(
            host::disk(&self.config.data_dir),
            self.config.pressure.disk_free_fraction,
        ));
        conditions.push(cond(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ));
        for c in self.provider.conditions().await {
            conditions.retain(|existing| existing.type_ != c.type_);
            conditions.push(c);
        }
        let rt = self.provider.runtime_info();
        let node_info = NodeSystemInfo {
            architecture: host::k8s_arch().to_owned(),
            boot_id: host::boot_id(),
            container_runtime_version: rt.container_runtime_version,
            kernel_version: host::kernel_version(),
            kube_proxy_version: String::new(),
            kubelet_version: self.config.kubelet_version.clone(),
            machine_id: host::machine_id(),
            operating_system: host::k8s_os().to_owned(),
            os_image: rt.os_image.unwrap_or_else(host::os_image),
            system_uuid: host::machine_id(),
            ..Default::default()
        };
        let addresses = vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: self.config.internal_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: self.config.hostname.clone(),
            },
        ];
        let core = StatusCore {
            capacity: capacity.clone(),
            conditions: conditions
                .iter()
                .map(|c| {
                    (
                        c.type_.clone(),
                        c.status.clone(),
                        c.reason.clone().unwrap_or_default(),
                        c.message.clone().unwrap_or_default(),
                    )
                })
                .collect(),
            addresses: addresses
                .iter()
                .map(|a| (a.type_.clone(), a.address.clone()))
                .collect(),
            node_info: node_info.clone(),
            kubelet_port: self.config.kubelet_port,
            declared_features: self.config.declared_features.clone(),
        };
        let now = Timestamp::now();
        for c in &mut conditions {
            // lastTransitionTime stays put while a condition's status does not change.
            let entry = self
                .transitions
                .entry(c.type_.clone())
                .or_insert((c.status.clone(), now));
            if entry.0 != c.status {
                *entry = (c.status.clone(), now);
            }
            c.last_transition_time = Some(Time(entry.1));
            c.last_heartbeat_time = Some(Time(now));
        }
        let status = NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            conditions: Some(conditions),
            addresses: Some(addresses),
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint {
                    port: i32::from(self.config.kubelet_port),
                }),
            }),
            node_info: Some(node_info),
            declared_features: Some(self.config.declared_features.clone())
                .filter(|f| !f.is_empty()),
            ..Default::default()
        };
        Ok((core, status))
    }

    /// Recomputes the status and writes it if it changed (or `force`, or the ceiling
    /// passed). Returns whether a write happened.
    async fn write_status_with(&mut self, force: bool, healthy: bool) -> Result<bool, NodeError> {
        let (core, status) = self.desired_status(healthy).await?;
        let due = match &self.last_written {
            None => true,
            Some((last, at)) => *last != core || at.elapsed() >= self.config.status_report_ceiling,
        };
        if !force && !due {
            return Ok(false);
        }
        let name = self.config.node_name.clone();
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name },
            "status": status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.nodes()
            .patch_status(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|source| NodeError::PatchStatus {
                node: name.clone(),
                source,
            })?;
        debug!(node = %name, "node status written");
        self.last_written = Some((core, Instant::now()));
        Ok(true)
    }

    async fn write_status(&mut self, force: bool) -> Result<bool, NodeError> {
        let healthy = self.ping().await;
        self.write_status_with(force, healthy).await
    }

    /// Creates or renews the node's Lease.
    async fn renew_lease(&mut self) -> Result<(), NodeError> {
        let name = self.config.node_name.clone();
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let err = |source| NodeError::Lease {
            node: name.clone(),
            source,
        };
        let now = MicroTime(Timestamp::now());
        if let Some(mut lease) = self.lease.take() {
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(now.clone());
            }
            match leases.replace(&name, &PostParams::default(), &lease).await {
                Ok(l) => {
                    self.lease = Some(l);
                    return Ok(());
                }
                Err(e) => {
                    debug!(error = %e, "optimistic lease renewal failed; re-reading the lease")
                }
            }
        }
        let spec = LeaseSpec {
            holder_identity: Some(name.clone()),
            lease_duration_seconds: i32::try_from(self.config.lease_duration.as_secs()).ok(),
            renew_time: Some(now),
            ..Default::default()
        };
        let owner = self.node_uid.clone().map(|uid| {
            vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.clone(),
                uid,
                ..Default::default()
            }]
        });
        let lease = match leases.get_opt(&name).await.map_err(err)? {
            Some(mut existing) => {
                existing.spec = Some(spec);
                if existing.metadata.owner_references.is_none() {
                    existing.metadata.owner_references = owner;
                }
                leases
                    .replace(&name, &PostParams::default(), &existing)
                    .await
                    .map_err(err)?
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(LEASE_NAMESPACE.into()),
                        owner_references: owner,
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map_err(err)?
            }
        };
        self.lease = Some(lease);
        Ok(())
    }

    /// Runs until `shutdown`: registration (retried with backoff), then the status and
    /// lease loop. API errors are logged and retried on the next tick.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.register().await {
                Ok(()) => break,
                Err(e) => warn!(error = %error_chain(&e), "node registration failed; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        let mut last_lease = Instant::now() - self.config.lease_renew_interval;
        let tick = self
            .config
            .status_check_interval
            .min(self.config.lease_renew_interval);
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let healthy = self.ping().await;
            let wrote_status = match self.write_status_with(false, healthy).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %error_chain(&e), "node status update failed");
                    false
                }
            };
            if wrote_status && healthy {
                // The status write carried a fresh Ready heartbeat: it counts as this
                // period's heartbeat, keeping an idle node at one write per period.
                last_lease = Instant::now();
                continue;
            }
            if !healthy {
                debug!("provider unhealthy: not renewing the lease");
                continue;
            }
            if last_lease.elapsed() + Duration::from_millis(500) >= self.config.lease_renew_interval
            {
                match self.renew_lease().await {
                    Ok(()) => last_lease = Instant::now(),
                    Err(e) => warn!(error = %error_chain(&e), "lease renewal failed"),
                }
            }
        }
    }
}

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> NodeCondition {
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        ..Default::default()
    }
}

fn ready_condition(healthy: bool, why: Option<&str>) -> NodeCondition {
    if healthy {
        cond(
            "Ready",
            "True",
            "KubeletReady",
            "vz-kubelet is posting ready status",
        )
    } else {
        cond(
            "Ready",
            "False",
            "ProviderUnhealthy",
            &format!(
                "the VM provider fails its health check: {}",
                why.unwrap_or("no answer")
            ),
        )
    }
}

fn memory_condition(mem: Option<host::MemoryInfo>, threshold: u64) -> NodeCondition {
    match mem {
        Some(m) if m.available < threshold => cond(
            "MemoryPressure",
            "True",
            "KubeletHasInsufficientMemory",
            &format!(
                "available memory {} MiB is below {} MiB",
                m.available >> 20,
                threshold >> 20
            ),
        ),
        Some(_) => cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        None => cond(
            "MemoryPressure",
            "Unknown",
            "MemoryUnknown",
            "cannot read the host's memory",
        ),
    }
}

fn disk_condition(disk: Option<host::DiskInfo>, min_free: f64) -> NodeCondition {
    match disk {
        Some(d) if d.total > 0 && (d.available as f64) < (d.total as f64) * min_free => cond(
            "DiskPressure",
            "True",
            "KubeletHasDiskPressure",
            &format!(
                "free disk {} MiB is below {:.0}% of {} MiB",
                d.available >> 20,
                min_free * 100.0,
                d.total >> 20
            ),
        ),
        Some(_) => cond(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
        ),
        None => cond(
            "DiskPressure",
            "Unknown",
            "DiskUnknown",
            "cannot read the data filesystem's usage",
        ),
    }
}

/// Formats an error and its sources on one line (for logs).
pub(crate) use vzk_core::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_conditions_follow_thresholds() {
        let m = |avail| {
            Some(host::MemoryInfo {
                total: 8 << 30,
                available: avail,
            })
        };
        assert_eq!(memory_condition(m(50 << 20), 100 << 20).status, "True");
        assert_eq!(memory_condition(m(4 << 30), 100 << 20).status, "False");
        assert_eq!(memory_condition(None, 1).status, "Unknown");
        let d = |avail| {
            Some(host::DiskInfo {
                total: 1000,
                available: avail,
            })
        };
        assert_eq!(disk_condition(d(50), 0.1).status, "True");
        assert_eq!(disk_condition(d(500), 0.1).status, "False");
        let down = ready_condition(false, Some("dockerd does not answer"));
        assert_eq!(down.reason.as_deref(), Some("ProviderUnhealthy"));
        assert!(
            down.message
                .as_deref()
                .is_some_and(|m| m.ends_with("dockerd does not answer")),
            "{down:?}"
        );
    }
}
