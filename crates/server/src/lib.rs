//! The jobrelay orchestrator server (see issue 3; not built yet).

/// Command-line options of `jobrelay server`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {}

pub async fn run(_args: ServerArgs) -> anyhow::Result<()> {
    anyhow::bail!("jobrelay server is not built yet")
}
