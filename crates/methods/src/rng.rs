//! Reproducible random streams keyed by (seed, tensor name, model index).
//!
//! `ChaCha8Rng` (portable, specified) seeded from the global seed; the stream
//! id is a 64-bit FNV-1a hash of the tensor name and the model index (stable
//! across platforms and Rust releases, unlike `std`'s hasher); the word
//! position is the element offset, so chunk `k` of a tensor draws exactly the
//! numbers the whole-tensor pass would draw for those elements.
//! [`Draws`] generates the same words in bulk, eight ChaCha blocks at a time
//! (with AVX2 where available), for the methods that draw one word per
//! element.

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

/// Words of keystream generated at a time by [`Draws`]: 8 ChaCha blocks.
const BATCH: usize = 128;

/// The same words as [`stream`] (the `next_u32` sequence of its ChaCha8
/// stream from word `offset` on), generated eight 64-byte blocks at a time,
/// with AVX2 where the CPU has it: several times faster in bulk than
/// `ChaCha8Rng`. ChaCha (Bernstein 2008) is specified bit for bit, so every
/// implementation of the same key, nonce and counter gives the same words; a
/// test checks these against `rand_chacha`'s.
#[derive(Clone)]
pub struct Draws {
    /// The key (the 32-byte seed as little-endian words).
    key: [u32; 8],
    /// The stream id (the 64-bit nonce).
    nonce: u64,
    /// The block counter of the next batch.
    block: u64,
    /// The current batch, and how many of its words were handed out.
    buf: [u32; BATCH],
    used: usize,
    avx2: bool,
}

impl std::fmt::Debug for Draws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Draws(stream {:#x}, block {})", self.nonce, self.block)
    }
}

