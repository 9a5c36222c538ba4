//! Fuzz check: mergekit YAML configs, including parameter validation against
//! the declared parameters of every registered method.
//!
//! Shared, through `#[path]`, by the fuzz target `yaml_config` and the
//! regression test `crates/engine/tests/hostile_fuzz_regressions.rs`.

use tensormerge_engine::MergeConfig;
use tensormerge_methods::MergeMethod;

/// Parses `text` as a config; on success validates its parameters against
/// each of `methods`. Errors must render without panicking.
pub fn check(text: &str, methods: &[&dyn MergeMethod]) {
    match MergeConfig::from_yaml_str(text) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(config) => {
            let _ = config.output_dtype();
            for m in methods {
                if let Err(e) = config.validate_params(*m) {
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
