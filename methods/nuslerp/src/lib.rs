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
//! Tensors are merged in chunks of whole rows (`chunk_multiple` is the last
//! dimension), so memory does not grow with the tensor. Rows get their sums
//! within the chunk. Flattened, and along the first dimension, a per-tensor
//! pass first sums `‖v0‖²`, `‖v1‖²` and `v0·v1` of each vector in `f64`, one
//! running sum each, adding the entries in tensor order and carrying the sums
//! from chunk to chunk: the additions are those of one loop over the whole
//! tensor, so the output does not depend on the chunking (bit for bit).
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

use std::sync::Arc;

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Stats,
    StatsPass, TensorContext, register_method,
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

/// How a tensor is cut into vector pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The whole flattened tensor is one vector.
    Flat,
    /// Rows of this many elements (the last dimension).
    Rows(usize),
    /// Vectors along the first dimension: element `p` belongs to vector
    /// `p % stride` (the product of the other dimensions).
    Cols(usize),
}

/// The mode of a tensor, from its shape and the global parameters.
fn mode(ctx: &TensorContext<'_>) -> Result<Mode, MethodError> {
    let numel = ctx.numel();
    let flatten = ctx.global.bool("nuslerp_flatten")?;
    let row_wise = ctx.global.bool("nuslerp_row_wise")?;
    Ok(if flatten || ctx.shape.len() < 2 || numel == 0 {
        Mode::Flat
    } else if row_wise {
        Mode::Cols(numel / ctx.shape[0])
    } else {
        Mode::Rows(ctx.shape[ctx.shape.len() - 1])
    })
}

/// `t = w_1 / (w_0 + w_1)` (0.5 when the weights cancel).
fn factor(ctx: &TensorContext<'_>) -> Result<f64, MethodError> {
    let (w0, w1) = (ctx.models[0].f64("weight")?, ctx.models[1].f64("weight")?);
    Ok(if (w0 + w1).abs() < 1e-6 {
        0.5
    } else {
        w1 / (w0 + w1)
    })
}

/// Running sums of one vector pair: `‖v0‖²`, `‖v1‖²`, `v0·v1`.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    n0: f64,
    n1: f64,
    dot: f64,
}

impl Sums {
    /// Adds one entry (`a` of `v0`, `b` of `v1`).
    #[inline(always)]
    fn add(&mut self, a: f64, b: f64) {
        self.n0 += a * a;
        self.n1 += b * b;
        self.dot += a * b;
    }

    /// The slerp coefficients `(s0, s1)` of `v0` and `v1` at `t`.
    fn coefficients(&self, t: f64) -> (f64, f64) {
        let cos = self.dot / self.n0.sqrt().max(1e-7) / self.n1.sqrt().max(1e-7);
        let theta = cos.clamp(-1.0, 1.0).acos();
        let sin = theta.sin();
        // Colinear (mergekit's |sin θ| < 1e-8) or nearly antiparallel (see
        // the crate docs): linear interpolation.
        if sin.abs() < 1e-8 || cos < -ANTIPARALLEL {
            (1.0 - t, t)
        } else {
            (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
        }
    }
}

/// The two models' task vectors (or values, without a base) in a chunk.
#[derive(Clone, Copy)]
struct Pair<'a> {
    x0: &'a [f32],
    x1: &'a [f32],
    base: Option<&'a [f32]>,
}

