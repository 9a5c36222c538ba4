//! The expression language: arithmetic on whole models.
//!
//! ```text
//! base + 0.5 * ((legal - base) + (recipe - base))
//! ```
//!
//! An expression combines model names (`[A-Za-z_][A-Za-z0-9_]*`, bound to
//! model references by the caller), `f32` numbers (`2`, `0.5`, `.5`, `1e-3`),
//! the operators `+ - * /`, unary minus and parentheses, with the usual
//! precedence (unary minus binds tightest, then `* /`, then `+ -`, all
//! left-associative).
//!
//! The meaning is exactly that of [`ParamVector`] arithmetic in
//! `tensormerge-core`: element-wise `f32` operations, evaluated in the order
//! the expression is written (nothing is reassociated or folded beyond what
//! the `f32` operators themselves do), so the streaming path
//! ([`run_eval`]) and the in-memory path ([`eval_vectors`]) give the same bits
//! as writing the formula with `ParamVector` operators in Rust:
//!
//! ```
//! use std::{collections::HashMap, sync::Arc};
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_engine::expr;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![3], DType::F32)]).unwrap());
//! let v = |x: [f32; 3]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let (base, legal, recipe) = (v([1.0, 1.0, 1.0]), v([2.0, 1.0, 0.0]), v([1.0, 3.0, 1.0]));
//!
//! let e = expr::parse("base + 0.5 * ((legal - base) + (recipe - base))").unwrap();
//! let models = HashMap::from([
//!     ("base".to_string(), base.clone()),
//!     ("legal".to_string(), legal.clone()),
//!     ("recipe".to_string(), recipe.clone()),
//! ]);
//! let merged = expr::eval_vectors(&e, &models).unwrap();
//! assert_eq!(merged, &base + 0.5 * ((&legal - &base) + (&recipe - &base)));
//!
//! // Errors point at the column.
//! let err = expr::parse("base + 0.5 * (legal - )").unwrap_err();
//! assert_eq!(err.column(), Some(23));
//! ```
//!
//! # Limits
//!
//! Expressions come from the command line and from files, so they are
//! untrusted: the text is limited to [`MAX_LEN`] bytes and parentheses to
//! [`MAX_DEPTH`] levels. Parsing recurses only through parentheses, and the
//! parsed form is a flat postfix program, so no input, however long, can
//! overflow the stack while parsing, evaluating or dropping it.

use std::collections::HashMap;
use std::fmt;

use tensormerge_core::{CoreError, ParamVector};

mod kernel;
mod parse;
mod stream;

pub use kernel::Evaluator;
pub use stream::{EvalOptions, EvalReport, run_eval};

/// Longest accepted expression, in bytes.
pub const MAX_LEN: usize = 64 * 1024;

/// Deepest accepted nesting of parentheses.
pub const MAX_DEPTH: usize = 64;

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
}

impl BinOp {
    /// The operator's symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

/// One instruction of the postfix program.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Node {
    Scalar(f32),
    /// Model `index` into `Expr::models`, named at `column`.
    Model {
        index: usize,
        column: usize,
    },
    Neg,
    Binary(BinOp),
}

/// A parsed expression: a flat postfix program plus the model names it uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    source: String,
    nodes: Vec<Node>,
    /// Distinct model names in order of first use, with that column.
    models: Vec<(String, usize)>,
}

impl Expr {
    /// Parses an expression; same as [`parse`].
    pub fn parse(src: &str) -> Result<Expr, ExprError> {
        parse::parse(src)
    }

    /// The text the expression was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The distinct model names, in order of first use. Inputs of an
    /// [`Evaluator`] are indexed in this order.
    pub fn models(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.models.iter().map(|(n, _)| n.as_str())
    }

    /// Column (1-based, in characters) where model `name` is first used.
    pub fn column_of(&self, name: &str) -> Option<usize> {
        self.models.iter().find(|(n, _)| n == name).map(|(_, c)| *c)
    }

