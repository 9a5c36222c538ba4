//! `tensormerge.ModelTensorMapper`: model directories ↔ `ParamVector`s.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyList;
use tensormerge::core::{DType, Layout, ModelTensorMapper, TensorInfo};
use tensormerge::io::{MapperExt, Model, WriterOptions};

use crate::errors;
use crate::vector::PyParamVector;

/// Maps models of one layout to flat float32 `ParamVector`s and back.
///
/// `ModelTensorMapper.open(path_or_hub_id)` reads a model's header (no
/// weights) and keeps the model as the default template for `save`.
/// `ModelTensorMapper(tensors)` builds a mapper from a list of
/// `(name, shape, dtype)` for vectors that never came from a file.
#[pyclass(frozen, name = "ModelTensorMapper", module = "tensormerge")]
#[derive(Debug)]
pub struct PyMapper {
    pub(crate) mapper: ModelTensorMapper,
    template: Option<Arc<Model>>,
}

fn open_model(py: Python<'_>, reference: &str) -> PyResult<Model> {
    py.detach(|| Model::open(reference))
        .map_err(|e| errors::io(py, format!("cannot open model `{reference}`"), e))
}

#[pymethods]
impl PyMapper {
    /// A mapper for an explicit layout: `tensors` is a list of
    /// `(name, shape, dtype)` with dtype names as in safetensors (`"F32"`,
    /// `"BF16"`, ...) or PyTorch (`"bfloat16"`).
    #[new]
    fn new(py: Python<'_>, tensors: Vec<(String, Vec<usize>, String)>) -> PyResult<Self> {
        let infos = tensors
            .into_iter()
            .map(|(name, shape, dtype)| {
                let d: DType = dtype.parse().map_err(|e| errors::core(py, e))?;
                Ok(TensorInfo::new(name, shape, d))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let layout = Layout::new(infos).map_err(|e| errors::core(py, e))?;
        Ok(PyMapper {
            mapper: ModelTensorMapper::new(layout),
            template: None,
        })
    }

    /// Opens the model at `reference` (a directory, a `.safetensors` file or
    /// a cached hub id `org/name[@revision]`) and returns a mapper for its
    /// layout. Only headers are read.
    #[staticmethod]
    fn open(py: Python<'_>, reference: &str) -> PyResult<Self> {
        let model = open_model(py, reference)?;
        Ok(PyMapper {
            mapper: ModelTensorMapper::for_model(&model),
            template: Some(Arc::new(model)),
        })
    }

    /// Reads the model at `reference` into a new vector (decoding BF16, F16
    /// and F64 to float32). Raises `InvalidInputError` (a `ValueError`)
    /// naming the first differing tensor when its layout differs. The GIL
    /// is released while reading.
    fn load(&self, py: Python<'_>, reference: &str) -> PyResult<PyParamVector> {
        let v = py
            .detach(|| self.mapper.load(reference))
            .map_err(|e| errors::io(py, format!("cannot load model `{reference}`"), e))?;
        PyParamVector::wrap(py, v)
    }

    /// Writes `vector` as a model directory `out` (written into a temporary
    /// sibling, renamed into place when complete): float tensors in this
    /// mapper's dtypes, non-float tensors and config/tokenizer files from
    /// `template` (a model reference; default: the model this mapper was
    /// opened from). Returns the output directory. The GIL is released
    /// while writing.
    #[pyo3(signature = (vector, out, template=None, *, overwrite=false, max_shard_bytes=None))]
    fn save(
        &self,
        py: Python<'_>,
        vector: PyRef<'_, PyParamVector>,
        out: PathBuf,
        template: Option<&str>,
        overwrite: bool,
        max_shard_bytes: Option<u64>,
    ) -> PyResult<String> {
        let template: Arc<Model> = match (template, &self.template) {
            (Some(r), _) => Arc::new(open_model(py, r)?),
            (None, Some(t)) => t.clone(),
            (None, None) => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "save: this mapper was not opened from a model; pass `template`, the model whose non-float tensors and config files to copy",
                ));
            }
        };
        let mut opts = WriterOptions {
            overwrite,
            ..WriterOptions::default()
        };
        if let Some(m) = max_shard_bytes {
            opts.max_shard_bytes = m;
        }
        let v = &vector.inner;
        let dir = py
            .detach(|| self.mapper.save(v, &out, &template, opts))
            .map_err(|e| errors::io(py, format!("cannot save to `{}`", out.display()), e))?;
        Ok(dir.display().to_string())
    }

    /// The layout: a list of `(name, shape, dtype)` for every tensor (float
    /// and non-float), in order.
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<(String, Vec<usize>, String)> = self
            .mapper
            .layout()
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), t.dtype.to_string()))
            .collect();
        PyList::new(py, items)
    }

    /// Number of float parameters (the length of every vector of this layout).
    fn __len__(&self) -> usize {
        self.mapper.layout().num_params()
    }

    /// A vector of zeros with this layout.
    fn zeros(&self) -> PyParamVector {
        PyParamVector {
            inner: tensormerge::ParamVector::zeros(self.mapper.layout().clone()),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "ModelTensorMapper(tensors={}, params={}{})",
            self.mapper.layout().len(),
            self.mapper.layout().num_params(),
            match &self.template {
                Some(t) => format!(", model={:?}", t.name()),
                None => String::new(),
            }
        )
    }
}
