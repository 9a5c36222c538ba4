//! Forward passes, generation and perplexity of tiny models the test writes,
//! against the independent f64 reference in `reference/`.

#[allow(clippy::needless_range_loop)]
mod reference;

use std::path::{Path, PathBuf};

use tensormerge_core::{DType, ModelTensorMapper};
use tensormerge_io::{MapperExt, Model, WriterOptions};
use tensormerge_nn::tiny::{TinyArch, write_tiny_model};
use tensormerge_nn::{GenerateOptions, NnError, PerplexityOptions, Pipeline, Sampling, windows};

fn model(dir: &Path, arch: TinyArch, seed: u64) -> PathBuf {
    write_tiny_model(
        &dir.join(format!("{arch:?}-{seed}")),
        arch,
        seed,
        DType::F32,
    )
    .unwrap()
}

fn open(p: &Path) -> Pipeline {
    Pipeline::open(p.to_str().unwrap()).unwrap()
}

const IDS: [u32; 9] = [2, 15, 30, 4, 7, 50, 12, 3, 44];

fn close(a: &[Vec<f32>], b: &[Vec<f64>], tol: f64) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "reference values are degenerate");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len());
        for (j, (x, y)) in x.iter().zip(y).enumerate() {
            assert!(
                (*x as f64 - y).abs() <= tol * scale,
                "[{i}][{j}]: {x} vs reference {y}"
            );
        }
    }
}

#[test]
fn causal_logits_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [
        TinyArch::Llama,
        TinyArch::Qwen2,
        TinyArch::Mistral,
        TinyArch::Gpt2,
    ] {
        let p = model(dir.path(), arch, 1);
        let got = open(&p).logits(&IDS).unwrap();
        let want = match arch {
            TinyArch::Gpt2 => reference::gpt2(&p, &IDS),
            _ => reference::llama(&p, &IDS),
        };
        close(&got, &want, 1e-5);
    }
}

#[test]
fn mistral_sliding_window_changes_late_positions_only() {
    // Changing the first token changes every logit of a causal model, except
    // (window 4) the positions that no longer see it.
    let dir = tempfile::tempdir().unwrap();
    let m = open(&model(dir.path(), TinyArch::Mistral, 2));
    let a = m.logits(&IDS).unwrap();
    let mut ids = IDS;
    ids[0] = 9;
    let b = m.logits(&ids).unwrap();
    assert_ne!(a[3], b[3]);
    // position 5 sees 2..=5 directly, but layer 2 sees layer-1 states of 2..=5,
    // which saw 0 only from position 3: with 2 layers the reach is 6 tokens back.
    assert_eq!(a[7], b[7]);
    assert_eq!(a[8], b[8]);
}

#[test]
fn bert_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), TinyArch::Bert, 3);
    let m = open(&p);
    let got = m.forward(&IDS).unwrap().to_vec2::<f32>().unwrap();
    close(&got, &reference::bert(&p, &IDS), 1e-5);

    let p = model(dir.path(), TinyArch::BertClassifier, 4);
    let m = open(&p);
    let logits = m.forward(&IDS).unwrap().to_vec2::<f32>().unwrap();
    let want = reference::bert(&p, &IDS);
    close(&logits, &want, 1e-5);
    let probs = m.classify_ids(&IDS).unwrap();
    let lp = reference::log_softmax(&want[0]);
    for (p, l) in probs.iter().zip(lp) {
        assert!((*p as f64 - l.exp()).abs() < 1e-5);
    }
    assert!(matches!(
        m.generate(&["the".into()], &GenerateOptions::default()),
        Err(NnError::Unsupported { .. })
    ));
}

