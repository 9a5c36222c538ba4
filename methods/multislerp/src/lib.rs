//! # tensormerge-method-multislerp
//!
//! `multislerp`: barycentric interpolation of any number of models on the
//! hypersphere (Goddard 2025, "Multi-SLERP", goddard.blog; mergekit's
//! `multislerp`; no arXiv paper). Per tensor, with `v_i = x_i − b` when a base
//! is given (else `v_i = x_i`), weights `w_i` (divided by their sum when
//! `normalize_weights`), `n_i = ‖v_i‖` and `u_i = v_i / (n_i + eps)`:
//!
//! ```text
//! m   = Σ w_i u_i,  μ = m / ‖m‖              (weighted mean direction)
//! g   = Σ w_i (u_i − (u_i·μ) μ)              (tangent-space barycentre at μ)
//! out = b + (Σ w_i n_i) · exp_μ(g)
//! ```
//!
//! Since `Σ w_i (u_i·μ) = m·μ = ‖m‖`, the tangent barycentre
//! `g = m − ‖m‖ μ` is exactly zero, so `exp_μ(g) = μ`: the result is the
//! normalised weighted mean direction scaled by the weighted mean norm. We
//! compute that closed form (mergekit evaluates the tangent step numerically
//! and gets `g` equal to zero up to rounding; the results agree to within
//! `f32` rounding, checked by a test that runs the tangent-space steps).
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_multislerp as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let a = ParamVector::from_vec(layout.clone(), vec![1.0, 0.0]).unwrap();
//! let b = ParamVector::from_vec(layout.clone(), vec![0.0, 1.0]).unwrap();
//! let m = registry().get("multislerp").unwrap();
//! let w = vec![vec![("weight", 1.0.into())], vec![("weight", 1.0.into())]];
//! let out = Merge::new(m, vec![], w).unwrap().run(None, &[&a, &b]).unwrap();
//! let h = std::f32::consts::FRAC_1_SQRT_2;
//! assert!(out.values().unwrap().iter().all(|v| (v - h).abs() < 1e-6));
//! ```
//!
//! Differences from mergekit (deliberate): when the weighted mean direction
//! vanishes (`‖m‖ < eps`, e.g. `a` and `−a` at equal weights, or all task
//! vectors zero) the result falls back to linear interpolation
//! `b + Σ w_i v_i` for any number of models; mergekit does so for two models
//! and raises an error for more. A weight sum of zero with
//! `normalize_weights` is an error naming the tensor (mergekit divides by
//! zero). Reductions are in `f64`.
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::ops::BLOCK;
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Stats,
    StatsPass, TensorContext, register_method,
};

/// The `multislerp` method.
#[derive(Debug, Clone, Copy)]
pub struct MultiSlerp;

static PARAMS: &[ParamSpec] = &[
    ParamSpec::per_model_float(
        "weight",
        f64::NEG_INFINITY,
        f64::INFINITY,
        Default::Required,
        "the model's barycentric weight",
    ),
    ParamSpec::global(
        "normalize_weights",
        ParamKind::Bool,
        Default::Bool(true),
        "divide the weights by their sum",
    ),
    ParamSpec::global(
        "eps",
        ParamKind::Float {
            min: 0.0,
            max: f64::INFINITY,
        },
        Default::Float(1e-8),
        "small constant for numerical stability (norm offset, degenerate-mean threshold)",
    ),
];

