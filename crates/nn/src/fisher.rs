//! The diagonal Fisher information of a model, for Fisher merging (Matena &
//! Raffel 2022, arXiv:2111.09832).
//!
//! For a causal LM, one *sample* is one window of `context` tokens (the
//! non-overlapping windows of [`windows`] with
//! `stride = context`, taken in order and cycled when more samples are
//! asked for than there are windows). Its log-likelihood is summed over the
//! window's `context - 1` predictions, `ℓ = Σ_t log p(y_t | x_≤t)`, and
//!
//! `F = (1/N) Σ_n (∂ℓ_n/∂θ)²` (element-wise, over the N samples),
//!
//! where `y_t` is drawn from the model's own predictive distribution at
//! each position (the *true* Fisher, default; ChaCha8 seeded with `seed`,
//! stream = sample index, so the file depends only on the inputs and the
//! seed) or is the observed next token (`empirical`; the empirical Fisher,
//! at most one sample per window). For a BERT sequence classifier a sample
//! is one labelled text and `ℓ = log p(y | text)`, `y` drawn from the
//! classifier (true) or the given label (empirical).
//!
//! The result has every float tensor of the model, in its order, names and
//! shapes, as f32 (tensors the forward pass does not read, such as GPT-2's
//! `attn.bias` mask buffers, are zero): exactly what the `fisher` merge
//! method reads as a model's `fisher` parameter. [`write_fisher`] writes it
//! as one safetensors file, atomically, with the sample count in
//! `__metadata__`. Memory: the model, one gradient and the f64 sums.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{D, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tensormerge_core::{DType, TensorInfo};

use crate::config::ArchConfig;
use crate::error::{NnError, Result};
use crate::ops;
use crate::pipeline::{Pipeline, draw, windows};

/// Options of [`Pipeline::fisher_lm`] and [`Pipeline::fisher_classifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FisherOptions {
    /// Number of samples (default: one per window or labelled row).
    pub samples: Option<usize>,
    /// Tokens per window (causal LMs).
    pub context: usize,
    /// The empirical Fisher (observed targets) instead of the true one.
    pub empirical: bool,
    /// Seed of the sampled targets.
    pub seed: u64,
}

impl Default for FisherOptions {
    fn default() -> Self {
        FisherOptions {
            samples: None,
            context: 512,
            empirical: false,
            seed: 0,
        }
    }
}

/// A diagonal Fisher estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct FisherResult {
    /// Every float tensor of the model (as F32) with its Fisher values.
    pub tensors: Vec<(TensorInfo, Vec<f32>)>,
    /// Samples averaged.
    pub samples: usize,
    /// Whether this is the empirical Fisher.
    pub empirical: bool,
}

impl Pipeline {
    /// The gradient of `Σ_t log_softmax(logits)[t, targets[t]]` over the
    /// first `targets.len()` positions of `ids` (a causal LM), as one `Vec`
    /// per float tensor of [`Pipeline::weights`] (empty when the forward pass
    /// does not read the tensor).
    pub fn log_likelihood_grad(&self, ids: &[u32], targets: &[u32]) -> Result<Vec<Vec<f32>>> {
        let lp = ops::log_softmax(&self.net.forward(&self.weights, ids, true)?)?;
        self.grad_of(&lp, targets)
    }

    fn grad_of(&self, lp: &Tensor, targets: &[u32]) -> Result<Vec<Vec<f32>>> {
        let lp = lp.narrow(0, 0, targets.len())?;
        let idx = Tensor::new(targets, lp.device())?.unsqueeze(1)?;
        let ll = lp.gather(&idx, D::Minus1)?.sum_all()?;
        let grads = ll.backward()?;
        self.weights
            .tensors()
            .iter()
            .map(|t| {
                let var = self
                    .weights
                    .var(&t.name)
                    .expect("weights hold every tensor");
                Ok(match grads.get(var.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    None => Vec::new(),
                })
            })
            .collect()
    }

