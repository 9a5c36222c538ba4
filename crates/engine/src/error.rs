//! Error types of the engine.

use std::path::PathBuf;

use tensormerge_core::CoreError;
use tensormerge_methods::MethodError;

use crate::yaml::Pos;

/// A problem with a merge configuration. Every variant names the key path
/// (`models[1].parameters.weight`) and the position in the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file `{}`", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML (syntax error, duplicate key).
    #[error("invalid YAML ({pos}): {message}")]
    Yaml {
        /// The parser's message.
        message: String,
        /// Where.
        pos: Pos,
    },
    /// A key that the config format does not have.
    #[error("unknown key `{path}` ({pos}){}", did_you_mean(.suggestions))]
    UnknownKey {
        /// Key path.
        path: String,
        /// Where.
        pos: Pos,
        /// Close known keys.
        suggestions: Vec<String>,
        /// All keys allowed at that place.
        known: Vec<String>,
    },
    /// A value of the wrong type.
    #[error("`{path}` ({pos}): expected {expected}, got {got}")]
    WrongType {
        /// Key path.
        path: String,
        /// Where.
        pos: Pos,
        /// What was expected.
        expected: String,
        /// What was found.
        got: String,
    },
    /// A value that cannot be right.
    #[error("`{path}` ({pos}): {message}")]
    Invalid {
        /// Key path.
        path: String,
        /// Where.
        pos: Pos,
        /// What is wrong.
        message: String,
    },
    /// A required key is missing.
    #[error("missing required key `{path}` (in the mapping at {pos})")]
    Missing {
        /// Key path.
        path: String,
        /// The mapping it is missing from.
        pos: Pos,
    },
    /// A mergekit feature that tensormerge does not implement.
    #[error("`{path}` ({pos}): {feature} not supported: {message}")]
    Unsupported {
        /// Key path.
        path: String,
        /// Where.
        pos: Pos,
        /// The feature, by name.
        feature: String,
        /// Explanation and what to do instead.
        message: String,
    },
    /// A parameter the method rejects (unknown, wrong type, out of range).
    #[error("`{path}` ({pos}): {source}")]
    Param {
        /// Key path.
        path: String,
        /// Where.
        pos: Pos,
        /// The method's complaint.
        source: Box<MethodError>,
    },
    /// The method named by `merge_method` is not registered.
    #[error("`merge_method` ({pos}): {source}")]
    Method {
        /// Where.
        pos: Pos,
        /// Unknown method, with suggestions.
        source: Box<MethodError>,
    },
}

