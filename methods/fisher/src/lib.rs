//! # tensormerge-method-fisher
//!
//! `fisher`: Fisher-weighted averaging (Matena & Raffel 2022, "Merging
//! Models with Fisher-Weighted Averaging", arXiv:2111.09832). Each model j
//! comes with a diagonal Fisher estimate `F_j` (a model with the same tensor
//! names and shapes, given by the per-model `fisher` parameter and passed to
//! the method as the model's auxiliary tensors). With `F̃_j = max(F_j, floor)`
//! (`fisher_floor`, default 1e-6):
//!
//! `out = Σ_j λ_j F̃_j x_j / Σ_j λ_j F̃_j`, `λ_j` = the model's `weight`.
//!
//! With `normalize_fishers` (default true) each `λ_j` is first divided by the
//! L2 norm of `F_j` over all merged tensors (a whole-model pass, summed
//! exactly so the result does not depend on tensor order or chunking), so
//! that Fishers estimated at different scales count equally.
//!
//! A tensor for which some model has no Fisher falls back to the weighted
//! average `Σ w_j x_j / Σ w_j` (reported by
//! [`MergeMethod::tensor_warnings`]). An entry where every `λ_j F̃_j` is zero
//! (only possible with `fisher_floor: 0`) falls back the same way.
//!
//! No base model is needed. If a base is given together with a Fisher for it
//! (the auxiliary tensor of the base), it takes part as one more model with
//! `λ = 1`; a base without a Fisher only supplies non-float tensors.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_fisher as _; // link the crate so it registers
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let v = |x: [f32; 2]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let (a, b) = (v([1.0, 1.0]), v([3.0, 3.0]));
//! // a is three times as certain about entry 0, b about entry 1.
//! let (fa, fb) = (v([3.0, 1.0]), v([1.0, 3.0]));
//! let fisher = registry().get("fisher").unwrap();
//! let merge = Merge::new(fisher, vec![("normalize_fishers", false.into())], vec![vec![], vec![]]).unwrap();
//! let out = merge.run_with_aux(None, &[&a, &b], &[Some(&fa), Some(&fb)], None).unwrap();
//! assert_eq!(out.values().unwrap(), &[1.5, 2.5]);
//! ```
//!
//! Reference implementation: the paper's code (mergekit has no Fisher
//! merging). Differences: the floor is applied as `max(F, floor)` (the
//! paper's code adds a small constant); the norm for `normalize_fishers` is
//! over the tensors being merged.
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::ops::{self, BLOCK, ExactSum};
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Params,
    Stats, StatsPass, TensorContext, register_method,
};

/// The `fisher` method.
#[derive(Debug, Clone, Copy)]
pub struct Fisher;

/// Declared parameters of `fisher`.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec::per_model_float(
        "weight",
        0.0,
        f64::INFINITY,
        Default::Float(1.0),
        "the model's weight λ_j",
    ),
    ParamSpec {
        name: "fisher",
        scope: tensormerge_methods::Scope::PerModel,
        kind: ParamKind::ModelRef,
        default: Default::Unset,
        doc: "the model's diagonal Fisher estimate (same tensor names and shapes)",
    },
    ParamSpec::global(
        "fisher_floor",
        ParamKind::Float {
            min: 0.0,
            max: f64::INFINITY,
        },
        Default::Float(1e-6),
        "lower bound applied to every Fisher entry",
    ),
    ParamSpec::global(
        "normalize_fishers",
        ParamKind::Bool,
        Default::Bool(true),
        "divide each model's weight by the global L2 norm of its Fisher",
    ),
];

