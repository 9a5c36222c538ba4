//! # tensormerge-method-magnitude-prune
//!
//! `magnitude_prune`: each task vector `τ_i = x_i − b` keeps only its
//! `floor(d_i · n)` largest-magnitude entries per tensor (the trim step of
//! TIES, Yadav et al. 2023, arXiv:2306.01708, §3 "Trim"), and the pruned
//! task vectors are summed without sign election:
//!
//! ```text
//! τ̂_i = top-k_i(|τ_i|) mask ⊙ τ_i,   k_i = floor(d_i · n)  (all when d_i ≥ 1)
//! out = b + λ · Σ w_i τ̂_i            (divided by Σ w_i when `normalize`)
//! ```
//!
//! With `rescale`, each pruned task vector is scaled back to its L1 norm.
//! Ties in magnitude are broken by position (lower index kept first), the
//! same exact selection as `ties` ([`tensormerge_methods::ops::TopK`]). It is
//! `breadcrumbs` with `gamma = 0` and shares its trimming code.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_magnitude_prune as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![4], DType::F32)]).unwrap());
//! let base = ParamVector::zeros(layout.clone());
//! let x = ParamVector::from_vec(layout, vec![0.5, -3.0, 1.0, 2.0]).unwrap();
//! let m = registry().get("magnitude_prune").unwrap();
//! let p = vec![vec![("density", 0.5.into())]];
//! let out = Merge::new(m, vec![], p).unwrap().run(Some(&base), &[&x]).unwrap();
//! assert_eq!(out.values().unwrap(), &[0.0, -3.0, 0.0, 2.0]);
//! ```
//!
//! Differences from mergekit: mergekit has this trim only inside `ties`
//! (its `magnitude` sparsification, which asserts that at least one entry is
//! kept); here `floor(d · n) = 0` keeps nothing of that tensor and is
//! reported as a warning. `weight` defaults to 1.0; `int8_mask` is accepted
//! and has no effect. Tensors are merged in chunks after a per-tensor pass
//! (the exact streaming top-k of `tensormerge_method_breadcrumbs::trim::pass`,
//! and the L1 norms with `rescale`), so memory does not grow with the tensor.
#![deny(missing_docs)]

use tensormerge_method_breadcrumbs::trim;
use tensormerge_methods::ops::{self, Combine, Rule};
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec,
    StatsPass, TensorContext, register_method,
};

/// The `magnitude_prune` method.
#[derive(Debug, Clone, Copy)]
pub struct MagnitudePrune;

static PARAMS: &[ParamSpec] = &[
    ParamSpec::WEIGHT,
    ParamSpec::per_model_float(
        "density",
        0.0,
        f64::INFINITY,
        Default::Float(1.0),
        "share d_i of the task vector's entries kept by magnitude (≥ 1 keeps all)",
    ),
    ParamSpec::global(
        "lambda",
        ParamKind::Float {
            min: f64::NEG_INFINITY,
            max: f64::INFINITY,
        },
        Default::Float(1.0),
        "factor λ on the summed task vectors",
    ),
    ParamSpec::global(
        "normalize",
        ParamKind::Bool,
        Default::Bool(false),
        "divide the weighted sum by the sum of the weights",
    ),
    ParamSpec::global(
        "rescale",
        ParamKind::Bool,
        Default::Bool(false),
        "scale the kept entries so each task vector keeps its L1 norm",
    ),
    ParamSpec::INT8_MASK,
];

static INFO: MethodInfo = MethodInfo {
    name: "magnitude_prune",
    summary: "keeps each task vector's largest-magnitude entries and adds them to the base (no sign election)",
    paper: "Yadav et al. 2023, arXiv:2306.01708 (the trim step of TIES)",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

fn windows(t: &TensorContext<'_>) -> Result<Vec<(u64, u64)>, MethodError> {
    let n = t.numel() as u64;
    t.models
        .iter()
        .map(|p| Ok(trim::rank_window(n, p.f64("density")?, 0.0)))
        .collect()
}

impl MergeMethod for MagnitudePrune {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        let rescale = tensor.global.bool("rescale").ok()?;
        trim::pass(INFO.name, tensor, &windows(tensor).ok()?, rescale)
    }

    fn tensor_warnings(&self, t: &TensorContext<'_>, _has_aux: &[bool]) -> Vec<String> {
        let n = t.numel() as u64;
        t.models
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let d = p.f64("density").ok()?;
                (n > 0 && d > 0.0 && ops::keep_count(d, n) == 0).then(|| {
                    format!(
                        "magnitude_prune: model {i} keeps none of the {n} entries of `{}` (floor({d} · {n}) = 0)",
                        t.name
                    )
                })
            })
            .collect()
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor;
        let combine = Combine {
            weights: ops::weights(t, "weight")?,
            lambda: t.global.f64("lambda")?,
            normalize: t.global.bool("normalize")?,
            rule: Rule::Linear,
        };
        trim::merge_trimmed(INFO.name, chunk, &windows(t)?, &combine, out)
    }
}

