//! # tensormerge-method-dare
//!
//! DARE, "drop and rescale" (Yu et al. 2024, "Language Models are Super
//! Mario", arXiv:2311.03099), as two methods:
//!
//! - `dare_linear`: `out = b + λ · Σ w_i τ̃_i` (divided by `Σ w_i` when
//!   `normalize`, default false);
//! - `dare_ties`: the TIES sign election and disjoint merge (Yadav et al.
//!   2023, arXiv:2306.01708) over `δ_i = w_i τ̃_i`, `out = b + λ · merged`
//!   (`normalize` default false, `consensus: sum|count`).
//!
//! where `τ̃_i` is model i's task vector `τ_i = x_i − b` with each entry kept
//! independently with probability `d_i` (`density`) and zeroed otherwise,
//! the kept entries then rescaled (`rescale`):
//!
//! - `true` (default, mergekit's rule): by `‖τ_i‖₁ / ‖τ̃_i‖₁` over the
//!   tensor, so the tensor's L1 norm is unchanged (a per-tensor pass, summed
//!   in a chunk-invariant order);
//! - `density`: by the paper's `1 / d_i` (unbiased: `E[τ̃_i] = τ_i`);
//! - `false`: not rescaled.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_dare as _; // link the crate so it registers
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![1000], DType::F32)]).unwrap());
//! let base = ParamVector::zeros(layout.clone());
//! let model = ParamVector::full(layout.clone(), 1.0);
//! let dare = registry().get("dare-linear").unwrap();
//! let merge = Merge::new(dare, vec![], vec![vec![("density", 0.25.into())]]).unwrap().seed(7);
//! let out = merge.run(Some(&base), &[&model]).unwrap();
//! let kept = out.values().unwrap().iter().filter(|&&v| v != 0.0).count();
//! assert!((200..300).contains(&kept)); // about a quarter kept…
//! assert!((out.norm_l1().unwrap() - 1000.0).abs() < 1e-3); // …rescaled to the same L1 norm
//! ```
//!
//! ## Randomness
//!
//! The keep decision of model i on entry e of tensor t is `u < d_i · 2³²` for
//! the draw `u` at position e of the ChaCha8 stream keyed by `(seed, t, i)`
//! ([`TensorContext::rng`](tensormerge_methods::TensorContext::rng)). So the
//! output depends only on the seed (default 0), never on chunking, threads or
//! tensor order; the same seed gives the same output.
//!
//! ## Differences from mergekit
//!
//! - mergekit draws the mask with `torch.bernoulli` (not reproducible across
//!   devices or versions); here the stream is specified.
//! - mergekit skips the L1 rescale when either norm is below `1e-7`; here it
//!   is skipped only when nothing was kept (the kept norm is exactly 0), so
//!   tensors with tiny deltas are rescaled too.
//! - `rescale: density` (the paper's `1/d`) is our addition.
//! - `weight` defaults to 1.0 (mergekit requires it); `int8_mask` is accepted
//!   and has no effect.
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::ops::{self, Combine, Consensus, PositionalSum, Rule};
use tensormerge_methods::rng;
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Params,
    Stats, StatsPass, TensorContext, register_method,
};

/// The `dare_linear` method.
#[derive(Debug, Clone, Copy)]
pub struct DareLinear;

/// The `dare_ties` method.
#[derive(Debug, Clone, Copy)]
pub struct DareTies;

const WEIGHT: ParamSpec = ParamSpec::WEIGHT;
const DENSITY: ParamSpec = ParamSpec::per_model_float(
    "density",
    0.0,
    1.0,
    Default::Float(1.0),
    "probability d_i that an entry of the task vector is kept",
);
const LAMBDA: ParamSpec = ParamSpec::LAMBDA;
const RESCALE: ParamSpec = ParamSpec::global(
    "rescale",
    ParamKind::Choice(&["true", "false", "density"]),
    Default::Choice("true"),
    "rescale kept entries: true = keep the tensor's L1 norm, density = 1/d (paper), false = none",
);
const INT8_MASK: ParamSpec = ParamSpec::INT8_MASK;

