//! End-to-end merges through the engine on models written by the test,
//! compared with the in-memory `Merge` on `ParamVector`s and with formulas
//! computed here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::RngCore;
use tensormerge_core::{DType, ModelTensorMapper, ParamVector, TensorInfo, convert};
use tensormerge_engine::{EngineError, MergeConfig, NoProgress, RunOptions, plan, run_merge};
use tensormerge_io::{Model, ModelWriter, WriterOptions};
use tensormerge_methods::*;

// ---------------------------------------------------------------- methods

/// out = base + lambda · Σ w_i (x_i − base)
struct WSum;
static WSUM: MethodInfo = MethodInfo {
    name: "engine_test_wsum",
    summary: "weighted task vectors",
    paper: "test",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec::per_model_float("weight", -10.0, 10.0, Default::Float(1.0), "w"),
        ParamSpec::global(
            "lambda",
            ParamKind::Float {
                min: -10.0,
                max: 10.0,
            },
            Default::Float(1.0),
            "l",
        ),
    ],
};
impl MergeMethod for WSum {
    fn info(&self) -> &'static MethodInfo {
        &WSUM
    }
    fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let b = c.base.expect("base");
        let l = c.tensor.global.f32("lambda")?;
        let w: Vec<f32> = c
            .tensor
            .models
            .iter()
            .map(|p| p.f32("weight"))
            .collect::<Result<_, _>>()?;
        for (i, o) in out.iter_mut().enumerate() {
            let mut s = 0f32;
            for (m, wm) in c.models.iter().zip(&w) {
                s += wm * (m[i] - b[i]);
            }
            *o = b[i] + l * s;
        }
        Ok(())
    }
}
register_method!(WSum);

/// out = x0 + u/2³² with u from the tensor's random stream of model 0.
struct Noisy;
static NOISY: MethodInfo = MethodInfo {
    name: "engine_test_noisy",
    summary: "adds reproducible noise",
    paper: "test",
    base: BaseModel::Unused,
    min_models: 1,
    max_models: None,
    params: &[],
};
impl MergeMethod for Noisy {
    fn info(&self) -> &'static MethodInfo {
        &NOISY
    }
    fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let mut rng = c.tensor.rng(0, c.offset);
        for (o, x) in out.iter_mut().zip(c.models[0]) {
            *o = x + rng.next_u32() as f32 / 4_294_967_296.0;
        }
        Ok(())
    }
}
register_method!(Noisy);

/// A per-tensor pass (max |τ|) and a two-sweep whole-model pass (Σ τ², then
/// the element count): out = base + τ · max|τ| / sqrt(Σ τ² / count).
struct Passes;
static PASSES: MethodInfo = MethodInfo {
    name: "engine_test_passes",
    summary: "uses both passes",
    paper: "test",
    base: BaseModel::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[],
};
struct MaxPass(f64);
impl StatsPass for MaxPass {
    fn observe(&mut self, _: usize, c: &Chunk<'_>) -> Result<(), MethodError> {
        let b = c.base.expect("base");
        for (x, y) in c.models[0].iter().zip(b) {
            self.0 = self.0.max(((x - y) as f64).abs());
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Ok(Arc::new(self.0))
    }
}
struct NormPass {
    ss: f64,
    count: f64,
}
impl StatsPass for NormPass {
    fn sweeps(&self) -> usize {
        2
    }
    fn observe(&mut self, sweep: usize, c: &Chunk<'_>) -> Result<(), MethodError> {
        let b = c.base.expect("base");
        if sweep == 0 {
            for (x, y) in c.models[0].iter().zip(b) {
                self.ss += ((x - y) as f64).powi(2);
            }
        } else {
            self.count += c.len() as f64;
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Ok(Arc::new((self.ss / self.count).sqrt()))
    }
}
impl MergeMethod for Passes {
    fn info(&self) -> &'static MethodInfo {
        &PASSES
    }
    fn model_pass(&self, _: &Params, _: &[Params]) -> Option<Box<dyn StatsPass>> {
        Some(Box::new(NormPass {
            ss: 0.0,
            count: 0.0,
        }))
    }
    fn tensor_pass(&self, _: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        Some(Box::new(MaxPass(0.0)))
    }
    fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let tmax = *c
            .tensor_stats
            .expect("tensor pass")
            .downcast_ref::<f64>()
            .expect("f64");
        let rms = *c
            .tensor
            .model_stats
            .expect("model pass")
            .downcast_ref::<f64>()
            .expect("f64");
        let b = c.base.expect("base");
        for ((o, x), y) in out.iter_mut().zip(c.models[0]).zip(b) {
            *o = y + (x - y) * (tmax / rms) as f32;
        }
        Ok(())
    }
}
register_method!(Passes);

