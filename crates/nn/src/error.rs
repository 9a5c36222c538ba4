//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading, running or scoring a model.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// Reading the model's weights failed.
    #[error(transparent)]
    Io(#[from] tensormerge_io::IoError),
    /// The vector does not fit the mapper, or a tensor could not be converted.
    #[error("{context}: {source}")]
    Core {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: tensormerge_core::CoreError,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// `config.json` is missing, not JSON, or lacks a key the architecture needs.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// `model_type`/`architectures` name an architecture this crate cannot run.
    #[error(
        "{}: unsupported architecture `{found}`; supported: model_type llama, mistral, qwen2 (causal LM), gpt2 (causal LM), bert (encoder; BertForSequenceClassification head)",
        path.display()
    )]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `model_type` (and `architectures`) found.
        found: String,
    },
    /// `tokenizer.json` is missing or cannot be parsed.
    #[error(
        "{}: cannot load the tokenizer: {message} (a merge output gets the tokenizer that `tokenizer_source` in the merge config decides: copy or point to the tokenizer.json of the base or of a model)",
        path.display()
    )]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// Why it could not be loaded.
        message: String,
    },
    /// A tensor the architecture needs is not in the model.
    #[error("{model}: tensor `{name}` is missing (needed by the {arch} architecture)")]
    MissingTensor {
        /// The model.
        model: String,
        /// The tensor name.
        name: String,
        /// The architecture.
        arch: &'static str,
    },
    /// A tensor has the wrong shape for the config.
    #[error("{model}: tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    Shape {
        /// The model.
        model: String,
        /// The tensor name.
        name: String,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// Bad input text, prompt or option (names what and what to do).
    #[error("{0}")]
    Input(String),
    /// The model cannot do what was asked (e.g. `generate` on an encoder).
    #[error("{model}: {message}")]
    Unsupported {
        /// The model.
        model: String,
        /// What it cannot do.
        message: String,
    },
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl NnError {
    /// Whether the error is the user's input (exit code 1) rather than an
    /// I/O failure (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, NnError::File { .. } | NnError::Candle(_))
            && !matches!(self, NnError::Io(tensormerge_io::IoError::Io { .. }))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = NnError> = std::result::Result<T, E>;
