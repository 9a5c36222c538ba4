//! [`ChunkTopK`]: several exact top-k selections over one tensor, fed chunk
//! by chunk from a per-tensor [`StatsPass`](crate::StatsPass), so that a
//! method needing a whole-tensor rank (breadcrumbs' window, magnitude
//! pruning, SCE's variance selection) merges in chunks like TIES instead of
//! loading whole tensors.

use super::{BLOCK, Selection, TopK};

/// Several [`TopK`] selections of one tensor's entries, each ranking the
/// keys of one *source* (several selections may rank the same keys, as
/// breadcrumbs' outer and inner windows do: the keys are then computed once
/// per block).
///
/// The pass calls [`observe`](Self::observe) for each chunk in order and
/// [`end_sweep`](Self::end_sweep) after each sweep, for at most
/// [`TopK::SWEEPS_ONE_SEGMENT`] sweeps, until [`is_done`](Self::is_done).
/// On sweep 0 the first chunk also gives each selection a guess of its
/// threshold (evenly spaced runs of 16 keys), so that the first sweep usually
/// settles it; the selections never depend on the guess.
///
/// ```
/// use tensormerge_methods::ops::{ChunkTopK, TopK, magnitude_key};
///
/// let v = [3.0f32, -5.0, 3.0, 1.0, 0.5, -4.0];
/// // Source 0 ranks |v|: the 2 largest and the 4 largest of its 6 keys.
/// let mut top = ChunkTopK::new(vec![TopK::new(6, 2, true), TopK::new(6, 4, true)], vec![0, 0]);
/// for sweep in 0..TopK::SWEEPS_ONE_SEGMENT {
///     for (offset, chunk) in [(0, &v[..4]), (4, &v[4..])] {
///         top.observe(sweep, offset, chunk.len(), |_src, start, keys| {
///             for (k, x) in keys.iter_mut().zip(&chunk[start..]) {
///                 *k = magnitude_key(*x);
///             }
///         });
///     }
///     top.end_sweep(sweep).unwrap();
///     if top.is_done() {
///         break;
///     }
/// }
/// let s = top.selections().unwrap();
/// let kept = |sel: usize| (0..6).filter(|&i| s[sel].keeps("", i as u64, magnitude_key(v[i]))).count();
/// assert_eq!((kept(0), kept(1)), (2, 4));
/// ```
#[derive(Debug, Clone)]
pub struct ChunkTopK {
    selectors: Vec<TopK>,
    source: Vec<usize>,
    sources: usize,
    keys: Vec<u32>,
}

impl ChunkTopK {
    /// Selection `s` is `selectors[s]`, ranking the keys of source
    /// `source[s]` (sources are numbered `0..`).
    pub fn new(selectors: Vec<TopK>, source: Vec<usize>) -> ChunkTopK {
        assert_eq!(selectors.len(), source.len(), "one source per selector");
        let sources = source.iter().map(|s| s + 1).max().unwrap_or(0);
        ChunkTopK {
            selectors,
            source,
            sources,
            keys: vec![0; BLOCK],
        }
    }

    /// Whether every selection is known.
    pub fn is_done(&self) -> bool {
        self.selectors.iter().all(TopK::is_done)
    }

    /// Every selection, once [`is_done`](Self::is_done).
    pub fn selections(&self) -> Option<Vec<Selection>> {
        self.selectors
            .iter()
            .map(|s| s.selection().cloned())
            .collect()
    }

    /// Feeds one chunk of `len` entries at element `offset` of the tensor
    /// during `sweep`: `keys(source, start, out)` writes the keys of `source`
    /// for the chunk's entries `start..start + out.len()`.
    pub fn observe(
        &mut self,
        sweep: usize,
        offset: usize,
        len: usize,
        mut keys: impl FnMut(usize, usize, &mut [u32]),
    ) {
        if sweep == 0 && offset == 0 {
            self.guess(len, &mut keys);
        }
        for start in (0..len).step_by(BLOCK) {
            let end = (start + BLOCK).min(len);
            for src in 0..self.sources {
                let users = || {
                    self.source
                        .iter()
                        .zip(&self.selectors)
                        .filter(move |(s, sel)| **s == src && !sel.is_done())
                };
                if users().next().is_none() {
                    continue;
                }
                let block = &mut self.keys[..end - start];
                keys(src, start, block);
                for (s, sel) in self.selectors.iter_mut().enumerate() {
                    if self.source[s] == src && !sel.is_done() {
                        sel.observe("", (offset + start) as u64, block);
                    }
                }
            }
        }
    }

    /// A guess of every threshold from evenly spaced runs of 16 keys of the
    /// first chunk.
    fn guess(&mut self, len: usize, keys: &mut impl FnMut(usize, usize, &mut [u32])) {
        const RUN: usize = 16;
        let runs = TopK::SAMPLE / RUN;
        let stride = (len / runs).max(RUN) / RUN * RUN;
        let mut sample = Vec::with_capacity(TopK::SAMPLE);
        let mut run = [0u32; RUN];
        let mut copy = Vec::with_capacity(TopK::SAMPLE);
        for src in 0..self.sources {
            sample.clear();
            for at in (0..len).step_by(stride.max(1)).take(runs) {
                let n = RUN.min(len - at);
                keys(src, at, &mut run[..n]);
                sample.extend_from_slice(&run[..n]);
            }
            for (s, sel) in self.selectors.iter_mut().enumerate() {
                if self.source[s] == src && !sel.is_done() {
                    copy.clear();
                    copy.extend_from_slice(&sample);
                    sel.guess(&mut copy);
                }
            }
        }
    }

    /// Ends `sweep` for every selection still open. The error is a message
    /// for [`MethodError::Invalid`](crate::MethodError::Invalid).
    pub fn end_sweep(&mut self, sweep: usize) -> Result<(), String> {
        for sel in self.selectors.iter_mut().filter(|s| !s.is_done()) {
            sel.end_sweep(sweep)?;
        }
        Ok(())
    }
}
