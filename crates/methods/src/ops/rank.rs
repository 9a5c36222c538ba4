//! Ranks within a row: [`RankOrder`], the positions of a row's keys in
//! ascending key order, equal keys by position.
//!
//! DELLA's MagPrune (Deep et al. 2024, arXiv:2406.11617, eq. 1) gives every
//! entry of a row a keep probability linear in its magnitude rank, so every
//! row of every task vector is ranked: 124 M ranks per model for GPT-2-small.
//! A comparison sort of `(key, position)` pairs costs `O(n log n)`
//! comparisons with an indirect load each; the stable least-significant-digit
//! radix sort here costs four counting passes over the bytes of the keys
//! (fewer when a byte is the same for the whole row, as the top byte of
//! magnitudes of one scale often is), with no comparison at all. Its order is
//! the same total order (key, then position), so results are bit for bit
//! those of the comparison sort, which short rows still use.

/// Reusable buffers for ranking rows (no allocation per row once warm).
///
/// ```
/// use tensormerge_methods::ops::RankOrder;
/// let mut r = RankOrder::default();
/// // keys 30, 10, 20, 10: ascending, the two 10s by position.
/// assert_eq!(r.order(&[30, 10, 20, 10]), &[1, 3, 2, 0]);
/// ```
#[derive(Debug, Default, Clone)]
pub struct RankOrder {
    keys: Vec<u32>,
    tmp_keys: Vec<u32>,
    order: Vec<u32>,
    tmp_order: Vec<u32>,
    packed: Vec<u64>,
    counts: Vec<u32>,
    flags: Vec<bool>,
    mask: Vec<u64>,
    lo: Vec<u32>,
    hi: Vec<u32>,
}

/// Rows shorter than this are ranked by a comparison sort of packed
/// `(key, position)` words (the radix sort's fixed cost of its count tables
/// does not pay off there).
const RADIX_FROM: usize = 128;

impl RankOrder {
    /// The positions `0..keys.len()` of `keys` in ascending key order, equal
    /// keys in ascending position: element `r` of the result is the position
    /// of the entry of rank `r`. At most `u32::MAX` keys.
    pub fn order(&mut self, keys: &[u32]) -> &[u32] {
        let n = keys.len();
        assert!(n <= u32::MAX as usize, "RankOrder: more than 2^32 - 1 keys");
        self.order.clear();
        if n < RADIX_FROM {
            self.packed.clear();
            self.packed.extend(
                keys.iter()
                    .enumerate()
                    .map(|(j, &k)| ((k as u64) << 32) | j as u64),
            );
            self.packed.sort_unstable();
            self.order
                .extend(self.packed.iter().map(|&p| (p & 0xffff_ffff) as u32));
            return &self.order;
        }
        let mut counts = [[0u32; 256]; 4];
        for &k in keys {
            for (b, c) in counts.iter_mut().enumerate() {
                c[((k >> (8 * b)) & 0xff) as usize] += 1;
            }
        }
        self.keys.clear();
        self.keys.extend_from_slice(keys);
        self.order.extend(0..n as u32);
        self.tmp_keys.resize(n, 0);
        self.tmp_order.resize(n, 0);
        for (b, c) in counts.iter().enumerate() {
            let digit = |k: u32| ((k >> (8 * b)) & 0xff) as usize;
            if c[digit(self.keys[0])] as usize == n {
                continue; // every key has this byte: the pass would not move anything
            }
            let mut next = [0u32; 256];
            let mut at = 0u32;
            for (d, &count) in c.iter().enumerate() {
                next[d] = at;
                at += count;
            }
            for (&k, &p) in self.keys.iter().zip(&self.order) {
                let slot = &mut next[digit(k)];
                self.tmp_keys[*slot as usize] = k;
                self.tmp_order[*slot as usize] = p;
                *slot += 1;
            }
            std::mem::swap(&mut self.keys, &mut self.tmp_keys);
            std::mem::swap(&mut self.order, &mut self.tmp_order);
        }
        &self.order
    }
}

/// Keys at or above this one are not the bits of a finite non-negative
/// `f32` (infinity, NaN, or keys with the top bit set): [`RankOrder::keep_mask`]
/// puts them in its top bucket.
const NOT_FINITE: u32 = 0x7f80_0000;

