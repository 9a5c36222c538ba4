//! # tensormerge-method-sce
//!
//! `sce`: the Select–Calculate–Erase merge of FuseChat (Wan et al. 2024,
//! "FuseChat: Knowledge fusion of chat models", arXiv:2408.07990, §3.3).
//! Per tensor, with task vectors `τ_i = x_i − b` of `M` models and `n`
//! entries:
//!
//! ```text
//! Select:    var_e = (1/M) Σ_i (τ_ie − mean_i τ_ie)²;  keep the k = floor(select_topk · #{var_e ≠ 0})
//!            entries of largest variance in every τ_i, zero the rest        (only when select_topk < 1)
//! Calculate: η_i = ‖τ̂_i‖² / n,   w_i = η_i / Σ_j η_j   (1/M when all η are 0)
//! Erase:     s_e = sign(Σ_i τ̂_ie) (+ for 0);  m_ie = [sign(τ̂_ie) = s_e]
//! out_e = b_e + Σ_i w_i m_ie τ̂_ie / Σ_i w_i m_ie      (0 where no model agrees)
//! ```
//!
//! The weights come from the task vectors themselves: `sce` has no per-model
//! parameters.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_sce as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let base = ParamVector::zeros(layout.clone());
//! let a = ParamVector::from_vec(layout.clone(), vec![1.0, 1.0]).unwrap();
//! let b = ParamVector::from_vec(layout.clone(), vec![3.0, -1.0]).unwrap();
//! let m = registry().get("sce").unwrap();
//! let out = Merge::with_defaults(m, 2).unwrap().run(Some(&base), &[&a, &b]).unwrap();
//! // η = (1, 5) → w = (1/6, 5/6); entry 0: both agree → (1/6·1 + 5/6·3) / 1;
//! // entry 1: sum 0 elects +, only `a` agrees → 1.
//! let v = out.values().unwrap();
//! assert!((v[0] - 16.0 / 6.0).abs() < 1e-6 && v[1] == 1.0);
//! ```
//!
//! Differences from mergekit: variances are computed in `f64` and ranked as
//! `f32` with the exact tie-broken top-k of
//! [`ops::TopK`] (equal variances: lower
//! index first) instead of `torch.topk`; `int8_mask` has no effect. Tensors
//! are merged in chunks after a per-tensor pass (count of non-zero
//! variances, the streaming top-k, the energies), so memory does not grow
//! with the tensor. A tensor that arrives in one chunk computes its
//! variance keys once for all of these (4 bytes per entry) instead of once
//! per sweep; the erase-and-merge loop runs block by block over the models
//! (the same additions per entry as a per-entry loop, so the same bits).
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::ops::{self, BLOCK, ChunkTopK, ExactSum, Selection, TopK, magnitude_key};
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Stats,
    StatsPass, TensorContext, register_method,
};

/// The `sce` method.
#[derive(Debug, Clone, Copy)]
pub struct Sce;

static PARAMS: &[ParamSpec] = &[
    ParamSpec::global(
        "select_topk",
        ParamKind::Float { min: 0.0, max: 1.0 },
        Default::Float(1.0),
        "share of the entries with non-zero variance across models that are kept (1 keeps all)",
    ),
    ParamSpec::INT8_MASK,
];

static INFO: MethodInfo = MethodInfo {
    name: "sce",
    summary: "keeps the entries where models vary most, weights models by task-vector energy, erases minority signs",
    paper: "Wan et al. 2024 (FuseChat), arXiv:2408.07990",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

/// The variance keys of entries `start..start + keys.len()`: `var_e`
/// (arXiv:2408.07990 §3.3) in `f64`, ranked as the [`magnitude_key`] of its
/// `f32` value. Block by block over the models, so that the loops vectorise
/// (the additions per entry are in model order, as a per-entry loop's).
/// On x86-64 CPUs with AVX2 the same code is compiled for AVX2 and chosen at
/// run time: the same IEEE operations in the same order, so the same keys.
fn var_keys(models: &[&[f32]], base: &[f32], start: usize, keys: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { var_keys_avx2(models, base, start, keys) };
        return;
    }
    var_keys_body(models, base, start, keys)
}

/// [`var_keys`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn var_keys_avx2(models: &[&[f32]], base: &[f32], start: usize, keys: &mut [u32]) {
    var_keys_body(models, base, start, keys)
}

