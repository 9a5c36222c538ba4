//! # tensormerge-method-karcher
//!
//! `karcher`: the weighted Karcher (Fréchet) mean of the models' directions on
//! the unit hypersphere, scaled by their weighted mean norm (Karcher 1977,
//! "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl.
//! Math. 30(5); as in mergekit's `karcher`). Per tensor, with
//! `α_i = w_i / Σ w_j` and unit directions `u_i = x_i / ‖x_i‖`:
//!
//! ```text
//! μ = argmin_{‖μ‖=1} Σ α_i · arccos(μ·u_i)²
//! out = (Σ α_i ‖x_i‖) · μ
//! ```
//!
//! found by Riemannian gradient descent from the normalised weighted average:
//! `g = Σ α_i θ_i / sin θ_i · (u_i − cos θ_i · μ)` (the log map), then
//! `μ ← cos‖g‖ · μ + sin‖g‖ · g/‖g‖` (the exponential map), until `‖g‖ < tol`
//! or `max_iter` steps. Models whose tensor norm is below `tol` do not pull on
//! the direction.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_karcher as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let a = ParamVector::from_vec(layout.clone(), vec![2.0, 0.0]).unwrap();
//! let b = ParamVector::from_vec(layout.clone(), vec![0.0, 2.0]).unwrap();
//! let m = registry().get("karcher").unwrap();
//! let out = Merge::with_defaults(m, 2).unwrap().run(None, &[&a, &b]).unwrap();
//! // The geodesic midpoint, at the mean norm 2.
//! let h = 2.0 * std::f32::consts::FRAC_1_SQRT_2;
//! assert!(out.values().unwrap().iter().all(|v| (v - h).abs() < 1e-5));
//! ```
//!
//! Differences from mergekit (deliberate): mergekit ignores the models'
//! weights and always uses `α_i = 1/N`; here each model's `weight` (default
//! 1, so the default behaviour is the same) sets `α_i`, which is what a
//! weighted Karcher mean is and what users writing `weight:` expect. The
//! iteration runs in `f64`. A base model, if given, is not merged.
#![deny(missing_docs)]

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec,
    register_method,
};

/// The `karcher` method.
#[derive(Debug, Clone, Copy)]
pub struct Karcher;

static PARAMS: &[ParamSpec] = &[
    ParamSpec::per_model_float(
        "weight",
        0.0,
        f64::INFINITY,
        Default::Float(1.0),
        "relative weight of the model in the mean (mergekit ignores it)",
    ),
    ParamSpec::global(
        "max_iter",
        ParamKind::Int {
            min: 0,
            max: 10_000,
        },
        Default::Int(10),
        "most gradient steps on the sphere",
    ),
    ParamSpec::global(
        "tol",
        ParamKind::Float {
            min: 0.0,
            max: f64::INFINITY,
        },
        Default::Float(1e-5),
        "stop when the gradient norm is below this; also the smallest norm that counts",
    ),
];