/// Only a per-tensor pass (max |τ|), of two sweeps (the second observes
/// nothing): out = base + τ · max|τ|.
struct TensorPassOnly;
static TENSOR_PASS_ONLY: MethodInfo = MethodInfo {
    name: "engine_test_tensor_pass",
    summary: "a two-sweep per-tensor pass",
    paper: "test",
    base: BaseModel::Required,
    min_models: 1,
    max_models: Some(1),
    params: &[],
};
struct TwoSweeps(MaxPass);
impl StatsPass for TwoSweeps {
    fn sweeps(&self) -> usize {
        2
    }
    fn observe(&mut self, sweep: usize, c: &Chunk<'_>) -> Result<(), MethodError> {
        if sweep == 0 {
            self.0.observe(sweep, c)?;
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Box::new(self.0).finish()
    }
}
impl MergeMethod for TensorPassOnly {
    fn info(&self) -> &'static MethodInfo {
        &TENSOR_PASS_ONLY
    }
    fn tensor_pass(&self, _: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        Some(Box::new(TwoSweeps(MaxPass(0.0))))
    }
    fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let tmax = *c
            .tensor_stats
            .expect("tensor pass")
            .downcast_ref::<f64>()
            .expect("f64");
        let b = c.base.expect("base");
        for ((o, x), y) in out.iter_mut().zip(c.models[0]).zip(b) {
            *o = y + (x - y) * tmax as f32;
        }
        Ok(())
    }
}
register_method!(TensorPassOnly);

/// Fisher-weighted average: Σ F_i x_i / Σ F_i (plain mean where a model has
/// no Fisher for the tensor).
struct Fish;
static FISH: MethodInfo = MethodInfo {
    name: "engine_test_fisher",
    summary: "fisher average",
    paper: "test",
    base: BaseModel::Optional,
    min_models: 1,
    max_models: None,
    params: &[ParamSpec {
        name: "fisher",
        scope: Scope::PerModel,
        kind: ParamKind::ModelRef,
        default: Default::Unset,
        doc: "Fisher file",
    }],
};
impl MergeMethod for Fish {
    fn info(&self) -> &'static MethodInfo {
        &FISH
    }
    fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        for (i, o) in out.iter_mut().enumerate() {
            let (mut num, mut den) = (0f32, 0f32);
            for (m, a) in c.models.iter().zip(c.aux) {
                let f = a.map_or(1.0, |a| a[i]);
                num += f * m[i];
                den += f;
            }
            if let (Some(b), Some(f)) = (c.base, c.base_aux) {
                num += f[i] * b[i];
                den += f[i];
            }
            *o = num / den;
        }
        Ok(())
    }
}
register_method!(Fish);

// ---------------------------------------------------------------- models

#[derive(Clone)]
struct T {
    name: &'static str,
    shape: Vec<usize>,
    dtype: DType,
}

fn t(name: &'static str, shape: &[usize], dtype: DType) -> T {
    T {
        name,
        shape: shape.to_vec(),
        dtype,
    }
}

/// A small transformer-like layout: embeddings, 3 layers, a final norm, integer ids.
fn layout(dtype: DType) -> Vec<T> {
    let mut v = vec![t("model.embed_tokens.weight", &[16, 8], dtype)];
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
    ] {
        v.push(t(name, &[8, 8], dtype));
    }
    v.push(t("model.norm.weight", &[8], dtype));
    v.push(t("position_ids", &[1, 16], DType::I64));
    v
}

