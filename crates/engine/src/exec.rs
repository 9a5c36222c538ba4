//! The streaming executor.
//!
//! Tensors are handed to `-j` workers (a rayon pool) strictly in output order,
//! each admitted only while the memory reserved by tensors in flight stays
//! under the budget (one tensor always runs, however large). A worker reads
//! its tensor chunk by chunk (converted to `f32`), runs the method through
//! [`merge_tensor`] — the same pass protocol as the in-memory
//! [`Merge`](tensormerge_methods::Merge), so results are bit-identical — and
//! converts each result chunk to the output dtype. The tensor at the head of
//! the output order streams straight into the writer, and so do the later
//! tensors of the same output shard file, each written ahead at its place in
//! the file ([`ModelWriter::write_ahead`]); the tensors of later shard files
//! (and of a sharded worker's pieces, hashed as they are written) wait in a
//! reorder buffer whose size the admission rule bounds. Results depend only
//! on the inputs, parameters and seed, never on the number of workers.
//!
//! A method's whole-model pass (TIES with `trim_scope: model`, Fisher norms)
//! runs first, streaming over every tensor in order, as many sweeps as it asks.
//!
//! [`execute_part`] runs one worker of a sharded merge: the same plan, the
//! same whole-model pass (over the whole model: it is deterministic, so every
//! worker computes the same statistics as a single machine would), then only
//! the tensors of the worker's output shards, written as pieces that
//! `tensormerge_io::join` assembles.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tensormerge_core::{DType, convert};
use tensormerge_io::{Model, ModelWriter, PartSpec, SUPPORT_FILES, WriterOptions};
use tensormerge_methods::{
    ChunkData, ChunkInput, MergeBuffers, Stats, chunk_ranges, merge_tensor_reusing,
};

use crate::config::MergeConfig;
use crate::error::{EngineError, Mismatch};
use crate::plan::{Action, Input, Plan, RunOptions, TensorPlan, plan};
use crate::progress::Progress;

/// Smallest chunk, in elements, whatever the budget.
const MIN_CHUNK: u64 = 4096;
/// Largest chunk, in elements, for methods without a per-tensor pass.
const MAX_PLAIN_CHUNK: u64 = 1 << 16;
/// Largest working set of one chunk (every input decoded, and the result),
/// in bytes, for methods with a per-tensor pass: about 262,000 elements of
/// a base and three models.
///
/// A tensor of one chunk is decoded once and kept for the pass and the
/// merge; one of several chunks is read again (from the page cache, where
/// its first read just put it) for each sweep and for the merge. Decoding
/// whole tensors of millions of elements into buffers larger than the
/// cache cost more than reading them twice: each decoded value went to
/// memory and came back twice. A bf16 GPT-2 TIES merge (1 base + 3, two
/// threads) took 1.11-1.22 s with the default budget (one chunk up to 11M
/// elements) and 0.93-0.99 s with chunks of 131K-262K elements, f32 TIES,
/// DARE and DELLA about a quarter less CPU time, same outputs (hand-timed
/// with `--max-memory`, 2026-12-07; `cargo xtask bench` measures the
/// result).
///
/// The cost: TIES' guess of its threshold samples the first chunk of a
/// tensor, now at most about 262K elements (the first rows of a matrix)
/// rather than the whole of a tensor of up to about 11M. Where those rows
/// are not typical of the tensor the guess misses and the selection takes
/// its histogram sweeps (one more read of the tensor each; results never
/// change). The synthetic benchmarks cannot show how often that happens
/// on real checkpoints; that was not measured.
const MAX_PASS_CHUNK_BYTES: u64 = 6 << 20;
/// Most result elements encoded and handed to the writer at once: a whole
/// tensor's result (methods that merge whole tensors) goes out in pieces, so
/// the encoded bytes stay in cache on their way into `write` and the encode
/// buffer stays small. F32 results need no encoding and go out as they are.
const ENCODE_PIECE: usize = 1 << 16;

/// What a finished merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Tensors merged by the method.
    pub tensors_merged: usize,
    /// Non-float tensors copied from the base.
    pub tensors_copied: usize,
    /// Input bytes read (including whole-model pass sweeps).
    pub bytes_read: u64,
    /// Tensor bytes written.
    pub bytes_written: u64,
    /// Output shard files.
    pub shards: usize,
    /// The seed used.
    pub seed: u64,
    /// Worker threads used.
    pub threads: usize,
    /// Chunk length in elements.
    pub chunk_len: usize,
    /// The most memory reserved at once by tensors in flight (working sets
    /// and buffered results), in bytes: at most the budget, unless a single
    /// tensor needs more (then at most the budget plus that tensor).
    pub peak_reserved: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Warnings given along the way.
    pub warnings: Vec<String>,
}

