//! Streaming evaluation (`run_eval`) on real safetensors files written by the
//! test (BF16 and F32, sharded and single-file), reloaded and compared with
//! the in-memory `ParamVector` path and with plain loops.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tensormerge_core::{DType, ModelTensorMapper, ParamVector, convert};
use tensormerge_engine::expr::{EvalOptions, eval_vectors, parse, run_eval};
use tensormerge_engine::{EngineError, NoProgress, Progress};
use tensormerge_io::{IoError, Model};

/// One tensor to write: name, dtype, shape, little-endian bytes.
type Entry = (String, DType, Vec<usize>, Vec<u8>);

/// Writes a safetensors file by hand (8-byte header length, JSON header,
/// data), independently of the io crate's writer.
fn write_safetensors(path: &Path, tensors: &[Entry]) {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            dtype.as_str(),
            dims.join(","),
            offset + bytes.len()
        ));
        offset += bytes.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    for (_, _, _, bytes) in tensors {
        file.extend_from_slice(bytes);
    }
    std::fs::write(path, file).unwrap();
}

/// A sharded model directory: `model-0000i-of-0000n.safetensors` + index.
fn write_sharded(dir: &Path, shards: &[Vec<Entry>]) {
    std::fs::create_dir_all(dir).unwrap();
    let n = shards.len();
    let mut map = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_safetensors(&dir.join(&file), shard);
        for (name, ..) in shard {
            map.push(format!("\"{name}\":\"{file}\""));
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        format!(
            "{{\"metadata\":{{\"total_size\":0}},\"weight_map\":{{{}}}}}",
            map.join(",")
        ),
    )
    .unwrap();
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mant = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let exp = ((s >> 8) % 16) as i32 - 8;
            mant * 2f32.powi(exp)
        })
        .collect()
}

/// The test architecture; `big` is larger than the smallest chunk, so it is
/// evaluated in several chunks.
const SHAPES: &[(&str, &[usize])] = &[
    ("emb.weight", &[50, 8]),
    ("h.0.w", &[8, 8]),
    ("h.0.b", &[8]),
    ("big", &[3000, 7]),
];

fn entries(seed: u64, dtype: DType, shapes: &[(&str, &[usize])]) -> Vec<Entry> {
    let mut out: Vec<Entry> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let v = values(seed * 100 + i as u64, n);
            (
                name.to_string(),
                dtype,
                shape.to_vec(),
                convert::encode_f32_vec(dtype, &v).unwrap(),
            )
        })
        .collect();
    let ids: Vec<u8> = (0i64..6).flat_map(|i| i.to_le_bytes()).collect();
    out.insert(1, ("position_ids".into(), DType::I64, vec![1, 6], ids));
    out
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    models: Vec<(String, String)>,
}

/// base: BF16, two shards + index, with config and tokenizer files.
/// legal: F32, one file, tensors in another order.
/// recipe: BF16, referenced as a `.safetensors` file path.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let base = entries(1, DType::BF16, SHAPES);
    let (a, b) = base.split_at(2);
    write_sharded(&root.join("base"), &[a.to_vec(), b.to_vec()]);
    std::fs::write(
        root.join("base/config.json"),
        "{\"model_type\": \"toy\", \"torch_dtype\": \"bfloat16\"}",
    )
    .unwrap();
    std::fs::write(root.join("base/tokenizer.json"), "{\"toy\": true}").unwrap();
    let mut legal = entries(2, DType::F32, SHAPES);
    legal.reverse();
    std::fs::create_dir_all(root.join("legal")).unwrap();
    write_safetensors(&root.join("legal/model.safetensors"), &legal);
    std::fs::create_dir_all(root.join("recipe")).unwrap();
    write_safetensors(
        &root.join("recipe/weights.safetensors"),
        &entries(3, DType::BF16, SHAPES),
    );
    let models = vec![
        ("base".to_string(), root.join("base").display().to_string()),
        (
            "legal".to_string(),
            root.join("legal").display().to_string(),
        ),
        (
            "recipe".to_string(),
            root.join("recipe/weights.safetensors")
                .display()
                .to_string(),
        ),
    ];
    Fixture {
        _tmp: tmp,
        root,
        models,
    }
}

