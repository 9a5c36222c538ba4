//! The planner: opens every input, checks that they fit together, resolves
//! each tensor's parameters and lays out the output, without reading a weight.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use tensormerge_core::{DType, Layout, TensorInfo};
use tensormerge_io::{DEFAULT_MAX_SHARD_BYTES, Model};
use tensormerge_methods::{
    BaseModel, MergeMethod, ParamKind, ParamValue, Params, Scope, check_inputs, registry,
};

use crate::config::{MergeConfig, ModelRef, ParamMap, TokenizerSource};
use crate::error::{ConfigError, EngineError, Mismatch};

/// Default memory budget of the executor: 256 MiB.
pub const DEFAULT_MAX_MEMORY: u64 = 256 << 20;

/// Options of a merge run (the command line's flags).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Seed for random methods; overrides the config's `seed`.
    pub seed: Option<u64>,
    /// Largest output shard in bytes.
    pub out_shard_bytes: u64,
    /// Replace an existing output directory.
    pub overwrite: bool,
    /// Worker threads (`None`: one per core).
    pub threads: Option<usize>,
    /// Memory budget in bytes for tensors in flight (input chunks, results
    /// waiting to be written). One tensor always runs, whatever its size;
    /// chunkable methods then work through it chunk by chunk.
    pub max_memory: u64,
    /// Accept NaN and infinite values in the input weights (and Fisher
    /// files). By default the first one found stops the merge with
    /// [`EngineError::NonFinite`], naming the model, tensor and element.
    pub allow_non_finite: bool,
    /// Set from another thread (a Ctrl-C handler) to stop the merge between
    /// chunks: [`execute`](crate::execute) then returns
    /// [`EngineError::Cancelled`] and the temporary output is removed.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            seed: None,
            out_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            overwrite: false,
            threads: None,
            max_memory: DEFAULT_MAX_MEMORY,
            allow_non_finite: false,
            cancel: None,
        }
    }
}

/// An opened input model with the reference it was opened from.
#[derive(Debug, Clone)]
pub struct Input {
    /// The reference as written in the config.
    pub reference: String,
    /// The opened model (shared when the same reference appears twice).
    pub model: Arc<Model>,
}

/// What happens to one output tensor.
#[derive(Debug, Clone)]
pub enum Action {
    /// Merged by the method with these resolved parameters.
    Merge {
        /// Global parameters for this tensor.
        global: Params,
        /// Each model's parameters for this tensor.
        models: Vec<Params>,
        /// Whether each model's auxiliary input (Fisher) has this tensor.
        aux: Vec<bool>,
        /// Whether the base's auxiliary input has this tensor.
        base_aux: bool,
    },
    /// Not floating point: copied byte for byte from the base (or the first
    /// model when there is no base).
    Copy,
}

/// One output tensor.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// Name, shape and output dtype.
    pub out: TensorInfo,
    /// The dtype in the reference input (base, or first model).
    pub in_dtype: DType,
    /// The layer index parsed from the name, if any.
    pub layer: Option<usize>,
    /// The gradient position `t` in `[0, 1]` used to resolve parameters.
    pub t: f64,
    /// Merge or copy.
    pub action: Action,
    /// Where the inputs are read from when that is not the plan's base and
    /// models under the output name (`slices`: other layers, other models).
    pub reads: Option<crate::slices::TensorReads>,
}

/// One output shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// File name.
    pub file_name: String,
    /// Number of tensors in it.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// Everything about a merge that can be known without reading a weight.
