//! # tensormerge-method-passthrough
//!
//! `passthrough`: copies the one input model's tensors, each multiplied by
//! the model's `scale` (mergekit's passthrough; used for frankenmerges that
//! stack slices of layers, and with `scale` to damp a layer):
//!
//! ```text
//! out = scale · x
//! ```
//!
//! `scale` is a per-model parameter, so layer gradients and filters apply to
//! it (`scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]`).
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_passthrough as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let x = ParamVector::from_vec(layout, vec![1.0, -2.0]).unwrap();
//! let m = registry().get("passthrough").unwrap();
//! let merge = Merge::new(m, vec![], vec![vec![("scale", 0.5.into())]]).unwrap();
//! assert_eq!(merge.run(None, &[&x]).unwrap().values().unwrap(), &[0.5, -1.0]);
//! ```
//!
//! Differences from mergekit: `scale` defaults to `1.0` where mergekit's
//! default is "unset"; both leave the tensor unchanged. A base model, if
//! given, is not merged (it only supplies non-float tensors and config files).
#![deny(missing_docs)]

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamSpec, register_method,
};

/// The `passthrough` method.
#[derive(Debug, Clone, Copy)]
pub struct Passthrough;

static PARAMS: &[ParamSpec] = &[ParamSpec::per_model_float(
    "scale",
    f64::NEG_INFINITY,
    f64::INFINITY,
    Default::Float(1.0),
    "factor applied to the model's tensor",
)];

static INFO: MethodInfo = MethodInfo {
    name: "passthrough",
    summary: "copies one model's tensors unchanged, or multiplied by `scale`",
    paper: "none (mergekit's passthrough, used for layer-stacking merges)",
    base: BaseModel::Unused,
    min_models: 1,
    max_models: Some(1),
    params: PARAMS,
};

impl MergeMethod for Passthrough {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let (Some(x), Some(params)) = (chunk.models.first(), chunk.tensor.models.first()) else {
            return Err(MethodError::ModelCount {
                method: INFO.name.into(),
                expected: "exactly 1".into(),
                got: chunk.models.len(),
            });
        };
        let scale = params.f32("scale")?;
        if scale == 1.0 {
            out.copy_from_slice(x);
        } else {
            for (o, &v) in out.iter_mut().zip(x.iter()) {
                *o = scale * v;
            }
        }
        Ok(())
    }
}

register_method!(Passthrough);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, ParamValue, registry};

    fn input() -> ParamVector {
        let l = Arc::new(
            Layout::new(vec![
                TensorInfo::new("a", vec![2, 3], DType::F16),
                TensorInfo::new("b", vec![4], DType::F32),
            ])
            .unwrap(),
        );
        let v: Vec<f32> = (0..10).map(|i| (i as f32 - 4.5) * 0.37).collect();
        ParamVector::from_vec(l, v).unwrap()
    }

    fn run(scale: Option<f64>, x: &ParamVector) -> Result<ParamVector, MethodError> {
        let m = registry().get("passthrough")?;
        let p: Vec<(&str, ParamValue)> = scale.map(|s| ("scale", s.into())).into_iter().collect();
        Merge::new(m, vec![], vec![p])?.run(None, &[x])
    }

    #[test]
    fn default_copies_exactly() {
        let x = input();
        assert_eq!(
            run(None, &x).unwrap().values().unwrap(),
            x.values().unwrap()
        );
        assert_eq!(
            run(Some(1.0), &x).unwrap().values().unwrap(),
            x.values().unwrap()
        );
    }

    #[test]
    fn scale_multiplies_each_entry() {
        let x = input();
        for s in [0.0, -1.0, 0.3, 2.5] {
            let out = run(Some(s), &x).unwrap();
            for (o, v) in out.values().unwrap().iter().zip(x.values().unwrap()) {
                assert!((*o as f64 - s * *v as f64).abs() < 1e-6, "{o} vs {s}·{v}");
            }
        }
    }

    #[test]
    fn exactly_one_model() {
        let x = input();
        let m = registry().get("passthrough").unwrap();
        let merge = Merge::with_defaults(m, 2).unwrap();
        assert!(matches!(
            merge.run(None, &[&x, &x]),
            Err(MethodError::ModelCount { .. })
        ));
        // scale is per model, not global
        assert!(matches!(
            Merge::new(m, vec![("scale", 2.0.into())], vec![vec![]]),
            Err(MethodError::UnknownParameter { .. })
        ));
    }
}
