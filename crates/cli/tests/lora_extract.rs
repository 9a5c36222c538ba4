//! `tensormerge lora extract`, end to end through the built binary, on tiny
//! models written by the test: an exactly rank-R task vector is recovered, a
//! full-rank one reports the error its singular values predict (Eckart–Young:
//! ‖D − D_r‖_F = sqrt(Σ_{k≥r} σ_k²)), the adapter round-trips through
//! `lora apply`, the output is the same bytes on any thread count, and bad
//! inputs are refused with their messages and exit codes.
//!
//! Singular values are known here without an SVD: D = Q1 · Σ · Q2ᵀ with Q1,
//! Q2 Householder reflections (orthogonal), Σ diagonal.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, ok, run, values, write_model};
use tensormerge_core::{DType, TensorInfo};
use tensormerge_io::Model;

const Q: &str = "model.layers.0.self_attn.q_proj.weight"; // [12, 8], rank-3 delta
const O: &str = "model.layers.0.self_attn.o_proj.weight"; // [6, 10], rank-3 delta
const K: &str = "model.layers.0.self_attn.k_proj.weight"; // [8, 8], unchanged
const T: &str = "model.layers.0.mlp.tiny_proj.weight"; // [2, 9]: rank bound 2 < R
const EMB: &str = "model.embed_tokens.weight"; // changed, never extracted
const NORM: &str = "model.norm.weight"; // changed, 1-D: never extracted

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `[m, r] @ [r, n]`, row-major, in f64.
fn matmul(a: &[f64], b: &[f64], m: usize, r: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for k in 0..r {
            for j in 0..n {
                out[i * n + j] += a[i * r + k] * b[k * n + j];
            }
        }
    }
    out
}

/// A rank-`r` `[m, n]` matrix U·V from deterministic values.
fn low_rank(m: usize, n: usize, r: usize, seed: u32) -> Vec<f64> {
    let u = f64s(&values(m * r, seed));
    let v = f64s(&values(r * n, seed + 1));
    matmul(&u, &v, m, r, n)
}

/// The Householder reflection I − 2·w·wᵀ / (wᵀw), `[n, n]`.
fn householder(n: usize, seed: u32) -> Vec<f64> {
    let w: Vec<f64> = values(n, seed).iter().map(|&x| x as f64 + 0.1).collect();
    let ww: f64 = w.iter().map(|x| x * x).sum();
    let mut h = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            h[i * n + j] = f64::from(u8::from(i == j)) - 2.0 * w[i] * w[j] / ww;
        }
    }
    h
}

/// Q1 · diag(σ) · Q2ᵀ, `[m, n]` with `σ.len() == min(m, n)`.
fn with_singular_values(m: usize, n: usize, sigma: &[f64], seed: u32) -> Vec<f64> {
    let (q1, q2) = (householder(m, seed), householder(n, seed + 7));
    let mut s = vec![0f64; m * n];
    for (k, x) in sigma.iter().enumerate() {
        s[k * n + k] = *x;
    }
    let q2t: Vec<f64> = (0..n * n).map(|x| q2[(x % n) * n + x / n]).collect();
    matmul(&matmul(&q1, &s, m, m, n), &q2t, m, n, n)
}

fn add(a: &[f32], d: &[f64]) -> Vec<f32> {
    a.iter()
        .zip(d)
        .map(|(a, d)| (*a as f64 + d) as f32)
        .collect()
}

/// Writes BASE and FT: q, o with rank-3 deltas, k unchanged, a [2, 9]
/// weight with a full-rank delta, a changed embedding and norm.
fn models(root: &Path) -> (PathBuf, PathBuf) {
    let t = |n: &str, s: Vec<usize>| TensorInfo::new(n, s, DType::F32);
    let base = vec![
        (t(EMB, vec![16, 8]), values(128, 1)),
        (t(Q, vec![12, 8]), values(96, 2)),
        (t(K, vec![8, 8]), values(64, 3)),
        (t(O, vec![6, 10]), values(60, 4)),
        (t(T, vec![2, 9]), values(18, 5)),
        (t(NORM, vec![8]), values(8, 6)),
    ];
    let deltas = [
        f64s(&values(128, 11)),
        low_rank(12, 8, 3, 12),
        vec![0.0; 64],
        low_rank(6, 10, 3, 14),
        f64s(&values(18, 15)),
        f64s(&values(8, 16)),
    ];
    let ft: Vec<_> = base
        .iter()
        .zip(&deltas)
        .map(|((t, v), d)| (t.clone(), add(v, d)))
        .collect();
    let (b, f) = (root.join("base"), root.join("ft"));
    write_model(&b, &base);
    write_model(&f, &ft);
    (b, f)
}

