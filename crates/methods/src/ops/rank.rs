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
}