/// What `fisher` is.
pub static INFO: MethodInfo = MethodInfo {
    name: "fisher",
    summary: "average weighted per entry by each model's diagonal Fisher information",
    paper: "Matena & Raffel 2022, arXiv:2111.09832",
    base: BaseModel::Optional,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

/// The global L2 norm of each model's Fisher (and of the base's, last), or
/// `None` for a model without any Fisher.
#[derive(Debug)]
struct FisherNorms(Vec<Option<f64>>);

/// Sums of squared Fisher entries per model (and the base, last).
struct NormPass {
    sums: Vec<ExactSum>,
    seen: Vec<bool>,
}

impl StatsPass for NormPass {
    fn observe(&mut self, _sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let m = chunk.models.len();
        let all = chunk
            .aux
            .iter()
            .copied()
            .chain(std::iter::once(chunk.base_aux));
        for (j, aux) in all.enumerate().take(m + 1) {
            if let Some(f) = aux {
                self.seen[j] = true;
                self.sums[j].add_squares_f32(f);
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        let norms = self
            .sums
            .iter()
            .zip(&self.seen)
            .map(|(s, &seen)| seen.then(|| s.value().sqrt()))
            .collect();
        Ok(Arc::new(FisherNorms(norms)))
    }
}

impl Fisher {
    /// The coefficient `λ_j` (divided by the norm) of each model, then the base.
    fn coefficients(&self, chunk: &Chunk<'_>, weights: &[f64]) -> Result<Vec<f64>, MethodError> {
        let t = chunk.tensor;
        let mut coef: Vec<f64> = weights.to_vec();
        coef.push(1.0); // the base, if it has a Fisher
        if !t.global.bool("normalize_fishers")? {
            return Ok(coef);
        }
        let norms = t
            .model_stats
            .and_then(|s| s.downcast_ref::<FisherNorms>())
            .ok_or_else(|| MethodError::Invalid {
                method: INFO.name.into(),
                tensor: t.name.into(),
                message: "`normalize_fishers` needs the whole-model pass, which was not run".into(),
            })?;
        for (j, c) in coef.iter_mut().enumerate() {
            match norms.0.get(j).copied().flatten() {
                Some(n) if n > 0.0 && n.is_finite() => *c /= n,
                Some(_) => {
                    let who = if j == weights.len() {
                        "the base".to_string()
                    } else {
                        format!("model {j}")
                    };
                    return Err(MethodError::Invalid {
                        method: INFO.name.into(),
                        tensor: "<model>".into(),
                        message: format!(
                            "the Fisher of {who} is zero (or not finite) everywhere, so `normalize_fishers` \
                             cannot divide by its norm; set `normalize_fishers: false`"
                        ),
                    });
                }
                None => {} // no Fisher at all: its tensors fall back to the weighted average
            }
        }
        Ok(coef)
    }
}

fn weighted_average(
    t: &TensorContext<'_>,
    models: &[&[f32]],
    weights: &[f64],
    e: usize,
) -> Result<f32, MethodError> {
    let wsum = ops::weight_sum(weights);
    if wsum == 0.0 {
        return Err(MethodError::Invalid {
            method: INFO.name.into(),
            tensor: t.name.into(),
            message: "falling back to the weighted average, but the model weights sum to zero"
                .into(),
        });
    }
    let num: f64 = models
        .iter()
        .zip(weights)
        .map(|(x, &w)| w * x[e] as f64)
        .sum();
    Ok((num / wsum) as f32)
}

/// The Fisher-weighted average of the entries `at..at + out.len()`, with
/// each entry's denominator in `den` (the caller replaces the entries whose
/// denominator is 0 or not finite). Block by block over the models, so that
/// the loops vectorise: per entry the additions are those of a per-entry
/// loop in model order, then the base. On x86-64 CPUs with AVX2 the same
/// code is compiled for AVX2 and chosen at run time.
#[allow(clippy::too_many_arguments)] // one call site, the merge's own values
fn fisher_block(
    models: &[&[f32]],
    fishers: &[&[f32]],
    coef: &[f64],
    base: Option<(&[f32], &[f32], f64)>,
    floor: f64,
    at: usize,
    out: &mut [f32],
    den: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { fisher_block_avx2(models, fishers, coef, base, floor, at, out, den) };
        return;
    }
    fisher_block_body(models, fishers, coef, base, floor, at, out, den)
}

/// [`fisher_block`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
fn fisher_block_avx2(
    models: &[&[f32]],
    fishers: &[&[f32]],
    coef: &[f64],
    base: Option<(&[f32], &[f32], f64)>,
    floor: f64,
    at: usize,
    out: &mut [f32],
    den: &mut [f64],
) {
    fisher_block_body(models, fishers, coef, base, floor, at, out, den)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fisher_block_body(
    models: &[&[f32]],
    fishers: &[&[f32]],
    coef: &[f64],
    base: Option<(&[f32], &[f32], f64)>,
    floor: f64,
    at: usize,
    out: &mut [f32],
    den: &mut [f64],
) {
    let n = out.len();
    let mut num = [0.0f64; BLOCK];
    let num = &mut num[..n];
    den.iter_mut().for_each(|d| *d = 0.0);
    let mut add = |x: &[f32], f: &[f32], c: f64| {
        for (((num, den), &x), &f) in num.iter_mut().zip(den.iter_mut()).zip(x).zip(f) {
            let g = c * (f as f64).max(floor);
            *num += g * x as f64;
            *den += g;
        }
    };
    for ((x, f), &c) in models.iter().zip(fishers).zip(coef) {
        add(&x[at..at + n], &f[at..at + n], c);
    }
    if let Some((b, f, c)) = base {
        add(&b[at..at + n], &f[at..at + n], c);
    }
    for ((o, &num), &den) in out.iter_mut().zip(&*num).zip(&*den) {
        *o = (num / den) as f32;
    }
}

impl MergeMethod for Fisher {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn model_pass(&self, global: &Params, models: &[Params]) -> Option<Box<dyn StatsPass>> {
        if !global.bool("normalize_fishers").ok()? {
            return None;
        }
        Some(Box::new(NormPass {
            sums: vec![ExactSum::new(); models.len() + 1],
            seen: vec![false; models.len() + 1],
        }))
    }

    fn tensor_warnings(&self, tensor: &TensorContext<'_>, has_aux: &[bool]) -> Vec<String> {
        let missing: Vec<String> = has_aux
            .iter()
            .enumerate()
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i.to_string())
            .collect();
        if missing.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "fisher: model(s) {} have no Fisher for `{}`; that tensor is the weighted average of the models",
                missing.join(", "),
                tensor.name
            )]
        }
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor;
        let weights = ops::weights(t, "weight")?;
        let fishers: Option<Vec<&[f32]>> = chunk.aux.iter().copied().collect();
        let Some(fishers) = fishers else {
            // A model lacks a Fisher for this tensor: weighted average.
            for (e, o) in out.iter_mut().enumerate() {
                *o = weighted_average(t, chunk.models, &weights, e)?;
            }
            return Ok(());
        };
        let floor = t.global.f64("fisher_floor")?;
        let coef = self.coefficients(chunk, &weights)?;
        let base = match (chunk.base, chunk.base_aux) {
            (Some(b), Some(f)) => Some((b, f, coef[weights.len()])),
            _ => None,
        };
        // out = Σ λ_j F̃_j x_j / Σ λ_j F̃_j  (Matena & Raffel 2022, arXiv:2111.09832)
        let mut den = [0.0f64; BLOCK];
        for (at, out) in (0..).step_by(BLOCK).zip(out.chunks_mut(BLOCK)) {
            let den = &mut den[..out.len()];
            fisher_block(chunk.models, &fishers, &coef, base, floor, at, out, den);
            // Entries whose weights vanish fall back to the weighted average.
            for (j, (o, d)) in out.iter_mut().zip(&*den).enumerate() {
                if !(*d != 0.0 && d.is_finite()) {
                    *o = weighted_average(t, chunk.models, &weights, at + j)?;
                }
            }
        }
        Ok(())
    }
}

