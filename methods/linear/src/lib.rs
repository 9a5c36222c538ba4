//! # tensormerge-method-linear
//!
//! `linear`: the weighted average of the models (a model soup; Wortsman et
//! al. 2022, arXiv:2203.05482):
//!
//! `out = Σ w_i x_i / Σ w_i` with `normalize: true` (the default), else
//! `out = Σ w_i x_i`.
//!
//! No base model is used (a base, if given, only supplies non-float tensors
//! and config files). A weight sum of zero with `normalize` is an error
//! ([`MethodError::Invalid`]), not a NaN.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_linear as _; // link the crate so it registers
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let a = ParamVector::from_vec(layout.clone(), vec![1.0, 2.0]).unwrap();
//! let b = ParamVector::from_vec(layout.clone(), vec![4.0, 8.0]).unwrap();
//! let linear = registry().get("linear").unwrap();
//! let merge = Merge::new(linear, vec![], vec![vec![("weight", 2.0.into())], vec![("weight", 1.0.into())]]).unwrap();
//! let out = merge.run(None, &[&a, &b]).unwrap();
//! assert_eq!(out.values().unwrap(), &[2.0, 4.0]); // (2·a + 1·b) / 3
//! ```
//!
//! Differences from mergekit: mergekit requires `weight`; here it defaults to
//! 1.0 (an existing config means the same thing). Sums are taken in `f64` in
//! model order and rounded to the output once, so averaging N copies of a
//! model returns that model exactly.
#![deny(missing_docs)]

use tensormerge_methods::ops::{self, Combine, Rule};
use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec,
    register_method,
};

/// The `linear` method.
#[derive(Debug, Clone, Copy)]
pub struct Linear;

/// Declared parameters of `linear`.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec::WEIGHT,
    ParamSpec::global(
        "normalize",
        ParamKind::Bool,
        Default::Bool(true),
        "divide by the sum of the weights",
    ),
];

/// What `linear` is.
pub static INFO: MethodInfo = MethodInfo {
    name: "linear",
    summary: "weighted average of the models (model soup)",
    paper: "Wortsman et al. 2022, arXiv:2203.05482",
    base: BaseModel::Unused,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

impl MergeMethod for Linear {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor;
        // out = Σ w_i x_i / Σ w_i  (Wortsman et al. 2022, arXiv:2203.05482)
        let combine = Combine {
            weights: ops::weights(t, "weight")?,
            lambda: 1.0,
            normalize: t.global.bool("normalize")?,
            rule: Rule::Linear,
        };
        combine.check(INFO.name, t.name)?;
        ops::combine_blocks(&combine, None, out, |i, start, buf| {
            let x = &chunk.models[i][start..start + buf.len()];
            buf.iter_mut().zip(x).for_each(|(d, &x)| *d = x as f64);
        });
        Ok(())
    }
}

register_method!(Linear);

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // reference loops are plain on purpose
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, MethodError, ParamValue};

    use super::Linear;

    fn vectors(n: usize, values: &[Vec<f32>]) -> Vec<ParamVector> {
        let layout = Arc::new(
            Layout::new(vec![
                TensorInfo::new("a", vec![n / 2], DType::F32),
                TensorInfo::new("b", vec![n - n / 2], DType::BF16),
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
            seed in proptest::collection::vec(-100.0f32..100.0, 160),
            w in proptest::collection::vec(0.1f64..3.0, 4),
            normalize in any::<bool>(),
        ) {
            let values: Vec<Vec<f32>> = (0..m).map(|i| seed[i * 40..i * 40 + n].to_vec()).collect();
            let vs = vectors(n, &values);
            let params = (0..m).map(|i| vec![("weight", ParamValue::Float(w[i]))]).collect();
            let merge = Merge::new(&Linear, vec![("normalize", normalize.into())], params).unwrap();
            let refs: Vec<&ParamVector> = vs.iter().collect();
            let out = merge.run(None, &refs).unwrap();
            let wsum: f64 = w[..m].iter().sum();
            for e in 0..n {
                let mut acc = 0.0f64;
                for i in 0..m {
                    acc += w[i] * values[i][e] as f64;
                }
                if normalize {
                    acc /= wsum;
                }
                let got = out.values().unwrap()[e] as f64;
                prop_assert!((got - acc).abs() <= 1e-6 * acc.abs().max(1.0), "{} vs {}", got, acc);
            }
        }
    }

    #[test]
    fn zero_weight_sum_with_normalize_is_an_error_naming_the_tensor() {
        let vs = vectors(4, &[vec![1.0; 4], vec![2.0; 4]]);
        let merge = Merge::new(
            &Linear,
            vec![],
            vec![
                vec![("weight", 1.0.into())],
                vec![("weight", (-1.0).into())],
            ],
        )
        .unwrap();
        match merge.run(None, &[&vs[0], &vs[1]]) {
            Err(MethodError::Invalid { method, tensor, .. }) => {
                assert_eq!(method, "linear");
                assert_eq!(tensor, "a");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        // Without normalisation the same weights are fine: 1·x − 1·y.
        let merge = Merge::new(
            &Linear,
            vec![("normalize", false.into())],
            vec![
                vec![("weight", 1.0.into())],
                vec![("weight", (-1.0).into())],
            ],
        )
        .unwrap();
        let out = merge.run(None, &[&vs[0], &vs[1]]).unwrap();
        assert_eq!(out.values().unwrap(), &[-1.0; 4]);
    }

    #[test]
    fn copies_average_to_the_copy_exactly() {
        let v = vec![0.1f32, -3.7, 1e-8, 12345.678];
        let vs = vectors(4, &[v.clone(), v.clone(), v.clone()]);
        let merge = Merge::new(
            &Linear,
            vec![],
            vec![
                vec![("weight", 0.3.into())],
                vec![("weight", 0.3.into())],
                vec![("weight", 0.7.into())],
            ],
        )
        .unwrap();
        let out = merge.run(None, &[&vs[0], &vs[1], &vs[2]]).unwrap();
        assert_eq!(out.values().unwrap(), &v[..]);
    }
}
