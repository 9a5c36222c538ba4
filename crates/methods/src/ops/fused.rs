//! The trim (TIES) or random drop (DARE) of each model's task vector fused
//! with the [`Combine`] step, four elements at a time in AVX2 registers:
//! [`combine_trimmed`], [`combine_masked`].
//!
//! [`combine_blocks`](super::combine_blocks) takes any task vector a method
//! fills in: each model's block is written to a buffer as `f64`, then read
//! back twice by the TIES election. These kernels compute the same IEEE
//! operations in the same order without the round trip through memory, and
//! compare magnitude keys eight bytes wide instead of converting first; they
//! give bit-identical results (tested against the block path). Measured
//! with `bench-ratios` (the README's table), they took ties and `dare_*`
//! from about 0.25 to about 0.4 of a memory copy, with DARE's fused
//! statistics pass.
//!
//! Each returns how many leading elements it merged (a multiple of 4, or 0
//! where it does not apply: no AVX2, or more than [`MAX_MODELS`] models);
//! the caller merges the rest with the block path.

use super::{Combine, Consensus, Rule};

/// Most models the fused kernels take (the task vectors of four elements of
/// every model are held in registers).
pub const MAX_MODELS: usize = 4;

/// The `above` of [`combine_trimmed`] for a threshold key `thr`: keys
/// above `thr` are kept, and keys equal to it too when `ties` (the form of
/// [`Selection::for_segment`](super::Selection::for_segment) within a run
/// of positions on one side of the last kept tie).
pub fn key_above(thr: u32, ties: bool) -> i32 {
    // Keys are at most i32::MAX: a threshold above it keeps nothing.
    match (i32::try_from(thr), ties) {
        (Ok(t), true) => t - 1,
        (Ok(t), false) => t,
        (Err(_), _) => i32::MAX,
    }
}

/// Merges `out.len()` elements where model `i` keeps the entries whose
/// magnitude key ([`magnitude_key`](super::magnitude_key) of `x − b`, as
/// `i32`) is above `above[i]`, its task-vector entry being `x − b` (in
/// `f64`): TIES' trim by a threshold ([`Selection`](super::Selection)), as
/// the fill `keep ? x − b : 0` of [`combine_blocks`](super::combine_blocks)
/// would. Keys are at most `i32::MAX`, so `above = i32::MAX` keeps nothing
/// and `-1` keeps everything.
///
/// Returns the number of leading elements merged (see the module docs).
pub fn combine_trimmed(
    combine: &Combine,
    base: &[f32],
    models: &[&[f32]],
    above: &[i32],
    out: &mut [f32],
) -> usize {
    assert_eq!(models.len(), above.len());
    let source = Trimmed { models, above };
    dispatch(combine, base, models, &source, out)
}

/// Merges `out.len()` elements where model `i`'s task-vector entry at
/// position `first + e` is `(x − b) · scales[i]` (in `f64`) if bit
/// `(first + e) % 64` of `masks[i][(first + e) / 64]` is set, else 0, or
/// kept unconditionally when `masks[i]` is `None`: DARE's drop by a keep
/// mask recorded in its statistics pass. Each mask covers positions up to
/// `first + out.len()`; nothing is merged (0 is returned) unless `first`
/// is a multiple of 4.
///
/// Returns the number of leading elements merged (see the module docs).
pub fn combine_masked(
    combine: &Combine,
    base: &[f32],
    models: &[&[f32]],
    masks: &[Option<&[u64]>],
    first: usize,
    scales: &[f64],
    out: &mut [f32],
) -> usize {
    assert_eq!(models.len(), masks.len());
    assert_eq!(models.len(), scales.len());
    let end = first + out.len();
    assert!(masks.iter().flatten().all(|m| m.len() * 64 >= end));
    if !first.is_multiple_of(4) {
        return 0;
    }
    let source = Masked {
        models,
        masks,
        first,
        scales,
    };
    dispatch(combine, base, models, &source, out)
}

