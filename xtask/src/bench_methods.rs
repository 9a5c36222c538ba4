//! `cargo xtask bench --methods`: one line per registered merge method on
//! the GPT-2-small synthetic set (f32, 1 base + 3 fine-tunes), each as its
//! wall time divided by `task_arithmetic`'s wall time in the same run, with
//! the child's peak RSS and a SHA-256 of the output.
//!
//! The checksum is over the bytes of the output's `.safetensors` files, in
//! name order (the files carry no paths or dates, so the same binary gives
//! the same checksum in any directory); comparing the lists of two binaries
//! shows whether a change left every method's output bit for bit the same.
//!
//! Every method runs with the inputs it accepts: the base and the three
//! fine-tunes where a base is used (weights 0.5, 0.3, 0.2; density 0.2 for
//! the sparsifying methods), the three fine-tunes alone where it is not
//! (`linear`, `karcher`, `fisher`, the last with each model as its own
//! Fisher estimate), and the two-model forms base + `ft1` for `slerp` and
//! `nearswap`, base + `ft1` + `ft2` for `nuslerp`, `ft1` alone for
//! `passthrough`. Targets (issue #15): every method within 2.5× of
//! `task_arithmetic`; `della`, `della_linear`, `breadcrumbs`,
//! `breadcrumbs_ties` and `sce` within 2× of `ties`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::bench::{Dt, Shape, dir_bytes, mib, run_measured, write_model};

/// How a method's config uses the synthetic models.
#[derive(Debug, Clone, Copy)]
enum Inputs {
    /// `base_model: base`, models ft1..ft3.
    BasePlus3,
    /// Models ft1..ft3, no base.
    Three,
    /// `base_model: base`, model ft1.
    BasePlus1,
    /// `base_model: base`, models ft1, ft2.
    BasePlus2,
    /// Model ft1 alone.
    One,
}

/// Every registered method: name, inputs, per-model parameters, global
/// parameters (YAML lines).
const METHODS: &[(&str, Inputs, &[&str], &[&str])] = &[
    ("task_arithmetic", Inputs::BasePlus3, &[], &[]),
    ("ties", Inputs::BasePlus3, &["density: 0.2"], &[]),
    ("linear", Inputs::Three, &[], &[]),
    ("dare_linear", Inputs::BasePlus3, &["density: 0.2"], &[]),
    ("dare_ties", Inputs::BasePlus3, &["density: 0.2"], &[]),
    ("magnitude_prune", Inputs::BasePlus3, &["density: 0.2"], &[]),
    ("breadcrumbs", Inputs::BasePlus3, &["density: 0.2"], &[]),
    (
        "breadcrumbs_ties",
        Inputs::BasePlus3,
        &["density: 0.2"],
        &[],
    ),
    ("della", Inputs::BasePlus3, &["density: 0.2"], &[]),
    ("della_linear", Inputs::BasePlus3, &["density: 0.2"], &[]),
    ("sce", Inputs::BasePlus3, &[], &["select_topk: 0.2"]),
    ("model_stock", Inputs::BasePlus3, &[], &[]),
    ("multislerp", Inputs::BasePlus3, &[], &[]),
    ("karcher", Inputs::Three, &[], &[]),
    ("fisher", Inputs::Three, &["fisher: SELF"], &[]),
    ("nuslerp", Inputs::BasePlus2, &[], &[]),
    ("slerp", Inputs::BasePlus1, &[], &["t: 0.3"]),
    ("nearswap", Inputs::BasePlus1, &[], &["t: 0.0005"]),
    ("passthrough", Inputs::One, &[], &[]),
];

/// Methods held to 2× of `ties` (issue #15).
const VS_TIES: &[&str] = &[
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
];

/// The YAML config of `method` on the models under `dir`.
fn config(method: &str, dir: &Path) -> Result<String> {
    let &(_, inputs, per_model, global) = METHODS
        .iter()
        .find(|m| m.0 == method)
        .with_context(|| format!("no benchmark config for method `{method}`"))?;
    let m = |n: &str| dir.join(n).display().to_string();
    let mut s = format!("merge_method: {method}\ndtype: float32\n");
    let models: &[&str] = match inputs {
        Inputs::BasePlus3 | Inputs::Three => &["ft1", "ft2", "ft3"],
        Inputs::BasePlus2 => &["ft1", "ft2"],
        Inputs::BasePlus1 | Inputs::One => &["ft1"],
    };
    if !matches!(inputs, Inputs::Three | Inputs::One) {
        s.push_str(&format!("base_model: {}\n", m("base")));
    }
    if !global.is_empty() {
        s.push_str("parameters:\n");
        for g in global {
            s.push_str(&format!("  {g}\n"));
        }
    }
    s.push_str("models:\n");
    // `model_stock` and `sce` have no per-model weight.
    let weighted = !matches!(inputs, Inputs::BasePlus1 | Inputs::One)
        && !matches!(method, "model_stock" | "sce");
    for (i, name) in models.iter().enumerate() {
        s.push_str(&format!("  - model: {}\n", m(name)));
        let mut params: Vec<String> = per_model
            .iter()
            .map(|p| p.replace("SELF", &m(name)))
            .collect();
        if weighted {
            params.insert(0, format!("weight: {}", [0.5, 0.3, 0.2][i]));
        }
        if !params.is_empty() {
            s.push_str("    parameters:\n");
            for p in params {
                s.push_str(&format!("      {p}\n"));
            }
        }
    }
    Ok(s)
}