static INFO: MethodInfo = MethodInfo {
    name: "karcher",
    summary: "weighted Karcher (Riemannian) mean of the models' directions, scaled by their mean norm",
    paper: "Karcher 1977, Comm. Pure Appl. Math. 30(5) (Riemannian center of mass); mergekit's karcher",
    base: BaseModel::Unused,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

/// The start of every sum below: what `Iterator::sum` of `f64`s starts
/// from, so that each sum is bit for bit the sum of the plain loop it
/// replaces (the plain version is kept in the tests as the reference).
fn sum_start() -> f64 {
    std::iter::empty::<f64>().sum()
}

/// Elements per block: the per-element work of a sweep (divisions by the
/// norms, the tangent) is done a block at a time, where it vectorises, and
/// only the sequential sums run element by element.
const BLOCK: usize = 256;

/// Most models whose sequential sums one sweep carries side by side.
const LANES: usize = 4;

/// `block[j] = x[j] / norm`, in `f64`.
fn unit_block(x: &[f32], norm: f64, block: &mut [f64]) {
    for (u, &v) in block.iter_mut().zip(x) {
        *u = v as f64 / norm;
    }
}

/// The sequential sums `Σ_e x_k[e]²` of up to [`LANES`] models in one
/// sweep.
#[allow(clippy::needless_range_loop)] // `K` sums side by side, element by element
fn squares<const K: usize>(ms: &[&[f32]]) -> [f64; K] {
    let len = ms[0].len();
    let ms: [&[f32]; K] = std::array::from_fn(|k| &ms[k][..len]);
    let mut acc = [sum_start(); K];
    for e in 0..len {
        for k in 0..K {
            let x = ms[k][e] as f64;
            acc[k] += x * x;
        }
    }
    acc
}

/// One sweep over `mean`: first divides it by `div` when given (the
/// normalisation owed by the previous step), then the sequential dot
/// products `Σ_e mean[e] · x_k[e]/‖x_k‖` of up to [`LANES`] models.
fn dots<const K: usize>(
    mean: &mut [f64],
    div: Option<f64>,
    ms: &[&[f32]],
    norms: &[f64],
) -> [f64; K] {
    let mut acc = [sum_start(); K];
    let mut units = [[0.0f64; BLOCK]; K];
    for (b, mean) in mean.chunks_mut(BLOCK).enumerate() {
        let r = b * BLOCK..b * BLOCK + mean.len();
        if let Some(n) = div {
            mean.iter_mut().for_each(|m| *m /= n);
        }
        for k in 0..K {
            unit_block(&ms[k][r.clone()], norms[k], &mut units[k]);
        }
        for (j, &m) in mean.iter().enumerate() {
            for k in 0..K {
                acc[k] += m * units[k][j];
            }
        }
    }
    acc
}

/// Runs `K`-lane kernel `f` on `ms` (1 to [`LANES`] models), returning one
/// value per model.
macro_rules! lanes {
    ($n:expr, $f:ident ( $($arg:expr),* )) => {
        match $n {
            1 => $f::<1>($($arg),*).to_vec(),
            2 => $f::<2>($($arg),*).to_vec(),
            3 => $f::<3>($($arg),*).to_vec(),
            4 => $f::<4>($($arg),*).to_vec(),
            _ => unreachable!("groups hold 1 to {LANES} models"),
        }
    };
}

/// The models that pull in one gradient step: (model, `cos θ`, coefficient
/// `α θ / sin θ`).
type Pull = Vec<(usize, f64, f64)>;

/// The tangent `g = Σ c_i (u_i − cos θ_i · mean)` on one block, in model
/// order.
fn tangent_block(
    models: &[&[f32]],
    norms: &[f64],
    pull: &Pull,
    r: std::ops::Range<usize>,
    mean: &[f64],
    t: &mut [f64],
) {
    let t = &mut t[..mean.len()];
    t.fill(0.0);
    for &(i, d, c) in pull {
        let (x, n) = (&models[i][r.clone()], norms[i]);
        for ((t, &m), &x) in t.iter_mut().zip(mean).zip(x) {
            *t += c * (x as f64 / n - d * m);
        }
    }
}

/// The weighted Karcher mean of `models` (weights `alphas`, any positive
/// scale) into `out`.
///
/// Each gradient step is three sweeps over the tensor: the dot products of
/// all models at once (with the previous step's normalisation folded in),
/// the tangent's norm (writing the output as it stands, in case this is the
/// last step), and the exponential map with the new mean's norm; the tangent
/// is recomputed where it is needed instead of stored. Every sum is
/// the same sequential `f64` sum, in the same order, as in the plain loop
/// over one quantity at a time (a test compares the two bit for bit).
pub fn karcher_mean(models: &[&[f32]], alphas: &[f64], max_iter: usize, tol: f64, out: &mut [f32]) {
    let mut mean = vec![0.0; out.len()];
    karcher_into(models, alphas, max_iter, tol, &mut mean, out, |v| v as f32);
}

/// [`karcher_mean`] with the running mean in `mean` (zeros, as long as
/// `out`: the merge lends it from its [`Scratch`](tensormerge_methods::Scratch),
/// so its pages are not allocated afresh for every tensor) and each output
/// entry made by `cast` from its `f64` value (the tests compare the `f64`
/// values themselves).
fn karcher_into<O>(
    models: &[&[f32]],
    alphas: &[f64],
    max_iter: usize,
    tol: f64,
    mean: &mut [f64],
    out: &mut [O],
    cast: impl Fn(f64) -> O,
) {
    let len = out.len();
    let total: f64 = alphas.iter().sum();
    let alphas: Vec<f64> = alphas.iter().map(|a| a / total).collect();
    let mut norms = Vec::with_capacity(models.len());
    for g in models.chunks(LANES) {
        norms.extend(lanes!(g.len(), squares(g)).into_iter().map(f64::sqrt));
    }
    let valid: Vec<usize> = (0..models.len())
        .filter(|&i| norms[i] > tol && alphas[i] > 0.0)
        .collect();
    if valid.is_empty() {
        out.iter_mut().for_each(|o| *o = cast(0.0));
        return;
    }
    let vsum: f64 = valid.iter().map(|&i| alphas[i]).sum();
    let blocks =
        |len: usize| (0..len.div_ceil(BLOCK)).map(move |b| b * BLOCK..(b * BLOCK + BLOCK).min(len));
    let mut t = [0.0f64; BLOCK];

    // The normalised weighted average, with its norm from the same sweep.
    let mut mn = sum_start();
    for r in blocks(len) {
        let m = &mut mean[r.clone()];
        for &i in &valid {
            let (a, x, n) = (alphas[i] / vsum, &models[i][r.clone()], norms[i]);
            for (m, &x) in m.iter_mut().zip(x) {
                *m += a * (x as f64 / n);
            }
        }
        m.iter().for_each(|m| mn += m * m);
    }
    let mn = mn.sqrt();
    // The division by the mean's norm still owed (done by the next sweep).
    let mut owed = None;
    if mn < tol {
        let (x, n) = (models[valid[0]], norms[valid[0]]);
        for r in blocks(len) {
            unit_block(&x[r.clone()], n, &mut mean[r]);
        }
    } else {
        owed = Some(mn);
    }

    let scale: f64 = alphas.iter().zip(&norms).map(|(a, n)| a * n).sum();
    let mut dot = vec![0.0; models.len()];
    for _ in 0..max_iter {
        for g in valid.chunks(LANES) {
            let ms: Vec<&[f32]> = g.iter().map(|&i| models[i]).collect();
            let ns: Vec<f64> = g.iter().map(|&i| norms[i]).collect();
            // Only the first group's sweep divides.
            let div = owed.take();
            for (&i, d) in g.iter().zip(lanes!(g.len(), dots(mean, div, &ms, &ns))) {
                dot[i] = d.clamp(-1.0, 1.0);
            }
        }
        let pull: Pull = valid
            .iter()
            .filter_map(|&i| {
                let theta = dot[i].acos();
                (theta >= tol).then(|| (i, dot[i], alphas[i] / vsum * theta / theta.sin()))
            })
            .collect();
        // The tangent's norm, and the output as it is if this is the last
        // step (the usual case for fine-tunes of one base: they lie close
        // together, and the first step finds the gradient below `tol`).
        let mut tn = sum_start();
        for r in blocks(len) {
            let m = &mean[r.clone()];
            for (o, &m) in out[r.clone()].iter_mut().zip(m) {
                *o = cast(scale * m);
            }
            tangent_block(models, &norms, &pull, r, m, &mut t);
            t[..m.len()].iter().for_each(|t| tn += t * t);
        }
        let tn = tn.sqrt();
        if tn < tol {
            return;
        }
        let (c, s) = (tn.cos(), tn.sin() / tn);
        let mut n = sum_start();
        for r in blocks(len) {
            let m = &mut mean[r.clone()];
            tangent_block(models, &norms, &pull, r, m, &mut t);
            for (m, t) in m.iter_mut().zip(&t) {
                *m = c * *m + s * t;
                n += *m * *m;
            }
        }
        let n = n.sqrt();
        if n > tol {
            owed = Some(n);
        }
    }
    let div = owed.unwrap_or(1.0);
    for (o, m) in out.iter_mut().zip(mean.iter()) {
        // `m / 1.0` is `m`, exactly.
        *o = cast(scale * (m / div));
    }
}

impl MergeMethod for Karcher {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// The mean is a property of whole tensors.
    fn chunkable(&self) -> bool {
        false
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let ctx = chunk.tensor;
        if let [only] = chunk.models {
            out.copy_from_slice(only);
            return Ok(());
        }
        let alphas = ctx
            .models
            .iter()
            .map(|p| p.f64("weight"))
            .collect::<Result<Vec<_>, _>>()?;
        if alphas.iter().sum::<f64>() <= 0.0 {
            return Err(MethodError::Invalid {
                method: INFO.name.into(),
                tensor: ctx.name.into(),
                message:
                    "the models' weights sum to zero; give at least one model a positive weight"
                        .into(),
            });
        }
        let max_iter = match ctx.global.get("max_iter") {
            Some(tensormerge_methods::ParamValue::Int(n)) => *n as usize,
            _ => {
                return Err(MethodError::MissingParameter {
                    method: INFO.name.into(),
                    param: "max_iter".into(),
                });
            }
        };
        let tol = ctx.global.f64("tol")?;
        let mut mean = chunk.scratch.f64s(out.len());
        karcher_into(chunk.models, &alphas, max_iter, tol, &mut mean, out, |v| {
            v as f32
        });
        Ok(())
    }
}

register_method!(Karcher);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![4, 3], DType::F32),
                TensorInfo::new("b", vec![6], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let v = (0..layout.num_params())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.3) as f32
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    fn run(weights: &[f64], iters: i64, tol: f64, models: &[&ParamVector]) -> ParamVector {
        let m = registry().get("karcher").unwrap();
        let per: Vec<Vec<(&str, tensormerge_methods::ParamValue)>> = weights
            .iter()
            .map(|w| vec![("weight", (*w).into())])
            .collect();
        Merge::new(
            m,
            vec![("max_iter", iters.into()), ("tol", tol.into())],
            per,
        )
        .unwrap()
        .run(None, models)
        .unwrap()
    }

    fn norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// The first version of [`karcher_mean`], one quantity per loop: the
    /// reference the faster one must equal bit for bit.
    fn reference_mean(
        models: &[&[f32]],
        alphas: &[f64],
        max_iter: usize,
        tol: f64,
        out: &mut [f64],
    ) {
        let len = out.len();
        let total: f64 = alphas.iter().sum();
        let alphas: Vec<f64> = alphas.iter().map(|a| a / total).collect();
        let norms: Vec<f64> = models
            .iter()
            .map(|m| m.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt())
            .collect();
        let valid: Vec<usize> = (0..models.len())
            .filter(|&i| norms[i] > tol && alphas[i] > 0.0)
            .collect();
        if valid.is_empty() {
            out.fill(0.0);
            return;
        }
        let vsum: f64 = valid.iter().map(|&i| alphas[i]).sum();
        let unit = |i: usize, e: usize| models[i][e] as f64 / norms[i];

        let mut mean = vec![0.0f64; len];
        for &i in &valid {
            let a = alphas[i] / vsum;
            for (e, m) in mean.iter_mut().enumerate() {
                *m += a * unit(i, e);
            }
        }
        let mn = norm(&mean);
        if mn < tol {
            let i = valid[0];
            for (e, m) in mean.iter_mut().enumerate() {
                *m = unit(i, e);
            }
        } else {
            mean.iter_mut().for_each(|m| *m /= mn);
        }

        let mut tangent = vec![0.0f64; len];
        for _ in 0..max_iter {
            tangent.fill(0.0);
            for &i in &valid {
                let dot = (0..len)
                    .map(|e| mean[e] * unit(i, e))
                    .sum::<f64>()
                    .clamp(-1.0, 1.0);
                let theta = dot.acos();
                if theta < tol {
                    continue;
                }
                let c = alphas[i] / vsum * theta / theta.sin();
                for (e, t) in tangent.iter_mut().enumerate() {
                    *t += c * (unit(i, e) - dot * mean[e]);
                }
            }
            let tn = norm(&tangent);
            if tn < tol {
                break;
            }
            let (c, s) = (tn.cos(), tn.sin() / tn);
            for (m, t) in mean.iter_mut().zip(&tangent) {
                *m = c * *m + s * t;
            }
            let n = norm(&mean);
            if n > tol {
                mean.iter_mut().for_each(|m| *m /= n);
            }
        }
        let scale: f64 = alphas.iter().zip(&norms).map(|(a, n)| a * n).sum();
        for (o, m) in out.iter_mut().zip(&mean) {
            *o = scale * m;
        }
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn two_models_follow_the_weighted_geodesic() {
        // For two points, the weighted Karcher mean lies on the geodesic at
        // fraction w_b/(w_a+w_b) of the angle from a: compare with that
        // closed form, computed from the angle directly.
        let l = layout();
        let (a, b) = (random(&l, 1), random(&l, 2));
        for (wa, wb) in [(1.0, 1.0), (1.0, 3.0), (0.2, 0.1)] {
            let out = run(&[wa, wb], 200, 1e-12, &[&a, &b]);
            for (_, r) in l.float_tensors() {
                let (x, y) = (
                    f64s(&a.values().unwrap()[r.clone()]),
                    f64s(&b.values().unwrap()[r.clone()]),
                );
                let (nx, ny) = (
                    x.iter().map(|v| v * v).sum::<f64>().sqrt(),
                    y.iter().map(|v| v * v).sum::<f64>().sqrt(),
                );
                let theta = (x.iter().zip(&y).map(|(p, q)| p * q).sum::<f64>() / nx / ny).acos();
                let f = wb / (wa + wb);
                let scale = (wa * nx + wb * ny) / (wa + wb);
                // orthonormal basis of the plane: e1 = x̂, e2 = (ŷ − cosθ x̂)/sinθ
                for (e, o) in out.values().unwrap()[r.clone()].iter().enumerate() {
                    let e1 = x[e] / nx;
                    let e2 = (y[e] / ny - theta.cos() * e1) / theta.sin();
                    let want = scale * ((f * theta).cos() * e1 + (f * theta).sin() * e2);
                    assert!((*o as f64 - want).abs() < 1e-5, "{o} vs {want}");
                }
            }
        }
    }

    #[test]
    fn three_models_satisfy_the_optimality_condition() {
        // At the Karcher mean the weighted log maps sum to zero.
        let l = layout();
        let ms = [random(&l, 3), random(&l, 4), random(&l, 5)];
        let w = [1.0, 2.0, 0.5];
        let out = run(&w, 500, 1e-13, &[&ms[0], &ms[1], &ms[2]]);
        for (_, r) in l.float_tensors() {
            let o = f64s(&out.values().unwrap()[r.clone()]);
            let no = o.iter().map(|v| v * v).sum::<f64>().sqrt();
            let mu: Vec<f64> = o.iter().map(|v| v / no).collect();
            let mut g = vec![0.0; mu.len()];
            let mut scale = 0.0;
            for (m, wi) in ms.iter().zip(w) {
                let x = f64s(&m.values().unwrap()[r.clone()]);
                let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
                scale += wi / 3.5 * nx;
                let c: f64 = x.iter().zip(&mu).map(|(p, q)| p / nx * q).sum();
                let th = c.acos();
                for e in 0..g.len() {
                    g[e] += wi * th / th.sin() * (x[e] / nx - c * mu[e]);
                }
            }
            assert!(g.iter().map(|v| v * v).sum::<f64>().sqrt() < 1e-4);
            assert!((no - scale).abs() < 1e-5 * scale);
        }
    }

    #[test]
    fn identities() {
        let l = layout();
        let x = random(&l, 6);
        // N copies give the copy back (up to rounding).
        let out = run(&[1.0, 2.0, 3.0], 10, 1e-5, &[&x, &x, &x]);
        for (o, v) in out.values().unwrap().iter().zip(x.values().unwrap()) {
            assert!((o - v).abs() < 1e-6);
        }
        // A zero-weight model does not matter.
        let y = random(&l, 7);
        let z = random(&l, 8);
        let with = run(&[1.0, 1.0, 0.0], 50, 1e-10, &[&x, &y, &z]);
        let without = run(&[1.0, 1.0], 50, 1e-10, &[&x, &y]);
        for (p, q) in with.values().unwrap().iter().zip(without.values().unwrap()) {
            assert!((p - q).abs() < 1e-6);
        }
        // One model: itself, exactly.
        assert_eq!(
            run(&[1.0], 10, 1e-5, &[&x]).values().unwrap(),
            x.values().unwrap()
        );
    }

    #[test]
    fn zero_weights_and_zero_tensors() {
        let l = layout();
        let x = random(&l, 9);
        let m = registry().get("karcher").unwrap();
        let merge = Merge::new(m, vec![], vec![vec![("weight", 0.0.into())]; 2]).unwrap();
        assert!(matches!(
            merge.run(None, &[&x, &x]),
            Err(MethodError::Invalid { .. })
        ));
        let zero = ParamVector::zeros(l.clone());
        let out = run(&[1.0, 1.0], 10, 1e-5, &[&zero, &zero]);
        assert!(out.values().unwrap().iter().all(|v| *v == 0.0));
        // A zero model pulls nothing but halves the scale.
        let out = run(&[1.0, 1.0], 10, 1e-5, &[&x, &zero]);
        for (o, v) in out.values().unwrap().iter().zip(x.values().unwrap()) {
            assert!((o - 0.5 * v).abs() < 1e-6);
        }
    }

    /// The blocked, fused sweeps give exactly the bits of the plain loops,
    /// compared before the final rounding to `f32` (which would hide most
    /// differences of an `f64` ulp):
    /// 1 to 6 models (one and two groups of lanes), lengths around the
    /// block size, models near each other (few steps), far apart (many
    /// steps), with a zero model, a zero weight and `max_iter` 0.
    #[test]
    fn equals_the_plain_loops_bit_for_bit() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for len in [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            for count in 1..=6 {
                for spread in [0.01, 1.0] {
                    let common: Vec<f64> = (0..len).map(|_| next()).collect();
                    let models: Vec<Vec<f32>> = (0..count)
                        .map(|_| {
                            common
                                .iter()
                                .map(|c| (c + spread * next()) as f32)
                                .collect()
                        })
                        .collect();
                    let mut alphas: Vec<f64> = (0..count).map(|_| next() + 0.6).collect();
                    let mut refs: Vec<&[f32]> = models.iter().map(|m| &m[..]).collect();
                    let zero = vec![0.0f32; len];
                    if count == 4 {
                        refs[1] = &zero;
                    }
                    if count == 5 {
                        alphas[2] = 0.0;
                    }
                    for (iters, tol) in [(0, 1e-5), (10, 1e-5), (100, 1e-14)] {
                        let mut fast = vec![0.0f64; len];
                        let mut plain = vec![0.0f64; len];
                        let mut mean = vec![0.0; len];
                        karcher_into(&refs, &alphas, iters, tol, &mut mean, &mut fast, |v| v);
                        reference_mean(&refs, &alphas, iters, tol, &mut plain);
                        let (f, p): (Vec<u64>, Vec<u64>) = (
                            fast.iter().map(|v| v.to_bits()).collect(),
                            plain.iter().map(|v| v.to_bits()).collect(),
                        );
                        assert_eq!(
                            f, p,
                            "len {len}, {count} models, spread {spread}, {iters} steps"
                        );
                    }
                }
            }
        }
    }

    /// Precision on a tensor of 2^24 elements (issue #15): norms and dot
    /// products over the whole [4096, 4096] tensor. Two models, weights 1
    /// and 3: `x1 = a` everywhere, `x2 = b` on three entries of four and `−b`
    /// on the fourth, so `‖x1‖ = a√n`, `‖x2‖ = b√n`, `cos θ = 1/2` exactly
    /// (`θ = π/3`). Two points lie on one geodesic, where the weighted
    /// Karcher mean is the point at `¾ θ` from `x̂1` (one gradient step
    /// reaches it exactly), so the answer is
    /// `(¼ ‖x1‖ + ¾ ‖x2‖) · (cos(¾θ) e1 + sin(¾θ) e2)` with
    /// `e1 = x̂1`, `e2 = (x̂2 − cos θ x̂1)/sin θ`: two distinct values.
    ///
    /// Why f32 would fail: a running f32 sum of 2^24 terms a² or b² (one
    /// accumulator, or 8 or 16 lanes) is off by 0.6% to 14%, so the scale
    /// and every output are off by ~0.3% and more (and the unit vectors are
    /// not unit), against a tolerance of 1e-6 relative. Checked: this test
    /// fails with the models' norms summed in f32 (worst relative error
    /// 4.3e-2), and with those, `norm` and the dot products in f32 (1.5e-1).
    #[test]
    fn precision_2_24_karcher_whole_tensor_norms() {
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
        let out = run(&[1.0, 3.0], 10, 1e-8, &[&x1, &x2]);
        let rn = (N as f64).sqrt();
        let scale = 0.25 * a as f64 * rn + 0.75 * b as f64 * rn;
        let (theta, f) = (std::f64::consts::FRAC_PI_3, 0.75);
        // μ = cos(fθ) e1 + sin(fθ) e2, entry by entry (x̂1 = 1/√n, x̂2 = ±1/√n).
        let mu =
            |s: f64| ((f * theta).cos() + (f * theta).sin() * (s - theta.cos()) / theta.sin()) / rn;
        let (mp, mm) = (scale * mu(1.0), scale * mu(-1.0));
        let (worst, at) =
            tensormerge_methods::testkit::worst_relative_error(out.values().unwrap(), |e| {
                Some(if plus(e) { mp } else { mm })
            });
        assert!(
            worst < 1e-6,
            "worst relative error {worst:e} at entry {at}: got {}",
            out.values().unwrap()[at]
        );
    }
}
