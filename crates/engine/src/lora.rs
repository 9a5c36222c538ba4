//! LoRA adapters: references in configs and `tensormerge lora apply`.
//!
//! A model reference `BASE+ADAPTER` (mergekit's syntax) or a model entry's
//! `lora: ADAPTER` key names a PEFT adapter directory (`adapter_config.json`
//! and `adapter_model.safetensors`). The model is opened with the adapter
//! applied on read ([`tensormerge_io::Model::with_lora`]): every targeted
//! weight reads as `W + s · B @ A` (`s = lora_alpha / r`, or
//! `lora_alpha / sqrt(r)` with `use_rslora`; transposed with
//! `fan_in_fan_out`), computed for the element range read from the two small
//! factors, so the executor streams an adapted model like any other and no
//! adapted model is ever held in memory or written to disk first (mergekit
//! instead merges the adapter with `peft` and caches the merged model).
//!
//! [`apply`] writes the adapted model alone: the expression evaluator
//! ([`crate::expr::run_eval`]) with the single model `BASE+ADAPTER`, so it
//! streams, runs in parallel, and writes atomically (a temporary directory
//! renamed into place) with the base's support files.
//!
//! [`extract`] goes the other way (`tensormerge lora extract`): the task
//! vector `D = FT − BASE` of every linear weight, approximated by its
//! truncated SVD, written as a PEFT adapter that [`apply`] and `peft` load.
//! The SVD is [`faer`]'s: a maintained, pure-Rust dense linear-algebra crate
//! with a fast SVD (bidiagonalisation and divide and conquer) that needs no
//! LAPACK or BLAS system library, so the workspace still builds with cargo
//! alone. It runs with `Par::Seq` (faer's own parallelism is not even
//! compiled in), so a tensor's factors are the same bits whatever the thread
//! count; tensors are spread over the rayon pool instead, and results are
//! collected in the base model's tensor order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::{Mat, Par};
use rayon::prelude::*;
use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{AdapterConfig, Model, PEFT_PREFIX};

use crate::config::ModelRef;
use crate::error::{ConfigError, EngineError, Mismatch, check_finite};
use crate::expr::{EvalOptions, EvalReport, run_eval};
use crate::progress::Progress;

/// The reference `model+lora` of a model entry with a `lora:` key.
pub(crate) fn join_reference(
    model: ModelRef,
    lora: ModelRef,
    entry: &str,
) -> Result<ModelRef, ConfigError> {
    if tensormerge_io::split_lora_reference(&model.reference).is_some() {
        return Err(ConfigError::Invalid {
            path: format!("{entry}.lora"),
            pos: lora.pos,
            message: format!(
                "`{}` already names a LoRA adapter (`model+lora`); give the adapter either there or under `lora`, not both",
                model.reference
            ),
        });
    }
    Ok(ModelRef {
        reference: format!("{}+{}", model.reference, lora.reference),
        pos: model.pos,
    })
}

