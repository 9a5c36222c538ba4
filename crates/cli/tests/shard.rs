//! Sharded merges through the built binary: `merge --shard I/N` on N
//! concurrent worker processes, then `join`, must give the same bytes as
//! the single-machine merge (every file of the output directory), for
//! N in {1, 2, 3, 7}, with and without a whole-model pass; bad sets of
//! pieces are refused with exit code 1 and nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{Model, ModelWriter, WriterOptions};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tensormerge"));
    c.env_remove("NO_COLOR").env("HF_HUB_OFFLINE", "1");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run tensormerge")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// A small decoder: embeddings (F32), 8 layers of BF16 matrices, a norm and
/// integer position ids; ~19 tensors, 16 KB.
fn layout() -> Vec<TensorInfo> {
    let mut v = vec![TensorInfo::new(
        "model.embed_tokens.weight",
        vec![24, 16],
        DType::F32,
    )];
    for l in 0..8 {
        v.push(TensorInfo::new(
            format!("model.layers.{l}.self_attn.q_proj.weight"),
            vec![16, 16],
            DType::BF16,
        ));
        v.push(TensorInfo::new(
            format!("model.layers.{l}.mlp.up_proj.weight"),
            vec![32, 16],
            DType::BF16,
        ));
    }
    v.push(TensorInfo::new("model.norm.weight", vec![16], DType::F32));
    v.push(TensorInfo::new("position_ids", vec![1, 12], DType::I64));
    v
}

/// Writes a model with values from a hash of (seed, tensor, element); in
/// (0, 2) when `positive` (a Fisher), else in (-1, 1).
fn write_model(dir: &Path, seed: u32, positive: bool) -> String {
    let tensors = layout();
    let mut w = ModelWriter::create(dir, tensors.clone(), WriterOptions::default()).unwrap();
    for (k, t) in tensors.iter().enumerate() {
        let n = t.numel();
        if t.dtype.is_float() {
            let vals: Vec<f32> = (0..n)
                .map(|i| {
                    let x = (i as u32).wrapping_mul(2_654_435_761)
                        ^ seed.wrapping_mul(0x9E37_79B9).wrapping_add(k as u32 * 7919);
                    let v = (x % 4001) as f32 / 2000.0 - 1.0;
                    if positive { v + 1.001 } else { v }
                })
                .collect();
            w.write(&t.name, &convert::encode_f32_vec(t.dtype, &vals).unwrap())
                .unwrap();
        } else {
            let bytes: Vec<u8> = (0..n as i64).flat_map(|i| i.to_le_bytes()).collect();
            w.write(&t.name, &bytes).unwrap();
        }
    }
    w.finish().unwrap();
    dir.display().to_string()
}

struct Models {
    base: String,
    a: String,
    b: String,
    c: String,
    fa: String,
    fb: String,
}

fn models(root: &Path) -> Models {
    let base = write_model(&root.join("base"), 1, false);
    std::fs::write(
        root.join("base/config.json"),
        "{\"model_type\": \"llama\", \"torch_dtype\": \"float32\"}\n",
    )
    .unwrap();
    std::fs::write(root.join("base/tokenizer.json"), "{\"version\": \"1.0\"}\n").unwrap();
    Models {
        base,
        a: write_model(&root.join("a"), 2, false),
        b: write_model(&root.join("b"), 3, false),
        c: write_model(&root.join("c"), 4, false),
        fa: write_model(&root.join("fa"), 5, true),
        fb: write_model(&root.join("fb"), 6, true),
    }
}

/// The configs: no whole-model pass, TIES with a whole-model pass, a random
/// method (seeded), Fisher with normalisation (a whole-model pass over
/// auxiliary inputs).
fn configs(m: &Models) -> Vec<(&'static str, String)> {
    vec![
        (
            "task_arithmetic",
            format!(
                "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.7}}\n  - model: {}\n    parameters: {{weight: [0.2, 0.9]}}\n  - model: {}\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n",
                m.base, m.a, m.b, m.c
            ),
        ),
        (
            "ties_model_scope",
            format!(
                "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.3}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.8, density: 0.2}}\nparameters: {{trim_scope: model}}\n",
                m.base, m.a, m.b, m.c
            ),
        ),
        (
            "dare_ties",
            format!(
                "merge_method: dare_ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.4}}\n  - model: {}\n    parameters: {{weight: 0.6, density: 0.6}}\nseed: 17\ndtype: float16\n",
                m.base, m.a, m.b
            ),
        ),
        (
            "fisher",
            format!(
                "merge_method: fisher\nmodels:\n  - model: {}\n    parameters: {{fisher: {}}}\n  - model: {}\n    parameters: {{fisher: {}}}\nparameters: {{normalize_fishers: true}}\n",
                m.a, m.fa, m.b, m.fb
            ),
        ),
    ]
}

