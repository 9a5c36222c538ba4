//! Opening models from paths: single files, directories, sharded indexes.
//! (Hub ids are resolved by `hub`, and `open` picks between the two; this
//! module depends on neither.)

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;
use tensormerge_core::{CoreError, DType, Layout, TensorInfo, TensorSource, convert};

use crate::IoError;
use crate::header::{self, OrderedObject};
use crate::lora::{LoraAdapter, Patch};

/// File name of a single-file model.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded model's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    /// Kept open to notice a file cut short while mapped (see `Model::raw`).
    file: File,
    map: Mmap,
    metadata: BTreeMap<String, String>,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Located {
    shard: usize,
    bytes: Range<usize>,
}

/// An opened safetensors model: one file or a sharded set, memory-mapped and
/// validated up front.
///
/// Every header is checked when the model is opened (lengths, JSON, dtypes,
/// offsets in bounds, contiguous, non-overlapping and equal to shape × dtype
/// size; for sharded models, every shard name in the index is checked to stay
/// inside the model directory, and the index and the shards must agree
/// tensor for tensor). Afterwards tensors are decoded on demand, one at a
/// time; nothing is read until asked for.
///
/// The layout lists tensors in file order: shards in file-name order and,
/// within a file, by data offset (never hash order).
#[derive(Debug)]
pub struct Model {
    name: String,
    dir: PathBuf,
    shards: Vec<Shard>,
    layout: Layout,
    located: Vec<Located>,
    /// Whether the model was opened as a directory (or index) rather than one file.
    whole_dir: bool,
    /// A LoRA adapter applied on read, with the model's name before it was applied.
    lora: Option<(Arc<LoraAdapter>, String)>,
}

#[derive(Deserialize)]
struct RawIndex {
    weight_map: OrderedObject<String>,
}

impl Model {
    /// Opens a model from a path only (directory, `.safetensors` file or index file).
    pub fn open_path(path: &Path) -> Result<Model, IoError> {
        let meta = std::fs::metadata(path).map_err(|e| IoError::io(path, e))?;
        if meta.is_dir() {
            return Self::open_dir(path);
        }
        if !meta.is_file() {
            // A FIFO would block `open` forever; devices and sockets are no models.
            return Err(IoError::NotRegularFile {
                path: path.to_path_buf(),
            });
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if name.ends_with(".index.json") && name.contains(".safetensors") {
            let mut m = Self::open_index(path, &dir)?;
            m.name = path.display().to_string();
            return Ok(m);
        }
        if name.ends_with(".safetensors") {
            return Self::open_files(path.display().to_string(), dir, vec![path.to_path_buf()]);
        }
        if is_pickle_name(name) {
            return Err(IoError::Pickle {
                path: path.to_path_buf(),
                dir,
            });
        }
        Err(IoError::UnsupportedFile {
            path: path.to_path_buf(),
        })
    }

    fn open_dir(dir: &Path) -> Result<Model, IoError> {
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            let mut m =
                Self::open_files(dir.display().to_string(), dir.to_path_buf(), vec![single])?;
            m.whole_dir = true;
            return Ok(m);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index, dir);
        }
        let mut safetensors = Vec::new();
        let mut pickle = None;
        for entry in std::fs::read_dir(dir).map_err(|e| IoError::io(dir, e))? {
            let entry = entry.map_err(|e| IoError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let p = entry.path();
            if name.ends_with(".safetensors") && p.is_file() {
                safetensors.push(name);
            } else if is_pickle_name(&name) && p.is_file() {
                pickle.get_or_insert(p);
            }
        }
        safetensors.sort();
        match (safetensors.len(), pickle) {
            (1, _) => {
                let file = dir.join(&safetensors[0]);
                let mut m =
                    Self::open_files(dir.display().to_string(), dir.to_path_buf(), vec![file])?;
                m.whole_dir = true;
                Ok(m)
            }
            (0, Some(p)) => Err(IoError::Pickle {
                path: p,
                dir: dir.to_path_buf(),
            }),
            (0, None) => Err(IoError::NoWeights {
                path: dir.to_path_buf(),
            }),
            _ => Err(IoError::AmbiguousWeights {
                path: dir.to_path_buf(),
                files: safetensors.join(", "),
            }),
        }
    }

