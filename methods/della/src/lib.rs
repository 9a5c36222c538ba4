//! # tensormerge-method-della
//!
//! `della` and `della_linear`: DELLA-Merging (Deep et al. 2024, "DELLA-Merging:
//! Reducing interference in model merging through magnitude-based sampling",
//! arXiv:2406.11617). Its drop step, MagPrune (§3.1), keeps each entry of a
//! task vector `τ = x − b` with a probability that grows with its magnitude
//! rank. Within each row (the last dimension; a 1-D tensor is one row) of `n`
//! entries ranked `r = 0 … n−1` by `|τ|` ascending:
//!
//! ```text
//! p_r = (d − ε) + 2ε · r/(n − 1)          (arXiv:2406.11617, eq. 1; clamped to [0, 1])
//! τ̃  = τ ⊙ Bernoulli(p)
//! ```
//!
//! so the mean keep rate is the `density` `d` and the spread is `±epsilon`.
//! `rescale: true` scales the kept entries so the tensor's L1 norm is
//! unchanged (mergekit's rule); `rescale: density` divides each kept entry by
//! its own `p_r` (the paper's unbiased rescaling); `false` does not rescale.
//! Then `della` applies the TIES sign election and disjoint merge (Yadav et
//! al. 2023, arXiv:2306.01708) and `della_linear` sums;
//! `out = b + λ · merged`.
//!
//! Randomness comes only from [`TensorContext::rng`]: model `i`'s draws on a
//! tensor depend on `(seed, tensor name, i)` and the entry's position (one
//! `next_u32` per entry), so results are identical on any thread count.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_della as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![1000], DType::F32)]).unwrap());
//! let base = ParamVector::zeros(layout.clone());
//! let x = ParamVector::from_vec(layout, (0..1000).map(|i| i as f32 + 1.0).collect()).unwrap();
//! let m = registry().get("della_linear").unwrap();
//! let p = vec![vec![("density", 0.5.into()), ("epsilon", 0.4.into())]];
//! let g = vec![("rescale", "false".into())];
//! let out = Merge::new(m, g, p).unwrap().seed(7).run(Some(&base), &[&x]).unwrap();
//! let v = out.values().unwrap();
//! let kept_small = v[..100].iter().filter(|v| **v != 0.0).count(); // p ≈ 0.1..0.18
//! let kept_large = v[900..].iter().filter(|v| **v != 0.0).count(); // p ≈ 0.82..0.9
//! assert!(kept_small < 30 && kept_large > 70);
//! ```
//!
//! Differences from mergekit (deliberate):
//! - Keep probabilities outside `[0, 1]` are clamped, where mergekit raises
//!   an error unless `d ± ε` lies in `(0, 1)`; a one-entry row gets `p = d`
//!   (mergekit divides 0 by 0 there).
//! - Ranks run along the last dimension for tensors of any rank (mergekit's
//!   `dim=1`, which is the last dimension for the usual 2-D weights); equal
//!   magnitudes rank by position.
//! - Draws come from our reproducible ChaCha8 streams instead of
//!   `torch.bernoulli`, so outputs match mergekit in distribution, not bit
//!   for bit. `lambda` is global (mergekit used the first model's);
//!   `weight` defaults to 1.0; `int8_mask` has no effect.
//! - Tensors are merged in chunks of whole rows; with `rescale: true` a
//!   per-tensor pass first draws the keep decisions (a bit per entry) and sums
//!   the L1 norms, so memory is a few bits per entry, not the whole tensor.
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::ops::{
    self, Combine, Consensus, ExactSum, RankOrder, Rule, magnitude_key,
};
use tensormerge_methods::rng::Draws;
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Stats,
    StatsPass, TensorContext, register_method,
};

/// `della` (MagPrune, then TIES election).
#[derive(Debug, Clone, Copy)]
pub struct Della;

/// `della_linear` (MagPrune, then a weighted sum).
#[derive(Debug, Clone, Copy)]
pub struct DellaLinear;

const WEIGHT: ParamSpec = ParamSpec::WEIGHT;
const DENSITY: ParamSpec = ParamSpec::per_model_float(
    "density",
    0.0,
    f64::INFINITY,
    Default::Float(1.0),
    "mean keep probability d (≥ 1 keeps all)",
);
const EPSILON: ParamSpec = ParamSpec::per_model_float(
    "epsilon",
    0.0,
    1.0,
    Default::Float(0.15),
    "spread ε of keep probabilities: d − ε for the smallest magnitude of a row, d + ε for the largest",
);
const LAMBDA: ParamSpec = ParamSpec::LAMBDA;
const RESCALE: ParamSpec = ParamSpec::global(
    "rescale",
    ParamKind::Choice(&["true", "false", "density"]),
    Default::Choice("true"),
    "true: keep each task vector's L1 norm (mergekit); density: divide kept entries by their p (paper); false: none",
);
const INT8_MASK: ParamSpec = ParamSpec::INT8_MASK;

static PARAMS: &[ParamSpec] = &[
    WEIGHT,
    DENSITY,
    EPSILON,
    LAMBDA,
    ParamSpec::global(
        "normalize",
        ParamKind::Bool,
        Default::Bool(true),
        "divide by the sum of the weights of the agreeing models, per entry",
    ),
    RESCALE,
    ParamSpec::CONSENSUS,
    INT8_MASK,
];

