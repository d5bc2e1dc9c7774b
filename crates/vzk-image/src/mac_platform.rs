//! The `config.json` of a macOS VM image (macOS-vz-kubelet format).
//!
//! ```json
//! { "mediatype": "application/vnd.agoda.macosvz.config.v1+json", "os": "darwin",
//!   "hardwareModelData": "<base64 bplist>", "machineIdData": "<base64 bplist>",
//!   "storage": [ { "mediatype": "...disk.image.v1", "file": "disk.img" } ] }
//! ```
//!
//! Contract: [`MacImageConfig::from_base64`] (the two fields as already read, e.g. by
//! [`crate::VmConfig::mac_platform`], which Tart images reach too through their converted config) and [`MacImageConfig::parse`] (the raw file) need
//! `hardwareModelData` and `machineIdData`, decode them from standard base64 and check
//! that each is an Apple binary property list (`bplist00` magic) — what
//! `VZMacHardwareModel(dataRepresentation:)` and
//! `VZMacMachineIdentifier(dataRepresentation:)` take. `parse` also requires `os`, when
//! present, to be `darwin`, and ignores `storage` and unknown fields (the runtime finds
//! disk and aux by layer media type, as the reference does).

use base64::Engine as _;
use serde::Deserialize;

/// The magic of an Apple binary property list.
const BPLIST_MAGIC: &[u8] = b"bplist00";

/// An error reading an image's `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ImageConfigError {
    /// The file is not JSON of the expected shape.
    #[error("config.json is not valid JSON")]
    Parse(#[source] serde_json::Error),
    /// `os` names another OS.
    #[error("config.json is for os {os:?}, not darwin")]
    WrongOs {
        /// The `os` value.
        os: String,
    },
    /// A required field is missing or empty.
    #[error("config.json lacks {field}")]
    MissingField {
        /// The JSON field name.
        field: &'static str,
    },
    /// A field is not standard base64.
    #[error("config.json field {field} is not base64")]
    Base64 {
        /// The JSON field name.
        field: &'static str,
        /// The decoding error.
        #[source]
        source: base64::DecodeError,
    },
    /// A field decodes to something other than a binary property list.
    #[error("config.json field {field} is not a binary property list")]
    NotPlist {
        /// The JSON field name.
        field: &'static str,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    os: Option<String>,
    hardware_model_data: Option<String>,
    machine_id_data: Option<String>,
}

/// The macOS platform data of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacImageConfig {
    /// `VZMacHardwareModel.dataRepresentation`.
    pub hardware_model: Vec<u8>,
    /// `VZMacMachineIdentifier.dataRepresentation` (the same for every clone).
    pub machine_identifier: Vec<u8>,
}

impl MacImageConfig {
    /// Parses and checks the bytes of `config.json`.
    pub fn parse(json: &[u8]) -> Result<Self, ImageConfigError> {
        let raw: RawConfig = serde_json::from_slice(json).map_err(ImageConfigError::Parse)?;
        if let Some(os) = raw.os.filter(|os| os != "darwin") {
            return Err(ImageConfigError::WrongOs { os });
        }
        Self::from_base64(
            raw.hardware_model_data.as_deref(),
            raw.machine_id_data.as_deref(),
        )
    }

    /// Decodes and checks the two base64 fields.
    pub fn from_base64(
        hardware_model_data: Option<&str>,
        machine_id_data: Option<&str>,
    ) -> Result<Self, ImageConfigError> {
        Ok(Self {
            hardware_model: decode_plist("hardwareModelData", hardware_model_data)?,
            machine_identifier: decode_plist("machineIdData", machine_id_data)?,
        })
    }
}

