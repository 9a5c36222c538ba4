//! Hostile safetensors files and model directories, beyond plain malformed
//! input (`bad_input.rs`): header lengths at and past the limit, shapes and
//! offsets built to overflow, nesting bombs, NaN/Inf payloads, and links
//! that try to make a model out of a directory, a text file or a loop.
//! Each must be a typed error naming the file (and tensor), never a panic,
//! an abort or a huge allocation.

use std::path::{Path, PathBuf};

use tensormerge_io::{IoError, Model};

/// Limit on the header length, as in the safetensors crate.
const MAX_HEADER: u64 = 100_000_000;

fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opens `path`, expecting an error that names the file.
fn open_err(path: &Path) -> IoError {
    let e = Model::open_path(path).expect_err("hostile file accepted");
    let msg = e.to_string();
    let file = path.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(file), "error should name {file}: {msg}");
    e
}

fn one_tensor(dtype: &str, shape: &str, offsets: &str) -> String {
    format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#)
}

#[test]
fn header_length_at_the_limit_is_read_and_one_past_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Exactly the limit: a valid (whitespace-padded) header with one tensor.
    let json = one_tensor("F32", "[1]", "[0,4]");
    let mut header = json.into_bytes();
    header.resize(MAX_HEADER as usize, b' ');
    let mut bytes = MAX_HEADER.to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&2.5f32.to_le_bytes());
    let p = write(tmp.path(), "at_limit.safetensors", &bytes);
    let m = Model::open_path(&p).unwrap();
    assert_eq!(m.read_f32_vec("t").unwrap(), vec![2.5]);
    drop(m);

    // One past the limit, and absurd lengths: refused before any allocation
    // or read, whatever the file holds.
    for len in [MAX_HEADER + 1, u64::MAX / 2, u64::MAX] {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let p = write(tmp.path(), &format!("len{len}.safetensors"), &b);
        let e = open_err(&p);
        assert!(
            matches!(e, IoError::HeaderTooLarge { header_len, limit, .. } if header_len == len && limit == MAX_HEADER),
            "{e}"
        );
    }
    // Just under the file length, and exactly 8 bytes past it.
    let b = raw_file("{}", &[]);
    let mut long = b.clone();
    long[..8].copy_from_slice(&3u64.to_le_bytes());
    let p = write(tmp.path(), "plus1.safetensors", &long);
    assert!(matches!(
        open_err(&p),
        IoError::HeaderLengthExceedsFile {
            header_len: 3,
            available: 2,
            ..
        }
    ));
    // A zero-length header is not JSON.
    let p = write(tmp.path(), "zero.safetensors", &0u64.to_le_bytes());
    assert!(matches!(open_err(&p), IoError::HeaderJson { .. }));
}

#[test]
fn shapes_whose_size_overflows_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        // Product of dims overflows u64.
        ("[4294967296,4294967296,2]", "F32"),
        // Dims fit, bytes (× 8) overflow.
        ("[2305843009213693952,1]", "F64"),
        ("[18446744073709551615]", "U8"),
        ("[18446744073709551615,18446744073709551615]", "BOOL"),
    ];
    for (i, (shape, dtype)) in cases.iter().enumerate() {
        let p = write(
            tmp.path(),
            &format!("shape{i}.safetensors"),
            &raw_file(&one_tensor(dtype, shape, "[0,4]"), &[0; 4]),
        );
        let e = open_err(&p);
        assert!(
            matches!(&e, IoError::ShapeOverflow { tensor, .. } | IoError::SizeMismatch { tensor, .. } if tensor == "t"),
            "{shape}: {e}"
        );
        if i < 2 {
            assert!(matches!(e, IoError::ShapeOverflow { .. }), "{shape}: {e}");
        }
    }
    // A dim past u64, negative, fractional, or a string: malformed entry.
    for (i, shape) in ["[18446744073709551616]", "[-4]", "[1.5]", "[\"4\"]", "4"]
        .iter()
        .enumerate()
    {
        let p = write(
            tmp.path(),
            &format!("dim{i}.safetensors"),
            &raw_file(&one_tensor("U8", shape, "[0,4]"), &[0; 4]),
        );
        let e = open_err(&p);
        assert!(
            matches!(&e, IoError::HeaderEntry { tensor, .. } if tensor == "t"),
            "{shape}: {e}"
        );
    }
    // Zero in the shape makes a huge other dim harmless: a valid empty tensor.
    let p = write(
        tmp.path(),
        "empty.safetensors",
        &raw_file(&one_tensor("F32", "[0,9223372036854775807]", "[0,0]"), &[]),
    );
    let m = Model::open_path(&p).unwrap();
    assert_eq!(m.tensor_info("t").unwrap().numel(), 0);
    assert!(m.read_f32_vec("t").unwrap().is_empty());
}

