//! Exact summation: [`ExactSum`] (an exact fixed-point accumulator of `f64`
//! values) and [`PositionalSum`]; sums of squares and L1 norms that do not
//! depend on the order of addition or on where chunks were cut.

use super::weight_sum;

const LIMBS: usize = 72;
/// Exponent of the lowest limb's lowest bit (below the smallest f64 subnormal).
const E0: i32 = -1088;
/// Additions between carry normalisations (each limb grows by < 2³² per add).
const NORMALIZE_EVERY: u32 = 1 << 30;

/// Values per block of [`ExactSum::add_all`] (at most 2^10, for its error
/// bound).
pub const ALL_BLOCK: usize = 1024;

/// An exact fixed-point integer: `Σ limbs[j] · 2^(32 j + E0)`, limbs of 32
/// bits held in `i64` so that carries can wait.
#[derive(Clone)]
pub(super) struct Limbs {
    limbs: [i64; LIMBS],
    pending: u32,
}

impl Limbs {
    pub(super) fn new() -> Self {
        Limbs {
            limbs: [0; LIMBS],
            pending: 0,
        }
    }

    /// Adds `±mag · 2^(p + E0)`.
    fn add_int(&mut self, mag: u128, negative: bool, p: u32) {
        let j = (p / 32) as usize;
        let sh = p % 32;
        for k in 0..4 {
            let part = ((mag >> (32 * k)) & 0xffff_ffff) as u64;
            if part == 0 {
                continue;
            }
            let x = part << sh; // < 2^63
            let (lo, hi) = ((x & 0xffff_ffff) as i64, (x >> 32) as i64);
            if negative {
                self.limbs[j + k] -= lo;
                self.limbs[j + k + 1] -= hi;
            } else {
                self.limbs[j + k] += lo;
                self.limbs[j + k + 1] += hi;
            }
        }
        self.pending += 1;
        if self.pending >= NORMALIZE_EVERY {
            self.normalize();
        }
    }

    /// Adds a finite, non-zero `v`.
    pub(super) fn add_f64(&mut self, v: f64) {
        let (m, exp) = split(v);
        self.add_int(m as u128, v < 0.0, (exp.max(1) - 1075 - E0) as u32);
    }

    fn normalize(&mut self) {
        for j in 0..LIMBS - 1 {
            let carry = self.limbs[j] >> 32;
            self.limbs[j] -= carry << 32;
            self.limbs[j + 1] += carry;
        }
        self.pending = 0;
    }

    /// Correctly rounded to `f64` (in the normal range).
    pub(super) fn value(&self) -> f64 {
        let mut s = self.clone();
        s.normalize();
        let negative = s.limbs[LIMBS - 1] < 0;
        if negative {
            s.limbs.iter_mut().for_each(|l| *l = -*l);
            s.normalize();
        }
        let Some(h) = (0..LIMBS).rev().find(|&j| s.limbs[j] != 0) else {
            return 0.0;
        };
        let limb = |j: usize| if j <= h { s.limbs[j] as u128 } else { 0 };
        let low = h.saturating_sub(2);
        let mut x = (limb(low + 2) << 64) | (limb(low + 1) << 32) | limb(low);
        if s.limbs[..low].iter().any(|&l| l != 0) {
            x |= 1; // sticky bit: x has more than 64 significant bits here
        }
        let v = x as f64 * pow2(32 * low as i32 + E0);
        if negative { -v } else { v }
    }
}

/// The integer mantissa and the raw exponent field of a finite `f64`:
/// `|v| = m · 2^(max(exp, 1) − 1075)`.
#[inline]
fn split(v: f64) -> (u64, i32) {
    let bits = v.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let m = if exp == 0 { frac } else { frac | (1u64 << 52) };
    (m, exp)
}

