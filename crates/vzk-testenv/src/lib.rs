//! Test environment (work in progress).