impl Pair<'_> {
    /// The chunk's models and base (an error unless there are two models).
    fn of<'a>(chunk: &Chunk<'a>) -> Result<Pair<'a>, MethodError> {
        match *chunk.models {
            [x0, x1] => Ok(Pair {
                x0,
                x1,
                base: chunk.base,
            }),
            _ => Err(MethodError::ModelCount {
                method: INFO.name.into(),
                expected: "exactly 2 (plus an optional base)".into(),
                got: chunk.models.len(),
            }),
        }
    }

    /// `(v0, v1)` at entry `e`.
    #[inline(always)]
    fn v(&self, e: usize) -> (f64, f64) {
        let b = self.base.map_or(0.0, |b| b[e] as f64);
        (self.x0[e] as f64 - b, self.x1[e] as f64 - b)
    }

    /// Adds entries `range` to `sums`, in order.
    fn sum_into(&self, range: std::ops::Range<usize>, sums: &mut Sums) {
        #[inline(always)]
        fn run(p: &Pair<'_>, b: impl Fn(usize) -> f64, r: std::ops::Range<usize>, s: &mut Sums) {
            for e in r {
                s.add(p.x0[e] as f64 - b(e), p.x1[e] as f64 - b(e));
            }
        }
        // One loop each with and without a base, so neither tests for it.
        match self.base {
            Some(base) => run(self, |e| base[e] as f64, range, sums),
            None => run(self, |_| 0.0, range, sums),
        }
    }

    /// `out[j] = (s0 v0 + s1 v1) + b` at entry `start + j`, with
    /// `(s0, s1) = coef(j)`.
    #[inline(always)]
    fn interpolate(&self, start: usize, out: &mut [f32], coef: impl Fn(usize) -> (f64, f64)) {
        #[inline(always)]
        fn run(
            p: &Pair<'_>,
            b: impl Fn(usize) -> f64,
            start: usize,
            out: &mut [f32],
            coef: impl Fn(usize) -> (f64, f64),
        ) {
            let (x0, x1) = (
                &p.x0[start..start + out.len()],
                &p.x1[start..start + out.len()],
            );
            for (j, o) in out.iter_mut().enumerate() {
                let b = b(start + j);
                let (s0, s1) = coef(j);
                *o = (s0 * (x0[j] as f64 - b) + s1 * (x1[j] as f64 - b) + b) as f32;
            }
        }
        match self.base {
            Some(base) => run(self, |e| base[e] as f64, start, out, coef),
            None => run(self, |_| 0.0, start, out, coef),
        }
    }
}

/// The slerp coefficients of a tensor's vectors: one pair (flattened) or
/// one per vector along the first dimension (`nuslerp_row_wise`).
#[derive(Debug)]
struct Coefficients(Vec<(f64, f64)>);

/// The per-tensor pass (flattened and first-dimension modes): one running
/// `f64` sum of each of `‖v0‖²`, `‖v1‖²`, `v0·v1` per vector, adding the
/// entries in tensor order and carried from chunk to chunk, so that the sums
/// (and the output bits) are those of one loop over the whole tensor.
struct SumPass {
    t: f64,
    /// One entry (flattened) or `stride` entries (vector `p % stride`).
    sums: Vec<Sums>,
}

impl StatsPass for SumPass {
    fn observe(&mut self, _sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let pair = Pair::of(chunk)?;
        let len = chunk.len();
        if let [sums] = &mut self.sums[..] {
            pair.sum_into(0..len, sums);
            return Ok(());
        }
        let stride = self.sums.len();
        let (mut e, mut k) = (0, chunk.offset % stride);
        while e < len {
            // The entries of the chunk's current row: vectors k.. in turn.
            let n = (stride - k).min(len - e);
            for (j, s) in self.sums[k..k + n].iter_mut().enumerate() {
                let (a, b) = pair.v(e + j);
                s.add(a, b);
            }
            (e, k) = (e + n, 0);
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        let t = self.t;
        Ok(Arc::new(Coefficients(
            self.sums.iter().map(|s| s.coefficients(t)).collect(),
        )))
    }
}

impl MergeMethod for NuSlerp {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// Chunks of whole rows (along the last dimension): each row has its
    /// own angle when not flattened; the other modes get their sums from the
    /// per-tensor pass and do not mind.
    fn chunk_multiple(&self, shape: &[usize]) -> usize {
        match shape {
            [_, .., last] if *last > 0 => *last,
            _ => 1,
        }
    }

