//! `slices`: output models stacked from layer ranges of the inputs
//! (mergekit's output slices; "frankenmerges" with `passthrough`).
//!
//! ```yaml
//! merge_method: passthrough
//! slices:
//!   - sources:
//!       - model: ./a
//!         layer_range: [0, 24]      # layers 0..23 of ./a (the end is exclusive)
//!   - sources:
//!       - model: ./b
//!         layer_range: [8, 32]
//!     parameters: {scale: 1.0}
//! ```
//!
//! # Meaning (mergekit's `MergePlanner`, `ConfigReader`)
//!
//! * Each output slice takes, for each of its layers, the corresponding
//!   layer of every source: output layer `k` of a slice is layer
//!   `a_j + k` of source `j`, for `layer_range: [a_j, b_j]` (`b_j`
//!   excluded). Every source of a slice must cover the same number of
//!   layers. The output stacks the slices in order and renumbers the layers
//!   from 0; a source layer used twice is written twice (two tensors, not an
//!   alias).
//! * Layers are recognised as for gradients ([`layer_index`]): the first
//!   purely numeric component of a tensor name (`model.layers.N.`,
//!   `transformer.h.N.`, `encoder.layer.N.`); renumbering replaces that
//!   component. A model's layer count is one more than its largest index.
//! * With `merge_method: passthrough` every slice has one source and its
//!   tensors are copied (times `scale`). With any other method the sources of
//!   each slice are merged layer by layer; the source that is the
//!   `base_model` (top level, or the slice's own `base_model`) is the base of
//!   that slice, the others are the merged models. A method that needs a
//!   base needs it among the sources of every slice, as in mergekit (whose
//!   base tensor is gathered from the slice's sources).
//! * Tensors outside the layers follow mergekit's planner: those before the
//!   layers (embeddings: names containing `embed`, GPT-2's `wte`/`wpe`) are
//!   merged from the sources of the **first** slice with `t = 0`; the others
//!   (final norm, `lm_head`, pooler) from the sources of the **last** slice
//!   with `t = 1`, with those slices' parameters. For a passthrough
//!   frankenmerge that is: embeddings from the first slice's model, final
//!   norm and head from the last slice's model. Their names and the set of
//!   them come from the first source of the first slice.
//! * Parameters, first found wins: the source's own `parameters`, the
//!   slice's `parameters`, the top-level `parameters`, then the method's
//!   default (`models[].parameters` is the source level when `models` is
//!   used instead: mergekit turns `models` into one slice whose sources carry
//!   those parameters). Global parameters: the slice's, then the top level.
//!   Gradients run over the layers of the output slice: `t = i / (n − 1)`
//!   for layer `i` of a slice of `n` layers (`t = 1` when `n = 1`).
//!   Filters match the output tensor name for global parameters and the
//!   source tensor name for a source's parameters, as in mergekit.
//! * The output's `config.json` comes from `base_model` when given, else
//!   from the first slice's first source, with `num_hidden_layers`,
//!   `n_layer` and `num_layers` (whichever it has) set to the new count.
//!   Per-layer lists in the config (`layer_types`) are copied unchanged.
//! * Not supported with slices (errors naming the key): whole-model passes
//!   (`trim_scope: model`, Fisher norms) and auxiliary model inputs
//!   (`fisher` files). Ours, stricter than mergekit: an empty range
//!   (`a == b`) is an error.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tensormerge_core::TensorInfo;
use tensormerge_io::Model;
use tensormerge_methods::{BaseModel, MergeMethod, ParamKind, Scope, check_inputs};

use crate::config::{
    MergeConfig, ModelRef, ParamMap, join, key_of, map_of, model_ref, params_of, unknown_key,
};
use crate::error::{ConfigError, EngineError, Mismatch};
use crate::plan::{
    Action, Input, Opener, Plan, RunOptions, TensorPlan, layer_index, layer_t, method_warnings,
    resolve, same_model, shard_plan,
};
use crate::yaml::{Node, Pos, Value};

