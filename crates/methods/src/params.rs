//! Parameter schemas and resolved parameter values.

use std::collections::BTreeMap;
use std::fmt;

use crate::MethodError;

/// Whether a parameter is set per model or once for the whole merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Set under `models[].parameters` (and may have a top-level default).
    PerModel,
    /// Set under the top-level `parameters`.
    Global,
}

/// The type and range of a parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamKind {
    /// A real number in `[min, max]` (inclusive; infinite bounds for none).
    Float {
        /// Smallest allowed value.
        min: f64,
        /// Largest allowed value.
        max: f64,
    },
    /// An integer in `[min, max]`.
    Int {
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
    /// `true` or `false`.
    Bool,
    /// One of a fixed set of words. YAML booleans are accepted as `"true"` /
    /// `"false"` when those are among the choices (DARE's `rescale`).
    Choice(&'static [&'static str]),
    /// A path (or hub id) of a model with the same tensor names, whose tensors
    /// the engine reads alongside each model and passes as auxiliary input
    /// (Fisher estimates).
    ModelRef,
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamKind::Float { min, max } => match (min.is_finite(), max.is_finite()) {
                (true, true) => write!(f, "number in [{min}, {max}]"),
                (true, false) => write!(f, "number ≥ {min}"),
                (false, true) => write!(f, "number ≤ {max}"),
                (false, false) => write!(f, "number"),
            },
            ParamKind::Int { min, max } => write!(f, "integer in [{min}, {max}]"),
            ParamKind::Bool => write!(f, "true or false"),
            ParamKind::Choice(c) => write!(f, "one of {}", c.join(", ")),
            ParamKind::ModelRef => write!(f, "model path or hub id"),
        }
    }
}

/// A parameter's default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    /// No default: the parameter must be given.
    Required,
    /// No default: absent means "not set" (e.g. an optional Fisher file).
    Unset,
    /// A number.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A choice word.
    Choice(&'static str),
}

impl fmt::Display for Default {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Default::Required => f.write_str("required"),
            Default::Unset => f.write_str("unset"),
            Default::Float(v) => write!(f, "{v}"),
            Default::Int(v) => write!(f, "{v}"),
            Default::Bool(v) => write!(f, "{v}"),
            Default::Choice(v) => f.write_str(v),
        }
    }
}

/// One declared parameter of a method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamSpec {
    /// Name as written in configs (mergekit's spelling).
    pub name: &'static str,
    /// Per model or global.
    pub scope: Scope,
    /// Type and range.
    pub kind: ParamKind,
    /// Default when not given.
    pub default: Default,
    /// One-line documentation.
    pub doc: &'static str,
}

impl ParamSpec {
    /// The per-model `weight` most methods share: any real number, default
    /// 1.0 (mergekit's name; a negative weight subtracts a task).
    pub const WEIGHT: ParamSpec = ParamSpec::per_model_float(
        "weight",
        f64::NEG_INFINITY,
        f64::INFINITY,
        Default::Float(1.0),
        "the model's weight w_i",
    );

    /// The global `consensus` of the TIES family's sign election
    /// ([`ops::Consensus`](crate::ops::Consensus)): `sum` (default) or `count`.
    pub const CONSENSUS: ParamSpec = ParamSpec::global(
        "consensus",
        ParamKind::Choice(&["sum", "count"]),
        Default::Choice("sum"),
        "sign election: sign of the weighted sum, or majority of signs",
    );

    /// mergekit's global `int8_mask` (a memory saving of its torch code):
    /// accepted so that mergekit configs load, with no effect here.
    pub const INT8_MASK: ParamSpec = ParamSpec::global(
        "int8_mask",
        ParamKind::Bool,
        Default::Bool(false),
        "accepted for mergekit compatibility; no effect",
    );

    /// The global `lambda` of task-vector methods: the factor on the merged
    /// task vector, default 1.0.
    pub const LAMBDA: ParamSpec = ParamSpec::global(
        "lambda",
        ParamKind::Float {
            min: f64::NEG_INFINITY,
            max: f64::INFINITY,
        },
        Default::Float(1.0),
        "factor λ on the merged task vector",
    );