    /// Number of instructions of the postfix program (a size measure).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always `false`: an expression has at least one model.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Expr {
    type Err = ExprError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Parses an expression.
///
/// ```
/// use tensormerge_engine::expr::parse;
/// let e = parse("-a + 2 * (b - a)").unwrap();
/// assert_eq!(e.models().collect::<Vec<_>>(), ["a", "b"]);
/// let err = parse("a + * b").unwrap_err();
/// assert_eq!(err.column(), Some(5));
/// assert!(err.to_string().ends_with("a + * b\n      ^"));
/// ```
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    parse::parse(src)
}

/// Errors of parsing and evaluating expressions. Errors at a position carry
/// the column and render the expression with a caret under it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExprError {
    /// The expression is longer than [`MAX_LEN`].
    #[error("the expression is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Parentheses nest deeper than [`MAX_DEPTH`].
    #[error("parentheses nest deeper than {max} levels at column {column}\n{snippet}")]
    TooDeep {
        /// Column of the `(` that goes too deep.
        column: usize,
        /// The limit.
        max: usize,
        /// The expression with a caret under the column.
        snippet: String,
    },
    /// The text is not a valid expression.
    #[error("syntax error at column {column}: {message}\n{snippet}")]
    Syntax {
        /// 1-based column, in characters.
        column: usize,
        /// What was expected or found.
        message: String,
        /// The expression with a caret under the column.
        snippet: String,
    },
    /// The expression uses no model, so it has no shape.
    #[error("the expression `{source_text}` uses no model; name at least one model")]
    NoModel {
        /// The expression.
        source_text: String,
    },
    /// A model name in the expression that was not given a model.
    #[error("unknown model `{name}` at column {column} (given: {})\n{snippet}", fmt_list(.known))]
    UnknownModel {
        /// The name.
        name: String,
        /// Where it is first used.
        column: usize,
        /// The expression with a caret under the column.
        snippet: String,
        /// The names that were given.
        known: Vec<String>,
    },
    /// A model's vector has another layout than the first model's.
    #[error("model `{model}` does not have the layout of `{first}`")]
    LayoutMismatch {
        /// The model that differs.
        model: String,
        /// The first model of the expression.
        first: String,
        /// The difference.
        #[source]
        source: CoreError,
    },
    /// An input vector is faulted or otherwise unusable.
    #[error("model `{model}`: invalid vector")]
    Vector {
        /// The model.
        model: String,
        /// The vector's error.
        #[source]
        source: CoreError,
    },
    /// Inputs of an [`Evaluator`] do not match the expression.
    #[error("evaluator inputs: {detail}")]
    Inputs {
        /// What is wrong.
        detail: String,
    },
}

fn fmt_list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ExprError {
    pub(crate) fn syntax(src: &str, column: usize, message: impl Into<String>) -> Self {
        ExprError::Syntax {
            column,
            message: message.into(),
            snippet: snippet(src, column),
        }
    }

    pub(crate) fn unknown_model(expr: &Expr, name: &str, known: Vec<String>) -> Self {
        let column = expr.column_of(name).unwrap_or(1);
        ExprError::UnknownModel {
            name: name.to_string(),
            column,
            snippet: snippet(&expr.source, column),
            known,
        }
    }

    /// The 1-based column (in characters) the error points at, if any.
    pub fn column(&self) -> Option<usize> {
        match self {
            ExprError::TooDeep { column, .. }
            | ExprError::Syntax { column, .. }
            | ExprError::UnknownModel { column, .. } => Some(*column),
            _ => None,
        }
    }
}

/// Renders `src` on one line with a caret under `column` (1-based, in
/// characters), indented by two spaces. Long expressions are cut to a window
/// around the column; control characters are shown as spaces so the caret
/// stays aligned.
fn snippet(src: &str, column: usize) -> String {
    const HALF: usize = 36;
    let chars: Vec<char> = src
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let col = column.saturating_sub(1).min(chars.len());
    let start = col.saturating_sub(HALF);
    let end = (col + HALF).min(chars.len());
    let mut line = String::from("  ");
    let mut caret = 2 + col - start;
    if start > 0 {
        line.push_str("...");
        caret += 3;
    }
    line.extend(&chars[start..end]);
    if end < chars.len() {
        line.push_str("...");
    }
    format!("{}\n{}^", line.trim_end(), " ".repeat(caret))
}

