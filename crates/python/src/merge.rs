//! `tensormerge.merge`: the streaming engine, as `tensormerge merge` runs it.
//!
//! The merge runs on its own thread with the GIL released. The calling
//! (Python) thread waits for it, wakes every 50 ms and at each phase start
//! to hand progress to the Python callback and to run
//! `Python::check_signals` — signal handlers only run on Python's main
//! thread, never inside the engine's worker threads. A `KeyboardInterrupt`
//! (or any exception from the progress callback) sets the engine's cancel
//! flag, as the CLI's Ctrl-C handler does: the executor stops at its next
//! chunk and drops the writer, which removes the temporary output
//! directory; the exception is re-raised once the engine has stopped.
//!
//! A phase start is a rendezvous: the engine waits until the Python thread
//! has seen it (and checked for signals) before reading any weight, so an
//! interrupt raised there always cancels the merge.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use tensormerge::builtin;
use tensormerge::engine::{
    EngineError, MergeConfig, MergeReport, Progress, RunOptions, plan, run_merge,
};

use crate::errors;

/// What `tensormerge.merge` did.
#[pyclass(frozen, get_all, name = "MergeSummary", module = "tensormerge")]
#[derive(Debug, Clone)]
pub struct PyMergeSummary {
    /// Output directory (`None` for a dry run).
    out: Option<String>,
    /// Whether this was a dry run (nothing read or written).
    dry_run: bool,
    /// Output tensors (merged + copied).
    tensors: usize,
    /// Tensors merged by the method.
    tensors_merged: usize,
    /// Non-float tensors copied from the base.
    tensors_copied: usize,
    /// Input bytes read (0 for a dry run).
    bytes_read: u64,
    /// Tensor bytes written (planned, for a dry run).
    bytes_written: u64,
    /// Output shard files.
    shards: usize,
    /// Wall time in seconds.
    seconds: f64,
    /// The seed used.
    seed: u64,
    /// Worker threads used (0 for a dry run).
    threads: usize,
    /// Warnings of the planner and the method.
    warnings: Vec<String>,
    /// The plan as `tensormerge merge --dry-run` prints it (dry run only).
    plan: Option<String>,
}

#[pymethods]
impl PyMergeSummary {
    fn __repr__(&self) -> String {
        format!(
            "MergeSummary(out={:?}, dry_run={}, tensors={}, bytes_written={}, seconds={:.3}, seed={}, warnings={})",
            self.out,
            self.dry_run,
            self.tensors,
            self.bytes_written,
            self.seconds,
            self.seed,
            self.warnings.len()
        )
    }
}

impl PyMergeSummary {
    fn from_report(r: &MergeReport) -> Self {
        PyMergeSummary {
            out: Some(r.out_dir.display().to_string()),
            dry_run: false,
            tensors: r.tensors_merged + r.tensors_copied,
            tensors_merged: r.tensors_merged,
            tensors_copied: r.tensors_copied,
            bytes_read: r.bytes_read,
            bytes_written: r.bytes_written,
            shards: r.shards,
            seconds: r.seconds,
            seed: r.seed,
            threads: r.threads,
            warnings: r.warnings.clone(),
            plan: None,
        }
    }
}

enum Event {
    Start {
        phase: String,
        total_bytes: u64,
        ack: mpsc::Sender<()>,
    },
    Finish,
    Warning(String),
    Done,
}

/// The engine's [`Progress`]: bytes go to a counter, everything else to the
/// Python thread.
struct Relay {
    tx: Mutex<mpsc::Sender<Event>>,
    bytes: AtomicU64,
}

impl Relay {
    fn send(&self, e: Event) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(e);
    }
}

impl Progress for Relay {
    fn start(&self, phase: &str, total_bytes: u64, _total_tensors: u64) {
        self.bytes.store(0, Ordering::SeqCst);
        let (ack, wait) = mpsc::channel();
        self.send(Event::Start {
            phase: phase.to_string(),
            total_bytes,
            ack,
        });
        // Returns at once if the Python side is gone (sender dropped).
        let _ = wait.recv();
    }
    fn advance(&self, bytes: u64, _tensors: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finish(&self) {
        self.send(Event::Finish);
    }
    fn warning(&self, text: &str) {
        self.send(Event::Warning(text.to_string()));
    }
}

/// The Python callback: `callback(event, phase, amount, total)` with event
/// `"start"` (amount 0), `"advance"` (amount: bytes since the last call) or
/// `"finish"`, and `callback("warning", text, 0, 0)`.
struct Callback<'py>(Option<Bound<'py, PyAny>>);

