//! Exact streaming top-k by magnitude: [`TopK`] and its result, a
//! [`Selection`]; [`keep_count`], the number of entries kept at a density.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::BLOCK;

/// The ranking key of a value for magnitude selection: the bit pattern of
/// `|v|` as `f32`. For non-negative floats the bit patterns order exactly as
/// the values do (NaN ranks above infinity).
#[inline]
pub fn magnitude_key(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// Which entries a [`TopK`] keeps, decided per entry from its key and its
/// position `(segment, index)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Nothing is kept (`k = 0`).
    Nothing,
    /// Entries whose key is at least this are kept (`AtLeast(0)`: all).
    AtLeast(u32),
    /// Entries with key above `key` are kept; of the entries with key exactly
    /// `key` (the ties at the threshold), those at positions up to
    /// `(segment, index)` inclusive, in (segment, index) order.
    Ties {
        /// The threshold key.
        key: u32,
        /// Segment of the last kept tie.
        segment: String,
        /// Index of the last kept tie within its segment.
        index: u64,
    },
}

impl Selection {
    /// Whether the entry with `key` at `(segment, index)` is kept.
    #[inline]
    pub fn keeps(&self, segment: &str, index: u64, key: u32) -> bool {
        match self {
            Selection::Nothing => false,
            Selection::AtLeast(t) => key >= *t,
            Selection::Ties {
                key: t,
                segment: s,
                index: i,
            } => match key.cmp(t) {
                Ordering::Greater => true,
                Ordering::Less => false,
                Ordering::Equal => match segment.cmp(s.as_str()) {
                    Ordering::Less => true,
                    Ordering::Greater => false,
                    Ordering::Equal => index <= *i,
                },
            },
        }
    }

    /// A faster per-chunk form of [`keeps`](Self::keeps) for a chunk of one
    /// segment: `(threshold, tie_limit)`: keep iff `key > threshold`, or
    /// `key == threshold` and `index <= tie_limit` (with `tie_limit = None`
    /// meaning "no tie is kept"). For [`Selection::Nothing`] the threshold is
    /// `u32::MAX` with no tie kept... except a key of `u32::MAX` cannot occur
    /// (keys have the sign bit clear).
    pub fn for_segment(&self, segment: &str) -> (u32, Option<u64>) {
        match self {
            Selection::Nothing => (u32::MAX, None),
            Selection::AtLeast(0) => (0, Some(u64::MAX)),
            Selection::AtLeast(t) => (t - 1, None),
            Selection::Ties {
                key,
                segment: s,
                index,
            } => match segment.cmp(s.as_str()) {
                Ordering::Less => (*key, Some(u64::MAX)),
                Ordering::Greater => (*key, None),
                Ordering::Equal => (*key, Some(*index)),
            },
        }
    }
}

#[derive(Debug, Clone)]
enum Stage {
    /// One segment, after a [`guess`](TopK::guess): counting the keys above
    /// `hi` and recording the keys within `lo..=hi` as candidates, except,
    /// with `split`, those equal to `lo`: the sample showed a large tie
    /// there (BF16 differences take few values), so each of them is only a
    /// position bit in [`TopK::bits`].
    Guess {
        lo: u32,
        hi: u32,
        above: u64,
        split: bool,
    },
    /// One segment, after a [`guess`](TopK::guess) whose range holds many
    /// keys of few values (a large tie, as in BF16 weights): counting the
    /// keys above `hi`, and for those within `lo..=hi` setting their
    /// position bit and recording a one-byte code of their value.
    GuessCoded { lo: u32, hi: u32, above: u64 },
    /// Histogram of the high 16 bits of every key.
    High,
    /// Histogram of the low 16 bits of keys whose high bits are `hi`; `need`
    /// of them are to be kept.
    Low { hi: u32, need: u64 },
    /// Counting the ties at `key` per segment; `need` of them are kept.
    TieCount { key: u32, need: u64 },
    /// Finding the index of the `need`-th tie (1-based) within `segment`.
    TiePosition {
        key: u32,
        segment: String,
        need: u64,
        seen: u64,
    },
    /// Finished.
    Done(Selection),
}

/// Exact streaming selection of the `k` largest of `n` keys
/// ([`magnitude_key`]), with ties at the threshold broken by the lowest
/// position (segment name, then index within the segment).
///
/// Feed every key once per sweep with [`observe`](Self::observe), in
/// ascending index order within each segment (segments in any order), and
/// call [`end_sweep`](Self::end_sweep) after each sweep. At most
/// [`SWEEPS_ONE_SEGMENT`](Self::SWEEPS_ONE_SEGMENT) sweeps are needed when all
/// keys belong to one segment (one tensor), at most
/// [`SWEEPS`](Self::SWEEPS) otherwise (a whole model, segments = tensor
/// names, so the result does not depend on the order of tensors in the file).
/// Sweeps after the selection is known cost nothing.
///
/// Sweep 0 counts keys by their high 16 bits and finds the bin holding the
/// k-th largest; sweep 1 counts the keys of that bin by their low 16 bits and
/// finds the exact threshold key `t` and how many ties at `t` are kept. With
/// one segment, sweep 1 also records which positions hold keys of that bin
/// (one bit per position, and the low 16 bits of each such key), so the last
/// kept tie is known at its end; with several segments, sweep 1 also
/// counts each segment's keys of the bin by their low bits (up to 4 096
/// distinct values per segment, else sweep 2 counts the ties per segment),
/// and the next sweep finds the last kept tie, looking only at the segment
/// that holds it ([`needs_segment`](Self::needs_segment)). Memory: two
/// 65 536-bin histograms, plus, with one segment, `n / 8` bytes and 2 bytes
/// per key of the bin (at most `2.2 n` bytes: less than the `f32` input),
/// plus, with several segments, at most 4 096 counts per segment.
///
/// With one segment, a [`guess`](Self::guess) of the threshold from a sample
/// lets sweep 0 count the keys above the guessed range and record those
/// within it instead; when the k-th largest is among them (the usual case),
/// the selection is known after that single sweep, else sweeps 1 and 2 run
/// the histograms above. The keys within the range are recorded with their
/// positions (8 bytes each, at most `max(2²⁰, n / 16)` of them) or, when
/// the sample shows more than that in few distinct values (a large tie, as
/// in BF16 weights, whose differences take few values), as a position bit
/// each plus a one-byte code of the value (`n / 8` bytes plus one per key).
/// When the sample shows a large tie at the bottom of the range (a quarter
/// of the range or more), the keys of that tie are a position bit each
/// (`n / 8` bytes) and only the others are candidates (coded only if those
/// others are still too many): in a BF16 GPT-2 TIES merge 95% of the keys
/// within the ranges were that one value.
#[derive(Debug, Clone)]
pub struct TopK {
    n: u64,
    k: u64,
    one_segment: bool,
    stage: Stage,
    hist: Vec<u64>,
    seen: u64,
    ties: BTreeMap<String, u64>,
    density: Option<f64>,
    /// Four 32-bit partial histograms (large inputs), flushed into `hist`.
    part: Vec<u32>,
    /// Keys counted in `part` since the last flush.
    pending: u64,
    /// [`Stage::Guess`]: the positions (below 2³², see
    /// [`guess`](TopK::guess)) and keys within the guessed range, in index
    /// order (dropped when more than [`TopK::cap`]).
    cands: Vec<(u32, u32)>,
    /// Whether `cands` holds every key within the guessed range.
    cands_ok: bool,
    /// One segment, [`Stage::Low`]: bit `p % 64` of word `p / 64` is set when
    /// the key at position `p` is in the bin.
    bits: Vec<u64>,
    /// One segment, [`Stage::Low`]: the low 16 bits of the keys in the bin,
    /// in index order.
    lows: Vec<u16>,
    /// Several segments, [`Stage::Low`]: per segment, the keys of the bin
    /// counted by their low 16 bits, sorted (dropped, and the
    /// tie-count sweep run instead, when a segment has more than
    /// [`SEGMENT_LOWS`]).
    seg_lows: BTreeMap<String, Vec<(u16, u64)>>,
    /// Whether `seg_lows` holds every key of the bin.
    seg_lows_ok: bool,
    /// [`Stage::GuessCoded`]: the values coded `0..table.len()`, ascending
    /// (from the sample); other values within the range are coded
    /// [`ESCAPE`] and recorded in `cands`.
    table: Vec<u32>,
    /// [`Stage::GuessCoded`]: the code of each key within the range, in
    /// index order (positions in `bits`).
    codes: Vec<u8>,
    /// The name of the one segment.
    segment: String,
}

/// Most distinct low 16 bits counted per segment in [`Stage::Low`] over
/// several segments (heavily tied keys, as in BF16 weights, have few; the
/// counts are kept sorted by low bits).
const SEGMENT_LOWS: usize = 4096;

/// [`Stage::GuessCoded`]'s code for a value not in its table.
const ESCAPE: u8 = u8::MAX;

/// Most candidates recorded after a guess (16 MiB).
const CANDIDATES: usize = 1 << 20;

/// Inputs up to this size use one 64-bit histogram directly.
const SMALL: u64 = 1 << 20;

impl TopK {
    /// Sweeps needed at most when every key is in one segment.
    pub const SWEEPS_ONE_SEGMENT: usize = 3;
    /// Sweeps needed at most with several segments.
    pub const SWEEPS: usize = 4;
    /// Sample size [`guess`](Self::guess) makes good use of.
    pub const SAMPLE: usize = 1 << 16;

    /// Selection of the `floor(density · n)` largest keys
    /// ([`keep_count`]) where `n`, the number of keys, is learnt during the
    /// first sweep (a whole model, whose size the pass is not told).
    pub fn with_density(density: f64, one_segment: bool) -> Self {
        let mut t = TopK::new(u64::MAX, u64::MAX, one_segment);
        t.stage = if density >= 1.0 {
            Stage::Done(Selection::AtLeast(0))
        } else if density <= 0.0 {
            Stage::Done(Selection::Nothing)
        } else {
            Stage::High
        };
        t.density = Some(density);
        t
    }

