//! # tensormerge-method-breadcrumbs
//!
//! `breadcrumbs` and `breadcrumbs_ties`: Model Breadcrumbs (Davari &
//! Belilovsky 2023, "Model Breadcrumbs: Scaling multi-task model merging with
//! sparse masks", arXiv:2312.06795). Each task vector `τ_i = x_i − b` is
//! masked per tensor: the largest `gamma` share of its magnitudes (outliers)
//! and the smallest entries are dropped so that a `density` share is kept
//! (arXiv:2312.06795, §3):
//!
//! ```text
//! keep_i = floor(d_i · n),  skip_i = min(floor(γ_i · n), n − keep_i)
//! τ̂_i    = τ_i on the entries ranked skip_i .. skip_i + keep_i by |τ_i| (largest first), 0 elsewhere
//! ```
//!
//! then `breadcrumbs` sums like task arithmetic, `out = b + λ Σ w_i τ̂_i`
//! (divided by `Σ w_i` when `normalize`), and `breadcrumbs_ties` applies the
//! TIES sign election and disjoint merge (Yadav et al. 2023,
//! arXiv:2306.01708) to `w_i τ̂_i`. With `rescale`, the kept entries are
//! scaled so each task vector keeps its L1 norm. `density ≥ 1` keeps
//! everything (outliers too), as in mergekit.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_breadcrumbs as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![5], DType::F32)]).unwrap());
//! let base = ParamVector::zeros(layout.clone());
//! let x = ParamVector::from_vec(layout, vec![9.0, 1.0, 4.0, -3.0, 2.0]).unwrap();
//! let m = registry().get("breadcrumbs").unwrap();
//! // Keep 3 of 5 after dropping the largest one (gamma 0.2).
//! let p = vec![vec![("density", 0.6.into()), ("gamma", 0.2.into())]];
//! let out = Merge::new(m, vec![], p).unwrap().run(Some(&base), &[&x]).unwrap();
//! assert_eq!(out.values().unwrap(), &[0.0, 0.0, 4.0, -3.0, 2.0]);
//! ```
//!
//! Differences from mergekit (deliberate):
//! - A tensor small enough that `floor(gamma · n) = 0` keeps its top
//!   `floor(density · n)` entries. mergekit slices `sorted[n_bot:-n_top]`,
//!   and with `n_top = 0` that slice is empty, so every small tensor (biases,
//!   norms) is zeroed wholesale.
//! - Ties in magnitude are broken by position (lower index ranks higher), so
//!   results do not depend on the sort algorithm.
//! - `weight` defaults to 1.0 (mergekit requires it); `int8_mask` is accepted
//!   and has no effect; a zero weight sum with `normalize` on `breadcrumbs`
//!   is an error naming the tensor (mergekit silently divides by 1).
//! - Tensors are merged in chunks: a per-tensor pass ([`trim::pass`]) finds
//!   each model's rank window by exact streaming top-k and, with `rescale`,
//!   the L1 norms, so memory does not grow with the tensor.
#![deny(missing_docs)]

pub mod trim;

use tensormerge_methods::ops::{self, Combine, Consensus, Rule};
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Params,
    StatsPass, TensorContext, register_method,
};

/// `breadcrumbs` (linear sum of the masked task vectors).
#[derive(Debug, Clone, Copy)]
pub struct Breadcrumbs;

/// `breadcrumbs_ties` (masked task vectors, TIES sign election).
#[derive(Debug, Clone, Copy)]
pub struct BreadcrumbsTies;

const WEIGHT: ParamSpec = ParamSpec::WEIGHT;
const DENSITY: ParamSpec = ParamSpec::per_model_float(
    "density",
    0.0,
    f64::INFINITY,
    Default::Float(1.0),
    "share of the task vector's entries kept (≥ 1 keeps all, outliers included)",
);
const GAMMA: ParamSpec = ParamSpec::per_model_float(
    "gamma",
    0.0,
    1.0,
    Default::Float(0.01),
    "share of the largest-magnitude entries dropped as outliers",
);
const LAMBDA: ParamSpec = ParamSpec::LAMBDA;
const RESCALE: ParamSpec = ParamSpec::global(
    "rescale",
    ParamKind::Bool,
    Default::Bool(false),
    "scale the kept entries so each task vector keeps its L1 norm",
);
const INT8_MASK: ParamSpec = ParamSpec::INT8_MASK;

