//! # tensormerge-benches
//!
//! Throughput of the merge methods on one large tensor (16M elements by
//! default), 1 base + 3 models, against a plain memory copy of the same input
//! bytes measured in the same run. Results are ratios: a method's bytes per
//! second over the copy's. Targets: `linear` and `task_arithmetic` at least
//! 0.5, `ties` and `dare_*` at least 0.2.
//!
//! - `cargo bench -p tensormerge-benches` runs the criterion benches
//!   (`benches/methods.rs`, bytes per second);
//! - `cargo run --release -p tensormerge-benches --bin bench-ratios` prints
//!   the ratios directly;
//! - `--bin bench-phases` times each sweep of the statistics pass and the
//!   merge of the sparsifying methods separately;
//! - `--bin bench-checksum [numel]` prints a checksum of each method's output
//!   bits, to check that an optimisation leaves results bit-identical.
//!
//! ```
//! use tensormerge_benches::{Inputs, CASES};
//! let inputs = Inputs::new(1000, 3);
//! let mut out = vec![0.0f32; 1000];
//! for case in CASES {
//!     case.run(&inputs, &mut out).unwrap();
//!     assert!(out.iter().all(|v| v.is_finite()), "{}", case.label);
//! }
//! ```
#![deny(missing_docs)]

use tensormerge_methods::{Chunk, Merge, MethodError, ParamValue, TensorContext, registry};

use tensormerge_method_dare as _;
use tensormerge_method_linear as _;
use tensormerge_method_task_arithmetic as _;
use tensormerge_method_ties as _;

/// Elements per tensor in the benchmarks (16M).
pub const NUMEL: usize = 16 * 1024 * 1024;

/// One base and several models of one tensor, with deterministic
/// pseudo-random values (fine-tunes = base + small deltas).
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The base.
    pub base: Vec<f32>,
    /// The models.
    pub models: Vec<Vec<f32>>,
}

impl Inputs {
    /// `n` elements, `m` models.
    pub fn new(n: usize, m: usize) -> Self {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            // xorshift64*: uniform in [-1, 1)
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            v as f32 / (1u64 << 23) as f32 - 1.0
        };
        let base: Vec<f32> = (0..n).map(|_| next() * 0.05).collect();
        let models = (0..m)
            .map(|_| base.iter().map(|b| b + next() * 0.01).collect())
            .collect();
        Inputs { base, models }
    }

    /// Number of input bytes (base and models).
    pub fn bytes(&self) -> u64 {
        ((1 + self.models.len()) * self.base.len() * 4) as u64
    }

    /// The yardstick: copies every input into `dst` (`bytes()` long).
    pub fn copy_into(&self, dst: &mut [f32]) {
        let n = self.base.len();
        dst[..n].copy_from_slice(&self.base);
        for (i, m) in self.models.iter().enumerate() {
            dst[(i + 1) * n..(i + 2) * n].copy_from_slice(m);
        }
    }
}

/// A benchmarked configuration: a method, its parameters and its target ratio.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Label in reports.
    pub label: &'static str,
    /// Registered method name.
    pub method: &'static str,
    /// Global parameters.
    pub global: &'static [(&'static str, f64)],
    /// Per-model parameters (every model).
    pub per_model: &'static [(&'static str, f64)],
    /// Minimum throughput ratio to the memory copy.
    pub target: f64,
}

/// The benchmarked configurations.
pub const CASES: &[Case] = &[
    Case {
        label: "linear",
        method: "linear",
        global: &[],
        per_model: &[],
        target: 0.5,
    },
    Case {
        label: "task_arithmetic",
        method: "task_arithmetic",
        global: &[("lambda", 0.5)],
        per_model: &[],
        target: 0.5,
    },
    Case {
        label: "ties d=0.2",
        method: "ties",
        global: &[],
        per_model: &[("density", 0.2)],
        target: 0.2,
    },
    Case {
        label: "dare_linear d=0.5",
        method: "dare_linear",
        global: &[],
        per_model: &[("density", 0.5)],
        target: 0.2,
    },
    Case {
        label: "dare_ties d=0.5",
        method: "dare_ties",
        global: &[],
        per_model: &[("density", 0.5)],
        target: 0.2,
    },
];

impl Case {
    /// The resolved merge for `m` models.
    pub fn merge(&self, m: usize) -> Result<Merge<'static>, MethodError> {
        let method = registry().get(self.method)?;
        let global = self
            .global
            .iter()
            .map(|&(k, v)| (k, ParamValue::Float(v)))
            .collect();
        let per_model: Vec<(&str, ParamValue)> = self
            .per_model
            .iter()
            .map(|&(k, v)| (k, ParamValue::Float(v)))
            .collect();
        Merge::new(method, global, vec![per_model; m])
    }

    /// Merges the inputs as one tensor into `out`.
    pub fn run(&self, inputs: &Inputs, out: &mut [f32]) -> Result<(), MethodError> {
        merge_whole(&self.merge(inputs.models.len())?, inputs, out)
    }
}

/// Merges `inputs` as one whole tensor with the pass protocol of
/// [`merge_tensor`](tensormerge_methods::merge_tensor) (per-tensor pass, then
/// merge), on borrowed slices: the cost of the method alone, no copies.
pub fn merge_whole(merge: &Merge<'_>, inputs: &Inputs, out: &mut [f32]) -> Result<(), MethodError> {
    let shape = [inputs.base.len()];
    let ctx = TensorContext {
        name: "bench.weight",
        shape: &shape,
        global: &merge.global,
        models: &merge.models,
        seed: merge.seed,
        model_stats: None,
    };
    let models: Vec<&[f32]> = inputs.models.iter().map(|m| m.as_slice()).collect();
    let aux = vec![None; models.len()];
    let chunk = |stats| Chunk {
        tensor: &ctx,
        offset: 0,
        base: Some(&inputs.base),
        models: &models,
        aux: &aux,
        base_aux: None,
        tensor_stats: stats,
    };
    let stats = match merge.method.tensor_pass(&ctx) {
        None => None,
        Some(mut pass) => {
            for sweep in 0..pass.sweeps() {
                pass.observe(sweep, &chunk(None))?;
                pass.end_sweep(sweep)?;
            }
            Some(pass.finish()?)
        }
    };
    merge.method.merge(&chunk(stats.as_ref()), out)
}