    fn fisher_run(
        &self,
        samples: usize,
        empirical: bool,
        seed: u64,
        progress: &mut dyn FnMut(usize, usize),
        mut sample: impl FnMut(usize) -> Result<(Tensor, Vec<u32>)>,
    ) -> Result<FisherResult> {
        let infos = self.weights.tensors();
        let mut acc: Vec<Vec<f64>> = infos.iter().map(|t| vec![0.0; t.numel()]).collect();
        for n in 0..samples {
            let (lp, observed) = sample(n)?;
            let targets = if empirical {
                observed
            } else {
                let mut r = ChaCha8Rng::seed_from_u64(seed);
                r.set_stream(n as u64);
                let p = lp
                    .narrow(0, 0, observed.len())?
                    .detach()
                    .exp()?
                    .to_vec2::<f32>()?;
                p.iter()
                    .map(|row| {
                        let row: Vec<f64> = row.iter().map(|&x| x as f64).collect();
                        draw(&row, &mut r) as u32
                    })
                    .collect()
            };
            for (a, g) in acc.iter_mut().zip(self.grad_of(&lp, &targets)?) {
                for (a, g) in a.iter_mut().zip(g) {
                    *a += (g as f64) * (g as f64);
                }
            }
            progress(n + 1, samples);
        }
        let tensors = infos
            .iter()
            .zip(acc)
            .map(|(t, a)| {
                let info = TensorInfo::new(t.name.clone(), t.shape.clone(), DType::F32);
                (
                    info,
                    a.into_iter().map(|x| (x / samples as f64) as f32).collect(),
                )
            })
            .collect();
        Ok(FisherResult {
            tensors,
            samples,
            empirical,
        })
    }