/// Declared parameters of `dare_linear`.
pub const LINEAR_PARAMS: &[ParamSpec] = &[
    WEIGHT,
    DENSITY,
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

/// Declared parameters of `dare_ties`.
pub const TIES_PARAMS: &[ParamSpec] = &[
    WEIGHT,
    DENSITY,
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

/// What `dare_linear` is.
pub static LINEAR_INFO: MethodInfo = MethodInfo {
    name: "dare_linear",
    summary: "randomly drop task-vector entries, rescale, and add the weighted sum to the base",
    paper: "Yu et al. 2024, arXiv:2311.03099",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: LINEAR_PARAMS,
};

/// What `dare_ties` is.
pub static TIES_INFO: MethodInfo = MethodInfo {
    name: "dare_ties",
    summary: "randomly drop task-vector entries, rescale, then TIES sign election and disjoint merge",
    paper: "Yu et al. 2024, arXiv:2311.03099; Yadav et al. 2023, arXiv:2306.01708",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: TIES_PARAMS,
};

/// How kept entries are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rescale {
    L1,
    Density,
    None,
}

fn rescale(method: &str, global: &Params) -> Result<Rescale, MethodError> {
    match global.str("rescale")? {
        "true" => Ok(Rescale::L1),
        "density" => Ok(Rescale::Density),
        "false" => Ok(Rescale::None),
        other => Err(MethodError::OutOfRange {
            method: method.into(),
            param: "rescale".into(),
            value: other.into(),
            range: "true, false or density".into(),
        }),
    }
}

/// Elements per block of the L1 pass: its buffers (draws, two `f64` rows)
/// and the inputs' blocks stay well inside the L1 cache.
const PASS_BLOCK: usize = 256;

/// How far ahead of the current block the L1 pass prefetches its inputs.
const PREFETCH_AHEAD: usize = 2 * PASS_BLOCK;

/// Whether entries of a model at density `d` are dropped at all.
fn drops(d: f64) -> bool {
    d < 1.0
}

/// The draws of model `i` on `tensor` from element `offset` on: the words
/// of [`TensorContext::rng`], generated in bulk ([`rng::Draws`]).
fn stream_of(tensor: &TensorContext<'_>, i: usize, offset: usize) -> rng::Draws {
    rng::Draws::new(tensor.seed, tensor.name, i, offset)
}

/// Fills `out` with the next words of `rng`.
fn draw(rng: &mut rng::Draws, out: &mut [u32]) {
    rng.fill(out);
}

/// A keep mask over a whole tensor, one bit per entry (bit `p % 64` of word
/// `p / 64` for the entry at position `p`).
fn mask_words(numel: usize) -> Vec<u64> {
    vec![0; numel.div_ceil(64)]
}

/// Whether the entry at position `p` is kept by `mask`.
#[cfg(test)]
fn mask_keeps(mask: &[u64], p: usize) -> bool {
    (mask[p >> 6] >> (p & 63)) & 1 != 0
}

/// Visits the positions `first..first + n` in runs within one mask word:
/// `f(e, word_index, bit, len)` for the run starting at `first + e` (bit
/// `bit` of word `word_index`), `len` entries long.
#[inline]
fn word_runs(first: usize, n: usize, mut f: impl FnMut(usize, usize, u32, usize)) {
    let mut e = 0;
    while e < n {
        let p = first + e;
        let bit = p & 63;
        let len = (64 - bit).min(n - e);
        f(e, p >> 6, bit as u32, len);
        e += len;
    }
}

/// Splits positions `first..first + n` into a head before the first
/// multiple of 64, whole mask words, and a tail: `(head, words)`.
#[inline(always)]
fn aligned(first: usize, n: usize) -> (usize, usize) {
    let head = ((64 - first % 64) % 64).min(n);
    (head, (n - head) / 64)
}

/// The keep rule at density `d` as `(limit, any)`: a draw `u` is kept iff
/// `any && u <= limit` ([`ops::dare_limit`], the same decisions as
/// [`ops::dare_keep`]).
#[inline(always)]
fn keep_rule(d: f64) -> (u32, bool) {
    match ops::dare_limit(d) {
        Some(l) => (l, true),
        None => (0, false),
    }
}

/// Records the keep decisions of `draws` (positions `first..`) in `mask`.
#[inline(always)]
fn record(mask: &mut [u64], first: usize, draws: &[u32], d: f64) {
    let (limit, any) = keep_rule(d);
    let keep = |u: u32| any & (u <= limit);
    let n = draws.len();
    let (head, words) = aligned(first, n);
    let runs = |mask: &mut [u64], from: usize, to: usize| {
        word_runs(first + from, to - from, |e, w, bit, len| {
            let mut word = 0u64;
            for (j, &u) in draws[from + e..from + e + len].iter().enumerate() {
                word |= u64::from(keep(u)) << j;
            }
            mask[w] |= word << bit;
        })
    };
    runs(mask, 0, head);
    let w0 = (first + head) / 64;
    if any {
        // Whole words, which no other block writes.
        ops::bits_at_most(
            &draws[head..head + 64 * words],
            limit,
            &mut mask[w0..w0 + words],
        );
    }
    runs(mask, head + 64 * words, n);
}

/// `out[e] = (x[e] − b[e]) · s` (in `f64`) where `mask` keeps position
/// `first + e`, else 0.
#[inline(always)]
fn masked(mask: &[u64], first: usize, out: &mut [f64], x: &[f32], b: &[f32], s: f64) {
    let n = out.len();
    let (x, b) = (&x[..n], &b[..n]);
    let (head, words) = aligned(first, n);
    let runs = |out: &mut [f64], from: usize, to: usize| {
        word_runs(first + from, to - from, |e, w, bit, len| {
            let word = mask[w] >> bit;
            let at = from + e..from + e + len;
            let (o, x, b) = (&mut out[at.clone()], &x[at.clone()], &b[at]);
            for (j, ((o, &x), &b)) in o.iter_mut().zip(x).zip(b).enumerate() {
                let v = (x as f64 - b as f64) * s;
                *o = if (word >> j) & 1 != 0 { v } else { 0.0 };
            }
        })
    };
    runs(out, 0, head);
    let w0 = (first + head) / 64;
    let body = head..head + 64 * words;
    let blocks = out[body.clone()]
        .chunks_exact_mut(64)
        .zip(x[body.clone()].chunks_exact(64))
        .zip(b[body].chunks_exact(64));
    for (c, ((o, x), b)) in blocks.enumerate() {
        let word = mask[w0 + c];
        for (j, ((o, &x), &b)) in o.iter_mut().zip(x).zip(b).enumerate() {
            let v = (x as f64 - b as f64) * s;
            *o = if (word >> j) & 1 != 0 { v } else { 0.0 };
        }
    }
    runs(out, head + 64 * words, n);
}

/// One block of [`L1Pass::blocks`] for one model, in AVX2 registers: adds
/// `|x − b|` (in `f64`; `bd` is the block of the base already converted to
/// `f64`) to `total` and the kept ones to `kept` (draws `≤ limit`, the rule
/// of [`keep_rule`] when it keeps any), and sets the keep bits of positions
/// `at..` in `mask`. Prefetches one cache line of `ahead` (the model's
/// elements [`PREFETCH_AHEAD`] further on, [`ahead_of`]) per 16 elements.
/// The same sums in the same lane order as [`PositionalSum::add_at`] and
/// the same bits as [`record`].
///
/// # Safety
/// AVX2 is available; `at` and `x.len()` are multiples of 8 and `bd`,
/// `draws` are as long as `x`, `mask` covers position `at + x.len() - 1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn l1_block_avx2(
    x: &[f32],
    bd: &[f64],
    draws: &[u32],
    limit: u32,
    ahead: &[f32],
    at: usize,
    mask: &mut [u64],
    total: &mut ops::PositionalSum,
    kept: &mut ops::PositionalSum,
) {
    use std::arch::x86_64::*;
    assert!(at.is_multiple_of(8) && x.len().is_multiple_of(8));
    assert!(bd.len() == x.len() && draws.len() == x.len());
    assert!(x.is_empty() || (at + x.len() - 1) / 64 < mask.len());
    let (t, k) = (total.lanes(), kept.lanes());
    // SAFETY (the block): AVX2 is enabled on this function; every load is
    // within the slices, whose lengths are asserted above; `[f64; 8]` is 8
    // contiguous `f64`s.
    unsafe {
        let mut t = [
            _mm256_loadu_pd(t.as_ptr()),
            _mm256_loadu_pd(t.as_ptr().add(4)),
        ];
        let mut k = [
            _mm256_loadu_pd(k.as_ptr()),
            _mm256_loadu_pd(k.as_ptr().add(4)),
        ];
        let abs = _mm256_castsi256_pd(_mm256_set1_epi64x(i64::MAX));
        let lim = _mm256_set1_epi32(limit as i32);
        // Eight elements at `e` (`at + e` is a multiple of 8): the keep
        // decisions of all eight, then lanes 0-3 and 4-7 of the sums.
        macro_rules! eight {
            ($e:expr) => {{
                let e = $e;
                let u = _mm256_loadu_si256(draws.as_ptr().add(e) as *const __m256i);
                // u <= limit, unsigned: min(u, limit) == u.
                let keep = _mm256_cmpeq_epi32(_mm256_min_epu32(u, lim), u);
                let bits = _mm256_movemask_ps(_mm256_castsi256_ps(keep)) as u64;
                let p = at + e;
                *mask.get_unchecked_mut(p >> 6) |= bits << (p & 63);
                let halves = [
                    _mm256_castsi256_si128(keep),
                    _mm256_extracti128_si256::<1>(keep),
                ];
                for (h, half) in halves.into_iter().enumerate() {
                    let e = e + 4 * h;
                    let xv = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(e)));
                    let bv = _mm256_loadu_pd(bd.as_ptr().add(e));
                    let v = _mm256_and_pd(_mm256_sub_pd(xv, bv), abs);
                    let kv = _mm256_and_pd(v, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(half)));
                    t[h] = _mm256_add_pd(t[h], v);
                    k[h] = _mm256_add_pd(k[h], kv);
                }
            }};
        }
        // Sixteen elements per iteration, with one prefetch each, not eight
        // with a test for the prefetch and a bounds check in it: that
        // bookkeeping was about a quarter of the loop's instructions. The same
        // operations in the same order; 4 – 7% less time for dare_ties and
        // dare_linear at 16M elements (whole merge, medians of 31 – 41 runs,
        // hand-measured by alternating both forms in one process).
        let sixteens = x.len() / 16 * 16;
        for e in (0..sixteens).step_by(16) {
            // A prefetch never faults, so none is checked: past the end of
            // `ahead` (near the end of the tensor) it only hints at a line
            // that is not needed.
            _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().wrapping_add(e).cast());
            eight!(e);
            eight!(e + 8);
        }
        if sixteens < x.len() {
            eight!(sixteens);
        }
        let mut out = [0.0f64; 8];
        _mm256_storeu_pd(out.as_mut_ptr(), t[0]);
        _mm256_storeu_pd(out.as_mut_ptr().add(4), t[1]);
        total.set_lanes(out);
        _mm256_storeu_pd(out.as_mut_ptr(), k[0]);
        _mm256_storeu_pd(out.as_mut_ptr().add(4), k[1]);
        kept.set_lanes(out);
    }
}

