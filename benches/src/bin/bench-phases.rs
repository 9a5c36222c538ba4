//! Times the phases of the sparsifying methods separately (each sweep of the
//! per-tensor statistics pass, then the merge), three times each, to see
//! where the time goes: wall and thread CPU time of each run, then the least
//! CPU time of each phase (the least disturbed by other load on the machine).
//!
//! `cargo run --release -p tensormerge-benches --bin bench-phases [numel] [runs] [label filter]`
use std::time::Instant;

/// CPU time of this thread in milliseconds (less disturbed than wall time
/// when other processes compete for the cores).
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}
use tensormerge_benches::{CASES, Inputs, Whole};
fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(tensormerge_benches::NUMEL);
    let runs: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let only = std::env::args().nth(3).unwrap_or_default();
    let inputs = Inputs::new(n, 3);
    let mut out = vec![0.0f32; n];
    for case in CASES
        .iter()
        .filter(|c| c.method != "linear" && c.method != "task_arithmetic")
        .filter(|c| c.label.contains(only.as_str()))
    {
        let mut best: Vec<f64> = Vec::new();
        // The models the case merges (the two-model methods take one).
        let k = case.models(&inputs);
        let merge = case.merge(k).expect("merge");
        // The tensor `bench-ratios` merges ([`Whole`]: rows of 1024, where
        // DELLA ranks within rows; one row of millions costs it ten times
        // more).
        let whole = Whole::new(&merge, &inputs, k, case.self_aux);
        let ctx = whole.context(None);
        // Fisher merging's pass is over the whole model (`model_pass`), and
        // the two-model methods have none: nothing to split into phases.
        if merge.method.tensor_pass(&ctx).is_none() {
            println!("{:<20} no per-tensor pass", case.label);
            continue;
        }
        for _ in 0..runs {
            let mut times = Vec::new();
            let mut pass = merge.method.tensor_pass(&ctx).expect("checked above");
            let mut line = format!("{:<20}", case.label);
            for sweep in 0..pass.sweeps() {
                let (t, c) = (Instant::now(), cpu_ms());
                pass.observe(sweep, &whole.chunk(&ctx, None))
                    .expect("merge");
                pass.end_sweep(sweep).expect("merge");
                times.push(cpu_ms() - c);
                line += &format!(
                    " s{sweep} {:.1} (cpu {:.1})",
                    t.elapsed().as_secs_f64() * 1e3,
                    times[sweep]
                );
            }
            let stats = pass.finish().expect("merge");
            let (t, c) = (Instant::now(), cpu_ms());
            merge
                .method
                .merge(&whole.chunk(&ctx, Some(&stats)), &mut out)
                .expect("merge");
            times.push(cpu_ms() - c);
            line += &format!(
                " merge {:.1} (cpu {:.1})",
                t.elapsed().as_secs_f64() * 1e3,
                times[times.len() - 1]
            );
            println!("{line}");
            if best.is_empty() {
                best = times;
            } else {
                best.iter_mut()
                    .zip(&times)
                    .for_each(|(b, &t)| *b = b.min(t));
            }
        }
        let total: f64 = best.iter().sum();
        let phases: Vec<String> = best.iter().map(|t| format!("{t:.1}")).collect();
        println!(
            "{:<20} least cpu ms: {} (sum {total:.1})",
            case.label,
            phases.join(" ")
        );
    }
}
