//! Safetensors header and layout validation (see `checks/header.rs`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tensormerge_fuzz::{header, scratch_dir};

static FILE: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let path = FILE.get_or_init(|| scratch_dir("header").join("input.safetensors"));
    let bytes = header::file_bytes(data);
    let _ = header::open_and_check(path, &bytes);
});
