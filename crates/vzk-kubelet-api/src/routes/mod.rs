//! Plain HTTP handlers. They only translate requests into provider calls; the
//! streaming endpoints live in [`crate::streaming`].

pub(crate) mod logs;
pub(crate) mod misc;
pub(crate) mod stats;
