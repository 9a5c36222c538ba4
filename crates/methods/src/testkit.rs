//! The testkit (feature `testkit`): proptest strategies for layouts, vectors
//! and small checkpoints, an engine-like parallel runner, and the conformance
//! suite every merge method runs with one line:
//!
//! ```text
//! // tests/conformance.rs of a method crate
//! use tensormerge_method_ties as _; // link the method so it registers
//! tensormerge_methods::conformance_suite!(
//!     ties_conformance,
//!     "ties",
//!     per_model("density", 0.5),
//!     symmetric(),
//!     identity(Identity::single_model_returns_model(vec![], vec![("density", 1.0.into())])),
//! );
//! ```
//!
//! The suite checks, over random small checkpoints (mixed float dtypes, a
//! non-float tensor, values that include exact ties, tiny and moderate
//! magnitudes):
//!
//! - finite inputs give finite outputs;
//! - bit-identical results whether tensors are merged whole or in chunks of
//!   any length;
//! - bit-identical results on 1 and 4 rayon threads (tensors merged in
//!   parallel through [`merge_tensor`], as the engine does) and through the
//!   sequential [`Merge`];
//! - bit-identical results when the tensors are stored in another order;
//! - output names, shapes and dtypes equal the base's (through the
//!   [`ModelTensorMapper`]);
//! - the identities the method declares ([`Identity`]);
//! - where declared ([`symmetric`]), the same result (to rounding) when the
//!   models are given in another order.
//!
//! Each check is a plain function on [`Suite`], so a test can call one
//! directly:
//!
//! ```
//! use tensormerge_methods::testkit::{Identity, Suite};
//! use tensormerge_methods::*;
//!
//! struct Mean;
//! static INFO: MethodInfo = MethodInfo {
//!     name: "testkit_doc_mean", summary: "mean", paper: "none", base: BaseModel::Unused,
//!     min_models: 1, max_models: None, params: &[],
//! };
//! impl MergeMethod for Mean {
//!     fn info(&self) -> &'static MethodInfo { &INFO }
//!     fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
//!         for (i, o) in out.iter_mut().enumerate() {
//!             let s: f64 = c.models.iter().map(|m| m[i] as f64).sum();
//!             *o = (s / c.models.len() as f64) as f32;
//!         }
//!         Ok(())
//!     }
//! }
//! register_method!(Mean);
//!
//! let suite = Suite::new("testkit_doc_mean")
//!     .cases(8)
//!     .with(tensormerge_methods::testkit::symmetric())
//!     .with(tensormerge_methods::testkit::identity(Identity::copies_return_copy(vec![], vec![])));
//! suite.check_all();
//! ```

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rayon::prelude::*;
use tensormerge_core::{
    DType, InMemoryModel, Layout, ModelTensorMapper, ParamVector, Tensor, TensorInfo, TensorSource,
};

use crate::{
    ChunkData, Merge, MergeMethod, MethodError, ParamKind, ParamValue, Scope, TensorContext,
    check_inputs, chunk_ranges, merge_tensor, registry,
};

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Float values for merge tests: a mix of exact quarters in `[-4, 4]` (so
/// that magnitudes tie and differences are exact), moderate values in
/// `[-16, 16]`, and small ones with magnitudes in `[1e-6, 1e-5]`.
///
/// Magnitudes stay within a factor 2²⁹ of each other (except exact zeros):
/// then the difference of two values is exact in `f64`, which the
/// identities rely on (`b + (x − b) = x`). With wider spreads a task vector
/// `x − b` loses the bits of `x` below `f64` precision of `b`, and identities
/// hold to `f32` rounding of `b` only.
pub fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => (-16i32..=16).prop_map(|i| i as f32 / 4.0),
        3 => -16.0f32..16.0,
        1 => (1e-6f32..1e-5, any::<bool>()).prop_map(|(v, neg)| if neg { -v } else { v }),
    ]
}

/// `n` values from [`value`].
pub fn values(n: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(value(), n)
}

