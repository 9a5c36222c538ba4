//! Fuzz check: safetensors header and layout validation as tensormerge-io
//! uses it (bytes written as a file, opened with `Model::open_path`).
//!
//! Shared, through `#[path]`, by the fuzz target `safetensors_header` and the
//! regression test `crates/io/tests/hostile_fuzz_regressions.rs`, so that
//! every input the fuzzer ever found is replayed by `cargo test`.

use std::path::Path;

use tensormerge_io::{IoError, Model};

/// Turns a fuzz input into the bytes of a file.
///
/// First byte even: the rest is the file exactly. First byte odd: the next
/// two bytes give a data-section length (little-endian, modulo 4097) and the
/// rest is the header JSON; the 8-byte length prefix is computed, so the
/// fuzzer spends its time in the JSON and layout checks instead of guessing
/// a length that matches.
pub fn file_bytes(input: &[u8]) -> Vec<u8> {
    match input.split_first() {
        None => Vec::new(),
        Some((mode, rest)) if mode & 1 == 0 => rest.to_vec(),
        Some((_, rest)) => {
            let (n, json) = if rest.len() >= 2 {
                (
                    usize::from(u16::from_le_bytes([rest[0], rest[1]])) % 4097,
                    &rest[2..],
                )
            } else {
                (0, rest)
            };
            let mut out = Vec::with_capacity(8 + json.len() + n);
            out.extend_from_slice(&(json.len() as u64).to_le_bytes());
            out.extend_from_slice(json);
            out.extend((0..n).map(|i| (i * 31 % 251) as u8));
            out
        }
    }
}

/// Writes `bytes` to `path` (which must end in `.safetensors`), opens it and,
/// when it opens, checks what validation promises: every tensor's bytes are
/// in the file and exactly shape × dtype size, float tensors decode, and the
/// tensors cover the data section exactly. Panics when a promise is broken;
/// returns the open error otherwise (which must render without panicking).
pub fn open_and_check(path: &Path, bytes: &[u8]) -> Result<usize, IoError> {
    std::fs::write(path, bytes).expect("writing the fuzz input file");
    let model = match Model::open_path(path) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return Err(e);
        }
    };
    assert!(bytes.len() >= 8, "a file shorter than 8 bytes opened");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let mut covered = 0u64;
    for t in model.layout().tensors() {
        let raw = model
            .tensor_bytes(&t.name)
            .expect("bytes of a validated tensor");
        let expected = t.checked_byte_len().expect("validated byte length");
        assert_eq!(raw.len(), expected, "tensor `{}`", t.name);
        covered += expected as u64;
        if t.dtype.is_float() {
            let v = model
                .read_f32_vec(&t.name)
                .expect("decoding a validated float tensor");
            assert_eq!(v.len(), t.numel(), "tensor `{}`", t.name);
        } else {
            assert!(model.read_f32_vec(&t.name).is_err());
        }
    }
    assert_eq!(
        8 + header_len + covered,
        bytes.len() as u64,
        "the tensors must cover the data section exactly"
    );
    Ok(model.layout().len())
}