static PARAMS: &[ParamSpec] = &[
    WEIGHT,
    DENSITY,
    GAMMA,
    LAMBDA,
    ParamSpec::global(
        "normalize",
        ParamKind::Bool,
        Default::Bool(false),
        "divide the weighted sum by the sum of the weights",
    ),
    RESCALE,
    INT8_MASK,
];

static PARAMS_TIES: &[ParamSpec] = &[
    WEIGHT,
    DENSITY,
    GAMMA,
    LAMBDA,
    ParamSpec::global(
        "normalize",
        ParamKind::Bool,
        Default::Bool(false),
        "divide by the sum of the weights of the agreeing models, per entry",
    ),
    RESCALE,
    ParamSpec::CONSENSUS,
    INT8_MASK,
];

static INFO: MethodInfo = MethodInfo {
    name: "breadcrumbs",
    summary: "drops each task vector's largest outliers and smallest entries, then adds them to the base",
    paper: "Davari & Belilovsky 2023, arXiv:2312.06795",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

static INFO_TIES: MethodInfo = MethodInfo {
    name: "breadcrumbs_ties",
    summary: "breadcrumbs masks, then TIES sign election and disjoint merge",
    paper: "Davari & Belilovsky 2023, arXiv:2312.06795; Yadav et al. 2023, arXiv:2306.01708",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS_TIES,
};

/// Each model's rank window for this tensor.
fn windows(t: &TensorContext<'_>) -> Result<Vec<(u64, u64)>, MethodError> {
    let n = t.numel() as u64;
    t.models
        .iter()
        .map(|p: &Params| Ok(trim::rank_window(n, p.f64("density")?, p.f64("gamma")?)))
        .collect()
}

fn run(
    info: &MethodInfo,
    rule: Rule,
    chunk: &Chunk<'_>,
    out: &mut [f32],
) -> Result<(), MethodError> {
    let t = chunk.tensor;
    let combine = Combine {
        weights: ops::weights(t, "weight")?,
        lambda: t.global.f64("lambda")?,
        normalize: t.global.bool("normalize")?,
        rule,
    };
    trim::merge_trimmed(info.name, chunk, &windows(t)?, &combine, out)
}

fn zero_keep_warnings(name: &str, t: &TensorContext<'_>) -> Vec<String> {
    let n = t.numel() as u64;
    windows(t)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter(|(i, (_, keep))| *keep == 0 && n > 0 && t.models[*i].f64("density").is_ok_and(|d| d > 0.0))
        .map(|(i, _)| {
            format!(
                "{name}: model {i} keeps none of the {n} entries of `{}` (floor(density · {n}) = 0)",
                t.name
            )
        })
        .collect()
}

impl MergeMethod for Breadcrumbs {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        let rescale = tensor.global.bool("rescale").ok()?;
        trim::pass(INFO.name, tensor, &windows(tensor).ok()?, rescale)
    }

    fn tensor_warnings(&self, tensor: &TensorContext<'_>, _has_aux: &[bool]) -> Vec<String> {
        zero_keep_warnings(INFO.name, tensor)
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        run(&INFO, Rule::Linear, chunk, out)
    }
}

impl MergeMethod for BreadcrumbsTies {
    fn info(&self) -> &'static MethodInfo {
        &INFO_TIES
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        let rescale = tensor.global.bool("rescale").ok()?;
        trim::pass(INFO_TIES.name, tensor, &windows(tensor).ok()?, rescale)
    }

    fn tensor_warnings(&self, tensor: &TensorContext<'_>, _has_aux: &[bool]) -> Vec<String> {
        zero_keep_warnings(INFO_TIES.name, tensor)
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let s = chunk.tensor.global.str("consensus")?;
        let consensus = Consensus::parse(s).ok_or_else(|| MethodError::OutOfRange {
            method: INFO_TIES.name.into(),
            param: "consensus".into(),
            value: s.into(),
            range: "sum or count".into(),
        })?;
        run(&INFO_TIES, Rule::Ties(consensus), chunk, out)
    }
}

