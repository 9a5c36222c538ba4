//! Replays the fuzz seeds and every saved fuzz regression of the
//! `safetensors_header` and `sharded_index` targets through the very checks
//! the fuzz targets run (`fuzz/checks/*.rs`), so `cargo test` keeps every
//! input the fuzzer found.

use std::path::{Path, PathBuf};

#[path = "../../../fuzz/checks/header.rs"]
mod header;
#[cfg(unix)]
#[path = "../../../fuzz/checks/index.rs"]
mod index;

/// Inputs of one fuzz target: its seeds and its saved regressions.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = fuzz.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn safetensors_header_corpus_replays() {
    let cases = inputs("safetensors_header");
    assert!(cases.len() >= 6, "seed corpus missing: {}", cases.len());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("input.safetensors");
    let mut opened = 0;
    for (p, data) in &cases {
        let bytes = header::file_bytes(data);
        // Panics (the test fails) on any broken promise.
        let result = header::open_and_check(&path, &bytes);
        if p.to_string_lossy().contains("/seeds/") {
            result.unwrap_or_else(|e| panic!("seed {} does not open: {e}", p.display()));
            opened += 1;
        }
    }
    // The seeds are valid files: all of them open.
    assert!(opened >= 6, "only {opened} seeds opened");
}

#[test]
fn header_mode_byte_builds_length_prefix() {
    // Odd first byte: the length prefix is computed from the JSON.
    let json = br#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
    let mut input = vec![1u8, 2, 0];
    input.extend_from_slice(json);
    let bytes = header::file_bytes(&input);
    assert_eq!(&bytes[..8], &(json.len() as u64).to_le_bytes());
    assert_eq!(bytes.len(), 8 + json.len() + 2);
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        header::open_and_check(&tmp.path().join("x.safetensors"), &bytes).unwrap(),
        1
    );
}

#[cfg(unix)]
#[test]
fn sharded_index_corpus_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = index::fixture(tmp.path());
    let cases = inputs("sharded_index");
    assert!(cases.len() >= 5);
    let mut results = Vec::new();
    for (p, data) in &cases {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        results.push((name, index::open_and_check(&dir, data)));
    }
    let get = |n: &str| {
        &results
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("seed {n} missing"))
            .1
    };
    assert_eq!(*get("valid").as_ref().unwrap(), 3);
    // A shard in a subdirectory and a link to a blob outside: legitimate.
    assert_eq!(*get("sub_and_blob").as_ref().unwrap(), 6);
    let msg = get("dotdot").as_ref().unwrap_err().to_string();
    assert!(
        msg.contains("../secret.safetensors") && msg.contains(".."),
        "{msg}"
    );
    let msg = get("dirlink").as_ref().unwrap_err().to_string();
    assert!(msg.contains("dirlink.safetensors"), "{msg}");
    let msg = get("textlink").as_ref().unwrap_err().to_string();
    assert!(msg.contains("textlink.safetensors"), "{msg}");
}
