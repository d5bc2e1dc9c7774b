//! Integration tests of vzk-image against a real `docker-registry` (one binary).

mod clone;
mod faults;
mod roundtrip;
mod support;
