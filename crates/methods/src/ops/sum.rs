//! Exact summation: [`ExactSum`] (an exact fixed-point accumulator of `f64`
//! values) and [`PositionalSum`]; sums of squares and L1 norms that do not
//! depend on the order of addition or on where chunks were cut.

use super::weight_sum;

const LIMBS: usize = 72;
/// Exponent of the lowest limb's lowest bit (below the smallest f64 subnormal).
const E0: i32 = -1088;
/// Additions between carry normalisations (each limb grows by < 2³² per add).
const NORMALIZE_EVERY: u32 = 1 << 30;

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
        let mut by_exp = [0u64; 256];
        for part in values.chunks(FLUSH) {
            for &v in part {
                let bits = v.to_bits();
                let exp = ((bits >> 23) & 0xff) as usize;
                let frac = (bits & 0x7f_ffff) as u64;
                let m = if exp == 0 { frac } else { frac | 0x80_0000 };
                by_exp[exp] += m * m;
            }
            // Non-finite values (exponent field 255, whose `m` is never 0)
            // are summed as `add` sums them.
            if by_exp[255] != 0 {
                by_exp[255] = 0;
                for &v in part.iter().filter(|v| !v.is_finite()) {
                    self.special += v as f64 * v as f64;
                }
            }
            for (exp, b) in by_exp.iter_mut().enumerate().take(255) {
                if *b != 0 {
                    // |v| = m · 2^(max(exp, 1) − 150), so v² = m² · 2^s with
                    // s = 2 (max(exp, 1) − 150); bucket `k` of `buckets`
                    // holds multiples of 2^(max(k, 1) − 1075).
                    let s = 2 * ((exp as i32).max(1) - 150);
                    self.buckets[(s + 1075) as usize] += *b as i128;
                    *b = 0;
                }
            }
        }
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