/// Applies the PEFT LoRA adapter in directory `adapter` to the model `base`
/// (a directory, `.safetensors` file or hub id) and writes the adapted model
/// to `out`: the base's tensors in its order and dtypes (or
/// `opts.out_dtype`), its support files, each targeted weight
/// `W + s · B @ A`.
///
/// ```
/// # let tmp = tempfile::tempdir().unwrap();
/// use tensormerge_core::{convert, DType, TensorInfo};
/// use tensormerge_engine::{NoProgress, expr::EvalOptions, lora};
/// use tensormerge_io::{AdapterConfig, Model, ModelWriter, WriterOptions};
/// let f32s = |v: &[f32]| convert::encode_f32_vec(DType::F32, v).unwrap();
/// let base = tmp.path().join("base");
/// let mut w = ModelWriter::create(&base, vec![TensorInfo::new("q.weight", vec![1, 2], DType::F32)],
///     WriterOptions::default()).unwrap();
/// w.write("q.weight", &f32s(&[1.0, 1.0])).unwrap();
/// w.finish().unwrap();
/// // Rank 1, alpha 1: W + B @ A with B = [2], A = [1, -1].
/// let ad = tmp.path().join("adapter");
/// let t = |n: &str, s: Vec<usize>| TensorInfo::new(format!("base_model.model.q.{n}"), s, DType::F32);
/// let mut w = ModelWriter::create(&ad, vec![t("lora_A.weight", vec![1, 2]), t("lora_B.weight", vec![1, 1])],
///     WriterOptions::default()).unwrap();
/// w.write("base_model.model.q.lora_A.weight", &f32s(&[1.0, -1.0])).unwrap();
/// w.write("base_model.model.q.lora_B.weight", &f32s(&[2.0])).unwrap();
/// w.finish().unwrap();
/// std::fs::rename(ad.join("model.safetensors"), ad.join("adapter_model.safetensors")).unwrap();
/// std::fs::write(ad.join("adapter_config.json"), AdapterConfig::new(1, 1.0, vec!["q".into()]).to_json()).unwrap();
///
/// let out = tmp.path().join("out");
/// lora::apply(base.to_str().unwrap(), &ad, &out, &EvalOptions::default(), &NoProgress).unwrap();
/// assert_eq!(Model::open_path(&out).unwrap().read_f32_vec("q.weight").unwrap(), [3.0, -1.0]);
/// ```
pub fn apply(
    base: &str,
    adapter: &Path,
    out: &Path,
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<EvalReport, EngineError> {
    if base.contains('+') {
        return Err(EngineError::Option(format!(
            "the base model `{base}` has a `+` in its name, which would be read as `model+lora`; rename or link it"
        )));
    }
    let reference = format!("{base}+{}", adapter.display());
    let models = [("model".to_string(), reference)];
    run_eval("model", &models, out, opts, progress)
}

/// Module names (dotted path components) whose weights are never extracted:
/// token and position embeddings and output heads, whose rows are tokens or
/// positions rather than a linear map's outputs.
pub const EXCLUDED_MODULES: &[&str] = &[
    "embed_tokens",
    "wte",
    "wpe",
    "lm_head",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_positions",
    "embed_in",
    "embed_out",
];

/// Whether [`extract`] treats `info` as a linear weight: a 2-D
/// floating-point tensor named `<module>.weight` where no dotted component
/// of `<module>` is one of [`EXCLUDED_MODULES`]. (Norm weights and biases
/// are 1-D, so they never qualify.) The weight is taken as `nn.Linear`
/// stores it, `[out, in]`.
///
/// ```
/// use tensormerge_core::{DType, TensorInfo};
/// use tensormerge_engine::lora::is_linear_weight;
/// let t = |n: &str, s: Vec<usize>| TensorInfo::new(n, s, DType::BF16);
/// assert!(is_linear_weight(&t("model.layers.0.self_attn.q_proj.weight", vec![8, 8])));
/// assert!(!is_linear_weight(&t("model.embed_tokens.weight", vec![32, 8])));
/// assert!(!is_linear_weight(&t("lm_head.weight", vec![32, 8])));
/// assert!(!is_linear_weight(&t("model.norm.weight", vec![8])));
/// ```
pub fn is_linear_weight(info: &TensorInfo) -> bool {
    info.shape.len() == 2
        && info.dtype.is_float()
        && info
            .name
            .strip_suffix(".weight")
            .is_some_and(|m| !m.is_empty() && !m.split('.').any(|c| EXCLUDED_MODULES.contains(&c)))
}

/// Options of [`extract`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The largest rank `R` (at least 1).
    pub rank: usize,
    /// The dtype the factors are stored in (floating point).
    pub dtype: DType,
    /// Replace the output directory if it exists.
    pub overwrite: bool,
    /// Stops the extraction between tensors when set (Ctrl-C).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: 16,
            dtype: DType::F32,
            overwrite: false,
            cancel: None,
        }
    }
}

/// One extracted weight.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedTensor {
    /// The base tensor (`<module>.weight`).
    pub name: String,
    /// Its shape `[out, in]`.
    pub shape: Vec<usize>,
    /// The rank of its update: `min(rank, out, in)` (the factors are padded
    /// with zeros to the adapter's `r`).
    pub rank: usize,
    /// `‖D‖_F`, the Frobenius norm of the task vector `D = FT − BASE`.
    pub norm: f64,
    /// `‖D − B @ A‖_F`, with `B`, `A` as stored (rounded to the dtype).
    pub residual: f64,
    /// `residual / norm`.
    pub relative_error: f64,
}

/// What [`extract`] did.
#[derive(Debug, Clone)]
pub struct ExtractReport {
    /// The adapter directory.
    pub out_dir: PathBuf,
    /// The adapter's `r` (and `lora_alpha`).
    pub rank: usize,
    /// Every extracted weight, in the base model's order.
    pub tensors: Vec<ExtractedTensor>,
    /// Linear weights whose task vector is exactly zero: left out.
    pub unchanged: Vec<String>,
    /// `‖D − B @ A‖_F / ‖D‖_F` over all extracted weights together.
    pub relative_error: f64,
    /// Elements of the factors written.
    pub parameters: u64,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
}

