//! End-to-end runs of the built `tensormerge` binary on models written by the
//! test: outputs reloaded and compared with the in-memory computation, bad
//! inputs with their messages and exit codes, snapshots of help and error
//! output (`tests/snapshots/*.txt`; set `TENSORMERGE_UPDATE_SNAPSHOTS=1` to
//! rewrite them), and an interrupted merge.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tensormerge::builtin;
use tensormerge_core::{DType, ModelTensorMapper, ParamVector, TensorInfo, convert};
use tensormerge_io::{Model, ModelWriter, WriterOptions};
use tensormerge_methods::{Merge, ParamValue};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tensormerge"));
    c.env_remove("NO_COLOR").env("HF_HUB_OFFLINE", "1");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run tensormerge")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// (name, shape, dtype) of a small decoder: embeddings, 2 layers, norm, ids.
fn layout(dtype: DType, embed_rows: usize) -> Vec<TensorInfo> {
    let mut v = vec![TensorInfo::new(
        "model.embed_tokens.weight",
        vec![embed_rows, 8],
        dtype,
    )];
    for l in 0..2 {
        v.push(TensorInfo::new(
            format!("model.layers.{l}.self_attn.q_proj.weight"),
            vec![8, 8],
            dtype,
        ));
        v.push(TensorInfo::new(
            format!("model.layers.{l}.mlp.up_proj.weight"),
            vec![16, 8],
            dtype,
        ));
    }
    v.push(TensorInfo::new("model.norm.weight", vec![8], dtype));
    v.push(TensorInfo::new("position_ids", vec![1, 12], DType::I64));
    v
}

