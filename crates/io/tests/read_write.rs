//! Round trips through real files: our writer, our reader, and the
//! `safetensors` crate as an independent reader and writer.

mod common;

use std::collections::HashMap;

use common::{raw_file, write_model};
use tensormerge_core::{DType, ModelTensorMapper, TensorInfo, TensorSource, convert};
use tensormerge_io::{INDEX_FILE, IoError, MapperExt, Model, ModelWriter, WriterOptions};

fn small_model() -> Vec<(&'static str, Vec<usize>, DType, Vec<f32>)> {
    vec![
        (
            "z.embed",
            vec![3, 2],
            DType::BF16,
            vec![1.0, -2.0, 0.5, 0.25, 8.0, -0.125],
        ),
        ("a.bias", vec![3], DType::F32, vec![0.1, 0.2, 0.3]),
        ("m.ids", vec![4], DType::I64, vec![0.0, 1.0, 2.0, 3.0]),
        ("b.half", vec![2], DType::F16, vec![1.5, -3.0]),
        ("c.double", vec![1], DType::F64, vec![std::f32::consts::PI]),
    ]
}

#[test]
fn single_file_is_read_by_the_safetensors_crate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_model(&dir, &small_model(), WriterOptions::default());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["model.safetensors"]);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    assert_eq!(st.len(), 5);
    for (name, shape, dtype, values) in small_model() {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype().to_string(), dtype.as_str(), "{name}");
        let expected = if dtype.is_float() {
            convert::encode_f32_vec(dtype, &values).unwrap()
        } else {
            common::int_bytes(dtype, &values)
        };
        assert_eq!(t.data(), expected.as_slice(), "{name}");
    }
    // Header padded to 8 bytes: the data section is aligned.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(n % 8, 0);
}

#[test]
fn reads_files_written_by_the_safetensors_crate_in_offset_order() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.safetensors");
    let a: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b: Vec<u8> = convert::encode_f32_vec(DType::BF16, &[0.5, 0.75]).unwrap();
    let c: Vec<u8> = 7i32.to_le_bytes().to_vec();
    let views = vec![
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![2], &b).unwrap(),
        ),
        (
            "a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, 1], &a).unwrap(),
        ),
        (
            "c",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![], &c).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    // Our layout follows the file's data offsets, whatever the crate chose.
    let expected_order = meta.offset_keys();
    let m = Model::open(path.to_str().unwrap()).unwrap();
    let order: Vec<_> = m
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(order, expected_order);
    assert_eq!(m.read_f32_vec("a").unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(m.read_f32_vec("b").unwrap(), vec![0.5, 0.75]);
    assert_eq!(m.tensor_info("c").unwrap().shape, Vec::<usize>::new());
    assert_eq!(m.tensor_bytes("c").unwrap().as_ref(), &c[..]);
    assert_eq!(m.dir(), tmp.path());
}

#[test]
fn layout_is_in_offset_order_not_name_or_hash_order() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("o.safetensors");
    // Header keys in one order, offsets in another.
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"c":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let data: Vec<u8> = [10f32, 20.0, 30.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&path, raw_file(header, &data)).unwrap();
    let m = Model::open_path(&path).unwrap();
    let order: Vec<_> = m
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(order, ["c", "b", "a"]);
    let v = ModelTensorMapper::for_model(&m).to_vector(&m).unwrap();
    assert_eq!(v.values().unwrap(), &[10.0, 20.0, 30.0]);
}

#[test]
fn misaligned_data_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mis.safetensors");
    // A 61-byte header leaves the data section at file offset 69: misaligned for f32/f64.
    let mut header = r#"{"x":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},"y":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#.to_string();
    while (8 + header.len()) % 8 != 1 {
        header.push(' ');
    }
    let mut data = Vec::new();
    data.extend_from_slice(&1.25f64.to_le_bytes());
    data.extend_from_slice(&(-2.5f64).to_le_bytes());
    data.extend_from_slice(&7.5f32.to_le_bytes());
    std::fs::write(&path, raw_file(&header, &data)).unwrap();
    let m = Model::open_path(&path).unwrap();
    assert_eq!(m.read_f32_vec("x").unwrap(), vec![1.25, -2.5]);
    // F32 at an odd address: decoded into a copy rather than borrowed.
    let y = m.tensor_f32("y").unwrap();
    assert!(matches!(y, std::borrow::Cow::Owned(_)));
    assert_eq!(&*y, &[7.5]);
    let mut one = [0f32];
    m.read_f32_range("x", 1..2, &mut one).unwrap();
    assert_eq!(one, [-2.5]);
    assert_eq!(m.read_f32_vec("y").unwrap(), vec![7.5]);
}

