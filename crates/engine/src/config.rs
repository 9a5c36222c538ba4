//! Merge configurations: mergekit's YAML, with the same meaning.
//!
//! ```yaml
//! merge_method: ties
//! base_model: org/base@main            # a directory, a .safetensors file or a hub id[@revision]
//! models:
//!   - model: ./legal
//!     parameters:
//!       weight: [0.2, 1.0]             # gradient over the layer index
//!       density:
//!         - filter: mlp                # first filter whose text occurs in the tensor name wins
//!           value: 0.5
//!         - value: 0.3                 # no filter: matches every tensor
//!   - model: ./recipe
//! parameters:
//!   weight: 0.5                        # default for every model
//!   lambda: 1.0
//!   trim_scope: model                  # ours: TIES trims over the whole model
//! dtype: bfloat16                      # output dtype (see below)
//! out_dtype: float16                   # wins over `dtype`
//! tokenizer_source: base               # or `union`, or one of the models (see `tokenizer`)
//! seed: 42                             # ours: DARE's random masks
//! ```
//!
//! # Meaning, and where we differ from mergekit
//!
//! * **`dtype`**: in mergekit the dtype in which tensors are merged. Here merging
//!   is always done in `f32` (exact for bf16/f16 inputs; f64 inputs are
//!   narrowed), so `dtype` only sets the *output* dtype of floating-point
//!   tensors, unless `out_dtype` is given, which wins. With neither, each
//!   output tensor keeps the base model's dtype (the first model's when there is
//!   no base).
//! * **Parameter precedence** (mergekit's `ConfigReader.parameter`): a model's
//!   own `parameters` first, then the top-level `parameters`, then the method's
//!   default. A filter list in which no entry matches the tensor falls through
//!   to the next level, as in mergekit. Global parameters come from the
//!   top-level `parameters` only.
//! * **Gradients** (lists of numbers) are piecewise-linear over
//!   `t = layer / (num_layers − 1)` (`t = 1` for a single-layer model), where
//!   the layer index is the first purely numeric component of the tensor name
//!   (`model.layers.7.mlp.up_proj.weight` → 7) and `num_layers` is one more than
//!   the largest such index in the model. Tensors outside the layers
//!   (embeddings, final norm, head) take `t = 0`, the gradient's first value,
//!   as current mergekit does. Lists of words step instead of interpolating.
//! * **Filters** match by substring of the tensor name; `filter: "*"` or no
//!   filter matches everything; the first match wins.
//! * Our own keys: `seed` (global random seed, default 0), `trim_scope`
//!   (shorthand for the TIES parameter of that name; it may also be written
//!   under `parameters`), and Fisher files as the per-model parameter `fisher`
//!   (a model path or hub id with the same tensor names). When the base model is
//!   listed under `models` as well (as mergekit configs often do) and the method
//!   uses a base, that entry is not merged as a model: its `fisher` (or other
//!   model-reference parameter) becomes the base's auxiliary input, and its other
//!   parameters are ignored with a warning, as mergekit ignores them.
//! * **`slices`** (layer ranges stacked into the output; frankenmerges with
//!   `passthrough`), mutually exclusive with `models`: see [`crate::slices`]
//!   for their meaning, parameter precedence and the non-layer tensors.
//! * **LoRA references**: `model: BASE+ADAPTER` (mergekit's syntax) or a
//!   per-model `lora: ADAPTER` key name a PEFT adapter directory applied to
//!   the model on read, tensor by tensor (see [`crate::lora`]).
//! * **Tokenizers**: `tokenizer_source: base | union | MODEL`, the
//!   `tokenizer:` section (`source`, `tokens`, `pad_to_multiple_of`) and
//!   `chat_template`; with a source set, embedding and `lm_head` rows are
//!   remapped by token into the output vocabulary before merging. See
//!   [`crate::tokenizer`].
//! * Refused by name rather than ignored: `modules` (per-module configs).
//! * Unknown keys, values of the wrong type and impossible values are errors
//!   naming the key path and its line; parameter names and ranges are checked
//!   against the method's declared parameters.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use tensormerge_core::DType;
use tensormerge_methods::{MergeMethod, MethodError, ParamKind, ParamValue, Scope};

use crate::error::ConfigError;
use crate::yaml::{self, Node, Pos, Value};

/// A reference to a model: a local path (directory or `.safetensors` file) or a
/// hub id with an optional `@revision`, exactly as written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// The reference as written.
    pub reference: String,
    /// Where it was written.
    pub pos: Pos,
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reference)
    }
}

/// A parameter's value as written: a scalar, a gradient, a list of words, or a
/// filter list.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// One value for every tensor.
    Scalar(ParamValue),
    /// Numbers interpolated piecewise-linearly over the layer index.
    Gradient(Vec<f64>),
    /// Non-numeric values chosen step-wise over the layer index.
    Steps(Vec<ParamValue>),
    /// Conditional values; the first whose filter matches the tensor name wins.
    Filtered(Vec<Conditional>),
}

