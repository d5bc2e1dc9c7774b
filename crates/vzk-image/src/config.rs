//! The VM `config.json` of an image (agoda and vzk formats; Tart's is converted).

use serde::{Deserialize, Serialize};

/// One entry of `storage` in `config.json`: which file holds which layer media type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageEntry {
    /// Layer media type.
    pub mediatype: String,
    /// File name (the layer title).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
}

/// Guest operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GuestOs {
    /// macOS (Virtualization.framework).
    #[default]
    Darwin,
    /// Linux (QEMU, or Virtualization.framework).
    Linux,
}

impl GuestOs {
    /// `darwin` or `linux`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestOs::Darwin => "darwin",
            GuestOs::Linux => "linux",
        }
    }
}

/// The `config.json` of a VM image. See [`crate::media_types`] for the field table.
///
/// Unknown fields are kept in `extra` so that a pull → push round trip keeps them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    /// The config media type (omitted when empty, as macOS-vz-kubelet does).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mediatype: String,
    /// Guest OS.
    #[serde(default)]
    pub os: GuestOs,
    /// `arm64` or `amd64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// macOS: base64 of `VZMacHardwareModel.dataRepresentation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_model_data: Option<String>,
    /// macOS: base64 of `VZMacMachineIdentifier.dataRepresentation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id_data: Option<String>,
    /// Linux: the kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_cmdline: Option<String>,
    /// Default vCPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Default memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The fewest vCPUs the guest runs with (macOS: the restore image's requirement;
    /// Tart's `cpuCountMin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cpus: Option<u32>,
    /// The least memory in bytes the guest runs with (Tart's `memorySizeMin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_bytes: Option<u64>,
    /// Which file holds which media type (informational; the runtime finds files by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<StorageEntry>,
    /// Fields we do not interpret.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl VmConfig {
    /// The macOS platform data (hardware model, machine identifier) of a darwin image,
    /// decoded and checked.
    pub fn mac_platform(&self) -> Result<crate::MacImageConfig, crate::ImageConfigError> {
        crate::MacImageConfig::from_base64(
            self.hardware_model_data.as_deref(),
            self.machine_id_data.as_deref(),
        )
    }

    /// The guest architecture, with the per-OS default.
    pub fn arch_or_default(&self) -> &str {
        match (&self.arch, self.os) {
            (Some(a), _) => a,
            (None, GuestOs::Darwin) => "arm64",
            (None, GuestOs::Linux) => "amd64",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reference_example_config() {
        let text = r#"{
            "mediatype": "application/vnd.agoda.macosvz.config.v1+json",
            "os": "darwin",
            "hardwareModelData": "YnBsaXN0MDA=",
            "machineIdData": "YnBsaXN0MDDR",
            "storage": [
                { "mediatype": "application/vnd.agoda.macosvz.disk.image.v1", "file": "disk.img" },
                { "mediatype": "application/vnd.agoda.macosvz.aux.image.v1", "file": "aux.img" }
            ]
        }"#;
        let c: VmConfig = serde_json::from_str(text).expect("parses");
        assert_eq!(c.os, GuestOs::Darwin);
        assert_eq!(c.hardware_model_data.as_deref(), Some("YnBsaXN0MDA="));
        assert_eq!(c.storage.len(), 2);
        assert_eq!(c.arch_or_default(), "arm64");
    }

    #[test]
    fn linux_flavour_round_trips_and_keeps_unknown_fields() {
        let text = r#"{"mediatype":"application/vnd.vz-kubelet.vm.config.v1+json","os":"linux",
            "kernelCmdline":"console=ttyS0 root=/dev/vda rw","cpus":2,"memoryBytes":1073741824,"x-extra":1}"#;
        let c: VmConfig = serde_json::from_str(text).expect("parses");
        assert_eq!(c.os, GuestOs::Linux);
        assert_eq!(c.cpus, Some(2));
        assert_eq!(c.memory_bytes, Some(1 << 30));
        let back: serde_json::Value = serde_json::to_value(&c).expect("serialises");
        assert_eq!(back["x-extra"], 1);
        assert_eq!(back["kernelCmdline"], "console=ttyS0 root=/dev/vda rw");
    }
}
