//! Streaming evaluation of an expression on model directories
//! ([`run_eval`]): tensor by tensor, chunk by chunk, straight to the writer.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{IoError, Model, ModelWriter, WriterOptions};

use super::{Evaluator, Expr, ExprError};
use crate::{EngineError, Mismatch, Progress};

/// Options of [`run_eval`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Output dtype of every floating-point tensor. Default: each tensor's
    /// dtype in the template model.
    pub out_dtype: Option<DType>,
    /// The model (by expression name) whose non-float tensors, tensor order
    /// and support files (config, tokenizer) the output takes. Default: the
    /// first model the expression uses. It may be a model the expression does
    /// not use.
    pub template: Option<String>,
    /// Largest output shard in bytes.
    pub max_shard_bytes: u64,
    /// Replace an existing output directory.
    pub overwrite: bool,
    /// Memory budget in bytes for the evaluation buffers of all workers
    /// (inputs decoded to `f32`, intermediate results, encoded output).
    /// Chunks are sized to fit it, so one huge tensor does not need to fit.
    pub max_memory: u64,
    /// Accept NaN and infinite values in the inputs. By default the first one
    /// found stops the evaluation with [`EngineError::NonFinite`].
    pub allow_non_finite: bool,
    /// A flag that stops the evaluation at the next chunk when set (the CLI
    /// sets it on Ctrl-C): the writer is dropped, which removes the temporary
    /// output directory, and the run returns [`EngineError::Cancelled`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Write a model card (`README.md`: the expression and the models; see
    /// [`crate::card`]). Default: true.
    pub card: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            out_dtype: None,
            template: None,
            max_shard_bytes: tensormerge_io::DEFAULT_MAX_SHARD_BYTES,
            overwrite: false,
            max_memory: 512 << 20,
            allow_non_finite: false,
            cancel: None,
            card: true,
        }
    }
}

/// What [`run_eval`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// The finished output directory.
    pub out_dir: PathBuf,
    /// Floating-point tensors computed by the expression.
    pub tensors_evaluated: usize,
    /// Non-float tensors copied from the template.
    pub tensors_copied: usize,
    /// Floating-point parameters computed.
    pub params: u64,
    /// Input bytes read (all models' float tensors, the template's others).
    pub bytes_read: u64,
    /// Tensor bytes written.
    pub bytes_written: u64,
    /// Support files copied from the template (`config.json`, tokenizer).
    pub support_files: Vec<String>,
    /// Given models that the expression does not use and that are not the
    /// template (they are not read).
    pub unused_models: Vec<String>,
}

/// Largest chunk, in elements, whatever the budget.
const MAX_CHUNK: usize = 1 << 17;
/// Elements a worker decodes, evaluates and encodes at a time.
const PART: usize = 8192;
/// Smallest chunk, in elements, whatever the budget.
const MIN_CHUNK: usize = 4 << 10;
/// Input bytes read through one set of memory maps before the inputs are
/// mapped afresh.
///
/// Pages of a memory-mapped file that have been read stay in the process's
/// resident set until the mapping goes away, so reading a whole model
/// through one mapping makes the resident set as large as the model (the
/// pages are clean page cache and reclaimable, but `ru_maxrss`, `top` and
/// container limits count them). Dropping and reopening the models every
/// `REMAP_BYTES` bounds that part of the resident set. Reopening validates
/// the headers again (microseconds for a typical header) and checks that the
/// layout did not change.
const REMAP_BYTES: u64 = 64 << 20;

