//! `ties` against an independent f64 reference (sorting, plain loops).
#![allow(clippy::needless_range_loop)] // reference loops are plain on purpose

use std::sync::Arc;

use proptest::prelude::*;
use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
use tensormerge_method_ties::Ties;
use tensormerge_methods::{Merge, ParamValue};

#[derive(Debug, Clone)]
struct Case {
    sizes: Vec<usize>,
    base: Vec<f64>,
    models: Vec<Vec<f64>>,
    weights: Vec<f64>,
    densities: Vec<f64>,
    lambda: f64,
    normalize: bool,
    count: bool,
    model_scope: bool,
    chunk: usize,
}

/// Names deliberately out of alphabetical order: model-scope ties are broken
/// by tensor name, not by file order.
const NAMES: [&str; 3] = ["m.weight", "a.weight", "z.bias"];

fn layout(sizes: &[usize]) -> Arc<Layout> {
    let infos = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorInfo::new(NAMES[i], vec![n], DType::F32))
        .collect();
    Arc::new(Layout::new(infos).unwrap())
}

/// Indices (into the flat vector) kept by an exact top-k by sorting.
fn keep_mask(case: &Case, tau: &[f64], d: f64) -> Vec<bool> {
    let mut keep = vec![false; tau.len()];
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut start = 0;
    let mut named: Vec<(&str, usize, usize)> = Vec::new();
    for (t, &n) in case.sizes.iter().enumerate() {
        named.push((NAMES[t], start, n));
        groups.push((start..start + n).collect());
        start += n;
    }
    if case.model_scope {
        // One group over the whole model, ordered by (tensor name, index).
        named.sort();
        groups = vec![named.iter().flat_map(|&(_, s, n)| s..s + n).collect()];
    }
    for g in groups {
        let n = g.len();
        let k = if d >= 1.0 {
            n
        } else {
            (d * n as f64).floor() as usize
        };
        let mut order: Vec<(usize, usize)> = g.iter().copied().enumerate().collect(); // (rank in group order, flat)
        order.sort_by(|a, b| {
            tau[b.1]
                .abs()
                .partial_cmp(&tau[a.1].abs())
                .unwrap()
                .then(a.0.cmp(&b.0))
        });
        for &(_, flat) in &order[..k] {
            keep[flat] = true;
        }
    }
    keep
}

