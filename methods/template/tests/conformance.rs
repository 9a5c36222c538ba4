//! Step 4: a reference test and the testkit's conformance suite.
#![allow(clippy::needless_range_loop)] // the reference loop is plain on purpose
use std::sync::Arc;

use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
use tensormerge_method_template::TemplateScale;
use tensormerge_methods::Merge;

tensormerge_methods::conformance_suite!(
    template_scale_conformance,
    "template_scale",
    global("scale", 0.5),
    symmetric(),
    identity(Identity::returns_base(vec![("scale", 0.0.into())], vec![])),
);

#[test]
fn matches_a_plain_reference() {
    let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![3], DType::F32)]).unwrap());
    let xs = [[1.0f32, 2.0, 3.0], [2.0, 0.0, -1.0], [4.0, 4.0, 4.0]];
    let v: Vec<ParamVector> = xs
        .iter()
        .map(|x| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap())
        .collect();
    let w = [1.0, 3.0];
    let merge = Merge::new(
        &TemplateScale,
        vec![("scale", 1.5.into())],
        vec![vec![("weight", w[0].into())], vec![("weight", w[1].into())]],
    )
    .unwrap();
    let out = merge.run(Some(&v[0]), &[&v[1], &v[2]]).unwrap();
    for e in 0..3 {
        let b = xs[0][e] as f64;
        let mean = (w[0] * (xs[1][e] as f64 - b) + w[1] * (xs[2][e] as f64 - b)) / (w[0] + w[1]);
        assert_eq!(out.values().unwrap()[e], (b + 1.5 * mean) as f32);
    }
}