    /// Selection of the `k` largest of `n` keys. `one_segment` promises that
    /// every key comes with the same segment name.
    pub fn new(n: u64, k: u64, one_segment: bool) -> Self {
        let stage = if k == 0 {
            Stage::Done(Selection::Nothing)
        } else if k >= n {
            Stage::Done(Selection::AtLeast(0))
        } else {
            Stage::High
        };
        TopK {
            n,
            k,
            one_segment,
            stage,
            hist: Vec::new(),
            seen: 0,
            ties: BTreeMap::new(),
            density: None,
            part: Vec::new(),
            pending: 0,
            cands: Vec::new(),
            cands_ok: false,
            bits: Vec::new(),
            lows: Vec::new(),
            table: Vec::new(),
            codes: Vec::new(),
            seg_lows: BTreeMap::new(),
            seg_lows_ok: false,
            segment: String::new(),
        }
    }

    /// Most candidates recorded after a guess: 16 MiB, or one per 16 keys
    /// of a larger input (memory stays below the input's size).
    fn cap(&self) -> usize {
        CANDIDATES.max((self.n / 16).min(usize::MAX as u64) as usize)
    }

    /// Before the first sweep of a one-segment selection of known size: a
    /// sample of the keys (any sample, e.g. evenly spaced positions; it is
    /// reordered) from which to guess where the `k`-th largest key lies, so
    /// that sweep 0 usually settles the selection. The result never depends
    /// on the sample: a wrong guess only costs the sweeps it would have
    /// taken anyway. (Ignored for more than 2³² keys.)
    pub fn guess(&mut self, sample: &mut [u32]) {
        if !self.one_segment
            || self.n > u32::MAX as u64
            || !matches!(self.stage, Stage::High)
            || self.density.is_some()
            || self.seen != 0
            || sample.is_empty()
        {
            return;
        }
        let s = sample.len();
        // Rank (0-based, from the top) of the k-th largest in the sample,
        // and a margin of 5 standard deviations of a random sample's rank.
        let q = self.k as f64 / self.n as f64;
        let r = q * s as f64;
        let margin = 5.0 * (s as f64 * q * (1.0 - q)).sqrt() + 2.0;
        let top = (r - margin).floor();
        let bottom = (r + margin).ceil();
        let mut nth = |i: usize| *sample.select_nth_unstable_by(i, |a, b| b.cmp(a)).1;
        let hi = if top < 0.0 {
            u32::MAX
        } else {
            nth((top as usize).min(s - 1))
        };
        let lo = if bottom >= s as f64 {
            0
        } else {
            nth(bottom as usize)
        };
        let hi = hi.max(lo);
        let inside = sample.iter().filter(|&&k| (lo..=hi).contains(&k)).count();
        // A large tie at the bottom of the range (a quarter of the sample's
        // keys within it or more, as with BF16 task vectors, where 95% of
        // the candidates of a GPT-2 merge were that one value): a position
        // bit each (`n / 8` bytes) instead of an 8-byte candidate, so that
        // recording and selecting the candidates costs far less. The result
        // is the same.
        let at_lo = sample.iter().filter(|&&k| k == lo).count();
        let split = lo < hi && 4 * at_lo >= inside;
        let recorded = if split { inside - at_lo } else { inside };
        // Room for the expected records and a quarter more.
        let expect = |keys: usize| (keys as f64 / s as f64 * self.n as f64 * 1.25) as usize + 1024;
        if recorded as f64 / s as f64 * self.n as f64 > self.cap() as f64 {
            // The sample says the range holds more keys than may be recorded
            // as candidates: a large tie at the threshold, as in BF16
            // weights. With few distinct values there, a position bit and a
            // one-byte code per key record them (n / 8 bytes plus one per
            // key: less than the input); otherwise the guess would miss, so
            // no sweep is spent on it.
            let mut table: Vec<u32> = sample
                .iter()
                .copied()
                .filter(|k| (lo..=hi).contains(k))
                .collect();
            table.sort_unstable();
            table.dedup();
            if table.len() < ESCAPE as usize {
                self.table = table;
                self.bits = vec![0; self.n.div_ceil(64) as usize];
                self.codes = Vec::with_capacity(expect(inside));
                self.cands = Vec::new();
                self.cands_ok = true;
                self.stage = Stage::GuessCoded { lo, hi, above: 0 };
            }
            return;
        }
        if split {
            self.bits = vec![0; self.n.div_ceil(64) as usize];
        }
        self.cands = Vec::with_capacity(expect(recorded).min(self.cap()));
        self.cands_ok = true;
        self.stage = Stage::Guess {
            lo,
            hi,
            above: 0,
            split,
        };
    }

    /// The number of keys kept (known after the first sweep with
    /// [`with_density`](Self::with_density)).
    pub fn k(&self) -> u64 {
        self.k
    }

    /// The number of keys (known after the first sweep with
    /// [`with_density`](Self::with_density)).
    pub fn n(&self) -> u64 {
        self.n
    }

