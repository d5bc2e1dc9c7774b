//! Test support: an in-test provider double and helpers to run the node runtime
//! in-process as a node identity. The double lives here only; no product code uses it.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vzk_core::{
    NodeProvider, PodEvent, PodKey, PodLifecycle, PodNotifier, ProviderError, RuntimeInfo,
};
use vzk_node::pods::PodControllerConfig;
use vzk_node::{NodeConfig, NodeController, PodController};
use vzk_testenv::{ControlPlane, NodeIdentity};

/// What the double was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Create {
        key: PodKey,
        env: BTreeMap<String, String>,
    },
    Update(PodKey),
    Delete {
        key: PodKey,
        grace: Duration,
    },
}

/// A provider whose pods "run" as soon as they are created.
#[derive(Default)]
pub struct Double {
    pub calls: Mutex<Vec<Call>>,
    pub running: Mutex<BTreeMap<String, (PodKey, Pod)>>,
    notifier: Mutex<Option<PodNotifier>>,
    pub unhealthy: AtomicBool,
    /// Reject creations with this (reason, message) as a permanent error.
    pub reject: Mutex<Option<(String, String)>>,
}

impl Double {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn creates_of(&self, uid: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c, Call::Create { key, .. } if key.uid == uid))
            .count()
    }

    pub fn deletes_of(&self, uid: &str) -> Vec<Duration> {
        self.calls()
            .iter()
            .filter_map(|c| match c {
                Call::Delete { key, grace } if key.uid == uid => Some(*grace),
                _ => None,
            })
            .collect()
    }

    /// Reports the running pod `uid` at a new address (a VM booted again elsewhere).
    pub fn move_to(&self, uid: &str, ip: &str) {
        let Some((key, pod)) = self.running.lock().ok().and_then(|r| r.get(uid).cloned()) else {
            return;
        };
        if let Some(n) = self.notifier.lock().ok().and_then(|n| n.clone()) {
            let mut status = Self::running_status(&pod);
            status.pod_ip = Some(ip.into());
            n.notify(key, status);
        }
    }

    fn running_status(pod: &Pod) -> PodStatus {
        let now = Time(Timestamp::now());
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("127.0.0.1".into()),
            start_time: Some(now.clone()),
            conditions: Some(
                ["Initialized", "ContainersReady", "Ready"]
                    .iter()
                    .map(|t| PodCondition {
                        type_: (*t).into(),
                        status: "True".into(),
                        last_transition_time: Some(now.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            container_statuses: Some(
                containers
                    .iter()
                    .map(|c| ContainerStatus {
                        name: c.name.clone(),
                        image: c.image.clone().unwrap_or_default(),
                        image_id: String::new(),
                        ready: true,
                        started: Some(true),
                        restart_count: 0,
                        state: Some(ContainerState {
                            running: Some(ContainerStateRunning {
                                started_at: Some(now.clone()),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }
}

#[async_trait]
impl PodLifecycle for Double {
    async fn create_pod(&self, pod: &Pod) -> Result<(), ProviderError> {
        let key = PodKey::of(pod).ok_or_else(|| ProviderError::invalid("BadPod", "no key"))?;
        let env = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect();
        if let Ok(mut c) = self.calls.lock() {
            c.push(Call::Create {
                key: key.clone(),
                env,
            });
        }
        if let Some((reason, message)) = self.reject.lock().ok().and_then(|r| r.clone()) {
            return Err(ProviderError::invalid(reason, message));
        }
        if let Ok(mut r) = self.running.lock() {
            r.insert(key.uid.clone(), (key.clone(), pod.clone()));
        }
        if let Some(n) = self.notifier.lock().ok().and_then(|n| n.clone()) {
            n.event(
                key.clone(),
                PodEvent::normal("Started", "Started double container"),
            );
            n.notify(key, Self::running_status(pod));
        }
        Ok(())
    }

    async fn update_pod(&self, pod: &Pod) -> Result<(), ProviderError> {
        if let (Some(key), Ok(mut c)) = (PodKey::of(pod), self.calls.lock()) {
            c.push(Call::Update(key));
        }
        Ok(())
    }

    async fn delete_pod(&self, pod: &Pod, grace: Duration) -> Result<(), ProviderError> {
        let key = PodKey::of(pod).ok_or_else(|| ProviderError::invalid("BadPod", "no key"))?;
        if let Ok(mut c) = self.calls.lock() {
            c.push(Call::Delete {
                key: key.clone(),
                grace,
            });
        }
        let removed = self
            .running
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&key.uid));
        removed
            .map(|_| ())
            .ok_or_else(|| ProviderError::NotFound(key.to_string()))
    }

    async fn pod_status(&self, key: &PodKey) -> Result<Option<PodStatus>, ProviderError> {
        Ok(self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(&key.uid).map(|(_, p)| Self::running_status(p))))
    }

    async fn list_pods(&self) -> Result<Vec<PodKey>, ProviderError> {
        Ok(self
            .running
            .lock()
            .map(|r| r.values().map(|(k, _)| k.clone()).collect())
            .unwrap_or_default())
    }

    fn set_notifier(&self, notifier: PodNotifier) {
        if let Ok(mut n) = self.notifier.lock() {
            *n = Some(notifier);
        }
    }
}

#[async_trait]
impl NodeProvider for Double {
    async fn capacity(&self) -> Result<BTreeMap<String, Quantity>, ProviderError> {
        Ok(BTreeMap::from([
            ("cpu".into(), Quantity("4".into())),
            ("memory".into(), Quantity("8Gi".into())),
            ("ephemeral-storage".into(), Quantity("100Gi".into())),
            ("pods".into(), Quantity("2".into())),
        ]))
    }

    async fn ping(&self) -> Result<(), ProviderError> {
        if self.unhealthy.load(Ordering::SeqCst) {
            Err(ProviderError::Unavailable {
                message: "double is unhealthy".into(),
                retry_after: None,
            })
        } else {
            Ok(())
        }
    }

    fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo {
            container_runtime_version: "double://1.0".into(),
            os_image: None,
        }
    }
}

/// A running in-process agent.
pub struct Agent {
    pub token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Starts node + pod controllers for `id` with `provider`, authenticated as the node.
    pub async fn start(
        id: &NodeIdentity,
        provider: Arc<Double>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Agent {
        // The agent's logs, shown for a failing test (RUST_LOG overrides the level).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,vzk_node=debug".into()),
            )
            .with_test_writer()
            .try_init();
        let client = id.client().await;
        let mut config = NodeConfig::new(&id.node_name);
        config.kubelet_port = 10250;
        config.status_check_interval = Duration::from_secs(2);
        config.lease_renew_interval = Duration::from_secs(2);
        tweak(&mut config);
        if let Err(e) = config.validate() {
            panic!("invalid test node config: {e}");
        }
        let token = CancellationToken::new();
        let node = NodeController::new(client.clone(), config.clone(), provider.clone());
        let mut pod_config =
            PodControllerConfig::new(&config.node_name, config.internal_ip.to_string());
        pod_config.retry_delay = Duration::from_secs(1);
        pod_config.allocatable = BTreeMap::from([
            ("cpu".into(), 4.0),
            ("memory".into(), 8.0 * 1024.0 * 1024.0 * 1024.0),
        ]);
        let pods = PodController::new(client, pod_config, provider);
        let t1 = token.clone();
        let t2 = token.clone();
        let tasks = vec![
            tokio::spawn(async move { node.run(t1).await }),
            tokio::spawn(async move {
                if let Err(e) = pods.run(t2).await {
                    panic!("pod controller failed: {e}");
                }
            }),
        ];
        Agent { token, tasks }
    }

    /// Stops the agent as a kill would (pods keep running in the provider).
    pub async fn stop(self) {
        self.token.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Polls `f` every 250 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A unique node name.
pub fn node_name(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand_u32() & 0xff_ffff)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// The shared control plane.
pub fn cp() -> &'static ControlPlane {
    ControlPlane::shared()
}
