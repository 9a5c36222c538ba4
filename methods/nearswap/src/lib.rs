//! # tensormerge-method-nearswap
//!
//! `nearswap`: takes the base model's values and moves each entry towards the
//! other model's in proportion to how close the two already are (mergekit's
//! nearswap, after alchemonaut's QuartetAnemoi merges; no paper). Per entry,
//! with base value `b` and model value `x`:
//!
//! ```text
//! w   = clamp(t / |b − x|, 0, 1)      (w = 1 where b = x)
//! out = w · x + (1 − w) · b
//! ```
//!
//! Entries that differ by at most `t` are swapped to the model's value; the
//! further apart, the more the base is kept. `t` is global, so layer
//! gradients and filters apply to it.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_nearswap as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let base = ParamVector::from_vec(layout.clone(), vec![0.0, 0.0]).unwrap();
//! let x = ParamVector::from_vec(layout.clone(), vec![0.5, 4.0]).unwrap();
//! let m = registry().get("nearswap").unwrap();
//! let merge = Merge::new(m, vec![("t", 1.0.into())], vec![vec![]]).unwrap();
//! // |0 − 0.5| ≤ 1: swapped; |0 − 4| = 4: w = 1/4.
//! assert_eq!(merge.run(Some(&base), &[&x]).unwrap().values().unwrap(), &[0.5, 1.0]);
//! ```
//!
//! Differences from mergekit: `t = 0` is accepted and keeps the base (the
//! limit of the formula), where mergekit raises an error; the weight is
//! computed in `f64`.
#![deny(missing_docs)]

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec,
    register_method,
};

/// The `nearswap` method.
#[derive(Debug, Clone, Copy)]
pub struct NearSwap;

static PARAMS: &[ParamSpec] = &[ParamSpec::global(
    "t",
    ParamKind::Float {
        min: 0.0,
        max: f64::INFINITY,
    },
    Default::Required,
    "sameness threshold: entries closer than this take the model's value",
)];

static INFO: MethodInfo = MethodInfo {
    name: "nearswap",
    summary: "swaps in the model's values where they are within `t` of the base, interpolating further away",
    paper: "none (mergekit's nearswap, after alchemonaut/QuartetAnemoi-70B)",
    base: BaseModel::Required,
    min_models: 1,
    max_models: Some(1),
    params: PARAMS,
};

impl MergeMethod for NearSwap {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor.global.f64("t")?;
        let (base, x) = chunk.base_and_one_model(INFO.name)?;
        for ((o, &b), &x) in out.iter_mut().zip(base).zip(x.iter()) {
            let diff = (b as f64 - x as f64).abs();
            let w = if diff == 0.0 {
                1.0
            } else {
                (t / diff).clamp(0.0, 1.0)
            };
            *o = (w * x as f64 + (1.0 - w) * b as f64) as f32;
        }
        Ok(())
    }
}

register_method!(NearSwap);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, registry};

    fn vectors() -> (ParamVector, ParamVector) {
        let l = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![4, 5], DType::F32)]).unwrap());
        let base: Vec<f32> = (0..20).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect();
        let x: Vec<f32> = (0..20)
            .map(|i| ((i * 3) % 13) as f32 * 0.08 - 0.5)
            .collect();
        (
            ParamVector::from_vec(l.clone(), base).unwrap(),
            ParamVector::from_vec(l, x).unwrap(),
        )
    }

    fn run(t: f64, base: &ParamVector, x: &ParamVector) -> ParamVector {
        let m = registry().get("nearswap").unwrap();
        Merge::new(m, vec![("t", t.into())], vec![vec![]])
            .unwrap()
            .chunk_len(7)
            .run(Some(base), &[x])
            .unwrap()
    }

    #[test]
    fn matches_reference() {
        let (b, x) = vectors();
        for t in [0.0, 0.05, 0.2, 1.0, 10.0] {
            let out = run(t, &b, &x);
            for ((o, bv), xv) in out
                .values()
                .unwrap()
                .iter()
                .zip(b.values().unwrap())
                .zip(x.values().unwrap())
            {
                let (bv, xv) = (*bv as f64, *xv as f64);
                // Reference: entries within t are swapped; otherwise move t towards x.
                let want = if (bv - xv).abs() <= t {
                    xv
                } else {
                    bv + t * (xv - bv).signum()
                };
                assert!((*o as f64 - want).abs() < 1e-6, "t={t}: {o} vs {want}");
            }
        }
    }

    #[test]
    fn limits() {
        let (b, x) = vectors();
        assert_eq!(run(0.0, &b, &x).values().unwrap(), b.values().unwrap());
        assert_eq!(run(1e9, &b, &x).values().unwrap(), x.values().unwrap());
        assert_eq!(run(0.3, &b, &b).values().unwrap(), b.values().unwrap());
    }

    #[test]
    fn needs_base_and_t() {
        let (b, x) = vectors();
        let m = registry().get("nearswap").unwrap();
        assert!(matches!(
            Merge::with_defaults(m, 1),
            Err(MethodError::MissingParameter { .. })
        ));
        assert!(matches!(
            Merge::new(m, vec![("t", (-1.0).into())], vec![vec![]]),
            Err(MethodError::OutOfRange { .. })
        ));
        let merge = Merge::new(m, vec![("t", 0.1.into())], vec![vec![]]).unwrap();
        assert!(matches!(
            merge.run(None, &[&x]),
            Err(MethodError::NeedsBase { .. })
        ));
        let merge = Merge::new(m, vec![("t", 0.1.into())], vec![vec![], vec![]]).unwrap();
        assert!(matches!(
            merge.run(Some(&b), &[&x, &x]),
            Err(MethodError::ModelCount { .. })
        ));
    }
}
