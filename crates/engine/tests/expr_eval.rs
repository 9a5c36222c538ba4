//! In-memory evaluation: bit-identical to `ParamVector` arithmetic and to
//! plain `f32` loops; the chunked evaluator agrees for any chunking.

use std::collections::HashMap;
use std::sync::Arc;

use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
use tensormerge_engine::expr::{Evaluator, ExprError, eval_vectors, parse};

fn layout() -> Arc<Layout> {
    Arc::new(
        Layout::new(vec![
            TensorInfo::new("emb", vec![37, 3], DType::BF16),
            TensorInfo::new("ids", vec![4], DType::I64),
            TensorInfo::new("w", vec![100], DType::F32),
        ])
        .unwrap(),
    )
}

/// Values spread over many magnitudes (and signs), so that reassociating or
/// fusing operations would change low bits.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mant = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let exp = ((s >> 8) % 24) as i32 - 12;
            mant * 2f32.powi(exp)
        })
        .collect()
}

fn vectors() -> (ParamVector, ParamVector, ParamVector) {
    let l = layout();
    let n = l.num_params();
    let v = |seed| ParamVector::from_vec(l.clone(), values(seed, n)).unwrap();
    (v(1), v(2), v(3))
}

fn named(
    base: &ParamVector,
    legal: &ParamVector,
    recipe: &ParamVector,
) -> HashMap<String, ParamVector> {
    HashMap::from([
        ("base".to_string(), base.clone()),
        ("legal".to_string(), legal.clone()),
        ("recipe".to_string(), recipe.clone()),
    ])
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

type RustFormula = fn(&ParamVector, &ParamVector, &ParamVector) -> ParamVector;
type LoopFormula = fn(f32, f32, f32) -> f32;

/// Each case: the expression, the same formula with `ParamVector` operators,
/// and with plain `f32` per element.
fn cases() -> Vec<(&'static str, RustFormula, LoopFormula)> {
    vec![
        (
            "base + 0.5 * ((legal - base) + (recipe - base))",
            |b, l, r| b + 0.5 * ((l - b) + (r - b)),
            |b, l, r| b + 0.5 * ((l - b) + (r - b)),
        ),
        (
            "base + legal + recipe",
            |b, l, r| b + l + r,
            |b, l, r| (b + l) + r,
        ),
        (
            "base + (legal + recipe)",
            |b, l, r| b + (l + r),
            |b, l, r| b + (l + r),
        ),
        (
            "(legal - base) * 0.3 + (recipe - base) * 0.7 + base",
            |b, l, r| (l - b) * 0.3 + (r - b) * 0.7 + b,
            |b, l, r| ((l - b) * 0.3 + (r - b) * 0.7) + b,
        ),
        (
            "-base / (legal * legal + 1e-3) - -recipe",
            |b, l, r| -b / (l * l + 1e-3) - -r,
            |b, l, r| (-b) / (l * l + 1e-3) - (-r),
        ),
        (
            "2 / legal - 3 * (base - recipe) / 7",
            |b, l, r| 2.0 / l - 3.0 * (b - r) / 7.0,
            |b, l, r| 2.0 / l - (3.0 * (b - r)) / 7.0,
        ),
        (
            "0.1 * 3 * base + recipe",
            |b, _l, r| 0.1 * 3.0 * b + r,
            |b, _l, r| (0.1f32 * 3.0f32) * b + r,
        ),
        ("recipe", |_b, _l, r| r.clone(), |_b, _l, r| r),
        ("-(-legal)", |_b, l, _r| -(-l), |_b, l, _r| l),
        (
            "base - base / (recipe * 0)",
            |b, _l, r| b - b / (r * 0.0),
            |b, _l, r| b - b / (r * 0.0),
        ),
    ]
}

#[test]
fn eval_vectors_is_bit_identical_to_param_vector_arithmetic_and_plain_loops() {
    let (b, l, r) = vectors();
    let models = named(&b, &l, &r);
    for (src, rust, plain) in cases() {
        let e = parse(src).unwrap();
        let got = eval_vectors(&e, &models).unwrap();
        let want = rust(&b, &l, &r);
        assert_eq!(
            bits(got.values().unwrap()),
            bits(want.values().unwrap()),
            "{src}"
        );
        let looped: Vec<f32> = b
            .values()
            .unwrap()
            .iter()
            .zip(l.values().unwrap())
            .zip(r.values().unwrap())
            .map(|((b, l), r)| plain(*b, *l, *r))
            .collect();
        assert_eq!(bits(got.values().unwrap()), bits(&looped), "{src}");
        assert!(Arc::ptr_eq(got.layout(), b.layout()) || got.layout() == b.layout());
    }
}

#[test]
fn the_data_is_sensitive_to_the_order_of_operations() {
    // Guards the test above: with these values, a reassociated sum differs,
    // so evaluating in another order could not pass unnoticed.
    let (b, l, r) = vectors();
    let left = &b + &l + &r;
    let right = &b + (&l + &r);
    assert_ne!(bits(left.values().unwrap()), bits(right.values().unwrap()));
    let models = named(&b, &l, &r);
    let got = eval_vectors(&parse("base + legal + recipe").unwrap(), &models).unwrap();
    assert_ne!(bits(got.values().unwrap()), bits(right.values().unwrap()));
}

#[test]
fn the_chunked_evaluator_matches_for_any_chunking() {
    let (b, l, r) = vectors();
    let models = named(&b, &l, &r);
    for (src, _, _) in cases() {
        let e = parse(src).unwrap();
        let want = eval_vectors(&e, &models).unwrap();
        let inputs: Vec<&[f32]> = e.models().map(|m| models[m].values().unwrap()).collect();
        let mut ev = Evaluator::new(&e);
        for chunk in [1usize, 7, 64, 1000] {
            let mut out = Vec::new();
            let n = want.len();
            let mut start = 0;
            while start < n {
                let end = (start + chunk).min(n);
                let slices: Vec<&[f32]> = inputs.iter().map(|s| &s[start..end]).collect();
                out.extend_from_slice(ev.eval(&slices, end - start).unwrap());
                start = end;
            }
            assert_eq!(bits(&out), bits(want.values().unwrap()), "{src} / {chunk}");
        }
    }
}

#[test]
fn unknown_models_are_named_with_their_column() {
    let (b, l, r) = vectors();
    let models = named(&b, &l, &r);
    let e = parse("base + 0.5 * (legl - base)").unwrap();
    match eval_vectors(&e, &models) {
        Err(err @ ExprError::UnknownModel { .. }) => {
            assert_eq!(err.column(), Some(15));
            let text = err.to_string();
            assert!(
                text.starts_with("unknown model `legl` at column 15"),
                "{text}"
            );
            assert!(text.contains("`base`, `legal`, `recipe`"), "{text}");
            assert!(text.ends_with("\n                ^"), "{text}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn vectors_of_another_layout_are_refused_by_name() {
    let (b, l, _) = vectors();
    let other =
        Arc::new(Layout::new(vec![TensorInfo::new("x", vec![b.len()], DType::F32)]).unwrap());
    let stranger = ParamVector::zeros(other);
    let models = HashMap::from([
        ("base".to_string(), b.clone()),
        ("legal".to_string(), l),
        ("odd".to_string(), stranger),
    ]);
    let err = eval_vectors(&parse("base + legal - odd").unwrap(), &models).unwrap_err();
    match &err {
        ExprError::LayoutMismatch { model, first, .. } => {
            assert_eq!((model.as_str(), first.as_str()), ("odd", "base"));
        }
        other => panic!("{other:?}"),
    }
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("`emb`"), "{source}");
    // A faulted input vector is reported, not propagated silently.
    let faulted = &b + &models["odd"];
    let models = HashMap::from([("a".to_string(), faulted)]);
    assert!(matches!(
        eval_vectors(&parse("a * 2").unwrap(), &models),
        Err(ExprError::Vector { ref model, .. }) if model == "a"
    ));
}

#[test]
fn evaluator_inputs_are_checked() {
    let e = parse("a + b").unwrap();
    let mut ev = Evaluator::new(&e);
    let x = [1.0f32, 2.0];
    assert!(matches!(ev.eval(&[&x], 2), Err(ExprError::Inputs { .. })));
    assert!(matches!(
        ev.eval(&[&x, &x[..1]], 2),
        Err(ExprError::Inputs { .. })
    ));
    assert_eq!(ev.eval(&[&x, &x], 2).unwrap(), &[2.0, 4.0]);
}

#[test]
fn long_chunks_evaluated_in_blocks_match() {
    // Longer than the evaluator's internal block, with every kind of
    // operand pairing (buffer with buffer, negated model, scalar folding).
    let n = 5000;
    let l = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![n], DType::F32)]).unwrap());
    let v = |seed| ParamVector::from_vec(l.clone(), values(seed, n)).unwrap();
    let (a, b, c) = (v(7), v(8), v(9));
    let models = HashMap::from([
        ("a".to_string(), a.clone()),
        ("b".to_string(), b.clone()),
        ("c".to_string(), c.clone()),
    ]);
    let src = "(a - b) * (c + a) - -b / (2 * 3 - c) + (a * b - (c - a))";
    let e = parse(src).unwrap();
    let want = (&a - &b) * (&c + &a) - -&b / (2.0 * 3.0 - &c) + (&a * &b - (&c - &a));
    assert_eq!(
        bits(eval_vectors(&e, &models).unwrap().values().unwrap()),
        bits(want.values().unwrap())
    );
    let mut ev = Evaluator::new(&e);
    let inputs: Vec<&[f32]> = [&a, &b, &c].iter().map(|x| x.values().unwrap()).collect();
    // A long chunk, then a shorter one, then a long one again.
    for len in [n, 3000, n] {
        let slices: Vec<&[f32]> = inputs.iter().map(|s| &s[..len]).collect();
        let got = ev.eval(&slices, len).unwrap();
        assert_eq!(bits(got), bits(&want.values().unwrap()[..len]));
    }
}
