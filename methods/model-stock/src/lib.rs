//! # tensormerge-method-model-stock
//!
//! `model_stock` (Jang et al. 2024, "Model Stock: All we need is just a few
//! fine-tuned models", arXiv:2403.19522): interpolates between the average of
//! `N` fine-tuned models and the base, with a ratio given by the angle between
//! the models' task vectors `τ_i = x_i − b`:
//!
//! ```text
//! cos θ = mean over pairs i<j of  τ_i·τ_j / (‖τ_i‖‖τ_j‖)   (0 for a zero τ; the mean clamped to [0, 1])
//! t     = N cos θ / (1 + (N − 1) cos θ)                               (arXiv:2403.19522, eq. 5)
//! out   = t · (1/N) Σ x_i + (1 − t) · b
//! ```
//!
//! Per tensor by default; with `filter_wise: true` the angle and ratio are
//! computed for each row (each run of the last dimension; a 1-D tensor is one
//! row), as the paper's per-filter variant.
//!
//! ```
//! use std::sync::Arc;
//! use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
//! use tensormerge_methods::{registry, Merge};
//! use tensormerge_method_model_stock as _;
//!
//! let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![2], DType::F32)]).unwrap());
//! let v = |x: [f32; 2]| ParamVector::from_vec(layout.clone(), x.to_vec()).unwrap();
//! // Orthogonal task vectors: cos θ = 0, so t = 0 and the base comes back.
//! let (base, a, b) = (v([1.0, 1.0]), v([2.0, 1.0]), v([1.0, 2.0]));
//! let m = registry().get("model_stock").unwrap();
//! let out = Merge::with_defaults(m, 2).unwrap().run(Some(&base), &[&a, &b]).unwrap();
//! assert_eq!(out.values().unwrap(), &[1.0, 1.0]);
//! ```
//!
//! Differences from mergekit (deliberate): the mean cosine is clamped to
//! `[0, 1]` instead of `[−1, 1]`. The paper's ratio diverges at
//! `cos θ = −1/(N−1)` (two opposite task vectors give a division by zero in
//! mergekit) and extrapolates past the base for negative cosines; with the
//! clamp, task vectors that disagree give `t = 0`, the base. Model weights are
//! not used (as in mergekit and the paper). Sums are accumulated in `f64`.
//!
//! mergekit also clamps the norm product `‖τ_i‖‖τ_j‖` at `1e-6`, which
//! shrinks the cosine of small task vectors towards 0 (fine-tuning deltas of
//! one row often have norms below `1e-3`) and so pulls them back to the base
//! for no geometric reason; here the cosine is exact and only a zero task
//! vector counts as orthogonal.
#![deny(missing_docs)]

use std::sync::Arc;

use tensormerge_methods::{
    BaseModel, Chunk, Default, MergeMethod, MethodError, MethodInfo, ParamKind, ParamSpec, Stats,
    StatsPass, TensorContext, register_method,
};

/// The `model_stock` method.
#[derive(Debug, Clone, Copy)]
pub struct ModelStock;

static PARAMS: &[ParamSpec] = &[ParamSpec::global(
    "filter_wise",
    ParamKind::Bool,
    Default::Bool(false),
    "compute the angle and ratio per row (last dimension) instead of per tensor",
)];

static INFO: MethodInfo = MethodInfo {
    name: "model_stock",
    summary: "moves from the base towards the models' average by a ratio set by the angle between their task vectors",
    paper: "Jang et al. 2024, arXiv:2403.19522",
    base: BaseModel::Required,
    min_models: 2,
    max_models: None,
    params: PARAMS,
};

/// The sums of squares `‖τ_i‖²` and dot products `τ_i·τ_j` (`i < j`) of
/// a group of elements (a whole tensor or one row), each a running `f64`
/// sum over the entries in order, which a pass carries from chunk to chunk.
#[derive(Debug, Clone)]
struct Sums {
    n: usize,
    norms: Vec<f64>,
    dots: Vec<f64>,
}

impl Sums {
    fn new(n: usize) -> Sums {
        Sums {
            n,
            norms: vec![0.0; n],
            dots: vec![0.0; n * n],
        }
    }

    /// Adds the entries of `base` and `models` (each as long as `base`) to
    /// the sums, entry by entry in order.
    fn add(&mut self, base: &[f32], models: &[&[f32]]) {
        match self.n {
            2 => self.add_k::<2>(base, models),
            3 => self.add_k::<3>(base, models),
            4 => self.add_k::<4>(base, models),
            _ => self.add_any(base, models),
        }
    }

