//! # tensormerge-core
//!
//! The data model of tensormerge: a model is an ordered set of named tensors
//! ([`Layout`] of [`TensorInfo`]); its floating-point parameters, flattened and
//! concatenated, form one [`ParamVector`]; a [`ModelTensorMapper`] maps models
//! to vectors and back. On vectors, merging is arithmetic:
//!
//! ```
//! use tensormerge_core::{DType, InMemoryModel, ModelTensorMapper, Tensor, TensorSource};
//!
//! let model = |name: &str, w: [f32; 3]| {
//!     InMemoryModel::new(name, vec![Tensor::from_f32("w", vec![3], DType::F32, &w).unwrap()]).unwrap()
//! };
//! let base = model("base", [1.0, 1.0, 1.0]);
//! let legal = model("legal", [2.0, 1.0, 0.0]);
//! let recipe = model("recipe", [1.0, 3.0, 1.0]);
//!
//! let mapper = ModelTensorMapper::for_model(&base);
//! let [b, l, r] = [&base, &legal, &recipe].map(|m| mapper.to_vector(m).unwrap());
//!
//! // Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089).
//! let merged = &b + 0.5 * ((&l - &b) + (&r - &b));
//!
//! let tensors = mapper.from_vector(&merged).unwrap();
//! assert_eq!(tensors[0].to_f32().unwrap(), vec![1.5, 2.0, 0.5]);
//! ```
//!
//! This crate does no I/O; `tensormerge-io` reads and writes safetensors model
//! directories and adds `load`/`save` to the mapper.
#![deny(missing_docs)]

pub mod convert;
mod dtype;
mod error;
mod layout;
mod mapper;
mod vector;

pub use dtype::DType;
pub use error::CoreError;
pub use layout::{Layout, TensorInfo};
pub use mapper::{InMemoryModel, ModelTensorMapper, Tensor, TensorSource};
pub use vector::ParamVector;