/// One entry of a filter list.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditional {
    /// Substring of the tensor name this entry applies to (`None` or `*`: all).
    pub filter: Option<String>,
    /// The value (a scalar, gradient or steps; never another filter list).
    pub value: Setting,
    /// Where the entry was written.
    pub pos: Pos,
}

impl Setting {
    /// The value of this setting for tensor `name` at layer position `t` in
    /// `[0, 1]`, or `None` when it is a filter list and no entry matches.
    ///
    /// ```
    /// use tensormerge_engine::config::{Conditional, Setting};
    /// use tensormerge_methods::ParamValue;
    /// let g = Setting::Gradient(vec![0.0, 1.0, 0.5]);
    /// assert_eq!(g.evaluate("x", 0.25), Some(ParamValue::Float(0.5)));
    /// let f = Setting::Filtered(vec![Conditional {
    ///     filter: Some("mlp".into()), value: Setting::Scalar(ParamValue::Float(0.1)), pos: Default::default(),
    /// }]);
    /// assert_eq!(f.evaluate("layers.0.mlp.w", 0.0), Some(ParamValue::Float(0.1)));
    /// assert_eq!(f.evaluate("layers.0.attn.w", 0.0), None);
    /// ```
    pub fn evaluate(&self, name: &str, t: f64) -> Option<ParamValue> {
        match self {
            Setting::Scalar(v) => Some(v.clone()),
            Setting::Gradient(g) => Some(ParamValue::Float(interpolate(g, t))),
            Setting::Steps(s) => {
                let i = (t.clamp(0.0, 1.0) * (s.len() - 1) as f64) as usize;
                s.get(i.min(s.len() - 1)).cloned()
            }
            Setting::Filtered(conds) => conds
                .iter()
                .find(|c| match c.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => name.contains(f),
                })
                .and_then(|c| c.value.evaluate(name, t)),
        }
    }

    /// Every scalar this setting can produce (for validation); gradients give
    /// their points, which bound every interpolated value.
    fn scalars(&self) -> Vec<ParamValue> {
        match self {
            Setting::Scalar(v) => vec![v.clone()],
            Setting::Gradient(g) => g.iter().map(|&x| ParamValue::Float(x)).collect(),
            Setting::Steps(s) => s.clone(),
            Setting::Filtered(c) => c.iter().flat_map(|c| c.value.scalars()).collect(),
        }
    }

    fn has_gradient(&self) -> bool {
        match self {
            Setting::Gradient(_) => true,
            Setting::Steps(s) => s.len() > 1,
            Setting::Scalar(_) => false,
            Setting::Filtered(c) => c.iter().any(|c| c.value.has_gradient()),
        }
    }
}

/// mergekit's gradient: `scaled = t · (n − 1)`, linear between the two
/// neighbouring points.
fn interpolate(g: &[f64], t: f64) -> f64 {
    if g.len() == 1 {
        return g[0];
    }
    let scaled = t.clamp(0.0, 1.0) * (g.len() - 1) as f64;
    let i0 = (scaled as usize).min(g.len() - 1);
    let i1 = (i0 + 1).min(g.len() - 1);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * g[i0] + frac * g[i1]
}

/// A named parameter setting with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSetting {
    /// Parameter name.
    pub name: String,
    /// Its value.
    pub setting: Setting,
    /// Key path in the config (`models[0].parameters.weight`).
    pub path: String,
    /// Where the key was written.
    pub pos: Pos,
}

/// Parameter settings by name.
pub type ParamMap = BTreeMap<String, ParamSetting>;

/// One entry of `models`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model.
    pub model: ModelRef,
    /// Its parameters.
    pub parameters: ParamMap,
}

/// Where the output's tokenizer files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model (the default).
    Base,
    /// The union of every model's vocabulary (base first), with embedding
    /// rows remapped by token (see [`crate::tokenizer`]).
    Union,
    /// One of the input models.
    Model(ModelRef),
}

/// A parsed, structurally valid merge configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The method name as written.
    pub merge_method: String,
    /// Where `merge_method` was written.
    pub merge_method_pos: Pos,
    /// The base model.
    pub base_model: Option<ModelRef>,
    /// The models.
    pub models: Vec<ModelEntry>,
    /// Top-level parameters (global ones, and defaults of per-model ones).
    pub parameters: ParamMap,
    /// `dtype`: the output dtype of float tensors unless `out_dtype` is set.
    pub dtype: Option<DType>,
    /// `out_dtype`: the output dtype of float tensors.
    pub out_dtype: Option<DType>,
    /// `tokenizer_source`.
    pub tokenizer_source: Option<TokenizerSource>,
    /// The `tokenizer:` section (mergekit's newer form; never together with
    /// `tokenizer_source`). See [`crate::tokenizer`].
    pub tokenizer: Option<crate::tokenizer::TokenizerSpec>,
    /// `chat_template`: a template name, `auto` or Jinja text.
    pub chat_template: Option<crate::tokenizer::ChatTemplate>,
    /// `seed`.
    pub seed: Option<u64>,
    /// `slices` (layer ranges of models stacked into the output; empty when
    /// `models` is given). See [`crate::slices`].
    pub slices: Vec<crate::slices::Slice>,
    /// The YAML text the config was parsed from, verbatim (written into the
    /// model card).
    pub text: Option<String>,
}

