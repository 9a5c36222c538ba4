//! A small multilayer perceptron (ReLU hidden layers, softmax output) with
//! exact backpropagation, trained by mini-batch SGD with momentum.
//!
//! Layer `l` computes `z = a · Wᵀ + b` with `W` of shape `[out, in]` (the
//! PyTorch `nn.Linear` convention, so the saved tensors `layers.{l}.weight` and
//! `layers.{l}.bias` read like any checkpoint); hidden layers apply ReLU, the
//! last layer gives the logits of a softmax over the classes.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use ndarray_rand::RandomExt;
use ndarray_rand::rand_distr::Uniform;
use rand_chacha::ChaCha8Rng;

use crate::DemoError;
use crate::data::{Dataset, permutation};

/// Weights and biases of every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    /// `weights[l]` has shape `[out, in]`.
    pub weights: Vec<Array2<f32>>,
    /// `biases[l]` has length `out`.
    pub biases: Vec<Array1<f32>>,
}

/// Gradients (or any per-parameter quantity such as a Fisher diagonal) with
/// the shapes of an [`Mlp`]'s parameters.
pub type Grads = Mlp;

/// What a forward pass keeps for backpropagation: the input of every layer
/// (post-activation of the previous one) and the final logits.
#[derive(Debug, Clone)]
pub struct Forward {
    /// `inputs[l]` is the input of layer `l`, shape `[n, in_l]`.
    pub inputs: Vec<Array2<f32>>,
    /// Logits, shape `[n, classes]`.
    pub logits: Array2<f32>,
}

impl Mlp {
    /// A network with layer widths `sizes` (input first), weights drawn from
    /// He-uniform `U(-√(6/in), √(6/in))` with ndarray-rand and `rng`, biases zero.
    pub fn new(sizes: &[usize], rng: &mut ChaCha8Rng) -> Mlp {
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for w in sizes.windows(2) {
            let (fan_in, fan_out) = (w[0], w[1]);
            let a = (6.0 / fan_in.max(1) as f32).sqrt();
            let dist = Uniform::new(-a, a).expect("finite, non-empty range");
            weights.push(Array2::random_using((fan_out, fan_in), dist, rng));
            biases.push(Array1::zeros(fan_out));
        }
        Mlp { weights, biases }
    }

    /// A network of zeros with the same shapes.
    pub fn zeros_like(&self) -> Mlp {
        Mlp {
            weights: self
                .weights
                .iter()
                .map(|w| Array2::zeros(w.dim()))
                .collect(),
            biases: self.biases.iter().map(|b| Array1::zeros(b.len())).collect(),
        }
    }

    /// Layer widths, input first.
    pub fn sizes(&self) -> Vec<usize> {
        let mut s: Vec<usize> = self
            .weights
            .first()
            .map(|w| w.ncols())
            .into_iter()
            .collect();
        s.extend(self.weights.iter().map(|w| w.nrows()));
        s
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.weights.iter().map(|w| w.len()).sum::<usize>()
            + self.biases.iter().map(|b| b.len()).sum::<usize>()
    }

