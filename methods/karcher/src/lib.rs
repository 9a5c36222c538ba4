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

use std::sync::Arc;
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Stats,
    StatsPass, TensorContext, register_method,
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

/// Elements per block: the mean is recomputed a block at a time (in cache),
/// and only the sequential sums run element by element.
const BLOCK: usize = 32;

/// Most sequential sums one loop carries side by side (in registers).
const LANES: usize = 4;

/// `acc[k] += term(k, j)` for `j` in `0..len`, in order: `acc.len()`
/// independent sequential `f64` sums, [`LANES`] of them side by side so that
/// their additions overlap. Each sum is bit for bit the plain loop's.
#[inline(always)]
fn chains(acc: &mut [f64], len: usize, term: impl Fn(usize, usize) -> f64) {
    #[inline(always)]
    fn group<const K: usize>(
        acc: &mut [f64],
        k0: usize,
        len: usize,
        term: &impl Fn(usize, usize) -> f64,
    ) {
        let mut a: [f64; K] = std::array::from_fn(|k| acc[k0 + k]);
        for j in 0..len {
            for (k, a) in a.iter_mut().enumerate() {
                *a += term(k0 + k, j);
            }
        }
        acc[k0..k0 + K].copy_from_slice(&a);
    }
    for k0 in (0..acc.len()).step_by(LANES) {
        match (acc.len() - k0).min(LANES) {
            1 => group::<1>(acc, k0, len, &term),
            2 => group::<2>(acc, k0, len, &term),
            3 => group::<3>(acc, k0, len, &term),
            _ => group::<4>(acc, k0, len, &term),
        }
    }
}

/// The models that pull in one gradient step: (position among the valid
/// models, `cos θ`, coefficient `α θ / sin θ`).
type Pull = Vec<(usize, f64, f64)>;

/// Where the iteration starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Start {
    /// The weighted average of the valid models' unit directions.
    Average,
    /// The unit direction of the first valid model (the average was near
    /// zero).
    Unit,
}

/// One gradient step: its pull, then `μ ← c μ + s g`.
#[derive(Debug, Clone)]
struct Step {
    pull: Pull,
    c: f64,
    s: f64,
}

/// What the per-tensor pass finds: every scalar of the iteration, from which
/// the mean at any entry is recomputed from the models' entries alone. The
/// mean after `k` steps is the start, then for each step `j < k`: divided by
/// `owed[j]` (the normalisation owed by what came before), the step; then
/// divided by `owed[k]`. Recomputing it costs `k` tangents per entry, where
/// a whole-tensor loop would store it: in exchange memory is a block, not
/// an `f64` copy of the tensor, and the tensor streams in chunks.
#[derive(Debug, Clone)]
struct Plan {
    /// `α_i = w_i / Σ w_j` of every model.
    alphas: Vec<f64>,
    /// `‖x_i‖` of every model.
    norms: Vec<f64>,
    /// The models that pull (norm above `tol`, positive weight), with
    /// `α_i / Σ_valid α_j`.
    valid: Vec<(usize, f64)>,
    /// `Σ α_i ‖x_i‖`.
    scale: f64,
    start: Start,
    /// The divisions owed: one more than there are `steps`.
    owed: Vec<Option<f64>>,
    /// The steps taken.
    steps: Vec<Step>,
}

impl Plan {
    /// The valid models' unit directions `x_i / ‖x_i‖` on the entries `r`
    /// of the models: valid model `v`'s in `u[v * BLOCK..][..r.len()]`.
    /// Each sweep divides once per entry and model, and everything else
    /// reads these.
    #[inline(always)]
    fn units(&self, models: &[&[f32]], r: std::ops::Range<usize>, u: &mut [f64]) {
        for (&(i, _), u) in self.valid.iter().zip(u.chunks_exact_mut(BLOCK)) {
            let n = self.norms[i];
            for (u, &x) in u.iter_mut().zip(&models[i][r.clone()]) {
                *u = x as f64 / n;
            }
        }
    }

