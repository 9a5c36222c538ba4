//! Replays the fuzz seeds and every saved fuzz regression of the
//! `yaml_config` and `expr` targets through the very checks the fuzz targets
//! run (`fuzz/checks/*.rs`), so `cargo test` keeps every input the fuzzer found.

use std::path::{Path, PathBuf};

#[path = "../../../fuzz/checks/expr.rs"]
mod expr_check;
#[path = "../../../fuzz/checks/yaml_config.rs"]
mod yaml_check;

fn inputs(target: &str) -> Vec<(PathBuf, String)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_file() && p.extension().is_none() {
                // The fuzz targets skip inputs that are not UTF-8.
                if let Ok(text) = String::from_utf8(std::fs::read(&p).unwrap()) {
                    out.push((p, text));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn expr_corpus_replays() {
    let cases = inputs("expr");
    assert!(cases.len() >= 6);
    for (_, src) in &cases {
        expr_check::check(src);
    }
}

#[test]
fn yaml_config_corpus_replays() {
    let cases = inputs("yaml_config");
    assert!(cases.len() >= 4);
    // No method crates are linked into this test: parsing is replayed here,
    // parameter validation against every built-in method by the fuzz target.
    let methods: Vec<_> = tensormerge_methods::registry().methods().collect();
    for (p, text) in &cases {
        yaml_check::check(text, &methods);
        if p.to_string_lossy().contains("/seeds/") {
            tensormerge_engine::MergeConfig::from_yaml_str(text)
                .unwrap_or_else(|e| panic!("seed {} does not parse: {e}", p.display()));
        }
    }
}