    /// Tensor names, shapes and values in layer order:
    /// `layers.{l}.weight` (`[out, in]`) then `layers.{l}.bias` (`[out]`).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        for (l, (w, b)) in self.weights.iter().zip(&self.biases).enumerate() {
            out.push((
                format!("layers.{l}.weight"),
                vec![w.nrows(), w.ncols()],
                w.iter().copied().collect(),
            ));
            out.push((format!("layers.{l}.bias"), vec![b.len()], b.to_vec()));
        }
        out
    }

    /// A network with layer widths `sizes` whose tensors are read by name from
    /// `read(name, numel)`.
    pub fn from_tensors(
        sizes: &[usize],
        mut read: impl FnMut(&str, usize) -> Result<Vec<f32>, DemoError>,
    ) -> Result<Mlp, DemoError> {
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for (l, w) in sizes.windows(2).enumerate() {
            let (fan_in, fan_out) = (w[0], w[1]);
            let name = format!("layers.{l}.weight");
            let values = read(&name, fan_in * fan_out)?;
            let shape_err = |name: &str, n: usize| DemoError::Model {
                tensor: name.to_string(),
                detail: format!("has {n} values, expected {}", fan_in * fan_out),
            };
            let n = values.len();
            weights.push(
                Array2::from_shape_vec((fan_out, fan_in), values)
                    .map_err(|_| shape_err(&name, n))?,
            );
            let name = format!("layers.{l}.bias");
            let values = read(&name, fan_out)?;
            if values.len() != fan_out {
                return Err(DemoError::Model {
                    tensor: name,
                    detail: format!("has {} values, expected {fan_out}", values.len()),
                });
            }
            biases.push(Array1::from(values));
        }
        Ok(Mlp { weights, biases })
    }

    /// Forward pass keeping every layer's input.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Forward {
        let mut inputs = Vec::with_capacity(self.weights.len());
        let mut a = x.to_owned();
        let last = self.weights.len().saturating_sub(1);
        for (l, (w, b)) in self.weights.iter().zip(&self.biases).enumerate() {
            let mut z = a.dot(&w.t());
            z += b;
            if l < last {
                z.mapv_inplace(|v| v.max(0.0));
            }
            inputs.push(std::mem::replace(&mut a, z));
        }
        Forward { inputs, logits: a }
    }

    /// Backpropagates `dlogits` (`[n, classes]`, the derivative of some scalar
    /// with respect to each example's logits) and returns `δ_l`, the
    /// derivative with respect to each layer's pre-activation, per example.
    pub fn deltas(&self, fwd: &Forward, dlogits: Array2<f32>) -> Vec<Array2<f32>> {
        let n_layers = self.weights.len();
        let mut deltas = vec![Array2::zeros((0, 0)); n_layers];
        let mut d = dlogits;
        for l in (0..n_layers).rev() {
            if l > 0 {
                // ReLU'(z) = [a > 0], with a the next layer's input.
                let mut prev = d.dot(&self.weights[l]);
                ndarray::Zip::from(&mut prev)
                    .and(&fwd.inputs[l])
                    .for_each(|g, &a| {
                        if a <= 0.0 {
                            *g = 0.0;
                        }
                    });
                deltas[l] = std::mem::replace(&mut d, prev);
            } else {
                deltas[0] = std::mem::replace(&mut d, Array2::zeros((0, 0)));
            }
        }
        deltas
    }

    /// Parameter gradients, summed over examples, from per-layer deltas.
    pub fn grads_from_deltas(&self, fwd: &Forward, deltas: &[Array2<f32>]) -> Grads {
        Mlp {
            weights: deltas
                .iter()
                .zip(&fwd.inputs)
                .map(|(d, a)| d.t().dot(a))
                .collect(),
            biases: deltas.iter().map(|d| d.sum_axis(Axis(0))).collect(),
        }
    }

    /// Mean softmax cross-entropy over the batch and its gradient.
    pub fn loss_and_grad(&self, x: ArrayView2<'_, f32>, y: &[usize]) -> (f32, Grads) {
        let fwd = self.forward(x);
        let n = y.len().max(1) as f32;
        let mut p = softmax(&fwd.logits);
        let mut loss = 0.0f64;
        for (i, &c) in y.iter().enumerate() {
            loss -= f64::from(p[[i, c]].max(f32::MIN_POSITIVE).ln());
            p[[i, c]] -= 1.0;
        }
        p /= n;
        let deltas = self.deltas(&fwd, p);
        (
            (loss / f64::from(n)) as f32,
            self.grads_from_deltas(&fwd, &deltas),
        )
    }

    /// Predicted class of each row of `x`.
    pub fn predict(&self, x: ArrayView2<'_, f32>) -> Vec<usize> {
        let logits = self.forward(x).logits;
        logits
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                        if v > best.1 { (i, v) } else { best }
                    })
                    .0
            })
            .collect()
    }

    /// Share of `data` classified correctly (0 for an empty set).
    pub fn accuracy(&self, data: &Dataset) -> f64 {
        if data.is_empty() {
            return 0.0;
        }
        let hits = self
            .predict(data.x.view())
            .iter()
            .zip(&data.y)
            .filter(|(p, y)| p == y)
            .count();
        hits as f64 / data.len() as f64
    }

    /// Element-wise `self += k · other`.
    pub fn add_scaled(&mut self, k: f32, other: &Mlp) {
        for (w, o) in self.weights.iter_mut().zip(&other.weights) {
            w.scaled_add(k, o);
        }
        for (b, o) in self.biases.iter_mut().zip(&other.biases) {
            b.scaled_add(k, o);
        }
    }
}

/// Row-wise softmax (max-shifted for stability).
pub fn softmax(logits: &Array2<f32>) -> Array2<f32> {
    let mut p = logits.clone();
    for mut row in p.rows_mut() {
        let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        row /= s;
    }
    p
}

/// Hyper-parameters of one training run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Step size.
    pub learning_rate: f32,
    /// Heavy-ball momentum (0 for plain SGD).
    pub momentum: f32,
}