#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn dispatch<S: Source>(
    combine: &Combine,
    base: &[f32],
    models: &[&[f32]],
    source: &S,
    out: &mut [f32],
) -> usize {
    let n = out.len() / 4 * 4;
    assert!(base.len() >= out.len() && models.iter().all(|m| m.len() >= out.len()));
    assert_eq!(models.len(), combine.weights.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        let out = &mut out[..n];
        let unit = combine.weights.iter().all(|&w| w == 1.0);
        // SAFETY (every call): the CPU supports AVX2, checked just above;
        // the slices are at least `out.len()` long, asserted above.
        macro_rules! run {
            ($m:literal) => {
                match combine.rule {
                    Rule::Linear => unsafe { x86::run::<$m, 0, S>(combine, base, source, out) },
                    Rule::Ties(Consensus::Sum) if unit => unsafe {
                        x86::run::<$m, 1, S>(combine, base, source, out)
                    },
                    Rule::Ties(Consensus::Sum) => unsafe {
                        x86::run::<$m, 2, S>(combine, base, source, out)
                    },
                    Rule::Ties(Consensus::Count) if unit => unsafe {
                        x86::run::<$m, 3, S>(combine, base, source, out)
                    },
                    Rule::Ties(Consensus::Count) => unsafe {
                        x86::run::<$m, 4, S>(combine, base, source, out)
                    },
                }
            };
        }
        match models.len() {
            1 => run!(1),
            2 => run!(2),
            3 => run!(3),
            4 => run!(4),
            _ => return 0,
        }
        return n;
    }
    0
}

/// Where the task-vector entries come from.
trait Source {
    /// Model `i`'s entries `e..e + 4` as `f64`, given the base's as `f32`
    /// (`b`) and as `f64` (`bd`).
    ///
    /// # Safety
    /// AVX2 is available and `e + 4` is within model `i`'s slice.
    #[cfg(target_arch = "x86_64")]
    unsafe fn quad(
        &self,
        i: usize,
        e: usize,
        b: std::arch::x86_64::__m128,
        bd: std::arch::x86_64::__m256d,
    ) -> std::arch::x86_64::__m256d;
}

struct Trimmed<'a> {
    models: &'a [&'a [f32]],
    above: &'a [i32],
}

struct Masked<'a> {
    models: &'a [&'a [f32]],
    masks: &'a [Option<&'a [u64]>],
    first: usize,
    scales: &'a [f64],
}

/// The four mask bits of positions `p..p + 4`, `p` a multiple of 4.
///
/// # Safety
/// `p / 64 < mask.len()`.
#[inline(always)]
unsafe fn four_bits(mask: &[u64], p: usize) -> usize {
    // SAFETY: as the caller guarantees.
    ((unsafe { *mask.get_unchecked(p >> 6) } >> (p & 63)) & 0xf) as usize
}

