//! Helpers shared by the end-to-end tests of the `tensormerge` binary
//! (`mod common;` in each test file). Not every test file uses every helper.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use tensormerge_core::{TensorInfo, convert};
use tensormerge_io::{ModelWriter, WriterOptions};

/// The built binary, offline, with colours decided by the flags alone and
/// the thread count of candle not inherited from the environment.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tensormerge"));
    c.env_remove("NO_COLOR")
        .env_remove("RAYON_NUM_THREADS")
        .env("HF_HUB_OFFLINE", "1");
    c
}

/// Runs the binary with `args`.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run tensormerge")
}

/// Bytes of an output stream as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Asserts exit code `code` and that stderr contains every needle.
pub fn fails(o: &Output, code: i32, needles: &[&str]) {
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {e}");
    for n in needles {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32 ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2_654_435_761);
            (x % 4001) as f32 / 2000.0 - 1.0
        })
        .collect()
}

/// Writes a model directory with these tensors (float ones encoded in their
/// dtype, integer ones as `i64`).
pub fn write_model(dir: &Path, tensors: &[(TensorInfo, Vec<f32>)]) {
    let infos = tensors.iter().map(|(t, _)| t.clone()).collect();
    let mut w = ModelWriter::create(dir, infos, WriterOptions::default()).unwrap();
    for (t, v) in tensors {
        if t.dtype.is_float() {
            w.write(&t.name, &convert::encode_f32_vec(t.dtype, v).unwrap())
                .unwrap();
        } else {
            let b: Vec<u8> = v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
            w.write(&t.name, &b).unwrap();
        }
    }
    w.finish().unwrap();
}
