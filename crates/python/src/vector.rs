//! `tensormerge.ParamVector`: the core crate's flat `f32` parameter vector.
//!
//! A Python `ParamVector` is immutable: arithmetic makes new vectors, and the
//! numpy arrays it hands out (`np.asarray(v)`, `v["tensor.name"]`) are
//! read-only views of the Rust-owned buffer (no copy; the array's `base` is
//! the vector, which keeps the buffer alive). Because nothing ever writes to
//! a vector's buffer after it is made, the GIL can be released while Rust
//! reads it (long arithmetic, dot products, saving) without a data race. To
//! change values, copy (`np.array(v)`), edit, and wrap the result again with
//! `ParamVector.from_numpy(array, mapper)`.

use std::sync::Arc;

use numpy::{PyArray1, PyArrayDyn, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use tensormerge::core::{Layout, ParamVector};

use crate::errors;
use crate::mapper::PyMapper;

/// Vectors shorter than this are combined with the GIL held (releasing and
/// retaking it costs more than the arithmetic).
const DETACH_MIN_LEN: usize = 1 << 15;

/// A model's floating-point parameters as one flat float32 vector.
///
/// Made by `ModelTensorMapper.load` or `ParamVector.from_numpy`. Supports
/// `+ - * /` with vectors of the same layout and with numbers on either
/// side, unary `-`, `len`, `dot`, `norm`, `cosine`, `v["tensor.name"]` (a
/// read-only numpy view shaped like the tensor) and `np.asarray(v)` (a
/// read-only, zero-copy float32 view of the whole vector). Combining vectors
/// of different layouts raises `ValueError` naming the first tensor that
/// differs.
#[pyclass(frozen, name = "ParamVector", module = "tensormerge")]
#[derive(Debug)]
pub struct PyParamVector {
    pub(crate) inner: ParamVector,
}

/// An operand of vector arithmetic.
enum Operand<'py> {
    Vector(PyRef<'py, PyParamVector>),
    Scalar(f32),
}

fn operand<'py>(other: &Bound<'py, PyAny>) -> Option<Operand<'py>> {
    if let Ok(v) = other.cast::<PyParamVector>() {
        return Some(Operand::Vector(v.borrow()));
    }
    // numbers only: a numpy array must not be read as a scalar
    if other.hasattr("__len__").unwrap_or(false) {
        return None;
    }
    other
        .extract::<f64>()
        .ok()
        .map(|x| Operand::Scalar(x as f32))
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl PyParamVector {
    /// Wraps a healthy vector; a faulted one raises its error.
    pub(crate) fn wrap(py: Python<'_>, v: ParamVector) -> PyResult<Self> {
        v.check().map_err(|e| errors::core(py, e))?;
        Ok(PyParamVector { inner: v })
    }

    /// Runs `f` with the GIL released when the vector is long.
    fn detach_if_long<T: Send>(py: Python<'_>, len: usize, f: impl FnOnce() -> T + Send) -> T {
        if len >= DETACH_MIN_LEN {
            py.detach(f)
        } else {
            f()
        }
    }

    fn binary(
        slf: &Bound<'_, Self>,
        other: &Bound<'_, PyAny>,
        op: Op,
        reflected: bool,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Some(other) = operand(other) else {
            return Ok(py.NotImplemented());
        };
        let a = &slf.get().inner;
        let len = a.len();
        let out = match other {
            Operand::Vector(b) => {
                let b = &b.inner;
                let (x, y) = if reflected { (b, a) } else { (a, b) };
                Self::detach_if_long(py, len, || match op {
                    Op::Add => x + y,
                    Op::Sub => x - y,
                    Op::Mul => x * y,
                    Op::Div => x / y,
                })
            }
            Operand::Scalar(s) => Self::detach_if_long(py, len, || match (op, reflected) {
                (Op::Add, false) => a + s,
                (Op::Sub, false) => a - s,
                (Op::Mul, false) => a * s,
                (Op::Div, false) => a / s,
                (Op::Add, true) => s + a,
                (Op::Sub, true) => s - a,
                (Op::Mul, true) => s * a,
                (Op::Div, true) => s / a,
            }),
        };
        Ok(Py::new(py, Self::wrap(py, out)?)?.into_any())
    }

    fn array_view<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let py = slf.py();
        let data = slf.get().inner.array().map_err(|e| errors::core(py, e))?;
        // SAFETY: `data` is owned by the frozen vector object passed as the
        // array's base, which keeps it alive as long as the array; nothing
        // writes to it (the array is made read-only below).
        let arr = unsafe { PyArray1::borrow_from_array(data, slf.clone().into_any()) };
        read_only(&arr)?;
        Ok(arr)
    }

    fn layout(&self) -> &Arc<Layout> {
        self.inner.layout()
    }
}

/// Clears numpy's WRITEABLE flag. numpy refuses to set it again on an array
/// whose memory belongs to a non-array object, so the view stays read-only.
fn read_only<T>(arr: &Bound<'_, T>) -> PyResult<()> {
    arr.as_any().getattr("flags")?.setattr("writeable", false)
}