/// The block of `x` that [`L1Pass::blocks`] prefetches while at block
/// `start`: [`PREFETCH_AHEAD`] further on, cut at the end of `x`.
#[cfg(target_arch = "x86_64")]
fn ahead_of(x: &[f32], start: usize) -> &[f32] {
    let from = (start + PREFETCH_AHEAD).min(x.len());
    &x[from..(from + PASS_BLOCK).min(x.len())]
}

/// The L1 norms of each model's task vector and of its kept entries, summed
/// chunk-invariantly ([`PositionalSum`]).
struct L1Pass {
    method: &'static str,
    densities: Vec<f64>,
    total: Vec<PositionalSum>,
    kept: Vec<PositionalSum>,
    /// Each model's keep decisions, recorded while drawing them so that the
    /// merge does not draw again (empty for models that drop nothing).
    masks: Vec<Vec<u64>>,
}

impl L1Pass {
    /// [`blocks`](Self::blocks) compiled for AVX2 (the same IEEE operations
    /// in the same order: bit-identical results).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn blocks_avx2(&mut self, chunk: &Chunk<'_>, base: &[f32]) {
        self.blocks::<true>(chunk, base)
    }

    /// Draws the keep decisions of a chunk, records them and adds up the L1
    /// norms.
    /// With `FUSED` (only from [`blocks_avx2`](Self::blocks_avx2)), the
    /// blocks at positions that are multiples of 8 go through
    /// [`l1_block_avx2`].
    #[inline(always)]
    fn blocks<const FUSED: bool>(&mut self, chunk: &Chunk<'_>, base: &[f32]) {
        let (mut all, mut kept) = ([0.0f64; PASS_BLOCK], [0.0f64; PASS_BLOCK]);
        let mut draws = [0u32; PASS_BLOCK];
        // The block of the base as `f64`, converted once for every model
        // instead of once per model, and the keep decisions compared eight
        // at a time: 4 – 6% less time for dare_linear and dare_ties at 16M
        // elements (hand-measured, both forms alternating in one process).
        let mut base_f64 = [0.0f64; PASS_BLOCK];
        let mut rngs: Vec<_> = (0..self.densities.len())
            .map(|i| stream_of(chunk.tensor, i, chunk.offset))
            .collect();
        // Block by block, every model in turn: the base block stays in cache.
        for start in (0..base.len()).step_by(PASS_BLOCK) {
            let end = (start + PASS_BLOCK).min(base.len());
            let n = end - start;
            let b = &base[start..end];
            let at = chunk.offset + start;
            // The inputs' cache lines two blocks ahead, as TIES' pass does
            // (7% less time for dare_linear and dare_ties at 16M elements,
            // hand-measured by alternating both forms in one process). The
            // AVX2 blocks spread the models' prefetches over their loop, a
            // line per 16 elements, instead of 16 lines of each model at the
            // start of the block: 5 – 7% less time again for both methods
            // (hand-measured the same way; perf had put 16% of the pass's
            // samples just after the burst, waiting for it).
            let fused = FUSED && at.is_multiple_of(8) && n.is_multiple_of(8);
            let ahead = start + PREFETCH_AHEAD;
            if fused {
                for (o, &b) in base_f64.iter_mut().zip(b) {
                    *o = b as f64;
                }
                for a in (ahead..ahead + PASS_BLOCK).step_by(16) {
                    ops::prefetch(base, a);
                }
            } else {
                let dens = &self.densities;
                ops::prefetch_block(base, chunk.models, ahead, PASS_BLOCK, |i| drops(dens[i]));
            }
            for (i, &d) in self.densities.iter().enumerate() {
                if !drops(d) {
                    continue;
                }
                let x = &chunk.models[i][start..end];
                let draws = &mut draws[..n];
                draw(&mut rngs[i], draws);
                let (limit, any) = keep_rule(d);
                #[cfg(target_arch = "x86_64")]
                // (A model that keeps nothing, density 0, takes the block path.)
                if fused && any {
                    // SAFETY: the AVX2 caller (`FUSED`); the lengths agree.
                    unsafe {
                        l1_block_avx2(
                            x,
                            &base_f64[..n],
                            draws,
                            limit,
                            ahead_of(chunk.models[i], start),
                            at,
                            &mut self.masks[i],
                            &mut self.total[i],
                            &mut self.kept[i],
                        )
                    };
                    continue;
                }
                let (all, kept) = (&mut all[..n], &mut kept[..n]);
                for ((((a, k), &u), &x), &b) in all
                    .iter_mut()
                    .zip(kept.iter_mut())
                    .zip(draws.iter())
                    .zip(x)
                    .zip(b)
                {
                    let v = (x as f64 - b as f64).abs();
                    *a = v;
                    *k = if any & (u <= limit) { v } else { 0.0 };
                }
                record(&mut self.masks[i], at, draws, d);
                self.total[i].add_at(at as u64, all);
                self.kept[i].add_at(at as u64, kept);
            }
        }
    }
}