register_method!(MagnitudePrune);

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, ParamValue, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![6, 7], DType::F32),
                TensorInfo::new("b", vec![5], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed * 7919 + 13;
        let v = (0..layout.num_params())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // coarse values: many magnitude ties
                ((s >> 59) as f32 - 16.0) * 0.25
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    fn run(
        base: &ParamVector,
        ms: &[&ParamVector],
        p: &[(f64, f64)],
        normalize: bool,
        rescale: bool,
    ) -> ParamVector {
        let m = registry().get("magnitude-prune").unwrap();
        let per: Vec<Vec<(&str, ParamValue)>> = p
            .iter()
            .map(|&(w, d)| vec![("weight", w.into()), ("density", d.into())])
            .collect();
        let g = vec![
            ("lambda", 1.5.into()),
            ("normalize", normalize.into()),
            ("rescale", rescale.into()),
        ];
        Merge::new(m, g, per).unwrap().run(Some(base), ms).unwrap()
    }

    /// Reference: k-th largest by repeatedly extracting the maximum
    /// (first occurrence wins ties), plain f64 sums.
    fn reference(
        base: &[f32],
        xs: &[&[f32]],
        p: &[(f64, f64)],
        normalize: bool,
        rescale: bool,
    ) -> Vec<f64> {
        let n = base.len();
        let mut acc = vec![0.0f64; n];
        for (x, &(w, d)) in xs.iter().zip(p) {
            let k = if d >= 1.0 {
                n
            } else {
                (d * n as f64).floor() as usize
            };
            let mut taken = vec![false; n];
            for _ in 0..k {
                let mut best: Option<usize> = None;
                for e in 0..n {
                    let m = (x[e] - base[e]).abs();
                    if !taken[e] && best.is_none_or(|b| m > (x[b] - base[b]).abs()) {
                        best = Some(e);
                    }
                }
                taken[best.unwrap()] = true;
            }
            let tau: Vec<f64> = (0..n).map(|e| x[e] as f64 - base[e] as f64).collect();
            let l1: f64 = tau.iter().map(|t| t.abs()).sum();
            let kept: f64 = (0..n).filter(|&e| taken[e]).map(|e| tau[e].abs()).sum();
            let s = if rescale && l1 >= 1e-7 && kept >= 1e-7 {
                l1 / kept
            } else {
                1.0
            };
            for e in 0..n {
                if taken[e] {
                    acc[e] += w * tau[e] * s;
                }
            }
        }
        let div = if normalize {
            p.iter().map(|q| q.0).sum::<f64>()
        } else {
            1.0
        };
        (0..n)
            .map(|e| base[e] as f64 + 1.5 * acc[e] / div)
            .collect()
    }

    #[test]
    fn matches_reference_with_ties() {
        let l = layout();
        let base = random(&l, 1);
        let ms: Vec<ParamVector> = (2..5).map(|k| random(&l, k)).collect();
        let refs: Vec<&ParamVector> = ms.iter().collect();
        for p in [
            [(1.0, 0.2), (0.5, 0.5), (1.0, 1.0)],
            [(2.0, 0.0), (-1.0, 0.33), (0.25, 0.9)],
        ] {
            for (normalize, rescale) in [(false, false), (true, true)] {
                let out = run(&base, &refs, &p, normalize, rescale);
                for (_, r) in l.float_tensors() {
                    let xs: Vec<&[f32]> =
                        ms.iter().map(|m| &m.values().unwrap()[r.clone()]).collect();
                    let want = reference(
                        &base.values().unwrap()[r.clone()],
                        &xs,
                        &p,
                        normalize,
                        rescale,
                    );
                    for (g, w) in out.values().unwrap()[r.clone()].iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                            "{p:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn density_one_is_task_arithmetic_and_zero_is_base() {
        let l = layout();
        let (base, x) = (random(&l, 7), random(&l, 8));
        let out = run(&base, &[&x], &[(1.0, 0.0)], false, false);
        assert_eq!(out.values().unwrap(), base.values().unwrap());
        let out = run(&base, &[&x], &[(1.0, 1.0)], false, false);
        for ((o, b), v) in out
            .values()
            .unwrap()
            .iter()
            .zip(base.values().unwrap())
            .zip(x.values().unwrap())
        {
            assert!((*o as f64 - (*b as f64 + 1.5 * (*v as f64 - *b as f64))).abs() < 1e-6);
        }
        // A zero-keep tensor is warned about.
        let m = registry().get("magnitude_prune").unwrap();
        let merge = Merge::new(m, vec![], vec![vec![("density", 0.1.into())]]).unwrap();
        let w = merge.warnings(&l, &[false]);
        assert!(w.iter().any(|w| w.contains("`b`")), "{w:?}");
    }
}
