//! A runnable model: weights, architecture and tokenizer, with `generate`,
//! `perplexity`, `classify` and `embed`.

use std::path::Path;

use candle_core::{D, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tensormerge_core::{ModelTensorMapper, ParamVector};
use tensormerge_io::Model;
use tokenizers::Tokenizer;

use crate::Weights;
use crate::config::ArchConfig;
use crate::error::{NnError, Result};
use crate::net::Net;
use crate::ops;

/// A model ready to run: its weights (f32), architecture and tokenizer.
#[derive(Debug)]
pub struct Pipeline {
    pub(crate) weights: Weights,
    pub(crate) net: Net,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    name: String,
}

/// How `generate` picks each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties), as `transformers`'
    /// `generate(do_sample=False)`.
    Greedy,
    /// Nucleus sampling (Holtzman et al. 2019, arXiv:1904.09751): softmax of
    /// `logits / temperature`, keep the most likely tokens until their
    /// probability reaches `top_p`, draw from them. Prompt `i` of a batch
    /// draws from ChaCha8 seeded with `seed`, stream `i`.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Probability mass kept, in (0, 1].
        top_p: f64,
        /// Random seed.
        seed: u64,
    },
}

/// Options of [`Pipeline::generate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// Largest number of new tokens (generation also stops after an
    /// end-of-sequence token of `config.json`'s `eos_token_id`).
    pub max_new_tokens: usize,
    /// How tokens are picked.
    pub sampling: Sampling,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 20,
            sampling: Sampling::Greedy,
        }
    }
}

/// One prompt's generation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Generation {
    /// The prompt.
    pub prompt: String,
    /// The decoded new tokens (special tokens skipped).
    pub completion: String,
    /// The new token ids.
    pub tokens: Vec<u32>,
}

/// Options of [`Pipeline::perplexity`]; see [`windows`] for the windowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerplexityOptions {
    /// Tokens per window.
    pub context: usize,
    /// Distance between window starts (default: `context`, non-overlapping).
    pub stride: Option<usize>,
    /// Use only the first this many tokens of the text.
    pub max_tokens: Option<usize>,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions {
            context: 512,
            stride: None,
            max_tokens: None,
        }
    }
}

/// The result of [`Pipeline::perplexity`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood (nats) per scored token.
    pub nll: f64,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// Windows run.
    pub windows: usize,
    /// Tokens of the text used (after `max_tokens`).
    pub tokens: usize,
}

/// One window of [`windows`]: the model runs on tokens `start..start+len`
/// and scores the predictions of tokens `score_from..start+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First token of the window.
    pub start: usize,
    /// First scored token (always after `start`).
    pub score_from: usize,
    /// Tokens in the window.
    pub len: usize,
}

/// The perplexity windows over `n` tokens.
///
/// Windows of exactly `context` tokens start at `0, stride, 2·stride, …`
/// while they fit (`start + context <= n`; tokens after the last full window
/// are not used). Window `k` scores the tokens from
/// `max(start_k + 1, end_{k-1})` to its end: the first token of each window
/// has no context and is never scored, and with overlapping windows
/// (`stride < context`) each token is scored once, by the first window that
/// sees it with context. With the default `stride = context` the windows do
/// not overlap and each scores `context - 1` tokens.
///
/// ```
/// use tensormerge_nn::{windows, Window};
/// let w = windows(10, 4, 4).unwrap();
/// assert_eq!(w, vec![
///     Window { start: 0, score_from: 1, len: 4 },
///     Window { start: 4, score_from: 5, len: 4 },
/// ]);
/// let w = windows(6, 4, 2).unwrap();
/// assert_eq!(w[1], Window { start: 2, score_from: 4, len: 4 });
/// ```
pub fn windows(n: usize, context: usize, stride: usize) -> Result<Vec<Window>> {
    if context < 2 {
        return Err(NnError::Input(format!(
            "--context {context}: a window needs at least 2 tokens"
        )));
    }
    if stride == 0 || stride > context {
        return Err(NnError::Input(format!(
            "--stride {stride}: must be between 1 and the context ({context})"
        )));
    }
    if n < context {
        return Err(NnError::Input(format!(
            "the text has {n} tokens, shorter than one window of {context}: give a longer text or a smaller --context"
        )));
    }
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut start = 0;
    while start + context <= n {
        let end = start + context;
        out.push(Window {
            start,
            score_from: (start + 1).max(prev_end),
            len: context,
        });
        prev_end = end;
        start += stride;
    }
    Ok(out)
}

/// Reads a UTF-8 text file; invalid UTF-8 is an error naming the file and
/// the byte offset.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| NnError::File {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        NnError::Input(format!(
            "{}: not UTF-8 text (invalid byte at offset {}); convert it to UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(NnError::Tokenizer {
            path,
            message: "file not found".into(),
        });
    }
    Tokenizer::from_file(&path).map_err(|e| NnError::Tokenizer {
        path: path.clone(),
        message: e.to_string(),
    })
}

