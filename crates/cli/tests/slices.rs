//! End-to-end runs of the built binary on `slices` configs (frankenmerges and
//! per-slice merges) and on the model card, with tiny models written here.
//! Every expected value is computed in the test from the source tensors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{Model, ModelWriter, WriterOptions};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensormerge"))
        .env_remove("NO_COLOR")
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .expect("run tensormerge")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const LAYER_TENSORS: [(&str, [usize; 2]); 2] = [
    ("self_attn.q_proj.weight", [4, 4]),
    ("mlp.up_proj.weight", [6, 4]),
];

/// A small Llama-named decoder with `layers` layers: embeddings, the layers
/// (two float tensors and one integer tensor each), final norm, head and a
/// non-float tensor outside the layers.
fn layout(layers: usize, dtype: DType) -> Vec<TensorInfo> {
    let mut v = vec![TensorInfo::new(
        "model.embed_tokens.weight",
        vec![10, 4],
        dtype,
    )];
    for l in 0..layers {
        for (n, s) in LAYER_TENSORS {
            v.push(TensorInfo::new(
                format!("model.layers.{l}.{n}"),
                s.to_vec(),
                dtype,
            ));
        }
        v.push(TensorInfo::new(
            format!("model.layers.{l}.ids"),
            vec![3],
            DType::I64,
        ));
    }
    v.push(TensorInfo::new("model.norm.weight", vec![4], dtype));
    v.push(TensorInfo::new("lm_head.weight", vec![10, 4], dtype));
    v.push(TensorInfo::new("position_ids", vec![1, 5], DType::I64));
    v
}

/// Values that differ by model (`seed`), tensor and element.
fn values(seed: u32, name: &str, n: usize) -> Vec<f32> {
    let h = name.bytes().fold(seed.wrapping_mul(0x9E37_79B9), |h, b| {
        h.rotate_left(5) ^ b as u32
    });
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761) ^ h;
            (x % 4001) as f32 / 1000.0 - 2.0
        })
        .collect()
}

fn write_model(dir: &Path, layers: usize, dtype: DType, seed: u32, config: &str) -> PathBuf {
    let tensors = layout(layers, dtype);
    let mut w = ModelWriter::create(dir, tensors.clone(), WriterOptions::default()).unwrap();
    for t in &tensors {
        if t.dtype.is_float() {
            let v = values(seed, &t.name, t.numel());
            w.write(&t.name, &convert::encode_f32_vec(t.dtype, &v).unwrap())
                .unwrap();
        } else {
            let bytes: Vec<u8> = (0..t.numel() as i64)
                .flat_map(|i| (i * 3 + 1).to_le_bytes())
                .collect();
            w.write(&t.name, &bytes).unwrap();
        }
    }
    w.finish().unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("README.md"), "# the template's own card\n").unwrap();
    dir.to_path_buf()
}

