//! [`ParamVector`]: a model's floating-point parameters as one flat `f32` vector.

use std::fmt;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};
use std::sync::Arc;

use ndarray::{Array1, ArrayView1, ArrayViewMut1, Zip};

use crate::{CoreError, Layout};

/// The flat, contiguous `f32` vector of a model's floating-point parameters,
/// tied to the [`Layout`] it was made from.
///
/// Vectors combine with the usual operators: `+ - * /` element-wise between
/// vectors and with `f32` scalars on either side, unary `-`, and the assigning
/// forms, on owned values and on references. Owned operands are reused, so
/// `a + &b` allocates nothing.
///
/// # Layout errors without panics
///
/// Combining vectors of different layouts cannot silently broadcast, and an
/// operator cannot return a `Result` without making every formula unreadable.
/// So a mismatch makes the result a *faulted* vector, which carries the typed
/// error ([`CoreError::LayoutMismatch`], naming the first tensor that differs)
/// through every later operation, like a NaN that explains itself. Everything
/// that reads values (`values`, `view`, `dot`, the norms, saving) returns that
/// error. [`ParamVector::check`] asks for it explicitly.
///
/// ```
/// use std::sync::Arc;
/// use tensormerge_core::{DType, Layout, ParamVector, TensorInfo};
/// let layout = Arc::new(Layout::new(vec![TensorInfo::new("w", vec![3], DType::F32)]).unwrap());
/// let base = ParamVector::from_vec(layout.clone(), vec![1.0, 1.0, 1.0]).unwrap();
/// let legal = ParamVector::from_vec(layout.clone(), vec![2.0, 1.0, 0.0]).unwrap();
/// let recipe = ParamVector::from_vec(layout.clone(), vec![1.0, 3.0, 1.0]).unwrap();
///
/// // Task arithmetic, written as in the paper.
/// let merged = &base + 0.5 * ((&legal - &base) + (&recipe - &base));
/// assert_eq!(merged.values().unwrap(), &[1.5, 2.0, 0.5]);
///
/// // A vector of another layout poisons the result instead of panicking.
/// let other = Arc::new(Layout::new(vec![TensorInfo::new("v", vec![3], DType::F32)]).unwrap());
/// let stranger = ParamVector::zeros(other);
/// let bad = &merged + &stranger;
/// assert!(bad.check().unwrap_err().to_string().contains("`w`"));
/// ```
#[derive(Clone)]
pub struct ParamVector {
    layout: Arc<Layout>,
    data: Array1<f32>,
    fault: Option<Arc<CoreError>>,
}

impl fmt::Debug for ParamVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ParamVector");
        d.field("tensors", &self.layout.len())
            .field("len", &self.len());
        if let Some(e) = &self.fault {
            d.field("fault", &e.to_string());
        }
        d.finish()
    }
}

impl PartialEq for ParamVector {
    /// Equal when both are healthy, have the same layout and the same values
    /// (IEEE comparison: NaN is unequal to itself).
    fn eq(&self, other: &Self) -> bool {
        self.fault.is_none()
            && other.fault.is_none()
            && (Arc::ptr_eq(&self.layout, &other.layout) || self.layout == other.layout)
            && self.data == other.data
    }
}

impl ParamVector {
    /// A vector of zeros for `layout`.
    pub fn zeros(layout: Arc<Layout>) -> Self {
        let n = layout.num_params();
        ParamVector {
            layout,
            data: Array1::zeros(n),
            fault: None,
        }
    }

    /// A vector with every entry set to `value`.
    pub fn full(layout: Arc<Layout>, value: f32) -> Self {
        let n = layout.num_params();
        ParamVector {
            layout,
            data: Array1::from_elem(n, value),
            fault: None,
        }
    }

    /// Wraps `values`, which must have `layout.num_params()` entries.
    pub fn from_vec(layout: Arc<Layout>, values: Vec<f32>) -> Result<Self, CoreError> {
        Self::from_array(layout, Array1::from_vec(values))
    }

    /// Wraps an ndarray vector, which must have `layout.num_params()` entries.
    pub fn from_array(layout: Arc<Layout>, data: Array1<f32>) -> Result<Self, CoreError> {
        if data.len() != layout.num_params() {
            return Err(CoreError::LengthMismatch {
                name: "<vector>".into(),
                expected: layout.num_params(),
                actual: data.len(),
                unit: "elements",
            });
        }
        Ok(ParamVector {
            layout,
            data,
            fault: None,
        })
    }

    /// A faulted vector carrying `error` (see the type's docs).
    pub fn faulted(layout: Arc<Layout>, error: CoreError) -> Self {
        ParamVector {
            layout,
            data: Array1::zeros(0),
            fault: Some(Arc::new(error)),
        }
    }

