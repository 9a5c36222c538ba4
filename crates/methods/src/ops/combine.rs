//! The final combination of (sparsified) task vectors: the linear sum of
//! task arithmetic or the TIES sign election and disjoint merge
//! ([`Combine`], [`Consensus`], [`combine_blocks`]).

use super::{BLOCK, weight_sum};
use crate::MethodError;

/// Elements per block in [`combine_blocks`]: small enough that every model's
/// block and the scratch stay in the L1 cache.
const COMBINE_BLOCK: usize = 128;

/// How TIES elects the sign of an entry (Yadav et al. 2023, arXiv:2306.01708).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    /// `sign(Σ δ_i)`, mass-weighted (the paper's and mergekit's default).
    Sum,
    /// `sign(Σ sign(δ_i))`, a majority vote.
    Count,
}

impl Consensus {
    /// Parses `sum` or `count`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sum" => Some(Consensus::Sum),
            "count" => Some(Consensus::Count),
            _ => None,
        }
    }
}

/// How task vectors are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `Σ w_i δ_i` (task arithmetic, linear, DARE-linear), divided by `Σ w_i`
    /// when normalising.
    Linear,
    /// TIES sign election and disjoint merge: with `δ_i = w_i τ̂_i`,
    /// `merged = Σ m_i δ_i` over the entries agreeing with the elected sign
    /// (`m_i`), divided by `Σ m_i w_i` when normalising (a zero divisor leaves
    /// the entry at 0). An exact zero sum elects `+`.
    Ties(Consensus),
}

/// The final step of the task-vector family: `out = base + λ · merged`, with
/// `merged` combined from each model's (possibly sparsified) task vector by a
/// [`Rule`]. Without a base (linear), `out = λ · merged`.
///
/// All arithmetic is in `f64`, in model order; the result is rounded to
/// `f32` once.
#[derive(Debug, Clone)]
pub struct Combine {
    /// Each model's weight `w_i`.
    pub weights: Vec<f64>,
    /// The factor `λ` on the merged task vector.
    pub lambda: f64,
    /// Whether to divide by the (masked) weight sum.
    pub normalize: bool,
    /// The combination rule.
    pub rule: Rule,
}

impl Combine {
    /// Checks that a [`Rule::Linear`] normalisation does not divide by zero
    /// (`method`, `tensor` name the error).
    pub fn check(&self, method: &str, tensor: &str) -> Result<(), MethodError> {
        if self.normalize && self.rule == Rule::Linear && weight_sum(&self.weights) == 0.0 {
            return Err(MethodError::Invalid {
                method: method.to_string(),
                tensor: tensor.to_string(),
                message: format!(
                    "the model weights {:?} sum to zero, so `normalize` would divide by zero; \
                     change the weights or set `normalize: false`",
                    self.weights
                ),
            });
        }
        Ok(())
    }

    /// Combines one block. `deltas` holds each model's task vector for the
    /// block, model-major (`deltas[i * len + e]`, `len = out.len()`), as
    /// `f64`; `base` is the block of the base (or `None`).
    pub fn apply(&self, base: Option<&[f32]>, deltas: &[f64], out: &mut [f32]) {
        self.apply_with(
            self.inverse_weight_sum(),
            base,
            deltas,
            out,
            &mut Scratch::new(),
        )
    }

    /// `1 / Σ w_i` for a normalised linear rule, else 1.
    pub(super) fn inverse_weight_sum(&self) -> f64 {
        if self.normalize && self.rule == Rule::Linear {
            1.0 / weight_sum(&self.weights)
        } else {
            1.0
        }
    }

