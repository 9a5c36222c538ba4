//! # tensormerge-method-nuslerp
//!
//! `nuslerp`: spherical linear interpolation (Shoemake 1985, SIGGRAPH) of two
//! models with the interpolation factor taken from their weights, applied to
//! the whole tensor, to each row, or to each column, and optionally to task
//! vectors around a base (mergekit's `nuslerp`; no paper). With weights
//! `w_0, w_1`:
//!
//! ```text
//! t = w_1 / (w_0 + w_1)            (0.5 when |w_0 + w_1| < 1e-6)
//! v_i = x_i − b  (with a base),  x_i  (without)
//! for each vector pair (v0, v1):
//!   cos θ = v0·v1 / (max(‖v0‖, 1e-7) · max(‖v1‖, 1e-7))
//!   out   = (sin((1−t)θ) v0 + sin(tθ) v1) / sin θ,
//!           or (1−t) v0 + t v1 when |sin θ| < 1e-8 or cos θ < −0.9995
//! result = b + out  (with a base)
//! ```
//!
//! The vectors are: the whole flattened tensor (`nuslerp_flatten: true`, the
//! default); else the rows along the last dimension; else, with
//! `nuslerp_row_wise: true`, the slices along the first dimension (columns of
//! a matrix).
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_nuslerp as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let a = ParamVector::from_vec(layout.clone(), vec![1.0, 0.0]).unwrap();
//! let b = ParamVector::from_vec(layout.clone(), vec![0.0, 1.0]).unwrap();
//! let m = registry().get("nuslerp").unwrap();
//! let w = vec![vec![("weight", 2.0.into())], vec![("weight", 1.0.into())]];
//! let out = Merge::new(m, vec![], w).unwrap().run(None, &[&a, &b]).unwrap();
//! // t = 1/3: a third of the way along the quarter circle.
//! let (c, s) = (std::f32::consts::FRAC_PI_6.cos(), std::f32::consts::FRAC_PI_6.sin());
//! let v = out.values().unwrap();
//! assert!((v[0] - c).abs() < 1e-6 && (v[1] - s).abs() < 1e-6);
//! ```
//!
//! Differences from mergekit: nearly antiparallel vector pairs
//! (`cos θ < −0.9995`) fall back to linear interpolation too. mergekit only
//! does so when `|sin θ| < 1e-8`, and just outside that band the weights
//! `sin((1−t)θ)/sin θ` explode (a row of two entries can come out at 10⁸);
//! `slerp` uses the same 0.9995 threshold. The angle is computed in `f64`.
//! For tensors of more than two dimensions with `nuslerp_row_wise`,
//! the vectors run along the first dimension for each index of the others,
//! as mergekit's `transpose(0, -1)` gives.
#![deny(missing_docs)]

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec,
    register_method,
};

/// Cosines below `−ANTIPARALLEL` interpolate linearly: slerp's weights grow
/// like `1/sin θ` as the vectors approach opposite directions.
pub const ANTIPARALLEL: f64 = 0.9995;

/// The `nuslerp` method.
#[derive(Debug, Clone, Copy)]
pub struct NuSlerp;

static PARAMS: &[ParamSpec] = &[
    ParamSpec::per_model_float(
        "weight",
        f64::NEG_INFINITY,
        f64::INFINITY,
        Default::Required,
        "the model's weight; t = w_1 / (w_0 + w_1)",
    ),
    ParamSpec::global(
        "nuslerp_flatten",
        ParamKind::Bool,
        Default::Bool(true),
        "interpolate the whole tensor as one vector",
    ),
    ParamSpec::global(
        "nuslerp_row_wise",
        ParamKind::Bool,
        Default::Bool(false),
        "when not flattened: interpolate along the first dimension instead of the last",
    ),
];

static INFO: MethodInfo = MethodInfo {
    name: "nuslerp",
    summary: "SLERP of two models by their weights, per tensor, row or column, optionally around a base",
    paper: "Shoemake 1985 (SIGGRAPH, slerp); mergekit's nuslerp",
    base: BaseModel::Optional,
    min_models: 2,
    max_models: Some(2),
    params: PARAMS,
};

