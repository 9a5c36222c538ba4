//! `tensormerge.methods()` and `tensormerge.run_method(...)`: every
//! registered merge method, run in memory through the methods crate's
//! [`Merge`] — the same pass protocol as the streaming engine, so results are
//! bit-identical to `tensormerge merge` on the same inputs, parameters and
//! seed.

use std::sync::Arc;

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tensormerge::builtin;
use tensormerge::core::{DType, Layout, ParamVector, TensorInfo};
use tensormerge::methods::{BaseModel, Merge, ParamValue, Scope};

use crate::errors;
use crate::vector::PyParamVector;

/// Every registered method: a list of dicts with `name`, `summary`,
/// `paper`, `base` (`"required"`, `"optional"` or `"unused"`),
/// `min_models`, `max_models` (`None`: any number) and `params` (dicts with
/// `name`, `scope` (`"per_model"` or `"global"`), `kind`, `default`, `doc`).
#[pyfunction]
pub fn methods(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let out = PyList::empty(py);
    for m in builtin::registry().methods() {
        let i = m.info();
        let d = PyDict::new(py);
        d.set_item("name", i.name)?;
        d.set_item("summary", i.summary)?;
        d.set_item("paper", i.paper)?;
        d.set_item(
            "base",
            match i.base {
                BaseModel::Required => "required",
                BaseModel::Optional => "optional",
                BaseModel::Unused => "unused",
            },
        )?;
        d.set_item("min_models", i.min_models)?;
        d.set_item("max_models", i.max_models)?;
        let params = PyList::empty(py);
        for s in i.params {
            let p = PyDict::new(py);
            p.set_item("name", s.name)?;
            p.set_item(
                "scope",
                match s.scope {
                    Scope::PerModel => "per_model",
                    Scope::Global => "global",
                },
            )?;
            p.set_item("kind", s.kind.to_string())?;
            p.set_item("default", s.default.to_string())?;
            p.set_item("doc", s.doc)?;
            params.append(p)?;
        }
        d.set_item("params", params)?;
        out.append(d)?;
    }
    Ok(out)
}

fn param_value(v: &Bound<'_, PyAny>, name: &str) -> PyResult<ParamValue> {
    if let Ok(b) = v.cast::<pyo3::types::PyBool>() {
        return Ok(ParamValue::Bool(b.is_true()));
    }
    if let Ok(i) = v.cast::<pyo3::types::PyInt>() {
        return Ok(ParamValue::Int(i.extract()?));
    }
    if let Ok(s) = v.extract::<String>() {
        return Ok(ParamValue::Str(s));
    }
    if let Ok(f) = v.extract::<f64>() {
        return Ok(ParamValue::Float(f));
    }
    Err(PyTypeError::new_err(format!(
        "parameter `{name}`: expected a number, a boolean or a string, got {}",
        v.get_type().name()?
    )))
}

/// Inputs as vectors of one layout, and whether they came as numpy arrays.
struct Inputs {
    base: Option<ParamVector>,
    models: Vec<ParamVector>,
    /// `Some(shape)` when the inputs were numpy arrays.
    array_shape: Option<Vec<usize>>,
}

fn inputs(
    py: Python<'_>,
    base: Option<&Bound<'_, PyAny>>,
    models: &[Bound<'_, PyAny>],
    tensor: &str,
) -> PyResult<Inputs> {
    let all: Vec<&Bound<'_, PyAny>> = base.into_iter().chain(models.iter()).collect();
    let Some(first) = all.first() else {
        return Err(PyValueError::new_err("run_method: no input models"));
    };
    if first.cast::<PyParamVector>().is_ok() {
        let mut vs = Vec::new();
        for (i, v) in all.iter().enumerate() {
            let v = v.cast::<PyParamVector>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "run_method: input {i} is not a ParamVector (do not mix ParamVectors and arrays)"
                ))
            })?;
            vs.push(v.get().inner.clone());
        }
        let base = base.map(|_| vs.remove(0));
        return Ok(Inputs {
            base,
            models: vs,
            array_shape: None,
        });
    }
    // numpy arrays (any real dtype; converted to float32), all of one shape
    let np = py.import("numpy")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", np.getattr("float32")?)?;
    let mut arrays = Vec::new();
    for v in &all {
        let a = np.call_method("ascontiguousarray", (*v,), Some(&kwargs))?;
        let a: PyReadonlyArrayDyn<'_, f32> = a.extract()?;
        arrays.push(a);
    }
    let shape = arrays[0].shape().to_vec();
    for (i, a) in arrays.iter().enumerate() {
        if a.shape() != shape.as_slice() {
            return Err(errors::core(
                py,
                tensormerge::core::CoreError::LayoutMismatch {
                    tensor: tensor.to_string(),
                    detail: format!(
                        "input {i} has shape {:?}, input 0 has shape {shape:?}",
                        a.shape()
                    ),
                },
            ));
        }
    }
    let layout = Arc::new(
        Layout::new(vec![TensorInfo::new(tensor, shape.clone(), DType::F32)])
            .map_err(|e| errors::core(py, e))?,
    );
    let mut vs = Vec::new();
    for a in &arrays {
        let v = ParamVector::from_vec(layout.clone(), a.as_slice()?.to_vec())
            .map_err(|e| errors::core(py, e))?;
        vs.push(v);
    }
    let base = base.map(|_| vs.remove(0));
    Ok(Inputs {
        base,
        models: vs,
        array_shape: Some(shape),
    })
}