impl RankOrder {
    /// Calls `kept(j)` for every position `j` whose draw is below the limit
    /// of its rank: `draws[j] < limit[rank(j)]`, where ranks are those of
    /// [`order`](Self::order) (ascending key, equal keys by position) and
    /// `limit` is non-decreasing in the rank (MagPrune's keep probabilities
    /// grow with the rank). Positions are visited in ascending order; the
    /// decisions are those of [`keep_mask`](Self::keep_mask).
    ///
    /// ```
    /// use tensormerge_methods::ops::RankOrder;
    /// let mut r = RankOrder::default();
    /// let (keys, draws) = ([30, 10, 20, 10], [5, 5, 5, 5]);
    /// let limit = [0, 0, 6, 6]; // ranks 2 and 3 keep a draw of 5
    /// let mut kept = vec![];
    /// r.keep_by_rank(&keys, &draws, &limit, |j| kept.push(j));
    /// assert_eq!(kept, [0, 2]); // keys 30 (rank 3) and 20 (rank 2)
    /// ```
    pub fn keep_by_rank(
        &mut self,
        keys: &[u32],
        draws: &[u32],
        limit: &[u64],
        mut kept: impl FnMut(usize),
    ) {
        let mut mask = std::mem::take(&mut self.mask);
        mask.clear();
        mask.resize(keys.len().div_ceil(64), 0);
        self.keep_mask(keys, draws, limit, &mut mask);
        for (w, &word) in mask.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                kept(64 * w + word.trailing_zeros() as usize);
                word &= word - 1;
            }
        }
        self.mask = mask;
    }

    /// The keep decisions of [`keep_by_rank`](Self::keep_by_rank) as a mask:
    /// bit `j % 64` of `mask[j / 64]` is set when `draws[j] <
    /// limit[rank(j)]`, cleared otherwise (`mask.len()` must be
    /// `keys.len().div_ceil(64)`; `limit` non-decreasing).
    ///
    /// Most entries need no exact rank. The keys are counted into ordered
    /// buckets (a quarter as many as keys, linear in the magnitude when the
    /// keys are [`magnitude_key`](super::magnitude_key)s, so that few keys
    /// share one), which bounds each entry's rank to its bucket's range
    /// `lo..=hi`: a draw below `limit[lo]` is kept and one at or above
    /// `limit[hi]` dropped whatever the exact rank. This is one branch-free
    /// sweep in position order. The few entries whose draw lies in between
    /// (about `2ε · (bucket size − 1)` per row for MagPrune: one or two)
    /// get their exact rank: counted directly over the row when there are
    /// at most [`DIRECT_RANKS`] of them, else by sorting the buckets that
    /// hold them. Any bucket function that does not decrease with the key
    /// gives the same decisions; the one here only makes the uncertain
    /// entries rare.
    pub fn keep_mask(&mut self, keys: &[u32], draws: &[u32], limit: &[u64], mask: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { self.keep_mask_avx2(keys, draws, limit, mask) };
            return;
        }
        self.keep_mask_with(keys, draws, limit, mask, false)
    }

    /// [`keep_mask`](Self::keep_mask) compiled for AVX2, with the bucket and
    /// sweep phases in AVX2 intrinsics (the same bucket ids and decisions).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn keep_mask_avx2(&mut self, keys: &[u32], draws: &[u32], limit: &[u64], mask: &mut [u64]) {
        self.keep_mask_with(keys, draws, limit, mask, true)
    }

    /// The phases of [`keep_mask`](Self::keep_mask); `simd` selects the AVX2
    /// bucket and sweep loops (only when the CPU has AVX2).
    #[inline(always)]
    fn keep_mask_with(
        &mut self,
        keys: &[u32],
        draws: &[u32],
        limit: &[u64],
        mask: &mut [u64],
        simd: bool,
    ) {
        let n = keys.len();
        assert!(
            draws.len() == n && limit.len() == n,
            "one draw and limit per key"
        );
        assert!(mask.len() == n.div_ceil(64), "one mask bit per key");
        assert!(n < u32::MAX as usize / 2, "RankOrder: too many keys");
        mask.iter_mut().for_each(|w| *w = 0);
        if n < RADIX_FROM {
            for (r, &j) in self.order(keys).iter().enumerate() {
                if (draws[j as usize] as u64) < limit[r] {
                    mask[j as usize / 64] |= 1 << (j % 64);
                }
            }
            return;
        }
        let buckets = (n / 4).max(1);
        let top = buckets as u32 - 1;
        let max_finite = keys
            .iter()
            .fold(0u32, |m, &k| m.max(if k < NOT_FINITE { k } else { 0 }));
        let scale = buckets as f32 / f32::from_bits(max_finite);
        self.keys.resize(n, 0); // (every id is written below)
        let ids = &mut self.keys[..n];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only set by `keep_mask_avx2`, which runs on
            // CPUs with AVX2.
            unsafe { bucket_ids_avx2(keys, scale, top, ids) };
        } else {
            bucket_ids(keys, scale, top, ids);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = simd;
            bucket_ids(keys, scale, top, ids);
        }
        // counts[b + 1] = the size of bucket b.
        self.counts.clear();
        self.counts.resize(buckets + 1, 0);
        let counts = &mut self.counts[..];
        for &b in ids.iter() {
            counts[b as usize + 1] += 1;
        }
        // Then counts[b] = the first rank of bucket b, and lo[b], hi[b] = the
        // limits of the first and last rank of bucket b (if not empty),
        // capped to u32::MAX: `u < min(l, 2^32 − 1)` is `u < l` for every
        // draw but u32::MAX, which is always resolved exactly. No branch:
        // about half the buckets are empty, unpredictably.
        let cap = |l: u64| l.min(u32::MAX as u64) as u32;
        self.lo.resize(buckets, 0); // (every entry is written below)
        self.hi.resize(buckets, 0);
        let (lo, hi) = (&mut self.lo[..buckets], &mut self.hi[..buckets]);
        let mut first = 0u32;
        for ((c, lo), hi) in counts[1..].iter_mut().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            let start = first;
            first += *c;
            *c = first;
            *lo = cap(limit[(start as usize).min(n - 1)]);
            *hi = cap(limit[(first.max(1) - 1) as usize]);
        }
        // One sweep: sure keeps into the mask, uncertain positions listed.
        self.order.resize(self.order.len().max(n), 0); // (a list of at most n positions)
        let list = &mut self.order[..n];
        let (ids, lo, hi) = (&self.keys[..n], &self.lo[..buckets], &self.hi[..buckets]);
        #[cfg(target_arch = "x86_64")]
        let unsure = if simd {
            // SAFETY: as for `bucket_ids_avx2` above.
            unsafe { sweep_avx2(ids, draws, lo, hi, mask, list) }
        } else {
            sweep(ids, draws, lo, hi, mask, list)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let unsure = sweep(ids, draws, lo, hi, mask, list);
        if unsure == 0 {
            return;
        }
        if unsure <= DIRECT_RANKS {
            // rank(j) = the keys below key j, plus the equal keys before j.
            for &j in &self.order[..unsure] {
                let j = j as usize;
                let k = keys[j];
                let below: u32 = keys.iter().map(|&o| u32::from(o < k)).sum();
                let equal: u32 = keys[..j].iter().map(|&o| u32::from(o == k)).sum();
                if (draws[j] as u64) < limit[(below + equal) as usize] {
                    mask[j / 64] |= 1 << (j % 64);
                }
            }
            return;
        }
        // Exact ranks in the buckets of the uncertain entries: their keys and
        // positions sorted (whole buckets, in bucket order as the buckets do
        // not decrease with the key); rank = the bucket's first rank plus the
        // place within the bucket. A draw below the limit of its exact rank
        // is kept (entries already decided agree: limit is non-decreasing).
        self.flags.clear();
        self.flags.resize(buckets, false);
        for &e in &self.order[..unsure] {
            self.flags[ids[e as usize] as usize] = true;
        }
        self.packed.clear();
        let flags = &self.flags[..];
        self.packed.extend(
            ids.iter()
                .zip(keys)
                .enumerate()
                .filter(|&(_, (&b, _))| flags[b as usize])
                .map(|(j, (_, &k))| ((k as u64) << 32) | j as u64),
        );
        self.packed.sort_unstable();
        let counts = &self.counts[..];
        let (mut current, mut from) = (u32::MAX, 0usize);
        for (at, &p) in self.packed.iter().enumerate() {
            let j = (p & 0xffff_ffff) as usize;
            let b = ids[j];
            if b != current {
                (current, from) = (b, at);
            }
            let rank = counts[b as usize] as usize + (at - from);
            if (draws[j] as u64) < limit[rank] {
                mask[j / 64] |= 1 << (j % 64);
            }
        }
    }
}