    /// The mean after `k` steps (with `owed[k]` divided in, once known) on
    /// `len` entries with unit directions `u` (from [`units`](Self::units)),
    /// into `m`.
    #[inline(always)]
    fn mean(&self, u: &[f64], len: usize, k: usize, m: &mut [f64]) {
        let m = &mut m[..len];
        match self.start {
            Start::Average => {
                m.fill(0.0);
                for (&(_, a), u) in self.valid.iter().zip(u.chunks_exact(BLOCK)) {
                    for (m, &u) in m.iter_mut().zip(u) {
                        *m += a * u;
                    }
                }
            }
            Start::Unit => m.copy_from_slice(&u[..len]),
        }
        let mut t = [0.0f64; BLOCK];
        for (j, step) in self.steps[..k].iter().enumerate() {
            divide(m, self.owed[j]);
            tangent(u, &step.pull, m, &mut t);
            for (m, t) in m.iter_mut().zip(&t) {
                *m = step.c * *m + step.s * t;
            }
        }
        // Not known yet while the start's norm is being found.
        divide(m, self.owed.get(k).copied().flatten());
    }
}

/// The tangent `g = Σ c_i (u_i − cos θ_i · μ)` at the mean `m`, in model
/// order, from the unit directions `u` (as in [`Plan::units`]).
#[inline(always)]
fn tangent(u: &[f64], pull: &Pull, m: &[f64], t: &mut [f64]) {
    let t = &mut t[..m.len()];
    t.fill(0.0);
    for &(v, d, c) in pull {
        let u = &u[v * BLOCK..][..m.len()];
        for ((t, &m), &u) in t.iter_mut().zip(m).zip(u) {
            *t += c * (u - d * m);
        }
    }
}

/// `m /= d`, when a division is owed.
#[inline(always)]
fn divide(m: &mut [f64], d: Option<f64>) {
    if let Some(d) = d {
        m.iter_mut().for_each(|m| *m /= d);
    }
}

/// Which sum the coming sweep takes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sweep {
    /// `Σ x_i²` of every model.
    Squares,
    /// `‖μ₀‖²` of the starting average.
    StartNorm,
    /// `μ · u_i` of every valid model, at the current mean.
    Dots,
    /// `‖g‖²` of the tangent.
    TangentNorm,
    /// `‖c μ + s g‖²` of the stepped mean.
    StepNorm,
    /// Nothing more: the mean is found.
    Done,
}

/// The per-tensor pass: the iteration of [`karcher_mean`], one sum a sweep,
/// each a sequential `f64` sum carried from chunk to chunk, so that every
/// scalar is the one a loop over the whole tensor finds. Two sweeps, then
/// three a gradient step (the last step one: fine-tunes of one base lie so
/// close together that the first tangent is below `tol`).
#[derive(Debug)]
struct KarcherPass {
    max_iter: usize,
    tol: f64,
    sweep: Sweep,
    /// The running sums of the sweep.
    acc: Vec<f64>,
    /// A block of the valid models' unit directions.
    units: Vec<f64>,
    plan: Plan,
}

impl KarcherPass {
    /// A pass for models with weights `weights` (any positive scale).
    fn new(weights: &[f64], max_iter: usize, tol: f64) -> Self {
        let total: f64 = weights.iter().sum();
        KarcherPass {
            max_iter,
            tol,
            sweep: Sweep::Squares,
            acc: vec![sum_start(); weights.len()],
            units: Vec::new(),
            plan: Plan {
                alphas: weights.iter().map(|a| a / total).collect(),
                norms: Vec::new(),
                valid: Vec::new(),
                scale: 0.0,
                start: Start::Average,
                owed: Vec::new(),
                steps: Vec::new(),
            },
        }
    }

