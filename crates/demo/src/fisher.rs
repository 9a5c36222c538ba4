//! The exact diagonal Fisher information of an [`Mlp`] (Matena & Raffel 2022,
//! "Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832, eq. 4):
//!
//! `F = (1/N) Σ_i Σ_y p(y|x_i) (∂ log p(y|x_i) / ∂θ)²`
//!
//! the expected squared gradient of the log-likelihood under the model's own
//! predictive distribution, summed over every class `y` (not sampled, and not
//! the empirical Fisher at the true label), averaged over the examples.
//!
//! For one example and class `y`, `∂ log p(y|x)/∂ logits = e_y − p`; the
//! gradient of a layer's weight is the outer product `δ aᵀ` of the
//! backpropagated delta and the layer's input, so its square is `δ² (a²)ᵀ`
//! and the weighted sum over a batch is one matrix product
//! `(p_y ∘ δ²)ᵀ · a²` (exact, no per-example loop).

use ndarray::{Array2, Axis, s};

use crate::data::Dataset;
use crate::mlp::{Grads, Mlp, softmax};

/// Examples per forward pass while estimating.
const BATCH: usize = 256;

/// The diagonal Fisher of `model` over the examples of `data`, with the
/// shapes of the model's parameters. Zero for an empty set.
pub fn diagonal_fisher(model: &Mlp, data: &Dataset) -> Grads {
    let mut fisher = model.zeros_like();
    let n = data.len();
    if n == 0 {
        return fisher;
    }
    let mut start = 0;
    while start < n {
        let end = (start + BATCH).min(n);
        let x = data.x.slice(s![start..end, ..]);
        let fwd = model.forward(x);
        let p = softmax(&fwd.logits);
        let squared_inputs: Vec<Array2<f32>> =
            fwd.inputs.iter().map(|a| a.mapv(|v| v * v)).collect();
        for y in 0..p.ncols() {
            // ∂ log p(y|x) / ∂ logits = e_y − p, per example.
            let mut dlogits = -&p;
            dlogits.column_mut(y).mapv_inplace(|v| v + 1.0);
            let deltas = model.deltas(&fwd, dlogits);
            let weight = p.column(y).insert_axis(Axis(1)).to_owned();
            for (l, d) in deltas.iter().enumerate() {
                // p(y|x_i) · δ_i², per example and output unit.
                let wd2 = d.mapv(|v| v * v) * &weight;
                fisher.weights[l] += &wd2.t().dot(&squared_inputs[l]);
                fisher.biases[l] += &wd2.sum_axis(Axis(0));
            }
        }
        start = end;
    }
    let inv = 1.0 / n as f32;
    for w in &mut fisher.weights {
        *w *= inv;
    }
    for b in &mut fisher.biases {
        *b *= inv;
    }
    fisher
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray_rand::RandomExt;
    use ndarray_rand::rand_distr::Uniform;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    type Net64 = (Vec<Vec<Vec<f64>>>, Vec<Vec<f64>>);

    /// log p(y|x) of a network given as plain f64 vectors.
    fn log_prob(w: &[Vec<Vec<f64>>], b: &[Vec<f64>], x: &[f64], y: usize) -> f64 {
        let mut a = x.to_vec();
        for l in 0..w.len() {
            let mut z: Vec<f64> = (0..w[l].len())
                .map(|o| b[l][o] + (0..a.len()).map(|k| w[l][o][k] * a[k]).sum::<f64>())
                .collect();
            if l + 1 < w.len() {
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            a = z;
        }
        let m = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        a[y] - m - a.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    }

    /// Brute force: for every example, every class and every parameter, the
    /// central finite difference of log p(y|x), squared and weighted by p(y|x).
    #[test]
    fn matches_brute_force_on_a_tiny_network() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let sizes = [4, 5, 3];
        let mut model = Mlp::new(&sizes, &mut rng);
        for b in &mut model.biases {
            b.mapv_inplace(|_| 0.05);
        }
        let x = Array2::random_using((6, 4), Uniform::new(0.0f32, 1.0).unwrap(), &mut rng);
        let data = Dataset {
            x: x.clone(),
            y: vec![0, 1, 2, 0, 1, 2], // labels are not used by the true Fisher
        };
        let fisher = diagonal_fisher(&model, &data);

        let w: Vec<Vec<Vec<f64>>> = model
            .weights
            .iter()
            .map(|w| {
                w.rows()
                    .into_iter()
                    .map(|r| r.iter().map(|&v| f64::from(v)).collect())
                    .collect()
            })
            .collect();
        let b: Vec<Vec<f64>> = model
            .biases
            .iter()
            .map(|b| b.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let xs: Vec<Vec<f64>> = x
            .rows()
            .into_iter()
            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let h = 1e-6;
        let brute = |perturb: &dyn Fn(f64) -> Net64| -> f64 {
            let (wp, bp) = perturb(h);
            let (wm, bm) = perturb(-h);
            let mut total = 0.0;
            for xi in &xs {
                for y in 0..3 {
                    let p = log_prob(&w, &b, xi, y).exp();
                    let g = (log_prob(&wp, &bp, xi, y) - log_prob(&wm, &bm, xi, y)) / (2.0 * h);
                    total += p * g * g;
                }
            }
            total / xs.len() as f64
        };
        let mut max_err: f64 = 0.0;
        for l in 0..w.len() {
            for o in 0..w[l].len() {
                for k in 0..w[l][o].len() {
                    let f = brute(&|d| {
                        let mut w2 = w.clone();
                        w2[l][o][k] += d;
                        (w2, b.clone())
                    });
                    let got = f64::from(fisher.weights[l][[o, k]]);
                    max_err = max_err.max((f - got).abs());
                    assert!(
                        (f - got).abs() < 1e-5 + 1e-3 * f,
                        "W{l}[{o},{k}]: {f} vs {got}"
                    );
                }
                let f = brute(&|d| {
                    let mut b2 = b.clone();
                    b2[l][o] += d;
                    (w.clone(), b2)
                });
                let got = f64::from(fisher.biases[l][o]);
                assert!((f - got).abs() < 1e-5 + 1e-3 * f, "b{l}[{o}]: {f} vs {got}");
            }
        }
        // The Fisher is not trivially zero.
        assert!(fisher.biases[1].iter().all(|&v| v > 1e-3));
        assert!(max_err < 1e-5);
    }

    #[test]
    fn empty_data_gives_zeros_and_batches_do_not_change_the_result() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let model = Mlp::new(&[64, 8, 10], &mut rng);
        let empty = Dataset {
            x: Array2::zeros((0, 64)),
            y: vec![],
        };
        assert_eq!(diagonal_fisher(&model, &empty), model.zeros_like());
        // 600 examples span three batches; the mean of two halves' Fishers
        // weighted by size equals the whole.
        let data = Dataset::digits()
            .unwrap()
            .select(&(0..600).collect::<Vec<_>>());
        let all = diagonal_fisher(&model, &data);
        let a = diagonal_fisher(&model, &data.select(&(0..300).collect::<Vec<_>>()));
        let b = diagonal_fisher(&model, &data.select(&(300..600).collect::<Vec<_>>()));
        for l in 0..2 {
            let mean = (&a.weights[l] + &b.weights[l]) * 0.5;
            let diff = (&mean - &all.weights[l]).mapv(f32::abs);
            assert!(diff.iter().all(|&d| d < 1e-5), "layer {l}");
        }
    }
}