#[test]
fn greedy_generation_is_the_reference_argmax() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [TinyArch::Llama, TinyArch::Gpt2] {
        let p = model(dir.path(), arch, 5);
        let m = open(&p);
        let prompt = "the court ruled".to_string();
        let opts = GenerateOptions {
            max_new_tokens: 6,
            sampling: Sampling::Greedy,
        };
        let out = m.generate(std::slice::from_ref(&prompt), &opts).unwrap();
        let mut ids = m.encode(&prompt).unwrap();
        assert_eq!(ids, vec![2, 2 + 13, 2 + 25]); // the, court, ruled
        let mut want = Vec::new();
        for _ in 0..6 {
            let l = match arch {
                TinyArch::Gpt2 => reference::gpt2(&p, &ids),
                _ => reference::llama(&p, &ids),
            };
            let next = reference::argmax(l.last().unwrap());
            want.push(next);
            ids.push(next);
            if next == 1 {
                break; // </s> is eos_token_id
            }
        }
        assert_eq!(out[0].tokens, want, "{arch:?}");
        assert_eq!(out[0].completion, m.decode(&want).unwrap());
        // deterministic
        assert_eq!(
            m.generate(std::slice::from_ref(&prompt), &opts).unwrap(),
            out
        );
    }
}

#[test]
fn sampling_is_seeded_and_top_p_zero_is_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&model(dir.path(), TinyArch::Llama, 6));
    let prompts = vec!["the court".to_string(), "add the flour".to_string()];
    let s = |seed, top_p| GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::TopP {
            temperature: 1.5,
            top_p,
            seed,
        },
    };
    let a = m.generate(&prompts, &s(7, 1.0)).unwrap();
    assert_eq!(m.generate(&prompts, &s(7, 1.0)).unwrap(), a);
    let seeds: Vec<_> = (0..6)
        .map(|k| m.generate(&prompts, &s(k, 1.0)).unwrap())
        .collect();
    assert!(
        seeds.iter().any(|g| g != &a),
        "different seeds never differ"
    );
    // a tiny nucleus keeps only the most likely token
    let greedy = m
        .generate(
            &prompts,
            &GenerateOptions {
                max_new_tokens: 8,
                sampling: Sampling::Greedy,
            },
        )
        .unwrap();
    assert_eq!(m.generate(&prompts, &s(3, 1e-9)).unwrap(), greedy);
    assert!(matches!(
        m.generate(&prompts, &s(3, 0.0)),
        Err(NnError::Input(_))
    ));
}

#[test]
fn perplexity_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), TinyArch::Qwen2, 8);
    let m = open(&p);
    let ids: Vec<u32> = (0..23).map(|i| (i * 7 + 3) % 62).collect();
    for (context, stride) in [(5, 5), (8, 3), (23, 23)] {
        let opts = PerplexityOptions {
            context,
            stride: Some(stride),
            max_tokens: None,
        };
        let got = m.perplexity_ids(&ids, &opts).unwrap();
        // plain reference: every window, every scored position
        let mut nll = 0.0;
        let mut n = 0;
        let mut scored = vec![false; ids.len()];
        let mut start = 0;
        while start + context <= ids.len() {
            let win = &ids[start..start + context];
            let l = reference::llama(&p, win);
            for j in 1..context {
                if !scored[start + j] {
                    scored[start + j] = true;
                    nll -= reference::log_softmax(&l[j - 1])[win[j] as usize];
                    n += 1;
                }
            }
            start += stride;
        }
        assert_eq!(got.scored_tokens, n, "context {context} stride {stride}");
        assert!(
            (got.nll - nll / n as f64).abs() < 1e-5,
            "{} vs {}",
            got.nll,
            nll / n as f64
        );
        assert!((got.perplexity - (nll / n as f64).exp()).abs() < 1e-4);
    }
    // windows are full windows; max_tokens cuts first
    let opts = PerplexityOptions {
        context: 5,
        stride: None,
        max_tokens: Some(12),
    };
    let r = m.perplexity_ids(&ids, &opts).unwrap();
    assert_eq!((r.windows, r.scored_tokens, r.tokens), (2, 8, 12));
    assert!(matches!(windows(4, 5, 5), Err(NnError::Input(_))));
    assert!(matches!(
        m.perplexity_ids(
            &ids,
            &PerplexityOptions {
                context: 65,
                ..Default::default()
            }
        ),
        Err(NnError::Input(_))
    ));
}