const TOP_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "seed",
    "trim_scope",
];

/// mergekit features we do not implement, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[(
    "modules",
    "per-module configs (`modules`) are not supported yet; merge whole models with `models`",
)];

impl MergeConfig {
    /// Parses a config from YAML text.
    ///
    /// ```
    /// use tensormerge_engine::MergeConfig;
    /// let c = MergeConfig::from_yaml_str("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n").unwrap();
    /// assert_eq!(c.models.len(), 2);
    /// let e = MergeConfig::from_yaml_str("merge_method: linear\nmodles: []\n").unwrap_err();
    /// assert!(e.to_string().contains("modles"));
    /// ```
    pub fn from_yaml_str(text: &str) -> Result<MergeConfig, ConfigError> {
        let root =
            yaml::parse(text).map_err(|(message, pos)| ConfigError::Yaml { message, pos })?;
        let mut cfg = parse_root(&root)?;
        cfg.text = Some(text.to_string());
        Ok(cfg)
    }

    /// Reads and parses a config file.
    pub fn from_path(path: &Path) -> Result<MergeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_str(&text)
    }

    /// The output dtype of float tensors, if the config sets one.
    pub fn output_dtype(&self) -> Option<DType> {
        self.out_dtype.or(self.dtype)
    }

    /// Checks every parameter against the declared parameters of `method`:
    /// known names in the right place (per-model parameters under a model or as
    /// top-level defaults, global ones at the top level only), values of the
    /// right type and in range (every point of a gradient), model references as
    /// plain strings. Errors name the key path and line.
    pub fn validate_params(&self, method: &dyn MergeMethod) -> Result<(), ConfigError> {
        let info = method.info();
        let check = |p: &ParamSetting, allow_global: bool| -> Result<(), ConfigError> {
            let spec = info.params.iter().find(|s| s.name == p.name);
            let spec = match spec {
                Some(s) if s.scope == Scope::PerModel || allow_global => s,
                Some(_) => {
                    return Err(ConfigError::Invalid {
                        path: p.path.clone(),
                        pos: p.pos,
                        message: format!(
                            "`{}` is a global parameter of `{}`: set it under the top-level `parameters`",
                            p.name, info.name
                        ),
                    });
                }
                None => {
                    let known: Vec<&str> = info
                        .params
                        .iter()
                        .filter(|s| allow_global || s.scope == Scope::PerModel)
                        .map(|s| s.name)
                        .collect();
                    return Err(ConfigError::Param {
                        path: p.path.clone(),
                        pos: p.pos,
                        source: Box::new(MethodError::UnknownParameter {
                            method: info.name.to_string(),
                            param: p.name.clone(),
                            known: known.iter().map(|s| s.to_string()).collect(),
                        }),
                    });
                }
            };
            let wrong = |message: String| ConfigError::Invalid {
                path: p.path.clone(),
                pos: p.pos,
                message,
            };
            match spec.kind {
                ParamKind::ModelRef if !matches!(p.setting, Setting::Scalar(_)) => {
                    return Err(wrong(format!(
                        "`{}` takes one model path or hub id, not a list or filter",
                        p.name
                    )));
                }
                ParamKind::Float { .. } => {}
                _ if p.setting.has_gradient() && matches!(spec.kind, ParamKind::Int { .. }) => {
                    return Err(wrong(format!(
                        "`{}` is an integer: a gradient would interpolate between integers",
                        p.name
                    )));
                }
                _ => {}
            }
            for v in p.setting.scalars() {
                spec.check(info.name, &v)
                    .map_err(|source| ConfigError::Param {
                        path: p.path.clone(),
                        pos: p.pos,
                        source: Box::new(source),
                    })?;
            }
            Ok(())
        };
        for p in self.parameters.values() {
            check(p, true)?;
        }
        for m in &self.models {
            for p in m.parameters.values() {
                check(p, false)?;
            }
        }
        for s in &self.slices {
            // A slice's parameters are defaults for its sources and may set
            // global parameters for its layers (mergekit's `ConfigReader`).
            for p in s.parameters.values() {
                check(p, true)?;
            }
            for src in &s.sources {
                for p in src.parameters.values() {
                    check(p, false)?;
                }
            }
        }
        Ok(())
    }
}

impl MergeConfig {
    /// The tokenizer settings: the `tokenizer:` section, or `tokenizer_source`
    /// as a section with only a source; `None` when neither is given (the
    /// base's tokenizer files are copied and vocabularies must agree).
    pub fn tokenizer_spec(&self) -> Option<crate::tokenizer::TokenizerSpec> {
        self.tokenizer.clone().or_else(|| {
            self.tokenizer_source
                .clone()
                .map(|source| crate::tokenizer::TokenizerSpec {
                    source,
                    tokens: Vec::new(),
                    pad_to_multiple_of: None,
                })
        })
    }
}

