//! Tiny random checkpoints of every supported architecture, written as real
//! model directories (`config.json`, `tokenizer.json`, `model.safetensors`),
//! for tests, doctests and trying the commands without downloading a model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{ModelWriter, WriterOptions};
use tokenizers::Tokenizer;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;

use crate::error::{NnError, Result};

/// The words of the tiny models' tokenizer (after `[UNK]`, id 0, and
/// `</s>`, id 1, the end-of-sequence token): enough for the README's legal
/// and recipe sentences.
pub const WORDS: &[&str] = &[
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "with",
    "for",
    "on",
    "by",
    ".",
    ",",
    "court",
    "contract",
    "party",
    "shall",
    "law",
    "judge",
    "agreement",
    "claim",
    "liable",
    "rights",
    "breach",
    "appeal",
    "ruled",
    "tenant",
    "landlord",
    "notice",
    "salt",
    "flour",
    "butter",
    "sugar",
    "bake",
    "oven",
    "minutes",
    "stir",
    "mix",
    "eggs",
    "water",
    "heat",
    "pan",
    "add",
    "cook",
    "bowl",
    "dough",
    "recipe",
    "cup",
    "until",
    "golden",
    "then",
    "it",
    "this",
    "was",
    "be",
    "are",
    "at",
    "from",
    "or",
    "as",
];

/// An architecture of [`write_tiny_model`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// `llama`: grouped-query attention (4 heads, 2 key/value heads), untied head.
    Llama,
    /// `qwen2`: q/k/v biases, tied head.
    Qwen2,
    /// `mistral`: sliding window of 4 tokens.
    Mistral,
    /// `gpt2` (`GPT2LMHeadModel` names with `transformer.`, an `attn.bias` buffer).
    Gpt2,
    /// `bert` (`BertModel`: the encoder only).
    Bert,
    /// `bert` with `BertForSequenceClassification` (2 labels).
    BertClassifier,
}

impl TinyArch {
    /// Every tiny architecture.
    pub const ALL: [TinyArch; 6] = [
        TinyArch::Llama,
        TinyArch::Qwen2,
        TinyArch::Mistral,
        TinyArch::Gpt2,
        TinyArch::Bert,
        TinyArch::BertClassifier,
    ];
}

/// Vocabulary size of the tiny tokenizer.
pub fn vocab_size() -> usize {
    WORDS.len() + 2
}

/// Writes the tiny tokenizer (word level, whitespace pre-tokenizer) to
/// `dir/tokenizer.json`.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    vocab.insert("[UNK]".into(), 0);
    vocab.insert("</s>".into(), 1);
    for (i, w) in WORDS.iter().enumerate() {
        vocab.insert((*w).to_string(), i as u32 + 2);
    }
    let path = dir.join("tokenizer.json");
    let err = |e: tokenizers::Error| NnError::Tokenizer {
        path: path.clone(),
        message: e.to_string(),
    };
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(err)?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(&path, false).map_err(err)?;
    Ok(())
}