#[derive(Debug)]
pub struct Plan {
    /// The method.
    pub method: &'static dyn MergeMethod,
    /// The seed.
    pub seed: u64,
    /// The base, when the method uses one and the config names one.
    pub base: Option<Input>,
    /// The base when given but not used by the method (source of non-float
    /// tensors and support files only).
    pub unused_base: Option<Input>,
    /// The merged models, in config order.
    pub models: Vec<Input>,
    /// Each model's auxiliary input (Fisher), if any.
    pub aux: Vec<Option<Input>>,
    /// The base's auxiliary input, if any.
    pub base_aux: Option<Input>,
    /// Where config.json and generation_config.json come from.
    pub template_dir: PathBuf,
    /// Where tokenizer files come from, when not the template.
    pub tokenizer_dir: Option<PathBuf>,
    /// The output dtype set by the config (`out_dtype`, else `dtype`).
    pub out_dtype: Option<DType>,
    /// Output tensors in write order.
    pub tensors: Vec<TensorPlan>,
    /// Output shards.
    pub shards: Vec<ShardPlan>,
    /// Largest shard size asked for.
    pub max_shard_bytes: u64,
    /// Whether the method runs a whole-model pass before merging.
    pub model_pass: bool,
    /// Things the user should know (ignored parameters, missing Fisher entries).
    pub warnings: Vec<String>,
    /// The slice plan, for a config given by `slices` (then `base` and
    /// `models` are empty and each tensor's [`TensorPlan::reads`] says
    /// where its inputs come from).
    pub slices: Option<crate::slices::SlicePlan>,
    /// The model card written as `README.md` into the output (`None`: none;
    /// set it to `None` to write no card).
    pub card: Option<crate::card::ModelCard>,
    /// The output vocabulary, when the config sets a tokenizer source:
    /// embedding and `lm_head` rows are remapped into it and the output's
    /// tokenizer files describe it (see [`crate::tokenizer`]).
    pub tokenizer: Option<Arc<crate::tokenizer::TokenizerPlan>>,
    /// The chat template text written into the output's
    /// `tokenizer_config.json`.
    pub chat_template: Option<String>,
}

/// The layer index of a tensor: the first purely numeric component of its
/// dotted name (`model.layers.7.mlp.weight` → 7).
pub fn layer_index(name: &str) -> Option<usize> {
    name.split('.').find_map(|p| {
        if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse().ok()
        } else {
            None
        }
    })
}

/// mergekit's layer position: `t = i / (n − 1)`, `1` when there is a single
/// layer, `0` for tensors outside the layers.
pub(crate) fn layer_t(layer: Option<usize>, num_layers: usize) -> f64 {
    match layer {
        None => 0.0,
        Some(_) if num_layers <= 1 => 1.0,
        Some(i) => i as f64 / (num_layers - 1) as f64,
    }
}

#[derive(Default)]
pub(crate) struct Opener {
    cache: HashMap<String, Arc<Model>>,
}

impl Opener {
    pub(crate) fn open(&mut self, r: &ModelRef, what: &str) -> Result<Input, EngineError> {
        if let Some(m) = self.cache.get(&r.reference) {
            return Ok(Input {
                reference: r.reference.clone(),
                model: m.clone(),
            });
        }
        let model = Model::open(&r.reference).map_err(|source| {
            EngineError::io(
                format!("cannot open {what} `{}` (line {})", r.reference, r.pos.line),
                source,
            )
        })?;
        let model = Arc::new(model);
        self.cache.insert(r.reference.clone(), model.clone());
        Ok(Input {
            reference: r.reference.clone(),
            model,
        })
    }
}

