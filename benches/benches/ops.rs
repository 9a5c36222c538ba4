//! Criterion benches of building blocks, per entry, each against what it
//! replaces, measured side by side:
//!
//! - `della_keep_row*`: DELLA's keep decisions ([`RankOrder::keep_mask`]) on
//!   GPT-2-shaped rows against the exact-rank route ([`RankOrder::order`]
//!   and a lookup per rank);
//! - `chacha8_draws`: the ChaCha8 words DARE and DELLA draw, one per entry,
//!   in blocks of 256 as DARE's L1 pass takes them ([`Draws::fill`]),
//!   against `rand_chacha`'s `ChaCha8Rng` making the same words one at a
//!   time (`tensormerge_methods::rng::stream`).
//!
//! `cargo bench -p tensormerge-benches --bench ops [-- FILTER]`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tensormerge_benches::Inputs;
use tensormerge_methods::ops::{RankOrder, dare_limit, magnitude_key};
use tensormerge_methods::rng::Draws;

/// DELLA's inputs for `rows` rows of `n` entries: the magnitude keys of a
/// task vector of the benches' synthetic [`Inputs`] (model − base), the
/// ChaCha draws DELLA would make ([`Draws`]) and its keep limits by rank
/// for density 0.2, epsilon 0.15 ([`dare_limit`] + 1, as DELLA's tables).
fn rows(n: usize, rows: usize) -> (Vec<u32>, Vec<u32>, Vec<u64>) {
    let inputs = Inputs::new(n * rows, 1);
    let keys = inputs.models[0]
        .iter()
        .zip(&inputs.base)
        .map(|(x, b)| magnitude_key(x - b))
        .collect();
    let mut draws = vec![0u32; n * rows];
    Draws::new(7, "bench", 0, 0).fill(&mut draws);
    let (d, eps) = (0.2, 0.15);
    let limit = (0..n)
        .map(|r| {
            let p: f64 = (d - eps + 2.0 * eps * r as f64 / (n - 1) as f64).clamp(0.0, 1.0);
            dare_limit(p).map_or(0, |l| l as u64 + 1)
        })
        .collect();
    (keys, draws, limit)
}

fn keep_mask(c: &mut Criterion) {
    for n in [768usize, 3072] {
        let count = (1 << 20) / n;
        let (keys, draws, limit) = rows(n, count);
        let mut group = c.benchmark_group(format!("della_keep_row{n}"));
        group.sample_size(20);
        group.throughput(Throughput::Elements((n * count) as u64));
        let mut ranks = RankOrder::default();
        let mut mask = vec![0u64; n.div_ceil(64)];
        group.bench_function("keep_mask", |b| {
            b.iter(|| {
                let mut kept = 0u32;
                for (k, u) in keys.chunks_exact(n).zip(draws.chunks_exact(n)) {
                    ranks.keep_mask(k, u, &limit, &mut mask);
                    kept += mask.iter().map(|w| w.count_ones()).sum::<u32>();
                }
                kept
            })
        });
        group.bench_function("exact_ranks", |b| {
            b.iter(|| {
                let mut kept = 0u32;
                for (k, u) in keys.chunks_exact(n).zip(draws.chunks_exact(n)) {
                    for (r, &j) in ranks.order(k).iter().enumerate() {
                        kept += u32::from((u[j as usize] as u64) < limit[r]);
                    }
                }
                kept
            })
        });
        group.finish();
    }
}

fn draws(c: &mut Criterion) {
    const N: usize = 1 << 20;
    let mut group = c.benchmark_group("chacha8_draws");
    group.sample_size(20);
    group.throughput(Throughput::Elements(N as u64));
    let mut block = [0u32; 256];
    group.bench_function("Draws::fill", |b| {
        b.iter(|| {
            let mut draws = Draws::new(0, "bench.weight", 0, 0);
            let mut acc = 0u32;
            for _ in 0..N / block.len() {
                draws.fill(&mut block);
                acc ^= block[0] ^ block[255];
            }
            acc
        })
    });
    group.bench_function("rand_chacha", |b| {
        b.iter(|| {
            let mut rng = tensormerge_methods::rng::stream(0, "bench.weight", 0, 0);
            let mut acc = 0u32;
            for _ in 0..N {
                acc ^= rand::RngCore::next_u32(&mut rng);
            }
            acc
        })
    });
    group.finish();
}

criterion_group!(benches, keep_mask, draws);
criterion_main!(benches);
