//! The error type of tensormerge-io.

use std::path::PathBuf;

use tensormerge_core::{CoreError, DType};

/// Everything that can go wrong reading, writing or fetching a model.
///
/// Every variant names the file (and, where there is one, the tensor) it is
/// about, so that a message alone tells the user what to look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// An operating-system error on a file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The reference is neither an existing path nor (with the `hub` feature) a hub id.
    #[error("{reference}: no such file or directory{hint}")]
    NotFound {
        /// What the user gave.
        reference: String,
        /// Extra explanation (may be empty).
        hint: String,
    },
    /// A directory that holds no safetensors weights.
    #[error(
        "{}: no model.safetensors, model.safetensors.index.json or single .safetensors file in this directory",
        path.display()
    )]
    NoWeights {
        /// The directory.
        path: PathBuf,
    },
    /// A directory holding more than one `.safetensors` file but neither
    /// `model.safetensors` nor an index.
    #[error(
        "{}: several .safetensors files ({files}) but no model.safetensors.index.json saying how they form one model",
        path.display()
    )]
    AmbiguousWeights {
        /// The directory.
        path: PathBuf,
        /// The files found, comma-separated.
        files: String,
    },
    /// A pickle checkpoint (`pytorch_model.bin`, `.pt`), which is never unpickled.
    #[error(
        "{}: pickle checkpoints (.bin/.pt) are not loaded, since unpickling can run arbitrary code. \
         Convert the model to safetensors first, e.g. \
         python -c \"from transformers import AutoModel; m = AutoModel.from_pretrained('{dir}'); m.save_pretrained('{dir}', safe_serialization=True)\"",
        path.display(),
        dir = dir.display()
    )]
    Pickle {
        /// The pickle file.
        path: PathBuf,
        /// The model directory (for the conversion command).
        dir: PathBuf,
    },
    /// A path that is neither a directory nor a regular file (a pipe, socket or
    /// device), refused before it is opened (opening a pipe would block).
    #[error("{}: not a regular file (a pipe, socket or device); refusing to read it", path.display())]
    NotRegularFile {
        /// The path.
        path: PathBuf,
    },
    /// A file given directly that is not a `.safetensors` file or an index.
    #[error("{}: not a .safetensors file or a model.safetensors.index.json", path.display())]
    UnsupportedFile {
        /// The file.
        path: PathBuf,
    },
    /// The file is too short to hold the 8-byte header length.
    #[error("{}: truncated file: {len} bytes, too short for the 8-byte safetensors header length", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The header length prefix points past the end of the file.
    #[error(
        "{}: header length {header_len} is larger than the {available} bytes after the length prefix (truncated or not a safetensors file)",
        path.display()
    )]
    HeaderLengthExceedsFile {
        /// The file.
        path: PathBuf,
        /// The declared header length.
        header_len: u64,
        /// Bytes available after the 8-byte prefix.
        available: u64,
    },
    /// The header length is above the limit (100 MB, as in the safetensors crate).
    #[error("{}: header length {header_len} exceeds the limit of {limit} bytes", path.display())]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// The declared header length.
        header_len: u64,
        /// The limit.
        limit: u64,
    },
    /// The header is not a JSON object of the expected form.
    #[error("{}: header is not valid safetensors JSON: {message}", path.display())]
    HeaderJson {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// One tensor entry of the header is malformed (missing field, wrong type).
    #[error("{}: tensor `{tensor}`: invalid header entry: {message}", path.display())]
    HeaderEntry {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A `__metadata__` value that is not a string (safetensors allows strings only).
    #[error("{}: __metadata__ value of `{key}` is not a string", path.display())]
    MetadataNotString {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
    },
    /// A dtype string this crate does not know.
    #[error(
        "{}: tensor `{tensor}` has unknown dtype `{dtype}` (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL)",
        path.display()
    )]
    UnknownDType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype as written.
        dtype: String,
    },
    /// A shape whose element or byte count overflows.
    #[error("{}: tensor `{tensor}`: shape {shape:?} is too large (element count overflows)", path.display())]
    ShapeOverflow {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape as written.
        shape: Vec<u64>,
    },
    /// `data_offsets` with the end before the beginning.
    #[error("{}: tensor `{tensor}`: data_offsets [{begin}, {end}] end before they begin", path.display())]
    InvalidOffsets {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// First byte.
        begin: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A tensor's byte range does not match its shape and dtype.
    #[error(
        "{}: tensor `{tensor}`: data_offsets span {actual} bytes but shape × dtype size is {expected} bytes",
        path.display()
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// shape × dtype size.
        expected: u64,
        /// end - begin.
        actual: u64,
    },
    /// A tensor's bytes lie past the end of the file.
    #[error(
        "{}: tensor `{tensor}` ends at byte {end} of the data section, but the file holds only {data_len} data bytes (truncated file or bad offsets)",
        path.display()
    )]
    OutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// End offset in the data section.
        end: u64,
        /// Size of the data section.
        data_len: u64,
    },
    /// Two tensors share bytes.
    #[error("{}: tensors `{tensor}` and `{other}` overlap", path.display())]
    Overlap {
        /// The file.
        path: PathBuf,
        /// The later tensor (by offset).
        tensor: String,
        /// The earlier tensor it overlaps.
        other: String,
    },
    /// Bytes between two tensors (or before the first) that no tensor covers.
    #[error(
        "{}: tensor `{tensor}` starts at data byte {begin}, leaving a gap after byte {expected} (tensors must be contiguous)",
        path.display()
    )]
    Gap {
        /// The file.
        path: PathBuf,
        /// The tensor after the gap.
        tensor: String,
        /// Where it should start.
        expected: u64,
        /// Where it starts.
        begin: u64,
    },
    /// Data bytes after the last tensor.
    #[error("{}: {extra} bytes after the last tensor are not covered by the header", path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// How many.
        extra: u64,
    },
    /// The same tensor name twice in one header or index.
    #[error("{}: tensor `{tensor}` appears more than once", path.display())]
    DuplicateEntry {
        /// The header's or index's file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// The index file is not valid JSON of the expected form.
    #[error("{}: invalid index: {message}", path.display())]
    IndexJson {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A shard name in the index that could escape the model directory.
    #[error("{}: refusing shard name `{file}`: {reason}", index.display())]
    UnsafeShardName {
        /// The index file.
        index: PathBuf,
        /// The name as written.
        file: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A shard named by the index that does not exist.
    #[error("{}: shard `{file}` named in the index does not exist", index.display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard name.
        file: String,
    },
    /// A shard that is not a regular file (directory, device, dangling link).
    #[error("{}: shard `{file}` is not a regular file", index.display())]
    ShardNotFile {
        /// The index file.
        index: PathBuf,
        /// The shard name.
        file: String,
    },
    /// A tensor stored in two shards.
    #[error("tensor `{tensor}` is stored in two shards: {} and {}", first.display(), second.display())]
    TensorInTwoShards {
        /// The tensor.
        tensor: String,
        /// One shard.
        first: PathBuf,
        /// The other shard.
        second: PathBuf,
    },
    /// A tensor the index places in a shard that does not contain it.
    #[error("{}: the index places tensor `{tensor}` in `{file}`, which does not contain it", index.display())]
    IndexedTensorMissing {
        /// The index file.
        index: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shard the index names.
        file: String,
    },
    /// A tensor in a shard that the index does not list (or lists in another shard).
    #[error("{}: tensor `{tensor}` is not listed in the index for this shard", shard.display())]
    UnindexedTensor {
        /// The shard.
        shard: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor name the model does not have.
    #[error("{model}: no tensor named `{tensor}`")]
    UnknownTensor {
        /// The model.
        model: String,
        /// The name asked for.
        tensor: String,
    },
    /// Float values were asked of a non-float tensor.
    #[error("{model}: tensor `{tensor}` has dtype {dtype}, which is not floating point")]
    NotFloat {
        /// The model.
        model: String,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
    },
    /// An element range outside a tensor, or an output buffer of the wrong size.
    #[error("{model}: tensor `{tensor}`: {detail}")]
    BadRange {
        /// The model.
        model: String,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// The output directory exists and overwriting was not asked for.
    #[error("{}: output already exists (pass overwrite to replace it)", path.display())]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// The output path exists but is not a directory.
    #[error("{}: output exists and is not a directory; refusing to replace it", path.display())]
    OutputNotDirectory {
        /// The output path.
        path: PathBuf,
    },
    /// The output directory is, contains, or lies inside an input.
    #[error("{}: refusing to write here: it is, contains, or lies inside the input {}", out.display(), input.display())]
    OutputIsInput {
        /// The output path.
        out: PathBuf,
        /// The input it collides with.
        input: PathBuf,
    },
    /// The tensors declared to a writer are invalid (duplicate name, overflow).
    #[error("{}: invalid tensor list: {source}", out.display())]
    BadDeclaration {
        /// The output path.
        out: PathBuf,
        /// The problem.
        #[source]
        source: CoreError,
    },
    /// `write` called with a tensor out of the declared order.
    #[error("{}: tensor `{got}` written while `{expected}` is {detail}", out.display())]
    WriteOrder {
        /// The output path.
        out: PathBuf,
        /// The tensor the writer expects.
        expected: String,
        /// The tensor given.
        got: String,
        /// State of the expected tensor.
        detail: String,
    },
    /// `write` called with a tensor that was never declared (or after all were written).
    #[error("{}: tensor `{tensor}` {detail}", out.display())]
    UndeclaredTensor {
        /// The output path.
        out: PathBuf,
        /// The tensor given.
        tensor: String,
        /// Explanation.
        detail: &'static str,
    },
    /// More bytes written for a tensor than its shape × dtype size.
    #[error("{}: tensor `{tensor}`: {written} bytes written, but it holds only {expected}", out.display())]
    TooManyBytes {
        /// The output path.
        out: PathBuf,
        /// The tensor.
        tensor: String,
        /// Bytes the tensor holds.
        expected: u64,
        /// Bytes given so far, including this write.
        written: u64,
    },
    /// `finish` (or a move to the next tensor) found a tensor not fully written.
    #[error("{}: tensor `{tensor}` is incomplete: {written} of {expected} bytes written", out.display())]
    Incomplete {
        /// The output path.
        out: PathBuf,
        /// The tensor.
        tensor: String,
        /// Bytes the tensor holds.
        expected: u64,
        /// Bytes written.
        written: u64,
    },
    /// A sharded merge's pieces (`OUT.pieces`) that do not form one
    /// complete model: missing, doubled, corrupt, or of different plans.
    #[error("{}: {message}", path.display())]
    Pieces {
        /// The piece, manifest or directory at fault.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// The writer failed earlier and can no longer be used.
    #[error("{}: the writer failed earlier and cannot continue", out.display())]
    WriterFailed {
        /// The output path.
        out: PathBuf,
    },
    /// A support file (config.json) that is not valid JSON.
    #[error("{}: invalid JSON: {message}", path.display())]
    SupportFileJson {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A hub id that does not have the form `org/name[@revision]`.
    #[error("`{id}` is not a valid hub id (expected org/name or org/name@revision): {reason}")]
    InvalidHubId {
        /// The id as given.
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A hub id was given but this build has no hub support.
    #[error(
        "`{id}` looks like a hub id, but this build of tensormerge-io has no hub support (cargo feature `hub`), and no such path exists"
    )]
    HubDisabled {
        /// The id.
        id: String,
    },
    /// `HF_HUB_OFFLINE=1` and a file is not in the cache.
    #[error(
        "{repo}@{revision}: `{file}` is not in the hub cache {} and HF_HUB_OFFLINE is set",
        cache.display()
    )]
    OfflineMissing {
        /// The repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The missing file.
        file: String,
        /// The cache directory looked in.
        cache: PathBuf,
    },
    /// A file in the hub cache that is malformed (e.g. a ref that is not a commit).
    #[error("{}: invalid hub cache entry: {message}", path.display())]
    HubCache {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A download from the hub failed.
    #[error("{repo}@{revision}: downloading `{file}` failed: {message}")]
    Download {
        /// The repository id.
        repo: String,
        /// The revision.
        revision: String,
        /// The file.
        file: String,
        /// The client's message.
        message: String,
    },
    /// A LoRA adapter directory lacks a file it needs.
    #[error("{}: LoRA adapter directory has no `{file}`{hint}", dir.display())]
    AdapterFileMissing {
        /// The adapter directory.
        dir: PathBuf,
        /// The missing file (`adapter_config.json`, `adapter_model.safetensors`).
        file: String,
        /// What to do (may be empty).
        hint: String,
    },
    /// A LoRA adapter's `adapter_config.json` is malformed or asks for
    /// something not supported.
    #[error("{}: {message}", path.display())]
    AdapterConfig {
        /// The `adapter_config.json`.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A LoRA adapter's weights do not fit together or do not fit the base
    /// model (a module the base lacks, shapes that disagree).
    #[error("{adapter}: tensor `{tensor}`: {detail}")]
    AdapterMismatch {
        /// The adapter directory.
        adapter: String,
        /// The adapter tensor.
        tensor: String,
        /// What is wrong, with the base model's name and shapes.
        detail: String,
    },
    /// An error from tensormerge-core (layout mismatch, conversion), with context.
    #[error("{context}: {source}")]
    Core {
        /// Which model or file.
        context: String,
        /// The core error.
        #[source]
        source: CoreError,
    },
}

impl IoError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError::Io {
            path: path.into(),
            source,
        }
    }
}