fn reference(case: &Case) -> Vec<f64> {
    let len = case.base.len();
    let m = case.models.len();
    let taus: Vec<Vec<f64>> = case
        .models
        .iter()
        .map(|x| (0..len).map(|e| x[e] - case.base[e]).collect())
        .collect();
    let masks: Vec<Vec<bool>> = (0..m)
        .map(|i| keep_mask(case, &taus[i], case.densities[i]))
        .collect();
    let mut out = vec![0.0; len];
    for e in 0..len {
        let delta: Vec<f64> = (0..m)
            .map(|i| {
                if masks[i][e] {
                    case.weights[i] * taus[i][e]
                } else {
                    0.0
                }
            })
            .collect();
        let vote: f64 = if case.count {
            delta.iter().map(|&d| sign(d)).sum()
        } else {
            delta.iter().sum()
        };
        let elected = if vote >= 0.0 { 1.0 } else { -1.0 };
        let mut sum = 0.0;
        let mut div = 0.0;
        for i in 0..m {
            if delta[i] != 0.0 && sign(delta[i]) == elected {
                sum += delta[i];
                div += case.weights[i];
            }
        }
        let merged = if !case.normalize {
            sum
        } else if div == 0.0 {
            0.0
        } else {
            sum / div
        };
        out[e] = case.base[e] + case.lambda * merged;
    }
    out
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn run(case: &Case, chunk: usize) -> Vec<f32> {
    let layout = layout(&case.sizes);
    let vec = |v: &[f64]| {
        ParamVector::from_vec(layout.clone(), v.iter().map(|&x| x as f32).collect()).unwrap()
    };
    let base = vec(&case.base);
    let models: Vec<ParamVector> = case.models.iter().map(|x| vec(x)).collect();
    let refs: Vec<&ParamVector> = models.iter().collect();
    let global = vec![
        ("lambda", ParamValue::Float(case.lambda)),
        ("normalize", case.normalize.into()),
        ("consensus", if case.count { "count" } else { "sum" }.into()),
        (
            "trim_scope",
            if case.model_scope { "model" } else { "tensor" }.into(),
        ),
    ];
    let per_model = (0..models.len())
        .map(|i| {
            vec![
                ("weight", case.weights[i].into()),
                ("density", case.densities[i].into()),
            ]
        })
        .collect();
    let merge = Merge::new(&Ties, global, per_model)
        .unwrap()
        .chunk_len(chunk);
    merge
        .run(Some(&base), &refs)
        .unwrap()
        .values()
        .unwrap()
        .to_vec()
}

/// Values on a grid of quarters: differences are exact and ties frequent.
fn grid() -> impl Strategy<Value = f64> {
    (-8i32..=8).prop_map(|i| i as f64 / 4.0)
}

fn case() -> impl Strategy<Value = Case> {
    (proptest::collection::vec(1usize..12, 1..=3), 1usize..=3).prop_flat_map(|(sizes, m)| {
        let len: usize = sizes.iter().sum();
        (
            Just(sizes),
            proptest::collection::vec(grid(), len),
            proptest::collection::vec(proptest::collection::vec(grid(), len), m),
            proptest::collection::vec(prop_oneof![Just(1.0), -1.5f64..2.0], m),
            proptest::collection::vec(
                prop_oneof![
                    Just(0.0),
                    Just(0.1),
                    Just(0.3),
                    Just(0.5),
                    Just(0.9),
                    Just(1.0)
                ],
                m,
            ),
            prop_oneof![Just(1.0), Just(0.5), Just(-0.7)],
            (any::<bool>(), any::<bool>(), any::<bool>()),
            1usize..8,
        )
            .prop_map(
                |(
                    sizes,
                    base,
                    models,
                    weights,
                    densities,
                    lambda,
                    (normalize, count, model_scope),
                    chunk,
                )| {
                    Case {
                        sizes,
                        base,
                        models,
                        weights,
                        densities,
                        lambda,
                        normalize,
                        count,
                        model_scope,
                        chunk,
                    }
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn matches_the_sorting_reference_in_both_scopes_and_any_chunking(case in case()) {
        let whole = run(&case, usize::MAX);
        let chunked = run(&case, case.chunk);
        prop_assert_eq!(
            whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            chunked.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let expect = reference(&case);
        for (e, (&got, &want)) in whole.iter().zip(&expect).enumerate() {
            prop_assert!(
                (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "entry {}: got {}, want {} ({:?})", e, got, want, case
            );
        }
    }
}

fn one_tensor(base: &[f64], models: &[&[f64]]) -> Case {
    Case {
        sizes: vec![base.len()],
        base: base.to_vec(),
        models: models.iter().map(|m| m.to_vec()).collect(),
        weights: vec![1.0; models.len()],
        densities: vec![1.0; models.len()],
        lambda: 1.0,
        normalize: true,
        count: false,
        model_scope: false,
        chunk: usize::MAX,
    }
}

#[test]
fn ties_at_the_threshold_keep_the_lowest_indices() {
    let mut case = one_tensor(&[0.0; 6], &[&[1.0, 2.0, 1.0, 1.0, -1.0, 0.5]]);
    case.densities = vec![0.5]; // k = 3: the 2 and the first two of the four |1|s
    assert_eq!(run(&case, usize::MAX), [1.0, 2.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(run(&case, 1), [1.0, 2.0, 1.0, 0.0, 0.0, 0.0]);
}

#[test]
fn a_zero_vote_elects_plus_and_the_rules_differ() {
    // Entry 0: +1 and −1 cancel (sum 0 → +). Entry 1: 3, −1, −1: sum elects +, count elects −.
    let mut case = one_tensor(&[0.0, 0.0], &[&[1.0, 3.0], &[-1.0, -1.0], &[0.0, -1.0]]);
    assert_eq!(run(&case, usize::MAX), [1.0, 3.0]);
    case.count = true;
    assert_eq!(run(&case, usize::MAX), [1.0, -1.0]);
    case.normalize = false;
    assert_eq!(run(&case, usize::MAX), [1.0, -2.0]);
}

#[test]
fn k_zero_zeroes_the_model_and_is_reported() {
    let mut case = one_tensor(&[1.0; 4], &[&[5.0, 5.0, 5.0, 5.0], &[2.0, 0.0, 2.0, 2.0]]);
    case.densities = vec![0.2, 1.0]; // floor(0.2 · 4) = 0 for model 0
    assert_eq!(run(&case, usize::MAX), [2.0, 0.0, 2.0, 2.0]);
    let layout = layout(&[4]);
    let merge = Merge::new(&Ties, vec![], vec![vec![("density", 0.2.into())], vec![]]).unwrap();
    let warnings = merge.warnings(&layout, &[false, false]);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("model 0 keeps none") && w.contains("m.weight")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("trims nothing") && w.contains("model(s) 1")),
        "{warnings:?}"
    );
}

#[test]
fn negative_weights_and_a_cancelling_divisor() {
    // w = (1, −1): δ = (2, −2) → sum 0 elects +, only model 0 agrees: 2 / 1.
    let mut case = one_tensor(&[0.0], &[&[2.0], &[2.0]]);
    case.weights = vec![1.0, -1.0];
    assert_eq!(run(&case, usize::MAX), [2.0]);
    // w = (1, −1), both agree in sign after weighting (τ = 2, −2 → δ = 2, 2): divisor 0 → entry 0.
    let mut case = one_tensor(&[0.0], &[&[2.0], &[-2.0]]);
    case.weights = vec![1.0, -1.0];
    assert_eq!(run(&case, usize::MAX), [0.0]);
}

#[test]
fn one_model_density_one_weight_one_returns_the_model() {
    let x = [0.1, -7.3, 1e-7, 3.3e4, -0.0];
    let case = one_tensor(&[0.7, 0.2, -1e-3, 5.0, 1.0], &[&x]);
    let out = run(&case, usize::MAX);
    assert_eq!(out, x.map(|v| v as f32));
}

#[test]
fn model_scope_uses_one_threshold_over_all_tensors() {
    // Tensor "m.weight" has small deltas, "a.weight" large ones: with a global
    // threshold at density 0.5 only the large ones survive.
    let case = Case {
        sizes: vec![2, 2],
        base: vec![0.0; 4],
        models: vec![vec![0.25, -0.5, 2.0, -3.0]],
        weights: vec![1.0],
        densities: vec![0.5],
        lambda: 1.0,
        normalize: true,
        count: false,
        model_scope: true,
        chunk: usize::MAX,
    };
    assert_eq!(run(&case, usize::MAX), [0.0, 0.0, 2.0, -3.0]);
    let per_tensor = Case {
        model_scope: false,
        ..case
    };
    assert_eq!(run(&per_tensor, usize::MAX), [0.0, -0.5, 0.0, -3.0]);
}