static PARAMS_LINEAR: &[ParamSpec] = &[
    WEIGHT,
    DENSITY,
    EPSILON,
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

static INFO: MethodInfo = MethodInfo {
    name: "della",
    summary: "drops task-vector entries at random with magnitude-ranked probabilities, then TIES election",
    paper: "Deep et al. 2024, arXiv:2406.11617",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

static INFO_LINEAR: MethodInfo = MethodInfo {
    name: "della_linear",
    summary: "drops task-vector entries at random with magnitude-ranked probabilities, then sums them",
    paper: "Deep et al. 2024, arXiv:2406.11617",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS_LINEAR,
};

/// How kept entries are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rescale {
    L1,
    Probability,
    None,
}

/// The MagPrune keep probability of rank `r` (0 = smallest magnitude) in a
/// row of `n` entries (arXiv:2406.11617, eq. 1; clamped to `[0, 1]`).
#[inline]
fn probability(r: usize, n: usize, density: f64, epsilon: f64) -> f64 {
    let frac = if n > 1 {
        r as f64 / (n - 1) as f64
    } else {
        0.5
    };
    ((density - epsilon) + 2.0 * epsilon * frac).clamp(0.0, 1.0)
}

/// MagPrune keep probabilities of one row of task-vector values (any order
/// of magnitudes; equal magnitudes rank by position).
pub fn row_probabilities(tau: &[f32], density: f64, epsilon: f64) -> Vec<f64> {
    let n = tau.len();
    let keys: Vec<u32> = tau.iter().map(|&t| magnitude_key(t)).collect();
    let mut p = vec![0.0; n];
    for (r, &e) in RankOrder::default().order(&keys).iter().enumerate() {
        p[e as usize] = probability(r, n, density, epsilon);
    }
    p
}

/// MagPrune's keep decisions for the rows of one model, with the tables of
/// one row length (probabilities, their integer keep limits and the
/// `rescale: density` multipliers, indexed by rank) and reusable buffers.
struct RowKeep {
    density: f64,
    epsilon: f64,
    len: usize,
    /// `limit[r]`: rank `r` is kept when its draw is below it
    /// ([`ops::dare_limit`] + 1; 0 keeps nothing).
    limit: Vec<u64>,
    /// `1 / p_r` as `f32` (`rescale: density`).
    inverse: Vec<f32>,
    ranks: RankOrder,
    keys: Vec<u32>,
    draws: Vec<u32>,
    /// The keep mask of the last row ([`mask`](Self::mask)).
    mask: Vec<u64>,
}

impl RowKeep {
    fn new(density: f64, epsilon: f64) -> RowKeep {
        RowKeep {
            density,
            epsilon,
            len: usize::MAX,
            limit: Vec::new(),
            inverse: Vec::new(),
            ranks: RankOrder::default(),
            keys: Vec::new(),
            draws: Vec::new(),
            mask: Vec::new(),
        }
    }

    /// The magnitude keys of one row of `x − b` and its draws, one word per
    /// entry in position order from `draws` (the tables made for its length).
    #[inline]
    fn prepare(&mut self, x: &[f32], b: &[f32], draws: &mut Draws) {
        let len = x.len();
        if len != self.len {
            self.len = len;
            self.limit.clear();
            self.inverse.clear();
            for r in 0..len {
                let p = probability(r, len, self.density, self.epsilon);
                self.limit
                    .push(ops::dare_limit(p).map_or(0, |l| l as u64 + 1));
                self.inverse.push((1.0 / p) as f32);
            }
        }
        self.keys.clear();
        self.keys
            .extend(x.iter().zip(b).map(|(x, b)| magnitude_key(x - b)));
        self.draws.resize(len, 0); // (all overwritten)
        draws.fill(&mut self.draws);
    }

    /// The keep decisions of one row of `x − b` as a mask (bit `j % 64` of
    /// word `j / 64` for entry `j` of the row), drawing one word per entry
    /// from `draws` in position order. Only the decisions: most entries need
    /// no exact rank ([`RankOrder::keep_mask`]).
    #[inline]
    fn mask(&mut self, x: &[f32], b: &[f32], draws: &mut Draws) -> &[u64] {
        self.prepare(x, b, draws);
        self.mask.clear();
        self.mask.resize(x.len().div_ceil(64), 0);
        self.ranks
            .keep_mask(&self.keys, &self.draws, &self.limit, &mut self.mask);
        &self.mask
    }

    /// Calls `kept(j, 1 / p)` for every kept entry `j` of one row of `x − b`
    /// (the same decisions as [`mask`](Self::mask)), from the exact ranks.
    #[inline]
    fn with_inverse(
        &mut self,
        x: &[f32],
        b: &[f32],
        draws: &mut Draws,
        mut kept: impl FnMut(usize, f32),
    ) {
        self.prepare(x, b, draws);
        let (draws, limit, inverse) = (&self.draws, &self.limit, &self.inverse);
        for (r, &j) in self.ranks.order(&self.keys).iter().enumerate() {
            if (draws[j as usize] as u64) < limit[r] {
                kept(j as usize, inverse[r]);
            }
        }
    }
}

/// The draws of model `i` on the tensor of `chunk` from the chunk's first
/// element on: the words of [`TensorContext::rng`], generated in bulk.
fn draws_of(chunk: &Chunk<'_>, i: usize) -> Draws {
    Draws::new(chunk.tensor.seed, chunk.tensor.name, i, chunk.offset)
}

/// ORs the first `len` bits of `src` into `dst` from bit `at` on (bit `p %
/// 64` of word `p / 64` for position `p`; the bits of `src` past `len` are
/// clear).
fn or_bits_at(dst: &mut [u64], at: usize, src: &[u64], len: usize) {
    let (w0, sh) = (at / 64, (at % 64) as u32);
    for (k, &word) in src.iter().enumerate().take(len.div_ceil(64)) {
        if word == 0 {
            continue;
        }
        dst[w0 + k] |= word << sh;
        if sh > 0 && word >> (64 - sh) != 0 {
            dst[w0 + k + 1] |= word >> (64 - sh);
        }
    }
}

/// `out[e] = (x[e] − b[e]) · scale` (in `f64`) where bit `first + e` of
/// `bits` is set, else 0: one mask word per run of up to 64 entries.
#[inline]
fn masked(bits: &[u64], first: usize, out: &mut [f64], x: &[f32], b: &[f32], scale: f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { masked_avx2(bits, first, out, x, b, scale) };
        return;
    }
    masked_body(bits, first, out, x, b, scale)
}