/// An exact accumulator of finite `f64` values: the sum is held as a
/// fixed-point integer wide enough for every `f64`, so the result does not
/// depend on the order of the additions or on how they were grouped (chunks,
/// threads). Non-finite inputs are summed separately (the result is then
/// that non-finite sum, which is also order independent).
///
/// Adding is cheap (one integer addition into a per-exponent bucket); the
/// buckets are folded into one wide integer only when the value is read.
///
/// ```
/// use tensormerge_methods::ops::ExactSum;
/// let mut a = ExactSum::new();
/// for v in [1e20, 1.0, -1e20] { a.add(v); }
/// assert_eq!(a.value(), 1.0); // a plain f64 sum would give 0.0
/// ```
#[derive(Clone)]
pub struct ExactSum {
    /// `Σ ±mantissa` per raw exponent field (never overflows: 2⁷⁴ additions).
    buckets: Box<[i128; 2048]>,
    special: f64,
}

impl std::fmt::Debug for ExactSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExactSum({})", self.value())
    }
}

impl Default for ExactSum {
    fn default() -> Self {
        Self::new()
    }
}

impl ExactSum {
    /// Zero.
    pub fn new() -> Self {
        ExactSum {
            buckets: Box::new([0; 2048]),
            special: 0.0,
        }
    }