    /// Adds the entries `models` (the next chunk, in order) to the sweep's
    /// sums.
    fn observe(&mut self, models: &[&[f32]]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { self.observe_avx2(models) };
            return;
        }
        self.observe_portable(models)
    }

    /// [`observe`](Self::observe) compiled for AVX2: the same operations,
    /// four `f64` divisions at a time instead of two (they bound the pass).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn observe_avx2(&mut self, models: &[&[f32]]) {
        self.observe_portable(models)
    }

    #[inline(always)]
    fn observe_portable(&mut self, models: &[&[f32]]) {
        let len = models[0].len();
        let plan = &self.plan;
        // The steps taken: the last one of `steps` is still being found
        // during its tangent's and its new mean's norms.
        let k = match self.sweep {
            Sweep::TangentNorm | Sweep::StepNorm => plan.steps.len() - 1,
            _ => plan.steps.len(),
        };
        let u = &mut self.units[..];
        let mut m = [0.0f64; BLOCK];
        let mut t = [0.0f64; BLOCK];
        for start in (0..len).step_by(BLOCK) {
            let r = start..(start + BLOCK).min(len);
            let n = r.len();
            if self.sweep == Sweep::Squares {
                chains(&mut self.acc, n, |i, j| {
                    let x = models[i][start + j] as f64;
                    x * x
                });
                continue;
            }
            plan.units(models, r, u);
            match self.sweep {
                Sweep::StartNorm => {
                    plan.mean(u, n, 0, &mut m);
                    chains(&mut self.acc, n, |_, j| m[j] * m[j]);
                }
                Sweep::Dots => {
                    plan.mean(u, n, k, &mut m);
                    chains(&mut self.acc, n, |v, j| m[j] * u[v * BLOCK + j]);
                }
                Sweep::TangentNorm | Sweep::StepNorm => {
                    plan.mean(u, n, k, &mut m);
                    let step = plan.steps.last().expect("the step's pull is known");
                    tangent(u, &step.pull, &m[..n], &mut t);
                    if self.sweep == Sweep::StepNorm {
                        for (m, t) in m[..n].iter_mut().zip(&t) {
                            *m = step.c * *m + step.s * t;
                        }
                        chains(&mut self.acc, n, |_, j| m[j] * m[j]);
                    } else {
                        chains(&mut self.acc, n, |_, j| t[j] * t[j]);
                    }
                }
                Sweep::Squares | Sweep::Done => return,
            }
        }
    }

    /// Ends the sweep: turns its sums into the plan's next scalars and
    /// chooses the next sweep.
    fn end_sweep(&mut self) {
        let tol = self.tol;
        let plan = &mut self.plan;
        let next = match self.sweep {
            Sweep::Squares => {
                plan.norms = self.acc.iter().map(|s| s.sqrt()).collect();
                let valid: Vec<usize> = (0..plan.norms.len())
                    .filter(|&i| plan.norms[i] > tol && plan.alphas[i] > 0.0)
                    .collect();
                let vsum: f64 = valid.iter().map(|&i| plan.alphas[i]).sum();
                plan.valid = valid.iter().map(|&i| (i, plan.alphas[i] / vsum)).collect();
                self.units = vec![0.0; plan.valid.len() * BLOCK];
                plan.scale = plan
                    .alphas
                    .iter()
                    .zip(&plan.norms)
                    .map(|(a, n)| a * n)
                    .sum();
                if plan.valid.is_empty() {
                    Sweep::Done
                } else {
                    Sweep::StartNorm
                }
            }
            Sweep::StartNorm => {
                let mn = self.acc[0].sqrt();
                if mn < tol {
                    plan.start = Start::Unit;
                    plan.owed.push(None);
                } else {
                    plan.owed.push(Some(mn));
                }
                self.then_dots()
            }
            Sweep::Dots => {
                let pull = plan
                    .valid
                    .iter()
                    .zip(&self.acc)
                    .enumerate()
                    .filter_map(|(v, (&(_, a), d))| {
                        let dot = d.clamp(-1.0, 1.0);
                        let theta = dot.acos();
                        (theta >= tol).then(|| (v, dot, a * theta / theta.sin()))
                    })
                    .collect();
                plan.steps.push(Step {
                    pull,
                    c: 0.0,
                    s: 0.0,
                });
                Sweep::TangentNorm
            }
            Sweep::TangentNorm => {
                let tn = self.acc[0].sqrt();
                if tn < tol {
                    // Not taken: the mean stands.
                    plan.steps.pop();
                    Sweep::Done
                } else {
                    let step = plan.steps.last_mut().expect("pushed by the dots");
                    (step.c, step.s) = (tn.cos(), tn.sin() / tn);
                    Sweep::StepNorm
                }
            }
            Sweep::StepNorm => {
                let n = self.acc[0].sqrt();
                plan.owed.push((n > tol).then_some(n));
                self.then_dots()
            }
            Sweep::Done => Sweep::Done,
        };
        let sums = match next {
            Sweep::Squares => self.plan.alphas.len(),
            Sweep::Dots => self.plan.valid.len(),
            _ => 1,
        };
        self.acc.clear();
        self.acc.resize(sums, sum_start());
        self.sweep = next;
    }

    /// The sweep after the mean is known at some step: the dots of the next
    /// step, unless `max_iter` steps are taken.
    fn then_dots(&self) -> Sweep {
        if self.plan.steps.len() < self.max_iter {
            Sweep::Dots
        } else {
            Sweep::Done
        }
    }

    /// The most sweeps `max_iter` steps can take.
    fn most_sweeps(max_iter: usize) -> usize {
        2 + 3 * max_iter
    }
}