impl Draws {
    /// The words of [`stream`]`(seed, name, model, offset)`.
    pub fn new(seed: u64, name: &str, model: usize, offset: usize) -> Self {
        let rng = stream(seed, name, model, 0);
        let seed = rng.get_seed();
        let mut key = [0u32; 8];
        for (k, b) in key.iter_mut().zip(seed.chunks_exact(4)) {
            *k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        let mut d = Draws {
            key,
            nonce: rng.get_stream(),
            block: (offset / 16) as u64,
            buf: [0; BATCH],
            used: BATCH,
            avx2,
        };
        let skip = offset % 16;
        if skip > 0 {
            d.refill();
            d.used = skip;
        }
        d
    }

    /// Fills `out` with the next words.
    pub fn fill(&mut self, out: &mut [u32]) {
        let mut at = 0;
        // What is left of the current batch.
        let take = (BATCH - self.used).min(out.len());
        out[..take].copy_from_slice(&self.buf[self.used..self.used + take]);
        self.used += take;
        at += take;
        // Whole batches straight into `out`.
        while out.len() - at >= BATCH {
            let dst: &mut [u32; BATCH] = (&mut out[at..at + BATCH]).try_into().expect("batch");
            self.generate(dst);
            at += BATCH;
        }
        if at < out.len() {
            self.refill();
            let rest = out.len() - at;
            out[at..].copy_from_slice(&self.buf[..rest]);
            self.used = rest;
        }
    }

    fn refill(&mut self) {
        let mut buf = [0u32; BATCH];
        self.generate(&mut buf);
        self.buf = buf;
        self.used = 0;
    }

    /// The next eight blocks into `out`.
    fn generate(&mut self, out: &mut [u32; BATCH]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` was detected on this CPU by `new`.
            unsafe { blocks8_avx2(&self.key, self.nonce, self.block, out) };
            self.block = self.block.wrapping_add(8);
            return;
        }
        blocks8(&self.key, self.nonce, self.block, out);
        self.block = self.block.wrapping_add(8);
    }
}

/// The ChaCha state of block `block` of (`key`, `nonce`): the constants,
/// the key, the 64-bit block counter, the 64-bit nonce (RFC 7539 layout
/// with a 64-bit counter, as `rand_chacha`).
fn initial(key: &[u32; 8], nonce: u64, block: u64) -> [u32; 16] {
    let mut s = [0u32; 16];
    s[..4].copy_from_slice(&SIGMA);
    s[4..12].copy_from_slice(key);
    s[12] = block as u32;
    s[13] = (block >> 32) as u32;
    s[14] = nonce as u32;
    s[15] = (nonce >> 32) as u32;
    s
}

/// "expand 32-byte k".
const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

/// ChaCha8 blocks `block..block + 8` of (`key`, `nonce`), in order, one at a
/// time.
fn blocks8(key: &[u32; 8], nonce: u64, block: u64, out: &mut [u32; BATCH]) {
    fn qr(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(16);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(12);
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(8);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(7);
    }
    for (l, out) in out.chunks_exact_mut(16).enumerate() {
        let s = initial(key, nonce, block.wrapping_add(l as u64));
        let mut x = s;
        // ChaCha8: four double rounds (columns, then diagonals).
        for _ in 0..4 {
            qr(&mut x, 0, 4, 8, 12);
            qr(&mut x, 1, 5, 9, 13);
            qr(&mut x, 2, 6, 10, 14);
            qr(&mut x, 3, 7, 11, 15);
            qr(&mut x, 0, 5, 10, 15);
            qr(&mut x, 1, 6, 11, 12);
            qr(&mut x, 2, 7, 8, 13);
            qr(&mut x, 3, 4, 9, 14);
        }
        for ((o, &x), &s) in out.iter_mut().zip(&x).zip(&s) {
            *o = x.wrapping_add(s);
        }
    }
}

/// Byte shuffles rotating each 32-bit word left by 16 ([`ROT16`]) and by 8
/// ([`ROT8`]), for `vpshufb`.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(32))]
struct Shuffle([u8; 32]);

#[cfg(target_arch = "x86_64")]
static ROT16: Shuffle = Shuffle([
    2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14,
    15, 12, 13,
]);

#[cfg(target_arch = "x86_64")]
static ROT8: Shuffle = Shuffle([
    3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14, 3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15,
    12, 13, 14,
]);

/// One AVX2 instruction as assembly text: `op dst, a, b` on operands named
/// `dst`, `a`, `b` (`b` may be an immediate).
#[cfg(target_arch = "x86_64")]
macro_rules! op {
    ($op:literal, $dst:literal, $a:literal, imm $b:literal) => {
        concat!($op, " {", $dst, "}, {", $a, "}, ", $b, "\n")
    };
    ($op:literal, $dst:literal, $a:literal, $b:literal) => {
        concat!($op, " {", $dst, "}, {", $a, "}, {", $b, "}\n")
    };
}

/// Half of two ChaCha quarter rounds (Bernstein 2008), interleaved, as
/// AVX2 assembly text: for each of `[a, b, c, d]` and `[a2, b2, c2, d2]`
/// (operand names), `a += b; d ^= a; d <<<= rot; c += d; b ^= c; b <<<= l`,
/// where `d`'s rotation is the byte shuffle at the pointer operand `rot`
/// and `b`'s is `(b << l) | (b >> r)` through the scratch register `t`.
#[cfg(target_arch = "x86_64")]
macro_rules! half_pair {
    ($rot:literal, $l:literal, $r:literal, [$a:literal, $b:literal, $c:literal, $d:literal], [$a2:literal, $b2:literal, $c2:literal, $d2:literal]) => {
        concat!(
            op!("vpaddd", $a, $a, $b),
            op!("vpaddd", $a2, $a2, $b2),
            op!("vpxor", $d, $d, $a),
            op!("vpxor", $d2, $d2, $a2),
            "vpshufb {", $d, "}, {", $d, "}, ymmword ptr [{", $rot, "}]\n",
            "vpshufb {", $d2, "}, {", $d2, "}, ymmword ptr [{", $rot, "}]\n",
            op!("vpaddd", $c, $c, $d),
            op!("vpaddd", $c2, $c2, $d2),
            op!("vpxor", "t", $b, $c),
            op!("vpsrld", $b, "t", imm $r),
            op!("vpslld", "t", "t", imm $l),
            op!("vpor", $b, $b, "t"),
            op!("vpxor", "t", $b2, $c2),
            op!("vpsrld", $b2, "t", imm $r),
            op!("vpslld", "t", "t", imm $l),
            op!("vpor", $b2, $b2, "t"),
        )
    };
}

/// Two whole quarter rounds, interleaved ([`half_pair`] with rotations
/// 16, 12, then 8, 7).
#[cfg(target_arch = "x86_64")]
macro_rules! quarter_pair {
    ($q:tt, $q2:tt) => {
        concat!(
            half_pair!("r16", "12", "20", $q, $q2),
            half_pair!("r8", "7", "25", $q, $q2),
        )
    };
}

/// ChaCha8's four double rounds on eight blocks at once (word `i` of every
/// block in `x[i]`), in AVX2 assembly.
///
/// Written out because the compiler's version was 15% slower
/// (hand-measured, both forms alternating in one process): it split the
/// rotation by 16 into two shuffles (`vpshuflw` + `vpshufhw`), rotated
/// both operands of `d ^ a` by 8 instead of their xor (one more shuffle),
/// and moved state through the stack (five stores and five loads per
/// double round, read off `objdump`). Here rows `a`, `b` and `d` (12
/// words) stay in registers, the quarter rounds run in pairs, and only the
/// pair's two `c` words are in registers: the other two wait in memory
/// (two loads and two stores per half round). The same integer operations
/// in the same order: the same words, which
/// `bulk_draws_are_the_chacha8_stream_words` checks against `rand_chacha`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn rounds_avx2(x: &mut [std::arch::x86_64::__m256i; 16]) {
    use std::arch::x86_64::__m256i;
    /// Row `c` (words 8 – 11), 32-byte aligned for `vmovdqa`.
    #[repr(C, align(32))]
    struct RowC([__m256i; 4]);
    let mut c = RowC([x[8], x[9], x[10], x[11]]);
    let [
        mut a0,
        mut a1,
        mut a2,
        mut a3,
        mut b0,
        mut b1,
        mut b2,
        mut b3,
        _,
        _,
        _,
        _,
        mut d0,
        mut d1,
        mut d2,
        mut d3,
    ] = *x;
    // SAFETY: AVX2 is enabled on this function. The assembly reads the two
    // 32-byte-aligned shuffles and reads and writes `c` (four aligned
    // vectors, `m` to `m + 127`), nothing else in memory; it uses only the
    // registers declared here (it clobbers the flags, with `dec`), and no
    // stack.
    unsafe {
        std::arch::asm!(
            "vmovdqa {c0}, ymmword ptr [{m}]",
            "vmovdqa {c1}, ymmword ptr [{m} + 32]",
            "2:",
            // Columns: (0, 4, 8, 12) with (1, 5, 9, 13), words 8 and 9 in c0, c1...
            quarter_pair!(["a0", "b0", "c0", "d0"], ["a1", "b1", "c1", "d1"]),
            "vmovdqa ymmword ptr [{m}], {c0}",
            "vmovdqa ymmword ptr [{m} + 32], {c1}",
            "vmovdqa {c0}, ymmword ptr [{m} + 64]",
            "vmovdqa {c1}, ymmword ptr [{m} + 96]",
            // ...then (2, 6, 10, 14) with (3, 7, 11, 15), words 10 and 11.
            quarter_pair!(["a2", "b2", "c0", "d2"], ["a3", "b3", "c1", "d3"]),
            // Diagonals: (0, 5, 10, 15) with (1, 6, 11, 12), words 10 and 11
            // still in c0, c1...
            quarter_pair!(["a0", "b1", "c0", "d3"], ["a1", "b2", "c1", "d0"]),
            "vmovdqa ymmword ptr [{m} + 64], {c0}",
            "vmovdqa ymmword ptr [{m} + 96], {c1}",
            "vmovdqa {c0}, ymmword ptr [{m}]",
            "vmovdqa {c1}, ymmword ptr [{m} + 32]",
            // ...then (2, 7, 8, 13) with (3, 4, 9, 14), words 8 and 9, which
            // the next columns start with.
            quarter_pair!(["a2", "b3", "c0", "d1"], ["a3", "b0", "c1", "d2"]),
            "dec {n}",
            "jnz 2b",
            "vmovdqa ymmword ptr [{m}], {c0}",
            "vmovdqa ymmword ptr [{m} + 32], {c1}",
            a0 = inout(ymm_reg) a0,
            a1 = inout(ymm_reg) a1,
            a2 = inout(ymm_reg) a2,
            a3 = inout(ymm_reg) a3,
            b0 = inout(ymm_reg) b0,
            b1 = inout(ymm_reg) b1,
            b2 = inout(ymm_reg) b2,
            b3 = inout(ymm_reg) b3,
            d0 = inout(ymm_reg) d0,
            d1 = inout(ymm_reg) d1,
            d2 = inout(ymm_reg) d2,
            d3 = inout(ymm_reg) d3,
            c0 = out(ymm_reg) _,
            c1 = out(ymm_reg) _,
            t = out(ymm_reg) _,
            m = in(reg) c.0.as_mut_ptr(),
            r16 = in(reg) ROT16.0.as_ptr(),
            r8 = in(reg) ROT8.0.as_ptr(),
            // ChaCha8: four double rounds.
            n = inout(reg) 4usize => _,
            options(nostack),
        );
    }
    let [c8, c9, c10, c11] = c.0;
    *x = [
        a0, a1, a2, a3, b0, b1, b2, b3, c8, c9, c10, c11, d0, d1, d2, d3,
    ];
}

/// [`blocks8`] with AVX2: word `i` of the eight blocks in one vector (lane
/// `l` for block `block + l`), then transposed to block order. Integer
/// operations only: the same words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn blocks8_avx2(key: &[u32; 8], nonce: u64, block: u64, out: &mut [u32; BATCH]) {
    use std::arch::x86_64::*;
    let splat = |w: u32| _mm256_set1_epi32(w as i32);
    let b = |l: u64| block.wrapping_add(l);
    let lo = |l: u64| b(l) as u32 as i32;
    let hi = |l: u64| (b(l) >> 32) as u32 as i32;
    let mut s = [_mm256_setzero_si256(); 16];
    for i in 0..4 {
        s[i] = splat(SIGMA[i]);
    }
    for i in 0..8 {
        s[4 + i] = splat(key[i]);
    }
    s[12] = _mm256_setr_epi32(lo(0), lo(1), lo(2), lo(3), lo(4), lo(5), lo(6), lo(7));
    s[13] = _mm256_setr_epi32(hi(0), hi(1), hi(2), hi(3), hi(4), hi(5), hi(6), hi(7));
    s[14] = splat(nonce as u32);
    s[15] = splat((nonce >> 32) as u32);
    let mut x = s;
    rounds_avx2(&mut x);
    for i in 0..16 {
        x[i] = _mm256_add_epi32(x[i], s[i]);
    }
    // Transpose words 0..8 and 8..16 of the eight blocks.
    for half in 0..2 {
        let r = &x[8 * half..8 * half + 8];
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        // u0..u3: words 0-3 (of this half) of blocks 0-3 | 4-7
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        // u4..u7: words 4-7
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        let rows = [
            _mm256_permute2x128_si256::<0x20>(u0, u4),
            _mm256_permute2x128_si256::<0x20>(u1, u5),
            _mm256_permute2x128_si256::<0x20>(u2, u6),
            _mm256_permute2x128_si256::<0x20>(u3, u7),
            _mm256_permute2x128_si256::<0x31>(u0, u4),
            _mm256_permute2x128_si256::<0x31>(u1, u5),
            _mm256_permute2x128_si256::<0x31>(u2, u6),
            _mm256_permute2x128_si256::<0x31>(u3, u7),
        ];
        for (l, row) in rows.into_iter().enumerate() {
            let dst = &mut out[16 * l + 8 * half..16 * l + 8 * half + 8];
            // SAFETY: `dst` holds 8 words (32 bytes); unaligned store.
            unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, row) };
        }
    }
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

    #[test]
    fn bulk_draws_are_the_chacha8_stream_words() {
        for (seed, offset) in [
            (0u64, 0usize),
            (7, 3),
            (42, 16),
            (1 << 40, 127),
            (3, 1000),
            // block counter crossing 2^32 (its high word)
            (5, ((1usize << 32) - 3) * 16 + 5),
        ] {
            let mut one = stream(seed, "model.layers.0.w", 2, offset);
            let expect: Vec<u32> = (0..1500).map(|_| one.next_u32()).collect();
            for cuts in [vec![1500], vec![1, 127, 128, 129, 1115], vec![300, 0, 1200]] {
                let mut d = Draws::new(seed, "model.layers.0.w", 2, offset);
                let mut got = vec![0u32; 1500];
                let mut at = 0;
                for c in cuts {
                    d.fill(&mut got[at..at + c]);
                    at += c;
                }
                assert_eq!(got, expect, "seed {seed} offset {offset}");
            }
            // the portable code, where the AVX2 one was used above
            let mut d = Draws::new(seed, "model.layers.0.w", 2, offset);
            d.avx2 = false;
            let mut got = vec![0u32; 1500];
            d.fill(&mut got);
            assert_eq!(got, expect, "portable, seed {seed} offset {offset}");
        }
    }
}