/// Runs merge method `name` on `base` (or `None`) and `models`, all
/// `ParamVector`s of one layout or numpy arrays of one shape (a one-tensor
/// model named `tensor`; the name seeds the random methods as in a merge).
/// `params` maps parameter names to values; a per-model parameter takes
/// one value for every model or a list with one value per model. Returns a
/// `ParamVector` for vector inputs, a float32 array for arrays. The GIL is
/// released while merging.
#[pyfunction]
#[pyo3(signature = (name, base, models, params=None, *, seed=0, tensor="tensor"))]
pub fn run_method<'py>(
    py: Python<'py>,
    name: &str,
    base: Option<Bound<'py, PyAny>>,
    models: Vec<Bound<'py, PyAny>>,
    params: Option<Bound<'py, PyDict>>,
    seed: u64,
    tensor: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let reg = builtin::registry();
    let method = reg.get(name).map_err(|e| errors::method(py, e))?;
    let info = method.info();
    let inp = inputs(py, base.as_ref(), &models, tensor)?;
    let n = inp.models.len();

    // Split the given parameters into global ones and per-model lists.
    let mut owned: Vec<(String, Option<ParamValue>, Option<Vec<ParamValue>>)> = Vec::new();
    if let Some(p) = &params {
        for (k, v) in p.iter() {
            let k: String = k.extract()?;
            let per_model = info
                .params
                .iter()
                .any(|s| s.name == k && s.scope == Scope::PerModel);
            if per_model {
                let values = if let Ok(list) = v.cast::<PyList>() {
                    if list.len() != n {
                        return Err(PyValueError::new_err(format!(
                            "parameter `{k}`: {} values for {n} models",
                            list.len()
                        )));
                    }
                    list.iter()
                        .map(|x| param_value(&x, &k))
                        .collect::<PyResult<Vec<_>>>()?
                } else {
                    vec![param_value(&v, &k)?; n]
                };
                owned.push((k, None, Some(values)));
            } else {
                let value = param_value(&v, &k)?;
                owned.push((k, Some(value), None));
            }
        }
    }
    let global: Vec<(&str, ParamValue)> = owned
        .iter()
        .filter_map(|(k, g, _)| g.clone().map(|g| (k.as_str(), g)))
        .collect();
    let per_model: Vec<Vec<(&str, ParamValue)>> = (0..n)
        .map(|i| {
            owned
                .iter()
                .filter_map(|(k, _, m)| m.as_ref().map(|m| (k.as_str(), m[i].clone())))
                .collect()
        })
        .collect();
    let merge = Merge::new(method, global, per_model)
        .map_err(|e| errors::method(py, e))?
        .seed(seed);
    let refs: Vec<&ParamVector> = inp.models.iter().collect();
    let out = py
        .detach(|| merge.run(inp.base.as_ref(), &refs))
        .map_err(|e| errors::method(py, e))?;
    match inp.array_shape {
        None => Ok(Py::new(py, PyParamVector::wrap(py, out)?)?
            .into_bound(py)
            .into_any()),
        Some(shape) => {
            let arr = out.into_array().map_err(|e| errors::core(py, e))?;
            let arr = arr
                .into_shape_with_order(ndarray::IxDyn(&shape))
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            Ok(PyArrayDyn::from_owned_array(py, arr).into_any())
        }
    }
}
