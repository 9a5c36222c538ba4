//! The forward passes: Llama family, GPT-2 and BERT, on one sequence.

use candle_core::{Device, Tensor};

use crate::Weights;
use crate::config::{ArchConfig, BertConfig, Gpt2Config, LlamaConfig};
use crate::error::{NnError, Result};
use crate::ops::{self, Ctx};

/// A checked architecture: the config, and the tensor-name prefix found in
/// the weights (`transformer.` for GPT-2 `GPT2LMHeadModel` checkpoints or
/// none for `GPT2Model`; `bert.` for BERT with a head or none).
#[derive(Debug, Clone)]
pub(crate) struct Net {
    pub cfg: ArchConfig,
    prefix: &'static str,
}

impl Net {
    /// Checks that `w` has every tensor `cfg` needs, with the right shapes.
    pub fn new(cfg: ArchConfig, w: &Weights) -> Result<Net> {
        let prefix = match &cfg {
            ArchConfig::Llama(_) => "",
            ArchConfig::Gpt2(_) => {
                if w.contains("transformer.wte.weight") {
                    "transformer."
                } else {
                    ""
                }
            }
            ArchConfig::Bert(_) => {
                if w.contains("bert.embeddings.word_embeddings.weight") {
                    "bert."
                } else {
                    ""
                }
            }
        };
        let net = Net { cfg, prefix };
        let arch = net.cfg.name();
        for (name, shape) in net.expected() {
            w.expect(&name, &shape, arch)?;
        }
        Ok(net)
    }

    /// Every tensor the forward pass reads, with its shape.
    fn expected(&self) -> Vec<(String, Vec<usize>)> {
        let p = self.prefix;
        let mut e: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |n: String, s: &[usize]| e.push((n, s.to_vec()));
        match &self.cfg {
            ArchConfig::Llama(c) => {
                let (h, i) = (c.hidden_size, c.intermediate_size);
                let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                add("model.embed_tokens.weight".into(), &[c.vocab_size, h]);
                for l in 0..c.num_layers {
                    let b = format!("model.layers.{l}.");
                    add(format!("{b}input_layernorm.weight"), &[h]);
                    add(format!("{b}post_attention_layernorm.weight"), &[h]);
                    for (n, o) in [("q", q), ("k", kv), ("v", kv)] {
                        add(format!("{b}self_attn.{n}_proj.weight"), &[o, h]);
                        if c.attention_bias {
                            add(format!("{b}self_attn.{n}_proj.bias"), &[o]);
                        }
                    }
                    add(format!("{b}self_attn.o_proj.weight"), &[h, q]);
                    add(format!("{b}mlp.gate_proj.weight"), &[i, h]);
                    add(format!("{b}mlp.up_proj.weight"), &[i, h]);
                    add(format!("{b}mlp.down_proj.weight"), &[h, i]);
                }
                add("model.norm.weight".into(), &[h]);
                if !c.tie_word_embeddings {
                    add("lm_head.weight".into(), &[c.vocab_size, h]);
                }
            }
            ArchConfig::Gpt2(c) => {
                let (h, i) = (c.hidden_size, c.inner_size);
                add(format!("{p}wte.weight"), &[c.vocab_size, h]);
                add(format!("{p}wpe.weight"), &[c.max_positions, h]);
                for l in 0..c.num_layers {
                    let b = format!("{p}h.{l}.");
                    for ln in ["ln_1", "ln_2"] {
                        add(format!("{b}{ln}.weight"), &[h]);
                        add(format!("{b}{ln}.bias"), &[h]);
                    }
                    add(format!("{b}attn.c_attn.weight"), &[h, 3 * h]);
                    add(format!("{b}attn.c_attn.bias"), &[3 * h]);
                    add(format!("{b}attn.c_proj.weight"), &[h, h]);
                    add(format!("{b}attn.c_proj.bias"), &[h]);
                    add(format!("{b}mlp.c_fc.weight"), &[h, i]);
                    add(format!("{b}mlp.c_fc.bias"), &[i]);
                    add(format!("{b}mlp.c_proj.weight"), &[i, h]);
                    add(format!("{b}mlp.c_proj.bias"), &[h]);
                }
                add(format!("{p}ln_f.weight"), &[h]);
                add(format!("{p}ln_f.bias"), &[h]);
            }
            ArchConfig::Bert(c) => {
                let (h, i) = (c.hidden_size, c.intermediate_size);
                let b = format!("{p}embeddings.");
                add(format!("{b}word_embeddings.weight"), &[c.vocab_size, h]);
                add(
                    format!("{b}position_embeddings.weight"),
                    &[c.max_positions, h],
                );
                add(
                    format!("{b}token_type_embeddings.weight"),
                    &[c.type_vocab_size, h],
                );
                add(format!("{b}LayerNorm.weight"), &[h]);
                add(format!("{b}LayerNorm.bias"), &[h]);
                for l in 0..c.num_layers {
                    let b = format!("{p}encoder.layer.{l}.");
                    for n in ["query", "key", "value"] {
                        add(format!("{b}attention.self.{n}.weight"), &[h, h]);
                        add(format!("{b}attention.self.{n}.bias"), &[h]);
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
                if let Some(n) = c.num_labels {
                    add(format!("{p}pooler.dense.weight"), &[h, h]);
                    add(format!("{p}pooler.dense.bias"), &[h]);
                    add("classifier.weight".into(), &[n, h]);
                    add("classifier.bias".into(), &[n]);
                }
            }
        }
        e
    }

    /// The forward pass on token ids `ids`: next-token logits `[t, vocab]`
    /// for causal LMs; for BERT the last hidden states `[t, hidden]`, or the
    /// classifier's logits `[1, num_labels]` when the model has the head.
    pub fn forward(&self, w: &Weights, ids: &[u32], track: bool) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(NnError::Input("no tokens to run the model on".into()));
        }
        let max = self.cfg.max_positions();
        if ids.len() > max {
            return Err(NnError::Input(format!(
                "{} tokens exceed the model's {max} positions",
                ids.len()
            )));
        }
        let cx = Ctx { w, track };
        let ids_t = Tensor::new(ids, &Device::Cpu)?;
        match &self.cfg {
            ArchConfig::Llama(c) => llama(&cx, c, &ids_t),
            ArchConfig::Gpt2(c) => gpt2(&cx, c, self.prefix, &ids_t),
            ArchConfig::Bert(c) => bert(&cx, c, self.prefix, &ids_t),
        }
    }
}