    /// [`add`](Self::add) for `K` models, with the running sums in locals
    /// (registers) instead of in `self` between entries. Each sum sees the
    /// same terms in the same order as in [`add_any`](Self::add_any), so the
    /// results are bit for bit the same (a test compares them).
    #[allow(clippy::needless_range_loop)] // pairs (i, j) of models index two ways
    fn add_k<const K: usize>(&mut self, base: &[f32], models: &[&[f32]]) {
        let len = base.len();
        let ms: [&[f32]; K] = std::array::from_fn(|k| &models[k][..len]);
        let mut norms: [f64; K] = std::array::from_fn(|i| self.norms[i]);
        let mut dots: [[f64; K]; K] =
            std::array::from_fn(|i| std::array::from_fn(|j| self.dots[i * K + j]));
        for e in 0..len {
            let b = base[e] as f64;
            let d: [f64; K] = std::array::from_fn(|k| ms[k][e] as f64 - b);
            for i in 0..K {
                norms[i] += d[i] * d[i];
                for j in i + 1..K {
                    dots[i][j] += d[i] * d[j];
                }
            }
        }
        for i in 0..K {
            self.norms[i] = norms[i];
            for j in i + 1..K {
                self.dots[i * K + j] = dots[i][j];
            }
        }
    }

    /// [`add`](Self::add) for any number of models.
    #[allow(clippy::needless_range_loop)] // pairs (i, j) of models index two ways
    fn add_any(&mut self, base: &[f32], models: &[&[f32]]) {
        let n = self.n;
        for e in 0..base.len() {
            let b = base[e] as f64;
            for i in 0..n {
                let di = models[i][e] as f64 - b;
                self.norms[i] += di * di;
                for j in i + 1..n {
                    self.dots[i * n + j] += di * (models[j][e] as f64 - b);
                }
            }
        }
    }

    /// The interpolation ratio `t = N cos θ / (1 + (N − 1) cos θ)` with the
    /// mean pairwise cosine (arXiv:2403.19522, eq. 5).
    fn ratio(&self) -> f64 {
        let n = self.n;
        let (norms, dots) = (&self.norms, &self.dots);
        let mut sum = 0.0;
        let mut pairs = 0usize;
        for i in 0..n {
            for j in i + 1..n {
                // sqrt(n_i · n_j) (not sqrt(n_i) · sqrt(n_j)): for identical task
                // vectors it is exactly the dot product, so cos θ = 1 and t = 1.
                // A zero task vector counts as orthogonal (see the crate docs).
                let denom = (norms[i] * norms[j]).sqrt();
                if denom > 0.0 {
                    sum += (dots[i * n + j] / denom).clamp(-1.0, 1.0);
                }
                pairs += 1;
            }
        }
        let cos = (sum / pairs.max(1) as f64).clamp(0.0, 1.0);
        n as f64 * cos / (1.0 + (n as f64 - 1.0) * cos)
    }
}

/// `t · avg + (1 − t) · b` over a group of elements.
fn apply(t: f64, base: &[f32], models: &[&[f32]], out: &mut [f32]) {
    match models.len() {
        2 => apply_k::<2>(t, base, models, out),
        3 => apply_k::<3>(t, base, models, out),
        4 => apply_k::<4>(t, base, models, out),
        _ => apply_any(t, base, models, out),
    }
}

/// [`apply`] for `K` models: the same sums in the same order as
/// [`apply_any`], from the value `Iterator::sum` starts at, so bit for bit
/// its results.
fn apply_k<const K: usize>(t: f64, base: &[f32], models: &[&[f32]], out: &mut [f32]) {
    let len = out.len();
    let ms: [&[f32]; K] = std::array::from_fn(|k| &models[k][..len]);
    let base = &base[..len];
    let start: f64 = std::iter::empty::<f64>().sum();
    for (e, o) in out.iter_mut().enumerate() {
        let mut sum = start;
        for m in &ms {
            sum += m[e] as f64;
        }
        let avg = sum / K as f64;
        *o = (t * avg + (1.0 - t) * base[e] as f64) as f32;
    }
}