fn extract(base: &Path, ft: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "lora",
        "extract",
        "--base",
        base.to_str().unwrap(),
        "--model",
        ft.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn apply(base: &Path, adapter: &Path, out: &Path) -> std::process::Output {
    run(&[
        "lora",
        "apply",
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ])
}

/// The adapter's factors of `module`, read with the `safetensors` crate:
/// (A `[r, in]`, B `[out, r]`, r).
fn factors(adapter: &Path, module: &str) -> (Vec<f64>, Vec<f64>, usize) {
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |part: &str| {
        let v = st
            .tensor(&format!("base_model.model.{module}.{part}.weight"))
            .unwrap();
        assert_eq!(v.dtype(), safetensors::Dtype::F32);
        let x: Vec<f64> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect();
        (x, v.shape().to_vec())
    };
    let ((a, sa), (b, sb)) = (read("lora_A"), read("lora_B"));
    assert_eq!(sa[0], sb[1], "{module}: {sa:?} {sb:?}");
    (a, b, sa[0])
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn tensor_entry<'a>(j: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {j}"))
}

fn module(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap()
}

#[test]
fn exact_rank_delta_is_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = models(tmp.path());
    let out = tmp.path().join("adapter");
    let o = extract(&base, &ft, &out, &["--rank", "3", "--json"]);
    let j = json(&ok(&o));
    let b = Model::open_path(&base).unwrap();
    let f = Model::open_path(&ft).unwrap();
    for (name, m, n) in [(Q, 12, 8), (O, 6, 10)] {
        let e = tensor_entry(&j, name);
        assert_eq!(e["shape"], serde_json::json!([m, n]));
        assert_eq!(e["rank"], 3);
        let err = e["relative_error"].as_f64().unwrap();
        assert!(err < 1e-5, "{name}: {err}");
        // BASE + B @ A from the file reconstructs FT.
        let (a, bm, r) = factors(&out, module(name));
        assert_eq!(r, 3);
        let ba = matmul(&bm, &a, m, r, n);
        let w = f64s(&b.read_f32_vec(name).unwrap());
        let want = f64s(&f.read_f32_vec(name).unwrap());
        let scale = want.iter().fold(0f64, |s, x| s.max(x.abs()));
        for (i, ((w, d), want)) in w.iter().zip(&ba).zip(&want).enumerate() {
            assert!(
                (w + d - want).abs() < 1e-5 * scale,
                "{name}[{i}]: {} vs {want}",
                w + d
            );
        }
    }
    // The [2, 9] weight has its full rank 2, padded to r = 3: exact too.
    let e = tensor_entry(&j, T);
    assert_eq!(e["rank"], 2);
    assert!(e["relative_error"].as_f64().unwrap() < 1e-6, "{e}");
    let (a, _, r) = factors(&out, module(T));
    assert_eq!(r, 3);
    assert!(
        a[2 * 9..].iter().all(|&x| x == 0.0),
        "padding rows are zero"
    );
    // Unchanged, embedding and 1-D tensors are not in the adapter.
    assert_eq!(j["unchanged"], serde_json::json!([K]));
    assert_eq!(j["tensors"].as_array().unwrap().len(), 3);
    assert_eq!(j["totals"]["tensors"], 3);
    assert!(j["totals"]["relative_error"].as_f64().unwrap() < 1e-5);
    let adapter = Model::open_path(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter.layout().tensors().len(), 6);
    // The config: PEFT LoRA, scale 1, the extracted modules.
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["r"], 3);
    assert_eq!(c["lora_alpha"].as_f64(), Some(3.0));
    assert_eq!(c["bias"], "none");
    assert_eq!(
        c["target_modules"],
        serde_json::json!([module(Q), module(O), module(T)])
    );
    assert_eq!(c["base_model_name_or_path"], base.to_str().unwrap());
}

