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

const USAGE: &str = "usage: cargo xtask <task> [args]  (cargo xtask <task> --help for its options)\n\ntasks:\n  demo      run `tensormerge demo` (release build)\n  bench     realistic merge benchmark against the I/O floor (--scale: out-of-core; --nn: forward pass)\n  codegen   regenerate docs/methods.md (`--check` fails when stale)\n  fuzz      run each fuzz target for a bounded time";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    // `--help` prints the task's usage (`demo` passes it on to
    // `tensormerge demo`, whose own help lists the demo's options).
    let help = rest.iter().any(|a| a == "-h" || a == "--help");
    match task.as_str() {
        "demo" => run_demo(&rest),
        "bench" if help => {
            let more = |u: &str| u.replacen("usage:", "      ", 1);
            println!(
                "{}\n{}\n{}",
                bench::USAGE,
                more(scale::USAGE),
                more(bench::NN_USAGE)
            );
            Ok(())
        }
        "bench" => bench::run(&rest),
        "codegen" if help => {
            println!("{}", codegen::USAGE);
            Ok(())
        }
        "codegen" => codegen::run(&rest),
        "fuzz" => fuzz::run(&rest),
        "" | "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n{USAGE}"),
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