fn did_you_mean(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(
            " (did you mean {}?)",
            s.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// A tensor-level incompatibility between inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The model that differs from the reference model (base, or first model).
    pub model: String,
    /// The tensor.
    pub tensor: String,
    /// What differs.
    pub detail: String,
}

/// What can go wrong while planning or running a merge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A model (input, Fisher file, output) could not be opened, read or written.
    #[error("{context}")]
    Io {
        /// What was being done (`cannot open model \`./a\``).
        context: String,
        /// The underlying error.
        #[source]
        source: Box<tensormerge_io::IoError>,
    },
    /// A parameter could not be resolved for one tensor (a required parameter
    /// that no filter entry provides for it).
    #[error("tensor `{tensor}`: {source}")]
    Param {
        /// The tensor.
        tensor: String,
        /// The method's complaint.
        #[source]
        source: Box<MethodError>,
    },
    /// The inputs do not have the same tensors and shapes. Lists every mismatch.
    #[error("the models cannot be merged: {} tensor mismatch(es):\n{}", .0.len(), render_mismatches(.0))]
    Incompatible(Vec<Mismatch>),
    /// A merge method failed or rejected its inputs.
    #[error(transparent)]
    Method(#[from] MethodError),
    /// A core-type error (layouts, conversions).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The output directory is one of the inputs, or lies inside one.
    #[error("output directory `{}` is, contains or lies inside input model `{}`", output.display(), input.display())]
    OutputInsideInput {
        /// The output path.
        output: PathBuf,
        /// The input it collides with.
        input: PathBuf,
    },
    /// The output exists and overwriting was not asked for.
    #[error("output `{}` already exists", .0.display())]
    OutputExists(PathBuf),
    /// A bad option value (`--max-memory 0`, a zero shard size).
    #[error("invalid option: {0}")]
    Option(String),
    /// An input weight is NaN or infinite (refused unless
    /// `allow_non_finite` is set).
    #[error(
        "model `{model}`: tensor `{tensor}` has a non-finite value ({value}) at element {index}"
    )]
    NonFinite {
        /// The model (reference or path).
        model: String,
        /// The tensor.
        tensor: String,
        /// Index (row-major, from 0) of the first bad element.
        index: u64,
        /// The value found.
        value: f32,
    },
    /// The run was cancelled (Ctrl-C); the temporary output was removed.
    #[error("cancelled")]
    Cancelled,
    /// A tokenizer file could not be read, built or written.
    #[error("tokenizer `{}`: {message}", path.display())]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The inputs' vocabularies differ and the config names no tokenizer
    /// source.
    #[error(
        "the models' vocabularies differ: {0}; merging their embedding rows by id would mix unrelated tokens"
    )]
    Vocabulary(String),
    /// A LoRA adapter cannot be extracted from these inputs (no linear
    /// weight in common, nothing changed, an SVD that did not converge).
    #[error("{0}")]
    Lora(String),
    /// An error from another engine component (expressions).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Checks that `values` (elements `offset..` of tensor `tensor` of `model`)
/// are all finite ([`convert::first_non_finite`](tensormerge_core::convert::first_non_finite):
/// a branch-free pass, a search for the index only where there is a bad value).
pub(crate) fn check_finite(
    values: &[f32],
    model: &str,
    tensor: &str,
    offset: usize,
) -> Result<(), EngineError> {
    match tensormerge_core::convert::first_non_finite(values) {
        None => Ok(()),
        Some(i) => Err(non_finite_at(values, i, model, tensor, offset)),
    }
}

/// The error for `values[i]`, a NaN or infinity found at element
/// `offset + i` of tensor `tensor` of `model` (by [`check_finite`] or while
/// decoding).
pub(crate) fn non_finite_at(
    values: &[f32],
    i: usize,
    model: &str,
    tensor: &str,
    offset: usize,
) -> EngineError {
    EngineError::NonFinite {
        model: model.to_owned(),
        tensor: tensor.to_owned(),
        index: (offset + i) as u64,
        value: values[i],
    }
}

fn render_mismatches(m: &[Mismatch]) -> String {
    m.iter()
        .map(|m| format!("  {}: tensor `{}`: {}", m.model, m.tensor, m.detail))
        .collect::<Vec<_>>()
        .join("\n")
}

impl EngineError {
    /// Wraps an I/O error with what was being done; a refused output path
    /// becomes [`EngineError::OutputExists`] or [`EngineError::OutputInsideInput`].
    pub fn io(context: impl Into<String>, source: tensormerge_io::IoError) -> Self {
        match source {
            tensormerge_io::IoError::OutputExists { path } => EngineError::OutputExists(path),
            tensormerge_io::IoError::OutputIsInput { out, input } => {
                EngineError::OutputInsideInput { output: out, input }
            }
            source => EngineError::Io {
                context: context.into(),
                source: Box::new(source),
            },
        }
    }