/// Every file of a directory (recursively), with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

const SHARD: &str = "1600";

/// Runs the N workers of `config` concurrently into `out`.
fn workers(config: &Path, out: &Path, n: usize, extra: &[&str]) {
    let children: Vec<_> = (0..n)
        .map(|i| {
            bin()
                .args([
                    "merge",
                    config.to_str().unwrap(),
                    "-o",
                    out.to_str().unwrap(),
                ])
                .args(["--out-shard-size", SHARD, "--no-progress", "-j", "1"])
                .args(["--shard", &format!("{i}/{n}")])
                .args(extra)
                .output()
        })
        .collect();
    for c in children {
        ok(&c.expect("run worker"));
    }
}

fn pieces(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".pieces");
    PathBuf::from(p)
}

#[test]
fn sharded_merges_are_byte_identical_to_the_single_machine_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let m = models(tmp.path());
    for (name, yaml) in configs(&m) {
        let config = tmp.path().join(format!("{name}.yml"));
        std::fs::write(&config, &yaml).unwrap();
        // Same final name everywhere: the model card names the output directory.
        let single = tmp.path().join(format!("{name}-single")).join("merged");
        let o = run(&[
            "merge",
            config.to_str().unwrap(),
            "-o",
            single.to_str().unwrap(),
            "--out-shard-size",
            SHARD,
            "--no-progress",
        ]);
        ok(&o);
        let expected = files(&single);
        let shards = expected
            .iter()
            .filter(|(f, _)| f.ends_with(".safetensors"))
            .count();
        assert!(
            shards >= 8,
            "{name}: {shards} shards, want several per worker"
        );
        assert!(
            expected
                .iter()
                .any(|(f, _)| f == "model.safetensors.index.json")
        );
        for n in [1usize, 2, 3, 7] {
            let out = tmp.path().join(format!("{name}-{n}")).join("merged");
            // Workers run as separate processes at once, as on a cluster.
            let children: Vec<_> = (0..n)
                .map(|i| {
                    bin()
                        .args(["merge", config.to_str().unwrap(), "-o"])
                        .arg(&out)
                        .args(["--out-shard-size", SHARD, "--no-progress"])
                        .args(["--shard", &format!("{i}/{n}")])
                        .stdout(std::process::Stdio::null())
                        .spawn()
                        .expect("start worker")
                })
                .collect();
            for mut c in children {
                assert!(c.wait().unwrap().success(), "{name} N={n}: a worker failed");
            }
            // Pieces only: nothing at OUT that could pass for a model.
            assert!(!out.exists(), "{name} N={n}: OUT written before join");
            assert!(Model::open(out.to_str().unwrap()).is_err());
            let workers_done = std::fs::read_dir(pieces(&out)).unwrap().count();
            assert_eq!(workers_done, n, "{name} N={n}: worker directories");
            let o = run(&["join", out.to_str().unwrap(), "--no-progress"]);
            ok(&o);
            assert!(
                text(&o.stdout).contains(&format!("joined {shards} shard(s) from {n} worker(s)")),
                "{}",
                text(&o.stdout)
            );
            assert!(!pieces(&out).exists(), "pieces removed after join");
            let got = files(&out);
            let names =
                |v: &[(String, Vec<u8>)]| v.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>();
            assert_eq!(names(&got), names(&expected), "{name} N={n}: file list");
            for ((f, a), (_, b)) in got.iter().zip(&expected) {
                assert!(
                    a == b,
                    "{name} N={n}: {f} differs from the single-machine merge"
                );
            }
        }
    }
}

#[test]
fn more_workers_than_shards_leave_some_workers_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let m = models(tmp.path());
    let (_, yaml) = configs(&m).swap_remove(1); // ties, whole-model pass
    let config = tmp.path().join("c.yml");
    std::fs::write(&config, yaml).unwrap();
    let single = tmp.path().join("single").join("out");
    let o = run(&[
        "merge",
        config.to_str().unwrap(),
        "-o",
        single.to_str().unwrap(),
        "--out-shard-size",
        "6000",
        "--no-progress",
    ]);
    ok(&o);
    let expected = files(&single);
    let shards = expected
        .iter()
        .filter(|(f, _)| f.ends_with(".safetensors"))
        .count();
    assert!((2..7).contains(&shards), "{shards} shards");
    let out = tmp.path().join("out");
    for i in 0..7 {
        let o = bin()
            .args(["merge", config.to_str().unwrap(), "-o"])
            .arg(&out)
            .args(["--out-shard-size", "6000", "--no-progress"])
            .args(["--shard", &format!("{i}/7")])
            .output()
            .unwrap();
        ok(&o);
        assert!(
            text(&o.stdout).contains(&format!("worker {i}/7")),
            "{}",
            text(&o.stdout)
        );
    }
    ok(&run(&["join", out.to_str().unwrap()]));
    let got = files(&out);
    assert_eq!(got.len(), expected.len());
    for ((f, a), (g, b)) in got.iter().zip(&expected) {
        assert!(
            f == g && a == b,
            "{f} differs from the single-machine merge"
        );
    }
}

