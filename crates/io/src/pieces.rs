//! Sharded merges: the pieces that workers write, and [`join`].
//!
//! A merge split over `N` workers writes, for worker `I` (0-based), the
//! output shard files [`assigned_shards`]`(I, N, S)` of the `S` the whole
//! model has, byte for byte as the single-machine writer would, into
//! `OUT.pieces/worker-0000I-of-0000N/` (never into `OUT`, so that no piece
//! can be mistaken for a finished model), with a `manifest.json`
//! ([`PieceManifest`]): the plan's fingerprint, the worker, the names of all
//! `S` shard files, and the size, SHA-256 and tensors of every file it wrote.
//! Worker 0 also writes the support files (config, tokenizer). Each worker
//! directory is renamed into place only when complete; a retried worker
//! replaces its earlier attempt.
//!
//! [`join`] checks the set (one plan, one worker count, every shard exactly
//! once, every size and checksum), links the pieces into a temporary sibling
//! of `OUT` (copying where hard links are not possible), writes
//! `model.safetensors.index.json` exactly as the writer does, renames the
//! result into place and removes `OUT.pieces`. A bad set is an
//! [`IoError::Pieces`] naming the file and what to do; nothing is written.

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::IoError;
use crate::writer::{commit, make_temp, write_index};

/// The `format` of every manifest this version writes and reads.
pub const FORMAT: &str = "tensormerge-pieces/1";

/// The manifest's file name inside a worker directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One worker's share of a sharded merge, as
/// [`ModelWriter::create_part`](crate::ModelWriter::create_part) takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    /// The plan's fingerprint (hex), the same on every worker: [`join`]
    /// refuses pieces of different plans.
    pub plan: String,
    /// This worker, `0..workers`.
    pub worker: usize,
    /// Number of workers.
    pub workers: usize,
}

impl PartSpec {
    /// Checks the worker numbers and returns the shards this worker writes
    /// out of `shards`.
    pub(crate) fn check(&self, out: &Path, shards: usize) -> Result<Range<usize>, IoError> {
        if self.workers == 0 || self.worker >= self.workers {
            return Err(IoError::Pieces {
                path: out.to_path_buf(),
                message: format!(
                    "worker {} of {}: workers are numbered 0 to N-1 (`--shard I/N` with I < N)",
                    self.worker, self.workers
                ),
            });
        }
        if self.plan.is_empty() || !self.plan.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IoError::Pieces {
                path: out.to_path_buf(),
                message: format!("`{}` is not a plan fingerprint", self.plan),
            });
        }
        Ok(assigned_shards(self.worker, self.workers, shards))
    }
}

/// The output shards (indices, in write order) that worker `worker` of
/// `workers` writes when the model has `shards` shard files: contiguous
/// runs, as even as counts allow (`⌊I·S/N⌋..⌊(I+1)·S/N⌋`). With more workers
/// than shards some workers write none.
///
/// ```
/// use tensormerge_io::pieces::assigned_shards;
/// let runs: Vec<_> = (0..3).map(|i| assigned_shards(i, 3, 7)).collect();
/// assert_eq!(runs, vec![0..2, 2..4, 4..7]);
/// assert_eq!(assigned_shards(0, 4, 2), 0..0);
/// ```
pub fn assigned_shards(worker: usize, workers: usize, shards: usize) -> Range<usize> {
    if workers == 0 || worker >= workers {
        return 0..0;
    }
    let at = |i: usize| (i as u128 * shards as u128 / workers as u128) as usize;
    at(worker)..at(worker + 1)
}

/// Where the pieces of output `out` go: the sibling `OUT.pieces`.
pub fn pieces_dir(out: &Path) -> Result<PathBuf, IoError> {
    let name = out
        .file_name()
        .ok_or_else(|| IoError::io(out, std::io::Error::other("output path has no name")))?;
    let mut name = name.to_os_string();
    name.push(".pieces");
    Ok(out.with_file_name(name))
}

/// The directory of worker `worker` of `workers` inside [`pieces_dir`].
pub fn worker_dir(out: &Path, worker: usize, workers: usize) -> Result<PathBuf, IoError> {
    Ok(pieces_dir(out)?.join(worker_dir_name(worker, workers)))
}

fn worker_dir_name(worker: usize, workers: usize) -> String {
    format!("worker-{worker:05}-of-{workers:05}")
}

/// One file of a part: a shard file (with its tensors) or a support file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PieceFile {
    /// File name (no directories).
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the whole file, lower-case hex.
    pub sha256: String,
    /// The tensors of a shard file, in order (empty for a support file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tensors: Vec<String>,
}

/// A worker directory's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PieceManifest {
    /// [`FORMAT`].
    pub format: String,
    /// The plan's fingerprint (see [`PartSpec::plan`]).
    pub plan: String,
    /// This worker, `0..workers`.
    pub worker: usize,
    /// Number of workers.
    pub workers: usize,
    /// Every shard file of the whole model, in order.
    pub shard_files: Vec<String>,
    /// Tensor bytes of the whole model (the index's `total_size`).
    pub total_size: u64,
    /// The shard files this worker wrote.
    pub pieces: Vec<PieceFile>,
    /// The support files this worker wrote (worker 0 only).
    pub support: Vec<PieceFile>,
}

