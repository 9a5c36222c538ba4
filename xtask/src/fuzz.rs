//! `cargo xtask fuzz [--seconds N] [--sanitizer address|none] [--list] [TARGET...]`:
//! runs each libFuzzer target of `fuzz/` for a bounded time and reports the
//! executions, speed, corpus growth and crashes of each.
//!
//! Targets (see `fuzz/fuzz_targets/` and the checks they share with
//! `cargo test` in `fuzz/checks/`): `safetensors_header`, `sharded_index`,
//! `yaml_config`, `expr`. With no target named, all of them run, one after
//! the other, `--seconds` each (default 60).
//!
//! Needs `cargo-fuzz`: when `cargo fuzz` is missing it is installed with
//! `cargo install cargo-fuzz --locked` (about a minute and a half on two
//! cores; `--no-install` only explains how). cargo-fuzz passes nightly-only
//! flags (`-Zsanitizer`, sancov passes) to rustc; on a stable toolchain this
//! task sets `RUSTC_BOOTSTRAP=1` for the fuzz build, which stable rustc
//! accepts for exactly this purpose. `--sanitizer none` builds without
//! AddressSanitizer (faster; we have little `unsafe` to check).
//!
//! The corpus grows in `fuzz/corpus/TARGET/` (not committed), seeded from the
//! committed `fuzz/seeds/TARGET/`. A crash leaves libFuzzer's reproducer in
//! `fuzz/artifacts/TARGET/`; this task copies it to
//! `fuzz/regressions/TARGET/`, where `cargo test` replays it (and fails until
//! the bug is fixed): give it a descriptive name and commit it with the fix.
//! CI never runs the fuzzers themselves (too slow), only those replays.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The fuzz targets, in the order they run.
const TARGETS: &[&str] = &["safetensors_header", "sharded_index", "yaml_config", "expr"];

struct Opts {
    seconds: u64,
    sanitizer: String,
    install: bool,
    targets: Vec<String>,
}

fn parse(args: &[String]) -> Result<Option<Opts>> {
    let mut o = Opts {
        seconds: 60,
        sanitizer: "address".into(),
        install: true,
        targets: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" | "-s" => {
                let v = it.next().context("--seconds needs a number")?;
                o.seconds = v
                    .parse()
                    .with_context(|| format!("--seconds: `{v}` is not a number of seconds"))?;
            }
            "--sanitizer" => {
                let v = it.next().context("--sanitizer needs a value")?;
                if !["address", "none"].contains(&v.as_str()) {
                    bail!("--sanitizer: `{v}` (expected `address` or `none`)");
                }
                o.sanitizer = v.clone();
            }
            "--no-install" => o.install = false,
            "--list" => {
                for t in TARGETS {
                    println!("{t}");
                }
                return Ok(None);
            }
            "-h" | "--help" => {
                println!("{USAGE}\n\ntargets: {}", TARGETS.join(", "));
                return Ok(None);
            }
            t if TARGETS.contains(&t) => o.targets.push(t.to_string()),
            other => bail!(
                "unknown fuzz target or option `{other}` (targets: {})\n{USAGE}",
                TARGETS.join(", ")
            ),
        }
    }
    if o.targets.is_empty() {
        o.targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    if o.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    Ok(Some(o))
}

/// The task's usage line (`cargo xtask fuzz --help` adds the targets).
pub(crate) const USAGE: &str = "usage: cargo xtask fuzz [--seconds N] [--sanitizer address|none] [--no-install] [--list] [TARGET...]";