/// Writes the pieces of a 3-worker ties merge and returns (config, out).
fn three_workers(tmp: &Path, m: &Models) -> (PathBuf, PathBuf) {
    let (_, yaml) = configs(m).swap_remove(2); // dare_ties, seed 17
    std::fs::create_dir_all(tmp).unwrap();
    let config = tmp.join("c.yml");
    std::fs::write(&config, yaml).unwrap();
    let out = tmp.join("out");
    workers(&config, &out, 3, &[]);
    (config, out)
}

fn refused(out: &Path, needle: &str) {
    let o = run(&["join", out.to_str().unwrap(), "--no-progress"]);
    assert_eq!(o.status.code(), Some(1), "stderr: {}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains(needle), "want `{needle}` in: {err}");
    assert!(o.stdout.is_empty());
    assert!(!out.exists(), "nothing may be written at OUT");
    let parent = out.parent().unwrap();
    for e in std::fs::read_dir(parent).unwrap() {
        let f = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!f.contains("tensormerge-tmp"), "temporary {f} left behind");
    }
    assert!(pieces(out).exists(), "the pieces stay for another attempt");
}

#[test]
fn bad_sets_of_pieces_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let m = models(tmp.path());

    // A worker missing: named, with the command to run.
    let (config, out) = three_workers(&tmp.path().join("missing"), &m);
    std::fs::remove_dir_all(pieces(&out).join("worker-00001-of-00003")).unwrap();
    refused(&out, "worker(s) 1 of 3 have not finished");
    // Running it makes the set complete.
    workers_one(&config, &out, 1, 3, &[]);
    ok(&run(&["join", out.to_str().unwrap()]));
    assert!(Model::open(out.to_str().unwrap()).is_ok());

    // A corrupt piece (one byte flipped, same size).
    let (_, out) = three_workers(&tmp.path().join("corrupt"), &m);
    let dir = pieces(&out).join("worker-00002-of-00003");
    let piece = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut bytes = std::fs::read(&piece).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::remove_file(&piece).unwrap();
    std::fs::write(&piece, bytes).unwrap();
    refused(&out, "corrupt");

    // A truncated piece.
    let (_, out) = three_workers(&tmp.path().join("short"), &m);
    let dir = pieces(&out).join("worker-00000-of-00003");
    let piece = dir.join("model-00001-of-00011.safetensors");
    let piece = if piece.exists() {
        piece
    } else {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap()
    };
    let bytes = std::fs::read(&piece).unwrap();
    std::fs::remove_file(&piece).unwrap();
    std::fs::write(&piece, &bytes[..bytes.len() - 8]).unwrap();
    refused(&out, "corrupt");

    // Pieces of another plan (another seed) mixed in.
    let (config, out) = three_workers(&tmp.path().join("plan"), &m);
    workers_one(&config, &out, 1, 3, &["--seed", "99"]);
    refused(&out, "written for plan");

    // Pieces of another split (N = 2) mixed in: shards would be doubled.
    let (config, out) = three_workers(&tmp.path().join("split"), &m);
    workers_one(&config, &out, 1, 2, &[]);
    refused(&out, "one `--shard I/N` split");

    // A manifest that claims another worker's shards.
    let (_, out) = three_workers(&tmp.path().join("claim"), &m);
    let manifest = pieces(&out).join("worker-00001-of-00003/manifest.json");
    let t = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, t.replace("\"worker\": 1", "\"worker\": 2")).unwrap();
    refused(&out, "but the directory is named");

    // No pieces at all.
    let o = run(&["join", tmp.path().join("nothing").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("run the workers"),
        "{}",
        text(&o.stderr)
    );

    // A worker number out of range is a usage error.
    let o = run(&[
        "merge",
        config.to_str().unwrap(),
        "-o",
        "x",
        "--shard",
        "3/3",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("below N"), "{}", text(&o.stderr));
}

fn workers_one(config: &Path, out: &Path, i: usize, n: usize, extra: &[&str]) {
    let o = bin()
        .args(["merge", config.to_str().unwrap(), "-o"])
        .arg(out)
        .args(["--out-shard-size", SHARD, "--no-progress"])
        .args(["--shard", &format!("{i}/{n}")])
        .args(extra)
        .output()
        .unwrap();
    ok(&o);
}