/// [`RankOrder::keep_mask`] counts the exact ranks of up to this many
/// uncertain entries of a row directly (one vectorised pass over the row's
/// keys each); more are resolved by sorting their buckets.
pub const DIRECT_RANKS: usize = 4;

/// The bucket of each key for [`RankOrder::keep_mask`]: its `f32` magnitude
/// times `scale`, capped to `top` and truncated; keys that are no finite
/// magnitude (`>= NOT_FINITE`) go to `top`. Non-decreasing in the key:
/// rounding a product by a non-negative factor is monotone, as are the cap
/// and the truncation. A NaN product (only from a zero magnitude times an
/// infinite `scale`, when every other finite key is `top` anyway) is `top`,
/// as `f32::min` returns the number.
#[inline(always)]
fn bucket_ids(keys: &[u32], scale: f32, top: u32, ids: &mut [u32]) {
    let top_f = top as f32;
    for (id, &k) in ids.iter_mut().zip(keys) {
        let b = ((f32::from_bits(k) * scale).min(top_f).max(0.0) as u32).min(top);
        *id = if k >= NOT_FINITE { top } else { b };
    }
}

/// [`bucket_ids`] in AVX2 intrinsics (the same ids: `_mm256_min_ps` returns
/// its second operand, the cap, for a NaN product as `f32::min` does, and
/// truncates the same non-negative values below `2^31`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn bucket_ids_avx2(keys: &[u32], scale: f32, top: u32, ids: &mut [u32]) {
    use std::arch::x86_64::*;
    let n = keys.len().min(ids.len());
    let (scale_v, top_f) = (_mm256_set1_ps(scale), _mm256_set1_ps(top as f32));
    let (top_i, not_finite) = (
        _mm256_set1_epi32(top as i32),
        _mm256_set1_epi32(NOT_FINITE as i32),
    );
    let zero = _mm256_setzero_ps();
    for g in 0..n / 8 {
        // SAFETY: `8 g + 8 <= n` for both slices; unaligned loads and stores.
        let k = unsafe { _mm256_loadu_si256(keys.as_ptr().add(8 * g) as *const __m256i) };
        let f = _mm256_mul_ps(_mm256_castsi256_ps(k), scale_v);
        let f = _mm256_max_ps(_mm256_min_ps(f, top_f), zero);
        let b = _mm256_min_epu32(_mm256_cvttps_epi32(f), top_i);
        let special = _mm256_cmpeq_epi32(_mm256_max_epu32(k, not_finite), k);
        let b = _mm256_blendv_epi8(b, top_i, special);
        // SAFETY: as above.
        unsafe { _mm256_storeu_si256(ids.as_mut_ptr().add(8 * g) as *mut __m256i, b) };
    }
    let done = 8 * (n / 8);
    bucket_ids(&keys[done..n], scale, top, &mut ids[done..n]);
}