#[test]
fn negative_and_overflowing_offsets_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // Malformed offsets: negative, past u64, too few, too many, floats.
    for (i, offsets) in [
        "[-4,0]",
        "[0,-4]",
        "[0,18446744073709551616]",
        "[4]",
        "[0,4,8]",
        "[0.0,4.0]",
        "null",
    ]
    .iter()
    .enumerate()
    {
        let p = write(
            tmp.path(),
            &format!("off{i}.safetensors"),
            &raw_file(&one_tensor("F32", "[1]", offsets), &[0; 4]),
        );
        let e = open_err(&p);
        assert!(
            matches!(&e, IoError::HeaderEntry { tensor, .. } if tensor == "t"),
            "{offsets}: {e}"
        );
    }
    // Well-formed numbers that point far past the file: begin + size would
    // overflow a naive `begin + len` check.
    let max = u64::MAX;
    for (i, (offsets, data)) in [
        (format!("[{},{max}]", max - 4), 4usize),
        (format!("[{},{}]", 1u64 << 63, (1u64 << 63) + 4), 4),
        ("[4,8]".to_string(), 4),
    ]
    .iter()
    .enumerate()
    {
        let p = write(
            tmp.path(),
            &format!("far{i}.safetensors"),
            &raw_file(&one_tensor("F32", "[1]", offsets), &vec![0; *data]),
        );
        let e = open_err(&p);
        assert!(
            matches!(&e, IoError::OutOfBounds { tensor, .. } if tensor == "t"),
            "{offsets}: {e}"
        );
    }
    // End before begin, with the wrap-around difference matching the size.
    let p = write(
        tmp.path(),
        "wrap.safetensors",
        &raw_file(&one_tensor("F32", "[1]", &format!("[4,{}]", 0)), &[0; 4]),
    );
    assert!(matches!(
        open_err(&p),
        IoError::InvalidOffsets {
            begin: 4,
            end: 0,
            ..
        }
    ));
}

