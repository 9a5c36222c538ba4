//! The YAML merge config, with parameter validation against every built-in
//! method (see `checks/yaml_config.rs`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tensormerge_fuzz::yaml_config;
use tensormerge_methods::MergeMethod;

static METHODS: OnceLock<Vec<&'static dyn MergeMethod>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let methods = METHODS.get_or_init(|| tensormerge::builtin::registry().methods().collect());
    if let Ok(text) = std::str::from_utf8(data) {
        yaml_config::check(text, methods);
    }
});