/// The config and tensors of a tiny model of `arch`.
pub fn tiny_layout(arch: TinyArch) -> (serde_json::Value, Vec<(String, Vec<usize>)>) {
    use serde_json::json;
    let v = vocab_size();
    let (h, l) = (16usize, 2usize);
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |n: String, s: &[usize]| t.push((n, s.to_vec()));
    let config = match arch {
        TinyArch::Llama | TinyArch::Qwen2 | TinyArch::Mistral => {
            let (heads, kv, i) = (4usize, 2usize, 24usize);
            let hd = h / heads;
            let bias = arch == TinyArch::Qwen2;
            let tie = arch == TinyArch::Qwen2;
            add("model.embed_tokens.weight".into(), &[v, h]);
            for n in 0..l {
                let b = format!("model.layers.{n}.");
                add(format!("{b}input_layernorm.weight"), &[h]);
                for (p, o) in [("q", heads * hd), ("k", kv * hd), ("v", kv * hd)] {
                    add(format!("{b}self_attn.{p}_proj.weight"), &[o, h]);
                    if bias {
                        add(format!("{b}self_attn.{p}_proj.bias"), &[o]);
                    }
                }
                add(format!("{b}self_attn.o_proj.weight"), &[h, heads * hd]);
                add(format!("{b}post_attention_layernorm.weight"), &[h]);
                add(format!("{b}mlp.gate_proj.weight"), &[i, h]);
                add(format!("{b}mlp.up_proj.weight"), &[i, h]);
                add(format!("{b}mlp.down_proj.weight"), &[h, i]);
            }
            add("model.norm.weight".into(), &[h]);
            if !tie {
                add("lm_head.weight".into(), &[v, h]);
            }
            let (mt, a) = match arch {
                TinyArch::Llama => ("llama", "LlamaForCausalLM"),
                TinyArch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
                _ => ("mistral", "MistralForCausalLM"),
            };
            json!({
                "architectures": [a], "model_type": mt, "vocab_size": v, "hidden_size": h,
                "intermediate_size": i, "num_hidden_layers": l, "num_attention_heads": heads,
                "num_key_value_heads": kv, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "max_position_embeddings": 64, "tie_word_embeddings": tie,
                "sliding_window": if arch == TinyArch::Mistral { json!(4) } else { json!(null) },
                "eos_token_id": 1, "torch_dtype": "float32"
            })
        }
        TinyArch::Gpt2 => {
            let p = "transformer.";
            add(format!("{p}wte.weight"), &[v, h]);
            add(format!("{p}wpe.weight"), &[64, h]);
            for n in 0..l {
                let b = format!("{p}h.{n}.");
                add(format!("{b}ln_1.weight"), &[h]);
                add(format!("{b}ln_1.bias"), &[h]);
                add(format!("{b}attn.bias"), &[1, 1, 64, 64]);
                add(format!("{b}attn.c_attn.weight"), &[h, 3 * h]);
                add(format!("{b}attn.c_attn.bias"), &[3 * h]);
                add(format!("{b}attn.c_proj.weight"), &[h, h]);
                add(format!("{b}attn.c_proj.bias"), &[h]);
                add(format!("{b}ln_2.weight"), &[h]);
                add(format!("{b}ln_2.bias"), &[h]);
                add(format!("{b}mlp.c_fc.weight"), &[h, 4 * h]);
                add(format!("{b}mlp.c_fc.bias"), &[4 * h]);
                add(format!("{b}mlp.c_proj.weight"), &[4 * h, h]);
                add(format!("{b}mlp.c_proj.bias"), &[h]);
            }
            add(format!("{p}ln_f.weight"), &[h]);
            add(format!("{p}ln_f.bias"), &[h]);
            json!({
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": v,
                "n_embd": h, "n_layer": l, "n_head": 4, "n_positions": 64,
                "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                "eos_token_id": 1, "torch_dtype": "float32"
            })
        }
        TinyArch::Bert | TinyArch::BertClassifier => {
            let cls = arch == TinyArch::BertClassifier;
            let p = if cls { "bert." } else { "" };
            let i = 32usize;
            add(format!("{p}embeddings.word_embeddings.weight"), &[v, h]);
            add(
                format!("{p}embeddings.position_embeddings.weight"),
                &[64, h],
            );
            add(
                format!("{p}embeddings.token_type_embeddings.weight"),
                &[2, h],
            );
            add(format!("{p}embeddings.LayerNorm.weight"), &[h]);
            add(format!("{p}embeddings.LayerNorm.bias"), &[h]);
            for n in 0..l {
                let b = format!("{p}encoder.layer.{n}.");
                for q in ["query", "key", "value"] {
                    add(format!("{b}attention.self.{q}.weight"), &[h, h]);
                    add(format!("{b}attention.self.{q}.bias"), &[h]);
                }
                add(format!("{b}attention.output.dense.weight"), &[h, h]);
                add(format!("{b}attention.output.dense.bias"), &[h]);
                add(format!("{b}attention.output.LayerNorm.weight"), &[h]);
                add(format!("{b}attention.output.LayerNorm.bias"), &[h]);
                add(format!("{b}intermediate.dense.weight"), &[i, h]);
                add(format!("{b}intermediate.dense.bias"), &[i]);
                add(format!("{b}output.dense.weight"), &[h, i]);
                add(format!("{b}output.dense.bias"), &[h]);
                add(format!("{b}output.LayerNorm.weight"), &[h]);
                add(format!("{b}output.LayerNorm.bias"), &[h]);
            }
            if cls {
                add(format!("{p}pooler.dense.weight"), &[h, h]);
                add(format!("{p}pooler.dense.bias"), &[h]);
                add("classifier.weight".into(), &[2, h]);
                add("classifier.bias".into(), &[2]);
            }
            let a = if cls {
                "BertForSequenceClassification"
            } else {
                "BertModel"
            };
            json!({
                "architectures": [a], "model_type": "bert", "vocab_size": v, "hidden_size": h,
                "num_hidden_layers": l, "num_attention_heads": 4, "intermediate_size": i,
                "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
                "hidden_act": "gelu", "id2label": {"0": "legal", "1": "recipe"},
                "torch_dtype": "float32"
            })
        }
    };
    (config, t)
}