#[test]
fn in_memory_pipeline_is_bit_identical_to_the_saved_directory() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [TinyArch::Llama, TinyArch::Gpt2, TinyArch::BertClassifier] {
        let a = write_tiny_model(
            &dir.path().join(format!("a{arch:?}")),
            arch,
            10,
            DType::BF16,
        )
        .unwrap();
        let b = write_tiny_model(
            &dir.path().join(format!("b{arch:?}")),
            arch,
            11,
            DType::BF16,
        )
        .unwrap();
        let (mapper, template) = ModelTensorMapper::open(a.to_str().unwrap()).unwrap();
        let va = mapper.load(a.to_str().unwrap()).unwrap();
        let vb = mapper.load(b.to_str().unwrap()).unwrap();
        let merged = 0.3 * &va + 0.7 * &vb; // not representable in bf16: rounding matters
        let mem = Pipeline::from_vector(&mapper, &merged, &template).unwrap();
        let out = dir.path().join(format!("merged{arch:?}"));
        mapper
            .save(&merged, &out, &template, WriterOptions::default())
            .unwrap();
        let disk = open(&out);
        let x = mem
            .forward(&IDS)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = disk
            .forward(&IDS)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&x), bits(&y), "{arch:?}");
        // and the merge is a different model from either input
        assert_ne!(
            bits(&x),
            bits(
                &open(&a)
                    .forward(&IDS)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            )
        );
        let _ = Model::open_path(&out).unwrap();
    }
}

#[test]
fn bad_models_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), TinyArch::Llama, 12);
    // unsupported architecture
    let cfg = std::fs::read_to_string(p.join("config.json")).unwrap();
    std::fs::write(p.join("config.json"), cfg.replace("\"llama\"", "\"mamba\"")).unwrap();
    let e = Pipeline::open(p.to_str().unwrap()).unwrap_err();
    assert!(matches!(e, NnError::UnsupportedArchitecture { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("mamba")
            && msg.contains("llama, mistral, qwen2")
            && msg.contains("gpt2")
            && msg.contains("bert"),
        "{msg}"
    );
    std::fs::write(p.join("config.json"), &cfg).unwrap();
    // missing tokenizer
    std::fs::remove_file(p.join("tokenizer.json")).unwrap();
    let e = Pipeline::open(p.to_str().unwrap()).unwrap_err();
    assert!(matches!(e, NnError::Tokenizer { .. }), "{e}");
    assert!(
        e.to_string().contains("tokenizer.json") && e.to_string().contains("tokenizer_source"),
        "{e}"
    );
    // unreadable tokenizer
    std::fs::write(p.join("tokenizer.json"), "{not json").unwrap();
    assert!(matches!(
        Pipeline::open(p.to_str().unwrap()).unwrap_err(),
        NnError::Tokenizer { .. }
    ));
    // a config that does not fit the weights
    tensormerge_nn::tiny::write_tokenizer(&p).unwrap();
    std::fs::write(
        p.join("config.json"),
        cfg.replace("\"intermediate_size\": 24", "\"intermediate_size\": 25"),
    )
    .unwrap();
    let e = Pipeline::open(p.to_str().unwrap()).unwrap_err();
    assert!(
        matches!(&e, NnError::Shape { name, .. } if name.contains("gate_proj")),
        "{e}"
    );
    // non-UTF-8 text
    let f = dir.path().join("latin1.txt");
    std::fs::write(&f, b"caf\xe9").unwrap();
    let e = tensormerge_nn::read_text(&f).unwrap_err();
    assert!(
        e.to_string().contains("latin1.txt") && e.to_string().contains("offset 3"),
        "{e}"
    );
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&model(dir.path(), TinyArch::Gpt2, 13));
    let long = vec!["the"; 65].join(" ");
    let e = m
        .generate(&[long], &GenerateOptions::default())
        .unwrap_err();
    assert!(
        matches!(&e, NnError::Input(m) if m.contains("65 tokens")),
        "{e}"
    );
}