/// Llama/Mistral/Qwen2 (Touvron et al. 2023, arXiv:2302.13971): pre-RMSNorm
/// blocks, rotary embeddings, grouped-query attention (Ainslie et al. 2023,
/// arXiv:2305.13245), SwiGLU MLP (Shazeer 2020, arXiv:2002.05202).
fn llama(cx: &Ctx<'_>, c: &LlamaConfig, ids: &Tensor) -> Result<Tensor> {
    let t = ids.dim(0)?;
    let mut x = cx.embed("model.embed_tokens.weight", ids)?;
    let (cos, sin) = ops::rope_tables(t, c.head_dim, c.rope_theta)?;
    let mask = ops::causal_mask(t, c.sliding_window)?;
    let group = c.num_heads / c.num_kv_heads;
    let bias = |b: &str, n: &str| {
        c.attention_bias
            .then(|| format!("{b}self_attn.{n}_proj.bias"))
    };
    for l in 0..c.num_layers {
        let b = format!("model.layers.{l}.");
        let h = ops::rms_norm(
            &x,
            &cx.t(&format!("{b}input_layernorm.weight"))?,
            c.rms_norm_eps,
        )?;
        let proj = |n: &str| {
            cx.linear(
                &h,
                &format!("{b}self_attn.{n}_proj.weight"),
                bias(&b, n).as_deref(),
            )
        };
        let q = ops::rope(&ops::split_heads(&proj("q")?, c.num_heads)?, &cos, &sin)?;
        let k = ops::rope(&ops::split_heads(&proj("k")?, c.num_kv_heads)?, &cos, &sin)?;
        let v = ops::split_heads(&proj("v")?, c.num_kv_heads)?;
        let (k, v) = if group > 1 {
            let rep = |x: Tensor| -> Result<Tensor> {
                let (kv, t, d) = x.dims3()?;
                Ok(x.unsqueeze(1)?
                    .broadcast_as((kv, group, t, d))?
                    .contiguous()?
                    .reshape((kv * group, t, d))?)
            };
            (rep(k)?, rep(v)?)
        } else {
            (k, v)
        };
        let a = ops::merge_heads(&ops::attention(&q, &k, &v, Some(&mask))?)?;
        x = (x + cx.linear(&a, &format!("{b}self_attn.o_proj.weight"), None)?)?;
        let h = ops::rms_norm(
            &x,
            &cx.t(&format!("{b}post_attention_layernorm.weight"))?,
            c.rms_norm_eps,
        )?;
        let gate = cx
            .linear(&h, &format!("{b}mlp.gate_proj.weight"), None)?
            .silu()?;
        let up = cx.linear(&h, &format!("{b}mlp.up_proj.weight"), None)?;
        x = (x + cx.linear(&(gate * up)?, &format!("{b}mlp.down_proj.weight"), None)?)?;
    }
    let x = ops::rms_norm(&x, &cx.t("model.norm.weight")?, c.rms_norm_eps)?;
    let head = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    cx.linear(&x, head, None)
}

/// GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks,
/// `Conv1D` weights stored `[in, out]`, the head tied to `wte`.
fn gpt2(cx: &Ctx<'_>, c: &Gpt2Config, p: &str, ids: &Tensor) -> Result<Tensor> {
    let t = ids.dim(0)?;
    let pos = cx.t(&format!("{p}wpe.weight"))?.narrow(0, 0, t)?;
    let mut x = cx
        .embed(&format!("{p}wte.weight"), ids)?
        .broadcast_add(&pos)?;
    let mask = ops::causal_mask(t, None)?;
    let h_ = c.hidden_size;
    let eps = c.layer_norm_eps;
    let ln = |x: &Tensor, n: &str| -> Result<Tensor> {
        ops::layer_norm(
            x,
            &cx.t(&format!("{n}.weight"))?,
            &cx.t(&format!("{n}.bias"))?,
            eps,
        )
    };
    for l in 0..c.num_layers {
        let b = format!("{p}h.{l}.");
        let h = ln(&x, &format!("{b}ln_1"))?;
        let qkv = cx.conv1d(
            &h,
            &format!("{b}attn.c_attn.weight"),
            &format!("{b}attn.c_attn.bias"),
        )?;
        let heads = |i: usize| ops::split_heads(&qkv.narrow(1, i * h_, h_)?, c.num_heads);
        let a = ops::attention(&heads(0)?, &heads(1)?, &heads(2)?, Some(&mask))?;
        let a = cx.conv1d(
            &ops::merge_heads(&a)?,
            &format!("{b}attn.c_proj.weight"),
            &format!("{b}attn.c_proj.bias"),
        )?;
        x = (x + a)?;
        let h = ln(&x, &format!("{b}ln_2"))?;
        let m = cx.conv1d(
            &h,
            &format!("{b}mlp.c_fc.weight"),
            &format!("{b}mlp.c_fc.bias"),
        )?;
        let m = cx.conv1d(
            &ops::activate(&m, c.activation)?,
            &format!("{b}mlp.c_proj.weight"),
            &format!("{b}mlp.c_proj.bias"),
        )?;
        x = (x + m)?;
    }
    let x = ln(&x, &format!("{p}ln_f"))?;
    cx.linear(&x, &format!("{p}wte.weight"), None)
}

/// BERT (Devlin et al. 2018, arXiv:1810.04805): post-LayerNorm encoder,
/// bidirectional attention, one segment (token type 0); with the
/// sequence-classification head, `classifier(tanh(pooler([CLS])))` on the
/// first token.
fn bert(cx: &Ctx<'_>, c: &BertConfig, p: &str, ids: &Tensor) -> Result<Tensor> {
    let t = ids.dim(0)?;
    let e = format!("{p}embeddings.");
    let pos = cx
        .t(&format!("{e}position_embeddings.weight"))?
        .narrow(0, 0, t)?;
    let typ = cx
        .t(&format!("{e}token_type_embeddings.weight"))?
        .narrow(0, 0, 1)?;
    let x = cx
        .embed(&format!("{e}word_embeddings.weight"), ids)?
        .broadcast_add(&pos)?
        .broadcast_add(&typ)?;
    let eps = c.layer_norm_eps;
    let ln = |x: &Tensor, n: &str| -> Result<Tensor> {
        ops::layer_norm(
            x,
            &cx.t(&format!("{n}.weight"))?,
            &cx.t(&format!("{n}.bias"))?,
            eps,
        )
    };
    let lin =
        |x: &Tensor, n: &str| cx.linear(x, &format!("{n}.weight"), Some(&format!("{n}.bias")));
    let mut x = ln(&x, &format!("{e}LayerNorm"))?;
    for l in 0..c.num_layers {
        let b = format!("{p}encoder.layer.{l}.");
        let head =
            |n: &str| ops::split_heads(&lin(&x, &format!("{b}attention.self.{n}"))?, c.num_heads);
        let a = ops::attention(&head("query")?, &head("key")?, &head("value")?, None)?;
        let a = lin(
            &ops::merge_heads(&a)?,
            &format!("{b}attention.output.dense"),
        )?;
        x = ln(&(a + &x)?, &format!("{b}attention.output.LayerNorm"))?;
        let m = ops::activate(&lin(&x, &format!("{b}intermediate.dense"))?, c.activation)?;
        let m = lin(&m, &format!("{b}output.dense"))?;
        x = ln(&(m + &x)?, &format!("{b}output.LayerNorm"))?;
    }
    match c.num_labels {
        None => Ok(x),
        Some(_) => {
            let pooled = lin(&x.narrow(0, 0, 1)?, &format!("{p}pooler.dense"))?.tanh()?;
            lin(&pooled, "classifier")
        }
    }
}
