//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{ModelWriter, WriterOptions};

/// A safetensors file assembled by hand: length prefix, header, data.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes `tensors` (name, shape, dtype, values as f32) as a model directory.
pub fn write_model(
    dir: &Path,
    tensors: &[(&str, Vec<usize>, DType, Vec<f32>)],
    opts: WriterOptions,
) {
    let infos = tensors
        .iter()
        .map(|(n, s, d, _)| TensorInfo::new(*n, s.clone(), *d))
        .collect();
    let mut w = ModelWriter::create(dir, infos, opts).unwrap();
    for (n, _, d, v) in tensors {
        let bytes = if d.is_float() {
            convert::encode_f32_vec(*d, v).unwrap()
        } else {
            int_bytes(*d, v)
        };
        w.write(n, &bytes).unwrap();
    }
    w.finish().unwrap();
}

/// Little-endian bytes of integer/bool values given as f32.
pub fn int_bytes(d: DType, v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| {
            let i = *x as i64;
            let b = i.to_le_bytes();
            b[..d.size_in_bytes()].to_vec()
        })
        .collect()
}