/// [`masked`] compiled for AVX2 (the same IEEE operations: the same bits).
/// It runs inside the merge's block loop, from a closure that the compiler
/// does not inline into the AVX2 loop, so it was compiled for SSE2 alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn masked_avx2(bits: &[u64], first: usize, out: &mut [f64], x: &[f32], b: &[f32], scale: f64) {
    masked_body(bits, first, out, x, b, scale)
}

#[inline(always)]
fn masked_body(bits: &[u64], first: usize, out: &mut [f64], x: &[f32], b: &[f32], scale: f64) {
    let n = out.len();
    let (x, b) = (&x[..n], &b[..n]);
    let mut e = 0;
    while e < n {
        let p = first + e;
        let bit = p % 64;
        let len = (64 - bit).min(n - e);
        let word = bits[p / 64] >> bit;
        let run = e..e + len;
        let (o, x, b) = (&mut out[run.clone()], &x[run.clone()], &b[run]);
        for (j, ((o, &x), &b)) in o.iter_mut().zip(x).zip(b).enumerate() {
            let v = (x as f64 - b as f64) * scale;
            *o = if (word >> j) & 1 != 0 { v } else { 0.0 };
        }
        e += len;
    }
}

/// The row length of `shape` (a 1-D tensor is one row).
fn row_len(shape: &[usize]) -> usize {
    match shape {
        [.., last] if *last > 0 => *last,
        _ => shape.iter().product::<usize>().max(1),
    }
}

/// Each model's density and epsilon on a tensor.
fn densities(t: &TensorContext<'_>) -> Result<Vec<(f64, f64)>, MethodError> {
    t.models
        .iter()
        .map(|p| Ok((p.f64("density")?, p.f64("epsilon")?)))
        .collect()
}

/// The statistics of [`L1Pass`]: per model, the kept entries of the tensor
/// (a bit per entry) and the factor applied to them.
struct Kept {
    bits: Vec<Vec<u64>>,
    scale: Vec<f32>,
}

/// `rescale: true` needs the L1 norms of the whole task vector before and
/// after the drop: a per-tensor pass draws the keep decisions (the same
/// draws as the merge would), records them as bits and sums the norms
/// exactly ([`ExactSum`]), so that the tensor is merged in chunks of whole
/// rows.
struct L1Pass {
    rows: Vec<Option<RowKeep>>,
    bits: Vec<Vec<u64>>,
    before: Vec<ExactSum>,
    after: Vec<ExactSum>,
    /// `|x − b|` of a row (as `f64`).
    abs: Vec<f64>,
    /// The same for the kept entries of the row, 0 for the others.
    kept: Vec<f64>,
}

impl L1Pass {
    /// [`rows`](Self::rows) compiled for AVX2 (the same IEEE operations in
    /// the same order: bit-identical results).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn rows_avx2(&mut self, chunk: &Chunk<'_>, base: &[f32]) {
        self.rows(chunk, base)
    }

    /// Draws the keep decisions of a chunk's rows, records them and adds up
    /// the L1 norms.
    #[inline(always)]
    fn rows(&mut self, chunk: &Chunk<'_>, base: &[f32]) {
        let row = row_len(chunk.tensor.shape);
        for (i, keep) in self.rows.iter_mut().enumerate() {
            let Some(keep) = keep else { continue };
            let (x, bits) = (chunk.models[i], &mut self.bits[i]);
            let (before, after) = (&mut self.before[i], &mut self.after[i]);
            let (abs, kept) = (&mut self.abs, &mut self.kept);
            let mut draws = draws_of(chunk, i);
            for start in (0..base.len()).step_by(row) {
                let end = (start + row).min(base.len());
                let (xr, br) = (&x[start..end], &base[start..end]);
                abs.clear();
                abs.extend(
                    xr.iter()
                        .zip(br)
                        .map(|(x, b)| (*x as f64 - *b as f64).abs()),
                );
                before.add_all(abs);
                let mask = keep.mask(xr, br, &mut draws);
                // |τ| of the kept entries, 0 for the others (adds nothing),
                // into another buffer: zeroing `abs` in place compiled to
                // masked stores, which cost more than the whole computation.
                kept.resize(abs.len(), 0.0); // (every entry is written below)
                for ((k, a), &word) in kept.chunks_mut(64).zip(abs.chunks(64)).zip(mask) {
                    for (j, (k, a)) in k.iter_mut().zip(a).enumerate() {
                        // (a bit mask, not a branch: the bits are random)
                        let keep = 0u64.wrapping_sub((word >> j) & 1);
                        *k = f64::from_bits(a.to_bits() & keep);
                    }
                }
                after.add_all(kept);
                or_bits_at(bits, chunk.offset + start, mask, end - start);
            }
        }
    }
}

