//! Running a method: the pass protocol shared by the in-memory API and the
//! streaming engine, so both produce bit-identical results.
//!
//! For each tensor: an optional per-tensor [`StatsPass`] sweeps over its
//! chunks, then each chunk is merged. Chunking never changes results: random
//! draws are positioned by element offset, and anything a method needs from the
//! whole tensor comes from its pass.

use std::ops::Range;

use tensormerge_core::ParamVector;

use crate::{BaseModel, Chunk, MergeMethod, MethodError, Params, Scratch, Stats, TensorContext};

/// The decoded values of one chunk of one tensor, for every input.
#[derive(Debug, Clone, Default)]
pub struct ChunkData {
    /// Base values (when the merge has a base).
    pub base: Option<Vec<f32>>,
    /// Each model's values.
    pub models: Vec<Vec<f32>>,
    /// Each model's auxiliary values (Fisher), where it has them.
    pub aux: Vec<Option<Vec<f32>>>,
    /// The base's auxiliary values.
    pub base_aux: Option<Vec<f32>>,
}

impl ChunkData {
    /// Borrows this data as a [`Chunk`] of `tensor` at `offset` (with an
    /// empty [`Scratch`] of its own).
    pub fn with_chunk<R>(
        &self,
        tensor: &TensorContext<'_>,
        offset: usize,
        tensor_stats: Option<&Stats>,
        f: impl FnOnce(&Chunk<'_>) -> R,
    ) -> R {
        let models: Vec<&[f32]> = self.models.iter().map(|m| m.as_slice()).collect();
        let aux: Vec<Option<&[f32]>> = self.aux.iter().map(|a| a.as_deref()).collect();
        let scratch = Scratch::default();
        let chunk = Chunk {
            tensor,
            offset,
            base: self.base.as_deref(),
            models: &models,
            aux: &aux,
            base_aux: self.base_aux.as_deref(),
            tensor_stats,
            scratch: &scratch,
        };
        f(&chunk)
    }

    /// Borrows elements `part` of this data (positions relative to the start
    /// of the data, which is at `offset` in the tensor) as a [`Chunk`] at
    /// `offset + part.start`, lending it `scratch`.
    #[allow(clippy::too_many_arguments)]
    fn with_part<R>(
        &self,
        tensor: &TensorContext<'_>,
        offset: usize,
        part: Range<usize>,
        tensor_stats: Option<&Stats>,
        scratch: &Scratch,
        f: impl FnOnce(&Chunk<'_>) -> R,
    ) -> R {
        fn cut<'a>(v: &'a [f32], part: &Range<usize>) -> &'a [f32] {
            &v[part.clone()]
        }
        let models: Vec<&[f32]> = self.models.iter().map(|m| cut(m, &part)).collect();
        let aux: Vec<Option<&[f32]>> = self
            .aux
            .iter()
            .map(|a| a.as_deref().map(|a| cut(a, &part)))
            .collect();
        let chunk = Chunk {
            tensor,
            offset: offset + part.start,
            base: self.base.as_deref().map(|b| cut(b, &part)),
            models: &models,
            aux: &aux,
            base_aux: self.base_aux.as_deref().map(|b| cut(b, &part)),
            tensor_stats,
            scratch,
        };
        f(&chunk)
    }
}

/// Which input a buffer of a [`ChunkData`] holds (see [`ChunkData::refill`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkInput {
    /// The base.
    Base,
    /// Model `i`.
    Model(usize),
    /// Model `i`'s auxiliary values.
    Aux(usize),
    /// The base's auxiliary values.
    BaseAux,
}