#[inline(always)]
fn var_keys_body(models: &[&[f32]], base: &[f32], start: usize, keys: &mut [u32]) {
    let m = models.len() as f64;
    for (at, keys) in (start..).step_by(BLOCK).zip(keys.chunks_mut(BLOCK)) {
        let n = keys.len();
        let b = &base[at..at + n];
        let (mut mean, mut var) = ([0.0f64; BLOCK], [0.0f64; BLOCK]);
        let (mean, var) = (&mut mean[..n], &mut var[..n]);
        for x in models {
            for ((s, &x), &b) in mean.iter_mut().zip(&x[at..at + n]).zip(b) {
                *s += x as f64 - b as f64;
            }
        }
        mean.iter_mut().for_each(|s| *s /= m);
        for x in models {
            for (((v, &x), &b), &mu) in var.iter_mut().zip(&x[at..at + n]).zip(b).zip(&*mean) {
                let d = (x as f64 - b as f64) - mu;
                *v += d * d;
            }
        }
        for (k, &v) in keys.iter_mut().zip(&*var) {
            *k = magnitude_key((v / m) as f32);
        }
    }
}

/// Erase and merge (arXiv:2408.07990 §3.3) the entries of a chunk at
/// `offset`: `bits` marks the selected entries (`None`: all); unselected
/// entries keep the base. Block by block over the models, so that the loops
/// vectorise: per entry the additions are those of a per-entry loop in
/// model order (an entry whose model disagrees adds `+0.0`, which leaves the
/// sums unchanged: they start at `+0.0` and so are never `−0.0`). On x86-64
/// CPUs with AVX2 the same code is compiled for AVX2 and chosen at run time.
fn erase_merge(
    models: &[&[f32]],
    base: &[f32],
    w: &[f64],
    bits: Option<&[u64]>,
    offset: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { erase_merge_avx2(models, base, w, bits, offset, out) };
        return;
    }
    erase_merge_body(models, base, w, bits, offset, out)
}

/// [`erase_merge`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn erase_merge_avx2(
    models: &[&[f32]],
    base: &[f32],
    w: &[f64],
    bits: Option<&[u64]>,
    offset: usize,
    out: &mut [f32],
) {
    erase_merge_body(models, base, w, bits, offset, out)
}

#[inline(always)]
fn erase_merge_body(
    models: &[&[f32]],
    base: &[f32],
    w: &[f64],
    bits: Option<&[u64]>,
    offset: usize,
    out: &mut [f32],
) {
    for (at, out) in (0..).step_by(BLOCK).zip(out.chunks_mut(BLOCK)) {
        let n = out.len();
        let b = &base[at..at + n];
        let (mut sum, mut num, mut den) = ([0.0f64; BLOCK], [0.0f64; BLOCK], [0.0f64; BLOCK]);
        let (sum, num, den) = (&mut sum[..n], &mut num[..n], &mut den[..n]);
        for x in models {
            for ((s, &x), &b) in sum.iter_mut().zip(&x[at..at + n]).zip(b) {
                *s += x as f64 - b as f64;
            }
        }
        for (x, &wi) in models.iter().zip(w) {
            for ((((num, den), &x), &b), &s) in num
                .iter_mut()
                .zip(den.iter_mut())
                .zip(&x[at..at + n])
                .zip(b)
                .zip(&*sum)
            {
                let d = x as f64 - b as f64;
                let agrees = d != 0.0 && (d > 0.0) == (s >= 0.0);
                *num += if agrees { wi * d } else { 0.0 };
                *den += if agrees { wi } else { 0.0 };
            }
        }
        for (j, (((o, &b), &num), &den)) in out.iter_mut().zip(b).zip(&*num).zip(&*den).enumerate()
        {
            let p = offset + at + j;
            let kept = bits.is_none_or(|bits| (bits[p / 64] >> (p % 64)) & 1 == 1);
            let merged = if den == 0.0 { 0.0 } else { num / den };
            *o = if kept { (b as f64 + merged) as f32 } else { b };
        }
    }
}

/// What the per-tensor pass of `sce` finds: the selection of entries (over
/// the variance keys; `None` keeps every entry) and the model weights `w_i`.
struct Selected {
    /// The selected entries, a bit each (`None`: every entry).
    bits: Option<Vec<u64>>,
    weights: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Counting the non-zero variances (they set `k`).
    Count,
    /// Selecting the `k` largest variances (a [`ChunkTopK`]), from sweep `.0`.
    Select(usize),
    /// Summing `‖τ̂_i‖²` over the selected entries.
    Energy,
    Done,
}

