//! Per-model weights of a tensor: [`weights`], [`weight_sum`].

use super::sum::Limbs;
use crate::{MethodError, Params, TensorContext};

/// Each model's `name` parameter (usually `weight`) for this tensor.
pub fn weights(tensor: &TensorContext<'_>, name: &str) -> Result<Vec<f64>, MethodError> {
    tensor.models.iter().map(|p: &Params| p.f64(name)).collect()
}

/// `Σ w_i`, summed exactly (so that weights cancelling to zero are detected).
pub fn weight_sum(weights: &[f64]) -> f64 {
    let mut s = Limbs::new();
    let mut special = 0.0;
    for &w in weights {
        if !w.is_finite() {
            special += w;
        } else if w != 0.0 {
            s.add_f64(w);
        }
    }
    if special != 0.0 || special.is_nan() {
        special
    } else {
        s.value()
    }
}