/// Writes a model whose values are a deterministic function of `seed`.
fn write_model(dir: &Path, tensors: &[T], seed: u32, shard_bytes: u64) -> PathBuf {
    let infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|t| TensorInfo::new(t.name, t.shape.clone(), t.dtype))
        .collect();
    let mut w = ModelWriter::create(
        dir,
        infos.clone(),
        WriterOptions {
            max_shard_bytes: shard_bytes,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    for (k, t) in infos.iter().enumerate() {
        let n = t.numel();
        if t.dtype.is_float() {
            let vals: Vec<f32> = (0..n)
                .map(|i| {
                    let x = (i as u32)
                        .wrapping_mul(2654435761)
                        .wrapping_add(seed.wrapping_mul(40503) + k as u32 * 977);
                    (x % 2001) as f32 / 1000.0 - 1.0
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
    std::fs::write(
        dir.join("config.json"),
        "{\"torch_dtype\": \"float32\", \"num_hidden_layers\": 3}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        format!("{{\"model\": {seed}}}\n"),
    )
    .unwrap();
    dir.to_path_buf()
}

fn opts(threads: usize, max_memory: u64) -> RunOptions {
    RunOptions {
        threads: Some(threads),
        max_memory,
        ..RunOptions::default()
    }
}

fn merge(
    yaml: &str,
    out: &Path,
    o: &RunOptions,
) -> Result<tensormerge_engine::MergeReport, EngineError> {
    let config = MergeConfig::from_yaml_str(yaml).unwrap();
    run_merge(&config, out, o, &NoProgress)
}

fn all_bytes(dir: &Path) -> Vec<(String, DType, Vec<u8>)> {
    let m = Model::open_path(dir).unwrap();
    m.layout()
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype,
                m.tensor_bytes(&t.name).unwrap().into_owned(),
            )
        })
        .collect()
}

fn vector(mapper: &ModelTensorMapper, dir: &Path) -> ParamVector {
    mapper.to_vector(&Model::open_path(dir).unwrap()).unwrap()
}

/// The in-memory result, encoded tensor by tensor to `dtype(tensor)`.
fn expected_bytes(
    mapper: &ModelTensorMapper,
    v: &ParamVector,
    dtype: impl Fn(&TensorInfo) -> DType,
) -> Vec<(String, Vec<u8>)> {
    mapper
        .layout()
        .float_tensors()
        .map(|(t, _)| {
            let vals: Vec<f32> = v.view(&t.name).unwrap().to_vec();
            (
                t.name.clone(),
                convert::encode_f32_vec(dtype(t), &vals).unwrap(),
            )
        })
        .collect()
}

fn check_against(out: &Path, expected: &[(String, Vec<u8>)]) {
    let got = Model::open_path(out).unwrap();
    for (name, bytes) in expected {
        assert_eq!(
            &*got.tensor_bytes(name).unwrap(),
            &bytes[..],
            "tensor {name}"
        );
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn mixed_dtypes_and_shards_match_the_in_memory_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_model(&tmp.path().join("base"), &layout(DType::BF16), 1, 600);
    let a = write_model(&tmp.path().join("a"), &layout(DType::F32), 2, u64::MAX);
    let b = write_model(&tmp.path().join("b"), &layout(DType::F16), 3, 1000);
    let yaml = format!(
        "merge_method: engine_test_wsum\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.7}}\n  - model: {}\nparameters:\n  weight: -0.4\n  lambda: 0.5\n",
        base.display(),
        a.display(),
        b.display()
    );
    let out = tmp.path().join("out");
    let report = merge(
        &yaml,
        &out,
        &RunOptions {
            out_shard_bytes: 700,
            ..opts(2, 1 << 20)
        },
    )
    .unwrap();
    assert!(report.shards > 1);
    assert_eq!(report.tensors_copied, 1);
    assert_eq!(report.tensors_merged, 8);

    let base_model = Model::open_path(&base).unwrap();
    let mapper = ModelTensorMapper::for_model(&base_model);
    let (vb, va, vbb) = (
        vector(&mapper, &base),
        vector(&mapper, &a),
        vector(&mapper, &b),
    );
    let m = Merge::new(
        registry().get("engine_test_wsum").unwrap(),
        vec![("lambda", 0.5.into())],
        vec![
            vec![("weight", 0.7.into())],
            vec![("weight", (-0.4).into())],
        ],
    )
    .unwrap();
    let v = m.run(Some(&vb), &[&va, &vbb]).unwrap();
    // Without dtype/out_dtype the output keeps the base's dtype.
    check_against(&out, &expected_bytes(&mapper, &v, |t| t.dtype));
    // And the arithmetic is the formula, computed independently.
    let got = Model::open_path(&out).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let g = got.read_f32_vec(name).unwrap();
    let (xb, xa, xbb) = (
        base_model.read_f32_vec(name).unwrap(),
        Model::open_path(&a).unwrap().read_f32_vec(name).unwrap(),
        Model::open_path(&b).unwrap().read_f32_vec(name).unwrap(),
    );
    for i in 0..g.len() {
        let f = xb[i] as f64
            + 0.5 * (0.7 * (xa[i] as f64 - xb[i] as f64) - 0.4 * (xbb[i] as f64 - xb[i] as f64));
        assert!(
            (g[i] as f64 - f).abs() <= 0.01 * f.abs().max(0.05),
            "{i}: {} vs {f}",
            g[i]
        );
    }
    // Non-float tensors are copied; config and tokenizer come from the base.
    assert_eq!(
        got.tensor_bytes("position_ids").unwrap(),
        base_model.tensor_bytes("position_ids").unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        "{\"model\": 1}\n"
    );
    assert!(
        std::fs::read_to_string(out.join("config.json"))
            .unwrap()
            .contains("float32")
    );

    // `dtype` sets the output dtype of float tensors; `out_dtype` wins over it.
    let out2 = tmp.path().join("out2");
    merge(&format!("{yaml}dtype: float32\n"), &out2, &opts(1, 1 << 20)).unwrap();
    check_against(&out2, &expected_bytes(&mapper, &v, |_| DType::F32));
    assert!(
        std::fs::read_to_string(out2.join("config.json"))
            .unwrap()
            .contains("\"float32\"")
    );
    let out3 = tmp.path().join("out3");
    merge(
        &format!("{yaml}dtype: float32\nout_dtype: float16\n"),
        &out3,
        &opts(3, 1 << 20),
    )
    .unwrap();
    check_against(&out3, &expected_bytes(&mapper, &v, |_| DType::F16));
    assert!(
        std::fs::read_to_string(out3.join("config.json"))
            .unwrap()
            .contains("\"float16\"")
    );
    assert_eq!(
        Model::open_path(&out3)
            .unwrap()
            .tensor_info("position_ids")
            .unwrap()
            .dtype,
        DType::I64
    );
}

#[test]
fn results_do_not_depend_on_threads_or_memory_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let big = vec![
        t("big.0.weight", &[100, 123], DType::F32),
        t("small.weight", &[7], DType::BF16),
        t("big.1.weight", &[50, 99], DType::F16),
    ];
    let base = write_model(&tmp.path().join("base"), &big, 10, u64::MAX);
    let a = write_model(&tmp.path().join("a"), &big, 11, 30_000);
    let base_model = Model::open_path(&base).unwrap();
    let mapper = ModelTensorMapper::for_model(&base_model);
    for method in ["engine_test_passes", "engine_test_noisy"] {
        let yaml = format!(
            "merge_method: {method}\nbase_model: {}\nmodels:\n  - model: {}\nseed: 5\ndtype: float32\n",
            base.display(),
            a.display()
        );
        let mut outputs = Vec::new();
        // 40 kB forces chunks of the minimum length (4096 elements): the
        // 12300-element tensor is merged in 4 chunks.
        for (j, mem) in [(1, 1 << 30), (4, 1 << 30), (3, 40_000), (1, 40_000)] {
            let out = tmp.path().join(format!("{method}-{j}-{mem}"));
            let r = merge(&yaml, &out, &opts(j, mem)).unwrap();
            if mem == 40_000 {
                assert_eq!(r.chunk_len, 4096);
                // The 12300-element tensor needs 4096 · (4 · 3 + 4 + 4) bytes of
                // working set plus 49200 of results: more than the budget, so
                // it ran alone, or (next to be written, results streaming)
                // beside others within the budget.
                let working = 4096 * 20;
                let alone = working + 12300 * 4;
                let beside = working + 40_000;
                assert!(r.peak_reserved <= alone.max(beside), "{}", r.peak_reserved);
            } else {
                assert!(r.peak_reserved <= 1 << 30);
            }
            outputs.push(all_bytes(&out));
        }
        for o in &outputs[1..] {
            assert!(o == &outputs[0], "{method}: outputs differ between runs");
        }
        // Same as the in-memory merge, whole tensors or chunked.
        let (vb, va) = (vector(&mapper, &base), vector(&mapper, &a));
        let m = registry().get(method).unwrap();
        for chunk in [usize::MAX, 1000] {
            let merge = Merge::with_defaults(m, 1).unwrap().seed(5).chunk_len(chunk);
            let base_arg = if m.info().base == BaseModel::Unused {
                None
            } else {
                Some(&vb)
            };
            let v = merge.run(base_arg, &[&va]).unwrap();
            check_against(
                &tmp.path().join(format!("{method}-1-40000")),
                &expected_bytes(&mapper, &v, |_| DType::F32),
            );
        }
    }
    // A different seed changes the random method's output.
    let yaml = format!(
        "merge_method: engine_test_noisy\nmodels:\n  - model: {}\nseed: 6\ndtype: float32\n",
        a.display()
    );
    merge(&yaml, &tmp.path().join("seed6"), &opts(2, 1 << 30)).unwrap();
    assert!(
        all_bytes(&tmp.path().join("seed6"))
            != all_bytes(&tmp.path().join("engine_test_noisy-1-40000"))
    );
    // The --seed option overrides the config's seed.
    let o = RunOptions {
        seed: Some(5),
        ..opts(2, 1 << 30)
    };
    merge(&yaml, &tmp.path().join("seed5"), &o).unwrap();
    assert!(
        all_bytes(&tmp.path().join("seed5"))
            == all_bytes(&tmp.path().join("engine_test_noisy-1-40000"))
    );
}

#[test]
fn gradients_and_filters_resolve_per_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_model(&tmp.path().join("base"), &layout(DType::F32), 1, u64::MAX);
    let a = write_model(&tmp.path().join("a"), &layout(DType::F32), 2, u64::MAX);
    let yaml = format!(
        "merge_method: engine_test_wsum\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight:\n        - filter: mlp\n          value: [0.0, 1.0]\n        - filter: nothing_matches\n          value: 9\nparameters:\n  weight: 0.25\n  lambda:\n    - filter: self_attn\n      value: [1.0, 3.0, 2.0]\n    - value: 1\n",
        base.display(),
        a.display()
    );
    let config = MergeConfig::from_yaml_str(&yaml).unwrap();
    let p = plan(&config, &opts(1, 1 << 20)).unwrap();
    let dry = p.to_string();
    assert!(
        dry.contains(
            "model.layers.1.mlp.up_proj.weight [8, 8] F32 merge | lambda=1 | [0] weight=0.5"
        ),
        "{dry}"
    );
    let out = tmp.path().join("out");
    merge(&yaml, &out, &opts(2, 1 << 20)).unwrap();
    let (mb, ma, mo) = (
        Model::open_path(&base).unwrap(),
        Model::open_path(&a).unwrap(),
        Model::open_path(&out).unwrap(),
    );
    // Independent expectation: 3 layers, t = layer / 2; outside layers t = 0.
    let expect = |name: &str| -> (f64, f64) {
        let layer = name.split('.').find_map(|p| p.parse::<f64>().ok());
        let t = layer.map_or(0.0, |l| l / 2.0);
        let weight = if name.contains("mlp") { t } else { 0.25 };
        let lambda = if name.contains("self_attn") {
            let x = t * 2.0;
            let i = (x.floor() as usize).min(1);
            [1.0, 3.0, 2.0][i] + ([1.0, 3.0, 2.0][i + 1] - [1.0, 3.0, 2.0][i]) * (x - i as f64)
        } else {
            1.0
        };
        (weight, lambda)
    };
    for (tinfo, _) in mb.layout().float_tensors() {
        let (w, l) = expect(&tinfo.name);
        let (xb, xa, xo) = (
            mb.read_f32_vec(&tinfo.name).unwrap(),
            ma.read_f32_vec(&tinfo.name).unwrap(),
            mo.read_f32_vec(&tinfo.name).unwrap(),
        );
        for i in 0..xb.len() {
            let f = xb[i] as f64 + l * w * (xa[i] as f64 - xb[i] as f64);
            assert!(
                (xo[i] as f64 - f).abs() < 1e-5,
                "{}[{i}]: {} vs {f}",
                tinfo.name,
                xo[i]
            );
        }
    }
}

#[test]
fn fisher_files_and_tokenizer_source() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(DType::F32);
    let base = write_model(&tmp.path().join("base"), &l, 1, u64::MAX);
    let a = write_model(&tmp.path().join("a"), &l, 2, u64::MAX);
    let b = write_model(&tmp.path().join("b"), &l, 3, u64::MAX);
    // Fisher files: positive values; a's lacks the norm tensor.
    let fisher = |dir: &str, seed: u32, skip_norm: bool| {
        let tensors: Vec<T> = l
            .iter()
            .filter(|t| t.dtype.is_float() && !(skip_norm && t.name == "model.norm.weight"))
            .cloned()
            .collect();
        let p = write_model(&tmp.path().join(dir), &tensors, seed, u64::MAX);
        // make them positive: rewrite with |x| + 0.1 via the mapper
        let m = Model::open_path(&p).unwrap();
        let mapper = ModelTensorMapper::for_model(&m);
        let v = mapper.to_vector(&m).unwrap();
        let mut pos = v.clone();
        pos.map_inplace(|x| x.abs() + 0.1);
        drop(m);
        let out = tmp.path().join(format!("{dir}-pos"));
        tensormerge_io::MapperExt::save(
            &mapper,
            &pos,
            &out,
            &Model::open_path(&p).unwrap(),
            WriterOptions::default(),
        )
        .unwrap();
        out
    };
    let fa = fisher("fa", 7, true);
    let fbase = fisher("fbase", 8, false);
    let yaml = format!(
        "merge_method: engine_test_fisher\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{fisher: {fbase}}}\n  - model: {a}\n    parameters: {{fisher: {fa}}}\n  - model: {b}\ntokenizer_source: {b}\n",
        base = base.display(),
        a = a.display(),
        b = b.display(),
        fa = fa.display(),
        fbase = fbase.display()
    );
    let out = tmp.path().join("out");
    merge(&yaml, &out, &opts(2, 1 << 20)).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        "{\"model\": 3}\n"
    );
    let rd = |p: &Path, n: &str| Model::open_path(p).unwrap().read_f32_vec(n).ok();
    for (tinfo, _) in Model::open_path(&base).unwrap().layout().float_tensors() {
        let n = &tinfo.name;
        let (xb, xa, xbb, xo) = (
            rd(&base, n).unwrap(),
            rd(&a, n).unwrap(),
            rd(&b, n).unwrap(),
            rd(&out, n).unwrap(),
        );
        let (ffa, ffb) = (rd(&fa, n), rd(&fbase, n).unwrap());
        for i in 0..xb.len() {
            let wa = ffa.as_ref().map_or(1.0, |f| f[i] as f64);
            let num = wa * xa[i] as f64 + xbb[i] as f64 + ffb[i] as f64 * xb[i] as f64;
            let den = wa + 1.0 + ffb[i] as f64;
            assert!((xo[i] as f64 - num / den).abs() < 1e-5, "{n}[{i}]");
        }
    }
}

