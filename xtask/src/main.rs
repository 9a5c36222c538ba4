//! `cargo xtask`: developer tasks for tensormerge.
//!
//! Each task lives in its own module: `bench` (realistic streaming merges
//! against the read-and-write floor), `codegen` (generated docs), `fuzz`
//! (bounded fuzzing runs). `demo` runs the built binary's demo in release mode.

use anyhow::{Result, bail};

mod bench;
mod bench_methods;
mod codegen;
mod fuzz;
mod scale;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "demo" => run_demo(&rest),
        "bench" => bench::run(&rest),
        "codegen" => codegen::run(&rest),
        "fuzz" => fuzz::run(&rest),
        _ => bail!(
            "usage: cargo xtask <task> [args]\n\ntasks:\n  demo      run `tensormerge demo` (release build)\n  bench     realistic merge benchmark against the I/O floor (--scale: out-of-core; --nn: forward pass)\n  codegen   regenerate docs/methods.md (`--check` fails when stale)\n  fuzz      run each fuzz target for a bounded time"
        ),
    }
}

fn run_demo(rest: &[String]) -> Result<()> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["run", "--release", "-p", "tensormerge-cli", "--", "demo"])
        .args(rest)
        .status()?;
    if !status.success() {
        bail!("demo failed: {status}");
    }
    Ok(())
}
