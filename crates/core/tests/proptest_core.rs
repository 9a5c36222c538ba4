//! Property tests for the core data model: layout → vector → tensors round
//! trips and the arithmetic identities of `ParamVector`.

use std::sync::Arc;

use proptest::prelude::*;
use tensormerge_core::{
    DType, InMemoryModel, Layout, ModelTensorMapper, ParamVector, Tensor, TensorInfo, TensorSource,
};

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::F64,
        DType::I64,
        DType::U8,
    ])
}

/// A value exactly representable in `dtype`, from arbitrary bits.
fn representable(dtype: DType, bits: u32) -> f32 {
    let f = f32::from_bits(bits);
    let f = if f.is_finite() {
        f
    } else {
        (bits % 1000) as f32
    };
    match dtype {
        DType::BF16 => half::bf16::from_f32(f).to_f32(),
        DType::F16 => {
            let h = half::f16::from_f32(f);
            if h.is_finite() { h.to_f32() } else { 1.0 }
        }
        _ => f,
    }
}

/// A model with arbitrary shapes and dtypes, values representable in each dtype.
fn model() -> impl Strategy<Value = InMemoryModel> {
    prop::collection::vec((prop::collection::vec(0usize..4, 0..3), dtype()), 0..6)
        .prop_flat_map(|specs| {
            let lens: Vec<usize> = specs.iter().map(|(s, _)| s.iter().product()).collect();
            let values = lens
                .iter()
                .map(|&n| prop::collection::vec(any::<u32>(), n))
                .collect::<Vec<_>>();
            (Just(specs), values)
        })
        .prop_map(|(specs, values)| {
            let tensors = specs
                .into_iter()
                .zip(values)
                .enumerate()
                .map(|(i, ((shape, dtype), bits))| {
                    let name = format!("layer{i}.weight");
                    if dtype.is_float() {
                        let v: Vec<f32> = bits.iter().map(|&b| representable(dtype, b)).collect();
                        Tensor::from_f32(name, shape, dtype, &v).unwrap()
                    } else {
                        let data: Vec<u8> = bits
                            .iter()
                            .flat_map(|b| {
                                b.to_le_bytes().repeat(2)[..dtype.size_in_bytes()].to_vec()
                            })
                            .collect();
                        Tensor::from_bytes(TensorInfo::new(name, shape, dtype), data).unwrap()
                    }
                })
                .collect();
            InMemoryModel::new("prop", tensors).unwrap()
        })
}

fn vector(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-1.0e3f32..1.0e3, len)
}

fn flat_layout(n: usize) -> Arc<Layout> {
    Arc::new(Layout::new(vec![TensorInfo::new("w", vec![n], DType::F32)]).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn layout_vector_tensors_round_trip(m in model()) {
        let mapper = ModelTensorMapper::for_model(&m);
        let v = mapper.to_vector(&m).unwrap();
        // The vector is the float tensors' values concatenated in layout order.
        let mut expect = Vec::new();
        for t in m.tensors() {
            if t.info.dtype.is_float() {
                expect.extend(t.to_f32().unwrap());
            }
        }
        prop_assert_eq!(v.values().unwrap(), expect.as_slice());
        prop_assert_eq!(v.len(), m.layout().num_params());
        // Back to tensors: names, shapes, dtypes and bytes restored exactly.
        let back = mapper.from_vector(&v).unwrap();
        let floats: Vec<&Tensor> = m.tensors().iter().filter(|t| t.info.dtype.is_float()).collect();
        prop_assert_eq!(back.len(), floats.len());
        for (b, orig) in back.iter().zip(floats) {
            prop_assert_eq!(&b.info, &orig.info);
            prop_assert_eq!(&b.data, &orig.data);
            prop_assert_eq!(mapper.vector_view(&v, &b.info.name).unwrap().to_vec(), orig.to_f32().unwrap());
        }
        // The layout rebuilt from its own tensors is equal.
        prop_assert_eq!(&Layout::new(m.layout().tensors().to_vec()).unwrap(), m.layout());
    }

    #[test]
    fn arithmetic_identities((a, b) in (1usize..40).prop_flat_map(|n| (vector(n), vector(n)))) {
        let l = flat_layout(a.len());
        let va = ParamVector::from_vec(l.clone(), a.clone()).unwrap();
        let vb = ParamVector::from_vec(l.clone(), b.clone()).unwrap();
        // (a + b) - b ≈ a, within one rounding of the sum.
        let r = (&va + &vb) - &vb;
        for ((x, y), z) in r.values().unwrap().iter().zip(&a).zip(&b) {
            let tol = (y.abs() + z.abs()) * f32::EPSILON;
            prop_assert!((x - y).abs() <= tol, "{x} vs {y}");
        }
        prop_assert_eq!(&va * 1.0, va.clone());
        prop_assert_eq!(1.0 * &va, va.clone());
        let ones = ParamVector::full(l.clone(), 1.0);
        prop_assert_eq!(&va * &ones, va.clone());
        let zero = 0.0 * &va;
        prop_assert!(zero.values().unwrap().iter().all(|x| *x == 0.0));
        prop_assert_eq!(-(-&va), va.clone());
        // Dot and norms against plain f64 loops.
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        prop_assert!((va.dot(&vb).unwrap() - dot).abs() <= 1e-9 * (1.0 + dot.abs()));
        let l2: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        prop_assert!((va.norm_l2().unwrap() - l2).abs() <= 1e-9 * (1.0 + l2));
    }
}
