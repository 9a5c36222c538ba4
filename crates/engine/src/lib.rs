//! # tensormerge-engine
//!
//! Mergekit-compatible configs ([`MergeConfig`]), the planner ([`plan`]),
//! the streaming executor ([`run_merge`], [`execute`]) and the expression
//! language ([`expr`]). A whole merge, on models written by the example:
//!
//! ```
//! use tensormerge_core::{convert, DType, TensorInfo};
//! use tensormerge_engine::{run_merge, MergeConfig, NoProgress, RunOptions};
//! use tensormerge_io::{Model, ModelWriter, WriterOptions};
//! use tensormerge_methods::*;
//!
//! // A method (built-in ones come from the `tensormerge` facade): base + Σ w·τ.
//! struct Sum;
//! static INFO: MethodInfo = MethodInfo {
//!     name: "doc_sum", summary: "", paper: "", base: BaseModel::Required,
//!     min_models: 1, max_models: None,
//!     params: &[ParamSpec::per_model_float("weight", -9.0, 9.0, Default::Float(1.0), "w")],
//! };
//! impl MergeMethod for Sum {
//!     fn info(&self) -> &'static MethodInfo { &INFO }
//!     fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
//!         let b = c.base.unwrap();
//!         for (i, o) in out.iter_mut().enumerate() {
//!             *o = b[i];
//!             for (m, p) in c.models.iter().zip(c.tensor.models) {
//!                 *o += p.f32("weight")? * (m[i] - b[i]);
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//! register_method!(Sum);
//!
//! let tmp = tempfile::tempdir().unwrap();
//! let write = |name: &str, w: [f32; 2]| {
//!     let dir = tmp.path().join(name);
//!     let t = vec![TensorInfo::new("model.layers.0.w", vec![2], DType::F32)];
//!     let mut wr = ModelWriter::create(&dir, t, WriterOptions::default()).unwrap();
//!     wr.write("model.layers.0.w", &convert::encode_f32_vec(DType::F32, &w).unwrap()).unwrap();
//!     wr.finish().unwrap();
//!     dir.display().to_string()
//! };
//! let (base, legal) = (write("base", [1.0, 1.0]), write("legal", [3.0, 0.0]));
//! let config = MergeConfig::from_yaml_str(&format!(
//!     "merge_method: doc_sum\nbase_model: {base}\nmodels:\n  - model: {legal}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n"
//! ))
//! .unwrap();
//! let out = tmp.path().join("merged");
//! let report = run_merge(&config, &out, &RunOptions::default(), &NoProgress).unwrap();
//! assert_eq!(report.tensors_merged, 1);
//! let merged = Model::open_path(&out).unwrap();
//! assert_eq!(merged.tensor_info("model.layers.0.w").unwrap().dtype, DType::BF16);
//! assert_eq!(merged.read_f32_vec("model.layers.0.w").unwrap(), vec![2.0, 0.5]);
//! ```
//!
//! * [`config`]: the YAML format and where it differs from mergekit.
//! * [`slices`]: `slices` configs (layer ranges stacked into the output,
//!   frankenmerges with `passthrough`, per-slice merges), mergekit's
//!   parameter precedence and rule for the tensors outside the layers; each
//!   output tensor then reads its inputs from other layers of other models
//!   ([`TensorPlan::reads`]) through the same streaming executor.
//! * [`tokenizer`]: `tokenizer_source: base | union | MODEL`, the
//!   `tokenizer:` section and `chat_template` with mergekit's meaning: the
//!   output vocabulary is built through the `tokenizers` crate, embedding
//!   and `lm_head` rows are remapped by token string (mergekit's default
//!   rows for tokens a model lacks) and merged by the config's method,
//!   streamed like any tensor; models whose vocabularies differ without a
//!   tokenizer source are refused.
//! * [`card`]: the `README.md` model card of every output (mergekit's
//!   structure; [`Plan::card`] set to `None` writes none).
//! * [`plan`] opens every input (headers only), reports every tensor whose
//!   name or shape differs between inputs at once, resolves each tensor's
//!   parameters (gradients over the layer index, filters) and lays out the
//!   output shards; its `Display` is `tensormerge merge --dry-run`.
//! * [`execute`] streams: a method's whole-model pass first, then tensors in
//!   parallel under a memory budget, chunk by chunk, through the same pass
//!   protocol as the in-memory `Merge` (bit-identical results on any number
//!   of threads), into a writer that renames the output into place only when
//!   it is complete.
//! * Libraries report progress through [`Progress`]; the command line draws
//!   it.
#![deny(missing_docs)]

pub mod card;
pub mod config;
mod error;
mod exec;
pub mod expr;
pub mod lora;
mod plan;
mod progress;
pub mod slices;
pub mod tokenizer;
mod yaml;

pub use config::MergeConfig;
pub use error::{ConfigError, EngineError, Mismatch};
pub use exec::{MergeReport, execute, execute_part, run_merge};
pub use plan::{
    Action, DEFAULT_MAX_MEMORY, Input, InputTensor, Plan, RunOptions, ShardPlan, TensorPlan,
    layer_index, plan,
};
pub use progress::{NoProgress, Progress};
pub use yaml::Pos;
