//! `tensormerge lora apply` and LoRA references in merge configs, end to end
//! through the built binary, on models and PEFT adapter directories written
//! by the test; expected weights computed here in f64 from the formula
//! `W + s · B @ A` (LoRA, arXiv:2106.09685; rsLoRA s = alpha / sqrt(r),
//! arXiv:2312.03732).

mod common;

use std::path::{Path, PathBuf};

use common::{run, text, values, write_model as write};
use tensormerge_core::{DType, TensorInfo};
use tensormerge_io::Model;

const Q: &str = "model.layers.0.self_attn.q_proj.weight";
const UP: &str = "model.layers.0.mlp.up_proj.weight";
const C: &str = "h.0.attn.c_attn.weight"; // Conv1D, stored [in, out]

/// A base model: q [8, 6] (bf16), up [10, 6] (f32), a Conv1D weight [6, 4],
/// a norm, and integer ids.
fn base(root: &Path) -> PathBuf {
    let dir = root.join("base");
    write(
        &dir,
        &[
            (TensorInfo::new(Q, vec![8, 6], DType::BF16), values(48, 1)),
            (TensorInfo::new(UP, vec![10, 6], DType::F32), values(60, 2)),
            (TensorInfo::new(C, vec![6, 4], DType::F32), values(24, 3)),
            (
                TensorInfo::new("model.norm.weight", vec![6], DType::F32),
                values(6, 4),
            ),
            (
                TensorInfo::new("position_ids", vec![3], DType::I64),
                vec![0.0, 1.0, 2.0],
            ),
        ],
    );
    std::fs::write(dir.join("config.json"), "{\"torch_dtype\": \"bfloat16\"}\n").unwrap();
    dir
}

/// A LoRA module: its name, A `[r, in]` and B `[out, r]`.
struct Module {
    name: &'static str,
    r: usize,
    fan_in: usize,
    fan_out: usize,
    seed: u32,
}

impl Module {
    fn a(&self) -> Vec<f32> {
        values(self.r * self.fan_in, self.seed)
    }
    fn b(&self) -> Vec<f32> {
        values(self.fan_out * self.r, self.seed + 100)
    }
}

