//! Integration tests of vzk-image against a real `docker-registry` (one binary).

mod auth;
mod clone;
mod diskfull;
mod faults;
mod roundtrip;
mod support;
