//! Tiny synthetic checkpoints for examples, doctests and first experiments.
//!
//! [`write_example_models`] writes three model directories of one small
//! architecture (a base and two fine-tunes, "legal" and "recipe"), each a real
//! `model.safetensors` with a `config.json`, so the README's walkthrough runs
//! without downloading anything.

use std::path::{Path, PathBuf};

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{IoError, ModelWriter, WriterOptions};

/// Where [`write_example_models`] put the three models.
#[derive(Debug, Clone)]
pub struct ExampleModels {
    /// The base model directory.
    pub base: PathBuf,
    /// A fine-tune of the base ("legal").
    pub legal: PathBuf,
    /// Another fine-tune of the base ("recipe").
    pub recipe: PathBuf,
}

/// The tensors of the example architecture: a BF16 embedding, an F32 weight
/// and bias, and integer position ids (carried through merges unchanged).
pub fn example_layout() -> Vec<TensorInfo> {
    vec![
        TensorInfo::new("embed.weight", vec![4, 3], DType::BF16),
        TensorInfo::new("position_ids", vec![1, 4], DType::I64),
        TensorInfo::new("head.weight", vec![2, 3], DType::F32),
        TensorInfo::new("head.bias", vec![2], DType::F32),
    ]
}

/// The values of tensor `t` in model `variant` (0 base, 1 legal, 2 recipe):
/// the base plus a small, variant-specific task vector.
fn values(t: &TensorInfo, variant: usize) -> Vec<f32> {
    (0..t.numel())
        .map(|i| {
            let base = ((i as f32) * 0.25 - 1.0) * if t.name.contains("bias") { 0.5 } else { 1.0 };
            let delta = match variant {
                0 => 0.0,
                1 => {
                    if i % 2 == 0 {
                        0.5
                    } else {
                        -0.25
                    }
                }
                _ => {
                    if i % 3 == 0 {
                        -0.5
                    } else {
                        0.125
                    }
                }
            };
            base + delta
        })
        .collect()
}

/// Writes the base and the two fine-tunes as model directories `base`,
/// `legal` and `recipe` under `dir` (which must exist).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let m = tensormerge::example::write_example_models(dir.path()).unwrap();
/// assert!(m.base.join("model.safetensors").is_file());
/// assert!(m.legal.join("config.json").is_file());
/// ```
pub fn write_example_models(dir: &Path) -> Result<ExampleModels, IoError> {
    let mut paths = Vec::new();
    for (variant, name) in ["base", "legal", "recipe"].into_iter().enumerate() {
        let out = dir.join(name);
        let layout = example_layout();
        let mut w = ModelWriter::create(&out, layout.clone(), WriterOptions::default())?;
        for t in &layout {
            let bytes = if t.dtype.is_float() {
                convert::encode_f32_vec(t.dtype, &values(t, variant))
                    .expect("float dtype, matching length")
            } else {
                (0..t.numel() as i64).flat_map(i64::to_le_bytes).collect()
            };
            w.write(&t.name, &bytes)?;
        }
        let path = w.finish()?;
        let config = r#"{"architectures": ["ExampleModel"], "model_type": "example", "torch_dtype": "bfloat16"}"#;
        std::fs::write(path.join("config.json"), config).map_err(|e| IoError::Io {
            path: path.join("config.json"),
            source: e,
        })?;
        paths.push(path);
    }
    let mut it = paths.into_iter();
    Ok(ExampleModels {
        base: it.next().expect("three models"),
        legal: it.next().expect("three models"),
        recipe: it.next().expect("three models"),
    })
}