impl StatsPass for L1Pass {
    fn observe(&mut self, _sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: self.method.to_string(),
        })?;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { self.blocks_avx2(chunk, base) };
            return Ok(());
        }
        self.blocks::<false>(chunk, base);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        let scales: Vec<f64> = self
            .total
            .iter()
            .zip(&self.kept)
            .zip(&self.densities)
            .map(|((t, k), &d)| {
                let (t, k) = (t.value(), k.value());
                if !drops(d) || k == 0.0 { 1.0 } else { t / k }
            })
            .collect();
        Ok(Arc::new(L1Scales {
            scales,
            masks: self.masks,
        }))
    }
}

/// Each model's L1 rescale factor on one tensor, and its keep mask
/// (recorded by the pass; empty for models that drop nothing).
#[derive(Debug)]
struct L1Scales {
    scales: Vec<f64>,
    masks: Vec<Vec<u64>>,
}

fn densities(tensor: &TensorContext<'_>) -> Result<Vec<f64>, MethodError> {
    ops::weights(tensor, "density")
}

fn tensor_pass(
    info: &'static MethodInfo,
    tensor: &TensorContext<'_>,
) -> Option<Box<dyn StatsPass>> {
    if rescale(info.name, tensor.global).ok()? != Rescale::L1 {
        return None;
    }
    let densities = densities(tensor).ok()?;
    if !densities.iter().any(|&d| drops(d)) {
        return None;
    }
    let m = densities.len();
    let masks = densities
        .iter()
        .map(|&d| {
            if drops(d) {
                mask_words(tensor.numel())
            } else {
                Vec::new()
            }
        })
        .collect();
    Some(Box::new(L1Pass {
        method: info.name,
        densities,
        total: vec![PositionalSum::new(); m],
        kept: vec![PositionalSum::new(); m],
        masks,
    }))
}