/// Whether two references name the same model: equal strings, or paths
/// that resolve to the same place (`./base` and `base/`).
pub(crate) fn same_model(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The model-reference parameters of a model entry (Fisher files).
fn model_refs(method: &dyn MergeMethod, params: &ParamMap) -> Vec<(String, ModelRef)> {
    let mut out = Vec::new();
    for spec in method
        .info()
        .params
        .iter()
        .filter(|s| s.kind == ParamKind::ModelRef)
    {
        if let Some(p) = params.get(spec.name)
            && let crate::config::Setting::Scalar(ParamValue::Str(s)) = &p.setting
        {
            out.push((
                p.path.clone(),
                ModelRef {
                    reference: s.clone(),
                    pos: p.pos,
                },
            ));
        }
    }
    out
}

fn one_aux(
    method: &dyn MergeMethod,
    params: &ParamMap,
    top: &ParamMap,
) -> Result<Option<ModelRef>, EngineError> {
    let mut refs = model_refs(method, params);
    if refs.is_empty() {
        refs = model_refs(method, top);
    }
    match refs.len() {
        0 => Ok(None),
        1 => Ok(refs.pop().map(|(_, r)| r)),
        _ => Err(ConfigError::Invalid {
            path: refs[1].0.clone(),
            pos: refs[1].1.pos,
            message: "only one auxiliary model (Fisher file) per model is supported".into(),
        }
        .into()),
    }
}

/// Plans a merge: opens the inputs (headers only), checks them against each
/// other and against the method, and resolves every tensor's parameters.
pub fn plan(config: &MergeConfig, opts: &RunOptions) -> Result<Plan, EngineError> {
    let method = registry()
        .get(&config.merge_method)
        .map_err(|source| ConfigError::Method {
            pos: config.merge_method_pos,
            source: Box::new(source),
        })?;
    config.validate_params(method)?;
    if opts.max_memory == 0 {
        return Err(EngineError::Option(
            "the memory budget must be above 0".into(),
        ));
    }
    if opts.out_shard_bytes == 0 {
        return Err(EngineError::Option("the shard size must be above 0".into()));
    }
    let info = method.info();
    let uses_base = info.base != BaseModel::Unused;
    let mut warnings = Vec::new();
    if !config.slices.is_empty() {
        return crate::slices::plan(config, opts, method);
    }
    let mut opener = Opener::default();

    // Which entries are merged, and what the base carries.
    let mut entries = Vec::new();
    let mut base_aux_ref = None;
    for (i, e) in config.models.iter().enumerate() {
        let is_base = uses_base
            && config
                .base_model
                .as_ref()
                .is_some_and(|b| same_model(&b.reference, &e.model.reference));
        if is_base {
            base_aux_ref = one_aux(method, &e.parameters, &ParamMap::new())?;
            let ignored: Vec<&str> = e
                .parameters
                .values()
                .filter(|p| {
                    info.params
                        .iter()
                        .any(|s| s.name == p.name && s.kind != ParamKind::ModelRef)
                })
                .map(|p| p.name.as_str())
                .collect();
            if !ignored.is_empty() {
                warnings.push(format!(
                    "models[{i}] is the base model; its parameters {} are ignored (the base is not merged as a model)",
                    ignored.join(", ")
                ));
            }
        } else {
            entries.push(e);
        }
    }
    check_inputs(
        method,
        uses_base && config.base_model.is_some(),
        entries.len(),
    )?;

    let base_input = match &config.base_model {
        Some(r) => Some(opener.open(r, "base model")?),
        None => None,
    };
    let mut models = Vec::new();
    let mut aux = Vec::new();
    for e in &entries {
        models.push(opener.open(&e.model, "model")?);
        aux.push(match one_aux(method, &e.parameters, &config.parameters)? {
            Some(r) => Some(opener.open(&r, "auxiliary model (Fisher)")?),
            None => None,
        });
    }
    let base_aux = match base_aux_ref {
        Some(r) => Some(opener.open(&r, "auxiliary model (Fisher) of the base")?),
        None => None,
    };
    let (base, unused_base) = if uses_base {
        (base_input, None)
    } else {
        (None, base_input)
    };

    // The reference layout: the base's, else the first model's.
    let reference = base
        .as_ref()
        .or(unused_base.as_ref())
        .or(models.first())
        .expect("check_inputs guarantees an input");
    let ref_layout: &Layout = reference.model.layout();
    let spec = config.tokenizer_spec();
    let mut vocab_inputs: Vec<&Input> = Vec::new();
    for i in base.iter().chain(unused_base.iter()).chain(models.iter()) {
        if !vocab_inputs
            .iter()
            .any(|o| Arc::ptr_eq(&o.model, &i.model) || same_model(&o.reference, &i.reference))
        {
            vocab_inputs.push(i);
        }
    }
    let vocab_diff = match spec {
        None => crate::tokenizer::vocab_difference(&vocab_inputs)?,
        Some(_) => None,
    };
    let mut mismatches = Vec::new();
    let others = base
        .iter()
        .chain(unused_base.iter())
        .chain(models.iter())
        .filter(|m| !Arc::ptr_eq(&m.model, &reference.model));
    for other in others {
        for d in ref_layout.differences(other.model.layout()) {
            if let tensormerge_core::CoreError::LayoutMismatch { tensor, detail } = d {
                // With a tokenizer source, embedding matrices may differ in
                // rows (their columns are checked below).
                if spec.is_some()
                    && crate::tokenizer::is_embedding(&tensor)
                    && embedding_columns_agree(ref_layout, other.model.layout(), &tensor)
                {
                    continue;
                }
                mismatches.push(Mismatch {
                    model: other.reference.clone(),
                    tensor,
                    detail: detail
                        .replace("the other model", &format!("`{}`", other.reference))
                        .replace(" vs ", &format!(" in `{}` vs ", reference.reference)),
                });
            }
        }
    }
    // Auxiliary inputs may lack tensors (the method falls back), but shapes must agree.
    // One that has none of the tensors is the Fisher of another model.
    for a in aux.iter().flatten().chain(base_aux.iter()) {
        let shared = ref_layout
            .float_tensors()
            .filter(|(t, _)| a.model.layout().get(&t.name).is_some())
            .count();
        if shared == 0 {
            let first = ref_layout
                .float_tensors()
                .next()
                .map(|(t, _)| t.name.clone());
            mismatches.push(Mismatch {
                model: a.reference.clone(),
                tensor: first.unwrap_or_default(),
                detail: format!(
                    "the auxiliary model (Fisher) has none of the float tensors of `{}`: it was computed for another model",
                    reference.reference
                ),
            });
            continue;
        }
        for (t, _) in ref_layout.float_tensors() {
            if let Some(o) = a.model.layout().get(&t.name)
                && (o.shape != t.shape || !o.dtype.is_float())
            {
                mismatches.push(Mismatch {
                    model: a.reference.clone(),
                    tensor: t.name.clone(),
                    detail: format!(
                        "shape {:?} ({}) in the auxiliary model vs {:?} in `{}`",
                        o.shape, o.dtype, t.shape, reference.reference
                    ),
                });
            }
        }
    }
    if let Some(detail) = vocab_diff
        && mismatches
            .iter()
            .all(|m| crate::tokenizer::is_embedding(&m.tensor))
    {
        // Only the vocabularies differ: say so, with the key that fixes it.
        return Err(EngineError::Vocabulary(detail));
    }
    if !mismatches.is_empty() {
        return Err(EngineError::Incompatible(mismatches));
    }
    let tokenizer = match &spec {
        None => None,
        Some(spec) => {
            let source_input = match &spec.source {
                TokenizerSource::Model(r) => Some(opener.open(r, "tokenizer source")?),
                _ => None,
            };
            let inputs: Vec<Input> = vocab_inputs.iter().map(|i| (*i).clone()).collect();
            let has_base = base.is_some() || unused_base.is_some();
            let rows: Vec<Option<usize>> = inputs
                .iter()
                .map(crate::tokenizer::embedding_rows)
                .collect();
            let simple = spec.tokens.is_empty()
                && spec.pad_to_multiple_of.is_none()
                && spec.source != TokenizerSource::Union
                && rows.windows(2).all(|w| w[0] == w[1]);
            match crate::tokenizer::build(spec, inputs, has_base, source_input) {
                Ok(t) => Some(Arc::new(t)),
                // `tokenizer_source: base | MODEL` over inputs whose
                // embeddings agree, with a tokenizer.json the `tokenizers`
                // crate cannot read: its files are copied as they are.
                Err(EngineError::Tokenizer { path, message }) if simple => {
                    warnings.push(format!(
                        "cannot read `{}` ({message}): the tokenizer files are copied as they are and embedding rows are merged by id",
                        path.display()
                    ));
                    None
                }
                Err(e) => return Err(e),
            }
        }
    };
    let chat_template = match &config.chat_template {
        Some(t) => crate::tokenizer::chat_template_text(t, &vocab_inputs)?,
        None => None,
    };

    // Resolve every tensor.
    let num_layers = ref_layout
        .tensors()
        .iter()
        .filter_map(|t| layer_index(&t.name))
        .max()
        .map_or(0, |m| m + 1);
    let model_params: Vec<&ParamMap> = entries.iter().map(|e| &e.parameters).collect();
    let out_dtype = config.output_dtype();
    let mut tensors = Vec::with_capacity(ref_layout.len());
    for t in ref_layout.tensors() {
        let layer = layer_index(&t.name);
        let tt = layer_t(layer, num_layers);
        let (out, action) = if t.dtype.is_float() {
            let global = resolve(method, Scope::Global, &t.name, tt, &[&config.parameters])?;
            let models_p = model_params
                .iter()
                .map(|p| {
                    resolve(
                        method,
                        Scope::PerModel,
                        &t.name,
                        tt,
                        &[p, &config.parameters],
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let has = |a: &Option<Input>| {
                a.as_ref()
                    .is_some_and(|a| a.model.layout().get(&t.name).is_some())
            };
            let aux_has: Vec<bool> = aux.iter().map(has).collect();
            let base_aux_has = has(&base_aux);
            let mut shape = t.shape.clone();
            if let Some(tok) = &tokenizer
                && crate::tokenizer::is_embedding(&t.name)
                && shape.len() == 2
            {
                shape[0] = tok.rows;
            }
            (
                TensorInfo::new(t.name.clone(), shape, out_dtype.unwrap_or(t.dtype)),
                Action::Merge {
                    global,
                    models: models_p,
                    aux: aux_has,
                    base_aux: base_aux_has,
                },
            )
        } else {
            (t.clone(), Action::Copy)
        };
        tensors.push(TensorPlan {
            out,
            in_dtype: t.dtype,
            layer,
            t: tt,
            action,
            reads: None,
        });
    }
    warnings.extend(method_warnings(method, &tensors));

    let template_dir = reference.model.dir().to_path_buf();
    let tokenizer_dir = match spec.as_ref().map(|s| &s.source) {
        None | Some(TokenizerSource::Base | TokenizerSource::Union) => None,
        Some(TokenizerSource::Model(r)) => Some(
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
    let model_pass = tensors
        .iter()
        .find_map(|t| match &t.action {
            Action::Merge { global, models, .. } => {
                Some(method.model_pass(global, models).is_some())
            }
            Action::Copy => None,
        })
        .unwrap_or(false);
    Ok(Plan {
        method,
        seed: opts.seed.or(config.seed).unwrap_or(0),
        base,
        unused_base,
        models,
        aux,
        base_aux,
        template_dir,
        tokenizer_dir,
        out_dtype,
        tensors,
        shards,
        max_shard_bytes: opts.out_shard_bytes,
        model_pass,
        warnings,
        slices: None,
        card: crate::card::model_card(config, method),
        tokenizer,
        chat_template,
    })
}

/// Whether embedding matrix `name` has two dimensions and the same number
/// of columns in both layouts (its rows are remapped by token).
fn embedding_columns_agree(a: &Layout, b: &Layout, name: &str) -> bool {
    match (a.get(name), b.get(name)) {
        (Some(x), Some(y)) => {
            x.shape.len() == 2
                && y.shape.len() == 2
                && x.shape[1] == y.shape[1]
                && x.dtype.is_float()
                && y.dtype.is_float()
        }
        _ => false,
    }
}

/// The method's own warnings: once for the config, then per tensor
/// (identical messages reported once, at most ten).
pub(crate) fn method_warnings(method: &dyn MergeMethod, tensors: &[TensorPlan]) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some((g, m)) = tensors.iter().find_map(|t| match &t.action {
        Action::Merge { global, models, .. } => Some((global, models)),
        Action::Copy => None,
    }) {
        warnings.extend(method.config_warnings(g, m));
    }
    let mut seen = std::collections::HashSet::new();
    let mut tensor_warnings = Vec::new();
    for t in tensors {
        if let Action::Merge {
            global,
            models,
            aux: aux_has,
            ..
        } = &t.action
        {
            let ctx = tensormerge_methods::TensorContext {
                name: &t.out.name,
                shape: &t.out.shape,
                global,
                models,
                seed: 0,
                model_stats: None,
            };
            for w in method.tensor_warnings(&ctx, aux_has) {
                if seen.insert(w.clone()) {
                    tensor_warnings.push(w);
                }
            }
        }
    }
    let n = tensor_warnings.len();
    warnings.extend(tensor_warnings.into_iter().take(10));
    if n > 10 {
        warnings.push(format!("... and {} more warnings like these", n - 10));
    }

    warnings
}

/// A parameter's value for one tensor, by mergekit's precedence: the first of
/// `levels` (most specific first: a model's or source's own settings, a
/// slice's, the top level) that sets it, then the default (filled in by
/// `Params::resolve`). A filter list without a matching entry falls through.
pub(crate) fn resolve(
    method: &dyn MergeMethod,
    scope: Scope,
    tensor: &str,
    t: f64,
    levels: &[&ParamMap],
) -> Result<Params, EngineError> {
    let info = method.info();
    let mut given = Vec::new();
    for spec in info.params.iter().filter(|s| s.scope == scope) {
        let value = levels
            .iter()
            .find_map(|m| m.get(spec.name).and_then(|p| p.setting.evaluate(tensor, t)));
        if let Some(v) = value {
            given.push((spec.name, v));
        }
    }
    Params::resolve(info.name, info.params, scope, given).map_err(|source| EngineError::Param {
        tensor: tensor.to_string(),
        source: Box::new(source),
    })
}

/// Greedy shard packing in write order (the writer's rule): a new shard starts
/// when the next tensor would overflow the limit; a tensor larger than the
/// limit gets a shard of its own.
pub(crate) fn shard_plan(sizes: &[u64], max: u64) -> Vec<ShardPlan> {
    let mut bounds = Vec::new();
    let mut first = 0;
    let mut acc = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if i > first && acc.saturating_add(s) > max {
            bounds.push((first, i, acc));
            first = i;
            acc = 0;
        }
        acc = acc.saturating_add(s);
    }
    bounds.push((first, sizes.len(), acc));
    let n = bounds.len();
    bounds
        .into_iter()
        .enumerate()
        .map(|(k, (first, end, bytes))| ShardPlan {
            file_name: if n == 1 {
                tensormerge_io::SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            },
            tensors: end - first,
            bytes,
        })
        .collect()
}

/// An input and the name a tensor has in it.
pub type InputTensor<'a> = (&'a Input, &'a str);

impl Plan {
    /// The plan's fingerprint: SHA-256 (hex) of everything the output bytes
    /// depend on that the plan knows: the tensormerge version, the plan as
    /// `--dry-run` prints it (method, seed, input references, output dtype,
    /// every tensor's resolved parameters, the output shards) and the header
    /// (name, dtype, shape of every tensor) of every input. Deterministic
    /// from the config and the input headers, so every worker of a sharded
    /// merge computes the same one; `join` refuses pieces whose fingerprints
    /// differ. Weights are not read: two inputs with equal headers but other
    /// weights have the same fingerprint.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!(
            "tensormerge {}\n{self}\n",
            env!("CARGO_PKG_VERSION")
        ));
        for i in self.inputs() {
            h.update(format!("input {}\n", i.reference));
            for t in i.model.layout().tensors() {
                h.update(format!("{} {} {:?}\n", t.name, t.dtype, t.shape));
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Every input, each once (models, base, auxiliary inputs).
    pub fn inputs(&self) -> Vec<&Input> {
        let mut out: Vec<&Input> = Vec::new();
        let all = self
            .base
            .iter()
            .chain(self.unused_base.iter())
            .chain(self.models.iter())
            .chain(self.aux.iter().flatten())
            .chain(self.base_aux.iter())
            .chain(self.slices.iter().flat_map(|s| s.inputs.iter()));
        for i in all {
            if !out.iter().any(|o| Arc::ptr_eq(&o.model, &i.model)) {
                out.push(i);
            }
        }
        out
    }

    /// The input non-float tensors are copied from (for a sliced merge, the
    /// template model; each tensor's own source is [`Plan::reads_of`]).
    pub fn copy_source(&self) -> &Input {
        self.base
            .as_ref()
            .or(self.unused_base.as_ref())
            .or(self.models.first())
            .or(self.slices.iter().flat_map(|s| s.inputs.first()).next())
            .expect("a plan has at least one input")
    }

    /// The inputs of tensor `t` (its base, then each merged model) with the
    /// name the tensor has in each; auxiliary inputs are not included.
    pub fn reads_of<'a>(
        &'a self,
        t: &'a TensorPlan,
    ) -> (Option<InputTensor<'a>>, Vec<InputTensor<'a>>) {
        match (&t.reads, &self.slices) {
            (Some(r), Some(s)) => (
                r.base
                    .as_ref()
                    .map(|b| (&s.inputs[b.input], b.name.as_str())),
                r.models
                    .iter()
                    .map(|m| (&s.inputs[m.input], m.name.as_str()))
                    .collect(),
            ),
            _ => (
                self.base.as_ref().map(|b| (b, t.out.name.as_str())),
                self.models
                    .iter()
                    .map(|m| (m, t.out.name.as_str()))
                    .collect(),
            ),
        }
    }

    /// The input a copied tensor `t` is read from, and its name there.
    pub fn copy_read<'a>(&'a self, t: &'a TensorPlan) -> (&'a Input, &'a str) {
        match self.reads_of(t) {
            (Some(b), _) if t.reads.is_some() => b,
            (_, m) if t.reads.is_some() && !m.is_empty() => m[0],
            _ => (self.copy_source(), t.out.name.as_str()),
        }
    }

    /// Input streams (decoded chunks) the largest tensor reads at once:
    /// base, models and auxiliary inputs.
    pub fn max_streams(&self) -> usize {
        let plain = self.base.iter().count()
            + self.models.len()
            + self.aux.iter().flatten().count()
            + self.base_aux.iter().count();
        let sliced = self
            .tensors
            .iter()
            .filter_map(|t| t.reads.as_ref())
            .map(|r| r.base.iter().count() + r.models.len())
            .max()
            .unwrap_or(0);
        plain.max(sliced)
    }

    /// What the method is told about merged tensor `t` (`None` for a copied
    /// tensor), with the whole-model statistics when there are some.
    pub fn context<'a>(
        &'a self,
        t: &'a TensorPlan,
        model_stats: Option<&'a tensormerge_methods::Stats>,
    ) -> Option<tensormerge_methods::TensorContext<'a>> {
        match &t.action {
            Action::Copy => None,
            Action::Merge { global, models, .. } => Some(tensormerge_methods::TensorContext {
                name: &t.out.name,
                shape: &t.out.shape,
                global,
                models,
                seed: self.seed,
                model_stats,
            }),
        }
    }

    /// Bytes read by the merge pass: each merged tensor from every input that
    /// takes part, each copied tensor once.
    pub fn bytes_to_read(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| self.tensor_bytes_to_read(t))
            .sum()
    }

    /// Bytes one read of tensor `t` takes: from every input that takes part
    /// in merging it, or from the copy source.
    pub fn tensor_bytes_to_read(&self, t: &TensorPlan) -> u64 {
        let name = &t.out.name;
        let size_of = |i: &Input, name: &str| {
            i.model
                .layout()
                .get(name)
                .map_or(0, |x| x.checked_byte_len().unwrap_or(0) as u64)
        };
        let size = |i: &Input| size_of(i, name);
        match &t.action {
            Action::Copy => {
                let (i, n) = self.copy_read(t);
                size_of(i, n)
            }
            Action::Merge { aux, base_aux, .. } => {
                let (b, m) = self.reads_of(t);
                let mut total: u64 = b.into_iter().chain(m).map(|(i, n)| size_of(i, n)).sum();
                for (a, has) in self.aux.iter().zip(aux) {
                    if let (Some(a), true) = (a, has) {
                        total += size(a);
                    }
                }
                if *base_aux {
                    total += self.base_aux.iter().map(size).sum::<u64>();
                }
                total
            }
        }
    }

    /// Bytes of tensor data written.
    pub fn bytes_to_write(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn params_text(p: &Params) -> String {
    p.iter()
        .map(|(k, v)| match v {
            ParamValue::Float(x) => format!("{k}={}", trim_float(*x)),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn trim_float(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.method.info();
        writeln!(f, "method: {} ({})", info.name, info.paper)?;
        writeln!(f, "seed: {}", self.seed)?;
        match (&self.base, &self.unused_base) {
            (Some(b), _) => writeln!(f, "base: {}", b.reference)?,
            (None, Some(b)) => writeln!(
                f,
                "base: {} (not merged by {}; source of non-float tensors and config)",
                b.reference, info.name
            )?,
            (None, None) if self.slices.is_some() => {
                writeln!(f, "base: per slice (marked in the slice plan)")?
            }
            (None, None) => writeln!(f, "base: none")?,
        }
        if let Some(b) = &self.base_aux {
            writeln!(f, "base auxiliary: {}", b.reference)?;
        }
        if let Some(s) = &self.slices {
            writeln!(f, "{s}")?;
        }
        if self.slices.is_none() {
            writeln!(f, "models:")?;
        }
        for (i, m) in self.models.iter().enumerate() {
            match &self.aux[i] {
                Some(a) => writeln!(f, "  [{i}] {} (auxiliary: {})", m.reference, a.reference)?,
                None => writeln!(f, "  [{i}] {}", m.reference)?,
            }
        }
        match &self.tokenizer {
            Some(t) => writeln!(
                f,
                "vocabulary: {} tokens, {} embedding rows, from {}",
                t.vocab_len, t.rows, t.description
            )?,
            None => writeln!(f, "vocabulary: as the inputs (tokenizer files copied)")?,
        }
        if let Some(c) = &self.chat_template {
            writeln!(f, "chat template: {} characters", c.chars().count())?;
        }
        match self.out_dtype {
            Some(d) => writeln!(f, "output dtype: {d}")?,
            None => writeln!(f, "output dtype: as the base")?,
        }
        if self.model_pass {
            writeln!(f, "whole-model pass: yes (streamed before merging)")?;
        }
        writeln!(f, "tensors ({}):", self.tensors.len())?;
        for t in &self.tensors {
            let dtype = if t.in_dtype == t.out.dtype {
                t.out.dtype.to_string()
            } else {
                format!("{}->{}", t.in_dtype, t.out.dtype)
            };
            match &t.action {
                Action::Copy => writeln!(f, "  {} {:?} {dtype} copy", t.out.name, t.out.shape)?,
                Action::Merge { global, models, .. } => {
                    write!(f, "  {} {:?} {dtype} merge", t.out.name, t.out.shape)?;
                    let g = params_text(global);
                    if !g.is_empty() {
                        write!(f, " | {g}")?;
                    }
                    for (i, m) in models.iter().enumerate() {
                        let m = params_text(m);
                        if !m.is_empty() {
                            write!(f, " | [{i}] {m}")?;
                        }
                    }
                    writeln!(f)?;
                }
            }
        }
        writeln!(
            f,
            "output shards ({}, at most {} each):",
            self.shards.len(),
            human(self.max_shard_bytes)
        )?;
        for s in &self.shards {
            writeln!(
                f,
                "  {} {} tensors {}",
                s.file_name,
                s.tensors,
                human(s.bytes)
            )?;
        }
        writeln!(
            f,
            "read: {} from {} input(s)",
            human(self.bytes_to_read()),
            self.inputs().len()
        )?;
        write!(f, "write: {}", human(self.bytes_to_write()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_indices_and_positions() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("transformer.h.0.attn.c_attn.weight"), Some(0));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
        assert_eq!(layer_index("lm_head.weight"), None);
        assert_eq!(layer_index("x.1a.2"), Some(2));
        assert_eq!(layer_t(None, 10), 0.0);
        assert_eq!(layer_t(Some(0), 1), 1.0);
        assert_eq!(layer_t(Some(3), 4), 1.0);
        assert_eq!(layer_t(Some(1), 5), 0.25);
    }

    #[test]
    fn shards_pack_greedily() {
        let s = shard_plan(&[4, 4, 4, 10, 1], 8);
        let got: Vec<(usize, u64)> = s.iter().map(|s| (s.tensors, s.bytes)).collect();
        assert_eq!(got, vec![(2, 8), (1, 4), (1, 10), (1, 1)]);
        assert_eq!(s[0].file_name, "model-00001-of-00004.safetensors");
        assert_eq!(shard_plan(&[1, 2], 100)[0].file_name, "model.safetensors");
        assert_eq!(trim_float(0.5), "0.5");
        assert_eq!(trim_float(1.0), "1");
        assert_eq!(human(1_500_000), "1.50 MB");
    }
}
