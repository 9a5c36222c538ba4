//! # tensormerge-method-task-arithmetic
//!
//! `task_arithmetic` (Ilharco et al. 2023, "Editing models with task
//! arithmetic", arXiv:2212.04089): with task vectors `τ_i = x_i − b`,
//!
//! `out = b + λ · Σ w_i τ_i`, with `Σ w_i τ_i` divided by `Σ w_i` first when
//! `normalize` (default false). `λ` (`lambda`) defaults to 1.0. Negative
//! weights subtract a task ("forgetting by negation").
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_task_arithmetic as _; // link the crate so it registers
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![3], DType::F32)]).unwrap());
//! let v = |x: [f32; 3]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let (base, legal, recipe) = (v([1.0, 1.0, 1.0]), v([2.0, 1.0, 0.0]), v([1.0, 3.0, 1.0]));
//! let method = registry().get("task-arithmetic").unwrap();
//! let merge = Merge::new(method, vec![("lambda", 0.5.into())], vec![vec![], vec![]]).unwrap();
//! let out = merge.run(Some(&base), &[&legal, &recipe]).unwrap();
//! assert_eq!(out.values().unwrap(), &[1.5, 2.0, 0.5]);
//! ```
//!
//! Differences from mergekit: `weight` defaults to 1.0 (mergekit requires
//! it); `int8_mask` is accepted for compatibility and has no effect (all
//! arithmetic here is `f64` per element, rounded once). Normalisation divides
//! by the plain weight sum and a zero sum is an error ([`MethodError::Invalid`]);
//! mergekit divides by the weight sum masked to non-zero deltas.
#![deny(missing_docs)]

use tensormerge_methods::ops::{self, Combine, Rule};
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec,
    register_method,
};

/// The `task_arithmetic` method.
#[derive(Debug, Clone, Copy)]
pub struct TaskArithmetic;

/// Declared parameters of `task_arithmetic`.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec::per_model_float(
        "weight",
        f64::NEG_INFINITY,
        f64::INFINITY,
        Default::Float(1.0),
        "the model's weight w_i (negative subtracts the task)",
    ),
    ParamSpec::global(
        "lambda",
        ParamKind::Float {
            min: f64::NEG_INFINITY,
            max: f64::INFINITY,
        },
        Default::Float(1.0),
        "factor λ on the summed task vectors",
    ),
    ParamSpec::global(
        "normalize",
        ParamKind::Bool,
        Default::Bool(false),
        "divide the weighted sum by the sum of the weights",
    ),
    ParamSpec::INT8_MASK,
];

/// What `task_arithmetic` is.
pub static INFO: MethodInfo = MethodInfo {
    name: "task_arithmetic",
    summary: "adds the weighted task vectors (model − base) to the base",
    paper: "Ilharco et al. 2023, arXiv:2212.04089",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

impl MergeMethod for TaskArithmetic {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor;
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.to_string(),
        })?;
        // out = b + λ Σ w_i (x_i − b)  (Ilharco et al. 2023, arXiv:2212.04089)
        let combine = Combine {
            weights: ops::weights(t, "weight")?,
            lambda: t.global.f64("lambda")?,
            normalize: t.global.bool("normalize")?,
            rule: Rule::Linear,
        };
        combine.check(INFO.name, t.name)?;
        ops::combine_blocks(&combine, Some(base), out, |i, start, buf| {
            let x = &chunk.models[i][start..start + buf.len()];
            let b = &base[start..start + buf.len()];
            for ((d, &x), &b) in buf.iter_mut().zip(x).zip(b) {
                *d = x as f64 - b as f64;
            }
        });
        Ok(())
    }
}