fn decode_plist(field: &'static str, value: Option<&str>) -> Result<Vec<u8>, ImageConfigError> {
    let text = value
        .filter(|v| !v.is_empty())
        .ok_or(ImageConfigError::MissingField { field })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|source| ImageConfigError::Base64 { field, source })?;
    if !bytes.starts_with(BPLIST_MAGIC) {
        return Err(ImageConfigError::NotPlist { field });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's `example/config.json`, verbatim.
    const EXAMPLE: &str = r#"{
    "mediatype": "application/vnd.agoda.macosvz.config.v1+json",
    "os": "darwin",
    "hardwareModelData": "YnBsaXN0MDDTAQIDBAUGXxAZRGF0YVJlcHJlc2VudGF0aW9uVmVyc2lvbl8QD1BsYXRmb3JtVmVyc2lvbl8QEk1pbmltdW1TdXBwb3J0ZWRPUxQAAAAAAAAAAAAAAAAAAAABEAKjBwgIEA0QAAgPKz1SY2VpawAAAAAAAAEBAAAAAAAAAAkAAAAAAAAAAAAAAAAAAABt",
    "machineIdData": "YnBsaXN0MDDRAQJURUNJRBMWYaHTD7Jo1QgLEAAAAAAAAAEBAAAAAAAAAAMAAAAAAAAAAAAAAAAAAAAZ",
    "storage": [
        { "mediatype": "application/vnd.agoda.macosvz.disk.image.v1", "file": "disk.img" },
        { "mediatype": "application/vnd.agoda.macosvz.aux.image.v1", "file": "aux.img" }
    ]
}"#;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn reference_example_decodes_to_the_documented_plists() {
        let cfg = MacImageConfig::parse(EXAMPLE.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.hardware_model.starts_with(b"bplist00"));
        assert!(contains(&cfg.hardware_model, b"DataRepresentationVersion"));
        assert!(contains(&cfg.hardware_model, b"PlatformVersion"));
        assert!(contains(&cfg.hardware_model, b"MinimumSupportedOS"));
        assert!(contains(&cfg.machine_identifier, b"ECID"));
        assert_eq!(cfg.machine_identifier.len(), 60);
    }

    #[test]
    fn missing_os_is_accepted_other_os_is_not() {
        let no_os = EXAMPLE.replace("\"os\": \"darwin\",", "");
        assert!(MacImageConfig::parse(no_os.as_bytes()).is_ok());
        let linux = EXAMPLE.replace("darwin", "linux");
        assert!(matches!(
            MacImageConfig::parse(linux.as_bytes()),
            Err(ImageConfigError::WrongOs { os }) if os == "linux"
        ));
    }

    #[test]
    fn missing_empty_bad_base64_and_non_plist_fields_are_named() {
        let r = MacImageConfig::parse(br#"{"os":"darwin","machineIdData":"YnBsaXN0MDA="}"#);
        assert!(matches!(
            r,
            Err(ImageConfigError::MissingField {
                field: "hardwareModelData"
            })
        ));
        let r =
            MacImageConfig::parse(br#"{"hardwareModelData":"YnBsaXN0MDA=","machineIdData":""}"#);
        assert!(matches!(
            r,
            Err(ImageConfigError::MissingField {
                field: "machineIdData"
            })
        ));
        let r =
            MacImageConfig::parse(br#"{"hardwareModelData":"!!","machineIdData":"YnBsaXN0MDA="}"#);
        assert!(matches!(
            r,
            Err(ImageConfigError::Base64 {
                field: "hardwareModelData",
                ..
            })
        ));
        // base64 of "hello world"
        let r = MacImageConfig::parse(
            br#"{"hardwareModelData":"YnBsaXN0MDA=","machineIdData":"aGVsbG8gd29ybGQ="}"#,
        );
        assert!(matches!(
            r,
            Err(ImageConfigError::NotPlist {
                field: "machineIdData"
            })
        ));
        assert!(matches!(
            MacImageConfig::parse(b"[1,2]"),
            Err(ImageConfigError::Parse(_))
        ));
    }

    #[test]
    fn from_base64_carries_the_decoded_data() {
        let cfg = MacImageConfig::from_base64(Some("YnBsaXN0MDBB"), Some("YnBsaXN0MDBC"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.hardware_model, b"bplist00A".to_vec());
        assert_eq!(cfg.machine_identifier, b"bplist00B".to_vec());
    }
}