#[test]
fn read_f32_range_checks_bounds_and_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_model(&dir, &small_model(), WriterOptions::default());
    let m = Model::open(dir.to_str().unwrap()).unwrap();
    // Our writer aligns the data section: F32 is borrowed from the map.
    let bias = m.tensor_f32("a.bias").unwrap();
    assert!(matches!(bias, std::borrow::Cow::Borrowed(_)));
    assert_eq!(&*bias, &[0.1, 0.2, 0.3]);
    assert_eq!(&*m.tensor_f32("b.half").unwrap(), &[1.5, -3.0]);
    assert!(m.tensor_f32("m.ids").is_err());
    let mut out = [0f32; 2];
    m.read_f32_range("z.embed", 2..4, &mut out).unwrap();
    assert_eq!(out, [0.5, 0.25]);
    let e = m.read_f32_range("z.embed", 5..7, &mut out).unwrap_err();
    assert!(
        matches!(&e, IoError::BadRange { tensor, .. } if tensor == "z.embed"),
        "{e}"
    );
    let e = m.read_f32_range("z.embed", 0..3, &mut out).unwrap_err();
    assert!(matches!(e, IoError::BadRange { .. }));
    let e = m.read_f32_range("m.ids", 0..2, &mut out).unwrap_err();
    assert!(matches!(&e, IoError::NotFloat { tensor, dtype: DType::I64, .. } if tensor == "m.ids"));
    let e = m.read_f32_range("nope", 0..2, &mut out).unwrap_err();
    assert!(e.to_string().contains("`nope`"), "{e}");
    // The TensorSource view reports core errors.
    let mut buf = vec![0f32; 4];
    assert!(m.read_f32("m.ids", &mut buf).is_err());
    assert_eq!(
        m.read_bytes("m.ids").unwrap(),
        common::int_bytes(DType::I64, &[0.0, 1.0, 2.0, 3.0])
    );
}

#[test]
fn sharded_output_has_an_index_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    // Sizes: 12, 12, 32, 4, 8 bytes; limit 24 gives [12+12], [32 alone], [4+8].
    let tensors = vec![
        ("t0", vec![3], DType::F32, vec![1.0, 2.0, 3.0]),
        (
            "t1",
            vec![6],
            DType::BF16,
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        ),
        ("t2", vec![4], DType::F64, vec![1.0, 2.0, 3.0, 4.0]),
        ("t3", vec![1], DType::F32, vec![9.0]),
        ("t4", vec![1], DType::I64, vec![5.0]),
    ];
    write_model(
        &dir,
        &tensors,
        WriterOptions {
            max_shard_bytes: 24,
            ..Default::default()
        },
    );
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            INDEX_FILE
        ]
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 12 + 12 + 32 + 4 + 8);
    assert_eq!(
        index["weight_map"]["t1"],
        "model-00001-of-00003.safetensors"
    );
    assert_eq!(
        index["weight_map"]["t2"],
        "model-00002-of-00003.safetensors"
    );
    assert_eq!(
        index["weight_map"]["t4"],
        "model-00003-of-00003.safetensors"
    );
    // Each shard is a valid safetensors file on its own.
    let mut seen = HashMap::new();
    for f in &files[..3] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for n in st.names() {
            seen.insert(n.to_string(), f.clone());
        }
    }
    assert_eq!(seen.len(), 5);
    let m = Model::open(dir.to_str().unwrap()).unwrap();
    let order: Vec<_> = m
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(order, ["t0", "t1", "t2", "t3", "t4"]);
    assert_eq!(m.files().len(), 3);
    assert_eq!(m.read_f32_vec("t2").unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // Opening the index file directly works too.
    let m2 = Model::open_path(&dir.join(INDEX_FILE)).unwrap();
    assert_eq!(m2.layout(), m.layout());
}

