//! # tensormerge-method-slerp
//!
//! `slerp`: spherical linear interpolation between two models (Shoemake 1985,
//! "Animating rotation with quaternion curves", SIGGRAPH; as used for model
//! merging by mergekit). Each tensor is treated as one vector:
//!
//! ```text
//! cos θ = (v0/‖v0‖) · (v1/‖v1‖)
//! out   = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1
//! ```
//!
//! and when the directions are nearly parallel (`|cos θ| > 0.9995`) the
//! result falls back to linear interpolation `(1−t)·v0 + t·v1`.
//!
//! The two endpoints are the base model (`t = 0`) and the one other model
//! (`t = 1`), as in mergekit, whose configs list the base among the
//! `models` (the engine takes it out of the model list). `t` is a global parameter, so layer
//! gradients (`t: [0, 0.5, 1]`) and filters apply to it.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_slerp as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let a = ParamVector::from_vec(layout.clone(), vec![1.0, 0.0]).unwrap();
//! let b = ParamVector::from_vec(layout.clone(), vec![0.0, 1.0]).unwrap();
//! let slerp = registry().get("slerp").unwrap();
//! let merge = Merge::new(slerp, vec![("t", 0.5.into())], vec![vec![]]).unwrap();
//! let out = merge.run(Some(&a), &[&b]).unwrap();
//! let h = std::f32::consts::FRAC_1_SQRT_2;
//! assert!(out.values().unwrap().iter().all(|v| (v - h).abs() < 1e-6));
//! ```
//!
//! Differences from mergekit: none in the formula. Norms and the dot product
//! are accumulated in `f64` (mergekit uses the tensor's float32 numpy copy);
//! the interpolation itself is computed in `f64` and rounded once.
//!
//! ## Memory
//!
//! The angle is a property of the whole tensor, but the tensor is not held
//! whole: a per-tensor pass ([`MergeMethod::tensor_pass`]) adds up the two
//! norms and the dot product chunk by chunk ([`Sums`]), in element order, so
//! the sums (and the output) are bit for bit those of one loop over the
//! whole tensor; the merge then interpolates each chunk with the tensor's
//! two weights. Memory is the engine's chunks, not three copies of the
//! largest tensor (`cargo xtask bench` on GPT-2 small, whose embedding has
//! 38.6M elements: 478 MiB peak RSS before, 17 MiB now). The price: a
//! tensor larger than one chunk is read twice (the pass, then the merge),
//! as for every method with a per-tensor pass; the bench's wall time did
//! not grow (1.15 s before, 1.03 – 1.12 s now).
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Stats,
    StatsPass, TensorContext, register_method,
};

/// Cosines above this (in absolute value) interpolate linearly (mergekit's
/// `DOT_THRESHOLD`).
pub const DOT_THRESHOLD: f64 = 0.9995;

/// Norms at or below this are not normalised (mergekit's `eps`).
pub const NORM_EPS: f64 = 1e-8;

/// The `slerp` method.
#[derive(Debug, Clone, Copy)]
pub struct Slerp;

static PARAMS: &[ParamSpec] = &[ParamSpec::global(
    "t",
    ParamKind::Float {
        min: f64::NEG_INFINITY,
        max: f64::INFINITY,
    },
    Default::Required,
    "interpolation factor: 0 gives the first model (the base), 1 the second",
)];

static INFO: MethodInfo = MethodInfo {
    name: "slerp",
    summary: "spherical linear interpolation from the base (t = 0) to one model (t = 1), linear when nearly parallel",
    paper: "Shoemake 1985 (SIGGRAPH, quaternion slerp); mergekit's slerp",
    base: BaseModel::Required,
    min_models: 1,
    max_models: Some(1),
    params: PARAMS,
};