impl StatsPass for L1Pass {
    fn observe(&mut self, _sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.into(),
        })?;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { self.rows_avx2(chunk, base) };
            return Ok(());
        }
        self.rows(chunk, base);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        let scale = self
            .before
            .iter()
            .zip(&self.after)
            .map(|(b, a)| {
                let (before, after) = (b.value(), a.value());
                if before >= 1e-7 && after >= 1e-7 {
                    (before / after) as f32
                } else {
                    1.0
                }
            })
            .collect();
        Ok(Arc::new(Kept {
            bits: self.bits,
            scale,
        }))
    }
}

fn rescale_of(t: &TensorContext<'_>) -> Result<Rescale, MethodError> {
    Ok(match t.global.str("rescale")? {
        "true" => Rescale::L1,
        "density" => Rescale::Probability,
        _ => Rescale::None,
    })
}

/// The per-tensor pass of both methods: only `rescale: true` needs one, and
/// only for the models that drop anything.
fn tensor_pass(t: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
    if rescale_of(t).ok()? != Rescale::L1 {
        return None;
    }
    let rows: Vec<Option<RowKeep>> = densities(t)
        .ok()?
        .into_iter()
        .map(|(d, e)| (d > 0.0 && d < 1.0).then(|| RowKeep::new(d, e)))
        .collect();
    if rows.iter().all(Option::is_none) {
        return None;
    }
    let words = t.numel().div_ceil(64);
    let m = rows.len();
    Some(Box::new(L1Pass {
        bits: rows
            .iter()
            .map(|r| {
                if r.is_some() {
                    vec![0; words]
                } else {
                    Vec::new()
                }
            })
            .collect(),
        rows,
        before: (0..m).map(|_| ExactSum::new()).collect(),
        after: (0..m).map(|_| ExactSum::new()).collect(),
        abs: Vec::new(),
        kept: Vec::new(),
    }))
}

/// Each entry's multiplier for model `i` on one chunk (0 where dropped).
fn multipliers(
    chunk: &Chunk<'_>,
    i: usize,
    (d, eps): (f64, f64),
    rescale: Rescale,
    mult: &mut Vec<f32>,
) {
    let (t, base, x) = (chunk.tensor, chunk.base.unwrap_or(&[]), chunk.models[i]);
    let n = base.len();
    mult.clear();
    if d >= 1.0 {
        mult.resize(n, 1.0);
        return;
    }
    mult.resize(n, 0.0);
    if d <= 0.0 {
        return;
    }
    let row = row_len(t.shape);
    let mut keep = RowKeep::new(d, eps);
    let mut draws = draws_of(chunk, i);
    for start in (0..n).step_by(row) {
        let end = (start + row).min(n);
        let (m, x, b) = (&mut mult[start..end], &x[start..end], &base[start..end]);
        if rescale == Rescale::Probability {
            keep.with_inverse(x, b, &mut draws, |j, inv| m[j] = inv);
        } else {
            for (w, &word) in keep.mask(x, b, &mut draws).iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    m[64 * w + word.trailing_zeros() as usize] = 1.0;
                    word &= word - 1;
                }
            }
        }
    }
}

fn run(
    info: &MethodInfo,
    rule: Rule,
    chunk: &Chunk<'_>,
    out: &mut [f32],
) -> Result<(), MethodError> {
    let t = chunk.tensor;
    let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
        method: info.name.into(),
    })?;
    let rescale = rescale_of(t)?;
    let combine = Combine {
        weights: ops::weights(t, "weight")?,
        lambda: t.global.f64("lambda")?,
        normalize: t.global.bool("normalize")?,
        rule,
    };
    if rule == Rule::Linear {
        combine.check(info.name, t.name)?;
    }
    let kept = match chunk.tensor_stats {
        Some(s) => Some(
            s.downcast_ref::<Kept>()
                .ok_or_else(|| MethodError::Invalid {
                    method: info.name.into(),
                    tensor: t.name.into(),
                    message: "statistics of another method were passed in".into(),
                })?,
        ),
        None => None,
    };
    // Models whose keep decisions the pass recorded read them as bits (the
    // factor is the same for every kept entry); the others get multipliers.
    let dens = densities(t)?;
    let from_bits: Vec<Option<(&[u64], f64)>> = dens
        .iter()
        .enumerate()
        .map(|(i, &(d, _))| {
            kept.filter(|_| rescale == Rescale::L1 && d > 0.0 && d < 1.0)
                .map(|k| (&k.bits[i][..], k.scale[i] as f64))
        })
        .collect();
    let mut mults = vec![Vec::new(); chunk.models.len()];
    for (i, (m, d)) in mults.iter_mut().zip(dens).enumerate() {
        if from_bits[i].is_none() {
            multipliers(chunk, i, d, rescale, m);
        }
    }
    ops::combine_blocks(&combine, Some(base), out, |i, start, buf| {
        let end = start + buf.len();
        let (x, b) = (&chunk.models[i][start..end], &base[start..end]);
        if let Some((bits, scale)) = from_bits[i] {
            masked(bits, chunk.offset + start, buf, x, b, scale);
            return;
        }
        let m = &mults[i][start..end];
        for (((d, &x), &b), &m) in buf.iter_mut().zip(x).zip(b).zip(m) {
            *d = if m == 0.0 {
                0.0
            } else {
                (x as f64 - b as f64) * m as f64
            };
        }
    });
    Ok(())
}