    #[inline(always)]
    fn apply_with(
        &self,
        inv: f64,
        base: Option<&[f32]>,
        deltas: &[f64],
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let len = out.len();
        debug_assert_eq!(deltas.len(), self.weights.len() * len);
        let Scratch { merged } = scratch;
        for start in (0..len).step_by(BLOCK) {
            let bl = BLOCK.min(len - start);
            let merged = &mut merged[..bl];
            match self.rule {
                Rule::Linear => {
                    merged.iter_mut().for_each(|v| *v = 0.0);
                    for (i, &w) in self.weights.iter().enumerate() {
                        let d = &deltas[i * len + start..i * len + start + bl];
                        for (acc, &x) in merged.iter_mut().zip(d) {
                            *acc += w * x;
                        }
                    }
                    if self.normalize {
                        merged.iter_mut().for_each(|v| *v *= inv);
                    }
                }
                Rule::Ties(consensus) => {
                    let (w, n) = (&self.weights[..], self.normalize);
                    let m = &mut merged[..];
                    // Weights of exactly 1 multiply nothing (1 · x = x for
                    // every x that arithmetic produces): skip the products.
                    match (consensus, w.iter().all(|&w| w == 1.0)) {
                        (Consensus::Sum, false) => {
                            ties_block::<false, false>(w, n, deltas, len, start, m)
                        }
                        (Consensus::Sum, true) => {
                            ties_block::<false, true>(w, n, deltas, len, start, m)
                        }
                        (Consensus::Count, false) => {
                            ties_block::<true, false>(w, n, deltas, len, start, m)
                        }
                        (Consensus::Count, true) => {
                            ties_block::<true, true>(w, n, deltas, len, start, m)
                        }
                    }
                }
            }
            let o = &mut out[start..start + bl];
            match base {
                Some(b) => {
                    for ((o, &b), &v) in o.iter_mut().zip(&b[start..start + bl]).zip(merged.iter())
                    {
                        *o = (b as f64 + self.lambda * v) as f32;
                    }
                }
                None => {
                    for (o, &v) in o.iter_mut().zip(merged.iter()) {
                        *o = (self.lambda * v) as f32;
                    }
                }
            }
        }
    }
}

/// The TIES election and disjoint merge of the `L` elements at `e..e + L` of
/// a block (`deltas[i * len + e]`: model `i`'s task vector), written to
/// `out`: `δ_i = w_i x_i`; the sign of `Σ δ_i` (or of `Σ sign(δ_i)` with
/// `COUNT`) is elected, a zero sum electing `+`; the agreeing non-zero `δ_i`
/// are summed, divided by the sum of their weights when `normalize` (a zero
/// divisor giving 0).
/// [`ties_lanes`] over `merged.len()` elements from `e`, eight at a time.
#[inline(always)]
fn ties_block<const COUNT: bool, const UNIT: bool>(
    weights: &[f64],
    normalize: bool,
    deltas: &[f64],
    len: usize,
    e: usize,
    merged: &mut [f64],
) {
    // Eight elements at a time, every model in turn, the sums held in
    // registers (vectorises); the sums are taken in model order per
    // element, as the rule reads.
    let bl = merged.len();
    let groups = bl / 8;
    for g in 0..groups {
        let o = &mut merged[8 * g..8 * g + 8];
        ties_lanes::<8, COUNT, UNIT>(weights, normalize, deltas, len, e + 8 * g, o);
    }
    for r in 8 * groups..bl {
        let o = &mut merged[r..r + 1];
        ties_lanes::<1, COUNT, UNIT>(weights, normalize, deltas, len, e + r, o);
    }
}

