//! The error type of tensormerge-methods.

use tensormerge_core::CoreError;

/// What can go wrong when choosing, configuring or running a merge method.
/// Each variant names the method, parameter or tensor involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MethodError {
    /// No registered method has this name.
    #[error("unknown merge method `{name}`{}", suggest(.suggestions))]
    UnknownMethod {
        /// The name asked for.
        name: String,
        /// Registered names close to it.
        suggestions: Vec<String>,
    },
    /// Two crates registered the same method name.
    #[error(
        "merge method `{name}` is registered twice, by `{first_crate}` and by `{second_crate}`"
    )]
    DuplicateMethod {
        /// The method name.
        name: String,
        /// The crate registered first (in sorted order).
        first_crate: String,
        /// The other crate.
        second_crate: String,
    },
    /// A parameter the method does not declare.
    #[error("method `{method}` has no parameter `{param}` (it has: {})", .known.join(", "))]
    UnknownParameter {
        /// Method name.
        method: String,
        /// The unknown parameter.
        param: String,
        /// The parameters it does have.
        known: Vec<String>,
    },
    /// A parameter given a value of the wrong type.
    #[error("method `{method}`, parameter `{param}`: expected {expected}, got {got}")]
    WrongType {
        /// Method name.
        method: String,
        /// Parameter name.
        param: String,
        /// What was expected.
        expected: String,
        /// What was given.
        got: String,
    },
    /// A parameter value outside the allowed range.
    #[error("method `{method}`, parameter `{param}`: {value} is out of range ({range})")]
    OutOfRange {
        /// Method name.
        method: String,
        /// Parameter name.
        param: String,
        /// The value given.
        value: String,
        /// The allowed range.
        range: String,
    },
    /// A required parameter without a default was not given.
    #[error("method `{method}` needs parameter `{param}`")]
    MissingParameter {
        /// Method name.
        method: String,
        /// Parameter name.
        param: String,
    },
    /// The method needs a base model and none was given.
    #[error("method `{method}` needs a base model (set `base_model`)")]
    NeedsBase {
        /// Method name.
        method: String,
    },
    /// The method cannot work with this many models.
    #[error("method `{method}` needs {expected} models, got {got}")]
    ModelCount {
        /// Method name.
        method: String,
        /// What it accepts, e.g. `exactly 2` or `at least 1`.
        expected: String,
        /// How many were given.
        got: usize,
    },
    /// The inputs cannot be merged as configured (e.g. weights summing to zero).
    #[error("method `{method}`, tensor `{tensor}`: {message}")]
    Invalid {
        /// Method name.
        method: String,
        /// Tensor name (or `<model>` for whole-model problems).
        tensor: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// Inputs of different layouts, or a faulted vector.
    #[error(transparent)]
    Core(#[from] CoreError),
}

fn suggest(s: &[String]) -> String {
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