    /// Whether the selection is known (no more sweeps needed).
    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done(_))
    }

    /// Whether the coming sweep needs to see the keys of `segment`: not once
    /// the selection is known, and in the last sweep over several segments
    /// (finding the position of the last kept tie) only the segment that
    /// holds it.
    pub fn needs_segment(&self, segment: &str) -> bool {
        match &self.stage {
            Stage::Done(_) => false,
            Stage::TiePosition { segment: s, .. } => s == segment,
            _ => true,
        }
    }

    /// The selection, once known.
    pub fn selection(&self) -> Option<&Selection> {
        match &self.stage {
            Stage::Done(s) => Some(s),
            _ => None,
        }
    }

    /// [`observe`](Self::observe) of the keys of the differences `x − b`
    /// ([`magnitude_key`]), `x` and `b` of one length (at most
    /// [`BLOCK`](super::BLOCK)), with the same result. In the sweep after a
    /// guess, the usual and often the only one, the keys are computed as
    /// they are compared and never stored; otherwise they are written to
    /// `keys` (scratch, at least `x.len()` long) and observed.
    #[inline(always)]
    pub fn observe_diff(
        &mut self,
        segment: &str,
        offset: u64,
        x: &[f32],
        b: &[f32],
        keys: &mut [u32],
    ) {
        assert!(x.len() == b.len() && x.len() <= BLOCK);
        if let Stage::Guess { lo, hi, split, .. } = self.stage {
            if self.seen == 0 && self.one_segment {
                self.segment = segment.to_string();
            }
            let cap = if self.cands_ok { self.cap() } else { 0 };
            let at_lo = if split {
                Some(&mut self.bits[..])
            } else {
                None
            };
            let (count, ok) = guess_sweep_diff(&mut self.cands, at_lo, cap, offset, x, b, lo, hi);
            if let Stage::Guess { above, .. } = &mut self.stage {
                *above += count;
            }
            if !ok {
                self.cands_ok = false;
                self.cands = Vec::new();
                self.bits = Vec::new();
            }
            self.seen += x.len() as u64;
            return;
        }
        let keys = &mut keys[..x.len()];
        for ((k, &x), &b) in keys.iter_mut().zip(x).zip(b) {
            *k = magnitude_key(x - b);
        }
        self.observe(segment, offset, keys);
    }

    /// Sees the keys of positions `offset..offset + keys.len()` of `segment`.
    /// (Inlined, so that a caller compiled for AVX2 runs it with AVX2.)
    #[inline(always)]
    pub fn observe(&mut self, segment: &str, offset: u64, keys: &[u32]) {
        if self.seen == 0 && self.one_segment && !self.is_done() {
            self.segment = segment.to_string();
        }
        let cap = if self.cands_ok { self.cap() } else { 0 };
        match &mut self.stage {
            Stage::Done(_) => {}
            Stage::Guess {
                lo,
                hi,
                above,
                split,
            } => {
                let (lo, hi) = (*lo, *hi);
                let at_lo = if *split {
                    Some(&mut self.bits[..])
                } else {
                    None
                };
                let (count, ok) = guess_sweep(&mut self.cands, at_lo, cap, offset, keys, lo, hi);
                *above += count;
                if !ok {
                    self.cands_ok = false;
                    self.cands = Vec::new();
                    self.bits = Vec::new();
                }
                self.seen += keys.len() as u64;
            }
            Stage::GuessCoded { lo, hi, above } => {
                let (lo, hi) = (*lo, *hi);
                *above += coded_sweep(
                    &mut self.bits,
                    &mut self.codes,
                    &self.table,
                    &mut self.cands,
                    &mut self.cands_ok,
                    cap,
                    offset,
                    keys,
                    lo,
                    hi,
                );
                self.seen += keys.len() as u64;
            }
            Stage::High => {
                if self.hist.is_empty() {
                    self.hist = vec![0; 1 << 16];
                }
                if self.n <= SMALL {
                    for &key in keys {
                        self.hist[(key >> 16) as usize] += 1;
                    }
                } else {
                    // Four interleaved 32-bit histograms: shorter dependency
                    // chains on popular bins, half the cache footprint.
                    if self.part.is_empty() {
                        self.part = vec![0; 4 << 16];
                    }
                    if self.pending + keys.len() as u64 >= u32::MAX as u64 {
                        self.flush();
                    }
                    self.pending += keys.len() as u64;
                    let (h0, rest) = self.part.split_at_mut(1 << 16);
                    let (h1, rest) = rest.split_at_mut(1 << 16);
                    let (h2, h3) = rest.split_at_mut(1 << 16);
                    let quads = keys.chunks_exact(4);
                    for &key in quads.remainder() {
                        h0[(key >> 16) as usize] += 1;
                    }
                    for q in quads {
                        h0[(q[0] >> 16) as usize] += 1;
                        h1[(q[1] >> 16) as usize] += 1;
                        h2[(q[2] >> 16) as usize] += 1;
                        h3[(q[3] >> 16) as usize] += 1;
                    }
                }
                self.seen += keys.len() as u64;
            }
            Stage::Low { hi, .. } => {
                let hi = *hi;
                let mut seg = if !self.one_segment && self.seg_lows_ok {
                    if !self.seg_lows.contains_key(segment) {
                        self.seg_lows.insert(segment.to_string(), Vec::new());
                    }
                    self.seg_lows.get_mut(segment)
                } else {
                    None
                };
                let mut seg_full = false;
                // Few keys fall in the bin: test 16 at a time without
                // branches (vectorises), count only in groups with a hit.
                for (g, group) in keys.chunks(16).enumerate() {
                    if group.iter().fold(false, |any, &k| any | (k >> 16 == hi)) {
                        for (t, &key) in group.iter().enumerate() {
                            if key >> 16 == hi {
                                self.hist[(key & 0xffff) as usize] += 1;
                                if let Some(lows) = seg.as_deref_mut() {
                                    let low = key as u16;
                                    match lows.binary_search_by_key(&low, |e| e.0) {
                                        Ok(i) => lows[i].1 += 1,
                                        Err(i) if lows.len() < SEGMENT_LOWS => {
                                            lows.insert(i, (low, 1))
                                        }
                                        Err(_) => {
                                            seg_full = true;
                                            seg = None;
                                        }
                                    }
                                }
                                if self.one_segment {
                                    let p = offset + (g * 16 + t) as u64;
                                    let w = (p / 64) as usize;
                                    if w >= self.bits.len() {
                                        self.bits.resize(w + 1, 0);
                                    }
                                    self.bits[w] |= 1 << (p % 64);
                                    self.lows.push(key as u16);
                                }
                            }
                        }
                    }
                }
                if seg_full {
                    // Too many distinct low bits: the tie-count sweep decides.
                    self.seg_lows = BTreeMap::new();
                    self.seg_lows_ok = false;
                }
                self.seen += keys.len() as u64;
            }
            Stage::TieCount { key, .. } => {
                let key = *key;
                let count = self.ties.entry(segment.to_string()).or_insert(0);
                *count += keys.iter().filter(|&&k| k == key).count() as u64;
                self.seen += keys.len() as u64;
            }
            Stage::TiePosition {
                key,
                segment: s,
                need,
                seen,
            } => {
                if segment != s {
                    return;
                }
                for (i, &k) in keys.iter().enumerate() {
                    if k == *key {
                        *seen += 1;
                        if *seen == *need {
                            self.stage = Stage::Done(Selection::Ties {
                                key: *key,
                                segment: segment.to_string(),
                                index: offset + i as u64,
                            });
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Ends a sweep. Errors when the sweep saw a number of keys other than `n`.
    pub fn end_sweep(&mut self, sweep: usize) -> Result<(), String> {
        let seen = std::mem::take(&mut self.seen);
        let check = |seen: u64, n: u64| {
            if seen == n {
                Ok(())
            } else {
                Err(format!(
                    "top-k sweep {sweep} saw {seen} values, expected {n}"
                ))
            }
        };
        self.flush();
        match self.stage.clone() {
            Stage::Done(_) => Ok(()),
            Stage::Guess { above, lo, .. } => {
                check(seen, self.n)?;
                let cands = std::mem::take(&mut self.cands);
                // The keys equal to `lo` not recorded as candidates (split).
                let at_lo: u64 = self.bits.iter().map(|w| w.count_ones() as u64).sum();
                let inside = cands.len() as u64 + at_lo;
                if self.cands_ok && above < self.k && self.k <= above + inside {
                    let need = self.k - above;
                    if need <= cands.len() as u64 {
                        // The threshold is above `lo`: the keys at `lo` are
                        // below it, as if they were candidates.
                        self.finish_from(cands, need);
                    } else {
                        // Every candidate is kept, and `need - c` of the
                        // ties at `lo`, by lowest position.
                        self.finish_at(lo, need - cands.len() as u64, at_lo);
                    }
                } else {
                    // The guess missed: the histograms decide.
                    self.cands_ok = false;
                    self.bits = Vec::new();
                    self.stage = Stage::High;
                }
                Ok(())
            }
            Stage::GuessCoded { above, .. } => {
                check(seen, self.n)?;
                let inside = self.codes.len() as u64;
                let settled = self.cands_ok && above < self.k && self.k <= above + inside && {
                    let need = self.k - above;
                    self.finish_coded(need)
                };
                if !settled {
                    // The guess missed: the histograms decide.
                    self.table = Vec::new();
                    self.codes = Vec::new();
                    self.bits = Vec::new();
                    self.cands = Vec::new();
                    self.cands_ok = false;
                    self.stage = Stage::High;
                }
                Ok(())
            }
            Stage::High => {
                if let Some(d) = self.density {
                    self.n = seen;
                    self.k = keep_count(d, seen);
                    if self.k == 0 {
                        self.finish(Selection::Nothing);
                        return Ok(());
                    } else if self.k >= seen {
                        self.finish(Selection::AtLeast(0));
                        return Ok(());
                    }
                }
                check(seen, self.n)?;
                let (bin, need) = locate(&self.hist, self.k);
                let hi = bin as u32;
                if self.hist[bin] == need {
                    self.finish(Selection::AtLeast(hi << 16));
                } else {
                    if self.one_segment {
                        self.bits = vec![0; self.n.div_ceil(64).min(usize::MAX as u64) as usize];
                        self.lows = Vec::with_capacity(self.hist[bin] as usize);
                    } else {
                        self.seg_lows = BTreeMap::new();
                        self.seg_lows_ok = true;
                    }
                    self.hist.iter_mut().for_each(|c| *c = 0);
                    self.stage = Stage::Low { hi, need };
                }
                Ok(())
            }
            Stage::Low { hi, need } => {
                check(seen, self.n)?;
                let (bin, need) = locate(&self.hist, need);
                let key = (hi << 16) | bin as u32;
                if self.hist[bin] == need {
                    self.finish(Selection::AtLeast(key));
                } else if self.one_segment {
                    // The need-th key of the bin with these low bits, in
                    // index order, is the last kept tie.
                    let ordinal = self
                        .lows
                        .iter()
                        .enumerate()
                        .filter(|&(_, &l)| l as usize == bin)
                        .nth(need as usize - 1)
                        .map(|(j, _)| j as u64)
                        .ok_or_else(|| format!("top-k sweep {sweep}: fewer ties than counted"))?;
                    let index = nth_set_bit(&self.bits, ordinal)
                        .ok_or_else(|| format!("top-k sweep {sweep}: tie position not found"))?;
                    let segment = std::mem::take(&mut self.segment);
                    self.finish(Selection::Ties {
                        key,
                        segment,
                        index,
                    });
                } else if self.seg_lows_ok {
                    // Each segment's ties at the threshold were counted in
                    // this sweep: no tie-count sweep.
                    self.hist = Vec::new();
                    let low = bin as u16;
                    self.ties = std::mem::take(&mut self.seg_lows)
                        .into_iter()
                        .map(|(segment, lows)| {
                            let n = lows.iter().find(|e| e.0 == low).map_or(0, |e| e.1);
                            (segment, n)
                        })
                        .collect();
                    self.seg_lows_ok = false;
                    return self.place_ties(key, need, sweep);
                } else {
                    self.hist = Vec::new();
                    self.stage = Stage::TieCount { key, need };
                }
                Ok(())
            }
            Stage::TieCount { key, need } => {
                check(seen, self.n)?;
                self.place_ties(key, need, sweep)
            }
            Stage::TiePosition { .. } => {
                Err(format!("top-k sweep {sweep}: tie position not found"))
            }
        }
    }

    /// With each segment's count of ties at `key` in `ties`, of which `need`
    /// are kept in segment-name order: the segment of the last kept tie, and
    /// the sweep to find its position unless all its ties are kept.
    fn place_ties(&mut self, key: u32, need: u64, sweep: usize) -> Result<(), String> {
        let mut before = 0u64;
        for (segment, &count) in &self.ties {
            if before + count >= need {
                self.stage = if before + count == need {
                    Stage::Done(Selection::Ties {
                        key,
                        segment: segment.clone(),
                        index: u64::MAX,
                    })
                } else {
                    Stage::TiePosition {
                        key,
                        segment: segment.clone(),
                        need: need - before,
                        seen: 0,
                    }
                };
                self.ties.clear();
                return Ok(());
            }
            before += count;
        }
        Err(format!("top-k sweep {sweep}: fewer ties than counted"))
    }

    /// Finishes from the candidates of a guess (every key within the guessed
    /// range, in index order), `need` of which are kept: those of largest
    /// key, ties at the threshold by lowest position.
    fn finish_from(&mut self, cands: Vec<(u32, u32)>, need: u64) {
        let mut keys: Vec<u32> = cands.iter().map(|c| c.1).collect();
        let t = *keys
            .select_nth_unstable_by(need as usize - 1, |a, b| b.cmp(a))
            .1;
        let above = keys.iter().filter(|&&k| k > t).count() as u64;
        let ties = keys.iter().filter(|&&k| k == t).count() as u64;
        let kept_ties = need - above;
        if kept_ties == ties {
            self.finish(Selection::AtLeast(t));
        } else {
            let index = cands
                .iter()
                .filter(|c| c.1 == t)
                .nth(kept_ties as usize - 1)
                .map_or(0, |c| c.0 as u64);
            let segment = std::mem::take(&mut self.segment);
            self.finish(Selection::Ties {
                key: t,
                segment,
                index,
            });
        }
    }

    /// Finishes a split [`Stage::Guess`] whose threshold is `key`, the
    /// bottom of the range: `kept` of the `ties` keys equal to it (their
    /// positions set in [`bits`](Self::bits)) are kept, the first in index
    /// order.
    fn finish_at(&mut self, key: u32, kept: u64, ties: u64) {
        if kept == ties {
            self.finish(Selection::AtLeast(key));
            return;
        }
        // (`kept < ties`: the set bit of ordinal `kept - 1` exists)
        let index = nth_set_bit(&self.bits, kept - 1).unwrap_or(0);
        let segment = std::mem::take(&mut self.segment);
        self.finish(Selection::Ties {
            key,
            segment,
            index,
        });
    }

    /// Finishes a [`Stage::GuessCoded`] sweep whose range holds the
    /// `need`-th largest of the keys within it; false (nothing changed)
    /// if the records do not allow it.
    fn finish_coded(&mut self, need: u64) -> bool {
        // Every value within the range with its count, largest first.
        let mut counts = vec![0u64; 256];
        for &c in &self.codes {
            counts[c as usize] += 1;
        }
        // (escapes are counted from the candidates below)
        let mut values: Vec<(u32, u64)> = self
            .table
            .iter()
            .copied()
            .zip(counts.iter().copied())
            .filter(|&(_, n)| n > 0)
            .collect();
        let mut extra: Vec<u32> = self.cands.iter().map(|c| c.1).collect();
        extra.sort_unstable();
        for run in extra.chunk_by(|a, b| a == b) {
            values.push((run[0], run.len() as u64));
        }
        values.sort_unstable_by_key(|v| std::cmp::Reverse(v.0));
        let mut before = 0u64;
        for (t, n) in values {
            if before + n < need {
                before += n;
                continue;
            }
            let kept_ties = need - before;
            if kept_ties == n {
                self.finish(Selection::AtLeast(t));
                return true;
            }
            // The kept_ties-th key equal to t, in index order.
            let index = match self.table.binary_search(&t) {
                Ok(code) => self
                    .codes
                    .iter()
                    .enumerate()
                    .filter(|&(_, &c)| c as usize == code)
                    .nth(kept_ties as usize - 1)
                    .and_then(|(j, _)| nth_set_bit(&self.bits, j as u64)),
                Err(_) => self
                    .cands
                    .iter()
                    .filter(|c| c.1 == t)
                    .nth(kept_ties as usize - 1)
                    .map(|c| c.0 as u64),
            };
            let Some(index) = index else {
                return false;
            };
            let segment = std::mem::take(&mut self.segment);
            self.finish(Selection::Ties {
                key: t,
                segment,
                index,
            });
            return true;
        }
        false
    }

    /// Adds the 32-bit partial histograms into the 64-bit one.
    fn flush(&mut self) {
        if self.pending == 0 || self.part.is_empty() {
            return;
        }
        for part in self.part.chunks_exact_mut(1 << 16) {
            for (h, p) in self.hist.iter_mut().zip(part.iter_mut()) {
                *h += *p as u64;
                *p = 0;
            }
        }
        self.pending = 0;
    }

    fn finish(&mut self, s: Selection) {
        self.hist = Vec::new();
        self.part = Vec::new();
        self.cands = Vec::new();
        self.cands_ok = false;
        self.bits = Vec::new();
        self.lows = Vec::new();
        self.table = Vec::new();
        self.codes = Vec::new();
        self.seg_lows = BTreeMap::new();
        self.seg_lows_ok = false;
        self.stage = Stage::Done(s);
    }
}

/// The position of the set bit of ordinal `j` (0-based) in `bits` (bit
/// `p % 64` of word `p / 64` for position `p`).
fn nth_set_bit(bits: &[u64], mut j: u64) -> Option<u64> {
    for (w, &word) in bits.iter().enumerate() {
        let c = word.count_ones() as u64;
        if j < c {
            let mut word = word;
            for _ in 0..j {
                word &= word - 1;
            }
            return Some(w as u64 * 64 + word.trailing_zeros() as u64);
        }
        j -= c;
    }
    None
}

/// Sweep 0 after a guess: counts the keys above `hi` (returned) and appends
/// to `cands` those within `lo..=hi` with their positions (from `offset`),
/// except, with `at_lo` (a split guess), those equal to `lo`, whose
/// position bits are set in `at_lo` instead. The second value is false (and
/// the recording stops) when that would exceed `cap` candidates.
#[inline(always)]
fn guess_sweep(
    cands: &mut Vec<(u32, u32)>,
    mut at_lo: Option<&mut [u64]>,
    cap: usize,
    offset: u64,
    keys: &[u32],
    lo: u32,
    hi: u32,
) -> (u64, bool) {
    let span = hi - lo;
    let mut above = 0u64;
    let mut ok = cap > 0;
    // A bit per key within the range (one word per 64 keys), then the set
    // bits: few keys are within the range.
    let (mut bits, mut eq) = ([0u64; BLOCK / 64], [0u64; BLOCK / 64]);
    for (c, part) in keys.chunks(BLOCK).enumerate() {
        let words = part.len().div_ceil(64);
        let (bits, eq) = (&mut bits[..words], &mut eq[..words]);
        above += match at_lo {
            Some(_) => range_bits::<true>(part, lo, span, hi, bits, eq),
            None => range_bits::<false>(part, lo, span, hi, bits, &mut []),
        };
        if ok {
            let at = offset + (c * BLOCK) as u64;
            ok = record(cands, at_lo.as_deref_mut(), cap, at, bits, eq, |t| part[t]);
        }
    }
    (above, ok)
}

/// [`guess_sweep`] of the keys of `x − b` (one block), computed as they
/// are compared ([`range_bits_diff`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn guess_sweep_diff(
    cands: &mut Vec<(u32, u32)>,
    at_lo: Option<&mut [u64]>,
    cap: usize,
    offset: u64,
    x: &[f32],
    b: &[f32],
    lo: u32,
    hi: u32,
) -> (u64, bool) {
    let (mut bits, mut eq) = ([0u64; BLOCK / 64], [0u64; BLOCK / 64]);
    let words = x.len().div_ceil(64);
    let (bits, eq) = (&mut bits[..words], &mut eq[..words]);
    let above = match at_lo {
        Some(_) => range_bits_diff::<true>(x, b, lo, hi - lo, hi, bits, eq),
        None => range_bits_diff::<false>(x, b, lo, hi - lo, hi, bits, &mut []),
    };
    if cap == 0 {
        return (above, false);
    }
    let ok = record(cands, at_lo, cap, offset, bits, eq, |t| {
        magnitude_key(x[t] - b[t])
    });
    (above, ok)
}

/// Records the keys of one block at positions `offset..` whose bits are
/// set in `bits` (within the guessed range): as candidates, `key(t)` for
/// the key at `offset + t`, except, with `at_lo`, those whose bits are set
/// in `eq` too (equal to `lo`), which get their position bit in `at_lo`.
/// False (nothing recorded) when the candidates would exceed `cap`.
#[inline(always)]
fn record(
    cands: &mut Vec<(u32, u32)>,
    at_lo: Option<&mut [u64]>,
    cap: usize,
    offset: u64,
    bits: &[u64],
    eq: &[u64],
    key: impl Fn(usize) -> u32,
) -> bool {
    let split = at_lo.is_some();
    let word = |w: usize| if split { bits[w] & !eq[w] } else { bits[w] };
    let hits: usize = (0..bits.len()).map(|w| word(w).count_ones() as usize).sum();
    if cands.len() + hits > cap {
        return false;
    }
    // Written in place (one length update per block, not per key).
    let start = cands.len();
    cands.resize(start + hits, (0, 0));
    let mut slots = cands[start..].iter_mut();
    for w in 0..bits.len() {
        let mut word = word(w);
        while word != 0 {
            let t = 64 * w + word.trailing_zeros() as usize;
            // (positions are below n ≤ 2³², checked by `guess`)
            if let Some(slot) = slots.next() {
                *slot = ((offset + t as u64) as u32, key(t));
            }
            word &= word - 1;
        }
    }
    if let Some(at_lo) = at_lo {
        for (w, &e) in eq.iter().enumerate() {
            or_bits_at(at_lo, offset + 64 * w as u64, e);
        }
    }
    true
}

/// Sets in `bits` (bit `p % 64` of word `p / 64` for position `p`) the bits
/// of `word` as positions `at..at + 64`; positions past `bits` are ignored.
#[inline(always)]
fn or_bits_at(bits: &mut [u64], at: u64, word: u64) {
    if word == 0 {
        return;
    }
    let (w, s) = ((at / 64) as usize, at % 64);
    if let Some(d) = bits.get_mut(w) {
        *d |= word << s;
    }
    if s != 0
        && let Some(d) = bits.get_mut(w + 1)
    {
        *d |= word >> (64 - s);
    }
}

/// Sweep 0 after a coded guess ([`Stage::GuessCoded`]): counts the keys
/// above `hi` (returned); for each key within `lo..=hi`, sets its position
/// bit in `bits` and appends its code (its index in `table`, or [`ESCAPE`]
/// with the key and position appended to `cands` while there is room below
/// `cap`, else `ok` turns false).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn coded_sweep(
    bits: &mut [u64],
    codes: &mut Vec<u8>,
    table: &[u32],
    cands: &mut Vec<(u32, u32)>,
    ok: &mut bool,
    cap: usize,
    offset: u64,
    keys: &[u32],
    lo: u32,
    hi: u32,
) -> u64 {
    let span = hi - lo;
    let mut above = 0u64;
    let mut words = [0u64; BLOCK / 64];
    // The last value seen and its code: runs of one tied value are common.
    let (mut last, mut last_code) = (u32::MAX, ESCAPE);
    for (c, part) in keys.chunks(BLOCK).enumerate() {
        let n = part.len().div_ceil(64);
        above += range_bits::<false>(part, lo, span, hi, &mut words[..n], &mut []);
        for (w, &word) in words[..n].iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let t = 64 * w + word.trailing_zeros() as usize;
                word &= word - 1;
                let p = offset + (c * BLOCK + t) as u64;
                if let Some(b) = bits.get_mut((p / 64) as usize) {
                    *b |= 1 << (p % 64);
                }
                let key = part[t];
                if key != last {
                    last = key;
                    last_code = table.binary_search(&key).map_or(ESCAPE, |i| i as u8);
                }
                if last_code == ESCAPE {
                    if cands.len() < cap {
                        // (positions are below n ≤ 2³², checked by `guess`)
                        cands.push((p as u32, key));
                    } else {
                        *ok = false;
                    }
                }
                codes.push(last_code);
            }
        }
    }
    above
}

/// Sets bit `e % 64` of `bits[e / 64]` when `values[e] <= limit`, clears
/// the others (`values.len() <= 64 · bits.len()`): DARE's keep mask from its
/// draws ([`dare_limit`](super::dare_limit)), with AVX2 where the CPU has it.
pub fn bits_at_most(values: &[u32], limit: u32, bits: &mut [u64]) {
    range_bits::<false>(values, 0, limit, u32::MAX, bits, &mut []);
}

/// Sets bit `e % 64` of `bits[e / 64]` when `keys[e]` is within `lo..=lo +
/// span` (other bits cleared; `keys.len() <= 64 · bits.len()`), and returns
/// how many keys are above `hi`. With `EQ`, also sets the bits of `eq` (as
/// long as `bits`) where `keys[e] == lo`, likewise.
#[inline(always)]
fn range_bits<const EQ: bool>(
    keys: &[u32],
    lo: u32,
    span: u32,
    hi: u32,
    bits: &mut [u64],
    eq: &mut [u64],
) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { range_bits_avx2::<EQ>(keys, lo, span, hi, bits, eq) };
    }
    range_bits_portable::<EQ>(keys, lo, span, hi, bits, eq)
}

