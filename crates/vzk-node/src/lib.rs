//! The provider-agnostic node runtime (work in progress).
