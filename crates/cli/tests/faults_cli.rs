//! Faults around the built `tensormerge` binary: SIGKILL at several moments
//! of a merge that replaces an existing output (`--overwrite`), a full disk
//! (RLIMIT_FSIZE on the child), and an output placed inside an input. In
//! every case the inputs are byte-for-byte unchanged, the output directory
//! is either the complete previous result or the complete new one (never a
//! mix, never half-written), and what is left over is only a hidden,
//! clearly named temporary directory of a killed process.
#![cfg(unix)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{Model, ModelWriter, WriterOptions};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tensormerge"));
    c.env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1");
    c
}

/// A model of `n` 1 MB F32 tensors (values from `seed`), two shards.
fn write_model(dir: &Path, n: usize, seed: f32) -> PathBuf {
    let tensors: Vec<TensorInfo> = (0..n)
        .map(|i| TensorInfo::new(format!("layers.{i}.weight"), vec![500, 500], DType::F32))
        .collect();
    let opts = WriterOptions {
        max_shard_bytes: (n as u64 / 2).max(1) * 1_000_000,
        ..WriterOptions::default()
    };
    let mut w = ModelWriter::create(dir, tensors.clone(), opts).unwrap();
    for (k, t) in tensors.iter().enumerate() {
        let v: Vec<f32> = (0..t.numel())
            .map(|i| ((i * 31 + k * 7) % 1000) as f32 / 500.0 - 1.0 + seed)
            .collect();
        w.write(&t.name, &convert::encode_f32_vec(DType::F32, &v).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
    std::fs::write(dir.join("config.json"), r#"{"torch_dtype": "float32"}"#).unwrap();
    dir.to_path_buf()
}

/// Every file under `dir` (relative name → bytes).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(p).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn config(path: &Path, a: &Path, b: &Path, wa: f32, wb: f32) {
    std::fs::write(
        path,
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: {wa}}}\n  - model: {}\n    parameters: {{weight: {wb}}}\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
}

fn merge_args(cfg: &Path, out: &Path) -> Vec<String> {
    [
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-j",
        "1",
        "--max-memory",
        "1MB",
        "--no-progress",
    ]
    .map(String::from)
    .to_vec()
}

/// Names in `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    v.sort();
    v
}

#[test]
fn sigkill_during_overwrite_keeps_a_complete_output_and_the_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    // 24 MB per model: a merge takes long enough (about 0.1 s) for most of
    // the kills below to land while it writes, however fast the merge gets.
    let a = write_model(&tmp.path().join("a"), 24, 0.0);
    let b = write_model(&tmp.path().join("b"), 24, 0.5);
    let inputs = (snapshot(&a), snapshot(&b));
    let out = tmp.path().join("out");

    // A first, complete merge, and the result a second one would write.
    let (cfg_old, cfg_new) = (tmp.path().join("old.yml"), tmp.path().join("new.yml"));
    config(&cfg_old, &a, &b, 0.5, 0.5);
    config(&cfg_new, &a, &b, 0.25, 0.75);
    let st = bin().args(merge_args(&cfg_new, &out)).status().unwrap();
    assert!(st.success());
    let new_result = snapshot(&out);
    std::fs::remove_dir_all(&out).unwrap();
    let st = bin().args(merge_args(&cfg_old, &out)).status().unwrap();
    assert!(st.success());
    let old_result = snapshot(&out);
    assert_ne!(old_result, new_result);

    let mut killed = 0;
    for delay_ms in [0u64, 3, 15, 60] {
        let mut args = merge_args(&cfg_new, &out);
        args.push("--overwrite".into());
        let mut child = bin()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Kill once the temporary directory exists (plus a delay).
        let start = Instant::now();
        let mut finished = false;
        loop {
            if others(tmp.path(), &["a", "b", "out", "old.yml", "new.yml"])
                .iter()
                .any(|n| n.starts_with(".out.tensormerge-tmp"))
            {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "merge never started"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if !finished && !status.success() {
            killed += 1;
        }

        // The output is exactly one of the two complete results. (On Linux
        // the writer swaps the temporary directory and `out` in one
        // renameat2(RENAME_EXCHANGE), so there is no moment without `out`;
        // elsewhere it falls back to two renames.)
        let now = snapshot(&out);
        assert!(
            now == old_result || now == new_result,
            "delay {delay_ms} ms: the output is neither the old nor the new result"
        );
        Model::open_path(&out).unwrap();
        // The inputs did not change.
        assert!(snapshot(&a) == inputs.0 && snapshot(&b) == inputs.1);
        // Leftovers: only hidden temporary dirs named after `out` and the pid.
        for n in others(tmp.path(), &["a", "b", "out", "old.yml", "new.yml"]) {
            assert!(
                n.starts_with(&format!(".out.tensormerge-tmp-{pid}"))
                    || n.starts_with(".out.tensormerge-old-"),
                "unexpected leftover {n}"
            );
            std::fs::remove_dir_all(tmp.path().join(&n)).unwrap();
        }
        if now == new_result {
            // Put the old result back for the next round.
            std::fs::remove_dir_all(&out).unwrap();
            assert!(
                bin()
                    .args(merge_args(&cfg_old, &out))
                    .status()
                    .unwrap()
                    .success()
            );
        }
    }
    assert!(killed >= 2, "only {killed} of 4 runs were killed mid-merge");
}

#[test]
fn disk_full_merge_fails_with_an_io_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_model(&tmp.path().join("a"), 4, 0.0);
    let b = write_model(&tmp.path().join("b"), 4, 1.0);
    let inputs = (snapshot(&a), snapshot(&b));
    let cfg = tmp.path().join("c.yml");
    config(&cfg, &a, &b, 0.5, 0.5);
    let out = tmp.path().join("out");
    // A file size limit of 128-256 KiB (`ulimit -f` blocks are 512 or 1024
    // bytes depending on the shell) against 4 MB of output, SIGXFSZ ignored
    // so that writes fail with EFBIG as on a full disk.
    let o = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tensormerge"))
        .args(merge_args(&cfg, &out))
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    assert!(stderr.contains("File too large"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(
        others(tmp.path(), &["a", "b", "c.yml"]),
        Vec::<String>::new()
    );
    assert!(snapshot(&a) == inputs.0 && snapshot(&b) == inputs.1);
}

#[test]
fn output_inside_or_onto_an_input_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_model(&tmp.path().join("a"), 2, 0.0);
    let b = write_model(&tmp.path().join("b"), 2, 1.0);
    let inputs = (snapshot(&a), snapshot(&b));
    let cfg = tmp.path().join("c.yml");
    config(&cfg, &a, &b, 0.5, 0.5);
    for out in [a.clone(), a.join("merged"), b.join("..").join("b")] {
        let mut args = merge_args(&cfg, &out);
        args.push("--overwrite".into());
        let o = bin().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: {stderr}", out.display());
        assert!(stderr.contains("error:"), "{stderr}");
        assert!(
            snapshot(&a) == inputs.0 && snapshot(&b) == inputs.1,
            "{}",
            out.display()
        );
        assert_eq!(
            others(tmp.path(), &["a", "b", "c.yml"]),
            Vec::<String>::new()
        );
    }
}
