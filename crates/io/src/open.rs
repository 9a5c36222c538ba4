//! [`Model::open`]: a reference is a path (`model`) or a hub id (`hub`).
//!
//! This dispatch lives in its own module so that `model` (local files) does
//! not depend on `hub`, which builds on `model` to open a cached snapshot.

use std::path::Path;

use crate::{IoError, Model, hub};

impl Model {
    /// Opens a model from a reference: a directory, a `.safetensors` file, a
    /// `model.safetensors.index.json`, or (cargo feature `hub`) a hub id
    /// `org/name[@revision]`. An existing path always wins over a hub id.
    ///
    /// mergekit's `BASE+ADAPTER` (a model, then a PEFT LoRA adapter
    /// directory) opens `BASE` with the adapter applied on read (see
    /// [`with_lora`](Self::with_lora)), unless the whole reference is an
    /// existing path.
    pub fn open(reference: &str) -> Result<Model, IoError> {
        let path = Path::new(reference);
        if path.exists() || path.symlink_metadata().is_ok() {
            return Model::open_path(path);
        }
        if let Some((base, adapter)) = crate::split_lora_reference(reference) {
            let adapter = crate::LoraAdapter::open(Path::new(adapter))?;
            return Model::open(base)?.with_lora(adapter);
        }
        if hub::looks_like_hub_id(reference) {
            return hub::open_hub(reference);
        }
        Err(IoError::NotFound {
            reference: reference.to_string(),
            hint: String::new(),
        })
    }
}