register_method!(Breadcrumbs);
register_method!(BreadcrumbsTies);

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference loops are plain on purpose
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, ParamValue, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![10, 10], DType::F32),
                TensorInfo::new("bias", vec![7], DType::F32),
                TensorInfo::new("norm", vec![3], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64, quantum: f32) -> ParamVector {
        let mut s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let v = (0..layout.num_params())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let x = ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) as f32;
                // quantised values create magnitude ties
                if quantum > 0.0 {
                    (x / quantum).round() * quantum
                } else {
                    x
                }
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    /// Plain reference: sort indices by (|τ| desc, index asc), keep the
    /// window, then sum or elect with f64 loops.
    fn reference(
        base: &[f32],
        models: &[&[f32]],
        p: &[(f64, f64, f64)], // (weight, density, gamma)
        lambda: f64,
        normalize: bool,
        rescale: bool,
        ties: bool,
    ) -> Vec<f64> {
        let n = base.len();
        let mut masked: Vec<Vec<f64>> = vec![];
        for (x, &(_, d, g)) in models.iter().zip(p) {
            let tau: Vec<f64> = (0..n).map(|e| x[e] as f64 - base[e] as f64).collect();
            let mag: Vec<f32> = (0..n).map(|e| (x[e] - base[e]).abs()).collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| mag[b].partial_cmp(&mag[a]).unwrap().then(a.cmp(&b)));
            let (lo, hi) = if d >= 1.0 {
                (0, n)
            } else {
                let keep = (d * n as f64).floor() as usize;
                let skip = ((g * n as f64).floor() as usize).min(n - keep);
                (skip, skip + keep)
            };
            let mut m = vec![0.0; n];
            for &e in &order[lo..hi] {
                m[e] = tau[e];
            }
            if rescale {
                let before: f64 = tau.iter().map(|v| v.abs()).sum();
                let after: f64 = m.iter().map(|v| v.abs()).sum();
                if before >= 1e-7 && after >= 1e-7 {
                    m.iter_mut().for_each(|v| *v *= before / after);
                }
            }
            masked.push(m);
        }
        (0..n)
            .map(|e| {
                let merged = if ties {
                    let s: f64 = (0..models.len()).map(|i| p[i].0 * masked[i][e]).sum();
                    let (mut num, mut den) = (0.0, 0.0);
                    for i in 0..models.len() {
                        let d = p[i].0 * masked[i][e];
                        if d != 0.0 && (d > 0.0) == (s >= 0.0) {
                            num += d;
                            den += p[i].0;
                        }
                    }
                    if !normalize {
                        num
                    } else if den == 0.0 {
                        0.0
                    } else {
                        num / den
                    }
                } else {
                    let s: f64 = (0..models.len()).map(|i| p[i].0 * masked[i][e]).sum();
                    if normalize {
                        s / p.iter().map(|q| q.0).sum::<f64>()
                    } else {
                        s
                    }
                };
                base[e] as f64 + lambda * merged
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn run_method(
        name: &str,
        base: &ParamVector,
        models: &[&ParamVector],
        p: &[(f64, f64, f64)],
        lambda: f64,
        normalize: bool,
        rescale: bool,
    ) -> ParamVector {
        let m = registry().get(name).unwrap();
        let per: Vec<Vec<(&str, ParamValue)>> = p
            .iter()
            .map(|&(w, d, g)| {
                vec![
                    ("weight", w.into()),
                    ("density", d.into()),
                    ("gamma", g.into()),
                ]
            })
            .collect();
        let global = vec![
            ("lambda", lambda.into()),
            ("normalize", normalize.into()),
            ("rescale", rescale.into()),
        ];
        Merge::new(m, global, per)
            .unwrap()
            .run(Some(base), models)
            .unwrap()
    }

    #[test]
    fn matches_reference() {
        let l = layout();
        for quantum in [0.0, 0.125] {
            let base = random(&l, 1, quantum);
            let ms: Vec<ParamVector> = (2..5).map(|k| random(&l, k, quantum)).collect();
            let refs: Vec<&ParamVector> = ms.iter().collect();
            let cases: [&[(f64, f64, f64)]; 3] = [
                &[(1.0, 0.5, 0.1), (0.5, 0.3, 0.05), (2.0, 0.9, 0.0)],
                &[(1.0, 1.0, 0.1), (-0.5, 0.2, 0.5), (1.0, 0.0, 0.01)],
                &[(0.7, 0.95, 0.2), (0.7, 0.6, 0.3), (0.3, 0.1, 0.01)],
            ];
            for p in cases {
                for (name, ties) in [("breadcrumbs", false), ("breadcrumbs_ties", true)] {
                    for (normalize, rescale) in [(false, false), (true, true), (false, true)] {
                        let out = run_method(name, &base, &refs, p, 0.8, normalize, rescale);
                        for (_, r) in l.float_tensors() {
                            let xs: Vec<&[f32]> =
                                ms.iter().map(|m| &m.values().unwrap()[r.clone()]).collect();
                            let want = reference(
                                &base.values().unwrap()[r.clone()],
                                &xs,
                                p,
                                0.8,
                                normalize,
                                rescale,
                                ties,
                            );
                            for (g, w) in out.values().unwrap()[r.clone()].iter().zip(&want) {
                                assert!(
                                    (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                                    "{name} {p:?} n={normalize} r={rescale}: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_tensor_is_not_zeroed_when_outlier_count_rounds_to_zero() {
        // 7 and 3 entries at gamma 0.01: floor(0.01 · n) = 0 outliers.
        let l = layout();
        let base = random(&l, 10, 0.0);
        let x = random(&l, 11, 0.0);
        let out = run_method(
            "breadcrumbs",
            &base,
            &[&x],
            &[(1.0, 0.9, 0.01)],
            1.0,
            false,
            false,
        );
        let r = l.range("bias").unwrap();
        let changed = out.values().unwrap()[r.clone()]
            .iter()
            .zip(&base.values().unwrap()[r])
            .filter(|(o, b)| o != b)
            .count();
        assert_eq!(changed, 6, "floor(0.9 · 7) = 6 entries kept");
    }

    #[test]
    fn identities() {
        let l = layout();
        let (base, x) = (random(&l, 20, 0.0), random(&l, 21, 0.0));
        // density 1: task arithmetic (outliers kept).
        for name in ["breadcrumbs", "breadcrumbs_ties"] {
            let out = run_method(name, &base, &[&x], &[(1.0, 1.0, 0.5)], 1.0, false, false);
            for (o, v) in out.values().unwrap().iter().zip(x.values().unwrap()) {
                assert!((o - v).abs() < 1e-6);
            }
            // lambda 0: the base exactly.
            let out = run_method(name, &base, &[&x], &[(1.0, 0.5, 0.1)], 0.0, false, false);
            assert_eq!(out.values().unwrap(), base.values().unwrap());
        }
        // Kept fraction: exactly floor(d·n) non-zero deltas on the matrix.
        let out = run_method(
            "breadcrumbs",
            &base,
            &[&x],
            &[(1.0, 0.3, 0.1)],
            1.0,
            false,
            false,
        );
        let r = l.range("w").unwrap();
        let kept = out.values().unwrap()[r.clone()]
            .iter()
            .zip(&base.values().unwrap()[r])
            .filter(|(o, b)| o != b)
            .count();
        assert_eq!(kept, 30);
    }

    #[test]
    fn rank_window_follows_mergekit_counts() {
        assert_eq!(trim::rank_window(100, 0.9, 0.05), (5, 90));
        assert_eq!(trim::rank_window(100, 0.98, 0.05), (2, 98)); // outliers cut to reach the density
        assert_eq!(trim::rank_window(100, 1.0, 0.05), (0, 100));
        assert_eq!(trim::rank_window(7, 0.5, 0.01), (0, 3));
        assert_eq!(trim::rank_window(10, 0.0, 0.2), (2, 0));
    }
}
