//! # tensormerge-method-ties
//!
//! `ties`: TIES-merging, "Resolving interference when merging models" (Yadav
//! et al. 2023, arXiv:2306.01708). With task vectors `τ_i = x_i − b`:
//!
//! 1. **Trim**: keep, for each model, the `k_i = floor(d_i · n)` entries of
//!    largest `|τ_i|` and zero the rest (`d_i ≥ 1` keeps all). `n` is the
//!    tensor's size with `trim_scope: tensor` (the default, as mergekit), or
//!    the whole model's float parameter count with `trim_scope: model` (a
//!    global threshold per model, as in the paper's code). `k_i = 0` zeroes
//!    that model's contribution and is reported as a warning.
//! 2. **Elect**: `δ_i = w_i τ̂_i`; the sign of each entry is `sign(Σ δ_i)`
//!    (`consensus: sum`, default) or `sign(Σ sign(δ_i))` (`consensus:
//!    count`); an exact zero elects `+`.
//! 3. **Disjoint merge**: `m_i = [sign(δ_i) = elected and δ_i ≠ 0]`,
//!    `merged = Σ m_i δ_i`, divided element-wise by `Σ m_i w_i` when
//!    `normalize` (default true; a zero divisor leaves the entry at 0).
//! 4. `out = b + λ · merged`.
//!
//! With one model, density 1, weight 1 and `normalize`, `ties` returns that
//! model exactly whenever `x − b` is exact in `f64` (magnitudes of `x` and
//! `b` within a factor 2²⁹, or either zero); otherwise to `f32` rounding of
//! `b`.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_ties as _; // link the crate so it registers
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![4], DType::F32)]).unwrap());
//! let v = |x: [f32; 4]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let base = v([0.0; 4]);
//! let a = v([3.0, -1.0, 0.5, 2.0]);
//! let b = v([1.0, 2.0, -4.0, 0.1]);
//! let ties = registry().get("ties").unwrap();
//! // Keep the top half of each task vector, elect signs, average the agreeing entries.
//! let merge = Merge::new(ties, vec![], vec![vec![("density", 0.5.into())]; 2]).unwrap();
//! let out = merge.run(Some(&base), &[&a, &b]).unwrap();
//! // a keeps {3, 2}, b keeps {2, -4}: entry 1 is b's alone, entry 2 is b's alone.
//! assert_eq!(out.values().unwrap(), &[3.0, 2.0, -4.0, 2.0]);
//! ```
//!
//! ## Exactness
//!
//! The trim is an exact top-k by magnitude (the key is `|x − b|` computed in
//! `f32`), found without sorting by [`TopK`]: a histogram over `f32` bit
//! patterns refined in a second sweep, with ties at the threshold kept in
//! order of lowest position (within a tensor: flat index; over a whole
//! model: tensor name, then flat index, so that the result does not depend on
//! the order of tensors in the file). Merging in chunks, on any number of
//! threads, gives bit-identical output. Per tensor, the threshold is first
//! guessed from 65 536 keys sampled from the first chunk, and the first
//! sweep records the keys near the guess; when the guess holds (usually) the
//! selection is known after that one sweep, else the histograms decide. The
//! guess changes only the speed, never the selection.
//!
//! ## Differences from mergekit
//!
//! - mergekit trims with `torch.topk`/sorting whose tie order is unspecified;
//!   ties here are broken by position, deterministically.
//! - mergekit's normalisation leaves an entry unnormalised when
//!   `|Σ m_i w_i| < 1e-8`; here only an exact zero divisor is special and the
//!   entry is then 0 (METHODS.md), so negative weights that cancel do not
//!   produce a huge entry.
//! - `trim_scope: model` (the paper's global threshold) is our addition.
//! - `weight` defaults to 1.0 (mergekit requires it); `int8_mask` is accepted
//!   and has no effect.
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::ops::{
    self, BLOCK, Combine, Consensus, Rule, Selection, TopK, magnitude_key,
};
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Params,
    Stats, StatsPass, TensorContext, register_method,
};

/// The `ties` method.
#[derive(Debug, Clone, Copy)]
pub struct Ties;

