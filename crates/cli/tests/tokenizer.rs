//! End-to-end runs of the built binary on tokenizer configs
//! (`tokenizer_source`, the `tokenizer:` section, `chat_template`), with tiny
//! models and WordLevel tokenizers written here. Every expected row is
//! computed in the test from the source rows, mergekit's default rules and
//! the linear formula.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{Model, ModelWriter, WriterOptions};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{AddedToken, Tokenizer};

mod common;
use common::{ok, run, text};

const H: usize = 3;

/// A vocabulary: plain tokens, then added special tokens.
type Vocab = (&'static [&'static str], &'static [&'static str]);
const EMBED: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// Row `r` of tensor `name` of the model with `seed`: distinct values.
fn row_values(seed: u32, name: &str, r: usize) -> Vec<f32> {
    let t = if name.starts_with("lm_head") {
        0.5
    } else {
        0.0
    };
    (0..H)
        .map(|c| seed as f32 * 10.0 + r as f32 + c as f32 * 0.1 + t)
        .collect()
}

/// A tiny model: embeddings and head with one row per token of `vocab`
/// (plain tokens, then `added` special tokens), one layer tensor, a
/// config.json and a WordLevel tokenizer.json.
fn write_model(dir: &Path, seed: u32, vocab: &[&str], added: &[&str]) -> PathBuf {
    let rows = vocab.len() + added.len();
    let tensors = vec![
        TensorInfo::new(EMBED[0], vec![rows, H], DType::F32),
        TensorInfo::new("model.layers.0.mlp.weight", vec![2, H], DType::F32),
        TensorInfo::new(EMBED[1], vec![rows, H], DType::F32),
    ];
    let mut w = ModelWriter::create(dir, tensors.clone(), WriterOptions::default()).unwrap();
    for t in &tensors {
        let v: Vec<f32> = if t.name.contains("layers") {
            (0..2 * H).map(|i| seed as f32 + i as f32).collect()
        } else {
            (0..rows)
                .flat_map(|r| row_values(seed, &t.name, r))
                .collect()
        };
        w.write(&t.name, &convert::encode_f32_vec(DType::F32, &v).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!(
            "{{\"model_type\": \"llama\", \"vocab_size\": {rows}, \"hidden_size\": {H}, \"num_hidden_layers\": 1}}\n"
        ),
    )
    .unwrap();
    let map: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(map.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let specials: Vec<AddedToken> = added
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tok.add_special_tokens(specials).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"unk_token\": \"[UNK]\", \"model_max_length\": 64}\n",
    )
    .unwrap();
    dir.to_path_buf()
}

struct Fx {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

/// The models: `b` (the base), `a`, `c`, and `d` (a tokenizer donor that
/// is not merged).
const B: Vocab = (&["[UNK]", "the", "cat", "dog"], &["<b>"]);
const A: Vocab = (&["[UNK]", "the", "cat", "fish"], &["<a>"]);
const C: Vocab = (&["[UNK]", "the", "dog", "fish", "bird"], &["<c>"]);
const D: Vocab = (&["[UNK]", "the", "cat", "zebra"], &[]);

impl Fx {
    fn new() -> Fx {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        write_model(&root.join("b"), 1, B.0, B.1);
        write_model(&root.join("a"), 2, A.0, A.1);
        write_model(&root.join("c"), 3, C.0, C.1);
        write_model(&root.join("d"), 4, D.0, D.1);
        Fx { _tmp: tmp, root }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    fn config(&self, name: &str, body: &str) -> String {
        let text = body
            .replace("$A", &self.path("a"))
            .replace("$B", &self.path("b"))
            .replace("$C", &self.path("c"))
            .replace("$D", &self.path("d"));
        let p = self.root.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

/// The row of `token` in a model given by (seed, vocab), if it has it.
fn own_row(seed: u32, v: Vocab, name: &str, token: &str) -> Option<Vec<f32>> {
    v.0.iter()
        .chain(v.1)
        .position(|t| *t == token)
        .map(|r| row_values(seed, name, r))
}

fn rows_of(m: &Model, name: &str) -> Vec<Vec<f32>> {
    m.read_f32_vec(name)
        .unwrap()
        .chunks(H)
        .map(|c| c.to_vec())
        .collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn union_remaps_rows_by_token_with_mergekits_defaults() {
    let fx = Fx::new();
    let cfg = fx.config(
        "union.yml",
        "merge_method: linear\nbase_model: $B\nmodels:\n  - model: $B\n    parameters: {weight: 1.0}\n  - model: $A\n    parameters: {weight: 2.0}\n  - model: $C\n    parameters: {weight: 3.0}\ndtype: float32\ntokenizer:\n  source: union\n  tokens:\n    the: {source: $C, force: true}\n    <extra>: {source: {kind: model_token, model: $A, token: cat}}\n    <z>: {source: {kind: zero}}\n  pad_to_multiple_of: 8\nchat_template: chatml\n",
    );
    let out = fx.root.join("out");
    for j in ["1", "3"] {
        let o = fx.root.join(format!("out-j{j}"));
        ok(&run(&[
            "merge",
            &cfg,
            "-o",
            o.to_str().unwrap(),
            "-j",
            j,
            "--no-progress",
        ]));
    }
    std::fs::rename(fx.root.join("out-j1"), &out).unwrap();
    // Bit-identical on any -j.
    let j3 = Model::open_path(&fx.root.join("out-j3")).unwrap();
    let m = Model::open_path(&out).unwrap();
    for n in EMBED {
        assert_eq!(m.read_f32_vec(n).unwrap(), j3.read_f32_vec(n).unwrap());
    }

    // Output vocabulary: base's tokens, then the others' plain tokens in
    // model order, then the added tokens, then the `tokens` keys.
    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let expected = [
        "[UNK]", "the", "cat", "dog", "<b>", "fish", "bird", "<a>", "<c>", "<extra>", "<z>",
    ];
    for (id, t) in expected.iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(id as u32), "{t}");
        if id == 0 {
            continue; // `[UNK]` is split by the whitespace pre-tokenizer
        }
        let enc = tok.encode(*t, false).unwrap();
        assert_eq!(enc.get_ids(), &[id as u32], "encoding {t}");
    }
    let enc = tok.encode("the fish <c> bird", false).unwrap();
    assert_eq!(enc.get_ids(), &[1, 5, 8, 6]);
    assert_eq!(tok.get_vocab_size(true), expected.len());
    let config = json(&out.join("config.json"));
    assert_eq!(
        config["vocab_size"], 16,
        "11 tokens padded to a multiple of 8"
    );

    // Rows, per input (base b, a, c; weights 1, 2, 3), by mergekit's rules.
    let models: [(u32, Vocab, f32); 3] = [(1, B, 1.0), (2, A, 2.0), (3, C, 3.0)];
    for name in EMBED {
        let got = rows_of(&m, name);
        assert_eq!(got.len(), 16);
        let own = |k: usize, t: &str| own_row(models[k].0, models[k].1, name, t);
        let default = |t: &str| -> Vec<f32> {
            match t {
                "the" => own(2, "the").unwrap(),     // configured, forced
                "<extra>" => own(1, "cat").unwrap(), // model_token
                "<z>" => vec![0.0; H],               // kind: zero
                _ => {
                    let have: Vec<usize> = (0..3).filter(|&k| own(k, t).is_some()).collect();
                    if have.len() == 1 {
                        own(have[0], t).unwrap() // only one model has it
                    } else if own(0, t).is_some() {
                        own(0, t).unwrap() // the base's row
                    } else {
                        // the average of those that have it
                        let mut s = [0.0f32; H];
                        for &k in &have {
                            for (x, y) in s.iter_mut().zip(own(k, t).unwrap()) {
                                *x += y;
                            }
                        }
                        s.iter()
                            .map(|x| x / have.len() as f32)
                            .collect::<Vec<f32>>()
                    }
                }
            }
        };
        let permuted = |k: usize| -> Vec<Vec<f32>> {
            let mut rows: Vec<Vec<f32>> = expected
                .iter()
                .map(|t| match own(k, t) {
                    Some(r) if *t != "the" => r,
                    _ => default(t),
                })
                .collect();
            // Padding: the mean of the model's real permuted rows.
            let mean: Vec<f32> = (0..H)
                .map(|c| rows.iter().map(|r| r[c] as f64).sum::<f64>() as f32 / 11.0)
                .collect();
            rows.resize(16, mean);
            rows
        };
        let p: Vec<Vec<Vec<f32>>> = (0..3).map(permuted).collect();
        let wsum: f32 = models.iter().map(|m| m.2).sum();
        for r in 0..16 {
            let want: Vec<f32> = (0..H)
                .map(|c| (0..3).map(|k| models[k].2 * p[k][r][c]).sum::<f32>() / wsum)
                .collect();
            assert!(
                close(&got[r], &want),
                "{name} row {r}: {:?} vs {want:?}",
                got[r]
            );
        }
        // Spot checks of the rules against the source rows directly.
        let fish_mean: Vec<f32> = (0..H)
            .map(|c| (own(1, "fish").unwrap()[c] + own(2, "fish").unwrap()[c]) / 2.0)
            .collect();
        assert!(
            close(&p[0][5], &fish_mean),
            "b lacks fish: average of a and c"
        );
        assert!(
            close(&p[2][2], &own(0, "cat").unwrap()),
            "c lacks cat: base row"
        );
        assert!(close(&p[0][6], &own(2, "bird").unwrap()), "only c has bird");
        assert!(close(&got[10], &[0.0; H]), "<z> is zero in every model");
        assert!(
            close(&got[1], &own(2, "the").unwrap()),
            "forced: c's `the` everywhere"
        );
    }

    // Tokenizer files that transformers reads.
    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["model_max_length"], 64, "kept from the base");
    let dec = tc["added_tokens_decoder"].as_object().unwrap();
    for (id, t, special) in [
        ("4", "<b>", true),
        ("7", "<a>", true),
        ("8", "<c>", true),
        ("5", "fish", false),
    ] {
        assert_eq!(dec[id]["content"], t);
        assert_eq!(dec[id]["special"], special, "{t}");
    }
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    assert!(out.join("special_tokens_map.json").is_file());
}

#[test]
fn model_source_uses_that_vocabulary_and_literal_templates() {
    let fx = Fx::new();
    let template = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
    let cfg = fx.config(
        "model.yml",
        &format!(
            "merge_method: linear\nmodels:\n  - model: $A\n  - model: $C\ntokenizer_source: $D\nchat_template: \"{template}\"\n"
        ),
    );
    let out = fx.root.join("out");
    ok(&run(&[
        "merge",
        &cfg,
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]));
    let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 4);
    for (id, t) in D.0.iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(id as u32));
    }
    let m = Model::open_path(&out).unwrap();
    assert_eq!(json(&out.join("config.json"))["vocab_size"], 4);
    for name in EMBED {
        let got = rows_of(&m, name);
        assert_eq!(got.len(), 4);
        let a = |t: &str| own_row(2, A, name, t).unwrap();
        let c = |t: &str| own_row(3, C, name, t).unwrap();
        let avg = |x: Vec<f32>, y: Vec<f32>| -> Vec<f32> {
            x.iter().zip(&y).map(|(p, q)| (p + q) / 2.0).collect()
        };
        assert!(close(&got[0], &avg(a("[UNK]"), c("[UNK]"))));
        assert!(close(&got[1], &avg(a("the"), c("the"))));
        // Only a has `cat`: c takes a's row, so the merge is a's row.
        assert!(close(&got[2], &a("cat")));
        // Nobody merged has `zebra`: zeros.
        assert!(close(&got[3], &[0.0; H]));
    }
    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["chat_template"], template);
}