#[test]
fn writer_rejects_wrong_order_and_byte_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let infos = vec![
        TensorInfo::new("a", vec![2], DType::F32),
        TensorInfo::new("b", vec![1], DType::F32),
    ];
    let mut w = ModelWriter::create(&out, infos.clone(), WriterOptions::default()).unwrap();
    let tmpdir = w.temp_dir().to_path_buf();
    assert!(tmpdir.is_dir());
    let e = w.write("b", &[0; 4]).unwrap_err();
    assert!(
        matches!(&e, IoError::WriteOrder { expected, got, .. } if expected == "a" && got == "b"),
        "{e}"
    );
    w.write("a", &[0; 4]).unwrap();
    let e = w.write("b", &[0; 4]).unwrap_err();
    assert!(e.to_string().contains("4 of 8 bytes"), "{e}");
    let e = w.write("a", &[0; 5]).unwrap_err();
    assert!(matches!(
        e,
        IoError::TooManyBytes {
            expected: 8,
            written: 9,
            ..
        }
    ));
    let e = w.write("zz", &[0; 4]).unwrap_err();
    assert!(
        matches!(
            &e,
            IoError::WriteOrder { .. } | IoError::UndeclaredTensor { .. }
        ),
        "{e}"
    );
    w.write("a", &[0; 4]).unwrap();
    let e = w.write("zz", &[0; 4]).unwrap_err();
    assert!(
        matches!(&e, IoError::UndeclaredTensor { tensor, .. } if tensor == "zz"),
        "{e}"
    );
    w.write("b", &[0; 2]).unwrap();
    let e = w.write("a", &[0; 1]).unwrap_err();
    assert!(
        matches!(&e, IoError::WriteOrder { expected, .. } if expected == "b"),
        "{e}"
    );
    // finish with `b` incomplete: an error, and no output directory.
    let e = w.finish().unwrap_err();
    assert!(
        matches!(&e, IoError::Incomplete { tensor, expected: 4, written: 2, .. } if tensor == "b"),
        "{e}"
    );
    assert!(!out.exists());
    assert!(!tmpdir.exists(), "temporary directory removed on drop");
    // A tensor written again after it was complete.
    let mut w = ModelWriter::create(&out, infos.clone(), WriterOptions::default()).unwrap();
    w.write("a", &[0; 8]).unwrap();
    w.write("b", &[0; 4]).unwrap();
    let e = w.write("a", &[0; 1]).unwrap_err();
    assert!(e.to_string().contains("already written"), "{e}");
    let e = w.write("b", &[0; 1]).unwrap_err();
    assert!(matches!(e, IoError::TooManyBytes { .. }), "{e}");
    drop(w);
    // Duplicate declarations are refused.
    let e = ModelWriter::create(
        &out,
        vec![infos[0].clone(), infos[0].clone()],
        WriterOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, IoError::BadDeclaration { .. }));
}

