//! Fuzz check: the expression language (parser, error rendering, and both
//! evaluators: the in-memory `eval_vectors` and the chunked `Evaluator` used
//! for streaming must agree bit for bit, whole or in chunks).
//!
//! Shared, through `#[path]`, by the fuzz target `expr` and the regression
//! test `crates/engine/tests/hostile_fuzz_regressions.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
use tensormerge_engine::expr::{self, Evaluator};

/// Values that exercise signed zeros, overflow, subnormals and ordinary numbers.
const VALUES: [f32; 8] = [0.5, -2.0, 3.0e38, -0.0, 1.0e-45, 7.25, 0.0, -1.5];

/// Parses `src`; on success evaluates it on small vectors both ways and
/// compares. Panics when a promise is broken.
pub fn check(src: &str) {
    let e = match expr::parse(src) {
        Ok(e) => e,
        Err(err) => {
            // Rendering (with a caret under the column) must not panic.
            let text = err.to_string();
            assert!(!text.is_empty());
            let _ = err.column();
            return;
        }
    };
    let names: Vec<String> = e.models().map(str::to_string).collect();
    assert!(!names.is_empty(), "an expression names at least one model");
    let layout = Arc::new(
        Layout::new(vec![
            TensorInfo::new("w", vec![3], DType::F32),
            TensorInfo::new("b", vec![2], DType::BF16),
        ])
        .expect("layout"),
    );
    let n = 5;
    let inputs: Vec<Vec<f32>> = (0..names.len())
        .map(|m| (0..n).map(|i| VALUES[(m * 3 + i) % VALUES.len()]).collect())
        .collect();
    let map: HashMap<String, ParamVector> = names
        .iter()
        .zip(&inputs)
        .map(|(name, v)| {
            (
                name.clone(),
                ParamVector::from_vec(layout.clone(), v.clone()).expect("vector"),
            )
        })
        .collect();
    let whole = expr::eval_vectors(&e, &map).expect("in-memory evaluation");
    let whole = whole.values().expect("result values").to_vec();
    assert_eq!(whole.len(), n);

    let slices: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let mut ev = Evaluator::new(&e);
    let streamed = ev.eval(&slices, n).expect("chunked evaluation").to_vec();
    assert_same(src, &whole, &streamed, "eval_vectors vs Evaluator");

    // In two chunks (2 + 3 elements) the result must be the same.
    let mut chunked = Vec::with_capacity(n);
    for range in [0..2, 2..n] {
        let part: Vec<&[f32]> = inputs.iter().map(|v| &v[range.clone()]).collect();
        chunked.extend_from_slice(ev.eval(&part, range.len()).expect("chunk evaluation"));
    }
    assert_same(src, &whole, &chunked, "whole vs chunked");
}

fn assert_same(src: &str, a: &[f32], b: &[f32], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            "{what} differ at element {i} for `{src}`: {x:?} vs {y:?}"
        );
    }
}