/// Plans and runs a merge, writing the result to `out`.
pub fn run_merge(
    config: &MergeConfig,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<MergeReport, EngineError> {
    let plan = plan(config, opts)?;
    execute(&plan, out, opts, progress)
}

/// An input as the executor reads it. Float tensors are read through the
/// file (positioned reads into the worker's buffers), not through the
/// model's memory map: a map's pages count in the process's resident set
/// for as long as it exists, which would make the peak memory of a merge
/// grow with the model; read pages stay in the page cache only.
struct Source {
    reference: String,
    model: Arc<Model>,
    /// Check every value read for NaN and infinity.
    check_finite: bool,
}

impl Source {
    fn new(input: &Input, check_finite: bool) -> Source {
        Source {
            reference: input.reference.clone(),
            model: input.model.clone(),
            check_finite,
        }
    }

    /// Decodes elements `range` of tensor `name` into `out` (resized to the
    /// range's length; its old contents are overwritten, not cleared first),
    /// with `scratch` for the stored bytes. Returns the bytes read.
    fn read(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut Vec<f32>,
        scratch: &mut Vec<u8>,
    ) -> Result<u64, EngineError> {
        self.read_with(name, range, out, scratch, true)
    }

    /// [`read`](Self::read), looking for non-finite values only when
    /// `first` (the first read of these elements; a pass with several sweeps
    /// reads a tensor in several chunks again and again).
    fn read_with(
        &self,
        name: &str,
        range: Range<usize>,
        out: &mut Vec<f32>,
        scratch: &mut Vec<u8>,
        first: bool,
    ) -> Result<u64, EngineError> {
        let check = self.check_finite && first;
        let size = self
            .model
            .layout()
            .get(name)
            .map_or(0, |t| t.dtype.size_in_bytes() as u64);
        let bytes = range.len() as u64 * size;
        let first = range.start;
        out.resize(range.len(), 0.0);
        // Decoding and the NaN/infinity check are one pass over the data.
        let bad = self
            .model
            .read_f32_range_copied_with(name, range, out, scratch, check)
            .map_err(|source| {
                EngineError::io(
                    format!("cannot read tensor `{name}` of `{}`", self.reference),
                    source,
                )
            })?;
        if check && let Some(i) = bad {
            return Err(crate::error::non_finite_at(
                out,
                i,
                &self.reference,
                name,
                first,
            ));
        }
        Ok(bytes)
    }
}

/// The executor's view of the plan's inputs.
struct Sources {
    base: Option<Source>,
    models: Vec<Source>,
    aux: Vec<Option<Source>>,
    base_aux: Option<Source>,
    /// The inputs of a sliced merge (indexed by [`crate::slices::Read::input`]).
    slice: Vec<Source>,
    /// Set (by a Ctrl-C handler) to stop between chunks.
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The output vocabulary: embedding matrices are read permuted into it.
    tokenizer: Option<Arc<crate::tokenizer::TokenizerPlan>>,
    /// The inputs of the vocabulary (indexed like its permutations).
    tok: Vec<Source>,
}

impl Sources {
    fn new(plan: &Plan, opts: &RunOptions) -> Sources {
        let check_finite = !opts.allow_non_finite;
        let new = |i: &Input| Source::new(i, check_finite);
        Sources {
            base: plan.base.as_ref().map(new),
            models: plan.models.iter().map(new).collect(),
            aux: plan.aux.iter().map(|a| a.as_ref().map(new)).collect(),
            base_aux: plan.base_aux.as_ref().map(new),
            slice: plan
                .slices
                .iter()
                .flat_map(|s| s.inputs.iter().map(new))
                .collect(),
            cancel: opts.cancel.clone(),
            tokenizer: plan.tokenizer.clone(),
            tok: plan
                .tokenizer
                .iter()
                .flat_map(|t| t.inputs.iter().map(new))
                .collect(),
        }
    }

    /// [`EngineError::Cancelled`] once the cancel flag is set.
    fn check_cancel(&self) -> Result<(), EngineError> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(EngineError::Cancelled),
            _ => Ok(()),
        }
    }
}

