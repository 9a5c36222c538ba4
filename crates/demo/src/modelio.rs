//! The demo's networks as real model directories: `model.safetensors`
//! written by `tensormerge-io`'s [`ModelWriter`] plus a `config.json` that
//! describes the layers, read back with [`Model`].

use std::path::Path;

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{Model, ModelWriter, WriterOptions};

use crate::DemoError;
use crate::mlp::Mlp;

/// `model_type` written into each `config.json`.
pub const MODEL_TYPE: &str = "tensormerge-demo-mlp";

/// The `config.json` of a network with layer widths `sizes`: the layers, the
/// activation, the input encoding, and (for Fisher estimates) what the tensors
/// hold.
pub fn config_json(sizes: &[usize], description: &str) -> String {
    let tensors: Vec<serde_json::Value> = sizes
        .windows(2)
        .enumerate()
        .flat_map(|(l, w)| {
            [
                serde_json::json!({"name": format!("layers.{l}.weight"), "shape": [w[1], w[0]]}),
                serde_json::json!({"name": format!("layers.{l}.bias"), "shape": [w[1]]}),
            ]
        })
        .collect();
    let config = serde_json::json!({
        "architectures": ["TensorMergeDemoMlp"],
        "model_type": MODEL_TYPE,
        "description": description,
        "layer_sizes": sizes,
        "hidden_activation": "relu",
        "output": "softmax over num_labels logits",
        "layer_formula": "x_{l+1} = relu(x_l W_l^T + b_l) (no relu after the last layer)",
        "input": "8x8 handwritten digit, row-major, pixel value / 16",
        "num_labels": sizes.last().copied().unwrap_or(0),
        "tensors": tensors,
        "torch_dtype": "float32",
    });
    serde_json::to_string_pretty(&config).unwrap_or_default() + "\n"
}

fn io_error(dir: &Path, e: tensormerge_io::IoError) -> DemoError {
    DemoError::ModelIo {
        path: dir.to_path_buf(),
        source: Box::new(e),
    }
}

/// Writes `model` (or a Fisher estimate with the same shapes) as a model
/// directory `dir` (replaced if it exists) with `config.json`.
pub fn write_model(model: &Mlp, dir: &Path, description: &str) -> Result<(), DemoError> {
    let tensors = model.tensors();
    let infos = tensors
        .iter()
        .map(|(name, shape, _)| TensorInfo::new(name.clone(), shape.clone(), DType::F32))
        .collect();
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("tensormerge_demo".to_string(), description.to_string());
    let opts = WriterOptions {
        overwrite: true,
        metadata,
        ..WriterOptions::default()
    };
    let mut writer = ModelWriter::create(dir, infos, opts).map_err(|e| io_error(dir, e))?;
    for (name, _, values) in &tensors {
        let bytes = convert::encode_f32_vec(DType::F32, values).map_err(|e| DemoError::Model {
            tensor: name.clone(),
            detail: e.to_string(),
        })?;
        writer.write(name, &bytes).map_err(|e| io_error(dir, e))?;
    }
    let dir = writer.finish().map_err(|e| io_error(dir, e))?;
    let config = dir.join("config.json");
    std::fs::write(&config, config_json(&model.sizes(), description)).map_err(|source| {
        DemoError::Io {
            path: config,
            source,
        }
    })
}

/// Reads a network with layer widths `sizes` from the model directory `dir`.
pub fn read_model(dir: &Path, sizes: &[usize]) -> Result<Mlp, DemoError> {
    let model = Model::open_path(dir).map_err(|e| io_error(dir, e))?;
    Mlp::from_tensors(sizes, |name, _| {
        model.read_f32_vec(name).map_err(|e| io_error(dir, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn model_directories_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let sizes = [64, 8, 10];
        let m = Mlp::new(&sizes, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
        let dir = tmp.path().join("m");
        write_model(&m, &dir, "test model").unwrap();
        assert_eq!(read_model(&dir, &sizes).unwrap(), m);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["layer_sizes"], serde_json::json!([64, 8, 10]));
        assert_eq!(config["tensors"][2]["shape"], serde_json::json!([10, 8]));
        // Overwriting is allowed; the wrong architecture is an error naming the tensor.
        write_model(&m, &dir, "again").unwrap();
        let e = read_model(&dir, &[64, 9, 10]).unwrap_err().to_string();
        assert!(e.contains("layers.0.weight"), "{e}");
        let e = read_model(&tmp.path().join("missing"), &sizes).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