pub(crate) fn str_of(node: &Node, path: &str, what: &str) -> Result<String, ConfigError> {
    match &node.value {
        Value::Str(s) => Ok(s.clone()),
        _ => Err(ConfigError::WrongType {
            path: path.to_string(),
            pos: node.pos,
            expected: what.to_string(),
            got: node.describe(),
        }),
    }
}

pub(crate) fn map_of<'a>(node: &'a Node, path: &str) -> Result<&'a [(Node, Node)], ConfigError> {
    match &node.value {
        Value::Map(m) => Ok(m),
        _ => Err(ConfigError::WrongType {
            path: path.to_string(),
            pos: node.pos,
            expected: "a mapping of keys to values".into(),
            got: node.describe(),
        }),
    }
}

pub(crate) fn key_of(k: &Node, path: &str) -> Result<String, ConfigError> {
    match &k.value {
        Value::Str(s) => Ok(s.clone()),
        _ => Err(ConfigError::WrongType {
            path: path.to_string(),
            pos: k.pos,
            expected: "a key name".into(),
            got: k.describe(),
        }),
    }
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(crate) fn unknown_key(path: &str, key: &str, pos: Pos, known: &[&str]) -> ConfigError {
    ConfigError::UnknownKey {
        path: join(path, key),
        pos,
        suggestions: tensormerge_methods::suggestions(key, known),
        known: known.iter().map(|s| s.to_string()).collect(),
    }
}

pub(crate) fn model_ref(node: &Node, path: &str) -> Result<ModelRef, ConfigError> {
    let s = match &node.value {
        Value::Str(s) => s.trim().to_string(),
        Value::Map(_) => {
            return Err(ConfigError::WrongType {
                path: path.to_string(),
                pos: node.pos,
                expected: "a model path or hub id (`org/name` or `org/name@revision`) as a string"
                    .into(),
                got: node.describe(),
            });
        }
        _ => {
            return Err(ConfigError::WrongType {
                path: path.to_string(),
                pos: node.pos,
                expected: "a model path or hub id".into(),
                got: node.describe(),
            });
        }
    };
    if s.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            pos: node.pos,
            message: "empty model reference".into(),
        });
    }
    Ok(ModelRef {
        reference: s,
        pos: node.pos,
    })
}

fn dtype_of(node: &Node, path: &str) -> Result<DType, ConfigError> {
    let s = str_of(
        node,
        path,
        "a dtype name (float32, bfloat16, float16, float64)",
    )?;
    let d: DType = s.parse().map_err(|_| ConfigError::Invalid {
        path: path.to_string(),
        pos: node.pos,
        message: format!("unknown dtype `{s}` (expected float32, bfloat16, float16 or float64)"),
    })?;
    if !d.is_float() {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            pos: node.pos,
            message: format!(
                "`{s}` is not a floating-point dtype (expected float32, bfloat16, float16 or float64)"
            ),
        });
    }
    Ok(d)
}

fn scalar_of(node: &Node) -> Option<ParamValue> {
    match &node.value {
        Value::Bool(b) => Some(ParamValue::Bool(*b)),
        Value::Int(i) => Some(ParamValue::Int(*i)),
        Value::Float(f) => Some(ParamValue::Float(*f)),
        Value::Str(s) => Some(ParamValue::Str(s.clone())),
        _ => None,
    }
}

/// A scalar, a gradient or a list of words (no filters).
fn plain_setting(node: &Node, path: &str) -> Result<Option<Setting>, ConfigError> {
    if let Some(v) = scalar_of(node) {
        if let ParamValue::Float(f) = v
            && !f.is_finite()
        {
            return Err(ConfigError::Invalid {
                path: path.to_string(),
                pos: node.pos,
                message: format!("{f} is not a finite number"),
            });
        }
        return Ok(Some(Setting::Scalar(v)));
    }
    let Value::Seq(items) = &node.value else {
        return Ok(None);
    };
    if items.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            pos: node.pos,
            message: "an empty list is not a value (write a number, a gradient of numbers, or a filter list)".into(),
        });
    }
    let nums: Option<Vec<f64>> = items
        .iter()
        .map(|n| match n.value {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            _ => None,
        })
        .collect();
    if let Some(nums) = nums {
        if let Some((i, x)) = nums.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(ConfigError::Invalid {
                path: format!("{path}[{i}]"),
                pos: items[i].pos,
                message: format!("{x} is not a finite number"),
            });
        }
        return Ok(Some(Setting::Gradient(nums)));
    }
    let scalars: Option<Vec<ParamValue>> = items.iter().map(scalar_of).collect();
    Ok(scalars.map(Setting::Steps))
}

fn conditional(node: &Node, path: &str) -> Result<Conditional, ConfigError> {
    let map = map_of(node, path)?;
    let mut filter = None;
    let mut value = None;
    for (k, v) in map {
        let key = key_of(k, path)?;
        let p = join(path, &key);
        match key.as_str() {
            "filter" => {
                filter = match &v.value {
                    Value::Null => None,
                    _ => Some(str_of(v, &p, "a substring of tensor names")?),
                }
            }
            "value" => {
                value = Some(plain_setting(v, &p)?.ok_or_else(|| ConfigError::WrongType {
                    path: p.clone(),
                    pos: v.pos,
                    expected: "a number, a word, or a list of them".into(),
                    got: v.describe(),
                })?)
            }
            _ => return Err(unknown_key(path, &key, k.pos, &["filter", "value"])),
        }
    }
    let value = value.ok_or_else(|| ConfigError::Missing {
        path: join(path, "value"),
        pos: node.pos,
    })?;
    Ok(Conditional {
        filter,
        value,
        pos: node.pos,
    })
}