impl Callback<'_> {
    fn call(&self, event: &str, phase: &str, amount: u64, total: u64) -> PyResult<()> {
        match &self.0 {
            Some(f) => f.call1((event, phase, amount, total)).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// Runs (or plans, with `dry_run`) the merge described by `config_text`
/// (YAML or JSON) or `config_path`. `label` is how errors name the config.
#[pyfunction]
#[pyo3(signature = (label, config_text, config_path, out, dry_run, seed, threads, overwrite, allow_non_finite, max_memory, progress))]
#[allow(clippy::too_many_arguments)]
pub fn _merge(
    py: Python<'_>,
    label: String,
    config_text: Option<String>,
    config_path: Option<PathBuf>,
    out: Option<PathBuf>,
    dry_run: bool,
    seed: Option<u64>,
    threads: Option<usize>,
    overwrite: bool,
    allow_non_finite: bool,
    max_memory: Option<u64>,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<PyMergeSummary> {
    let parsed = match (&config_text, &config_path) {
        (Some(t), _) => MergeConfig::from_yaml_str(t),
        (None, Some(p)) => MergeConfig::from_path(p),
        (None, None) => {
            return Err(pyo3::exceptions::PyValueError::new_err("no config given"));
        }
    };
    let config = parsed.map_err(|e| {
        errors::engine(
            py,
            Some(&format!("invalid config `{label}`")),
            &EngineError::from(e),
        )
    })?;
    if threads == Some(0) {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "threads must be at least 1",
        ));
    }
    let mut opts = RunOptions {
        seed,
        overwrite,
        threads,
        allow_non_finite,
        ..RunOptions::default()
    };
    if let Some(m) = max_memory {
        opts.max_memory = m;
    }
    // Make sure every built-in method is linked and registered.
    let _ = builtin::registry();
    let callback = Callback(progress);

    if dry_run {
        let p = py.detach(|| plan(&config, &opts)).map_err(|e| {
            errors::engine(py, Some(&format!("cannot plan the merge of `{label}`")), &e)
        })?;
        for w in &p.warnings {
            callback.call("warning", w, 0, 0)?;
        }
        let copied = p
            .tensors
            .iter()
            .filter(|t| matches!(t.action, tensormerge::engine::Action::Copy))
            .count();
        return Ok(PyMergeSummary {
            out: None,
            dry_run: true,
            tensors: p.tensors.len(),
            tensors_merged: p.tensors.len() - copied,
            tensors_copied: copied,
            bytes_read: 0,
            bytes_written: p.bytes_to_write(),
            shards: p.shards.len(),
            seconds: 0.0,
            seed: p.seed,
            threads: 0,
            warnings: p.warnings.clone(),
            plan: Some(p.to_string()),
        });
    }

    let Some(out) = out else {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "merge: `out` is required unless dry_run=True",
        ));
    };
    let cancel = Arc::new(AtomicBool::new(false));
    opts.cancel = Some(cancel.clone());
    let (result, _) = run_relayed(py, &callback, cancel, move |relay| {
        run_merge(&config, &out, &opts, relay)
    })?;
    match result {
        Ok(report) => Ok(PyMergeSummary::from_report(&report)),
        Err(e) => Err(errors::engine(
            py,
            Some(&format!("merge of `{label}` failed")),
            &e,
        )),
    }
}

