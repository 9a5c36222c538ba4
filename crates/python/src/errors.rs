//! Library errors as Python exceptions, rendered as the command line renders
//! them: the top message, each further cause on a `Caused by:` line, then a
//! `hint:` line where the engine has one ([`EngineError::hint`]).
//!
//! The exception classes live in `tensormerge/errors.py` (they need two
//! bases: `TensormergeError` and `ValueError`/`KeyError`/`OSError`); the
//! class follows the CLI's exit code: 1 (bad input) → `InvalidInputError`,
//! 2 (usage, I/O) → `TensormergeOSError`, a missing tensor name →
//! `UnknownTensorError`.

use std::error::Error;

use pyo3::prelude::*;
use tensormerge::core::CoreError;
use tensormerge::engine::EngineError;
use tensormerge::io::IoError;
use tensormerge::methods::MethodError;

/// Which Python class an error becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bad input (CLI exit code 1): a `ValueError`.
    Invalid,
    /// Usage or I/O (CLI exit code 2): an `OSError`.
    Os,
    /// A tensor name the layout does not have: a `KeyError`.
    UnknownTensor,
}

impl Kind {
    fn class(self) -> &'static str {
        match self {
            Kind::Invalid => "InvalidInputError",
            Kind::Os => "TensormergeOSError",
            Kind::UnknownTensor => "UnknownTensorError",
        }
    }

    fn exit_code(self) -> u8 {
        match self {
            Kind::Invalid | Kind::UnknownTensor => 1,
            Kind::Os => 2,
        }
    }
}

/// The CLI's rendering (without the `error:` label): `top`, then every cause
/// of `err` not already contained in the line before it, as
/// `  Caused by: ...` lines.
pub fn render(top: Option<&str>, err: &(dyn Error + 'static)) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut last = String::new();
    let mut push = |text: String, lines: &mut Vec<String>| {
        if lines.is_empty() {
            lines.push(text.clone());
        } else if !last.contains(&text) {
            for (i, l) in text.lines().enumerate() {
                if i == 0 {
                    lines.push(format!("  Caused by: {l}"));
                } else {
                    lines.push(format!("  {l}"));
                }
            }
        }
        last = text;
    };
    if let Some(t) = top {
        push(t.to_string(), &mut lines);
    }
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        push(e.to_string(), &mut lines);
        cur = e.source();
    }
    lines.join("\n")
}

/// Builds the exception: `message` (plus `\nhint: ...`), with attributes
/// `hint` and `exit_code`.
pub fn raise(py: Python<'_>, kind: Kind, message: String, hint: Option<String>) -> PyErr {
    let text = match &hint {
        Some(h) => format!("{message}\nhint: {h}"),
        None => message,
    };
    let build = || -> PyResult<PyErr> {
        let cls = py.import("tensormerge.errors")?.getattr(kind.class())?;
        let exc = cls.call1((text.clone(),))?;
        exc.setattr("hint", hint.clone())?;
        exc.setattr("exit_code", kind.exit_code())?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|e| e)
}

/// An engine error with an optional top context line (`merge of `x` failed`).
/// `Cancelled` becomes `KeyboardInterrupt`.
pub fn engine(py: Python<'_>, top: Option<&str>, e: &EngineError) -> PyErr {
    if matches!(e, EngineError::Cancelled) {
        return pyo3::exceptions::PyKeyboardInterrupt::new_err(
            "cancelled; the temporary output was removed",
        );
    }
    let kind = if e.is_bad_input() {
        Kind::Invalid
    } else {
        Kind::Os
    };
    raise(py, kind, render(top, e), e.hint())
}

/// An I/O error while `context` (`cannot open model `x``), classified and
/// hinted as the engine does it.
pub fn io(py: Python<'_>, context: String, e: IoError) -> PyErr {
    let e = EngineError::io(context, e);
    engine(py, None, &e)
}

/// A core error (layouts, lengths, tensor names).
pub fn core(py: Python<'_>, e: CoreError) -> PyErr {
    match &e {
        CoreError::UnknownTensor(_) => raise(py, Kind::UnknownTensor, e.to_string(), None),
        _ => raise(py, Kind::Invalid, e.to_string(), None),
    }
}

/// A method error (unknown method, parameters, model count), with the hint
/// the engine gives for it.
pub fn method(py: Python<'_>, e: MethodError) -> PyErr {
    engine(py, None, &EngineError::Method(e))
}