/// The per-tensor pass: a sweep counting the non-zero variances, the exact
/// top-k of the variance keys (usually one sweep), and a sweep summing each
/// model's energy over the selected entries exactly ([`ExactSum`]); the
/// tensor is then merged in chunks.
struct SelectPass {
    topk: f64,
    n: usize,
    phase: Phase,
    nonzero: u64,
    select: Option<ChunkTopK>,
    selection: Option<Selection>,
    energy: Vec<ExactSum>,
    /// The selection as bits, recorded by the energy sweep for the merge.
    bits: Option<Vec<u64>>,
    keys: Box<[u32; BLOCK]>,
    /// The energy sweep's buffers for one block (kept positions, squares).
    block: Box<EnergyBlock>,
    /// A tensor in one chunk: the keys of all its entries, computed once
    /// for every sweep (4 bytes per entry while the tensor is in flight).
    all_keys: Vec<u32>,
}

/// The energy sweep's per-block buffers, reused from block to block (as
/// arrays on the stack they were zeroed for every block: 12 KiB each time).
struct EnergyBlock {
    kept: [u32; BLOCK],
    squares: [f64; BLOCK],
}

impl SelectPass {
    /// The energy sweep over the entries `start..start + keys.len()` of a
    /// chunk at `offset` (`keys`: their variance keys, read only when there
    /// is a selection): records the selected entries as bits and adds their
    /// `τ²` to each model's [`ExactSum`].
    #[allow(clippy::too_many_arguments)]
    fn energy_block(
        selection: Option<&Selection>,
        bits: &mut Option<Vec<u64>>,
        energy: &mut [ExactSum],
        models: &[&[f32]],
        base: &[f32],
        (offset, start): (usize, usize),
        keys: &[u32],
        block: &mut EnergyBlock,
    ) {
        // `Selection::keeps` for one segment: above the threshold, or at it
        // up to the last kept tie.
        let (threshold, ties) = selection.map_or((0, Some(u64::MAX)), |s| s.for_segment(""));
        let (has_ties, last_tie) = (ties.is_some(), ties.unwrap_or(0));
        // The kept entries of the block, then each model's squares of them
        // added in bulk (`ExactSum::add_all`: exact, so the same sum as
        // adding them one by one). The keep test and the bits are computed
        // without branches (`&`, `|` on bools): about a fifth of the
        // entries is kept, at random places, and branches on it were
        // mispredicted.
        let EnergyBlock { kept, squares } = block;
        let keep_of = |j: usize, k: u32| {
            let at = offset + start + j;
            (k > threshold) | ((k == threshold) & has_ties & (at as u64 <= last_tie))
        };
        let mut count = 0;
        match bits {
            Some(bits) => {
                // The bits of one mask word gathered in a register, stored
                // when the word is complete and after the last entry.
                let mut word = 0u64;
                for (j, &k) in keys.iter().enumerate() {
                    let keep = keep_of(j, k);
                    kept[count] = j as u32;
                    count += usize::from(keep);
                    let at = offset + start + j;
                    word |= u64::from(keep) << (at % 64);
                    if at % 64 == 63 || j + 1 == keys.len() {
                        bits[at / 64] |= word;
                        word = 0;
                    }
                }
            }
            None => {
                for (j, &k) in keys.iter().enumerate() {
                    kept[count] = j as u32;
                    count += usize::from(keep_of(j, k));
                }
            }
        }
        let kept = &kept[..count];
        let squares = &mut squares[..count];
        let base = &base[start..start + keys.len()];
        for (x, s) in models.iter().zip(&mut *energy) {
            let x = &x[start..start + keys.len()];
            for (q, &j) in squares.iter_mut().zip(kept) {
                let d = x[j as usize] as f64 - base[j as usize] as f64;
                *q = d * d;
            }
            s.add_all(squares);
        }
    }