    /// Adds `v` exactly.
    #[inline]
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() {
            self.special += v;
            return;
        }
        let (m, exp) = split(v);
        let m = m as i128;
        self.buckets[exp as usize] += if v < 0.0 { -m } else { m };
    }

    /// Adds the squares of `values`, exactly: the same as
    /// `for v in values { self.add(v as f64 * v as f64) }` (the square of an
    /// `f32` is exact in `f64`), several times faster. Each square is
    /// `m² · 2^(2e)` with `m` the 24-bit integer mantissa of `v`: the `m²`
    /// (below 2⁴⁸) are summed per `f32` exponent in 64-bit integers, which
    /// are added into the accumulator every 2¹⁶ values, before they could
    /// overflow.
    ///
    /// ```
    /// use tensormerge_methods::ops::ExactSum;
    /// let v = [3.0f32, -4.0, 1e-40, 0.0];
    /// let (mut fast, mut plain) = (ExactSum::new(), ExactSum::new());
    /// fast.add_squares_f32(&v);
    /// v.iter().for_each(|&x| plain.add(x as f64 * x as f64));
    /// assert_eq!(fast.value().to_bits(), plain.value().to_bits());
    /// assert_eq!(fast.value(), 25.0); // 25 + 1e-80, rounded once
    /// ```
    pub fn add_squares_f32(&mut self, values: &[f32]) {
        const FLUSH: usize = 1 << 16;
        // `LANES` tables, entry `i` of each group of `LANES` into table `i`:
        // neighbouring values mostly share an exponent, and with one table
        // each increment would wait for the previous one's store.
        const LANES: usize = 4;
        let mut by_exp = [[0u64; 256]; LANES];
        #[inline(always)]
        fn square(v: f32) -> (usize, u64) {
            let bits = v.to_bits();
            let exp = ((bits >> 23) & 0xff) as usize;
            let frac = (bits & 0x7f_ffff) as u64;
            let m = if exp == 0 { frac } else { frac | 0x80_0000 };
            (exp, m * m)
        }
        for part in values.chunks(FLUSH) {
            let mut groups = part.chunks_exact(LANES);
            for g in &mut groups {
                for (table, &v) in by_exp.iter_mut().zip(g) {
                    let (exp, sq) = square(v);
                    table[exp] += sq;
                }
            }
            for &v in groups.remainder() {
                let (exp, sq) = square(v);
                by_exp[0][exp] += sq;
            }
            // Non-finite values (exponent field 255, whose `m` is never 0)
            // are summed as `add` sums them.
            if by_exp.iter().any(|t| t[255] != 0) {
                by_exp.iter_mut().for_each(|t| t[255] = 0);
                for &v in part.iter().filter(|v| !v.is_finite()) {
                    self.special += v as f64 * v as f64;
                }
            }
            for exp in 0..255 {
                // At most 2^16 squares below 2^48 each: no overflow.
                let b: u64 = by_exp.iter_mut().map(|t| std::mem::take(&mut t[exp])).sum();
                if b != 0 {
                    // |v| = m · 2^(max(exp, 1) − 150), so v² = m² · 2^s with
                    // s = 2 (max(exp, 1) − 150); bucket `k` of `buckets`
                    // holds multiples of 2^(max(k, 1) − 1075).
                    let s = 2 * ((exp as i32).max(1) - 150);
                    self.buckets[(s + 1075) as usize] += b as i128;
                }
            }
        }
    }

    /// Adds every value of `values` exactly: the same [`value`](Self::value)
    /// as adding them one by one with [`add`](Self::add), several times
    /// faster in bulk.
    ///
    /// Block by block (at most [`ALL_BLOCK`] values, all finite, largest
    /// magnitude `≤ 2^E`), each value `v` is split without error into a
    /// multiple `q` of `u = 2^(E − 41)` and a remainder (Rump, Ogita and
    /// Oishi 2008, "Accurate floating-point summation part I", SIAM J. Sci.
    /// Comput. 31(1), ExtractVector): with `σ = 3 · 2^(E + 10)`, `q = (σ + v)
    /// − σ` rounds `v` to a multiple of `u` and `r = v − q` is exact (both
    /// operations are exact by Sterbenz's lemma or because the operands are
    /// multiples of `ulp(v)`), `|r| ≤ u/2`. Every `q / u` is an integer of
    /// magnitude `≤ 2^41 + 1/2`, so the `f64` sum of at most `2^10` of them
    /// is exact; the sums are added exactly here. The remainders are split
    /// the same way with a smaller `E`, a few times, and any remainder left
    /// is added one by one. The exact total is the same, and [`value`] rounds
    /// the exact total once. Blocks holding a non-finite value, or
    /// magnitudes near the ends of the `f64` range, are added one by one.
    ///
    /// [`value`]: Self::value
    ///
    /// ```
    /// use tensormerge_methods::ops::ExactSum;
    /// let v: Vec<f64> = (0..5000).map(|i| (i as f64).sin() * 10f64.powi(i % 30 - 15)).collect();
    /// let (mut one, mut all) = (ExactSum::new(), ExactSum::new());
    /// v.iter().for_each(|&x| one.add(x));
    /// all.add_all(&v);
    /// assert_eq!(one.value().to_bits(), all.value().to_bits());
    /// ```
    pub fn add_all(&mut self, values: &[f64]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { self.add_all_avx2(values) };
            return;
        }
        self.add_all_portable(values)
    }

    /// [`add_all`](Self::add_all) compiled for AVX2 (the same operations).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn add_all_avx2(&mut self, values: &[f64]) {
        self.add_all_portable(values)
    }

    #[inline(always)]
    fn add_all_portable(&mut self, values: &[f64]) {
        // Not zeroed first (that cost as much as the copy into it when the
        // values are a short row): every value used is copied in below.
        let mut rest = [std::mem::MaybeUninit::<f64>::uninit(); ALL_BLOCK];
        for block in values.chunks(ALL_BLOCK) {
            // In 8 lanes (so that it vectorises): the largest magnitude, and
            // Σ v · 0, NaN if any v is not finite.
            let (mut maxes, mut poison) = ([0.0f64; 8], [0.0f64; 8]);
            let look = |v: f64, max: &mut f64, poison: &mut f64| {
                let a = v.abs();
                *max = if a > *max { a } else { *max };
                *poison += v * 0.0;
            };
            let mut body = block.chunks_exact(8);
            for c in &mut body {
                for ((&v, m), p) in c.iter().zip(&mut maxes).zip(&mut poison) {
                    look(v, m, p);
                }
            }
            for ((&v, m), p) in body.remainder().iter().zip(&mut maxes).zip(&mut poison) {
                look(v, m, p);
            }
            let finite = poison.iter().all(|&p| p == 0.0);
            let mut max = maxes.iter().fold(0.0, |m, &a| if a > m { a } else { m });
            if !finite || max > pow2(1000) {
                block.iter().for_each(|&v| self.add(v));
                continue;
            }
            let rest = rest[..block.len()].write_copy_of_slice(block);
            for _ in 0..3 {
                if max < pow2(-900) {
                    break; // zero, or left to the one by one additions
                }
                // max ≤ 2^e
                let e = split(max).1 - 1022;
                max = self.extract(rest, pow2(e + 10) * 3.0);
            }
            if max != 0.0 {
                rest.iter().for_each(|&r| self.add(r));
            }
        }
    }

    /// Replaces every `v` of `values` (at most [`ALL_BLOCK`], `|v| ≤ σ / 3 ·
    /// 2^-10`) by `v − q`, `q = (σ + v) − σ`, adds the `q`s exactly and
    /// returns the largest remaining magnitude.
    #[inline(always)]
    fn extract(&mut self, values: &mut [f64], sigma: f64) -> f64 {
        let mut sums = [0.0f64; 8];
        let mut maxes = [0.0f64; 8];
        let step = |v: &mut f64, sum: &mut f64, max: &mut f64| {
            let q = (sigma + *v) - sigma;
            *v -= q;
            *sum += q;
            let a = v.abs();
            *max = if a > *max { a } else { *max };
        };
        let mut body = values.chunks_exact_mut(8);
        for c in &mut body {
            for ((v, s), m) in c.iter_mut().zip(&mut sums).zip(&mut maxes) {
                step(v, s, m);
            }
        }
        for ((v, s), m) in body
            .into_remainder()
            .iter_mut()
            .zip(&mut sums)
            .zip(&mut maxes)
        {
            step(v, s, m);
        }
        sums.iter().for_each(|&s| self.add(s));
        maxes.iter().fold(0.0, |m, &a| if a > m { a } else { m })
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: &ExactSum) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.special += other.special;
    }

    /// The sum, correctly rounded to `f64` (in the normal range; the same
    /// exact sum always gives the same `f64`).
    pub fn value(&self) -> f64 {
        if self.special != 0.0 || self.special.is_nan() {
            return self.special;
        }
        let mut limbs = Limbs::new();
        for (exp, &b) in self.buckets.iter().enumerate() {
            if b != 0 {
                let p = ((exp as i32).max(1) - 1075 - E0) as u32;
                limbs.add_int(b.unsigned_abs(), b < 0, p);
            }
        }
        limbs.value()
    }
}