#[test]
fn zero_sized_and_empty_models() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("z");
    let infos = vec![
        TensorInfo::new("e0", vec![0], DType::F32),
        TensorInfo::new("a", vec![1], DType::F32),
        TensorInfo::new("e1", vec![2, 0], DType::BF16),
    ];
    let mut w = ModelWriter::create(
        &out,
        infos,
        WriterOptions {
            max_shard_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    w.write("a", &1f32.to_le_bytes()).unwrap();
    w.finish().unwrap();
    let m = Model::open_path(&out).unwrap();
    assert_eq!(m.layout().len(), 3);
    assert_eq!(m.read_f32_vec("a").unwrap(), vec![1.0]);
    assert_eq!(m.read_f32_vec("e1").unwrap(), Vec::<f32>::new());

    let empty = tmp.path().join("empty");
    ModelWriter::create(&empty, vec![], WriterOptions::default())
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(Model::open_path(&empty).unwrap().layout().len(), 0);
}

#[test]
fn existing_output_and_protected_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    write_model(&base, &small_model(), WriterOptions::default());
    let infos = vec![TensorInfo::new("a", vec![1], DType::F32)];

    // Existing output without overwrite.
    let e = ModelWriter::create(&base, infos.clone(), WriterOptions::default()).unwrap_err();
    assert!(matches!(e, IoError::OutputExists { .. }));
    // Inside, equal to, or containing a protected input, even with overwrite.
    for out in [base.join("merged"), base.clone(), tmp.path().to_path_buf()] {
        let opts = WriterOptions {
            overwrite: true,
            protected: vec![base.clone()],
            ..Default::default()
        };
        let e = ModelWriter::create(&out, infos.clone(), opts).unwrap_err();
        assert!(
            matches!(e, IoError::OutputIsInput { .. }),
            "{}: {e}",
            out.display()
        );
    }
    // A relative spelling of the same directory is caught too.
    for sneaky in [
        "base/../base/sub",
        "new/../base/sub",
        "new/deeper/../../base",
    ] {
        let e = ModelWriter::create(
            &tmp.path().join(sneaky),
            infos.clone(),
            WriterOptions {
                protected: vec![base.clone()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, IoError::OutputIsInput { .. }), "{sneaky}: {e}");
    }
    #[cfg(unix)]
    {
        // Through a symbolic link to the input.
        std::os::unix::fs::symlink(&base, tmp.path().join("alias")).unwrap();
        let e = ModelWriter::create(
            &tmp.path().join("alias/sub"),
            infos.clone(),
            WriterOptions {
                protected: vec![base.clone()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, IoError::OutputIsInput { .. }), "{e}");
    }

    // Overwrite replaces the old directory only at finish.
    let out = tmp.path().join("out");
    write_model(&out, &small_model(), WriterOptions::default());
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    let mut w = ModelWriter::create(
        &out,
        infos.clone(),
        WriterOptions {
            overwrite: true,
            ..Default::default()
        },
    )
    .unwrap();
    w.write("a", &2f32.to_le_bytes()).unwrap();
    assert!(
        out.join("stale.txt").exists(),
        "old output kept until finish"
    );
    w.finish().unwrap();
    assert!(!out.join("stale.txt").exists());
    assert_eq!(
        Model::open_path(&out).unwrap().read_f32_vec("a").unwrap(),
        vec![2.0]
    );
    // Dropping an overwriting writer leaves the old output intact.
    let w = ModelWriter::create(
        &out,
        infos,
        WriterOptions {
            overwrite: true,
            ..Default::default()
        },
    )
    .unwrap();
    drop(w);
    assert_eq!(
        Model::open_path(&out).unwrap().read_f32_vec("a").unwrap(),
        vec![2.0]
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("tensormerge"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn support_files_are_copied_and_weights_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    write_model(&base, &small_model(), WriterOptions::default());
    std::fs::write(
        base.join("config.json"),
        r#"{"architectures": ["X"], "torch_dtype": "float32", "hidden_size": 2}"#,
    )
    .unwrap();
    std::fs::write(base.join("tokenizer.json"), "{\"tok\": 1}").unwrap();
    std::fs::write(base.join("generation_config.json"), "{}").unwrap();
    std::fs::write(base.join("pytorch_model.bin"), "pickle").unwrap();
    std::fs::write(base.join("notes.md"), "n").unwrap();

    let model = Model::open(base.to_str().unwrap()).unwrap();
    let (mapper, _) = ModelTensorMapper::open(base.to_str().unwrap()).unwrap();
    let v = mapper.load(base.to_str().unwrap()).unwrap();
    let out = tmp.path().join("out");
    mapper
        .save(&(&v * 2.0), &out, &model, WriterOptions::default())
        .unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    // Most parameters are BF16 (6 of 12).
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["hidden_size"], 2);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"tok\": 1}"
    );

    let saved = Model::open_path(&out).unwrap();
    assert_eq!(
        saved.layout(),
        model.layout(),
        "names, shapes, dtypes and order kept"
    );
    for t in model.layout().tensors() {
        if t.dtype.is_float() {
            let a = model.read_f32_vec(&t.name).unwrap();
            let b = saved.read_f32_vec(&t.name).unwrap();
            let mut expect: Vec<f32> = a.iter().map(|x| x * 2.0).collect();
            convert::round_to(t.dtype, &mut expect);
            assert_eq!(b, expect, "{}", t.name);
        } else {
            assert_eq!(
                saved.tensor_bytes(&t.name).unwrap(),
                model.tensor_bytes(&t.name).unwrap()
            );
        }
    }
    // Saving into the template's directory is refused.
    let e = mapper
        .save(&v, &base.join("inside"), &model, WriterOptions::default())
        .unwrap_err();
    assert!(matches!(e, IoError::OutputIsInput { .. }), "{e}");
}

#[test]
fn models_with_different_layouts_do_not_map() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    write_model(
        &a,
        &[
            ("w", vec![2, 2], DType::F32, vec![0.0; 4]),
            ("v", vec![1], DType::F32, vec![0.0]),
        ],
        WriterOptions::default(),
    );
    write_model(
        &b,
        &[
            ("w", vec![4], DType::F32, vec![0.0; 4]),
            ("v", vec![1], DType::F32, vec![0.0]),
        ],
        WriterOptions::default(),
    );
    let (mapper, _) = ModelTensorMapper::open(a.to_str().unwrap()).unwrap();
    let e = mapper.load(b.to_str().unwrap()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("`w`") && msg.contains("[2, 2]") && msg.contains("[4]"),
        "{msg}"
    );
    let mb = Model::open_path(&b).unwrap();
    let e = mapper.to_vector(&mb).unwrap_err();
    assert!(
        matches!(&e, tensormerge_core::CoreError::LayoutMismatch { tensor, .. } if tensor == "w")
    );

    let c = tmp.path().join("c");
    write_model(
        &c,
        &[
            ("w", vec![2, 2], DType::F32, vec![0.0; 4]),
            ("u", vec![1], DType::F32, vec![0.0]),
        ],
        WriterOptions::default(),
    );
    let e = mapper.load(c.to_str().unwrap()).unwrap_err();
    assert!(e.to_string().contains("`v`"), "{e}");
}

#[test]
fn models_are_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    assert_send_sync::<IoError>();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tensors: Vec<_> = (0..8)
        .map(|i| (format!("t{i}"), vec![i as f32; 16]))
        .collect();
    let specs: Vec<_> = tensors
        .iter()
        .map(|(n, v)| (n.as_str(), vec![16], DType::F16, v.clone()))
        .collect();
    write_model(
        &dir,
        &specs,
        WriterOptions {
            max_shard_bytes: 64,
            ..Default::default()
        },
    );
    let m = Model::open_path(&dir).unwrap();
    std::thread::scope(|s| {
        for (n, v) in &tensors {
            let m = &m;
            s.spawn(move || assert_eq!(&m.read_f32_vec(n).unwrap(), v));
        }
    });
}

