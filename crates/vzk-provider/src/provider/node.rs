//! What the node runtime asks of the provider about the node: capacity (VM slots, the
//! VM limit's leak), health conditions, ping, runtime info.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vzk_core::{NodeProvider, ProviderError, RuntimeInfo};

use crate::pod::lock;

use super::*;

#[async_trait]
impl NodeProvider for VmProvider {
    async fn capacity(&self) -> Result<BTreeMap<String, Quantity>, ProviderError> {
        let cpus = vzk_node::host::cpus();
        let mut m = BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpus.to_string())),
            (
                "pods".to_owned(),
                Quantity(self.inner.slots.capacity().to_string()),
            ),
            (
                VM_RESOURCE.to_owned(),
                Quantity(
                    lock(&self.inner.vm_limit)
                        .vm_capacity(self.inner.slots.capacity())
                        .to_string(),
                ),
            ),
        ]);
        if let Some(mem) = vzk_node::host::memory() {
            m.insert("memory".into(), Quantity(mem.total.to_string()));
        }
        if let Some(disk) = vzk_node::host::disk(&self.inner.args.data_dir) {
            m.insert("ephemeral-storage".into(), Quantity(disk.total.to_string()));
        }
        Ok(m)
    }

    async fn conditions(&self) -> Vec<k8s_openapi::api::core::v1::NodeCondition> {
        let mut checks = lock(&self.inner.health).clone();
        if checks.is_empty() {
            checks = self.inner.check_health().await;
        }
        let mut conditions: Vec<_> = checks.iter().map(crate::health::Check::condition).collect();
        conditions.push(lock(&self.inner.vm_limit).condition());
        conditions
    }

    async fn ping(&self) -> Result<(), ProviderError> {
        let checks = self.inner.check_health().await;
        let docker_optional = self.inner.args.docker_optional;
        let gating: Vec<_> = checks
            .iter()
            .filter(|c| !(docker_optional && c.type_ == "DockerReady"))
            .cloned()
            .collect();
        crate::health::summary(&gating).map_err(|message| ProviderError::Unavailable {
            message,
            retry_after: None,
        })
    }

    fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo {
            container_runtime_version: {
                let caps = self.inner.hv.capabilities();
                format!("{}://{}", caps.backend, caps.accelerator)
            },
            os_image: None,
        }
    }
}
