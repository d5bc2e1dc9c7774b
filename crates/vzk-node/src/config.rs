//! Node configuration: validated values the node and pod controllers run with.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::labels::{self, LabelError};

/// A taint the node registers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintSpec {
    /// Taint key.
    pub key: String,
    /// Taint value (may be empty).
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

impl TaintSpec {
    /// The default taint: `virtual-kubelet.io/provider=vz:NoSchedule`.
    pub fn default_vz() -> Self {
        Self {
            key: "virtual-kubelet.io/provider".into(),
            value: "vz".into(),
            effect: "NoSchedule".into(),
        }
    }

    /// Parses `key=value:Effect` or `key:Effect`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Taint(s.to_owned());
        let (kv, effect) = s.rsplit_once(':').ok_or_else(bad)?;
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(bad());
        }
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        if key.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            key: key.into(),
            value: value.into(),
            effect: effect.into(),
        })
    }
}

/// Errors in the node configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A taint that does not parse.
    #[error("invalid taint {0:?}: expected key[=value]:NoSchedule|PreferNoSchedule|NoExecute")]
    Taint(String),
    /// A label the node may not set on itself.
    #[error(transparent)]
    Label(#[from] LabelError),
    /// An empty or invalid node name.
    #[error("invalid node name {0:?}: must be a lowercase RFC 1123 subdomain")]
    NodeName(String),
}

/// Thresholds for the MemoryPressure and DiskPressure conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureThresholds {
    /// MemoryPressure when available memory drops below this many bytes.
    pub memory_available_bytes: u64,
    /// DiskPressure when the data filesystem's free fraction drops below this.
    pub disk_free_fraction: f64,
}

impl Default for PressureThresholds {
    fn default() -> Self {
        // The kubelet's default hard eviction thresholds: memory.available<100Mi,
        // nodefs.available<10%.
        Self {
            memory_available_bytes: 100 << 20,
            disk_free_fraction: 0.10,
        }
    }
}

/// The node's configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name (also the Lease name).
    pub node_name: String,
    /// Extra labels beyond the built-in ones; validated against NodeRestriction.
    pub labels: BTreeMap<String, String>,
    /// Taint set at registration; `None` registers without a taint.
    pub taint: Option<TaintSpec>,
    /// Address the API server reaches the kubelet API on.
    pub internal_ip: IpAddr,
    /// Hostname reported in addresses and the hostname label.
    pub hostname: String,
    /// Port of the kubelet API (`daemonEndpoints.kubeletEndpoint.port`).
    pub kubelet_port: u16,
    /// Version string reported as `kubeletVersion`.
    pub kubelet_version: String,
    /// Lease duration (40 s as the kubelet).
    pub lease_duration: Duration,
    /// Interval between lease renewals (10 s).
    pub lease_renew_interval: Duration,
    /// How often node conditions are recomputed (10 s).
    pub status_check_interval: Duration,
    /// Longest time between two node status patches when nothing changed (5 min).
    pub status_report_ceiling: Duration,
    /// Pressure thresholds.
    pub pressure: PressureThresholds,
    /// Filesystem watched for DiskPressure (the agent's data directory).
    pub data_dir: PathBuf,
    /// Node features declared in `status.declaredFeatures`.
    pub declared_features: Vec<String>,
}

impl NodeConfig {
    /// A configuration with the kubelet's defaults for `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        Self {
            hostname: node_name.clone(),
            node_name,
            labels: BTreeMap::new(),
            taint: Some(TaintSpec::default_vz()),
            internal_ip: IpAddr::from([127, 0, 0, 1]),
            kubelet_port: 10250,
            kubelet_version: format!("v1.35.0-vzk-{}", env!("CARGO_PKG_VERSION")),
            lease_duration: Duration::from_secs(40),
            lease_renew_interval: Duration::from_secs(10),
            status_check_interval: Duration::from_secs(10),
            status_report_ceiling: Duration::from_secs(300),
            pressure: PressureThresholds::default(),
            data_dir: std::env::temp_dir(),
            declared_features: Vec::new(),
        }
    }

    /// Checks the configuration: the node name, and that every configured label is one a
    /// node may set on itself under NodeRestriction (fails fast naming the label).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node_name;
        let valid_name = !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !valid_name {
            return Err(ConfigError::NodeName(n.clone()));
        }
        for key in self.labels.keys() {
            labels::check_self_settable(key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_parse_and_reject() {
        assert_eq!(
            TaintSpec::parse("a/b=c:NoExecute").ok(),
            Some(TaintSpec {
                key: "a/b".into(),
                value: "c".into(),
                effect: "NoExecute".into()
            })
        );
        assert_eq!(
            TaintSpec::parse("k:NoSchedule").map(|t| t.value).ok(),
            Some(String::new())
        );
        for bad in ["k=v", "k=v:Sometimes", "=v:NoSchedule", ""] {
            assert!(TaintSpec::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn node_names_and_restricted_labels_are_validated() {
        let mut c = NodeConfig::new("mac-mini-01");
        assert!(c.validate().is_ok());
        c.labels
            .insert("node-role.kubernetes.io/ci".into(), String::new());
        let err = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("node-role.kubernetes.io/ci"), "{err}");
        for bad in ["", "Mac", "a_b", "-a", "a..b"] {
            assert!(NodeConfig::new(bad).validate().is_err(), "{bad:?}");
        }
    }
}