/// The in-memory result: every model mapped to a vector with the base's
/// mapper, then `eval_vectors`.
fn in_memory(src: &str, models: &[(String, String)]) -> (ModelTensorMapper, ParamVector) {
    let base = Model::open(&models[0].1).unwrap();
    let mapper = ModelTensorMapper::for_model(&base);
    let vectors: HashMap<String, ParamVector> = models
        .iter()
        .map(|(n, r)| {
            (
                n.clone(),
                mapper.to_vector(&Model::open(r).unwrap()).unwrap(),
            )
        })
        .collect();
    (
        mapper,
        eval_vectors(&parse(src).unwrap(), &vectors).unwrap(),
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const TASK_ARITHMETIC: &str = "base + 0.5 * ((legal - base) + (recipe - base))";

fn small_chunks() -> EvalOptions {
    EvalOptions {
        // Smaller than one chunk of every worker: chunks at their minimum.
        max_memory: 1,
        ..EvalOptions::default()
    }
}

#[test]
fn streaming_matches_in_memory_bit_for_bit_in_f32() {
    let f = fixture();
    let out = f.root.join("out-f32");
    let opts = EvalOptions {
        out_dtype: Some(DType::F32),
        max_shard_bytes: 40_000,
        ..small_chunks()
    };
    let report = run_eval(TASK_ARITHMETIC, &f.models, &out, &opts, &NoProgress).unwrap();
    assert_eq!(report.out_dir, out);
    assert_eq!(report.tensors_evaluated, 4);
    assert_eq!(report.tensors_copied, 1);
    assert_eq!(report.params, 400 + 64 + 8 + 21000);
    assert!(report.unused_models.is_empty());

    // The output is sharded (shard limit below the model size) and reloads.
    assert!(out.join("model.safetensors.index.json").is_file());
    let merged = Model::open(out.to_str().unwrap()).unwrap();
    let (mapper, want) = in_memory(TASK_ARITHMETIC, &f.models);
    let got = mapper.to_vector(&merged).unwrap();
    assert_eq!(bits(got.values().unwrap()), bits(want.values().unwrap()));

    // And against plain loops over the decoded inputs.
    let load = |i: usize| {
        mapper
            .to_vector(&Model::open(&f.models[i].1).unwrap())
            .unwrap()
    };
    let (b, l, r) = (load(0), load(1), load(2));
    let looped: Vec<f32> = (0..b.len())
        .map(|i| {
            let (b, l, r) = (
                b.values().unwrap()[i],
                l.values().unwrap()[i],
                r.values().unwrap()[i],
            );
            b + 0.5 * ((l - b) + (r - b))
        })
        .collect();
    assert_eq!(bits(got.values().unwrap()), bits(&looped));

    // Layout: the template's (base's) order and shapes, all floats F32 now,
    // non-float tensors copied byte for byte.
    let names: Vec<&str> = merged
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["emb.weight", "position_ids", "h.0.w", "h.0.b", "big"]
    );
    for t in merged.layout().tensors() {
        if t.name == "position_ids" {
            assert_eq!(t.dtype, DType::I64);
        } else {
            assert_eq!(t.dtype, DType::F32);
        }
    }
    let base = Model::open(&f.models[0].1).unwrap();
    assert_eq!(
        merged.tensor_bytes("position_ids").unwrap(),
        base.tensor_bytes("position_ids").unwrap()
    );
    // Support files: config with the new dtype, tokenizer copied.
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("\"torch_dtype\": \"float32\""), "{config}");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"toy\": true}"
    );
    assert!(report.support_files.contains(&"config.json".to_string()));
    assert_eq!(
        merged
            .metadata()
            .get("tensormerge.expression")
            .map(String::as_str),
        Some(TASK_ARITHMETIC)
    );
}