#[test]
fn unusual_tensor_names_survive_a_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("names");
    let names = [
        "quote\"d",
        "back\\slash",
        "ünïcödé/名前",
        "new\nline",
        "__metadata__x",
    ];
    let specs: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, vec![1], DType::F32, vec![i as f32]))
        .collect();
    write_model(
        &dir,
        &specs,
        WriterOptions {
            max_shard_bytes: 8,
            ..Default::default()
        },
    );
    let m = Model::open_path(&dir).unwrap();
    let order: Vec<_> = m
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(order, names);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(m.read_f32_vec(n).unwrap(), vec![i as f32]);
    }
    // The safetensors crate reads the same names from the shards.
    let mut seen = Vec::new();
    for f in m.files() {
        let bytes = std::fs::read(f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        seen.extend(st.names().into_iter().map(str::to_string));
    }
    seen.sort();
    let mut expected: Vec<_> = names.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(seen, expected);
}

#[test]
fn config_dtype_keys_are_both_updated() {
    let tmp = tempfile::tempdir().unwrap();
    let tpl = tmp.path().join("tpl");
    std::fs::create_dir(&tpl).unwrap();
    std::fs::write(
        tpl.join("config.json"),
        r#"{"dtype": "float32", "torch_dtype": "float32", "n": 1}"#,
    )
    .unwrap();
    std::fs::write(tpl.join("vocab.txt"), "a\nb\n").unwrap();
    std::fs::write(tpl.join("model.safetensors"), "never copied").unwrap();
    let out = tmp.path().join("out");
    let mut w = ModelWriter::create(&out, vec![], WriterOptions::default()).unwrap();
    let copied = w.copy_support_files(&tpl, Some(DType::F16)).unwrap();
    assert_eq!(copied, ["config.json", "vocab.txt"]);
    w.finish().unwrap();
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (
            c["dtype"].as_str(),
            c["torch_dtype"].as_str(),
            c["n"].as_i64()
        ),
        (Some("float16"), Some("float16"), Some(1))
    );
    // Without a dtype, config.json is copied byte for byte; invalid JSON is a typed error.
    let out2 = tmp.path().join("out2");
    let mut w = ModelWriter::create(&out2, vec![], WriterOptions::default()).unwrap();
    w.copy_support_files(&tpl, None).unwrap();
    w.finish().unwrap();
    assert_eq!(
        std::fs::read(out2.join("config.json")).unwrap(),
        std::fs::read(tpl.join("config.json")).unwrap()
    );
    std::fs::write(tpl.join("config.json"), "{oops").unwrap();
    let mut w =
        ModelWriter::create(&tmp.path().join("out3"), vec![], WriterOptions::default()).unwrap();
    let e = w.copy_support_files(&tpl, Some(DType::BF16)).unwrap_err();
    assert!(
        matches!(&e, IoError::SupportFileJson { path, .. } if path.ends_with("config.json")),
        "{e}"
    );
}

