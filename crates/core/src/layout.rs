//! Tensor descriptions and the ordered layout of a model.

use std::collections::HashMap;
use std::ops::Range;

use crate::{CoreError, DType};

/// Name, shape and element type of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Dimensions, outermost first. An empty shape is a scalar.
    pub shape: Vec<usize>,
    /// Stored element type.
    pub dtype: DType,
}

impl TensorInfo {
    /// A new description.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, dtype: DType) -> Self {
        TensorInfo {
            name: name.into(),
            shape,
            dtype,
        }
    }

    /// Number of elements (product of the shape), or `None` on overflow.
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// Number of elements. Panics never: layouts validate the product up front,
    /// and an overflowing shape reports `usize::MAX`.
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }

    /// Number of stored bytes (`numel × dtype size`), or `None` on overflow.
    pub fn checked_byte_len(&self) -> Option<usize> {
        self.checked_numel()?
            .checked_mul(self.dtype.size_in_bytes())
    }
}

/// The ordered tensors of a model, with each floating-point tensor's range in
/// the flat parameter vector.
///
/// Floating-point tensors are concatenated in layout order; other tensors
/// (integer, bool) are part of the layout but not of the vector.
///
/// ```
/// use tensormerge_core::{DType, Layout, TensorInfo};
/// let layout = Layout::new(vec![
///     TensorInfo::new("embed.weight", vec![4, 2], DType::BF16),
///     TensorInfo::new("position_ids", vec![1, 4], DType::I64),
///     TensorInfo::new("head.bias", vec![3], DType::F32),
/// ]).unwrap();
/// assert_eq!(layout.num_params(), 11);
/// assert_eq!(layout.range("head.bias"), Some(8..11));
/// assert_eq!(layout.range("position_ids"), None);
/// ```
#[derive(Debug, Clone)]
pub struct Layout {
    tensors: Vec<TensorInfo>,
    starts: Vec<Option<usize>>,
    index: HashMap<String, usize>,
    num_params: usize,
}

impl PartialEq for Layout {
    fn eq(&self, other: &Self) -> bool {
        self.tensors == other.tensors
    }
}

impl Layout {
    /// Builds a layout from tensors in order. Fails on duplicate names and on
    /// shapes whose element or byte count overflows.
    pub fn new(tensors: Vec<TensorInfo>) -> Result<Self, CoreError> {
        let mut starts = Vec::with_capacity(tensors.len());
        let mut index = HashMap::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (i, t) in tensors.iter().enumerate() {
            if index.insert(t.name.clone(), i).is_some() {
                return Err(CoreError::DuplicateTensor(t.name.clone()));
            }
            let overflow = || CoreError::ShapeOverflow {
                name: t.name.clone(),
                shape: t.shape.clone(),
            };
            let n = t.checked_numel().ok_or_else(overflow)?;
            t.checked_byte_len().ok_or_else(overflow)?;
            if t.dtype.is_float() {
                starts.push(Some(offset));
                offset = offset.checked_add(n).ok_or_else(overflow)?;
            } else {
                starts.push(None);
            }
        }
        Ok(Layout {
            tensors,
            starts,
            index,
            num_params: offset,
        })
    }

    /// All tensors in order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The floating-point tensors in order, with their ranges in the flat vector.
    pub fn float_tensors(&self) -> impl Iterator<Item = (&TensorInfo, Range<usize>)> + '_ {
        self.tensors
            .iter()
            .zip(&self.starts)
            .filter_map(|(t, s)| s.map(|s| (t, s..s + t.numel())))
    }

    /// Number of tensors (float and non-float).
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the layout has no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Position of the tensor in layout order.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Range of a floating-point tensor in the flat vector; `None` for unknown
    /// or non-float tensors.
    pub fn range(&self, name: &str) -> Option<Range<usize>> {
        let i = *self.index.get(name)?;
        self.starts[i].map(|s| s..s + self.tensors[i].numel())
    }

    /// Number of floating-point parameters: the length of the flat vector.
    pub fn num_params(&self) -> usize {
        self.num_params
    }

    /// Total stored bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.checked_byte_len().unwrap_or(0) as u64)
            .sum()
    }

    /// Checks that `other` can be merged with `self`: the same tensor names
    /// (in any order) with the same shapes, and floating-point tensors in the
    /// same places (float widths may differ, e.g. a BF16 base and an F32
    /// fine-tune). Reports the first tensor that differs.
    pub fn check_compatible(&self, other: &Layout) -> Result<(), CoreError> {
        match self.differences(other).into_iter().next() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Every difference between two layouts (see [`Layout::check_compatible`]),
    /// in `self`'s order, then tensors only `other` has.
    pub fn differences(&self, other: &Layout) -> Vec<CoreError> {
        let mut out = Vec::new();
        let mismatch = |tensor: &str, detail: String| CoreError::LayoutMismatch {
            tensor: tensor.to_string(),
            detail,
        };
        for t in &self.tensors {
            match other.get(&t.name) {
                None => out.push(mismatch(&t.name, "missing from the other model".into())),
                Some(o) => {
                    if o.shape != t.shape {
                        out.push(mismatch(
                            &t.name,
                            format!("shape {:?} vs {:?}", t.shape, o.shape),
                        ));
                    } else if o.dtype.is_float() != t.dtype.is_float()
                        || (!t.dtype.is_float() && o.dtype != t.dtype)
                    {
                        out.push(mismatch(
                            &t.name,
                            format!("dtype {} vs {}", t.dtype, o.dtype),
                        ));
                    }
                }
            }
        }
        for o in &other.tensors {
            if self.get(&o.name).is_none() {
                out.push(mismatch(&o.name, "only in the other model".into()));
            }
        }
        out
    }

    /// The first tensor, in layout order, at which `self` and `other` are not
    /// identical (name, shape, dtype or position); `None` when they are equal.
    pub fn first_difference(&self, other: &Layout) -> Option<CoreError> {
        for (i, t) in self.tensors.iter().enumerate() {
            let detail = match other.tensors.get(i) {
                None => "missing from the other layout".to_string(),
                Some(o) if o.name != t.name => format!("the other layout has `{}` here", o.name),
                Some(o) if o.shape != t.shape => format!("shape {:?} vs {:?}", t.shape, o.shape),
                Some(o) if o.dtype != t.dtype => format!("dtype {} vs {}", t.dtype, o.dtype),
                Some(_) => continue,
            };
            return Some(CoreError::LayoutMismatch {
                tensor: t.name.clone(),
                detail,
            });
        }
        other
            .tensors
            .get(self.tensors.len())
            .map(|o| CoreError::LayoutMismatch {
                tensor: o.name.clone(),
                detail: "only in the other layout".into(),
            })
    }
}