fn range_bits_portable<const EQ: bool>(
    keys: &[u32],
    lo: u32,
    span: u32,
    hi: u32,
    bits: &mut [u64],
    eq: &mut [u64],
) -> u64 {
    bits.iter_mut().for_each(|w| *w = 0);
    if EQ {
        eq.iter_mut().for_each(|w| *w = 0);
    }
    let mut above = 0u64;
    for (e, &k) in keys.iter().enumerate() {
        bits[e / 64] |= u64::from(k.wrapping_sub(lo) <= span) << (e % 64);
        if EQ {
            eq[e / 64] |= u64::from(k == lo) << (e % 64);
        }
        above += u64::from(k > hi);
    }
    above
}

/// [`range_bits_portable`] with AVX2 compares and move-masks (the same bits
/// and count).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn range_bits_avx2<const EQ: bool>(
    keys: &[u32],
    lo: u32,
    span: u32,
    hi: u32,
    bits: &mut [u64],
    eq: &mut [u64],
) -> u64 {
    use std::arch::x86_64::*;
    let load = |e: usize| {
        // SAFETY: `e + 8 <= keys.len()` (`range_core`); unaligned load.
        unsafe { _mm256_loadu_si256(keys.as_ptr().add(e) as *const __m256i) }
    };
    // SAFETY: AVX2 is enabled on this function.
    unsafe { range_core::<EQ>(keys.len(), load, |e| keys[e], lo, span, hi, bits, eq) }
}