/// Reads one chunk of tensor `t` from every input taking part into `data`
/// (its buffers reused). Returns the bytes read.
///
/// `checked`: the elements below it were read before and found finite in
/// every input, so a range within them is not searched for NaN and infinity
/// again (passes read a tensor in several chunks once per sweep, and then
/// once more to merge); it grows as ranges are read in order.
#[allow(clippy::too_many_arguments)]
fn fetch(
    src: &Sources,
    t: &TensorPlan,
    aux_has: &[bool],
    base_aux_has: bool,
    range: Range<usize>,
    data: &mut ChunkData,
    scratch: &mut Vec<u8>,
    checked: &mut usize,
) -> Result<u64, EngineError> {
    src.check_cancel()?;
    let first = range.end > *checked;
    let name = t.out.name.as_str();
    let mut bytes = 0u64;
    let aux_present: Vec<bool> = src
        .aux
        .iter()
        .zip(aux_has)
        .map(|(a, &has)| a.is_some() && has)
        .collect();
    let (has_base, n_models) = match &t.reads {
        Some(r) => (r.base.is_some(), r.models.len()),
        None => (src.base.is_some(), src.models.len()),
    };
    fn sliced<'s>(src: &'s Sources, r: &'s crate::slices::Read) -> (Option<&'s Source>, &'s str) {
        (src.slice.get(r.input), r.name.as_str())
    }
    data.refill(
        has_base,
        n_models,
        &aux_present,
        src.base_aux.is_some() && base_aux_has,
        |input, buf| {
            let (s, name) = match (&t.reads, input) {
                (Some(r), ChunkInput::Base) => {
                    r.base.as_ref().map_or((None, name), |r| sliced(src, r))
                }
                (Some(r), ChunkInput::Model(i)) => {
                    r.models.get(i).map_or((None, name), |r| sliced(src, r))
                }
                (Some(_), _) => (None, name),
                (None, ChunkInput::Base) => (src.base.as_ref(), name),
                (None, ChunkInput::Model(i)) => (src.models.get(i), name),
                (None, ChunkInput::Aux(i)) => (src.aux.get(i).and_then(Option::as_ref), name),
                (None, ChunkInput::BaseAux) => (src.base_aux.as_ref(), name),
            };
            if let Some(s) = s {
                let permuted = match (&src.tokenizer, &t.reads, input) {
                    (Some(tok), None, ChunkInput::Base | ChunkInput::Model(_))
                        if crate::tokenizer::is_embedding(name) && t.out.shape.len() == 2 =>
                    {
                        tok.input_index(&s.reference)
                            .filter(|&i| !tok.is_identity(i))
                            .map(|i| (tok, i))
                    }
                    _ => None,
                };
                match permuted {
                    Some((tok, i)) => {
                        // Rows remapped by token (scratch is per call: the
                        // closure may read several inputs' rows).
                        let cell = std::cell::RefCell::new(std::mem::take(&mut *scratch));
                        let read = |j: usize, r: Range<usize>, out: &mut Vec<f32>| {
                            src.tok[j].read(name, r, out, &mut cell.borrow_mut())
                        };
                        let r =
                            tok.read_permuted(i, name, t.out.shape[1], range.clone(), buf, &read);
                        *scratch = cell.into_inner();
                        bytes += r?;
                    }
                    None => bytes += s.read_with(name, range.clone(), buf, scratch, first)?,
                }
            }
            Ok::<_, EngineError>(())
        },
    )?;
    if first && range.start <= *checked {
        *checked = range.end;
    }
    Ok(bytes)
}

/// In-order admission of tensors under a memory budget.
///
/// A tensor reserves its working set (one chunk of every input, decoded, and
/// of the result) and, unless it is the next tensor to be written when it
/// starts or lies in that tensor's output shard file (then it streams
/// straight into the writer), room for its encoded result in the reorder
/// buffer. It is admitted when the reservations fit the
/// budget, or when nothing else is in flight. One tensor whose working set
/// alone is over the budget (a whole tensor merged at once: the embedding
/// under a method that is not chunkable) is admitted when it is next to be written,
/// beside the others, whose reservations then still fit the budget without
/// it: so the other workers keep going while it runs, and memory stays within
/// the budget plus that one tensor (before, it ran alone, which left every
/// other worker idle for as long as it took).
struct Scheduler<'a> {
    /// End of the tensors to run (they start at `SchedState::next`).
    end: usize,
    state: Mutex<SchedState>,
    cv: Condvar,
    budget: u64,
    working: &'a [u64],
    out: &'a [u64],
    /// The next tensor to be written (owned by [`Output`]).
    head: &'a AtomicUsize,
    /// Each tensor's output shard, when tensors of the head's shard are
    /// written ahead instead of buffered (not for a sharded worker).
    ahead: Option<&'a [usize]>,
    /// Reorder-buffer bytes reserved by each admitted tensor.
    reserved_out: Vec<AtomicU64>,
}

struct SchedState {
    next: usize,
    reserved: u64,
    /// The over-budget tensor in flight beside others, and its reservation
    /// (part of `reserved`).
    big: Option<(usize, u64)>,
    peak: u64,
    failed: bool,
}

