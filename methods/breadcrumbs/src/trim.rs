//! Magnitude trimming of task vectors by rank: skip the `skip` largest
//! `|τ|`, keep the next `keep`, zero the rest; optional L1 rescaling. Shared
//! by `breadcrumbs`, `breadcrumbs_ties` and `magnitude_prune`.
//!
//! The ranking is the exact, tie-broken order of
//! [`ops::TopK`] (larger magnitude first,
//! equal magnitudes by lower index), run in memory over the whole tensor
//! block by block, so no `n`-sized buffer is allocated.

use std::sync::Arc;

use tensormerge_methods::ops::{
    self, ChunkTopK, Combine, ExactSum, Rule, Selection, TopK, magnitude_key,
};
use tensormerge_methods::{Chunk, MethodError, Stats, StatsPass, TensorContext};

/// Norms below this are not rescaled (mergekit's `eps` in
/// `rescaled_masked_tensor`).
pub const RESCALE_EPS: f64 = 1e-7;

/// The rank window kept of `n` entries: `(skip, keep)`: the `skip` largest
/// magnitudes are dropped as outliers, the next `keep` are kept
/// (Davari & Belilovsky 2023, arXiv:2312.06795, §3: mask the top `β` and the
/// bottom of the distribution). With `density ≥ 1` everything is kept (as in
/// mergekit, `gamma` is then ignored); `keep = floor(density · n)` and
/// `skip = min(floor(gamma · n), n − keep)` (mergekit shrinks the outlier
/// count so the target density is reached).
pub fn rank_window(n: u64, density: f64, gamma: f64) -> (u64, u64) {
    if density >= 1.0 {
        return (0, n);
    }
    let keep = ops::keep_count(density, n);
    let skip = ops::keep_count(gamma, n).min(n - keep);
    (skip, keep)
}

/// One model's trim of one tensor.
#[derive(Debug, Clone)]
pub struct Trim {
    outer: Selection,
    inner: Selection,
    scale: f64,
}

impl Trim {
    /// Whether entry `index` with key `key` ([`magnitude_key`] of `τ`) is kept.
    #[inline]
    pub fn keeps(&self, index: u64, key: u32) -> bool {
        self.outer.keeps("", index, key) && !self.inner.keeps("", index, key)
    }

    /// The rescaling factor applied to the kept entries (1 without rescaling).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// [`keeps`](Self::keeps) as two integer comparisons each (the
    /// [`Selection::for_segment`] form), for the per-entry loops.
    fn fast(&self) -> FastTrim {
        let limits = |s: &Selection| {
            let (threshold, ties) = s.for_segment("");
            // No tie kept: -1, below every index.
            (
                threshold,
                ties.map_or(-1, |l| l.min(i64::MAX as u64) as i64),
            )
        };
        FastTrim {
            outer: limits(&self.outer),
            inner: limits(&self.inner),
        }
    }
}

/// [`Trim::fast`].
#[derive(Clone, Copy)]
struct FastTrim {
    outer: (u32, i64),
    inner: (u32, i64),
}

impl FastTrim {
    /// Without short-circuits, so that the loops using it vectorise.
    #[inline(always)]
    fn keeps(&self, index: i64, key: u32) -> bool {
        let sel = |(t, l): (u32, i64)| (key > t) | ((key == t) & (index <= l));
        sel(self.outer) & !sel(self.inner)
    }
}

/// The per-tensor pass of a trimming method: each model's rank window
/// (`windows[i]`) as two [`TopK`] selections of `|x_i − b|` (the `skip +
/// keep` largest and the `skip` largest), run chunk by chunk by a
/// [`ChunkTopK`]; with `rescale`, the L1 norm of each task vector is summed
/// exactly on the first sweep and that of its kept entries on one more sweep
/// once the windows are known. `None` when no window needs ranking (every
/// model keeps all or nothing).
pub fn pass(
    method: &'static str,
    t: &TensorContext<'_>,
    windows: &[(u64, u64)],
    rescale: bool,
) -> Option<Box<dyn StatsPass>> {
    let n = t.numel() as u64;
    let mut selectors = Vec::with_capacity(2 * windows.len());
    let mut source = Vec::with_capacity(2 * windows.len());
    for (i, &(skip, keep)) in windows.iter().enumerate() {
        selectors.push(TopK::new(n, skip + keep, true));
        selectors.push(TopK::new(n, skip, true));
        source.extend([i, i]);
    }
    let topk = ChunkTopK::new(selectors, source);
    if topk.is_done() {
        return None;
    }
    let m = windows.len();
    Some(Box::new(TrimPass {
        method,
        topk,
        rescale,
        trims: None,
        summed: false,
        before: (0..m).map(|_| ExactSum::new()).collect(),
        after: (0..m).map(|_| ExactSum::new()).collect(),
    }))
}

/// See [`pass`].
struct TrimPass {
    method: &'static str,
    topk: ChunkTopK,
    rescale: bool,
    /// Known once the selections are (scale 1 until the sums are).
    trims: Option<Vec<Trim>>,
    summed: bool,
    before: Vec<ExactSum>,
    after: Vec<ExactSum>,
}