impl ChunkData {
    /// Refills this chunk in place, reusing its buffers: `fill(input, buf)`
    /// is called for the base (when `base`), each of `models` models, each
    /// model `i` with `aux[i]`, and the base's auxiliary values (when
    /// `base_aux`), in that order; `buf` holds whatever the previous chunk
    /// left there and must be set to the new values (any length). Buffers of
    /// inputs not present are dropped.
    ///
    /// ```
    /// use tensormerge_methods::{ChunkData, ChunkInput};
    /// let mut data = ChunkData::default();
    /// data.refill::<()>(true, 2, &[false, true], false, |input, buf| {
    ///     buf.clear();
    ///     buf.push(match input {
    ///         ChunkInput::Base => 0.0,
    ///         ChunkInput::Model(i) => 1.0 + i as f32,
    ///         ChunkInput::Aux(i) => 10.0 + i as f32,
    ///         ChunkInput::BaseAux => unreachable!(),
    ///     });
    ///     Ok(())
    /// }).unwrap();
    /// assert_eq!(data.base, Some(vec![0.0]));
    /// assert_eq!(data.models, vec![vec![1.0], vec![2.0]]);
    /// assert_eq!(data.aux, vec![None, Some(vec![11.0])]);
    /// ```
    pub fn refill<E>(
        &mut self,
        base: bool,
        models: usize,
        aux: &[bool],
        base_aux: bool,
        mut fill: impl FnMut(ChunkInput, &mut Vec<f32>) -> Result<(), E>,
    ) -> Result<(), E> {
        fill_slot(base, ChunkInput::Base, &mut self.base, &mut fill)?;
        self.models.resize_with(models, Vec::new);
        for (i, m) in self.models.iter_mut().enumerate() {
            fill(ChunkInput::Model(i), m)?;
        }
        self.aux.resize(aux.len(), None);
        for (i, (a, &has)) in self.aux.iter_mut().zip(aux).enumerate() {
            fill_slot(has, ChunkInput::Aux(i), a, &mut fill)?;
        }
        fill_slot(base_aux, ChunkInput::BaseAux, &mut self.base_aux, &mut fill)
    }
}

/// Fills an optional buffer when its input is present, drops it otherwise.
fn fill_slot<E>(
    present: bool,
    input: ChunkInput,
    buf: &mut Option<Vec<f32>>,
    fill: &mut impl FnMut(ChunkInput, &mut Vec<f32>) -> Result<(), E>,
) -> Result<(), E> {
    if present {
        fill(input, buf.get_or_insert_with(Vec::new))
    } else {
        *buf = None;
        Ok(())
    }
}

/// The chunk ranges of `numel` elements of a tensor of shape `shape` (the
/// whole tensor, or one chunk of it cut into parts): one range when the
/// method is not chunkable or `chunk_len` covers it. Every range but the last
/// holds a multiple of the method's
/// [`chunk_multiple`](MergeMethod::chunk_multiple) for `shape` (so chunks of
/// a row-wise method hold whole rows), `chunk_len` rounded down to it.
pub fn chunk_ranges(
    method: &dyn MergeMethod,
    shape: &[usize],
    numel: usize,
    chunk_len: usize,
) -> Vec<Range<usize>> {
    let step = if method.chunkable() {
        let multiple = method.chunk_multiple(shape).max(1);
        (chunk_len / multiple).max(1).saturating_mul(multiple)
    } else {
        usize::MAX
    };
    if numel == 0 {
        return std::iter::once(0..0).collect();
    }
    (0..numel)
        .step_by(step.min(numel))
        .map(|s| s..(s.saturating_add(step)).min(numel))
        .collect()
}

/// Checks the number of models and the presence of a base against the
/// method's declaration.
pub fn check_inputs(
    method: &dyn MergeMethod,
    has_base: bool,
    n_models: usize,
) -> Result<(), MethodError> {
    let info = method.info();
    if info.base == BaseModel::Required && !has_base {
        return Err(MethodError::NeedsBase {
            method: info.name.to_string(),
        });
    }
    let too_few = n_models < info.min_models;
    let too_many = info.max_models.is_some_and(|m| n_models > m);
    if too_few || too_many {
        let expected = match info.max_models {
            Some(m) if m == info.min_models => format!("exactly {m}"),
            Some(m) => format!("{} to {m}", info.min_models),
            None => format!("at least {}", info.min_models),
        };
        return Err(MethodError::ModelCount {
            method: info.name.to_string(),
            expected,
            got: n_models,
        });
    }
    Ok(())
}

/// Merges one tensor: runs the method's per-tensor pass over the chunks from
/// `fetch`, then merges each chunk and hands it to `sink(offset, values)` in
/// order (a chunkable method's chunk in parts of at most 65 536 elements, so
/// that `sink` sees pieces that are still in cache). Generic over the caller's error type so the engine can report I/O
/// failures from `fetch` and `sink`.
///
/// Each chunk is a new [`ChunkData`] here; [`merge_tensor_reusing`] is the
/// same protocol with buffers reused across chunks and tensors.
pub fn merge_tensor<E: From<MethodError>>(
    method: &dyn MergeMethod,
    tensor: &TensorContext<'_>,
    chunk_len: usize,
    mut fetch: impl FnMut(Range<usize>) -> Result<ChunkData, E>,
    sink: impl FnMut(usize, &[f32]) -> Result<(), E>,
) -> Result<(), E> {
    merge_tensor_reusing(
        method,
        tensor,
        chunk_len,
        &mut MergeBuffers::default(),
        |r, data| {
            *data = fetch(r)?;
            Ok(())
        },
        sink,
    )
}