    /// A per-model real-valued parameter.
    pub const fn per_model_float(
        name: &'static str,
        min: f64,
        max: f64,
        default: Default,
        doc: &'static str,
    ) -> Self {
        ParamSpec {
            name,
            scope: Scope::PerModel,
            kind: ParamKind::Float { min, max },
            default,
            doc,
        }
    }

    /// A global parameter.
    pub const fn global(
        name: &'static str,
        kind: ParamKind,
        default: Default,
        doc: &'static str,
    ) -> Self {
        ParamSpec {
            name,
            scope: Scope::Global,
            kind,
            default,
            doc,
        }
    }

    /// Checks `value` against this spec for `method`, coercing where lossless
    /// (integer to float, boolean to a `"true"`/`"false"` choice).
    pub fn check(&self, method: &str, value: &ParamValue) -> Result<ParamValue, MethodError> {
        let wrong = |expected: String| MethodError::WrongType {
            method: method.to_string(),
            param: self.name.to_string(),
            expected,
            got: value.describe(),
        };
        let range = |v: String| MethodError::OutOfRange {
            method: method.to_string(),
            param: self.name.to_string(),
            value: v,
            range: self.kind.to_string(),
        };
        match (self.kind, value) {
            (ParamKind::Float { min, max }, ParamValue::Float(v)) => {
                if !v.is_finite() || *v < min || *v > max {
                    return Err(range(v.to_string()));
                }
                Ok(ParamValue::Float(*v))
            }
            (ParamKind::Float { min, max }, ParamValue::Int(v)) => {
                let f = *v as f64;
                if f < min || f > max {
                    return Err(range(v.to_string()));
                }
                Ok(ParamValue::Float(f))
            }
            (ParamKind::Int { min, max }, ParamValue::Int(v)) => {
                if *v < min || *v > max {
                    return Err(range(v.to_string()));
                }
                Ok(ParamValue::Int(*v))
            }
            (ParamKind::Bool, ParamValue::Bool(b)) => Ok(ParamValue::Bool(*b)),
            (ParamKind::Choice(c), ParamValue::Str(s)) => {
                if c.contains(&s.as_str()) {
                    Ok(ParamValue::Str(s.clone()))
                } else {
                    Err(range(format!("`{s}`")))
                }
            }
            (ParamKind::Choice(c), ParamValue::Bool(b))
                if c.contains(&if *b { "true" } else { "false" }) =>
            {
                Ok(ParamValue::Str(b.to_string()))
            }
            (ParamKind::ModelRef, ParamValue::Str(s)) => Ok(ParamValue::Str(s.clone())),
            (kind, _) => Err(wrong(kind.to_string())),
        }
    }

    /// The default as a value, if there is one.
    pub fn default_value(&self) -> Option<ParamValue> {
        match self.default {
            Default::Required | Default::Unset => None,
            Default::Float(v) => Some(ParamValue::Float(v)),
            Default::Int(v) => Some(ParamValue::Int(v)),
            Default::Bool(v) => Some(ParamValue::Bool(v)),
            Default::Choice(v) => Some(ParamValue::Str(v.to_string())),
        }
    }
}

/// A parameter value as written in a config.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A number.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A word or a path.
    Str(String),
}

impl ParamValue {
    fn describe(&self) -> String {
        match self {
            ParamValue::Float(v) => format!("number {v}"),
            ParamValue::Int(v) => format!("integer {v}"),
            ParamValue::Bool(v) => format!("boolean {v}"),
            ParamValue::Str(s) => format!("string `{s}`"),
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Float(v) => write!(f, "{v}"),
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Bool(v) => write!(f, "{v}"),
            ParamValue::Str(s) => f.write_str(s),
        }
    }
}