    /// Whether the error is the user's input (config, models that do not fit
    /// together, unknown method): exit code 1 in the CLI; otherwise (I/O, usage
    /// of the output path) exit code 2.
    pub fn is_bad_input(&self) -> bool {
        match self {
            EngineError::Config(ConfigError::Read { .. }) => false,
            EngineError::Config(_) | EngineError::Incompatible(_) | EngineError::Method(_) => true,
            EngineError::Param { .. } => true,
            EngineError::Io { source, .. } => io_is_bad_input(source),
            EngineError::Core(_) | EngineError::NonFinite { .. } => true,
            EngineError::Cancelled => false,
            EngineError::Tokenizer { .. } | EngineError::Vocabulary(_) => true,
            EngineError::Lora(_) => true,
            EngineError::OutputInsideInput { .. }
            | EngineError::OutputExists(_)
            | EngineError::Option(_) => false,
            EngineError::Other(e) => match e.downcast_ref::<tensormerge_io::IoError>() {
                Some(io) => io_is_bad_input(io),
                None => true,
            },
        }
    }

    /// A hint for the user, where one helps.
    pub fn hint(&self) -> Option<String> {
        match self {
            EngineError::OutputExists(_) => Some("pass --overwrite to replace it".into()),
            EngineError::OutputInsideInput { .. } => {
                Some("write the output next to the input models, not inside one".into())
            }
            EngineError::Config(ConfigError::UnknownKey { known, .. }) => {
                Some(format!("keys allowed here: {}", known.join(", ")))
            }
            EngineError::Config(ConfigError::Method { .. }) | EngineError::Method(MethodError::UnknownMethod { .. }) => {
                Some("`tensormerge methods list` shows the available methods".into())
            }
            EngineError::Config(ConfigError::Param { source, .. }) => match source.as_ref() {
                MethodError::UnknownParameter { method, .. } => {
                    Some(format!("`tensormerge methods show {method}` lists its parameters"))
                }
                _ => None,
            },
            EngineError::NonFinite { .. } => {
                Some("pass --allow-non-finite to merge such weights anyway".into())
            }
            EngineError::Vocabulary(_) => Some(
                "set `tokenizer_source: union` (every model's tokens), `tokenizer_source: base` or `tokenizer_source: MODEL` in the config: embedding and lm_head rows are then remapped by token".into(),
            ),
            EngineError::Incompatible(m) if m.iter().any(|m| crate::tokenizer::is_embedding(&m.tensor)) => {
                Some("all models must be fine-tunes of the same architecture (same tensor names and shapes); embedding rows that differ are remapped by token with `tokenizer_source: union` (or `base`, or a model)".into())
            }
            EngineError::Incompatible(_) => {
                Some("all models must be fine-tunes of the same architecture (same tensor names and shapes)".into())
            }
            _ => None,
        }
    }
}

/// A missing model or a malformed input file is the user's input; a refused
/// output path and failing reads or writes (permissions, disk full) are usage
/// and I/O errors.
fn io_is_bad_input(e: &tensormerge_io::IoError) -> bool {
    use tensormerge_io::IoError as E;
    !matches!(
        e,
        E::Io { .. }
            | E::OutputExists { .. }
            | E::OutputNotDirectory { .. }
            | E::OutputIsInput { .. }
            | E::WriteOrder { .. }
            | E::UndeclaredTensor { .. }
            | E::TooManyBytes { .. }
            | E::Incomplete { .. }
            | E::WriterFailed { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finite_finds_the_first_bad_element_across_blocks() {
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32 - 500.0).collect();
        v.push(f32::MAX);
        v.push(f32::MIN_POSITIVE / 4.0); // subnormal: finite
        assert!(check_finite(&v, "m", "t", 0).is_ok());
        for (bad, at) in [
            (f32::NAN, 700),
            (f32::NEG_INFINITY, 256),
            (f32::INFINITY, 255),
        ] {
            let mut w = v.clone();
            w[at] = bad;
            w[900] = f32::NAN; // a later one is not the one reported
            match check_finite(&w, "./m", "layer.w", 4096) {
                Err(EngineError::NonFinite {
                    model,
                    tensor,
                    index,
                    value,
                }) => {
                    assert_eq!((model.as_str(), tensor.as_str()), ("./m", "layer.w"));
                    assert_eq!(index, 4096 + at as u64);
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
