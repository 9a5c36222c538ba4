//! End-to-end runs of `tensormerge generate|perplexity|fisher` on tiny
//! random models written by the test (real `config.json`, `tokenizer.json`
//! and safetensors), checked against values the test computes from the
//! model's logits and gradients: argmax decoding, `exp(mean NLL)` over the
//! documented windows, summed squared gradients; the true Fisher's
//! reproducibility (same seed, 1 and 2 threads); `fisher` -> `merge` with
//! `merge_method: fisher` against the formula; and the bad inputs.

use std::path::{Path, PathBuf};
use std::process::Output;

use tensormerge::nn::tiny::{self, TinyArch};
use tensormerge::nn::{Pipeline, windows};
use tensormerge_core::DType;
use tensormerge_io::Model;

mod common;
use common::{fails, ok, run, text};

fn tiny_model(dir: &Path, name: &str, arch: TinyArch, seed: u64) -> String {
    tiny::write_tiny_model(&dir.join(name), arch, seed, DType::F32)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

const CORPUS: &str = "the court ruled on the claim and the judge ruled . bake the bread in the oven and the cook ruled on the bread .";

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let z: f64 = row.iter().map(|&x| ((x as f64) - m).exp()).sum();
    row.iter().map(|&x| (x as f64) - m - z.ln()).collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn generate_greedy_is_the_argmax_of_the_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in [TinyArch::Llama, TinyArch::Gpt2] {
        let m = tiny_model(tmp.path(), &format!("{arch:?}"), arch, 3);
        let prompts = ["the court ruled", "bake the bread"];
        let o = run(&[
            "generate",
            &m,
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--max-new-tokens",
            "6",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        let model = Pipeline::open(&m).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(&m).join("config.json")).unwrap(),
        )
        .unwrap();
        let eos: Vec<u32> = cfg["eos_token_id"]
            .as_u64()
            .map(|e| vec![e as u32])
            .unwrap_or_default();
        assert_eq!(v.as_array().unwrap().len(), 2);
        for (g, prompt) in v.as_array().unwrap().iter().zip(prompts) {
            assert_eq!(g["prompt"], prompt);
            let tokens: Vec<u32> = g["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            // Recompute: the argmax of the last position's logits, step by
            // step, until 6 tokens or an end-of-sequence token.
            let mut ids = model.encode(prompt).unwrap();
            let n0 = ids.len();
            while ids.len() - n0 < 6 {
                let logits = model.logits(&ids).unwrap();
                let next = argmax(logits.last().unwrap());
                ids.push(next);
                if eos.contains(&next) {
                    break;
                }
            }
            assert_eq!(tokens, ids[n0..].to_vec(), "{arch:?} {prompt}");
            assert_eq!(
                g["completion"].as_str().unwrap(),
                model.decode(&tokens).unwrap()
            );
        }
        // The text form: one block per prompt, prompt then completion.
        let plain = ok(&run(&[
            "generate",
            &m,
            "--prompt",
            prompts[0],
            "--greedy",
            "--max-new-tokens",
            "6",
        ]));
        let g0: Vec<u32> = v[0]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let mut all = model.encode(prompts[0]).unwrap();
        all.extend(g0);
        assert_eq!(
            plain,
            format!(
                "=== prompt 1: the court ruled\n{}\n",
                model.decode(&all).unwrap()
            )
        );
        assert!(
            plain.lines().nth(1).unwrap().starts_with("the court ruled"),
            "{plain}"
        );
    }
}

#[test]
fn generate_sampling_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path(), "m", TinyArch::Qwen2, 5);
    let gen_with = |seed: &str| {
        ok(&run(&[
            "generate",
            &m,
            "--prompt",
            "the court",
            "--prompt",
            "the bread",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
            "--json",
        ]))
    };
    let a = gen_with("1");
    assert_eq!(a, gen_with("1"));
    let seeds: Vec<String> = (2..6).map(|s| gen_with(&s.to_string())).collect();
    assert!(
        seeds.iter().any(|s| *s != a),
        "five seeds gave the same 24 sampled tokens"
    );
    // --greedy conflicts with sampling options (usage error).
    let o = run(&["generate", &m, "--prompt", "x", "--greedy", "--seed", "1"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn perplexity_is_exp_mean_nll_over_the_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tiny_model(tmp.path(), "a", TinyArch::Llama, 1);
    let b = tiny_model(tmp.path(), "b", TinyArch::Mistral, 2);
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS).unwrap();
    for (context, stride) in [(5usize, None), (6, Some(3usize))] {
        let mut args = vec![
            "perplexity".to_string(),
            a.clone(),
            b.clone(),
            "--text".into(),
            corpus.to_str().unwrap().into(),
            "--context".into(),
            context.to_string(),
            "--json".into(),
        ];
        if let Some(s) = stride {
            args.extend(["--stride".to_string(), s.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let v: serde_json::Value = serde_json::from_str(&ok(&run(&args))).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        for (row, m) in rows.iter().zip([&a, &b]) {
            assert_eq!(row["model"], m.as_str());
            let model = Pipeline::open(m).unwrap();
            let ids = model.encode(CORPUS).unwrap();
            // The documented windows, computed here: full windows every
            // `stride` tokens; each token scored once, never a window's first.
            let stride = stride.unwrap_or(context);
            let (mut nll, mut scored, mut nwin, mut prev_end) = (0.0f64, 0usize, 0usize, 0usize);
            let mut start = 0;
            while start + context <= ids.len() {
                let win = &ids[start..start + context];
                let logits = model.logits(win).unwrap();
                for t in (start + 1).max(prev_end)..start + context {
                    let lp = log_softmax(&logits[t - start - 1]);
                    nll -= lp[ids[t] as usize];
                    scored += 1;
                }
                prev_end = start + context;
                nwin += 1;
                start += stride;
            }
            assert_eq!(
                windows(ids.len(), context, stride).unwrap().len(),
                nwin,
                "library windows"
            );
            let mean = nll / scored as f64;
            assert_eq!(row["scored_tokens"], scored);
            assert_eq!(row["windows"], nwin);
            let got_nll = row["nll"].as_f64().unwrap();
            let got_ppl = row["perplexity"].as_f64().unwrap();
            assert!((got_nll - mean).abs() < 1e-4, "{got_nll} vs {mean}");
            assert!(
                (got_ppl - mean.exp()).abs() < 1e-4 * mean.exp(),
                "{got_ppl}"
            );
        }
    }
    // The plain form: one line per model, in order.
    let out = ok(&run(&[
        "perplexity",
        &a,
        &b,
        "--text",
        corpus.to_str().unwrap(),
        "--context",
        "5",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(&format!("{a}\tperplexity ")), "{out}");
    assert!(lines[1].starts_with(&format!("{b}\tperplexity ")), "{out}");
}

/// (name, shape, values) of each tensor of a Fisher file, in file order.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn read_fisher(path: &Path) -> (Tensors, String) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let samples = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("samples").cloned())
        .unwrap_or_default();
    let mut names: Vec<(usize, String)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (v.data().as_ptr() as usize, n))
        .collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|(_, n)| {
            let v = st.tensor(&n).unwrap();
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, v.shape().to_vec(), data)
        })
        .collect();
    (tensors, samples)
}

/// `tensormerge fisher MODEL --text TEXT -o OUT EXTRA...`
fn fisher_run(model: &str, text: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "fisher",
        model,
        "--text",
        text.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The reference Fisher: each sample's gradient (of the log-likelihood of
/// its targets) squared, summed in f64 and divided by the sample count.
fn mean_squared_grads(model: &Pipeline, samples: &[(Vec<u32>, Vec<u32>)]) -> Vec<Vec<f64>> {
    let infos = model.weights().tensors();
    let mut sums: Vec<Vec<f64>> = infos.iter().map(|t| vec![0.0; t.numel()]).collect();
    for (ids, targets) in samples {
        let g = model.log_likelihood_grad(ids, targets).unwrap();
        for (s, g) in sums.iter_mut().zip(g) {
            for (s, g) in s.iter_mut().zip(g) {
                *s += (g as f64) * (g as f64);
            }
        }
    }
    let n = samples.len() as f64;
    sums.iter_mut().flatten().for_each(|s| *s /= n);
    sums
}

#[test]
fn empirical_fisher_is_the_mean_squared_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path(), "m", TinyArch::Llama, 7);
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS).unwrap();
    let out = tmp.path().join("f.safetensors");
    ok(&fisher_run(
        &m,
        &corpus,
        &out,
        &["--context", "6", "--empirical"],
    ));
    let (tensors, samples) = read_fisher(&out);
    let model = Pipeline::open(&m).unwrap();
    let ids = model.encode(CORPUS).unwrap();
    let n = ids.len() / 6;
    assert_eq!(samples, n.to_string());
    // The reference: squared gradients of each window's summed
    // log-likelihood of its observed next tokens, averaged over windows.
    let wins: Vec<(Vec<u32>, Vec<u32>)> = (0..n)
        .map(|k| {
            (
                ids[k * 6..k * 6 + 6].to_vec(),
                ids[k * 6 + 1..k * 6 + 6].to_vec(),
            )
        })
        .collect();
    let sums = mean_squared_grads(&model, &wins);
    let infos = model.weights().tensors();
    assert_eq!(tensors.len(), infos.len());
    let mut nonzero = 0;
    for ((name, shape, data), (info, sum)) in tensors.iter().zip(infos.iter().zip(&sums)) {
        assert_eq!(
            (name, shape),
            (&info.name, &info.shape),
            "file order and shapes"
        );
        for (x, s) in data.iter().zip(sum) {
            let want = *s;
            assert!(
                ((*x as f64) - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "{name}: {x} vs {want}"
            );
            nonzero += (*x != 0.0) as usize;
        }
    }
    assert!(nonzero > 0);
}

