//! The [`MergeMethod`] trait and what the engine hands to it.

use std::any::Any;
use std::cell::{RefCell, RefMut};
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;

use crate::{MethodError, ParamSpec, Params};

/// How a method uses the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    /// The method needs a base (task-vector methods).
    Required,
    /// The method uses a base if one is given.
    Optional,
    /// The method ignores the base (it only supplies non-float tensors and
    /// config files).
    Unused,
}

/// What a method is, for the registry, `methods show` and `docs/methods.md`.
#[derive(Debug, Clone, Copy)]
pub struct MethodInfo {
    /// Canonical name, mergekit's snake_case (`task_arithmetic`).
    pub name: &'static str,
    /// One-line summary.
    pub summary: &'static str,
    /// The paper, with its arXiv id (`Ilharco et al. 2023, arXiv:2212.04089`).
    pub paper: &'static str,
    /// Use of the base model.
    pub base: BaseModel,
    /// Fewest models (not counting the base) it merges.
    pub min_models: usize,
    /// Most models it merges (`None` for any number).
    pub max_models: Option<usize>,
    /// Declared parameters.
    pub params: &'static [ParamSpec],
}

/// One tensor being merged: its identity, its resolved parameters and the
/// seed. Shared by every chunk of the tensor.
#[derive(Debug, Clone)]
pub struct TensorContext<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Tensor shape.
    pub shape: &'a [usize],
    /// Global parameters, resolved for this tensor.
    pub global: &'a Params,
    /// Each model's parameters, resolved for this tensor (same order as the models).
    pub models: &'a [Params],
    /// The merge's seed.
    pub seed: u64,
    /// Statistics from the method's whole-model pass, if it asked for one.
    pub model_stats: Option<&'a Stats>,
}

impl TensorContext<'_> {
    /// Number of elements in the whole tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The reproducible random stream of model `model` on this tensor,
    /// positioned at element `offset` (one 32-bit word per element). Draws
    /// depend only on (seed, tensor name, model index, element position), never
    /// on threads, chunking or tensor order.
    pub fn rng(&self, model: usize, offset: usize) -> ChaCha8Rng {
        crate::rng::stream(self.seed, self.name, model, offset)
    }
}

/// A contiguous chunk `[offset, offset + len)` of one tensor's flattened
/// values: the base's, each model's, and each model's auxiliary tensor (for
/// [`ParamKind::ModelRef`](crate::ParamKind::ModelRef) parameters such as
/// Fisher files).
#[derive(Debug, Clone)]
pub struct Chunk<'a> {
    /// The tensor this chunk belongs to.
    pub tensor: &'a TensorContext<'a>,
    /// Element offset of the chunk within the tensor.
    pub offset: usize,
    /// The base model's values, if there is a base.
    pub base: Option<&'a [f32]>,
    /// Each model's values.
    pub models: &'a [&'a [f32]],
    /// Each model's auxiliary values (`None` where that model has none for this tensor).
    pub aux: &'a [Option<&'a [f32]>],
    /// The base's auxiliary values.
    pub base_aux: Option<&'a [f32]>,
    /// Statistics from the method's per-tensor pass, if it asked for one.
    pub tensor_stats: Option<&'a Stats>,
    /// Working memory the method may borrow while it merges this chunk.
    pub scratch: &'a Scratch,
}

/// Working memory a method may borrow in [`MergeMethod::merge`], kept by
/// whoever runs the merge and reused from tensor to tensor: the engine keeps
/// one per worker thread for the whole merge (dropped with it), so a method
/// that needs a large buffer of its own, such as an `f64` copy of a whole
/// tensor, allocates it (and the kernel zeroes its pages) once per merge
/// instead of once per tensor.
///
/// ```
/// use tensormerge_methods::Scratch;
/// let scratch = Scratch::default();
/// {
///     let mut v = scratch.f64s(3);
///     v[1] = 2.0;
/// }
/// assert_eq!(&*scratch.f64s(2), &[0.0, 0.0]);
/// ```
#[derive(Debug, Default)]
pub struct Scratch {
    f64s: RefCell<Vec<f64>>,
}

impl Scratch {
    /// `len` zeros, borrowed until the guard is dropped.
    ///
    /// # Panics
    /// When the buffer is borrowed already (a second call while the first
    /// guard lives).
    pub fn f64s(&self, len: usize) -> RefMut<'_, [f64]> {
        let mut v = self.f64s.borrow_mut();
        v.clear();
        v.resize(len, 0.0);
        RefMut::map(v, |v| &mut v[..])
    }
}

impl<'a> Chunk<'a> {
    /// The base and the one model of a method that merges between two
    /// endpoints (SLERP, NearSwap): an error naming `method` when there is
    /// no base ([`MethodError::NeedsBase`]) or not exactly one model
    /// ([`MethodError::ModelCount`]).
    pub fn base_and_one_model(&self, method: &str) -> Result<(&'a [f32], &'a [f32]), MethodError> {
        let base = self.base.ok_or_else(|| MethodError::NeedsBase {
            method: method.into(),
        })?;
        let [x] = self.models else {
            return Err(MethodError::ModelCount {
                method: method.into(),
                expected: "exactly 1 besides the base".into(),
                got: self.models.len(),
            });
        };
        Ok((base, x))
    }

