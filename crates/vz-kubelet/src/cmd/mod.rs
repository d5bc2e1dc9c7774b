//! One module per subcommand.

pub(crate) mod image;
pub(crate) mod run;
pub(crate) mod vm;
