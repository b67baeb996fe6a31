//! `datapunk-lb demo`: placeholder until the demo lands.

/// Runs the demo.
pub async fn run(_seconds: Option<u64>) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("the demo is not built yet")
}