impl Scheduler<'_> {
    fn acquire(&self) -> Option<usize> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.failed || st.next >= self.end {
                return None;
            }
            let i = st.next;
            let head = self.head.load(Ordering::Acquire);
            // The head only moves forward: a tensor of its shard stays in
            // the shard being written until it is complete.
            let out = if head == i || self.ahead.is_some_and(|s| s[i] == s[head]) {
                0
            } else {
                self.out[i]
            };
            let c = self.working[i] + out;
            let others = st.reserved - st.big.map_or(0, |(_, b)| b);
            let fits = others.saturating_add(c) <= self.budget;
            let big = c > self.budget && out == 0 && st.big.is_none();
            if st.reserved == 0 || fits || big {
                if big {
                    st.big = Some((i, c));
                }
                st.next += 1;
                st.reserved += c;
                st.peak = st.peak.max(st.reserved);
                self.reserved_out[i].store(out, Ordering::Relaxed);
                return Some(i);
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Tensor `i` gives back `bytes` of its reservation.
    fn release(&self, i: usize, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.reserved = st.reserved.saturating_sub(bytes);
        if let Some((b, left)) = st.big
            && b == i
        {
            let left = left.saturating_sub(bytes);
            st.big = (left > 0).then_some((b, left));
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Tensor `i` left the reorder buffer.
    fn written(&self, i: usize) {
        self.release(i, self.reserved_out[i].load(Ordering::Relaxed));
    }

    fn fail(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).failed = true;
        self.cv.notify_all();
    }
}

/// The writer behind a reorder buffer.
struct Output<'p> {
    plan: &'p Plan,
    state: Mutex<OutState>,
    /// Mirror of `OutState::next` for the scheduler.
    head: &'p AtomicUsize,
}

struct OutState {
    writer: Option<ModelWriter>,
    next: usize,
    pending: BTreeMap<usize, Pending>,
    written: u64,
}

#[derive(Default)]
struct Pending {
    /// The encoded result so far, in one buffer (allocated once, at the
    /// tensor's full size: pieces arrive small and many).
    bytes: Vec<u8>,
    done: bool,
}

impl Output<'_> {
    fn write_now(&self, st: &mut OutState, idx: usize, bytes: &[u8]) -> Result<(), EngineError> {
        let name = &self.plan.tensors[idx].out.name;
        let w = st
            .writer
            .as_mut()
            .ok_or_else(|| EngineError::Option("writer already closed".into()))?;
        w.write(name, bytes)
            .map_err(|source| EngineError::io(format!("cannot write tensor `{name}`"), source))?;
        st.written += bytes.len() as u64;
        Ok(())
    }

    fn push(&self, idx: usize, bytes: std::borrow::Cow<'_, [u8]>) -> Result<(), EngineError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if idx == st.next {
            self.write_now(&mut st, idx, &bytes)
        } else {
            let OutState {
                writer,
                pending,
                written,
                ..
            } = &mut *st;
            let p = pending.entry(idx).or_default();
            // Ahead, unless it began in the buffer (it then stays there).
            if let Some(w) = writer
                && p.bytes.is_empty()
                && w.can_write_ahead(idx)
            {
                let name = &self.plan.tensors[idx].out.name;
                w.write_ahead(idx, &bytes).map_err(|source| {
                    EngineError::io(format!("cannot write tensor `{name}`"), source)
                })?;
                *written += bytes.len() as u64;
                return Ok(());
            }
            if p.bytes.capacity() == 0 {
                let total = self.plan.tensors[idx].out.checked_byte_len().unwrap_or(0);
                p.bytes.reserve_exact(total.max(bytes.len()));
            }
            p.bytes.extend_from_slice(&bytes);
            Ok(())
        }
    }

    /// Marks tensor `idx` complete; returns the tensors fully written by this call.
    fn complete(&self, idx: usize) -> Result<Vec<usize>, EngineError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if idx != st.next {
            st.pending.entry(idx).or_default().done = true;
            return Ok(Vec::new());
        }
        st.pending.remove(&idx);
        let mut written = vec![idx];
        st.next += 1;
        self.settle(&mut st)?;
        self.head.store(st.next, Ordering::Release);
        loop {
            let n = st.next;
            let Some(p) = st.pending.get_mut(&n) else {
                break;
            };
            let bytes = std::mem::take(&mut p.bytes);
            let done = p.done;
            if !bytes.is_empty() {
                self.write_now(&mut st, n, &bytes)?;
            }
            if !done {
                break;
            }
            st.pending.remove(&n);
            written.push(n);
            st.next += 1;
            self.settle(&mut st)?;
            self.head.store(st.next, Ordering::Release);
        }
        Ok(written)
    }

    /// Moves the writer past the complete tensors, so that it takes the
    /// tensors of the new head's shard ahead.
    fn settle(&self, st: &mut OutState) -> Result<(), EngineError> {
        match st.writer.as_mut() {
            Some(w) => w
                .settle()
                .map_err(|source| EngineError::io("cannot write the output".to_string(), source)),
            None => Ok(()),
        }
    }
}

