//! Shared building blocks of the task-vector family of methods (TIES, DARE,
//! and later breadcrumbs, DELLA, SCE, magnitude pruning).
//!
//! Everything here is deterministic and chunk-invariant, so a method built on
//! it gives bit-identical results whether a tensor is merged whole or in
//! chunks, on any number of threads, in any tensor order:
//!
//! - [`ExactSum`]: an exact (fixed-point) accumulator of `f64` values. Sums of
//!   squares and L1 norms do not depend on the order of addition or on where
//!   chunks were cut.
//! - [`TopK`]: exact streaming selection of the `k` largest magnitudes by a
//!   guess from a sample checked in one sweep, or else a histogram over
//!   `f32` bit patterns refined in a second sweep (no sorting; memory below
//!   the input's size), with ties at the threshold broken
//!   by the lowest position. Its result, a [`Selection`], is applied chunk by
//!   chunk. [`ChunkTopK`] runs several of them from a per-tensor pass
//!   (breadcrumbs, magnitude pruning, SCE).
//! - [`Combine`]: the final combination of (sparsified) task vectors: the
//!   linear sum of task arithmetic or the sign election and disjoint merge of
//!   TIES ([`Consensus`]).
//! - [`combine_trimmed`], [`combine_masked`]: TIES' trim and DARE's masked
//!   drop fused with the combination, four elements at a time in AVX2
//!   registers (bit-identical to [`combine_blocks`] with the same fill).
//! - [`dare_keep`]: DARE's random drop decision, drawn from the reproducible
//!   stream of [`TensorContext::rng`](crate::TensorContext::rng).
//! - [`RankOrder`]: the magnitude ranks within a row (DELLA), by a stable
//!   radix sort.
//! - [`weights`], [`weight_sum`]: per-model weights of a tensor.
//!
//! ```
//! use tensormerge_methods::ops::{magnitude_key, Selection, TopK};
//!
//! // Keep the 2 largest magnitudes of [3, -5, 3, 1]: -5 and the first 3 (ties
//! // at the threshold go to the lowest index).
//! let values = [3.0f32, -5.0, 3.0, 1.0];
//! let keys: Vec<u32> = values.iter().map(|&v| magnitude_key(v)).collect();
//! let mut top = TopK::new(4, 2, true);
//! for sweep in 0..TopK::SWEEPS_ONE_SEGMENT {
//!     top.observe("", 0, &keys);
//!     top.end_sweep(sweep);
//! }
//! let sel = top.selection().unwrap();
//! let kept: Vec<bool> = (0..4).map(|i| sel.keeps("", i as u64, keys[i])).collect();
//! assert_eq!(kept, [true, true, false, false]);
//! ```

/// Number of elements processed at a time by block-wise kernels.
pub const BLOCK: usize = 1024;

mod chunk_topk;
mod combine;
mod dare;
mod fused;
mod rank;
mod sum;
mod topk;
mod weights;

pub use chunk_topk::*;
pub use combine::*;
pub use dare::*;
pub use fused::*;
pub use rank::*;
pub use sum::*;
pub use topk::*;
pub use weights::*;

/// Hints the CPU to load the cache lines of positions `from..from + len`
/// of `base` and of each model `models[i]` for which `wanted(i)`: a
/// statistics pass fetching the block it will read next while it computes
/// this one (the hardware prefetcher alone left TIES' and DARE's passes
/// waiting for memory).
#[inline(always)]
pub fn prefetch_block(
    base: &[f32],
    models: &[&[f32]],
    from: usize,
    len: usize,
    wanted: impl Fn(usize) -> bool,
) {
    for at in (from..(from + len).min(base.len())).step_by(16) {
        prefetch(base, at);
        for (i, x) in models.iter().enumerate() {
            if wanted(i) {
                prefetch(x, at);
            }
        }
    }
}

/// Hints the CPU to load the cache line holding `data[at]` (no effect past
/// the end of `data`, or off x86-64).
#[inline(always)]
pub fn prefetch<T>(data: &[T], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = data.get(at) {
        // SAFETY: a prefetch never faults, and `p` is in bounds anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (p as *const T).cast(),
            )
        };
    }
}