/// The decision of the sweep for one entry with draw `u` in a bucket whose
/// first and last ranks have limits `lo` and `hi`: `(keep, unsure)`, where
/// `keep` holds whatever the exact rank and `unsure` asks for the exact rank
/// (the draw lies in between, or is `u32::MAX`, which the capped limits
/// cannot decide).
#[inline(always)]
fn decide(u: u32, lo: u32, hi: u32) -> (bool, bool) {
    let keep = u < lo;
    (keep, (u < hi && !keep) | (u == u32::MAX))
}

/// The sweep of [`RankOrder::keep_mask`]: the bits of the entries whose draw
/// is below the limit of their bucket's first rank (`lo`, kept whatever the
/// exact rank) into `mask` (cleared), and the positions whose draw lies
/// between that and the limit of the bucket's last rank (`hi`), or is
/// `u32::MAX`, listed in `list`; returns how many were listed.
#[inline(always)]
fn sweep(
    ids: &[u32],
    draws: &[u32],
    lo: &[u32],
    hi: &[u32],
    mask: &mut [u64],
    list: &mut [u32],
) -> usize {
    let n = ids.len();
    let mut unsure = 0usize;
    for (w, word) in mask.iter_mut().enumerate() {
        let first = 64 * w;
        let last = (first + 64).min(n);
        let mut bits = 0u64;
        for (e, (&b, &u)) in ids[first..last].iter().zip(&draws[first..last]).enumerate() {
            let (keep, maybe) = decide(u, lo[b as usize], hi[b as usize]);
            bits |= u64::from(keep) << e;
            list[unsure] = (first + e) as u32;
            unsure += usize::from(maybe);
        }
        *word |= bits;
    }
    unsure
}

