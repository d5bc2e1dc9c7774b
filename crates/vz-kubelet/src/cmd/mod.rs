//! One module per subcommand.

pub(crate) mod create;
pub(crate) mod image;
pub(crate) mod run;
pub(crate) mod vm;
