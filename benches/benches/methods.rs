//! Criterion benches: each method over a 16M-element tensor, 1 base + 3
//! models, in bytes per second of input, next to a plain memory copy of the
//! same bytes (the yardstick).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tensormerge_benches::{CASES, Inputs, NUMEL};

fn methods(c: &mut Criterion) {
    let inputs = Inputs::new(NUMEL, 3);
    let mut group = c.benchmark_group("merge_16M_x4");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(inputs.bytes()));
    let mut dst = vec![0.0f32; NUMEL * 4];
    group.bench_function("memcpy", |b| b.iter(|| inputs.copy_into(&mut dst)));
    let mut out = vec![0.0f32; NUMEL];
    for case in CASES {
        group.bench_function(case.label, |b| {
            b.iter(|| case.run(&inputs, &mut out).expect("merge"))
        });
    }
    group.finish();
}

criterion_group!(benches, methods);
criterion_main!(benches);
