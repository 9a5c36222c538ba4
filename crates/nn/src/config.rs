//! `config.json`: which architecture, and its dimensions.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{NnError, Result};

/// Dimensions of a Llama-family decoder (`llama`, `mistral`, `qwen2`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` as written (llama, mistral or qwen2).
    pub model_type: String,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` (SwiGLU width).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `num_key_value_heads` (grouped-query attention; default `num_heads`).
    pub num_kv_heads: usize,
    /// `head_dim` (default `hidden_size / num_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta` (default 10000).
    pub rope_theta: f64,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// `tie_word_embeddings`: the head reuses `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases (qwen2: always; others: `attention_bias`).
    pub attention_bias: bool,
    /// `sliding_window` (mistral, qwen2 with `use_sliding_window`), if any.
    pub sliding_window: Option<usize>,
}

/// Dimensions of GPT-2.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `n_embd`.
    pub hidden_size: usize,
    /// `n_layer`.
    pub num_layers: usize,
    /// `n_head`.
    pub num_heads: usize,
    /// `n_inner` (default `4 * n_embd`).
    pub inner_size: usize,
    /// `n_positions`.
    pub max_positions: usize,
    /// `layer_norm_epsilon`.
    pub layer_norm_eps: f64,
    /// `activation_function`.
    pub activation: Activation,
}

/// Dimensions of a BERT encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// `type_vocab_size`.
    pub type_vocab_size: usize,
    /// `layer_norm_eps`.
    pub layer_norm_eps: f64,
    /// `hidden_act`.
    pub activation: Activation,
    /// With `architectures: [BertForSequenceClassification]`: the number of
    /// labels (`num_labels`, or the size of `id2label`, default 2).
    pub num_labels: Option<usize>,
    /// Label names by id (`id2label`), if given.
    pub labels: Vec<String>,
}