/// A fast, chunk-invariant sum of a sequence that arrives in order, in
/// pieces of any length: element at absolute position `p` is added to lane
/// `p mod 8` (8 interleaved `f64` sums, which vectorise), and the lanes are
/// summed exactly at the end. Each lane sees its elements in the same order
/// however the sequence is cut, so the result does not depend on chunking —
/// provided the pieces come in ascending position order, as a
/// [`StatsPass`](crate::StatsPass) sees the chunks of a tensor.
///
/// ```
/// use tensormerge_methods::ops::PositionalSum;
/// let v: Vec<f64> = (0..100).map(|i| 1.0 / (i as f64 + 1.0)).collect();
/// let (mut whole, mut parts) = (PositionalSum::new(), PositionalSum::new());
/// whole.add_at(0, &v);
/// parts.add_at(0, &v[..13]);
/// parts.add_at(13, &v[13..71]);
/// parts.add_at(71, &v[71..]);
/// assert_eq!(whole.value().to_bits(), parts.value().to_bits());
/// ```
#[derive(Debug, Clone, Default)]
pub struct PositionalSum {
    lanes: [f64; 8],
}

impl PositionalSum {
    /// Zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `values`, the elements at positions `offset..offset + values.len()`.
    /// (Inlined, so that a caller compiled for AVX2 adds with AVX2.)
    #[inline(always)]
    pub fn add_at(&mut self, offset: u64, values: &[f64]) {
        let head = ((8 - offset % 8) % 8).min(values.len() as u64) as usize;
        for (k, &v) in values[..head].iter().enumerate() {
            self.lanes[((offset + k as u64) % 8) as usize] += v;
        }
        let body = values[head..].chunks_exact(8);
        let tail = body.remainder();
        for c in body {
            for (l, &v) in self.lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        for (l, &v) in self.lanes.iter_mut().zip(tail) {
            *l += v;
        }
    }

    /// The eight running lane sums (lane `p mod 8` has summed the elements
    /// at positions `p`, in order), for a kernel that goes on adding in
    /// registers and stores them back with [`set_lanes`](Self::set_lanes):
    /// adding each lane's elements in position order gives the same sum as
    /// [`add_at`](Self::add_at).
    pub fn lanes(&self) -> [f64; 8] {
        self.lanes
    }

    /// Replaces the lane sums (see [`lanes`](Self::lanes)).
    pub fn set_lanes(&mut self, lanes: [f64; 8]) {
        self.lanes = lanes;
    }

    /// The sum of the lanes, taken exactly and rounded once.
    pub fn value(&self) -> f64 {
        weight_sum(&self.lanes)
    }
}

/// `2^k` as an `f64` (0 below the subnormal range, infinity above).
fn pow2(k: i32) -> f64 {
    if k > 1023 {
        f64::INFINITY
    } else if k >= -1022 {
        f64::from_bits(((k + 1023) as u64) << 52)
    } else if k >= -1074 {
        f64::from_bits(1u64 << (k + 1074))
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_squares_f32_equals_adding_each_square() {
        let mut s = 7u64;
        let mut vals: Vec<f32> = (0..200_000)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let bits = (s >> 32) as u32;
                match i % 5 {
                    0 => f32::from_bits(bits & 0x807f_ffff), // subnormal or zero
                    1 => f32::from_bits(bits) % 1e30,        // any finite magnitude
                    _ => (bits as f32 / u32::MAX as f32 - 0.5) * 3.0,
                }
            })
            .filter(|v| v.is_finite())
            .collect();
        vals.extend([0.0, -0.0, f32::MAX, f32::MIN_POSITIVE, -f32::MAX]);
        for vals in [&vals[..], &vals[..1], &vals[..70_000]] {
            let (mut fast, mut plain) = (ExactSum::new(), ExactSum::new());
            fast.add_squares_f32(vals);
            vals.iter().for_each(|&v| plain.add(v as f64 * v as f64));
            assert_eq!(fast.value().to_bits(), plain.value().to_bits());
            assert!(fast.value() > 0.0);
        }
        for bad in [f32::INFINITY, f32::NAN] {
            let v = [1.0, bad, 2.0];
            let (mut fast, mut plain) = (ExactSum::new(), ExactSum::new());
            fast.add_squares_f32(&v);
            v.iter().for_each(|&v| plain.add(v as f64 * v as f64));
            assert_eq!(fast.value().is_nan(), plain.value().is_nan());
            assert_eq!(fast.value().is_infinite(), plain.value().is_infinite());
        }
    }

