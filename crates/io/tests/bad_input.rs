//! Malformed files and indexes: each is a typed error naming the file and the
//! problem, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{raw_file, write_model};
use tensormerge_core::DType;
use tensormerge_io::{INDEX_FILE, IoError, Model, WriterOptions};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open_err(path: &Path) -> IoError {
    let e = Model::open_path(path).unwrap_err();
    let msg = e.to_string();
    let file = path.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(file), "error should name {file}: {msg}");
    e
}

const GOOD: &str = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

#[test]
fn truncated_files() {
    let tmp = tempfile::tempdir().unwrap();
    // Shorter than the length prefix.
    let p = write(tmp.path(), "tiny.safetensors", &[1, 2, 3]);
    assert!(matches!(open_err(&p), IoError::Truncated { len: 3, .. }));
    let p = write(tmp.path(), "empty.safetensors", &[]);
    assert!(matches!(open_err(&p), IoError::Truncated { len: 0, .. }));
    // A real file cut in the middle of its data.
    let full = raw_file(GOOD, &[0u8; 8]);
    let p = write(tmp.path(), "cut.safetensors", &full[..full.len() - 3]);
    let e = open_err(&p);
    assert!(
        matches!(&e, IoError::OutOfBounds { tensor, end: 8, data_len: 5, .. } if tensor == "w"),
        "{e}"
    );
    // Cut inside the header.
    let p = write(tmp.path(), "cuthead.safetensors", &full[..20]);
    assert!(matches!(
        open_err(&p),
        IoError::HeaderLengthExceedsFile { .. }
    ));
}

#[test]
fn header_length_larger_than_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = raw_file(GOOD, &[0u8; 8]);
    bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
    let p = write(tmp.path(), "long.safetensors", &bytes);
    let e = open_err(&p);
    assert!(
        matches!(
            e,
            IoError::HeaderLengthExceedsFile {
                header_len: 1000,
                ..
            }
        ),
        "{e}"
    );
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = write(tmp.path(), "huge.safetensors", &bytes);
    assert!(matches!(open_err(&p), IoError::HeaderTooLarge { .. }));
}

#[test]
fn header_not_json() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, header) in ["not json at all", "[1, 2]", "{\"w\": ", "\u{0}\u{1}"]
        .iter()
        .enumerate()
    {
        let p = write(
            tmp.path(),
            &format!("bad{i}.safetensors"),
            &raw_file(header, &[]),
        );
        let e = open_err(&p);
        assert!(matches!(e, IoError::HeaderJson { .. }), "{header}: {e}");
    }
    // Invalid UTF-8.
    let p = write(tmp.path(), "utf.safetensors", &raw_file("", &[]));
    let mut b = std::fs::read(&p).unwrap();
    b[..8].copy_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&[0xff, 0xfe]);
    std::fs::write(&p, b).unwrap();
    assert!(matches!(open_err(&p), IoError::HeaderJson { .. }));
    // Entry of the wrong form.
    let p = write(
        tmp.path(),
        "entry.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    let e = open_err(&p);
    assert!(
        matches!(&e, IoError::HeaderEntry { tensor, .. } if tensor == "w"),
        "{e}"
    );
    let p = write(
        tmp.path(),
        "meta.safetensors",
        &raw_file(
            r#"{"__metadata__":{"format":1},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    assert!(matches!(open_err(&p), IoError::MetadataNotString { key, .. } if key == "format"));
    let p = write(
        tmp.path(),
        "dup.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    assert!(matches!(open_err(&p), IoError::DuplicateEntry { tensor, .. } if tensor == "w"));
}

#[test]
fn offsets_out_of_bounds_overlapping_or_wrong_size() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, usize)] = &[
        (
            "oob",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            8,
        ),
        (
            "overlap",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ),
        (
            "size",
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ),
        (
            "reversed",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            8,
        ),
        (
            "gap",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ),
        (
            "trailing",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            12,
        ),
        (
            "overflow",
            r#"{"w":{"dtype":"F32","shape":[18446744073709551615, 4],"data_offsets":[0,8]}}"#,
            8,
        ),
        (
            "bigend",
            r#"{"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#,
            8,
        ),
    ];
    for (name, header, data) in cases {
        let p = write(
            tmp.path(),
            &format!("{name}.safetensors"),
            &raw_file(header, &vec![0u8; *data]),
        );
        let e = open_err(&p);
        let ok = match *name {
            "oob" => {
                matches!(&e, IoError::OutOfBounds { tensor, end: 16, data_len: 8, .. } if tensor == "w")
            }
            "overlap" => {
                matches!(&e, IoError::Overlap { tensor, other, .. } if tensor == "b" && other == "a")
            }
            "size" => {
                matches!(&e, IoError::SizeMismatch { tensor, expected: 12, actual: 8, .. } if tensor == "w")
            }
            "reversed" => matches!(
                &e,
                IoError::InvalidOffsets {
                    begin: 8,
                    end: 0,
                    ..
                }
            ),
            "gap" => matches!(
                &e,
                IoError::Gap {
                    expected: 0,
                    begin: 4,
                    ..
                }
            ),
            "trailing" => matches!(&e, IoError::TrailingBytes { extra: 4, .. }),
            "overflow" => matches!(&e, IoError::ShapeOverflow { tensor, .. } if tensor == "w"),
            "bigend" => matches!(&e, IoError::OutOfBounds { .. }),
            _ => unreachable!(),
        };
        assert!(ok, "{name}: {e:?}");
    }
}