/// A layout of 1 to `max_tensors` float tensors (F32, BF16 or F16; shapes of
/// rank 0 to 2, at most `max_numel` elements each) plus, half of the time, a
/// non-float (`I64`) tensor. Names are unique and not in alphabetical order.
pub fn layout(max_tensors: usize, max_numel: usize) -> impl Strategy<Value = Arc<Layout>> {
    let dtype = prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)];
    let max_side = (max_numel as f64).sqrt().floor().max(1.0) as usize;
    let shape = prop_oneof![
        Just(vec![]),
        (1..=max_numel.max(1)).prop_map(|n| vec![n]),
        (1..=max_side, 1..=max_side).prop_map(|(a, b)| vec![a, b]),
    ];
    (
        proptest::collection::vec((shape, dtype), 1..=max_tensors.max(1)),
        any::<bool>(),
        0usize..7,
    )
        .prop_map(|(tensors, ids, rot)| {
            let mut infos: Vec<TensorInfo> = tensors
                .into_iter()
                .enumerate()
                .map(|(i, (shape, dtype))| {
                    TensorInfo::new(
                        format!("layers.{}.{}", (i * 7 + 3) % 10, ["w", "b", "n"][i % 3]),
                        shape,
                        dtype,
                    )
                })
                .collect();
            if ids {
                infos.insert(
                    infos.len() / 2,
                    TensorInfo::new("position_ids", vec![3], DType::I64),
                );
            }
            let len = infos.len();
            infos.rotate_left(rot % len);
            Arc::new(Layout::new(infos).expect("unique names"))
        })
}

/// A vector of `layout` with values from [`value`].
pub fn vector(layout: Arc<Layout>) -> impl Strategy<Value = ParamVector> {
    values(layout.num_params()).prop_map(move |v| {
        ParamVector::from_vec(layout.clone(), v).expect("length matches the layout")
    })
}

/// Non-negative values for auxiliary tensors (Fisher estimates): zeros and
/// values in `[0.01, 4]`, with the first entry at least 0.5.
pub fn aux_vector(layout: Arc<Layout>) -> impl Strategy<Value = ParamVector> {
    let v = prop_oneof![1 => Just(0.0f32), 3 => 0.01f32..4.0];
    proptest::collection::vec(v, layout.num_params()).prop_map(move |mut v| {
        if let Some(f) = v.first_mut() {
            *f = f.max(0.5);
        }
        ParamVector::from_vec(layout.clone(), v).expect("length matches the layout")
    })
}

/// A base, `n` models and, when `with_aux`, one auxiliary vector per model,
/// all on one layout.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// The shared layout.
    pub layout: Arc<Layout>,
    /// The base model.
    pub base: ParamVector,
    /// The models.
    pub models: Vec<ParamVector>,
    /// Each model's auxiliary vector (all `None` without aux).
    pub aux: Vec<Option<ParamVector>>,
    /// Per-model weights drawn for methods with a `weight` parameter.
    pub weights: Vec<f64>,
    /// A chunk length in `1..=8`.
    pub chunk_len: usize,
    /// A seed.
    pub seed: u64,
}

/// Small checkpoints: `models` in the given range, at most 4 tensors of at
/// most 24 elements.
pub fn checkpoints(
    models: std::ops::RangeInclusive<usize>,
    with_aux: bool,
) -> impl Strategy<Value = Checkpoints> {
    (layout(4, 24), models).prop_flat_map(move |(layout, n)| {
        let aux = if with_aux {
            proptest::collection::vec(aux_vector(layout.clone()).prop_map(Some).boxed(), n).boxed()
        } else {
            Just(vec![None; n]).boxed()
        };
        (
            Just(layout.clone()),
            vector(layout.clone()),
            proptest::collection::vec(vector(layout.clone()), n),
            aux,
            proptest::collection::vec(0.1f64..2.0, n),
            1usize..=8,
            any::<u64>(),
        )
            .prop_map(|(layout, base, models, aux, weights, chunk_len, seed)| {
                Checkpoints {
                    layout,
                    base,
                    models,
                    aux,
                    weights,
                    chunk_len,
                    seed,
                }
            })
    })
}

/// `vector` as an in-memory model named `name`, with the layout's dtypes and
/// zero bytes for non-float tensors.
pub fn to_model(name: &str, vector: &ParamVector) -> InMemoryModel {
    let layout = vector.layout();
    let values = vector.values().expect("healthy vector");
    let tensors = layout
        .tensors()
        .iter()
        .map(|t| match layout.range(&t.name) {
            Some(r) => Tensor::from_f32(t.name.clone(), t.shape.clone(), t.dtype, &values[r])
                .expect("valid tensor"),
            None => Tensor::from_bytes(t.clone(), vec![0; t.checked_byte_len().expect("small")])
                .expect("valid"),
        })
        .collect();
    InMemoryModel::new(name, tensors).expect("unique names")
}

