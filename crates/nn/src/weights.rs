//! A model's float tensors as candle variables (f32, CPU).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use tensormerge_core::{ModelTensorMapper, ParamVector, TensorInfo, convert};
use tensormerge_io::Model;

use crate::error::{NnError, Result};

/// Every float tensor of a model, converted to f32 and held as a
/// [`candle_core::Var`], so that the same storage serves inference (through
/// detached tensors that record no graph) and gradients (for Fisher).
#[derive(Debug)]
pub struct Weights {
    model: String,
    tensors: Vec<TensorInfo>,
    vars: BTreeMap<String, Var>,
}

impl Weights {
    /// Reads every float tensor of `model` (bf16/f16/f64 converted to f32).
    pub fn from_model(model: &Model) -> Result<Weights> {
        let mut tensors = Vec::new();
        let mut vars = BTreeMap::new();
        for t in model
            .layout()
            .tensors()
            .iter()
            .filter(|t| t.dtype.is_float())
        {
            let values = model.read_f32_vec(&t.name)?;
            vars.insert(
                t.name.clone(),
                Var::from_vec(values, t.shape.as_slice(), &Device::Cpu)?,
            );
            tensors.push(t.clone());
        }
        Ok(Weights {
            model: model.name().to_string(),
            tensors,
            vars,
        })
    }

    /// Takes every float tensor from `vector` (laid out by `mapper`), each
    /// rounded to its dtype in the mapper's layout: exactly the values that
    /// saving the vector with the mapper would write, so a model run from
    /// memory gives the same logits, bit for bit, as the saved directory.
    pub fn from_vector(
        mapper: &ModelTensorMapper,
        vector: &ParamVector,
        model: &str,
    ) -> Result<Weights> {
        let core = |source| NnError::Core {
            context: format!("{model}: taking the weights from the vector"),
            source,
        };
        mapper.check_vector(vector).map_err(core)?;
        let mut tensors = Vec::new();
        let mut vars = BTreeMap::new();
        for (t, _) in mapper.layout().float_tensors() {
            let mut values = mapper.vector_view(vector, &t.name).map_err(core)?.to_vec();
            convert::round_to(t.dtype, &mut values);
            vars.insert(
                t.name.clone(),
                Var::from_vec(values, t.shape.as_slice(), &Device::Cpu)?,
            );
            tensors.push(t.clone());
        }
        Ok(Weights {
            model: model.to_string(),
            tensors,
            vars,
        })
    }

    /// Weights from tensors in memory (`values` in f32, row-major; the
    /// dtype in each [`TensorInfo`] is kept for reference only).
    pub fn from_tensors(model: &str, tensors: Vec<(TensorInfo, Vec<f32>)>) -> Result<Weights> {
        let mut infos = Vec::new();
        let mut vars = BTreeMap::new();
        for (t, values) in tensors {
            if values.len() != t.numel() {
                return Err(NnError::Shape {
                    model: model.to_string(),
                    name: t.name.clone(),
                    expected: t.shape.clone(),
                    found: vec![values.len()],
                });
            }
            vars.insert(
                t.name.clone(),
                Var::from_vec(values, t.shape.as_slice(), &Device::Cpu)?,
            );
            infos.push(t);
        }
        Ok(Weights {
            model: model.to_string(),
            tensors: infos,
            vars,
        })
    }

    /// The model's name (its path), used in errors.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The float tensors in the model's order, with their shapes and dtypes.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Whether tensor `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    /// The variable of tensor `name`.
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// Checks that tensor `name` exists with shape `shape`.
    pub(crate) fn expect(&self, name: &str, shape: &[usize], arch: &'static str) -> Result<()> {
        let v = self.vars.get(name).ok_or_else(|| NnError::MissingTensor {
            model: self.model.clone(),
            name: name.to_string(),
            arch,
        })?;
        if v.dims() != shape {
            return Err(NnError::Shape {
                model: self.model.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: v.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// Tensor `name` for a forward pass: a tensor that records the graph for
    /// gradients when `track`, else a detached one sharing the storage.
    pub(crate) fn get(&self, name: &str, track: bool) -> Result<Tensor> {
        let v = self.vars.get(name).ok_or_else(|| NnError::MissingTensor {
            model: self.model.clone(),
            name: name.to_string(),
            arch: "this",
        })?;
        Ok(if track {
            v.as_tensor().clone()
        } else {
            v.as_detached_tensor()
        })
    }
}
