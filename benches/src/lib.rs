//! # tensormerge-benches
//!
//! Throughput of the merge methods on one large tensor (16M elements by
//! default), 1 base + 3 models, against a plain memory copy of the same input
//! bytes measured in the same run. Results are ratios: a method's bytes per
//! second over the copy's. Targets: `linear` and `task_arithmetic` at least
//! 0.5, `ties` and `dare_*` at least 0.35 (issue #13's); the other methods'
//! are regression floors ([`Case::target`]).
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

use tensormerge_methods::{
    Chunk, Merge, MethodError, ParamValue, Stats, StatsPass, TensorContext, registry,
};

use tensormerge_method_breadcrumbs as _;
use tensormerge_method_dare as _;
use tensormerge_method_della as _;
use tensormerge_method_fisher as _;
use tensormerge_method_karcher as _;
use tensormerge_method_linear as _;
use tensormerge_method_magnitude_prune as _;
use tensormerge_method_model_stock as _;
use tensormerge_method_multislerp as _;
use tensormerge_method_nearswap as _;
use tensormerge_method_nuslerp as _;
use tensormerge_method_passthrough as _;
use tensormerge_method_sce as _;
use tensormerge_method_slerp as _;
use tensormerge_method_task_arithmetic as _;
use tensormerge_method_ties as _;

/// Elements per tensor in the benchmarks (16M).
pub const NUMEL: usize = 16 * 1024 * 1024;

/// Row length of the benchmarked tensor (shape `[NUMEL / ROW, ROW]`), for
/// the methods that work row by row (DELLA's ranks).
pub const ROW: usize = 1024;

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
        self.copy_first_into(self.models.len(), dst)
    }

    /// The yardstick of a case merging the first `k` models: copies the
    /// base and those models into `dst`.
    pub fn copy_first_into(&self, k: usize, dst: &mut [f32]) {
        let n = self.base.len();
        dst[..n].copy_from_slice(&self.base);
        for (i, m) in self.models[..k].iter().enumerate() {
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
    /// Minimum throughput ratio to the memory copy (for the methods without
    /// a target of their own: a floor about half the measured ratio, so that
    /// a regression in the kernel shows).
    pub target: f64,
    /// Models merged (0: all of the inputs'; the two-model methods take 1).
    pub models: usize,
    /// Each model is its own auxiliary tensor (`fisher`).
    pub self_aux: bool,
}

/// The benchmarked configurations.
pub const CASES: &[Case] = &[
    Case {
        label: "linear",
        method: "linear",
        global: &[],
        per_model: &[],
        target: 0.5,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "task_arithmetic",
        method: "task_arithmetic",
        global: &[("lambda", 0.5)],
        per_model: &[],
        target: 0.5,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "ties d=0.2",
        method: "ties",
        global: &[],
        per_model: &[("density", 0.2)],
        target: 0.35,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "dare_linear d=0.5",
        method: "dare_linear",
        global: &[],
        per_model: &[("density", 0.5)],
        target: 0.35,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "dare_ties d=0.5",
        method: "dare_ties",
        global: &[],
        per_model: &[("density", 0.5)],
        target: 0.35,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "magnitude_prune d=0.2",
        method: "magnitude_prune",
        global: &[],
        per_model: &[("density", 0.2)],
        target: 0.15,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "breadcrumbs d=0.2",
        method: "breadcrumbs",
        global: &[],
        per_model: &[("density", 0.2)],
        target: 0.12,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "breadcrumbs_ties d=0.2",
        method: "breadcrumbs_ties",
        global: &[],
        per_model: &[("density", 0.2)],
        target: 0.1,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "della d=0.2",
        method: "della",
        global: &[],
        per_model: &[("density", 0.2)],
        target: 0.015,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "della_linear d=0.2",
        method: "della_linear",
        global: &[],
        per_model: &[("density", 0.2)],
        target: 0.015,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "sce topk=0.2",
        method: "sce",
        global: &[("select_topk", 0.2)],
        per_model: &[],
        target: 0.03,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "model_stock",
        method: "model_stock",
        global: &[],
        per_model: &[],
        target: 0.05,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "multislerp",
        method: "multislerp",
        global: &[],
        per_model: &[("weight", 1.0)],
        target: 0.08,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "karcher",
        method: "karcher",
        global: &[],
        per_model: &[],
        target: 0.04,
        models: 0,
        self_aux: false,
    },
    Case {
        label: "fisher (self)",
        method: "fisher",
        global: &[],
        per_model: &[("weight", 1.0)],
        target: 0.07,
        models: 0,
        self_aux: true,
    },
    Case {
        label: "nuslerp",
        method: "nuslerp",
        global: &[],
        per_model: &[("weight", 1.0)],
        target: 0.08,
        models: 2,
        self_aux: false,
    },
    Case {
        label: "slerp t=0.3",
        method: "slerp",
        global: &[("t", 0.3)],
        per_model: &[],
        target: 0.25,
        models: 1,
        self_aux: false,
    },
    Case {
        label: "nearswap t=5e-4",
        method: "nearswap",
        global: &[("t", 0.0005)],
        per_model: &[],
        target: 0.15,
        models: 1,
        self_aux: false,
    },
    Case {
        label: "passthrough",
        method: "passthrough",
        global: &[],
        per_model: &[],
        target: 0.5,
        models: 1,
        self_aux: false,
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

    /// How many of the inputs' models the case merges.
    pub fn models(&self, inputs: &Inputs) -> usize {
        match self.models {
            0 => inputs.models.len(),
            k => k.min(inputs.models.len()),
        }
    }

    /// Number of input bytes the case reads (the base and its models).
    pub fn bytes(&self, inputs: &Inputs) -> u64 {
        ((1 + self.models(inputs)) * inputs.base.len() * 4) as u64
    }

    /// Merges the inputs as one tensor into `out`.
    pub fn run(&self, inputs: &Inputs, out: &mut [f32]) -> Result<(), MethodError> {
        let k = self.models(inputs);
        merge_whole_with(&self.merge(k)?, inputs, k, self.self_aux, out)
    }
}

/// The shape the benchmarks give a tensor of `n` elements: rows of [`ROW`]
/// (a weight matrix, as the row-wise methods such as DELLA see one) when
/// `n` is a multiple of it, else one row.
///
/// ```
/// assert_eq!(tensormerge_benches::shape(4096), [4, 1024]);
/// assert_eq!(tensormerge_benches::shape(1000), [1000]);
/// ```
pub fn shape(n: usize) -> Vec<usize> {
    if n.is_multiple_of(ROW) {
        vec![n / ROW, ROW]
    } else {
        vec![n]
    }
}

/// Merges `inputs` as one whole tensor with the pass protocol of
/// [`merge_tensor`](tensormerge_methods::merge_tensor) (per-tensor pass, then
/// merge), on borrowed slices: the cost of the method alone, no copies.
pub fn merge_whole(merge: &Merge<'_>, inputs: &Inputs, out: &mut [f32]) -> Result<(), MethodError> {
    merge_whole_with(merge, inputs, inputs.models.len(), false, out)
}

/// One merge of [`Inputs`] as a single tensor of shape [`shape`], ready to
/// hand to a method: what the [`TensorContext`]s and [`Chunk`]s of
/// [`merge_whole_with`] and of `bench-phases` borrow, built in one place so
/// that both time the same tensor.
///
/// ```
/// use tensormerge_benches::{Inputs, Whole, CASES};
/// let inputs = Inputs::new(4096, 3);
/// let merge = CASES[0].merge(3).unwrap();
/// let whole = Whole::new(&merge, &inputs, 3, false);
/// let ctx = whole.context(None);
/// assert_eq!(ctx.shape, [4, 1024]);
/// let chunk = whole.chunk(&ctx, None);
/// assert_eq!((chunk.offset, chunk.models.len()), (0, 3));
/// ```
#[derive(Debug)]
pub struct Whole<'a> {
    merge: &'a Merge<'a>,
    base: &'a [f32],
    shape: Vec<usize>,
    models: Vec<&'a [f32]>,
    aux: Vec<Option<&'a [f32]>>,
    scratch: tensormerge_methods::Scratch,
}

impl<'a> Whole<'a> {
    /// The merge of the base and the first `k` models of `inputs`, each
    /// model its own auxiliary tensor when `self_aux` (Fisher merging with
    /// the models as their Fisher estimates).
    pub fn new(merge: &'a Merge<'a>, inputs: &'a Inputs, k: usize, self_aux: bool) -> Self {
        let models: Vec<&[f32]> = inputs.models[..k].iter().map(|m| m.as_slice()).collect();
        let aux = models.iter().map(|&m| self_aux.then_some(m)).collect();
        Whole {
            merge,
            base: &inputs.base,
            shape: shape(inputs.base.len()),
            models,
            aux,
            scratch: tensormerge_methods::Scratch::default(),
        }
    }

    /// The tensor's context, with the whole-model statistics `model_stats`
    /// (`None` before the model pass, or for methods without one).
    pub fn context<'b>(&'b self, model_stats: Option<&'b Stats>) -> TensorContext<'b> {
        TensorContext {
            name: "bench.weight",
            shape: &self.shape,
            global: &self.merge.global,
            models: &self.merge.models,
            seed: self.merge.seed,
            model_stats,
        }
    }

    /// The whole tensor as one chunk of `tensor` (a context from
    /// [`context`](Self::context)), with the per-tensor statistics `stats`.
    pub fn chunk<'b>(
        &'b self,
        tensor: &'b TensorContext<'b>,
        stats: Option<&'b Stats>,
    ) -> Chunk<'b> {
        Chunk {
            tensor,
            offset: 0,
            base: Some(self.base),
            models: &self.models,
            aux: &self.aux,
            base_aux: None,
            tensor_stats: stats,
            scratch: &self.scratch,
        }
    }
}