impl StatsPass for KarcherPass {
    fn sweeps(&self) -> usize {
        Self::most_sweeps(self.max_iter)
    }

    fn observe(&mut self, _sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        KarcherPass::observe(self, chunk.models);
        Ok(())
    }

    fn end_sweep(&mut self, _sweep: usize) -> Result<(), MethodError> {
        KarcherPass::end_sweep(self);
        Ok(())
    }

    fn done(&self) -> bool {
        self.sweep == Sweep::Done
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Ok(Arc::new(self.plan))
    }
}

/// Each entry of the merge of `models` (the chunk's entries) made by `cast`
/// from its `f64` value: `scale · μ`, or zeros when no model pulls.
fn write<O>(plan: &Plan, models: &[&[f32]], out: &mut [O], cast: impl Fn(f64) -> O) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { write_avx2(plan, models, out, cast) };
        return;
    }
    write_portable(plan, models, out, cast)
}

/// [`write`] compiled for AVX2 (the same operations).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn write_avx2<O>(plan: &Plan, models: &[&[f32]], out: &mut [O], cast: impl Fn(f64) -> O) {
    write_portable(plan, models, out, cast)
}

#[inline(always)]
fn write_portable<O>(plan: &Plan, models: &[&[f32]], out: &mut [O], cast: impl Fn(f64) -> O) {
    if plan.valid.is_empty() {
        out.iter_mut().for_each(|o| *o = cast(0.0));
        return;
    }
    let mut u = vec![0.0f64; plan.valid.len() * BLOCK];
    let mut m = [0.0f64; BLOCK];
    for (b, out) in out.chunks_mut(BLOCK).enumerate() {
        let r = b * BLOCK..b * BLOCK + out.len();
        plan.units(models, r, &mut u);
        plan.mean(&u, out.len(), plan.steps.len(), &mut m);
        for (o, &m) in out.iter_mut().zip(&m) {
            *o = cast(plan.scale * m);
        }
    }
}

/// Runs the pass over `models` cut into chunks of `chunk` entries (as the
/// engine would), then writes the merge with `cast`.
fn karcher_chunked<O>(
    models: &[&[f32]],
    weights: &[f64],
    max_iter: usize,
    tol: f64,
    chunk: usize,
    out: &mut [O],
    cast: impl Fn(f64) -> O,
) {
    let len = out.len();
    let mut pass = KarcherPass::new(weights, max_iter, tol);
    while pass.sweep != Sweep::Done {
        for start in (0..len).step_by(chunk.max(1)) {
            let r = start..(start + chunk.max(1)).min(len);
            let ms: Vec<&[f32]> = models.iter().map(|m| &m[r.clone()]).collect();
            pass.observe(&ms);
        }
        pass.end_sweep();
    }
    write(&pass.plan, models, out, cast);
}

