//! `cargo xtask fuzz` (being built; see the open issues).

/// Runs the task.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask fuzz` is not built yet")
}