fn config_warnings(info: &MethodInfo, models: &[Params]) -> Vec<String> {
    let undropped: Vec<String> = models
        .iter()
        .enumerate()
        .filter(|(_, p)| p.f64("density").is_ok_and(|d| !drops(d)))
        .map(|(i, _)| i.to_string())
        .collect();
    if undropped.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{}: density 1 drops nothing for model(s) {}",
            info.name,
            undropped.join(", ")
        )]
    }
}

/// DARE (Yu et al. 2024, arXiv:2311.03099): `τ̃_i = keep_i ⊙ τ_i · s_i`,
/// then `combine` (linear sum, or TIES election).
fn merge(
    info: &'static MethodInfo,
    rule: Rule,
    chunk: &Chunk<'_>,
    out: &mut [f32],
) -> Result<(), MethodError> {
    let t = chunk.tensor;
    let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
        method: info.name.to_string(),
    })?;
    let dens = densities(t)?;
    let mode = rescale(info.name, t.global)?;
    let stats = match (mode, chunk.tensor_stats) {
        (Rescale::L1, Some(s)) => {
            Some(
                s.downcast_ref::<L1Scales>()
                    .ok_or_else(|| MethodError::Invalid {
                        method: info.name.into(),
                        tensor: t.name.into(),
                        message: "statistics of another method were passed in".into(),
                    })?,
            )
        }
        _ => None,
    };
    let scales: Vec<f64> = match mode {
        Rescale::None => vec![1.0; dens.len()],
        // 1/d: unbiased, E[τ̃] = τ (the paper). d = 0 keeps nothing: factor unused.
        Rescale::Density => dens
            .iter()
            .map(|&d| if d > 0.0 { 1.0 / d } else { 1.0 })
            .collect(),
        Rescale::L1 => match stats {
            Some(s) => s.scales.clone(),
            None if dens.iter().any(|&d| drops(d)) => {
                return Err(MethodError::Invalid {
                    method: info.name.into(),
                    tensor: t.name.into(),
                    message: "`rescale: true` needs the per-tensor L1 pass, which was not run"
                        .into(),
                });
            }
            None => vec![1.0; dens.len()],
        },
    };
    let combine = Combine {
        weights: ops::weights(t, "weight")?,
        lambda: t.global.f64("lambda")?,
        normalize: t.global.bool("normalize")?,
        rule,
    };
    combine.check(info.name, t.name)?;
    // The pass's keep masks where they cover this chunk (the same decisions
    // as drawing again from the same streams), else draws.
    let end = chunk.offset + out.len();
    let masks: Vec<Option<&[u64]>> = (0..dens.len())
        .map(|i| {
            stats
                .and_then(|s| s.masks.get(i))
                .filter(|m| m.len() * 64 >= end)
                .map(|m| m.as_slice())
        })
        .collect();
    // With every dropping model's mask at hand, the fused kernel merges
    // all but the last few elements (bit-identical to the block path).
    let fused: Option<Vec<Option<&[u64]>>> = (0..dens.len())
        .map(|i| match (drops(dens[i]), masks[i]) {
            (true, Some(m)) => Some(Some(m)),
            (true, None) => None,
            (false, _) => Some(None),
        })
        .collect();
    let done = match fused {
        Some(keep) => ops::combine_masked(
            &combine,
            base,
            chunk.models,
            &keep,
            chunk.offset,
            &scales,
            out,
        ),
        None => 0,
    };
    if done == out.len() {
        return Ok(());
    }
    let mut rngs: Vec<_> = (0..dens.len())
        .map(|i| stream_of(t, i, chunk.offset + done))
        .collect();
    let mut draws = [0u32; ops::BLOCK];
    let fill = Fill {
        chunk,
        at: done,
        base,
        dens: &dens,
        scales: &scales,
        masks: &masks,
        rngs: &mut rngs,
        draws: &mut draws,
    };
    ops::combine_blocks_with(&combine, Some(&base[done..]), &mut out[done..], fill);
    Ok(())
}

