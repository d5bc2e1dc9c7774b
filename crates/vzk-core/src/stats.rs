//! The kubelet Summary API (`stats/v1alpha1`) types served on `/stats/summary`.
//!
//! Field names and JSON shape follow `k8s.io/kubelet/pkg/apis/stats/v1alpha1`; every
//! measurement is optional, as upstream, and omitted from JSON when unknown.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The whole summary: node and pods.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Node-level statistics.
    pub node: NodeStats,
    /// Per-pod statistics.
    pub pods: Vec<PodStats>,
}

/// Node-level statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStats {
    /// Name of the node.
    pub node_name: String,
    /// When the node (agent) started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    /// Node CPU usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Node memory usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
    /// Node network usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStats>,
    /// Filesystem holding the agent's data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsStats>,
}

/// Reference to a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReference {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
}

/// Per-pod statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStats {
    /// Which pod.
    pub pod_ref: PodReference,
    /// When the pod started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    /// Per-container statistics.
    #[serde(default)]
    pub containers: Vec<ContainerStats>,
    /// Pod CPU usage (sum of containers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Pod memory usage (sum of containers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
    /// Pod network usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStats>,
    /// Ephemeral storage used by the pod.
    #[serde(rename = "ephemeral-storage", skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<FsStats>,
}

/// Per-container statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStats {
    /// Container name.
    pub name: String,
    /// When the container started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    /// CPU usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Memory usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
    /// Root filesystem usage (the VM's disk overlay, the side-car's layer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<FsStats>,
    /// Log storage usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<FsStats>,
}

/// CPU usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuStats {
    /// When the sample was taken.
    pub time: DateTime<Utc>,
    /// Average usage in nanocores over the last sampling window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_nano_cores: Option<u64>,
    /// Cumulative CPU time in core-nanoseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_core_nano_seconds: Option<u64>,
}

/// Memory usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStats {
    /// When the sample was taken.
    pub time: DateTime<Utc>,
    /// Available memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    /// Total memory in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_bytes: Option<u64>,
    /// Working set (what metrics-server reports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_set_bytes: Option<u64>,
    /// Resident set size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Cumulative page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_faults: Option<u64>,
    /// Cumulative major page faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_page_faults: Option<u64>,
}

/// Network usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStats {
    /// When the sample was taken.
    pub time: DateTime<Utc>,
    /// Name of the default interface.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Cumulative bytes received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx_bytes: Option<u64>,
    /// Cumulative bytes sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_bytes: Option<u64>,
}

/// Filesystem usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FsStats {
    /// When the sample was taken.
    pub time: DateTime<Utc>,
    /// Bytes available to non-root users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    /// Total capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// Bytes used by this object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_json_uses_upstream_field_names() {
        let t = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").map(|t| t.to_utc());
        let t = t.expect("valid time");
        let s = Summary {
            node: NodeStats {
                node_name: "n1".into(),
                cpu: Some(CpuStats {
                    time: t,
                    usage_nano_cores: Some(5),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pods: vec![PodStats {
                pod_ref: PodReference {
                    name: "p".into(),
                    namespace: "ns".into(),
                    uid: "u".into(),
                },
                ephemeral_storage: Some(FsStats {
                    time: t,
                    used_bytes: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        let v = serde_json::to_value(&s).expect("serialises");
        assert_eq!(v["node"]["nodeName"], "n1");
        assert_eq!(v["node"]["cpu"]["usageNanoCores"], 5);
        assert!(v["node"]["cpu"].get("usageCoreNanoSeconds").is_none());
        assert_eq!(v["pods"][0]["podRef"]["uid"], "u");
        assert_eq!(v["pods"][0]["ephemeral-storage"]["usedBytes"], 1);
        let back: Summary = serde_json::from_value(v).expect("round-trips");
        assert_eq!(back, s);
    }
}
