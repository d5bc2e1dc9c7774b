//! Our containers on this node, found by label: listing, finding a pod's container,
//! and removing leftovers. A container without our labels is never touched.

use std::collections::HashMap;

use bollard::query_parameters::ListContainersOptionsBuilder;
use tracing::info;
use vzk_core::PodKey;

use crate::{DockerError, SidecarRuntime, spec};

/// One of our containers, as listed by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedContainer {
    /// Docker id.
    pub id: String,
    /// Docker name (without the leading `/`).
    pub name: String,
    /// Pod UID label.
    pub pod_uid: String,
    /// Pod namespace label.
    pub namespace: String,
    /// Pod name label.
    pub pod: String,
    /// Container name label.
    pub container: String,
    /// Attempt label (0 when missing or unparsable).
    pub attempt: u32,
    /// Whether it runs.
    pub running: bool,
}

impl SidecarRuntime {
    /// Our containers on this node (running or not), optionally of one pod.
    pub async fn list_ours(
        &self,
        pod_uid: Option<&str>,
    ) -> Result<Vec<OwnedContainer>, DockerError> {
        let mut label = vec![format!("{}={}", spec::LABEL_NODE, self.node)];
        if let Some(uid) = pod_uid {
            label.push(format!("{}={uid}", spec::LABEL_POD_UID));
        }
        let filters = HashMap::from([("label".to_owned(), label)]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| DockerError::api("list", "containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // Double-check the labels (never trust a filter with deletion).
                if labels.get(spec::LABEL_NODE) != Some(&self.node) {
                    return None;
                }
                let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
                let pod_uid = get(spec::LABEL_POD_UID);
                if pod_uid.is_empty() {
                    return None;
                }
                Some(OwnedContainer {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .unwrap_or_default()
                        .trim_start_matches('/')
                        .to_owned(),
                    namespace: get(spec::LABEL_NAMESPACE),
                    pod: get(spec::LABEL_POD),
                    container: get(spec::LABEL_CONTAINER),
                    attempt: get(spec::LABEL_ATTEMPT).parse().unwrap_or(0),
                    running: matches!(
                        c.state,
                        Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
                    ),
                    pod_uid,
                })
            })
            .collect())
    }

    /// Removes our containers (this node's labels) whose pod UID `keep` rejects;
    /// returns the names removed. Containers without our labels are never touched.
    pub async fn cleanup(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, DockerError> {
        let mut removed = Vec::new();
        for c in self.list_ours(None).await? {
            if keep(&c.pod_uid) {
                continue;
            }
            info!(container = %c.name, pod_uid = %c.pod_uid, "removing a leftover side-car");
            self.remove(&c.id).await?;
            removed.push(c.name);
        }
        Ok(removed)
    }

    /// The container of `pod`/`container` (latest attempt), if any.
    pub async fn find(
        &self,
        pod: &PodKey,
        container: &str,
    ) -> Result<Option<OwnedContainer>, DockerError> {
        Ok(self
            .list_ours(Some(&pod.uid))
            .await?
            .into_iter()
            .filter(|c| c.container == container)
            .max_by_key(|c| c.attempt))
    }
}
