//! Reproducible random streams keyed by (seed, tensor name, model index).
//!
//! `ChaCha8Rng` (portable, specified) seeded from the global seed; the stream
//! id is a 64-bit FNV-1a hash of the tensor name and the model index (stable
//! across platforms and Rust releases, unlike `std`'s hasher); the word
//! position is the element offset, so chunk `k` of a tensor draws exactly the
//! numbers the whole-tensor pass would draw for those elements.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// FNV-1a over `bytes`, continuing from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The stream of model `model` on tensor `name` under `seed`, positioned at
/// element `offset` (one `next_u32` per element).
pub fn stream(seed: u64, name: &str, model: usize, offset: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let h = fnv1a(0xcbf2_9ce4_8422_2325, name.as_bytes());
    let h = fnv1a(h, &(model as u64).to_le_bytes());
    rng.set_stream(h);
    rng.set_word_pos(offset as u128);
    rng
}

/// Whether a draw `u` (from `next_u32`) keeps an entry with probability `p`:
/// `u < p · 2³²`, computed in `f64` (exact for every `u32`). `p ≥ 1` always
/// keeps, `p ≤ 0` never does.
pub fn keep(u: u32, p: f64) -> bool {
    (u as f64) < p * 4_294_967_296.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn offsets_continue_the_same_stream() {
        let mut whole = stream(7, "w", 1, 0);
        let all: Vec<u32> = (0..100).map(|_| whole.next_u32()).collect();
        let mut tail = stream(7, "w", 1, 40);
        let part: Vec<u32> = (0..60).map(|_| tail.next_u32()).collect();
        assert_eq!(&all[40..], &part[..]);
        let mut other = stream(7, "w", 2, 0);
        assert_ne!(
            all[0..4],
            (0..4).map(|_| other.next_u32()).collect::<Vec<_>>()[..]
        );
        let mut other_seed = stream(8, "w", 1, 0);
        assert_ne!(all[0], other_seed.next_u32());
    }
}