impl PieceManifest {
    pub(crate) fn write(&self, dir: &Path) -> Result<(), IoError> {
        let path = dir.join(MANIFEST_FILE);
        let mut text = serde_json::to_string_pretty(self).expect("manifest serializes");
        text.push('\n');
        std::fs::write(&path, text).map_err(|e| IoError::io(&path, e))
    }

    /// Reads and checks the manifest of a worker directory.
    pub fn read(dir: &Path) -> Result<PieceManifest, IoError> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |message: String| IoError::Pieces {
            path: path.clone(),
            message,
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(
                    "missing: not a complete worker directory; run that worker again".into(),
                ));
            }
            Err(e) => return Err(IoError::io(&path, e)),
        };
        let m: PieceManifest = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("not a valid piece manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "format `{}`, this tensormerge reads `{FORMAT}`; run every worker and join with the same version",
                m.format
            )));
        }
        for f in m.pieces.iter().chain(&m.support) {
            let plain = Path::new(&f.file)
                .components()
                .eq([std::path::Component::Normal(f.file.as_ref())]);
            if !plain || f.file == MANIFEST_FILE {
                return Err(bad(format!("`{}` is not a plain file name", f.file)));
            }
        }
        Ok(m)
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 (hex) and size of a file, read once.
fn hash_file(path: &Path) -> Result<(String, u64), IoError> {
    let mut f = File::open(path).map_err(|e| IoError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| IoError::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

/// A support file's record.
pub(crate) fn describe_file(path: &Path, file: String) -> Result<PieceFile, IoError> {
    let (sha256, bytes) = hash_file(path)?;
    Ok(PieceFile {
        file,
        bytes,
        sha256,
        tensors: Vec::new(),
    })
}

/// Options of [`join`].
#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    /// Replace an existing output directory.
    pub overwrite: bool,
    /// Leave `OUT.pieces` in place after a successful join (by default it is
    /// removed).
    pub keep_pieces: bool,
}

/// What [`join`] did.
#[derive(Debug, Clone)]
pub struct JoinReport {
    /// The finished model directory.
    pub out_dir: PathBuf,
    /// Shard files in it.
    pub shards: usize,
    /// Workers whose pieces it took.
    pub workers: usize,
    /// Bytes of the shard files (all checked against their SHA-256).
    pub bytes: u64,
}

/// Assembles the pieces in `OUT.pieces` into the model directory `out`
/// (see the [module docs](self)). Every piece is checked first: a bad set
/// (pieces missing, doubled, of different plans or worker counts, of the
/// wrong size or checksum) is an [`IoError::Pieces`], and nothing is
/// written.
pub fn join(out: &Path, opts: &JoinOptions) -> Result<JoinReport, IoError> {
    let pieces = pieces_dir(out)?;
    let entries = match std::fs::read_dir(&pieces) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IoError::Pieces {
                path: pieces,
                message: "no such directory: run the workers (`tensormerge merge CONFIG -o OUT --shard I/N`) first".into(),
            });
        }
        Err(e) => return Err(IoError::io(&pieces, e)),
    };
    let mut dirs = Vec::new();
    for e in entries {
        let e = e.map_err(|e| IoError::io(&pieces, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // A worker still writing (or killed): its temporary directory.
            continue;
        }
        if !name.starts_with("worker-") || !e.path().is_dir() {
            return Err(IoError::Pieces {
                path: e.path(),
                message: "not a worker directory; only `worker-*` directories belong here".into(),
            });
        }
        dirs.push((name, e.path()));
    }
    dirs.sort();
    let Some((_, first_dir)) = dirs.first() else {
        return Err(IoError::Pieces {
            path: pieces,
            message: "no finished worker directory: run the workers first".into(),
        });
    };
    let first = PieceManifest::read(first_dir)?;
    let mut manifests = Vec::new();
    for (name, dir) in &dirs {
        let m = PieceManifest::read(dir)?;
        let bad = |message: String| IoError::Pieces {
            path: dir.join(MANIFEST_FILE),
            message,
        };
        if m.plan != first.plan {
            return Err(bad(format!(
                "written for plan {}, but {} was written for plan {}: every worker must run the same config, inputs, seed, shard size and tensormerge version; rerun the workers of the plan you want",
                short(&m.plan),
                first_dir.display(),
                short(&first.plan)
            )));
        }
        if m.workers != first.workers {
            return Err(bad(format!(
                "written by worker {}/{} but {} by one of {} workers: all pieces must come from one `--shard I/N` split",
                m.worker,
                m.workers,
                first_dir.display(),
                first.workers
            )));
        }
        if m.shard_files != first.shard_files || m.total_size != first.total_size {
            return Err(bad(format!(
                "lists other output shards than {}",
                first_dir.display()
            )));
        }
        if *name != worker_dir_name(m.worker, m.workers) {
            return Err(bad(format!(
                "says worker {}/{}, but the directory is named `{name}`",
                m.worker, m.workers
            )));
        }
        let expected: Vec<&String> = first.shard_files
            [assigned_shards(m.worker, m.workers, first.shard_files.len())]
        .iter()
        .collect();
        let got: Vec<&String> = m.pieces.iter().map(|p| &p.file).collect();
        if got != expected {
            return Err(bad(format!(
                "holds shards {:?}; worker {}/{} writes {:?}",
                got, m.worker, m.workers, expected
            )));
        }
        if m.worker != 0 && !m.support.is_empty() {
            return Err(bad("only worker 0 writes support files".into()));
        }
        manifests.push((dir.clone(), m));
    }
    // Every shard exactly once.
    let n = first.shard_files.len();
    let mut owner: Vec<Option<&Path>> = vec![None; n];
    for (dir, m) in &manifests {
        for p in &m.pieces {
            let k = first
                .shard_files
                .iter()
                .position(|f| *f == p.file)
                .ok_or_else(|| IoError::Pieces {
                    path: dir.join(MANIFEST_FILE),
                    message: format!("`{}` is not a shard of this plan", p.file),
                })?;
            if let Some(other) = owner[k] {
                return Err(IoError::Pieces {
                    path: dir.join(&p.file),
                    message: format!("doubled: also in {}", other.display()),
                });
            }
            owner[k] = Some(dir);
        }
    }
    let missing: Vec<usize> = (0..first.workers)
        .filter(|&w| {
            !manifests.iter().any(|(_, m)| m.worker == w)
                && (w == 0 || !assigned_shards(w, first.workers, n).is_empty())
        })
        .collect();
    if !missing.is_empty() {
        let files: Vec<&str> = (0..n)
            .filter(|&k| owner[k].is_none())
            .map(|k| first.shard_files[k].as_str())
            .collect();
        return Err(IoError::Pieces {
            path: pieces,
            message: format!(
                "incomplete: worker(s) {} of {} have not finished (missing {}{}); run them (`--shard I/{}`) and join again",
                missing
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                first.workers,
                if files.is_empty() {
                    "the support files".to_string()
                } else {
                    files.join(", ")
                },
                if missing.contains(&0) && !files.is_empty() {
                    " and the support files"
                } else {
                    ""
                },
                first.workers
            ),
        });
    }
    // The output's temporary sibling (refused now if `out` exists).
    let tmp = make_temp(out, opts.overwrite, &[])?;
    let mut guard = RemoveOnDrop(Some(tmp.clone()));
    // Sizes and checksums.
    let mut bytes = 0u64;
    for (dir, m) in &manifests {
        for f in m.pieces.iter().chain(&m.support) {
            let path = dir.join(&f.file);
            let (sha, size) = match hash_file(&path) {
                Ok(x) => x,
                Err(IoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(IoError::Pieces {
                        path,
                        message: "listed in the manifest but missing; run that worker again".into(),
                    });
                }
                Err(e) => return Err(e),
            };
            if size != f.bytes || sha != f.sha256 {
                return Err(IoError::Pieces {
                    path,
                    message: format!(
                        "corrupt: {size} bytes with SHA-256 {}, the manifest says {} bytes with SHA-256 {}; run that worker again",
                        short(&sha),
                        f.bytes,
                        short(&f.sha256)
                    ),
                });
            }
            if !f.tensors.is_empty() {
                bytes += size;
            }
        }
    }
    // Assemble.
    let mut index = Vec::new();
    for (k, dir) in owner.iter().enumerate() {
        let dir = dir.expect("checked above");
        let (_, m) = manifests
            .iter()
            .find(|(d, _)| d.as_path() == dir)
            .expect("owner");
        let p = m
            .pieces
            .iter()
            .find(|p| p.file == first.shard_files[k])
            .expect("owner");
        link_or_copy(&dir.join(&p.file), &tmp.join(&p.file))?;
        index.push(p);
    }
    for (dir, m) in &manifests {
        for f in &m.support {
            link_or_copy(&dir.join(&f.file), &tmp.join(&f.file))?;
        }
    }
    if n > 1 {
        let entries = index
            .iter()
            .map(|p| (p.file.as_str(), p.tensors.iter().map(String::as_str)));
        write_index(&tmp, entries, first.total_size)?;
    }
    commit(&tmp, out, opts.overwrite)?;
    guard.0 = None;
    if !opts.keep_pieces {
        let _ = std::fs::remove_dir_all(&pieces);
    }
    Ok(JoinReport {
        out_dir: out.to_path_buf(),
        shards: n,
        workers: first.workers,
        bytes,
    })
}

/// The first 12 hex digits of a fingerprint or checksum, for messages.
fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Hard-links `src` to `dst` (no copy on one file system), else copies it.
fn link_or_copy(src: &Path, dst: &Path) -> Result<(), IoError> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).map_err(|e| IoError::io(src, e))?;
    Ok(())
}

/// Removes a temporary directory unless forgotten.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