/// The weighted Karcher mean of `models` (weights `alphas`, any positive
/// scale) into `out`, as the merge computes it for one tensor.
///
/// Each sum of the iteration (the norms, the start's norm, each step's dot
/// products, tangent norm and new norm) is one sweep over the entries, a
/// sequential `f64` sum in entry order, so streaming the tensor in chunks
/// changes no bit (a test compares with the plain loops over whole
/// vectors). The mean itself is never stored: each sweep recomputes it a
/// block at a time from the scalars found so far.
pub fn karcher_mean(models: &[&[f32]], alphas: &[f64], max_iter: usize, tol: f64, out: &mut [f32]) {
    karcher_chunked(models, alphas, max_iter, tol, out.len(), out, |v| v as f32);
}

/// The models' weights, checked: not all zero.
fn weights(ctx: &TensorContext<'_>) -> Result<Vec<f64>, MethodError> {
    let alphas = ctx
        .models
        .iter()
        .map(|p| p.f64("weight"))
        .collect::<Result<Vec<_>, _>>()?;
    if alphas.iter().sum::<f64>() <= 0.0 {
        return Err(MethodError::Invalid {
            method: INFO.name.into(),
            tensor: ctx.name.into(),
            message: "the models' weights sum to zero; give at least one model a positive weight"
                .into(),
        });
    }
    Ok(alphas)
}

/// `max_iter` and `tol`.
fn settings(ctx: &TensorContext<'_>) -> Result<(usize, f64), MethodError> {
    let max_iter = match ctx.global.get("max_iter") {
        Some(tensormerge_methods::ParamValue::Int(n)) => *n as usize,
        _ => {
            return Err(MethodError::MissingParameter {
                method: INFO.name.into(),
                param: "max_iter".into(),
            });
        }
    };
    Ok((max_iter, ctx.global.f64("tol")?))
}

impl MergeMethod for Karcher {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// The iteration's sums stream over the tensor's chunks (see
    /// [`karcher_mean`]).
    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        if tensor.models.len() < 2 {
            return None;
        }
        let (max_iter, tol) = settings(tensor).ok()?;
        Some(Box::new(KarcherPass::new(
            &weights(tensor).ok()?,
            max_iter,
            tol,
        )))
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let ctx = chunk.tensor;
        if let [only] = chunk.models {
            out.copy_from_slice(only);
            return Ok(());
        }
        // The errors, if any, of a pass that could not start.
        weights(ctx)?;
        settings(ctx)?;
        let plan = chunk
            .tensor_stats
            .and_then(|s| s.downcast_ref::<Plan>())
            .ok_or_else(|| MethodError::Invalid {
                method: INFO.name.into(),
                tensor: ctx.name.into(),
                message: "the Karcher pass did not run".into(),
            })?;
        write(plan, chunk.models, out, |v| v as f32);
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
                        let mut plain = vec![0.0f64; len];
                        reference_mean(&refs, &alphas, iters, tol, &mut plain);
                        let p: Vec<u64> = plain.iter().map(|v| v.to_bits()).collect();
                        for chunk in [len, 1, 5, BLOCK, 2 * BLOCK + 3] {
                            let mut fast = vec![0.0f64; len];
                            karcher_chunked(&refs, &alphas, iters, tol, chunk, &mut fast, |v| v);
                            let f: Vec<u64> = fast.iter().map(|v| v.to_bits()).collect();
                            assert_eq!(
                                f, p,
                                "len {len}, {count} models, spread {spread}, {iters} steps, \
                                 chunks of {chunk}"
                            );
                        }
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