/// Runs `job` on a thread of its own with the GIL released, relaying its
/// progress to `callback` and checking for signals (see the module docs).
/// Returns the job's result and the warnings it gave, or the exception that
/// stopped it (after it has stopped).
fn run_relayed<T: Send + 'static>(
    py: Python<'_>,
    callback: &Callback<'_>,
    cancel: Arc<AtomicBool>,
    job: impl FnOnce(&Relay) -> Result<T, EngineError> + Send + 'static,
) -> PyResult<(Result<T, EngineError>, Vec<String>)> {
    let (tx, rx) = mpsc::channel();
    // `detach` needs a `Send` closure; a `Receiver` is not `Sync`.
    let rx = Mutex::new(rx);
    let relay = Arc::new(Relay {
        tx: Mutex::new(tx),
        bytes: AtomicU64::new(0),
    });
    let engine_relay = relay.clone();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("tensormerge-engine".into())
        .spawn(move || {
            let r = job(engine_relay.as_ref());
            let _ = done_tx.send(r);
            engine_relay.send(Event::Done);
        })
        .map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("cannot start the engine thread: {e}"))
        })?;

    let mut phase = String::new();
    let mut total = 0u64;
    let mut reported = 0u64;
    let mut warnings = Vec::new();
    let mut interrupted: Option<PyErr> = None;
    loop {
        let ev = py.detach(|| {
            rx.lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv_timeout(Duration::from_millis(50))
        });
        if interrupted.is_none() {
            let done = relay.bytes.load(Ordering::Relaxed);
            if done > reported && !phase.is_empty() {
                let step = callback.call("advance", &phase, done - reported, total);
                reported = done;
                interrupted = step.err();
            }
        }
        let ack = match ev {
            Ok(Event::Done) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(Event::Start {
                phase: p,
                total_bytes,
                ack,
            }) => {
                phase = p;
                total = total_bytes;
                reported = 0;
                if interrupted.is_none() {
                    interrupted = callback.call("start", &phase, 0, total).err();
                }
                Some(ack)
            }
            Ok(Event::Finish) => {
                if interrupted.is_none() {
                    interrupted = callback.call("finish", &phase, 0, total).err();
                }
                None
            }
            Ok(Event::Warning(w)) => {
                if interrupted.is_none() {
                    interrupted = callback.call("warning", &w, 0, 0).err();
                }
                warnings.push(w);
                None
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        };
        if interrupted.is_none() {
            interrupted = py.check_signals().err();
        }
        if interrupted.is_some() {
            cancel.store(true, Ordering::SeqCst);
        }
        // Lets the engine go on (it sees the cancel flag first, if set).
        drop(ack);
    }
    let _ = py.detach(|| worker.join());
    if let Some(e) = interrupted {
        // The engine stopped (Cancelled, or it had just finished): either
        // way the user asked to stop; a finished output stays finished.
        return Err(e);
    }
    let result = done_rx.try_recv().unwrap_or_else(|_| {
        Err(EngineError::Option(
            "the engine thread stopped without a result".into(),
        ))
    });
    Ok((result, warnings))
}

/// Evaluates expression `expr` over `models` (`name -> reference`) tensor
/// by tensor into `out`, as `tensormerge eval` does.
#[pyfunction]
#[pyo3(signature = (expr, models, out, dtype, template, threads, overwrite, allow_non_finite, max_memory, progress))]
#[allow(clippy::too_many_arguments)]
pub fn _eval(
    py: Python<'_>,
    expr: String,
    models: Vec<(String, String)>,
    out: PathBuf,
    dtype: Option<String>,
    template: Option<String>,
    threads: Option<usize>,
    overwrite: bool,
    allow_non_finite: bool,
    max_memory: Option<u64>,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<PyMergeSummary> {
    use tensormerge::core::DType;
    use tensormerge::engine::expr::{EvalOptions, run_eval};
    let out_dtype = match &dtype {
        None => None,
        Some(s) => {
            let d: DType = s.parse().map_err(|e| errors::core(py, e))?;
            if !d.is_float() {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "dtype: `{s}` is not a floating-point dtype"
                )));
            }
            Some(d)
        }
    };
    if threads == Some(0) {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "threads must be at least 1",
        ));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let mut opts = EvalOptions {
        out_dtype,
        template,
        overwrite,
        allow_non_finite,
        cancel: Some(cancel.clone()),
        ..EvalOptions::default()
    };
    if let Some(m) = max_memory {
        opts.max_memory = m;
    }
    let workers = threads.unwrap_or_else(rayon::current_num_threads);
    let callback = Callback(progress);
    let start = Instant::now();
    let job_expr = expr.clone();
    let (result, warnings) = run_relayed(py, &callback, cancel, move |relay| {
        let go = || run_eval(&job_expr, &models, &out, &opts, relay);
        match threads {
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| EngineError::Option(format!("cannot start {n} worker threads: {e}")))?
                .install(go),
            None => go(),
        }
    })?;
    match result {
        Ok(r) => Ok(PyMergeSummary {
            out: Some(r.out_dir.display().to_string()),
            dry_run: false,
            tensors: r.tensors_evaluated + r.tensors_copied,
            tensors_merged: r.tensors_evaluated,
            tensors_copied: r.tensors_copied,
            bytes_read: r.bytes_read,
            bytes_written: r.bytes_written,
            shards: std::fs::read_dir(&r.out_dir).map_or(0, |d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                    .count()
            }),
            seconds: start.elapsed().as_secs_f64(),
            seed: 0,
            threads: workers,
            warnings,
            plan: None,
        }),
        Err(e) => Err(errors::engine(
            py,
            Some(&format!("evaluation of `{expr}` failed")),
            &e,
        )),
    }
}