/// The task vectors DARE hands to [`ops::combine_blocks_with`].
struct Fill<'a, 'c> {
    chunk: &'a Chunk<'c>,
    /// Where in the chunk the block path starts (after the fused kernel).
    at: usize,
    base: &'a [f32],
    dens: &'a [f64],
    scales: &'a [f64],
    masks: &'a [Option<&'a [u64]>],
    rngs: &'a mut [rng::Draws],
    draws: &'a mut [u32; ops::BLOCK],
}

impl ops::BlockFill for Fill<'_, '_> {
    #[inline(always)]
    fn fill(&mut self, i: usize, start: usize, buf: &mut [f64]) {
        let start = self.at + start;
        let x = &self.chunk.models[i][start..start + buf.len()];
        let b = &self.base[start..start + buf.len()];
        let first = self.chunk.offset + start;
        let (d, s, mask) = (self.dens[i], self.scales[i], self.masks[i]);
        fill(x, b, d, s, mask, first, &mut self.rngs[i], self.draws, buf)
    }
}

/// Model `i`'s rescaled, dropped task vector `τ̃_i = keep ⊙ (x − b) · s` at
/// positions `first..first + buf.len()` (as `f64`), from the pass's `mask`
/// when there is one, else from draws of `rng`. Inlined into the (AVX2)
/// block loop of [`ops::combine_blocks_with`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fill(
    x: &[f32],
    b: &[f32],
    d: f64,
    s: f64,
    mask: Option<&[u64]>,
    first: usize,
    rng: &mut rng::Draws,
    draws: &mut [u32; ops::BLOCK],
    buf: &mut [f64],
) {
    if let (true, Some(mask)) = (drops(d), mask) {
        masked(mask, first, buf, x, b, s);
    } else if drops(d) {
        let draws = &mut draws[..buf.len()];
        draw(rng, draws);
        let (limit, any) = keep_rule(d);
        for (((o, &u), &x), &b) in buf.iter_mut().zip(draws.iter()).zip(x).zip(b) {
            let v = (x as f64 - b as f64) * s;
            *o = if any & (u <= limit) { v } else { 0.0 };
        }
    } else {
        for ((o, &x), &b) in buf.iter_mut().zip(x).zip(b) {
            *o = (x as f64 - b as f64) * s;
        }
    }
}