/// Lane `j` of entry `bits` is all ones when bit `j` of `bits` is set.
static LANE_MASKS: [[i64; 4]; 16] = {
    let mut t = [[0i64; 4]; 16];
    let mut bits = 0;
    while bits < 16 {
        let mut j = 0;
        while j < 4 {
            t[bits][j] = if bits >> j & 1 == 1 { -1 } else { 0 };
            j += 1;
        }
        bits += 1;
    }
    t
};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Combine, LANE_MASKS, Masked, Source, Trimmed, four_bits};

    impl Source for Trimmed<'_> {
        #[inline(always)]
        unsafe fn quad(&self, i: usize, e: usize, b: __m128, bd: __m256d) -> __m256d {
            // SAFETY: AVX2 and bounds, as the caller guarantees.
            unsafe {
                let x = _mm_loadu_ps(self.models.get_unchecked(i).as_ptr().add(e));
                let key = _mm_and_si128(
                    _mm_castps_si128(_mm_sub_ps(x, b)),
                    _mm_set1_epi32(0x7fff_ffff),
                );
                let keep = _mm_cmpgt_epi32(key, _mm_set1_epi32(*self.above.get_unchecked(i)));
                let delta = _mm256_sub_pd(_mm256_cvtps_pd(x), bd);
                _mm256_and_pd(delta, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(keep)))
            }
        }
    }

    impl Source for Masked<'_> {
        #[inline(always)]
        unsafe fn quad(&self, i: usize, e: usize, _b: __m128, bd: __m256d) -> __m256d {
            // SAFETY: AVX2 and bounds, as the caller guarantees.
            unsafe {
                let x = _mm_loadu_ps(self.models.get_unchecked(i).as_ptr().add(e));
                let delta = _mm256_sub_pd(_mm256_cvtps_pd(x), bd);
                let v = _mm256_mul_pd(delta, _mm256_set1_pd(*self.scales.get_unchecked(i)));
                match self.masks.get_unchecked(i) {
                    None => v,
                    Some(mask) => {
                        let bits = four_bits(mask, self.first + e);
                        let keep = _mm256_loadu_pd(LANE_MASKS.get_unchecked(bits).as_ptr().cast());
                        _mm256_and_pd(v, keep)
                    }
                }
            }
        }
    }

    /// `sign(d)` as `1`, `-1` or `0` (NaN: 0), as the block path's `sign`.
    #[inline(always)]
    unsafe fn sign(d: __m256d) -> __m256d {
        // SAFETY: AVX2, as the caller guarantees.
        unsafe {
            let zero = _mm256_setzero_pd();
            let pos = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(d, zero), _mm256_set1_pd(1.0));
            let neg = _mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(d, zero), _mm256_set1_pd(-1.0));
            _mm256_or_pd(pos, neg)
        }
    }

    /// The kernel: `RULE` 0 linear, 1 TIES sum with unit weights, 2 TIES
    /// sum, 3 TIES count with unit weights, 4 TIES count.
    ///
    /// # Safety
    /// AVX2 is available; `base` and every model are at least `out.len()`
    /// long, which is a multiple of 4.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn run<const M: usize, const RULE: u8, S: Source>(
        combine: &Combine,
        base: &[f32],
        source: &S,
        out: &mut [f32],
    ) {
        let ties = RULE != 0;
        let unit = RULE == 1 || RULE == 3;
        let count = RULE == 3 || RULE == 4;
        let mut w = [_mm256_setzero_pd(); M];
        for (w, &c) in w.iter_mut().zip(&combine.weights) {
            *w = _mm256_set1_pd(c);
        }
        let lambda = _mm256_set1_pd(combine.lambda);
        let inv = _mm256_set1_pd(combine.inverse_weight_sum());
        let (zero, one, minus) = (
            _mm256_setzero_pd(),
            _mm256_set1_pd(1.0),
            _mm256_set1_pd(-1.0),
        );
        // Model by model, the quad's task-vector entries at `e` (weighted
        // for TIES) and the base as `f64`.
        macro_rules! deltas {
            ($e:expr) => {{
                let e = $e;
                let b = _mm_loadu_ps(base.as_ptr().add(e));
                let bd = _mm256_cvtps_pd(b);
                let mut d = [zero; M];
                for (i, d) in d.iter_mut().enumerate() {
                    let v = source.quad(i, e, b, bd);
                    *d = if ties && !unit {
                        _mm256_mul_pd(w[i], v)
                    } else {
                        v
                    };
                }
                (d, bd)
            }};
        }
        // TIES' vote: `vote` plus a model's entries `d` (count consensus:
        // their signs). Both elections below add the models in order.
        macro_rules! vote {
            ($vote:expr, $d:expr) => {{
                let d = $d;
                _mm256_add_pd($vote, if count { sign(d) } else { d })
            }};
        }
        // TIES' election and disjoint sum: the sum of the agreeing entries
        // and of their weights.
        macro_rules! elect {
            ($d:expr) => {{
                let d = $d;
                let mut vote = zero;
                for &d in &d {
                    vote = vote!(vote, d);
                }
                // The elected sign as ±1 (a zero vote, or NaN's, as the
                // block path: `v >= 0 ? 1 : -1`).
                let s = _mm256_blendv_pd(minus, one, _mm256_cmp_pd::<_CMP_GE_OQ>(vote, zero));
                let (mut acc, mut div) = (zero, zero);
                for i in 0..M {
                    let agree = _mm256_cmp_pd::<_CMP_GT_OQ>(_mm256_mul_pd(d[i], s), zero);
                    acc = _mm256_add_pd(acc, _mm256_and_pd(agree, d[i]));
                    let wi = if unit { one } else { w[i] };
                    div = _mm256_add_pd(div, _mm256_and_pd(agree, wi));
                }
                (acc, div)
            }};
        }
        // `acc` divided by the agreeing weights (`normalize`).
        macro_rules! normalized {
            ($acc:expr, $div:expr) => {{
                let (acc, div) = ($acc, $div);
                if unit {
                    // Unit weights: `div` counts the agreeing models, and
                    // with none `acc` is +0 (a sum of masked zeros), so
                    // `acc / max(div, 1)` gives the general branch's bits
                    // in two operations instead of seven (5% less time
                    // for TIES at density 0.2 on 16M elements, hand-measured
                    // by alternating both forms in one process).
                    _mm256_div_pd(acc, _mm256_max_pd(div, one))
                } else {
                    let z = _mm256_and_pd(_mm256_cmp_pd::<_CMP_EQ_OQ>(div, zero), one);
                    let acc = _mm256_div_pd(acc, _mm256_add_pd(div, z));
                    _mm256_add_pd(_mm256_mul_pd(acc, _mm256_sub_pd(one, z)), zero)
                }
            }};
        }
        // TIES without `normalize`: the sum of the agreeing entries alone.
        // Those of an elected + are the positive entries, those of a − the
        // negative ones, so both sums are made without waiting for the vote,
        // and the vote picks one. `max(d, 0)` is `d` where `d > 0`, else +0
        // (NaN included): `elect!`'s masked `d` for `s = 1`; `min` likewise
        // for `s = −1`; added in the same order, so the bits are the same,
        // from fewer and shorter chains of operations. DARE's merge at
        // density 0.5 on 16M elements (`dare_ties`) took 10 – 13% less time,
        // hand-measured by alternating both forms in one process (41 – 61
        // runs each); prefetching the inputs 1024 – 4096 elements ahead
        // changed nothing there.
        macro_rules! elect_sum {
            ($d:expr) => {{
                let d = $d;
                let mut vote = zero;
                let (mut pos, mut neg) = (zero, zero);
                for &d in &d {
                    vote = vote!(vote, d);
                    pos = _mm256_add_pd(pos, _mm256_max_pd(d, zero));
                    neg = _mm256_add_pd(neg, _mm256_min_pd(d, zero));
                }
                // A zero vote, or NaN's, as the block path: `v >= 0 ? 1 : -1`.
                _mm256_blendv_pd(neg, pos, _mm256_cmp_pd::<_CMP_GE_OQ>(vote, zero))
            }};
        }
        macro_rules! store {
            ($e:expr, $bd:expr, $merged:expr) => {{
                let o = _mm256_cvtpd_ps(_mm256_add_pd($bd, _mm256_mul_pd(lambda, $merged)));
                _mm_storeu_ps(out.as_mut_ptr().add($e), o);
            }};
        }
        if ties && combine.normalize {
            // In runs of 32 quads, first every election, then every
            // division: one quad's whole chain (loads, election, a division
            // of 13 cycles' latency, the store) kept too few quads in flight
            // (4 – 7% less time for TIES at density 0.2 on 16M elements,
            // weighted and unit, hand-measured by alternating both forms in
            // one process). The same operations on the same values.
            const QUADS: usize = 32;
            let (mut accs, mut divs) = ([zero; QUADS], [zero; QUADS]);
            for start in (0..out.len()).step_by(4 * QUADS) {
                let quads = ((out.len() - start) / 4).min(QUADS);
                // SAFETY: `e + 4 <= out.len() <= base.len()` and each model's
                // length; AVX2 is enabled on this function.
                unsafe {
                    for q in 0..quads {
                        let (d, _) = deltas!(start + 4 * q);
                        (accs[q], divs[q]) = elect!(d);
                    }
                    for q in 0..quads {
                        let e = start + 4 * q;
                        let bd = _mm256_cvtps_pd(_mm_loadu_ps(base.as_ptr().add(e)));
                        store!(e, bd, normalized!(accs[q], divs[q]));
                    }
                }
            }
            return;
        }
        for e in (0..out.len()).step_by(4) {
            // SAFETY: `e + 4 <= out.len() <= base.len()` and each model's
            // length; AVX2 is enabled on this function.
            unsafe {
                let (d, bd) = deltas!(e);
                let merged = if !ties {
                    let mut acc = zero;
                    for i in 0..M {
                        acc = _mm256_add_pd(acc, _mm256_mul_pd(w[i], d[i]));
                    }
                    if combine.normalize {
                        acc = _mm256_mul_pd(acc, inv);
                    }
                    acc
                } else if combine.normalize {
                    let (acc, div) = elect!(d);
                    normalized!(acc, div)
                } else {
                    elect_sum!(d)
                };
                store!(e, bd, merged);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{combine_blocks, magnitude_key};

    /// Values with exact zeros, repeated magnitudes (ties at a threshold),
    /// signed zeros, a NaN and an infinity among ordinary ones.
    fn inputs(n: usize, m: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
        let val = |i: usize| ((i * 2_654_435_761) % 1_000_003) as f32 / 1_000_003.0 - 0.5;
        let base: Vec<f32> = (0..n).map(|e| val(e + 7) * 0.1).collect();
        let models = (0..m)
            .map(|i| {
                (0..n)
                    .map(|e| match (e * 7 + i * 3) % 23 {
                        0 => base[e],
                        1 => base[e] + 0.25,
                        2 => base[e] - 0.25,
                        3 if e == 40 => f32::NAN,
                        4 if e == 41 => f32::INFINITY,
                        5 => -0.0,
                        _ => base[e] + val(e * 5 + i) * 0.02,
                    })
                    .collect()
            })
            .collect();
        (base, models)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn combines(m: usize) -> Vec<Combine> {
        let mut all = Vec::new();
        // Unit weights (the `max(count, 1)` division), others of both
        // signs, and powers of two of both signs.
        for weights in [
            vec![1.0; m],
            [0.7, -0.3, 1.1, 0.5, 2.0][..m].to_vec(),
            [0.5, -2.0, 4.0, 0.25, -1.0][..m].to_vec(),
        ] {
            for rule in [
                Rule::Linear,
                Rule::Ties(Consensus::Sum),
                Rule::Ties(Consensus::Count),
            ] {
                for normalize in [false, true] {
                    all.push(Combine {
                        weights: weights.clone(),
                        lambda: 0.9,
                        normalize,
                        rule,
                    });
                }
            }
        }
        all
    }

    #[test]
    fn trimmed_is_bit_identical_to_the_block_path() {
        let n = 1003;
        for m in 1..=MAX_MODELS + 1 {
            let (base, models) = inputs(n, m);
            let refs: Vec<&[f32]> = models.iter().map(|v| v.as_slice()).collect();
            for above in [
                vec![-1; m],
                vec![i32::MAX; m],
                (0..m)
                    .map(|i| magnitude_key(0.25) as i32 - (i % 2) as i32)
                    .collect(),
                (0..m).map(|i| 0x3c00_0000 + 0x10_0000 * i as i32).collect(),
            ] {
                for combine in combines(m) {
                    let mut fused = vec![0.0f32; n];
                    let done = combine_trimmed(&combine, &base, &refs, &above, &mut fused);
                    assert!(done <= n && done.is_multiple_of(4));
                    if m <= MAX_MODELS && std::arch::is_x86_feature_detected!("avx2") {
                        assert_eq!(done, n / 4 * 4);
                    }
                    let fill = |i: usize, start: usize, buf: &mut [f64]| {
                        for (e, d) in buf.iter_mut().enumerate() {
                            let (x, b) = (models[i][start + e], base[start + e]);
                            let keep = magnitude_key(x - b) as i32 > above[i];
                            *d = if keep { x as f64 - b as f64 } else { 0.0 };
                        }
                    };
                    combine_blocks(
                        &combine,
                        Some(&base[done..]),
                        &mut fused[done..],
                        |i, s, b| fill(i, done + s, b),
                    );
                    let mut blocks = vec![0.0f32; n];
                    combine_blocks(&combine, Some(&base), &mut blocks, fill);
                    assert_eq!(bits(&fused), bits(&blocks), "m={m} {above:?} {combine:?}");
                }
            }
        }
    }

    #[test]
    fn masked_is_bit_identical_to_the_block_path() {
        let n = 1001;
        for m in 1..=MAX_MODELS + 1 {
            let (base, models) = inputs(n, m);
            let refs: Vec<&[f32]> = models.iter().map(|v| v.as_slice()).collect();
            for first in [0usize, 3, 60, 61, 64 * 5 + 4] {
                // Model 0 keeps everything (no mask); the others by a
                // pseudo-random mask over positions first..first + n.
                let masks: Vec<Vec<u64>> = (0..m)
                    .map(|i| {
                        (0..(first + n).div_ceil(64))
                            .map(|w| (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> i)
                            .collect()
                    })
                    .collect();
                let opt: Vec<Option<&[u64]>> = (0..m)
                    .map(|i| (i > 0).then_some(masks[i].as_slice()))
                    .collect();
                let scales: Vec<f64> = (0..m).map(|i| 1.0 + 0.37 * i as f64).collect();
                for combine in combines(m) {
                    let mut fused = vec![0.0f32; n];
                    let done =
                        combine_masked(&combine, &base, &refs, &opt, first, &scales, &mut fused);
                    let fill = |i: usize, start: usize, buf: &mut [f64]| {
                        for (e, d) in buf.iter_mut().enumerate() {
                            let p = first + start + e;
                            let keep = opt[i].is_none_or(|k| (k[p / 64] >> (p % 64)) & 1 == 1);
                            let (x, b) = (models[i][start + e], base[start + e]);
                            let v = (x as f64 - b as f64) * scales[i];
                            *d = if keep { v } else { 0.0 };
                        }
                    };
                    combine_blocks(
                        &combine,
                        Some(&base[done..]),
                        &mut fused[done..],
                        |i, s, b| fill(i, done + s, b),
                    );
                    let mut blocks = vec![0.0f32; n];
                    combine_blocks(&combine, Some(&base), &mut blocks, fill);
                    assert_eq!(
                        bits(&fused),
                        bits(&blocks),
                        "m={m} first={first} {combine:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn key_above_keeps_as_the_selection_does() {
        for thr in [
            0u32,
            1,
            0x3f80_0000,
            0x7fff_fffe,
            0x7fff_ffff,
            0x8000_0000,
            u32::MAX,
        ] {
            for key in [0u32, 1, 0x3f80_0000, 0x3f80_0001, 0x7fff_fffe, 0x7fff_ffff] {
                for ties in [false, true] {
                    let expect = key > thr || (ties && key == thr);
                    assert_eq!(
                        key as i32 > key_above(thr, ties),
                        expect,
                        "{thr} {key} {ties}"
                    );
                }
            }
        }
    }
}
