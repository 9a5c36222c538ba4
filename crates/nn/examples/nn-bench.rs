//! The forward-pass benchmark behind `cargo xtask bench --nn`: perplexity
//! tokens per second and Fisher samples per second of a 135M-parameter
//! Llama-shaped model (SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads,
//! 3 key/value heads, SwiGLU 1536, vocabulary 49152, tied head) with
//! synthetic weights, next to candle's matmul rate on the model's own
//! matrix shapes measured in the same run.
//!
//! `achieved / matmul-bound` = (time the forward pass's matmuls would take
//! at the measured per-shape rates) / (measured time of the whole pass).
//!
//! Usage: `cargo run --release -p tensormerge-nn --example nn-bench [-- --quick] [--system-allocator]`
//! (`--system-allocator`: without `keep_freed_memory`, for comparison).

use std::time::{Duration, Instant};

use tensormerge_core::{DType, TensorInfo};
use tensormerge_nn::candle_core::{Device, Tensor};
use tensormerge_nn::tiny::{tiny_values, write_tokenizer};
use tensormerge_nn::{FisherOptions, PerplexityOptions, Pipeline, Weights};

struct Shape {
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
}

fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut b = Duration::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(f());
        b = b.min(t.elapsed());
    }
    b
}

fn main() {
    // `--system-allocator`: glibc's defaults, to show what `keep_freed_memory` buys.
    if !std::env::args().any(|a| a == "--system-allocator") {
        tensormerge_nn::keep_freed_memory();
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Shape {
            hidden: 64,
            inter: 160,
            layers: 2,
            heads: 4,
            kv: 2,
            vocab: 512,
        }
    } else {
        Shape {
            hidden: 576,
            inter: 1536,
            layers: 30,
            heads: 9,
            kv: 3,
            vocab: 49152,
        }
    };
    let t = if quick { 64 } else { 512 };
    let hd = s.hidden / s.heads;
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s.vocab,
        "hidden_size": s.hidden, "intermediate_size": s.inter, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 2048, "tie_word_embeddings": true
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    write_tokenizer(dir.path()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![s.vocab, s.hidden])];
    for l in 0..s.layers {
        let b = format!("model.layers.{l}.");
        tensors.push((format!("{b}input_layernorm.weight"), vec![s.hidden]));
        tensors.push((
            format!("{b}self_attn.q_proj.weight"),
            vec![s.heads * hd, s.hidden],
        ));
        tensors.push((
            format!("{b}self_attn.k_proj.weight"),
            vec![s.kv * hd, s.hidden],
        ));
        tensors.push((
            format!("{b}self_attn.v_proj.weight"),
            vec![s.kv * hd, s.hidden],
        ));
        tensors.push((
            format!("{b}self_attn.o_proj.weight"),
            vec![s.hidden, s.heads * hd],
        ));
        tensors.push((
            format!("{b}post_attention_layernorm.weight"),
            vec![s.hidden],
        ));
        tensors.push((format!("{b}mlp.gate_proj.weight"), vec![s.inter, s.hidden]));
        tensors.push((format!("{b}mlp.up_proj.weight"), vec![s.inter, s.hidden]));
        tensors.push((format!("{b}mlp.down_proj.weight"), vec![s.hidden, s.inter]));
    }
    tensors.push(("model.norm.weight".into(), vec![s.hidden]));
    let params: usize = tensors
        .iter()
        .map(|(_, sh)| sh.iter().product::<usize>())
        .sum();
    let w = Weights::from_tensors(
        "synthetic",
        tensors
            .iter()
            .map(|(n, sh)| {
                let mut v = tiny_values(n, sh, 0);
                if !n.contains("norm") {
                    let scale = 1.0 / (sh[sh.len() - 1] as f32).sqrt();
                    v.iter_mut().for_each(|x| *x *= scale);
                }
                (TensorInfo::new(n.clone(), sh.clone(), DType::F32), v)
            })
            .collect(),
    )
    .unwrap();
    let model = Pipeline::from_weights(w, dir.path()).unwrap();

    // matmul rates on the forward pass's shapes: [t, in] x [in, out]
    let linear = [
        (s.hidden, s.heads * hd, s.layers),
        (s.hidden, s.kv * hd, 2 * s.layers),
        (s.heads * hd, s.hidden, s.layers),
        (s.hidden, s.inter, 2 * s.layers),
        (s.inter, s.hidden, s.layers),
        (s.hidden, s.vocab, 1),
    ];
    let reps = if quick { 3 } else { 2 };
    let mut bound = 0f64;
    let mut flops = 0f64;
    println!("matmul rates (candle CPU, f32, best of {reps}):");
    for &(i, o, count) in &linear {
        let x = Tensor::randn(0f32, 1.0, (t, i), &Device::Cpu).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (o, i), &Device::Cpu).unwrap();
        let d = best(reps, || x.matmul(&wt.t().unwrap()).unwrap());
        let f = 2.0 * (t * i * o) as f64;
        println!(
            "  [{t}x{i}] x [{i}x{o}]ᵀ: {:.1} GFLOP/s (x{count})",
            f / d.as_secs_f64() / 1e9
        );
        bound += d.as_secs_f64() * count as f64;
        flops += f * count as f64;
    }
    // attention: per layer q kᵀ and p v, [heads, t, hd] x [heads, hd, t]
    let q = Tensor::randn(0f32, 1.0, (s.heads, t, hd), &Device::Cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (s.heads, t, hd), &Device::Cpu).unwrap();
    let p = Tensor::randn(0f32, 1.0, (s.heads, t, t), &Device::Cpu).unwrap();
    let d1 = best(reps, || q.matmul(&k.t().unwrap()).unwrap());
    let d2 = best(reps, || p.matmul(&k).unwrap());
    let fa = 2.0 * (s.heads * t * t * hd) as f64;
    println!(
        "  attention [{}x{t}x{hd}]: {:.1} / {:.1} GFLOP/s (x{})",
        s.heads,
        fa / d1.as_secs_f64() / 1e9,
        fa / d2.as_secs_f64() / 1e9,
        s.layers
    );
    bound += (d1 + d2).as_secs_f64() * s.layers as f64;
    flops += 2.0 * fa * s.layers as f64;

    let ids: Vec<u32> = (0..2 * t).map(|i| ((i * 7919) % s.vocab) as u32).collect();
    let opts = PerplexityOptions {
        context: t,
        stride: None,
        max_tokens: None,
    };
    let d = best(reps, || model.perplexity_ids(&ids, &opts).unwrap());
    let per_window = d.as_secs_f64() / 2.0;
    println!(
        "forward ({params} parameters, {t} tokens per window): {:.1} GFLOP per window, perplexity {:.0} tokens/s, {:.1} GFLOP/s; matmul-bound {:.3} s vs {:.3} s measured: achieved/matmul-bound {:.2}",
        flops / 1e9,
        t as f64 / per_window,
        flops / per_window / 1e9,
        bound,
        per_window,
        bound / per_window
    );
    // Fisher: forward + backward, about 3x the forward's matmul FLOPs
    let text = vec!["the court ruled ."; t].join(" ");
    let fopts = FisherOptions {
        samples: Some(1),
        context: t,
        empirical: false,
        seed: 0,
    };
    let df = best(reps.min(2), || {
        model.fisher_lm(&text, &fopts, &mut |_, _| {}).unwrap()
    });
    println!(
        "fisher ({t}-token samples): {:.2} samples/s, {:.0} tokens/s; 3x forward matmul-bound {:.3} s vs {:.3} s measured: achieved/matmul-bound {:.2}",
        1.0 / df.as_secs_f64(),
        t as f64 / df.as_secs_f64(),
        3.0 * bound,
        df.as_secs_f64(),
        3.0 * bound / df.as_secs_f64()
    );
    println!(
        "threads: {} (RAYON_NUM_THREADS or cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
}