fn setting(node: &Node, path: &str) -> Result<Setting, ConfigError> {
    if let Some(s) = plain_setting(node, path)? {
        return Ok(s);
    }
    match &node.value {
        Value::Map(_) => Ok(Setting::Filtered(vec![conditional(node, path)?])),
        Value::Seq(items) if items.iter().all(|n| matches!(n.value, Value::Map(_))) => items
            .iter()
            .enumerate()
            .map(|(i, n)| conditional(n, &format!("{path}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Setting::Filtered),
        _ => Err(ConfigError::WrongType {
            path: path.to_string(),
            pos: node.pos,
            expected: "a number, a word, a gradient (list of numbers) or a filter list (`- filter: mlp` / `value: 0.5`)".into(),
            got: node.describe(),
        }),
    }
}

pub(crate) fn params_of(node: &Node, path: &str) -> Result<ParamMap, ConfigError> {
    let mut out = ParamMap::new();
    if matches!(node.value, Value::Null) {
        return Ok(out);
    }
    for (k, v) in map_of(node, path)? {
        let name = key_of(k, path)?;
        let p = join(path, &name);
        let setting = setting(v, &p)?;
        out.insert(
            name.clone(),
            ParamSetting {
                name,
                setting,
                path: p,
                pos: k.pos,
            },
        );
    }
    Ok(out)
}

fn parse_root(root: &Node) -> Result<MergeConfig, ConfigError> {
    if matches!(root.value, Value::Null) {
        return Err(ConfigError::Missing {
            path: "merge_method".into(),
            pos: root.pos,
        });
    }
    let map = map_of(root, "<config>")?;
    let mut cfg = MergeConfig {
        merge_method: String::new(),
        merge_method_pos: Pos::default(),
        base_model: None,
        models: Vec::new(),
        parameters: ParamMap::new(),
        dtype: None,
        out_dtype: None,
        tokenizer_source: None,
        tokenizer: None,
        chat_template: None,
        seed: None,
        slices: Vec::new(),
        text: None,
    };
    let mut slices_pos = None;
    let mut have_method = false;
    let mut have_models = false;
    let mut trim_scope = None;
    let mut tok_pos = None;
    for (k, v) in map {
        let key = key_of(k, "")?;
        if let Some((_, msg)) = UNSUPPORTED.iter().find(|(name, _)| *name == key) {
            return Err(ConfigError::Unsupported {
                path: key.clone(),
                pos: k.pos,
                feature: format!("`{key}`"),
                message: msg.to_string(),
            });
        }
        match key.as_str() {
            "merge_method" => {
                cfg.merge_method = str_of(v, &key, "a merge method name")?;
                cfg.merge_method_pos = v.pos;
                have_method = true;
            }
            "base_model" => {
                if !matches!(v.value, Value::Null) {
                    cfg.base_model = Some(model_ref(v, &key)?);
                }
            }
            "models" => {
                have_models = true;
                let Value::Seq(items) = &v.value else {
                    return Err(ConfigError::WrongType {
                        path: key,
                        pos: v.pos,
                        expected: "a list of `- model: PATH` entries".into(),
                        got: v.describe(),
                    });
                };
                for (i, item) in items.iter().enumerate() {
                    let path = format!("models[{i}]");
                    let mut model = None;
                    let mut lora = None;
                    let mut parameters = ParamMap::new();
                    for (mk, mv) in map_of(item, &path)? {
                        let mkey = key_of(mk, &path)?;
                        match mkey.as_str() {
                            "model" => model = Some(model_ref(mv, &join(&path, "model"))?),
                            "lora" => lora = Some(model_ref(mv, &join(&path, "lora"))?),
                            "parameters" => parameters = params_of(mv, &join(&path, "parameters"))?,
                            "layer_range" => {
                                return Err(ConfigError::Invalid {
                                    path: join(&path, &mkey),
                                    pos: mk.pos,
                                    message: "layer ranges belong to the sources of `slices` (`slices: [{sources: [{model, layer_range: [a, b]}]}]`), not to `models`".into(),
                                });
                            }
                            _ => {
                                return Err(unknown_key(
                                    &path,
                                    &mkey,
                                    mk.pos,
                                    &["model", "lora", "parameters"],
                                ));
                            }
                        }
                    }
                    let mut model = model.ok_or_else(|| ConfigError::Missing {
                        path: join(&path, "model"),
                        pos: item.pos,
                    })?;
                    if let Some(lora) = lora {
                        model = crate::lora::join_reference(model, lora, &path)?;
                    }
                    cfg.models.push(ModelEntry { model, parameters });
                }
            }
            "slices" => {
                cfg.slices = crate::slices::parse(v)?;
                slices_pos = Some(k.pos);
            }
            "parameters" => cfg.parameters = params_of(v, &key)?,
            "dtype" => cfg.dtype = Some(dtype_of(v, &key)?),
            "out_dtype" => cfg.out_dtype = Some(dtype_of(v, &key)?),
            "tokenizer_source" => {
                cfg.tokenizer_source = Some(crate::tokenizer::parse_source(v, &key)?);
                tok_pos.get_or_insert(k.pos);
            }
            "tokenizer" => {
                if !matches!(v.value, Value::Null) {
                    cfg.tokenizer = Some(crate::tokenizer::parse_section(v, &key)?);
                    tok_pos.get_or_insert(k.pos);
                }
            }
            "chat_template" => {
                if !matches!(v.value, Value::Null) {
                    cfg.chat_template = Some(crate::tokenizer::parse_chat_template(v, &key)?);
                }
            }
            "seed" => {
                cfg.seed = Some(match v.value {
                    Value::Int(i) if i >= 0 => i as u64,
                    Value::Int(i) => {
                        return Err(ConfigError::Invalid {
                            path: key,
                            pos: v.pos,
                            message: format!("seed {i} is negative (expected an integer ≥ 0)"),
                        });
                    }
                    _ => {
                        return Err(ConfigError::WrongType {
                            path: key,
                            pos: v.pos,
                            expected: "an integer ≥ 0".into(),
                            got: v.describe(),
                        });
                    }
                })
            }
            "trim_scope" => {
                let s = str_of(v, &key, "`tensor` or `model`")?;
                trim_scope = Some((s, k.pos));
            }
            _ => return Err(unknown_key("", &key, k.pos, TOP_KEYS)),
        }
    }
    if !have_method {
        return Err(ConfigError::Missing {
            path: "merge_method".into(),
            pos: root.pos,
        });
    }
    if cfg.tokenizer_source.is_some() && cfg.tokenizer.is_some() {
        return Err(ConfigError::Invalid {
            path: "tokenizer".into(),
            pos: tok_pos.unwrap_or_default(),
            message: "`tokenizer_source` and `tokenizer` are mutually exclusive (as in mergekit): write the source as `tokenizer.source`".into(),
        });
    }
    if let Some(pos) = slices_pos {
        if have_models {
            return Err(ConfigError::Invalid {
                path: "slices".into(),
                pos,
                message: "`slices` and `models` are mutually exclusive: give either whole models under `models` or layer ranges under `slices`, not both".into(),
            });
        }
    } else if !have_models || cfg.models.is_empty() {
        return Err(ConfigError::Missing {
            path: "models".into(),
            pos: root.pos,
        });
    }
    if let Some((s, pos)) = trim_scope {
        if cfg.parameters.contains_key("trim_scope") {
            return Err(ConfigError::Invalid {
                path: "trim_scope".into(),
                pos,
                message: "`trim_scope` is given both at the top level and under `parameters`"
                    .into(),
            });
        }
        cfg.parameters.insert(
            "trim_scope".into(),
            ParamSetting {
                name: "trim_scope".into(),
                setting: Setting::Scalar(ParamValue::Str(s)),
                path: "trim_scope".into(),
                pos,
            },
        );
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        MergeConfig::from_yaml_str(text).unwrap_err()
    }

    #[test]
    fn full_config_parses() {
        let c = MergeConfig::from_yaml_str(
            "merge_method: ties\nbase_model: org/base@v1\nmodels:\n  - model: ./a\n    parameters:\n      weight: [0.0, 1.0]\n      density:\n        - filter: mlp\n          value: 0.5\n        - value: 0.3\n  - model: ./b\nparameters:\n  weight: 0.5\n  normalize: true\ndtype: bfloat16\nout_dtype: float16\ntokenizer_source: ./b\nseed: 7\ntrim_scope: model\n",
        )
        .unwrap();
        assert_eq!(c.merge_method, "ties");
        assert_eq!(c.base_model.as_ref().unwrap().reference, "org/base@v1");
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[0].model.pos.line, 4);
        let w = &c.models[0].parameters["weight"];
        assert_eq!(w.setting, Setting::Gradient(vec![0.0, 1.0]));
        assert_eq!(w.path, "models[0].parameters.weight");
        assert_eq!(w.pos.line, 6);
        let d = &c.models[0].parameters["density"].setting;
        assert_eq!(
            d.evaluate("layers.1.mlp.up", 0.0),
            Some(ParamValue::Float(0.5))
        );
        assert_eq!(
            d.evaluate("layers.1.attn.q", 0.0),
            Some(ParamValue::Float(0.3))
        );
        assert_eq!(
            c.parameters["normalize"].setting,
            Setting::Scalar(ParamValue::Bool(true))
        );
        assert_eq!(
            c.parameters["trim_scope"].setting,
            Setting::Scalar(ParamValue::Str("model".into()))
        );
        assert_eq!(c.dtype, Some(DType::BF16));
        assert_eq!(c.output_dtype(), Some(DType::F16));
        assert_eq!(
            c.tokenizer_source,
            Some(TokenizerSource::Model(ModelRef {
                reference: "./b".into(),
                pos: Pos {
                    line: 17,
                    column: 19
                }
            }))
        );
        assert_eq!(c.seed, Some(7));
    }

    #[test]
    fn gradients_interpolate_like_mergekit() {
        // Independent formula: value at t over points p_0..p_{n-1}.
        let g = vec![1.0, 3.0, -1.0, 0.0];
        for k in 0..=12 {
            let t = k as f64 / 12.0;
            let x = t * 3.0;
            let i = (x.floor() as usize).min(2);
            let expect = g[i] + (g[i + 1] - g[i]) * (x - i as f64);
            let got = interpolate(&g, t);
            assert!((got - expect).abs() < 1e-12, "t={t}: {got} vs {expect}");
        }
        assert_eq!(interpolate(&[2.5], 0.7), 2.5);
        let steps = Setting::Steps(vec!["a".into(), "b".into()]);
        assert_eq!(steps.evaluate("x", 0.99), Some(ParamValue::Str("a".into())));
        assert_eq!(steps.evaluate("x", 1.0), Some(ParamValue::Str("b".into())));
    }

    #[test]
    fn filters_first_match_wins_and_fall_through() {
        let c = MergeConfig::from_yaml_str(
            "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight:\n    - filter: self_attn\n      value: [0, 1]\n    - filter: attn\n      value: 5\n    - filter: '*'\n      value: 7\n  other:\n    filter: mlp\n    value: 1\n",
        )
        .unwrap();
        let w = &c.parameters["weight"].setting;
        assert_eq!(
            w.evaluate("l.3.self_attn.q", 0.5),
            Some(ParamValue::Float(0.5))
        );
        assert_eq!(
            w.evaluate("l.3.cross_attn.q", 0.5),
            Some(ParamValue::Int(5))
        );
        assert_eq!(w.evaluate("l.3.mlp", 0.5), Some(ParamValue::Int(7)));
        let o = &c.parameters["other"].setting;
        assert_eq!(o.evaluate("l.3.attn", 0.5), None);
    }

    #[test]
    fn unknown_keys_name_path_line_and_suggestion() {
        let e =
            err("merge_method: linear\nmodels:\n  - model: a\n    paramters:\n      weight: 1\n");
        let s = e.to_string();
        assert!(s.contains("models[0].paramters"), "{s}");
        assert!(s.contains("line 4"), "{s}");
        match e {
            ConfigError::UnknownKey { suggestions, .. } => {
                assert_eq!(suggestions, vec!["parameters"])
            }
            other => panic!("{other:?}"),
        }
        let e = err("merge_method: linear\nmodels: [{model: a}]\nbase_modle: x\n");
        assert!(e.to_string().contains("base_modle"));
        assert!(e.to_string().contains("line 3"));
        let e = err(
            "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight:\n    - filtre: mlp\n      value: 1\n",
        );
        assert!(e.to_string().contains("parameters.weight[0].filtre"), "{e}");
    }

    #[test]
    fn wrong_types_and_impossible_values() {
        let e = err("merge_method: [linear]\nmodels: [{model: a}]\n");
        assert!(matches!(e, ConfigError::WrongType { ref path, .. } if path == "merge_method"));
        let e = err("merge_method: linear\nmodels: {model: a}\n");
        assert!(matches!(e, ConfigError::WrongType { ref path, .. } if path == "models"));
        let e = err("merge_method: linear\nmodels: [{model: a}]\ndtype: int8\n");
        assert!(e.to_string().contains("not a floating-point dtype"), "{e}");
        let e = err("merge_method: linear\nmodels: [{model: a}]\ndtype: float128\n");
        assert!(e.to_string().contains("unknown dtype"), "{e}");
        let e = err("merge_method: linear\nmodels: [{model: a}]\nseed: -3\n");
        assert!(e.to_string().contains("negative"), "{e}");
        let e = err("merge_method: linear\nmodels: [{model: a}]\nseed: 1.5\n");
        assert!(matches!(e, ConfigError::WrongType { ref path, .. } if path == "seed"));
        let e = err("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: []\n");
        assert!(e.to_string().contains("empty list"), "{e}");
        let e = err("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: .nan\n");
        assert!(e.to_string().contains("finite"), "{e}");
        let e =
            err("merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: [1, [2]]\n");
        assert!(
            matches!(e, ConfigError::WrongType { ref path, .. } if path == "parameters.weight")
        );
        let e = err("merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n");
        assert!(matches!(e, ConfigError::Missing { ref path, .. } if path == "models[0].model"));
        let e = err("merge_method: linear\n");
        assert!(matches!(e, ConfigError::Missing { ref path, .. } if path == "models"));
        let e = err("models: [{model: a}]\n");
        assert!(matches!(e, ConfigError::Missing { ref path, .. } if path == "merge_method"));
        let e = err("merge_method: linear\nmodels:\n  - model: {path: a}\n");
        assert!(matches!(e, ConfigError::WrongType { ref path, .. } if path == "models[0].model"));
        let e = err(
            "merge_method: ties\nmodels: [{model: a}]\ntrim_scope: model\nparameters: {trim_scope: tensor}\n",
        );
        assert!(e.to_string().contains("both"), "{e}");
        let e = err(
            "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight:\n    - filter: mlp\n",
        );
        assert!(
            matches!(e, ConfigError::Missing { ref path, .. } if path == "parameters.weight[0].value")
        );
    }

    #[test]
    fn unsupported_mergekit_features_are_refused_by_name() {
        let e = err("merge_method: linear\nslices:\n  - sources: []\n");
        assert!(
            matches!(e, ConfigError::Invalid { ref path, .. } if path == "slices[0].sources"),
            "{e}"
        );
        let e = err("merge_method: linear\nmodels: [{model: a}]\nmodules: {}\n");
        assert!(matches!(e, ConfigError::Unsupported { ref path, .. } if path == "modules"));
        let e = err("merge_method: linear\nmodels:\n  - model: a\n    layer_range: [0, 4]\n");
        assert!(
            matches!(e, ConfigError::Invalid { ref path, .. } if path == "models[0].layer_range"),
            "{e}"
        );
        assert!(e.to_string().contains("slices"), "{e}");
    }

    mod method {
        use tensormerge_methods::*;
        pub struct T;
        pub static INFO: MethodInfo = MethodInfo {
            name: "config_test_method",
            summary: "",
            paper: "",
            base: BaseModel::Required,
            min_models: 1,
            max_models: None,
            params: &[
                ParamSpec::per_model_float(
                    "weight",
                    f64::NEG_INFINITY,
                    f64::INFINITY,
                    Default::Float(1.0),
                    "w",
                ),
                ParamSpec::per_model_float("density", 0.0, 1.0, Default::Float(1.0), "d"),
                ParamSpec {
                    name: "fisher",
                    scope: Scope::PerModel,
                    kind: ParamKind::ModelRef,
                    default: Default::Unset,
                    doc: "f",
                },
                ParamSpec::global(
                    "lambda",
                    ParamKind::Float {
                        min: 0.0,
                        max: 10.0,
                    },
                    Default::Float(1.0),
                    "l",
                ),
                ParamSpec::global("k", ParamKind::Int { min: 0, max: 9 }, Default::Int(1), "k"),
                ParamSpec::global(
                    "trim_scope",
                    ParamKind::Choice(&["tensor", "model"]),
                    Default::Choice("tensor"),
                    "t",
                ),
            ],
        };
        impl MergeMethod for T {
            fn info(&self) -> &'static MethodInfo {
                &INFO
            }
            fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
                out.copy_from_slice(c.models[0]);
                Ok(())
            }
        }
    }

    fn validate(text: &str) -> Result<(), ConfigError> {
        MergeConfig::from_yaml_str(text)
            .unwrap()
            .validate_params(&method::T)
    }

    #[test]
    fn parameters_are_checked_against_the_method() {
        let head = "merge_method: config_test_method\nbase_model: b\n";
        validate(&format!(
            "{head}models:\n  - model: a\n    parameters: {{weight: [0, 2], density: 0.5, fisher: ./f}}\nparameters: {{lambda: 2, k: 3, weight: 1}}\ntrim_scope: model\n"
        ))
        .unwrap();
        let e = validate(&format!(
            "{head}models:\n  - model: a\n    parameters:\n      densty: 0.5\n"
        ))
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("models[0].parameters.densty") && s.contains("line 6"),
            "{s}"
        );
        let e = validate(&format!(
            "{head}models:\n  - model: a\n    parameters:\n      density: [0.5, 1.5]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = validate(&format!(
            "{head}models:\n  - model: a\n    parameters:\n      density:\n        - filter: mlp\n          value: -1\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = validate(&format!(
            "{head}models:\n  - model: a\n    parameters: {{lambda: 1}}\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("global parameter"), "{e}");
        let e = validate(&format!(
            "{head}models: [{{model: a}}]\nparameters: {{k: [1, 2]}}\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("integer"), "{e}");
        let e = validate(&format!(
            "{head}models: [{{model: a}}]\nparameters: {{k: 1.5}}\n"
        ))
        .unwrap_err();
        assert!(matches!(e, ConfigError::Param { .. }), "{e}");
        let e = validate(&format!(
            "{head}models: [{{model: a}}]\ntrim_scope: layer\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("trim_scope"), "{e}");
        let e = validate(&format!(
            "{head}models:\n  - model: a\n    parameters: {{fisher: [a, b]}}\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("one model path"), "{e}");
        let e = validate(&format!(
            "{head}models:\n  - model: a\n    parameters: {{weight: yes}}\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("expected number"), "{e}");
    }

    #[test]
    fn yaml_errors_have_positions() {
        let e = err("merge_method: linear\nmerge_method: ties\nmodels: [{model: a}]\n");
        match e {
            ConfigError::Yaml { pos, .. } => assert_eq!(pos.line, 2),
            other => panic!("{other:?}"),
        }
    }
}