/// Runs the task.
pub fn run(args: &[String]) -> Result<()> {
    let Some(opts) = parse(args)? else {
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf();
    let fuzz = root.join("fuzz");
    ensure_cargo_fuzz(opts.install)?;
    let stable = !rustc_is_nightly()?;
    if stable {
        eprintln!(
            "note: stable toolchain: building the fuzz targets with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs nightly-only rustc flags)"
        );
    }

    let mut rows = Vec::new();
    let mut crashed = Vec::new();
    for target in &opts.targets {
        let corpus = fuzz.join("corpus").join(target);
        let artifacts = fuzz.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let before = list_files(&artifacts)?;
        let log = fuzz.join("artifacts").join(format!("{target}.log"));
        eprintln!(
            "fuzzing {target} for {} s (log: {})",
            opts.seconds,
            log.display()
        );
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz)
            .args(["fuzz", "run", "-O", "--sanitizer", &opts.sanitizer, target])
            .arg(&corpus)
            .arg(fuzz.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .args(["-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"])
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file));
        if stable {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        // Scratch files of the targets go to memory when we can.
        if Path::new("/dev/shm").is_dir() {
            cmd.env("TMPDIR", "/dev/shm");
        }
        let start = Instant::now();
        let status = cmd.status().context("running `cargo fuzz run`")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let stat = |key: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{key}:")))
                .and_then(|v| v.trim().parse().ok())
        };
        let new: Vec<PathBuf> = list_files(&artifacts)?
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        let execs = stat("number_of_executed_units");
        if !status.success() && new.is_empty() && execs.is_none() {
            bail!(
                "`cargo fuzz run {target}` failed before fuzzing ({status}); see {}",
                log.display()
            );
        }
        for p in &new {
            let dest_dir = fuzz.join("regressions").join(target);
            std::fs::create_dir_all(&dest_dir)?;
            let dest = dest_dir.join(p.file_name().context("artifact name")?);
            std::fs::copy(p, &dest)?;
            crashed.push(format!("{target}: {}", dest.display()));
        }
        rows.push(format!(
            "{target:<20} {:>12} {:>9} {:>10} {:>8} {:>7.0}s",
            execs.map_or("?".into(), |v| v.to_string()),
            stat("average_exec_per_sec").map_or("?".into(), |v| v.to_string()),
            stat("new_units_added").map_or("?".into(), |v| v.to_string()),
            new.len(),
            start.elapsed().as_secs_f64()
        ));
    }
    println!(
        "{:<20} {:>12} {:>9} {:>10} {:>8} {:>8}",
        "target", "executions", "exec/s", "new units", "crashes", "wall"
    );
    for r in &rows {
        println!("{r}");
    }
    if !crashed.is_empty() {
        println!(
            "\ncrash reproducers (copied for `cargo test` to replay; fix, rename descriptively, commit):"
        );
        for c in &crashed {
            println!("  {c}");
        }
        bail!("{} fuzz target run(s) found crashes", crashed.len());
    }
    Ok(())
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            v.push(p);
        }
    }
    Ok(v)
}

fn rustc_is_nightly() -> Result<bool> {
    let out = Command::new("rustc")
        .arg("--version")
        .output()
        .context("running `rustc --version`")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("nightly"))
}

fn cargo_fuzz_present() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_cargo_fuzz(install: bool) -> Result<()> {
    if cargo_fuzz_present() {
        return Ok(());
    }
    if !install {
        bail!(
            "`cargo fuzz` is not installed. Install it with\n    cargo install cargo-fuzz --locked\n\
             (from crates.io, about a minute and a half on two cores), then run this task again. \
             It works on stable Rust: this task sets RUSTC_BOOTSTRAP=1 for the fuzz build."
        );
    }
    eprintln!(
        "`cargo fuzz` not found: installing it with `cargo install cargo-fuzz --locked` (about a minute and a half)"
    );
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("running `cargo install cargo-fuzz`")?;
    if !status.success() || !cargo_fuzz_present() {
        bail!(
            "installing cargo-fuzz failed ({status}); install it by hand with `cargo install cargo-fuzz --locked`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_and_default_to_every_target() {
        let o = parse(&args(&[])).unwrap().unwrap();
        assert_eq!(o.seconds, 60);
        assert_eq!(o.targets, TARGETS);
        let o = parse(&args(&["--seconds", "5", "expr", "--sanitizer", "none"]))
            .unwrap()
            .unwrap();
        assert_eq!((o.seconds, o.sanitizer.as_str()), (5, "none"));
        assert_eq!(o.targets, ["expr"]);
        assert!(parse(&args(&["--seconds", "x"])).is_err());
        assert!(parse(&args(&["--seconds", "0"])).is_err());
        let e = parse(&args(&["yaml"])).err().unwrap().to_string();
        assert!(e.contains("yaml_config"), "{e}");
    }

    #[test]
    fn every_target_has_a_source_seeds_and_a_manifest_entry() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(fuzz.join(format!("fuzz_targets/{t}.rs")).is_file(), "{t}");
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
            assert!(
                std::fs::read_dir(fuzz.join("seeds").join(t))
                    .unwrap()
                    .count()
                    > 0
            );
        }
    }
}
