//! # tensormerge
//!
//! Merge fine-tuned checkpoints of one base model by tensor arithmetic. This
//! facade re-exports the workspace's crates:
//!
//! - [`core`]: `DType`, `Layout`, `ParamVector` (flat parameter vectors with
//!   arithmetic), `ModelTensorMapper`;
//! - [`io`]: safetensors model directories and the hub;
//! - [`methods`]: the `MergeMethod` trait, parameters, the registry, the
//!   in-memory `Merge` API;
//! - [`engine`]: mergekit-compatible configs and the streaming executor;
//! - [`builtin`]: links every built-in merge method crate;
//! - `nn` (cargo feature `nn`, on by default): running, scoring and
//!   Fisher-weighting models on candle; `mapper.to_pipeline(&merged, &template)`.
//!
//! Merging in memory with a registered method:
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge::{builtin, DType, Layout, Merge, ParamVector, TensorInfo};
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![3], DType::F32)]).unwrap());
//! let v = |x: [f32; 3]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let (base, legal, recipe) = (v([1.0, 1.0, 1.0]), v([2.0, 1.0, 0.0]), v([1.0, 3.0, 1.0]));
//!
//! let method = builtin::registry().get("task_arithmetic").unwrap();
//! let merge = Merge::new(method, vec![("lambda", 0.5.into())], vec![vec![], vec![]]).unwrap();
//! let merged = merge.run(Some(&base), &[&legal, &recipe]).unwrap();
//! // The same as the arithmetic on vectors:
//! assert_eq!(merged, &base + 0.5 * ((&legal - &base) + (&recipe - &base)));
//! ```
//!
//! Running a merge without writing it to disk (feature `nn`): the seed
//! walkthrough's shape, base and merged generations for the same prompts
//! under a fixed seed. The models here are tiny random Llamas written by
//! [`nn::tiny`]; with real checkpoints the code is the same.
//!
//! ```
//! # #[cfg(feature = "nn")] {
//! use tensormerge::ModelTensorMapper;
//! use tensormerge::io::MapperExt;
//! use tensormerge::nn::{GenerateOptions, MapperPipelineExt, Pipeline, Sampling, tiny};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let write = |name: &str, seed| {
//!     let p = tiny::write_tiny_model(&dir.path().join(name), tiny::TinyArch::Llama, seed,
//!         tensormerge::DType::F32).unwrap();
//!     p.to_str().unwrap().to_string()
//! };
//! let (base_dir, legal_dir, recipe_dir) = (write("base", 0), write("legal", 1), write("recipe", 2));
//!
//! let (mapper, template) = ModelTensorMapper::open(&base_dir).unwrap();
//! let base = mapper.load(&base_dir).unwrap();
//! let legal = mapper.load(&legal_dir).unwrap();
//! let recipe = mapper.load(&recipe_dir).unwrap();
//! let merged = &base + 0.5 * ((&legal - &base) + (&recipe - &base));
//!
//! let prompts = ["the court ruled".to_string(), "bake the bread".to_string()];
//! let opts = GenerateOptions {
//!     max_new_tokens: 8,
//!     sampling: Sampling::TopP { temperature: 0.8, top_p: 0.95, seed: 42 },
//! };
//! let before = mapper.to_pipeline(&base, &template).unwrap().generate(&prompts, &opts).unwrap();
//! let after = mapper.to_pipeline(&merged, &template).unwrap().generate(&prompts, &opts).unwrap();
//! for (b, a) in before.iter().zip(&after) {
//!     println!("{}\n  base:   {}\n  merged: {}", b.prompt, b.completion, a.completion);
//! }
//! // In memory or from disk, the same model: the base vector gives exactly
//! // what the base directory gives.
//! let from_disk = Pipeline::open(&base_dir).unwrap().generate(&prompts, &opts).unwrap();
//! assert_eq!(before, from_disk);
//! # }
//! ```
#![deny(missing_docs)]

pub mod builtin;
pub mod docs;
pub mod example;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub use tensormerge_core as core;
pub use tensormerge_engine as engine;
pub use tensormerge_io as io;
pub use tensormerge_methods as methods;
#[cfg(feature = "nn")]
pub use tensormerge_nn as nn;

pub use tensormerge_core::{DType, Layout, ModelTensorMapper, ParamVector, TensorInfo};
pub use tensormerge_methods::{Merge, MergeMethod, MethodError, registry};
