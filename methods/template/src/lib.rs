//! # tensormerge-method-template
//!
//! A copyable skeleton of a merge method crate (see `README.md`: the five
//! steps to add a method). It registers `template_scale`, a small but real
//! method:
//!
//! `out = b + scale · Σ w_i (x_i − b) / Σ w_i`
//!
//! (the weighted mean task vector, scaled; with `scale = N` and equal weights
//! this is task arithmetic, Ilharco et al. 2023, arXiv:2212.04089).
//!
//! `template_scale` is registered whenever this crate is linked, but the
//! stock `tensormerge` binary does not link it (it is not in
//! `tensormerge::builtin`), so it never shows up in `tensormerge methods`.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_template as _; // link the crate so it registers
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let v = |x: [f32; 2]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let (base, a, b) = (v([1.0, 1.0]), v([3.0, 1.0]), v([1.0, 5.0]));
//! let method = registry().get("template-scale").unwrap();
//! let merge = Merge::new(method, vec![("scale", 2.0.into())], vec![vec![], vec![]]).unwrap();
//! let out = merge.run(Some(&base), &[&a, &b]).unwrap();
//! assert_eq!(out.values().unwrap(), &[3.0, 5.0]); // 1 + 2 · mean((2, 0), (0, 4))
//! ```
#![deny(missing_docs)]

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec,
    register_method,
};

/// Step 2: the method, a unit struct (methods are stateless).
#[derive(Debug, Clone, Copy)]
pub struct TemplateScale;

/// Step 2: the parameters (mergekit's names where they exist): per-model
/// ones under `models[].parameters`, global ones under `parameters`.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec::per_model_float(
        "weight",
        0.0,
        f64::INFINITY,
        Default::Float(1.0),
        "the model's weight w_i",
    ),
    ParamSpec::global(
        "scale",
        ParamKind::Float {
            min: f64::NEG_INFINITY,
            max: f64::INFINITY,
        },
        Default::Float(1.0),
        "factor on the mean task vector",
    ),
];

/// Step 2: what the method is (snake_case name, paper with arXiv id, base
/// use, model counts, parameters).
pub static INFO: MethodInfo = MethodInfo {
    name: "template_scale",
    summary: "the weighted mean task vector, scaled, added to the base (template example)",
    paper: "Ilharco et al. 2023, arXiv:2212.04089",
    base: BaseModel::Required,
    min_models: 1,
    max_models: None,
    params: PARAMS,
};

impl MergeMethod for TemplateScale {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// Step 3: merge one chunk. Element-wise methods need nothing else; for
    /// whole-tensor or whole-model statistics implement `tensor_pass` /
    /// `model_pass` (see `tensormerge_methods::ops` for exact top-k and
    /// exact sums).
    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let t = chunk.tensor;
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.into(),
        })?;
        let scale = t.global.f64("scale")?;
        let weights: Vec<f64> = t
            .models
            .iter()
            .map(|p| p.f64("weight"))
            .collect::<Result<_, _>>()?;
        let wsum: f64 = weights.iter().sum();
        if wsum == 0.0 {
            return Err(MethodError::Invalid {
                method: INFO.name.into(),
                tensor: t.name.into(),
                message: "the model weights sum to zero".into(),
            });
        }
        // out = b + scale · Σ w_i (x_i − b) / Σ w_i, in f64, rounded once.
        for (e, o) in out.iter_mut().enumerate() {
            let b = base[e] as f64;
            let sum: f64 = chunk
                .models
                .iter()
                .zip(&weights)
                .map(|(x, w)| w * (x[e] as f64 - b))
                .sum();
            *o = (b + scale * sum / wsum) as f32;
        }
        Ok(())
    }
}

// Step 4: register it.
register_method!(TemplateScale);