/// Opens `m` again from the paths it was read from (never the network: a hub
/// model is reopened from its local snapshot), and checks that its tensors did
/// not change in the meantime.
fn reopen(m: &Model) -> Result<Model, EngineError> {
    let fresh = m
        .reopen()
        .map_err(io_error(format!("cannot reopen model `{}`", m.name())))?;
    if fresh.layout() != m.layout() {
        return Err(io_error(format!("cannot reopen model `{}`", m.name()))(
            IoError::Io {
                path: m.dir().to_path_buf(),
                source: std::io::Error::other(
                    "the model's tensors changed while it was being read",
                ),
            },
        ));
    }
    Ok(fresh)
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> EngineError {
    EngineError::Other(Box::new(e))
}

fn io_error(context: impl Into<String>) -> impl FnOnce(IoError) -> EngineError {
    move |source| EngineError::Io {
        context: context.into(),
        source: Box::new(source),
    }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One worker's buffers, reused across chunks.
struct Worker {
    ev: Evaluator,
    inputs: Vec<Vec<f32>>,
    out: Vec<u8>,
    /// Bytes of `out` holding the last result.
    out_len: usize,
    /// Refuse NaN and infinity in the inputs.
    check_finite: bool,
}

impl Worker {
    /// Evaluates elements `range` of tensor `name` into `self.out[..self.out_len]`,
    /// in parts of [`PART`] elements: each part's decoded inputs, the
    /// program's intermediate values and its encoded result stay in the
    /// second-level cache (decoding a whole chunk of 128K elements per input
    /// first sent them through the last-level cache: hand-timed BF16 eval on
    /// `cargo xtask bench`'s GPT-2 inputs, 8 alternating runs, CPU 0.99 ->
    /// 0.88 s mean, output unchanged).
    fn run(
        &mut self,
        models: &[Model],
        name: &str,
        range: Range<usize>,
        dtype: DType,
    ) -> Result<(), EngineError> {
        let size = dtype.size_in_bytes();
        self.out_len = range.len() * size;
        if self.out.len() < self.out_len {
            self.out.resize(self.out_len, 0);
        }
        let mut at = range.start;
        while at < range.end {
            let part = at..(at + PART).min(range.end);
            let out_at = (part.start - range.start) * size;
            if let Err(e) = self.run_range(models, name, part.clone(), dtype, out_at) {
                // The whole chunk again, so that a non-finite input is
                // reported as one pass over the chunk would: the first
                // input in model order that holds one.
                return self.run_range(models, name, range, dtype, 0).and(Err(e));
            }
            at = part.end;
        }
        Ok(())
    }

    /// Evaluates elements `range` of tensor `name` into `self.out` from byte
    /// `out_at` on (`self.out` is long enough).
    fn run_range(
        &mut self,
        models: &[Model],
        name: &str,
        range: Range<usize>,
        dtype: DType,
        out_at: usize,
    ) -> Result<(), EngineError> {
        let len = range.len();
        let read_error = |m: &Model| io_error(format!("cannot read model `{}`", m.name()));
        // F32 tensors at aligned addresses are used in place, straight from
        // the memory map; the others are decoded into this worker's buffers.
        // Buffers only grow, so chunks of varying length do not refill them.
        let mut direct: Vec<Option<&[f32]>> = Vec::with_capacity(models.len());
        // The first non-finite value of each decoded input, found while
        // decoding (a second pass over the values took a tenth of the time).
        let mut bad: Vec<Option<usize>> = Vec::with_capacity(models.len());
        for (buf, m) in self.inputs.iter_mut().zip(models) {
            let info = m.tensor_info(name).map_err(read_error(m))?;
            let mut lent = None;
            if info.dtype == DType::F32 {
                let bytes = m.tensor_bytes(name).map_err(read_error(m))?;
                if bytes.as_ptr().align_offset(std::mem::align_of::<f32>()) == 0
                    && let Cow::Borrowed(values) = m.tensor_f32(name).map_err(read_error(m))?
                {
                    lent = values.get(range.clone());
                }
            }
            let mut first_bad = None;
            if lent.is_none() {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
                first_bad = m
                    .read_f32_range_checked(name, range.clone(), &mut buf[..len])
                    .map_err(read_error(m))?;
            }
            direct.push(lent);
            bad.push(first_bad);
        }
        let slices: Vec<&[f32]> = direct
            .iter()
            .zip(&self.inputs)
            .map(|(d, b)| d.unwrap_or_else(|| &b[..len]))
            .collect();
        if self.check_finite {
            // In model order, as one pass over every input would report.
            for (((v, m), lent), bad) in slices.iter().zip(models).zip(&direct).zip(&bad) {
                if lent.is_some() {
                    crate::error::check_finite(v, m.name(), name, range.start)?;
                } else if let Some(i) = *bad {
                    let e = crate::error::non_finite_at(v, i, m.name(), name, range.start);
                    return Err(e);
                }
            }
        }
        let result = self.ev.eval(&slices, len).map_err(other)?;
        let bytes = len * dtype.size_in_bytes();
        convert::encode_f32(dtype, result, &mut self.out[out_at..out_at + bytes])?;
        Ok(())
    }
}

/// Writes the results held by `workers` (chunks of tensor `name`, in
/// order); returns the bytes written.
fn write_results(writer: &mut ModelWriter, name: &str, workers: &[Worker]) -> Result<u64, IoError> {
    let mut bytes = 0;
    for w in workers {
        writer.write(name, &w.out[..w.out_len])?;
        bytes += w.out_len as u64;
    }
    Ok(bytes)
}

/// Evaluates `expr` on whole models and writes the result as a model
/// directory at `out`, streaming: each floating-point tensor is read, decoded
/// to `f32`, evaluated and encoded chunk by chunk (chunks in parallel on the
/// current rayon pool), so memory is bounded by `opts.max_memory`, not by the
/// model or the largest tensor.
///
/// `models` binds expression names to model references (directories,
/// `.safetensors` files, hub ids; see `tensormerge_io::Model::open`). Every
/// model the expression uses must be given; given models it does not use are
/// reported as a warning and not read. All used models (and the template)
/// must have the same tensor names and shapes; float widths may differ. The
/// output has the template's tensors in its order: float tensors computed by
/// the expression (in `opts.out_dtype`, or the template's dtype), non-float
/// tensors copied from the template, and the template's support files.
///
/// The values are bit-identical to [`eval_vectors`](super::eval_vectors) on
/// the models' vectors (before the final conversion to the output dtype).
///
/// ```
/// use tensormerge_core::{DType, TensorInfo, convert};
/// use tensormerge_engine::{NoProgress, expr};
/// use tensormerge_io::{Model, ModelWriter, WriterOptions};
///
/// let tmp = tempfile::tempdir().unwrap();
/// let write = |name: &str, w: [f32; 2]| {
///     let dir = tmp.path().join(name);
///     let info = vec![TensorInfo::new("w", vec![2], DType::F32)];
///     let mut out = ModelWriter::create(&dir, info, WriterOptions::default()).unwrap();
///     out.write("w", &convert::encode_f32_vec(DType::F32, &w).unwrap()).unwrap();
///     out.finish().unwrap();
///     (name.to_string(), dir.display().to_string())
/// };
/// let models = [write("base", [1.0, 1.0]), write("ft", [3.0, 0.0])];
/// let out = tmp.path().join("merged");
/// let opts = expr::EvalOptions::default();
/// expr::run_eval("base + 0.5 * (ft - base)", &models, &out, &opts, &NoProgress).unwrap();
/// assert_eq!(Model::open_path(&out).unwrap().read_f32_vec("w").unwrap(), [2.0, 0.5]);
/// ```
pub fn run_eval(
    expr: &str,
    models: &[(String, String)],
    out: &Path,
    opts: &EvalOptions,
    progress: &dyn Progress,
) -> Result<EvalReport, EngineError> {
    run_eval_remapping(expr, models, out, opts, progress, REMAP_BYTES)
}

/// [`run_eval`], remapping the inputs every `remap_bytes` bytes read.
fn run_eval_remapping(
    expr: &str,
    models: &[(String, String)],
    out: &Path,
    opts: &EvalOptions,
    progress: &dyn Progress,
    remap_bytes: u64,
) -> Result<EvalReport, EngineError> {
    let expr_text = expr;
    let expr = Expr::parse(expr).map_err(other)?;
    let mut seen = HashSet::new();
    for (name, reference) in models {
        if !is_name(name) {
            return Err(EngineError::Option(format!(
                "model name `{name}` (for `{reference}`) is not a name the expression language can use: \
                 use letters, digits and `_`, not starting with a digit"
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(EngineError::Option(format!(
                "model name `{name}` is given twice"
            )));
        }
    }
    let known = || models.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let reference_of = |name: &str| {
        models
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.as_str())
    };
    let mut used: Vec<(&str, &str)> = Vec::new();
    for name in expr.models() {
        match reference_of(name) {
            Some(r) => used.push((name, r)),
            None => return Err(other(ExprError::unknown_model(&expr, name, known()))),
        }
    }
    let template_name = match &opts.template {
        Some(t) => {
            if reference_of(t).is_none() {
                return Err(EngineError::Option(format!(
                    "template `{t}` is not one of the given models ({})",
                    known().join(", ")
                )));
            }
            t.clone()
        }
        None => used[0].0.to_string(),
    };
    let unused: Vec<String> = models
        .iter()
        .filter(|(n, _)| expr.column_of(n).is_none() && *n != template_name)
        .map(|(n, _)| n.clone())
        .collect();
    for n in &unused {
        progress.warning(&format!(
            "model `{n}` is not used by the expression `{}`",
            expr.source()
        ));
    }

    // Open every model the expression uses, and the template.
    let mut opened: Vec<Model> = Vec::with_capacity(used.len());
    for (name, reference) in &used {
        progress.message(&format!("opening `{name}` = {reference}"));
        opened.push(Model::open(reference).map_err(io_error(format!(
            "cannot open model `{name}` = {reference}"
        )))?);
    }
    // The template is opened on its own (again, if the expression uses it),
    // so that the inputs can be remapped while the template stays.
    let template = match used.iter().position(|(n, _)| *n == template_name) {
        Some(i) => reopen(&opened[i])?,
        None => {
            let r = reference_of(&template_name).expect("checked above");
            Model::open(r).map_err(io_error(format!(
                "cannot open model `{template_name}` = {r}"
            )))?
        }
    };

    // Every used model must fit the template: report every mismatch at once.
    let mut mismatches = Vec::new();
    for ((name, _), m) in used.iter().zip(&opened) {
        if *name == template_name {
            continue;
        }
        for d in template.layout().differences(m.layout()) {
            if let tensormerge_core::CoreError::LayoutMismatch { tensor, detail } = d {
                mismatches.push(Mismatch {
                    model: format!("{name} ({})", m.name()),
                    tensor,
                    detail,
                });
            }
        }
    }
    if !mismatches.is_empty() {
        return Err(EngineError::Incompatible(mismatches));
    }

    let out_tensors: Vec<TensorInfo> = template
        .layout()
        .tensors()
        .iter()
        .map(|t| match (t.dtype.is_float(), opts.out_dtype) {
            (true, Some(d)) => TensorInfo::new(t.name.clone(), t.shape.clone(), d),
            _ => t.clone(),
        })
        .collect();
    if let Some(d) = opts.out_dtype
        && !d.is_float()
    {
        return Err(EngineError::Option(format!(
            "output dtype {d} is not a floating-point type"
        )));
    }
    if opts.max_shard_bytes == 0 {
        return Err(EngineError::Option(
            "the output shard size must be positive".into(),
        ));
    }
    let mut protected = Vec::new();
    for m in opened.iter().chain(std::iter::once(&template)) {
        protected.extend(m.protected_paths());
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert(
        "tensormerge.expression".to_string(),
        expr.source().to_string(),
    );
    let mut writer = ModelWriter::create(
        out,
        out_tensors.clone(),
        WriterOptions {
            max_shard_bytes: opts.max_shard_bytes,
            overwrite: opts.overwrite,
            protected,
            metadata,
        },
    )
    .map_err(io_error(format!("cannot write output `{}`", out.display())))?;

    // Size the chunks to the budget: per element, each worker holds one f32
    // per input and per scratch buffer, plus the encoded output; there are
    // two sets of workers (one computes a batch while the other's results
    // are written).
    let evaluator = Evaluator::new(&expr);
    let workers_n = rayon::current_num_threads().max(1);
    let out_size = out_tensors
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| t.dtype.size_in_bytes())
        .max()
        .unwrap_or(4);
    let per_elem = (4 * (opened.len() + evaluator.scratch_buffers()) + out_size) as u64;
    let chunk = (opts.max_memory / (2 * workers_n) as u64 / per_elem)
        .clamp(MIN_CHUNK as u64, MAX_CHUNK as u64) as usize;
    let new_set = || -> Vec<Worker> {
        (0..workers_n)
            .map(|_| Worker {
                ev: evaluator.clone(),
                inputs: vec![Vec::new(); opened.len()],
                out: Vec::new(),
                out_len: 0,
                check_finite: !opts.allow_non_finite,
            })
            .collect()
    };
    let mut sets = [new_set(), new_set()];
    // The set that computes the next batch (the other holds the results of
    // the batch before, until they are written).
    let mut cur = 0usize;
    // The batch computed last and not yet written: its tensor and how many
    // workers of the other set hold its chunks, in order.
    let mut unwritten: Option<(&str, usize)> = None;
    let write_ctx = || format!("cannot write output `{}`", out.display());

    let mut report = EvalReport {
        out_dir: PathBuf::new(),
        tensors_evaluated: 0,
        tensors_copied: 0,
        params: 0,
        bytes_read: 0,
        bytes_written: 0,
        support_files: Vec::new(),
        unused_models: unused,
    };
    let total_read: u64 = out_tensors
        .iter()
        .map(|t| {
            if t.dtype.is_float() {
                opened
                    .iter()
                    .map(|m| {
                        m.layout()
                            .get(&t.name)
                            .map_or(0, |i| i.numel() as u64 * i.dtype.size_in_bytes() as u64)
                    })
                    .sum::<u64>()
            } else {
                t.numel() as u64 * t.dtype.size_in_bytes() as u64
            }
        })
        .sum();
    progress.start("evaluating", total_read, out_tensors.len() as u64);
    // Input bytes read through the current memory maps.
    let mut mapped = 0u64;
    for t in &out_tensors {
        if !t.dtype.is_float() {
            if let Some((name, k)) = unwritten.take() {
                report.bytes_written += write_results(&mut writer, name, &sets[1 - cur][..k])
                    .map_err(io_error(write_ctx()))?;
            }
            let bytes = template
                .tensor_bytes(&t.name)
                .map_err(io_error(format!("cannot read model `{}`", template.name())))?;
            writer
                .write(&t.name, &bytes)
                .map_err(io_error(write_ctx()))?;
            report.tensors_copied += 1;
            report.bytes_read += bytes.len() as u64;
            report.bytes_written += bytes.len() as u64;
            progress.advance(bytes.len() as u64, 1);
            continue;
        }
        let n = t.numel();
        let in_per_elem: u64 = opened
            .iter()
            .map(|m| {
                m.layout()
                    .get(&t.name)
                    .map_or(0, |i| i.dtype.size_in_bytes() as u64)
            })
            .sum();
        let mut start = 0;
        while start < n {
            if opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
            {
                return Err(EngineError::Cancelled);
            }
            // One batch: a chunk per worker of the current set, computed in
            // parallel while the batch before is written, in order (before,
            // the workers waited for every write).
            let ranges: Vec<Range<usize>> = (0..workers_n)
                .map(|w| {
                    let s = (start + w * chunk).min(n);
                    s..(s + chunk).min(n)
                })
                .filter(|r| !r.is_empty())
                .collect();
            let end = ranges.last().map_or(start, |r| r.end);
            let [a, b] = &mut sets;
            let (computing, done) = if cur == 0 { (a, &*b) } else { (b, &*a) };
            let (models, writer) = (&opened, &mut writer);
            let (computed, wrote) = rayon::join(
                || {
                    computing[..ranges.len()]
                        .par_iter_mut()
                        .zip(ranges.par_iter())
                        .map(|(w, r)| w.run(models, &t.name, r.clone(), t.dtype))
                        .collect::<Result<Vec<()>, EngineError>>()
                },
                || match unwritten {
                    Some((name, k)) => write_results(writer, name, &done[..k]),
                    None => Ok(0),
                },
            );
            report.bytes_written += wrote.map_err(io_error(write_ctx()))?;
            computed?;
            unwritten = Some((t.name.as_str(), ranges.len()));
            cur = 1 - cur;
            let elems = (end - start) as u64;
            report.bytes_read += elems * in_per_elem;
            progress.advance(elems * in_per_elem, 0);
            mapped += elems * in_per_elem;
            if mapped >= remap_bytes {
                for m in opened.iter_mut() {
                    *m = reopen(m)?;
                }
                mapped = 0;
            }
            start = end;
        }
        report.tensors_evaluated += 1;
        report.params += n as u64;
        progress.advance(0, 1);
    }
    if let Some((name, k)) = unwritten.take() {
        report.bytes_written +=
            write_results(&mut writer, name, &sets[1 - cur][..k]).map_err(io_error(write_ctx()))?;
    }
    progress.finish();
    report.support_files = writer
        .copy_support_files(template.dir(), opts.out_dtype)
        .map_err(io_error(write_ctx()))?;
    if opts.card {
        let name = out
            .file_name()
            .map_or_else(|| "evaluated".into(), |n| n.to_string_lossy().into_owned());
        let card = crate::card::ModelCard::for_expression(expr_text, models);
        crate::card::write(writer.temp_dir(), &card, &name)?;
    }
    report.out_dir = writer.finish().map_err(io_error(write_ctx()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoProgress;

    /// Writes a model of two BF16/F32 tensors, sharded so that it is opened
    /// through its index.
    fn model(dir: &Path, seed: f32) -> String {
        let tensors = vec![
            TensorInfo::new("a", vec![10_000], DType::BF16),
            TensorInfo::new("b", vec![30, 300], DType::F32),
        ];
        let opts = WriterOptions {
            max_shard_bytes: 1,
            ..WriterOptions::default()
        };
        let mut w = ModelWriter::create(dir, tensors, opts).unwrap();
        let a: Vec<f32> = (0..10_000).map(|i| (i as f32 * seed).sin()).collect();
        let b: Vec<f32> = (0..9_000).map(|i| (i as f32 + seed).cos() * 3.0).collect();
        w.write("a", &convert::encode_f32_vec(DType::BF16, &a).unwrap())
            .unwrap();
        w.write("b", &convert::encode_f32_vec(DType::F32, &b).unwrap())
            .unwrap();
        w.finish().unwrap();
        dir.join("model.safetensors.index.json")
            .display()
            .to_string()
    }

    #[test]
    fn remapping_the_inputs_mid_tensor_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let models = vec![
            ("x".to_string(), model(&tmp.path().join("x"), 0.1)),
            ("y".to_string(), model(&tmp.path().join("y"), 0.7)),
        ];
        let opts = EvalOptions {
            // The smallest chunks: several batches per tensor.
            max_memory: 1,
            ..EvalOptions::default()
        };
        let src = "x * 0.25 - (y - x) / 3";
        let run = |remap: u64, name: &str| {
            let out = tmp.path().join(name);
            run_eval_remapping(src, &models, &out, &opts, &NoProgress, remap).unwrap();
            let m = Model::open_path(&out).unwrap();
            ["a", "b"].map(|n| m.tensor_bytes(n).unwrap().into_owned())
        };
        // Reopening after every batch (through the index file given as the
        // reference) and never reopening give the same bytes.
        let every = run(1, "every");
        assert_eq!(every, run(u64::MAX, "never"));
        // Which are the expression's values.
        let (x, y) = (
            Model::open(&models[0].1).unwrap(),
            Model::open(&models[1].1).unwrap(),
        );
        let xa = x.read_f32_vec("a").unwrap();
        let ya = y.read_f32_vec("a").unwrap();
        let want: Vec<f32> = xa
            .iter()
            .zip(&ya)
            .map(|(x, y)| x * 0.25 - (y - x) / 3.0)
            .collect();
        assert_eq!(
            every[0],
            convert::encode_f32_vec(DType::BF16, &want).unwrap()
        );
    }

    #[test]
    fn a_model_that_changes_while_being_read_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = model(&tmp.path().join("x"), 0.3);
        let m = Model::open(&path).unwrap();
        assert!(reopen(&m).is_ok());
        // Rewrite it, still sharded with an index, with other shapes.
        let dir = tmp.path().join("x");
        let tensors = vec![
            TensorInfo::new("a", vec![2], DType::F32),
            TensorInfo::new("b", vec![3], DType::F32),
        ];
        let opts = WriterOptions {
            overwrite: true,
            max_shard_bytes: 1,
            ..WriterOptions::default()
        };
        let mut w = ModelWriter::create(&dir, tensors, opts).unwrap();
        w.write("a", &[0u8; 8]).unwrap();
        w.write("b", &[0u8; 12]).unwrap();
        w.finish().unwrap();
        let err = reopen(&m).unwrap_err();
        assert!(err.to_string().contains("cannot reopen model"), "{err}");
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("changed while it was being read"), "{cause}");
    }
}