    fn open_index(index: &Path, dir: &Path) -> Result<Model, IoError> {
        let weight_map = read_weight_map(index)?;
        let mut files: Vec<&String> = weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut paths = Vec::with_capacity(files.len());
        for file in &files {
            paths.push(check_shard_name(index, dir, file)?);
        }
        let mut model = Self::open_files(dir.display().to_string(), dir.to_path_buf(), paths)?;
        model.whole_dir = true;
        // The index and the shards must agree tensor for tensor.
        for (t, loc) in model.layout.tensors().iter().zip(&model.located) {
            let shard_file = files[loc.shard];
            if weight_map.get(&t.name) != Some(shard_file) {
                return Err(IoError::UnindexedTensor {
                    shard: model.shards[loc.shard].path.clone(),
                    tensor: t.name.clone(),
                });
            }
        }
        if weight_map.len() != model.layout.len() {
            let mut missing: Vec<(&String, &String)> = weight_map
                .iter()
                .filter(|(t, _)| model.layout.get(t).is_none())
                .collect();
            missing.sort();
            if let Some((tensor, file)) = missing.first() {
                return Err(IoError::IndexedTensorMissing {
                    index: index.to_path_buf(),
                    tensor: (*tensor).clone(),
                    file: (*file).clone(),
                });
            }
        }
        Ok(model)
    }

