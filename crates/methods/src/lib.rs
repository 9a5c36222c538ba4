//! # tensormerge-methods
//!
//! The [`MergeMethod`] trait every merge method implements, the parameter
//! schema ([`ParamSpec`]) that configs are validated against, the global
//! [`registry`] that methods join with [`register_method!`], and the
//! in-memory API ([`Merge`]) that runs any method on flat
//! [`ParamVector`](tensormerge_core::ParamVector)s.
//!
//! Building blocks shared by the task-vector family live in [`ops`] (exact
//! streaming top-k, exact and chunk-invariant sums, TIES election, DARE
//! drop); the `testkit` feature adds proptest strategies and the
//! conformance suite every method runs (`conformance_suite!`).
//!
//! A method merges one chunk of one tensor at a time from `f32` slices:
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::*;
//!
//! /// out = base + scale · Σ (x_i − base)
//! struct Sum;
//! static INFO: MethodInfo = MethodInfo {
//!     name: "sum_of_deltas",
//!     summary: "adds every task vector to the base",
//!     paper: "Ilharco et al. 2023, arXiv:2212.04089",
//!     base: BaseModel::Required,
//!     min_models: 1,
//!     max_models: None,
//!     params: &[ParamSpec::global(
//!         "scale", ParamKind::Float { min: f64::NEG_INFINITY, max: f64::INFINITY },
//!         Default::Float(1.0), "factor on the summed task vectors")],
//! };
//! impl MergeMethod for Sum {
//!     fn info(&self) -> &'static MethodInfo { &INFO }
//!     fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
//!         let scale = c.tensor.global.f32("scale")?;
//!         let base = c.base.expect("required");
//!         for (i, o) in out.iter_mut().enumerate() {
//!             *o = base[i] + scale * c.models.iter().map(|m| m[i] - base[i]).sum::<f32>();
//!         }
//!         Ok(())
//!     }
//! }
//! register_method!(Sum);
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let v = |x: [f32; 2]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let (base, a, b) = (v([1.0, 1.0]), v([2.0, 1.0]), v([1.0, 3.0]));
//!
//! let method = registry().get("sum-of-deltas").unwrap();
//! let merge = Merge::new(method, vec![("scale", 0.5.into())], vec![vec![], vec![]]).unwrap();
//! let out = merge.run(Some(&base), &[&a, &b]).unwrap();
//! assert_eq!(out.values().unwrap(), &[1.5, 2.0]);
//! ```
#![deny(missing_docs)]

mod driver;
mod error;
mod method;
pub mod ops;
mod params;
mod registry;
pub mod rng;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use driver::{
    ChunkData, ChunkInput, Merge, MergeBuffers, check_inputs, chunk_ranges, merge_tensor,
    merge_tensor_reusing,
};
pub use error::MethodError;
pub use method::{
    BaseModel, Chunk, MergeMethod, MethodInfo, Scratch, Stats, StatsPass, TensorContext,
};
pub use params::{Default, ParamKind, ParamSpec, ParamValue, Params, Scope};
pub use registry::{Registration, Registry, canonical_name, registry, suggestions};

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}