impl MergeMethod for Della {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// Chunks of whole rows: ranks run within a row.
    fn chunk_multiple(&self, shape: &[usize]) -> usize {
        row_len(shape)
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        tensor_pass(tensor)
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let s = chunk.tensor.global.str("consensus")?;
        let consensus = Consensus::parse(s).ok_or_else(|| MethodError::OutOfRange {
            method: INFO.name.into(),
            param: "consensus".into(),
            value: s.into(),
            range: "sum or count".into(),
        })?;
        run(&INFO, Rule::Ties(consensus), chunk, out)
    }
}

impl MergeMethod for DellaLinear {
    fn info(&self) -> &'static MethodInfo {
        &INFO_LINEAR
    }

    /// Chunks of whole rows: ranks run within a row.
    fn chunk_multiple(&self, shape: &[usize]) -> usize {
        row_len(shape)
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        tensor_pass(tensor)
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        run(&INFO_LINEAR, Rule::Linear, chunk, out)
    }
}

register_method!(Della);
register_method!(DellaLinear);

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference loops are plain on purpose
mod tests {
    use super::*;
    use rand::RngCore;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, ParamValue, registry, rng};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![8, 50], DType::F32),
                TensorInfo::new("bias", vec![30], DType::F32),
                TensorInfo::new("one", vec![1], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(3);
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

    #[allow(clippy::too_many_arguments)]
    fn run_method(
        name: &str,
        seed: u64,
        base: &ParamVector,
        ms: &[&ParamVector],
        p: &[(f64, f64, f64)],
        rescale: &str,
        normalize: bool,
        lambda: f64,
    ) -> ParamVector {
        let m = registry().get(name).unwrap();
        let per: Vec<Vec<(&str, ParamValue)>> = p
            .iter()
            .map(|&(w, d, e)| {
                vec![
                    ("weight", w.into()),
                    ("density", d.into()),
                    ("epsilon", e.into()),
                ]
            })
            .collect();
        let g = vec![
            ("rescale", rescale.into()),
            ("normalize", normalize.into()),
            ("lambda", lambda.into()),
        ];
        Merge::new(m, g, per)
            .unwrap()
            .seed(seed)
            .run(Some(base), ms)
            .unwrap()
    }

    /// Reference: ranks by counting smaller magnitudes (plus earlier equal
    /// ones), probabilities by the paper's formula, draws from the documented
    /// stream (one u32 per entry, kept when u < p·2³²), f64 loops.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        seed: u64,
        name: &str,
        shape: &[usize],
        base: &[f32],
        xs: &[&[f32]],
        p: &[(f64, f64, f64)],
        rescale: &str,
        ties: bool,
        normalize: bool,
        lambda: f64,
    ) -> Vec<f64> {
        let n = base.len();
        let row = *shape.last().unwrap();
        let mut masked = vec![];
        for (i, (x, &(_, d, eps))) in xs.iter().zip(p).enumerate() {
            let tau: Vec<f64> = (0..n).map(|e| x[e] as f64 - base[e] as f64).collect();
            let mag: Vec<f32> = (0..n).map(|e| (x[e] - base[e]).abs()).collect();
            let mut rng = rng::stream(seed, name, i, 0);
            let mut m = vec![0.0; n];
            for e in 0..n {
                let u = rng.next_u32();
                let r0 = e / row * row;
                let rank = (r0..(r0 + row).min(n))
                    .filter(|&f| mag[f] < mag[e] || (mag[f] == mag[e] && f < e))
                    .count();
                let len = (r0 + row).min(n) - r0;
                let frac = if len > 1 {
                    rank as f64 / (len - 1) as f64
                } else {
                    0.5
                };
                let prob = (d - eps + 2.0 * eps * frac).clamp(0.0, 1.0);
                let keep = if d >= 1.0 {
                    true
                } else if d <= 0.0 {
                    false
                } else {
                    (u as f64) < prob * 4294967296.0
                };
                if keep {
                    m[e] = if rescale == "density" && d < 1.0 {
                        tau[e] * (1.0 / prob) as f32 as f64
                    } else {
                        tau[e]
                    };
                }
            }
            if rescale == "true" {
                let before: f64 = tau.iter().map(|v| v.abs()).sum();
                let after: f64 = (0..n).filter(|&e| m[e] != 0.0).map(|e| tau[e].abs()).sum();
                if before >= 1e-7 && after >= 1e-7 {
                    let s = (before / after) as f32 as f64;
                    m.iter_mut().for_each(|v| *v *= s);
                }
            }
            masked.push(m);
        }
        (0..n)
            .map(|e| {
                let w = |i: usize| p[i].0;
                let merged = if ties {
                    let s: f64 = (0..xs.len()).map(|i| w(i) * masked[i][e]).sum();
                    let (mut num, mut den) = (0.0, 0.0);
                    for i in 0..xs.len() {
                        let v = w(i) * masked[i][e];
                        if v != 0.0 && (v > 0.0) == (s >= 0.0) {
                            num += v;
                            den += w(i);
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
                    let s: f64 = (0..xs.len()).map(|i| w(i) * masked[i][e]).sum();
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

    /// The implementation before the speed-up (one `next_u32` per entry,
    /// ranks from a stable sort, each `|τ|` added to an [`ExactSum`], the
    /// bits read one by one), on a whole tensor: the output bits the method
    /// must keep.
    #[allow(clippy::too_many_arguments)]
    fn old_tensor(
        seed: u64,
        name: &str,
        shape: &[usize],
        base: &[f32],
        xs: &[&[f32]],
        p: &[(f64, f64, f64)],
        rescale: &str,
        rule: Rule,
        normalize: bool,
        lambda: f64,
    ) -> Vec<f32> {
        let n = base.len();
        let row = row_len(shape);
        // Per model: a multiplier per entry (0 where dropped) and one factor.
        let mut mults = vec![];
        for (i, (x, &(_, d, eps))) in xs.iter().zip(p).enumerate() {
            let mut rng = rng::stream(seed, name, i, 0);
            let mut m = vec![0.0f32; n];
            if d >= 1.0 {
                m.iter_mut().for_each(|m| *m = 1.0);
            } else if d > 0.0 {
                for start in (0..n).step_by(row) {
                    let end = (start + row).min(n);
                    let len = end - start;
                    let draws: Vec<u32> = (0..len).map(|_| rng.next_u32()).collect();
                    let mut order: Vec<usize> = (0..len).collect();
                    order.sort_by_key(|&j| magnitude_key(x[start + j] - base[start + j]));
                    for (r, &j) in order.iter().enumerate() {
                        let prob = probability(r, len, d, eps);
                        let limit = ops::dare_limit(prob).map_or(0, |l| l as u64 + 1);
                        if (draws[j] as u64) < limit {
                            m[start + j] = if rescale == "density" {
                                (1.0 / prob) as f32
                            } else {
                                1.0
                            };
                        }
                    }
                }
            }
            let mut scale = None;
            if rescale == "true" && d > 0.0 && d < 1.0 {
                let (mut before, mut after) = (ExactSum::new(), ExactSum::new());
                for e in 0..n {
                    let v = (x[e] as f64 - base[e] as f64).abs();
                    before.add(v);
                    if m[e] != 0.0 {
                        after.add(v);
                    }
                }
                let (before, after) = (before.value(), after.value());
                scale = Some(if before >= 1e-7 && after >= 1e-7 {
                    (before / after) as f32
                } else {
                    1.0
                });
            }
            mults.push((m, scale));
        }
        let combine = Combine {
            weights: p.iter().map(|q| q.0).collect(),
            lambda,
            normalize,
            rule,
        };
        let mut out = vec![0.0f32; n];
        ops::combine_blocks(&combine, Some(base), &mut out, |i, start, buf| {
            let (m, scale) = &mults[i];
            for (j, d) in buf.iter_mut().enumerate() {
                let e = start + j;
                let v = x_minus_b(xs[i][e], base[e]);
                *d = match scale {
                    Some(s) if m[e] != 0.0 => v * *s as f64,
                    Some(_) => 0.0,
                    None if m[e] == 0.0 => 0.0,
                    None => v * m[e] as f64,
                };
            }
        });
        out
    }

    fn x_minus_b(x: f32, b: f32) -> f64 {
        x as f64 - b as f64
    }

    /// Bit for bit the outputs of the implementation before the speed-up
    /// ([`old_tensor`]): rows shorter and longer than the radix threshold, a
    /// 1-D tensor of one long row, values with many equal magnitudes and a
    /// large outlier, densities that keep all, none or some, spreads that
    /// clamp probabilities at 0 and 1, every rescale mode, whole tensors and
    /// chunks.
    #[test]
    fn bits_of_the_old_implementation() {
        let l = Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![8, 50], DType::F32),
                TensorInfo::new("wide", vec![6, 300], DType::F32),
                TensorInfo::new("long", vec![3, 1000], DType::F32),
                TensorInfo::new("bias", vec![2100], DType::F32),
                TensorInfo::new("one", vec![1], DType::F32),
            ])
            .unwrap(),
        );
        let base = random(&l, 31);
        let ms: Vec<ParamVector> = (0..3)
            .map(|k| {
                let mut v = random(&l, 40 + k).values().unwrap().to_vec();
                let b = base.values().unwrap();
                for (e, v) in v.iter_mut().enumerate() {
                    match (e + k as usize) % 7 {
                        // Equal magnitudes: the task vector quantised.
                        0 | 1 => *v = b[e] + ((*v * 8.0).round() / 64.0),
                        _ => {}
                    }
                }
                v[17] = 1e4; // an outlier in the first row of "w"
                ParamVector::from_vec(l.clone(), v).unwrap()
            })
            .collect();
        let refs: Vec<&ParamVector> = ms.iter().collect();
        let cases: [&[(f64, f64, f64)]; 4] = [
            &[(1.0, 0.2, 0.15), (0.3, 0.5, 0.1), (0.7, 0.9, 0.3)],
            &[(0.5, 0.1, 0.3), (0.5, 0.95, 0.5), (0.2, 1.0, 0.1)],
            &[(1.0, 0.3, 0.0), (1.0, 0.0, 0.2), (-0.4, 0.6, 0.6)],
            &[(0.6, 0.5, 1.0)],
        ];
        for p in cases {
            let refs = &refs[..p.len()];
            for (name, rule, normalize) in [
                ("della", Rule::Ties(Consensus::Sum), true),
                ("della_linear", Rule::Linear, false),
            ] {
                for rescale in ["true", "false", "density"] {
                    for (seed, chunk) in [(3, usize::MAX), (4, 1000)] {
                        let m = registry().get(name).unwrap();
                        let per: Vec<Vec<(&str, ParamValue)>> = p
                            .iter()
                            .map(|&(w, d, e)| {
                                vec![
                                    ("weight", w.into()),
                                    ("density", d.into()),
                                    ("epsilon", e.into()),
                                ]
                            })
                            .collect();
                        let g = vec![
                            ("rescale", rescale.into()),
                            ("normalize", normalize.into()),
                            ("lambda", 0.8.into()),
                        ];
                        let out = Merge::new(m, g, per)
                            .unwrap()
                            .seed(seed)
                            .chunk_len(chunk)
                            .run(Some(&base), refs)
                            .unwrap();
                        for (info, r) in l.float_tensors() {
                            let xs: Vec<&[f32]> = refs
                                .iter()
                                .map(|m| &m.values().unwrap()[r.clone()])
                                .collect();
                            let want = old_tensor(
                                seed,
                                &info.name,
                                &info.shape,
                                &base.values().unwrap()[r.clone()],
                                &xs,
                                p,
                                rescale,
                                rule,
                                normalize,
                                0.8,
                            );
                            let got = &out.values().unwrap()[r.clone()];
                            for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                                assert_eq!(
                                    g.to_bits(),
                                    w.to_bits(),
                                    "{name} rescale {rescale} chunk {chunk} {p:?}: {} entry {e}: {g} vs {w}",
                                    info.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_reference() {
        let l = layout();
        let base = random(&l, 1);
        let ms: Vec<ParamVector> = (2..5).map(|k| random(&l, k)).collect();
        let refs: Vec<&ParamVector> = ms.iter().collect();
        let p = [(1.0, 0.5, 0.2), (0.7, 0.3, 0.1), (1.2, 0.9, 0.3)];
        for (name, ties, normalize) in [
            ("della", true, true),
            ("della_linear", false, false),
            ("della", true, false),
        ] {
            for rescale in ["true", "false", "density"] {
                let out = run_method(name, 5, &base, &refs, &p, rescale, normalize, 0.9);
                for (info, r) in l.float_tensors() {
                    let xs: Vec<&[f32]> =
                        ms.iter().map(|m| &m.values().unwrap()[r.clone()]).collect();
                    let want = reference(
                        5,
                        &info.name,
                        &info.shape,
                        &base.values().unwrap()[r.clone()],
                        &xs,
                        &p,
                        rescale,
                        ties,
                        normalize,
                        0.9,
                    );
                    for (g, w) in out.values().unwrap()[r.clone()].iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                            "{name} {rescale}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn keep_rate_and_rank_dependence() {
        let l =
            Arc::new(Layout::new(vec![TensorInfo::new("w", vec![20, 500], DType::F32)]).unwrap());
        let base = ParamVector::zeros(l.clone());
        let x = random(&l, 9);
        let out = run_method(
            "della_linear",
            3,
            &base,
            &[&x],
            &[(1.0, 0.4, 0.3)],
            "false",
            false,
            1.0,
        );
        let v = out.values().unwrap();
        let kept = v.iter().filter(|v| **v != 0.0).count() as f64;
        // 10 000 Bernoulli draws with mean 0.4: sd ≈ 0.0049·n; allow 5 sd.
        assert!(
            (kept / 10_000.0 - 0.4).abs() < 0.025,
            "keep rate {}",
            kept / 10_000.0
        );
        // The largest fifth of magnitudes is kept more often than the smallest fifth.
        let xs = x.values().unwrap();
        let mut order: Vec<usize> = (0..10_000).collect();
        order.sort_by(|&a, &b| xs[a].abs().partial_cmp(&xs[b].abs()).unwrap());
        let rate =
            |idx: &[usize]| idx.iter().filter(|&&e| v[e] != 0.0).count() as f64 / idx.len() as f64;
        let (low, high) = (rate(&order[..2000]), rate(&order[8000..]));
        assert!(high > low + 0.3, "low {low}, high {high}");
    }

    #[test]
    fn seeds_determinism_and_unbiased_rescale() {
        let l = layout();
        let (base, x) = (random(&l, 11), random(&l, 12));
        let p = [(1.0, 0.5, 0.2)];
        let a = run_method("della_linear", 1, &base, &[&x], &p, "true", false, 1.0);
        let b = run_method("della_linear", 1, &base, &[&x], &p, "true", false, 1.0);
        let c = run_method("della_linear", 2, &base, &[&x], &p, "true", false, 1.0);
        assert_eq!(a.values().unwrap(), b.values().unwrap());
        assert_ne!(a.values().unwrap(), c.values().unwrap());
        // The paper's 1/p rescaling is unbiased: the mean over seeds approaches τ.
        let n = l.num_params();
        let mut mean = vec![0.0f64; n];
        let seeds = 400;
        for s in 0..seeds {
            let o = run_method("della_linear", s, &base, &[&x], &p, "density", false, 1.0);
            for e in 0..n {
                mean[e] +=
                    (o.values().unwrap()[e] - base.values().unwrap()[e]) as f64 / seeds as f64;
            }
        }
        let (xv, bv) = (x.values().unwrap(), base.values().unwrap());
        let err: f64 = (0..n)
            .map(|e| (mean[e] - (xv[e] - bv[e]) as f64).abs())
            .sum::<f64>()
            / n as f64;
        let scale: f64 = (0..n).map(|e| ((xv[e] - bv[e]) as f64).abs()).sum::<f64>() / n as f64;
        assert!(
            err < 0.12 * scale,
            "mean abs error {err} vs mean |τ| {scale}"
        );
    }

    #[test]
    fn density_one_keeps_everything() {
        let l = layout();
        let (base, x, y) = (random(&l, 21), random(&l, 22), random(&l, 23));
        // della_linear with density 1 = task arithmetic.
        let out = run_method(
            "della_linear",
            0,
            &base,
            &[&x, &y],
            &[(1.0, 1.0, 0.1), (0.5, 1.0, 0.1)],
            "true",
            false,
            1.0,
        );
        let (b, xv, yv) = (
            base.values().unwrap(),
            x.values().unwrap(),
            y.values().unwrap(),
        );
        for e in 0..l.num_params() {
            let want =
                b[e] as f64 + (xv[e] as f64 - b[e] as f64) + 0.5 * (yv[e] as f64 - b[e] as f64);
            assert!((out.values().unwrap()[e] as f64 - want).abs() < 1e-6);
        }
        // della with one model, density 1, weight 1, normalize: the model.
        let out = run_method(
            "della",
            0,
            &base,
            &[&x],
            &[(1.0, 1.0, 0.1)],
            "true",
            true,
            1.0,
        );
        for (o, v) in out.values().unwrap().iter().zip(xv) {
            assert!((o - v).abs() < 1e-6);
        }
        // density 0: the base.
        let out = run_method(
            "della",
            0,
            &base,
            &[&x],
            &[(1.0, 0.0, 0.1)],
            "true",
            true,
            1.0,
        );
        assert_eq!(out.values().unwrap(), b);
    }

    #[test]
    fn probabilities_follow_the_paper() {
        let p = row_probabilities(&[0.1, -0.5, 0.3, 0.0, 0.2], 0.5, 0.2);
        // ranks by |τ| ascending: 0.0→0, 0.1→1, 0.2→2, 0.3→3, 0.5→4
        let want = [0.4, 0.7, 0.6, 0.3, 0.5];
        for (g, w) in p.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{p:?}");
        }
        assert_eq!(row_probabilities(&[3.0], 0.5, 0.2), vec![0.5]);
        // clamped at 1
        let p = row_probabilities(&[1.0, 2.0], 0.9, 0.3);
        assert!((p[0] - 0.6).abs() < 1e-12 && p[1] == 1.0, "{p:?}");
    }

    /// Precision on a tensor of 2^24 elements (issue #15): `rescale: true`
    /// keeps the L1 norm of the whole [4096, 4096] task vector. With base 0
    /// and every `|τ| = c` (signs alternating in a pattern), the factor is
    /// exactly `Σ|τ| / Σ_kept |τ| = n / k`, `k` the number of kept entries,
    /// which the output itself shows (kept entries are the non-zero ones).
    /// So every kept entry must be `λ · τ · n/k` (della, normalised by its
    /// one weight) or `λ · w · τ · n/k` (della_linear); the dropped ones are
    /// the base, 0.
    ///
    /// Why f32 would fail: a running f32 sum of 2^24 terms `c = 0.0123`
    /// comes out 17% high, and of the ≈ 0.3 · 2^24 kept terms by a different
    /// share, so the factor is off by percents, against a tolerance of 1e-6
    /// relative on each kept entry (f64 or exact sums give `n/k` to ~1e-16;
    /// the factor is stored as f32, 6e-8). Checked: with the two L1 norms
    /// summed in f32 this test fails, worst relative error 2.1e-1 with one
    /// accumulator each (4.3e-3 with 8 lanes), and 1.1e-2 in the chunked run
    /// with an f32 sum per chunk of 2^20 entries, the chunks' sums added
    /// exactly. (`c = 0.01` at density 0.5 would guard badly: running f32
    /// sums of 2^24 and of 2^23 such terms are off by the same share,
    /// −0.95%, so their ratio would come out nearly right.)
    #[test]
    fn precision_2_24_della_l1_rescale() {
        const N: usize = 1 << 24;
        let l = Arc::new(
            Layout::new(vec![TensorInfo::new("w", vec![4096, 4096], DType::F32)]).unwrap(),
        );
        let c = 0.0123f32;
        let tau = |e: usize| if e % 3 == 1 { -c } else { c };
        let base = ParamVector::zeros(l.clone());
        let x = ParamVector::from_vec(l.clone(), (0..N).map(tau).collect()).unwrap();
        // Whole tensor, and in 16 chunks of 256 rows (the norms then add up
        // across chunks, as when the engine streams a tensor).
        for (name, w, lambda, normalize, chunk) in [
            ("della", 1.0, 1.0, true, usize::MAX),
            ("della_linear", 0.5, 0.8, false, 1 << 20),
        ] {
            let m = registry().get(name).unwrap();
            let g = vec![
                ("rescale", "true".into()),
                ("normalize", normalize.into()),
                ("lambda", lambda.into()),
            ];
            let per = vec![vec![
                ("weight", w.into()),
                ("density", 0.3.into()),
                ("epsilon", 0.1.into()),
            ]];
            let out = Merge::new(m, g, per)
                .unwrap()
                .seed(11)
                .chunk_len(chunk)
                .run(Some(&base), &[&x])
                .unwrap();
            let v = out.values().unwrap();
            let k = v.iter().filter(|v| **v != 0.0).count();
            assert!(
                (k as f64 / N as f64 - 0.3).abs() < 0.01,
                "{name}: kept {k} of {N}"
            );
            let gain = lambda * if normalize { 1.0 } else { w } * N as f64 / k as f64;
            // The kept entries (the others are 0: base 0, dropped τ).
            let (worst, at) = tensormerge_methods::testkit::worst_relative_error(v, |e| {
                (v[e] != 0.0).then(|| gain * tau(e) as f64)
            });
            assert!(
                worst < 1e-6,
                "{name}: worst relative error {worst:e} at entry {at}: got {}, factor n/k = {}",
                v[at],
                N as f64 / k as f64
            );
        }
    }
}