/// Interpolates `count` vector pairs of `len` elements; element `j` of
/// vector `k` is at `idx(k, j)`.
fn nuslerp(
    t: f64,
    v0: &dyn Fn(usize) -> f64,
    v1: &dyn Fn(usize) -> f64,
    (count, len): (usize, usize),
    idx: &dyn Fn(usize, usize) -> usize,
    out: &mut [f64],
) {
    for k in 0..count {
        let (mut n0, mut n1, mut dot) = (0.0f64, 0.0f64, 0.0f64);
        for j in 0..len {
            let (a, b) = (v0(idx(k, j)), v1(idx(k, j)));
            n0 += a * a;
            n1 += b * b;
            dot += a * b;
        }
        let cos = dot / n0.sqrt().max(1e-7) / n1.sqrt().max(1e-7);
        let theta = cos.clamp(-1.0, 1.0).acos();
        let sin = theta.sin();
        // Colinear (mergekit's |sin θ| < 1e-8) or nearly antiparallel (see
        // the crate docs): linear interpolation.
        let (s0, s1) = if sin.abs() < 1e-8 || cos < -ANTIPARALLEL {
            (1.0 - t, t)
        } else {
            (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
        };
        for j in 0..len {
            let e = idx(k, j);
            out[e] = s0 * v0(e) + s1 * v1(e);
        }
    }
}

impl MergeMethod for NuSlerp {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// Angles are properties of whole tensors, rows or columns.
    fn chunkable(&self) -> bool {
        false
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let ctx = chunk.tensor;
        let [x0, x1] = chunk.models else {
            return Err(MethodError::ModelCount {
                method: INFO.name.into(),
                expected: "exactly 2 (plus an optional base)".into(),
                got: chunk.models.len(),
            });
        };
        let (w0, w1) = (ctx.models[0].f64("weight")?, ctx.models[1].f64("weight")?);
        let t = if (w0 + w1).abs() < 1e-6 {
            0.5
        } else {
            w1 / (w0 + w1)
        };
        let base = chunk.base;
        let b = |e: usize| base.map_or(0.0, |b| b[e] as f64);
        let v0 = |e: usize| x0[e] as f64 - b(e);
        let v1 = |e: usize| x1[e] as f64 - b(e);
        let numel = out.len();
        let flatten = ctx.global.bool("nuslerp_flatten")?;
        let row_wise = ctx.global.bool("nuslerp_row_wise")?;
        let mut res = vec![0.0f64; numel];
        let (first, last) = (
            ctx.shape.first().copied().unwrap_or(1),
            ctx.shape.last().copied().unwrap_or(1),
        );
        if flatten || ctx.shape.len() < 2 || numel == 0 {
            nuslerp(t, &v0, &v1, (1, numel), &|_, j| j, &mut res);
        } else if row_wise {
            let stride = numel / first;
            nuslerp(
                t,
                &v0,
                &v1,
                (stride, first),
                &|k, j| j * stride + k,
                &mut res,
            );
        } else {
            nuslerp(
                t,
                &v0,
                &v1,
                (numel / last, last),
                &|k, j| k * last + j,
                &mut res,
            );
        }
        for (e, (o, r)) in out.iter_mut().zip(&res).enumerate() {
            *o = (r + b(e)) as f32;
        }
        Ok(())
    }
}

register_method!(NuSlerp);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, ParamValue, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("m", vec![3, 4], DType::F32),
                TensorInfo::new("v", vec![5], DType::F32),
                TensorInfo::new("c", vec![2, 2, 3], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed.wrapping_mul(31) + 7;
        let v = (0..layout.num_params())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) as f32
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    fn run(
        w: (f64, f64),
        flatten: bool,
        row_wise: bool,
        base: Option<&ParamVector>,
        ms: [&ParamVector; 2],
    ) -> ParamVector {
        let m = registry().get("nuslerp").unwrap();
        let per: Vec<Vec<(&str, ParamValue)>> =
            vec![vec![("weight", w.0.into())], vec![("weight", w.1.into())]];
        Merge::new(
            m,
            vec![
                ("nuslerp_flatten", flatten.into()),
                ("nuslerp_row_wise", row_wise.into()),
            ],
            per,
        )
        .unwrap()
        .run(base, &ms)
        .unwrap()
    }

    /// Plain slerp of two explicit vectors (Shoemake's formula).
    fn slerp_ref(t: f64, a: &[f64], b: &[f64]) -> Vec<f64> {
        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let c: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / na / nb;
        let th = c.clamp(-1.0, 1.0).acos();
        if th.sin().abs() < 1e-8 || c < -0.9995 {
            return a
                .iter()
                .zip(b)
                .map(|(x, y)| (1.0 - t) * x + t * y)
                .collect();
        }
        a.iter()
            .zip(b)
            .map(|(x, y)| (((1.0 - t) * th).sin() * x + (t * th).sin() * y) / th.sin())
            .collect()
    }

    /// Reference for one tensor of shape `shape`: gather the vectors by
    /// explicit multi-dimensional indexing, slerp each, scatter back.
    fn reference(
        t: f64,
        shape: &[usize],
        mode: u8,
        base: Option<&[f32]>,
        x0: &[f32],
        x1: &[f32],
    ) -> Vec<f64> {
        let n: usize = shape.iter().product();
        let b = |e: usize| base.map_or(0.0, |b| b[e] as f64);
        let groups: Vec<Vec<usize>> = match mode {
            0 => vec![(0..n).collect()],
            1 => (0..n / shape[shape.len() - 1])
                .map(|r| {
                    (0..shape[shape.len() - 1])
                        .map(|j| r * shape[shape.len() - 1] + j)
                        .collect()
                })
                .collect(),
            _ => (0..n / shape[0])
                .map(|k| (0..shape[0]).map(|i| i * (n / shape[0]) + k).collect())
                .collect(),
        };
        let mut out = vec![0.0; n];
        for g in groups {
            let a: Vec<f64> = g.iter().map(|&e| x0[e] as f64 - b(e)).collect();
            let c: Vec<f64> = g.iter().map(|&e| x1[e] as f64 - b(e)).collect();
            for (&e, v) in g.iter().zip(slerp_ref(t, &a, &c)) {
                out[e] = v + b(e);
            }
        }
        out
    }

    #[test]
    fn matches_reference_in_every_mode() {
        let l = layout();
        let (a, c, base) = (random(&l, 1), random(&l, 2), random(&l, 3));
        for (w, t) in [((1.0, 1.0), 0.5), ((3.0, 1.0), 0.25), ((1.0, -1.0), 0.5)] {
            for (flatten, row_wise, mode) in
                [(true, false, 0u8), (false, false, 1), (false, true, 2)]
            {
                for b in [None, Some(&base)] {
                    let out = run(w, flatten, row_wise, b, [&a, &c]);
                    for (info, r) in l.float_tensors() {
                        let mode = if info.shape.len() < 2 { 0 } else { mode };
                        let want = reference(
                            t,
                            &info.shape,
                            mode,
                            b.map(|b| &b.values().unwrap()[r.clone()]),
                            &a.values().unwrap()[r.clone()],
                            &c.values().unwrap()[r.clone()],
                        );
                        for (g, w) in out.values().unwrap()[r.clone()].iter().zip(&want) {
                            assert!((*g as f64 - w).abs() < 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn weights_at_the_ends_return_a_model() {
        let l = layout();
        let (a, c, base) = (random(&l, 4), random(&l, 5), random(&l, 6));
        let out = run((1.0, 0.0), true, false, None, [&a, &c]);
        assert_eq!(out.values().unwrap(), a.values().unwrap());
        let out = run((0.0, 2.0), false, false, None, [&a, &c]);
        assert_eq!(out.values().unwrap(), c.values().unwrap());
        // With a base, t = 0 gives base + (a − base) = a up to one rounding.
        let out = run((1.0, 0.0), false, true, Some(&base), [&a, &c]);
        for (o, v) in out.values().unwrap().iter().zip(a.values().unwrap()) {
            assert!((o - v).abs() < 1e-6);
        }
    }

    #[test]
    fn colinear_rows_fall_back_to_lerp() {
        let l = layout();
        let a = random(&l, 7);
        let c = &a * 2.0;
        let out = run((1.0, 1.0), false, false, None, [&a, &c]);
        for (o, v) in out.values().unwrap().iter().zip(a.values().unwrap()) {
            assert!((*o as f64 - 1.5 * *v as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn nearly_antiparallel_rows_do_not_explode() {
        let l = Arc::new(Layout::new(vec![TensorInfo::new("r", vec![2], DType::F32)]).unwrap());
        let a = ParamVector::from_vec(l.clone(), vec![1.0, 0.0]).unwrap();
        let c = ParamVector::from_vec(l.clone(), vec![-1.0, 2e-5]).unwrap();
        let out = run((1.0, 1.0), true, false, None, [&a, &c]);
        // sin θ ≈ 2e-5 > 1e-8: mergekit's weights would be ≈ 1/sin θ = 5·10⁴.
        let v = out.values().unwrap();
        assert!(v[0].abs() < 1e-6 && (v[1] - 1e-5).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn needs_two_models_with_weights() {
        let m = registry().get("nuslerp").unwrap();
        assert!(matches!(
            Merge::with_defaults(m, 2),
            Err(MethodError::MissingParameter { .. })
        ));
    }

    /// Precision on a tensor of 2^24 elements (issue #15), flattened (the
    /// default): one angle for the whole [4096, 4096] tensor of task vectors
    /// around a base of 0.5. `x0 = 0.5 + a` everywhere, `x1 = 0.5 + b` on
    /// three entries of four and `0.5 − b` on the fourth (as f32). The task
    /// vectors take three distinct values `d0`, `d1p`, `d1m` (the f32 values
    /// minus 0.5, exact in f64), so the norms and the dot product are counts
    /// times products: `‖v0‖² = n d0²`, `‖v1‖² = n (¾ d1p² + ¼ d1m²)`,
    /// `v0·v1 = n d0 (¾ d1p + ¼ d1m)`, and the answer is Shoemake's formula
    /// at `t = w1/(w0+w1) = 1/3`.
    ///
    /// Why f32 would fail: a running f32 sum of 2^24 such terms (one
    /// accumulator, or 8 or 16 lanes) is off by 0.6% to 14%, which moves the
    /// angle and the outputs (≈ 0.51) by ~1e-5 and more, against a tolerance
    /// of 1e-6 relative (5e-7 absolute; the f32 output itself rounds by
    /// 3e-8). Checked: with the three accumulators in f32 this test fails,
    /// worst relative error 5.1e-5 (2.6e-5 absolute).
    #[test]
    fn precision_2_24_nuslerp_whole_tensor_angle() {
        const N: usize = 1 << 24;
        let l = Arc::new(
            Layout::new(vec![TensorInfo::new("w", vec![4096, 4096], DType::F32)]).unwrap(),
        );
        let (a, b) = (0.01f32, 0.0123f32);
        let plus = |e: usize| e % 4 != 3;
        let x1 = |e: usize| if plus(e) { 0.5 + b } else { 0.5 - b };
        let base = ParamVector::from_vec(l.clone(), vec![0.5; N]).unwrap();
        let m0 = ParamVector::from_vec(l.clone(), vec![0.5 + a; N]).unwrap();
        let m1 = ParamVector::from_vec(l.clone(), (0..N).map(x1).collect()).unwrap();
        let out = run((2.0, 1.0), true, false, Some(&base), [&m0, &m1]);
        let t = 1.0 / 3.0;
        let d0 = (0.5 + a) as f64 - 0.5;
        let (d1p, d1m) = ((0.5 + b) as f64 - 0.5, (0.5 - b) as f64 - 0.5);
        let n = N as f64;
        let n0 = (n * d0 * d0).sqrt();
        let n1 = (n * (0.75 * d1p * d1p + 0.25 * d1m * d1m)).sqrt();
        let dot = n * d0 * (0.75 * d1p + 0.25 * d1m);
        let theta = (dot / n0 / n1).acos();
        let (p, q) = (
            ((1.0 - t) * theta).sin() / theta.sin(),
            (t * theta).sin() / theta.sin(),
        );
        let (worst, at) =
            tensormerge_methods::testkit::worst_relative_error(out.values().unwrap(), |e| {
                Some(0.5 + p * d0 + q * if plus(e) { d1p } else { d1m })
            });
        assert!(
            worst < 1e-6,
            "worst relative error {worst:e} at entry {at}: got {}",
            out.values().unwrap()[at]
        );
    }
}
