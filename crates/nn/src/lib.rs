//! # tensormerge-nn
//!
//! Run, score and Fisher-weight checkpoints in Rust: forward passes of the
//! Llama family (`llama`, `mistral`, `qwen2`), GPT-2 and BERT encoders (with
//! the `BertForSequenceClassification` head) on [candle](https://github.com/huggingface/candle),
//! tokenization with Hugging Face [`tokenizers`], and on top of them
//! [`Pipeline::generate`], [`Pipeline::perplexity`], [`Pipeline::classify`]
//! and the diagonal Fisher ([`fisher`]).
//!
//! A model is loaded from a model directory ([`Pipeline::open`], through
//! `tensormerge-io`; bf16/f16 weights converted to f32) or straight from a
//! merged [`ParamVector`] with its mapper and
//! a template model ([`Pipeline::from_vector`]; nothing written to disk, the
//! same logits as the saved directory bit for bit). The architecture comes
//! from `config.json`'s `model_type` (and `architectures` for the BERT head);
//! anything else is [`NnError::UnsupportedArchitecture`], listing the
//! supported ones.
//!
//! ```
//! use tensormerge_nn::{GenerateOptions, Pipeline, PerplexityOptions, tiny};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = tiny::write_tiny_model(&dir.path().join("m"), tiny::TinyArch::Llama, 0,
//!     tensormerge_core::DType::F32).unwrap();
//! let model = Pipeline::open(path.to_str().unwrap()).unwrap();
//! let out = model.generate(&["the court ruled".to_string()], &GenerateOptions::default()).unwrap();
//! assert!(!out[0].tokens.is_empty());
//! let ppl = model
//!     .perplexity("the court ruled on the claim and the judge ruled .", &PerplexityOptions {
//!         context: 4, ..Default::default() })
//!     .unwrap();
//! assert_eq!((ppl.windows, ppl.scored_tokens), (2, 6)); // 11 tokens: 2 windows of 4, 3 scored each
//! assert!(ppl.perplexity > 1.0);
//! ```
//!
//! ## Why our own forward passes (and not `candle-transformers`)
//!
//! The forward passes are written here with candle's tensor operations
//! rather than taken from `candle-transformers`:
//!
//! - **Gradients.** Fisher needs gradients with respect to every weight.
//!   Here the weights are [`candle_core::Var`]s ([`Weights`]); inference
//!   uses detached views of the same storage (no graph recorded) and Fisher
//!   the tracked ones. candle's fused CPU kernels (`candle_nn::ops::rms_norm`,
//!   `layer_norm`, `softmax_last_dim`, `rotary_emb::rope`) have no backward
//!   pass, and `candle-transformers`' models use them, so its models could
//!   not give gradients without patching; our blocks ([`ops`](crate) module)
//!   are built from differentiable basic operations.
//! - **Names and layouts.** We read exactly the checkpoint names
//!   `transformers` writes: GPT-2 with or without the `transformer.` prefix,
//!   its `Conv1D` weights stored `[in, out]`, the `lm_head` tied to `wte`
//!   (and `tie_word_embeddings` for Llama/Qwen2), BERT with or without
//!   `bert.`, so a merged vector's tensor names map one to one onto the
//!   forward pass and the Fisher file has the model's own names and shapes.
//!   `candle-transformers` has no plain GPT-2 and loads through its own
//!   `VarBuilder` naming.
//! - **Build.** `candle-transformers` is one large crate with well over a
//!   hundred model families, all compiled to use three; we have not
//!   measured its build time (only our own: see `crates/README.md`).
//!
//! Candle itself is used CPU-only (no `cuda`/`metal`/`mkl` features, so
//! `--all-features` builds stay CPU-only); its matmul is the `gemm` crate's
//! multithreaded kernel. The Hugging Face `tokenizers` crate (with the pure-Rust
//! `fancy-regex` backend, no C toolchain) reads `tokenizer.json` exactly as
//! `transformers` does.
//!
//! A missing or unreadable `tokenizer.json` is [`NnError::Tokenizer`]; for a
//! merge output, `tokenizer_source` in the merge config decides which
//! tokenizer the output gets.
#![deny(missing_docs)]

pub mod config;
mod error;
pub mod fisher;
mod net;
mod ops;
mod pipeline;
pub mod tiny;
mod weights;

pub use candle_core;
pub use config::ArchConfig;
pub use error::{NnError, Result};
pub use fisher::{FisherOptions, FisherResult};
pub use pipeline::{
    GenerateOptions, Generation, Perplexity, PerplexityOptions, Pipeline, Sampling, Window,
    read_text, windows,
};
pub use weights::Weights;

use tensormerge_core::{ModelTensorMapper, ParamVector};

/// Makes the process's allocator keep freed memory for reuse instead of
/// returning it to the operating system; call it once, first thing, in a
/// program that runs models (the `tensormerge` commands `generate`,
/// `perplexity` and `fisher` do).
///
/// Every candle operation allocates its output, and a forward pass of a
/// 135M-parameter model on 512 tokens allocates tensors of 100 MB
/// (`512 x 49152` logits) dozens of times. glibc serves allocations above
/// 32 MiB with fresh `mmap`s and unmaps them on free, so each one costs the
/// kernel zeroing every page again: measured with `perf`, 54% of
/// `cargo xtask bench --nn`'s time was in the kernel (`clear_page_erms`
/// alone 32%). With mmap off (`M_MMAP_MAX = 0`, so large blocks come from
/// the heap) and no trimming (`M_TRIM_THRESHOLD`), freed blocks are reused.
/// Measured back to back on the same machine, the same bench went from
/// 0.55 to 0.84 of the matmul bound (forward) and from 0.28 to 0.63
/// (Fisher). The cost is that the resident set stays at its peak until the
/// process exits, which suits a command that runs a model and ends.
///
/// It does nothing on targets other than Linux with glibc. It changes
/// process-wide allocator settings, so libraries should leave the call to
/// the program.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator parameters; it is safe
    // to call at any time (it takes the arena locks itself).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
use tensormerge_io::Model;

/// Runs a merged vector as a model: `mapper.to_pipeline(&merged, &template)`
/// is [`Pipeline::from_vector`].
pub trait MapperPipelineExt {
    /// A runnable model of `vector` with `template`'s config and tokenizer.
    fn to_pipeline(&self, vector: &ParamVector, template: &Model) -> Result<Pipeline>;
}

impl MapperPipelineExt for ModelTensorMapper {
    fn to_pipeline(&self, vector: &ParamVector, template: &Model) -> Result<Pipeline> {
        Pipeline::from_vector(self, vector, template)
    }
}
