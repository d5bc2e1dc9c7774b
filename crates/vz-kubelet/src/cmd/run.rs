//! `vz-kubelet run` (work in progress).

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {}

pub(crate) async fn run(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("`run` is being written")
}