/// Activation functions of the MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (`gelu`), through erf.
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu`/`swish`.
    Silu,
}

/// A supported architecture with its dimensions.
#[derive(Debug, Clone, PartialEq)]
pub enum ArchConfig {
    /// Llama, Mistral, Qwen2 (causal LM).
    Llama(LlamaConfig),
    /// GPT-2 (causal LM).
    Gpt2(Gpt2Config),
    /// BERT encoder, with a sequence-classification head when configured.
    Bert(BertConfig),
}

impl ArchConfig {
    /// A short name of the architecture (`llama`, `gpt2`, `bert`).
    pub fn name(&self) -> &'static str {
        match self {
            ArchConfig::Llama(_) => "llama",
            ArchConfig::Gpt2(_) => "gpt2",
            ArchConfig::Bert(_) => "bert",
        }
    }

    /// Whether the model predicts next tokens (can `generate`, `perplexity`).
    pub fn is_causal(&self) -> bool {
        !matches!(self, ArchConfig::Bert(_))
    }

    /// The longest sequence the model accepts (its position limit).
    pub fn max_positions(&self) -> usize {
        match self {
            ArchConfig::Llama(c) => c.max_positions,
            ArchConfig::Gpt2(c) => c.max_positions,
            ArchConfig::Bert(c) => c.max_positions,
        }
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ArchConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| NnError::File {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path)
    }

    /// Parses the text of a `config.json` (`path` is used in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<ArchConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| NnError::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        let c = Cfg {
            v: &v,
            path: path.to_path_buf(),
        };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let architectures: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match model_type {
            "llama" | "mistral" | "qwen2" => c.llama(model_type).map(ArchConfig::Llama),
            "gpt2" => c.gpt2().map(ArchConfig::Gpt2),
            "bert" => c.bert(&architectures).map(ArchConfig::Bert),
            _ => Err(NnError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: if architectures.is_empty() {
                    format!("model_type: {model_type:?}")
                } else {
                    format!("model_type: {model_type:?}, architectures: {architectures:?}")
                },
            }),
        }
    }
}

struct Cfg<'a> {
    v: &'a Value,
    path: PathBuf,
}

impl Cfg<'_> {
    fn err(&self, message: String) -> NnError {
        NnError::Config {
            path: self.path.clone(),
            message,
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` must be a positive integer, not {x}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("`{key}` is missing")))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, not {x}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, not {x}"))),
        }
    }

    fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = match self.v.get(key) {
            None | Some(Value::Null) => default,
            Some(x) => x
                .as_str()
                .ok_or_else(|| self.err(format!("`{key}` must be a string, not {x}")))?,
        };
        Ok(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(self.err(format!(
                    "`{key}: {other}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu)"
                )));
            }
        })
    }

    fn llama(&self, model_type: &str) -> Result<LlamaConfig> {
        let hidden_size = self.usize("hidden_size")?;
        let num_heads = self.usize("num_attention_heads")?;
        let num_kv_heads = self.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(self.err(format!(
                "`num_attention_heads` ({num_heads}) must be a multiple of `num_key_value_heads` ({num_kv_heads})"
            )));
        }
        let head_dim = match self.usize_opt("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(self.err(format!(
                    "`hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_heads}) and `head_dim` is not given"
                )));
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.err(format!(
                "head dimension {head_dim} must be even (rotary embedding)"
            )));
        }
        match self.v.get("rope_scaling") {
            None | Some(Value::Null) => {}
            Some(x) => {
                return Err(self.err(format!(
                    "`rope_scaling` ({x}) is not supported yet: only plain rotary embeddings (rope_scaling: null)"
                )));
            }
        }
        let sliding_window = match model_type {
            "mistral" => self.usize_opt("sliding_window")?,
            "qwen2" if self.bool_or("use_sliding_window", false)? => {
                self.usize_opt("sliding_window")?
            }
            _ => None,
        };
        Ok(LlamaConfig {
            model_type: model_type.to_string(),
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            num_layers: self.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: self.f64_or("rope_theta", 10000.0)?,
            max_positions: self.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            attention_bias: model_type == "qwen2" || self.bool_or("attention_bias", false)?,
            sliding_window,
        })
    }

    fn gpt2(&self) -> Result<Gpt2Config> {
        let hidden_size = self.usize("n_embd")?;
        let num_heads = self.usize("n_head")?;
        if hidden_size % num_heads != 0 {
            return Err(self.err(format!(
                "`n_embd` ({hidden_size}) must be a multiple of `n_head` ({num_heads})"
            )));
        }
        Ok(Gpt2Config {
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            num_layers: self.usize("n_layer")?,
            num_heads,
            inner_size: self.usize_opt("n_inner")?.unwrap_or(4 * hidden_size),
            max_positions: self.usize_opt("n_positions")?.unwrap_or(1024),
            layer_norm_eps: self.f64_or("layer_norm_epsilon", 1e-5)?,
            activation: self.activation("activation_function", "gelu_new")?,
        })
    }

    fn bert(&self, architectures: &[&str]) -> Result<BertConfig> {
        let hidden_size = self.usize("hidden_size")?;
        let num_heads = self.usize("num_attention_heads")?;
        if hidden_size % num_heads != 0 {
            return Err(self.err(format!(
                "`hidden_size` ({hidden_size}) must be a multiple of `num_attention_heads` ({num_heads})"
            )));
        }
        let mut labels: Vec<(usize, String)> = match self.v.get("id2label") {
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    let id = k
                        .parse::<usize>()
                        .map_err(|_| self.err(format!("`id2label` key `{k}` is not a label id")))?;
                    Ok((id, v.as_str().unwrap_or_default().to_string()))
                })
                .collect::<Result<_>>()?,
            _ => Vec::new(),
        };
        labels.sort();
        let labels: Vec<String> = labels.into_iter().map(|(_, l)| l).collect();
        let num_labels = if architectures.contains(&"BertForSequenceClassification") {
            Some(
                self.usize_opt("num_labels")?
                    .unwrap_or(if labels.is_empty() { 2 } else { labels.len() }),
            )
        } else {
            None
        };
        Ok(BertConfig {
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            num_layers: self.usize("num_hidden_layers")?,
            num_heads,
            intermediate_size: self.usize("intermediate_size")?,
            max_positions: self.usize_opt("max_position_embeddings")?.unwrap_or(512),
            type_vocab_size: self.usize_opt("type_vocab_size")?.unwrap_or(2),
            layer_norm_eps: self.f64_or("layer_norm_eps", 1e-12)?,
            activation: self.activation("hidden_act", "gelu")?,
            num_labels,
            labels,
        })
    }
}
