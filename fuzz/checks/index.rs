//! Fuzz check: the sharded index (`model.safetensors.index.json`), opened in
//! a fixture directory holding valid shards, a shard in a subdirectory, a
//! link to a blob outside the directory (as the hub cache does), a link to a
//! directory, a link to a text file, a dangling link, and a valid
//! safetensors file *outside* the model directory that no index may reach.
//!
//! Shared, through `#[path]`, by the fuzz target `sharded_index` and the
//! regression test `crates/io/tests/hostile_fuzz_regressions.rs`.

use std::path::{Component, Path, PathBuf};

use tensormerge_io::{IoError, Model};

/// Tensor names of the files inside the model directory (or linked from it).
pub const INSIDE_TENSORS: &[&str] = &["a", "b", "c", "d", "e"];

/// A tiny valid safetensors file: `tensors` are (name, dtype, shape), data
/// bytes are a counting pattern.
pub fn tiny_safetensors(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
    let size = |d: &str| match d {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    };
    let mut entries = Vec::new();
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let len = size(dtype) * shape.iter().product::<usize>();
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        entries.push(format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            dims.join(","),
            offset + len
        ));
        offset += len;
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    // Small values in every dtype: bytes 0..=59 repeated (finite as floats).
    out.extend((0..offset).map(|i| (i % 60) as u8));
    out
}

/// Creates the fixture under `root` and returns the model directory.
#[cfg(unix)]
pub fn fixture(root: &Path) -> PathBuf {
    use std::os::unix::fs::symlink;
    let dir = root.join("model");
    std::fs::create_dir_all(dir.join("sub")).expect("fixture dir");
    std::fs::create_dir_all(root.join("blobs")).expect("fixture blobs");
    let write = |p: PathBuf, b: Vec<u8>| std::fs::write(p, b).expect("fixture file");
    write(
        dir.join("model-00001-of-00002.safetensors"),
        tiny_safetensors(&[("a", "F32", &[2]), ("b", "F16", &[3])]),
    );
    write(
        dir.join("model-00002-of-00002.safetensors"),
        tiny_safetensors(&[("c", "BF16", &[2, 2])]),
    );
    write(
        dir.join("sub/model-00003.safetensors"),
        tiny_safetensors(&[("d", "F32", &[1])]),
    );
    write(
        root.join("blobs/0123abcd"),
        tiny_safetensors(&[("e", "F32", &[2]), ("pos", "I64", &[2])]),
    );
    write(
        root.join("secret.safetensors"),
        tiny_safetensors(&[("s", "F32", &[1])]),
    );
    write(dir.join("notes.txt"), b"not a safetensors file".to_vec());
    let link = |target: &str, name: &str| {
        let p = dir.join(name);
        if p.symlink_metadata().is_err() {
            symlink(target, p).expect("fixture link");
        }
    };
    link("../blobs/0123abcd", "blob.safetensors");
    link("sub", "dirlink.safetensors");
    link("notes.txt", "textlink.safetensors");
    link("missing-target", "dangling.safetensors");
    dir
}

/// Writes `index` as the model directory's index, opens the directory and,
/// when it opens, checks that every shard is named by a path inside the
/// directory, that no tensor from outside it was read, and that every tensor
/// decodes. Panics when a promise is broken.
pub fn open_and_check(dir: &Path, index: &[u8]) -> Result<usize, IoError> {
    std::fs::write(dir.join("model.safetensors.index.json"), index).expect("writing the index");
    let model = match Model::open_path(dir) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return Err(e);
        }
    };
    for f in model.files() {
        let rel = f
            .strip_prefix(dir)
            .unwrap_or_else(|_| panic!("shard {} is outside {}", f.display(), dir.display()));
        assert!(
            rel.components().all(|c| matches!(c, Component::Normal(_))),
            "shard name {} leaves the directory",
            rel.display()
        );
        assert!(std::fs::metadata(f).expect("shard metadata").is_file());
    }
    for t in model.layout().tensors() {
        assert!(
            INSIDE_TENSORS.contains(&t.name.as_str()) || t.name == "pos",
            "tensor `{}` from outside the model directory",
            t.name
        );
        let raw = model.tensor_bytes(&t.name).expect("tensor bytes");
        assert_eq!(raw.len(), t.checked_byte_len().expect("byte length"));
        if t.dtype.is_float() {
            model.read_f32_vec(&t.name).expect("decoding");
        }
    }
    Ok(model.layout().len())
}