#[test]
fn true_fisher_is_reproducible_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path(), "m", TinyArch::Gpt2, 4);
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS).unwrap();
    let fisher = |name: &str, seed: &str, jobs: &str| {
        let out = tmp.path().join(name);
        ok(&fisher_run(
            &m,
            &corpus,
            &out,
            &[
                "--context",
                "8",
                "--samples",
                "5",
                "--seed",
                seed,
                "-j",
                jobs,
            ],
        ));
        std::fs::read(out).unwrap()
    };
    let one = fisher("a1.safetensors", "3", "1");
    let two = fisher("a2.safetensors", "3", "2");
    assert!(one == two, "1 and 2 threads gave different files");
    assert!(one == fisher("a3.safetensors", "3", "2"));
    assert!(one != fisher("b.safetensors", "4", "2"), "the seed is used");
    // Five samples from fewer windows: windows are cycled.
    let (_, samples) = read_fisher(&tmp.path().join("a1.safetensors"));
    assert_eq!(samples, "5");
    // No temporary file left beside the outputs.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn classifier_fisher_reads_labelled_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path(), "m", TinyArch::BertClassifier, 2);
    let rows = tmp.path().join("rows.csv");
    std::fs::write(
        &rows,
        "text,label\nthe court ruled,1\n\"bake the bread, then the oven\",0\nthe judge ruled,1\n",
    )
    .unwrap();
    let out = tmp.path().join("f.safetensors");
    ok(&fisher_run(&m, &rows, &out, &["--empirical"]));
    let (tensors, samples) = read_fisher(&out);
    assert_eq!(samples, "3");
    let model = Pipeline::open(&m).unwrap();
    // Reference: the gradient of log softmax(classifier logits)[label].
    let texts = [
        ("the court ruled", 1u32),
        ("bake the bread, then the oven", 0),
        ("the judge ruled", 1),
    ];
    let rows: Vec<(Vec<u32>, Vec<u32>)> = texts
        .iter()
        .map(|(t, l)| (model.encode(t).unwrap(), vec![*l]))
        .collect();
    let sums = mean_squared_grads(&model, &rows);
    for ((name, _, data), sum) in tensors.iter().zip(&sums) {
        for (x, s) in data.iter().zip(sum) {
            let want = *s;
            assert!(
                ((*x as f64) - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "{name}: {x} vs {want}"
            );
        }
    }
}