#[inline(always)]
fn ties_lanes<const L: usize, const COUNT: bool, const UNIT: bool>(
    weights: &[f64],
    normalize: bool,
    deltas: &[f64],
    len: usize,
    e: usize,
    out: &mut [f64],
) {
    let mut vote = [0.0f64; L];
    for (i, &w) in weights.iter().enumerate() {
        let d = &deltas[i * len + e..i * len + e + L];
        for (v, &x) in vote.iter_mut().zip(d) {
            let d = if UNIT { x } else { w * x };
            *v += if COUNT { sign(d) } else { d };
        }
    }
    // The elected sign as ±1 (a zero vote elects +).
    let s = vote.map(|v| if v >= 0.0 { 1.0 } else { -1.0 });
    let (mut acc, mut div) = ([0.0f64; L], [0.0f64; L]);
    for (i, &w) in weights.iter().enumerate() {
        let d = &deltas[i * len + e..i * len + e + L];
        for j in 0..L {
            let d = if UNIT { d[j] } else { w * d[j] };
            // agrees with the elected sign, and is not 0
            let agree = d * s[j] > 0.0;
            acc[j] += if agree { d } else { 0.0 };
            div[j] += if agree { w } else { 0.0 };
        }
    }
    if normalize {
        for (a, &dv) in acc.iter_mut().zip(&div) {
            // branch-free: divide by 1 where the divisor is 0, then zero it
            let zero = u8::from(dv == 0.0) as f64;
            *a = *a / (dv + zero) * (1.0 - zero) + 0.0; // + 0.0: no -0
        }
    }
    out[..L].copy_from_slice(&acc);
}

/// Per-block working memory of [`Combine`] (allocated once per chunk, not
/// zeroed per block).
struct Scratch {
    merged: Box<[f64; BLOCK]>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            merged: Box::new([0.0; BLOCK]),
        }
    }
}

/// What [`combine_blocks`] takes its task vectors from: any
/// `FnMut(i, start, buf)` closure, or a type of its own whose
/// [`fill`](BlockFill::fill) is `#[inline(always)]`, so that it is compiled
/// into the AVX2 block loop too (a large closure may not be inlined there).
pub trait BlockFill {
    /// Writes model `i`'s task vector for `start..start + buf.len()` into
    /// `buf` (as `f64`).
    fn fill(&mut self, i: usize, start: usize, buf: &mut [f64]);
}

impl<F: FnMut(usize, usize, &mut [f64])> BlockFill for F {
    #[inline(always)]
    fn fill(&mut self, i: usize, start: usize, buf: &mut [f64]) {
        self(i, start, buf)
    }
}

/// Runs `combine` over a chunk block by block: for each block of at most
/// [`BLOCK`] elements starting at `start`, `fill(i, start, buf)` writes model
/// `i`'s task vector for `start..start + buf.len()` into `buf` (as `f64`),
/// then the block is combined into `out`. Blocks are visited in order, so
/// `fill` may advance per-model random streams.
///
/// On x86-64 CPUs with AVX2 the same code is compiled for AVX2 and chosen at
/// run time: wider vectors, the same IEEE operations in the same order (no
/// fused multiply-add), so the results are bit-identical either way.
pub fn combine_blocks(
    combine: &Combine,
    base: Option<&[f32]>,
    out: &mut [f32],
    fill: impl FnMut(usize, usize, &mut [f64]),
) {
    combine_blocks_with(combine, base, out, fill)
}

/// [`combine_blocks`] taking any [`BlockFill`].
pub fn combine_blocks_with(
    combine: &Combine,
    base: Option<&[f32]>,
    out: &mut [f32],
    fill: impl BlockFill,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { combine_blocks_avx2(combine, base, out, fill) };
        return;
    }
    combine_blocks_portable(combine, base, out, fill)
}

/// [`combine_blocks_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn combine_blocks_avx2(
    combine: &Combine,
    base: Option<&[f32]>,
    out: &mut [f32],
    fill: impl BlockFill,
) {
    combine_blocks_portable(combine, base, out, fill)
}