    /// Maps and validates `files`, in this order, as one model.
    fn open_files(name: String, dir: PathBuf, files: Vec<PathBuf>) -> Result<Model, IoError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = Vec::new();
        let mut located = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| IoError::io(&path, e))?;
            // SAFETY: the map is read-only and private to this process. As with
            // every memory-mapped reader (the safetensors crate included), the
            // file must not be truncated or modified by another process while
            // the model is open; model files are treated as immutable.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| IoError::io(&path, e))?;
            let header = header::parse(&path, &map)?;
            for e in header.entries {
                if let Some(&first) = seen.get(&e.info.name) {
                    return Err(IoError::TensorInTwoShards {
                        tensor: e.info.name,
                        first: shards
                            .get(first)
                            .map(|s: &Shard| s.path.clone())
                            .unwrap_or_else(|| path.clone()),
                        second: path.clone(),
                    });
                }
                seen.insert(e.info.name.clone(), i);
                located.push(Located {
                    shard: i,
                    bytes: e.start..e.end,
                });
                tensors.push(e.info);
            }
            shards.push(Shard {
                path,
                file,
                map,
                metadata: header.metadata,
            });
        }
        let layout = Layout::new(tensors).map_err(|source| IoError::Core {
            context: name.clone(),
            source,
        })?;
        Ok(Model {
            name,
            dir,
            shards,
            layout,
            located,
            whole_dir: false,
            lora: None,
        })
    }

    /// The directory holding the model's config and tokenizer files (for a
    /// single `.safetensors` file, the directory it is in).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The paths an output must not overwrite or lie inside: the model
    /// directory when the model was opened as a directory, else its file(s),
    /// and the directory of its LoRA adapter.
    /// Pass them as [`WriterOptions::protected`](crate::WriterOptions::protected).
    pub fn protected_paths(&self) -> Vec<PathBuf> {
        let mut paths = if self.whole_dir {
            vec![self.dir.clone()]
        } else {
            self.shards.iter().map(|s| s.path.clone()).collect()
        };
        if let Some((l, _)) = &self.lora {
            paths.push(l.dir().to_path_buf());
        }
        paths
    }

    /// Applies a PEFT LoRA adapter on read: from now on every float tensor
    /// the adapter changes reads as `W + s · B @ A` (see the [`lora`
    /// module](crate::LoraAdapter)), computed from the factors for the range
    /// read; the layout (names, shapes, stored dtypes) stays the base's.
    /// Fails, naming the adapter tensor, when a module of the adapter is not
    /// in this model or its shape does not fit.
    ///
    /// ```
    /// # let tmp = tempfile::tempdir().unwrap();
    /// use tensormerge_core::{convert, DType, TensorInfo};
    /// use tensormerge_io::{AdapterConfig, LoraAdapter, Model, ModelWriter, WriterOptions};
    /// let f32s = |v: &[f32]| convert::encode_f32_vec(DType::F32, v).unwrap();
    /// let base = tmp.path().join("base");
    /// let mut w = ModelWriter::create(&base, vec![TensorInfo::new("l.weight", vec![2, 2], DType::F32)],
    ///     WriterOptions::default()).unwrap();
    /// w.write("l.weight", &f32s(&[1.0, 0.0, 0.0, 1.0])).unwrap();
    /// w.finish().unwrap();
    /// // A rank-1 adapter: B = [1, 2]ᵀ, A = [3, 4], alpha = 2 (scale 2).
    /// let ad = tmp.path().join("adapter");
    /// let t = |n: &str, s: Vec<usize>| TensorInfo::new(format!("base_model.model.l.{n}"), s, DType::F32);
    /// let mut w = ModelWriter::create(&ad, vec![t("lora_A.weight", vec![1, 2]), t("lora_B.weight", vec![2, 1])],
    ///     WriterOptions::default()).unwrap();
    /// w.write("base_model.model.l.lora_A.weight", &f32s(&[3.0, 4.0])).unwrap();
    /// w.write("base_model.model.l.lora_B.weight", &f32s(&[1.0, 2.0])).unwrap();
    /// w.finish().unwrap();
    /// std::fs::rename(ad.join("model.safetensors"), ad.join("adapter_model.safetensors")).unwrap();
    /// std::fs::write(ad.join("adapter_config.json"), AdapterConfig::new(1, 2.0, vec!["l".into()]).to_json()).unwrap();
    ///
    /// let m = Model::open_path(&base).unwrap().with_lora(LoraAdapter::open(&ad).unwrap()).unwrap();
    /// assert_eq!(m.read_f32_vec("l.weight").unwrap(), [7.0, 8.0, 12.0, 17.0]);
    /// ```
    pub fn with_lora(mut self, adapter: LoraAdapter) -> Result<Model, IoError> {
        if self.lora.is_some() {
            return Err(IoError::AdapterMismatch {
                adapter: adapter.dir().display().to_string(),
                tensor: String::new(),
                detail: format!(
                    "`{}` already has a LoRA adapter applied; apply one adapter per model",
                    self.name
                ),
            });
        }
        adapter.check_against(&self)?;
        let plain = std::mem::take(&mut self.name);
        self.name = format!("{plain}+{}", adapter.dir().display());
        self.lora = Some((Arc::new(adapter), plain));
        Ok(self)
    }

    /// The LoRA adapter applied on read, if any.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref().map(|(l, _)| l.as_ref())
    }

    /// Opens the model again from the paths it was read from (never the
    /// network: a hub model is reopened from its local snapshot), with the
    /// same name and LoRA adapter. Dropping a model and reopening it releases
    /// the memory map's pages from the resident set.
    pub fn reopen(&self) -> Result<Model, IoError> {
        let plain = self.lora.as_ref().map_or(self.name.as_str(), |(_, p)| p);
        let path = match (self.whole_dir, self.shards.as_slice()) {
            (true, _) => self.dir.clone(),
            (false, [one]) => one.path.clone(),
            // Shards of an index file that was given directly: the index.
            _ => PathBuf::from(plain),
        };
        let mut fresh = Model::open_path(&path)?;
        fresh.name = self.name.clone();
        fresh.lora = self.lora.clone();
        Ok(fresh)
    }

    fn patch(&self, name: &str) -> Option<(&LoraAdapter, &Patch)> {
        let (l, _) = self.lora.as_ref()?;
        l.patches().get(name).map(|p| (l.as_ref(), p))
    }

    /// Renames the model for messages (the hub id it came from).
    pub(crate) fn set_name(&mut self, name: String) {
        self.name = name;
    }

    /// A name for messages: the path or hub id given when opening.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The safetensors files of the model, in layout order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The `__metadata__` of the first file (empty when it has none).
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.shards
            .first()
            .map(|s| s.metadata.clone())
            .unwrap_or_default()
    }

    /// The tensors in file order.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Name, shape and dtype of one tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, IoError> {
        self.layout.get(name).ok_or_else(|| self.unknown(name))
    }

    /// Total stored bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.layout.total_bytes()
    }

    fn unknown(&self, name: &str) -> IoError {
        IoError::UnknownTensor {
            model: self.name.clone(),
            tensor: name.to_string(),
        }
    }

    fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8]), IoError> {
        let i = self
            .layout
            .position(name)
            .ok_or_else(|| self.unknown(name))?;
        let loc = &self.located[i];
        let shard = &self.shards[loc.shard];
        // Touching mapped pages past the end of a file that another program
        // truncated kills the process with SIGBUS: check the length first.
        // (A truncation racing with the copy itself cannot be caught here.)
        let len = shard
            .file
            .metadata()
            .map_err(|e| IoError::io(&shard.path, e))?
            .len();
        if len < shard.map.len() as u64 {
            return Err(IoError::io(
                &shard.path,
                std::io::Error::other(format!(
                    "the file shrank from {} to {len} bytes while open (modified by another program?)",
                    shard.map.len()
                )),
            ));
        }
        Ok((&self.layout.tensors()[i], &shard.map[loc.bytes.clone()]))
    }

    /// The stored little-endian bytes of one tensor (any dtype), borrowed from
    /// the memory map.
    ///
    /// A tensor changed by a LoRA adapter is computed and encoded in its
    /// stored dtype (owned).
    pub fn tensor_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>, IoError> {
        if self.patch(name).is_some() {
            let info = self.tensor_info(name)?;
            let values = self.read_f32_vec(name)?;
            return convert::encode_f32_vec(info.dtype, &values)
                .map(Cow::Owned)
                .map_err(|source| IoError::Core {
                    context: format!("{}: tensor `{name}`", self.name),
                    source,
                });
        }
        Ok(Cow::Borrowed(self.raw(name)?.1))
    }

    /// Applies the LoRA patch of `name` (if any) to `out`, which holds the
    /// stored values of elements `range`; returns the first non-finite value
    /// of the result when there is a patch.
    fn apply_patch(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut [f32],
        stored_bad: Option<usize>,
    ) -> Result<Option<usize>, IoError> {
        let Some((l, p)) = self.patch(name) else {
            return Ok(stored_bad);
        };
        match p {
            Patch::Replace { tensor } => l.read_replacement(tensor, range, out)?,
            Patch::LowRank { .. } => {
                let info = self.tensor_info(name)?;
                l.add_update(p, info, range, out)?;
            }
        }
        Ok(convert::first_non_finite(out))
    }

    /// Decodes the elements `range` (in row-major element order) of the
    /// floating-point tensor `name` into `out`, which must hold `range.len()`
    /// values. Works on any alignment.
    pub fn read_f32_range(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), IoError> {
        self.read_f32_range_checked(name, range, out).map(|_| ())
    }

    /// [`read_f32_range`](Self::read_f32_range) that also finds, in the same
    /// pass, the first value that is NaN or infinite: `Some(i)` when `out[i]`
    /// is (every value is decoded either way).
    pub fn read_f32_range_checked(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut [f32],
    ) -> Result<Option<usize>, IoError> {
        let (info, bytes) = self.raw(name)?;
        let size = self.check_range(info, &range, out.len())?;
        let bad = convert::decode_f32_checked(
            info.dtype,
            &bytes[range.start * size..range.end * size],
            out,
        )
        .map_err(|source| IoError::Core {
            context: format!("{}: tensor `{}`", self.name, info.name),
            source,
        })?;
        self.apply_patch(name, range, out, bad)
    }

    /// [`read_f32_range_checked`](Self::read_f32_range_checked) through the
    /// file instead of the memory map: the bytes are read with positioned
    /// reads (`pread`), F32 straight into `out`, other dtypes into `scratch`
    /// (grown as needed, reused by the caller) and decoded from there.
    ///
    /// For streaming over a model once: the pages read never enter this
    /// process's resident set (a map's pages do, until it is dropped), and
    /// there are no page faults or unmapping costs. A file cut short is an
    /// error, never a crash.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use tensormerge_core::{convert, DType, TensorInfo};
    /// use tensormerge_io::{Model, ModelWriter, WriterOptions};
    /// let mut w = ModelWriter::create(dir.path().join("m").as_path(),
    ///     vec![TensorInfo::new("w", vec![4], DType::BF16)], WriterOptions::default()).unwrap();
    /// w.write("w", &convert::encode_f32_vec(DType::BF16, &[1.0, 2.0, f32::NAN, 4.0]).unwrap()).unwrap();
    /// let m = Model::open_path(&w.finish().unwrap()).unwrap();
    /// let (mut out, mut scratch) = ([0f32; 3], Vec::new());
    /// let bad = m.read_f32_range_copied("w", 1..4, &mut out, &mut scratch).unwrap();
    /// assert_eq!((out[0], out[2], bad), (2.0, 4.0, Some(1)));
    /// ```
    pub fn read_f32_range_copied(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut [f32],
        scratch: &mut Vec<u8>,
    ) -> Result<Option<usize>, IoError> {
        self.read_f32_range_copied_with(name, range, out, scratch, true)
    }

    /// [`read_f32_range_copied`](Self::read_f32_range_copied), with the
    /// search for a non-finite value of an F32 tensor skipped when `check`
    /// is false (then the result is `None` for it): for a range read again
    /// that was checked the first time. Other dtypes are checked as they
    /// are decoded, which costs next to nothing, and so are tensors that a
    /// LoRA adapter changes: always.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use tensormerge_core::{convert, DType, TensorInfo};
    /// use tensormerge_io::{Model, ModelWriter, WriterOptions};
    /// let mut w = ModelWriter::create(dir.path().join("m").as_path(),
    ///     vec![TensorInfo::new("w", vec![2], DType::F32)], WriterOptions::default()).unwrap();
    /// w.write("w", &convert::encode_f32_vec(DType::F32, &[1.0, f32::NAN]).unwrap()).unwrap();
    /// let m = Model::open_path(&w.finish().unwrap()).unwrap();
    /// let (mut out, mut scratch) = ([0f32; 2], Vec::new());
    /// assert_eq!(m.read_f32_range_copied_with("w", 0..2, &mut out, &mut scratch, true).unwrap(), Some(1));
    /// assert_eq!(m.read_f32_range_copied_with("w", 0..2, &mut out, &mut scratch, false).unwrap(), None);
    /// assert!(out[1].is_nan());
    /// ```
    pub fn read_f32_range_copied_with(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut [f32],
        scratch: &mut Vec<u8>,
        check: bool,
    ) -> Result<Option<usize>, IoError> {
        use std::os::unix::fs::FileExt;
        let i = self
            .layout
            .position(name)
            .ok_or_else(|| self.unknown(name))?;
        let info = &self.layout.tensors()[i];
        let size = self.check_range(info, &range, out.len())?;
        let loc = &self.located[i];
        let shard = &self.shards[loc.shard];
        let at = (loc.bytes.start + range.start * size) as u64;
        let n = range.len() * size;
        let read = |buf: &mut [u8]| {
            shard.file.read_exact_at(buf, at).map_err(|e| {
                let e = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::other(format!(
                        "the file ends before tensor `{name}` does (cut short or modified by another program?)"
                    ))
                } else {
                    e
                };
                IoError::io(&shard.path, e)
            })
        };
        let core = |source| IoError::Core {
            context: format!("{}: tensor `{name}`", self.name),
            source,
        };
        let bad = if info.dtype == DType::F32 && cfg!(target_endian = "little") {
            read(bytemuck::cast_slice_mut(out))?;
            if check {
                convert::first_non_finite(out)
            } else {
                None
            }
        } else {
            if scratch.len() < n {
                scratch.resize(n, 0);
            }
            read(&mut scratch[..n])?;
            convert::decode_f32_checked(info.dtype, &scratch[..n], out).map_err(core)?
        };
        self.apply_patch(name, range, out, bad)
    }

    /// Checks that `info` is a float tensor with elements `range` and that
    /// the output holds `out_len` values; returns the element size.
    fn check_range(
        &self,
        info: &TensorInfo,
        range: &Range<usize>,
        out_len: usize,
    ) -> Result<usize, IoError> {
        if !info.dtype.is_float() {
            return Err(IoError::NotFloat {
                model: self.name.clone(),
                tensor: info.name.clone(),
                dtype: info.dtype,
            });
        }
        let numel = info.numel();
        let bad = |detail: String| IoError::BadRange {
            model: self.name.clone(),
            tensor: info.name.clone(),
            detail,
        };
        if range.start > range.end || range.end > numel {
            return Err(bad(format!(
                "element range {}..{} outside 0..{numel}",
                range.start, range.end
            )));
        }
        if out_len != range.len() {
            return Err(bad(format!(
                "output buffer holds {out_len} values, range has {}",
                range.len()
            )));
        }
        Ok(info.dtype.size_in_bytes())
    }

    /// The values of a floating-point tensor as `f32`: borrowed straight from
    /// the memory map when the tensor is stored as F32 at a 4-byte-aligned
    /// address (zero copy), decoded into a new vector otherwise (other float
    /// dtypes, or misaligned data).
    pub fn tensor_f32(&self, name: &str) -> Result<Cow<'_, [f32]>, IoError> {
        let (info, bytes) = self.raw(name)?;
        if self.patch(name).is_none()
            && info.dtype == DType::F32
            && cfg!(target_endian = "little")
            && let Ok(values) = bytemuck::try_cast_slice::<u8, f32>(bytes)
        {
            return Ok(Cow::Borrowed(values));
        }
        self.read_f32_vec(name).map(Cow::Owned)
    }

    /// Decodes a whole floating-point tensor to a new vector.
    pub fn read_f32_vec(&self, name: &str) -> Result<Vec<f32>, IoError> {
        let n = self.tensor_info(name)?.numel();
        let mut out = vec![0f32; n];
        self.read_f32_range(name, 0..n, &mut out)?;
        Ok(out)
    }
}