    /// The diagonal Fisher of a causal LM on `text` (see the [module docs](crate::fisher)).
    /// `progress(done, total)` is called after each sample.
    pub fn fisher_lm(
        &self,
        text: &str,
        opts: &FisherOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<FisherResult> {
        if !self.config().is_causal() {
            return Err(NnError::Unsupported {
                model: self.name().to_string(),
                message: "a BERT model's Fisher needs labelled rows (text,label)".into(),
            });
        }
        let max = self.config().max_positions();
        if opts.context > max {
            return Err(NnError::Input(format!(
                "--context {} is longer than the model's {max} positions",
                opts.context
            )));
        }
        let ids = self.encode(text)?;
        let ws = windows(ids.len(), opts.context, opts.context)?;
        let samples = opts.samples.unwrap_or(ws.len());
        check_samples(samples, ws.len(), opts.empirical, "windows")?;
        self.fisher_run(samples, opts.empirical, opts.seed, progress, |n| {
            let w = ws[n % ws.len()];
            let win = &ids[w.start..w.start + w.len];
            let lp = ops::log_softmax(&self.net.forward(&self.weights, win, true)?)?;
            Ok((lp, win[1..].to_vec()))
        })
    }

    /// The diagonal Fisher of a BERT sequence classifier on labelled texts
    /// (label ids); see the [module docs](crate::fisher).
    pub fn fisher_classifier(
        &self,
        rows: &[(String, usize)],
        opts: &FisherOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<FisherResult> {
        let labels = match self.config() {
            ArchConfig::Bert(c) => c.num_labels,
            _ => None,
        };
        let Some(labels) = labels else {
            return Err(NnError::Unsupported {
                model: self.name().to_string(),
                message: "labelled rows need a BertForSequenceClassification model".into(),
            });
        };
        if let Some((t, l)) = rows.iter().find(|(_, l)| *l >= labels) {
            return Err(NnError::Input(format!(
                "label {l} of {t:?} is not one of the model's {labels} labels"
            )));
        }
        let samples = opts.samples.unwrap_or(rows.len());
        check_samples(samples, rows.len(), opts.empirical, "rows")?;
        let encoded: Vec<Vec<u32>> = rows
            .iter()
            .map(|(t, _)| self.encode(t))
            .collect::<Result<_>>()?;
        self.fisher_run(samples, opts.empirical, opts.seed, progress, |n| {
            let k = n % rows.len();
            let lp = ops::log_softmax(&self.net.forward(&self.weights, &encoded[k], true)?)?;
            Ok((lp, vec![rows[k].1 as u32]))
        })
    }
}

fn check_samples(samples: usize, available: usize, empirical: bool, what: &str) -> Result<()> {
    if samples == 0 || available == 0 {
        return Err(NnError::Input(format!(
            "no samples: {available} {what}, --samples {samples}"
        )));
    }
    if empirical && samples > available {
        return Err(NnError::Input(format!(
            "--samples {samples} with --empirical: the text has only {available} {what} (the empirical Fisher takes each once)"
        )));
    }
    Ok(())
}

/// Reads labelled rows `text,label` (CSV) or `text<TAB>label` (TSV: a
/// `.tsv` file or a tab in the first line). The label is the last field: a
/// label id or a name from `labels` (`id2label`). A first row whose label is
/// `label` is a header. Text in double quotes is unquoted (`""` → `"`).
pub fn read_labeled(path: &Path, labels: &[String]) -> Result<Vec<(String, usize)>> {
    let text = crate::read_text(path)?;
    let tsv = path.extension().is_some_and(|e| e == "tsv")
        || text.lines().next().is_some_and(|l| l.contains('\t'));
    let sep = if tsv { '\t' } else { ',' };
    let names: HashMap<&str, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| NnError::Input(format!("{}:{}: {m}", path.display(), i + 1));
        let (t, l) = line
            .rsplit_once(sep)
            .ok_or_else(|| bad(format!("expected `text{sep}label`")))?;
        let l = l.trim();
        if i == 0 && l == "label" {
            continue;
        }
        let label = match l.parse::<usize>() {
            Ok(n) => n,
            Err(_) => *names.get(l).ok_or_else(|| {
                bad(format!(
                    "label `{l}` is neither a label id nor one of {labels:?}"
                ))
            })?,
        };
        let t = t.trim();
        let t = match t.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(q) => q.replace("\"\"", "\""),
            None => t.to_string(),
        };
        rows.push((t, label));
    }
    Ok(rows)
}

/// Writes `fisher` as one safetensors file at `path` (F32 tensors in the
/// model's order; `__metadata__` with `samples`, `fisher` = `true` or
/// `empirical`, and `format` = `pt`), into a temporary sibling renamed into
/// place, so an interrupted run never leaves a half-written file.
pub fn write_fisher(path: &Path, fisher: &FisherResult) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(NnError::Input(format!(
            "{}: the directory of the output does not exist",
            dir.display()
        )));
    }
    let bytes: Vec<Vec<u8>> = fisher
        .tensors
        .iter()
        .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let tensors: Vec<(TensorInfo, &[u8])> = fisher
        .tensors
        .iter()
        .zip(&bytes)
        .map(|((t, _), b)| {
            (
                TensorInfo::new(t.name.clone(), t.shape.clone(), DType::F32),
                &b[..],
            )
        })
        .collect();
    // A BTreeMap and our own header writer: the file's bytes depend only on
    // the result (the safetensors crate writes `__metadata__` from a HashMap,
    // in a different order on every run).
    let meta: BTreeMap<String, String> = [
        ("samples".to_string(), fisher.samples.to_string()),
        (
            "fisher".to_string(),
            if fisher.empirical {
                "empirical"
            } else {
                "true"
            }
            .to_string(),
        ),
        ("format".to_string(), "pt".to_string()),
    ]
    .into_iter()
    .collect();
    // Atomic: a temporary sibling renamed into place (io::write_safetensors).
    tensormerge_io::write_safetensors(path, &tensors, &meta)?;
    Ok(path.to_path_buf())
}