/// A value on the in-memory evaluation stack: borrowed inputs are not cloned
/// until an operation needs a fresh vector.
enum Value<'a> {
    Scalar(f32),
    Ref(&'a ParamVector),
    Owned(ParamVector),
}

macro_rules! vector_op {
    ($l:expr, $r:expr, $sym:tt) => {
        match ($l, $r) {
            (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(a $sym b),
            (Value::Scalar(a), Value::Ref(b)) => Value::Owned(a $sym b),
            (Value::Scalar(a), Value::Owned(b)) => Value::Owned(a $sym b),
            (Value::Ref(a), Value::Scalar(b)) => Value::Owned(a $sym b),
            (Value::Owned(a), Value::Scalar(b)) => Value::Owned(a $sym b),
            (Value::Ref(a), Value::Ref(b)) => Value::Owned(a $sym b),
            (Value::Ref(a), Value::Owned(b)) => Value::Owned(a $sym b),
            (Value::Owned(a), Value::Ref(b)) => Value::Owned(a $sym b),
            (Value::Owned(a), Value::Owned(b)) => Value::Owned(a $sym b),
        }
    };
}

/// Evaluates `expr` on in-memory vectors, keyed by model name, with
/// [`ParamVector`]'s own operators (so the result is, by construction, what
/// the same formula written in Rust gives).
///
/// Every model the expression names must be in `models` (extra entries are
/// ignored), and all of them must share one layout: the error names the model
/// that differs from the first one used.
pub fn eval_vectors(
    expr: &Expr,
    models: &HashMap<String, ParamVector>,
) -> Result<ParamVector, ExprError> {
    let mut inputs = Vec::with_capacity(expr.models.len());
    for (name, _) in &expr.models {
        match models.get(name) {
            Some(v) => inputs.push(v),
            None => {
                let mut known: Vec<String> = models.keys().cloned().collect();
                known.sort();
                return Err(ExprError::unknown_model(expr, name, known));
            }
        }
    }
    for ((name, _), v) in expr.models.iter().zip(&inputs) {
        v.check().map_err(|source| ExprError::Vector {
            model: name.clone(),
            source,
        })?;
    }
    let first = inputs[0];
    for ((name, _), v) in expr.models.iter().zip(&inputs).skip(1) {
        if let Some(source) = first.layout().first_difference(v.layout()) {
            return Err(ExprError::LayoutMismatch {
                model: name.clone(),
                first: expr.models[0].0.clone(),
                source,
            });
        }
    }
    let mut stack: Vec<Value<'_>> = Vec::new();
    for node in &expr.nodes {
        let value = match *node {
            Node::Scalar(v) => Value::Scalar(v),
            Node::Model { index, .. } => Value::Ref(inputs[index]),
            Node::Neg => match stack.pop().expect("postfix program is well formed") {
                Value::Scalar(v) => Value::Scalar(-v),
                Value::Ref(v) => Value::Owned(-v),
                Value::Owned(v) => Value::Owned(-v),
            },
            Node::Binary(op) => {
                let r = stack.pop().expect("postfix program is well formed");
                let l = stack.pop().expect("postfix program is well formed");
                match op {
                    BinOp::Add => vector_op!(l, r, +),
                    BinOp::Sub => vector_op!(l, r, -),
                    BinOp::Mul => vector_op!(l, r, *),
                    BinOp::Div => vector_op!(l, r, /),
                }
            }
        };
        stack.push(value);
    }
    let result = match stack.pop() {
        Some(Value::Owned(v)) => v,
        Some(Value::Ref(v)) => v.clone(),
        _ => {
            return Err(ExprError::NoModel {
                source_text: expr.source.clone(),
            });
        }
    };
    result.check().map_err(|source| ExprError::Vector {
        model: expr.models[0].0.clone(),
        source,
    })?;
    Ok(result)
}