/// The factors of one weight, or `None` for an unchanged one.
type Factors = Option<(ExtractedTensor, Vec<u8>, Vec<u8>)>;

/// Whether `model` stores its linear weights `[in, out]`, as GPT-2's
/// `Conv1D` does (`model_type` `gpt2` or `openai-gpt` in its
/// `config.json`): an adapter of such a model says `fan_in_fan_out: true`
/// and its factors are those of the transposed task vector, as `peft`
/// expects them (`lora_A` `[r, in]`, `lora_B` `[out, r]`).
fn stores_in_out(model: &Model) -> bool {
    std::fs::read_to_string(model.dir().join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v.get("model_type")?
                .as_str()
                .map(|t| matches!(t, "gpt2" | "openai-gpt"))
        })
        .unwrap_or(false)
}

/// Extracts a LoRA adapter from the fine-tuned model `model` against `base`
/// (directories, `.safetensors` files or hub ids) into the directory `out`.
///
/// For every linear weight ([`is_linear_weight`]) of the base that the
/// fine-tuned model has too (same shape, else an error naming the tensor),
/// the task vector `D = FT − BASE` is formed in `f64` and decomposed,
/// `D = U · diag(σ) · Vᵀ` (thin SVD, σ nonincreasing). With
/// `r = min(opts.rank, largest min(out, in))` and `k = min(r, out, in)` per
/// weight, the adapter stores `lora_B = U_k · diag(σ_k)` (`[out, r]`) and
/// `lora_A = V_kᵀ` (`[r, in]`), padded with zeros from `k` to `r`, and
/// `lora_alpha = r`, so the scale is 1 and `BASE + B @ A` is the best
/// rank-`k` approximation of `FT` (Eckart–Young); the reported error is
/// measured against the factors as stored. Weights whose task vector is
/// exactly zero are left out (and reported as unchanged); weights present
/// in one model only, and every other tensor, are ignored.
///
/// Memory: each worker holds one weight of each model and its `D` (in
/// `f64`) with the SVD's work space at a time; the factors of all weights
/// (the adapter itself) are kept until they are written, with
/// [`tensormerge_io::write_adapter`] (temporary sibling directory renamed
/// into place; an existing `out` only replaced with `opts.overwrite`).
///
/// ```
/// # let tmp = tempfile::tempdir().unwrap();
/// use tensormerge_core::{convert, DType, TensorInfo};
/// use tensormerge_engine::{NoProgress, lora};
/// use tensormerge_io::{Model, ModelWriter, WriterOptions};
/// let write = |name: &str, w: &[f32]| {
///     let dir = tmp.path().join(name);
///     let t = vec![TensorInfo::new("q.weight", vec![2, 2], DType::F32)];
///     let mut wr = ModelWriter::create(&dir, t, WriterOptions::default()).unwrap();
///     wr.write("q.weight", &convert::encode_f32_vec(DType::F32, w).unwrap()).unwrap();
///     wr.finish().unwrap();
///     dir.display().to_string()
/// };
/// let base = write("base", &[1.0, 0.0, 0.0, 1.0]);
/// let ft = write("ft", &[2.0, 2.0, 1.0, 2.0]); // D = [1, 2; 1, 1], rank 2
/// let out = tmp.path().join("adapter");
/// let opts = lora::ExtractOptions { rank: 2, ..Default::default() };
/// let report = lora::extract(&base, &ft, &out, &opts, &NoProgress).unwrap();
/// assert!(report.tensors[0].relative_error < 1e-6);
/// let applied = tmp.path().join("applied");
/// lora::apply(&base, &out, &applied, &Default::default(), &NoProgress).unwrap();
/// let w = Model::open_path(&applied).unwrap().read_f32_vec("q.weight").unwrap();
/// assert!(w.iter().zip([2.0, 2.0, 1.0, 2.0]).all(|(a, b)| (a - b).abs() < 1e-5));
/// ```
pub fn extract(
    base: &str,
    model: &str,
    out: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport, EngineError> {
    if opts.rank == 0 {
        return Err(EngineError::Option("the rank must be at least 1".into()));
    }
    if !opts.dtype.is_float() {
        return Err(EngineError::Option(format!(
            "the adapter dtype must be floating point, not {}",
            opts.dtype
        )));
    }
    if !opts.overwrite && out.symlink_metadata().is_ok() {
        // Found before any work, as a merge does; checked again when written.
        return Err(EngineError::OutputExists(out.to_path_buf()));
    }
    let open = |what: &str, r: &str| {
        Model::open(r).map_err(|e| EngineError::io(format!("cannot open {what} `{r}`"), e))
    };
    let (b, f) = (open("base model", base)?, open("fine-tuned model", model)?);
    let mut mismatches = Vec::new();
    let mut todo: Vec<&TensorInfo> = Vec::new();
    for t in b.layout().tensors().iter().filter(|t| is_linear_weight(t)) {
        let Some(ft) = f.layout().get(&t.name) else {
            continue;
        };
        if ft.shape != t.shape || !ft.dtype.is_float() {
            mismatches.push(Mismatch {
                model: f.name().to_string(),
                tensor: t.name.clone(),
                detail: format!(
                    "shape {:?} ({}) in the fine-tuned model, {:?} ({}) in the base model `{}`",
                    ft.shape,
                    ft.dtype,
                    t.shape,
                    t.dtype,
                    b.name()
                ),
            });
        } else {
            todo.push(t);
        }
    }
    if !mismatches.is_empty() {
        return Err(EngineError::Incompatible(mismatches));
    }
    if todo.is_empty() {
        return Err(EngineError::Lora(format!(
            "the base model `{}` and the fine-tuned model `{}` have no linear weight in common (2-D floating-point `*.weight` tensors other than embeddings and output heads, with the same name in both)",
            b.name(),
            f.name()
        )));
    }
    let transposed = stores_in_out(&b);
    let r = todo
        .iter()
        .map(|t| t.shape[0].min(t.shape[1]))
        .max()
        .unwrap_or(1)
        .min(opts.rank);
    let total: u64 = todo
        .iter()
        .map(|t| (t.numel() * (t.dtype.size_in_bytes() * 2)) as u64)
        .sum();
    progress.start("extracting", total, todo.len() as u64);
    let results: Vec<Factors> = todo
        .par_iter()
        .map(|t| {
            if opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(EngineError::Cancelled);
            }
            let done = extract_one(&b, &f, t, r, opts.dtype, transposed)?;
            progress.advance((t.numel() * t.dtype.size_in_bytes() * 2) as u64, 1);
            Ok(done)
        })
        .collect::<Result<_, EngineError>>()?;
    progress.finish();

    let mut tensors = Vec::new();
    let mut unchanged = Vec::new();
    let mut data: Vec<(TensorInfo, Vec<u8>)> = Vec::new();
    for (t, res) in todo.iter().zip(results) {
        let Some((report, a, bb)) = res else {
            unchanged.push(t.name.clone());
            continue;
        };
        let module = &t.name[..t.name.len() - ".weight".len()];
        let (out_f, in_f) = if transposed {
            (t.shape[1], t.shape[0])
        } else {
            (t.shape[0], t.shape[1])
        };
        data.push((
            TensorInfo::new(
                format!("{PEFT_PREFIX}{module}.lora_A.weight"),
                vec![r, in_f],
                opts.dtype,
            ),
            a,
        ));
        data.push((
            TensorInfo::new(
                format!("{PEFT_PREFIX}{module}.lora_B.weight"),
                vec![out_f, r],
                opts.dtype,
            ),
            bb,
        ));
        tensors.push(report);
    }
    if tensors.is_empty() {
        return Err(EngineError::Lora(format!(
            "the fine-tuned model `{}` equals the base model `{}` in all {} linear weights: there is nothing to extract",
            f.name(),
            b.name(),
            unchanged.len()
        )));
    }
    let modules: Vec<String> = tensors
        .iter()
        .map(|t| t.name[..t.name.len() - ".weight".len()].to_string())
        .collect();
    let mut config = AdapterConfig::new(r, r as f64, modules);
    config.base_model_name_or_path = Some(base.to_string());
    config.fan_in_fan_out = transposed;
    let mut protected = b.protected_paths();
    protected.extend(f.protected_paths());
    let refs: Vec<(TensorInfo, &[u8])> = data.iter().map(|(t, d)| (t.clone(), &d[..])).collect();
    tensormerge_io::write_adapter(out, &config, &refs, opts.overwrite, &protected)
        .map_err(|e| EngineError::io(format!("cannot write the adapter `{}`", out.display()), e))?;
    let sq = |x: f64| x * x;
    let num: f64 = tensors.iter().map(|t| sq(t.residual)).sum();
    let den: f64 = tensors.iter().map(|t| sq(t.norm)).sum();
    Ok(ExtractReport {
        out_dir: out.to_path_buf(),
        rank: r,
        relative_error: num.sqrt() / den.sqrt(),
        parameters: data.iter().map(|(t, _)| t.numel() as u64).sum(),
        bytes_written: data.iter().map(|(_, d)| d.len() as u64).sum(),
        tensors,
        unchanged,
    })
}