impl From<f64> for ParamValue {
    fn from(v: f64) -> Self {
        ParamValue::Float(v)
    }
}
impl From<bool> for ParamValue {
    fn from(v: bool) -> Self {
        ParamValue::Bool(v)
    }
}
impl From<&str> for ParamValue {
    fn from(v: &str) -> Self {
        ParamValue::Str(v.to_string())
    }
}
impl From<i64> for ParamValue {
    fn from(v: i64) -> Self {
        ParamValue::Int(v)
    }
}

/// Resolved parameter values (one model's, or the global ones) for one tensor:
/// validated against the schema, defaults filled in.
#[derive(Debug, Clone, PartialEq, std::default::Default)]
pub struct Params {
    method: &'static str,
    values: BTreeMap<&'static str, ParamValue>,
}

impl Params {
    /// Validates `given` against the `scope` parameters of `specs` for
    /// `method` and fills in defaults. Unknown names are errors; a required
    /// parameter that is missing is an error.
    ///
    /// ```
    /// use tensormerge_methods::{ParamSpec, ParamValue, Params, Scope, Default};
    /// const SPECS: &[ParamSpec] = &[ParamSpec::per_model_float("weight", f64::NEG_INFINITY, f64::INFINITY, Default::Float(1.0), "w")];
    /// let p = Params::resolve("linear", SPECS, Scope::PerModel, [("weight", ParamValue::Int(2))]).unwrap();
    /// assert_eq!(p.f32("weight").unwrap(), 2.0);
    /// assert!(Params::resolve("linear", SPECS, Scope::PerModel, [("wieght", ParamValue::Int(2))]).is_err());
    /// ```
    pub fn resolve<'a>(
        method: &'static str,
        specs: &'static [ParamSpec],
        scope: Scope,
        given: impl IntoIterator<Item = (&'a str, ParamValue)>,
    ) -> Result<Self, MethodError> {
        let mut values = BTreeMap::new();
        for (name, value) in given {
            let spec = specs
                .iter()
                .find(|s| s.name == name && s.scope == scope)
                .ok_or_else(|| MethodError::UnknownParameter {
                    method: method.to_string(),
                    param: name.to_string(),
                    known: specs
                        .iter()
                        .filter(|s| s.scope == scope)
                        .map(|s| s.name.to_string())
                        .collect(),
                })?;
            values.insert(spec.name, spec.check(method, &value)?);
        }
        for spec in specs.iter().filter(|s| s.scope == scope) {
            if values.contains_key(spec.name) {
                continue;
            }
            match spec.default_value() {
                Some(v) => {
                    values.insert(spec.name, v);
                }
                None if spec.default == Default::Required => {
                    return Err(MethodError::MissingParameter {
                        method: method.to_string(),
                        param: spec.name.to_string(),
                    });
                }
                None => {}
            }
        }
        Ok(Params { method, values })
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.values.get(name)
    }

    /// All values, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &ParamValue)> + '_ {
        self.values.iter().map(|(k, v)| (*k, v))
    }

    fn missing(&self, name: &str) -> MethodError {
        MethodError::MissingParameter {
            method: self.method.to_string(),
            param: name.to_string(),
        }
    }

    /// A numeric parameter as `f64`.
    pub fn f64(&self, name: &str) -> Result<f64, MethodError> {
        match self.values.get(name) {
            Some(ParamValue::Float(v)) => Ok(*v),
            Some(ParamValue::Int(v)) => Ok(*v as f64),
            _ => Err(self.missing(name)),
        }
    }

    /// A numeric parameter as `f32`.
    pub fn f32(&self, name: &str) -> Result<f32, MethodError> {
        self.f64(name).map(|v| v as f32)
    }

    /// A boolean parameter.
    pub fn bool(&self, name: &str) -> Result<bool, MethodError> {
        match self.values.get(name) {
            Some(ParamValue::Bool(v)) => Ok(*v),
            _ => Err(self.missing(name)),
        }
    }

    /// A choice or string parameter.
    pub fn str(&self, name: &str) -> Result<&str, MethodError> {
        match self.values.get(name) {
            Some(ParamValue::Str(v)) => Ok(v),
            _ => Err(self.missing(name)),
        }
    }
}
