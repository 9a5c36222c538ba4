//! Building blocks of the forward passes, written with candle's basic
//! differentiable operations (candle-nn's fused `rms_norm`, `layer_norm`,
//! `softmax_last_dim` and `rope` kernels have no backward pass, and Fisher
//! needs gradients through every one of them).

use candle_core::{D, Device, Tensor};

use crate::config::Activation;
use crate::error::Result;

/// Context of one forward pass: the weights, and whether to record the
/// graph for gradients.
pub(crate) struct Ctx<'a> {
    pub w: &'a crate::Weights,
    pub track: bool,
}

impl Ctx<'_> {
    /// Tensor `name`.
    pub fn t(&self, name: &str) -> Result<Tensor> {
        self.w.get(name, self.track)
    }

    /// `x W^T (+ b)` with `W` stored as `[out, in]` (torch `nn.Linear`).
    pub fn linear(&self, x: &Tensor, weight: &str, bias: Option<&str>) -> Result<Tensor> {
        let y = x.matmul(&self.t(weight)?.t()?)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(&self.t(b)?)?,
            None => y,
        })
    }

    /// `x W + b` with `W` stored as `[in, out]` (GPT-2's `Conv1D`).
    pub fn conv1d(&self, x: &Tensor, weight: &str, bias: &str) -> Result<Tensor> {
        Ok(x.matmul(&self.t(weight)?)?.broadcast_add(&self.t(bias)?)?)
    }

    /// Rows `ids` of embedding matrix `name`.
    pub fn embed(&self, name: &str, ids: &Tensor) -> Result<Tensor> {
        Ok(self.t(name)?.index_select(ids, 0)?)
    }
}

/// RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467):
/// `x / sqrt(mean(x²) + eps) * g`, over the last dimension.
pub(crate) fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(g)?)
}

/// LayerNorm (Ba et al. 2016, arXiv:1607.06450): `(x - mean) / sqrt(var + eps) * g + b`
/// (biased variance, as torch).
pub(crate) fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(g)?.broadcast_add(b)?)
}

/// The activation `act` applied element-wise.
pub(crate) fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::GeluErf => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
        Activation::Silu => x.silu()?,
    })
}

/// `log_softmax` over the last dimension; the row maximum is subtracted as a
/// constant (it cancels exactly, so it carries no gradient).
pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(diff.broadcast_sub(&lse)?)
}

/// `softmax` over the last dimension (maximum subtracted as a constant).
pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Additive attention mask `[t, t]`: 0 where query `i` may see key `j`
/// (`j <= i`, and `i - j < window` with a sliding window), `-inf` elsewhere.
pub(crate) fn causal_mask(t: usize, window: Option<usize>) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), &Device::Cpu)?)
}

/// Scaled dot-product attention (Vaswani et al. 2017, arXiv:1706.03762) of
/// `q`, `k`, `v` shaped `[heads, t, head_dim]`: `softmax(q kᵀ / √d + mask) v`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let d = q.dim(D::Minus1)? as f64;
    let scores = (q.matmul(&k.t()?)? * (1.0 / d.sqrt()))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    Ok(softmax(&scores)?.matmul(v)?)
}

/// `[t, heads * d]` to `[heads, t, d]`.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (t, hd) = x.dims2()?;
    Ok(x.reshape((t, heads, hd / heads))?
        .transpose(0, 1)?
        .contiguous()?)
}

/// `[heads, t, d]` to `[t, heads * d]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (h, t, d) = x.dims3()?;
    Ok(x.transpose(0, 1)?.contiguous()?.reshape((t, h * d))?)
}

/// Cosine and sine tables `[t, d]` of rotary embeddings (Su et al. 2021,
/// arXiv:2104.09864) in the Hugging Face layout (the two halves of the head
/// rotate together): angle `pos · θ^(-2i/d)` for `i < d/2`, repeated for
/// the second half. Computed in f32 as `transformers` does.
pub(crate) fn rope_tables(t: usize, d: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d as f32))
        .collect();
    let mut cos = Vec::with_capacity(t * d);
    let mut sin = Vec::with_capacity(t * d);
    for p in 0..t {
        for _half in 0..2 {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, d), &Device::Cpu)?,
        Tensor::from_vec(sin, (t, d), &Device::Cpu)?,
    ))
}

/// Applies rotary embeddings to `x` `[heads, t, d]`:
/// `x · cos + rotate_half(x) · sin` with `rotate_half([a, b]) = [-b, a]`.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let a = x.narrow(D::Minus1, 0, d / 2)?;
    let b = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}
