//! The error type of tensormerge-core.

/// Everything that can go wrong in the core types. Each variant carries the
/// offending input (tensor name, dtype string, lengths).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A dtype string that is neither a safetensors nor a PyTorch dtype name.
    #[error(
        "unknown dtype `{0}` (expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL)"
    )]
    UnknownDType(String),
    /// The same tensor name appears twice in one layout.
    #[error("tensor `{0}` appears more than once")]
    DuplicateTensor(String),
    /// The element count of a shape does not fit in memory addressing.
    #[error("tensor `{name}`: shape {shape:?} has more elements than can be addressed")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// The declared shape.
        shape: Vec<usize>,
    },
    /// Two layouts (of vectors or models) differ; names the first tensor that differs.
    #[error("layouts differ at tensor `{tensor}`: {detail}")]
    LayoutMismatch {
        /// The first tensor (in layout order) at which the layouts differ.
        tensor: String,
        /// What differs (shape, dtype class, presence).
        detail: String,
    },
    /// A tensor name that the layout does not contain.
    #[error("no tensor named `{0}` in this layout")]
    UnknownTensor(String),
    /// A tensor that is not floating point was asked for as float values.
    #[error("tensor `{name}` has dtype {dtype}, which is not a floating-point type")]
    NotFloat {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: crate::DType,
    },
    /// A buffer has the wrong number of elements or bytes.
    #[error("tensor `{name}`: expected {expected} {unit}, got {actual}")]
    LengthMismatch {
        /// Tensor name (or `<vector>` for a whole flat vector).
        name: String,
        /// Expected count.
        expected: usize,
        /// Actual count.
        actual: usize,
        /// `"elements"` or `"bytes"`.
        unit: &'static str,
    },
    /// A [`TensorSource`](crate::TensorSource) failed to produce a tensor.
    #[error("{source_name}: {message}")]
    Source {
        /// Which model or file (path, hub id).
        source_name: String,
        /// What went wrong, already rendered.
        message: String,
    },
}