    #[test]
    fn exact_sum_is_order_independent_and_exact() {
        let vals = [
            1e300,
            3.5,
            -1e300,
            1e-300,
            2.0f64.powi(-1074),
            -7.25,
            1e16,
            1.0,
        ];
        let mut a = ExactSum::new();
        vals.iter().for_each(|&v| a.add(v));
        let mut b = ExactSum::new();
        vals.iter().rev().for_each(|&v| b.add(v));
        assert_eq!(a.value().to_bits(), b.value().to_bits());
        // 3.5 - 7.25 + 1e16 + 1 + tiny: exact integer part is 1e16 - 2.75 -> rounds in f64.
        let expect = 1e16 - 2.75 + 1e-300;
        assert_eq!(a.value(), expect);
        let (mut c, mut d) = (ExactSum::new(), ExactSum::new());
        vals[..3].iter().for_each(|&v| c.add(v));
        vals[3..].iter().for_each(|&v| d.add(v));
        c.merge(&d);
        assert_eq!(c.value().to_bits(), a.value().to_bits());
        let mut neg = ExactSum::new();
        neg.add(-2.5);
        neg.add(1.0);
        assert_eq!(neg.value(), -1.5);
        let mut inf = ExactSum::new();
        inf.add(1.0);
        inf.add(f64::INFINITY);
        assert_eq!(inf.value(), f64::INFINITY);
    }