/// Declared parameters of `ties`.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec::WEIGHT,
    ParamSpec::per_model_float(
        "density",
        0.0,
        f64::INFINITY,
        Default::Float(1.0),
        "share d_i of the task vector's entries kept by magnitude (≥ 1 keeps all)",
    ),
    ParamSpec::LAMBDA,
    ParamSpec::global(
        "normalize",
        ParamKind::Bool,
        Default::Bool(true),
        "divide by the sum of the weights of the agreeing models, per entry",
    ),
    ParamSpec::CONSENSUS,
    ParamSpec::global(
        "trim_scope",
        ParamKind::Choice(&["tensor", "model"]),
        Default::Choice("tensor"),
        "top-k per tensor (mergekit) or over the whole model (the paper)",
    ),
    ParamSpec::INT8_MASK,
];

/// What `ties` is.
pub static INFO: MethodInfo = MethodInfo {
    name: "ties",
    summary: "trim task vectors by magnitude, elect a sign per entry, average the agreeing entries",
    paper: "Yadav et al. 2023, arXiv:2306.01708",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

/// The per-model selections gathered by a pass.
#[derive(Debug)]
struct Selections(Vec<Selection>);

fn model_scope(global: &Params) -> Result<bool, MethodError> {
    Ok(global.str("trim_scope")? == "model")
}

fn consensus(global: &Params) -> Result<Consensus, MethodError> {
    let s = global.str("consensus")?;
    Consensus::parse(s).ok_or_else(|| MethodError::OutOfRange {
        method: INFO.name.into(),
        param: "consensus".into(),
        value: s.into(),
        range: "sum or count".into(),
    })
}

/// Selectors for a tensor of `n` elements (tensor scope).
fn tensor_selectors(tensor: &TensorContext<'_>) -> Result<Vec<TopK>, MethodError> {
    let n = tensor.numel() as u64;
    tensor
        .models
        .iter()
        .map(|p| Ok(TopK::new(n, ops::keep_count(p.f64("density")?, n), true)))
        .collect()
}

/// A [`StatsPass`] running one [`TopK`] per model over `|x_i − b|`.
struct TopKPass {
    selectors: Vec<TopK>,
    /// Segment = tensor name (whole-model scope) or "" (one tensor).
    by_tensor: bool,
    sweeps: usize,
    keys: Box<[u32; BLOCK]>,
}

impl TopKPass {
    /// [`blocks`](Self::blocks) compiled for AVX2 (integer and `f32`
    /// operations only: the same keys either way).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn blocks_avx2(&mut self, chunk: &Chunk<'_>, base: &[f32], segment: &str) {
        self.blocks(chunk, base, segment)
    }

    /// Feeds the keys `|x_i − b|` of a chunk to each model's selector.
    #[inline(always)]
    fn blocks(&mut self, chunk: &Chunk<'_>, base: &[f32], segment: &str) {
        if self.selectors.iter().all(|s| s.is_done()) {
            return;
        }
        // Block by block, every model in turn: the base block stays in cache.
        for start in (0..base.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(base.len());
            let b = &base[start..end];
            // The inputs' cache lines two blocks ahead: the hardware
            // prefetcher alone leaves this loop waiting for memory (the pass
            // took about 25% longer without, bench-phases on 16M elements).
            let sels = &self.selectors;
            ops::prefetch_block(base, chunk.models, start + 2 * BLOCK, BLOCK, |i| {
                !sels[i].is_done()
            });
            for (i, sel) in self.selectors.iter_mut().enumerate() {
                if sel.is_done() {
                    continue;
                }
                let x = &chunk.models[i][start..end];
                let at = (chunk.offset + start) as u64;
                sel.observe_diff(segment, at, x, b, &mut self.keys[..]);
            }
        }
    }
}

impl StatsPass for TopKPass {
    fn sweeps(&self) -> usize {
        self.sweeps
    }

    // Every threshold known: the remaining sweeps would see nothing.
    fn done(&self) -> bool {
        self.selectors.iter().all(|s| s.is_done())
    }

    // Over a whole model, the tie-position sweep needs one tensor per model.
    fn needs(&self, tensor: &TensorContext<'_>) -> bool {
        !self.by_tensor || self.selectors.iter().any(|s| s.needs_segment(tensor.name))
    }