/// One output slice of the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// Its sources (all covering the same number of layers).
    pub sources: Vec<SliceSource>,
    /// The slice's parameters (defaults for its sources, and global ones).
    pub parameters: ParamMap,
    /// The slice's own base model (mergekit's `slices[].base_model`), which
    /// wins over the top-level `base_model` for this slice.
    pub base_model: Option<ModelRef>,
    /// Where the slice was written.
    pub pos: Pos,
}

impl Slice {
    /// Number of layers the slice contributes.
    pub fn len(&self) -> usize {
        self.sources
            .first()
            .map_or(0, |s| s.layer_range[1] - s.layer_range[0])
    }

    /// Whether the slice contributes no layers (never true for a parsed config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One source of an output slice: layers `layer_range[0]..layer_range[1]`
/// (end excluded) of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    /// The model.
    pub model: ModelRef,
    /// First layer and one past the last.
    pub layer_range: [usize; 2],
    /// Where `layer_range` was written.
    pub range_pos: Pos,
    /// The source's own parameters.
    pub parameters: ParamMap,
}

const SLICE_KEYS: &[&str] = &["sources", "parameters", "base_model"];
const SOURCE_KEYS: &[&str] = &["model", "layer_range", "parameters"];

/// Parses the value of the top-level `slices` key.
pub(crate) fn parse(node: &Node) -> Result<Vec<Slice>, ConfigError> {
    let Value::Seq(items) = &node.value else {
        return Err(ConfigError::WrongType {
            path: "slices".into(),
            pos: node.pos,
            expected: "a list of `- sources: [...]` entries".into(),
            got: node.describe(),
        });
    };
    if items.is_empty() {
        return Err(ConfigError::Invalid {
            path: "slices".into(),
            pos: node.pos,
            message: "an empty list of slices gives a model without layers".into(),
        });
    }
    items
        .iter()
        .enumerate()
        .map(|(i, n)| parse_slice(n, &format!("slices[{i}]")))
        .collect()
}

fn parse_slice(node: &Node, path: &str) -> Result<Slice, ConfigError> {
    let mut sources = None;
    let mut parameters = ParamMap::new();
    let mut base_model = None;
    for (k, v) in map_of(node, path)? {
        let key = key_of(k, path)?;
        let p = join(path, &key);
        match key.as_str() {
            "sources" => {
                let Value::Seq(items) = &v.value else {
                    return Err(ConfigError::WrongType {
                        path: p,
                        pos: v.pos,
                        expected: "a list of `- model: PATH` / `layer_range: [a, b]` entries"
                            .into(),
                        got: v.describe(),
                    });
                };
                if items.is_empty() {
                    return Err(ConfigError::Invalid {
                        path: p,
                        pos: v.pos,
                        message: "a slice needs at least one source".into(),
                    });
                }
                sources = Some(
                    items
                        .iter()
                        .enumerate()
                        .map(|(j, n)| parse_source(n, &format!("{p}[{j}]")))
                        .collect::<Result<Vec<_>, _>>()?,
                );
            }
            "parameters" => parameters = params_of(v, &p)?,
            "base_model" => {
                if !matches!(v.value, Value::Null) {
                    base_model = Some(model_ref(v, &p)?);
                }
            }
            _ => return Err(unknown_key(path, &key, k.pos, SLICE_KEYS)),
        }
    }
    let sources: Vec<SliceSource> = sources.ok_or_else(|| ConfigError::Missing {
        path: join(path, "sources"),
        pos: node.pos,
    })?;
    let n0 = sources[0].layer_range[1] - sources[0].layer_range[0];
    for (j, s) in sources.iter().enumerate().skip(1) {
        let n = s.layer_range[1] - s.layer_range[0];
        if n != n0 {
            return Err(ConfigError::Invalid {
                path: format!("{path}.sources[{j}].layer_range"),
                pos: s.range_pos,
                message: format!(
                    "covers {n} layer(s) but {path}.sources[0] covers {n0}: every source of a slice must cover the same number of layers"
                ),
            });
        }
    }
    Ok(Slice {
        sources,
        parameters,
        base_model,
        pos: node.pos,
    })
}

