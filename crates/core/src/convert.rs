//! Conversion between stored little-endian bytes and `f32` values.
//!
//! Merging is done in `f32` whatever the storage type; these functions decode a
//! tensor's bytes to `f32` on demand and encode the result once, at the end.
//! BF16 and F16 are encoded with round-to-nearest-even (the `half` crate), F64
//! is narrowed with Rust's `as` (round to nearest).

use half::{bf16, f16};

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
/// `out.len() × size`. Works on unaligned input (it copies when a cast is not
/// possible).
///
/// ```
/// use tensormerge_core::{convert, DType};
/// let bytes = half::bf16::from_f32(1.5).to_le_bytes();
/// let mut out = [0f32; 1];
/// convert::decode_f32(DType::BF16, &bytes, &mut out).unwrap();
/// assert_eq!(out, [1.5]);
/// ```
pub fn decode_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), CoreError> {
    check_len(dtype, bytes.len(), out.len())?;
    match dtype {
        DType::F32 => {
            if cfg!(target_endian = "little") {
                bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
            } else {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32;
            }
        }
        DType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(bytes) {
            Ok(src) if cfg!(target_endian = "little") => {
                for (o, v) in out.iter_mut().zip(src) {
                    *o = v.to_f32();
                }
            }
            _ => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    // bf16 is the upper half of an f32: exact.
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        },
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
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

/// Encodes `values` as little-endian `dtype` into `out`, which must hold
/// exactly `values.len() × size` bytes.
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
        DType::F32 => {
            for (c, v) in out.chunks_exact_mut(4).zip(values) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F64 => {
            for (c, v) in out.chunks_exact_mut(8).zip(values) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(values) {
                c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
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
            .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        DType::F16 => values
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v).to_f32()),
        _ => {}
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
