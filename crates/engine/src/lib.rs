//! # tensormerge-engine
//!
//! Mergekit-compatible configs ([`MergeConfig`]), the planner, the streaming
//! executor and the expression language ([`expr`]).
//!
//! ```
//! use tensormerge_engine::MergeConfig;
//!
//! let config = MergeConfig::from_yaml_str(
//!     "merge_method: task_arithmetic\n\
//!      base_model: ./base\n\
//!      models:\n  - model: ./legal\n    parameters: {weight: [0.5, 1.0]}\n  - model: ./recipe\n\
//!      parameters: {weight: 0.3}\n\
//!      dtype: bfloat16\n",
//! )
//! .unwrap();
//! assert_eq!(config.models.len(), 2);
//! assert_eq!(config.output_dtype(), Some(tensormerge_core::DType::BF16));
//! ```
#![deny(missing_docs)]

pub mod config;
mod error;
mod exec;
pub mod expr;
mod plan;
mod progress;
mod yaml;

pub use config::MergeConfig;
pub use error::{ConfigError, EngineError, Mismatch};
pub use exec::{MergeReport, execute, run_merge};
pub use plan::{
    Action, DEFAULT_MAX_MEMORY, Input, Plan, RunOptions, ShardPlan, TensorPlan, layer_index, plan,
};
pub use progress::{NoProgress, Progress};
pub use yaml::Pos;