/// Trains `model` in place on `data` by mini-batch SGD with momentum, batches
/// drawn from a seeded shuffle per epoch. Returns the mean loss of the last
/// epoch. Deterministic for a given `rng` state.
pub fn train(model: &mut Mlp, data: &Dataset, cfg: &TrainConfig, rng: &mut ChaCha8Rng) -> f32 {
    let mut velocity = model.zeros_like();
    let mut last = 0.0;
    let bs = cfg.batch_size.max(1);
    for _ in 0..cfg.epochs {
        let order = permutation(data.len(), rng);
        let mut total = 0.0f64;
        for batch in order.chunks(bs) {
            let b = data.select(batch);
            let (loss, g) = model.loss_and_grad(b.x.view(), &b.y);
            total += f64::from(loss) * batch.len() as f64;
            // v = μ v + g ; θ -= η v
            for (v, g) in velocity.weights.iter_mut().zip(&g.weights) {
                v.zip_mut_with(g, |v, &g| *v = cfg.momentum * *v + g);
            }
            for (v, g) in velocity.biases.iter_mut().zip(&g.biases) {
                v.zip_mut_with(g, |v, &g| *v = cfg.momentum * *v + g);
            }
            model.add_scaled(-cfg.learning_rate, &velocity);
        }
        last = (total / data.len().max(1) as f64) as f32;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Plain f64 loops, independent of the ndarray code under test.
    fn loss_f64(w: &[Vec<Vec<f64>>], b: &[Vec<f64>], x: &[Vec<f64>], y: &[usize]) -> f64 {
        let mut total = 0.0;
        for (xi, &yi) in x.iter().zip(y) {
            let mut a = xi.clone();
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
            let lse = m + a.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - a[yi];
        }
        total / y.len() as f64
    }

    #[test]
    fn backprop_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let sizes = [5, 6, 4, 3];
        let mut model = Mlp::new(&sizes, &mut rng);
        for b in &mut model.biases {
            b.mapv_inplace(|_| 0.1);
        }
        let x = Array2::random_using((4, 5), Uniform::new(-1.0f32, 1.0).unwrap(), &mut rng);
        let y = vec![0, 2, 1, 2];
        let (loss, g) = model.loss_and_grad(x.view(), &y);

        let to64 = |m: &Mlp| -> (Vec<Vec<Vec<f64>>>, Vec<Vec<f64>>) {
            (
                m.weights
                    .iter()
                    .map(|w| {
                        w.rows()
                            .into_iter()
                            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
                            .collect()
                    })
                    .collect(),
                m.biases
                    .iter()
                    .map(|b| b.iter().map(|&v| f64::from(v)).collect())
                    .collect(),
            )
        };
        let xs: Vec<Vec<f64>> = x
            .rows()
            .into_iter()
            .map(|r| r.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let (w, b) = to64(&model);
        assert!((loss_f64(&w, &b, &xs, &y) - f64::from(loss)).abs() < 1e-5);

        let h = 1e-6;
        let mut checked = 0;
        for l in 0..w.len() {
            for o in 0..w[l].len() {
                for k in 0..w[l][o].len() {
                    let (mut wp, mut wm) = (w.clone(), w.clone());
                    wp[l][o][k] += h;
                    wm[l][o][k] -= h;
                    let fd = (loss_f64(&wp, &b, &xs, &y) - loss_f64(&wm, &b, &xs, &y)) / (2.0 * h);
                    let an = f64::from(g.weights[l][[o, k]]);
                    assert!((fd - an).abs() < 1e-4, "W{l}[{o},{k}]: fd {fd} vs {an}");
                    checked += 1;
                }
                let (mut bp, mut bm) = (b.clone(), b.clone());
                bp[l][o] += h;
                bm[l][o] -= h;
                let fd = (loss_f64(&w, &bp, &xs, &y) - loss_f64(&w, &bm, &xs, &y)) / (2.0 * h);
                let an = f64::from(g.biases[l][o]);
                assert!((fd - an).abs() < 1e-4, "b{l}[{o}]: fd {fd} vs {an}");
                checked += 1;
            }
        }
        assert_eq!(checked, model.num_params());
    }

    #[test]
    fn tensors_round_trip_and_training_learns() {
        let data = Dataset::digits()
            .unwrap()
            .select(&(0..300).collect::<Vec<_>>());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut model = Mlp::new(&[64, 32, 10], &mut rng);
        assert_eq!(model.sizes(), vec![64, 32, 10]);
        let before = model.accuracy(&data);
        let cfg = TrainConfig {
            epochs: 20,
            batch_size: 32,
            learning_rate: 0.1,
            momentum: 0.9,
        };
        let loss = train(&mut model, &data, &cfg, &mut rng);
        assert!(loss < 0.2, "loss {loss}");
        assert!(model.accuracy(&data) > 0.95 && before < 0.5);

        let tensors = model.tensors();
        let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "layers.0.weight",
                "layers.0.bias",
                "layers.1.weight",
                "layers.1.bias"
            ]
        );
        assert_eq!(tensors[0].1, vec![32, 64]);
        let back = Mlp::from_tensors(&[64, 32, 10], |name, _| {
            Ok(tensors.iter().find(|t| t.0 == name).unwrap().2.clone())
        })
        .unwrap();
        assert_eq!(back, model);
        let e = Mlp::from_tensors(&[64, 32, 10], |_, n| Ok(vec![0.0; n + 1])).unwrap_err();
        assert!(e.to_string().contains("layers.0.weight"), "{e}");

        // Same seed, same model.
        let mut rng2 = ChaCha8Rng::seed_from_u64(1);
        let mut again = Mlp::new(&[64, 32, 10], &mut rng2);
        train(&mut again, &data, &cfg, &mut rng2);
        assert_eq!(again, model);
    }
}
