//! Times the phases of the sparsifying methods separately (each sweep of the
//! per-tensor statistics pass, then the merge), three times each, to see
//! where the time goes.
//!
//! `cargo run --release -p tensormerge-benches --bin bench-phases [numel]`
use std::time::Instant;
use tensormerge_benches::{CASES, Inputs};
use tensormerge_methods::{Chunk, TensorContext};
fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(tensormerge_benches::NUMEL);
    let inputs = Inputs::new(n, 3);
    let mut out = vec![0.0f32; n];
    for case in CASES
        .iter()
        .filter(|c| c.method != "linear" && c.method != "task_arithmetic")
    {
        let merge = case.merge(3).expect("merge");
        let shape = [n];
        let ctx = TensorContext {
            name: "bench.weight",
            shape: &shape,
            global: &merge.global,
            models: &merge.models,
            seed: merge.seed,
            model_stats: None,
        };
        let models: Vec<&[f32]> = inputs.models.iter().map(|m| m.as_slice()).collect();
        let aux = vec![None; 3];
        macro_rules! chunk {
            ($stats:expr) => {
                Chunk {
                    tensor: &ctx,
                    offset: 0,
                    base: Some(&inputs.base),
                    models: &models,
                    aux: &aux,
                    base_aux: None,
                    tensor_stats: $stats,
                }
            };
        }
        for _ in 0..3 {
            let mut pass = merge.method.tensor_pass(&ctx).expect("merge");
            let mut line = format!("{:<20}", case.label);
            for sweep in 0..pass.sweeps() {
                let t = Instant::now();
                pass.observe(sweep, &chunk!(None)).expect("merge");
                pass.end_sweep(sweep).expect("merge");
                line += &format!(" s{sweep} {:.1}", t.elapsed().as_secs_f64() * 1e3);
            }
            let stats = pass.finish().expect("merge");
            let t = Instant::now();
            merge
                .method
                .merge(&chunk!(Some(&stats)), &mut out)
                .expect("merge");
            line += &format!(" merge {:.1}", t.elapsed().as_secs_f64() * 1e3);
            println!("{line}");
        }
    }
}