    /// Flattened or along the first dimension: the sums of every vector
    /// over the whole tensor. Rows need none (each chunk holds whole rows).
    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        let vectors = match mode(tensor).ok()? {
            Mode::Flat => 1,
            Mode::Cols(stride) => stride,
            Mode::Rows(_) => return None,
        };
        Some(Box::new(SumPass {
            t: factor(tensor).ok()?,
            sums: vec![Sums::default(); vectors],
        }))
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let ctx = chunk.tensor;
        let pair = Pair::of(chunk)?;
        let t = factor(ctx)?;
        let mode = mode(ctx)?;
        if let Mode::Rows(last) = mode {
            // The chunk starts at a row boundary and holds whole rows.
            for (start, o) in (0..out.len()).step_by(last).zip(out.chunks_mut(last)) {
                let mut sums = Sums::default();
                pair.sum_into(start..start + o.len(), &mut sums);
                let c = sums.coefficients(t);
                pair.interpolate(start, o, |_| c);
            }
            return Ok(());
        }
        let coef = chunk
            .tensor_stats
            .and_then(|s| s.downcast_ref::<Coefficients>())
            .ok_or_else(|| MethodError::Invalid {
                method: INFO.name.into(),
                tensor: ctx.name.into(),
                message: "the per-tensor pass did not run".into(),
            })?;
        match (mode, &coef.0[..]) {
            (Mode::Flat, &[c]) => pair.interpolate(0, out, |_| c),
            (Mode::Cols(stride), c) if c.len() == stride => {
                let k0 = chunk.offset % stride;
                pair.interpolate(0, out, |j| c[(k0 + j) % stride]);
            }
            _ => {
                return Err(MethodError::Invalid {
                    method: INFO.name.into(),
                    tensor: ctx.name.into(),
                    message: "the per-tensor pass gave sums of another shape".into(),
                });
            }
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

    /// The whole-tensor implementation this crate had before chunking,
    /// verbatim in its arithmetic: the chunked merge must give its bits.
    fn whole_tensor(
        t: f64,
        shape: &[usize],
        (flatten, row_wise): (bool, bool),
        base: Option<&[f32]>,
        x0: &[f32],
        x1: &[f32],
    ) -> Vec<f32> {
        let b = |e: usize| base.map_or(0.0, |b| b[e] as f64);
        let v0 = |e: usize| x0[e] as f64 - b(e);
        let v1 = |e: usize| x1[e] as f64 - b(e);
        let numel = x0.len();
        let (first, last) = (shape[0], shape[shape.len() - 1]);
        // (index of the group k, position j within it) -> entry.
        type Index = Box<dyn Fn(usize, usize) -> usize>;
        let (count, len, idx): (usize, usize, Index) = if flatten || shape.len() < 2 || numel == 0 {
            (1, numel, Box::new(|_, j| j))
        } else if row_wise {
            let stride = numel / first;
            (stride, first, Box::new(move |k, j| j * stride + k))
        } else {
            (numel / last, last, Box::new(move |k, j| k * last + j))
        };
        let mut res = vec![0.0f64; numel];
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
            let (s0, s1) = if sin.abs() < 1e-8 || cos < -ANTIPARALLEL {
                (1.0 - t, t)
            } else {
                (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
            };
            for j in 0..len {
                let e = idx(k, j);
                res[e] = s0 * v0(e) + s1 * v1(e);
            }
        }
        res.iter()
            .enumerate()
            .map(|(e, r)| (r + b(e)) as f32)
            .collect()
    }

    #[test]
    fn chunks_give_the_bits_of_the_whole_tensor_loop() {
        let l = Arc::new(
            Layout::new(vec![
                TensorInfo::new("m", vec![7, 6], DType::F32),
                TensorInfo::new("v", vec![11], DType::F32),
                TensorInfo::new("c", vec![3, 2, 5], DType::F32),
            ])
            .unwrap(),
        );
        let (a, c, base) = (random(&l, 11), random(&l, 12), random(&l, 13));
        let m = registry().get("nuslerp").unwrap();
        for (flatten, row_wise) in [(true, false), (false, false), (false, true)] {
            for b in [None, Some(&base)] {
                for chunk_len in [1, 7, 12, 25, usize::MAX] {
                    let per: Vec<Vec<(&str, ParamValue)>> =
                        vec![vec![("weight", 2.0.into())], vec![("weight", 1.0.into())]];
                    let out = Merge::new(
                        m,
                        vec![
                            ("nuslerp_flatten", flatten.into()),
                            ("nuslerp_row_wise", row_wise.into()),
                        ],
                        per,
                    )
                    .unwrap()
                    .chunk_len(chunk_len)
                    .run(b, &[&a, &c])
                    .unwrap();
                    for (info, r) in l.float_tensors() {
                        let want = whole_tensor(
                            1.0 / 3.0,
                            &info.shape,
                            (flatten, row_wise),
                            b.map(|b| &b.values().unwrap()[r.clone()]),
                            &a.values().unwrap()[r.clone()],
                            &c.values().unwrap()[r.clone()],
                        );
                        let got = &out.values().unwrap()[r.clone()];
                        for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{} entry {e}, flatten {flatten}, row_wise {row_wise}, \
                                 base {}, chunk_len {chunk_len}",
                                info.name,
                                b.is_some()
                            );
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
