//! LoRA adapters in PEFT's format, applied to a model on the fly.
//!
//! A PEFT adapter directory holds `adapter_config.json` (`r`, `lora_alpha`,
//! `target_modules`, `use_rslora`, `fan_in_fan_out`, `alpha_pattern`, …) and
//! `adapter_model.safetensors`, whose tensors are named
//! `base_model.model.<module>.lora_A.weight` (shape `[r, in]`) and
//! `base_model.model.<module>.lora_B.weight` (`[out, r]`) for a linear layer
//! `<module>` whose weight is `<module>.weight` (`[out, in]`) in the base
//! model. The adapted weight is (LoRA, Hu et al. 2021, arXiv:2106.09685)
//!
//! ```text
//! W' = W + s · B @ A,   s = alpha / r          (rsLoRA, arXiv:2312.03732: s = alpha / sqrt(r))
//! ```
//!
//! with `alpha` from `alpha_pattern` when a key there names the module,
//! else `lora_alpha`, and `r` the rank the tensors actually have (which is
//! `rank_pattern`'s value where that names the module). With
//! `fan_in_fan_out` (GPT-2's `Conv1D`, weight stored `[in, out]`) the update
//! is transposed, `W' = W + s · (B @ A)ᵀ`; embeddings
//! (`lora_embedding_A` `[r, num_embeddings]`, `lora_embedding_B`
//! `[dim, r]`, weight `[num_embeddings, dim]`) likewise. Any other tensor in
//! the adapter (`modules_to_save`, trained biases) replaces the base tensor of
//! the same name, as loading the adapter with `peft` does.
//!
//! The update is computed per element range when a tensor is read, from the
//! two small factors: `W'[i, j] = W[i, j] + s · Σₖ L[i, k] R[k, j]`, summed in
//! the same order whatever the range, so a tensor read in chunks is
//! bit-identical to the tensor read whole, and no adapted tensor is kept.
//! DoRA adapters (`use_dora`, `lora_magnitude_vector`) and convolutional LoRA
//! are refused by name.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tensormerge_core::TensorInfo;

use crate::{IoError, Model};