/// SHA-256 of the output's `.safetensors` files, in name order (`sha256sum`
/// of each, then of the list).
fn checksum(out: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = fs::read_dir(out)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .safetensors file in {}", out.display());
    }
    let sums = Command::new("sha256sum")
        .args(&files)
        .output()
        .context("running sha256sum")?;
    if !sums.status.success() {
        bail!("sha256sum failed on {}", out.display());
    }
    let text = String::from_utf8_lossy(&sums.stdout);
    let digests: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if digests.len() == 1 {
        return Ok(digests[0].to_string());
    }
    // Several shards: the SHA-256 of their digests, one a line.
    let list = digests.join("\n") + "\n";
    let tmp = out.with_extension("sums");
    fs::write(&tmp, list)?;
    let all = Command::new("sha256sum").arg(&tmp).output()?;
    fs::remove_file(&tmp)?;
    Ok(String::from_utf8_lossy(&all.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Runs the per-method part: `only` restricts it to some methods
/// (`task_arithmetic` and `ties` always run: they are the yardsticks).
/// Returns the labels of the methods that missed their target.
pub(crate) fn run(
    bin: &Path,
    root: &Path,
    shape: Shape,
    only: Option<&[String]>,
    jobs: Option<&str>,
    repeat: usize,
) -> Result<Vec<String>> {
    let dir = root.join("f32");
    for (i, name) in ["base", "ft1", "ft2", "ft3"].iter().enumerate() {
        let mdir = dir.join(name);
        if !mdir.join("model.safetensors").is_file() {
            write_model(&mdir, shape, Dt::F32, i)?;
        }
    }
    println!(
        "per method, f32 (wall time over task_arithmetic's in this run; best of {repeat}; sha256 of the output's .safetensors)"
    );
    println!(
        "{:<17} {:>8} {:>7} {:>8} {:>10} {:>7}  {:<8} sha256",
        "method", "wall", "/ta", "/ties", "peak RSS", "target", "verdict"
    );
    let mut rows: Vec<(&str, Duration, u64, String)> = Vec::new();
    let mut missed = Vec::new();
    for &(method, ..) in METHODS {
        let wanted = only.is_none_or(|o| o.iter().any(|m| m == method))
            || method == "task_arithmetic"
            || method == "ties";
        if !wanted {
            continue;
        }
        let cfg = dir.join(format!("m-{method}.yml"));
        fs::write(&cfg, config(method, &dir)?)?;
        let out = dir.join(format!("m-out-{method}"));
        let err_path = dir.join(format!("m-{method}.err"));
        let mut cmd = Command::new(bin);
        cmd.arg("--no-progress").arg("merge").arg(&cfg);
        if let Some(j) = jobs {
            cmd.arg("-j").arg(j);
        }
        cmd.arg("-o").arg(&out).stdin(Stdio::null());
        let (mut wall, mut rss, mut sum) = (Duration::MAX, 0u64, String::new());
        let mut failed = None;
        for _ in 0..repeat {
            let _ = fs::remove_dir_all(&out);
            cmd.stdout(Stdio::null()).stderr(File::create(&err_path)?);
            let (w, code, r, _) = run_measured(&mut cmd)?;
            if code != 0 || dir_bytes(&out) == 0 {
                let err = fs::read_to_string(&err_path).unwrap_or_default();
                failed = Some(format!(
                    "exit {code}: {}",
                    err.lines().take(4).collect::<Vec<_>>().join(" | ")
                ));
                break;
            }
            let s = checksum(&out)?;
            if !sum.is_empty() && s != sum {
                bail!("{method}: two runs gave different outputs ({sum} then {s})");
            }
            sum = s;
            wall = wall.min(w);
            rss = rss.max(r);
        }
        let _ = fs::remove_dir_all(&out);
        if let Some(f) = failed {
            println!("{method:<17} FAILED ({f})");
            missed.push(format!("{method} (failed)"));
            continue;
        }
        let of = |name: &str| rows.iter().find(|r| r.0 == name).map(|r| r.1);
        let ta = of("task_arithmetic").unwrap_or(wall);
        let ties = of("ties").unwrap_or(wall);
        let r_ta = wall.as_secs_f64() / ta.as_secs_f64();
        let r_ties = wall.as_secs_f64() / ties.as_secs_f64();
        let vs_ties = VS_TIES.contains(&method);
        let ok = r_ta <= 2.5 && (!vs_ties || r_ties <= 2.0);
        if !ok {
            missed.push(format!("f32 {method} (per method)"));
        }
        println!(
            "{method:<17} {:>7.3}s {:>6.2}x {:>7.2}x {:>6.0} MiB {:>7}  {:<8} {sum}",
            wall.as_secs_f64(),
            r_ta,
            r_ties,
            mib(rss),
            if vs_ties { "2.5/2x" } else { "2.5x" },
            if ok { "ok" } else { "SLOW" },
        );
        rows.push((method, wall, rss, sum));
    }
    Ok(missed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_method_has_a_config() {
        for name in tensormerge::builtin::registry().names() {
            assert!(
                METHODS.iter().any(|x| x.0 == name),
                "method `{name}` has no line in `cargo xtask bench --methods`"
            );
        }
    }

    #[test]
    fn configs_name_the_inputs_each_method_accepts() {
        let c = config("slerp", Path::new("/m")).unwrap();
        assert!(c.contains("base_model: /m/base\n"));
        assert!(c.contains("  t: 0.3\n"));
        assert!(c.contains("- model: /m/ft1\n") && !c.contains("ft2"));
        let c = config("fisher", Path::new("/m")).unwrap();
        assert!(!c.contains("base_model"));
        assert!(c.contains("      fisher: /m/ft3\n"));
        let c = config("ties", Path::new("/m")).unwrap();
        assert!(c.contains("      weight: 0.2\n      density: 0.2\n"));
    }
}