struct Fx {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Fx {
    fn new() -> Fx {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let llama =
            |n: usize| format!("{{\"model_type\": \"llama\", \"num_hidden_layers\": {n}}}\n");
        write_model(&root.join("a"), 4, DType::BF16, 1, &llama(4));
        write_model(&root.join("b"), 5, DType::BF16, 2, &llama(5));
        write_model(&root.join("base"), 5, DType::F32, 3, &llama(5));
        write_model(&root.join("c"), 5, DType::F32, 4, &llama(5));
        Fx { _tmp: tmp, root }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    fn config(&self, name: &str, body: &str) -> String {
        let text = body
            .replace("$A", &self.path("a"))
            .replace("$BASE", &self.path("base"))
            .replace("$B", &self.path("b"))
            .replace("$C", &self.path("c"));
        let p = self.root.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn model(&self, name: &str) -> Model {
        Model::open_path(&self.root.join(name)).unwrap()
    }
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn layer_count(dir: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    v["num_hidden_layers"].as_u64().unwrap()
}

// ------------------------------------------------------------ frankenmerge

const FRANKEN: &str = "merge_method: passthrough\nslices:\n  - sources:\n      - model: $A\n        layer_range: [0, 3]\n  - sources:\n      - model: $B\n        layer_range: [1, 5]\n  - sources:\n      - model: $A\n        layer_range: [2, 3]\n";

#[test]
fn frankenmerge_tensors_are_their_source_tensors() {
    let f = Fx::new();
    let cfg = f.config("franken.yml", FRANKEN);
    let out1 = f.root.join("out1");
    ok(&run(&[
        "merge",
        &cfg,
        "-o",
        out1.to_str().unwrap(),
        "-j",
        "1",
        "-q",
    ]));
    let out3 = f.root.join("out3");
    ok(&run(&[
        "merge",
        &cfg,
        "-o",
        out3.to_str().unwrap(),
        "-j",
        "3",
        "-q",
    ]));

    // Output layer -> (model, source layer): A 0,1,2; B 1,2,3,4; A 2 again.
    let map: Vec<(&str, usize)> = vec![
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 2),
        ("b", 3),
        ("b", 4),
        ("a", 2),
    ];
    let (a, b) = (f.model("a"), f.model("b"));
    let src = |m: &str| if m == "a" { &a } else { &b };
    let got = Model::open_path(&out1).unwrap();
    // Every output tensor, one by one, against its source tensor.
    let mut expected = vec![(
        "model.embed_tokens.weight".to_string(),
        &a,
        "model.embed_tokens.weight".to_string(),
    )];
    for (k, (m, l)) in map.iter().enumerate() {
        for n in ["self_attn.q_proj.weight", "mlp.up_proj.weight", "ids"] {
            expected.push((
                format!("model.layers.{k}.{n}"),
                src(m),
                format!("model.layers.{l}.{n}"),
            ));
        }
    }
    // Final norm, head and other non-layer tensors: the last slice's model (A).
    for n in ["model.norm.weight", "lm_head.weight", "position_ids"] {
        expected.push((n.to_string(), &a, n.to_string()));
    }
    assert_eq!(got.layout().len(), expected.len());
    for (out_name, model, src_name) in &expected {
        let want = model.tensor_bytes(src_name).unwrap();
        let have = got.tensor_bytes(out_name).unwrap();
        assert!(have[..] == want[..], "{out_name} is not {src_name}");
        assert_eq!(
            got.tensor_info(out_name).unwrap().dtype,
            model.tensor_info(src_name).unwrap().dtype
        );
    }
    // The repeated layer is written twice (two tensors with their own bytes).
    assert_eq!(
        got.tensor_bytes("model.layers.2.mlp.up_proj.weight")
            .unwrap(),
        got.tensor_bytes("model.layers.7.mlp.up_proj.weight")
            .unwrap()
    );
    assert_eq!(layer_count(&out1), 8);
    // Deterministic on any thread count: identical files.
    assert_eq!(
        std::fs::read(out1.join("model.safetensors")).unwrap(),
        std::fs::read(out3.join("model.safetensors")).unwrap()
    );
}

#[test]
fn the_last_slice_supplies_norm_and_head_and_other_layer_count_keys_are_set() {
    let f = Fx::new();
    // GPT-2's `n_layer`, with the last slice from B: norm and head from B.
    std::fs::write(
        f.root.join("b/config.json"),
        "{\"n_layer\": 5, \"n_embd\": 4}\n",
    )
    .unwrap();
    let cfg = f.config(
        "gpt.yml",
        "merge_method: passthrough\nslices:\n  - sources: [{model: $B, layer_range: [0, 2]}]\n  - sources: [{model: $A, layer_range: [3, 4]}]\n  - sources: [{model: $B, layer_range: [4, 5]}]\n",
    );
    let out = f.root.join("out");
    ok(&run(&["merge", &cfg, "-o", out.to_str().unwrap(), "-q"]));
    let (a, b, got) = (f.model("a"), f.model("b"), Model::open_path(&out).unwrap());
    let same = |o: &str, m: &Model, s: &str| {
        assert!(
            got.tensor_bytes(o).unwrap()[..] == m.tensor_bytes(s).unwrap()[..],
            "{o}"
        );
    };
    same("model.embed_tokens.weight", &b, "model.embed_tokens.weight");
    same(
        "model.layers.2.mlp.up_proj.weight",
        &a,
        "model.layers.3.mlp.up_proj.weight",
    );
    same(
        "model.layers.3.mlp.up_proj.weight",
        &b,
        "model.layers.4.mlp.up_proj.weight",
    );
    same("model.norm.weight", &b, "model.norm.weight");
    same("lm_head.weight", &b, "lm_head.weight");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(v["n_layer"], 4);
    assert_eq!(v["n_embd"], 4);
}

#[test]
fn dry_run_shows_the_slice_plan_and_writes_nothing() {
    let f = Fx::new();
    let cfg = f.config("franken.yml", FRANKEN);
    let out = f.root.join("out");
    let o = run(&["merge", &cfg, "-o", out.to_str().unwrap(), "--dry-run"]);
    ok(&o);
    let s = text(&o.stdout);
    let (a, b) = (f.path("a"), f.path("b"));
    assert!(s.contains("slice plan (8 output layers):"), "{s}");
    assert!(
        s.contains(&format!("  layer 0 <- slice 0: {a} layer 0\n")),
        "{s}"
    );
    assert!(
        s.contains(&format!("  layer 3 <- slice 1: {b} layer 1\n")),
        "{s}"
    );
    assert!(
        s.contains(&format!("  layer 7 <- slice 2: {a} layer 2\n")),
        "{s}"
    );
    assert!(
        s.contains("embeddings <- slice 0; final norm and head <- slice 2"),
        "{s}"
    );
    assert!(
        s.contains("model.layers.7.mlp.up_proj.weight [6, 4] BF16 merge"),
        "{s}"
    );
    assert!(!out.exists());
}

// ------------------------------------------------- merges within slices

fn f32s(m: &Model, name: &str) -> Vec<f64> {
    m.read_f32_vec(name)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn task_arithmetic_per_slice_matches_the_per_layer_merge_with_a_gradient() {
    let f = Fx::new();
    // Slice 0: base layers 0-2 with C layers 2-4 (weight gradient over the
    // slice, 0 -> 1); slice 1: base layers 4-5 with C layers 0-1 (weight 0.5
    // from the slice). lambda 0.8 at the top level.
    let cfg = f.config(
        "ta.yml",
        "merge_method: task_arithmetic\nbase_model: $BASE\nslices:\n  - sources:\n      - model: $BASE\n        layer_range: [0, 3]\n      - model: $C\n        layer_range: [2, 5]\n        parameters:\n          weight: [0.0, 1.0]\n  - sources:\n      - model: $BASE\n        layer_range: [4, 5]\n      - model: $C\n        layer_range: [0, 1]\n    parameters:\n      weight: 0.5\nparameters:\n  lambda: 0.8\n",
    );
    let out = f.root.join("out");
    ok(&run(&[
        "merge",
        &cfg,
        "-o",
        out.to_str().unwrap(),
        "-j",
        "2",
        "-q",
    ]));
    let (base, c, got) = (
        f.model("base"),
        f.model("c"),
        Model::open_path(&out).unwrap(),
    );
    // (output layer, base layer, c layer, weight): t = i / (n - 1) in slice 0.
    let layers = [
        (0, 0, 2, 0.0),
        (1, 1, 3, 0.5),
        (2, 2, 4, 1.0),
        (3, 4, 0, 0.5),
    ];
    for (k, lb, lc, w) in layers {
        for (n, _) in LAYER_TENSORS {
            let b = f32s(&base, &format!("model.layers.{lb}.{n}"));
            let x = f32s(&c, &format!("model.layers.{lc}.{n}"));
            let want: Vec<f64> = b
                .iter()
                .zip(&x)
                .map(|(b, x)| b + 0.8 * w * (x - b))
                .collect();
            let name = format!("model.layers.{k}.{n}");
            close(&got.read_f32_vec(&name).unwrap(), &want, &name);
        }
    }
    // Embeddings: slice 0's sources with t = 0 (weight 0); norm and head:
    // slice 1's sources (weight 0.5).
    for (n, w) in [
        ("model.embed_tokens.weight", 0.0),
        ("model.norm.weight", 0.5),
        ("lm_head.weight", 0.5),
    ] {
        let b = f32s(&base, n);
        let x = f32s(&c, n);
        let want: Vec<f64> = b
            .iter()
            .zip(&x)
            .map(|(b, x)| b + 0.8 * w * (x - b))
            .collect();
        close(&got.read_f32_vec(n).unwrap(), &want, n);
    }
    assert_eq!(layer_count(&out), 4);
}

#[test]
fn parameter_precedence_source_slice_models_top() {
    let f = Fx::new();
    // linear: out = Σ w_i x_i / Σ w_i (normalize, the default), else Σ w_i x_i.
    // Top level: weight 0.25.
    // Slice 0: slice weight 3, source B's own weight 1 -> A 3, B 1.
    // Slice 1: A's own weight 2, B the top level's 0.25; the slice's global
    // `normalize: false` wins over the default.
    let cfg = f.config(
        "prec.yml",
        "merge_method: linear\nslices:\n  - sources:\n      - model: $A\n        layer_range: [0, 2]\n      - model: $B\n        layer_range: [0, 2]\n        parameters: {weight: 1.0}\n    parameters: {weight: 3.0}\n  - sources:\n      - model: $A\n        layer_range: [2, 3]\n        parameters: {weight: 2.0}\n      - model: $B\n        layer_range: [4, 5]\n    parameters: {normalize: false}\nparameters:\n  weight: 0.25\ndtype: float32\n",
    );
    let out = f.root.join("out");
    ok(&run(&["merge", &cfg, "-o", out.to_str().unwrap(), "-q"]));
    let (a, b, got) = (f.model("a"), f.model("b"), Model::open_path(&out).unwrap());
    let lin = |wa: f64, xa: &[f64], wb: f64, xb: &[f64], norm: bool| -> Vec<f64> {
        let d = if norm { wa + wb } else { 1.0 };
        xa.iter()
            .zip(xb)
            .map(|(x, y)| (wa * x + wb * y) / d)
            .collect()
    };
    for (k, la, lb, wa, wb, norm) in [
        (0, 0, 0, 3.0, 1.0, true),
        (1, 1, 1, 3.0, 1.0, true),
        (2, 2, 4, 2.0, 0.25, false),
    ] {
        for (n, _) in LAYER_TENSORS {
            let xa = f32s(&a, &format!("model.layers.{la}.{n}"));
            let xb = f32s(&b, &format!("model.layers.{lb}.{n}"));
            let name = format!("model.layers.{k}.{n}");
            close(
                &got.read_f32_vec(&name).unwrap(),
                &lin(wa, &xa, wb, &xb, norm),
                &name,
            );
        }
    }
    // Non-layer tensors take the parameters of the slice they come from.
    let n = "model.embed_tokens.weight";
    close(
        &got.read_f32_vec(n).unwrap(),
        &lin(3.0, &f32s(&a, n), 1.0, &f32s(&b, n), true),
        n,
    );
    let n = "lm_head.weight";
    close(
        &got.read_f32_vec(n).unwrap(),
        &lin(2.0, &f32s(&a, n), 0.25, &f32s(&b, n), false),
        n,
    );

    // The `models` level: a model's own parameters win over the top level.
    let cfg = f.config(
        "prec_models.yml",
        "merge_method: linear\nmodels:\n  - model: $B\n    parameters: {weight: 3.0}\n  - model: $C\nparameters:\n  weight: 0.25\ndtype: float32\n",
    );
    let out = f.root.join("out_models");
    ok(&run(&["merge", &cfg, "-o", out.to_str().unwrap(), "-q"]));
    let (c, got) = (f.model("c"), Model::open_path(&out).unwrap());
    let n = "model.layers.3.mlp.up_proj.weight";
    close(
        &got.read_f32_vec(n).unwrap(),
        &lin(3.0, &f32s(&b, n), 0.25, &f32s(&c, n), true),
        n,
    );
}

// ------------------------------------------------------------ bad slices

#[test]
fn malformed_slices_name_the_key_and_exit_1() {
    let f = Fx::new();
    let head = "merge_method: passthrough\n";
    let cases: &[(&str, String, &[&str])] = &[
        (
            "both",
            format!("{head}models: [{{model: $A}}]\nslices:\n  - sources: [{{model: $A, layer_range: [0, 1]}}]\n"),
            &["`slices`", "`models`", "mutually exclusive"],
        ),
        (
            "out_of_bounds",
            format!("{head}slices:\n  - sources: [{{model: $A, layer_range: [0, 1]}}]\n  - sources: [{{model: $A, layer_range: [2, 9]}}]\n"),
            &["`slices[1].sources[0].layer_range`", "out of bounds", "has 4 layer(s)"],
        ),
        (
            "reversed",
            format!("{head}slices:\n  - sources: [{{model: $A, layer_range: [3, 1]}}]\n"),
            &["`slices[0].sources[0].layer_range`", "after the end"],
        ),
        (
            "empty_range",
            format!("{head}slices:\n  - sources: [{{model: $A, layer_range: [2, 2]}}]\n"),
            &["`slices[0].sources[0].layer_range`", "covers no layers"],
        ),
        (
            "negative",
            format!("{head}slices:\n  - sources: [{{model: $A, layer_range: [-1, 2]}}]\n"),
            &["`slices[0].sources[0].layer_range`", "negative"],
        ),
        (
            "not_a_pair",
            format!("{head}slices:\n  - sources: [{{model: $A, layer_range: [0, 1, 2]}}]\n"),
            &["`slices[0].sources[0].layer_range`", "two layer indices"],
        ),
        (
            "unequal",
            "merge_method: linear\nslices:\n  - sources:\n      - model: $A\n        layer_range: [0, 3]\n      - model: $B\n        layer_range: [0, 2]\n".to_string(),
            &["`slices[0].sources[1].layer_range`", "covers 2 layer(s) but slices[0].sources[0] covers 3"],
        ),
        (
            "unknown_source_key",
            format!("{head}slices:\n  - sources: [{{model: $A, layer_rang: [0, 2]}}]\n"),
            &["unknown key `slices[0].sources[0].layer_rang`", "did you mean `layer_range`"],
        ),
        (
            "unknown_slice_key",
            format!("{head}slices:\n  - source: [{{model: $A, layer_range: [0, 2]}}]\n"),
            &["unknown key `slices[0].source`", "did you mean `sources`"],
        ),
        (
            "missing_range",
            format!("{head}slices:\n  - sources: [{{model: $A}}]\n"),
            &["missing required key `slices[0].sources[0].layer_range`"],
        ),
        (
            "no_sources",
            format!("{head}slices:\n  - parameters: {{scale: 1.0}}\n"),
            &["missing required key `slices[0].sources`"],
        ),
        (
            "passthrough_two",
            format!("{head}slices:\n  - sources:\n      - {{model: $A, layer_range: [0, 2]}}\n      - {{model: $B, layer_range: [0, 2]}}\n"),
            &["`slices[0].sources`", "exactly 1"],
        ),
        (
            "no_base_in_slice",
            "merge_method: task_arithmetic\nbase_model: $BASE\nslices:\n  - sources: [{model: $C, layer_range: [0, 2]}]\n".to_string(),
            &["`slices[0].sources`", "not among the sources"],
        ),
        (
            "global_at_source",
            "merge_method: task_arithmetic\nbase_model: $BASE\nslices:\n  - sources:\n      - {model: $BASE, layer_range: [0, 2]}\n      - {model: $C, layer_range: [0, 2], parameters: {lambda: 2}}\n".to_string(),
            &["`slices[0].sources[1].parameters.lambda`", "global parameter"],
        ),
        (
            "whole_model_pass",
            "merge_method: ties\nbase_model: $BASE\nslices:\n  - sources:\n      - {model: $BASE, layer_range: [0, 2]}\n      - {model: $C, layer_range: [0, 2]}\ntrim_scope: model\n".to_string(),
            &["whole-model", "trim_scope: tensor"],
        ),
    ];
    for (name, body, needles) in cases {
        let cfg = f.config(&format!("{name}.yml"), body);
        let out = f.root.join(format!("out_{name}"));
        let o = run(&["merge", &cfg, "-o", out.to_str().unwrap()]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{name}: `{n}` not in\n{err}");
        }
        assert!(!out.exists(), "{name}: output written");
    }
}

// -------------------------------------------------------------- model card

#[test]
fn every_merge_gets_a_model_card_unless_no_card() {
    let f = Fx::new();
    let body = "# a comment kept verbatim\nmerge_method: task_arithmetic\nbase_model: $BASE\nmodels:\n  - model: $C\n    parameters: {weight: 0.5}\n  - model: $B\n  - model: $BASE\nparameters: {lambda: 1.0}\n";
    let cfg = f.config("card.yml", body);
    let config_text = std::fs::read_to_string(&cfg).unwrap();
    let out = f.root.join("merged-model");
    ok(&run(&["merge", &cfg, "-o", out.to_str().unwrap(), "-q"]));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with(
            "---\nbase_model: []\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n"
        ),
        "{card}"
    );
    assert!(card.contains("\n# merged-model\n"), "{card}");
    assert!(
        card.contains("This is a merge of pre-trained language models created using tensormerge"),
        "{card}"
    );
    assert!(
        card.contains(&format!(
            "merged using the [task_arithmetic](https://arxiv.org/abs/2212.04089) merge method using {} as a base.",
            f.path("base")
        )),
        "{card}"
    );
    assert!(
        card.contains("[arXiv:2212.04089](https://arxiv.org/abs/2212.04089)"),
        "{card}"
    );
    let models = format!(
        "The following models were included in the merge:\n* {}\n* {}\n\n",
        f.path("c"),
        f.path("b")
    );
    assert!(card.contains(&models), "{card}");
    assert!(
        card.contains(&format!("```yaml\n{config_text}```\n")),
        "{card}"
    );
    assert!(!card.contains("the template's own card"));

    // A frankenmerge's card: passthrough has no paper link; every source listed once.
    let cfg = f.config("franken.yml", FRANKEN);
    let out = f.root.join("franken");
    ok(&run(&["merge", &cfg, "-o", out.to_str().unwrap(), "-q"]));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("merged using the passthrough merge method.\n"),
        "{card}"
    );
    assert!(
        card.contains(&format!("* {}\n* {}\n", f.path("a"), f.path("b"))),
        "{card}"
    );

    let out = f.root.join("no-card");
    ok(&run(&[
        "merge",
        &cfg,
        "-o",
        out.to_str().unwrap(),
        "-q",
        "--no-card",
    ]));
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("README.md").exists());
}

#[test]
fn eval_outputs_get_a_card_with_the_expression_unless_no_card() {
    let f = Fx::new();
    let out = f.root.join("evaluated");
    let (b, c) = (f.path("b"), f.path("c"));
    let (mb, mc) = (format!("x={b}"), format!("y={c}"));
    let args = [
        "eval",
        "x + 0.5 * (y - x)",
        "--model",
        &mb,
        "--model",
        &mc,
        "-q",
        "-o",
    ];
    let mut with_card = args.to_vec();
    with_card.push(out.to_str().unwrap());
    ok(&run(&with_card));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("\n# evaluated\n"), "{card}");
    assert!(
        card.contains(&format!(
            "```sh\ntensormerge eval 'x + 0.5 * (y - x)' --model x={b} --model y={c}\n```\n"
        )),
        "{card}"
    );
    assert!(card.contains(&format!("* {b}\n* {c}\n")), "{card}");
    let out = f.root.join("plain");
    let mut no_card = args.to_vec();
    no_card.extend([out.to_str().unwrap(), "--no-card"]);
    ok(&run(&no_card));
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("README.md").exists());
}