static INFO: MethodInfo = MethodInfo {
    name: "multislerp",
    summary: "weighted spherical interpolation of any number of models (or task vectors, with a base)",
    paper: "Goddard 2025, Multi-SLERP (goddard.blog); mergekit's multislerp",
    base: BaseModel::Optional,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

/// The weights `w_i` of a tensor (divided by their sum when
/// `normalize_weights`).
fn weights(ctx: &TensorContext<'_>) -> Result<Vec<f64>, MethodError> {
    let mut w = ctx
        .models
        .iter()
        .map(|p| p.f64("weight"))
        .collect::<Result<Vec<_>, _>>()?;
    if ctx.global.bool("normalize_weights")? {
        let s: f64 = w.iter().sum();
        if s == 0.0 {
            return Err(MethodError::Invalid {
                method: INFO.name.into(),
                tensor: ctx.name.into(),
                message: "the weights sum to zero and `normalize_weights` is true".into(),
            });
        }
        w.iter_mut().for_each(|x| *x /= s);
    }
    Ok(w)
}

/// `v_i` at entry `e` of a chunk.
#[inline(always)]
fn v(chunk: &Chunk<'_>, i: usize, e: usize) -> f64 {
    chunk.models[i][e] as f64 - chunk.base.map_or(0.0, |b| b[e] as f64)
}

/// `Σ w_i u_i` for the entries `start..start + out.len()` of a chunk:
/// model by model over a block, so that the loop vectorises (the terms of
/// each entry are added in model order, as `Iterator::sum` adds them).
fn means(chunk: &Chunk<'_>, w: &[f64], norms: &[f64], eps: f64, start: usize, out: &mut [f64]) {
    let end = start + out.len();
    for (i, x) in chunk.models.iter().enumerate() {
        let (wi, d) = (w[i], norms[i] + eps);
        let x = &x[start..end];
        let term = |j: usize| {
            let v = x[j] as f64 - chunk.base.map_or(0.0, |b| b[start + j] as f64);
            wi * v / d
        };
        if i == 0 {
            for (j, o) in out.iter_mut().enumerate() {
                *o = term(j);
            }
        } else {
            for (j, o) in out.iter_mut().enumerate() {
                *o += term(j);
            }
        }
    }
}

/// What the pass finds: the weights, the norms `n_i`, `‖m‖` and `Σ w_i n_i`.
struct Norms {
    w: Vec<f64>,
    norms: Vec<f64>,
    mn: f64,
    scale: f64,
}

/// The per-tensor pass: sweep 0 sums `‖v_i‖²`, sweep 1 `‖m‖²`, each as one
/// running `f64` sum over the entries in order, carried from chunk to chunk,
/// so the sums are those of one loop over the whole tensor (and the merge is
/// element by element, in chunks).
struct NormPass {
    w: Vec<f64>,
    eps: f64,
    sq: Vec<f64>,
    norms: Vec<f64>,
    mn: f64,
}

impl StatsPass for NormPass {
    fn sweeps(&self) -> usize {
        2
    }

    fn observe(&mut self, sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let len = chunk.len();
        if sweep == 0 {
            // The models' running sums side by side: independent chains.
            for e in 0..len {
                for (i, s) in self.sq.iter_mut().enumerate() {
                    let v = v(chunk, i, e);
                    *s += v * v;
                }
            }
        } else {
            let mut m = [0.0f64; BLOCK];
            for start in (0..len).step_by(BLOCK) {
                let m = &mut m[..BLOCK.min(len - start)];
                means(chunk, &self.w, &self.norms, self.eps, start, m);
                for m in m.iter() {
                    self.mn += m * m;
                }
            }
        }
        Ok(())
    }

    fn end_sweep(&mut self, sweep: usize) -> Result<(), MethodError> {
        if sweep == 0 {
            self.norms = self.sq.iter().map(|s| s.sqrt()).collect();
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        let scale: f64 = self.w.iter().zip(&self.norms).map(|(a, b)| a * b).sum();
        Ok(Arc::new(Norms {
            w: self.w,
            norms: self.norms,
            mn: self.mn.sqrt(),
            scale,
        }))
    }
}

impl MergeMethod for MultiSlerp {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        if tensor.models.len() < 2 {
            return None;
        }
        let m = tensor.models.len();
        Some(Box::new(NormPass {
            w: weights(tensor).ok()?,
            eps: tensor.global.f64("eps").ok()?,
            sq: vec![0.0; m],
            norms: vec![0.0; m],
            mn: 0.0,
        }))
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let ctx = chunk.tensor;
        if let [only] = chunk.models {
            out.copy_from_slice(only);
            return Ok(());
        }
        let eps = ctx.global.f64("eps")?;
        weights(ctx)?; // the error, if any, of a pass that could not start
        let st = chunk
            .tensor_stats
            .and_then(|s| s.downcast_ref::<Norms>())
            .ok_or_else(|| MethodError::Invalid {
                method: INFO.name.into(),
                tensor: ctx.name.into(),
                message: "the norm pass did not run".into(),
            })?;
        let (w, n) = (&st.w, chunk.models.len());
        if st.mn < eps {
            for (e, o) in out.iter_mut().enumerate() {
                let r = (0..n).map(|i| w[i] * v(chunk, i, e)).sum::<f64>();
                *o = (r + chunk.base.map_or(0.0, |b| b[e] as f64)) as f32;
            }
            return Ok(());
        }
        let mut m = [0.0f64; BLOCK];
        for (start, out) in (0..out.len()).step_by(BLOCK).zip(out.chunks_mut(BLOCK)) {
            let m = &mut m[..out.len()];
            means(chunk, w, &st.norms, eps, start, m);
            for (j, (o, m)) in out.iter_mut().zip(m.iter()).enumerate() {
                let r = st.scale * m / st.mn;
                *o = (r + chunk.base.map_or(0.0, |b| b[start + j] as f64)) as f32;
            }
        }
        Ok(())
    }
}

register_method!(MultiSlerp);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, ParamValue, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![3, 5], DType::F32),
                TensorInfo::new("b", vec![4], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed ^ 0xDEAD_BEEF_CAFE;
        let v = (0..layout.num_params())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.4) as f32
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    fn run(
        weights: &[f64],
        normalize: bool,
        base: Option<&ParamVector>,
        models: &[&ParamVector],
    ) -> Result<ParamVector, MethodError> {
        let m = registry().get("multislerp")?;
        let per: Vec<Vec<(&str, ParamValue)>> = weights
            .iter()
            .map(|w| vec![("weight", (*w).into())])
            .collect();
        Merge::new(m, vec![("normalize_weights", normalize.into())], per)?.run(base, models)
    }

    /// mergekit's algorithm step by step in plain f64 loops: project to the
    /// sphere, tangent space at the mean, exponential map back.
    fn reference(
        weights: &[f64],
        normalize: bool,
        base: Option<&[f32]>,
        xs: &[&[f32]],
    ) -> Vec<f64> {
        let eps = 1e-8;
        let len = xs[0].len();
        let mut w = weights.to_vec();
        if normalize {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|x| *x /= s);
        }
        let vs: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| {
                (0..len)
                    .map(|e| x[e] as f64 - base.map_or(0.0, |b| b[e] as f64))
                    .collect()
            })
            .collect();
        let norms: Vec<f64> = vs
            .iter()
            .map(|v| v.iter().map(|a| a * a).sum::<f64>().sqrt())
            .collect();
        let units: Vec<Vec<f64>> = vs
            .iter()
            .zip(&norms)
            .map(|(v, n)| v.iter().map(|a| a / (n + eps)).collect())
            .collect();
        let mut mean = vec![0.0; len];
        for (u, wi) in units.iter().zip(&w) {
            for e in 0..len {
                mean[e] += wi * u[e];
            }
        }
        let mn = mean.iter().map(|a| a * a).sum::<f64>().sqrt();
        mean.iter_mut().for_each(|a| *a /= mn);
        let mut tr = vec![0.0; len];
        for (u, wi) in units.iter().zip(&w) {
            let d: f64 = u.iter().zip(&mean).map(|(a, b)| a * b).sum();
            for e in 0..len {
                tr[e] += wi * (u[e] - d * mean[e]);
            }
        }
        let tn = tr.iter().map(|a| a * a).sum::<f64>().sqrt() + eps;
        let avg: f64 = norms.iter().zip(&w).map(|(n, wi)| n * wi).sum();
        (0..len)
            .map(|e| {
                (mean[e] * tn.cos() + tr[e] * tn.sin() / tn) * avg
                    + base.map_or(0.0, |b| b[e] as f64)
            })
            .collect()
    }

    #[test]
    fn matches_the_tangent_space_algorithm() {
        let l = layout();
        let ms = [random(&l, 1), random(&l, 2), random(&l, 3)];
        let base = random(&l, 4);
        let refs: Vec<&ParamVector> = ms.iter().collect();
        for (w, norm) in [
            (vec![1.0, 1.0, 1.0], true),
            (vec![0.5, 2.0, 1.0], true),
            (vec![0.2, 0.3, 0.1], false),
        ] {
            for b in [None, Some(&base)] {
                let out = run(&w, norm, b, &refs).unwrap();
                for (_, r) in l.float_tensors() {
                    let xs: Vec<&[f32]> =
                        ms.iter().map(|m| &m.values().unwrap()[r.clone()]).collect();
                    let want = reference(&w, norm, b.map(|b| &b.values().unwrap()[r.clone()]), &xs);
                    for (g, w) in out.values().unwrap()[r.clone()].iter().zip(&want) {
                        assert!((*g as f64 - w).abs() < 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn two_orthogonal_equal_models_give_the_arc_midpoint() {
        let l = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
        let a = ParamVector::from_vec(l.clone(), vec![3.0, 0.0]).unwrap();
        let b = ParamVector::from_vec(l.clone(), vec![0.0, 3.0]).unwrap();
        let out = run(&[1.0, 1.0], true, None, &[&a, &b]).unwrap();
        for v in out.values().unwrap() {
            assert!((*v as f64 - 3.0 * std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        }
    }

    #[test]
    fn identities_and_degenerate_cases() {
        let l = layout();
        let (x, base) = (random(&l, 5), random(&l, 6));
        // Copies of one model come back (up to rounding), with or without base.
        for b in [None, Some(&base)] {
            let out = run(&[1.0, 2.0], true, b, &[&x, &x]).unwrap();
            for (o, v) in out.values().unwrap().iter().zip(x.values().unwrap()) {
                assert!((o - v).abs() < 1e-6);
            }
        }
        // One model: itself exactly.
        assert_eq!(
            run(&[0.3], true, None, &[&x]).unwrap().values().unwrap(),
            x.values().unwrap()
        );
        // Exactly antipodal models at equal weights: linear fallback (zero).
        let d = random(&l, 7);
        let out = run(&[1.0, 1.0], true, None, &[&d, &(&d * -1.0)]).unwrap();
        assert!(out.values().unwrap().iter().all(|v| *v == 0.0));
        // Also with three models (mergekit raises here).
        let out = run(&[1.0, 1.0, 1.0], true, Some(&base), &[&base, &base, &base]).unwrap();
        assert_eq!(out.values().unwrap(), base.values().unwrap());
        // Zero weight sum with normalisation: typed error.
        assert!(matches!(
            run(&[1.0, -1.0], true, None, &[&x, &base]),
            Err(MethodError::Invalid { .. })
        ));
        // Weight is required per model.
        let m = registry().get("multislerp").unwrap();
        assert!(matches!(
            Merge::with_defaults(m, 2),
            Err(MethodError::MissingParameter { .. })
        ));
    }

    /// Precision on a tensor of 2^24 elements (issue #15): the models' norms
    /// and the mean direction's norm are whole-tensor sums over [4096, 4096].
    /// Two models, no base, weights 1 and 3 (normalised to ¼, ¾): `x1 = a`
    /// everywhere, `x2 = b` on three entries of four and `−b` on the fourth.
    /// So `n1 = a√n`, `n2 = b√n`, `u1 = a/(n1 + eps)`,
    /// `u2 = ±b/(n2 + eps)`, the mean `m = ¼ u1 + ¾ u2` takes two values
    /// `m±` with `‖m‖² = n (¾ m+² + ¼ m−²)`, and every output is
    /// `(¼ n1 + ¾ n2) · m± / ‖m‖`.
    ///
    /// Why f32 would fail: a running f32 sum of 2^24 terms a² or b² (one
    /// accumulator, or 8 or 16 lanes) is off by 0.6% to 14%, so the norms,
    /// hence the scale `Σ w_i n_i` and every output, are off by ~0.3% and
    /// more, against a tolerance of 1e-6 relative. Checked: with the models'
    /// norms and `‖m‖` summed in f32 this test fails, worst relative error
    /// 9.0e-2.
    #[test]
    fn precision_2_24_multislerp_whole_tensor_norms() {
        const N: usize = 1 << 24;
        let l = Arc::new(
            Layout::new(vec![TensorInfo::new("w", vec![4096, 4096], DType::F32)]).unwrap(),
        );
        let (a, b) = (0.01f32, 0.0123f32);
        let plus = |e: usize| e % 4 != 3;
        let x1 = ParamVector::from_vec(l.clone(), vec![a; N]).unwrap();
        let x2 = ParamVector::from_vec(
            l.clone(),
            (0..N).map(|e| if plus(e) { b } else { -b }).collect(),
        )
        .unwrap();
        let out = run(&[1.0, 3.0], true, None, &[&x1, &x2]).unwrap();
        let (eps, n) = (1e-8, N as f64);
        let (a, b) = (a as f64, b as f64);
        let (n1, n2) = (a * n.sqrt(), b * n.sqrt());
        let (u1, u2) = (a / (n1 + eps), b / (n2 + eps));
        let (mp, mm) = (0.25 * u1 + 0.75 * u2, 0.25 * u1 - 0.75 * u2);
        let mn = (n * (0.75 * mp * mp + 0.25 * mm * mm)).sqrt();
        let scale = 0.25 * n1 + 0.75 * n2;
        let (worst, at) =
            tensormerge_methods::testkit::worst_relative_error(out.values().unwrap(), |e| {
                Some(scale * if plus(e) { mp } else { mm } / mn)
            });
        assert!(
            worst < 1e-6,
            "worst relative error {worst:e} at entry {at}: got {}",
            out.values().unwrap()[at]
        );
    }
}
