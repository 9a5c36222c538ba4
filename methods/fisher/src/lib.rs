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

use tensormerge_methods::ops::{self, ExactSum};
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
                f.iter()
                    .for_each(|&v| self.sums[j].add(v as f64 * v as f64));
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
        for (e, o) in out.iter_mut().enumerate() {
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for ((x, f), &c) in chunk.models.iter().zip(&fishers).zip(&coef) {
                let g = c * (f[e] as f64).max(floor);
                num += g * x[e] as f64;
                den += g;
            }
            if let Some((b, f, c)) = base {
                let g = c * (f[e] as f64).max(floor);
                num += g * b[e] as f64;
                den += g;
            }
            *o = if den != 0.0 && den.is_finite() {
                (num / den) as f32
            } else {
                weighted_average(t, chunk.models, &weights, e)?
            };
        }
        Ok(())
    }
}

register_method!(Fisher);