/// [`range_bits`] of the keys of `x − b` ([`magnitude_key`]).
#[inline(always)]
fn range_bits_diff<const EQ: bool>(
    x: &[f32],
    b: &[f32],
    lo: u32,
    span: u32,
    hi: u32,
    bits: &mut [u64],
    eq: &mut [u64],
) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { range_bits_diff_avx2::<EQ>(x, b, lo, span, hi, bits, eq) };
    }
    let mut keys = [0u32; BLOCK];
    let keys = &mut keys[..x.len()];
    for ((k, &x), &b) in keys.iter_mut().zip(x).zip(b) {
        *k = magnitude_key(x - b);
    }
    range_bits_portable::<EQ>(keys, lo, span, hi, bits, eq)
}

/// [`range_bits_diff`] with AVX2: each key computed in a register from
/// eight `f32` differences (the same IEEE subtraction), then compared as
/// [`range_bits_avx2`] does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn range_bits_diff_avx2<const EQ: bool>(
    x: &[f32],
    b: &[f32],
    lo: u32,
    span: u32,
    hi: u32,
    bits: &mut [u64],
    eq: &mut [u64],
) -> u64 {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), b.len());
    let load = |e: usize| {
        // SAFETY: `e + 8 <= x.len() == b.len()` (`range_core`); unaligned
        // loads; AVX2 is enabled on this function.
        unsafe {
            let d = _mm256_sub_ps(
                _mm256_loadu_ps(x.as_ptr().add(e)),
                _mm256_loadu_ps(b.as_ptr().add(e)),
            );
            _mm256_and_si256(_mm256_castps_si256(d), _mm256_set1_epi32(0x7fff_ffff))
        }
    };
    // SAFETY: AVX2 is enabled on this function.
    unsafe {
        range_core::<EQ>(
            x.len(),
            load,
            |e| magnitude_key(x[e] - b[e]),
            lo,
            span,
            hi,
            bits,
            eq,
        )
    }
}

/// The loop of [`range_bits_avx2`] over `n` keys, eight at a time from
/// `load8(e)` (keys `e..e + 8`, called with `e + 8 <= n`), the rest one at
/// a time from `load1(e)`.
///
/// # Safety
/// AVX2 is available.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn range_core<const EQ: bool>(
    n: usize,
    load8: impl Fn(usize) -> std::arch::x86_64::__m256i,
    load1: impl Fn(usize) -> u32,
    lo: u32,
    span: u32,
    hi: u32,
    bits: &mut [u64],
    eq: &mut [u64],
) -> u64 {
    use std::arch::x86_64::*;
    assert!(n <= 64 * bits.len());
    assert!(!EQ || eq.len() == bits.len());
    // SAFETY: AVX2 is available, as the caller guarantees.
    unsafe {
        // Unsigned comparisons as signed ones on values with the top bit flipped.
        let flip = _mm256_set1_epi32(i32::MIN);
        let lo_v = _mm256_set1_epi32(lo as i32);
        let span_f = _mm256_set1_epi32((span ^ 0x8000_0000) as i32);
        let hi_f = _mm256_set1_epi32((hi ^ 0x8000_0000) as i32);
        let mut acc = _mm256_setzero_si256();
        let octets = n / 8;
        bits.iter_mut().for_each(|w| *w = 0);
        if EQ {
            eq.iter_mut().for_each(|w| *w = 0);
        }
        for g in 0..octets {
            let v = load8(8 * g);
            let gt = _mm256_cmpgt_epi32(_mm256_xor_si256(v, flip), hi_f);
            acc = _mm256_sub_epi32(acc, gt);
            let d = _mm256_xor_si256(_mm256_sub_epi32(v, lo_v), flip);
            let outside = _mm256_cmpgt_epi32(d, span_f);
            let m = !_mm256_movemask_ps(_mm256_castsi256_ps(outside)) as u32 & 0xff;
            bits[g / 8] |= (m as u64) << (8 * (g % 8));
            if EQ {
                let at = _mm256_cmpeq_epi32(v, lo_v);
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(at)) as u32 & 0xff;
                eq[g / 8] |= (m as u64) << (8 * (g % 8));
            }
        }
        let mut lanes = [0u32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc);
        // (each lane counts at most n / 8 < 2^32 keys)
        let mut above: u64 = lanes.iter().map(|&l| l as u64).sum();
        for e in 8 * octets..n {
            let k = load1(e);
            bits[e / 64] |= u64::from(k.wrapping_sub(lo) <= span) << (e % 64);
            if EQ {
                eq[e / 64] |= u64::from(k == lo) << (e % 64);
            }
            above += u64::from(k > hi);
        }
        above
    }
}

/// The bin (scanning from the top) holding the `k`-th largest, and how many
/// of that bin are needed.
fn locate(hist: &[u64], k: u64) -> (usize, u64) {
    let mut above = 0u64;
    for bin in (0..hist.len()).rev() {
        if above + hist[bin] >= k {
            return (bin, k - above);
        }
        above += hist[bin];
    }
    (0, k - above)
}

