//! The sharded index JSON, in a fixture directory with links (see `checks/index.rs`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tensormerge_fuzz::{index, scratch_dir};

static DIR: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| index::fixture(&scratch_dir("index")));
    let _ = index::open_and_check(dir, data);
});