fn write_model(dir: &Path, tensors: &[TensorInfo], seed: u32, shard_bytes: u64) -> PathBuf {
    let mut w = ModelWriter::create(
        dir,
        tensors.to_vec(),
        WriterOptions {
            max_shard_bytes: shard_bytes,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    for (k, t) in tensors.iter().enumerate() {
        let n = t.numel();
        if t.dtype.is_float() {
            let vals: Vec<f32> = (0..n)
                .map(|i| {
                    let x = (i as u32).wrapping_mul(2_654_435_761)
                        ^ seed.wrapping_mul(0x9E37_79B9).wrapping_add(k as u32 * 7919);
                    (x % 4001) as f32 / 2000.0 - 1.0
                })
                .collect();
            w.write(&t.name, &convert::encode_f32_vec(t.dtype, &vals).unwrap())
                .unwrap();
        } else {
            let bytes: Vec<u8> = (0..n as i64).flat_map(|i| i.to_le_bytes()).collect();
            w.write(&t.name, &bytes).unwrap();
        }
    }
    w.finish().unwrap();
    std::fs::write(dir.join("config.json"), "{\"torch_dtype\": \"bfloat16\"}\n").unwrap();
    dir.to_path_buf()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    a: PathBuf,
    b: PathBuf,
}

/// A BF16 base (sharded), an F32 fine-tune and an F16 fine-tune (sharded).
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let base = write_model(&root.join("base"), &layout(DType::BF16, 12), 1, 400);
    let a = write_model(&root.join("a"), &layout(DType::F32, 12), 2, u64::MAX);
    let b = write_model(&root.join("b"), &layout(DType::F16, 12), 3, 700);
    Fixture {
        _tmp: tmp,
        root,
        base,
        a,
        b,
    }
}

impl Fixture {
    fn config(&self, name: &str, body: &str) -> PathBuf {
        let text = body
            .replace("$BASE", &self.base.display().to_string())
            .replace("$A", &self.a.display().to_string())
            .replace("$B", &self.b.display().to_string())
            .replace("$ROOT", &self.root.display().to_string());
        let p = self.root.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Replaces the temporary root in output with `<TMP>` for snapshots.
    fn scrub(&self, s: &str) -> String {
        s.replace(&self.root.display().to_string(), "<TMP>")
    }
}

fn vector(mapper: &ModelTensorMapper, dir: &Path) -> ParamVector {
    mapper.to_vector(&Model::open_path(dir).unwrap()).unwrap()
}

/// Asserts that every float tensor of `out` equals `v` encoded to `dtype(t)`,
/// and non-float tensors equal the base's.
fn assert_output(out: &Path, base: &Path, v: &ParamVector, dtype: impl Fn(&TensorInfo) -> DType) {
    let got = Model::open_path(out).unwrap();
    let b = Model::open_path(base).unwrap();
    assert_eq!(got.layout().len(), b.layout().len());
    for t in b.layout().tensors() {
        let bytes = got.tensor_bytes(&t.name).unwrap();
        if t.dtype.is_float() {
            let want =
                convert::encode_f32_vec(dtype(t), &v.view(&t.name).unwrap().to_vec()).unwrap();
            assert!(
                bytes[..] == want[..],
                "tensor {} differs from the in-memory merge",
                t.name
            );
            assert_eq!(got.tensor_info(&t.name).unwrap().dtype, dtype(t));
        } else {
            assert_eq!(bytes, b.tensor_bytes(&t.name).unwrap());
        }
    }
}

fn snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("TENSORMERGE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with TENSORMERGE_UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "snapshot {name} differs (TENSORMERGE_UPDATE_SNAPSHOTS=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

// ------------------------------------------------------------------ merges

#[test]
fn task_arithmetic_matches_the_in_memory_merge_on_any_thread_count() {
    let f = fixture();
    let cfg = f.config(
        "ta.yml",
        "merge_method: task_arithmetic\nbase_model: $BASE\nmodels:\n  - model: $A\n    parameters:\n      weight: 0.6\n  - model: $B\n    parameters:\n      weight: -0.3\nparameters:\n  lambda: 0.8\n",
    );
    let base_model = Model::open_path(&f.base).unwrap();
    let mapper = ModelTensorMapper::for_model(&base_model);
    let (vb, va, vbb) = (
        vector(&mapper, &f.base),
        vector(&mapper, &f.a),
        vector(&mapper, &f.b),
    );
    let merge = Merge::new(
        builtin::registry().get("task_arithmetic").unwrap(),
        vec![("lambda", ParamValue::Float(0.8))],
        vec![
            vec![("weight", 0.6.into())],
            vec![("weight", (-0.3).into())],
        ],
    )
    .unwrap();
    let v = merge.run(Some(&vb), &[&va, &vbb]).unwrap();
    for (i, extra) in [
        vec!["-j", "1"],
        vec!["-j", "3", "--out-shard-size", "600B"],
        vec!["-j", "2", "--max-memory", "20KB"],
    ]
    .into_iter()
    .enumerate()
    {
        let out = f.root.join(format!("out{i}"));
        let mut args = vec!["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let stdout = text(&o.stdout);
        assert!(
            stdout.starts_with("merged 7 tensors (1 copied) into"),
            "{stdout}"
        );
        // Output dtype defaults to the base's (BF16); config.json copied.
        assert_output(&out, &f.base, &v, |t| t.dtype);
        assert!(
            std::fs::read_to_string(out.join("config.json"))
                .unwrap()
                .contains("bfloat16")
        );
        if i == 1 {
            assert!(out.join("model.safetensors.index.json").exists());
        }
    }
}

#[test]
fn ties_with_a_whole_model_trim_and_out_dtype() {
    let f = fixture();
    let cfg = f.config(
        "ties.yml",
        "merge_method: ties\nbase_model: $BASE\nmodels:\n  - model: $BASE\n  - model: $A\n    parameters: {weight: 1.0, density: 0.4}\n  - model: $B\n    parameters: {weight: 0.5, density: 0.7}\nparameters:\n  lambda: 1.0\ntrim_scope: model\nout_dtype: float32\n",
    );
    let out = f.root.join("out");
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-j",
        "2",
        "--max-memory",
        "30KB",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mapper = ModelTensorMapper::for_model(&Model::open_path(&f.base).unwrap());
    let (vb, va, vbb) = (
        vector(&mapper, &f.base),
        vector(&mapper, &f.a),
        vector(&mapper, &f.b),
    );
    let merge = Merge::new(
        builtin::registry().get("ties").unwrap(),
        vec![("lambda", 1.0.into()), ("trim_scope", "model".into())],
        vec![
            vec![("weight", 1.0.into()), ("density", 0.4.into())],
            vec![("weight", 0.5.into()), ("density", 0.7.into())],
        ],
    )
    .unwrap();
    let v = merge.run(Some(&vb), &[&va, &vbb]).unwrap();
    assert_output(&out, &f.base, &v, |_| DType::F32);
    assert!(
        std::fs::read_to_string(out.join("config.json"))
            .unwrap()
            .contains("\"float32\"")
    );
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let f = fixture();
    let cfg = f.config(
        "dry.yml",
        "merge_method: linear\nmodels:\n  - model: $A\n    parameters:\n      weight:\n        - filter: mlp\n          value: [1.0, 3.0]\n        - value: 2\n  - model: $B\nparameters:\n  weight: 1\ndtype: bfloat16\n",
    );
    let out = f.root.join("out");
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--dry-run",
        "--out-shard-size",
        "1KB",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!out.exists());
    snapshot("dry_run", &f.scrub(&text(&o.stdout)));
}

#[test]
fn eval_matches_vector_arithmetic() {
    let f = fixture();
    let out = f.root.join("out");
    let o = run(&[
        "eval",
        "base + 0.5 * ((legal - base) + (recipe - base))",
        "--model",
        &format!("base={}", f.base.display()),
        "--model",
        &format!("legal={}", f.a.display()),
        "--model",
        &format!("recipe={}", f.b.display()),
        "-o",
        out.to_str().unwrap(),
        "--dtype",
        "float32",
        "-j",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mapper = ModelTensorMapper::for_model(&Model::open_path(&f.base).unwrap());
    let (b, l, r) = (
        vector(&mapper, &f.base),
        vector(&mapper, &f.a),
        vector(&mapper, &f.b),
    );
    let v = &b + 0.5 * ((&l - &b) + (&r - &b));
    assert_output(&out, &f.base, &v, |_| DType::F32);
}

// ------------------------------------------------------------------ other commands

#[test]
fn methods_list_and_show() {
    let o = run(&["methods", "list"]);
    assert!(o.status.success());
    let s = text(&o.stdout);
    for m in ["linear", "task_arithmetic", "ties"] {
        assert!(s.lines().any(|l| l.starts_with(&format!("{m} "))), "{s}");
    }
    let o = run(&["methods", "show", "task-arithmetic"]);
    assert!(o.status.success());
    let s = text(&o.stdout);
    assert!(
        s.contains("arXiv:2212.04089") && s.contains("lambda") && s.contains("weight"),
        "{s}"
    );
    let o = run(&["methods", "show", "task_arithmatic"]);
    assert_eq!(o.status.code(), Some(1));
    snapshot("error_unknown_method_show", &text(&o.stderr));
}

#[test]
fn inspect_counts_and_compares() {
    let f = fixture();
    let o = run(&["inspect", f.base.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    let params = 12 * 8 + 2 * (64 + 128) + 8;
    assert!(
        s.contains(&format!("parameters: {params} (floating point)")),
        "{s}"
    );
    assert!(s.contains("tensors: 7 (6 floating point)"), "{s}");
    assert!(s.contains("BF16 (6 tensors"), "{s}");
    let shards = Model::open_path(&f.base).unwrap().files().len();
    assert!(shards > 1);
    assert!(s.contains(&format!("files: {shards}")), "{s}");

    let o = run(&[
        "inspect",
        f.a.to_str().unwrap(),
        "--against",
        f.b.to_str().unwrap(),
        "--base",
        f.base.to_str().unwrap(),
        "--summary",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    // Independent check of one row.
    let name = "model.layers.1.mlp.up_proj.weight";
    let rd = |p: &Path| Model::open_path(p).unwrap().read_f32_vec(name).unwrap();
    let (a, b, base) = (rd(&f.a), rd(&f.b), rd(&f.base));
    let dist: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let ta: Vec<f64> = a.iter().zip(&base).map(|(x, y)| (x - y) as f64).collect();
    let tb: Vec<f64> = b.iter().zip(&base).map(|(x, y)| (x - y) as f64).collect();
    let dot: f64 = ta.iter().zip(&tb).map(|(x, y)| x * y).sum();
    let cos = dot
        / (ta.iter().map(|x| x * x).sum::<f64>().sqrt()
            * tb.iter().map(|x| x * x).sum::<f64>().sqrt());
    let row = s
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{s}"));
    let cols: Vec<f64> = row
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse().unwrap())
        .collect();
    assert!((cols[0] - dist).abs() <= 1e-5 * dist, "{row} vs {dist}");
    assert!((cols[1] - cos).abs() <= 2e-6, "{row} vs {cos}");
    assert!(s.contains("(whole model)"));
}

// ------------------------------------------------------------------ bad input

#[test]
fn bad_inputs_have_messages_and_exit_codes() {
    let f = fixture();
    let out = f.root.join("out");
    let o_arg = out.to_str().unwrap().to_string();
    let case = |name: &str, body: &str, code: i32, needle: &str| {
        let cfg = f.config(&format!("{name}.yml"), body);
        let o = run(&[
            "merge",
            cfg.to_str().unwrap(),
            "-o",
            &o_arg,
            "--color",
            "never",
        ]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
        assert!(o.stdout.is_empty());
        assert!(!out.exists(), "{name} left an output");
        f.scrub(&err)
    };
    let e = case(
        "missing_model",
        "merge_method: linear\nmodels:\n  - model: $ROOT/nowhere\n  - model: $A\n",
        1,
        "cannot open model",
    );
    snapshot("error_missing_model", &e);
    case(
        "unknown_method",
        "merge_method: task_arithmatic\nbase_model: $BASE\nmodels: [{model: $A}]\n",
        1,
        "did you mean `task_arithmetic`",
    );
    let e = case(
        "unknown_param",
        "merge_method: task_arithmetic\nbase_model: $BASE\nmodels:\n  - model: $A\n    parameters: {wieght: 1}\n",
        1,
        "has no parameter `wieght`",
    );
    assert!(
        e.contains("line 5") && e.contains("hint: `tensormerge methods show task_arithmetic`"),
        "{e}"
    );
    let e = case(
        "unknown_key",
        "merge_method: linear\nmodels: [{model: $A}]\nout_dtpye: float16\n",
        1,
        "unknown key `out_dtpye`",
    );
    snapshot("error_unknown_key", &e);
    case(
        "bad_value",
        "merge_method: ties\nbase_model: $BASE\nmodels:\n  - model: $A\n    parameters: {density: -0.5}\n",
        1,
        "out of range",
    );
    case(
        "wrong_type",
        "merge_method: linear\nmodels: [{model: $A}]\nparameters:\n  weight: {a: 1}\n",
        1,
        "parameters.weight.a",
    );
    case(
        "slices",
        "merge_method: linear\nmodels: [{model: $A}]\nslices:\n  - sources: [{model: $A, layer_range: [0, 2]}]\n",
        1,
        "`slices` and `models` are mutually exclusive",
    );
    case(
        "union",
        "merge_method: linear\nmodels: [{model: $A}]\ntokenizer_source: union\n",
        1,
        "union",
    );
    case(
        "lora",
        "merge_method: linear\nmodels: [{model: $A+some/lora}]\n",
        1,
        "LoRA",
    );

    // Mismatched shapes: every mismatch at once.
    let c = write_model(&f.root.join("c"), &layout(DType::F32, 13), 4, u64::MAX);
    let mut bad = layout(DType::F32, 12);
    bad[2].shape = vec![8, 9];
    let d = write_model(&f.root.join("d"), &bad, 5, u64::MAX);
    let e = case(
        "mismatch",
        &format!(
            "merge_method: task_arithmetic\nbase_model: $BASE\nmodels:\n  - model: {}\n  - model: {}\n",
            c.display(),
            d.display()
        ),
        1,
        "2 tensor mismatch(es)",
    );
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("model.layers.0.mlp.up_proj.weight"),
        "{e}"
    );
    snapshot("error_mismatch", &e);

    // Output inside an input, existing output: usage errors (2).
    let cfg = f.config(
        "ok.yml",
        "merge_method: linear\nmodels: [{model: $A}, {model: $B}]\n",
    );
    let inside = f.a.join("merged");
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        inside.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("inside input model"),
        "{}",
        text(&o.stderr)
    );
    assert!(!inside.exists());
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        &o_arg,
        "--color",
        "never",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = f.scrub(&text(&o.stderr));
    assert!(e.contains("hint: pass --overwrite to replace it"), "{e}");
    snapshot("error_output_exists", &e);
    assert!(out.join("keep.txt").exists());
    let o = run(&["merge", cfg.to_str().unwrap(), "-o", &o_arg, "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());

    // Usage: missing config file, missing -o, bad size.
    let o = run(&[
        "merge",
        f.root.join("none.yml").to_str().unwrap(),
        "-o",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("cannot read config file"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["merge", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        "x",
        "--max-memory",
        "lots",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("lots"));
}

#[test]
fn warnings_quiet_and_color() {
    let f = fixture();
    // ties with the default density trims nothing: the method warns.
    let cfg = f.config(
        "w.yml",
        "merge_method: ties\nbase_model: $BASE\nmodels: [{model: $A}, {model: $B}]\n",
    );
    let out = f.root.join("out");
    let o = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("warning: "), "{}", text(&o.stderr));
    let o = run(&[
        "-q",
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(o.status.success());
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-v",
        "--overwrite",
    ]);
    assert!(
        text(&o.stderr).contains("threads, chunks of"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&["methods", "show", "nope", "--color", "always"]);
    assert!(
        text(&o.stderr).starts_with("\x1b[1;31merror:\x1b[0m"),
        "{:?}",
        text(&o.stderr)
    );
    let o = run(&["methods", "show", "nope"]);
    assert!(text(&o.stderr).starts_with("error: "));
}

#[test]
fn help_snapshots() {
    for (name, args) in [
        ("help", vec!["--help"]),
        ("help_merge", vec!["merge", "--help"]),
        ("help_eval", vec!["eval", "--help"]),
        ("help_inspect", vec!["inspect", "--help"]),
    ] {
        let o = run(&args);
        assert!(o.status.success());
        snapshot(name, &text(&o.stdout));
    }
}

#[test]
fn an_interrupted_merge_leaves_no_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    // Big enough to take a while even in a release build: 2 × 48 MB.
    let big: Vec<TensorInfo> = (0..12)
        .map(|i| TensorInfo::new(format!("layers.{i}.weight"), vec![1000, 1000], DType::F32))
        .collect();
    let a = write_model(&tmp.path().join("a"), &big, 1, u64::MAX);
    let b = write_model(&tmp.path().join("b"), &big, 2, u64::MAX);
    let cfg = tmp.path().join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n  - model: {}\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let mut child = bin()
        .args([
            "merge",
            cfg.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-j",
            "1",
            "--max-memory",
            "1MB",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the temporary output directory to appear, then kill.
    let started = std::time::Instant::now();
    let tmp_dir = loop {
        let found = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".out.tensormerge-tmp")
            });
        if let Some(e) = found {
            break e.path();
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "the merge never started writing"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the merge finished before it could be interrupted ({status})");
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!out.exists(), "an interrupted merge left {}", out.display());
    // What remains is only the hidden temporary directory.
    assert!(
        tmp_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with('.')
    );
}

#[test]
fn demo_runs_and_its_configs_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    // `--out` (the spelling of issue #5) is an alias of `-o/--output`.
    let help = text(&run(&["demo", "--help"]).stdout);
    assert!(
        help.contains("-o, --output <OUT>") && help.contains("[alias: --out]"),
        "{help}"
    );
    let o = run(&[
        "--no-progress",
        "demo",
        "--quick",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    assert!(s.contains("task_arithmetic") && s.contains("ties"), "{s}");
    assert!(dir.join("results.csv").is_file());
    // The saved mergekit configs run through `tensormerge merge` (fisher
    // exercises auxiliary models and a whole-model pass).
    for name in ["ties", "fisher"] {
        let cfg = dir.join("configs").join(format!("{name}.yml"));
        let out = tmp.path().join(format!("out-{name}"));
        let o = run(&["merge", cfg.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        assert!(out.join("model.safetensors").is_file());
    }
}

/// An F32 model of `layout` whose element `index` of tensor `bad` is `value`.
fn write_poisoned(dir: &Path, bad: &str, index: usize, value: f32) -> PathBuf {
    let tensors = layout(DType::F32, 12);
    let mut w = ModelWriter::create(dir, tensors.clone(), WriterOptions::default()).unwrap();
    for t in &tensors {
        if t.dtype.is_float() {
            let mut vals: Vec<f32> = (0..t.numel()).map(|i| 0.5 + i as f32 * 1e-3).collect();
            if t.name == bad {
                vals[index] = value;
            }
            w.write(&t.name, &convert::encode_f32_vec(t.dtype, &vals).unwrap())
                .unwrap();
        } else {
            let bytes: Vec<u8> = (0..t.numel() as i64)
                .flat_map(|i| i.to_le_bytes())
                .collect();
            w.write(&t.name, &bytes).unwrap();
        }
    }
    w.finish().unwrap();
    dir.to_path_buf()
}

#[test]
fn non_finite_inputs_are_refused_unless_allowed() {
    let f = fixture();
    let q = "model.layers.1.self_attn.q_proj.weight";
    let nan = write_poisoned(&f.root.join("nan"), q, 37, f32::NAN);
    let inf = write_poisoned(&f.root.join("inf"), "model.norm.weight", 5, f32::INFINITY);
    let fisher_ok = write_poisoned(&f.root.join("fok"), q, 0, 1.0);
    let out = f.root.join("out");
    let o = out.to_str().unwrap();
    let check_refused = |o: &Output, model: &Path, tensor: &str, index: usize| {
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("`{}`", model.display())), "{err}");
        assert!(err.contains(&format!("`{tensor}`")), "{err}");
        assert!(err.contains(&format!("element {index}")), "{err}");
        assert!(err.contains("--allow-non-finite"), "{err}");
        assert!(!out.exists());
    };
    let check_allowed = |o: &Output, tensor: &str, index: usize, want_nan: bool| {
        assert!(o.status.success(), "{}", text(&o.stderr));
        let v = Model::open_path(&out)
            .unwrap()
            .read_f32_vec(tensor)
            .unwrap();
        assert_eq!(v[index].is_nan(), want_nan, "{}", v[index]);
        assert!(!v[index].is_finite());
        // The element beside it is finite: only the bad value propagates.
        assert!(v[index + 1].is_finite());
        std::fs::remove_dir_all(&out).unwrap();
    };

    // merge: the NaN model, then the same with the flag.
    let cfg = f.config(
        "nan.yml",
        &format!(
            "merge_method: linear\nmodels:\n  - model: $A\n  - model: {}\n",
            nan.display()
        ),
    );
    let c = cfg.to_str().unwrap();
    check_refused(&run(&["merge", c, "-o", o]), &nan, q, 37);
    check_allowed(
        &run(&["merge", c, "-o", o, "--allow-non-finite"]),
        q,
        37,
        true,
    );

    // eval: the infinite model.
    let m_inf = format!("y={}", inf.display());
    let m_a = format!("x={}", f.a.display());
    let ev = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "0.5 * x + 0.5 * y",
            "-m",
            &m_a,
            "-m",
            &m_inf,
            "-o",
            o,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    check_refused(&ev(&[]), &inf, "model.norm.weight", 5);
    check_allowed(&ev(&["--allow-non-finite"]), "model.norm.weight", 5, false);

    // A Fisher file with NaN is refused too; the same merge with a finite
    // Fisher file runs.
    let fisher_cfg = |name: &str, fisher: &Path| {
        f.config(
            name,
            &format!(
                "merge_method: fisher\nmodels:\n  - model: $A\n    parameters: {{fisher: {}}}\n  - model: $B\n    parameters: {{fisher: {}}}\n",
                fisher_ok.display(),
                fisher.display()
            ),
        )
    };
    let bad = fisher_cfg("fisher_bad.yml", &nan);
    check_refused(
        &run(&["merge", bad.to_str().unwrap(), "-o", o]),
        &nan,
        q,
        37,
    );
    let good = fisher_cfg("fisher_good.yml", &fisher_ok);
    let r = run(&["merge", good.to_str().unwrap(), "-o", o]);
    assert!(r.status.success(), "{}", text(&r.stderr));
}

/// Starts the binary on two big models with the arguments `args(a, b, cfg,
/// out)` returns, sends SIGINT once its temporary output directory exists,
/// and checks exit code 130, no output and no temporary directory left.
fn sigint_cleans_up(args: impl FnOnce(&Path, &Path, &Path, &Path) -> Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    // Big enough to take a while: 2 x 48 MB, one thread, 1 MB chunks.
    let big: Vec<TensorInfo> = (0..12)
        .map(|i| TensorInfo::new(format!("layers.{i}.weight"), vec![1000, 1000], DType::F32))
        .collect();
    let a = write_model(&tmp.path().join("a"), &big, 1, u64::MAX);
    let b = write_model(&tmp.path().join("b"), &big, 2, u64::MAX);
    let cfg = tmp.path().join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n  - model: {}\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let child = bin()
        .args(args(&a, &b, &cfg, &out))
        .args(["-j", "1", "--max-memory", "1MB", "--color", "never"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let temp_dirs = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("tensormerge-tmp"))
            .count()
    };
    let started = std::time::Instant::now();
    while temp_dirs() == 0 {
        assert!(
            started.elapsed().as_secs() < 20,
            "the run never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    assert!(!out.exists(), "a cancelled run left {}", out.display());
    assert_eq!(
        temp_dirs(),
        0,
        "a cancelled run left its temporary directory"
    );
}

#[test]
fn sigint_stops_a_merge_and_removes_its_temporary_directory() {
    sigint_cleans_up(|_, _, cfg, out| {
        let s = |p: &Path| p.to_str().unwrap().to_string();
        vec!["merge".into(), s(cfg), "-o".into(), s(out)]
    });
}

#[test]
fn sigint_stops_an_eval_and_removes_its_temporary_directory() {
    sigint_cleans_up(|a, b, _, out| {
        let s = |p: &Path| p.to_str().unwrap().to_string();
        vec![
            "eval".into(),
            "0.5 * (a + b)".into(),
            "--model".into(),
            format!("a={}", s(a)),
            "--model".into(),
            format!("b={}", s(b)),
            "-o".into(),
            s(out),
        ]
    });
}