fn parse_source(node: &Node, path: &str) -> Result<SliceSource, ConfigError> {
    let mut model = None;
    let mut range = None;
    let mut parameters = ParamMap::new();
    for (k, v) in map_of(node, path)? {
        let key = key_of(k, path)?;
        let p = join(path, &key);
        match key.as_str() {
            "model" => model = Some(model_ref(v, &p)?),
            "layer_range" => range = Some((layer_range(v, &p)?, v.pos)),
            "parameters" => parameters = params_of(v, &p)?,
            _ => return Err(unknown_key(path, &key, k.pos, SOURCE_KEYS)),
        }
    }
    let model = model.ok_or_else(|| ConfigError::Missing {
        path: join(path, "model"),
        pos: node.pos,
    })?;
    let (layer_range, range_pos) = range.ok_or_else(|| ConfigError::Missing {
        path: join(path, "layer_range"),
        pos: node.pos,
    })?;
    Ok(SliceSource {
        model,
        layer_range,
        range_pos,
        parameters,
    })
}

fn layer_range(node: &Node, path: &str) -> Result<[usize; 2], ConfigError> {
    let wrong = || ConfigError::WrongType {
        path: path.to_string(),
        pos: node.pos,
        expected: "two layer indices `[first, end]` (integers ≥ 0, the end excluded)".into(),
        got: node.describe(),
    };
    let Value::Seq(items) = &node.value else {
        return Err(wrong());
    };
    let ints: Vec<i64> = items
        .iter()
        .map(|n| match n.value {
            Value::Int(i) => Some(i),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(wrong)?;
    let [a, b] = ints[..] else {
        return Err(wrong());
    };
    if a < 0 || b < 0 {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            pos: node.pos,
            message: format!("layer indices cannot be negative ([{a}, {b}])"),
        });
    }
    if a >= b {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            pos: node.pos,
            message: if a == b {
                format!(
                    "[{a}, {b}] covers no layers (the end is excluded: `[{a}, {}]` is layer {a} alone)",
                    a + 1
                )
            } else {
                format!("the first layer {a} is after the end {b} (write `[first, end]`)")
            },
        });
    }
    Ok([a as usize, b as usize])
}

/// Where one input tensor of an output tensor is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Index into [`SlicePlan::inputs`].
    pub input: usize,
    /// The tensor's name in that input.
    pub name: String,
}

/// The inputs of one output tensor of a sliced merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorReads {
    /// The base's tensor, when the slice has a base the method uses.
    pub base: Option<Read>,
    /// Each merged model's tensor, in the slice's source order (the base left out).
    pub models: Vec<Read>,
}

/// One layer of the output: where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputLayer {
    /// The slice it belongs to.
    pub slice: usize,
    /// The gradient position within the slice.
    pub t: f64,
    /// `(input, source layer, is the base)` for each source of the slice.
    pub sources: Vec<(usize, usize, bool)>,
}

/// The slice plan of a merge: printed by `--dry-run`.
#[derive(Debug, Clone)]
pub struct SlicePlan {
    /// Every model the slices read, each once.
    pub inputs: Vec<Input>,
    /// The output layers in order.
    pub layers: Vec<OutputLayer>,
    /// The slice the tensors before the layers (embeddings) are merged from.
    pub pre_slice: usize,
    /// The slice the tensors after the layers (final norm, head) are merged from.
    pub post_slice: usize,
}

impl fmt::Display for SlicePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "slice plan ({} output layers):", self.layers.len())?;
        for (k, l) in self.layers.iter().enumerate() {
            write!(f, "  layer {k} <- slice {}:", l.slice)?;
            for (n, (input, layer, is_base)) in l.sources.iter().enumerate() {
                let sep = if n == 0 { " " } else { ", " };
                let base = if *is_base { " (base)" } else { "" };
                write!(
                    f,
                    "{sep}{} layer {layer}{base}",
                    self.inputs[*input].reference
                )?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "  embeddings <- slice {}; final norm and head <- slice {}",
            self.pre_slice, self.post_slice
        )
    }
}

/// Whether a tensor outside the layers comes before them (embeddings), by
/// name: mergekit's architecture tables list the embeddings as the
/// "pre-weights" and the final norm and head as the "post-weights".
fn is_pre_weight(name: &str) -> bool {
    name.contains("embed") || name.split('.').any(|c| c == "wte" || c == "wpe")
}

