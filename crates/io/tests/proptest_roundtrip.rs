//! Property tests: arbitrary tensors across dtypes and shard sizes survive a
//! write and a read, bit-exactly for F32 and with `half`'s rounding for
//! BF16/F16; every shard is also readable by the `safetensors` crate.

use proptest::prelude::*;
use tensormerge_core::{DType, TensorInfo};
use tensormerge_io::{Model, ModelWriter, WriterOptions};

#[derive(Debug, Clone)]
struct Spec {
    shape: Vec<usize>,
    dtype: DType,
    bits: Vec<u32>,
}

fn spec() -> impl Strategy<Value = Spec> {
    let dtypes = prop::sample::select(vec![
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::F64,
        DType::I32,
        DType::U8,
    ]);
    (prop::collection::vec(0usize..4, 0..3), dtypes).prop_flat_map(|(shape, dtype)| {
        let n: usize = shape.iter().product();
        prop::collection::vec(any::<u32>(), n).prop_map(move |bits| Spec {
            shape: shape.clone(),
            dtype,
            bits,
        })
    })
}

/// Expected stored bytes, computed without tensormerge's converters.
fn stored(dtype: DType, bits: &[u32]) -> Vec<u8> {
    bits.iter()
        .flat_map(|&b| {
            let f = f32::from_bits(b);
            match dtype {
                DType::F32 => b.to_le_bytes().to_vec(),
                DType::F64 => (f as f64).to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::from_f32(f).to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f32(f).to_le_bytes().to_vec(),
                DType::I32 => b.to_le_bytes().to_vec(),
                DType::U8 => vec![b as u8],
                _ => unreachable!(),
            }
        })
        .collect()
}

/// Expected decoded value bits.
fn decoded(dtype: DType, b: u32) -> u32 {
    let f = f32::from_bits(b);
    match dtype {
        DType::F32 => b,
        DType::F64 => ((f as f64) as f32).to_bits(),
        DType::BF16 => half::bf16::from_f32(f).to_f32().to_bits(),
        DType::F16 => half::f16::from_f32(f).to_f32().to_bits(),
        _ => unreachable!(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn write_then_read(specs in prop::collection::vec(spec(), 0..7), max_shard in 0u64..64, piece in 1usize..9) {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let infos: Vec<TensorInfo> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| TensorInfo::new(format!("t{i}.w"), s.shape.clone(), s.dtype))
            .collect();
        let mut w = ModelWriter::create(&out, infos.clone(), WriterOptions { max_shard_bytes: max_shard, ..Default::default() }).unwrap();
        let shards = w.num_shards();
        for (t, s) in infos.iter().zip(&specs) {
            let bytes = stored(s.dtype, &s.bits);
            for chunk in bytes.chunks(piece) {
                w.write(&t.name, chunk).unwrap();
            }
        }
        w.finish().unwrap();

        let m = Model::open_path(&out).unwrap();
        prop_assert_eq!(m.layout().tensors(), infos.as_slice());
        prop_assert_eq!(m.files().len(), shards);
        for (t, s) in infos.iter().zip(&specs) {
            prop_assert_eq!(m.tensor_bytes(&t.name).unwrap().to_vec(), stored(s.dtype, &s.bits));
            if s.dtype.is_float() {
                // NaN payloads: whether a signalling NaN is quieted on the way
                // through f64 depends on the hardware and on constant folding,
                // so any NaN matches any NaN; every other value is bit-exact.
                let canon = |b: u32| if f32::from_bits(b).is_nan() { u32::MAX } else { b };
                let got: Vec<u32> = m.read_f32_vec(&t.name).unwrap().iter().map(|v| canon(v.to_bits())).collect();
                let want: Vec<u32> = s.bits.iter().map(|&b| canon(decoded(s.dtype, b))).collect();
                prop_assert_eq!(got, want);
            }
        }
        // Shard sizes respect the limit unless a shard holds a single tensor.
        for f in m.files() {
            let bytes = std::fs::read(f).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
            prop_assert!(data as u64 <= max_shard || st.len() == 1 || shards == 1 && data == 0, "shard {} has {} bytes", f.display(), data);
        }
    }
}