#[inline(always)]
fn combine_blocks_portable(
    combine: &Combine,
    base: Option<&[f32]>,
    out: &mut [f32],
    mut fill: impl BlockFill,
) {
    let m = combine.weights.len();
    let inv = combine.inverse_weight_sum();
    let mut scratch = Scratch::new();
    let mut buf = vec![0.0f64; m * COMBINE_BLOCK.min(out.len())];
    for start in (0..out.len()).step_by(COMBINE_BLOCK) {
        let bl = COMBINE_BLOCK.min(out.len() - start);
        let buf = &mut buf[..m * bl];
        for (i, part) in buf.chunks_exact_mut(bl).enumerate() {
            fill.fill(i, start, part);
        }
        combine.apply_with(
            inv,
            base.map(|b| &b[start..start + bl]),
            buf,
            &mut out[start..start + bl],
            &mut scratch,
        );
    }
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatched_combine_is_bit_identical_to_the_portable_code() {
        let n = 3000;
        let m = 3;
        let val = |i: usize| (((i * 2_654_435_761) % 1_000_003) as f64 / 1_000_003.0 - 0.5) * 0.02;
        let base: Vec<f32> = (0..n).map(|i| val(i + 7) as f32).collect();
        let rules = [
            Rule::Linear,
            Rule::Ties(Consensus::Sum),
            Rule::Ties(Consensus::Count),
        ];
        for rule in rules {
            for normalize in [false, true] {
                let combine = Combine {
                    weights: vec![0.7, -0.3, 1.1][..m].to_vec(),
                    lambda: 0.9,
                    normalize,
                    rule,
                };
                let fill = |i: usize, start: usize, buf: &mut [f64]| {
                    for (e, d) in buf.iter_mut().enumerate() {
                        let p = start + e;
                        // some exact zeros, as after trimming
                        *d = if (p + i).is_multiple_of(5) {
                            0.0
                        } else {
                            val(p * 3 + i)
                        };
                    }
                };
                let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
                combine_blocks(&combine, Some(&base), &mut a, fill);
                combine_blocks_portable(&combine, Some(&base), &mut b, fill);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{rule:?} normalize={normalize}");
            }
        }
    }

    #[test]
    fn ties_combine_matches_a_plain_loop_with_unit_and_other_weights() {
        let n = 1003;
        let val = |i: usize| (((i * 2_654_435_761) % 1_000_003) as f64 / 1_000_003.0 - 0.5) * 0.02;
        let base: Vec<f32> = (0..n).map(|i| val(i + 11) as f32).collect();
        let deltas = |i: usize, p: usize| {
            if (p + 2 * i).is_multiple_of(7) {
                0.0
            } else {
                val(p * 5 + i)
            }
        };
        for weights in [vec![1.0, 1.0, 1.0], vec![1.0, -0.5, 2.0]] {
            for consensus in [Consensus::Sum, Consensus::Count] {
                for normalize in [false, true] {
                    let combine = Combine {
                        weights: weights.clone(),
                        lambda: 0.75,
                        normalize,
                        rule: Rule::Ties(consensus),
                    };
                    let mut out = vec![0.0f32; n];
                    combine_blocks(&combine, Some(&base), &mut out, |i, start, buf| {
                        for (e, d) in buf.iter_mut().enumerate() {
                            *d = deltas(i, start + e);
                        }
                    });
                    for (p, &o) in out.iter().enumerate() {
                        let d: Vec<f64> = (0..3).map(|i| weights[i] * deltas(i, p)).collect();
                        let vote: f64 = match consensus {
                            Consensus::Sum => d.iter().fold(0.0, |a, &x| a + x),
                            Consensus::Count => d.iter().fold(0.0, |a, &x| a + sign(x)),
                        };
                        let s = if vote >= 0.0 { 1.0 } else { -1.0 };
                        let (mut acc, mut div) = (0.0f64, 0.0f64);
                        for (i, &x) in d.iter().enumerate() {
                            if x * s > 0.0 {
                                acc += x;
                                div += weights[i];
                            }
                        }
                        if normalize {
                            acc = if div == 0.0 { 0.0 } else { acc / div };
                        }
                        let expect = (base[p] as f64 + 0.75 * acc) as f32;
                        assert_eq!(
                            o.to_bits(),
                            expect.to_bits(),
                            "{weights:?} {consensus:?} {normalize} at {p}"
                        );
                    }
                }
            }
        }
    }
}