/// Writes a PEFT adapter directory: adapter_model.safetensors with
/// `base_model.model.<module>.lora_{A,B}.weight`, and `config_json`.
fn adapter(dir: &Path, modules: &[Module], extra: &[(TensorInfo, Vec<f32>)], config_json: &str) {
    let mut tensors = Vec::new();
    for m in modules {
        tensors.push((
            TensorInfo::new(
                format!("base_model.model.{}.lora_A.weight", m.name),
                vec![m.r, m.fan_in],
                DType::F32,
            ),
            m.a(),
        ));
        tensors.push((
            TensorInfo::new(
                format!("base_model.model.{}.lora_B.weight", m.name),
                vec![m.fan_out, m.r],
                DType::BF16,
            ),
            m.b(),
        ));
    }
    tensors.extend(extra.iter().cloned());
    write(dir, &tensors);
    std::fs::rename(
        dir.join("model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.join("adapter_config.json"), config_json).unwrap();
}

/// `W + s · B @ A` in f64 (`transposed`: `W + s · (B @ A)ᵀ`), with B rounded
/// to bf16 as stored.
fn expected(w: &[f32], m: &Module, s: f64, transposed: bool) -> Vec<f64> {
    let (a, b) = (m.a(), m.b());
    let b: Vec<f32> = b
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    let mut out: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    for o in 0..m.fan_out {
        for i in 0..m.fan_in {
            let d: f64 = (0..m.r)
                .map(|k| b[o * m.r + k] as f64 * a[k * m.fan_in + i] as f64)
                .sum();
            let at = if transposed {
                i * m.fan_out + o
            } else {
                o * m.fan_in + i
            };
            out[at] += s * d;
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

const QM: Module = Module {
    name: "model.layers.0.self_attn.q_proj",
    r: 2,
    fan_in: 6,
    fan_out: 8,
    seed: 11,
};
const UPM: Module = Module {
    name: "model.layers.0.mlp.up_proj",
    r: 3,
    fan_in: 6,
    fan_out: 10,
    seed: 12,
};

#[test]
fn apply_matches_the_formula_with_alpha_pattern_and_rslora() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = base(root);
    let ad = root.join("adapter");
    let new_norm = values(6, 99);
    adapter(
        &ad,
        &[QM, UPM],
        // modules_to_save-style full tensor: replaces the base's.
        &[(
            TensorInfo::new("base_model.model.model.norm.weight", vec![6], DType::F32),
            new_norm.clone(),
        )],
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "up_proj"],
            "rank_pattern": {"up_proj": 3}, "alpha_pattern": {"up_proj": 9}}"#,
    );
    let out = root.join("out");
    let o = run(&[
        "lora",
        "apply",
        base.to_str().unwrap(),
        ad.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("5 tensors"), "{}", text(&o.stdout));
    let b = Model::open_path(&base).unwrap();
    let m = Model::open_path(&out).unwrap();
    // q: bf16 output, s = 4 / 2.
    assert_eq!(m.tensor_info(Q).unwrap().dtype, DType::BF16);
    let want = expected(&b.read_f32_vec(Q).unwrap(), &QM, 2.0, false);
    assert_close(&m.read_f32_vec(Q).unwrap(), &want, 1.0 / 128.0, "q");
    // up: f32, alpha from alpha_pattern, r from the tensors: s = 9 / 3.
    let want = expected(&b.read_f32_vec(UP).unwrap(), &UPM, 3.0, false);
    assert_close(&m.read_f32_vec(UP).unwrap(), &want, 1e-6, "up");
    // Untouched tensors and support files come through unchanged.
    assert_eq!(m.tensor_bytes(C).unwrap(), b.tensor_bytes(C).unwrap());
    assert_eq!(
        m.tensor_bytes("position_ids").unwrap(),
        b.tensor_bytes("position_ids").unwrap()
    );
    assert_eq!(m.read_f32_vec("model.norm.weight").unwrap(), new_norm);
    assert!(out.join("config.json").exists());

    // rsLoRA: s = alpha / sqrt(r).
    let ad2 = root.join("rs");
    adapter(
        &ad2,
        &[UPM],
        &[],
        r#"{"r": 3, "lora_alpha": 6, "use_rslora": true}"#,
    );
    let out2 = root.join("out2");
    let o = run(&[
        "lora",
        "apply",
        base.to_str().unwrap(),
        ad2.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let want = expected(&b.read_f32_vec(UP).unwrap(), &UPM, 6.0 / 3f64.sqrt(), false);
    assert_close(
        &Model::open_path(&out2).unwrap().read_f32_vec(UP).unwrap(),
        &want,
        1e-6,
        "rslora up",
    );
}

#[test]
fn fan_in_fan_out_transposes_and_chunked_reads_match_whole_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = base(root);
    let cm = Module {
        name: "h.0.attn.c_attn",
        r: 2,
        fan_in: 6,
        fan_out: 4,
        seed: 21,
    };
    let ad = root.join("adapter");
    adapter(
        &ad,
        &[cm],
        &[],
        r#"{"r": 2, "lora_alpha": 1, "fan_in_fan_out": true}"#,
    );
    let reference = format!("{}+{}", base.display(), ad.display());
    let m = Model::open(&reference).unwrap();
    let b = Model::open_path(&base).unwrap();
    let cm = Module {
        name: "h.0.attn.c_attn",
        r: 2,
        fan_in: 6,
        fan_out: 4,
        seed: 21,
    };
    let whole = m.read_f32_vec(C).unwrap();
    let want = expected(&b.read_f32_vec(C).unwrap(), &cm, 0.5, true);
    assert_close(&whole, &want, 1e-6, "c_attn");
    // Any split into ranges (crossing rows) gives the same bits.
    for cut in 1..24 {
        let mut parts = [0f32; 24];
        let mut scratch = Vec::new();
        m.read_f32_range_copied(C, 0..cut, &mut parts[..cut], &mut scratch)
            .unwrap();
        m.read_f32_range(C, cut..24, &mut parts[cut..]).unwrap();
        assert_eq!(
            parts.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "cut at {cut}"
        );
    }
    assert!(m.protected_paths().contains(&ad));
}

#[test]
fn merge_config_with_plus_syntax_and_lora_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = base(root);
    let ad = root.join("adapter");
    adapter(&ad, &[QM], &[], r#"{"r": 2, "lora_alpha": 2}"#);
    let other = root.join("other");
    write(
        &other,
        &[
            (TensorInfo::new(Q, vec![8, 6], DType::F32), values(48, 7)),
            (TensorInfo::new(UP, vec![10, 6], DType::F32), values(60, 8)),
            (TensorInfo::new(C, vec![6, 4], DType::F32), values(24, 9)),
            (
                TensorInfo::new("model.norm.weight", vec![6], DType::F32),
                values(6, 10),
            ),
            (
                TensorInfo::new("position_ids", vec![3], DType::I64),
                vec![0.0, 1.0, 2.0],
            ),
        ],
    );
    let b = Model::open_path(&base).unwrap();
    let o_model = Model::open_path(&other).unwrap();
    let adapted_q = expected(&b.read_f32_vec(Q).unwrap(), &QM, 1.0, false);
    for (i, entry) in [
        format!("model: {}+{}", base.display(), ad.display()),
        format!("model: {}\n    lora: {}", base.display(), ad.display()),
    ]
    .iter()
    .enumerate()
    {
        let cfg = root.join(format!("c{i}.yml"));
        std::fs::write(
            &cfg,
            format!(
                "merge_method: linear\nmodels:\n  - {entry}\n    parameters: {{weight: 0.25}}\n  - model: {}\n    parameters: {{weight: 0.75}}\ndtype: float32\n",
                other.display()
            ),
        )
        .unwrap();
        let out = root.join(format!("merged{i}"));
        let o = run(&[
            "merge",
            cfg.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--no-progress",
        ]);
        assert!(o.status.success(), "{entry}: {}", text(&o.stderr));
        let m = Model::open_path(&out).unwrap();
        let oq = o_model.read_f32_vec(Q).unwrap();
        // linear normalizes by the weight sum (1.0 here).
        let want: Vec<f64> = adapted_q
            .iter()
            .zip(&oq)
            .map(|(a, o)| 0.25 * a + 0.75 * *o as f64)
            .collect();
        assert_close(&m.read_f32_vec(Q).unwrap(), &want, 1e-5, "merged q");
        let bu = b.read_f32_vec(UP).unwrap();
        let ou = o_model.read_f32_vec(UP).unwrap();
        let want: Vec<f64> = bu
            .iter()
            .zip(&ou)
            .map(|(a, o)| 0.25 * *a as f64 + 0.75 * *o as f64)
            .collect();
        assert_close(&m.read_f32_vec(UP).unwrap(), &want, 1e-5, "merged up");
    }
    // Both at once is refused, naming the key.
    let cfg = root.join("both.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {b}+{a}\n    lora: {a}\n",
            b = base.display(),
            a = ad.display()
        ),
    )
    .unwrap();
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        root.join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("models[0].lora"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn bad_adapters_are_named_with_exit_code_1() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = base(root);
    let apply = |ad: &Path| {
        let out = root.join("out");
        let o = run(&[
            "lora",
            "apply",
            base.to_str().unwrap(),
            ad.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(!out.exists(), "nothing may be written");
        (o.status.code(), text(&o.stderr))
    };
    // A module the base does not have.
    let ad = root.join("missing-module");
    let k = Module {
        name: "model.layers.0.self_attn.k_proj",
        r: 2,
        fan_in: 6,
        fan_out: 8,
        seed: 5,
    };
    adapter(&ad, &[k], &[], r#"{"r": 2, "lora_alpha": 2}"#);
    let (code, err) = apply(&ad);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not found in the base model")
            && err.contains("model.layers.0.self_attn.k_proj.weight"),
        "{err}"
    );
    // Shapes that do not fit.
    let ad = root.join("bad-shape");
    let wrong = Module {
        name: "model.layers.0.self_attn.q_proj",
        r: 2,
        fan_in: 5,
        fan_out: 8,
        seed: 5,
    };
    adapter(&ad, &[wrong], &[], r#"{"r": 2, "lora_alpha": 2}"#);
    let (code, err) = apply(&ad);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("shape mismatch") && err.contains("q_proj"),
        "{err}"
    );
    // Missing files.
    let ad = root.join("no-config");
    adapter(&ad, &[QM], &[], "{}");
    std::fs::remove_file(ad.join("adapter_config.json")).unwrap();
    let (code, err) = apply(&ad);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("adapter_config.json"), "{err}");
    let ad = root.join("no-weights");
    adapter(&ad, &[QM], &[], r#"{"r": 2}"#);
    std::fs::remove_file(ad.join("adapter_model.safetensors")).unwrap();
    let (code, err) = apply(&ad);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    // DoRA is refused by name.
    let ad = root.join("dora");
    adapter(&ad, &[QM], &[], r#"{"r": 2, "use_dora": true}"#);
    let (code, err) = apply(&ad);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("use_dora"), "{err}");
}