/// The number of entries TIES keeps of `n` at density `d`: `floor(d · n)`,
/// all of them when `d ≥ 1`.
pub fn keep_count(density: f64, n: u64) -> u64 {
    if density >= 1.0 {
        n
    } else if density <= 0.0 {
        0
    } else {
        ((density * n as f64).floor() as u64).min(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(keys: &[u32], k: u64, chunk: usize) -> Vec<bool> {
        let mut t = TopK::new(keys.len() as u64, k, true);
        for sweep in 0..TopK::SWEEPS_ONE_SEGMENT {
            for (c, part) in keys.chunks(chunk.max(1)).enumerate() {
                t.observe("", (c * chunk) as u64, part);
            }
            t.end_sweep(sweep).unwrap();
        }
        kept_by(t.selection().unwrap(), keys)
    }

    /// Which of `keys` (one segment, positions from 0) `s` keeps.
    fn kept_by(s: &Selection, keys: &[u32]) -> Vec<bool> {
        keys.iter()
            .enumerate()
            .map(|(i, &key)| s.keeps("", i as u64, key))
            .collect()
    }

    fn reference(keys: &[u32], k: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..keys.len()).collect();
        idx.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        let mut keep = vec![false; keys.len()];
        idx[..k].iter().for_each(|&i| keep[i] = true);
        keep
    }

    #[test]
    fn top_k_matches_sorting_with_ties_and_any_chunking() {
        let vals = [
            0.5f32, -2.0, 2.0, 0.0, 1.0, -0.0, 2.0, 0.5, 3.0, -1.0, 0.5, 2.0,
        ];
        let keys: Vec<u32> = vals.iter().map(|&v| magnitude_key(v)).collect();
        for k in 0..=keys.len() {
            for chunk in [1, 3, 5, 12] {
                assert_eq!(
                    select(&keys, k as u64, chunk),
                    reference(&keys, k),
                    "k={k} chunk={chunk}"
                );
            }
        }
    }

    #[test]
    fn top_k_over_segments_breaks_ties_by_segment_name() {
        // Two segments observed in reverse name order; ties go to "a" first.
        let seg_b = [magnitude_key(1.0), magnitude_key(2.0)];
        let seg_a = [magnitude_key(1.0), magnitude_key(1.0), magnitude_key(0.5)];
        let mut t = TopK::new(5, 3, false);
        for sweep in 0..TopK::SWEEPS {
            t.observe("b", 0, &seg_b);
            t.observe("a", 0, &seg_a[..1]);
            t.observe("a", 1, &seg_a[1..]);
            t.end_sweep(sweep).unwrap();
        }
        let s = t.selection().unwrap();
        let kb: Vec<bool> = seg_b
            .iter()
            .enumerate()
            .map(|(i, &k)| s.keeps("b", i as u64, k))
            .collect();
        let ka: Vec<bool> = seg_a
            .iter()
            .enumerate()
            .map(|(i, &k)| s.keeps("a", i as u64, k))
            .collect();
        assert_eq!(kb, [false, true]);
        assert_eq!(ka, [true, true, false]);
    }

    #[test]
    fn the_tie_position_sweep_needs_only_the_segment_of_the_last_kept_tie() {
        // Ties at 1.0: one in "a", three in "b", one in "c"; one key above.
        // k = 4 keeps the key above, the tie in "a" and two of "b"'s.
        let segs: [(&str, Vec<u32>); 3] = [
            ("c", vec![magnitude_key(2.0), magnitude_key(1.0)]),
            ("a", vec![magnitude_key(0.5), magnitude_key(1.0)]),
            ("b", [1.0f32, 0.25, 1.0, 1.0].map(magnitude_key).to_vec()),
        ];
        let run = |skip: bool| {
            let mut t = TopK::new(8, 4, false);
            let mut observed = Vec::new();
            for sweep in 0..TopK::SWEEPS {
                for (name, keys) in &segs {
                    if skip && !t.needs_segment(name) {
                        continue;
                    }
                    observed.push((sweep, *name));
                    t.observe(name, 0, keys);
                }
                t.end_sweep(sweep).unwrap();
            }
            (t.selection().unwrap().clone(), observed)
        };
        let (all, _) = run(false);
        let (some, observed) = run(true);
        assert_eq!(all, some);
        assert_eq!(
            all,
            Selection::Ties {
                key: magnitude_key(1.0),
                segment: "b".into(),
                index: 2
            }
        );
        // The ties were counted per segment in the low-bits sweep, so the
        // third sweep places the last kept tie, and sees "b" alone.
        let last: Vec<&str> = observed.iter().filter(|o| o.0 == 2).map(|o| o.1).collect();
        assert_eq!(last, ["b"]);
        assert_eq!(observed.len(), 2 * 3 + 1);
        assert!(!TopK::new(8, 0, false).needs_segment("a"), "done: nothing");
    }

    #[test]
    fn ties_over_segments_with_many_low_bits_take_the_tie_count_sweep_and_stay_exact() {
        // One high-bits bin holding many distinct low bits in segment "a"
        // (more than are counted per segment), ties at the threshold in
        // both segments: the tie-count sweep runs, and the result is that of
        // sorting by key, then segment name, then index.
        let h = magnitude_key(1.0) & 0xffff_0000;
        let mut a: Vec<u32> = (0..5000u32).map(|l| h | (l * 7 % 5000)).collect();
        a.extend([h | 100, h | 100, h | 100]);
        let b: Vec<u32> = vec![h | 150, h | 100, h | 100, h | 5, h | 100];
        let segs = [("b", b), ("a", a)];
        let n: usize = segs.iter().map(|s| s.1.len()).sum();
        let mut all: Vec<(u32, &str, usize)> = segs
            .iter()
            .flat_map(|(name, keys)| keys.iter().enumerate().map(move |(i, &k)| (k, *name, i)))
            .collect();
        all.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(y.1)).then(x.2.cmp(&y.2)));
        for k in [
            1usize,
            2000,
            4899,
            4900,
            4901,
            4902,
            4904,
            4906,
            4907,
            n - 1,
        ] {
            let mut t = TopK::new(n as u64, k as u64, false);
            let mut last_sweep = 0;
            for sweep in 0..TopK::SWEEPS {
                for (name, keys) in &segs {
                    if t.needs_segment(name) {
                        t.observe(name, 0, keys);
                        last_sweep = sweep;
                    }
                }
                t.end_sweep(sweep).unwrap();
            }
            if (4901..4904).contains(&k) {
                // High, low, tie count, then the position within "a".
                assert_eq!(last_sweep, 3, "k={k}: the tie-count sweep ran");
            }
            let s = t.selection().unwrap();
            let kept: std::collections::BTreeSet<(&str, usize)> =
                all[..k].iter().map(|&(_, name, i)| (name, i)).collect();
            for (name, keys) in &segs {
                for (i, &key) in keys.iter().enumerate() {
                    assert_eq!(
                        s.keeps(name, i as u64, key),
                        kept.contains(&(*name, i)),
                        "k={k} {name}[{i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn top_k_over_a_large_input_uses_partial_histograms_exactly() {
        // More than SMALL keys: the 4-way partial histograms are used.
        let n = (SMALL + 12_345) as usize;
        let keys: Vec<u32> = (0..n)
            .map(|i| magnitude_key(((i * 2_654_435_761) % 1_000_003) as f32 / 7.0))
            .collect();
        let k = n / 5;
        let mut t = TopK::new(n as u64, k as u64, true);
        for sweep in 0..TopK::SWEEPS_ONE_SEGMENT {
            for (c, part) in keys.chunks(70_001).enumerate() {
                t.observe("", (c * 70_001) as u64, part);
            }
            t.end_sweep(sweep).unwrap();
        }
        let s = t.selection().unwrap().clone();
        let kept: Vec<bool> = keys
            .iter()
            .enumerate()
            .map(|(i, &key)| s.keeps("", i as u64, key))
            .collect();
        assert_eq!(kept, reference(&keys, k));
    }

    #[test]
    fn top_k_many_ties_are_placed_by_the_position_bits() {
        // Every key equal: all are ties, more than the candidates of a guess
        // may hold. With a guess, its position bits and value codes settle
        // it in the first sweep; without one, the position bits of the
        // low-bits sweep (the second) do.
        let n = CANDIDATES + 1000;
        let keys = vec![magnitude_key(0.25); n];
        for (k, guess) in [
            (1usize, true),
            (777, true),
            (n - 1, true),
            (777, false),
            (n - 1, false),
        ] {
            let mut t = TopK::new(n as u64, k as u64, true);
            if guess {
                t.guess(&mut keys[..100].to_vec());
            }
            let sweeps = if guess { 1 } else { 2 };
            for sweep in 0..sweeps {
                assert!(!t.is_done(), "k={k}: done before sweep {sweep}");
                for (c, part) in keys.chunks(100_000).enumerate() {
                    t.observe("", (c * 100_000) as u64, part);
                }
                t.end_sweep(sweep).unwrap();
            }
            assert!(
                t.is_done(),
                "k={k} guess={guess}: {sweeps} sweep(s) settle it"
            );
            assert_eq!(
                t.selection(),
                Some(&Selection::Ties {
                    key: magnitude_key(0.25),
                    segment: String::new(),
                    index: k as u64 - 1,
                }),
                "k={k}"
            );
        }
    }

    /// `select` with a guess from `sample` before the first sweep; also
    /// returns whether the first sweep settled the selection.
    fn select_guessed(keys: &[u32], k: u64, chunk: usize, sample: &[u32]) -> (Vec<bool>, bool) {
        let mut t = TopK::new(keys.len() as u64, k, true);
        t.guess(&mut sample.to_vec());
        let mut after_first = false;
        for sweep in 0..TopK::SWEEPS_ONE_SEGMENT {
            for (c, part) in keys.chunks(chunk.max(1)).enumerate() {
                t.observe("", (c * chunk) as u64, part);
            }
            t.end_sweep(sweep).unwrap();
            if sweep == 0 {
                after_first = t.is_done();
            }
        }
        let kept = kept_by(t.selection().unwrap(), keys);
        (kept, after_first)
    }

    #[test]
    fn a_guess_into_a_large_tie_codes_the_values_and_is_exact() {
        // BF16-like keys: few distinct values, each tied millions of times
        // in a real checkpoint; here 2.4M keys, so that the guessed range
        // holds more keys than candidates may be recorded. Rare values that
        // an evenly spaced sample misses take the escape code.
        let n = 2_400_000usize;
        // Shares 10%, 50%, 30%, 10%: a guess inside the second value's tie
        // covers more than a million keys.
        let grid = [
            0.5f32, 0.25, 0.25, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 0.0625,
        ];
        let mut keys: Vec<u32> = (0..n)
            .map(|i| {
                let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
                magnitude_key(grid[(h % grid.len() as u64) as usize])
            })
            .collect();
        for j in 0..50 {
            keys[j * 40_009 + 11] = magnitude_key(0.2 + j as f32 * 1e-3); // rare
        }
        let even: Vec<u32> = keys.iter().step_by(n / 4096).copied().collect();
        for k in [480_013u64, 1_000_001, 1_439_999] {
            // Ranges within or across the large tie: coded.
            let mut t = TopK::new(n as u64, k, true);
            t.guess(&mut even.clone());
            assert!(matches!(t.stage, Stage::GuessCoded { .. }), "k={k}");
        }
        // A threshold on a rare value (an escape): keep it and all above.
        let on_rare = keys
            .iter()
            .filter(|&&x| x >= magnitude_key(0.2 + 25e-3))
            .count();
        for k in [
            1usize, 240_000, 480_013, 960_000, 1_000_001, 1_439_999, on_rare, 2_399_999,
        ] {
            let expect = reference(&keys, k);
            for chunk in [n, 333_331] {
                let (kept, one) = select_guessed(&keys, k as u64, chunk, &even);
                assert_eq!(kept, expect, "k={k} chunk={chunk}");
                assert!(one, "k={k} chunk={chunk}: one sweep");
            }
        }
        // Escapes beyond the room for them: the guess misses, still exact.
        let mut rare = keys.clone();
        for (j, key) in rare.iter_mut().enumerate().skip(1).step_by(2) {
            *key = magnitude_key(0.2 + (j % 100_003) as f32 * 1e-7);
        }
        let sample: Vec<u32> = keys.iter().step_by(n / 4096).copied().collect();
        for k in [480_013usize, 1_439_999] {
            let (kept, _) = select_guessed(&rare, k as u64, 400_000, &sample);
            assert_eq!(kept, reference(&rare, k), "k={k} with many escapes");
        }
    }

    #[test]
    fn a_good_guess_settles_the_top_k_in_one_sweep_and_a_bad_one_changes_nothing() {
        let n = 200_000usize;
        // Many ties: values on a coarse grid.
        let keys: Vec<u32> = (0..n)
            .map(|i| magnitude_key(((i * 2_654_435_761) % 1009) as f32 / 64.0 - 7.0))
            .collect();
        let even: Vec<u32> = keys.iter().step_by(7).copied().collect();
        for k in [1usize, 17, n / 5, n / 2, n - 3] {
            let expect = reference(&keys, k);
            for chunk in [4096, 70_001, n] {
                let (kept, one) = select_guessed(&keys, k as u64, chunk, &even);
                assert_eq!(kept, expect, "k={k} chunk={chunk}");
                assert!(one, "k={k} chunk={chunk}: an even sample should settle it");
                // Samples far off (all small, all large, one key): exact anyway.
                for bad in [
                    vec![0u32; 100],
                    vec![magnitude_key(1e30); 100],
                    vec![keys[5]],
                ] {
                    let (kept, _) = select_guessed(&keys, k as u64, chunk, &bad);
                    assert_eq!(kept, expect, "k={k} chunk={chunk} bad guess");
                }
            }
        }
        // Every key equal: the guess holds, the ties are candidates.
        let same = vec![magnitude_key(0.5); 5000];
        for k in [1usize, 2500, 4999] {
            let (kept, one) = select_guessed(&same, k as u64, 999, &same[..64]);
            assert_eq!(kept, reference(&same, k), "k={k}");
            assert!(one);
        }
    }

    #[test]
    fn range_bits_of_differences_are_those_of_their_keys() {
        let val = |i: u32| (i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32 - 0.5;
        let b: Vec<f32> = (0..1000).map(|i| val(i) * 0.1).collect();
        let mut x: Vec<f32> = (0..1000)
            .map(|i| b[i as usize] + val(i + 7) * 0.01)
            .collect();
        x[3] = f32::NAN;
        x[4] = f32::INFINITY;
        x[5] = b[5];
        let keys: Vec<u32> = x
            .iter()
            .zip(&b)
            .map(|(&x, &b)| magnitude_key(x - b))
            .collect();
        let mid = magnitude_key(0.004);
        for (lo, hi) in [
            (0u32, u32::MAX),
            (mid, mid + (1 << 20)),
            (0x7f80_0000, 0x7fff_ffff),
        ] {
            for len in [0usize, 7, 8, 63, 64, 65, 1000] {
                let words = len.div_ceil(64).max(1);
                let (mut a, mut c) = (vec![u64::MAX; words], vec![0u64; words]);
                let n_a = range_bits_diff::<false>(
                    &x[..len],
                    &b[..len],
                    lo,
                    hi - lo,
                    hi,
                    &mut a,
                    &mut [],
                );
                let n_c =
                    range_bits_portable::<false>(&keys[..len], lo, hi - lo, hi, &mut c, &mut []);
                assert_eq!((n_a, a), (n_c, c), "lo {lo} hi {hi} len {len}");
            }
        }
    }

    /// The keys `|x − b|` ([`magnitude_key`]).
    fn diff_keys(x: &[f32], b: &[f32]) -> Vec<u32> {
        x.iter()
            .zip(b)
            .map(|(&x, &b)| magnitude_key(x - b))
            .collect()
    }

    /// Selects the `k` largest of `diff_keys(x, b)` after a guess from
    /// `sample`, block by block, with [`TopK::observe_diff`] (`diff`) or
    /// with [`TopK::observe`] of the keys; returns the stage after the
    /// guess and the selection.
    fn select_observing(
        x: &[f32],
        b: &[f32],
        keys: &[u32],
        k: u64,
        sample: &[u32],
        diff: bool,
    ) -> (Stage, Option<Selection>) {
        let (stage, _, t) = observe_guessed(x, b, keys, k, sample, diff, BLOCK);
        (stage, t.selection().cloned())
    }

    /// Runs a one-segment [`TopK`] of the `k` largest of `keys` (those of
    /// `x − b`) after a guess from `sample`, through
    /// [`TopK::observe_diff`] (`diff`) or [`TopK::observe`], in pieces of
    /// `piece` keys (at most [`BLOCK`] with `diff`); returns the stage after
    /// the guess, whether the first sweep settled it, and the selector.
    #[allow(clippy::too_many_arguments)]
    fn observe_guessed(
        x: &[f32],
        b: &[f32],
        keys: &[u32],
        k: u64,
        sample: &[u32],
        diff: bool,
        piece: usize,
    ) -> (Stage, bool, TopK) {
        let n = keys.len();
        let mut t = TopK::new(n as u64, k, true);
        t.guess(&mut sample.to_vec());
        let stage = t.stage.clone();
        let mut scratch = vec![0u32; BLOCK];
        let mut one = false;
        for sweep in 0..TopK::SWEEPS_ONE_SEGMENT {
            for at in (0..n).step_by(piece) {
                let end = (at + piece).min(n);
                if diff {
                    t.observe_diff("", at as u64, &x[at..end], &b[at..end], &mut scratch);
                } else {
                    t.observe("", at as u64, &keys[at..end]);
                }
            }
            t.end_sweep(sweep).unwrap();
            if sweep == 0 {
                one = t.is_done();
            }
        }
        (stage, one, t)
    }

    /// BF16-like task vectors around a base: the differences take a few
    /// hundred values, one of them (`1.5 · 2⁻¹¹`) on about 40% of the
    /// positions; `x − b` is exact in `f32`.
    fn tied_differences(n: usize) -> (Vec<f32>, Vec<f32>) {
        let hash = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        let b: Vec<f32> = (0..n).map(|i| (hash(i + 3) % 512) as f32 / 256.0).collect();
        let x = (0..n)
            .map(|i| {
                let h = hash(i);
                let m = if h % 5 < 2 { 3 } else { 1 + (h >> 8) % 400 } as f32 / 2048.0;
                let d = if h & (1 << 20) != 0 { -m } else { m };
                b[i] + d
            })
            .collect();
        (x, b)
    }

    /// Selects the top `k` of the keys of `x − b` through
    /// [`TopK::observe_diff`] (`diff`) or [`TopK::observe`], in pieces of
    /// `piece` keys (at most [`BLOCK`] with `diff`), after a guess from
    /// `sample`; returns the stage after the guess, whether the first sweep
    /// settled it, and what is kept.
    fn select_split(
        x: &[f32],
        b: &[f32],
        k: u64,
        sample: &[u32],
        diff: bool,
        piece: usize,
    ) -> (Stage, bool, Vec<bool>) {
        let keys = diff_keys(x, b);
        let (stage, one, t) = observe_guessed(x, b, &keys, k, sample, diff, piece);
        (stage, one, kept_by(t.selection().unwrap(), &keys))
    }

    #[test]
    fn a_guess_over_a_large_tie_at_its_bottom_records_the_tie_as_position_bits_and_is_exact() {
        let n = 300_000;
        let (x, b) = tied_differences(n);
        let keys = diff_keys(&x, &b);
        let tie = magnitude_key(1.5 / 1024.0);
        let above = keys.iter().filter(|&&k| k > tie).count() as u64;
        let at = keys.iter().filter(|&&k| k == tie).count() as u64;
        assert!(at > n as u64 / 3, "{at} ties");
        let even: Vec<u32> = keys.iter().step_by(7).copied().collect();
        // The k-th largest just above the tie (the tie is the range's
        // bottom, and the threshold is above it), at its first keys, inside
        // it, and a guess whose range ends exactly at the last tie kept.
        let mut splits = 0;
        for k in [above - 40, above, above + 1, above + 3_000, above + 40_000] {
            let expect = reference(&keys, k as usize);
            for (diff, piece) in [(false, 100_003), (false, 7_777), (true, 200), (true, BLOCK)] {
                let (stage, one, kept) = select_split(&x, &b, k, &even, diff, piece);
                if let Stage::Guess {
                    split: true, lo, ..
                } = stage
                {
                    assert_eq!(lo, tie, "k={k}");
                    splits += 1;
                }
                assert!(one, "k={k} diff={diff} piece={piece}: one sweep");
                assert_eq!(kept, expect, "k={k} diff={diff} piece={piece}");
            }
        }
        // The ranges at the tie's top and inside it were split.
        assert!(splits >= 12, "{splits} split guesses");
        // Split, the ties are position bits only, never candidates.
        for diff in [false, true] {
            let mut t = TopK::new(n as u64, above + 3_000, true);
            t.guess(&mut even.clone());
            assert!(matches!(t.stage, Stage::Guess { split: true, .. }));
            for at in (0..n).step_by(200) {
                let end = (at + 200).min(n);
                if diff {
                    t.observe_diff("", at as u64, &x[at..end], &b[at..end], &mut [0; BLOCK]);
                } else {
                    t.observe("", at as u64, &keys[at..end]);
                }
            }
            assert!(t.cands_ok && !t.cands.is_empty());
            assert!(t.cands.iter().all(|c| c.1 > tie), "diff={diff}");
            let bits: u64 = t.bits.iter().map(|w| w.count_ones() as u64).sum();
            assert_eq!(bits, at, "diff={diff}");
        }
        // Every tie kept: the selection is `AtLeast` the tie. A sample with
        // the k-th largest at its first tie (keys above it, then ties) puts
        // the range's bottom at the tie and its top above it.
        let k = above + at;
        assert!(k < n as u64);
        let s = 40_000;
        let r = (k as f64 / n as f64 * s as f64) as usize;
        let mut sample: Vec<u32> = (0..r as u32).map(|j| tie + 1 + j).collect();
        sample.extend(std::iter::repeat_n(tie, s - r));
        for (diff, piece) in [(false, 65_536), (true, 130)] {
            let (stage, _, kept) = select_split(&x, &b, k, &sample, diff, piece);
            assert!(
                matches!(stage, Stage::Guess { split: true, .. }),
                "{stage:?}"
            );
            assert_eq!(kept, reference(&keys, k as usize), "k={k} diff={diff}");
        }
    }

    #[test]
    fn a_tie_at_the_bottom_too_large_for_candidates_is_split_not_coded() {
        // Half the keys one value, a tenth distinct values above it: the
        // guessed range holds more keys than may be candidates (2.4M keys,
        // room for 2²⁰), but without its bottom value only a few thousand.
        let n = 2_400_000usize;
        let tie = magnitude_key(0.25);
        let hash = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        let keys: Vec<u32> = (0..n)
            .map(|i| match hash(i) % 10 {
                0 => tie + 1 + (hash(i + 1) % 1_000_000) as u32,
                1..=5 => tie,
                _ => tie - 1 - (hash(i + 2) % 1_000_000) as u32,
            })
            .collect();
        let above = keys.iter().filter(|&&k| k > tie).count() as u64;
        let even: Vec<u32> = keys.iter().step_by(n / 4096).copied().collect();
        for k in [above - 500, above + 1, above + 1000] {
            let mut t = TopK::new(n as u64, k, true);
            t.guess(&mut even.clone());
            assert!(
                matches!(t.stage, Stage::Guess { split: true, lo, .. } if lo == tie),
                "k={k}: {:?}",
                t.stage
            );
            let expect = reference(&keys, k as usize);
            for chunk in [n, 333_331] {
                let (kept, one) = select_guessed(&keys, k, chunk, &even);
                assert_eq!(kept, expect, "k={k} chunk={chunk}");
                assert!(one, "k={k} chunk={chunk}: one sweep");
            }
        }
    }

    #[test]
    fn range_bits_with_equal_bits_are_the_portable_ones() {
        let keys: Vec<u32> = (0..777u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 97)
            .collect();
        for (lo, hi) in [(0u32, 96u32), (40, 60), (50, 50), (96, 96), (10, 11)] {
            for len in [0usize, 1, 7, 8, 63, 64, 65, 256] {
                let words = len.div_ceil(64);
                let (mut a, mut ea) = (vec![0u64; words], vec![0u64; words]);
                let (mut c, mut ec) = (vec![!0u64; words], vec![!0u64; words]);
                let n_a = range_bits::<true>(&keys[..len], lo, hi - lo, hi, &mut a, &mut ea);
                let n_c =
                    range_bits_portable::<true>(&keys[..len], lo, hi - lo, hi, &mut c, &mut ec);
                assert_eq!((n_a, &a, &ea), (n_c, &c, &ec), "lo={lo} hi={hi} len={len}");
                for e in 0..len {
                    assert_eq!((ec[e / 64] >> (e % 64)) & 1 == 1, keys[e] == lo, "e={e}");
                }
            }
        }
    }

    #[test]
    fn observing_differences_selects_as_observing_keys() {
        let n = 50_000u32;
        let val = |i: u32| (i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32 - 0.5;
        let b: Vec<f32> = (0..n).map(|i| val(i) * 0.1).collect();
        // Plain task vectors (the guess sweep computes keys in registers),
        // and rounded ones: many ties at any threshold (a coded guess).
        for rounded in [false, true] {
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    let d = val(i + 11) * 0.01;
                    let d = if rounded {
                        (d * 6400.0).round() / 4096.0
                    } else {
                        d
                    };
                    b[i as usize] + d
                })
                .collect();
            let keys = diff_keys(&x, &b);
            let sample: Vec<u32> = keys.iter().step_by(7).copied().collect();
            for k in [0u64, 1, 777, 10_000, 25_000, n as u64 - 1, n as u64] {
                let run = |diff| select_observing(&x, &b, &keys, k, &sample, diff);
                let ((stage, by_keys), (_, by_diff)) = (run(false), run(true));
                if !rounded && (1..n as u64).contains(&k) {
                    assert!(matches!(stage, Stage::Guess { .. }), "k={k}");
                }
                assert!(by_keys.is_some(), "k={k}");
                assert_eq!(by_keys, by_diff, "k={k} rounded={rounded}");
            }
        }
    }

    #[test]
    fn observing_tied_differences_after_a_coded_guess_selects_as_observing_keys() {
        // BF16-like task vectors: a few magnitudes, each tied many times, and
        // rare ones that take the escape code; differences exact in f32.
        // More keys in the tie at the threshold than candidates may be
        // recorded (`CANDIDATES`).
        let n = 2_400_000usize;
        let grid = [0.5f32, 0.25, 0.25, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125];
        let hash = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        let b: Vec<f32> = (0..n).map(|i| (hash(i + 7) % 64) as f32 / 16.0).collect();
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let h = hash(i);
                let d = if i % 20_011 == 5 {
                    0.2 + (i / 20_011) as f32 / 1024.0 // rare
                } else {
                    grid[(h % grid.len() as u64) as usize]
                };
                let d = if h & (1 << 20) != 0 { -d } else { d };
                b[i] + d
            })
            .collect();
        let keys = diff_keys(&x, &b);
        let even: Vec<u32> = keys.iter().step_by(n / 4096).copied().collect();
        let on_rare = keys.iter().filter(|&&k| k >= magnitude_key(0.21)).count() as u64;
        for k in [1u64, 480_013, 1_000_001, 1_439_999, on_rare, n as u64 - 1] {
            let run = |diff| select_observing(&x, &b, &keys, k, &even, diff);
            let ((stage, by_keys), (_, by_diff)) = (run(false), run(true));
            let coded = matches!(stage, Stage::GuessCoded { .. });
            if [480_013, 1_000_001, 1_439_999].contains(&k) {
                // Within the large ties: the case under test.
                assert!(coded, "k={k}");
            }
            assert!(by_keys.is_some(), "k={k}");
            assert_eq!(by_keys, by_diff, "k={k}");
        }
    }

    #[test]
    fn range_bits_with_avx2_are_the_portable_bits() {
        let keys: Vec<u32> = (0..1000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) >> (i % 7))
            .chain([0, 1, u32::MAX, 0x8000_0000, 0x7fff_ffff])
            .collect();
        for (lo, hi) in [
            (0u32, u32::MAX),
            (1 << 28, 1 << 30),
            (5, 5),
            (0x7fff_0000, u32::MAX),
        ] {
            for len in [0usize, 7, 8, 63, 64, 65, 1000, keys.len()] {
                let words = len.div_ceil(64).max(1);
                let mut a = vec![u64::MAX; words];
                let mut b = vec![0u64; words];
                let n_a = range_bits::<false>(&keys[..len], lo, hi - lo, hi, &mut a, &mut []);
                let n_b =
                    range_bits_portable::<false>(&keys[..len], lo, hi - lo, hi, &mut b, &mut []);
                assert_eq!((n_a, &a), (n_b, &b), "lo {lo} hi {hi} len {len}");
                if lo == 0 {
                    let mut c = vec![u64::MAX; words];
                    bits_at_most(&keys[..len], hi, &mut c);
                    assert_eq!(c, b, "at most {hi}, len {len}");
                }
                let above = keys[..len].iter().filter(|&&k| k > hi).count() as u64;
                assert_eq!(n_b, above);
                for (e, &k) in keys[..len].iter().enumerate() {
                    assert_eq!((b[e / 64] >> (e % 64)) & 1 == 1, (lo..=hi).contains(&k));
                }
            }
        }
    }

    #[test]
    fn for_segment_agrees_with_keeps() {
        let sels = [
            Selection::Nothing,
            Selection::AtLeast(0),
            Selection::AtLeast(5),
            Selection::Ties {
                key: 5,
                segment: "m".into(),
                index: 2,
            },
        ];
        for s in &sels {
            for seg in ["a", "m", "z"] {
                let (t, lim) = s.for_segment(seg);
                for key in 0..8u32 {
                    for idx in 0..5u64 {
                        let fast = key > t || (key == t && lim.is_some_and(|l| idx <= l));
                        assert_eq!(fast, s.keeps(seg, idx, key), "{s:?} {seg} {key} {idx}");
                    }
                }
            }
        }
    }
}