    /// `add_all` gives the value of adding one by one, on values of every
    /// kind: one scale, 600 binades, subnormals, cancelling signs, integers,
    /// huge magnitudes, infinities and NaN; whole, in odd pieces and merged.
    #[test]
    fn add_all_is_adding_one_by_one() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 11
        };
        let unit = |u: u64| u as f64 / (1u64 << 53) as f64 - 0.5;
        let sets: Vec<(&str, Vec<f64>)> = vec![
            (
                "scale",
                (0..5000).map(|_| unit(next()).abs() * 0.02).collect(),
            ),
            (
                "f32 differences",
                (0..5000)
                    .map(|_| {
                        let (x, b) = (unit(next()) as f32 * 0.3, unit(next()) as f32 * 0.3);
                        (x as f64 - b as f64).abs()
                    })
                    .collect(),
            ),
            (
                "binades",
                (0..5000)
                    .map(|_| unit(next()) * pow2((next() % 600) as i32 - 300))
                    .collect(),
            ),
            (
                "subnormal",
                (0..3000)
                    .map(|_| {
                        f64::from_bits(next() % (1 << 53))
                            * if next() % 2 == 0 { 1.0 } else { -1.0 }
                    })
                    .collect(),
            ),
            (
                "cancel",
                (0..4000)
                    .map(|i| {
                        if i % 2 == 0 {
                            1e10 + i as f64
                        } else {
                            -1e10 + unit(next())
                        }
                    })
                    .collect(),
            ),
            (
                "tiny and big",
                (0..3000)
                    .map(|i| {
                        if i % 500 == 0 {
                            1e300
                        } else {
                            unit(next()) * 1e-290
                        }
                    })
                    .collect(),
            ),
            ("zeros", vec![0.0; 2100]),
            (
                "special",
                (0..3000)
                    .map(|i| match i % 997 {
                        5 => f64::INFINITY,
                        600 => f64::NAN,
                        _ => unit(next()),
                    })
                    .collect(),
            ),
            (
                "inf",
                (0..3000)
                    .map(|i| {
                        if i == 2999 {
                            f64::NEG_INFINITY
                        } else {
                            unit(next())
                        }
                    })
                    .collect(),
            ),
            ("max", (0..100).map(|_| f64::MAX * unit(next())).collect()),
        ];
        for (kind, v) in sets {
            let mut one = ExactSum::new();
            v.iter().for_each(|&x| one.add(x));
            let mut all = ExactSum::new();
            all.add_all(&v);
            let (mut parts, mut other) = (ExactSum::new(), ExactSum::new());
            let mut at = 0;
            for (k, cut) in [1usize, 7, 1024, 1500, 333].iter().cycle().enumerate() {
                if at >= v.len() {
                    break;
                }
                let end = (at + cut).min(v.len());
                if k % 2 == 0 {
                    parts.add_all(&v[at..end])
                } else {
                    other.add_all(&v[at..end])
                }
                at = end;
            }
            parts.merge(&other);
            let want = one.value().to_bits();
            assert_eq!(all.value().to_bits(), want, "{kind}");
            assert_eq!(parts.value().to_bits(), want, "{kind}, in pieces");
            #[cfg(target_arch = "x86_64")]
            {
                let mut portable = ExactSum::new();
                portable.add_all_portable(&v);
                assert_eq!(portable.value().to_bits(), want, "{kind}, portable");
            }
        }
    }

    #[test]
    fn positional_sum_does_not_depend_on_the_cuts() {
        let v: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f64 * 1e-3 + 1e8 * ((i % 3) as f64))
            .collect();
        let mut whole = PositionalSum::new();
        whole.add_at(0, &v);
        for cut in [1, 3, 8, 13, 999] {
            let mut parts = PositionalSum::new();
            let mut at = 0;
            while at < v.len() {
                let end = (at + cut).min(v.len());
                parts.add_at(at as u64, &v[at..end]);
                at = end;
            }
            assert_eq!(
                parts.value().to_bits(),
                whole.value().to_bits(),
                "cut {cut}"
            );
        }
        let exact: f64 = v.iter().sum();
        assert!((whole.value() - exact).abs() <= 1e-9 * exact);
    }
}
