//! # tensormerge-python
//!
//! The Python module `tensormerge` (this crate is its compiled part,
//! `tensormerge._tensormerge`; `python/tensormerge/` holds the pure-Python
//! wrapper, the exception classes and the type stubs). Built by maturin:
//!
//! ```text
//! pip install ./crates/python          # or, in a virtual environment:
//! cd crates/python && maturin develop --release
//! ```
//!
//! ```text
//! import numpy as np, tensormerge as tm
//! mapper = tm.ModelTensorMapper.open("base")
//! base, legal, recipe = (mapper.load(m) for m in ("base", "legal", "recipe"))
//! merged = base + 0.5 * ((legal - base) + (recipe - base))
//! mapper.save(merged, "merged")
//! np.asarray(merged)          # read-only float32 view, no copy
//! ```
//!
//! What lives where:
//!
//! - [`vector`]: `ParamVector`, the core crate's flat `f32` vector. Immutable
//!   from Python: numpy views of it are read-only, which is what makes it
//!   sound to release the GIL while Rust reads the buffer.
//! - [`mapper`]: `ModelTensorMapper` (open, load, save through
//!   tensormerge-io's `MapperExt`).
//! - [`merge`]: `merge(...)` and `eval(...)`, the streaming engine and the
//!   expression engine on a thread of their own, with progress, warnings
//!   and Ctrl-C cancellation relayed to Python.
//! - [`methods`]: `methods()` and `run_method(...)`, the in-memory `Merge`
//!   of the methods crate (bit-identical to the engine).
//! - [`errors`]: library errors as Python exceptions, rendered like the CLI
//!   renders them (`Caused by:` lines, `hint:`).
//!
//! Why these libraries: PyO3 is the maintained Rust ↔ CPython binding
//! (abi3: one wheel for CPython >= 3.9), the `numpy` crate gives zero-copy
//! arrays over Rust-owned ndarray buffers, and maturin builds and installs
//! the extension from `pip install` with nothing but PyPI. There is no
//! `extension-module` cargo feature: maturin sets
//! `PYO3_BUILD_EXTENSION_MODULE`, so `cargo build/test --workspace
//! --all-features` link this crate normally.
#![deny(missing_docs)]

pub mod errors;
pub mod mapper;
pub mod merge;
pub mod methods;
pub mod vector;

use pyo3::prelude::*;

/// The compiled part of the `tensormerge` Python package.
#[pymodule]
fn _tensormerge(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<vector::PyParamVector>()?;
    m.add_class::<mapper::PyMapper>()?;
    m.add_class::<merge::PyMergeSummary>()?;
    m.add_function(wrap_pyfunction!(merge::_merge, m)?)?;
    m.add_function(wrap_pyfunction!(merge::_eval, m)?)?;
    m.add_function(wrap_pyfunction!(methods::methods, m)?)?;
    m.add_function(wrap_pyfunction!(methods::run_method, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
