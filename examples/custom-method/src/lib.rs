//! # tensormerge-example-custom-method
//!
//! A third-party merge method outside the built-in list: `example_median`,
//! the element-wise median of the models (the mean of the two middle values
//! for an even count), a robust alternative to the model soup's mean
//! (Wortsman et al. 2022, arXiv:2203.05482).
//!
//! The crate depends only on `tensormerge-methods`, registers its method
//! with `register_method!`, and is linked by its own binary
//! (`custom-merge`, `src/main.rs`), which lists it next to the built-in
//! methods. The stock set (`tensormerge::builtin`, and the `stock-registry`
//! binary which links only that) does not contain it.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_example_custom_method as _; // link the crate so it registers
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let v = |x: [f32; 2]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! let (a, b, c) = (v([1.0, 100.0]), v([2.0, 0.0]), v([9.0, 1.0]));
//! let median = registry().get("example-median").unwrap();
//! let out = Merge::with_defaults(median, 3).unwrap().run(None, &[&a, &b, &c]).unwrap();
//! assert_eq!(out.values().unwrap(), &[2.0, 1.0]);
//! ```
#![deny(missing_docs)]

use tensormerge_methods::{
    BaseModel, Chunk, MergeMethod, MethodError, MethodInfo, register_method,
};

/// The `example_median` method.
#[derive(Debug, Clone, Copy)]
pub struct ExampleMedian;

/// What `example_median` is.
pub static INFO: MethodInfo = MethodInfo {
    name: "example_median",
    summary: "element-wise median of the models (example third-party method)",
    paper: "example; cf. model soups, Wortsman et al. 2022, arXiv:2203.05482",
    base: BaseModel::Unused,
    min_models: 1,
    max_models: None,
    params: &[],
};

/// The median of `values` (sorted in place; NaN sorts last), the mean of the
/// two middle values for an even count.
pub fn median(values: &mut [f32]) -> f32 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        ((values[n / 2 - 1] as f64 + values[n / 2] as f64) / 2.0) as f32
    }
}

impl MergeMethod for ExampleMedian {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let mut column = vec![0.0f32; chunk.models.len()];
        for (e, o) in out.iter_mut().enumerate() {
            column
                .iter_mut()
                .zip(chunk.models)
                .for_each(|(c, m)| *c = m[e]);
            *o = median(&mut column);
        }
        Ok(())
    }
}

register_method!(ExampleMedian);

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(&mut [3.0, -1.0, 2.0]), 2.0);
        assert_eq!(super::median(&mut [3.0, -1.0, 2.0, 10.0]), 2.5);
        assert_eq!(super::median(&mut [7.0]), 7.0);
    }
}