    fn observe(&mut self, sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.to_string(),
        })?;
        let segment = if self.by_tensor {
            chunk.tensor.name
        } else {
            ""
        };
        if sweep == 0 && chunk.offset == 0 && !self.by_tensor {
            // A guess of each threshold from evenly spaced runs of 16 keys
            // (a cache line each) of the first chunk, so that the first
            // sweep usually settles the selection.
            const RUN: usize = 16;
            let runs = TopK::SAMPLE / RUN;
            let stride = (base.len() / runs).max(RUN) / RUN * RUN;
            let mut sample = Vec::with_capacity(TopK::SAMPLE);
            for (sel, x) in self.selectors.iter_mut().zip(chunk.models) {
                sample.clear();
                for at in (0..base.len()).step_by(stride).take(runs) {
                    let end = (at + RUN).min(base.len());
                    let keys = x[at..end].iter().zip(&base[at..end]);
                    sample.extend(keys.map(|(&x, &b)| magnitude_key(x - b)));
                }
                sel.guess(&mut sample);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { self.blocks_avx2(chunk, base, segment) };
            return Ok(());
        }
        self.blocks(chunk, base, segment);
        Ok(())
    }

    fn end_sweep(&mut self, sweep: usize) -> Result<(), MethodError> {
        for sel in &mut self.selectors {
            sel.end_sweep(sweep)
                .map_err(|message| MethodError::Invalid {
                    method: INFO.name.into(),
                    tensor: if self.by_tensor {
                        "<model>".into()
                    } else {
                        "<tensor>".into()
                    },
                    message,
                })?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        let sels = self
            .selectors
            .iter()
            .map(|s| s.selection().cloned())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| MethodError::Invalid {
                method: INFO.name.into(),
                tensor: "<pass>".into(),
                message: "the top-k pass ended before the threshold was found".into(),
            })?;
        Ok(Arc::new(Selections(sels)))
    }
}

impl MergeMethod for Ties {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn model_pass(&self, global: &Params, models: &[Params]) -> Option<Box<dyn StatsPass>> {
        if !model_scope(global).ok()? {
            return None;
        }
        let selectors = models
            .iter()
            .map(|p| Some(TopK::with_density(p.f64("density").ok()?, false)))
            .collect::<Option<Vec<_>>>()?;
        Some(Box::new(TopKPass {
            selectors,
            by_tensor: true,
            sweeps: TopK::SWEEPS,
            keys: Box::new([0; BLOCK]),
        }))
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        if model_scope(tensor.global).unwrap_or(true) {
            return None;
        }
        let selectors = tensor_selectors(tensor).ok()?;
        if selectors.iter().all(|s| s.is_done()) {
            return None; // every model keeps all or nothing: no pass needed
        }
        Some(Box::new(TopKPass {
            selectors,
            by_tensor: false,
            sweeps: TopK::SWEEPS_ONE_SEGMENT,
            keys: Box::new([0; BLOCK]),
        }))
    }

