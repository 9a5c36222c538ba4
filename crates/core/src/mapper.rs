//! [`ModelTensorMapper`]: models to flat vectors and back.

use std::sync::Arc;

use crate::{CoreError, DType, Layout, ParamVector, TensorInfo, convert};

/// Anything that holds named tensors and can decode one of them to `f32`:
/// an opened checkpoint (`tensormerge_io::Model`) or an [`InMemoryModel`].
pub trait TensorSource {
    /// A human-readable name for errors (a path or a hub id).
    fn source_name(&self) -> String;

    /// The tensors, in the model's own order.
    fn layout(&self) -> &Layout;

    /// Decodes the floating-point tensor `name` into `out` (`numel` values).
    fn read_f32(&self, name: &str, out: &mut [f32]) -> Result<(), CoreError>;

    /// The stored little-endian bytes of tensor `name` (any dtype).
    fn read_bytes(&self, name: &str) -> Result<Vec<u8>, CoreError>;
}

/// One tensor held in memory as little-endian bytes of its dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name, shape, dtype.
    pub info: TensorInfo,
    /// `numel × dtype size` little-endian bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor from `f32` values, stored as `dtype` (rounded once).
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: DType,
        values: &[f32],
    ) -> Result<Self, CoreError> {
        let info = TensorInfo::new(name, shape, dtype);
        check_numel(&info, values.len(), "elements")?;
        Ok(Tensor {
            data: convert::encode_f32_vec(dtype, values)?,
            info,
        })
    }

    /// A tensor from raw little-endian bytes.
    pub fn from_bytes(info: TensorInfo, data: Vec<u8>) -> Result<Self, CoreError> {
        let expected = info
            .checked_byte_len()
            .ok_or_else(|| CoreError::ShapeOverflow {
                name: info.name.clone(),
                shape: info.shape.clone(),
            })?;
        if expected != data.len() {
            return Err(CoreError::LengthMismatch {
                name: info.name,
                expected,
                actual: data.len(),
                unit: "bytes",
            });
        }
        Ok(Tensor { info, data })
    }

    /// The values decoded to `f32` (float tensors only).
    pub fn to_f32(&self) -> Result<Vec<f32>, CoreError> {
        let mut out = vec![0f32; self.info.numel()];
        convert::decode_f32(self.info.dtype, &self.data, &mut out)
            .map_err(|e| name_error(e, &self.info.name))?;
        Ok(out)
    }
}

fn check_numel(info: &TensorInfo, actual: usize, unit: &'static str) -> Result<(), CoreError> {
    if info.checked_numel() != Some(actual) {
        return Err(CoreError::LengthMismatch {
            name: info.name.clone(),
            expected: info.numel(),
            actual,
            unit,
        });
    }
    Ok(())
}

fn name_error(e: CoreError, name: &str) -> CoreError {
    match e {
        CoreError::NotFloat { dtype, .. } => CoreError::NotFloat {
            name: name.to_string(),
            dtype,
        },
        CoreError::LengthMismatch {
            expected,
            actual,
            unit,
            ..
        } => CoreError::LengthMismatch {
            name: name.to_string(),
            expected,
            actual,
            unit,
        },
        other => other,
    }
}

/// A model held entirely in memory: named tensors in order.
///
/// ```
/// use tensormerge_core::{DType, InMemoryModel, Tensor, TensorSource};
/// let m = InMemoryModel::new("toy", vec![
///     Tensor::from_f32("w", vec![2], DType::BF16, &[0.5, -1.0]).unwrap(),
/// ]).unwrap();
/// assert_eq!(m.layout().num_params(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct InMemoryModel {
    name: String,
    layout: Layout,
    tensors: Vec<Tensor>,
}

impl InMemoryModel {
    /// A model from tensors in order; fails on duplicate names.
    pub fn new(name: impl Into<String>, tensors: Vec<Tensor>) -> Result<Self, CoreError> {
        let layout = Layout::new(tensors.iter().map(|t| t.info.clone()).collect())?;
        Ok(InMemoryModel {
            name: name.into(),
            layout,
            tensors,
        })
    }

    /// The tensors in order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// Unwraps the tensors.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.layout.position(name).map(|i| &self.tensors[i])
    }
}

