//! Conversion between stored little-endian bytes and `f32` values.
//!
//! Merging is done in `f32` whatever the storage type; these functions decode a
//! tensor's bytes to `f32` on demand and encode the result once, at the end.
//! BF16 and F16 are encoded with round-to-nearest-even (bit for bit what the
//! `half` crate gives), F64 is narrowed with Rust's `as` (round to nearest).

use half::f16;

use crate::{CoreError, DType};

fn check_len(dtype: DType, bytes: usize, n: usize) -> Result<(), CoreError> {
    let expected = n.saturating_mul(dtype.size_in_bytes());
    if bytes != expected {
        return Err(CoreError::LengthMismatch {
            name: format!("<{dtype} buffer>"),
            expected,
            actual: bytes,
            unit: "bytes",
        });
    }
    Ok(())
}

/// Decodes `out.len()` values of `dtype` from little-endian `bytes` into `out`.
///
/// Fails when `dtype` is not floating point or the byte count is not
/// `out.len() × size`. Works on unaligned input. F32 and BF16 (the common
/// checkpoint types) take a vectorised path, compiled for AVX2 and chosen at
/// run time where the CPU has it; the result is the same either way (both
/// conversions are exact).
///
/// ```
/// use tensormerge_core::{convert, DType};
/// let bytes = half::bf16::from_f32(1.5).to_le_bytes();
/// let mut out = [0f32; 1];
/// convert::decode_f32(DType::BF16, &bytes, &mut out).unwrap();
/// assert_eq!(out, [1.5]);
/// ```
pub fn decode_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), CoreError> {
    decode_f32_checked(dtype, bytes, out).map(|_| ())
}

/// [`decode_f32`] that also finds the first value that is NaN or infinite,
/// in the same pass over the data: `Ok(Some(i))` when `out[i]` is the first
/// non-finite value (every value is still decoded), `Ok(None)` when all are
/// finite.
///
/// ```
/// use tensormerge_core::{convert, DType};
/// let bytes = convert::encode_f32_vec(DType::BF16, &[1.0, f32::INFINITY, f32::NAN]).unwrap();
/// let mut out = [0f32; 3];
/// assert_eq!(convert::decode_f32_checked(DType::BF16, &bytes, &mut out).unwrap(), Some(1));
/// ```
pub fn decode_f32_checked(
    dtype: DType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<Option<usize>, CoreError> {
    check_len(dtype, bytes.len(), out.len())?;
    let any_bad = match dtype {
        DType::F32 | DType::BF16 => simd::decode(dtype == DType::BF16, bytes, out),
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32;
            }
            true // narrowing can overflow to infinity: look
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
            true
        }
        other => {
            return Err(CoreError::NotFloat {
                name: "<buffer>".into(),
                dtype: other,
            });
        }
    };
    Ok(if any_bad { first_non_finite(out) } else { None })
}

/// The index of the first NaN or infinite value of `values`, if any
/// (vectorised: blocks are tested without branches, only a block with a hit
/// is searched).
///
/// ```
/// use tensormerge_core::convert::first_non_finite;
/// assert_eq!(first_non_finite(&[1.0, f32::MAX, f32::NEG_INFINITY, f32::NAN]), Some(2));
/// assert_eq!(first_non_finite(&[0.0, -1e-45]), None);
/// ```
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    const B: usize = 256;
    for (b, block) in values.chunks(B).enumerate() {
        // An all-ones exponent is NaN or infinity; an OR of equality masks
        // vectorises on every x86-64 (no unsigned max needed).
        let bad = block.iter().fold(0u32, |m, x| {
            m | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
        });
        if bad != 0 {
            return block.iter().position(|x| !x.is_finite()).map(|i| b * B + i);
        }
    }
    None
}