fn eos_ids(dir: &Path) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Pipeline {
    /// Opens a model directory (or `.safetensors` file next to its
    /// `config.json`, or cached hub id): weights in f32, the architecture
    /// from `config.json`, the tokenizer from `tokenizer.json`.
    pub fn open(reference: &str) -> Result<Pipeline> {
        let model = Model::open(reference)?;
        let weights = Weights::from_model(&model)?;
        Self::assemble(weights, model.dir(), model.name())
    }

    /// Runs `vector` (laid out by `mapper`) as the model `template` is:
    /// `template`'s `config.json` and `tokenizer.json`, the vector's weights
    /// rounded to the mapper's dtypes. Nothing is written to disk; the logits
    /// equal those of the directory `mapper.save(vector, .., template, ..)`
    /// writes, bit for bit.
    pub fn from_vector(
        mapper: &ModelTensorMapper,
        vector: &ParamVector,
        template: &Model,
    ) -> Result<Pipeline> {
        let name = format!("{} (in memory)", template.name());
        let weights = Weights::from_vector(mapper, vector, &name)?;
        Self::assemble(weights, template.dir(), &name)
    }

    /// Runs `weights` with the `config.json` and `tokenizer.json` of `dir`.
    pub fn from_weights(weights: Weights, dir: &Path) -> Result<Pipeline> {
        let name = weights.model().to_string();
        Self::assemble(weights, dir, &name)
    }

    fn assemble(weights: Weights, dir: &Path, name: &str) -> Result<Pipeline> {
        let cfg = ArchConfig::from_dir(dir)?;
        let net = Net::new(cfg, &weights)?;
        let tokenizer = load_tokenizer(dir)?;
        Ok(Pipeline {
            weights,
            net,
            tokenizer,
            eos: eos_ids(dir),
            name: name.to_string(),
        })
    }

    /// The model's name (its path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture and its dimensions.
    pub fn config(&self) -> &ArchConfig {
        &self.net.cfg
    }

    /// The weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` (with the tokenizer's special tokens, e.g. BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| NnError::Input(format!("cannot tokenize the text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of token ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| NnError::Input(format!("cannot decode tokens {ids:?}: {e}")))
    }

    /// The raw forward pass on `ids`: logits `[t, vocab]` for a causal LM;
    /// for BERT the last hidden states `[t, hidden]`, or the classifier
    /// logits `[1, labels]` with a classification head.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        self.net.forward(&self.weights, ids, false)
    }

    /// Next-token logits `[t][vocab]` of a causal LM on `ids`.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.causal()?;
        Ok(self.forward(ids)?.to_vec2::<f32>()?)
    }

    fn causal(&self) -> Result<()> {
        if self.net.cfg.is_causal() {
            Ok(())
        } else {
            Err(NnError::Unsupported {
                model: self.name.clone(),
                message: "a BERT encoder does not predict next tokens (use classify or embed)"
                    .into(),
            })
        }
    }

    /// Generates a continuation of each prompt; prompt `i` samples from
    /// random stream `i` (see [`Sampling`]). The model is run on the whole
    /// sequence for each new token (no cache).
    pub fn generate(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        self.causal()?;
        if let Sampling::TopP {
            temperature, top_p, ..
        } = opts.sampling
            && (temperature.is_nan()
                || temperature <= 0.0
                || top_p.is_nan()
                || top_p <= 0.0
                || top_p > 1.0)
        {
            return Err(NnError::Input(format!(
                "--temperature {temperature} --top-p {top_p}: the temperature must be > 0 and top-p in (0, 1]"
            )));
        }
        let max = self.net.cfg.max_positions();
        prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let mut ids = self.encode(prompt)?;
                if ids.is_empty() {
                    return Err(NnError::Input(format!("prompt {prompt:?} has no tokens")));
                }
                if ids.len() > max {
                    return Err(NnError::Input(format!(
                        "prompt {prompt:?} has {} tokens, longer than the model's context of {max}",
                        ids.len()
                    )));
                }
                let n0 = ids.len();
                let mut rng = match opts.sampling {
                    Sampling::TopP { seed, .. } => {
                        let mut r = ChaCha8Rng::seed_from_u64(seed);
                        r.set_stream(i as u64);
                        Some(r)
                    }
                    Sampling::Greedy => None,
                };
                while ids.len() - n0 < opts.max_new_tokens && ids.len() < max {
                    let logits = self.forward(&ids)?;
                    let last: Vec<f32> = logits.get(ids.len() - 1)?.to_vec1()?;
                    let next = match (opts.sampling, rng.as_mut()) {
                        (
                            Sampling::TopP {
                                temperature, top_p, ..
                            },
                            Some(r),
                        ) => sample_top_p(&last, temperature, top_p, r),
                        _ => argmax(&last),
                    };
                    ids.push(next);
                    if self.eos.contains(&next) {
                        break;
                    }
                }
                let tokens = ids[n0..].to_vec();
                Ok(Generation {
                    prompt: prompt.clone(),
                    completion: self.decode(&tokens)?,
                    tokens,
                })
            })
            .collect()
    }

    /// Perplexity of a causal LM on `text` (tokenized with special tokens),
    /// windowed as [`windows`] says.
    pub fn perplexity(&self, text: &str, opts: &PerplexityOptions) -> Result<Perplexity> {
        let ids = self.encode(text)?;
        self.perplexity_ids(&ids, opts)
    }

    /// [`Pipeline::perplexity`] on token ids.
    pub fn perplexity_ids(&self, ids: &[u32], opts: &PerplexityOptions) -> Result<Perplexity> {
        self.causal()?;
        let max = self.net.cfg.max_positions();
        if opts.context > max {
            return Err(NnError::Input(format!(
                "--context {} is longer than the model's {max} positions",
                opts.context
            )));
        }
        let n = opts.max_tokens.map_or(ids.len(), |m| m.min(ids.len()));
        let ws = windows(n, opts.context, opts.stride.unwrap_or(opts.context))?;
        let mut nll = 0f64;
        let mut scored = 0usize;
        for w in &ws {
            let win = &ids[w.start..w.start + w.len];
            let lp = ops::log_softmax(&self.forward(win)?)?;
            // position j predicts token j + 1
            let from = w.score_from - w.start - 1;
            let targets: Vec<u32> = win[from + 1..].to_vec();
            let lp = lp.narrow(0, from, targets.len())?;
            let idx = Tensor::new(targets.as_slice(), lp.device())?.unsqueeze(1)?;
            let picked: Vec<f32> = lp.gather(&idx, D::Minus1)?.squeeze(1)?.to_vec1()?;
            nll -= picked.iter().map(|&x| x as f64).sum::<f64>();
            scored += picked.len();
        }
        let mean = nll / scored as f64;
        Ok(Perplexity {
            perplexity: mean.exp(),
            nll: mean,
            scored_tokens: scored,
            windows: ws.len(),
            tokens: n,
        })
    }

    /// Class probabilities of a BERT sequence classifier on `text`.
    pub fn classify(&self, text: &str) -> Result<Vec<f32>> {
        let ids = self.encode(text)?;
        self.classify_ids(&ids)
    }

    /// [`Pipeline::classify`] on token ids.
    pub fn classify_ids(&self, ids: &[u32]) -> Result<Vec<f32>> {
        match &self.net.cfg {
            ArchConfig::Bert(c) if c.num_labels.is_some() => {}
            _ => {
                return Err(NnError::Unsupported {
                    model: self.name.clone(),
                    message: "only a BertForSequenceClassification model classifies".into(),
                });
            }
        }
        Ok(ops::softmax(&self.forward(ids)?)?.squeeze(0)?.to_vec1()?)
    }

    /// Mean of a BERT encoder's last hidden states over the tokens of `text`.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        match &self.net.cfg {
            ArchConfig::Bert(c) if c.num_labels.is_none() => {}
            _ => {
                return Err(NnError::Unsupported {
                    model: self.name.clone(),
                    message: "only a BERT encoder without a head embeds text".into(),
                });
            }
        }
        let ids = self.encode(text)?;
        Ok(self.forward(&ids)?.mean(0)?.to_vec1()?)
    }
}

/// Index of the largest value (the first one on ties), as `torch.argmax`.
pub(crate) fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// A uniform draw in [0, 1) from the top 53 bits of one `next_u64`.
pub(crate) fn uniform(r: &mut ChaCha8Rng) -> f64 {
    (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Draws an index with probability `p[i] / Σp` (walking in index order).
pub(crate) fn draw(p: &[f64], r: &mut ChaCha8Rng) -> usize {
    let total: f64 = p.iter().sum();
    let mut u = uniform(r) * total;
    for (i, &x) in p.iter().enumerate() {
        if u < x {
            return i;
        }
        u -= x;
    }
    p.iter().rposition(|&x| x > 0.0).unwrap_or(0)
}

fn sample_top_p(logits: &[f32], temperature: f64, top_p: f64, r: &mut ChaCha8Rng) -> u32 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let p: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - m) / temperature).exp())
        .collect();
    let total: f64 = p.iter().sum();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for &i in &order {
        kept.push(i);
        mass += p[i] / total;
        if mass >= top_p {
            break;
        }
    }
    let probs: Vec<f64> = kept.iter().map(|&i| p[i]).collect();
    kept[draw(&probs, r)] as u32
}
