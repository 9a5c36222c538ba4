//! LoRA adapters: references in configs and `tensormerge lora apply`.
//!
//! A model reference `BASE+ADAPTER` (mergekit's syntax) or a model entry's
//! `lora: ADAPTER` key names a PEFT adapter directory (`adapter_config.json`
//! and `adapter_model.safetensors`). The model is opened with the adapter
//! applied on read ([`tensormerge_io::Model::with_lora`]): every targeted
//! weight reads as `W + s · B @ A` (`s = lora_alpha / r`, or
//! `lora_alpha / sqrt(r)` with `use_rslora`; transposed with
//! `fan_in_fan_out`), computed for the element range read from the two small
//! factors, so the executor streams an adapted model like any other and no
//! adapted model is ever held in memory or written to disk first (mergekit
//! instead merges the adapter with `peft` and caches the merged model).
//!
//! [`apply`] writes the adapted model alone: the expression evaluator
//! ([`crate::expr::run_eval`]) with the single model `BASE+ADAPTER`, so it
//! streams, runs in parallel, and writes atomically (a temporary directory
//! renamed into place) with the base's support files.

use std::path::Path;

use crate::config::ModelRef;
use crate::error::{ConfigError, EngineError};
use crate::expr::{EvalOptions, EvalReport, run_eval};
use crate::progress::Progress;

/// The reference `model+lora` of a model entry with a `lora:` key.
pub(crate) fn join_reference(
    model: ModelRef,
    lora: ModelRef,
    entry: &str,
) -> Result<ModelRef, ConfigError> {
    if tensormerge_io::split_lora_reference(&model.reference).is_some() {
        return Err(ConfigError::Invalid {
            path: format!("{entry}.lora"),
            pos: lora.pos,
            message: format!(
                "`{}` already names a LoRA adapter (`model+lora`); give the adapter either there or under `lora`, not both",
                model.reference
            ),
        });
    }
    Ok(ModelRef {
        reference: format!("{}+{}", model.reference, lora.reference),
        pos: model.pos,
    })
}

/// Applies the PEFT LoRA adapter in directory `adapter` to the model `base`
/// (a directory, `.safetensors` file or hub id) and writes the adapted model
/// to `out`: the base's tensors in its order and dtypes (or
/// `opts.out_dtype`), its support files, each targeted weight
/// `W + s · B @ A`.
///
/// ```
/// # let tmp = tempfile::tempdir().unwrap();
/// use tensormerge_core::{convert, DType, TensorInfo};
/// use tensormerge_engine::{NoProgress, expr::EvalOptions, lora};
/// use tensormerge_io::{AdapterConfig, Model, ModelWriter, WriterOptions};
/// let f32s = |v: &[f32]| convert::encode_f32_vec(DType::F32, v).unwrap();
/// let base = tmp.path().join("base");
/// let mut w = ModelWriter::create(&base, vec![TensorInfo::new("q.weight", vec![1, 2], DType::F32)],
///     WriterOptions::default()).unwrap();
/// w.write("q.weight", &f32s(&[1.0, 1.0])).unwrap();
/// w.finish().unwrap();
/// // Rank 1, alpha 1: W + B @ A with B = [2], A = [1, -1].
/// let ad = tmp.path().join("adapter");
/// let t = |n: &str, s: Vec<usize>| TensorInfo::new(format!("base_model.model.q.{n}"), s, DType::F32);
/// let mut w = ModelWriter::create(&ad, vec![t("lora_A.weight", vec![1, 2]), t("lora_B.weight", vec![1, 1])],
///     WriterOptions::default()).unwrap();
/// w.write("base_model.model.q.lora_A.weight", &f32s(&[1.0, -1.0])).unwrap();
/// w.write("base_model.model.q.lora_B.weight", &f32s(&[2.0])).unwrap();
/// w.finish().unwrap();
/// std::fs::rename(ad.join("model.safetensors"), ad.join("adapter_model.safetensors")).unwrap();
/// std::fs::write(ad.join("adapter_config.json"), AdapterConfig::new(1, 1.0, vec!["q".into()]).to_json()).unwrap();
///
/// let out = tmp.path().join("out");
/// lora::apply(base.to_str().unwrap(), &ad, &out, &EvalOptions::default(), &NoProgress).unwrap();
/// assert_eq!(Model::open_path(&out).unwrap().read_f32_vec("q.weight").unwrap(), [3.0, -1.0]);
/// ```
pub fn apply(
    base: &str,
    adapter: &Path,
    out: &Path,
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<EvalReport, EngineError> {
    if base.contains('+') {
        return Err(EngineError::Option(format!(
            "the base model `{base}` has a `+` in its name, which would be read as `model+lora`; rename or link it"
        )));
    }
    let reference = format!("{base}+{}", adapter.display());
    let models = [("model".to_string(), reference)];
    run_eval("model", &models, out, opts, progress)
}
