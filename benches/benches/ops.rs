//! Criterion benches of `ops` building blocks on GPT-2-shaped rows, per
//! entry: DELLA's keep decisions ([`RankOrder::keep_mask`]) against the
//! exact-rank route they replace ([`RankOrder::order`] and a lookup per
//! rank), measured side by side.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tensormerge_methods::ops::{RankOrder, magnitude_key};

/// Task-vector-like keys (magnitudes of a sum of uniforms, about normal),
/// draws and MagPrune limits (density 0.2, epsilon 0.15) for `rows` rows of
/// `n` entries.
fn rows(n: usize, rows: usize) -> (Vec<u32>, Vec<u32>, Vec<u64>) {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 32) as u32
    };
    let keys = (0..n * rows)
        .map(|_| {
            let v: f32 = (0..4).map(|_| next() as f32 / 4.294_967e9 - 0.5).sum();
            magnitude_key(v * 0.01)
        })
        .collect();
    let draws = (0..n * rows).map(|_| next()).collect();
    let (d, eps) = (0.2, 0.15);
    let limit = (0..n)
        .map(|r| {
            let p: f64 = (d - eps + 2.0 * eps * r as f64 / (n - 1) as f64).clamp(0.0, 1.0);
            (p * 4_294_967_296.0).ceil() as u64
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

criterion_group!(benches, keep_mask);
criterion_main!(benches);
