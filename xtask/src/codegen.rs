//! `cargo xtask codegen` (being built; see the open issues).

/// Runs the task.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask codegen` is not built yet")
}