/// Deterministic pseudo-random values for tensor `name`: uniform in
/// `[-0.5, 0.5)` for matrices, `1 + uniform / 5` for norm weights, small for
/// biases; the `attn.bias` buffer of GPT-2 is its causal 0/1 mask.
pub fn tiny_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with("attn.bias") {
        let t = shape[shape.len() - 1];
        return (0..n)
            .map(|k| if k % t <= (k / t) % t { 1.0 } else { 0.0 })
            .collect();
    }
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let h = name.bytes().fold(0xcbf29ce484222325u64, |a, b| {
        (a ^ b as u64).wrapping_mul(0x100000001b3)
    });
    r.set_stream(h);
    let mut u = || (r.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
    let is_norm = name.contains("norm") || name.contains("ln_") || name.contains("LayerNorm");
    (0..n)
        .map(|_| {
            if is_norm && name.ends_with("weight") {
                1.0 + u() / 5.0
            } else if name.ends_with("bias") {
                u() / 5.0
            } else {
                u()
            }
        })
        .collect()
}

/// Writes a tiny random model of `arch` into `dir` (created; replaced if it
/// exists): `config.json`, `tokenizer.json` and `model.safetensors` with
/// tensors in `dtype` (F32, BF16 or F16), values from [`tiny_values`].
pub fn write_tiny_model(dir: &Path, arch: TinyArch, seed: u64, dtype: DType) -> Result<PathBuf> {
    let (config, tensors) = tiny_layout(arch);
    write_model(dir, &config, &tensors, dtype, |n, s| {
        tiny_values(n, s, seed)
    })
}

/// Writes a model directory: `config` as `config.json`, the tiny
/// tokenizer, and `tensors` in `dtype` with values from `values(name, shape)`.
pub fn write_model(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>)],
    dtype: DType,
    mut values: impl FnMut(&str, &[usize]) -> Vec<f32>,
) -> Result<PathBuf> {
    let infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|(n, s)| TensorInfo::new(n.clone(), s.clone(), dtype))
        .collect();
    let opts = WriterOptions {
        overwrite: true,
        ..WriterOptions::default()
    };
    let mut w = ModelWriter::create(dir, infos, opts)?;
    for (n, s) in tensors {
        let bytes =
            convert::encode_f32_vec(dtype, &values(n, s)).map_err(|source| NnError::Core {
                context: format!("encoding tensor `{n}`"),
                source,
            })?;
        w.write(n, &bytes)?;
    }
    let path = w.finish()?;
    let cfg = path.join("config.json");
    let mut config = config.clone();
    config["torch_dtype"] = serde_json::Value::String(
        match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
        .into(),
    );
    std::fs::write(&cfg, serde_json::to_string_pretty(&config).expect("json"))
        .map_err(|source| NnError::File { path: cfg, source })?;
    write_tokenizer(&path)?;
    Ok(path)
}
