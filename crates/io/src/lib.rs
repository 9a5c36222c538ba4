//! # tensormerge-io
//!
//! Safetensors model directories for tensormerge: validated, memory-mapped
//! reading ([`Model`]), streaming sharded writing through a temporary
//! directory ([`ModelWriter`]), and `load`/`save` for the core crate's
//! [`ModelTensorMapper`](tensormerge_core::ModelTensorMapper) ([`MapperExt`]).
//!
//! ```
//! use tensormerge_core::{convert, DType, ModelTensorMapper, TensorInfo};
//! use tensormerge_io::{MapperExt, Model, ModelWriter, WriterOptions};
//!
//! let tmp = tempfile::tempdir().unwrap();
//! // Write a tiny model: a BF16 weight, an F32 bias and integer position ids.
//! let base = tmp.path().join("base");
//! let tensors = vec![
//!     TensorInfo::new("w", vec![2, 2], DType::BF16),
//!     TensorInfo::new("b", vec![2], DType::F32),
//!     TensorInfo::new("position_ids", vec![2], DType::I64),
//! ];
//! let mut w = ModelWriter::create(&base, tensors, WriterOptions::default()).unwrap();
//! w.write("w", &convert::encode_f32_vec(DType::BF16, &[1.0, 2.0, 3.0, 4.0]).unwrap()).unwrap();
//! w.write("b", &convert::encode_f32_vec(DType::F32, &[0.5, -0.5]).unwrap()).unwrap();
//! w.write("position_ids", &[0i64, 1].map(i64::to_le_bytes).concat()).unwrap();
//! w.finish().unwrap();
//! std::fs::write(base.join("config.json"), r#"{"torch_dtype": "float32"}"#).unwrap();
//!
//! // Open it, map it to a flat vector, scale it, save it next to the original.
//! let model = Model::open(base.to_str().unwrap()).unwrap();
//! let mapper = ModelTensorMapper::for_model(&model);
//! let v = mapper.load(base.to_str().unwrap()).unwrap();
//! assert_eq!(v.values().unwrap(), &[1.0, 2.0, 3.0, 4.0, 0.5, -0.5]);
//! let out = tmp.path().join("scaled");
//! mapper.save(&(0.5 * &v), &out, &model, WriterOptions::default()).unwrap();
//!
//! let scaled = Model::open_path(&out).unwrap();
//! assert_eq!(scaled.tensor_info("w").unwrap().dtype, DType::BF16);
//! assert_eq!(scaled.read_f32_vec("w").unwrap(), vec![0.5, 1.0, 1.5, 2.0]);
//! assert_eq!(scaled.tensor_bytes("position_ids").unwrap(), model.tensor_bytes("position_ids").unwrap());
//! let config = std::fs::read_to_string(out.join("config.json")).unwrap();
//! assert!(config.contains(r#""torch_dtype": "bfloat16""#));
//! ```
//!
//! Reading validates every header up front (see [`Model`]); every name in a
//! file or an index is treated as untrusted input. Errors are [`IoError`]s
//! that name the file, and the tensor where there is one. Pickle checkpoints
//! are refused with instructions for converting them.
//!
//! Headers are parsed here rather than through the `safetensors` crate, so
//! that each malformed input gets its own error variant naming the file and
//! the tensor, and so that tensors come out in data-offset order (the crate
//! returns hash order); the tests read our files back with the `safetensors`
//! crate as an independent check, and read files it wrote.
//!
//! ## Hub
//!
//! [`Model::open`] also accepts hub ids `org/name[@revision]` when no such
//! path exists. Options come from the environment ([`HubOptions::from_env`]:
//! `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`);
//! [`Model::open_hub`] takes them explicitly. Cached models open offline in
//! every build; downloading needs the cargo feature `hub`: repository info
//! through hf-hub 0.5, files through `ureq` (rustls) directly, so that the
//! token never follows a redirect to another host and a cut-short or corrupt
//! download never enters the cache.
//!
//! ## LoRA adapters
//!
//! [`LoraAdapter::open`] reads a PEFT adapter directory
//! (`adapter_config.json`, `adapter_model.safetensors`);
//! [`Model::with_lora`] applies it on read (`W + s · B @ A` for the element
//! range asked for, so chunked streaming works unchanged), and
//! [`Model::open`] accepts mergekit's `BASE+ADAPTER`; [`write_adapter`]
//! writes one atomically (what `tensormerge lora extract` produces). The formulas, and what is refused, are in
//! [`LoraAdapter`]'s module (`lora.rs`).
#![deny(missing_docs)]

mod error;
mod header;
mod hub;
mod lora;
mod mapper_ext;
mod model;
mod open;
pub mod pieces;
mod writer;

pub use error::IoError;
pub use hub::{HubId, HubOptions};
pub use lora::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, LoraAdapter, PEFT_PREFIX, Patch,
    split_lora_reference, write_adapter,
};
pub use mapper_ext::MapperExt;
pub use model::{INDEX_FILE, Model, SINGLE_FILE};
pub use pieces::{JoinOptions, JoinReport, PartSpec, join};
pub use writer::{
    DEFAULT_MAX_SHARD_BYTES, ModelWriter, SUPPORT_FILES, WRITEBACK_EVERY, Writeback, WriterOptions,
    write_safetensors,
};