    /// The layout this vector belongs to.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Number of elements (the layout's float parameter count).
    pub fn len(&self) -> usize {
        self.layout.num_params()
    }

    /// Whether the vector has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `Ok` for a healthy vector, the carried error for a faulted one.
    pub fn check(&self) -> Result<(), CoreError> {
        match &self.fault {
            None => Ok(()),
            Some(e) => Err((**e).clone()),
        }
    }

    /// The values, in layout order.
    pub fn values(&self) -> Result<&[f32], CoreError> {
        self.check()?;
        Ok(self
            .data
            .as_slice()
            .expect("ParamVector data is contiguous"))
    }

    /// The values, mutably.
    pub fn values_mut(&mut self) -> Result<&mut [f32], CoreError> {
        self.check()?;
        Ok(self
            .data
            .as_slice_mut()
            .expect("ParamVector data is contiguous"))
    }

    /// The ndarray inside.
    pub fn array(&self) -> Result<&Array1<f32>, CoreError> {
        self.check()?;
        Ok(&self.data)
    }

    /// Unwraps the ndarray inside.
    pub fn into_array(self) -> Result<Array1<f32>, CoreError> {
        self.check()?;
        Ok(self.data)
    }

    /// The slice of one floating-point tensor, flattened.
    pub fn view(&self, name: &str) -> Result<ArrayView1<'_, f32>, CoreError> {
        self.check()?;
        let r = self.tensor_range(name)?;
        Ok(self.data.slice(ndarray::s![r]))
    }

    /// One tensor's slice, mutably.
    pub fn view_mut(&mut self, name: &str) -> Result<ArrayViewMut1<'_, f32>, CoreError> {
        self.check()?;
        let r = self.tensor_range(name)?;
        Ok(self.data.slice_mut(ndarray::s![r]))
    }

    fn tensor_range(&self, name: &str) -> Result<std::ops::Range<usize>, CoreError> {
        match self.layout.get(name) {
            None => Err(CoreError::UnknownTensor(name.to_string())),
            Some(t) if !t.dtype.is_float() => Err(CoreError::NotFloat {
                name: name.to_string(),
                dtype: t.dtype,
            }),
            Some(_) => Ok(self.layout.range(name).expect("float tensor has a range")),
        }
    }

    /// Dot product, accumulated in `f64`.
    pub fn dot(&self, other: &ParamVector) -> Result<f64, CoreError> {
        let (a, b) = self.pair(other)?;
        Ok(a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum())
    }

    /// L1 norm (sum of magnitudes), accumulated in `f64`.
    pub fn norm_l1(&self) -> Result<f64, CoreError> {
        Ok(self.values()?.iter().map(|x| x.abs() as f64).sum())
    }

    /// L2 norm, accumulated in `f64`.
    pub fn norm_l2(&self) -> Result<f64, CoreError> {
        Ok(self
            .values()?
            .iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt())
    }

    /// Cosine similarity; `0.0` when either vector is zero.
    pub fn cosine(&self, other: &ParamVector) -> Result<f64, CoreError> {
        let d = self.dot(other)?;
        let n = self.norm_l2()? * other.norm_l2()?;
        Ok(if n == 0.0 { 0.0 } else { d / n })
    }

    /// Applies `f` to every element in place.
    pub fn map_inplace(&mut self, f: impl Fn(f32) -> f32 + Sync + Send) {
        if self.fault.is_none() {
            self.data.par_mapv_inplace(f);
        }
    }

    fn pair<'a>(&'a self, other: &'a ParamVector) -> Result<(&'a [f32], &'a [f32]), CoreError> {
        self.check()?;
        other.check()?;
        if let Some(e) = self.layout_error(other) {
            return Err(e);
        }
        Ok((self.values()?, other.values()?))
    }

    fn layout_error(&self, other: &ParamVector) -> Option<CoreError> {
        if Arc::ptr_eq(&self.layout, &other.layout) {
            return None;
        }
        self.layout.first_difference(&other.layout)
    }

    /// `self ⊕= other`, faulting `self` on a layout mismatch.
    fn combine_assign(&mut self, other: &ParamVector, f: impl Fn(&mut f32, f32) + Sync + Send) {
        if self.fault.is_some() {
            return;
        }
        if let Some(e) = &other.fault {
            self.fault = Some(e.clone());
            self.data = Array1::zeros(0);
            return;
        }
        if let Some(e) = self.layout_error(other) {
            self.fault = Some(Arc::new(e));
            self.data = Array1::zeros(0);
            return;
        }
        Zip::from(&mut self.data)
            .and(&other.data)
            .par_for_each(|a, &b| f(a, b));
    }

    /// `other ⊕ self` written into `self` (for owned right-hand operands).
    fn combine_assign_rev(
        &mut self,
        other: &ParamVector,
        f: impl Fn(f32, f32) -> f32 + Sync + Send,
    ) {
        if self.fault.is_some() {
            return;
        }
        if other.fault.is_some() || self.layout_error(other).is_some() {
            let mut lhs = other.clone();
            lhs.combine_assign(self, |_, _| {});
            *self = lhs;
            return;
        }
        Zip::from(&mut self.data)
            .and(&other.data)
            .par_for_each(|a, &b| *a = f(b, *a));
    }

    /// `self ⊕ other` into a new vector: one parallel pass that writes the
    /// output once (cloning `self` and combining in place reads and writes
    /// it twice). Faults as [`combine_assign`](Self::combine_assign) does.
    fn combine_new(
        &self,
        other: &ParamVector,
        f: impl Fn(f32, f32) -> f32 + Sync + Send,
    ) -> ParamVector {
        if self.fault.is_some() {
            return self.clone();
        }
        if let Some(e) = &other.fault {
            return ParamVector {
                layout: self.layout.clone(),
                data: Array1::zeros(0),
                fault: Some(e.clone()),
            };
        }
        if let Some(e) = self.layout_error(other) {
            return ParamVector::faulted(self.layout.clone(), e);
        }
        ParamVector {
            layout: self.layout.clone(),
            data: Zip::from(&self.data)
                .and(&other.data)
                .par_map_collect(|&a, &b| f(a, b)),
            fault: None,
        }
    }

    /// `f` of every element, into a new vector (one pass).
    fn map_new(&self, f: impl Fn(f32) -> f32 + Sync + Send) -> ParamVector {
        if self.fault.is_some() {
            return self.clone();
        }
        ParamVector {
            layout: self.layout.clone(),
            data: Zip::from(&self.data).par_map_collect(|&a| f(a)),
            fault: None,
        }
    }

    fn scalar_assign(&mut self, f: impl Fn(f32) -> f32 + Sync + Send) {
        if self.fault.is_none() {
            self.data.par_mapv_inplace(f);
        }
    }
}

