//! `fisher` against an independent f64 reference, and its documented rules.
#![allow(clippy::needless_range_loop)] // reference loops are plain on purpose

use std::sync::Arc;

use proptest::prelude::*;
use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
use tensormerge_method_fisher::Fisher;
use tensormerge_method_linear::Linear;
use tensormerge_methods::{
    ChunkData, Merge, MergeMethod, MethodError, ParamValue, TensorContext, merge_tensor,
};

const NAMES: [&str; 2] = ["enc.w", "dec.w"];

fn layout(sizes: &[usize]) -> Arc<Layout> {
    let infos = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorInfo::new(NAMES[i], vec![n], DType::F32))
        .collect();
    Arc::new(Layout::new(infos).unwrap())
}

fn vector(layout: &Arc<Layout>, v: &[f32]) -> ParamVector {
    ParamVector::from_vec(layout.clone(), v.to_vec()).unwrap()
}

#[derive(Debug, Clone)]
struct Case {
    sizes: Vec<usize>,
    models: Vec<Vec<f32>>,
    fishers: Vec<Vec<f32>>,
    weights: Vec<f64>,
    floor: f64,
    normalize: bool,
    chunk: usize,
}

fn run(case: &Case, chunk: usize) -> Result<Vec<f32>, MethodError> {
    let layout = layout(&case.sizes);
    let xs: Vec<ParamVector> = case.models.iter().map(|x| vector(&layout, x)).collect();
    let fs: Vec<ParamVector> = case.fishers.iter().map(|x| vector(&layout, x)).collect();
    let global = vec![
        ("fisher_floor", ParamValue::Float(case.floor)),
        ("normalize_fishers", case.normalize.into()),
    ];
    let per_model = case
        .weights
        .iter()
        .map(|&w| vec![("weight", ParamValue::Float(w))])
        .collect();
    let merge = Merge::new(&Fisher, global, per_model)
        .unwrap()
        .chunk_len(chunk);
    let xr: Vec<&ParamVector> = xs.iter().collect();
    let fr: Vec<Option<&ParamVector>> = fs.iter().map(Some).collect();
    Ok(merge
        .run_with_aux(None, &xr, &fr, None)?
        .values()
        .unwrap()
        .to_vec())
}

