//! An independent plain-Rust (f64, no candle) forward pass of the tiny
//! models, written from the `transformers` definitions, to check the crate
//! against.
#![allow(dead_code)]

use std::collections::HashMap;

use tensormerge_io::Model;

pub struct W(pub HashMap<String, (Vec<usize>, Vec<f64>)>);

impl W {
    pub fn open(dir: &std::path::Path) -> W {
        let m = Model::open_path(dir).unwrap();
        let mut h = HashMap::new();
        for t in m.layout().tensors() {
            let v = m
                .read_f32_vec(&t.name)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            h.insert(t.name.clone(), (t.shape.clone(), v));
        }
        W(h)
    }
    pub fn get(&self, n: &str) -> &[f64] {
        &self.0.get(n).unwrap_or_else(|| panic!("no tensor {n}")).1
    }
    pub fn shape(&self, n: &str) -> &[usize] {
        &self.0[n].0
    }
}

pub type M = Vec<Vec<f64>>;

/// y = x Wᵀ + b, W [out, in].
pub fn linear(x: &M, w: &[f64], b: Option<&[f64]>) -> M {
    let inn = x[0].len();
    let out = w.len() / inn;
    x.iter()
        .map(|r| {
            (0..out)
                .map(|o| {
                    let s: f64 = (0..inn).map(|i| w[o * inn + i] * r[i]).sum();
                    s + b.map_or(0.0, |b| b[o])
                })
                .collect()
        })
        .collect()
}

/// y = x W + b, W [in, out] (GPT-2 Conv1D).
pub fn conv1d(x: &M, w: &[f64], b: &[f64]) -> M {
    let inn = x[0].len();
    let out = w.len() / inn;
    x.iter()
        .map(|r| {
            (0..out)
                .map(|o| (0..inn).map(|i| w[i * out + o] * r[i]).sum::<f64>() + b[o])
                .collect()
        })
        .collect()
}

pub fn rms(x: &M, g: &[f64], eps: f64) -> M {
    x.iter()
        .map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
            let s = 1.0 / (ms + eps).sqrt();
            r.iter().zip(g).map(|(v, g)| v * s * g).collect()
        })
        .collect()
}

pub fn ln(x: &M, g: &[f64], b: &[f64], eps: f64) -> M {
    x.iter()
        .map(|r| {
            let n = r.len() as f64;
            let mean = r.iter().sum::<f64>() / n;
            let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            r.iter()
                .zip(g.iter().zip(b))
                .map(|(v, (g, b))| (v - mean) / (var + eps).sqrt() * g + b)
                .collect()
        })
        .collect()
}

/// erf by its Maclaurin series (|x| < 3) or continued fraction tail; the
/// values in the tests are small.
pub fn erf(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    let mut sum = 0.0;
    let mut term = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 || n < 5.0 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
        if n > 200.0 {
            break;
        }
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

pub fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

pub fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

pub fn add(a: &M, b: &M) -> M {
    a.iter()
        .zip(b)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x + y).collect())
        .collect()
}

/// Attention of head slices: q [t, heads*d], k/v [t, kv*d]; query head h
/// uses key/value head h / (heads/kv); `visible(i, j)`.
pub fn attn(
    q: &M,
    k: &M,
    v: &M,
    heads: usize,
    kv: usize,
    visible: impl Fn(usize, usize) -> bool,
) -> M {
    let t = q.len();
    let d = q[0].len() / heads;
    let g = heads / kv;
    let mut out = vec![vec![0.0; heads * d]; t];
    for h in 0..heads {
        let kh = h / g;
        for i in 0..t {
            let mut s: Vec<(usize, f64)> = Vec::new();
            for j in 0..t {
                if visible(i, j) {
                    let dot: f64 = (0..d).map(|e| q[i][h * d + e] * k[j][kh * d + e]).sum();
                    s.push((j, dot / (d as f64).sqrt()));
                }
            }
            let m = s.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x.1 - m).exp()).sum();
            for (j, sc) in s {
                let p = (sc - m).exp() / z;
                for e in 0..d {
                    out[i][h * d + e] += p * v[j][kh * d + e];
                }
            }
        }
    }
    out
}