/// Encodes `values` as little-endian `dtype` into `out`, which must hold
/// exactly `values.len() × size` bytes.
///
/// BF16 and F16 round to nearest, ties to even; NaN stays NaN (for BF16 its
/// upper mantissa bits are kept and the quiet bit set, exactly as the `half`
/// crate does, so results equal `half::bf16::from_f32` bit for bit). F32 and
/// BF16 take a vectorised path (AVX2 where the CPU has it).
///
/// ```
/// use tensormerge_core::{convert, DType};
/// let mut bytes = [0u8; 2];
/// convert::encode_f32(DType::F16, &[0.5], &mut bytes).unwrap();
/// assert_eq!(bytes, half::f16::from_f32(0.5).to_le_bytes());
/// ```
pub fn encode_f32(dtype: DType, values: &[f32], out: &mut [u8]) -> Result<(), CoreError> {
    check_len(dtype, out.len(), values.len())?;
    match dtype {
        DType::F32 | DType::BF16 => simd::encode(dtype == DType::BF16, values, out),
        DType::F64 => {
            for (c, v) in out.chunks_exact_mut(8).zip(values) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(values) {
                c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        other => {
            return Err(CoreError::NotFloat {
                name: "<buffer>".into(),
                dtype: other,
            });
        }
    }
    Ok(())
}

/// Encodes `values` as `dtype` into a new byte vector.
pub fn encode_f32_vec(dtype: DType, values: &[f32]) -> Result<Vec<u8>, CoreError> {
    let mut out = vec![0u8; values.len() * dtype.size_in_bytes()];
    encode_f32(dtype, values, &mut out)?;
    Ok(out)
}

/// Rounds `values` in place to what `dtype` can hold (identity for F32 and F64),
/// as if encoded and decoded again.
pub fn round_to(dtype: DType, values: &mut [f32]) {
    match dtype {
        DType::BF16 => values
            .iter_mut()
            .for_each(|v| *v = f32::from_bits(u32::from(bf16_bits(*v)) << 16)),
        DType::F16 => values
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// `f32` → `bf16` bits, round to nearest even, NaN quieted with its upper
/// mantissa kept: the rule of `half::bf16::from_f32`, written without
/// branches so that it vectorises. Adding `0x7fff + lsb` carries into bit 16
/// exactly when the discarded half is above the midpoint, or at it with an
/// odd kept part; overflow rounds to infinity as it should.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1))) >> 16;
    let nan = (x >> 16) | 0x40;
    (if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// The vectorised F32/BF16 loops, compiled twice (baseline and AVX2) and
/// dispatched at run time. Both copies perform the same exact integer and bit
/// operations, so their results are identical.
mod simd {
    use super::bf16_bits;

    /// Values per block: the loops work on whole blocks of fixed size so that
    /// the compiler unrolls and vectorises them.
    const B: usize = 64;

    /// Decodes `bytes` (BF16 when `bf16`, else F32) into `out`; true when
    /// some value is NaN or infinite.
    pub(super) fn decode(bf16: bool, bytes: &[u8], out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { decode_avx2(bf16, bytes, out) };
        }
        decode_body(bf16, bytes, out)
    }

    /// Encodes `values` into `out` (BF16 when `bf16`, else F32).
    pub(super) fn encode(bf16: bool, values: &[f32], out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { encode_avx2(bf16, values, out) };
        }
        encode_body(bf16, values, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn decode_avx2(bf16: bool, bytes: &[u8], out: &mut [f32]) -> bool {
        decode_body(bf16, bytes, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn encode_avx2(bf16: bool, values: &[f32], out: &mut [u8]) {
        encode_body(bf16, values, out)
    }

    #[inline(always)]
    fn decode_body(bf16: bool, bytes: &[u8], out: &mut [f32]) -> bool {
        let mut bad = 0u32;
        if bf16 {
            let mut src = bytes.chunks_exact(2 * B);
            let mut dst = out.chunks_exact_mut(B);
            for (s, d) in (&mut src).zip(&mut dst) {
                bad |= bf16_block(s, d);
            }
            bad |= bf16_block(src.remainder(), dst.into_remainder());
        } else {
            let mut src = bytes.chunks_exact(4 * B);
            let mut dst = out.chunks_exact_mut(B);
            for (s, d) in (&mut src).zip(&mut dst) {
                bad |= f32_block(s, d);
            }
            bad |= f32_block(src.remainder(), dst.into_remainder());
        }
        bad != 0
    }

    #[inline(always)]
    fn bf16_block(src: &[u8], dst: &mut [f32]) -> u32 {
        let mut bad = 0u32;
        for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
            let h = u32::from(u16::from_le_bytes([c[0], c[1]]));
            bad |= u32::from(h & 0x7f80 == 0x7f80);
            *d = f32::from_bits(h << 16);
        }
        bad
    }

    #[inline(always)]
    fn f32_block(src: &[u8], dst: &mut [f32]) -> u32 {
        let mut bad = 0u32;
        for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
            let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            bad |= u32::from(x & 0x7f80_0000 == 0x7f80_0000);
            *d = f32::from_bits(x);
        }
        bad
    }

    #[inline(always)]
    fn encode_body(bf16: bool, values: &[f32], out: &mut [u8]) {
        if bf16 {
            let mut src = values.chunks_exact(B);
            let mut dst = out.chunks_exact_mut(2 * B);
            for (s, d) in (&mut src).zip(&mut dst) {
                for (c, v) in d.chunks_exact_mut(2).zip(s) {
                    c.copy_from_slice(&bf16_bits(*v).to_le_bytes());
                }
            }
            for (c, v) in dst
                .into_remainder()
                .chunks_exact_mut(2)
                .zip(src.remainder())
            {
                c.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
        } else {
            for (c, v) in out.chunks_exact_mut(4).zip(values) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_and_wrong_lengths() {
        let vals = [1.0f32, -2.5, 3.25];
        let mut buf = [0u8; 13];
        encode_f32(DType::F32, &vals, &mut buf[1..]).unwrap();
        let mut out = [0f32; 3];
        decode_f32(DType::F32, &buf[1..], &mut out).unwrap();
        assert_eq!(out, vals);
        assert!(matches!(
            decode_f32(DType::F32, &buf[..5], &mut out),
            Err(CoreError::LengthMismatch {
                expected: 12,
                actual: 5,
                ..
            })
        ));
        assert!(matches!(
            decode_f32(DType::I32, &buf[1..], &mut out),
            Err(CoreError::NotFloat { .. })
        ));
    }

    #[test]
    fn bf16_encoding_is_bit_for_bit_that_of_half() {
        let check = |x: u32| {
            let v = f32::from_bits(x);
            assert_eq!(
                bf16_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "f32 bits {x:#010x}"
            );
        };
        // Every upper half with the discarded half at and around the
        // rounding midpoint, at its extremes, and a stride over everything
        // (NaN payloads, infinities, subnormals, overflow to infinity).
        for hi in 0..=0xffffu32 {
            for lo in [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                check(hi << 16 | lo);
            }
        }
        for x in (0..=u32::MAX).step_by(4099) {
            check(x);
        }
        // The vectorised encoder (blocks and remainder) agrees too.
        let vals: Vec<f32> = (0..1000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9)))
            .collect();
        let mut got = vec![0u8; 2000];
        encode_f32(DType::BF16, &vals, &mut got).unwrap();
        let want: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn decoding_every_bf16_pattern_extends_it_exactly() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut out = vec![0f32; bits.len()];
        let first = decode_f32_checked(DType::BF16, &bytes, &mut out).unwrap();
        for (b, o) in bits.iter().zip(&out) {
            assert_eq!(o.to_bits(), u32::from(*b) << 16);
        }
        assert_eq!(first, Some(0x7f80)); // +infinity is the first non-finite
    }

    #[test]
    fn checked_decoding_finds_the_first_non_finite_value() {
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let n = 300; // several blocks and a remainder
            let vals: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 30.0).collect();
            let mut out = vec![0f32; n];
            let bytes = encode_f32_vec(dtype, &vals).unwrap();
            assert_eq!(decode_f32_checked(dtype, &bytes, &mut out).unwrap(), None);
            assert_eq!(out, vals, "{dtype}");
            for (at, bad) in [
                (0, f32::NAN),
                (63, f32::INFINITY),
                (64, f32::NEG_INFINITY),
                (299, f32::NAN),
            ] {
                let mut w = vals.clone();
                w[at] = bad;
                if at + 5 < n {
                    w[at + 5] = f32::NAN; // a later one is not reported
                }
                let bytes = encode_f32_vec(dtype, &w).unwrap();
                // Unaligned too.
                let mut shifted = vec![0u8; bytes.len() + 1];
                shifted[1..].copy_from_slice(&bytes);
                for b in [&bytes[..], &shifted[1..]] {
                    assert_eq!(
                        decode_f32_checked(dtype, b, &mut out).unwrap(),
                        Some(at),
                        "{dtype} at {at}"
                    );
                    assert_eq!(out[at].to_bits() & 0x7f80_0000, 0x7f80_0000);
                }
            }
        }
        // F64 narrowing past f32::MAX is infinite, and found.
        let bytes: Vec<u8> = [1.0f64, 1e300]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = [0f32; 2];
        assert_eq!(
            decode_f32_checked(DType::F64, &bytes, &mut out).unwrap(),
            Some(1)
        );
        assert_eq!(first_non_finite(&out), Some(1));
    }

    #[test]
    fn bf16_paths_agree() {
        let vals = [1.0f32, -0.0078125, 3.0e38, f32::MIN_POSITIVE];
        let enc = encode_f32_vec(DType::BF16, &vals).unwrap();
        let mut shifted = vec![0u8; enc.len() + 1];
        shifted[1..].copy_from_slice(&enc);
        let (mut a, mut b) = ([0f32; 4], [0f32; 4]);
        decode_f32(DType::BF16, &enc, &mut a).unwrap();
        decode_f32(DType::BF16, &shifted[1..], &mut b).unwrap();
        assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
        let mut r = vals;
        round_to(DType::BF16, &mut r);
        assert_eq!(a, r);
    }
}
