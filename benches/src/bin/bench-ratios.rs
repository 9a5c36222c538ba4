//! Prints each method's throughput as a ratio to a memory copy of the same
//! input bytes, measured in the same run.
//!
//! For each method, the copy and the method are timed alternately, `runs`
//! times each (after one warm-up of both), and the ratio is the median copy
//! time over the median method time: both medians come from the same
//! stretch of time, so a machine whose speed drifts (other work, frequency)
//! biases neither side.
//!
//! `cargo run --release -p tensormerge-benches --bin bench-ratios [numel] [runs] [label filter]`

use std::time::{Duration, Instant};

use tensormerge_benches::{CASES, Inputs, NUMEL};

fn time(f: &mut impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Times `copy` and `method` alternately `runs` times (after a warm-up of
/// each: page faults, caches); returns their medians.
fn side_by_side(
    mut copy: impl FnMut(),
    mut method: impl FnMut(),
    runs: usize,
) -> (Duration, Duration) {
    copy();
    method();
    let (mut c, mut m) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        c.push(time(&mut copy));
        m.push(time(&mut method));
    }
    (median(c), median(m))
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
    let mut dst = vec![0.0f32; numel * 4];
    let mut out = vec![0.0f32; numel];
    println!(
        "{numel} elements, 1 base + 3 models, {} MiB of input; memcpy and method timed alternately, medians of {runs} runs",
        inputs.bytes() >> 20
    );
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>7} {:>7}",
        "method", "ms", "GiB/s", "memcpy ms", "ratio", "target"
    );
    let mut all_met = true;
    for case in CASES.iter().filter(|c| c.label.contains(only.as_str())) {
        // The yardstick copies the inputs the case reads (two-model forms:
        // the base and one model).
        let k = case.models(&inputs);
        let gib = |d: Duration| case.bytes(&inputs) as f64 / d.as_secs_f64() / (1u64 << 30) as f64;
        let (copy, t) = side_by_side(
            || inputs.copy_first_into(k, &mut dst),
            || case.run(&inputs, &mut out).expect("merge"),
            runs,
        );
        let ratio = copy.as_secs_f64() / t.as_secs_f64();
        let met = ratio >= case.target;
        all_met &= met;
        println!(
            "{:<20} {:>10.1} {:>10.2} {:>10.1} {:>7.2} {:>7} {}",
            case.label,
            t.as_secs_f64() * 1e3,
            gib(t),
            copy.as_secs_f64() * 1e3,
            ratio,
            format!("≥{}", case.target),
            if met { "ok" } else { "BELOW TARGET" }
        );
    }
    if !all_met {
        std::process::exit(1);
    }
}