impl TensorSource for Model {
    fn source_name(&self) -> String {
        self.name.clone()
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn read_f32(&self, name: &str, out: &mut [f32]) -> Result<(), CoreError> {
        let n = self
            .layout
            .get(name)
            .ok_or_else(|| CoreError::UnknownTensor(name.to_string()))?
            .numel();
        self.read_f32_range(name, 0..n, out)
            .map_err(|e| to_core(&self.name, e))
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>, CoreError> {
        self.tensor_bytes(name)
            .map(|b| b.into_owned())
            .map_err(|e| to_core(&self.name, e))
    }
}

fn to_core(model: &str, e: IoError) -> CoreError {
    match e {
        IoError::UnknownTensor { tensor, .. } => CoreError::UnknownTensor(tensor),
        IoError::NotFloat { tensor, dtype, .. } => CoreError::NotFloat {
            name: tensor,
            dtype,
        },
        IoError::Core { source, .. } => source,
        other => CoreError::Source {
            source_name: model.to_string(),
            message: other.to_string(),
        },
    }
}

/// Whether a file name is a pickle checkpoint.
fn is_pickle_name(name: &str) -> bool {
    [".bin", ".pt", ".pth", ".ckpt", ".pkl"]
        .iter()
        .any(|ext| name.ends_with(ext))
        || name.ends_with(".bin.index.json")
}

/// Reads an index's `weight_map` (tensor → shard file), refusing repeated tensors.
fn read_weight_map(index: &Path) -> Result<HashMap<String, String>, IoError> {
    let text = std::fs::read(index).map_err(|e| IoError::io(index, e))?;
    let raw: RawIndex = serde_json::from_slice(&text).map_err(|e| IoError::IndexJson {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut weight_map: HashMap<String, String> = HashMap::new();
    for (tensor, file) in raw.weight_map.0 {
        if weight_map.insert(tensor.clone(), file).is_some() {
            return Err(IoError::DuplicateEntry {
                path: index.to_path_buf(),
                tensor,
            });
        }
    }
    Ok(weight_map)
}

/// The distinct shard names of an index, sorted (unchecked: see
/// [`check_shard_name`]).
pub(crate) fn index_shards(index: &Path) -> Result<Vec<String>, IoError> {
    let mut files: Vec<String> = read_weight_map(index)?.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Checks an untrusted shard name from an index and returns its path.
///
/// The name must be relative, made only of normal components (no `..`, no
/// `.`, no root or drive prefix, no backslashes), so that it stays inside
/// `dir` lexically. Symbolic links are followed (the hub cache links snapshot
/// files to blobs elsewhere), but must end at a regular file.
pub(crate) fn check_shard_name(index: &Path, dir: &Path, file: &str) -> Result<PathBuf, IoError> {
    check_shard_name_lexically(index, file)?;
    let path = dir.join(file);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(IoError::ShardNotFile {
            index: index.to_path_buf(),
            file: file.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if path.symlink_metadata().is_ok() {
                Err(IoError::ShardNotFile {
                    index: index.to_path_buf(),
                    file: file.to_string(),
                })
            } else {
                Err(IoError::MissingShard {
                    index: index.to_path_buf(),
                    file: file.to_string(),
                })
            }
        }
        Err(e) => Err(IoError::io(&path, e)),
    }
}

/// The name checks of [`check_shard_name`], without touching the file system.
pub(crate) fn check_shard_name_lexically(index: &Path, file: &str) -> Result<(), IoError> {
    let refuse = |reason| IoError::UnsafeShardName {
        index: index.to_path_buf(),
        file: file.to_string(),
        reason,
    };
    if file.is_empty() {
        return Err(refuse("empty name"));
    }
    if file.contains('\0') {
        return Err(refuse("contains a NUL byte"));
    }
    if file.starts_with('/') || file.starts_with('\\') || Path::new(file).is_absolute() {
        return Err(refuse("absolute path"));
    }
    if file.contains('\\') || file.as_bytes().get(1) == Some(&b':') {
        return Err(refuse("drive letter or backslash"));
    }
    for c in Path::new(file).components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Err(refuse("`..` would leave the model directory")),
            Component::CurDir => return Err(refuse("`.` components are not allowed")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse("absolute path")),
        }
    }
    Ok(())
}
