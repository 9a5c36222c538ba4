//! The pass protocol of `merge_tensor_reusing`: sweeps, early completion,
//! merge parts, buffer reuse.

use std::sync::Arc;

use tensormerge_methods::*;

/// Sums the first model over a declared three sweeps, and is complete after
/// the first; merges as `model + sum`.
struct SumOnce;

struct SumPass {
    sum: f64,
    swept: usize,
    early: bool,
}

impl StatsPass for SumPass {
    fn sweeps(&self) -> usize {
        3
    }
    fn observe(&mut self, sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        if sweep == 0 {
            self.sum += chunk.models[0].iter().map(|&v| v as f64).sum::<f64>();
        }
        Ok(())
    }
    fn end_sweep(&mut self, _sweep: usize) -> Result<(), MethodError> {
        self.swept += 1;
        Ok(())
    }
    fn done(&self) -> bool {
        self.early && self.swept >= 1
    }
    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Ok(Arc::new((self.sum, self.swept)))
    }
}

static INFO: MethodInfo = MethodInfo {
    name: "test_sum_once",
    summary: "test",
    paper: "none",
    base: BaseModel::Unused,
    min_models: 1,
    max_models: None,
    params: &[],
};

impl MergeMethod for SumOnce {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn tensor_pass(&self, t: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        Some(Box::new(SumPass {
            sum: 0.0,
            swept: 0,
            early: t.name == "early",
        }))
    }
    fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let (sum, swept) = c
            .tensor_stats
            .and_then(|s| s.downcast_ref::<(f64, usize)>())
            .copied()
            .expect("stats");
        for (o, &x) in out.iter_mut().zip(c.models[0]) {
            *o = x + sum as f32 + swept as f32 * 1000.0;
        }
        Ok(())
    }
}

/// Runs `SumOnce` on `values` in chunks of `chunk`; returns the output, the
/// number of fetches and the offsets and lengths handed to the sink.
fn run(name: &str, values: &[f32], chunk: usize) -> (Vec<f32>, usize, Vec<(usize, usize)>) {
    let merge = Merge::with_defaults(&SumOnce, 1).unwrap();
    let shape = [values.len()];
    let ctx = TensorContext {
        name,
        shape: &shape,
        global: &merge.global,
        models: &merge.models,
        seed: 0,
        model_stats: None,
    };
    let mut fetches = 0;
    let mut out = vec![f32::NAN; values.len()];
    let mut pieces = Vec::new();
    let mut bufs = MergeBuffers::default();
    merge_tensor_reusing::<MethodError>(
        &SumOnce,
        &ctx,
        chunk,
        &mut bufs,
        |r, data| {
            fetches += 1;
            data.refill::<MethodError>(false, 1, &[false], false, |_, buf| {
                buf.clear();
                buf.extend_from_slice(&values[r.clone()]);
                Ok(())
            })
        },
        |off, v| {
            pieces.push((off, v.len()));
            out[off..off + v.len()].copy_from_slice(v);
            Ok(())
        },
    )
    .unwrap();
    (out, fetches, pieces)
}

#[test]
fn a_pass_that_is_done_early_skips_the_remaining_sweeps_and_their_reads() {
    let values: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    // 4 chunks: three sweeps and the merge read each chunk once...
    let (out, fetches, _) = run("full", &values, 250);
    assert_eq!(fetches, 4 * 4);
    assert!(
        out.iter()
            .zip(&values)
            .all(|(o, x)| *o == x + sum as f32 + 3000.0)
    );
    // ...unless the pass is complete after the first sweep.
    let (out, fetches, _) = run("early", &values, 250);
    assert_eq!(fetches, 4 * 2);
    assert!(
        out.iter()
            .zip(&values)
            .all(|(o, x)| *o == x + sum as f32 + 1000.0)
    );
    // One chunk is read once, however many sweeps.
    let (_, fetches, _) = run("full", &values, usize::MAX);
    assert_eq!(fetches, 1);
}

#[test]
fn a_whole_chunk_is_merged_and_handed_over_in_parts_in_order() {
    let n = 200_000; // more than one 65 536-element part
    let values: Vec<f32> = (0..n).map(|i| (i % 11) as f32).collect();
    let (out, fetches, pieces) = run("early", &values, usize::MAX);
    assert_eq!(fetches, 1);
    assert!(pieces.len() > 1 && pieces.iter().all(|&(_, len)| len <= 1 << 16));
    let mut at = 0;
    for &(off, len) in &pieces {
        assert_eq!(off, at, "parts in order, without gaps");
        at += len;
    }
    assert_eq!(at, n);
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    assert!(
        out.iter()
            .zip(&values)
            .all(|(o, x)| *o == x + sum as f32 + 1000.0)
    );
}