/// Runs a planned merge, writing the result to `out` (through a temporary
/// sibling directory renamed into place at the end).
pub fn execute(
    plan: &Plan,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<MergeReport, EngineError> {
    execute_inner(plan, out, opts, progress, None)
}

/// Runs worker `worker` (0-based) of `workers` of a sharded merge of `plan`
/// into `out`: the output shards
/// [`assigned_shards`](tensormerge_io::pieces::assigned_shards)`(worker,
/// workers, plan.shards.len())`, byte for byte as [`execute`] writes them,
/// into the piece directory
/// [`worker_dir`](tensormerge_io::pieces::worker_dir) next to `out` with a
/// manifest carrying [`Plan::fingerprint`]; worker 0 also writes the
/// support files. [`join`](tensormerge_io::join) then assembles `out`.
/// A whole-model pass runs over the whole model on every worker (a worker
/// without shards skips it); it is deterministic, so every worker gets the
/// statistics a single machine gets.
pub fn execute_part(
    plan: &Plan,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
    worker: usize,
    workers: usize,
) -> Result<MergeReport, EngineError> {
    execute_inner(plan, out, opts, progress, Some((worker, workers)))
}

fn execute_inner(
    plan: &Plan,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
    part: Option<(usize, usize)>,
) -> Result<MergeReport, EngineError> {
    let start = Instant::now();
    for w in &plan.warnings {
        progress.warning(w);
    }
    let info = plan.method.info();
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| EngineError::Option(format!("cannot start {threads} worker threads: {e}")))?;

    // Chunk length: half the budget for the working sets of `threads` tensors.
    let streams = plan.max_streams() + 1;
    let per_elem = 4 * streams as u64 + 4;
    let by_budget = ((opts.max_memory / 2) / (threads as u64 * per_elem)).clamp(MIN_CHUNK, 1 << 28);
    // Methods without a per-tensor pass read every chunk once: keep chunks
    // small enough for the allocator to reuse their buffers (fresh pages cost
    // a fault and a zeroing each) and for the cache. Methods with a pass read
    // a multi-chunk tensor once per sweep and once more to merge: larger
    // chunks, still within the cache (`MAX_PASS_CHUNK_BYTES`).
    let has_tensor_pass = plan
        .tensors
        .iter()
        .find_map(|t| plan.context(t, None))
        .map(|ctx| plan.method.tensor_pass(&ctx).is_some());
    let chunk_len = if has_tensor_pass == Some(true) {
        by_budget.min((MAX_PASS_CHUNK_BYTES / per_elem).max(MAX_PLAIN_CHUNK))
    } else {
        by_budget.min(MAX_PLAIN_CHUNK)
    } as usize;

    let mut protected = Vec::new();
    for i in plan.inputs() {
        protected.extend(i.model.protected_paths());
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("merge_method".to_string(), info.name.to_string());
    metadata.insert(
        "merged_by".to_string(),
        format!("tensormerge {}", env!("CARGO_PKG_VERSION")),
    );
    let tensor_list = plan.tensors.iter().map(|t| t.out.clone()).collect();
    let wopts = WriterOptions {
        max_shard_bytes: opts.out_shard_bytes,
        overwrite: opts.overwrite,
        protected,
        metadata,
    };
    let writer = match part {
        None => ModelWriter::create(out, tensor_list, wopts),
        Some((worker, workers)) => ModelWriter::create_part(
            out,
            tensor_list,
            wopts,
            PartSpec {
                plan: plan.fingerprint(),
                worker,
                workers,
            },
        ),
    }
    .map_err(|source| {
        EngineError::io(format!("cannot create output `{}`", out.display()), source)
    })?;
    // The tensors this run writes: all, or those of a worker's shards.
    let range = writer.tensor_range();

    let sources = Sources::new(plan, opts);
    let mut bytes_read = 0u64;
    let model_stats = if plan.model_pass && !range.is_empty() {
        let (s, b) = model_pass(plan, &sources, chunk_len, progress)?;
        bytes_read += b;
        s
    } else {
        None
    };

    // Merge pass.
    let n = plan.tensors.len();
    let method = plan.method;
    let mut working = Vec::with_capacity(n);
    let mut out_bytes = Vec::with_capacity(n);
    for t in &plan.tensors {
        let numel = t.out.numel() as u64;
        let w = match t.action {
            Action::Copy => 0,
            Action::Merge { .. } => {
                let chunk = if method.chunkable() {
                    numel.min(chunk_len as u64)
                } else {
                    numel
                };
                chunk * per_elem + chunk * t.out.dtype.size_in_bytes() as u64
            }
        };
        working.push(w);
        out_bytes.push(t.out.checked_byte_len().unwrap_or(0) as u64);
    }
    let head = AtomicUsize::new(range.start);
    let shard_of: Option<Vec<usize>> = part
        .is_none()
        .then(|| (0..n).map(|i| writer.shard_of_tensor(i)).collect());
    let sched = Scheduler {
        end: range.end,
        state: Mutex::new(SchedState {
            next: range.start,
            reserved: 0,
            big: None,
            peak: 0,
            failed: false,
        }),
        cv: Condvar::new(),
        budget: opts.max_memory,
        working: &working,
        out: &out_bytes,
        head: &head,
        ahead: shard_of.as_deref(),
        reserved_out: (0..n).map(|_| AtomicU64::new(0)).collect(),
    };
    let output = Output {
        plan,
        head: &head,
        state: Mutex::new(OutState {
            writer: Some(writer),
            next: range.start,
            pending: BTreeMap::new(),
            written: 0,
        }),
    };
    let errors: Mutex<Vec<(usize, EngineError)>> = Mutex::new(Vec::new());
    let read_total = Mutex::new(0u64);
    progress.start(
        "merging",
        expected_reads(plan, range.clone(), chunk_len),
        range.len() as u64,
    );
    let job = Job {
        plan,
        sources: &sources,
        chunk_len,
        model_stats: model_stats.as_ref(),
        output: &output,
        progress,
    };
    pool.scope(|s| {
        for _ in 0..threads {
            s.spawn(|_| {
                let mut worker = Worker::default();
                while let Some(idx) = sched.acquire() {
                    let r = process(job, idx, &mut worker);
                    sched.release(idx, working[idx]);
                    let r = r.and_then(|b| {
                        *read_total.lock().unwrap_or_else(|e| e.into_inner()) += b;
                        output.complete(idx)
                    });
                    match r {
                        Ok(done) => {
                            for d in done {
                                sched.written(d);
                            }
                            progress.advance(0, 1);
                        }
                        Err(e) => {
                            errors
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((idx, e));
                            sched.fail();
                            break;
                        }
                    }
                }
            });
        }
    });
    progress.finish();
    let peak_reserved = sched.state.lock().unwrap_or_else(|e| e.into_inner()).peak;
    let mut errors = errors.into_inner().unwrap_or_else(|e| e.into_inner());
    if !errors.is_empty() {
        errors.sort_by_key(|(i, _)| *i);
        return Err(errors.swap_remove(0).1);
    }
    bytes_read += read_total.into_inner().unwrap_or_else(|e| e.into_inner());
    let st = output.state.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut writer = st
        .writer
        .ok_or_else(|| EngineError::Option("writer already closed".into()))?;
    let shards = match part {
        None => writer.num_shards(),
        Some((worker, workers)) => {
            tensormerge_io::pieces::assigned_shards(worker, workers, writer.num_shards()).len()
        }
    };
    let io =
        |context: String| move |source: tensormerge_io::IoError| EngineError::io(context, source);
    // Support files: written once, by the single machine or by worker 0.
    if part.is_none_or(|(worker, _)| worker == 0) {
        writer
            .copy_support_files(&plan.template_dir, plan.out_dtype)
            .map_err(io(format!(
                "cannot copy config files from `{}`",
                plan.template_dir.display()
            )))?;
        if let Some(dir) = &plan.tokenizer_dir {
            copy_tokenizer(dir, writer.temp_dir())?;
        }
        if let Some(tok) = &plan.tokenizer {
            tok.write(writer.temp_dir())?;
            let config_json = writer.temp_dir().join("config.json");
            if config_json.is_file() {
                crate::tokenizer::set_vocab_size(&config_json, tok.rows)?;
            }
        }
        if let Some(template) = &plan.chat_template {
            crate::tokenizer::write_chat_template(writer.temp_dir(), template)?;
        }
        if let Some(s) = &plan.slices {
            let config_json = writer.temp_dir().join("config.json");
            if config_json.is_file()
                && !crate::slices::set_layer_count(&config_json, s.layers.len())?
            {
                progress.warning(&format!(
                    "config.json of `{}` has none of num_hidden_layers, n_layer, num_layers: the output's layer count ({}) is not recorded in it",
                    plan.template_dir.display(),
                    s.layers.len()
                ));
            }
        }
        if let Some(card) = &plan.card {
            let name = out
                .file_name()
                .map_or_else(|| "merged".into(), |n| n.to_string_lossy().into_owned());
            crate::card::write(writer.temp_dir(), card, &name)?;
        }
    }
    let out_dir = writer
        .finish()
        .map_err(io(format!("cannot finish output `{}`", out.display())))?;
    let copied = plan.tensors[range.clone()]
        .iter()
        .filter(|t| matches!(t.action, Action::Copy))
        .count();
    Ok(MergeReport {
        out_dir,
        tensors_merged: range.len() - copied,
        tensors_copied: copied,
        bytes_read,
        bytes_written: st.written,
        shards,
        seed: plan.seed,
        threads,
        chunk_len,
        peak_reserved,
        seconds: start.elapsed().as_secs_f64(),
        warnings: plan.warnings.clone(),
    })
}

/// Replaces the tokenizer files (everything in `SUPPORT_FILES` but the
/// model and generation configs) with those of `src`.
fn copy_tokenizer(src: &Path, dst: &Path) -> Result<(), EngineError> {
    let err = |p: &Path, e: std::io::Error| {
        EngineError::io(
            format!("cannot copy tokenizer file `{}`", p.display()),
            tensormerge_io::IoError::Io {
                path: p.to_path_buf(),
                source: e,
            },
        )
    };
    for name in SUPPORT_FILES
        .iter()
        .filter(|n| !matches!(**n, "config.json" | "generation_config.json"))
    {
        let d = dst.join(name);
        if d.exists() {
            std::fs::remove_file(&d).map_err(|e| err(&d, e))?;
        }
        let s = src.join(name);
        if s.is_file() {
            std::fs::copy(&s, &d).map_err(|e| err(&s, e))?;
        }
    }
    Ok(())
}

/// Input bytes the merge pass will read: a tensor merged in several chunks by
/// a method with a per-tensor pass is read once per sweep and once more.
fn expected_reads(plan: &Plan, range: Range<usize>, chunk_len: usize) -> u64 {
    plan.tensors[range]
        .iter()
        .map(|t| expected_tensor_reads(plan, t, chunk_len))
        .sum()
}

/// Input bytes the merge pass reads for tensor `t` at most (a per-tensor
/// pass that is [`done`](tensormerge_methods::StatsPass::done) early reads
/// less).
fn expected_tensor_reads(plan: &Plan, t: &crate::plan::TensorPlan, chunk_len: usize) -> u64 {
    let once = plan.tensor_bytes_to_read(t);
    let Some(ctx) = plan.context(t, None) else {
        return once;
    };
    let chunks = chunk_ranges(plan.method, &t.out.shape, t.out.numel(), chunk_len).len();
    let passes = match plan.method.tensor_pass(&ctx) {
        Some(p) if chunks > 1 => p.sweeps() as u64 + 1,
        _ => 1,
    };
    once * passes
}

/// Tensors of at most this many elements are merged in
/// [`Worker::small`]'s buffers.
const SMALL_TENSOR: usize = 1 << 16;

/// One worker thread's buffers, reused from chunk to chunk and tensor to
/// tensor (no allocation, and no page faults, per chunk).
#[derive(Default)]
struct Worker {
    /// For tensors of more than [`SMALL_TENSOR`] elements.
    merge: MergeBuffers,
    /// For the small tensors (biases, norms) between the large ones: a
    /// buffer grown again after a smaller chunk is zeroed over the
    /// difference (`Vec::resize`), so when every large tensor followed a
    /// bias in one buffer, its inputs were written twice (7% of the CPU
    /// time of a bf16 GPT-2 TIES merge, `perf`, 2026-12-07). These buffers
    /// hold at most `SMALL_TENSOR` elements per input.
    small: MergeBuffers,
    /// The encoded result chunk.
    encoded: Vec<u8>,
    /// Stored bytes of an input chunk, before decoding.
    scratch: Vec<u8>,
}

/// What every worker of the merge pass shares.
#[derive(Clone, Copy)]
struct Job<'a> {
    plan: &'a Plan,
    sources: &'a Sources,
    chunk_len: usize,
    model_stats: Option<&'a Stats>,
    output: &'a Output<'a>,
    progress: &'a dyn Progress,
}