/// Runs `pass` over `chunk`, sweep by sweep, and returns its statistics.
fn run_pass(mut pass: Box<dyn StatsPass>, chunk: &Chunk<'_>) -> Result<Stats, MethodError> {
    for sweep in 0..pass.sweeps() {
        pass.observe(sweep, chunk)?;
        pass.end_sweep(sweep)?;
        if pass.done() {
            break;
        }
    }
    pass.finish()
}

/// [`merge_whole`] of the first `k` models, each its own auxiliary tensor
/// when `self_aux` (Fisher merging with the models as their Fisher estimates).
pub fn merge_whole_with(
    merge: &Merge<'_>,
    inputs: &Inputs,
    k: usize,
    self_aux: bool,
    out: &mut [f32],
) -> Result<(), MethodError> {
    let whole = Whole::new(merge, inputs, k, self_aux);
    // The whole-model pass (Fisher normalisation) over the one tensor, then
    // the per-tensor pass.
    let pre = whole.context(None);
    let model_stats = match merge.method.model_pass(&merge.global, &merge.models) {
        None => None,
        Some(pass) => Some(run_pass(pass, &whole.chunk(&pre, None))?),
    };
    let ctx = whole.context(model_stats.as_ref());
    let stats = match merge.method.tensor_pass(&ctx) {
        None => None,
        Some(pass) => Some(run_pass(pass, &whole.chunk(&ctx, None))?),
    };
    merge.method.merge(&whole.chunk(&ctx, stats.as_ref()), out)
}
