//! Prints each method's throughput as a ratio to a memory copy of the same
//! input bytes, measured in the same run (median of several runs each).
//!
//! `cargo run --release -p tensormerge-benches --bin bench-ratios [numel] [runs] [label filter]`

use std::time::{Duration, Instant};

use tensormerge_benches::{CASES, Inputs, NUMEL};

fn median(mut f: impl FnMut(), runs: usize) -> Duration {
    f(); // warm up (page faults, caches)
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let numel = args.next().and_then(|a| a.parse().ok()).unwrap_or(NUMEL);
    let runs = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(7usize)
        .max(1);
    let only = args.next().unwrap_or_default();
    let inputs = Inputs::new(numel, 3);
    let gib = |d: Duration| inputs.bytes() as f64 / d.as_secs_f64() / (1u64 << 30) as f64;
    let mut dst = vec![0.0f32; numel * 4];
    let copy = median(|| inputs.copy_into(&mut dst), runs);
    println!(
        "{numel} elements, 1 base + 3 models, {} MiB of input, median of {runs} runs",
        inputs.bytes() >> 20
    );
    println!(
        "{:<20} {:>10} {:>10} {:>7} {:>7}",
        "method", "ms", "GiB/s", "ratio", "target"
    );
    println!(
        "{:<20} {:>10.1} {:>10.2} {:>7.2} {:>7}",
        "memcpy",
        copy.as_secs_f64() * 1e3,
        gib(copy),
        1.0,
        ""
    );
    let mut out = vec![0.0f32; numel];
    let mut all_met = true;
    for case in CASES.iter().filter(|c| c.label.contains(only.as_str())) {
        let t = median(|| case.run(&inputs, &mut out).expect("merge"), runs);
        let ratio = copy.as_secs_f64() / t.as_secs_f64();
        let met = ratio >= case.target;
        all_met &= met;
        println!(
            "{:<20} {:>10.1} {:>10.2} {:>7.2} {:>7} {}",
            case.label,
            t.as_secs_f64() * 1e3,
            gib(t),
            ratio,
            format!("≥{}", case.target),
            if met { "ok" } else { "BELOW TARGET" }
        );
    }
    if !all_met {
        std::process::exit(1);
    }
}