impl TensorSource for InMemoryModel {
    fn source_name(&self) -> String {
        self.name.clone()
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn read_f32(&self, name: &str, out: &mut [f32]) -> Result<(), CoreError> {
        let t = self
            .get(name)
            .ok_or_else(|| CoreError::UnknownTensor(name.to_string()))?;
        check_numel(&t.info, out.len(), "elements")?;
        convert::decode_f32(t.info.dtype, &t.data, out).map_err(|e| name_error(e, name))
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>, CoreError> {
        let t = self
            .get(name)
            .ok_or_else(|| CoreError::UnknownTensor(name.to_string()))?;
        Ok(t.data.clone())
    }
}

/// Maps models of one architecture to flat [`ParamVector`]s and back.
///
/// Built from a model's layout (usually the base model). Every vector it makes
/// shares that layout, so vectors from one mapper always combine. Models are
/// matched by tensor name, so a fine-tune whose file lists tensors in another
/// order, or stores them in another float width, maps to the same positions.
///
/// Loading from disk or the hub and saving model directories are added by
/// `tensormerge-io` (the `MapperExt` trait), since this crate does no I/O.
///
/// ```
/// use tensormerge_core::{DType, InMemoryModel, ModelTensorMapper, Tensor, TensorSource};
/// let model = InMemoryModel::new("m", vec![
///     Tensor::from_f32("w", vec![2, 2], DType::BF16, &[1.0, 2.0, 3.0, 4.0]).unwrap(),
///     Tensor::from_bytes(
///         tensormerge_core::TensorInfo::new("ids", vec![2], DType::I64),
///         vec![0; 16],
///     ).unwrap(),
///     Tensor::from_f32("b", vec![2], DType::F32, &[5.0, 6.0]).unwrap(),
/// ]).unwrap();
/// let mapper = ModelTensorMapper::new(model.layout().clone());
/// let v = mapper.to_vector(&model).unwrap();
/// assert_eq!(v.values().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// let doubled = mapper.from_vector(&(2.0 * &v)).unwrap();
/// assert_eq!(doubled[0].info.dtype, DType::BF16); // original dtype restored
/// assert_eq!(doubled[1].to_f32().unwrap(), vec![10.0, 12.0]);
/// ```
#[derive(Debug, Clone)]
pub struct ModelTensorMapper {
    layout: Arc<Layout>,
}

impl ModelTensorMapper {
    /// A mapper for models with this layout.
    pub fn new(layout: Layout) -> Self {
        ModelTensorMapper {
            layout: Arc::new(layout),
        }
    }

    /// A mapper for models shaped like `model`.
    pub fn for_model(model: &impl TensorSource) -> Self {
        Self::new(model.layout().clone())
    }

    /// The layout every vector of this mapper has.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Flattens `model`'s floating-point tensors into one vector. Fails with
    /// [`CoreError::LayoutMismatch`] naming the first tensor that differs when
    /// `model` does not have this mapper's tensors and shapes.
    pub fn to_vector(&self, model: &impl TensorSource) -> Result<ParamVector, CoreError> {
        self.layout
            .check_compatible(model.layout())
            .map_err(|e| match e {
                CoreError::LayoutMismatch { tensor, detail } => CoreError::LayoutMismatch {
                    tensor,
                    detail: format!("{detail} (in {})", model.source_name()),
                },
                other => other,
            })?;
        let mut v = ParamVector::zeros(self.layout.clone());
        let values = v.values_mut().expect("fresh vector");
        for (t, r) in self.layout.float_tensors() {
            model.read_f32(&t.name, &mut values[r])?;
        }
        Ok(v)
    }

    /// Restores the floating-point tensors of `vector`, with their names,
    /// shapes and the dtypes of this mapper's layout. Non-float tensors are not
    /// part of a vector; saving carries them over from a template model.
    pub fn from_vector(&self, vector: &ParamVector) -> Result<Vec<Tensor>, CoreError> {
        self.check_vector(vector)?;
        let values = vector.values()?;
        self.layout
            .float_tensors()
            .map(|(t, r)| {
                Ok(Tensor {
                    info: t.clone(),
                    data: convert::encode_f32_vec(t.dtype, &values[r])?,
                })
            })
            .collect()
    }

    /// Checks that `vector` is healthy and has this mapper's layout.
    pub fn check_vector(&self, vector: &ParamVector) -> Result<(), CoreError> {
        vector.check()?;
        if !Arc::ptr_eq(vector.layout(), &self.layout)
            && let Some(e) = self.layout.first_difference(vector.layout())
        {
            return Err(e);
        }
        Ok(())
    }

    /// The slice of one tensor in `vector`.
    pub fn vector_view<'a>(
        &self,
        vector: &'a ParamVector,
        name: &str,
    ) -> Result<ndarray::ArrayView1<'a, f32>, CoreError> {
        self.check_vector(vector)?;
        vector.view(name)
    }
}