#[test]
fn deeply_nested_header_and_index_json_are_refused_on_a_small_stack() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(move || {
            for depth in [200usize, 100_000] {
                let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                let header = format!(r#"{{"__metadata__":{{"x":{nested}}}}}"#);
                let p = write(
                    &dir,
                    &format!("deep{depth}.safetensors"),
                    &raw_file(&header, &[]),
                );
                let e = open_err(&p);
                assert!(
                    matches!(
                        e,
                        IoError::HeaderJson { .. } | IoError::MetadataNotString { .. }
                    ),
                    "{e}"
                );
                let m = dir.join(format!("m{depth}"));
                std::fs::create_dir(&m).unwrap();
                let index = format!(r#"{{"weight_map":{{"a":{nested}}}}}"#);
                std::fs::write(m.join("model.safetensors.index.json"), index).unwrap();
                let e = Model::open_path(&m).unwrap_err();
                assert!(matches!(e, IoError::IndexJson { .. }), "{e}");
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn many_tiny_tensors_and_long_names_are_handled() {
    // 20 000 zero-sized tensors with 1 KiB names: a 20 MB header, well
    // under the limit, opens in order without quadratic blow-up.
    let tmp = tempfile::tempdir().unwrap();
    let n = 20_000;
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{i:05}{}", "x".repeat(1019));
        entries.push(format!(
            r#""{name}":{{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}}"#
        ));
    }
    let header = format!("{{{}}}", entries.join(","));
    let p = write(tmp.path(), "many.safetensors", &raw_file(&header, &[]));
    let start = std::time::Instant::now();
    let m = Model::open_path(&p).unwrap();
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(m.layout().len(), n);
    assert!(m.layout().tensors()[0].name.starts_with("00000"));
    assert!(m.layout().tensors()[n - 1].name.starts_with("19999"));
}

#[test]
fn nan_and_inf_weights_are_read_bit_for_bit() {
    // The reader never alters values: refusing or allowing non-finite
    // weights is the merge engine's policy, and it needs the exact values
    // (and tensor names) to report them.
    let tmp = tempfile::tempdir().unwrap();
    let values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1.0];
    let mut data = Vec::new();
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let bf16: [u16; 3] = [0x7fc0, 0x7f80, 0xff80]; // NaN, +Inf, -Inf
    for v in bf16 {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let header = r#"{"f":{"dtype":"F32","shape":[5],"data_offsets":[0,20]},"h":{"dtype":"BF16","shape":[3],"data_offsets":[20,26]}}"#;
    let p = write(
        tmp.path(),
        "nonfinite.safetensors",
        &raw_file(header, &data),
    );
    let m = Model::open_path(&p).unwrap();
    let f = m.read_f32_vec("f").unwrap();
    for (got, want) in f.iter().zip(values) {
        assert_eq!(got.to_bits(), want.to_bits());
    }
    let h = m.read_f32_vec("h").unwrap();
    assert!(h[0].is_nan());
    assert_eq!(h[1], f32::INFINITY);
    assert_eq!(h[2], f32::NEG_INFINITY);
}

#[cfg(unix)]
#[test]
fn single_file_links_must_resolve_to_valid_safetensors_files() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let good = raw_file(&one_tensor("F32", "[1]", "[0,4]"), &7.0f32.to_le_bytes());
    // Hub-cache style: model.safetensors links to a blob outside the directory.
    let blobs = tmp.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    write(&blobs, "deadbeef", &good);
    let snap = tmp.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    symlink("../blobs/deadbeef", snap.join("model.safetensors")).unwrap();
    assert_eq!(
        Model::open_path(&snap).unwrap().read_f32_vec("t").unwrap(),
        vec![7.0]
    );
    // A link given directly (not through a directory) works too.
    assert_eq!(
        Model::open_path(&snap.join("model.safetensors"))
            .unwrap()
            .read_f32_vec("t")
            .unwrap(),
        vec![7.0]
    );

    // A link to a directory: never opened as weights.
    let d = tmp.path().join("to_dir");
    std::fs::create_dir(&d).unwrap();
    symlink(&blobs, d.join("model.safetensors")).unwrap();
    let e = Model::open_path(&d).unwrap_err();
    assert!(e.to_string().contains("to_dir"), "{e}");
    let e = Model::open_path(&d.join("model.safetensors")).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    // A link to a file that is not safetensors: refused by validation.
    let t = tmp.path().join("to_text");
    std::fs::create_dir(&t).unwrap();
    write(tmp.path(), "passwd", b"root:x:0:0:root:/root:/bin/bash\n");
    symlink("../passwd", t.join("model.safetensors")).unwrap();
    let e = Model::open_path(&t).unwrap_err();
    assert!(
        matches!(
            e,
            IoError::HeaderTooLarge { .. }
                | IoError::HeaderLengthExceedsFile { .. }
                | IoError::HeaderJson { .. }
        ),
        "{e}"
    );

    // A link loop and a dangling link: errors, not hangs.
    let l = tmp.path().join("loop");
    std::fs::create_dir(&l).unwrap();
    symlink("model.safetensors", l.join("model.safetensors")).unwrap();
    let e = Model::open_path(&l).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    let e = Model::open_path(&l.join("model.safetensors")).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    let g = tmp.path().join("dangling");
    std::fs::create_dir(&g).unwrap();
    symlink("../nowhere.safetensors", g.join("model.safetensors")).unwrap();
    let e = Model::open_path(&g).unwrap_err();
    assert!(e.to_string().contains("dangling"), "{e}");
}

#[cfg(unix)]
#[test]
fn index_through_a_link_loop_or_fifo_is_refused_without_blocking() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    symlink("a.safetensors", dir.join("b.safetensors")).unwrap();
    symlink("b.safetensors", dir.join("a.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"t":"a.safetensors"}}"#,
    )
    .unwrap();
    let e = Model::open_path(&dir).unwrap_err();
    assert!(e.to_string().contains("a.safetensors"), "{e}");

    // A named pipe as a shard would block a reader forever: it is not a
    // regular file, so it is refused before it is opened.
    let fifo = dir.join("p.safetensors");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"t":"p.safetensors"}}"#,
    )
    .unwrap();
    let e = Model::open_path(&dir).unwrap_err();
    assert!(
        matches!(&e, IoError::ShardNotFile { file, .. } if file == "p.safetensors"),
        "{e}"
    );
    // Given directly, a pipe is refused as well: opening it for reading
    // would block until a writer appears. Run on a thread with a deadline;
    // on a hang, open the write end so the thread (and the test) can end.
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    std::thread::spawn(move || {
        tx.send(Model::open_path(&f).map(|_| ()).map_err(|e| e.to_string()))
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(r) => {
            let e = r.expect_err("a pipe opened as a model");
            assert!(
                e.contains("p.safetensors") && e.contains("regular file"),
                "{e}"
            );
        }
        Err(_) => {
            let _unblock = std::fs::OpenOptions::new().write(true).open(&fifo);
            panic!("opening a named pipe blocked for 10 s");
        }
    }
}
