//! Loading and saving for [`ModelTensorMapper`].

use std::path::{Path, PathBuf};

use tensormerge_core::{DType, ModelTensorMapper, ParamVector, convert};

use crate::{IoError, Model, ModelWriter, WriterOptions};

/// File I/O for [`ModelTensorMapper`]: load models straight into vectors and
/// save vectors as model directories.
///
/// ```
/// # use tensormerge_core::{DType, TensorInfo, ModelTensorMapper};
/// # use tensormerge_io::{MapperExt, Model, ModelWriter, WriterOptions};
/// # let tmp = tempfile::tempdir().unwrap();
/// # let base = tmp.path().join("base");
/// # let mut w = ModelWriter::create(&base, vec![TensorInfo::new("w", vec![2], DType::BF16)],
/// #     WriterOptions::default()).unwrap();
/// # w.write("w", &tensormerge_core::convert::encode_f32_vec(DType::BF16, &[1.0, 2.0]).unwrap()).unwrap();
/// # w.finish().unwrap();
/// let (mapper, template) = ModelTensorMapper::open(base.to_str().unwrap()).unwrap();
/// let v = mapper.load(base.to_str().unwrap()).unwrap();
/// let out = tmp.path().join("doubled");
/// mapper.save(&(2.0 * &v), &out, &template, WriterOptions::default()).unwrap();
/// assert_eq!(Model::open_path(&out).unwrap().read_f32_vec("w").unwrap(), vec![2.0, 4.0]);
/// ```
pub trait MapperExt: Sized {
    /// Opens the model at `reference` (path or hub id) and returns a mapper
    /// for its layout together with the opened model (a template for `save`).
    fn open(reference: &str) -> Result<(Self, Model), IoError>;

    /// Opens `reference` (path or hub id) and flattens it with this mapper.
    /// Fails naming the first differing tensor when its layout differs.
    fn load(&self, reference: &str) -> Result<ParamVector, IoError>;

    /// Fetches hub id `org/name[@revision]` (cargo feature `hub`) and
    /// flattens it with this mapper. (Named as in the seed notebook's API.)
    #[allow(clippy::wrong_self_convention)]
    fn from_hub(&self, id: &str) -> Result<ParamVector, IoError>;

    /// Writes `vector` as a model directory `out`: floating-point tensors in
    /// this mapper's dtypes, in `template`'s order, non-float tensors copied
    /// from `template` unchanged, and `template`'s config and tokenizer files
    /// (with `torch_dtype` set to the dtype holding most parameters).
    /// `template` is added to `opts.protected`. Returns the output directory.
    fn save(
        &self,
        vector: &ParamVector,
        out: &Path,
        template: &Model,
        opts: WriterOptions,
    ) -> Result<PathBuf, IoError>;
}

impl MapperExt for ModelTensorMapper {
    fn open(reference: &str) -> Result<(Self, Model), IoError> {
        let model = Model::open(reference)?;
        Ok((ModelTensorMapper::for_model(&model), model))
    }

    fn load(&self, reference: &str) -> Result<ParamVector, IoError> {
        let model = Model::open(reference)?;
        self.to_vector(&model).map_err(|source| IoError::Core {
            context: model.name().to_string(),
            source,
        })
    }

    fn from_hub(&self, id: &str) -> Result<ParamVector, IoError> {
        let model = crate::hub::open_hub(id)?;
        self.to_vector(&model).map_err(|source| IoError::Core {
            context: model.name().to_string(),
            source,
        })
    }

    fn save(
        &self,
        vector: &ParamVector,
        out: &Path,
        template: &Model,
        mut opts: WriterOptions,
    ) -> Result<PathBuf, IoError> {
        let ctx = |source| IoError::Core {
            context: out.display().to_string(),
            source,
        };
        self.check_vector(vector).map_err(ctx)?;
        self.layout()
            .check_compatible(template.layout())
            .map_err(|source| IoError::Core {
                context: format!("template {}", template.name()),
                source,
            })?;
        let layout = self.layout();
        // Template order; float tensors take this mapper's dtypes.
        let tensors: Vec<_> = template
            .layout()
            .tensors()
            .iter()
            .map(|t| match layout.get(&t.name) {
                Some(m) if m.dtype.is_float() => m.clone(),
                _ => t.clone(),
            })
            .collect();
        let mut by_dtype: Vec<(DType, usize)> = Vec::new();
        for (t, r) in layout.float_tensors() {
            match by_dtype.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, n)) => *n += r.len(),
                None => by_dtype.push((t.dtype, r.len())),
            }
        }
        let torch_dtype = by_dtype.iter().max_by_key(|(_, n)| *n).map(|(d, _)| *d);
        opts.protected.extend(template.protected_paths());
        let mut writer = ModelWriter::create(out, tensors.clone(), opts)?;
        let values = vector.values().map_err(ctx)?;
        for t in &tensors {
            if t.dtype.is_float() {
                let r = layout.range(&t.name).expect("float tensor has a range");
                let bytes = convert::encode_f32_vec(t.dtype, &values[r]).map_err(ctx)?;
                writer.write(&t.name, &bytes)?;
            } else {
                writer.write(&t.name, &template.tensor_bytes(&t.name)?)?;
            }
        }
        writer.copy_support_files(template.dir(), torch_dtype)?;
        writer.finish()
    }
}