macro_rules! vector_ops {
    ($Op:ident, $op:ident, $OpAssign:ident, $op_assign:ident, $sym:tt, $asym:tt) => {
        impl $OpAssign<&ParamVector> for ParamVector {
            fn $op_assign(&mut self, rhs: &ParamVector) {
                self.combine_assign(rhs, |a, b| *a $asym b);
            }
        }
        impl $OpAssign<ParamVector> for ParamVector {
            fn $op_assign(&mut self, rhs: ParamVector) {
                self.combine_assign(&rhs, |a, b| *a $asym b);
            }
        }
        impl $OpAssign<f32> for ParamVector {
            fn $op_assign(&mut self, rhs: f32) {
                self.scalar_assign(|a| a $sym rhs);
            }
        }
        impl $Op<&ParamVector> for ParamVector {
            type Output = ParamVector;
            fn $op(mut self, rhs: &ParamVector) -> ParamVector {
                self.combine_assign(rhs, |a, b| *a $asym b);
                self
            }
        }
        impl $Op<ParamVector> for ParamVector {
            type Output = ParamVector;
            fn $op(mut self, rhs: ParamVector) -> ParamVector {
                self.combine_assign(&rhs, |a, b| *a $asym b);
                self
            }
        }
        impl $Op<ParamVector> for &ParamVector {
            type Output = ParamVector;
            fn $op(self, mut rhs: ParamVector) -> ParamVector {
                rhs.combine_assign_rev(self, |a, b| a $sym b);
                rhs
            }
        }
        impl $Op<&ParamVector> for &ParamVector {
            type Output = ParamVector;
            fn $op(self, rhs: &ParamVector) -> ParamVector {
                self.combine_new(rhs, |a, b| a $sym b)
            }
        }
        impl $Op<f32> for ParamVector {
            type Output = ParamVector;
            fn $op(mut self, rhs: f32) -> ParamVector {
                self.scalar_assign(|a| a $sym rhs);
                self
            }
        }
        impl $Op<f32> for &ParamVector {
            type Output = ParamVector;
            fn $op(self, rhs: f32) -> ParamVector {
                self.map_new(|a| a $sym rhs)
            }
        }
        impl $Op<ParamVector> for f32 {
            type Output = ParamVector;
            fn $op(self, mut rhs: ParamVector) -> ParamVector {
                rhs.scalar_assign(|b| self $sym b);
                rhs
            }
        }
        impl $Op<&ParamVector> for f32 {
            type Output = ParamVector;
            fn $op(self, rhs: &ParamVector) -> ParamVector {
                rhs.map_new(|b| self $sym b)
            }
        }
    };
}