/// File name of an adapter's configuration.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// File name of an adapter's weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module names in adapter tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The parts of `adapter_config.json` that decide the adapted weights.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `r`: the rank.
    pub r: usize,
    /// `lora_alpha`.
    pub lora_alpha: f64,
    /// `target_modules` as written (a list of names, or one string: a
    /// regular expression or `all-linear`); informational here, since the
    /// adapter's tensors say which modules it changes.
    pub target_modules: Vec<String>,
    /// `use_rslora`: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `fan_in_fan_out`: the base stores weights `[in, out]` (GPT-2's Conv1D).
    pub fan_in_fan_out: bool,
    /// `alpha_pattern`: `lora_alpha` per module (keys are module names or
    /// dotted name suffixes).
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// A plain LoRA config: rank `r`, `lora_alpha = alpha`, the given target
    /// modules, no rsLoRA, no fan-in-fan-out.
    pub fn new(r: usize, alpha: f64, target_modules: Vec<String>) -> AdapterConfig {
        AdapterConfig {
            r,
            lora_alpha: alpha,
            target_modules,
            use_rslora: false,
            fan_in_fan_out: false,
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
    }

    /// Parses the text of an `adapter_config.json` (`path` names it in errors).
    ///
    /// ```
    /// use tensormerge_io::AdapterConfig;
    /// let c = AdapterConfig::from_json(
    ///     r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#,
    ///     "adapter_config.json".as_ref(),
    /// ).unwrap();
    /// assert_eq!((c.r, c.lora_alpha, c.scale_for("model.layers.0.self_attn.q_proj", 8)), (8, 16.0, 2.0));
    /// ```
    pub fn from_json(text: &str, path: &Path) -> Result<AdapterConfig, IoError> {
        let bad = |message: String| IoError::AdapterConfig {
            path: path.to_path_buf(),
            message,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        if let Some(t) = obj.get("peft_type").and_then(Value::as_str)
            && !t.eq_ignore_ascii_case("lora")
        {
            return Err(bad(format!(
                "`peft_type` is `{t}`; only LoRA adapters (`LORA`) can be applied"
            )));
        }
        if obj.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                "`use_dora` is true: DoRA adapters are not supported (only plain LoRA and rsLoRA)"
                    .into(),
            ));
        }
        let r = obj
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
        let lora_alpha = match obj.get("lora_alpha") {
            None | Some(Value::Null) => 8.0, // PEFT's default
            Some(a) => a
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad(format!("`lora_alpha` must be a number, not {a}")))?,
        };
        let target_modules = match obj.get("target_modules") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("`target_modules` must list strings, not {x}")))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(format!(
                    "`target_modules` must be a string or a list of strings, not {other}"
                )));
            }
        };
        let flag = |key: &str| -> Result<bool, IoError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(format!("`{key}` must be true or false, not {other}"))),
            }
        };
        let mut alpha_pattern = BTreeMap::new();
        if let Some(p) = obj.get("alpha_pattern").filter(|p| !p.is_null()) {
            let p = p
                .as_object()
                .ok_or_else(|| bad("`alpha_pattern` must map module names to numbers".into()))?;
            for (k, a) in p {
                if k.contains(|c: char| "^$*+?()[]{}|\\".contains(c)) {
                    return Err(bad(format!(
                        "`alpha_pattern` key `{k}` is a regular expression; only module names and dotted name suffixes are supported"
                    )));
                }
                let a = a
                    .as_f64()
                    .ok_or_else(|| bad(format!("`alpha_pattern.{k}` must be a number, not {a}")))?;
                alpha_pattern.insert(k.clone(), a);
            }
        }
        Ok(AdapterConfig {
            r,
            lora_alpha,
            target_modules,
            use_rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            alpha_pattern,
            base_model_name_or_path: obj
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The JSON text of this config, as `peft` writes and reads it.
    pub fn to_json(&self) -> String {
        let v = serde_json::json!({
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "alpha_pattern": self.alpha_pattern,
            "rank_pattern": {},
            "lora_dropout": 0.0,
            "bias": "none",
            "inference_mode": true,
            "modules_to_save": null,
            "task_type": null,
            "base_model_name_or_path": self.base_model_name_or_path,
        });
        let mut s = serde_json::to_string_pretty(&v).expect("JSON value serializes");
        s.push('\n');
        s
    }

    /// The scale `s` of the update of `module` whose factors have rank
    /// `rank`: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    pub fn scale_for(&self, module: &str, rank: usize) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .map_or(self.lora_alpha, |(_, &a)| a);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// How one base tensor is changed by an adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum Patch {
    /// `W' = W + scale · L @ R` with `L = B`, `R = A` (or, `transposed`,
    /// `L = Aᵀ`, `R = Bᵀ`).
    LowRank {
        /// The adapter tensor `lora_A` (or `lora_embedding_A`).
        a: String,
        /// The adapter tensor `lora_B` (or `lora_embedding_B`).
        b: String,
        /// The rank (rows of `A`).
        rank: usize,
        /// The scale `s`.
        scale: f32,
        /// Whether the update is `(B @ A)ᵀ` (fan-in-fan-out, embeddings).
        transposed: bool,
    },
    /// The base tensor is replaced by this adapter tensor.
    Replace {
        /// The adapter tensor.
        tensor: String,
    },
}

/// An opened PEFT LoRA adapter: its config, its weights (memory-mapped) and
/// the patch of every base tensor it changes.
#[derive(Debug)]
pub struct LoraAdapter {
    dir: PathBuf,
    config: AdapterConfig,
    weights: Model,
    patches: BTreeMap<String, Patch>,
}

enum Part {
    A,
    B,
}

impl LoraAdapter {
    /// Opens an adapter directory and checks that its tensors pair up (every
    /// `lora_A` with a `lora_B` of the same rank, 2-D factors).
    pub fn open(dir: &Path) -> Result<LoraAdapter, IoError> {
        if !dir.is_dir() {
            return Err(IoError::NotFound {
                reference: dir.display().to_string(),
                hint: " (a LoRA adapter is a local directory holding adapter_config.json and adapter_model.safetensors)".into(),
            });
        }
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = match std::fs::read_to_string(&config_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IoError::AdapterFileMissing {
                    dir: dir.to_path_buf(),
                    file: ADAPTER_CONFIG.into(),
                    hint: " (is this a PEFT adapter directory?)".into(),
                });
            }
            Err(e) => return Err(IoError::io(&config_path, e)),
        };
        let config = AdapterConfig::from_json(&text, &config_path)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.exists() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (only adapter_model.bin, a pickle, which is never loaded: save the adapter with safe_serialization=True)"
            } else {
                ""
            };
            return Err(IoError::AdapterFileMissing {
                dir: dir.to_path_buf(),
                file: ADAPTER_WEIGHTS.into(),
                hint: hint.into(),
            });
        }
        let weights = Model::open_path(&weights_path)?;
        let name = dir.display().to_string();
        let mismatch = |tensor: &str, detail: String| IoError::AdapterMismatch {
            adapter: name.clone(),
            tensor: tensor.to_string(),
            detail,
        };
        // module -> (A, B) names, and whether it is an embedding.
        let mut factors: BTreeMap<String, (Option<String>, Option<String>, bool)> = BTreeMap::new();
        let mut patches = BTreeMap::new();
        for t in weights.layout().tensors() {
            let n = t.name.as_str();
            let stripped = n.strip_prefix(PEFT_PREFIX).unwrap_or(n);
            let found = [
                (".lora_A.weight", Part::A, false),
                (".lora_B.weight", Part::B, false),
                (".lora_embedding_A", Part::A, true),
                (".lora_embedding_B", Part::B, true),
            ]
            .into_iter()
            .find_map(|(suffix, part, emb)| stripped.strip_suffix(suffix).map(|m| (m, part, emb)));
            if stripped.ends_with(".lora_magnitude_vector")
                || stripped.contains(".lora_magnitude_vector.")
            {
                return Err(mismatch(
                    n,
                    "a DoRA magnitude vector: DoRA adapters are not supported".into(),
                ));
            }
            if !t.dtype.is_float() {
                return Err(mismatch(
                    n,
                    format!("dtype {} is not floating point", t.dtype),
                ));
            }
            match found {
                Some((module, part, emb)) => {
                    if t.shape.len() != 2 {
                        return Err(mismatch(
                            n,
                            format!(
                                "shape {:?}: only 2-D LoRA factors (linear, Conv1D and embedding layers) are supported",
                                t.shape
                            ),
                        ));
                    }
                    let e = factors.entry(module.to_string()).or_default();
                    e.2 = emb;
                    match part {
                        Part::A => e.0 = Some(n.to_string()),
                        Part::B => e.1 = Some(n.to_string()),
                    }
                }
                None => {
                    patches.insert(
                        stripped.to_string(),
                        Patch::Replace {
                            tensor: n.to_string(),
                        },
                    );
                }
            }
        }
        for (module, (a, b, emb)) in factors {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some(a), None) => return Err(mismatch(&a, "has no matching lora_B".into())),
                (None, Some(b)) => return Err(mismatch(&b, "has no matching lora_A".into())),
                (None, None) => unreachable!("an entry has at least one factor"),
            };
            let sa = &weights.tensor_info(&a)?.shape;
            let sb = &weights.tensor_info(&b)?.shape;
            if sa[0] != sb[1] || sa[0] == 0 {
                return Err(mismatch(
                    &b,
                    format!(
                        "shape {sb:?} does not fit lora_A's {sa:?} (expected [out, r] with r = {})",
                        sa[0]
                    ),
                ));
            }
            let rank = sa[0];
            patches.insert(
                format!("{module}.weight"),
                Patch::LowRank {
                    a,
                    b,
                    rank,
                    scale: config.scale_for(&module, rank) as f32,
                    transposed: emb || config.fan_in_fan_out,
                },
            );
        }
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            config,
            weights,
            patches,
        })
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its configuration.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Every base tensor it changes, with how, by base tensor name.
    pub fn patches(&self) -> &BTreeMap<String, Patch> {
        &self.patches
    }

    /// Checks every patch against the tensor of the base model it changes.
    pub(crate) fn check_against(&self, base: &Model) -> Result<(), IoError> {
        let adapter = self.dir.display().to_string();
        for (target, patch) in &self.patches {
            let first = match patch {
                Patch::LowRank { a, .. } => a,
                Patch::Replace { tensor } => tensor,
            };
            let mismatch = |detail: String| IoError::AdapterMismatch {
                adapter: adapter.clone(),
                tensor: first.clone(),
                detail,
            };
            let Some(info) = base.layout().get(target) else {
                return Err(mismatch(format!(
                    "adapter module not found in the base model `{}`: it has no tensor `{target}` (was the adapter trained on another architecture?)",
                    base.name()
                )));
            };
            if !info.dtype.is_float() {
                return Err(mismatch(format!(
                    "base tensor `{target}` has dtype {}, which is not floating point",
                    info.dtype
                )));
            }
            match patch {
                Patch::Replace { tensor } => {
                    let s = &self.weights.tensor_info(tensor)?.shape;
                    if *s != info.shape {
                        return Err(mismatch(format!(
                            "shape {s:?} does not match `{target}` {:?} in the base model `{}`",
                            info.shape,
                            base.name()
                        )));
                    }
                }
                Patch::LowRank {
                    a, b, transposed, ..
                } => {
                    let sa = &self.weights.tensor_info(a)?.shape;
                    let sb = &self.weights.tensor_info(b)?.shape;
                    // B @ A is [out, in]; stored transposed it is [in, out].
                    let expect = if *transposed {
                        vec![sa[1], sb[0]]
                    } else {
                        vec![sb[0], sa[1]]
                    };
                    if info.shape != expect {
                        return Err(mismatch(format!(
                            "shape mismatch: lora_A {sa:?} and lora_B {sb:?} make an update of shape {expect:?}, but `{target}` is {:?} in the base model `{}`{}",
                            info.shape,
                            base.name(),
                            if *transposed { " (fan_in_fan_out)" } else { "" }
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the replacement values of elements `range` (a `Replace` patch).
    pub(crate) fn read_replacement(
        &self,
        tensor: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), IoError> {
        self.weights.read_f32_range(tensor, range, out)
    }

    /// Adds `scale · (L @ R)` over elements `range` of the row-major
    /// `[rows, cols]` base tensor `info` to `out`.
    pub(crate) fn add_update(
        &self,
        patch: &Patch,
        info: &TensorInfo,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), IoError> {
        let Patch::LowRank {
            a,
            b,
            rank,
            scale,
            transposed,
        } = patch
        else {
            return Ok(());
        };
        let (rows, cols, r) = (info.shape[0], info.shape[1], *rank);
        let fa = self.weights.read_f32_vec(a)?;
        let fb = self.weights.read_f32_vec(b)?;
        // L [rows, r], R [r, cols].
        let (l, rt) = if *transposed {
            (transpose(&fa, r, rows), transpose(&fb, cols, r))
        } else {
            (fb, fa)
        };
        let mut acc = vec![0f32; cols.min(range.len())];
        let (mut pos, mut o) = (range.start, 0);
        while pos < range.end {
            let (i, j0) = (pos / cols, pos % cols);
            let j1 = cols.min(j0 + (range.end - pos));
            let n = j1 - j0;
            let acc = &mut acc[..n];
            acc.fill(0.0);
            for k in 0..r {
                let c = l[i * r + k];
                for (x, y) in acc.iter_mut().zip(&rt[k * cols + j0..k * cols + j1]) {
                    *x += c * y;
                }
            }
            for (x, d) in out[o..o + n].iter_mut().zip(acc.iter()) {
                *x += scale * d;
            }
            pos += n;
            o += n;
        }
        Ok(())
    }
}

/// `m` (`[r, c]`, row-major) transposed to `[c, r]`.
fn transpose(m: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = m[i * c + j];
        }
    }
    t
}

/// Writes a PEFT adapter directory `dir`: `adapter_config.json` (`config`)
/// and `adapter_model.safetensors` (`tensors`, in the order given, written
/// by [`write_safetensors`](crate::write_safetensors), so the bytes depend
/// only on the tensors). Everything goes into a temporary sibling directory
/// that is renamed into place when complete, as [`ModelWriter`](crate::ModelWriter)
/// does: an existing `dir` is refused unless `overwrite` (and then replaced
/// only once the new adapter is complete), `dir` may not be, contain or lie
/// inside any of `protected`, and a failure leaves nothing behind.
///
/// ```
/// use tensormerge_core::{DType, TensorInfo};
/// use tensormerge_io::{AdapterConfig, LoraAdapter, write_adapter};
/// # let tmp = tempfile::tempdir().unwrap();
/// let dir = tmp.path().join("adapter");
/// let a = TensorInfo::new("base_model.model.q.lora_A.weight", vec![1, 2], DType::F32);
/// let b = TensorInfo::new("base_model.model.q.lora_B.weight", vec![1, 1], DType::F32);
/// let (ab, bb) = ([1f32, -1.0].map(f32::to_le_bytes).concat(), 2f32.to_le_bytes());
/// let config = AdapterConfig::new(1, 1.0, vec!["q".into()]);
/// write_adapter(&dir, &config, &[(a, &ab[..]), (b, &bb[..])], false, &[]).unwrap();
/// assert_eq!(LoraAdapter::open(&dir).unwrap().patches().len(), 1);
/// assert!(write_adapter(&dir, &config, &[], false, &[]).is_err()); // exists
/// ```
pub fn write_adapter(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &[(TensorInfo, &[u8])],
    overwrite: bool,
    protected: &[PathBuf],
) -> Result<PathBuf, IoError> {
    /// Removes the temporary directory unless it was committed.
    struct Temp(PathBuf, bool);
    impl Drop for Temp {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
    let mut tmp = Temp(crate::writer::make_temp(dir, overwrite, protected)?, false);
    crate::write_safetensors(&tmp.0.join(ADAPTER_WEIGHTS), tensors, &BTreeMap::new())?;
    let config_path = tmp.0.join(ADAPTER_CONFIG);
    std::fs::write(&config_path, config.to_json()).map_err(|e| IoError::io(&config_path, e))?;
    crate::writer::commit(&tmp.0, dir, overwrite)?;
    tmp.1 = true;
    Ok(dir.to_path_buf())
}

/// Splits mergekit's `base+adapter` reference into its two parts, unless the
/// whole reference is an existing path (a directory may have a `+` in its
/// name). The split is at the first `+`.
///
/// ```
/// use tensormerge_io::split_lora_reference;
/// assert_eq!(split_lora_reference("org/base+./my-lora"), Some(("org/base", "./my-lora")));
/// assert_eq!(split_lora_reference("org/base"), None);
/// ```
pub fn split_lora_reference(reference: &str) -> Option<(&str, &str)> {
    if Path::new(reference).symlink_metadata().is_ok() {
        return None;
    }
    let (base, lora) = reference.split_once('+')?;
    let (base, lora) = (base.trim(), lora.trim());
    (!base.is_empty() && !lora.is_empty()).then_some((base, lora))
}