#[test]
fn streaming_in_the_templates_dtype_rounds_once() {
    let f = fixture();
    let out = f.root.join("out-bf16");
    let src = "-(base / 4) + legal * recipe - 1.5";
    let report = run_eval(src, &f.models, &out, &small_chunks(), &NoProgress).unwrap();
    assert_eq!(report.tensors_evaluated, 4);
    let merged = Model::open_path(&out).unwrap();
    for t in merged.layout().tensors() {
        let want = if t.name == "position_ids" {
            DType::I64
        } else {
            DType::BF16
        };
        assert_eq!(t.dtype, want, "{}", t.name);
    }
    let (mapper, want) = in_memory(src, &f.models);
    let mut want = want.values().unwrap().to_vec();
    convert::round_to(DType::BF16, &mut want);
    let got = mapper.to_vector(&merged).unwrap();
    assert_eq!(bits(got.values().unwrap()), bits(&want));
    // Unchanged dtype: config copied as it was.
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("bfloat16"), "{config}");
}

#[test]
fn chunking_and_threads_do_not_change_the_bits() {
    let f = fixture();
    let src = "(legal - base) * 0.3 + (recipe - base) * 0.7 + base";
    let mut outputs = Vec::new();
    for (i, (threads, memory)) in [(1, 1u64), (3, 1), (2, 1 << 30)].into_iter().enumerate() {
        let out = f.root.join(format!("out-{i}"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let opts = EvalOptions {
            out_dtype: Some(DType::F32),
            max_memory: memory,
            ..EvalOptions::default()
        };
        pool.install(|| run_eval(src, &f.models, &out, &opts, &NoProgress))
            .unwrap();
        let m = Model::open_path(&out).unwrap();
        outputs.push(bits(&m.read_f32_vec("big").unwrap()));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Progress for Recorder {
    fn start(&self, phase: &str, bytes: u64, tensors: u64) {
        self.0
            .lock()
            .unwrap()
            .push(format!("start {phase} {bytes} {tensors}"));
    }
    fn advance(&self, bytes: u64, tensors: u64) {
        self.0
            .lock()
            .unwrap()
            .push(format!("advance {bytes} {tensors}"));
    }
    fn warning(&self, text: &str) {
        self.0.lock().unwrap().push(format!("warning {text}"));
    }
}

#[test]
fn progress_adds_up_and_unused_models_are_reported() {
    let f = fixture();
    let out = f.root.join("out");
    let rec = Recorder::default();
    // `legal` is unused; `recipe` is the template.
    let opts = EvalOptions {
        template: Some("recipe".into()),
        ..EvalOptions::default()
    };
    let report = run_eval("2 * base - base", &f.models, &out, &opts, &rec).unwrap();
    assert_eq!(report.unused_models, ["legal"]);
    let log = rec.0.into_inner().unwrap();
    assert!(
        log.iter()
            .any(|l| l.starts_with("warning model `legal` is not used")),
        "{log:?}"
    );
    // Bytes: base's floats (BF16, 2 bytes each) and the template's ids.
    let floats = 400 + 64 + 8 + 21000;
    let total = floats * 2 + 48;
    assert!(
        log.contains(&format!("start evaluating {total} 5")),
        "{log:?}"
    );
    let (mut bytes, mut tensors) = (0u64, 0u64);
    for l in &log {
        if let Some(rest) = l.strip_prefix("advance ") {
            let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
            bytes += it.next().unwrap();
            tensors += it.next().unwrap();
        }
    }
    assert_eq!((bytes, tensors), (total as u64, 5));
    assert_eq!(report.bytes_read, total as u64);
    // The template's tensor order (recipe's file order, same as base's here)
    // and dtype.
    let merged = Model::open_path(&out).unwrap();
    let base = Model::open(&f.models[0].1).unwrap();
    let got = merged.read_f32_vec("h.0.w").unwrap();
    let b = base.read_f32_vec("h.0.w").unwrap();
    let want: Vec<f32> = b.iter().map(|x| 2.0 * x - x).collect();
    let mut want = want;
    convert::round_to(DType::BF16, &mut want);
    assert_eq!(bits(&got), bits(&want));
    // No config in recipe's directory: none copied.
    assert!(!out.join("config.json").exists());
}

fn err_text(e: &EngineError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(&format!("\ncaused by: {c}"));
        src = c.source();
    }
    s
}

#[test]
fn bad_inputs_are_reported_with_names() {
    let f = fixture();
    let out = f.root.join("out");
    let run = |src: &str, models: &[(String, String)], opts: &EvalOptions| {
        run_eval(src, models, &out, opts, &NoProgress).unwrap_err()
    };
    let d = EvalOptions::default();

    // Syntax error: the column and the caret survive the engine error.
    let text = err_text(&run("base + * legal", &f.models, &d));
    assert!(text.contains("syntax error at column 8"), "{text}");
    assert!(text.ends_with("base + * legal\n         ^"), "{text}");

    // An expression name without a model.
    let text = err_text(&run("base + legl", &f.models, &d));
    assert!(text.contains("unknown model `legl` at column 8"), "{text}");
    assert!(text.contains("`base`, `legal`, `recipe`"), "{text}");

    // A model reference that does not exist.
    let mut missing = f.models.clone();
    missing[1].1 = f.root.join("nope").display().to_string();
    let text = err_text(&run("base + legal", &missing, &d));
    assert!(text.contains("nope"), "{text}");

    // Bad names and duplicates.
    let mut bad = f.models.clone();
    bad.push(("2x".into(), f.models[0].1.clone()));
    assert!(matches!(run("base", &bad, &d), EngineError::Option(m) if m.contains("`2x`")));
    let mut dup = f.models.clone();
    dup.push(("base".into(), f.models[1].1.clone()));
    assert!(matches!(run("base", &dup, &d), EngineError::Option(m) if m.contains("twice")));
    let t = EvalOptions {
        template: Some("other".into()),
        ..EvalOptions::default()
    };
    assert!(matches!(run("base", &f.models, &t), EngineError::Option(m) if m.contains("`other`")));
    let int_out = EvalOptions {
        out_dtype: Some(DType::I32),
        ..EvalOptions::default()
    };
    assert!(matches!(
        run("base", &f.models, &int_out),
        EngineError::Option(_)
    ));

    // A model of another shape: every mismatch is listed.
    let odd = f.root.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let shapes: &[(&str, &[usize])] = &[
        ("emb.weight", &[50, 9]),
        ("h.0.w", &[8, 8]),
        ("h.0.b", &[8]),
        ("extra", &[2]),
    ];
    write_safetensors(
        &odd.join("model.safetensors"),
        &entries(4, DType::F32, shapes),
    );
    let mut with_odd = f.models.clone();
    with_odd.push(("odd".into(), odd.display().to_string()));
    match run("base - odd", &with_odd, &d) {
        EngineError::Incompatible(list) => {
            let tensors: Vec<&str> = list.iter().map(|m| m.tensor.as_str()).collect();
            assert_eq!(tensors, ["emb.weight", "big", "extra"], "{list:?}");
            assert!(list.iter().all(|m| m.model.starts_with("odd")));
        }
        other => panic!("{other:?}"),
    }

    // Output inside an input, and an existing output.
    let inside = f.root.join("base/merged");
    assert!(matches!(
        run_eval("base", &f.models, &inside, &d, &NoProgress).unwrap_err(),
        EngineError::Io { ref source, .. } if matches!(**source, IoError::OutputIsInput { .. })
    ));
    std::fs::create_dir_all(&out).unwrap();
    assert!(matches!(
        run("base", &f.models, &d),
        EngineError::Io { ref source, .. } if matches!(**source, IoError::OutputExists { .. })
    ));
    // With overwrite it is replaced.
    let ow = EvalOptions {
        overwrite: true,
        ..EvalOptions::default()
    };
    run_eval("base * 1", &f.models, &out, &ow, &NoProgress).unwrap();
    assert!(Model::open_path(&out).unwrap().layout().len() == 5);
    // Failed runs left no temporary directories behind.
    let leftovers: Vec<String> = std::fs::read_dir(&f.root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn misaligned_f32_tensors_are_decoded_not_lent() {
    // An odd BF16 tensor first puts the F32 data at an address that is 2 mod
    // 4: it cannot be used in place and must be copied out.
    let tmp = tempfile::tempdir().unwrap();
    let mk = |name: &str, seed: u64| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let odd = values(seed, 3);
        let w = values(seed + 1, 9000);
        write_safetensors(
            &dir.join("model.safetensors"),
            &[
                (
                    "odd".into(),
                    DType::BF16,
                    vec![3],
                    convert::encode_f32_vec(DType::BF16, &odd).unwrap(),
                ),
                (
                    "w".into(),
                    DType::F32,
                    vec![9000],
                    convert::encode_f32_vec(DType::F32, &w).unwrap(),
                ),
            ],
        );
        (name.to_string(), dir.display().to_string())
    };
    let models = vec![mk("a", 10), mk("b", 20)];
    let src = "a - 0.5 * (b - a)";
    let out = tmp.path().join("out");
    run_eval(src, &models, &out, &small_chunks(), &NoProgress).unwrap();
    let (mapper, want) = in_memory(src, &models);
    let got = mapper.to_vector(&Model::open_path(&out).unwrap()).unwrap();
    let mut want = want.values().unwrap().to_vec();
    convert::round_to(DType::BF16, &mut want[..3]);
    assert_eq!(bits(got.values().unwrap()), bits(&want));
}

/// Writes `SHAPES` in `dtype` to `dir` with `value` at element `index` of
/// `big`.
fn poisoned(dir: &Path, dtype: DType, index: usize, value: f32) -> String {
    let mut e = entries(5, dtype, SHAPES);
    let big = e.iter_mut().find(|t| t.0 == "big").unwrap();
    let mut v = values(99, big.2.iter().product());
    v[index] = value;
    big.3 = convert::encode_f32_vec(dtype, &v).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &e);
    dir.display().to_string()
}

#[test]
fn non_finite_values_are_found_in_decoded_and_in_lent_inputs() {
    let f = fixture();
    let out = f.root.join("out");
    // BF16 inputs are decoded (the check is part of decoding), aligned F32
    // inputs are used in place (checked after): both are searched, and the
    // error names the first bad input in the expression's model order.
    let bf16_nan = poisoned(&f.root.join("bn"), DType::BF16, 4_100, f32::NAN);
    let bf16_low = poisoned(&f.root.join("bl"), DType::BF16, 10, f32::INFINITY);
    let f32_inf = poisoned(&f.root.join("fi"), DType::F32, 4_101, f32::NEG_INFINITY);
    // Past the first part a worker evaluates at a time (8192 elements).
    let bf16_far = poisoned(&f.root.join("bf"), DType::BF16, 9_000, f32::NAN);
    let f32_far = poisoned(&f.root.join("ff"), DType::F32, 17_000, f32::INFINITY);
    let clean = f.models[1].1.clone();
    let cases = [
        // (x, y, reported model, index, value)
        (&bf16_nan, &clean, &bf16_nan, 4_100, f32::NAN),
        (&clean, &bf16_nan, &bf16_nan, 4_100, f32::NAN),
        (&clean, &f32_inf, &f32_inf, 4_101, f32::NEG_INFINITY),
        // One chunk holds both: the first model is reported, not the
        // smallest index.
        (&f32_inf, &bf16_low, &f32_inf, 4_101, f32::NEG_INFINITY),
        (&bf16_low, &f32_inf, &bf16_low, 10, f32::INFINITY),
        // In different parts of one chunk: still the first model.
        (&bf16_far, &bf16_low, &bf16_far, 9_000, f32::NAN),
        (&f32_far, &bf16_low, &f32_far, 17_000, f32::INFINITY),
        (&bf16_low, &bf16_far, &bf16_low, 10, f32::INFINITY),
    ];
    for (x, y, bad, at, value) in cases {
        let models = [("x".to_string(), x.clone()), ("y".to_string(), y.clone())];
        let opts = EvalOptions {
            // One chunk for the whole of `big`.
            max_memory: 1 << 30,
            ..EvalOptions::default()
        };
        match run_eval("x - y", &models, &out, &opts, &NoProgress) {
            Err(EngineError::NonFinite {
                model,
                tensor,
                index,
                value: v,
            }) => {
                assert_eq!(model, Model::open(bad).unwrap().name(), "{x} {y}");
                assert_eq!((tensor.as_str(), index), ("big", at as u64), "{x} {y}");
                assert_eq!(v.to_bits(), value.to_bits());
            }
            other => panic!("{x} {y}: {other:?}"),
        }
        assert!(!out.exists());
        // Allowed, the value propagates.
        let opts = EvalOptions {
            allow_non_finite: true,
            ..opts
        };
        run_eval("x - y", &models, &out, &opts, &NoProgress).unwrap();
        let got = Model::open_path(&out).unwrap().read_f32_vec("big").unwrap();
        assert!(!got[at].is_finite());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
