//! Running a method: the pass protocol shared by the in-memory API and the
//! streaming engine, so both produce bit-identical results.
//!
//! For each tensor: an optional per-tensor [`StatsPass`] sweeps over its
//! chunks, then each chunk is merged. Chunking never changes results: random
//! draws are positioned by element offset, and anything a method needs from the
//! whole tensor comes from its pass.

use std::ops::Range;

use tensormerge_core::ParamVector;

use crate::{BaseModel, Chunk, MergeMethod, MethodError, Params, Stats, TensorContext};

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
    /// Borrows this data as a [`Chunk`] of `tensor` at `offset`.
    pub fn with_chunk<R>(
        &self,
        tensor: &TensorContext<'_>,
        offset: usize,
        tensor_stats: Option<&Stats>,
        f: impl FnOnce(&Chunk<'_>) -> R,
    ) -> R {
        let models: Vec<&[f32]> = self.models.iter().map(|m| m.as_slice()).collect();
        let aux: Vec<Option<&[f32]>> = self.aux.iter().map(|a| a.as_deref()).collect();
        let chunk = Chunk {
            tensor,
            offset,
            base: self.base.as_deref(),
            models: &models,
            aux: &aux,
            base_aux: self.base_aux.as_deref(),
            tensor_stats,
        };
        f(&chunk)
    }
}

/// The chunk ranges of a tensor of `numel` elements: one range when the method
/// is not chunkable or `chunk_len` covers it.
pub fn chunk_ranges(method: &dyn MergeMethod, numel: usize, chunk_len: usize) -> Vec<Range<usize>> {
    let step = if method.chunkable() {
        chunk_len.max(1)
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
/// order. Generic over the caller's error type so the engine can report I/O
/// failures from `fetch` and `sink`.
pub fn merge_tensor<E: From<MethodError>>(
    method: &dyn MergeMethod,
    tensor: &TensorContext<'_>,
    chunk_len: usize,
    mut fetch: impl FnMut(Range<usize>) -> Result<ChunkData, E>,
    mut sink: impl FnMut(usize, &[f32]) -> Result<(), E>,
) -> Result<(), E> {
    let ranges = chunk_ranges(method, tensor.numel(), chunk_len);
    let single = ranges.len() == 1;
    let mut cached: Option<ChunkData> = None;
    let stats = match method.tensor_pass(tensor) {
        None => None,
        Some(mut pass) => {
            for sweep in 0..pass.sweeps() {
                for r in &ranges {
                    let data = match cached.take() {
                        Some(d) if single => d,
                        _ => fetch(r.clone())?,
                    };
                    data.with_chunk(tensor, r.start, None, |c| pass.observe(sweep, c))?;
                    if single {
                        cached = Some(data);
                    }
                }
                pass.end_sweep(sweep)?;
            }
            Some(pass.finish()?)
        }
    };
    let mut out = Vec::new();
    for r in &ranges {
        let data = match cached.take() {
            Some(d) => d,
            None => fetch(r.clone())?,
        };
        out.clear();
        out.resize(r.len(), 0.0);
        data.with_chunk(tensor, r.start, stats.as_ref(), |c| {
            method.merge(c, &mut out)
        })?;
        sink(r.start, &out)?;
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
        let slice = |v: &ParamVector, r: &Range<usize>| v.values().map(|s| s[r.clone()].to_vec());
        let fetch_range = |r: Range<usize>| -> Result<ChunkData, MethodError> {
            Ok(ChunkData {
                base: base.map(|b| slice(b, &r)).transpose()?,
                models: models
                    .iter()
                    .map(|m| slice(m, &r))
                    .collect::<Result<_, _>>()?,
                aux: aux
                    .iter()
                    .map(|a| a.map(|a| slice(a, &r)).transpose())
                    .collect::<Result<_, _>>()?,
                base_aux: base_aux.map(|b| slice(b, &r)).transpose()?,
            })
        };

        // Whole-model pass.
        let model_stats = match self.method.model_pass(&self.global, &self.models) {
            None => None,
            Some(mut pass) => {
                for sweep in 0..pass.sweeps() {
                    for (t, r) in layout.float_tensors() {
                        let ctx = self.context(&t.name, &t.shape, None);
                        for cr in chunk_ranges(self.method, r.len(), self.chunk_len) {
                            let data = fetch_range(r.start + cr.start..r.start + cr.end)?;
                            data.with_chunk(&ctx, cr.start, None, |c| pass.observe(sweep, c))?;
                        }
                    }
                    pass.end_sweep(sweep)?;
                }
                Some(pass.finish()?)
            }
        };

        let mut out = ParamVector::zeros(layout.clone());
        let values = out.values_mut()?;
        for (t, r) in layout.float_tensors() {
            let ctx = self.context(&t.name, &t.shape, model_stats.as_ref());
            let dest = &mut values[r.clone()];
            merge_tensor::<MethodError>(
                self.method,
                &ctx,
                self.chunk_len,
                |cr| fetch_range(r.start + cr.start..r.start + cr.end),
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