#[test]
fn differing_vocabularies_without_a_source_are_refused() {
    let fx = Fx::new();
    let cfg = fx.config(
        "plain.yml",
        "merge_method: linear\nmodels:\n  - model: $A\n  - model: $C\n",
    );
    let out = fx.root.join("out");
    let o = run(&["merge", &cfg, "-o", out.to_str().unwrap(), "--no-progress"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("vocabularies differ"), "{err}");
    assert!(
        err.contains("hint:") && err.contains("tokenizer_source"),
        "{err}"
    );
    assert!(!out.exists());
    // Same row counts but other tokens (a and d both have 5 rows? no: d has
    // 4): b and a have 5 rows each and differ in `dog`/`fish`.
    let cfg = fx.config(
        "plain2.yml",
        "merge_method: linear\nmodels:\n  - model: $B\n  - model: $A\n",
    );
    let o = run(&["merge", &cfg, "-o", out.to_str().unwrap(), "--no-progress"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("tokenizer.json vocabularies"), "{err}");
    assert!(err.contains("tokenizer_source"), "{err}");
    assert!(!out.exists());
}

#[test]
fn dry_run_shows_the_vocabulary() {
    let fx = Fx::new();
    let cfg = fx.config(
        "dry.yml",
        "merge_method: linear\nbase_model: $B\nmodels:\n  - model: $A\n  - model: $C\ntokenizer_source: union\n",
    );
    let o = run(&[
        "merge",
        &cfg,
        "-o",
        fx.root.join("out").to_str().unwrap(),
        "--dry-run",
    ]);
    ok(&o);
    let s = text(&o.stdout);
    assert!(
        s.contains("vocabulary: 9 tokens, 9 embedding rows, from union of 3 vocabularies"),
        "{s}"
    );
    assert!(s.contains("model.embed_tokens.weight [9, 3]"), "{s}");
}

#[test]
fn named_templates_and_bad_tokenizer_keys() {
    let fx = Fx::new();
    let cfg = fx.config(
        "named.yml",
        "merge_method: linear\nmodels:\n  - model: $A\n  - model: $A\nchat_template: llama3\n",
    );
    let out = fx.root.join("out");
    ok(&run(&[
        "merge",
        &cfg,
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]));
    let tc = json(&out.join("tokenizer_config.json"));
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|start_header_id|>")
    );
    assert_eq!(tc["model_max_length"], 64);

    for (body, needle) in [
        ("chat_template: nosuch\n", "neither a known template"),
        (
            "tokenizer_source: base\ntokenizer: {source: union}\n",
            "mutually exclusive",
        ),
        (
            "tokenizer:\n  tokens:\n    x: {force: true}\n",
            "needs a `source`",
        ),
        ("tokenizer:\n  sorce: union\n", "tokenizer.sorce"),
    ] {
        let cfg = fx.config(
            "bad.yml",
            &format!("merge_method: linear\nmodels:\n  - model: $A\n{body}"),
        );
        let o = run(&["merge", &cfg, "-o", fx.root.join("bad").to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{body}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{body}: {}",
            text(&o.stderr)
        );
    }
}

#[test]
fn base_source_over_one_vocabulary_keeps_the_rows() {
    let fx = Fx::new();
    // b's own vocabulary (identity permutation, read as it is) and a's
    // remapped into it: `fish` dropped, `dog` and `<b>` from b only.
    let cfg = fx.config(
        "base.yml",
        "merge_method: linear\nbase_model: $B\nmodels:\n  - model: $B\n  - model: $A\ntokenizer_source: base\n",
    );
    let out = fx.root.join("out");
    ok(&run(&[
        "merge",
        &cfg,
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]));
    let m = Model::open_path(&out).unwrap();
    assert_eq!(json(&out.join("config.json"))["vocab_size"], 5);
    for name in EMBED {
        let got = rows_of(&m, name);
        assert_eq!(got.len(), 5);
        for (r, t) in B.0.iter().chain(B.1).enumerate() {
            let b = own_row(1, B, name, t).unwrap();
            let a = own_row(2, A, name, t).unwrap_or_else(|| b.clone());
            let want: Vec<f32> = b.iter().zip(&a).map(|(x, y)| (x + y) / 2.0).collect();
            assert!(
                close(&got[r], &want),
                "{name} {t}: {:?} vs {want:?}",
                got[r]
            );
        }
    }
}
