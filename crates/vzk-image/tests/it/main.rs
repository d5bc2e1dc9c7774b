//! Integration tests of vzk-image against a real `docker-registry` (one binary).

mod auth;
mod clone;
mod convert;
mod create;
// A tmpfs in a private mount namespace: Linux only.
#[cfg(target_os = "linux")]
mod diskfull;
mod faults;
mod lazy;
mod mirrors;
mod roundtrip;
mod support;
