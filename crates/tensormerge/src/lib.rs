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
//! - [`builtin`]: links every built-in merge method crate.
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

pub use tensormerge_core::{DType, Layout, ModelTensorMapper, ParamVector, TensorInfo};
pub use tensormerge_methods::{Merge, MergeMethod, MethodError, registry};