impl StatsPass for TrimPass {
    fn sweeps(&self) -> usize {
        TopK::SWEEPS_ONE_SEGMENT + self.rescale as usize
    }

    fn done(&self) -> bool {
        self.trims.is_some() && (self.summed || !self.rescale)
    }

    fn observe(&mut self, sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: self.method.into(),
        })?;
        let models = chunk.models;
        match &self.trims {
            None => {
                self.topk
                    .observe(sweep, chunk.offset, base.len(), |i, start, keys| {
                        let (x, b) = (&models[i][start..], &base[start..]);
                        for ((k, x), b) in keys.iter_mut().zip(x).zip(b) {
                            *k = magnitude_key(x - b);
                        }
                    });
                if self.rescale && sweep == 0 {
                    for (x, before) in models.iter().zip(&mut self.before) {
                        for (x, b) in x.iter().zip(base) {
                            before.add((*x as f64 - *b as f64).abs());
                        }
                    }
                }
            }
            Some(_) if self.summed => {} // every sweep done: nothing left to see
            Some(trims) => {
                for ((x, tr), after) in models.iter().zip(trims).zip(&mut self.after) {
                    let tr = tr.fast();
                    for (e, (x, b)) in x.iter().zip(base).enumerate() {
                        if tr.keeps((chunk.offset + e) as i64, magnitude_key(x - b)) {
                            after.add((*x as f64 - *b as f64).abs());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn end_sweep(&mut self, sweep: usize) -> Result<(), MethodError> {
        if self.trims.is_some() {
            self.summed = true;
            return Ok(());
        }
        let invalid = |message: String| MethodError::Invalid {
            method: self.method.into(),
            tensor: "<tensor>".into(),
            message,
        };
        self.topk.end_sweep(sweep).map_err(invalid)?;
        if let Some(sel) = self.topk.selections() {
            self.trims = Some(
                sel.chunks(2)
                    .map(|w| Trim {
                        outer: w[0].clone(),
                        inner: w[1].clone(),
                        scale: 1.0,
                    })
                    .collect(),
            );
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        let mut trims = self.trims.ok_or_else(|| MethodError::Invalid {
            method: self.method.into(),
            tensor: "<tensor>".into(),
            message: "top-k selection did not finish".into(),
        })?;
        if self.rescale {
            for ((t, b), a) in trims.iter_mut().zip(&self.before).zip(&self.after) {
                let (before, after) = (b.value(), a.value());
                if before >= RESCALE_EPS && after >= RESCALE_EPS {
                    t.scale = before / after;
                }
            }
        }
        Ok(Arc::new(trims))
    }
}

/// The trims of a tensor that needs no pass (every window keeps all or
/// nothing: no rank is needed, and the L1 norm of what is kept is unchanged).
fn trivial_trims(n: u64, windows: &[(u64, u64)]) -> Option<Vec<Trim>> {
    windows
        .iter()
        .map(|&(skip, keep)| {
            Some(Trim {
                outer: TopK::new(n, skip + keep, true).selection()?.clone(),
                inner: TopK::new(n, skip, true).selection()?.clone(),
                scale: 1.0,
            })
        })
        .collect()
}

/// The task-vector merge of a trimming method on one chunk: each model's
/// `τ_i` trimmed to its rank window (`windows[i]`, from the statistics of
/// [`pass`]), then combined by `combine` (`out = b + λ · merged`).
pub fn merge_trimmed(
    method: &str,
    chunk: &Chunk<'_>,
    windows: &[(u64, u64)],
    combine: &Combine,
    out: &mut [f32],
) -> Result<(), MethodError> {
    let t = chunk.tensor;
    let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
        method: method.into(),
    })?;
    if combine.rule == Rule::Linear {
        combine.check(method, t.name)?;
    }
    let invalid = |message: &str| MethodError::Invalid {
        method: method.into(),
        tensor: t.name.into(),
        message: message.into(),
    };
    let computed;
    let trims: &Vec<Trim> = match chunk.tensor_stats {
        Some(s) => s
            .downcast_ref::<Vec<Trim>>()
            .ok_or_else(|| invalid("statistics of another method were passed in"))?,
        None => {
            computed = trivial_trims(t.numel() as u64, windows)
                .ok_or_else(|| invalid("the per-tensor pass did not run"))?;
            &computed
        }
    };
    let fast: Vec<FastTrim> = trims.iter().map(Trim::fast).collect();
    ops::combine_blocks(combine, Some(base), out, |i, start, buf| {
        let end = start + buf.len();
        let (x, b) = (&chunk.models[i][start..end], &base[start..end]);
        let (tr, scale) = (fast[i], trims[i].scale);
        let at = (chunk.offset + start) as i64;
        for (j, ((d, &x), &b)) in buf.iter_mut().zip(x).zip(b).enumerate() {
            let v = (x as f64 - b as f64) * scale;
            *d = if tr.keeps(at + j as i64, magnitude_key(x - b)) {
                v
            } else {
                0.0
            };
        }
    });
    Ok(())
}