    /// Number of elements in this chunk.
    pub fn len(&self) -> usize {
        self.models
            .first()
            .map(|m| m.len())
            .or(self.base.map(|b| b.len()))
            .unwrap_or(0)
    }

    /// Whether the chunk is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this chunk is the whole tensor.
    pub fn is_whole(&self) -> bool {
        self.offset == 0 && self.len() == self.tensor.numel()
    }
}

/// Statistics gathered by a [`StatsPass`], read back by the method with
/// `downcast_ref`.
pub type Stats = Arc<dyn Any + Send + Sync>;

/// A streaming pass over data before merging: over every chunk of one tensor
/// (per-tensor pass) or over every chunk of every tensor (whole-model pass).
///
/// The engine calls `observe` for each chunk, in order, `sweeps()` times
/// (`end_sweep` after each), then `finish`. A pass needing an exact top-k over
/// data larger than memory uses two sweeps (a coarse histogram, then a refined
/// one). Memory is the pass's own business and must not grow with model size.
pub trait StatsPass: Send {
    /// How many sweeps over the data.
    fn sweeps(&self) -> usize {
        1
    }

    /// Sees one chunk during sweep `sweep` (0-based).
    fn observe(&mut self, sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError>;

    /// Called after each sweep.
    fn end_sweep(&mut self, _sweep: usize) -> Result<(), MethodError> {
        Ok(())
    }

    /// Whether the coming sweep needs to see `tensor` at all (asked before
    /// each tensor of a whole-model pass): the driver skips, and does not
    /// read, the tensors a pass says it does not need. Only return `false`
    /// when observing the tensor would change nothing. Default: `true`.
    fn needs(&self, _tensor: &TensorContext<'_>) -> bool {
        true
    }

    /// Whether the statistics are complete before [`sweeps`](Self::sweeps)
    /// sweeps have run (asked after each [`end_sweep`](Self::end_sweep)):
    /// the driver then skips the remaining sweeps, and with them the reads
    /// of the data they would have seen. Only return `true` when the
    /// remaining sweeps would change nothing. Default: `false`.
    fn done(&self) -> bool {
        false
    }

    /// The gathered statistics.
    fn finish(self: Box<Self>) -> Result<Stats, MethodError>;
}

/// A merge method: merges one tensor (or one chunk of it) at a time.
///
/// Implementations are stateless (`&self`), `Send + Sync`, and deterministic:
/// the output may depend only on the chunk's data, the resolved parameters,
/// the stats, and randomness drawn from [`TensorContext::rng`]. Register an
/// implementation with [`register_method!`](crate::register_method).
pub trait MergeMethod: Send + Sync + 'static {
    /// Name, summary, paper, parameters.
    fn info(&self) -> &'static MethodInfo;

    /// Whether a tensor may be split into chunks merged independently (with
    /// per-tensor stats shared between them). `true` for element-wise methods;
    /// a method that needs the whole tensor at once says `false` and always
    /// receives it whole (memory: the largest tensor, several times). No
    /// built-in method does: tensor-wide quantities (SLERP's norms, DARE's L1
    /// norms) come from a per-tensor pass, whole rows from
    /// [`chunk_multiple`](Self::chunk_multiple).
    fn chunkable(&self) -> bool {
        true
    }

    /// For a chunkable method, the number of elements every chunk of a
    /// tensor of `shape` holds a multiple of (the last chunk of a tensor
    /// excepted). Default 1. A method that works on whole rows returns the
    /// row length (`shape.last()`), so that it is chunkable without seeing a
    /// row cut in two (DELLA ranks magnitudes within each row).
    fn chunk_multiple(&self, _shape: &[usize]) -> usize {
        1
    }

    /// A pass over the whole model before merging (global top-k, global Fisher
    /// norms), or `None`. `models` holds each model's global-scope view of the
    /// parameters.
    fn model_pass(&self, _global: &Params, _models: &[Params]) -> Option<Box<dyn StatsPass>> {
        None
    }

    /// A pass over one tensor's chunks before merging it (exact top-k
    /// thresholds, L1 norms), or `None`.
    fn tensor_pass(&self, _tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        None
    }

    /// Warnings about merging `tensor` as configured: problems that are
    /// reported but do not stop the merge (a model without an auxiliary
    /// tensor such as a Fisher for it, a density that keeps nothing).
    /// `has_aux[i]` tells whether model `i` has an auxiliary tensor for this
    /// tensor. The engine calls it once per tensor, before merging it.
    fn tensor_warnings(&self, _tensor: &TensorContext<'_>, _has_aux: &[bool]) -> Vec<String> {
        Vec::new()
    }

    /// Warnings about the configuration as a whole (a trimming method that
    /// trims nothing). The engine calls it once per merge.
    fn config_warnings(&self, _global: &Params, _models: &[Params]) -> Vec<String> {
        Vec::new()
    }

    /// Merges one chunk into `out` (`chunk.len()` values).
    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError>;
}