#[test]
fn full_rank_delta_reports_the_error_its_singular_values_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (m, n) = (10, 7);
    let sigma = [7.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5];
    let d = with_singular_values(m, n, &sigma, 21);
    // Zero base: FT holds D rounded to f32 once.
    let t = TensorInfo::new(Q, vec![m, n], DType::F32);
    let (base, ft) = (root.join("base"), root.join("ft"));
    write_model(&base, &[(t.clone(), vec![0.0; m * n])]);
    write_model(&ft, &[(t, f32s(&d))]);
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    for r in [1usize, 3, 6] {
        let out = root.join(format!("r{r}"));
        let o = extract(&base, &ft, &out, &["--rank", &r.to_string(), "--json"]);
        let j = json(&ok(&o));
        let e = tensor_entry(&j, Q);
        assert_eq!(e["rank"], r);
        let tail: f64 = sigma[r..].iter().map(|s| s * s).sum();
        let want = (tail / total).sqrt();
        let got = e["relative_error"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "rank {r}: {got} vs {want}");
        assert!((j["totals"]["relative_error"].as_f64().unwrap() - want).abs() < 1e-6);
        // And it is the error of the factors in the file.
        let (a, b, _) = factors(&out, module(Q));
        let ba = matmul(&b, &a, m, r, n);
        let res: f64 = ba.iter().zip(&d).map(|(x, y)| (x - y) * (x - y)).sum();
        assert!(((res / total).sqrt() - want).abs() < 1e-6, "rank {r}");
    }
    // At full rank the delta is exact; the human summary names the rank.
    let out = root.join("full");
    let o = extract(&base, &ft, &out, &["--rank", "64"]);
    let s = ok(&o);
    assert!(s.contains("extracted 1 weights at rank 7"), "{s}");
}

#[test]
fn extract_then_apply_gives_base_plus_b_a() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = models(tmp.path());
    let b = Model::open_path(&base).unwrap();
    let f = Model::open_path(&ft).unwrap();
    for rank in ["3", "1"] {
        let adapter = tmp.path().join(format!("adapter{rank}"));
        ok(&extract(&base, &ft, &adapter, &["--rank", rank]));
        let out = tmp.path().join(format!("applied{rank}"));
        ok(&apply(&base, &adapter, &out));
        let applied = Model::open_path(&out).unwrap();
        for (name, m, n) in [(Q, 12, 8), (O, 6, 10), (T, 2, 9)] {
            let (a, bm, r) = factors(&adapter, module(name));
            let ba = matmul(&bm, &a, m, r, n);
            let w = b.read_f32_vec(name).unwrap();
            let got = applied.read_f32_vec(name).unwrap();
            for (i, ((g, w), d)) in got.iter().zip(&w).zip(&ba).enumerate() {
                let want = *w as f64 + d;
                assert!(
                    (*g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "rank {rank} {name}[{i}]: {g} vs {want}"
                );
            }
            if rank == "3" {
                // Exact rank (or full rank for T): FT itself.
                for (g, want) in got.iter().zip(f.read_f32_vec(name).unwrap()) {
                    assert!((g - want).abs() <= 1e-5 * (1.0 + want.abs()), "{name}");
                }
            }
        }
        // Everything else is the base's.
        for name in [K, EMB, NORM] {
            assert_eq!(
                applied.tensor_bytes(name).unwrap(),
                b.tensor_bytes(name).unwrap(),
                "{name}"
            );
        }
    }
}

#[test]
fn output_is_the_same_bytes_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = models(tmp.path());
    let mut outputs = Vec::new();
    for jobs in ["1", "2", "3"] {
        let out = tmp.path().join(format!("j{jobs}"));
        let o = extract(&base, &ft, &out, &["--rank", "2", "--json", "-j", jobs]);
        let mut j = json(&ok(&o));
        j["adapter"] = serde_json::Value::Null;
        outputs.push((
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(out.join("adapter_config.json")).unwrap(),
            j,
        ));
    }
    assert!(outputs[0] == outputs[1], "-j 1 and -j 2 differ");
    assert!(outputs[0] == outputs[2], "-j 1 and -j 3 differ");
}

