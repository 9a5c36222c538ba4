//! Fisher: gradients against finite differences, the empirical Fisher
//! against squared gradients summed here, seeded reproducibility, the file.

#![allow(clippy::needless_range_loop)]

use std::path::{Path, PathBuf};

use tensormerge_core::DType;
use tensormerge_io::Model;
use tensormerge_nn::candle_core::Tensor;
use tensormerge_nn::fisher::{read_labeled, write_fisher};
use tensormerge_nn::tiny::{TinyArch, write_tiny_model};
use tensormerge_nn::{FisherOptions, NnError, Pipeline};

fn open(dir: &Path, arch: TinyArch, seed: u64) -> (PathBuf, Pipeline) {
    let p = write_tiny_model(&dir.join(format!("{arch:?}")), arch, seed, DType::F32).unwrap();
    let m = Pipeline::open(p.to_str().unwrap()).unwrap();
    (p, m)
}

/// Σ_t log p(ids[t+1] | ids[..=t]) in f64 from the model's logits.
fn log_lik(m: &Pipeline, ids: &[u32]) -> f64 {
    let l = m.logits(ids).unwrap();
    (0..ids.len() - 1)
        .map(|t| {
            let r = &l[t];
            let mx = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = r.iter().map(|&v| (v as f64 - mx).exp()).sum();
            r[ids[t + 1] as usize] as f64 - mx - z.ln()
        })
        .sum()
}

fn set(m: &Pipeline, name: &str, k: usize, value: f32) -> f32 {
    let var = m.weights().var(name).unwrap();
    let mut v = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let old = v[k];
    v[k] = value;
    var.set(&Tensor::from_vec(v, var.as_tensor().shape(), var.as_tensor().device()).unwrap())
        .unwrap();
    old
}

#[test]
fn gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = vec![2, 15, 30, 4, 7, 50, 12, 3];
    for arch in [TinyArch::Llama, TinyArch::Gpt2] {
        let (_, m) = open(dir.path(), arch, 21);
        let grads = m.log_likelihood_grad(&ids, &ids[1..]).unwrap();
        let mut checked = 0;
        for (t, g) in m.weights().tensors().iter().zip(&grads) {
            if g.is_empty() {
                assert!(t.name.ends_with("attn.bias"), "{} has no gradient", t.name);
                continue;
            }
            // the entry with the largest gradient, and one more
            let k = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            for k in [k, g.len() / 3] {
                let eps = 1e-2f32;
                let x = set(&m, &t.name, k, 0.0);
                set(&m, &t.name, k, x + eps);
                let up = log_lik(&m, &ids);
                set(&m, &t.name, k, x - eps);
                let down = log_lik(&m, &ids);
                set(&m, &t.name, k, x);
                let fd = (up - down) / (2.0 * eps as f64);
                let tol = 2e-3 + 2e-2 * fd.abs();
                assert!(
                    (fd - g[k] as f64).abs() <= tol,
                    "{arch:?} {}[{k}]: grad {} vs finite difference {fd}",
                    t.name,
                    g[k]
                );
                checked += 1;
            }
        }
        assert!(checked > 20);
    }
}

const TEXT: &str = "the court ruled on the claim . the tenant shall give notice to the landlord . \
    add the flour and the butter , then stir until golden . bake in the oven for minutes . \
    the judge ruled the contract was in breach .";

#[test]
fn empirical_fisher_is_the_mean_of_squared_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let (_, m) = open(dir.path(), TinyArch::Qwen2, 22);
    let opts = FisherOptions {
        samples: None,
        context: 8,
        empirical: true,
        seed: 0,
    };
    let mut calls = Vec::new();
    let f = m
        .fisher_lm(TEXT, &opts, &mut |d, n| calls.push((d, n)))
        .unwrap();
    let ids = m.encode(TEXT).unwrap();
    let nwin = ids.len() / 8;
    assert_eq!(f.samples, nwin);
    assert_eq!(calls, (1..=nwin).map(|d| (d, nwin)).collect::<Vec<_>>());
    // plain reference: non-overlapping windows, squared gradients summed
    let mut sum: Vec<Vec<f64>> = m
        .weights()
        .tensors()
        .iter()
        .map(|t| vec![0.0; t.numel()])
        .collect();
    for w in 0..nwin {
        let win = &ids[w * 8..w * 8 + 8];
        for (s, g) in sum
            .iter_mut()
            .zip(m.log_likelihood_grad(win, &win[1..]).unwrap())
        {
            for (s, g) in s.iter_mut().zip(g) {
                *s += (g as f64).powi(2);
            }
        }
    }
    assert_eq!(f.tensors.len(), m.weights().tensors().len());
    for ((info, got), want) in f.tensors.iter().zip(&sum) {
        assert_eq!(info.dtype, DType::F32);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            let w = w / nwin as f64;
            assert!(
                (*g as f64 - w).abs() <= 1e-6 * w.max(1e-3),
                "{}: {g} vs {w}",
                info.name
            );
        }
    }
    assert!(f.tensors.iter().any(|(_, v)| v.iter().any(|&x| x > 0.0)));
    // more samples than windows is refused for the empirical Fisher
    let e = m
        .fisher_lm(
            TEXT,
            &FisherOptions {
                samples: Some(nwin + 1),
                ..opts
            },
            &mut |_, _| {},
        )
        .unwrap_err();
    assert!(matches!(e, NnError::Input(_)), "{e}");
}

