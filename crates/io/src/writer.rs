//! Streaming, sharded safetensors writing into a temporary sibling directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tensormerge_core::{DType, Layout, TensorInfo};

use crate::IoError;
use crate::model::{INDEX_FILE, SINGLE_FILE};
use crate::pieces::{self, PartSpec, PieceFile, PieceManifest};

/// Default shard size limit: 5 GB, as mergekit's `--out-shard-size` default.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Files copied from a template model by [`ModelWriter::copy_support_files`]
/// (when present). Weights are never among them.
pub const SUPPORT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Options of a [`ModelWriter`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Largest shard in bytes (tensor data, headers excluded). Tensors are
    /// packed greedily in declared order; a tensor larger than the limit gets
    /// a shard of its own. Default [`DEFAULT_MAX_SHARD_BYTES`].
    pub max_shard_bytes: u64,
    /// Replace an existing output directory (only when `finish` succeeds).
    pub overwrite: bool,
    /// Input paths the output must not be, lie inside, or contain.
    pub protected: Vec<PathBuf>,
    /// `__metadata__` of every shard. `format` defaults to `pt`, which
    /// `transformers` expects.
    pub metadata: BTreeMap<String, String>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            overwrite: false,
            protected: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct ShardPlan {
    pub(crate) file_name: String,
    /// Tensor indices `first..end`.
    pub(crate) first: usize,
    pub(crate) end: usize,
}

/// Bytes written to a file between two background syncs its
/// [`Writeback`] asks for ([`ModelWriter`] has one per shard file).
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// A shard file being written, hashed on the way when it is a piece.
#[derive(Debug)]
struct ShardFile {
    file: File,
    hasher: Option<Sha256>,
    /// Syncs the file's data in the background while the merge goes on.
    writeback: Writeback,
}

impl ShardFile {
    fn new(file: File, hashed: bool) -> std::io::Result<ShardFile> {
        let writeback = Writeback::new(&file)?;
        Ok(ShardFile {
            file,
            hasher: hashed.then(Sha256::new),
            writeback,
        })
    }

    /// Counts `n` bytes written (in order or ahead), so that the disk
    /// writes while the merge computes and the `fsync` that closes the file
    /// has little left to do ([`Writeback::written`]).
    fn written(&mut self, n: usize) {
        self.writeback.written(n as u64);
    }
}

/// Writes a file's data to the disk in the background: every
/// [`WRITEBACK_EVERY`] bytes reported [`written`](Self::written), a thread
/// of its own calls `fdatasync` on the file (a duplicate of its
/// descriptor), without the caller waiting; a sync asked for while one is
/// pending is merged into it.
/// [`finish`](Self::finish) waits for the thread and returns the first
/// error a sync met, so that no write error is lost (on Linux an error
/// reported to one `fsync` is not reported again to a later one on the same
/// open file).
///
/// Why not `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which this replaces:
/// on ext4 (this project's test machine, a virtual disk) the pages it queued
/// were still not on the disk a second later, and the closing `fsync` of a
/// 240 MiB file written at about 190 MB/s waited 0.34 s either way; with a
/// background `fdatasync` every 8 MiB it waited 0.00 s, and the writes
/// were no slower (hand-measured with a script writing 8 MiB every 35 ms,
/// 2026-12-07; `cargo xtask bench` measures merges).
///
/// ```
/// use std::io::Write;
/// # let dir = tempfile::tempdir().unwrap();
/// let mut f = std::fs::File::create(dir.path().join("out.bin")).unwrap();
/// let mut wb = tensormerge_io::Writeback::new(&f).unwrap();
/// for _ in 0..9 {
///     f.write_all(&[7u8; 1 << 20]).unwrap();
///     wb.written(1 << 20); // the eighth MiB asks for a sync
/// }
/// wb.finish().unwrap(); // waits for the background sync; reports its error
/// f.sync_all().unwrap();
/// assert_eq!(std::fs::read(dir.path().join("out.bin")).unwrap(), vec![7u8; 9 << 20]);
/// ```
#[derive(Debug)]
pub struct Writeback {
    /// Bytes reported since the last sync was asked for.
    dirty: u64,
    requests: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Writeback {
    /// Starts the background thread for `file` (which must be open for
    /// writing).
    pub fn new(file: &File) -> std::io::Result<Writeback> {
        let file = file.try_clone()?;
        // One pending request at most: it covers whatever is written before
        // the thread takes it.
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("tensormerge-writeback".into())
            .spawn(move || {
                let mut result = Ok(());
                while rx.recv().is_ok() {
                    if let Err(e) = file.sync_data()
                        && result.is_ok()
                    {
                        result = Err(e);
                    }
                }
                result
            })?;
        Ok(Writeback {
            dirty: 0,
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    /// Counts `n` more bytes written to the file; every
    /// [`WRITEBACK_EVERY`] bytes asks for what is written so far to be
    /// synced. Returns at once.
    pub fn written(&mut self, n: u64) {
        self.dirty += n;
        if self.dirty >= WRITEBACK_EVERY {
            self.dirty = 0;
            self.request();
        }
    }

    /// Asks for the file's data written so far to be synced; returns at
    /// once.
    fn request(&self) {
        if let Some(tx) = &self.requests {
            // Full: a request is pending and will cover these bytes too.
            let _ = tx.try_send(());
        }
    }

    /// Waits for the pending sync, if any, and stops the thread; returns the
    /// first error of any sync it ran.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> std::io::Result<()> {
        drop(self.requests.take());
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the write-back thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Write for ShardFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.written(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Moving forward over bytes already written ahead
/// ([`ModelWriter::write_ahead`], never for a hashed piece).
impl Seek for ShardFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        debug_assert!(self.hasher.is_none(), "a hashed piece is written in order");
        self.file.seek(pos)
    }
}

/// What a writer of a part ([`ModelWriter::create_part`]) remembers.
#[derive(Debug)]
struct Part {
    spec: PartSpec,
    /// The pieces closed so far.
    pieces: Vec<PieceFile>,
}

/// Writes a model directory tensor by tensor.
///
/// The tensor list is declared up front, so each shard's header is known
/// before its first byte: a shard file is created with its header and the
/// tensor bytes are streamed after it, one [`write`](ModelWriter::write) at a
/// time. Memory holds no more than a write buffer.
///
/// Output goes to a temporary sibling directory
/// (`.<name>.tensormerge-tmp-<pid>-<n>`); [`finish`](ModelWriter::finish) renames
/// it into place. Dropping the writer without `finish` (an error, a panic, an
/// interrupt that unwinds) removes the temporary directory, so nothing that
/// looks like a finished model is ever left behind. A process killed outright
/// (SIGKILL, power loss) cannot clean up: the next writer to the same output
/// removes such hidden directories whose process no longer exists.
///
/// ```
/// use tensormerge_core::{DType, TensorInfo};
/// use tensormerge_io::{Model, ModelWriter, WriterOptions};
/// # let tmp = tempfile::tempdir().unwrap();
/// let out = tmp.path().join("out");
/// let tensors = vec![TensorInfo::new("w", vec![2], DType::F32)];
/// let mut w = ModelWriter::create(&out, tensors, WriterOptions::default()).unwrap();
/// w.write("w", &1.5f32.to_le_bytes()).unwrap(); // a tensor may come in pieces
/// w.write("w", &2.5f32.to_le_bytes()).unwrap();
/// w.finish().unwrap();
/// let m = Model::open_path(&out).unwrap();
/// assert_eq!(m.read_f32_vec("w").unwrap(), vec![1.5, 2.5]);
/// ```
#[derive(Debug)]
pub struct ModelWriter {
    out: PathBuf,
    tmp: PathBuf,
    opts: WriterOptions,
    tensors: Vec<TensorInfo>,
    sizes: Vec<u64>,
    shards: Vec<ShardPlan>,
    /// Each tensor's byte offset in its shard's data.
    offsets: Vec<u64>,
    /// Bytes of each tensor after `cur` written ahead of it
    /// ([`write_ahead`](ModelWriter::write_ahead)).
    ahead: Vec<u64>,
    /// Index of the tensor being written.
    cur: usize,
    /// Bytes of it written so far.
    written: u64,
    /// Shard currently open, if any, with the file offset of its data.
    open: Option<(usize, BufWriter<ShardFile>, u64)>,
    /// Shards fully written.
    closed: usize,
    /// End of the tensors (and of the shards) this writer writes: all of
    /// them, except for a part.
    first_tensor: usize,
    end_tensor: usize,
    end_shard: usize,
    /// Set for a writer of a part of the output (one worker's shards).
    part: Option<Part>,
    failed: bool,
    finished: bool,
}

impl ModelWriter {
    /// Starts writing a model to `out_dir` with `tensors` (final dtypes) in
    /// write order.
    ///
    /// Fails when the tensor list is invalid, when `out_dir` exists and
    /// `opts.overwrite` is false (or it is not a directory), or when it
    /// collides with one of `opts.protected`.
    pub fn create(
        out_dir: &Path,
        tensors: Vec<TensorInfo>,
        opts: WriterOptions,
    ) -> Result<ModelWriter, IoError> {
        Self::create_inner(out_dir, tensors, opts, None)
    }

    /// Starts writing one worker's part of the model `out_dir`: only the
    /// output shards `part.shards` (indices into the shard files the whole
    /// model has under `opts.max_shard_bytes`), byte for byte as
    /// [`create`](ModelWriter::create) would write them, into the piece
    /// directory [`pieces::worker_dir`] next to `out_dir`, never into
    /// `out_dir` itself. Only the tensors of those shards are written
    /// ([`write`](ModelWriter::write) refuses the others); support files, if
    /// any, are copied as usual. [`finish`](ModelWriter::finish) then writes
    /// the part's `manifest.json` (sizes and SHA-256 of every file) and
    /// renames the piece directory into place, replacing an earlier attempt
    /// of the same worker. [`join`](crate::join) assembles the parts.
    pub fn create_part(
        out_dir: &Path,
        tensors: Vec<TensorInfo>,
        opts: WriterOptions,
        part: PartSpec,
    ) -> Result<ModelWriter, IoError> {
        Self::create_inner(out_dir, tensors, opts, Some(part))
    }

    fn create_inner(
        out_dir: &Path,
        tensors: Vec<TensorInfo>,
        mut opts: WriterOptions,
        part: Option<PartSpec>,
    ) -> Result<ModelWriter, IoError> {
        let layout = Layout::new(tensors).map_err(|source| IoError::BadDeclaration {
            out: out_dir.to_path_buf(),
            source,
        })?;
        let tensors = layout.tensors().to_vec();
        let sizes: Vec<u64> = tensors
            .iter()
            .map(|t| t.checked_byte_len().unwrap_or(0) as u64)
            .collect();
        let shards = plan_shards(&sizes, opts.max_shard_bytes);
        let mut offsets = vec![0; sizes.len()];
        for sh in &shards {
            let mut at = 0;
            for (o, s) in offsets[sh.first..sh.end]
                .iter_mut()
                .zip(&sizes[sh.first..sh.end])
            {
                *o = at;
                at += s;
            }
        }
        let (out, selected) = match &part {
            None => (out_dir.to_path_buf(), 0..shards.len()),
            Some(p) => {
                let selected = p.check(out_dir, shards.len())?;
                if out_dir.symlink_metadata().is_ok() && !opts.overwrite {
                    // Found now, not by `join` after the whole merge.
                    return Err(IoError::OutputExists {
                        path: out_dir.to_path_buf(),
                    });
                }
                let pieces = pieces::pieces_dir(out_dir)?;
                std::fs::create_dir_all(&pieces).map_err(|e| IoError::io(&pieces, e))?;
                // A retried worker replaces its earlier attempt.
                opts.overwrite = true;
                (pieces::worker_dir(out_dir, p.worker, p.workers)?, selected)
            }
        };
        let tmp = make_temp(&out, opts.overwrite, &opts.protected)?;
        let tensor_range = match (shards.get(selected.start), selected.end.checked_sub(1)) {
            (Some(first), Some(last)) if selected.start < selected.end => {
                first.first..shards[last].end
            }
            _ => 0..0,
        };
        Ok(ModelWriter {
            out,
            tmp,
            opts,
            ahead: vec![0; tensors.len()],
            tensors,
            sizes,
            offsets,
            shards,
            cur: tensor_range.start,
            written: 0,
            open: None,
            closed: selected.start,
            end_tensor: tensor_range.end,
            first_tensor: tensor_range.start,
            end_shard: selected.end,
            part: part.map(|spec| Part {
                spec,
                pieces: Vec::new(),
            }),
            failed: false,
            finished: false,
        })
    }

    /// The tensors this writer writes, as indices into the declared list
    /// (in declared order): all of them, or those of a part's shards.
    pub fn tensor_range(&self) -> Range<usize> {
        self.first_tensor..self.end_tensor
    }

    /// The final output directory.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// The temporary directory being written.
    pub fn temp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Number of shard files this writer produces.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Appends `bytes` to tensor `name`. Tensors must come in the declared
    /// order; one tensor may be written in several consecutive pieces, and
    /// the writer moves to the next tensor when the previous one is complete
    /// (zero-sized tensors need no write).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), IoError> {
        self.check_usable()?;
        loop {
            let Some(t) = self.tensors[..self.end_tensor].get(self.cur) else {
                return Err(IoError::UndeclaredTensor {
                    out: self.out.clone(),
                    tensor: name.to_string(),
                    detail: if self.tensors.iter().any(|t| t.name == name) {
                        "written after every declared tensor was complete"
                    } else {
                        "was not declared"
                    },
                });
            };
            if t.name == name {
                break;
            }
            if self.written == self.sizes[self.cur] {
                if !self.tensors[self.cur + 1..self.end_tensor]
                    .iter()
                    .any(|t| t.name == name)
                {
                    return Err(IoError::UndeclaredTensor {
                        out: self.out.clone(),
                        tensor: name.to_string(),
                        detail: if self.tensors[..self.cur].iter().any(|t| t.name == name) {
                            "was already written completely"
                        } else {
                            "was not declared"
                        },
                    });
                }
                self.advance()?;
            } else {
                return Err(IoError::WriteOrder {
                    out: self.out.clone(),
                    expected: t.name.clone(),
                    got: name.to_string(),
                    detail: format!(
                        "incomplete ({} of {} bytes written)",
                        self.written, self.sizes[self.cur]
                    ),
                });
            }
        }
        let total = self.written + bytes.len() as u64;
        if total > self.sizes[self.cur] {
            return Err(IoError::TooManyBytes {
                out: self.out.clone(),
                tensor: name.to_string(),
                expected: self.sizes[self.cur],
                written: total,
            });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let shard = self.shard_of(self.cur);
        let result = self.ensure_open(shard).and_then(|()| {
            let (_, w, _) = self.open.as_mut().expect("shard open");
            w.write_all(bytes)
                .map_err(|e| IoError::io(self.tmp.join(&self.shards[shard].file_name), e))
        });
        if result.is_err() {
            self.failed = true;
        }
        result?;
        self.written = total;
        Ok(())
    }

    /// The output shard (index into the shard files) that holds tensor
    /// `tensor` (an index into the declared list).
    ///
    /// # Panics
    /// When `tensor` is not a declared tensor's index.
    pub fn shard_of_tensor(&self, tensor: usize) -> usize {
        self.shard_of(tensor)
    }

    /// Whether [`write_ahead`](Self::write_ahead) takes tensor `tensor` now:
    /// it is the tensor being written or comes after it in the same output
    /// shard, and this writer is not writing a part (whose files are hashed
    /// as they are written, in order). Call [`settle`](Self::settle) first
    /// for an answer about the tensors after the complete ones.
    pub fn can_write_ahead(&self, tensor: usize) -> bool {
        self.part.is_none()
            && !self.failed
            && !self.finished
            && tensor >= self.cur
            && tensor < self.end_tensor
            && self.shard_of(tensor) == self.shard_of(self.cur)
    }

    /// Moves past the complete tensors (those written in order, and those
    /// written ahead, in full): what [`write`](Self::write) does anyway
    /// when the next tensor comes, done now, so that
    /// [`can_write_ahead`](Self::can_write_ahead) speaks of the next
    /// incomplete tensor.
    pub fn settle(&mut self) -> Result<(), IoError> {
        self.check_usable()?;
        while self.cur < self.end_tensor && self.written == self.sizes[self.cur] {
            self.advance()?;
        }
        Ok(())
    }

    /// Appends `bytes` to tensor `tensor` before the tensors ahead of it are
    /// complete: straight to its place in the shard file (a positioned
    /// write), so a merge need not hold finished tensors in memory until
    /// their turn. The tensor's pieces still come in order; when
    /// [`write`](Self::write) reaches the tensor it continues after what was
    /// written ahead. The file's bytes are those of writing in order.
    ///
    /// ```
    /// use tensormerge_core::{DType, TensorInfo};
    /// use tensormerge_io::{Model, ModelWriter, WriterOptions};
    /// # let tmp = tempfile::tempdir().unwrap();
    /// let out = tmp.path().join("out");
    /// let tensors = vec![
    ///     TensorInfo::new("a", vec![1], DType::F32),
    ///     TensorInfo::new("b", vec![2], DType::F32),
    /// ];
    /// let mut w = ModelWriter::create(&out, tensors, WriterOptions::default()).unwrap();
    /// assert!(w.can_write_ahead(1));
    /// w.write_ahead(1, &2.0f32.to_le_bytes()).unwrap(); // half of `b`, before `a`
    /// w.write("a", &1.0f32.to_le_bytes()).unwrap();
    /// w.write("b", &3.0f32.to_le_bytes()).unwrap(); // the rest of `b`
    /// w.finish().unwrap();
    /// let m = Model::open_path(&out).unwrap();
    /// assert_eq!(m.read_f32_vec("b").unwrap(), vec![2.0, 3.0]);
    /// ```
    ///
    /// # Errors
    /// When [`can_write_ahead`](Self::can_write_ahead) is false, when the
    /// tensor would get more bytes than it holds, or on an I/O error.
    pub fn write_ahead(&mut self, tensor: usize, bytes: &[u8]) -> Result<(), IoError> {
        self.settle()?;
        let name = self
            .tensors
            .get(tensor)
            .map_or_else(String::new, |t| t.name.clone());
        if tensor == self.cur && self.can_write_ahead(tensor) {
            // Its turn has come: in order.
            return self.write(&name, bytes);
        }
        if !self.can_write_ahead(tensor) {
            return Err(IoError::WriteOrder {
                out: self.out.clone(),
                expected: self.tensors[self.cur.min(self.tensors.len() - 1)]
                    .name
                    .clone(),
                got: name,
                detail: "cannot be written ahead (not after it in the same shard file)".into(),
            });
        }
        let total = self.ahead[tensor] + bytes.len() as u64;
        if total > self.sizes[tensor] {
            return Err(IoError::TooManyBytes {
                out: self.out.clone(),
                tensor: name,
                expected: self.sizes[tensor],
                written: total,
            });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let shard = self.shard_of(tensor);
        let at = self.offsets[tensor] + self.ahead[tensor];
        let result = self.ensure_open(shard).and_then(|()| {
            use std::os::unix::fs::FileExt;
            let (_, w, data) = self.open.as_mut().expect("shard open");
            let at = *data + at;
            let file = w.get_mut();
            file.file
                .write_all_at(bytes, at)
                .map_err(|e| IoError::io(self.tmp.join(&self.shards[shard].file_name), e))?;
            file.written(bytes.len());
            Ok(())
        });
        if result.is_err() {
            self.failed = true;
        }
        result?;
        self.ahead[tensor] = total;
        Ok(())
    }

    /// Copies the non-weight files of a template model (config, tokenizer,
    /// generation config; see [`SUPPORT_FILES`]) that exist in `template_dir`.
    /// `config.json`'s `torch_dtype` (and `dtype`, its newer name, when
    /// present) is set to `torch_dtype` when given. Returns the names copied.
    pub fn copy_support_files(
        &mut self,
        template_dir: &Path,
        torch_dtype: Option<DType>,
    ) -> Result<Vec<String>, IoError> {
        self.check_usable()?;
        let mut copied = Vec::new();
        for name in SUPPORT_FILES {
            let src = template_dir.join(name);
            if !src.is_file() {
                continue;
            }
            let dst = self.tmp.join(name);
            if let (true, Some(dtype)) = (*name == "config.json", torch_dtype) {
                let text = std::fs::read(&src).map_err(|e| IoError::io(&src, e))?;
                let mut value: serde_json::Value =
                    serde_json::from_slice(&text).map_err(|e| IoError::SupportFileJson {
                        path: src.clone(),
                        message: e.to_string(),
                    })?;
                let obj = value
                    .as_object_mut()
                    .ok_or_else(|| IoError::SupportFileJson {
                        path: src.clone(),
                        message: "not a JSON object".into(),
                    })?;
                let dtype = dtype.torch_name();
                obj.insert("torch_dtype".into(), dtype.into());
                if obj.contains_key("dtype") {
                    obj.insert("dtype".into(), dtype.into());
                }
                let mut out = serde_json::to_string_pretty(&value).expect("JSON value serializes");
                out.push('\n');
                std::fs::write(&dst, out).map_err(|e| IoError::io(&dst, e))?;
            } else {
                std::fs::copy(&src, &dst).map_err(|e| IoError::io(&src, e))?;
            }
            copied.push(name.to_string());
        }
        Ok(copied)
    }

    /// Completes the model: checks every tensor was fully written, writes the
    /// index when there are several shards, syncs, and renames the temporary
    /// directory into place (replacing an existing output when `overwrite`
    /// was set). Returns the output directory.
    pub fn finish(mut self) -> Result<PathBuf, IoError> {
        self.check_usable()?;
        let r = self.finish_inner();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn finish_inner(&mut self) -> Result<PathBuf, IoError> {
        while self.cur < self.end_tensor {
            if self.written != self.sizes[self.cur] {
                return Err(IoError::Incomplete {
                    out: self.out.clone(),
                    tensor: self.tensors[self.cur].name.clone(),
                    expected: self.sizes[self.cur],
                    written: self.written,
                });
            }
            self.advance()?;
        }
        // Shards holding only zero-sized tensors (or an empty model) have not
        // been opened yet.
        while self.closed < self.end_shard {
            self.ensure_open(self.closed)?;
            self.close_open()?;
        }
        if let Some(part) = &self.part {
            self.write_manifest(part)?;
        } else if self.shards.len() > 1 {
            let entries = self.shards.iter().map(|s| {
                (
                    s.file_name.as_str(),
                    self.tensors[s.first..s.end].iter().map(|t| t.name.as_str()),
                )
            });
            let total: u64 = self.sizes.iter().sum();
            write_index(&self.tmp, entries, total)?;
        }
        commit(&self.tmp, &self.out, self.opts.overwrite)?;
        self.finished = true;
        Ok(self.out.clone())
    }

    /// Writes a part's `manifest.json`: the plan, the worker, every shard of
    /// the whole model, and the size and SHA-256 of each file of the part.
    fn write_manifest(&self, part: &Part) -> Result<(), IoError> {
        let mut support = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for e in std::fs::read_dir(&self.tmp).map_err(|e| IoError::io(&self.tmp, e))? {
            let e = e.map_err(|e| IoError::io(&self.tmp, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !part.pieces.iter().any(|p| p.file == name) {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            support.push(pieces::describe_file(&self.tmp.join(&name), name)?);
        }
        let manifest = PieceManifest {
            format: pieces::FORMAT.to_string(),
            plan: part.spec.plan.clone(),
            worker: part.spec.worker,
            workers: part.spec.workers,
            shard_files: self.shards.iter().map(|s| s.file_name.clone()).collect(),
            total_size: self.sizes.iter().sum(),
            pieces: part.pieces.clone(),
            support,
        };
        manifest.write(&self.tmp)
    }
}

/// Writes `model.safetensors.index.json` into `dir`: every tensor of every
/// shard file (in order) and the total tensor bytes.
pub(crate) fn write_index<'a, T>(
    dir: &Path,
    shards: impl Iterator<Item = (&'a str, T)>,
    total: u64,
) -> Result<(), IoError>
where
    T: Iterator<Item = &'a str>,
{
    let mut weight_map = serde_json::Map::new();
    for (file, tensors) in shards {
        for t in tensors {
            weight_map.insert(t.to_string(), file.into());
        }
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let path = dir.join(INDEX_FILE);
    let mut text = serde_json::to_string_pretty(&index).expect("JSON value serializes");
    text.push('\n');
    std::fs::write(&path, text).map_err(|e| IoError::io(&path, e))
}

/// Creates the temporary sibling directory of `out` (after the checks of
/// [`ModelWriter::create`]), removing leftovers of dead writers to `out`.
pub(crate) fn make_temp(
    out: &Path,
    overwrite: bool,
    protected: &[PathBuf],
) -> Result<PathBuf, IoError> {
    let name = out
        .file_name()
        .ok_or_else(|| IoError::io(out, std::io::Error::other("output path has no name")))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    check_protected(out, &parent, &name, protected)?;
    match std::fs::symlink_metadata(out) {
        Ok(m) if !m.is_dir() => {
            return Err(IoError::OutputNotDirectory {
                path: out.to_path_buf(),
            });
        }
        Ok(_) if !overwrite => {
            return Err(IoError::OutputExists {
                path: out.to_path_buf(),
            });
        }
        _ => {}
    }
    std::fs::create_dir_all(&parent).map_err(|e| IoError::io(&parent, e))?;
    remove_stale_temps(&parent, &name);
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = parent.join(format!(
        ".{name}.tensormerge-tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    if tmp.symlink_metadata().is_ok() {
        // A leftover of a crashed run of a process with our id: ours by name.
        remove_path(&tmp).map_err(|e| IoError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| IoError::io(&tmp, e))?;
    Ok(tmp)
}

/// Syncs the complete temporary directory `tmp` and renames it to `out`,
/// replacing an existing `out` (when `overwrite`) so that at every moment
/// either the old or the new directory is in place.
pub(crate) fn commit(tmp: &Path, out: &Path, overwrite: bool) -> Result<(), IoError> {
    if let Ok(d) = File::open(tmp) {
        let _ = d.sync_all();
    }
    if out.symlink_metadata().is_ok() {
        // overwrite was checked at create; move the old output aside first
        // so that a failure leaves either the old or the new model.
        let name = out.file_name().expect("checked").to_string_lossy();
        let tmp_name = tmp.file_name().expect("named").to_string_lossy();
        let suffix = tmp_name.rsplit_once("-tmp-").map_or("0", |(_, id)| id);
        let old = tmp.with_file_name(format!(".{name}.tensormerge-old-{suffix}"));
        if !overwrite {
            return Err(IoError::OutputExists {
                path: out.to_path_buf(),
            });
        }
        if exchange(tmp, out).is_ok() {
            // One atomic step: the new model is at `out`, the old one at
            // the temporary name. A kill at any moment leaves one of them
            // in place under the output's name.
            let _ = remove_path(tmp);
        } else {
            // No atomic exchange here (not Linux, or a file system
            // without it): two renames, the old output hidden in between.
            std::fs::rename(out, &old).map_err(|e| IoError::io(out, e))?;
            if let Err(e) = std::fs::rename(tmp, out) {
                let _ = std::fs::rename(&old, out);
                return Err(IoError::io(out, e));
            }
            // The new model is in place; failing to delete the old one
            // (hidden name) must not turn a finished write into an error.
            let _ = remove_path(&old);
        }
    } else {
        std::fs::rename(tmp, out).map_err(|e| IoError::io(out, e))?;
    }
    // Make the rename itself durable.
    if let Some(parent) = tmp.parent()
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

impl ModelWriter {
    fn check_usable(&self) -> Result<(), IoError> {
        if self.failed || self.finished {
            return Err(IoError::WriterFailed {
                out: self.out.clone(),
            });
        }
        Ok(())
    }

    fn shard_of(&self, tensor: usize) -> usize {
        self.shards
            .iter()
            .position(|s| (s.first..s.end).contains(&tensor))
            .expect("every tensor is in a shard")
    }

    /// Moves past the complete tensor `cur`, closing its shard when it was the last.
    fn advance(&mut self) -> Result<(), IoError> {
        let shard = self.shard_of(self.cur);
        self.cur += 1;
        self.written = 0;
        let r = if self.cur == self.shards[shard].end {
            self.ensure_open(shard).and_then(|()| self.close_open())
        } else if self.ahead[self.cur] > 0 {
            // Written ahead: go on after it.
            self.written = std::mem::take(&mut self.ahead[self.cur]);
            let (_, w, _) = self.open.as_mut().expect("written ahead, so open");
            w.seek(SeekFrom::Current(self.written as i64))
                .map(|_| ())
                .map_err(|e| IoError::io(self.tmp.join(&self.shards[shard].file_name), e))
        } else {
            Ok(())
        };
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// Opens shard `s` (writing its header) unless it is already open.
    fn ensure_open(&mut self, s: usize) -> Result<(), IoError> {
        if matches!(self.open, Some((o, _, _)) if o == s) {
            return Ok(());
        }
        debug_assert!(self.open.is_none() && s == self.closed);
        let plan = &self.shards[s];
        let path = self.tmp.join(&plan.file_name);
        let header = shard_header(
            &self.tensors[plan.first..plan.end],
            &self.sizes[plan.first..plan.end],
            &self.opts.metadata,
        );
        let file = File::create(&path).map_err(|e| IoError::io(&path, e))?;
        let file = ShardFile::new(file, self.part.is_some()).map_err(|e| IoError::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| w.write_all(&header))
            .map_err(|e| IoError::io(&path, e))?;
        self.open = Some((s, w, 8 + header.len() as u64));
        Ok(())
    }

    fn close_open(&mut self) -> Result<(), IoError> {
        if let Some((s, w, _)) = self.open.take() {
            let path = self.tmp.join(&self.shards[s].file_name);
            let ShardFile {
                file,
                hasher,
                writeback,
                ..
            } = w
                .into_inner()
                .map_err(|e| IoError::io(&path, e.into_error()))?;
            writeback.finish().map_err(|e| IoError::io(&path, e))?;
            file.sync_all().map_err(|e| IoError::io(&path, e))?;
            if let (Some(part), Some(h)) = (&mut self.part, hasher) {
                let plan = &self.shards[s];
                part.pieces.push(PieceFile {
                    file: plan.file_name.clone(),
                    bytes: file.metadata().map_err(|e| IoError::io(&path, e))?.len(),
                    sha256: pieces::hex(&h.finalize()),
                    tensors: self.tensors[plan.first..plan.end]
                        .iter()
                        .map(|t| t.name.clone())
                        .collect(),
                });
            }
            self.closed = s + 1;
        }
        Ok(())
    }
}

impl Drop for ModelWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.open = None;
            let _ = remove_path(&self.tmp);
        }
    }
}

fn remove_path(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Greedy packing in declared order.
fn plan_shards(sizes: &[u64], max: u64) -> Vec<ShardPlan> {
    let mut bounds = Vec::new();
    let mut first = 0;
    let mut acc = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if i > first && acc.saturating_add(s) > max {
            bounds.push((first, i));
            first = i;
            acc = 0;
        }
        acc = acc.saturating_add(s);
    }
    bounds.push((first, sizes.len()));
    let n = bounds.len();
    bounds
        .into_iter()
        .enumerate()
        .map(|(k, (first, end))| ShardPlan {
            file_name: if n == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            },
            first,
            end,
        })
        .collect()
}

/// Writes one safetensors file at `path`, atomically: into a temporary
/// sibling (`.NAME.tmp-PID`, removed on failure) that is renamed over `path`
/// when complete, so an interrupted write never leaves a partial file.
/// `tensors` in the given order, each with its little-endian bytes, and `metadata` as
/// `__metadata__` (`format` defaults to `pt`). The bytes depend only on the
/// arguments: the header lists `__metadata__` in key order and the tensors in
/// the given order, which the `safetensors` crate's own serializer (a
/// `HashMap` for the metadata) does not guarantee.
///
/// ```
/// # use std::collections::BTreeMap;
/// # use tensormerge_core::{DType, TensorInfo};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("f.safetensors");
/// let t = TensorInfo::new("w", vec![2], DType::F32);
/// let bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
/// let meta = BTreeMap::from([("samples".to_string(), "3".to_string())]);
/// tensormerge_io::write_safetensors(&path, &[(t, &bytes[..])], &meta).unwrap();
/// let m = tensormerge_io::Model::open_path(&path).unwrap();
/// assert_eq!(m.read_f32_vec("w").unwrap(), vec![1.0, 2.0]);
/// assert_eq!(m.metadata()["samples"], "3");
/// ```
pub fn write_safetensors(
    path: &Path,
    tensors: &[(TensorInfo, &[u8])],
    metadata: &BTreeMap<String, String>,
) -> Result<(), IoError> {
    let io = |source| IoError::Io {
        path: path.to_path_buf(),
        source,
    };
    for (t, b) in tensors {
        if t.checked_byte_len() != Some(b.len()) {
            return Err(io(std::io::Error::other(format!(
                "tensor `{}`: {} bytes given, its shape and dtype need {}",
                t.name,
                b.len(),
                t.checked_byte_len()
                    .map_or("more than usize".into(), |n| n.to_string())
            ))));
        }
    }
    let infos: Vec<TensorInfo> = tensors.iter().map(|(t, _)| t.clone()).collect();
    let sizes: Vec<u64> = tensors.iter().map(|(_, b)| b.len() as u64).collect();
    let header = shard_header(&infos, &sizes, metadata);
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let tmp_io = |source| IoError::Io {
        path: tmp.clone(),
        source,
    };
    let write = || -> Result<(), IoError> {
        let mut f = BufWriter::new(File::create(&tmp).map_err(tmp_io)?);
        f.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(tmp_io)?;
        f.write_all(&header).map_err(tmp_io)?;
        for (_, b) in tensors {
            f.write_all(b).map_err(tmp_io)?;
        }
        f.into_inner()
            .map_err(|e| tmp_io(e.into_error()))?
            .sync_all()
            .map_err(tmp_io)?;
        std::fs::rename(&tmp, path).map_err(io)
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The JSON header of one shard, padded with spaces to a multiple of 8 bytes
/// (as the safetensors crate does) so that the data section is aligned.
fn shard_header(
    tensors: &[TensorInfo],
    sizes: &[u64],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut meta = metadata.clone();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let mut s = String::from("{\"__metadata__\":");
    s.push_str(&serde_json::to_string(&meta).expect("string map serializes"));
    let mut offset = 0u64;
    for (t, &size) in tensors.iter().zip(sizes) {
        s.push(',');
        s.push_str(&serde_json::to_string(&t.name).expect("string serializes"));
        s.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{},{}]}}",
            t.dtype.as_str(),
            t.shape,
            offset,
            offset + size
        ));
        offset += size;
    }
    s.push('}');
    while (8 + s.len()) % 8 != 0 {
        s.push(' ');
    }
    s.into_bytes()
}

/// Refuses an output that is, lies inside, or contains a protected input.
fn check_protected(
    out: &Path,
    parent: &Path,
    name: &str,
    protected: &[PathBuf],
) -> Result<(), IoError> {
    if protected.is_empty() {
        return Ok(());
    }
    let out_abs = resolve_nonexistent(&parent.join(name));
    for p in protected {
        let p_abs = p.canonicalize().unwrap_or_else(|_| resolve_nonexistent(p));
        if out_abs.starts_with(&p_abs) || p_abs.starts_with(&out_abs) {
            return Err(IoError::OutputIsInput {
                out: out.to_path_buf(),
                input: p.clone(),
            });
        }
    }
    Ok(())
}

/// Canonicalizes the longest existing prefix of `p` and applies the rest of
/// its components lexically (they do not exist yet, so `..` after them can
/// only undo them).
fn resolve_nonexistent(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let comps: Vec<Component<'_>> = abs.components().collect();
    for k in (1..=comps.len()).rev() {
        let prefix: PathBuf = comps[..k].iter().collect();
        if let Ok(mut c) = prefix.canonicalize() {
            for comp in &comps[k..] {
                match comp {
                    Component::ParentDir => {
                        c.pop();
                    }
                    Component::Normal(n) => c.push(n),
                    _ => {}
                }
            }
            return c;
        }
    }
    abs
}

/// Removes the hidden temporary directories of earlier writers to
/// `parent/name` whose process is gone (killed before it could clean up):
/// `.<name>.tensormerge-tmp-<pid>-<n>` and `.<name>.tensormerge-old-<pid>-<n>`
/// with no `/proc/<pid>`. Best effort: where `/proc` is missing nothing is
/// removed, and failures are ignored.
fn remove_stale_temps(parent: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let ours = std::process::id();
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(file) = file.to_str() else {
            continue;
        };
        let Some(rest) = [".tensormerge-tmp-", ".tensormerge-old-"]
            .iter()
            .find_map(|kind| file.strip_prefix(&format!(".{name}{kind}")))
        else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), true) = (pid.parse::<u32>(), n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        if pid != ours && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = remove_path(&e.path());
        }
    }
}

/// Atomically exchanges two paths (`renameat2` with `RENAME_EXCHANGE`, Linux
/// 3.15+ on most local file systems); an error where that is not available.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the
    // call; AT_FDCWD resolves relative paths as `rename` does.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// No atomic exchange off Linux.
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(all(test, target_os = "linux"))]
mod exchange_tests {
    use super::{ModelWriter, WriterOptions, exchange};
    use tensormerge_core::{DType, TensorInfo};

    #[test]
    fn leftovers_of_dead_writers_to_the_same_output_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        // pid_max is at most 2^22: 999999999 is never a live process; 1 always is.
        let dead = [
            ".out.tensormerge-tmp-999999999-0",
            ".out.tensormerge-old-999999999-3",
        ];
        let kept = [
            ".out.tensormerge-tmp-1-0".to_string(),
            format!(".out.tensormerge-tmp-{me}-12345"),
            ".other.tensormerge-tmp-999999999-0".to_string(),
            ".out.tensormerge-tmp-999999999-x".to_string(),
            "out.tensormerge-tmp-999999999-0".to_string(),
        ];
        for d in dead
            .iter()
            .map(|s| s.to_string())
            .chain(kept.iter().cloned())
        {
            std::fs::create_dir(tmp.path().join(&d)).unwrap();
            std::fs::write(tmp.path().join(&d).join("model.safetensors"), "x").unwrap();
        }
        let w = ModelWriter::create(
            &tmp.path().join("out"),
            vec![TensorInfo::new("w", vec![1], DType::F32)],
            WriterOptions::default(),
        )
        .unwrap();
        for d in dead {
            assert!(!tmp.path().join(d).exists(), "{d} should be gone");
        }
        for d in &kept {
            assert!(tmp.path().join(d).exists(), "{d} should be kept");
        }
        drop(w);
    }

    #[test]
    fn exchange_swaps_two_directories_in_one_step() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("new"), "1").unwrap();
        std::fs::write(b.join("old"), "2").unwrap();
        exchange(&a, &b).unwrap();
        assert!(b.join("new").exists() && !b.join("old").exists());
        assert!(a.join("old").exists() && !a.join("new").exists());
        // A missing side is an error, and nothing moves.
        let missing = tmp.path().join("missing");
        assert!(exchange(&a, &missing).is_err());
        assert!(a.join("old").exists());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed background sync is reported by `finish`, not lost: on Linux
    /// `fdatasync` on `/dev/null` fails with EINVAL.
    #[cfg(target_os = "linux")]
    #[test]
    fn writeback_reports_a_failed_sync() {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        // Less than WRITEBACK_EVERY: no sync ran, nothing to report.
        let mut wb = Writeback::new(&null).unwrap();
        wb.written(WRITEBACK_EVERY - 1);
        wb.finish().unwrap();
        let mut wb = Writeback::new(&null).unwrap();
        wb.written(WRITEBACK_EVERY - 1);
        wb.written(1); // the threshold: a sync
        wb.written(2 * WRITEBACK_EVERY);
        wb.written(WRITEBACK_EVERY);
        let e = wb.finish().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    }

    /// Requests made faster than the syncs run are merged, and every byte
    /// written before `finish` is in the file.
    #[test]
    fn writeback_requests_leave_the_bytes_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let mut f = File::create(&path).unwrap();
        let mut wb = Writeback::new(&f).unwrap();
        let mut expect = Vec::new();
        for i in 0..200u32 {
            let block = vec![(i % 251) as u8; 4096 + i as usize];
            f.write_all(&block).unwrap();
            expect.extend_from_slice(&block);
            // Counted as a whole 8 MiB each: a sync asked for every time.
            wb.written(WRITEBACK_EVERY);
        }
        wb.finish().unwrap();
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expect);
    }
}