/// Spherical interpolation of `v0` and `v1` at `t` into `out` (all the same
/// length), with mergekit's near-parallel fallback to linear interpolation.
pub fn slerp(t: f64, v0: &[f32], v1: &[f32], out: &mut [f32]) {
    let mut sums = Sums::default();
    sums.add(v0, v1);
    interpolate(sums.weights(t), v0, v1, out);
}

/// The squared norms of the two endpoints and their dot product, summed in
/// `f64` one element after the other: adding the chunks of a tensor in
/// order gives exactly the sums of one loop over the whole tensor.
///
/// ```
/// use tensormerge_method_slerp::Sums;
/// let (v0, v1) = ([1.0f32, 0.0, 2.0], [0.0f32, 1.0, 2.0]);
/// let mut whole = Sums::default();
/// whole.add(&v0, &v1);
/// let mut parts = Sums::default();
/// parts.add(&v0[..1], &v1[..1]);
/// parts.add(&v0[1..], &v1[1..]);
/// assert_eq!(whole, parts);
/// // cos θ = 4 / (√5 · √5): not nearly parallel, so spherical weights.
/// let (s0, s1) = whole.weights(0.5);
/// assert!((s0 - s1).abs() < 1e-12 && s0 > 0.5);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    n0: f64,
    n1: f64,
    dot: f64,
}

impl Sums {
    /// Adds the elements of `v0` and `v1` (the same length), in order.
    pub fn add(&mut self, v0: &[f32], v1: &[f32]) {
        let (mut n0, mut n1, mut dot) = (self.n0, self.n1, self.dot);
        for (&a, &b) in v0.iter().zip(v1) {
            let (a, b) = (a as f64, b as f64);
            n0 += a * a;
            n1 += b * b;
            dot += a * b;
        }
        *self = Sums { n0, n1, dot };
    }

    /// The weights `(s0, s1)` of `out = s0·v0 + s1·v1` at `t`: Shoemake's
    /// `sin((1−t)θ)/sin θ` and `sin(tθ)/sin θ`, or `(1 − t, t)` when the
    /// directions are nearly parallel (`|cos θ| >` [`DOT_THRESHOLD`]) or the
    /// cosine is not finite.
    pub fn weights(&self, t: f64) -> (f64, f64) {
        let (n0, n1) = (self.n0.sqrt(), self.n1.sqrt());
        // Only norms above eps are divided out (a zero vector stays zero).
        let cos =
            self.dot / if n0 > NORM_EPS { n0 } else { 1.0 } / if n1 > NORM_EPS { n1 } else { 1.0 };
        if cos.abs() > DOT_THRESHOLD || !cos.is_finite() {
            (1.0 - t, t)
        } else {
            let theta = cos.acos();
            let sin = theta.sin();
            (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
        }
    }
}

/// `out = s0·v0 + s1·v1`, in `f64`, rounded once.
fn interpolate((s0, s1): (f64, f64), v0: &[f32], v1: &[f32], out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(v0).zip(v1) {
        *o = (s0 * a as f64 + s1 * b as f64) as f32;
    }
}

/// The per-tensor pass: [`Sums`] over the chunks, in order.
#[derive(Debug, Default)]
struct SumsPass {
    sums: Sums,
}

impl StatsPass for SumsPass {
    fn observe(&mut self, _sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let (base, x) = chunk.base_and_one_model(INFO.name)?;
        self.sums.add(base, x);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Ok(Arc::new(self.sums))
    }
}

impl MergeMethod for Slerp {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// The angle is a property of the whole tensor: its sums come from a
    /// per-tensor pass, so that the merge can take the tensor in chunks.
    fn tensor_pass(&self, _tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        Some(Box::new(SumsPass::default()))
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor.global.f64("t")?;
        let (base, x) = chunk.base_and_one_model(INFO.name)?;
        let sums = match chunk.tensor_stats {
            Some(stats) => *stats
                .downcast_ref::<Sums>()
                .ok_or_else(|| MethodError::Invalid {
                    method: INFO.name.into(),
                    tensor: chunk.tensor.name.into(),
                    message: "statistics of another method were passed in".into(),
                })?,
            None if chunk.is_whole() => {
                let mut sums = Sums::default();
                sums.add(base, x);
                sums
            }
            None => {
                return Err(MethodError::Invalid {
                    method: INFO.name.into(),
                    tensor: chunk.tensor.name.into(),
                    message: "a chunk of a tensor needs the per-tensor pass's sums, which were not computed".into(),
                });
            }
        };
        interpolate(sums.weights(t), base, x, out);
        Ok(())
    }
}

register_method!(Slerp);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, Params, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("a", vec![3, 4], DType::F32),
                TensorInfo::new("b", vec![5], DType::BF16),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v = (0..layout.num_params())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    fn run(
        t: f64,
        base: Option<&ParamVector>,
        models: &[&ParamVector],
    ) -> Result<ParamVector, MethodError> {
        let m = registry().get("slerp")?;
        Merge::new(m, vec![("t", t.into())], vec![vec![]; models.len()])?.run(base, models)
    }