/// [`apply`] for any number of models.
fn apply_any(t: f64, base: &[f32], models: &[&[f32]], out: &mut [f32]) {
    let n = models.len();
    for (e, o) in out.iter_mut().enumerate() {
        let avg = models.iter().map(|m| m[e] as f64).sum::<f64>() / n as f64;
        *o = (t * avg + (1.0 - t) * base[e] as f64) as f32;
    }
}

/// The whole-tensor angle: one sweep summing [`Sums`] over the chunks in
/// order, so that the tensor is merged in chunks.
struct AnglePass(Sums);

impl StatsPass for AnglePass {
    fn observe(&mut self, _sweep: usize, chunk: &Chunk<'_>) -> Result<(), MethodError> {
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.into(),
        })?;
        self.0.add(base, chunk.models);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Ok(Arc::new(self.0.ratio()))
    }
}

/// The row length of `filter_wise` tensors (`None`: per tensor).
fn rows(t: &TensorContext<'_>) -> Result<Option<usize>, MethodError> {
    Ok(match (t.global.bool("filter_wise")?, t.shape) {
        (true, [.., last]) if *last > 0 => Some(*last),
        _ => None,
    })
}

impl MergeMethod for ModelStock {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    /// With `filter_wise`, chunks of whole rows (each row has its own
    /// angle); else any chunks, after the per-tensor pass.
    fn chunk_multiple(&self, shape: &[usize]) -> usize {
        // `filter_wise` is not known here: whole rows either way (a tensor's
        // chunks then hold whole rows, which the per-tensor form ignores).
        match shape {
            [.., last] if *last > 0 => *last,
            _ => 1,
        }
    }

    fn tensor_pass(&self, tensor: &TensorContext<'_>) -> Option<Box<dyn StatsPass>> {
        match rows(tensor).ok()? {
            Some(_) => None,
            None => Some(Box::new(AnglePass(Sums::new(tensor.models.len())))),
        }
    }

    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let base = chunk.base.ok_or_else(|| MethodError::NeedsBase {
            method: INFO.name.into(),
        })?;
        if chunk.models.len() < 2 {
            return Err(MethodError::ModelCount {
                method: INFO.name.into(),
                expected: "at least 2".into(),
                got: chunk.models.len(),
            });
        }
        let Some(row) = rows(chunk.tensor)? else {
            let t = chunk
                .tensor_stats
                .and_then(|s| s.downcast_ref::<f64>())
                .ok_or_else(|| MethodError::Invalid {
                    method: INFO.name.into(),
                    tensor: chunk.tensor.name.into(),
                    message: "the angle pass did not run".into(),
                })?;
            apply(*t, base, chunk.models, out);
            return Ok(());
        };
        for (start, o) in (0..base.len()).step_by(row).zip(out.chunks_mut(row)) {
            let end = start + o.len();
            let models: Vec<&[f32]> = chunk.models.iter().map(|m| &m[start..end]).collect();
            let mut sums = Sums::new(models.len());
            sums.add(&base[start..end], &models);
            apply(sums.ratio(), &base[start..end], &models, o);
        }
        Ok(())
    }
}