/// Most elements merged at once by [`merge_tensor_reusing`] (a chunk that
/// the pass needed whole is merged in parts of this size).
const MERGE_PART: usize = 1 << 16;

/// Working memory of [`merge_tensor_reusing`]: the decoded inputs of one
/// chunk, the merged chunk and the method's [`Scratch`]. Keep one per worker
/// thread, so that merging a model allocates (and the kernel zeroes) these
/// buffers once instead of once per chunk or tensor.
#[derive(Debug, Default)]
pub struct MergeBuffers {
    data: ChunkData,
    out: Vec<f32>,
    scratch: Scratch,
}

/// [`merge_tensor`] with `fetch(range, data)` refilling `data` in place:
/// the vectors it holds from the previous chunk (of this tensor or an
/// earlier one) are there to be overwritten, so that a fetch which resizes
/// them to the chunk's length and writes every element allocates nothing.
///
/// ```
/// use tensormerge_methods::{ChunkData, MergeBuffers, merge_tensor_reusing, registry, Merge};
/// # use tensormerge_methods::TensorContext;
/// # fn linear() -> &'static dyn tensormerge_methods::MergeMethod { registry().get("linear").unwrap() }
/// # tensormerge_methods::register_method!(Doc);
/// # struct Doc;
/// # static INFO: tensormerge_methods::MethodInfo = tensormerge_methods::MethodInfo { name: "doc_mean", summary: "", paper: "",
/// #     base: tensormerge_methods::BaseModel::Unused, min_models: 1, max_models: None, params: &[] };
/// # impl tensormerge_methods::MergeMethod for Doc {
/// #     fn info(&self) -> &'static tensormerge_methods::MethodInfo { &INFO }
/// #     fn merge(&self, c: &tensormerge_methods::Chunk<'_>, out: &mut [f32]) -> Result<(), tensormerge_methods::MethodError> {
/// #         for (i, o) in out.iter_mut().enumerate() { *o = (c.models[0][i] + c.models[1][i]) / 2.0; }
/// #         Ok(())
/// #     }
/// # }
/// let mean = registry().get("doc_mean").unwrap();
/// let merge = Merge::with_defaults(mean, 2).unwrap();
/// let (a, b) = (vec![1.0f32; 10], vec![3.0f32; 10]);
/// let ctx = TensorContext { name: "w", shape: &[10], global: &merge.global, models: &merge.models,
///                           seed: 0, model_stats: None };
/// let mut bufs = MergeBuffers::default();
/// let mut out = vec![0.0; 10];
/// merge_tensor_reusing::<tensormerge_methods::MethodError>(
///     mean, &ctx, 4, &mut bufs,
///     |r, data: &mut ChunkData| {
///         data.models.resize_with(2, Vec::new);
///         data.models[0].clear();
///         data.models[0].extend_from_slice(&a[r.clone()]);
///         data.models[1].clear();
///         data.models[1].extend_from_slice(&b[r]);
///         Ok(())
///     },
///     |off, v| { out[off..off + v.len()].copy_from_slice(v); Ok(()) },
/// ).unwrap();
/// assert_eq!(out, vec![2.0; 10]);
/// ```
pub fn merge_tensor_reusing<E: From<MethodError>>(
    method: &dyn MergeMethod,
    tensor: &TensorContext<'_>,
    chunk_len: usize,
    bufs: &mut MergeBuffers,
    mut fetch: impl FnMut(Range<usize>, &mut ChunkData) -> Result<(), E>,
    mut sink: impl FnMut(usize, &[f32]) -> Result<(), E>,
) -> Result<(), E> {
    let ranges = chunk_ranges(method, tensor.shape, tensor.numel(), chunk_len);
    let single = ranges.len() == 1;
    let MergeBuffers { data, out, scratch } = bufs;
    // Whether `data` holds the (single) chunk already.
    let mut loaded = false;
    let stats = match method.tensor_pass(tensor) {
        None => None,
        Some(mut pass) => {
            for sweep in 0..pass.sweeps() {
                for r in &ranges {
                    if !(single && loaded) {
                        fetch(r.clone(), data)?;
                        loaded = single;
                    }
                    data.with_chunk(tensor, r.start, None, |c| pass.observe(sweep, c))?;
                }
                pass.end_sweep(sweep)?;
                if pass.done() {
                    break;
                }
            }
            Some(pass.finish()?)
        }
    };
    // A chunkable method merges a loaded chunk in parts of at most
    // `MERGE_PART` elements: the result (and its encoding by the caller)
    // stays in cache, and results do not depend on how a tensor is cut.
    let part_len = if method.chunkable() {
        MERGE_PART
    } else {
        usize::MAX
    };
    for r in &ranges {
        if !loaded {
            fetch(r.clone(), data)?;
        }
        for part in chunk_ranges(method, tensor.shape, r.len(), part_len) {
            // Zeroed for every part, as a method that writes only some
            // entries may expect (cheap: the buffer is reused, in cache).
            out.clear();
            out.resize(part.len(), 0.0);
            let at = r.start + part.start;
            data.with_part(tensor, r.start, part, stats.as_ref(), scratch, |c| {
                method.merge(c, &mut out[..])
            })?;
            sink(at, &out[..])?;
        }
    }
    Ok(())
}