/// Tensors written ahead of their turn ([`ModelWriter::write_ahead`]), in
/// pieces, in a scrambled order, across shard files: the files are byte for
/// byte those written in order; tensors of a later shard are refused; too
/// many bytes ahead is an error, and so is finishing with a tensor only partly
/// written ahead.
#[test]
fn writing_ahead_gives_the_bytes_of_writing_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    // Sizes 12, 8, 16, 4, 20 bytes; a 24-byte limit gives [t0 t1] [t2 t3] [t4].
    let sizes = [3usize, 2, 4, 1, 5];
    let infos: Vec<TensorInfo> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorInfo::new(format!("t{i}"), vec![n], DType::F32))
        .collect();
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .flat_map(|j| ((i * 10 + j) as f32 + 0.5).to_le_bytes())
                .collect()
        })
        .collect();
    let opts = || WriterOptions {
        max_shard_bytes: 24,
        ..Default::default()
    };
    let in_order = tmp.path().join("in-order");
    let mut w = ModelWriter::create(&in_order, infos.clone(), opts()).unwrap();
    for (t, d) in infos.iter().zip(&data) {
        w.write(&t.name, d).unwrap();
    }
    w.finish().unwrap();

    let ahead = tmp.path().join("ahead");
    let mut w = ModelWriter::create(&ahead, infos.clone(), opts()).unwrap();
    assert_eq!(
        (0..5).map(|t| w.shard_of_tensor(t)).collect::<Vec<_>>(),
        [0, 0, 1, 1, 2]
    );
    // t1 in full before t0; t2 is in the next shard: not yet.
    assert!(w.can_write_ahead(1) && !w.can_write_ahead(2));
    w.write_ahead(1, &data[1][..4]).unwrap();
    w.write_ahead(1, &data[1][4..]).unwrap();
    let e = w.write_ahead(1, &[0; 1]).unwrap_err();
    assert!(matches!(e, IoError::TooManyBytes { .. }), "{e}");
    // (a new writer for the next case)
    drop(w);
    let mut w = ModelWriter::create(&ahead, infos.clone(), opts()).unwrap();
    let e = w.write_ahead(2, &data[2]).unwrap_err();
    assert!(matches!(e, IoError::WriteOrder { .. }), "{e}");
    drop(w);
    let mut w = ModelWriter::create(&ahead, infos.clone(), opts()).unwrap();
    w.write_ahead(1, &data[1]).unwrap();
    w.write("t0", &data[0][..8]).unwrap();
    w.write("t0", &data[0][8..]).unwrap();
    // t0 and t1 complete: settled, the second shard's tensors may go ahead;
    // half of t3, then t2 in order, then the rest of t3 in order after it.
    w.settle().unwrap();
    assert!(w.can_write_ahead(3) && !w.can_write_ahead(4));
    w.write_ahead(3, &data[3][..0]).unwrap();
    w.write_ahead(3, &data[3][..2]).unwrap();
    w.write("t2", &data[2]).unwrap();
    w.write("t3", &data[3][2..]).unwrap();
    // The tensor whose turn it is, "ahead": in order.
    w.write_ahead(4, &data[4][..8]).unwrap();
    w.write("t4", &data[4][8..]).unwrap();
    w.finish().unwrap();
    for f in [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        INDEX_FILE,
    ] {
        assert_eq!(
            std::fs::read(in_order.join(f)).unwrap(),
            std::fs::read(ahead.join(f)).unwrap(),
            "{f}"
        );
    }

    // Finishing with a tensor only partly written ahead: incomplete.
    let partial = tmp.path().join("partial");
    let mut w = ModelWriter::create(&partial, infos.clone(), WriterOptions::default()).unwrap();
    w.write_ahead(2, &data[2][..4]).unwrap();
    w.write("t0", &data[0]).unwrap();
    w.write("t1", &data[1]).unwrap();
    let e = w.finish().unwrap_err();
    assert!(
        matches!(&e, IoError::Incomplete { tensor, expected: 16, written: 4, .. } if tensor == "t2"),
        "{e}"
    );
    assert!(!partial.exists());
}