/// Hugging Face rotary embedding on [t, heads*d], rotate_half layout.
pub fn rope(x: &M, heads: usize, theta: f64) -> M {
    let d = x[0].len() / heads;
    let half = d / 2;
    x.iter()
        .enumerate()
        .map(|(p, r)| {
            let mut o = r.clone();
            for h in 0..heads {
                for i in 0..half {
                    let a = p as f64 * theta.powf(-(2.0 * i as f64) / d as f64);
                    let (x1, x2) = (r[h * d + i], r[h * d + half + i]);
                    o[h * d + i] = x1 * a.cos() - x2 * a.sin();
                    o[h * d + half + i] = x2 * a.cos() + x1 * a.sin();
                }
            }
            o
        })
        .collect()
}

pub fn embed(w: &[f64], dim: usize, ids: &[u32]) -> M {
    ids.iter()
        .map(|&i| w[i as usize * dim..(i as usize + 1) * dim].to_vec())
        .collect()
}

pub fn cfg(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// Llama/Qwen2/Mistral logits.
pub fn llama(dir: &std::path::Path, ids: &[u32]) -> M {
    let c = cfg(dir);
    let w = W::open(dir);
    let h = c["hidden_size"].as_u64().unwrap() as usize;
    let heads = c["num_attention_heads"].as_u64().unwrap() as usize;
    let kv = c["num_key_value_heads"].as_u64().unwrap() as usize;
    let eps = c["rms_norm_eps"].as_f64().unwrap();
    let theta = c["rope_theta"].as_f64().unwrap();
    let window = c["sliding_window"].as_u64().map(|x| x as usize);
    let mt = c["model_type"].as_str().unwrap();
    let bias = mt == "qwen2";
    let window = if mt == "mistral" { window } else { None };
    let mut x = embed(w.get("model.embed_tokens.weight"), h, ids);
    for l in 0..c["num_hidden_layers"].as_u64().unwrap() as usize {
        let b = format!("model.layers.{l}.");
        let hn = rms(&x, w.get(&format!("{b}input_layernorm.weight")), eps);
        let p = |n: &str| {
            linear(
                &hn,
                w.get(&format!("{b}self_attn.{n}_proj.weight")),
                bias.then(|| w.get(&format!("{b}self_attn.{n}_proj.bias"))),
            )
        };
        let q = rope(&p("q"), heads, theta);
        let k = rope(&p("k"), kv, theta);
        let v = p("v");
        let a = attn(&q, &k, &v, heads, kv, |i, j| {
            j <= i && window.is_none_or(|w| i - j < w)
        });
        x = add(
            &x,
            &linear(&a, w.get(&format!("{b}self_attn.o_proj.weight")), None),
        );
        let hn = rms(
            &x,
            w.get(&format!("{b}post_attention_layernorm.weight")),
            eps,
        );
        let g = linear(&hn, w.get(&format!("{b}mlp.gate_proj.weight")), None);
        let u = linear(&hn, w.get(&format!("{b}mlp.up_proj.weight")), None);
        let m: M = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g.iter().zip(u).map(|(g, u)| silu(*g) * u).collect())
            .collect();
        x = add(
            &x,
            &linear(&m, w.get(&format!("{b}mlp.down_proj.weight")), None),
        );
    }
    let x = rms(&x, w.get("model.norm.weight"), eps);
    let head = if c["tie_word_embeddings"].as_bool().unwrap_or(false) {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    linear(&x, w.get(head), None)
}

/// GPT-2 logits (names with `transformer.`).
pub fn gpt2(dir: &std::path::Path, ids: &[u32]) -> M {
    let c = cfg(dir);
    let w = W::open(dir);
    let h = c["n_embd"].as_u64().unwrap() as usize;
    let heads = c["n_head"].as_u64().unwrap() as usize;
    let eps = c["layer_norm_epsilon"].as_f64().unwrap();
    let p = "transformer.";
    let wpe = w.get(&format!("{p}wpe.weight"));
    let mut x = embed(w.get(&format!("{p}wte.weight")), h, ids);
    for (i, r) in x.iter_mut().enumerate() {
        for (e, v) in r.iter_mut().enumerate() {
            *v += wpe[i * h + e];
        }
    }
    let lnf = |x: &M, n: &str| {
        ln(
            x,
            w.get(&format!("{n}.weight")),
            w.get(&format!("{n}.bias")),
            eps,
        )
    };
    for l in 0..c["n_layer"].as_u64().unwrap() as usize {
        let b = format!("{p}h.{l}.");
        let hn = lnf(&x, &format!("{b}ln_1"));
        let qkv = conv1d(
            &hn,
            w.get(&format!("{b}attn.c_attn.weight")),
            w.get(&format!("{b}attn.c_attn.bias")),
        );
        let part = |k: usize| -> M { qkv.iter().map(|r| r[k * h..(k + 1) * h].to_vec()).collect() };
        let a = attn(&part(0), &part(1), &part(2), heads, heads, |i, j| j <= i);
        x = add(
            &x,
            &conv1d(
                &a,
                w.get(&format!("{b}attn.c_proj.weight")),
                w.get(&format!("{b}attn.c_proj.bias")),
            ),
        );
        let hn = lnf(&x, &format!("{b}ln_2"));
        let m = conv1d(
            &hn,
            w.get(&format!("{b}mlp.c_fc.weight")),
            w.get(&format!("{b}mlp.c_fc.bias")),
        );
        let m: M = m
            .iter()
            .map(|r| r.iter().map(|&v| gelu_tanh(v)).collect())
            .collect();
        x = add(
            &x,
            &conv1d(
                &m,
                w.get(&format!("{b}mlp.c_proj.weight")),
                w.get(&format!("{b}mlp.c_proj.bias")),
            ),
        );
    }
    let x = lnf(&x, &format!("{p}ln_f"));
    linear(&x, w.get(&format!("{p}wte.weight")), None)
}

/// BERT: last hidden states, or classifier logits (1 row) with the head.
pub fn bert(dir: &std::path::Path, ids: &[u32]) -> M {
    let c = cfg(dir);
    let w = W::open(dir);
    let h = c["hidden_size"].as_u64().unwrap() as usize;
    let heads = c["num_attention_heads"].as_u64().unwrap() as usize;
    let eps = c["layer_norm_eps"].as_f64().unwrap();
    let cls = c["architectures"][0] == "BertForSequenceClassification";
    let p = if cls { "bert." } else { "" };
    let e = format!("{p}embeddings.");
    let pos = w.get(&format!("{e}position_embeddings.weight"));
    let typ = w.get(&format!("{e}token_type_embeddings.weight"));
    let mut x = embed(w.get(&format!("{e}word_embeddings.weight")), h, ids);
    for (i, r) in x.iter_mut().enumerate() {
        for (k, v) in r.iter_mut().enumerate() {
            *v += pos[i * h + k] + typ[k];
        }
    }
    let lnf = |x: &M, n: &str| {
        ln(
            x,
            w.get(&format!("{n}.weight")),
            w.get(&format!("{n}.bias")),
            eps,
        )
    };
    let lin = |x: &M, n: &str| {
        linear(
            x,
            w.get(&format!("{n}.weight")),
            Some(w.get(&format!("{n}.bias"))),
        )
    };
    let mut x = lnf(&x, &format!("{e}LayerNorm"));
    for l in 0..c["num_hidden_layers"].as_u64().unwrap() as usize {
        let b = format!("{p}encoder.layer.{l}.");
        let q = lin(&x, &format!("{b}attention.self.query"));
        let k = lin(&x, &format!("{b}attention.self.key"));
        let v = lin(&x, &format!("{b}attention.self.value"));
        let a = lin(
            &attn(&q, &k, &v, heads, heads, |_, _| true),
            &format!("{b}attention.output.dense"),
        );
        x = lnf(&add(&a, &x), &format!("{b}attention.output.LayerNorm"));
        let m = lin(&x, &format!("{b}intermediate.dense"));
        let m: M = m
            .iter()
            .map(|r| r.iter().map(|&v| gelu_erf(v)).collect())
            .collect();
        let m = lin(&m, &format!("{b}output.dense"));
        x = lnf(&add(&m, &x), &format!("{b}output.LayerNorm"));
    }
    if !cls {
        return x;
    }
    let pooled: M = lin(&x[..1].to_vec(), &format!("{p}pooler.dense"))
        .into_iter()
        .map(|r| r.into_iter().map(f64::tanh).collect())
        .collect();
    lin(&pooled, "classifier")
}

/// log softmax of one row.
pub fn log_softmax(r: &[f64]) -> Vec<f64> {
    let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = r.iter().map(|v| (v - m).exp()).sum();
    r.iter().map(|v| v - m - z.ln()).collect()
}

pub fn argmax(r: &[f64]) -> u32 {
    let mut b = 0;
    for i in 0..r.len() {
        if r[i] > r[b] {
            b = i;
        }
    }
    b as u32
}