    fn config_warnings(&self, _global: &Params, models: &[Params]) -> Vec<String> {
        let untrimmed: Vec<String> = models
            .iter()
            .enumerate()
            .filter(|(_, p)| p.f64("density").is_ok_and(|d| d >= 1.0))
            .map(|(i, _)| i.to_string())
            .collect();
        if untrimmed.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "ties: density ≥ 1 trims nothing for model(s) {} (mergekit's default is 1.0, the paper uses 0.2)",
                untrimmed.join(", ")
            )]
        }
    }

    fn tensor_warnings(&self, tensor: &TensorContext<'_>, _has_aux: &[bool]) -> Vec<String> {
        if model_scope(tensor.global).unwrap_or(true) {
            return Vec::new();
        }
        let n = tensor.numel() as u64;
        tensor
            .models
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let d = p.f64("density").ok()?;
                (n > 0 && d > 0.0 && ops::keep_count(d, n) == 0).then(|| {
                    format!(
                        "ties: model {i} keeps none of the {n} entries of `{}` (floor({d} · {n}) = 0); \
                         its contribution to this tensor is zero",
                        tensor.name
                    )
                })
            })
            .collect()
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor;
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.to_string(),
        })?;
        let by_tensor = model_scope(t.global)?;
        let (stats, segment) = if by_tensor {
            (t.model_stats, t.name)
        } else {
            (chunk.tensor_stats, "")
        };
        let selections: Vec<Selection> = match stats {
            Some(s) => s
                .downcast_ref::<Selections>()
                .ok_or_else(|| MethodError::Invalid {
                    method: INFO.name.into(),
                    tensor: t.name.into(),
                    message: "statistics of another method were passed in".into(),
                })?
                .0
                .clone(),
            None if by_tensor => {
                return Err(MethodError::Invalid {
                    method: INFO.name.into(),
                    tensor: t.name.into(),
                    message: "`trim_scope: model` needs the whole-model pass, which was not run"
                        .into(),
                });
            }
            None => {
                // No pass: every model keeps all or nothing.
                let sels = tensor_selectors(t)?;
                sels.iter()
                    .map(|s| {
                        s.selection().cloned().ok_or_else(|| MethodError::Invalid {
                            method: INFO.name.into(),
                            tensor: t.name.into(),
                            message: "the per-tensor top-k pass was not run".into(),
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let limits: Vec<(u32, Option<u64>)> =
            selections.iter().map(|s| s.for_segment(segment)).collect();
        // TIES (Yadav et al. 2023, arXiv:2306.01708): trim, then elect and
        // disjoint-merge δ_i = w_i τ̂_i, out = b + λ · merged.
        let combine = Combine {
            weights: ops::weights(t, "weight")?,
            lambda: t.global.f64("lambda")?,
            normalize: t.global.bool("normalize")?,
            rule: Rule::Ties(consensus(t.global)?),
        };
        let fill = |i: usize, start: usize, buf: &mut [f64]| {
            let x = &chunk.models[i][start..start + buf.len()];
            let b = &base[start..start + buf.len()];
            let (thr, lim) = limits[i];
            // Ties at the threshold are kept at indices < tie_end.
            let tie_end = lim.map_or(0, |l| l.saturating_add(1));
            let first = (chunk.offset + start) as u64;
            let last = first + buf.len() as u64;
            if tie_end <= first || tie_end >= last {
                // The ties at the threshold in this block are all dropped or
                // all kept: no position test.
                let ties = tie_end >= last;
                for ((d, &x), &b) in buf.iter_mut().zip(x).zip(b) {
                    let key = magnitude_key(x - b);
                    let keep = (key > thr) | (ties & (key == thr));
                    let delta = x as f64 - b as f64;
                    *d = if keep { delta } else { 0.0 };
                }
            } else {
                for (e, ((d, &x), &b)) in buf.iter_mut().zip(x).zip(b).enumerate() {
                    let key = magnitude_key(x - b);
                    let keep = (key > thr) | ((key == thr) & (first + (e as u64) < tie_end));
                    let delta = x as f64 - b as f64;
                    *d = if keep { delta } else { 0.0 };
                }
            }
        };
        // Pieces of the chunk within which each model keeps by one threshold
        // (cut where a model's kept ties end): merged by the fused kernel,
        // their last few elements (or all, without AVX2) by the block path.
        let (first, n) = (chunk.offset as u64, out.len());
        let tie_end = |lim: Option<u64>| lim.map_or(0, |l| l.saturating_add(1));
        let mut cuts: Vec<usize> = limits
            .iter()
            .map(|&(_, lim)| tie_end(lim))
            .filter(|&t| t > first && t < first + n as u64)
            .map(|t| (t - first) as usize)
            .chain([0, n])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for piece in cuts.windows(2) {
            let (lo, hi) = (piece[0], piece[1]);
            let above: Vec<i32> = limits
                .iter()
                .map(|&(thr, lim)| ops::key_above(thr, tie_end(lim) > first + lo as u64))
                .collect();
            let models: Vec<&[f32]> = chunk.models.iter().map(|m| &m[lo..hi]).collect();
            let done =
                ops::combine_trimmed(&combine, &base[lo..hi], &models, &above, &mut out[lo..hi]);
            let rest = lo + done;
            if rest == hi {
                continue;
            }
            ops::combine_blocks(
                &combine,
                Some(&base[rest..hi]),
                &mut out[rest..hi],
                |i, start, buf| fill(i, rest + start, buf),
            );
        }
        Ok(())
    }
}

register_method!(Ties);