register_method!(TaskArithmetic);

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference loops are plain on purpose
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, MethodError, ParamValue};

    use super::TaskArithmetic;

    fn vectors(n: usize, values: &[Vec<f32>]) -> Vec<ParamVector> {
        let layout = Arc::new(
            Layout::new(vec![
                TensorInfo::new("x", vec![n / 2], DType::F16),
                TensorInfo::new("y", vec![n - n / 2], DType::F32),
            ])
            .unwrap(),
        );
        values
            .iter()
            .map(|v| ParamVector::from_vec(layout.clone(), v.clone()).unwrap())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_f64_reference(
            n in 1usize..40,
            m in 1usize..4,
            seed in proptest::collection::vec(-100.0f32..100.0, 200),
            w in proptest::collection::vec(-2.0f64..3.0, 4),
            lambda in -2.0f64..2.0,
            normalize in any::<bool>(),
        ) {
            let values: Vec<Vec<f32>> = (0..=m).map(|i| seed[i * 40..i * 40 + n].to_vec()).collect();
            let vs = vectors(n, &values);
            let params = (0..m).map(|i| vec![("weight", ParamValue::Float(w[i]))]).collect();
            let global = vec![("lambda", lambda.into()), ("normalize", normalize.into())];
            let merge = Merge::new(&TaskArithmetic, global, params).unwrap();
            let refs: Vec<&ParamVector> = vs[1..].iter().collect();
            let wsum: f64 = w[..m].iter().sum();
            let result = merge.run(Some(&vs[0]), &refs);
            if normalize && wsum == 0.0 {
                prop_assert!(result.is_err());
                return Ok(());
            }
            let out = result.unwrap();
            for e in 0..n {
                let b = values[0][e] as f64;
                let mut acc = 0.0f64;
                for i in 0..m {
                    acc += w[i] * (values[i + 1][e] as f64 - b);
                }
                if normalize {
                    acc /= wsum;
                }
                let expect = b + lambda * acc;
                let got = out.values().unwrap()[e] as f64;
                // f32 output: allow an f32 rounding of the largest term.
                let scale = b.abs().max((lambda * acc).abs()).max(1.0);
                prop_assert!((got - expect).abs() <= 2e-6 * scale, "{} vs {}", got, expect);
            }
        }
    }

    #[test]
    fn lambda_zero_returns_the_base_and_negative_weight_forgets() {
        let vs = vectors(4, &[vec![1.0, 2.0, 3.0, 4.0], vec![2.0, 2.0, 5.0, 0.0]]);
        let merge =
            Merge::new(&TaskArithmetic, vec![("lambda", 0.0.into())], vec![vec![]]).unwrap();
        assert_eq!(
            merge
                .run(Some(&vs[0]), &[&vs[1]])
                .unwrap()
                .values()
                .unwrap(),
            vs[0].values().unwrap()
        );
        let merge = Merge::new(
            &TaskArithmetic,
            vec![],
            vec![vec![("weight", (-1.0).into())]],
        )
        .unwrap();
        let out = merge.run(Some(&vs[0]), &[&vs[1]]).unwrap();
        assert_eq!(out.values().unwrap(), &[0.0, 2.0, 1.0, 8.0]);
    }

    #[test]
    fn needs_a_base_and_rejects_zero_weight_sum_with_normalize() {
        let vs = vectors(2, &[vec![1.0, 2.0], vec![2.0, 2.0], vec![0.0, 1.0]]);
        let merge = Merge::with_defaults(&TaskArithmetic, 1).unwrap();
        assert!(matches!(
            merge.run(None, &[&vs[1]]),
            Err(MethodError::NeedsBase { .. })
        ));
        let merge = Merge::new(
            &TaskArithmetic,
            vec![("normalize", true.into())],
            vec![
                vec![("weight", 0.5.into())],
                vec![("weight", (-0.5).into())],
            ],
        )
        .unwrap();
        let err = merge.run(Some(&vs[0]), &[&vs[1], &vs[2]]).unwrap_err();
        assert!(
            matches!(err, MethodError::Invalid { ref tensor, .. } if tensor == "x"),
            "{err}"
        );
    }
}
