//! Magnitude trimming of task vectors by rank: skip the `skip` largest
//! `|τ|`, keep the next `keep`, zero the rest; optional L1 rescaling. Shared
//! by `breadcrumbs`, `breadcrumbs_ties` and `magnitude_prune`.
//!
//! The ranking is the exact, tie-broken order of
//! [`ops::TopK`](tensormerge_methods::ops::TopK) (larger magnitude first,
//! equal magnitudes by lower index), run in memory over the whole tensor
//! block by block, so no `n`-sized buffer is allocated.

use tensormerge_methods::ops::{
    self, BLOCK, Combine, ExactSum, Rule, Selection, TopK, magnitude_key,
};
use tensormerge_methods::{Chunk, MethodError};

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
}

/// Runs an in-memory [`TopK`] selecting the `k` largest of `n` keys, block
/// by block: `keys_at(start, keys)` fills the keys of
/// `start..start + keys.len()` (recomputed on each sweep, so no `n`-sized
/// buffer is needed). The error is a message for [`MethodError::Invalid`].
pub fn top_k(n: usize, k: u64, keys_at: &impl Fn(usize, &mut [u32])) -> Result<Selection, String> {
    let mut sel = TopK::new(n as u64, k, true);
    // A guess from evenly spaced runs of 16 keys: the first sweep then
    // usually settles the selection (which never depends on the guess).
    const RUN: usize = 16;
    let runs = TopK::SAMPLE / RUN;
    let stride = (n / runs).max(RUN) / RUN * RUN;
    let mut sample = Vec::with_capacity(TopK::SAMPLE);
    let mut run = [0u32; RUN];
    for at in (0..n).step_by(stride).take(runs) {
        let len = RUN.min(n - at);
        keys_at(at, &mut run[..len]);
        sample.extend_from_slice(&run[..len]);
    }
    sel.guess(&mut sample);
    let mut keys = vec![0u32; BLOCK.min(n)];
    for sweep in 0..TopK::SWEEPS_ONE_SEGMENT {
        if sel.is_done() {
            break;
        }
        for start in (0..n).step_by(BLOCK) {
            let keys = &mut keys[..BLOCK.min(n - start)];
            keys_at(start, keys);
            sel.observe("", start as u64, keys);
        }
        sel.end_sweep(sweep)?;
    }
    sel.selection()
        .cloned()
        .ok_or_else(|| "top-k selection did not finish".to_string())
}

/// Trims model `x` against `base` (whole tensors): keeps ranks
/// `skip..skip + keep` of `|x − b|`; with `rescale`, scales the kept entries
/// so the L1 norm of the task vector is unchanged (mergekit's `rescale`).
pub fn trim(
    method: &str,
    tensor: &str,
    base: &[f32],
    x: &[f32],
    (skip, keep): (u64, u64),
    rescale: bool,
) -> Result<Trim, MethodError> {
    let n = base.len();
    let tau = |start: usize, keys: &mut [u32]| {
        for (j, k) in keys.iter_mut().enumerate() {
            *k = magnitude_key(x[start + j] - base[start + j]);
        }
    };
    let err = |message: String| MethodError::Invalid {
        method: method.into(),
        tensor: tensor.into(),
        message,
    };
    let outer = top_k(n, skip + keep, &tau).map_err(err)?;
    let inner = top_k(n, skip, &tau).map_err(err)?;
    let mut t = Trim {
        outer,
        inner,
        scale: 1.0,
    };
    if rescale {
        let (mut before, mut after) = (ExactSum::new(), ExactSum::new());
        for e in 0..n {
            let d = (x[e] as f64 - base[e] as f64).abs();
            before.add(d);
            if t.keeps(e as u64, magnitude_key(x[e] - base[e])) {
                after.add(d);
            }
        }
        let (before, after) = (before.value(), after.value());
        if before >= RESCALE_EPS && after >= RESCALE_EPS {
            t.scale = before / after;
        }
    }
    Ok(t)
}

/// The whole task-vector merge of a trimming method on one (whole) tensor:
/// each model's `τ_i` trimmed to its rank window (`windows[i]`), then
/// combined by `combine` (`out = b + λ · merged`).
pub fn merge_trimmed(
    method: &str,
    chunk: &Chunk<'_>,
    windows: &[(u64, u64)],
    rescale: bool,
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
    let trims = chunk
        .models
        .iter()
        .zip(windows)
        .map(|(x, w)| trim(method, t.name, base, x, *w, rescale))
        .collect::<Result<Vec<_>, _>>()?;
    ops::combine_blocks(combine, Some(base), out, |i, start, buf| {
        let x = chunk.models[i];
        let tr = &trims[i];
        for (j, d) in buf.iter_mut().enumerate() {
            let e = start + j;
            *d = if tr.keeps(e as u64, magnitude_key(x[e] - base[e])) {
                (x[e] as f64 - base[e] as f64) * tr.scale
            } else {
                0.0
            };
        }
    });
    Ok(())
}
