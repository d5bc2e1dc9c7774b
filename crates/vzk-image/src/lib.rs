//! VM images as OCI artifacts.
//!
//! * [`media_types`]: every media type and annotation we read and write (agoda, vzk, Tart).
//! * [`config`]: the VM `config.json` ([`config::VmConfig`]), macOS and Linux flavours.

pub mod config;
pub mod media_types;