#[test]
fn true_fisher_is_seeded_and_written_as_the_models_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, m) = open(dir.path(), TinyArch::Gpt2, 23);
    let opts = FisherOptions {
        samples: Some(7),
        context: 8,
        empirical: false,
        seed: 3,
    };
    let a = m.fisher_lm(TEXT, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(a, m.fisher_lm(TEXT, &opts, &mut |_, _| {}).unwrap());
    assert_eq!(a.samples, 7); // cycles over the windows, new targets each time
    let b = m
        .fisher_lm(TEXT, &FisherOptions { seed: 4, ..opts }, &mut |_, _| {})
        .unwrap();
    assert_ne!(a, b);
    let emp = m
        .fisher_lm(
            TEXT,
            &FisherOptions {
                samples: None,
                empirical: true,
                ..opts
            },
            &mut |_, _| {},
        )
        .unwrap();
    assert_ne!(a.tensors, emp.tensors);

    let out = dir.path().join("f.safetensors");
    write_fisher(&out, &a).unwrap();
    let f = Model::open_path(&out).unwrap();
    let model = Model::open_path(&path).unwrap();
    let float: Vec<_> = model
        .layout()
        .tensors()
        .iter()
        .filter(|t| t.dtype.is_float())
        .collect();
    assert_eq!(f.layout().tensors().len(), float.len());
    for (t, (info, values)) in float.iter().zip(&a.tensors) {
        assert_eq!(f.tensor_info(&t.name).unwrap().shape, t.shape);
        assert_eq!(&f.read_f32_vec(&info.name).unwrap(), values);
    }
    // the mask buffer is not a parameter: zero Fisher
    assert!(
        f.read_f32_vec("transformer.h.0.attn.bias")
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    );
    assert_eq!(f.metadata().get("samples").map(String::as_str), Some("7"));
    assert_eq!(f.metadata().get("fisher").map(String::as_str), Some("true"));
    // no temporary file left behind
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_file())
            .count(),
        1
    );
}

#[test]
fn classifier_fisher_from_labelled_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (_, m) = open(dir.path(), TinyArch::BertClassifier, 24);
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, "text,label\nthe court ruled,legal\n\"add the flour, then stir\",1\nthe judge ruled on the claim,0\n").unwrap();
    let rows = read_labeled(&csv, &["legal".into(), "recipe".into()]).unwrap();
    assert_eq!(
        rows,
        vec![
            ("the court ruled".to_string(), 0),
            ("add the flour, then stir".to_string(), 1),
            ("the judge ruled on the claim".to_string(), 0),
        ]
    );
    let opts = FisherOptions {
        samples: None,
        context: 8,
        empirical: true,
        seed: 0,
    };
    let f = m.fisher_classifier(&rows, &opts, &mut |_, _| {}).unwrap();
    // empirical: mean over rows of the squared gradient of log p(label | text)
    let classifier = f
        .tensors
        .iter()
        .find(|(t, _)| t.name == "classifier.bias")
        .unwrap();
    let mut want = [0f64; 2];
    for (text, label) in &rows {
        let p = m.classify(text).unwrap();
        // d log softmax(z)_y / d b_k = [k == y] - p_k
        for k in 0..2 {
            want[k] += ((if k == *label { 1.0 } else { 0.0 }) - p[k] as f64).powi(2);
        }
    }
    for k in 0..2 {
        assert!(
            (classifier.1[k] as f64 - want[k] / 3.0).abs() < 1e-5,
            "{} vs {}",
            classifier.1[k],
            want[k] / 3.0
        );
    }
    let bad = dir.path().join("bad.tsv");
    std::fs::write(&bad, "the court\tcriminal\n").unwrap();
    let e = read_labeled(&bad, &["legal".into(), "recipe".into()]).unwrap_err();
    assert!(
        e.to_string().contains("bad.tsv:1") && e.to_string().contains("criminal"),
        "{e}"
    );
    assert!(matches!(
        m.fisher_lm("the court", &opts, &mut |_, _| {}),
        Err(NnError::Unsupported { .. })
    ));
}