/// The task vector of weight `t`, its truncated SVD as the factors
/// `(A, B)` encoded in `dtype`, padded to rank `r`; `None` when it is zero.
/// With `transposed` the weight is stored `[in, out]` and the factors are
/// those of its transpose.
fn extract_one(
    base: &Model,
    ft: &Model,
    t: &TensorInfo,
    r: usize,
    dtype: DType,
    transposed: bool,
) -> Result<Factors, EngineError> {
    let read = |m: &Model| -> Result<Vec<f32>, EngineError> {
        let v = m.read_f32_vec(&t.name).map_err(|e| {
            EngineError::io(format!("cannot read `{}` of `{}`", t.name, m.name()), e)
        })?;
        check_finite(&v, m.name(), &t.name, 0)?;
        Ok(v)
    };
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let (m, n) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let (wb, wf) = (read(base)?, read(ft)?);
    let at = |i: usize, j: usize| {
        if transposed {
            j * cols + i
        } else {
            i * cols + j
        }
    };
    let d = Mat::<f64>::from_fn(m, n, |i, j| wf[at(i, j)] as f64 - wb[at(i, j)] as f64);
    drop((wb, wf));
    let norm = (0..n)
        .map(|j| d.col(j).iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return Ok(None);
    }
    let size = m.min(n);
    let (mut u, mut v) = (Mat::<f64>::zeros(m, size), Mat::<f64>::zeros(n, size));
    let mut s = faer::diag::Diag::<f64>::zeros(size);
    let par = Par::Seq;
    let scratch = svd::svd_scratch::<f64>(
        m,
        n,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        par,
        Default::default(),
    );
    svd::svd(
        d.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        MemStack::new(&mut MemBuffer::new(scratch)),
        Default::default(),
    )
    .map_err(|e| {
        EngineError::Lora(format!(
            "the SVD of the task vector of `{}` did not converge ({e:?})",
            t.name
        ))
    })?;
    let k = r.min(size);
    // B = U_k · diag(σ_k) [m, r] and A = V_kᵀ [r, n], row-major, zero-padded,
    // rounded to what `dtype` stores.
    let mut bf = vec![0f64; m * r];
    let mut af = vec![0f64; r * n];
    for c in 0..k {
        let sc = s[c];
        for i in 0..m {
            bf[i * r + c] = u[(i, c)] * sc;
        }
        for j in 0..n {
            af[c * n + j] = v[(j, c)];
        }
    }
    let (a_bytes, b_bytes) = if dtype == DType::F64 {
        let enc = |x: &[f64]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        (enc(&af), enc(&bf))
    } else {
        let enc = |x: &mut Vec<f64>| -> Result<Vec<u8>, EngineError> {
            let mut y: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            convert::round_to(dtype, &mut y);
            for (a, b) in x.iter_mut().zip(&y) {
                *a = *b as f64;
            }
            Ok(convert::encode_f32_vec(dtype, &y)?)
        };
        (enc(&mut af)?, enc(&mut bf)?)
    };
    // ‖D − B @ A‖_F with the stored factors, row by row.
    let mut row = vec![0f64; n];
    let mut residual = 0f64;
    for i in 0..m {
        for (j, x) in row.iter_mut().enumerate() {
            *x = d[(i, j)];
        }
        for c in 0..k {
            let bc = bf[i * r + c];
            for (x, a) in row.iter_mut().zip(&af[c * n..(c + 1) * n]) {
                *x -= bc * a;
            }
        }
        residual += row.iter().map(|x| x * x).sum::<f64>();
    }
    let residual = residual.sqrt();
    Ok(Some((
        ExtractedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            rank: k,
            norm,
            residual,
            relative_error: residual / norm,
        },
        a_bytes,
        b_bytes,
    )))
}