/// A method with its resolved parameters and seed, ready to run on in-memory
/// [`ParamVector`]s.
///
/// This is the library path of the in-memory API: the same pass protocol as
/// the streaming engine ([`merge_tensor`]), so results are identical.
///
/// ```
/// use std::sync::Arc;
/// use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
/// use tensormerge_methods::{Merge, Params, ParamValue, Scope, MergeMethod};
/// # use tensormerge_methods::*;
/// # struct Mean;
/// # static INFO: MethodInfo = MethodInfo { name: "mean_doc", summary: "", paper: "", base: BaseModel::Unused,
/// #     min_models: 1, max_models: None, params: &[] };
/// # impl MergeMethod for Mean {
/// #     fn info(&self) -> &'static MethodInfo { &INFO }
/// #     fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
/// #         for (i, o) in out.iter_mut().enumerate() {
/// #             *o = c.models.iter().map(|m| m[i]).sum::<f32>() / c.models.len() as f32;
/// #         }
/// #         Ok(())
/// #     }
/// # }
/// let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
/// let a = ParamVector::from_vec(layout.clone(), vec![1.0, 2.0]).unwrap();
/// let b = ParamVector::from_vec(layout.clone(), vec![3.0, 4.0]).unwrap();
/// let merge = Merge::with_defaults(&Mean, 2).unwrap();
/// let out = merge.run(None, &[&a, &b]).unwrap();
/// assert_eq!(out.values().unwrap(), &[2.0, 3.0]);
/// ```
#[derive(Debug, Clone)]
pub struct Merge<'m> {
    /// The method.
    pub method: &'m dyn MergeMethod,
    /// Global parameters.
    pub global: Params,
    /// Per-model parameters.
    pub models: Vec<Params>,
    /// Seed for methods that draw random numbers.
    pub seed: u64,
    /// Chunk length in elements (`usize::MAX` for whole tensors).
    pub chunk_len: usize,
}

impl std::fmt::Debug for dyn MergeMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MergeMethod({})", self.info().name)
    }
}

impl<'m> Merge<'m> {
    /// `method` with every parameter at its default, for `n_models` models.
    pub fn with_defaults(
        method: &'m dyn MergeMethod,
        n_models: usize,
    ) -> Result<Self, MethodError> {
        Self::new(method, Vec::new(), vec![Vec::new(); n_models])
    }