/// Merges (or copies) tensor `idx`, streaming its result into `output`.
/// Returns the input bytes read.
fn process(job: Job<'_>, idx: usize, worker: &mut Worker) -> Result<u64, EngineError> {
    let Job {
        plan,
        sources,
        chunk_len,
        model_stats,
        output,
        progress,
    } = job;
    sources.check_cancel()?;
    let t = &plan.tensors[idx];
    let name = &t.out.name;
    match &t.action {
        Action::Copy => {
            let (src, src_name) = plan.copy_read(t);
            let bytes = src.model.tensor_bytes(src_name).map_err(|source| {
                EngineError::io(
                    format!("cannot read tensor `{src_name}` of `{}`", src.reference),
                    source,
                )
            })?;
            let mut mismatches = Vec::new();
            let (b, m) = plan.reads_of(t);
            for (m, name) in m.into_iter().chain(b) {
                if std::sync::Arc::ptr_eq(&m.model, &src.model) && name == src_name {
                    continue;
                }
                let other = m.model.tensor_bytes(name).map_err(|source| {
                    EngineError::io(
                        format!("cannot read tensor `{name}` of `{}`", m.reference),
                        source,
                    )
                })?;
                if other != bytes {
                    mismatches.push(Mismatch {
                        model: m.reference.clone(),
                        tensor: name.to_string(),
                        detail: format!(
                            "non-float tensor ({}) differs from `{}`; it cannot be merged, only copied when all inputs agree",
                            t.out.dtype,
                            src.reference
                        ),
                    });
                }
            }
            if !mismatches.is_empty() {
                return Err(EngineError::Incompatible(mismatches));
            }
            let n = bytes.len() as u64;
            output.push(idx, bytes)?;
            progress.advance(n, 0);
            Ok(n)
        }
        Action::Merge { aux, base_aux, .. } => {
            let ctx = plan
                .context(t, model_stats)
                .ok_or_else(|| EngineError::Option(format!("tensor `{name}` is not merged")))?;
            let mut read_bytes = 0u64;
            let out_dtype = t.out.dtype;
            let Worker {
                merge,
                small,
                encoded,
                scratch,
            } = worker;
            let merge = if t.out.numel() <= SMALL_TENSOR {
                small
            } else {
                merge
            };
            let mut checked = 0;
            merge_tensor_reusing::<EngineError>(
                plan.method,
                &ctx,
                chunk_len,
                merge,
                |r, data| {
                    let b = fetch(sources, t, aux, *base_aux, r, data, scratch, &mut checked)?;
                    read_bytes += b;
                    progress.advance(b, 0);
                    Ok(())
                },
                |_, vals| {
                    if out_dtype == DType::F32 && cfg!(target_endian = "little") {
                        // The values' own bytes are their F32 encoding:
                        // handed over as they are, not copied first.
                        let bytes: &[u8] = bytemuck::cast_slice(vals);
                        return output.push(idx, std::borrow::Cow::Borrowed(bytes));
                    }
                    for piece in vals.chunks(ENCODE_PIECE) {
                        encoded.resize(piece.len() * out_dtype.size_in_bytes(), 0);
                        convert::encode_f32(out_dtype, piece, encoded)?;
                        output.push(idx, std::borrow::Cow::Borrowed(&encoded[..]))?;
                    }
                    Ok(())
                },
            )?;
            // Sweeps a pass skipped: keep the progress total honest.
            let expected = expected_tensor_reads(plan, t, chunk_len);
            progress.advance(expected.saturating_sub(read_bytes), 0);
            Ok(read_bytes)
        }
    }
}