#[test]
fn unknown_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "f8.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#,
            &[0; 2],
        ),
    );
    let e = open_err(&p);
    assert!(
        matches!(&e, IoError::UnknownDType { tensor, dtype, .. } if tensor == "w" && dtype == "F8_E4M3"),
        "{e}"
    );
    assert!(e.to_string().contains("`w`"));
    // PyTorch spellings are not safetensors dtypes.
    let p = write(
        tmp.path(),
        "torchname.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"float32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );
    assert!(matches!(open_err(&p), IoError::UnknownDType { .. }));
}

/// A sharded model: two shards with tensors `a` and `b`.
fn sharded(dir: &Path) {
    write_model(
        dir,
        &[
            ("a", vec![2], DType::F32, vec![1.0, 2.0]),
            ("b", vec![2], DType::F32, vec![3.0, 4.0]),
        ],
        WriterOptions {
            max_shard_bytes: 8,
            ..Default::default()
        },
    );
}

fn set_index(dir: &Path, weight_map: &str) {
    std::fs::write(
        dir.join(INDEX_FILE),
        format!(r#"{{"metadata":{{}},"weight_map":{weight_map}}}"#),
    )
    .unwrap();
}

const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

#[test]
fn index_names_outside_the_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    sharded(&dir);
    // A valid file really exists outside, so only the check can stop it.
    std::fs::copy(dir.join(S2), tmp.path().join("x.safetensors")).unwrap();
    let outside = tmp.path().join("x.safetensors");
    for bad in [
        "../x.safetensors".to_string(),
        "sub/../../x.safetensors".to_string(),
        outside.display().to_string(),
        "./model-00002-of-00002.safetensors".to_string(),
        "C:\\\\x.safetensors".to_string(),
        String::new(),
    ] {
        set_index(
            &dir,
            &format!(
                r#"{{"a":"{S1}","b":{}}}"#,
                serde_json::to_string(&bad).unwrap()
            ),
        );
        let e = Model::open_path(&dir).unwrap_err();
        assert!(
            matches!(&e, IoError::UnsafeShardName { file, .. } if *file == bad),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains(INDEX_FILE), "{e}");
    }
}

#[cfg(unix)]
#[test]
fn symlinked_shards_are_followed_but_must_be_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    sharded(&dir);
    // Hub-cache style: the shard is a link to a blob elsewhere.
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    std::fs::rename(dir.join(S2), blobs.join("abc123")).unwrap();
    std::os::unix::fs::symlink("../blobs/abc123", dir.join(S2)).unwrap();
    assert_eq!(
        Model::open_path(&dir).unwrap().read_f32_vec("b").unwrap(),
        vec![3.0, 4.0]
    );
    // A link to a directory, and a dangling link.
    std::fs::remove_file(dir.join(S2)).unwrap();
    std::os::unix::fs::symlink(&blobs, dir.join(S2)).unwrap();
    assert!(
        matches!(Model::open_path(&dir).unwrap_err(), IoError::ShardNotFile { file, .. } if file == S2)
    );
    std::fs::remove_file(dir.join(S2)).unwrap();
    std::os::unix::fs::symlink("../nowhere", dir.join(S2)).unwrap();
    assert!(matches!(
        Model::open_path(&dir).unwrap_err(),
        IoError::ShardNotFile { .. }
    ));
}