    /// `method` with the given global and per-model parameter values
    /// (validated, defaults filled).
    pub fn new(
        method: &'m dyn MergeMethod,
        global: Vec<(&str, crate::ParamValue)>,
        models: Vec<Vec<(&str, crate::ParamValue)>>,
    ) -> Result<Self, MethodError> {
        let info = method.info();
        let global = Params::resolve(info.name, info.params, crate::Scope::Global, global)?;
        let models = models
            .into_iter()
            .map(|m| Params::resolve(info.name, info.params, crate::Scope::PerModel, m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Merge {
            method,
            global,
            models,
            seed: 0,
            chunk_len: usize::MAX,
        })
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the chunk length (results do not depend on it).
    pub fn chunk_len(mut self, chunk_len: usize) -> Self {
        self.chunk_len = chunk_len;
        self
    }

    /// Merges whole models given as vectors of one layout.
    pub fn run(
        &self,
        base: Option<&ParamVector>,
        models: &[&ParamVector],
    ) -> Result<ParamVector, MethodError> {
        self.run_with_aux(base, models, &vec![None; models.len()], None)
    }

    /// Merges whole models, with auxiliary vectors (Fisher estimates) per model
    /// and for the base.
    pub fn run_with_aux(
        &self,
        base: Option<&ParamVector>,
        models: &[&ParamVector],
        aux: &[Option<&ParamVector>],
        base_aux: Option<&ParamVector>,
    ) -> Result<ParamVector, MethodError> {
        check_inputs(self.method, base.is_some(), models.len())?;
        if self.models.len() != models.len() || aux.len() != models.len() {
            return Err(MethodError::ModelCount {
                method: self.method.info().name.to_string(),
                expected: format!(
                    "{} (as many as parameter sets and aux entries)",
                    self.models.len()
                ),
                got: models.len(),
            });
        }
        let first = base
            .or(models.first().copied())
            .ok_or_else(|| MethodError::ModelCount {
                method: self.method.info().name.to_string(),
                expected: "at least 1 input".into(),
                got: 0,
            })?;
        let layout = first.layout().clone();
        let all = base
            .into_iter()
            .chain(models.iter().copied())
            .chain(aux.iter().flatten().copied())
            .chain(base_aux);
        for v in all {
            v.check()?;
            if !std::sync::Arc::ptr_eq(v.layout(), &layout)
                && let Some(e) = layout.first_difference(v.layout())
            {
                return Err(e.into());
            }
        }
        let aux_has: Vec<bool> = aux.iter().map(Option::is_some).collect();
        let fill_range = |r: Range<usize>, data: &mut ChunkData| -> Result<(), MethodError> {
            data.refill(
                base.is_some(),
                models.len(),
                &aux_has,
                base_aux.is_some(),
                |input, buf| {
                    let src = match input {
                        ChunkInput::Base => base,
                        ChunkInput::Model(i) => Some(models[i]),
                        ChunkInput::Aux(i) => aux[i],
                        ChunkInput::BaseAux => base_aux,
                    };
                    buf.clear();
                    if let Some(src) = src {
                        buf.extend_from_slice(&src.values()?[r.clone()]);
                    }
                    Ok(())
                },
            )
        };
        let mut bufs = MergeBuffers::default();

        // Whole-model pass.
        let model_stats = match self.method.model_pass(&self.global, &self.models) {
            None => None,
            Some(mut pass) => {
                for sweep in 0..pass.sweeps() {
                    for (t, r) in layout.float_tensors() {
                        let ctx = self.context(&t.name, &t.shape, None);
                        if !pass.needs(&ctx) {
                            continue;
                        }
                        for cr in chunk_ranges(self.method, &t.shape, r.len(), self.chunk_len) {
                            let data = &mut bufs.data;
                            fill_range(r.start + cr.start..r.start + cr.end, data)?;
                            data.with_chunk(&ctx, cr.start, None, |c| pass.observe(sweep, c))?;
                        }
                    }
                    pass.end_sweep(sweep)?;
                    if pass.done() {
                        break;
                    }
                }
                Some(pass.finish()?)
            }
        };

        let mut out = ParamVector::zeros(layout.clone());
        let values = out.values_mut()?;
        for (t, r) in layout.float_tensors() {
            let ctx = self.context(&t.name, &t.shape, model_stats.as_ref());
            let dest = &mut values[r.clone()];
            merge_tensor_reusing::<MethodError>(
                self.method,
                &ctx,
                self.chunk_len,
                &mut bufs,
                |cr, data| fill_range(r.start + cr.start..r.start + cr.end, data),
                |off, vals| {
                    dest[off..off + vals.len()].copy_from_slice(vals);
                    Ok(())
                },
            )?;
        }
        Ok(out)
    }

    /// The warnings the method reports for this merge over `layout`
    /// ([`MergeMethod::config_warnings`], then
    /// [`MergeMethod::tensor_warnings`] for each float tensor), with
    /// `has_aux[i]` telling whether model `i` has an auxiliary vector.
    pub fn warnings(&self, layout: &tensormerge_core::Layout, has_aux: &[bool]) -> Vec<String> {
        let mut out = self.method.config_warnings(&self.global, &self.models);
        for (t, _) in layout.float_tensors() {
            let ctx = self.context(&t.name, &t.shape, None);
            out.extend(self.method.tensor_warnings(&ctx, has_aux));
        }
        out
    }

    fn context<'a>(
        &'a self,
        name: &'a str,
        shape: &'a [usize],
        model_stats: Option<&'a Stats>,
    ) -> TensorContext<'a> {
        TensorContext {
            name,
            shape,
            global: &self.global,
            models: &self.models,
            seed: self.seed,
            model_stats,
        }
    }
}