#[test]
fn incompatible_inputs_are_all_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_model(&tmp.path().join("base"), &layout(DType::F32), 1, u64::MAX);
    let mut other = layout(DType::F32);
    other[1].shape = vec![8, 9];
    other[3].shape = vec![9, 8];
    other.remove(7);
    let a = write_model(&tmp.path().join("a"), &other, 2, u64::MAX);
    let yaml = format!(
        "merge_method: engine_test_wsum\nbase_model: {}\nmodels:\n  - model: {}\n",
        base.display(),
        a.display()
    );
    let out = tmp.path().join("out");
    let e = merge(&yaml, &out, &opts(1, 1 << 20)).unwrap_err();
    match &e {
        EngineError::Incompatible(m) => {
            let names: Vec<&str> = m.iter().map(|m| m.tensor.as_str()).collect();
            assert_eq!(
                names,
                vec![
                    "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.1.self_attn.q_proj.weight",
                    "model.norm.weight"
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(e.is_bad_input());
    assert!(!out.exists());

    // Non-float tensors that differ cannot be copied.
    let mut ids = layout(DType::F32);
    ids[8].dtype = DType::I64;
    let c = tmp.path().join("c");
    write_model(&c, &ids, 3, u64::MAX);
    let m = Model::open_path(&c).unwrap();
    let mapper = ModelTensorMapper::for_model(&m);
    let v = mapper.to_vector(&m).unwrap();
    // Same layout, different position ids: rewrite them as zeros.
    let d = tmp.path().join("d");
    let infos: Vec<TensorInfo> = m.layout().tensors().to_vec();
    let mut w = ModelWriter::create(&d, infos.clone(), WriterOptions::default()).unwrap();
    for t in &infos {
        if t.dtype.is_float() {
            let vals = v.view(&t.name).unwrap().to_vec();
            w.write(&t.name, &convert::encode_f32_vec(t.dtype, &vals).unwrap())
                .unwrap();
        } else {
            w.write(&t.name, &vec![0u8; t.checked_byte_len().unwrap()])
                .unwrap();
        }
    }
    w.finish().unwrap();
    let yaml = format!(
        "merge_method: engine_test_wsum\nbase_model: {}\nmodels:\n  - model: {}\n",
        base.display(),
        d.display()
    );
    let e = merge(&yaml, &out, &opts(2, 1 << 20)).unwrap_err();
    assert!(e.to_string().contains("position_ids"), "{e}");
    assert!(!out.exists());
}

#[test]
fn output_paths_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_model(&tmp.path().join("base"), &layout(DType::F32), 1, u64::MAX);
    let yaml = format!(
        "merge_method: engine_test_wsum\nbase_model: {}\nmodels:\n  - model: {}/\n",
        base.display(),
        base.display()
    );
    // The base listed as a model (spelled differently) is not merged as one:
    // nothing left to merge.
    let e = merge(&yaml, &tmp.path().join("x"), &opts(1, 1 << 20)).unwrap_err();
    assert!(
        e.to_string().contains("needs at least 1 models, got 0"),
        "{e}"
    );

    let a = write_model(&tmp.path().join("a"), &layout(DType::F32), 2, u64::MAX);
    let yaml = format!(
        "merge_method: engine_test_wsum\nbase_model: {}\nmodels:\n  - model: {}\n",
        base.display(),
        a.display()
    );
    let e = merge(&yaml, &base.join("merged"), &opts(1, 1 << 20)).unwrap_err();
    assert!(matches!(e, EngineError::OutputInsideInput { .. }), "{e:?}");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let e = merge(&yaml, &out, &opts(1, 1 << 20)).unwrap_err();
    assert!(matches!(e, EngineError::OutputExists(_)), "{e:?}");
    assert_eq!(e.hint().unwrap(), "pass --overwrite to replace it");
    merge(
        &yaml,
        &out,
        &RunOptions {
            overwrite: true,
            ..opts(1, 1 << 20)
        },
    )
    .unwrap();
    assert!(Model::open_path(&out).is_ok());
    let e = merge(&yaml, &tmp.path().join("y"), &opts(1, 0)).unwrap_err();
    assert!(matches!(e, EngineError::Option(_)));
}

#[test]
fn inputs_larger_than_the_remap_interval_merge_exactly() {
    // 2 × 24 MB of F32 inputs: the executor re-opens each input every 16 MB
    // read (to release mapped pages) while merging.
    let tmp = tempfile::tempdir().unwrap();
    let l = vec![
        t("layers.0.weight", &[2000, 1500], DType::F32),
        t("layers.1.weight", &[1000, 3000], DType::F32),
    ];
    let base = write_model(&tmp.path().join("base"), &l, 1, u64::MAX);
    let a = write_model(&tmp.path().join("a"), &l, 2, 13_000_000);
    let yaml = format!(
        "merge_method: engine_test_wsum\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.25}}\n",
        base.display(),
        a.display()
    );
    let out = tmp.path().join("out");
    let r = merge(&yaml, &out, &opts(2, 8 << 20)).unwrap();
    assert_eq!(r.bytes_read, 2 * 24_000_000);
    let mapper = ModelTensorMapper::for_model(&Model::open_path(&base).unwrap());
    let m = Merge::new(
        registry().get("engine_test_wsum").unwrap(),
        vec![],
        vec![vec![("weight", 0.25.into())]],
    )
    .unwrap();
    let v = m
        .run(Some(&vector(&mapper, &base)), &[&vector(&mapper, &a)])
        .unwrap();
    check_against(&out, &expected_bytes(&mapper, &v, |t| t.dtype));
}

/// Non-finite values are searched for on a tensor's first read only (passes
/// read a tensor of several chunks again in every sweep): a NaN in the last
/// chunk of a 4-chunk F32 tensor, merged by a method with a two-sweep
/// whole-model pass and a per-tensor pass, or by one with only a two-sweep
/// per-tensor pass, is still refused with its element index, and goes
/// through with `allow_non_finite`.
#[test]
fn a_nan_in_a_later_chunk_is_found_whatever_the_sweeps() {
    let tmp = tempfile::tempdir().unwrap();
    let big = vec![t("big.weight", &[100, 123], DType::F32)];
    let base = write_model(&tmp.path().join("base"), &big, 10, u64::MAX);
    let a = tmp.path().join("a");
    let infos = vec![TensorInfo::new("big.weight", vec![100, 123], DType::F32)];
    let at = 12_299 - 5; // in the last chunk of 4096 elements
    let vals: Vec<f32> = (0..12_300)
        .map(|i| if i == at { f32::NAN } else { i as f32 * 1e-3 })
        .collect();
    let mut w = ModelWriter::create(&a, infos, WriterOptions::default()).unwrap();
    w.write(
        "big.weight",
        &convert::encode_f32_vec(DType::F32, &vals).unwrap(),
    )
    .unwrap();
    w.finish().unwrap();
    for (method, threads) in [
        ("engine_test_passes", 1),
        ("engine_test_passes", 2),
        ("engine_test_tensor_pass", 1),
        ("engine_test_tensor_pass", 2),
    ] {
        let yaml = format!(
            "merge_method: {method}\nbase_model: {}\nmodels:\n  - model: {}\ndtype: float32\n",
            base.display(),
            a.display()
        );
        let out = tmp.path().join(format!("{method}-{threads}"));
        let e = merge(&yaml, &out, &opts(threads, 40_000)).unwrap_err();
        match &e {
            EngineError::NonFinite { tensor, index, .. } => {
                assert_eq!((tensor.as_str(), *index), ("big.weight", at as u64), "{e}")
            }
            other => panic!("expected a non-finite error, got {other}"),
        }
        assert!(!out.exists());
        let allowed = RunOptions {
            allow_non_finite: true,
            ..opts(threads, 40_000)
        };
        let r = merge(&yaml, &out, &allowed).unwrap();
        assert_eq!(r.chunk_len, 4096);
        let v = Model::open_path(&out)
            .unwrap()
            .read_f32_vec("big.weight")
            .unwrap();
        assert!(v[at].is_nan(), "{method}: {}", v[at]);
    }
}