#[test]
fn bad_input_is_refused_with_its_message_and_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (base, ft) = models(root);
    let out = root.join("adapter");
    // Rank 0: a usage error (exit 2, like --jobs 0).
    fails(
        &extract(&base, &ft, &out, &["--rank", "0"]),
        2,
        &["--rank must be at least 1"],
    );
    assert!(!out.exists());
    // A missing model: bad input, named.
    let missing = root.join("nowhere");
    fails(
        &extract(&base, &missing, &out, &["--rank", "2"]),
        1,
        &["nowhere"],
    );
    assert!(!out.exists());
    // Shapes that differ: bad input naming the tensor and both shapes.
    let other = root.join("other");
    write_model(
        &other,
        &[(TensorInfo::new(Q, vec![8, 12], DType::F32), values(96, 9))],
    );
    fails(
        &extract(&base, &other, &out, &["--rank", "2"]),
        1,
        &[Q, "[8, 12]", "[12, 8]"],
    );
    assert!(!out.exists());
    // No linear weight in common.
    let unrelated = root.join("unrelated");
    write_model(
        &unrelated,
        &[(
            TensorInfo::new("encoder.w.weight", vec![4, 4], DType::F32),
            values(16, 9),
        )],
    );
    fails(
        &extract(&base, &unrelated, &out, &["--rank", "2"]),
        1,
        &["no linear weight in common"],
    );
    // Nothing changed.
    fails(
        &extract(&base, &base, &out, &["--rank", "2"]),
        1,
        &["nothing to extract"],
    );
    assert!(!out.exists());
    // An existing output is refused (exit 2, as for merges) and left as it is.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    fails(
        &extract(&base, &ft, &out, &["--rank", "2"]),
        2,
        &["already exists", "--overwrite"],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert!(!out.join("adapter_config.json").exists());
    // With --overwrite it is replaced, and nothing else is left beside it.
    ok(&extract(&base, &ft, &out, &["--rank", "2", "--overwrite"]));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("adapter_config.json").exists());
    let hidden: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    // A non-float --dtype is a usage error.
    fails(
        &extract(
            &base,
            &ft,
            &root.join("x"),
            &["--rank", "2", "--dtype", "int8"],
        ),
        2,
        &["not a floating-point dtype"],
    );
}

/// GPT-2 stores its linear weights `[in, out]` (`Conv1D`): the adapter of
/// a `model_type: gpt2` base says `fan_in_fan_out: true` and holds the
/// factors of the transposed task vector with peft's shapes (`lora_A`
/// `[r, in]`, `lora_B` `[out, r]`), so that `W + (B @ A)ᵀ` is the fine-tune,
/// and `lora apply` reads it back to the fine-tune.
#[test]
fn gpt2_conv1d_weights_get_fan_in_fan_out_factors() {
    let tmp = tempfile::tempdir().unwrap();
    const C: &str = "h.0.attn.c_attn.weight"; // stored [in 8, out 12]
    let t = TensorInfo::new(C, vec![8, 12], DType::F32);
    let w = values(96, 31);
    let ft = add(&w, &low_rank(8, 12, 2, 32));
    let (base, fine) = (tmp.path().join("base"), tmp.path().join("ft"));
    write_model(&base, &[(t.clone(), w.clone())]);
    write_model(&fine, &[(t, ft.clone())]);
    for dir in [&base, &fine] {
        std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    }
    let adapter = tmp.path().join("adapter");
    ok(&extract(&base, &fine, &adapter, &["--rank", "2"]));
    let config = json(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap());
    assert_eq!(config["fan_in_fan_out"], true);
    let (a, bm, r) = factors(&adapter, module(C));
    assert_eq!((r, a.len(), bm.len()), (2, 2 * 8, 12 * 2)); // A [2, in 8], B [out 12, 2]
    let ba = matmul(&bm, &a, 12, r, 8); // [out, in]
    let scale = ft.iter().fold(0f32, |s, x| s.max(x.abs())) as f64;
    for i in 0..8 {
        for o in 0..12 {
            let got = w[i * 12 + o] as f64 + ba[o * 8 + i];
            let want = ft[i * 12 + o] as f64;
            assert!(
                (got - want).abs() < 1e-5 * scale,
                "[{i}, {o}]: {got} vs {want}"
            );
        }
    }
    let out = tmp.path().join("applied");
    ok(&apply(&base, &adapter, &out));
    let applied = Model::open_path(&out).unwrap().read_f32_vec(C).unwrap();
    for (g, want) in applied.iter().zip(&ft) {
        assert!(((g - want).abs() as f64) < 1e-5 * scale, "{g} vs {want}");
    }
}