    /// Reference in plain f64 loops: Shoemake's weights `p, q` applied to
    /// the original vectors, with the weights themselves checked against the
    /// geometric construction (rotate `â` by `tθ` towards `b̂` in the plane
    /// they span, via Gram–Schmidt): `p·â + q·b̂` must be that unit vector.
    fn reference(t: f64, a: &[f32], b: &[f32]) -> Vec<f64> {
        let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
        let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut c = 0.0;
        for i in 0..a.len() {
            c += a[i] / na * b[i] / nb;
        }
        if c.abs() > 0.9995 {
            return (0..a.len()).map(|i| (1.0 - t) * a[i] + t * b[i]).collect();
        }
        let theta = c.acos();
        // Orthonormal basis of the plane: â and the normalised part of b̂ ⟂ â.
        let ua: Vec<f64> = a.iter().map(|x| x / na).collect();
        let ub: Vec<f64> = b.iter().map(|x| x / nb).collect();
        let perp: Vec<f64> = (0..a.len()).map(|i| ub[i] - c * ua[i]).collect();
        let np = perp.iter().map(|x| x * x).sum::<f64>().sqrt();
        // direction at angle tθ on the unit sphere
        let dir: Vec<f64> = (0..a.len())
            .map(|i| (t * theta).cos() * ua[i] + (t * theta).sin() * perp[i] / np)
            .collect();
        let s = theta.sin();
        let (p, q) = (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s);
        // The trigonometric weights on the unit vectors give the rotated direction.
        let unit_mix: Vec<f64> = (0..a.len()).map(|i| p * ua[i] + q * ub[i]).collect();
        for i in 0..a.len() {
            assert!(
                (unit_mix[i] - dir[i]).abs() < 1e-9,
                "geometric and trigonometric slerp disagree"
            );
        }
        (0..a.len()).map(|i| p * a[i] + q * b[i]).collect()
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                (*g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "got {g}, want {w}"
            );
        }
    }

    #[test]
    fn matches_reference_per_tensor() {
        let l = layout();
        let (a, b) = (random(&l, 1), random(&l, 2));
        for t in [0.0, 0.25, 0.5, 0.9, 1.0, 1.3] {
            let out = run(t, Some(&a), &[&b]).unwrap();
            for (_, r) in l.float_tensors() {
                let want = reference(
                    t,
                    &a.values().unwrap()[r.clone()],
                    &b.values().unwrap()[r.clone()],
                );
                assert_close(&out.values().unwrap()[r], &want, 1e-6);
            }
        }
    }

    #[test]
    fn endpoints_are_exact() {
        let l = layout();
        let (a, b) = (random(&l, 3), random(&l, 4));
        assert_eq!(
            run(0.0, Some(&a), &[&b]).unwrap().values().unwrap(),
            a.values().unwrap()
        );
        assert_eq!(
            run(1.0, Some(&a), &[&b]).unwrap().values().unwrap(),
            b.values().unwrap()
        );
    }

    #[test]
    fn quarter_circle() {
        let mut out = [0.0f32; 2];
        slerp(1.0 / 3.0, &[2.0, 0.0], &[0.0, 2.0], &mut out);
        let (c, s) = (
            (std::f64::consts::PI / 6.0).cos(),
            (std::f64::consts::PI / 6.0).sin(),
        );
        assert_close(&out, &[2.0 * c, 2.0 * s], 1e-6);
    }

    #[test]
    fn near_parallel_falls_back_to_lerp() {
        let l = layout();
        let a = random(&l, 5);
        let b = &a * 3.0; // exactly parallel
        let out = run(0.25, Some(&a), &[&b]).unwrap();
        let want: Vec<f64> = a
            .values()
            .unwrap()
            .iter()
            .map(|&x| 0.75 * x as f64 + 0.25 * 3.0 * x as f64)
            .collect();
        assert_close(out.values().unwrap(), &want, 1e-6);
        // Antiparallel: lerp too (|cos| > threshold), no NaN.
        let c = &a * -1.0;
        let out = run(0.5, Some(&a), &[&c]).unwrap();
        assert!(out.values().unwrap().iter().all(|v| v.abs() < 1e-6));
    }

    #[test]
    fn zero_vector_does_not_make_nan() {
        let mut out = [0.0f32; 3];
        slerp(0.5, &[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0], &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn wrong_endpoint_counts_are_errors() {
        let l = layout();
        let (a, b, c) = (random(&l, 6), random(&l, 7), random(&l, 8));
        assert!(matches!(
            run(0.5, Some(&a), &[&b, &c]),
            Err(MethodError::ModelCount { .. })
        ));
        assert!(matches!(
            run(0.5, None, &[&a]),
            Err(MethodError::NeedsBase { .. })
        ));
        let m = registry().get("slerp").unwrap();
        assert!(matches!(
            Merge::with_defaults(m, 1),
            Err(MethodError::MissingParameter { .. })
        ));
    }

    /// A chunk that is not the whole tensor cannot be merged without the
    /// per-tensor pass's sums (its own sums would give another angle); a
    /// whole tensor can; a missing base or a second model is an error
    /// ([`Chunk::base_and_one_model`]).
    #[test]
    fn merge_errors_name_what_is_missing() {
        let (a, b) = ([1.0f32, 0.0, 0.5, 0.2], [0.0f32, 1.0, 0.5, 0.1]);
        let global = Params::resolve(
            "slerp",
            PARAMS,
            tensormerge_methods::Scope::Global,
            [("t", 0.5.into())],
        )
        .unwrap();
        let shape = [4];
        let tensor = TensorContext {
            name: "w",
            shape: &shape,
            global: &global,
            models: &[],
            seed: 0,
            model_stats: None,
        };
        let scratch = tensormerge_methods::Scratch::default();
        let models: [&[f32]; 1] = [&b[..2]];
        let chunk = Chunk {
            tensor: &tensor,
            offset: 0,
            base: Some(&a[..2]),
            models: &models,
            aux: &[None],
            base_aux: None,
            tensor_stats: None,
            scratch: &scratch,
        };
        let mut out = [0.0f32; 2];
        let err = Slerp.merge(&chunk, &mut out).unwrap_err();
        assert!(matches!(err, MethodError::Invalid { .. }), "{err}");
        // The whole tensor without the pass: its own sums, as `slerp`.
        let models: [&[f32]; 1] = [&b];
        let whole = Chunk {
            base: Some(&a),
            models: &models,
            ..chunk
        };
        let (mut got, mut want) = ([0.0f32; 4], [0.0f32; 4]);
        Slerp.merge(&whole, &mut got).unwrap();
        slerp(0.5, &a, &b, &mut want);
        assert_eq!(got, want);
        // No base, or two models besides it: errors that say which.
        let no_base = Chunk {
            base: None,
            ..whole
        };
        let err = Slerp.merge(&no_base, &mut got).unwrap_err();
        assert!(matches!(err, MethodError::NeedsBase { .. }), "{err}");
        let two: [&[f32]; 2] = [&b, &b];
        let two = Chunk {
            models: &two,
            aux: &[None, None],
            ..whole
        };
        let err = Slerp.merge(&two, &mut got).unwrap_err();
        assert!(
            matches!(err, MethodError::ModelCount { got: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("slerp"), "{err}");
    }

    #[test]
    fn chunk_length_does_not_matter() {
        let l = layout();
        let (a, b) = (random(&l, 9), random(&l, 10));
        let m = registry().get("slerp").unwrap();
        let merge = Merge::new(m, vec![("t", 0.3.into())], vec![vec![]]).unwrap();
        let whole = merge.run(Some(&a), &[&b]).unwrap();
        let chunked = merge.clone().chunk_len(3).run(Some(&a), &[&b]).unwrap();
        assert_eq!(whole.values().unwrap(), chunked.values().unwrap());
    }

    /// Precision on a tensor of 2^24 elements (issue #15): the two norms and
    /// the dot product of the whole [4096, 4096] tensor must be accumulated
    /// in f64 (or compensated). `v0 = a` on every entry, `v1 = b` on three
    /// entries of four and `−b` on the fourth, so `‖v0‖² = n a²`,
    /// `‖v1‖² = n b²` and `v0·v1 = n a b / 2`: `cos θ = 1/2` exactly,
    /// `θ = π/3`, and every output is `p·a ± q·b` with Shoemake's weights.
    ///
    /// Why f32 would fail: a running f32 sum stops resolving the terms once
    /// it reaches about 2^24 of them. Summing these 2^24 terms in f32 (one
    /// accumulator, or 8 or 16 lanes) is off by 0.6% to 14% (Σa²: +14%, Σb²:
    /// −11%, the dot: −0.7%, one accumulator), which moves cos θ and every
    /// output by orders of magnitude more than the tolerance, 1e-6 relative
    /// (f64 sums are off by at most about 2^24 · 2^-53 ≈ 2e-9). Checked: with
    /// `slerp`'s three accumulators in f32 this test fails, worst relative
    /// error 2.0e-3 with one f32 accumulator each and 3.2e-3 with 8 f32
    /// lanes. (Pairwise f32 summation would be exact here, all terms being
    /// equal; it is not what this guards against.)
    #[test]
    fn precision_2_24_slerp_whole_tensor_angle() {
        const N: usize = 1 << 24;
        let l = Arc::new(
            Layout::new(vec![TensorInfo::new("w", vec![4096, 4096], DType::F32)]).unwrap(),
        );
        let (a, b) = (0.01f32, 0.0123f32);
        let sign = |e: usize| if e % 4 == 3 { -1.0 } else { 1.0 };
        let v0 = ParamVector::from_vec(l.clone(), vec![a; N]).unwrap();
        let v1 =
            ParamVector::from_vec(l.clone(), (0..N).map(|e| sign(e) as f32 * b).collect()).unwrap();
        let t = 0.3;
        let out = run(t, Some(&v0), &[&v1]).unwrap();
        let theta = std::f64::consts::FRAC_PI_3;
        let (p, q) = (
            ((1.0 - t) * theta).sin() / theta.sin(),
            (t * theta).sin() / theta.sin(),
        );
        let (a, b) = (a as f64, b as f64);
        let (worst, at) =
            tensormerge_methods::testkit::worst_relative_error(out.values().unwrap(), |e| {
                Some(p * a + q * sign(e) * b)
            });
        assert!(
            worst < 1e-6,
            "worst relative error {worst:e} at entry {at}: got {}",
            out.values().unwrap()[at]
        );
    }
}
