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

impl RankOrder {
    /// Calls `kept(j)` for every position `j` whose draw is below the limit
    /// of its rank: `draws[j] < limit[rank(j)]`, where ranks are those of
    /// [`order`](Self::order) (ascending key, equal keys by position) and
    /// `limit` is non-decreasing in the rank (MagPrune's keep probabilities
    /// grow with the rank). Positions are visited in no particular order.
    ///
    /// The same decisions as ranking every entry, without ranking most of
    /// them: the keys are counted into ordered buckets, which bounds each
    /// entry's rank to its bucket's range `lo..=hi`; a draw below `limit[lo]`
    /// is kept and one at or above `limit[hi]` dropped whatever the exact
    /// rank, and only the buckets holding a draw in between are sorted.
    ///
    /// ```
    /// use tensormerge_methods::ops::RankOrder;
    /// let mut r = RankOrder::default();
    /// let (keys, draws) = ([30, 10, 20, 10], [5, 5, 5, 5]);
    /// let limit = [0, 0, 6, 6]; // ranks 2 and 3 keep a draw of 5
    /// let mut kept = vec![];
    /// r.keep_by_rank(&keys, &draws, &limit, |j| kept.push(j));
    /// kept.sort();
    /// assert_eq!(kept, [0, 2]); // keys 30 (rank 3) and 20 (rank 2)
    /// ```
    pub fn keep_by_rank(
        &mut self,
        keys: &[u32],
        draws: &[u32],
        limit: &[u64],
        mut kept: impl FnMut(usize),
    ) {
        let n = keys.len();
        assert!(
            draws.len() == n && limit.len() == n,
            "one draw and limit per key"
        );
        if n < RADIX_FROM {
            for (r, &j) in self.order(keys).iter().enumerate() {
                if (draws[j as usize] as u64) < limit[r] {
                    kept(j as usize);
                }
            }
            return;
        }
        // Ordered buckets: key >> shift, offset to start at 0, fewer than
        // `buckets`.
        let (lo_key, hi_key) = keys
            .iter()
            .fold((u32::MAX, 0), |(a, b), &k| (a.min(k), b.max(k)));
        let buckets = (n / 4).next_power_of_two();
        let mut shift = 0;
        while ((hi_key >> shift) - (lo_key >> shift)) as usize >= buckets {
            shift += 1;
        }
        let base = lo_key >> shift;
        self.counts.clear();
        self.counts.resize(buckets + 1, 0);
        for &k in keys {
            self.counts[((k >> shift) - base) as usize + 1] += 1;
        }
        for b in 1..=buckets {
            self.counts[b] += self.counts[b - 1];
        }
        // counts[b] = first rank of bucket b; scatter positions (ascending
        // within a bucket) into `order`.
        self.order.clear();
        self.order.resize(n, 0);
        self.tmp_order.clear();
        self.tmp_order.extend_from_slice(&self.counts[..buckets]);
        for (j, &k) in keys.iter().enumerate() {
            let slot = &mut self.tmp_order[((k >> shift) - base) as usize];
            self.order[*slot as usize] = j as u32;
            *slot += 1;
        }
        for b in 0..buckets {
            let (lo, hi) = (self.counts[b] as usize, self.counts[b + 1] as usize);
            if lo == hi {
                continue;
            }
            let (min, max) = (limit[lo], limit[hi - 1]);
            let mut unsure = false;
            for &j in &self.order[lo..hi] {
                let u = draws[j as usize] as u64;
                if u < min {
                    kept(j as usize);
                } else if u < max {
                    unsure = true;
                }
            }
            if unsure {
                // Exact ranks within the bucket, for the draws in between.
                self.packed.clear();
                self.packed.extend(
                    self.order[lo..hi]
                        .iter()
                        .map(|&j| ((keys[j as usize] as u64) << 32) | j as u64),
                );
                self.packed.sort_unstable();
                for (r, &p) in (lo..).zip(&self.packed) {
                    let j = (p & 0xffff_ffff) as usize;
                    let u = draws[j] as u64;
                    if u >= min && u < max && u < limit[r] {
                        kept(j);
                    }
                }
            }
        }
    }
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

    #[test]
    fn keep_by_rank_is_the_ranked_decision() {
        let mut r = RankOrder::default();
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 32) as u32
        };
        for (n, spread) in [
            (5usize, 1u32 << 31),
            (200, 3),
            (768, 1 << 31),
            (768, 40),
            (3000, 1 << 25),
        ] {
            for eps in [0.0, 0.1, 0.3] {
                let keys: Vec<u32> = (0..n).map(|_| (next() % spread) >> 1).collect();
                let draws: Vec<u32> = (0..n).map(|_| next()).collect();
                let limit: Vec<u64> = (0..n)
                    .map(|r| {
                        let p = (0.3 - eps + 2.0 * eps * r as f64 / (n - 1) as f64).clamp(0.0, 1.0);
                        (p * 4_294_967_296.0).ceil() as u64
                    })
                    .collect();
                let mut expected: Vec<usize> = r
                    .order(&keys)
                    .iter()
                    .enumerate()
                    .filter(|&(rank, &j)| (draws[j as usize] as u64) < limit[rank])
                    .map(|(_, &j)| j as usize)
                    .collect();
                expected.sort();
                let mut got = vec![];
                r.keep_by_rank(&keys, &draws, &limit, |j| got.push(j));
                got.sort();
                assert_eq!(got, expected, "n={n} spread={spread} eps={eps}");
            }
        }
    }
}