#[test]
fn fisher_files_drive_a_fisher_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tiny_model(tmp.path(), "a", TinyArch::Llama, 11);
    let b = tiny_model(tmp.path(), "b", TinyArch::Llama, 12);
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS).unwrap();
    let fa = tmp.path().join("fa.safetensors");
    let fb = tmp.path().join("fb.safetensors");
    for (m, f, seed) in [(&a, &fa, "1"), (&b, &fb, "2")] {
        ok(&fisher_run(
            m,
            &corpus,
            f,
            &["--context", "6", "--seed", seed],
        ));
    }
    let cfg = tmp.path().join("merge.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: fisher\nmodels:\n  - model: {a}\n    parameters: {{fisher: {}, weight: 1.0}}\n  - model: {b}\n    parameters: {{fisher: {}, weight: 2.0}}\n",
            fa.display(),
            fb.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("merged");
    ok(&run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]));
    // The formula (METHODS.md, fisher): λ_j = weight_j / ||F_j||_2 over all
    // merged tensors, F̃ = max(F, 1e-6), out = Σ λ F̃ x / Σ λ F̃.
    let (ta, _) = read_fisher(&fa);
    let (tb, _) = read_fisher(&fb);
    let norm = |t: &Tensors| {
        t.iter()
            .flat_map(|(_, _, d)| d.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    };
    let (la, lb) = (1.0 / norm(&ta), 2.0 / norm(&tb));
    let (ma, mb, mo) = (
        Model::open(&a).unwrap(),
        Model::open(&b).unwrap(),
        Model::open(out.to_str().unwrap()).unwrap(),
    );
    for ((name, _, fa), (_, _, fb)) in ta.iter().zip(&tb) {
        let xa = ma.read_f32_vec(name).unwrap();
        let xb = mb.read_f32_vec(name).unwrap();
        let got = mo.read_f32_vec(name).unwrap();
        for i in 0..xa.len() {
            let (fa, fb) = ((fa[i] as f64).max(1e-6), (fb[i] as f64).max(1e-6));
            let want = (la * fa * xa[i] as f64 + lb * fb * xb[i] as f64) / (la * fa + lb * fb);
            assert!(
                (got[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{name}[{i}]: {} vs {want}",
                got[i]
            );
        }
    }
    // The merged model runs.
    ok(&run(&[
        "generate",
        out.to_str().unwrap(),
        "--prompt",
        "the court",
    ]));
}

#[test]
fn bad_inputs_are_named_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny_model(tmp.path(), "m", TinyArch::Llama, 1);
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS).unwrap();
    let c = corpus.to_str().unwrap();
    let out = tmp.path().join("f.safetensors");
    let o = out.to_str().unwrap();

    // An unsupported architecture lists the supported ones.
    let t5 = PathBuf::from(tiny_model(tmp.path(), "t5", TinyArch::Llama, 1));
    let cfg_path = t5.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = "t5".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let t5 = t5.to_str().unwrap();
    fails(
        &run(&["generate", t5, "--prompt", "x"]),
        1,
        &[
            "unsupported architecture",
            "\"t5\"",
            "llama",
            "gpt2",
            "bert",
        ],
    );

    // A missing tokenizer.json names the file and tokenizer_source.
    let notok = PathBuf::from(tiny_model(tmp.path(), "notok", TinyArch::Llama, 1));
    std::fs::remove_file(notok.join("tokenizer.json")).unwrap();
    fails(
        &run(&["perplexity", notok.to_str().unwrap(), "--text", c]),
        1,
        &["tokenizer.json", "tokenizer_source"],
    );

    // A text shorter than one window.
    fails(
        &run(&["perplexity", &m, "--text", c, "--context", "60"]),
        1,
        &["shorter than one window", "--context"],
    );
    fails(
        &run(&["fisher", &m, "--text", c, "-o", o, "--context", "60"]),
        1,
        &["shorter than one window"],
    );
    assert!(!out.exists());

    // A prompt longer than the context (the tiny Llama has 64 positions).
    let long = "the court ruled ".repeat(30);
    fails(
        &run(&["generate", &m, "--prompt", &long]),
        1,
        &["longer than the model's context"],
    );

    // Non-UTF-8 text names the file and the offset.
    let bin_text = tmp.path().join("latin1.txt");
    std::fs::write(&bin_text, b"the court \xe9 ruled").unwrap();
    fails(
        &run(&["perplexity", &m, "--text", bin_text.to_str().unwrap()]),
        1,
        &["latin1.txt", "not UTF-8", "offset 10"],
    );

    // An existing output is kept without --overwrite; the model's own
    // weights are never the output.
    std::fs::write(&out, b"keep").unwrap();
    fails(
        &run(&["fisher", &m, "--text", c, "-o", o, "--context", "6"]),
        2,
        &["--overwrite"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let own = Path::new(&m).join("model.safetensors");
    let before = std::fs::read(&own).unwrap();
    fails(
        &fisher_run(&m, &corpus, &own, &["--context", "6", "--overwrite"]),
        2,
        &["is a file of the model"],
    );
    assert_eq!(std::fs::read(&own).unwrap(), before);

    // A Fisher file that does not fit the model is refused by the merge,
    // naming the tensor, with nothing written.
    let other = tiny_model(tmp.path(), "gpt", TinyArch::Gpt2, 1);
    let fo = tmp.path().join("gpt.safetensors");
    ok(&fisher_run(&other, &corpus, &fo, &["--context", "6"]));
    let cfg = tmp.path().join("merge.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: fisher\nmodels:\n  - model: {m}\n    parameters: {{fisher: {}}}\n  - model: {m}\n    parameters: {{fisher: {}}}\n",
            fo.display(),
            fo.display()
        ),
    )
    .unwrap();
    let merged = tmp.path().join("merged");
    let r = run(&[
        "merge",
        cfg.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("gpt.safetensors"),
        "{}",
        text(&r.stderr)
    );
    assert!(!merged.exists());

    // A BERT encoder without a head cannot generate.
    let bert = tiny_model(tmp.path(), "bert", TinyArch::Bert, 1);
    fails(
        &run(&["generate", &bert, "--prompt", "the court"]),
        1,
        &["bert"],
    );
}