// ---------------------------------------------------------------------------
// Engine-like runner
// ---------------------------------------------------------------------------

/// The largest relative error `|got[e] − want(e)| / |want(e)|` over the
/// entries for which `want` gives a value (`None` skips one), and the entry
/// where it is: the check of the precision tests, whose expected outputs are
/// closed forms computed in `f64`.
///
/// ```
/// use tensormerge_methods::testkit::worst_relative_error;
/// let (worst, at) = worst_relative_error(&[1.0, 2.0, 0.0], |e| (e < 2).then_some(1.0));
/// assert_eq!((worst, at), (1.0, 1));
/// ```
pub fn worst_relative_error(got: &[f32], want: impl Fn(usize) -> Option<f64>) -> (f64, usize) {
    let (mut worst, mut at) = (0.0f64, 0);
    for (e, &g) in got.iter().enumerate() {
        let Some(want) = want(e) else { continue };
        let err = (g as f64 - want).abs() / want.abs();
        if err > worst {
            (worst, at) = (err, e);
        }
    }
    (worst, at)
}

/// Runs `merge` like the engine does: the whole-model pass sequentially over
/// the tensors in `order` (indices into the layout's float tensors; layout
/// order when `None`), then every tensor through [`merge_tensor`] in parallel
/// on a rayon pool of `threads` threads.
pub fn run_parallel(
    merge: &Merge<'_>,
    threads: usize,
    order: Option<&[usize]>,
    base: Option<&ParamVector>,
    models: &[&ParamVector],
    aux: &[Option<&ParamVector>],
) -> Result<ParamVector, MethodError> {
    let method = merge.method;
    check_inputs(method, base.is_some(), models.len())?;
    let first = base
        .or(models.first().copied())
        .ok_or(MethodError::ModelCount {
            method: method.info().name.into(),
            expected: "at least 1 input".into(),
            got: 0,
        })?;
    let layout = first.layout().clone();
    let floats: Vec<(TensorInfo, std::ops::Range<usize>)> = layout
        .float_tensors()
        .map(|(t, r)| (t.clone(), r))
        .collect();
    let fetch = |r: std::ops::Range<usize>| -> Result<ChunkData, MethodError> {
        let slice = |v: &ParamVector| v.values().map(|s| s[r.clone()].to_vec());
        Ok(ChunkData {
            base: base.map(slice).transpose()?,
            models: models.iter().map(|m| slice(m)).collect::<Result<_, _>>()?,
            aux: aux
                .iter()
                .map(|a| a.map(slice).transpose())
                .collect::<Result<_, _>>()?,
            base_aux: None,
        })
    };
    let visit: Vec<usize> = order
        .map(|o| o.to_vec())
        .unwrap_or_else(|| (0..floats.len()).collect());
    let model_stats = match method.model_pass(&merge.global, &merge.models) {
        None => None,
        Some(mut pass) => {
            for sweep in 0..pass.sweeps() {
                for &ti in &visit {
                    let (t, r) = &floats[ti];
                    let tc = TensorContext {
                        name: &t.name,
                        shape: &t.shape,
                        global: &merge.global,
                        models: &merge.models,
                        seed: merge.seed,
                        model_stats: None,
                    };
                    if !pass.needs(&tc) {
                        continue;
                    }
                    for cr in chunk_ranges(method, &t.shape, r.len(), merge.chunk_len) {
                        let data = fetch(r.start + cr.start..r.start + cr.end)?;
                        data.with_chunk(&tc, cr.start, None, |c| pass.observe(sweep, c))?;
                    }
                }
                pass.end_sweep(sweep)?;
                if pass.done() {
                    break;
                }
            }
            Some(pass.finish()?)
        }
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| MethodError::Invalid {
            method: method.info().name.into(),
            tensor: "<pool>".into(),
            message: e.to_string(),
        })?;
    let merged: Vec<Result<Vec<f32>, MethodError>> = pool.install(|| {
        floats
            .par_iter()
            .map(|(t, r)| {
                let tc = TensorContext {
                    name: &t.name,
                    shape: &t.shape,
                    global: &merge.global,
                    models: &merge.models,
                    seed: merge.seed,
                    model_stats: model_stats.as_ref(),
                };
                let mut out = vec![0.0f32; r.len()];
                merge_tensor::<MethodError>(
                    method,
                    &tc,
                    merge.chunk_len,
                    |cr| fetch(r.start + cr.start..r.start + cr.end),
                    |off, v| {
                        out[off..off + v.len()].copy_from_slice(v);
                        Ok(())
                    },
                )?;
                Ok(out)
            })
            .collect()
    });
    let mut out = ParamVector::zeros(layout.clone());
    let values = out.values_mut()?;
    for ((_, r), m) in floats.iter().zip(merged) {
        values[r.clone()].copy_from_slice(&m?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The conformance suite
// ---------------------------------------------------------------------------

type ParamList = Vec<(&'static str, ParamValue)>;

/// An identity a method promises (METHODS.md). Each runs on random
/// checkpoints with the given parameters (every other parameter at its
/// default).
#[derive(Debug, Clone)]
pub enum Identity {
    /// The output equals the base (task arithmetic with `λ = 0`).
    ReturnsBase {
        /// Global parameters.
        global: ParamList,
        /// Parameters of every model.
        per_model: ParamList,
    },
    /// Given N identical models (N from the method's minimum to 3), the output
    /// equals that model (linear).
    CopiesReturnCopy {
        /// Global parameters.
        global: ParamList,
        /// Parameters of every model.
        per_model: ParamList,
    },
    /// Given one model, the output equals it (ties with density 1, weight 1).
    SingleModelReturnsModel {
        /// Global parameters.
        global: ParamList,
        /// Parameters of the model.
        per_model: ParamList,
    },
    /// The output equals another registered method's on the same inputs
    /// (DARE with density 1 and its non-dropping counterpart).
    Equals {
        /// The other method's name (it must be linked into the test).
        other: &'static str,
        /// This method's global parameters.
        global: ParamList,
        /// This method's per-model parameters.
        per_model: ParamList,
        /// The other method's global parameters.
        other_global: ParamList,
        /// The other method's per-model parameters.
        other_per_model: ParamList,
        /// Give every model the same auxiliary vector (equal Fishers).
        equal_aux: bool,
        /// Allowed relative difference (0: bit-identical up to the sign of zero).
        tolerance: f32,
    },
}

impl Identity {
    /// [`Identity::ReturnsBase`].
    pub fn returns_base(global: ParamList, per_model: ParamList) -> Self {
        Identity::ReturnsBase { global, per_model }
    }

    /// [`Identity::CopiesReturnCopy`].
    pub fn copies_return_copy(global: ParamList, per_model: ParamList) -> Self {
        Identity::CopiesReturnCopy { global, per_model }
    }

    /// [`Identity::SingleModelReturnsModel`].
    pub fn single_model_returns_model(global: ParamList, per_model: ParamList) -> Self {
        Identity::SingleModelReturnsModel { global, per_model }
    }

    /// [`Identity::Equals`], bit-identical, without shared aux.
    pub fn equals(
        other: &'static str,
        global: ParamList,
        per_model: ParamList,
        other_global: ParamList,
    ) -> Self {
        Identity::Equals {
            other,
            global,
            per_model,
            other_global,
            other_per_model: Vec::new(),
            equal_aux: false,
            tolerance: 0.0,
        }
    }
}

/// One option of a [`Suite`]; see [`global`], [`per_model`], [`identity`],
/// [`symmetric`], [`cases`].
#[derive(Debug, Clone)]
pub enum SuiteOption {
    /// A global parameter for the general checks.
    Global(&'static str, ParamValue),
    /// A per-model parameter (every model) for the general checks.
    PerModel(&'static str, ParamValue),
    /// A declared identity.
    Identity(Identity),
    /// The method is symmetric in the order of the models.
    Symmetric,
    /// Number of proptest cases per check.
    Cases(u32),
}

/// A global parameter for the general checks.
pub fn global(name: &'static str, value: impl Into<ParamValue>) -> SuiteOption {
    SuiteOption::Global(name, value.into())
}

/// A per-model parameter (the same for every model) for the general checks.
pub fn per_model(name: &'static str, value: impl Into<ParamValue>) -> SuiteOption {
    SuiteOption::PerModel(name, value.into())
}

/// A declared identity.
pub fn identity(identity: Identity) -> SuiteOption {
    SuiteOption::Identity(identity)
}

/// Declares the method symmetric in the order of the models.
pub fn symmetric() -> SuiteOption {
    SuiteOption::Symmetric
}

/// Number of proptest cases per check (default 32).
pub fn cases(n: u32) -> SuiteOption {
    SuiteOption::Cases(n)
}

/// The conformance checks of one registered method. Build with
/// [`Suite::new`] and options, or through [`conformance_suite!`](crate::conformance_suite).
#[derive(Debug, Clone)]
pub struct Suite {
    method: &'static dyn MergeMethod,
    global: ParamList,
    per_model: ParamList,
    identities: Vec<Identity>,
    symmetric: bool,
    cases: u32,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn bits(v: &ParamVector) -> Vec<u32> {
    v.values()
        .expect("healthy")
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

impl Suite {
    /// The suite of the registered method `name`. Panics (failing the test)
    /// when no linked crate registers it.
    pub fn new(name: &str) -> Self {
        let method = registry()
            .get(name)
            .unwrap_or_else(|e| panic!("conformance suite: {e}"));
        Suite {
            method,
            global: Vec::new(),
            per_model: Vec::new(),
            identities: Vec::new(),
            symmetric: false,
            cases: 32,
        }
    }

    /// Adds an option.
    pub fn with(mut self, option: SuiteOption) -> Self {
        match option {
            SuiteOption::Global(n, v) => self.global.push((n, v)),
            SuiteOption::PerModel(n, v) => self.per_model.push((n, v)),
            SuiteOption::Identity(i) => self.identities.push(i),
            SuiteOption::Symmetric => self.symmetric = true,
            SuiteOption::Cases(c) => self.cases = c,
        }
        self
    }

    /// Sets the number of proptest cases per check.
    pub fn cases(self, n: u32) -> Self {
        self.with(SuiteOption::Cases(n))
    }

    fn name(&self) -> &'static str {
        self.method.info().name
    }

    fn has_param(&self, name: &str, scope: Scope) -> bool {
        self.method
            .info()
            .params
            .iter()
            .any(|p| p.name == name && p.scope == scope)
    }

    fn uses_aux(&self) -> bool {
        self.method
            .info()
            .params
            .iter()
            .any(|p| p.kind == ParamKind::ModelRef)
    }

    fn model_range(&self) -> std::ops::RangeInclusive<usize> {
        let info = self.method.info();
        let lo = info.min_models.max(1);
        let hi = info.max_models.unwrap_or(3).clamp(lo, 3.max(lo));
        lo..=hi
    }

    fn runner(&self) -> TestRunner {
        TestRunner::new(Config {
            cases: self.cases,
            failure_persistence: None,
            ..Config::default()
        })
    }

    /// The suite's `Merge` for `ck` (random weights when the method has a
    /// `weight` parameter and the suite did not fix one).
    fn merge(&self, ck: &Checkpoints, per_model_extra: bool) -> Merge<'static> {
        let random_weights = per_model_extra
            && self.has_param("weight", Scope::PerModel)
            && !self.per_model.iter().any(|(n, _)| *n == "weight");
        let models = (0..ck.models.len())
            .map(|i| {
                let mut p = self.per_model.clone();
                if random_weights {
                    p.push(("weight", ParamValue::Float(ck.weights[i])));
                }
                p
            })
            .collect();
        Merge::new(self.method, self.global.clone(), models)
            .unwrap_or_else(|e| panic!("conformance suite of `{}`: {e}", self.name()))
            .seed(ck.seed)
    }

    fn run(&self, merge: &Merge<'_>, ck: &Checkpoints) -> Result<ParamVector, TestCaseError> {
        let models: Vec<&ParamVector> = ck.models.iter().collect();
        let aux: Vec<Option<&ParamVector>> = ck.aux.iter().map(|a| a.as_ref()).collect();
        merge
            .run_with_aux(Some(&ck.base), &models, &aux, None)
            .map_err(|e| fail(format!("`{}` failed: {e}", self.name())))
    }

    fn check(&self, what: &str, f: impl Fn(&Checkpoints) -> Result<(), TestCaseError>) {
        let strategy = checkpoints(self.model_range(), self.uses_aux());
        if let Err(e) = self.runner().run(&strategy, |ck| f(&ck)) {
            panic!("conformance of `{}`: {what}: {e}", self.name());
        }
    }

    /// Finite inputs give finite outputs.
    pub fn check_finite(&self) {
        self.check("finite in, finite out", |ck| {
            let out = self.run(&self.merge(ck, true), ck)?;
            let v = out.values().map_err(|e| fail(e.to_string()))?;
            match v.iter().position(|x| !x.is_finite()) {
                None => Ok(()),
                Some(i) => Err(fail(format!("entry {i} is {}", v[i]))),
            }
        });
    }

    /// Whole-tensor and chunked runs are bit-identical.
    pub fn check_chunking(&self) {
        self.check("chunking", |ck| {
            let merge = self.merge(ck, true);
            let whole = self.run(&merge.clone().chunk_len(usize::MAX), ck)?;
            let chunked = self.run(&merge.chunk_len(ck.chunk_len), ck)?;
            prop_assert_eq!(bits(&whole), bits(&chunked), "chunk_len {}", ck.chunk_len);
            Ok(())
        });
    }

    /// 1 and 4 threads (engine-like, tensors in parallel) and the sequential
    /// `Merge` are bit-identical.
    pub fn check_threads(&self) {
        self.check("thread count", |ck| {
            let merge = self.merge(ck, true).chunk_len(ck.chunk_len);
            let models: Vec<&ParamVector> = ck.models.iter().collect();
            let aux: Vec<Option<&ParamVector>> = ck.aux.iter().map(|a| a.as_ref()).collect();
            let seq = self.run(&merge, ck)?;
            for threads in [1, 4] {
                let par = run_parallel(&merge, threads, None, Some(&ck.base), &models, &aux)
                    .map_err(|e| fail(format!("{threads} threads: {e}")))?;
                prop_assert_eq!(bits(&seq), bits(&par), "{} threads", threads);
            }
            Ok(())
        });
    }

    /// Storing the tensors in another order changes nothing (compared by
    /// tensor name, bit for bit).
    pub fn check_tensor_order(&self) {
        self.check("tensor order", |ck| {
            let merge = self.merge(ck, true);
            let out = self.run(&merge, ck)?;
            let mut infos = ck.layout.tensors().to_vec();
            infos.reverse();
            let reversed = Arc::new(Layout::new(infos).map_err(|e| fail(e.to_string()))?);
            let relayout = |v: &ParamVector| -> ParamVector {
                let mut o = ParamVector::zeros(reversed.clone());
                for (t, r) in reversed.float_tensors() {
                    let src = ck.layout.range(&t.name).expect("same tensors");
                    o.values_mut().expect("fresh")[r]
                        .copy_from_slice(&v.values().expect("healthy")[src]);
                }
                o
            };
            let rck = Checkpoints {
                layout: reversed.clone(),
                base: relayout(&ck.base),
                models: ck.models.iter().map(relayout).collect(),
                aux: ck.aux.iter().map(|a| a.as_ref().map(relayout)).collect(),
                ..ck.clone()
            };
            let rout = self.run(&merge, &rck)?;
            // Engine-like too, visiting tensors in yet another order.
            let models: Vec<&ParamVector> = rck.models.iter().collect();
            let aux: Vec<Option<&ParamVector>> = rck.aux.iter().map(|a| a.as_ref()).collect();
            let n = reversed.float_tensors().count();
            let order: Vec<usize> = (0..n).map(|i| (i + n / 2) % n).collect();
            let pout = run_parallel(&merge, 2, Some(&order), Some(&rck.base), &models, &aux)
                .map_err(|e| fail(e.to_string()))?;
            for (t, r) in ck.layout.float_tensors() {
                let rr = reversed.range(&t.name).expect("same tensors");
                let a: Vec<u32> = out.values().expect("ok")[r]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let b: Vec<u32> = rout.values().expect("ok")[rr.clone()]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let c: Vec<u32> = pout.values().expect("ok")[rr]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                prop_assert_eq!(&a, &b, "tensor {}", t.name);
                prop_assert_eq!(&a, &c, "tensor {} (engine-like)", t.name);
            }
            Ok(())
        });
    }

    /// Names, shapes and dtypes of the output equal the base's, through the
    /// mapper and in-memory models with mixed dtypes.
    pub fn check_shapes(&self) {
        self.check("shapes and dtypes", |ck| {
            let base = to_model("base", &ck.base);
            let mapper = ModelTensorMapper::for_model(&base);
            let vec = |v: &ParamVector, name: &str| {
                mapper.to_vector(&to_model(name, v)).expect("same layout")
            };
            let mck = Checkpoints {
                layout: mapper.layout().clone(),
                base: vec(&ck.base, "base"),
                models: ck
                    .models
                    .iter()
                    .enumerate()
                    .map(|(i, m)| vec(m, &format!("m{i}")))
                    .collect(),
                aux: ck
                    .aux
                    .iter()
                    .map(|a| a.as_ref().map(|a| vec(a, "aux")))
                    .collect(),
                ..ck.clone()
            };
            let out = self.run(&self.merge(&mck, true), &mck)?;
            prop_assert!(
                Arc::ptr_eq(out.layout(), mapper.layout()) || **out.layout() == **mapper.layout()
            );
            let tensors = mapper.from_vector(&out).map_err(|e| fail(e.to_string()))?;
            let got: Vec<&TensorInfo> = tensors.iter().map(|t| &t.info).collect();
            let want: Vec<&TensorInfo> = base.layout().float_tensors().map(|(t, _)| t).collect();
            prop_assert_eq!(got, want);
            Ok(())
        });
    }

    /// The declared identities hold.
    pub fn check_identities(&self) {
        for identity in &self.identities {
            self.check(&format!("identity {identity:?}"), |ck| {
                self.check_identity(identity, ck)
            });
        }
    }

    fn resolve(
        &self,
        method: &'static dyn MergeMethod,
        global: &ParamList,
        per_model: &ParamList,
        n: usize,
        seed: u64,
    ) -> Merge<'static> {
        Merge::new(method, global.clone(), vec![per_model.clone(); n])
            .unwrap_or_else(|e| panic!("identity of `{}`: {e}", self.name()))
            .seed(seed)
    }

    fn check_identity(&self, identity: &Identity, ck: &Checkpoints) -> Result<(), TestCaseError> {
        let equal =
            |got: &ParamVector, want: &ParamVector, tol: f32| -> Result<(), TestCaseError> {
                let (g, w) = (got.values().expect("ok"), want.values().expect("ok"));
                for (i, (a, b)) in g.iter().zip(w).enumerate() {
                    let ok = if tol == 0.0 {
                        a == b
                    } else {
                        (a - b).abs() <= tol * b.abs().max(1.0)
                    };
                    if !ok {
                        return Err(fail(format!("entry {i}: got {a}, expected {b}")));
                    }
                }
                Ok(())
            };
        let aux = |ck: &Checkpoints, n: usize| -> Vec<Option<ParamVector>> {
            ck.aux.iter().take(n).cloned().collect()
        };
        let run = |merge: &Merge<'_>, models: &[&ParamVector], aux: &[Option<ParamVector>]| {
            let aux: Vec<Option<&ParamVector>> = aux.iter().map(|a| a.as_ref()).collect();
            merge
                .run_with_aux(Some(&ck.base), models, &aux, None)
                .map_err(|e| fail(format!("`{}`: {e}", self.name())))
        };
        match identity {
            Identity::ReturnsBase { global, per_model } => {
                let merge = self.resolve(self.method, global, per_model, ck.models.len(), ck.seed);
                let models: Vec<&ParamVector> = ck.models.iter().collect();
                equal(
                    &run(&merge, &models, &aux(ck, models.len()))?,
                    &ck.base,
                    0.0,
                )
            }
            Identity::CopiesReturnCopy { global, per_model } => {
                let n = ck.models.len();
                let merge = self.resolve(self.method, global, per_model, n, ck.seed);
                let models = vec![&ck.models[0]; n];
                let aux = vec![ck.aux[0].clone(); n];
                equal(&run(&merge, &models, &aux)?, &ck.models[0], 0.0)
            }
            Identity::SingleModelReturnsModel { global, per_model } => {
                let merge = self.resolve(self.method, global, per_model, 1, ck.seed);
                equal(
                    &run(&merge, &[&ck.models[0]], &aux(ck, 1))?,
                    &ck.models[0],
                    0.0,
                )
            }
            Identity::Equals {
                other,
                global,
                per_model,
                other_global,
                other_per_model,
                equal_aux,
                tolerance,
            } => {
                let other = registry()
                    .get(other)
                    .unwrap_or_else(|e| panic!("identity of `{}`: {e}", self.name()));
                let n = ck.models.len();
                let models: Vec<&ParamVector> = ck.models.iter().collect();
                let aux = if *equal_aux {
                    vec![ck.aux[0].clone(); n]
                } else {
                    aux(ck, n)
                };
                let a = run(
                    &self.resolve(self.method, global, per_model, n, ck.seed),
                    &models,
                    &aux,
                )?;
                let b = run(
                    &self.resolve(other, other_global, other_per_model, n, ck.seed),
                    &models,
                    &aux,
                )?;
                equal(&a, &b, *tolerance)
            }
        }
    }

    /// When declared symmetric: reversing the order of the models (with their
    /// weights and auxiliary vectors) gives the same result up to rounding
    /// (sums are taken in model order).
    pub fn check_symmetry(&self) {
        if !self.symmetric {
            return;
        }
        self.check("symmetry in the order of models", |ck| {
            let out = self.run(&self.merge(ck, true), ck)?;
            let mut rck = ck.clone();
            rck.models.reverse();
            rck.aux.reverse();
            rck.weights.reverse();
            let rout = self.run(&self.merge(&rck, true), &rck)?;
            for (i, (a, b)) in out
                .values()
                .expect("ok")
                .iter()
                .zip(rout.values().expect("ok"))
                .enumerate()
            {
                prop_assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "entry {}: {} vs {}",
                    i,
                    a,
                    b
                );
            }
            Ok(())
        });
    }

    /// Every check.
    pub fn check_all(&self) {
        self.check_finite();
        self.check_chunking();
        self.check_threads();
        self.check_tensor_order();
        self.check_shapes();
        self.check_identities();
        self.check_symmetry();
    }
}

/// The conformance suite of a registered method in one line: a test module
/// `$name` with one test per check of [`Suite`](crate::testkit::Suite).
/// Options are [`SuiteOption`](crate::testkit::SuiteOption) expressions;
/// `global`, `per_model`, `identity`, `symmetric`, `cases` and `Identity`
/// are in scope.
///
/// ```
/// use tensormerge_methods::*;
/// struct Copy0;
/// static INFO: MethodInfo = MethodInfo {
///     name: "conformance_doc_copy", summary: "the first model", paper: "none",
///     base: BaseModel::Unused, min_models: 1, max_models: Some(1), params: &[],
/// };
/// impl MergeMethod for Copy0 {
///     fn info(&self) -> &'static MethodInfo { &INFO }
///     fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
///         out.copy_from_slice(c.models[0]);
///         Ok(())
///     }
/// }
/// register_method!(Copy0);
///
/// // In a method crate's tests this expands to seven #[test] functions.
/// tensormerge_methods::conformance_suite!(
///     copy_conformance,
///     "conformance_doc_copy",
///     symmetric(),
///     identity(Identity::single_model_returns_model(vec![], vec![])),
/// );
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $method:expr $(, $option:expr)* $(,)?) => {
        #[cfg(test)]
        mod $name {
            #[allow(unused_imports)]
            use $crate::testkit::{cases, global, identity, per_model, symmetric, Identity};

            fn suite() -> $crate::testkit::Suite {
                $crate::testkit::Suite::new($method) $( .with($option) )*
            }

            #[test]
            fn finite_in_finite_out() {
                suite().check_finite();
            }

            #[test]
            fn chunking_does_not_change_results() {
                suite().check_chunking();
            }

            #[test]
            fn thread_count_does_not_change_results() {
                suite().check_threads();
            }

            #[test]
            fn tensor_order_does_not_change_results() {
                suite().check_tensor_order();
            }

            #[test]
            fn shapes_and_dtypes_are_preserved() {
                suite().check_shapes();
            }

            #[test]
            fn declared_identities_hold() {
                suite().check_identities();
            }

            #[test]
            fn symmetric_in_model_order_where_declared() {
                suite().check_symmetry();
            }
        }
    };
}