#[test]
fn missing_shard_and_disagreeing_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    sharded(&dir);
    set_index(
        &dir,
        &format!(r#"{{"a":"{S1}","b":"model-00003-of-00002.safetensors"}}"#),
    );
    let e = Model::open_path(&dir).unwrap_err();
    assert!(
        matches!(&e, IoError::MissingShard { file, .. } if file == "model-00003-of-00002.safetensors"),
        "{e}"
    );
    // Index lists a tensor the shard lacks.
    set_index(&dir, &format!(r#"{{"a":"{S1}","b":"{S2}","c":"{S2}"}}"#));
    let e = Model::open_path(&dir).unwrap_err();
    assert!(
        matches!(&e, IoError::IndexedTensorMissing { tensor, file, .. } if tensor == "c" && file == S2),
        "{e}"
    );
    // Shard holds a tensor the index does not list.
    set_index(&dir, &format!(r#"{{"a":"{S1}"}}"#));
    std::fs::copy(dir.join(S2), dir.join("extra.safetensors")).unwrap();
    set_index(&dir, &format!(r#"{{"a":"{S1}","x":"extra.safetensors"}}"#));
    let e = Model::open_path(&dir).unwrap_err();
    assert!(
        matches!(&e, IoError::UnindexedTensor { tensor, .. } if tensor == "b"),
        "{e}"
    );
    // Tensor listed under the wrong shard.
    set_index(&dir, &format!(r#"{{"a":"{S2}","b":"{S1}"}}"#));
    let e = Model::open_path(&dir).unwrap_err();
    assert!(matches!(e, IoError::UnindexedTensor { .. }), "{e}");
    // Index that is not JSON, or has a repeated tensor.
    std::fs::write(dir.join(INDEX_FILE), "{").unwrap();
    assert!(matches!(
        Model::open_path(&dir).unwrap_err(),
        IoError::IndexJson { .. }
    ));
    set_index(&dir, &format!(r#"{{"a":"{S1}","a":"{S2}"}}"#));
    assert!(
        matches!(Model::open_path(&dir).unwrap_err(), IoError::DuplicateEntry { tensor, .. } if tensor == "a")
    );
}

#[test]
fn same_tensor_in_two_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    sharded(&dir);
    // Shard 2 now also holds `a`.
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    std::fs::write(dir.join(S2), raw_file(header, &[0u8; 16])).unwrap();
    let e = Model::open_path(&dir).unwrap_err();
    match &e {
        IoError::TensorInTwoShards {
            tensor,
            first,
            second,
        } => {
            assert_eq!(tensor, "a");
            assert!(first.ends_with(S1) && second.ends_with(S2));
        }
        other => panic!("expected TensorInTwoShards, got {other}"),
    }
}

#[test]
fn pickle_checkpoints_are_refused_with_a_conversion_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("old");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"\x80\x02pickle").unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    for e in [
        Model::open(dir.to_str().unwrap()).unwrap_err(),
        Model::open_path(&dir.join("pytorch_model.bin")).unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(matches!(e, IoError::Pickle { .. }), "{msg}");
        assert!(
            msg.contains("pytorch_model.bin") && msg.contains("safe_serialization=True"),
            "{msg}"
        );
    }
    let p = write(tmp.path(), "w.pt", b"x");
    assert!(matches!(
        Model::open_path(&p).unwrap_err(),
        IoError::Pickle { .. }
    ));
    // Other cases: no weights, several unindexed files, unknown file kinds, nothing there.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(
        Model::open_path(&empty).unwrap_err(),
        IoError::NoWeights { .. }
    ));
    let p = write(tmp.path(), "notes.txt", b"x");
    assert!(matches!(
        Model::open_path(&p).unwrap_err(),
        IoError::UnsupportedFile { .. }
    ));
    let e = Model::open("./does/not/exist").unwrap_err();
    assert!(matches!(e, IoError::NotFound { .. }), "{e}");
    let two = tmp.path().join("two");
    sharded(&two);
    std::fs::remove_file(two.join(INDEX_FILE)).unwrap();
    assert!(matches!(
        Model::open_path(&two).unwrap_err(),
        IoError::AmbiguousWeights { .. }
    ));
}

mod mutated {
    use super::*;
    use proptest::prelude::*;
    use tensormerge_core::TensorSource;

    fn valid_file() -> Vec<u8> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        write_model(
            &dir,
            &[
                ("a", vec![2, 3], DType::BF16, vec![1.0; 6]),
                ("b", vec![3], DType::F32, vec![2.0; 3]),
                ("c", vec![1], DType::I64, vec![3.0]),
            ],
            WriterOptions::default(),
        );
        std::fs::read(dir.join("model.safetensors")).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Flipped bytes and truncation never panic: either a typed error
        /// naming the file, or a model whose every tensor reads back.
        #[test]
        fn corrupted_files_fail_cleanly(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
        ) {
            let mut bytes = valid_file();
            for (i, v) in &flips {
                let i = i.index(bytes.len());
                bytes[i] = *v;
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("fuzz.safetensors");
            std::fs::write(&p, &bytes).unwrap();
            match Model::open_path(&p) {
                Err(e) => prop_assert!(e.to_string().contains("fuzz.safetensors"), "{}", e),
                Ok(m) => {
                    for t in m.layout().tensors() {
                        let b = m.read_bytes(&t.name).unwrap();
                        prop_assert_eq!(b.len(), t.checked_byte_len().unwrap());
                        if t.dtype.is_float() {
                            m.read_f32_vec(&t.name).unwrap();
                        }
                    }
                }
            }
        }
    }
}

#[cfg(unix)]
#[test]
fn pipes_are_refused_without_opening_them() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("p.safetensors");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        // mkfifo is part of every POSIX system; without it there is no pipe to test.
        return;
    }
    let e = Model::open_path(&fifo).unwrap_err();
    assert!(matches!(e, IoError::NotRegularFile { .. }), "{e}");
}
