//! `cargo xtask codegen`: writes `docs/methods.md` from the method registry
//! (`tensormerge::docs::methods_markdown`, which links every built-in method
//! crate). `cargo xtask codegen --check` writes nothing and fails when the
//! file is missing or stale (CI runs it; the `methods_doc` test of the
//! `tensormerge` crate checks the same without spawning cargo).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of `xtask/`).
fn root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask
        .parent()
        .map_or_else(|| xtask.join(".."), Path::to_path_buf)
}

/// The options of `cargo xtask codegen`.
pub(crate) const USAGE: &str = "usage: cargo xtask codegen [--check]";

/// Runs the task.
pub fn run(args: &[String]) -> Result<()> {
    let mut check = false;
    for a in args {
        match a.as_str() {
            "--check" => check = true,
            other => bail!("unknown argument `{other}` ({USAGE})"),
        }
    }
    let path = root().join(tensormerge::docs::METHODS_MD);
    let fresh = tensormerge::docs::methods_markdown();
    let current = std::fs::read_to_string(&path).ok();
    if check {
        match current {
            Some(c) if c == fresh => {
                eprintln!("{} is up to date", tensormerge::docs::METHODS_MD);
                Ok(())
            }
            Some(_) => bail!("{} is stale: run `cargo xtask codegen`", path.display()),
            None => bail!("{} is missing: run `cargo xtask codegen`", path.display()),
        }
    } else {
        if current.as_deref() == Some(fresh.as_str()) {
            eprintln!("{} is up to date", tensormerge::docs::METHODS_MD);
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, &fresh).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", tensormerge::docs::METHODS_MD);
        Ok(())
    }
}