#[pymethods]
impl PyParamVector {
    /// Copies a 1-D array (any real dtype; converted to float32) into a new
    /// vector with `mapper`'s layout. Raises `ValueError` when its length is
    /// not the layout's parameter count.
    #[staticmethod]
    fn from_numpy(
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        mapper: &Bound<'_, PyMapper>,
    ) -> PyResult<Self> {
        let np = py.import("numpy")?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("dtype", np.getattr("float32")?)?;
        let arr = np.call_method("ascontiguousarray", (array,), Some(&kwargs))?;
        let nd: usize = arr.getattr("ndim")?.extract()?;
        if nd != 1 {
            return Err(PyValueError::new_err(format!(
                "from_numpy: expected a 1-D array of {} values, got {nd} dimensions (flatten it with .ravel())",
                mapper.get().mapper.layout().num_params()
            )));
        }
        let arr: PyReadonlyArray1<'_, f32> = arr.extract()?;
        let values = arr.as_slice()?.to_vec();
        let layout = mapper.get().mapper.layout().clone();
        let v = ParamVector::from_vec(layout, values).map_err(|e| errors::core(py, e))?;
        Ok(PyParamVector { inner: v })
    }

    /// Number of elements (float parameters).
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Names of the floating-point tensors, in layout order.
    #[getter]
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let names: Vec<&str> = self
            .layout()
            .float_tensors()
            .map(|(t, _)| t.name.as_str())
            .collect();
        PyList::new(py, names)
    }

    fn __contains__(&self, name: &str) -> bool {
        self.layout().get(name).is_some_and(|t| t.dtype.is_float())
    }

    /// A read-only numpy view (no copy) of one tensor, in its shape.
    /// Raises `UnknownTensorError` (a `KeyError`) for a name the layout does
    /// not have, `InvalidInputError` for a non-float tensor.
    fn __getitem__<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let me = slf.get();
        let view = me.inner.view(name).map_err(|e| errors::core(py, e))?;
        let shape = me
            .layout()
            .get(name)
            .map(|t| t.shape.clone())
            .unwrap_or_default();
        let view = view
            .into_shape_with_order(ndarray::IxDyn(&shape))
            .map_err(|e| PyValueError::new_err(format!("tensor `{name}`: {e}")))?;
        // SAFETY: as in `array_view`: the data belongs to `slf`, the array's base.
        let arr = unsafe { PyArrayDyn::borrow_from_array(&view, slf.clone().into_any()) };
        read_only(&arr)?;
        Ok(arr.into_any())
    }

    /// The numpy protocol: `np.asarray(v)` is a read-only float32 view of
    /// the vector's own buffer. `copy=True` or another dtype make a copy;
    /// `copy=False` with another dtype raises `ValueError`.
    #[pyo3(signature = (dtype=None, copy=None))]
    fn __array__<'py>(
        slf: &Bound<'py, Self>,
        dtype: Option<&Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let view = Self::array_view(slf)?;
        let np = py.import("numpy")?;
        let same_dtype = match dtype {
            None => true,
            Some(d) => np.getattr("dtype")?.call1((d,))?.eq(view.dtype())?,
        };
        match (same_dtype, copy) {
            (true, Some(true)) => Ok(view.call_method0("copy")?),
            (true, _) => Ok(view.into_any()),
            (false, Some(false)) => Err(PyValueError::new_err(
                "a ParamVector is float32: it cannot be viewed as another dtype without a copy",
            )),
            (false, _) => Ok(view.call_method1("astype", (dtype,))?),
        }
    }

    /// Dot product with another vector of the same layout (accumulated in
    /// float64).
    fn dot(&self, py: Python<'_>, other: PyRef<'_, PyParamVector>) -> PyResult<f64> {
        let (a, b) = (&self.inner, &other.inner);
        Self::detach_if_long(py, a.len(), || a.dot(b)).map_err(|e| errors::core(py, e))
    }

    /// The L2 norm (`ord=2`, default) or the L1 norm (`ord=1`), accumulated
    /// in float64.
    #[pyo3(signature = (ord=2))]
    fn norm(&self, py: Python<'_>, ord: u32) -> PyResult<f64> {
        let a = &self.inner;
        let r = match ord {
            1 => Self::detach_if_long(py, a.len(), || a.norm_l1()),
            2 => Self::detach_if_long(py, a.len(), || a.norm_l2()),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "norm: ord must be 1 or 2, got {ord}"
                )));
            }
        };
        r.map_err(|e| errors::core(py, e))
    }

    /// Cosine similarity with another vector of the same layout (0.0 when
    /// either is zero).
    fn cosine(&self, py: Python<'_>, other: PyRef<'_, PyParamVector>) -> PyResult<f64> {
        let (a, b) = (&self.inner, &other.inner);
        Self::detach_if_long(py, a.len(), || a.cosine(b)).map_err(|e| errors::core(py, e))
    }

    fn __add__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Add, false)
    }
    fn __radd__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Add, true)
    }
    fn __sub__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Sub, false)
    }
    fn __rsub__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Sub, true)
    }
    fn __mul__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Mul, false)
    }
    fn __rmul__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Mul, true)
    }
    fn __truediv__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Div, false)
    }
    fn __rtruediv__(slf: &Bound<'_, Self>, o: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::binary(slf, o, Op::Div, true)
    }

    fn __neg__(&self, py: Python<'_>) -> PyResult<Self> {
        let a = &self.inner;
        let out = Self::detach_if_long(py, a.len(), || -a);
        Self::wrap(py, out)
    }

    fn __repr__(&self) -> String {
        format!(
            "ParamVector(tensors={}, len={})",
            self.layout().float_tensors().count(),
            self.inner.len()
        )
    }

    /// Vectors are not iterable element by element (use `np.asarray(v)`).
    fn __iter__(&self) -> PyResult<()> {
        Err(PyTypeError::new_err(
            "a ParamVector is not iterable; use np.asarray(v) or v[\"tensor.name\"]",
        ))
    }
}