impl MergeMethod for DareLinear {
    fn info(&self) -> &'static MethodInfo {
        &LINEAR_INFO
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        tensor_pass(&LINEAR_INFO, tensor)
    }

    fn config_warnings(&self, _global: &Params, models: &[Params]) -> Vec<String> {
        config_warnings(&LINEAR_INFO, models)
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        merge(&LINEAR_INFO, Rule::Linear, chunk, out)
    }
}

impl MergeMethod for DareTies {
    fn info(&self) -> &'static MethodInfo {
        &TIES_INFO
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        tensor_pass(&TIES_INFO, tensor)
    }

    fn config_warnings(&self, _global: &Params, models: &[Params]) -> Vec<String> {
        config_warnings(&TIES_INFO, models)
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let s = chunk.tensor.global.str("consensus")?;
        let consensus = Consensus::parse(s).ok_or_else(|| MethodError::OutOfRange {
            method: TIES_INFO.name.into(),
            param: "consensus".into(),
            value: s.into(),
            range: "sum or count".into(),
        })?;
        merge(&TIES_INFO, Rule::Ties(consensus), chunk, out)
    }
}

register_method!(DareLinear);
register_method!(DareTies);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_draws_are_the_next_u32_words_in_order() {
        use rand::RngCore;
        let ctx_stream = |offset| tensormerge_methods::rng::stream(42, "t.weight", 1, offset);
        for (offset, len) in [(0usize, 1000usize), (3, 1), (5, 70), (61, 257), (0, 4096)] {
            let mut one = ctx_stream(offset);
            let expect: Vec<u32> = (0..2 * len).map(|_| one.next_u32()).collect();
            let mut bulk = rng::Draws::new(42, "t.weight", 1, offset);
            let mut got = vec![0u32; 2 * len];
            // two calls: the second continues where the first stopped
            draw(&mut bulk, &mut got[..len]);
            draw(&mut bulk, &mut got[len..]);
            assert_eq!(got, expect, "offset {offset} len {len}");
        }
    }

    #[test]
    fn masks_record_bits_at_absolute_positions() {
        let mut m = mask_words(130);
        assert_eq!(m.len(), 3);
        for p in [0usize, 63, 64, 129] {
            m[p >> 6] |= 1u64 << (p & 63);
        }
        let kept: Vec<usize> = (0..130).filter(|&p| mask_keeps(&m, p)).collect();
        assert_eq!(kept, [0, 63, 64, 129]);
        // record + masked at unaligned offsets agree with the bit rule
        let draws: Vec<u32> = (0..200u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        for first in [0usize, 1, 63, 64, 100] {
            let mut m = mask_words(first + 200);
            record(&mut m, first, &draws[..77], 0.5);
            record(&mut m, first + 77, &draws[77..], 0.5);
            let mut out = vec![0.0; 200];
            let xs: Vec<f32> = (0..200).map(|e| e as f32 + 1.0).collect();
            masked(&m, first, &mut out, &xs, &[0.0; 200], 1.0);
            for (e, &u) in draws.iter().enumerate() {
                let keep = ops::dare_keep(u, 0.5);
                assert_eq!(mask_keeps(&m, first + e), keep);
                assert_eq!(out[e], if keep { e as f64 + 1.0 } else { 0.0 });
            }
        }
    }
}