/// `name` with its layer index (the component [`layer_index`] finds)
/// replaced by `index`.
fn renumber(name: &str, index: usize) -> String {
    let mut done = false;
    name.split('.')
        .map(|p| {
            if !done && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                done = true;
                index.to_string()
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// An input model's tensors by layer, and its layer count.
struct Layers {
    by_layer: HashMap<usize, Vec<TensorInfo>>,
    count: usize,
}

impl Layers {
    fn of(model: &Model) -> Layers {
        let mut by_layer: HashMap<usize, Vec<TensorInfo>> = HashMap::new();
        for t in model.layout().tensors() {
            if let Some(l) = layer_index(&t.name) {
                by_layer.entry(l).or_default().push(t.clone());
            }
        }
        let count = by_layer.keys().max().map_or(0, |m| m + 1);
        Layers { by_layer, count }
    }
}

/// One slice, resolved against the opened inputs.
struct Resolved<'c> {
    /// Index of each source's input.
    inputs: Vec<usize>,
    /// Which source is the base (when the method uses one).
    base: Option<usize>,
    /// The slice as written.
    slice: &'c crate::slices::Slice,
}

/// Plans a merge given by `slices` (called by [`crate::plan`]).
pub(crate) fn plan(
    config: &MergeConfig,
    opts: &RunOptions,
    method: &'static dyn MergeMethod,
) -> Result<Plan, EngineError> {
    let info = method.info();
    let uses_base = info.base != BaseModel::Unused;
    // Auxiliary inputs (Fisher files) are not wired through slices.
    let all_params = config
        .parameters
        .values()
        .chain(config.slices.iter().flat_map(|s| {
            s.parameters
                .values()
                .chain(s.sources.iter().flat_map(|x| x.parameters.values()))
        }));
    for p in all_params {
        if info
            .params
            .iter()
            .any(|s| s.name == p.name && s.kind == ParamKind::ModelRef)
        {
            return Err(ConfigError::Unsupported {
                path: p.path.clone(),
                pos: p.pos,
                feature: "auxiliary models with `slices`".into(),
                message: format!(
                    "`{}` names a model read alongside each input, which is not supported with `slices`; merge whole models with `models`",
                    p.name
                ),
            }
            .into());
        }
    }

    let mut opener = Opener::default();
    let mut inputs: Vec<Input> = Vec::new();
    let mut layers_of: Vec<Layers> = Vec::new();
    let mut resolved = Vec::new();
    for (i, s) in config.slices.iter().enumerate() {
        let mut idx = Vec::new();
        for (j, src) in s.sources.iter().enumerate() {
            let input = opener.open(&src.model, "model")?;
            let k = match inputs
                .iter()
                .position(|x| Arc::ptr_eq(&x.model, &input.model))
            {
                Some(k) => k,
                None => {
                    layers_of.push(Layers::of(&input.model));
                    inputs.push(input);
                    inputs.len() - 1
                }
            };
            let count = layers_of[k].count;
            let [a, b] = src.layer_range;
            if b > count {
                return Err(ConfigError::Invalid {
                    path: format!("slices[{i}].sources[{j}].layer_range"),
                    pos: src.range_pos,
                    message: format!(
                        "[{a}, {b}] is out of bounds: `{}` has {count} layer(s) (0 to {})",
                        src.model,
                        count.saturating_sub(1)
                    ),
                }
                .into());
            }
            idx.push(k);
        }
        let base_ref = s.base_model.as_ref().or(config.base_model.as_ref());
        let base = if uses_base {
            base_ref.and_then(|b| {
                s.sources
                    .iter()
                    .position(|src| same_model(&b.reference, &src.model.reference))
            })
        } else {
            None
        };
        if info.base == BaseModel::Required && base.is_none() {
            let message = match base_ref {
                Some(b) => format!(
                    "`{}` needs a base model, and the base `{b}` is not among the sources of this slice; add it as a source with the same number of layers",
                    info.name
                ),
                None => format!(
                    "`{}` needs a base model: set `base_model` and list it among the sources of every slice",
                    info.name
                ),
            };
            return Err(ConfigError::Invalid {
                path: format!("slices[{i}].sources"),
                pos: s.pos,
                message,
            }
            .into());
        }
        let n_models = s.sources.len() - usize::from(base.is_some());
        check_inputs(method, base.is_some(), n_models).map_err(|e| ConfigError::Invalid {
            path: format!("slices[{i}].sources"),
            pos: s.pos,
            message: e.to_string(),
        })?;
        resolved.push(Resolved {
            inputs: idx,
            base,
            slice: s,
        });
    }

    // The template: the base model when given, else the first source.
    let template = match &config.base_model {
        Some(b) => opener.open(b, "base model")?,
        None => inputs[0].clone(),
    };
    let out_dtype = config.output_dtype();
    let mut tensors = Vec::new();
    let mut mismatches = Vec::new();
    let mut out_layers = Vec::new();

    // One output tensor from the sources of slice `r`: `names[j]` in source j.
    let push = |r: &Resolved<'_>,
                out_name: String,
                names: Vec<String>,
                layer: Option<usize>,
                t: f64,
                tensors: &mut Vec<TensorPlan>,
                mismatches: &mut Vec<Mismatch>|
     -> Result<(), EngineError> {
        let infos: Vec<Option<&TensorInfo>> = r
            .inputs
            .iter()
            .zip(&names)
            .map(|(&k, n)| inputs[k].model.layout().get(n))
            .collect();
        let Some(ref_j) = infos.iter().position(Option::is_some) else {
            mismatches.push(Mismatch {
                model: inputs[r.inputs[0]].reference.clone(),
                tensor: names[0].clone(),
                detail: format!("missing (needed as `{out_name}` of the output)"),
            });
            return Ok(());
        };
        let reference = infos[ref_j].expect("found above");
        let src = |j: usize| &inputs[r.inputs[j]].reference;
        let mut ok = true;
        for (j, info) in infos.iter().enumerate() {
            let detail = match info {
                None => Some(format!("missing (needed as `{out_name}` of the output)")),
                Some(i) if i.shape != reference.shape => Some(format!(
                    "shape {:?} in `{}` vs {:?} in `{}`",
                    i.shape,
                    src(j),
                    reference.shape,
                    src(ref_j)
                )),
                Some(i) if i.dtype.is_float() != reference.dtype.is_float() => Some(format!(
                    "{} in `{}` vs {} in `{}`",
                    i.dtype,
                    src(j),
                    reference.dtype,
                    src(ref_j)
                )),
                Some(_) => None,
            };
            if let Some(detail) = detail {
                ok = false;
                mismatches.push(Mismatch {
                    model: src(j).clone(),
                    tensor: names[j].clone(),
                    detail,
                });
            }
        }
        if !ok {
            return Ok(());
        }
        let read = |j: usize| Read {
            input: r.inputs[j],
            name: names[j].clone(),
        };
        let base = r.base.map(read);
        let model_idx: Vec<usize> = (0..names.len()).filter(|&j| Some(j) != r.base).collect();
        let models: Vec<Read> = model_idx.iter().map(|&j| read(j)).collect();
        let ref_j = r.base.unwrap_or(model_idx[0]);
        let in_dtype = infos[ref_j].expect("checked above").dtype;
        let (out, action) = if reference.dtype.is_float() {
            let levels_g = [&r.slice.parameters, &config.parameters];
            let global = resolve(method, Scope::Global, &out_name, t, &levels_g)?;
            let models_p = model_idx
                .iter()
                .map(|&j| {
                    let levels = [
                        &r.slice.sources[j].parameters,
                        &r.slice.parameters,
                        &config.parameters,
                    ];
                    resolve(method, Scope::PerModel, &names[j], t, &levels)
                })
                .collect::<Result<Vec<_>, _>>()?;
            (
                TensorInfo::new(
                    out_name,
                    reference.shape.clone(),
                    out_dtype.unwrap_or(in_dtype),
                ),
                Action::Merge {
                    global,
                    aux: vec![false; models_p.len()],
                    models: models_p,
                    base_aux: false,
                },
            )
        } else {
            (
                TensorInfo::new(out_name, reference.shape.clone(), in_dtype),
                Action::Copy,
            )
        };
        tensors.push(TensorPlan {
            out,
            in_dtype,
            layer,
            t,
            action,
            reads: Some(TensorReads { base, models }),
        });
        Ok(())
    };

    // Tensors outside the layers, named as in the first slice's first source.
    let first = &resolved[0];
    let last = resolved.last().expect("at least one slice");
    let non_layer: Vec<String> = inputs[first.inputs[0]]
        .model
        .layout()
        .tensors()
        .iter()
        .filter(|t| layer_index(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    let (pre, post): (Vec<&String>, Vec<&String>) =
        non_layer.iter().partition(|n| is_pre_weight(n));
    for name in pre {
        let names = vec![name.clone(); first.inputs.len()];
        push(
            first,
            name.clone(),
            names,
            None,
            0.0,
            &mut tensors,
            &mut mismatches,
        )?;
    }
    let mut k = 0usize;
    for (si, r) in resolved.iter().enumerate() {
        let n = r.slice.len();
        for o in 0..n {
            let t = layer_t(Some(o), n);
            let src_layers: Vec<usize> = r
                .slice
                .sources
                .iter()
                .map(|s| s.layer_range[0] + o)
                .collect();
            out_layers.push(OutputLayer {
                slice: si,
                t,
                sources: r
                    .inputs
                    .iter()
                    .zip(&src_layers)
                    .enumerate()
                    .map(|(j, (&i, &l))| (i, l, Some(j) == r.base))
                    .collect(),
            });
            let first_layer = &layers_of[r.inputs[0]].by_layer;
            let empty = Vec::new();
            let ts = first_layer.get(&src_layers[0]).unwrap_or(&empty);
            for (j, &i) in r.inputs.iter().enumerate().skip(1) {
                let have = layers_of[i]
                    .by_layer
                    .get(&src_layers[j])
                    .map_or(0, Vec::len);
                if have != ts.len() {
                    mismatches.push(Mismatch {
                        model: inputs[i].reference.clone(),
                        tensor: format!("layer {}", src_layers[j]),
                        detail: format!(
                            "{have} tensor(s) vs {} in layer {} of `{}`",
                            ts.len(),
                            src_layers[0],
                            inputs[r.inputs[0]].reference
                        ),
                    });
                }
            }
            for ti in ts {
                let names = src_layers.iter().map(|&l| renumber(&ti.name, l)).collect();
                push(
                    r,
                    renumber(&ti.name, k),
                    names,
                    Some(k),
                    t,
                    &mut tensors,
                    &mut mismatches,
                )?;
            }
            k += 1;
        }
    }
    for name in post {
        let names = vec![name.clone(); last.inputs.len()];
        push(
            last,
            name.clone(),
            names,
            None,
            1.0,
            &mut tensors,
            &mut mismatches,
        )?;
    }
    if !mismatches.is_empty() {
        return Err(EngineError::Incompatible(mismatches));
    }

    let model_pass = tensors.iter().find_map(|t| match &t.action {
        Action::Merge { global, models, .. } => Some(method.model_pass(global, models).is_some()),
        Action::Copy => None,
    });
    if model_pass == Some(true) {
        let path = ["trim_scope", "slices"]
            .into_iter()
            .find(|k| *k == "slices" || config.parameters.contains_key(*k))
            .unwrap_or("slices");
        return Err(ConfigError::Unsupported {
            path: path.into(),
            pos: config
                .parameters
                .get(path)
                .map_or(config.merge_method_pos, |p| p.pos),
            feature: "whole-model statistics with `slices`".into(),
            message: format!(
                "`{}` with these parameters runs a pass over the whole model first, which is not supported with `slices` (for TIES: use `trim_scope: tensor`)",
                info.name
            ),
        }
        .into());
    }
    let warnings = method_warnings(method, &tensors);
    if config.tokenizer.is_some()
        || config.tokenizer_source == Some(crate::config::TokenizerSource::Union)
    {
        return Err(ConfigError::Unsupported {
            path: if config.tokenizer.is_some() { "tokenizer" } else { "tokenizer_source" }.into(),
            pos: config.merge_method_pos,
            feature: "vocabulary merging with `slices`".into(),
            message: "`tokenizer_source: union` and the `tokenizer:` section are not supported with `slices` yet; use `tokenizer_source: base` or a model (its tokenizer files are copied)".into(),
        }
        .into());
    }
    let chat_template = match &config.chat_template {
        Some(t) => crate::tokenizer::chat_template_text(t, &inputs.iter().collect::<Vec<_>>())?,
        None => None,
    };
    let tokenizer_dir = match &config.tokenizer_source {
        None
        | Some(crate::config::TokenizerSource::Base | crate::config::TokenizerSource::Union) => {
            None
        }
        Some(crate::config::TokenizerSource::Model(r)) => Some(
            opener
                .open(r, "tokenizer source")?
                .model
                .dir()
                .to_path_buf(),
        ),
    };
    let sizes: Vec<u64> = tensors
        .iter()
        .map(|t| t.out.checked_byte_len().unwrap_or(0) as u64)
        .collect();
    let shards = shard_plan(&sizes, opts.out_shard_bytes);
    let unused_base = if inputs
        .iter()
        .any(|i| Arc::ptr_eq(&i.model, &template.model))
    {
        None
    } else {
        Some(template.clone())
    };
    Ok(Plan {
        method,
        seed: opts.seed.or(config.seed).unwrap_or(0),
        base: None,
        unused_base,
        models: Vec::new(),
        aux: Vec::new(),
        base_aux: None,
        template_dir: template.model.dir().to_path_buf(),
        tokenizer_dir,
        out_dtype,
        tensors,
        shards,
        max_shard_bytes: opts.out_shard_bytes,
        model_pass: false,
        warnings,
        slices: Some(SlicePlan {
            inputs,
            layers: out_layers,
            pre_slice: 0,
            post_slice: resolved.len() - 1,
        }),
        card: crate::card::model_card(config, method),
        tokenizer: None,
        chat_template,
    })
}

/// Sets the layer count in the output's `config.json` (`num_hidden_layers`,
/// `n_layer`, `num_layers`: each one present). Returns whether one was found.
pub(crate) fn set_layer_count(
    config_json: &std::path::Path,
    layers: usize,
) -> Result<bool, EngineError> {
    let io = |e: std::io::Error| {
        EngineError::io(
            format!("cannot update `{}`", config_json.display()),
            tensormerge_io::IoError::Io {
                path: config_json.to_path_buf(),
                source: e,
            },
        )
    };
    if !config_json.is_file() {
        return Ok(false);
    }
    let text = std::fs::read(config_json).map_err(io)?;
    let mut value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        EngineError::io(
            "cannot update the output's layer count".to_string(),
            tensormerge_io::IoError::SupportFileJson {
                path: config_json.to_path_buf(),
                message: e.to_string(),
            },
        )
    })?;
    let mut found = false;
    if let Some(obj) = value.as_object_mut() {
        for key in ["num_hidden_layers", "n_layer", "num_layers"] {
            if let Some(v) = obj.get_mut(key) {
                *v = layers.into();
                found = true;
            }
        }
    }
    let mut out = serde_json::to_string_pretty(&value).expect("JSON value serializes");
    out.push('\n');
    std::fs::write(config_json, out).map_err(io)?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renumbering_replaces_the_layer_index_only() {
        assert_eq!(
            renumber("model.layers.7.mlp.experts.3.w1", 12),
            "model.layers.12.mlp.experts.3.w1"
        );
        assert_eq!(
            renumber("transformer.h.0.attn.c_attn.weight", 5),
            "transformer.h.5.attn.c_attn.weight"
        );
        assert_eq!(
            renumber("encoder.layer.11.output.dense.bias", 0),
            "encoder.layer.0.output.dense.bias"
        );
        assert_eq!(layer_index(&renumber("x.1a.2.y", 9)), Some(9));
        assert!(is_pre_weight("model.embed_tokens.weight"));
        assert!(is_pre_weight("transformer.wte.weight"));
        assert!(is_pre_weight("bert.embeddings.word_embeddings.weight"));
        assert!(!is_pre_weight("model.norm.weight"));
        assert!(!is_pre_weight("lm_head.weight"));
        assert!(!is_pre_weight("transformer.ln_f.weight"));
    }
}