    /// The whole pass at once for a tensor that arrives in one chunk: the
    /// variance keys are computed once, and the count, every selection
    /// sweep and the energy sweep run over them. The selection is exact and
    /// the energies are exact sums, so this gives what the sweep-by-sweep
    /// path of a tensor in several chunks gives (the conformance suite
    /// compares the two bit for bit).
    fn whole(&mut self, models: &[&[f32]], base: &[f32]) -> Result<(), MethodError> {
        let mut keys = std::mem::take(&mut self.all_keys);
        keys.clear();
        keys.resize(self.n, 0);
        var_keys(models, base, 0, &mut keys);
        self.nonzero = keys.iter().filter(|&&k| k != 0).count() as u64;
        // The sweeps the engine would otherwise run, numbered as it would.
        let mut sweep = 0;
        self.end_sweep(sweep)?;
        while let Phase::Select(first) = self.phase {
            sweep += 1;
            if sweep > TopK::SWEEPS_ONE_SEGMENT {
                break; // `finish` reports the unfinished selection
            }
            if let Some(top) = &mut self.select {
                top.observe(sweep - first, 0, self.n, |_, start, out| {
                    out.copy_from_slice(&keys[start..start + out.len()])
                });
            }
            self.end_sweep(sweep)?;
        }
        if self.phase == Phase::Energy {
            for start in (0..self.n).step_by(BLOCK) {
                let end = (start + BLOCK).min(self.n);
                let (sel, bits, energy) =
                    (self.selection.as_ref(), &mut self.bits, &mut self.energy);
                Self::energy_block(
                    sel,
                    bits,
                    energy,
                    models,
                    base,
                    (0, start),
                    &keys[start..end],
                    &mut self.block,
                );
            }
            self.phase = Phase::Done;
        }
        self.all_keys = keys;
        Ok(())
    }
}

impl StatsPass for SelectPass {
    fn sweeps(&self) -> usize {
        TopK::SWEEPS_ONE_SEGMENT + 2
    }

    fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn observe(&mut self, sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.into(),
        })?;
        let models = chunk.models;
        if self.phase == Phase::Count && chunk.offset == 0 && base.len() == self.n {
            return self.whole(models, base);
        }
        match self.phase {
            Phase::Count => {
                for start in (0..base.len()).step_by(BLOCK) {
                    let keys = &mut self.keys[..BLOCK.min(base.len() - start)];
                    var_keys(models, base, start, keys);
                    self.nonzero += keys.iter().filter(|&&k| k != 0).count() as u64;
                }
            }
            Phase::Select(first) => {
                if let Some(top) = &mut self.select {
                    top.observe(sweep - first, chunk.offset, base.len(), |_, start, keys| {
                        var_keys(models, base, start, keys)
                    });
                }
            }
            Phase::Energy => {
                for start in (0..base.len()).step_by(BLOCK) {
                    let keys = &mut self.keys[..BLOCK.min(base.len() - start)];
                    if self.selection.is_some() {
                        var_keys(models, base, start, keys);
                    }
                    let (sel, bits, energy) =
                        (self.selection.as_ref(), &mut self.bits, &mut self.energy);
                    Self::energy_block(
                        sel,
                        bits,
                        energy,
                        models,
                        base,
                        (chunk.offset, start),
                        keys,
                        &mut self.block,
                    );
                }
            }
            Phase::Done => {}
        }
        Ok(())
    }

    fn end_sweep(&mut self, sweep: usize) -> Result<(), MethodError> {
        let invalid = |message: String| MethodError::Invalid {
            method: INFO.name.into(),
            tensor: "<tensor>".into(),
            message,
        };
        match self.phase {
            Phase::Count => {
                let k = ops::keep_count(self.topk, self.nonzero);
                let top = ChunkTopK::new(vec![TopK::new(self.n as u64, k, true)], vec![0]);
                self.phase = Phase::Select(sweep + 1);
                self.select = Some(top);
            }
            Phase::Select(first) => {
                if let Some(top) = &mut self.select {
                    top.end_sweep(sweep - first).map_err(invalid)?;
                }
            }
            Phase::Energy => self.phase = Phase::Done,
            Phase::Done => {}
        }
        // A selection known (also before its first sweep, when `k` keeps
        // all or nothing): the energy sweep is next.
        if matches!(self.phase, Phase::Select(_))
            && let Some(sel) = self.select.as_ref().and_then(ChunkTopK::selections)
        {
            self.selection = sel.into_iter().next();
            self.bits = Some(vec![0; self.n.div_ceil(64)]);
            self.phase = Phase::Energy;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        if self.phase != Phase::Done {
            return Err(MethodError::Invalid {
                method: INFO.name.into(),
                tensor: "<tensor>".into(),
                message: "the selection pass did not finish".into(),
            });
        }
        // Calculate: η_i = ‖τ̂_i‖² / n, normalised.
        let m = self.energy.len();
        let eta: Vec<f64> = self
            .energy
            .iter()
            .map(|s| s.value() / self.n.max(1) as f64)
            .collect();
        let total: f64 = eta.iter().sum();
        let weights = if total == 0.0 {
            vec![1.0 / m as f64; m]
        } else {
            eta.iter().map(|e| e / total).collect()
        };
        Ok(Arc::new(Selected {
            bits: self.bits,
            weights,
        }))
    }
}