fn reference(case: &Case) -> Vec<f64> {
    let m = case.models.len();
    let len = case.models[0].len();
    let coef: Vec<f64> = (0..m)
        .map(|j| {
            if case.normalize {
                let norm = case.fishers[j]
                    .iter()
                    .map(|&f| (f as f64) * (f as f64))
                    .sum::<f64>()
                    .sqrt();
                case.weights[j] / norm
            } else {
                case.weights[j]
            }
        })
        .collect();
    (0..len)
        .map(|e| {
            let (mut num, mut den) = (0.0, 0.0);
            for j in 0..m {
                let f = (case.fishers[j][e] as f64).max(case.floor);
                num += coef[j] * f * case.models[j][e] as f64;
                den += coef[j] * f;
            }
            if den != 0.0 {
                num / den
            } else {
                let w: f64 = case.weights.iter().sum();
                (0..m)
                    .map(|j| case.weights[j] * case.models[j][e] as f64)
                    .sum::<f64>()
                    / w
            }
        })
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    (proptest::collection::vec(1usize..20, 1..=2), 1usize..=3).prop_flat_map(|(sizes, m)| {
        let len: usize = sizes.iter().sum();
        let fisher = prop_oneof![Just(0.0f32), 0.01f32..5.0];
        (
            Just(sizes),
            proptest::collection::vec(proptest::collection::vec(-4.0f32..4.0, len), m),
            proptest::collection::vec(proptest::collection::vec(fisher, len), m),
            proptest::collection::vec(0.1f64..2.0, m),
            prop_oneof![Just(0.0), Just(1e-6), Just(0.5)],
            any::<bool>(),
            1usize..7,
        )
            .prop_map(
                |(sizes, models, mut fishers, weights, floor, normalize, chunk)| {
                    // Keep every Fisher non-zero somewhere so normalisation is defined.
                    fishers.iter_mut().for_each(|f| f[0] = f[0].max(0.5));
                    Case {
                        sizes,
                        models,
                        fishers,
                        weights,
                        floor,
                        normalize,
                        chunk,
                    }
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn matches_the_f64_reference_and_chunking_does_not_matter(case in case()) {
        let whole = run(&case, usize::MAX).unwrap();
        let chunked = run(&case, case.chunk).unwrap();
        prop_assert_eq!(
            whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            chunked.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        for (e, (&got, want)) in whole.iter().zip(reference(&case)).enumerate() {
            prop_assert!((got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "entry {}: {} vs {}", e, got, want);
        }
    }
}

fn linear(models: &[Vec<f32>], weights: &[f64], sizes: &[usize]) -> Vec<f32> {
    let layout = layout(sizes);
    let xs: Vec<ParamVector> = models.iter().map(|x| vector(&layout, x)).collect();
    let xr: Vec<&ParamVector> = xs.iter().collect();
    let per_model = weights
        .iter()
        .map(|&w| vec![("weight", ParamValue::Float(w))])
        .collect();
    Merge::new(&Linear, vec![], per_model)
        .unwrap()
        .run(None, &xr)
        .unwrap()
        .values()
        .unwrap()
        .to_vec()
}

fn close(a: &[f32], b: &[f32]) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

fn two_models(fa: Vec<f32>, fb: Vec<f32>, floor: f64, normalize: bool) -> Case {
    Case {
        sizes: vec![2, 2],
        models: vec![vec![1.0, -2.0, 3.0, 0.5], vec![5.0, 2.0, -1.0, 0.25]],
        fishers: vec![fa, fb],
        weights: vec![1.0, 1.0],
        floor,
        normalize,
        chunk: usize::MAX,
    }
}

#[test]
fn equal_fishers_equal_linear() {
    for normalize in [true, false] {
        let f = vec![0.3, 2.0, 1e-3, 7.0];
        let mut case = two_models(f.clone(), f, 1e-6, normalize);
        case.weights = vec![0.25, 1.5];
        close(
            &run(&case, usize::MAX).unwrap(),
            &linear(&case.models, &case.weights, &case.sizes),
        );
    }
}

#[test]
fn a_zero_fisher_entry_does_not_influence_it() {
    // Model 0 has Fisher 0 on entry 1: with floor 0 the entry is model 1's exactly.
    let case = two_models(
        vec![1.0, 0.0, 1.0, 1.0],
        vec![1.0, 1.0, 1.0, 1.0],
        0.0,
        false,
    );
    let out = run(&case, usize::MAX).unwrap();
    assert_eq!(out[1], 2.0);
    // With the default floor its influence is floor · |x_0 − x_1| / F_1 = 4e-6 (plus an f32 rounding).
    let case = two_models(
        vec![1.0, 0.0, 1.0, 1.0],
        vec![1.0, 1.0, 1.0, 1.0],
        1e-6,
        false,
    );
    let out = run(&case, usize::MAX).unwrap();
    assert!((out[1] - 2.0).abs() <= 4e-6 + 2.4e-7, "{}", out[1]);
    // Every Fisher zero on an entry (floor 0): that entry is the weighted average.
    let case = two_models(
        vec![1.0, 0.0, 1.0, 1.0],
        vec![1.0, 0.0, 1.0, 1.0],
        0.0,
        false,
    );
    assert_eq!(run(&case, usize::MAX).unwrap()[1], 0.0);
}

#[test]
fn the_floor_lifts_small_entries() {
    // 0 and 1e-9 are both lifted to the floor 1e-3: entry 0 is the plain average.
    let case = two_models(
        vec![0.0, 1.0, 1.0, 1.0],
        vec![1e-9, 1.0, 1.0, 1.0],
        1e-3,
        false,
    );
    assert_eq!(run(&case, usize::MAX).unwrap()[0], 3.0);
    // Without the floor model 1 would win entry 0 outright.
    let case = two_models(
        vec![0.0, 1.0, 1.0, 1.0],
        vec![1e-9, 1.0, 1.0, 1.0],
        0.0,
        false,
    );
    assert_eq!(run(&case, usize::MAX).unwrap()[0], 5.0);
}

#[test]
fn normalisation_divides_by_each_fishers_global_norm() {
    // F_0 = 2 F_1 everywhere: normalised, they count equally (= linear);
    // not normalised, model 0 counts twice.
    let fb = vec![0.5, 1.0, 2.0, 0.25];
    let fa: Vec<f32> = fb.iter().map(|f| 2.0 * f).collect();
    let case = two_models(fa.clone(), fb.clone(), 0.0, true);
    close(
        &run(&case, usize::MAX).unwrap(),
        &linear(&case.models, &[1.0, 1.0], &case.sizes),
    );
    let case = two_models(fa, fb, 0.0, false);
    close(
        &run(&case, usize::MAX).unwrap(),
        &linear(&case.models, &[2.0, 1.0], &case.sizes),
    );
    // A Fisher that is zero everywhere cannot be normalised.
    let case = two_models(vec![0.0; 4], vec![1.0; 4], 1e-6, true);
    assert!(matches!(
        run(&case, usize::MAX),
        Err(MethodError::Invalid { .. })
    ));
}

#[test]
fn a_tensor_without_fisher_falls_back_to_the_weighted_average_with_a_warning() {
    let global = vec![("normalize_fishers", ParamValue::from(false))];
    let per_model = vec![
        vec![("weight", ParamValue::Float(3.0))],
        vec![("weight", ParamValue::Float(1.0))],
    ];
    let merge = Merge::new(&Fisher, global, per_model).unwrap();
    let shape = [3usize];
    let ctx = TensorContext {
        name: "head.w",
        shape: &shape,
        global: &merge.global,
        models: &merge.models,
        seed: 0,
        model_stats: None,
    };
    let data = ChunkData {
        base: None,
        models: vec![vec![1.0, 2.0, 3.0], vec![5.0, 6.0, -1.0]],
        aux: vec![Some(vec![1.0, 100.0, 1.0]), None],
        base_aux: None,
    };
    let mut out = vec![0.0f32; 3];
    merge_tensor::<MethodError>(
        &Fisher,
        &ctx,
        usize::MAX,
        |_| Ok(data.clone()),
        |off, v| {
            out[off..off + v.len()].copy_from_slice(v);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(out, [2.0, 3.0, 2.0]); // (3·x0 + 1·x1) / 4
    let warnings = Fisher.tensor_warnings(&ctx, &[true, false]);
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].contains("model(s) 1") && warnings[0].contains("head.w"),
        "{warnings:?}"
    );
    assert!(Fisher.tensor_warnings(&ctx, &[true, true]).is_empty());
}