/// Files of many write-back intervals (the writer has each shard file's
/// data synced in the background every 8 MiB written, in order or ahead): a 40 MiB model
/// written in uneven pieces, the second tensor partly ahead of the first,
/// reads back value for value, and the file is byte for byte the one
/// written in one piece per tensor.
#[test]
fn write_back_hints_leave_the_bytes_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let n = [6 << 20, 4 << 20]; // elements: 24 MiB and 16 MiB of f32
    let infos: Vec<TensorInfo> = n
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorInfo::new(format!("t{i}"), vec![n], DType::F32))
        .collect();
    let data: Vec<Vec<u8>> = n
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .flat_map(|j| ((j % 100_003) as f32 * 0.25 - i as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let whole = tmp.path().join("whole");
    let mut w = ModelWriter::create(&whole, infos.clone(), WriterOptions::default()).unwrap();
    for (t, d) in infos.iter().zip(&data) {
        w.write(&t.name, d).unwrap();
    }
    w.finish().unwrap();

    let pieces = tmp.path().join("pieces");
    let mut w = ModelWriter::create(&pieces, infos.clone(), WriterOptions::default()).unwrap();
    let piece = 3_000_017; // bytes, not a multiple of anything used
    let ahead = 10 << 20;
    for p in data[1][..ahead].chunks(piece) {
        w.write_ahead(1, p).unwrap();
    }
    for p in data[0].chunks(piece) {
        w.write("t0", p).unwrap();
    }
    for p in data[1][ahead..].chunks(piece) {
        w.write("t1", p).unwrap();
    }
    w.finish().unwrap();
    let file = "model.safetensors";
    assert!(
        std::fs::read(whole.join(file)).unwrap() == std::fs::read(pieces.join(file)).unwrap(),
        "written in pieces, the file differs"
    );
    let m = Model::open_path(&pieces).unwrap();
    for (i, t) in infos.iter().enumerate() {
        let v = m.read_f32_vec(&t.name).unwrap();
        assert_eq!(v.len(), n[i]);
        for j in [0, 1, n[i] / 2, n[i] - 1] {
            assert_eq!(v[j], (j % 100_003) as f32 * 0.25 - i as f32, "t{i}[{j}]");
        }
    }
}