impl MergeMethod for Sce {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        let topk = tensor.global.f64("select_topk").ok()?;
        Some(Box::new(SelectPass {
            topk,
            n: tensor.numel(),
            // select_topk ≥ 1 keeps every entry: no selection sweeps.
            phase: if topk < 1.0 {
                Phase::Count
            } else {
                Phase::Energy
            },
            nonzero: 0,
            select: None,
            selection: None,
            energy: (0..tensor.models.len()).map(|_| ExactSum::new()).collect(),
            bits: None,
            keys: Box::new([0; BLOCK]),
            block: Box::new(EnergyBlock {
                kept: [0; BLOCK],
                squares: [0.0; BLOCK],
            }),
            all_keys: Vec::new(),
        }))
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor;
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.into(),
        })?;
        let stats = chunk
            .tensor_stats
            .and_then(|s| s.downcast_ref::<Selected>())
            .ok_or_else(|| MethodError::Invalid {
                method: INFO.name.into(),
                tensor: t.name.into(),
                message: "the selection pass did not run".into(),
            })?;
        let bits = stats.bits.as_deref();
        erase_merge(chunk.models, base, &stats.weights, bits, chunk.offset, out);
        Ok(())
    }
}

register_method!(Sce);

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference loops are plain on purpose
mod tests {
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![6, 9], DType::F32),
                TensorInfo::new("b", vec![7], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed * 104729 + 1;
        let v = (0..layout.num_params())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) as f32
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    fn run(topk: f64, base: &ParamVector, ms: &[&ParamVector]) -> ParamVector {
        let m = registry().get("sce").unwrap();
        Merge::new(
            m,
            vec![("select_topk", topk.into())],
            vec![vec![]; ms.len()],
        )
        .unwrap()
        .run(Some(base), ms)
        .unwrap()
    }

    /// Plain reference: sorted variances, explicit masks, f64 loops.
    fn reference(topk: f64, base: &[f32], xs: &[&[f32]]) -> Vec<f64> {
        let (n, m) = (base.len(), xs.len());
        let tau: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| (0..n).map(|e| x[e] as f64 - base[e] as f64).collect())
            .collect();
        let var: Vec<f32> = (0..n)
            .map(|e| {
                let mean: f64 = (0..m).map(|i| tau[i][e]).sum::<f64>() / m as f64;
                ((0..m)
                    .map(|i| (tau[i][e] - mean) * (tau[i][e] - mean))
                    .sum::<f64>()
                    / m as f64) as f32
            })
            .collect();
        let mut mask = vec![true; n];
        if topk < 1.0 {
            let nz = var.iter().filter(|v| **v != 0.0).count();
            let k = (topk * nz as f64).floor() as usize;
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| var[b].partial_cmp(&var[a]).unwrap().then(a.cmp(&b)));
            mask = vec![false; n];
            for &e in &order[..k] {
                mask[e] = true;
            }
        }
        let masked: Vec<Vec<f64>> = tau
            .iter()
            .map(|t| (0..n).map(|e| if mask[e] { t[e] } else { 0.0 }).collect())
            .collect();
        let eta: Vec<f64> = masked
            .iter()
            .map(|t| t.iter().map(|v| v * v).sum::<f64>() / n as f64)
            .collect();
        let s: f64 = eta.iter().sum();
        let w: Vec<f64> = eta
            .iter()
            .map(|e| if s == 0.0 { 1.0 / m as f64 } else { e / s })
            .collect();
        (0..n)
            .map(|e| {
                let sum: f64 = (0..m).map(|i| masked[i][e]).sum();
                let maj = if sum >= 0.0 { 1.0 } else { -1.0 };
                let (mut num, mut den) = (0.0, 0.0);
                for i in 0..m {
                    let v = masked[i][e];
                    let sg = if v > 0.0 {
                        1.0
                    } else if v < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    if sg == maj {
                        num += w[i] * v;
                        den += w[i];
                    }
                }
                base[e] as f64 + if den == 0.0 { 0.0 } else { num / den }
            })
            .collect()
    }

    #[test]
    fn matches_reference() {
        let l = layout();
        let base = random(&l, 1);
        let ms: Vec<ParamVector> = (2..6).map(|k| random(&l, k)).collect();
        let refs: Vec<&ParamVector> = ms.iter().collect();
        for topk in [1.0, 0.5, 0.1, 0.0] {
            for count in [2, 4] {
                let out = run(topk, &base, &refs[..count]);
                for (_, r) in l.float_tensors() {
                    let xs: Vec<&[f32]> = ms[..count]
                        .iter()
                        .map(|m| &m.values().unwrap()[r.clone()])
                        .collect();
                    let want = reference(topk, &base.values().unwrap()[r.clone()], &xs);
                    for (g, w) in out.values().unwrap()[r.clone()].iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-6 * (1.0 + w.abs()),
                            "topk {topk}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn identities() {
        let l = layout();
        let (base, x) = (random(&l, 7), random(&l, 8));
        // Copies of one model come back (all agree, weights equal).
        let out = run(1.0, &base, &[&x, &x, &x]);
        for (o, v) in out.values().unwrap().iter().zip(x.values().unwrap()) {
            assert!((o - v).abs() < 1e-6);
        }
        // Identical models have zero variance: select_topk < 1 keeps nothing.
        assert_eq!(
            run(0.5, &base, &[&x, &x]).values().unwrap(),
            base.values().unwrap()
        );
        // Models equal to the base: the base.
        assert_eq!(
            run(1.0, &base, &[&base, &base]).values().unwrap(),
            base.values().unwrap()
        );
    }

    /// The per-entry loop `erase_merge` replaced, verbatim in its arithmetic.
    fn per_entry(
        models: &[&[f32]],
        base: &[f32],
        w: &[f64],
        bits: Option<&[u64]>,
        offset: usize,
    ) -> Vec<f32> {
        let tau = |i: usize, e: usize| models[i][e] as f64 - base[e] as f64;
        (0..base.len())
            .map(|e| {
                let at = offset + e;
                if bits.is_some_and(|b| (b[at / 64] >> (at % 64)) & 1 == 0) {
                    return base[e];
                }
                let positive = (0..models.len()).map(|i| tau(i, e)).sum::<f64>() >= 0.0;
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for (i, wi) in w.iter().enumerate() {
                    let d = tau(i, e);
                    if d != 0.0 && (d > 0.0) == positive {
                        num += wi * d;
                        den += wi;
                    }
                }
                let merged = if den == 0.0 { 0.0 } else { num / den };
                (base[e] as f64 + merged) as f32
            })
            .collect()
    }

    #[test]
    fn erase_merge_gives_the_bits_of_the_per_entry_loop() {
        let mut s = 99u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s >> 33
        };
        for (len, offset, m) in [
            (1usize, 0usize, 1usize),
            (1000, 3, 2),
            (2500, 64, 3),
            (4097, 70, 4),
        ] {
            let base: Vec<f32> = (0..len)
                .map(|_| (next() % 7) as f32 * 0.25 - 0.75)
                .collect();
            // Values often equal to the base (τ = 0) or to each other.
            let xs: Vec<Vec<f32>> = (0..m)
                .map(|_| {
                    base.iter()
                        .map(|&b| match next() % 4 {
                            0 => b,
                            1 => b + 0.5,
                            2 => b - 0.5,
                            _ => b + (next() % 1000) as f32 * 1e-3 - 0.5,
                        })
                        .collect()
                })
                .collect();
            let models: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
            let w: Vec<f64> = (0..m).map(|i| (i as f64 + 1.0) / 7.0).collect();
            let bits: Vec<u64> = (0..(offset + len).div_ceil(64))
                .map(|_| next() ^ (next() << 31))
                .collect();
            for bits in [None, Some(&bits[..])] {
                let want = per_entry(&models, &base, &w, bits, offset);
                let mut got = vec![f32::NAN; len];
                super::erase_merge(&models, &base, &w, bits, offset, &mut got);
                let b = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    b(&got),
                    b(&want),
                    "len {len}, {m} models, bits {}",
                    bits.is_some()
                );
            }
        }
    }
}