/// The whole-model pass: every float tensor, chunk by chunk in output order,
/// for each sweep the method asks for.
fn model_pass(
    plan: &Plan,
    sources: &Sources,
    chunk_len: usize,
    progress: &dyn Progress,
) -> Result<(Option<Stats>, u64), EngineError> {
    let method = plan.method;
    let first = plan.tensors.iter().find_map(|t| match &t.action {
        Action::Merge { global, models, .. } => Some((global, models)),
        Action::Copy => None,
    });
    let Some((g0, m0)) = first else {
        return Ok((None, 0));
    };
    let Some(mut pass) = method.model_pass(g0, m0) else {
        return Ok((None, 0));
    };
    let sweeps = pass.sweeps();
    let float_bytes: u64 = plan
        .tensors
        .iter()
        .filter(|t| matches!(t.action, Action::Merge { .. }))
        .map(|t| {
            let name = &t.out.name;
            plan.base
                .iter()
                .chain(plan.models.iter())
                .map(|i| {
                    t.out.numel() as u64
                        * i.model
                            .layout()
                            .get(name)
                            .map_or(0, |x| x.dtype.size_in_bytes() as u64)
                })
                .sum::<u64>()
        })
        .sum();
    progress.start("whole-model statistics", float_bytes * sweeps as u64, 0);
    let mut bytes = 0u64;
    let mut data = ChunkData::default();
    let mut scratch = Vec::new();
    for sweep in 0..sweeps {
        for t in &plan.tensors {
            let (Action::Merge { aux, base_aux, .. }, Some(ctx)) =
                (&t.action, plan.context(t, None))
            else {
                continue;
            };
            if !pass.needs(&ctx) {
                // Not read: keep the progress total honest.
                progress.advance(plan.tensor_bytes_to_read(t), 0);
                continue;
            }
            // Searched for non-finite values in the first sweep only.
            let mut checked = if sweep == 0 { 0 } else { usize::MAX };
            for r in chunk_ranges(method, &t.out.shape, t.out.numel(), chunk_len) {
                let offset = r.start;
                let b = fetch(
                    sources,
                    t,
                    aux,
                    *base_aux,
                    r,
                    &mut data,
                    &mut scratch,
                    &mut checked,
                )?;
                bytes += b;
                progress.advance(b, 0);
                data.with_chunk(&ctx, offset, None, |c| pass.observe(sweep, c))?;
            }
        }
        pass.end_sweep(sweep)?;
        if pass.done() {
            progress.advance(float_bytes * (sweeps - sweep - 1) as u64, 0);
            break;
        }
    }
    progress.finish();
    Ok((Some(pass.finish()?), bytes))
}
