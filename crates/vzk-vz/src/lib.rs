#![doc = include_str!("../README.md")]

pub mod capabilities;
pub mod config;
pub mod discovery;
pub mod limits;
pub use vzk_core::quantity;
pub mod state;

#[cfg(any(target_os = "macos", feature = "typecheck"))]
pub mod macos;