register_method!(ModelStock);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
    use tensormerge_methods::{Merge, registry};

    fn layout() -> Arc<Layout> {
        Arc::new(
            Layout::new(vec![
                TensorInfo::new("w", vec![3, 4], DType::F32),
                TensorInfo::new("bias", vec![5], DType::F32),
            ])
            .unwrap(),
        )
    }

    fn random(layout: &Arc<Layout>, seed: u64) -> ParamVector {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x1234_5678;
        let v = (0..layout.num_params())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) as f32
            })
            .collect();
        ParamVector::from_vec(layout.clone(), v).unwrap()
    }

    fn run(filter_wise: bool, base: &ParamVector, models: &[&ParamVector]) -> ParamVector {
        let m = registry().get("model-stock").unwrap();
        Merge::new(
            m,
            vec![("filter_wise", filter_wise.into())],
            vec![vec![]; models.len()],
        )
        .unwrap()
        .run(Some(base), models)
        .unwrap()
    }

    /// Plain reference over one group: explicit task vectors, cosines by
    /// definition, the paper's ratio.
    fn reference(base: &[f32], models: &[Vec<f32>]) -> Vec<f64> {
        let tv: Vec<Vec<f64>> = models
            .iter()
            .map(|m| {
                m.iter()
                    .zip(base)
                    .map(|(x, b)| *x as f64 - *b as f64)
                    .collect()
            })
            .collect();
        let norm = |v: &Vec<f64>| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut cosines = vec![];
        for i in 0..tv.len() {
            for j in 0..tv.len() {
                if i < j {
                    let dot: f64 = tv[i].iter().zip(&tv[j]).map(|(a, b)| a * b).sum();
                    let den = norm(&tv[i]) * norm(&tv[j]);
                    cosines.push(if den > 0.0 {
                        (dot / den).clamp(-1.0, 1.0)
                    } else {
                        0.0
                    });
                }
            }
        }
        let c = (cosines.iter().sum::<f64>() / cosines.len() as f64).max(0.0);
        let n = models.len() as f64;
        let t = n * c / (1.0 + (n - 1.0) * c);
        (0..base.len())
            .map(|e| {
                let avg = models.iter().map(|m| m[e] as f64).sum::<f64>() / n;
                t * avg + (1.0 - t) * base[e] as f64
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "got {g}, want {w}");
        }
    }

    /// Models correlated with a shared direction so that cos θ > 0.
    fn correlated(l: &Arc<Layout>, base: &ParamVector, k: u64) -> ParamVector {
        let shared = random(l, 100);
        base + &(&shared + &(random(l, k) * 0.7))
    }

    /// The kernels for 2 to 4 models give bit for bit the results of the
    /// loops for any number of models, also when the sums are carried over
    /// from a previous chunk.
    #[test]
    fn specialised_kernels_equal_the_general_loops() {
        for n in 1..=5usize {
            let len = 1000;
            let l =
                Arc::new(Layout::new(vec![TensorInfo::new("w", vec![len], DType::F32)]).unwrap());
            let base = random(&l, 99);
            let ms: Vec<ParamVector> = (0..n as u64).map(|k| random(&l, k)).collect();
            let mut vals: Vec<Vec<f32>> = ms.iter().map(|m| m.values().unwrap().to_vec()).collect();
            // Signed zeros and equal values, where the start of a sum shows.
            for v in vals.iter_mut() {
                v[0] = -0.0;
                v[1] = 0.0;
            }
            let mut b = base.values().unwrap().to_vec();
            b[0] = -0.0;
            let b = b.as_slice();
            let refs: Vec<&[f32]> = vals.iter().map(|v| v.as_slice()).collect();
            let (mut fast, mut slow) = (Sums::new(n), Sums::new(n));
            for part in [0..300, 300..len] {
                let p: Vec<&[f32]> = refs.iter().map(|v| &v[part.clone()]).collect();
                fast.add(&b[part.clone()], &p);
                slow.add_any(&b[part.clone()], &p);
            }
            assert_eq!(fast.norms, slow.norms, "{n} models");
            assert_eq!(fast.dots, slow.dots, "{n} models");
            let (mut o1, mut o2) = (vec![0f32; len], vec![0f32; len]);
            apply(0.37, b, &refs, &mut o1);
            apply_any(0.37, b, &refs, &mut o2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&o1), bits(&o2), "{n} models");
        }
    }

    #[test]
    fn matches_reference_per_tensor_and_per_row() {
        let l = layout();
        let base = random(&l, 1);
        let models: Vec<ParamVector> = (2..5).map(|k| correlated(&l, &base, k)).collect();
        let refs: Vec<&ParamVector> = models.iter().collect();
        for filter_wise in [false, true] {
            let out = run(filter_wise, &base, &refs);
            for (info, r) in l.float_tensors() {
                let row = if filter_wise {
                    *info.shape.last().unwrap()
                } else {
                    r.len()
                };
                for s in (r.start..r.end).step_by(row) {
                    let g: Vec<Vec<f32>> = models
                        .iter()
                        .map(|m| m.values().unwrap()[s..s + row].to_vec())
                        .collect();
                    let want = reference(&base.values().unwrap()[s..s + row], &g);
                    close(&out.values().unwrap()[s..s + row], &want);
                }
            }
        }
        // Rows change the result on the matrix (each row has its own angle).
        let a = run(false, &base, &refs);
        let b = run(true, &base, &refs);
        assert_ne!(a.values().unwrap()[..12], b.values().unwrap()[..12]);
        // A 1-D tensor is one row: same either way.
        assert_eq!(a.values().unwrap()[12..], b.values().unwrap()[12..]);
    }

    #[test]
    fn identical_models_return_the_model() {
        let l = layout();
        let base = random(&l, 7);
        let x = random(&l, 8);
        for fw in [false, true] {
            assert_eq!(
                run(fw, &base, &[&x, &x, &x]).values().unwrap(),
                x.values().unwrap()
            );
            // Models equal to the base: the base.
            assert_eq!(
                run(fw, &base, &[&base, &base]).values().unwrap(),
                base.values().unwrap()
            );
        }
    }

    #[test]
    fn opposite_task_vectors_give_the_base() {
        let l = layout();
        let base = random(&l, 9);
        let d = random(&l, 10);
        let (a, b) = (&base + &d, &base - &d);
        let out = run(false, &base, &[&a, &b]);
        assert_eq!(out.values().unwrap(), base.values().unwrap());
    }

    #[test]
    fn needs_base_and_two_models() {
        let l = layout();
        let x = random(&l, 11);
        let m = registry().get("model_stock").unwrap();
        assert!(matches!(
            Merge::with_defaults(m, 2).unwrap().run(None, &[&x, &x]),
            Err(MethodError::NeedsBase { .. })
        ));
        assert!(matches!(
            Merge::with_defaults(m, 1).unwrap().run(Some(&x), &[&x]),
            Err(MethodError::ModelCount { .. })
        ));
    }

    /// Precision on a tensor of 2^24 elements (issue #15): the angle between
    /// task vectors over the whole [4096, 4096] tensor (per tensor, the
    /// default). Base 0.25; `x1 = 0.25 + a` everywhere, `x2 = 0.25 + b` on
    /// three entries of four and `0.25 − b` on the fourth (as f32). The task
    /// vectors take three distinct values `d1`, `d2p`, `d2m` (the f32 values
    /// minus 0.25, exact in f64), so `‖τ1‖² = n d1²`,
    /// `‖τ2‖² = n (¾ d2p² + ¼ d2m²)`, `τ1·τ2 = n d1 (¾ d2p + ¼ d2m)`
    /// (cos θ ≈ 1/2), `t = 2 cos θ / (1 + cos θ)` and every output is
    /// `t (x1 + x2)/2 + (1 − t) 0.25`.
    ///
    /// Why f32 would fail: a running f32 sum of 2^24 such terms (one
    /// accumulator, or 8 or 16 lanes) is off by 0.6% to 14%, which moves
    /// cos θ, hence `t` (dt/dcos ≈ 0.9) and the outputs (≈ 0.26) by ~1e-5
    /// and more, against a tolerance of 1e-6 relative (the f32 output itself
    /// rounds by 1.5e-8). Checked: with the norms and dot products summed in
    /// f32 this test fails, worst relative error 2.7e-4.
    #[test]
    fn precision_2_24_model_stock_whole_tensor_angle() {
        const N: usize = 1 << 24;
        let l = Arc::new(
            Layout::new(vec![TensorInfo::new("w", vec![4096, 4096], DType::F32)]).unwrap(),
        );
        let (a, b) = (0.01f32, 0.0123f32);
        let plus = |e: usize| e % 4 != 3;
        let x2 = |e: usize| if plus(e) { 0.25 + b } else { 0.25 - b };
        let base = ParamVector::from_vec(l.clone(), vec![0.25; N]).unwrap();
        let m1 = ParamVector::from_vec(l.clone(), vec![0.25 + a; N]).unwrap();
        let m2 = ParamVector::from_vec(l.clone(), (0..N).map(x2).collect()).unwrap();
        let out = run(false, &base, &[&m1, &m2]);
        let n = N as f64;
        let d1 = (0.25 + a) as f64 - 0.25;
        let (d2p, d2m) = ((0.25 + b) as f64 - 0.25, (0.25 - b) as f64 - 0.25);
        let n1 = n * d1 * d1;
        let n2 = n * (0.75 * d2p * d2p + 0.25 * d2m * d2m);
        let cos = n * d1 * (0.75 * d2p + 0.25 * d2m) / (n1 * n2).sqrt();
        let t = 2.0 * cos / (1.0 + cos);
        let (worst, at) =
            tensormerge_methods::testkit::worst_relative_error(out.values().unwrap(), |e| {
                let avg = ((0.25 + a) as f64 + x2(e) as f64) / 2.0;
                Some(t * avg + (1.0 - t) * 0.25)
            });
        assert!(
            worst < 1e-6,
            "worst relative error {worst:e} at entry {at}: got {}",
            out.values().unwrap()[at]
        );
    }
}