register_method!(Fisher);

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-entry loop `fisher_block` replaced, verbatim in its
    /// arithmetic (`None` where the merge falls back to the weighted average).
    fn per_entry(
        models: &[&[f32]],
        fishers: &[&[f32]],
        coef: &[f64],
        base: Option<(&[f32], &[f32], f64)>,
        floor: f64,
    ) -> Vec<Option<f32>> {
        (0..models[0].len())
            .map(|e| {
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for ((x, f), &c) in models.iter().zip(fishers).zip(coef) {
                    let g = c * (f[e] as f64).max(floor);
                    num += g * x[e] as f64;
                    den += g;
                }
                if let Some((b, f, c)) = base {
                    let g = c * (f[e] as f64).max(floor);
                    num += g * b[e] as f64;
                    den += g;
                }
                (den != 0.0 && den.is_finite()).then(|| (num / den) as f32)
            })
            .collect()
    }

    #[test]
    fn fisher_block_gives_the_bits_of_the_per_entry_loop() {
        let mut s = 5u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64) as f32
        };
        let n = 2 * BLOCK + 37;
        let vals = |next: &mut dyn FnMut() -> f32, m: usize| -> Vec<Vec<f32>> {
            (0..m)
                .map(|_| (0..n).map(|_| next() * 4.0 - 2.0).collect())
                .collect()
        };
        let xs = vals(&mut next, 4);
        // Fishers: some below the floor, some zero, some NaN.
        let fs: Vec<Vec<f32>> = (0..4)
            .map(|_| {
                (0..n)
                    .map(|_| match (next() * 8.0) as u32 {
                        0 => 0.0,
                        1 => f32::NAN,
                        2 => 1e-9,
                        _ => next() * 3.0,
                    })
                    .collect()
            })
            .collect();
        let models: Vec<&[f32]> = xs[..3].iter().map(|x| &x[..]).collect();
        let fishers: Vec<&[f32]> = fs[..3].iter().map(|x| &x[..]).collect();
        for floor in [0.0, 1e-6, 0.5] {
            for base in [None, Some((&xs[3][..], &fs[3][..], 0.7))] {
                let coef = [0.5, 0.3, 0.2];
                let want = per_entry(&models, &fishers, &coef, base, floor);
                for at in [0, BLOCK] {
                    let len = (n - at).min(BLOCK);
                    let (mut out, mut den) = (vec![0.0f32; len], vec![0.0f64; len]);
                    fisher_block(
                        &models, &fishers, &coef, base, floor, at, &mut out, &mut den,
                    );
                    for j in 0..len {
                        let got = (den[j] != 0.0 && den[j].is_finite()).then_some(out[j]);
                        assert_eq!(
                            got.map(f32::to_bits),
                            want[at + j].map(f32::to_bits),
                            "entry {}, floor {floor}",
                            at + j
                        );
                    }
                }
            }
        }
    }
}