/// [`sweep`] in AVX2 intrinsics, eight entries at a time with gathers of
/// `lo` and `hi` (the same bits and list). Bucket ids are capped to the last
/// bucket before the gathers, so every load is in bounds whatever `ids`
/// holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sweep_avx2(
    ids: &[u32],
    draws: &[u32],
    lo: &[u32],
    hi: &[u32],
    mask: &mut [u64],
    list: &mut [u32],
) -> usize {
    use std::arch::x86_64::*;
    let n = ids.len();
    assert!(
        draws.len() == n && list.len() >= n && mask.len() == n.div_ceil(64),
        "sweep: one draw, mask bit and list slot per entry"
    );
    assert!(
        !lo.is_empty() && lo.len() == hi.len() && lo.len() <= i32::MAX as usize,
        "sweep: one lo and hi per bucket"
    );
    let last = _mm256_set1_epi32((lo.len() - 1) as i32);
    let all = _mm256_set1_epi32(-1);
    let mut unsure = 0usize;
    let octets = n / 8;
    for g in 0..octets {
        // SAFETY: `8 g + 8 <= n` for `ids` and `draws`; unaligned loads. The
        // gather indices are capped to `lo.len() − 1` (as unsigned, so also
        // non-negative as `i32`), inside `lo` and `hi`.
        let (u, l, h) = unsafe {
            let b = _mm256_loadu_si256(ids.as_ptr().add(8 * g) as *const __m256i);
            let b = _mm256_min_epu32(b, last);
            let u = _mm256_loadu_si256(draws.as_ptr().add(8 * g) as *const __m256i);
            let l = _mm256_i32gather_epi32::<4>(lo.as_ptr() as *const i32, b);
            let h = _mm256_i32gather_epi32::<4>(hi.as_ptr() as *const i32, b);
            (u, l, h)
        };
        // u >= l (unsigned) is max(u, l) == u.
        let ge_l = _mm256_cmpeq_epi32(_mm256_max_epu32(u, l), u);
        let ge_h = _mm256_cmpeq_epi32(_mm256_max_epu32(u, h), u);
        let is_max = _mm256_cmpeq_epi32(u, all);
        let keep = !_mm256_movemask_ps(_mm256_castsi256_ps(ge_l)) as u32 & 0xff;
        let maybe = _mm256_or_si256(_mm256_andnot_si256(ge_h, ge_l), is_max);
        let mut m = _mm256_movemask_ps(_mm256_castsi256_ps(maybe)) as u32;
        mask[g / 8] |= (keep as u64) << (8 * (g % 8));
        while m != 0 {
            list[unsure] = (8 * g) as u32 + m.trailing_zeros();
            unsure += 1;
            m &= m - 1;
        }
    }
    let done = 8 * octets;
    if done < n {
        // The tail: at most 7 entries, in the last mask word.
        for e in done..n {
            let (u, b) = (draws[e], ids[e].min(lo.len() as u32 - 1) as usize);
            let (keep, maybe) = decide(u, lo[b], hi[b]);
            mask[e / 64] |= u64::from(keep) << (e % 64);
            if maybe {
                list[unsure] = e as u32;
                unsure += 1;
            }
        }
    }
    unsure
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: a stable comparison sort by key.
    fn reference(keys: &[u32]) -> Vec<u32> {
        let mut o: Vec<u32> = (0..keys.len() as u32).collect();
        o.sort_by_key(|&j| keys[j as usize]);
        o
    }

    #[test]
    fn radix_order_is_the_stable_sort_order() {
        let mut r = RankOrder::default();
        let mut s = 0x1234_5678_9abc_def0u64;
        for (n, spread) in [
            (0usize, 1u32),
            (1, 1),
            (5, 3),
            (127, 1 << 31),
            (128, 1 << 31),
            (768, 1 << 31),
            (768, 7),
            (3072, 1 << 20),
            (5000, 1 << 31),
        ] {
            let keys: Vec<u32> = (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Keys of one scale share their top byte, some share more.
                    0x3c00_0000 | (((s >> 33) as u32 % spread) & 0x3ff_ffff)
                })
                .collect();
            assert_eq!(r.order(&keys), reference(&keys), "n={n} spread={spread}");
        }
        // All equal; all distinct bytes in every position.
        assert_eq!(r.order(&[9; 300]), reference(&[9; 300]));
        let wide: Vec<u32> = (0..1000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) >> 1)
            .collect();
        assert_eq!(r.order(&wide), reference(&wide));
    }

    /// `keep_mask` and `keep_by_rank` against ranks from a stable sort, on
    /// keys of several kinds (magnitudes of one scale, with an outlier, many
    /// ties, all equal, zeros, infinities and NaNs, arbitrary words with the
    /// top bit set) and limits that reach 0 and 2^32.
    #[test]
    fn keep_by_rank_is_the_ranked_decision() {
        let mut r = RankOrder::default();
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 32) as u32
        };
        let magnitude =
            |u: u32, scale: f32| ((u as f32 / 4e9 - 0.5) * scale).to_bits() & 0x7fff_ffff;
        for n in [5usize, 127, 128, 200, 768, 1000, 3000] {
            let kinds: Vec<(&str, Vec<u32>)> = vec![
                (
                    "spread",
                    (0..n).map(|_| (next() % (1 << 31)) >> 1).collect(),
                ),
                ("few", (0..n).map(|_| next() % 3).collect()),
                (
                    "magnitudes",
                    (0..n).map(|_| magnitude(next(), 0.02)).collect(),
                ),
                (
                    "outlier",
                    (0..n)
                        .map(|j| magnitude(next(), if j == 7 { 1e6 } else { 0.02 }))
                        .collect(),
                ),
                (
                    "special",
                    (0..n)
                        .map(|j| match j % 11 {
                            0 => 0,
                            1 => 0x7f80_0000,
                            2 => 0x7fc0_0000 + j as u32,
                            3 => 1,
                            _ => magnitude(next(), 3.0),
                        })
                        .collect(),
                ),
                ("words", (0..n).map(|_| next()).collect()),
                ("equal", vec![0x3c00_0000; n]),
                (
                    // Equal neighbours spread over one binade: few uncertain
                    // entries, each with an equal key before or after it.
                    "pairs",
                    (0..n as u32)
                        .map(|j| {
                            0x3c00_0000 + ((j / 2).wrapping_mul(2_654_435_761) % n as u32) * 16
                        })
                        .collect(),
                ),
                ("zeros", vec![0; n]),
            ];
            for (kind, keys) in kinds {
                for (d, eps) in [(0.3, 0.0), (0.3, 0.1), (0.2, 0.3), (0.9, 0.3), (0.5, 0.5)] {
                    let draws: Vec<u32> = (0..n).map(|_| next()).collect();
                    let limit: Vec<u64> = (0..n)
                        .map(|r| {
                            let f = if n > 1 {
                                r as f64 / (n - 1) as f64
                            } else {
                                0.5
                            };
                            let p = (d - eps + 2.0 * eps * f).clamp(0.0, 1.0);
                            (p * 4_294_967_296.0).ceil() as u64
                        })
                        .collect();
                    let mut expected: Vec<usize> = reference(&keys)
                        .iter()
                        .enumerate()
                        .filter(|&(rank, &j)| (draws[j as usize] as u64) < limit[rank])
                        .map(|(_, &j)| j as usize)
                        .collect();
                    expected.sort();
                    let mut got = vec![];
                    r.keep_by_rank(&keys, &draws, &limit, |j| got.push(j));
                    assert_eq!(got, expected, "n={n} {kind} d={d} eps={eps}");
                    let mut mask = vec![u64::MAX; n.div_ceil(64)];
                    r.keep_mask(&keys, &draws, &limit, &mut mask);
                    let from_mask: Vec<usize> = (0..n)
                        .filter(|&j| (mask[j / 64] >> (j % 64)) & 1 == 1)
                        .collect();
                    assert_eq!(from_mask, expected, "mask: n={n} {kind} d={d} eps={eps}");
                    assert!(
                        n % 64 == 0 || mask[n / 64] >> (n % 64) == 0,
                        "bits past the end"
                    );
                    // The portable loops give the same mask as the AVX2 ones.
                    let mut portable = vec![u64::MAX; n.div_ceil(64)];
                    r.keep_mask_with(&keys, &draws, &limit, &mut portable, false);
                    assert_eq!(portable, mask, "portable: n={n} {kind} d={d} eps={eps}");
                }
            }
        }
    }
}