vector_ops!(Add, add, AddAssign, add_assign, +, +=);
vector_ops!(Sub, sub, SubAssign, sub_assign, -, -=);
vector_ops!(Mul, mul, MulAssign, mul_assign, *, *=);
vector_ops!(Div, div, DivAssign, div_assign, /, /=);

impl Neg for ParamVector {
    type Output = ParamVector;
    fn neg(mut self) -> ParamVector {
        self.scalar_assign(|a| -a);
        self
    }
}

impl Neg for &ParamVector {
    type Output = ParamVector;
    fn neg(self) -> ParamVector {
        self.map_new(|a| -a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, TensorInfo};

    fn layout(names: &[(&str, usize)]) -> Arc<Layout> {
        Arc::new(
            Layout::new(
                names
                    .iter()
                    .map(|(n, k)| TensorInfo::new(*n, vec![*k], DType::F32))
                    .collect(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn every_operator_form_agrees_with_plain_loops() {
        let l = layout(&[("a", 2), ("b", 3)]);
        let x = ParamVector::from_vec(l.clone(), vec![1., 2., 3., 4., 5.]).unwrap();
        let y = ParamVector::from_vec(l.clone(), vec![2., 4., 8., 16., 32.]).unwrap();
        let xs = x.values().unwrap().to_vec();
        let ys = y.values().unwrap().to_vec();
        let ew = |f: fn(f32, f32) -> f32| -> Vec<f32> {
            xs.iter().zip(&ys).map(|(a, b)| f(*a, *b)).collect()
        };
        assert_eq!((&x + &y).values().unwrap(), ew(|a, b| a + b));
        assert_eq!((x.clone() - &y).values().unwrap(), ew(|a, b| a - b));
        assert_eq!((&x - y.clone()).values().unwrap(), ew(|a, b| a - b));
        assert_eq!((x.clone() * y.clone()).values().unwrap(), ew(|a, b| a * b));
        assert_eq!((&x / y.clone()).values().unwrap(), ew(|a, b| a / b));
        assert_eq!(
            (2.0 - &x).values().unwrap(),
            xs.iter().map(|a| 2.0 - a).collect::<Vec<_>>()
        );
        assert_eq!(
            (&x / 2.0).values().unwrap(),
            xs.iter().map(|a| a / 2.0).collect::<Vec<_>>()
        );
        assert_eq!(
            (2.0 / x.clone()).values().unwrap(),
            xs.iter().map(|a| 2.0 / a).collect::<Vec<_>>()
        );
        assert_eq!(
            (-&x).values().unwrap(),
            xs.iter().map(|a| -a).collect::<Vec<_>>()
        );
        let mut z = x.clone();
        z += &y;
        z -= y.clone();
        z *= 3.0;
        z /= 3.0;
        assert_eq!(z, x);
        assert_eq!(x.dot(&y).unwrap(), 2. + 8. + 24. + 64. + 160.);
        assert_eq!(x.norm_l1().unwrap(), 15.0);
        assert_eq!(x.view("b").unwrap().to_vec(), vec![3., 4., 5.]);
        assert!((x.cosine(&(2.0 * &x)).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn mismatched_layouts_fault_without_panicking() {
        let l1 = layout(&[("a", 2), ("b", 3)]);
        let l2 = layout(&[("a", 2), ("c", 3)]);
        let x = ParamVector::zeros(l1);
        let y = ParamVector::zeros(l2);
        for r in [
            &x + &y,
            x.clone() - y.clone(),
            &y * x.clone(),
            2.0 * (&x / &y) + &x,
            // a faulted operand by reference, on either side, keeps its fault
            &(&x + &y) - &x,
            &x * &(&x - &y),
            -&(&x + &y),
            &(&y - &x) / 2.0,
            2.0 / &(&y - &x),
        ] {
            match r.check() {
                Err(CoreError::LayoutMismatch { tensor, .. }) => {
                    assert!(tensor == "b" || tensor == "c")
                }
                other => panic!("expected a layout mismatch, got {other:?}"),
            }
            assert!(r.values().is_err() && r.norm_l2().is_err() && r.dot(&x).is_err());
        }
        let mut z = x.clone();
        z += &y;
        assert!(
            matches!(z.check(), Err(CoreError::LayoutMismatch { ref tensor, .. }) if tensor == "b")
        );
        assert!(matches!(x.dot(&y), Err(CoreError::LayoutMismatch { .. })));
        assert!(matches!(x.view("zz"), Err(CoreError::UnknownTensor(_))));
    }
}
