//! `cargo xtask bench`: a realistic merge against the I/O floor.
//!
//! Writes synthetic checkpoints of GPT-2-small shape (the real tensor names
//! and shapes of `gpt2`'s `model.safetensors`: `wte` 50257×768, `wpe`
//! 1024×768, twelve blocks `h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2,
//! mlp.c_fc, mlp.c_proj}` with weights and biases, `ln_f`; 124,439,808
//! parameters), one base and three fine-tunes, in F32 and BF16. Then it runs
//! `task_arithmetic` and `ties` (density 0.2) through the release
//! `tensormerge merge` binary as a child process, and reports for each merge:
//!
//! - wall time, and input bytes per second (all four inputs over wall time);
//! - peak resident memory of the child (`ru_maxrss` from `wait4`, as the
//!   kernel counts it: mapped file pages included);
//! - the floor measured in the same run, on the same files: reading every
//!   input byte once (plain `read` into one buffer) plus writing an
//!   output-sized file once and syncing it (the writer of `tensormerge-io`
//!   syncs its shards, so the floor does too), and the ratio merge / floor.
//!
//! A third row runs the same task arithmetic as an expression through
//! `tensormerge eval` (held to the task_arithmetic target).
//!
//! Targets (issue #13, on two cores; issue #4 had 3× and 6×): f32
//! task_arithmetic ≤ 1.15× the floor, f32 ties (density 0.2) ≤ 1.6×, bf16
//! task_arithmetic ≤ 1.3×, bf16 ties ≤ 2×, eval ≤ 1.3×, peak RSS ≤ 256 MiB
//! for each. The floor is the faster of reading every input and then writing
//! the output, and doing both at once (as a merge does); its writes start
//! a background sync of the written data every 8 MiB, as the merge's
//! writer does.
//! Inputs are in the page cache for both the floor
//! and the merges (they were just written), so the comparison is warm against
//! warm. `--quick` uses a tiny model of the same structure (a smoke test; not
//! part of `cargo test`).
//!
//! `--scale` runs the out-of-core scale bench instead (module `scale`).
//! `--nn` runs the forward-pass bench instead: `tensormerge-nn`'s
//! `nn-bench` example in release mode (perplexity tokens/s and Fisher
//! samples/s of a 135M-parameter Llama-shaped model next to candle's matmul
//! rate on the same shapes, measured in the same run; `--quick` for a tiny
//! shape).
//!
//! Options: `--quick`, `--dir DIR` (where to write the models; default a
//! fresh temporary directory, removed at the end), `--keep` (keep it),
//! `--bin PATH` (use this binary instead of building `tensormerge` in
//! release mode), `--check` (exit with an error when a target is missed),
//! `-j N` (passed to `tensormerge merge`), `--repeat N` (run each merge N
//! times, report the best wall time and the largest peak RSS), `--methods`
//! (only the per-method lines of `bench_methods`: every registered method,
//! f32, wall time over task_arithmetic's, peak RSS and a SHA-256 of the
//! output; they also follow the rows above without it), `--only M1,M2`
//! (those methods' lines, with the yardsticks task_arithmetic and ties).

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The architecture of the synthetic models.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    vocab: usize,
    ctx: usize,
    d: usize,
    layers: usize,
}

const GPT2_SMALL: Shape = Shape {
    vocab: 50257,
    ctx: 1024,
    d: 768,
    layers: 12,
};

const QUICK: Shape = Shape {
    vocab: 1024,
    ctx: 128,
    d: 128,
    layers: 2,
};

/// How a tensor's synthetic values look.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Layer-norm scale: around 1.
    Scale,
    /// Biases and layer-norm shifts: small, around 0.
    Bias,
    /// Weight matrices and embeddings.
    Weight,
}

/// GPT-2's tensors, in the order of the Hugging Face checkpoint's modules.
fn tensors(s: Shape) -> Vec<(String, Vec<usize>, Kind)> {
    let d = s.d;
    let mut t = vec![
        ("wte.weight".to_string(), vec![s.vocab, d], Kind::Weight),
        ("wpe.weight".to_string(), vec![s.ctx, d], Kind::Weight),
    ];
    for i in 0..s.layers {
        let p = |n: &str| format!("h.{i}.{n}");
        t.extend([
            (p("ln_1.weight"), vec![d], Kind::Scale),
            (p("ln_1.bias"), vec![d], Kind::Bias),
            (p("attn.c_attn.weight"), vec![d, 3 * d], Kind::Weight),
            (p("attn.c_attn.bias"), vec![3 * d], Kind::Bias),
            (p("attn.c_proj.weight"), vec![d, d], Kind::Weight),
            (p("attn.c_proj.bias"), vec![d], Kind::Bias),
            (p("ln_2.weight"), vec![d], Kind::Scale),
            (p("ln_2.bias"), vec![d], Kind::Bias),
            (p("mlp.c_fc.weight"), vec![d, 4 * d], Kind::Weight),
            (p("mlp.c_fc.bias"), vec![4 * d], Kind::Bias),
            (p("mlp.c_proj.weight"), vec![4 * d, d], Kind::Weight),
            (p("mlp.c_proj.bias"), vec![d], Kind::Bias),
        ]);
    }
    t.push(("ln_f.weight".to_string(), vec![d], Kind::Scale));
    t.push(("ln_f.bias".to_string(), vec![d], Kind::Bias));
    t
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// xorshift64*, seeded per (model, tensor): fast and reproducible.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(a: u64, b: u64) -> Self {
        let mut z = a
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(b.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(z | 1)
    }

    /// Uniform in [-1, 1).
    #[inline]
    pub(crate) fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// Fills `out` with tensor `index`'s values in model `model` (0 = base):
/// the base's values plus, for fine-tunes, a small task vector.
fn fill(out: &mut [f32], kind: Kind, index: usize, model: usize) {
    let mut base = Rng::new(0, index as u64);
    let (center, scale) = match kind {
        Kind::Scale => (1.0, 0.1),
        Kind::Bias => (0.0, 0.01),
        Kind::Weight => (0.0, 0.05),
    };
    for v in out.iter_mut() {
        *v = center + scale * base.next();
    }
    if model > 0 {
        let mut delta = Rng::new(model as u64, index as u64);
        let s = scale * 0.02;
        for v in out.iter_mut() {
            *v += s * delta.next();
        }
    }
}

/// Round-to-nearest-even f32 → bf16 (finite inputs).
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Dt {
    F32,
    Bf16,
}

impl Dt {
    fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 => 2,
        }
    }
    fn st(self) -> &'static str {
        match self {
            Dt::F32 => "F32",
            Dt::Bf16 => "BF16",
        }
    }
    fn torch(self) -> &'static str {
        match self {
            Dt::F32 => "float32",
            Dt::Bf16 => "bfloat16",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::Bf16 => "bf16",
        }
    }
}

/// Writes one model directory (`model.safetensors` + `config.json`); returns
/// the size of the weights file.
pub(crate) fn write_model(dir: &Path, shape: Shape, dt: Dt, model: usize) -> Result<u64> {
    fs::create_dir_all(dir)?;
    let list = tensors(shape);
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0usize;
    for (name, shape, _) in &list {
        let bytes = numel(shape) * dt.size();
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            dt.st(),
            dims.join(","),
            offset + bytes
        ));
        offset += bytes;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let path = dir.join("model.safetensors");
    let mut w = BufWriter::with_capacity(8 << 20, File::create(&path)?);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for (i, (_, shape, kind)) in list.iter().enumerate() {
        values.resize(numel(shape), 0f32);
        fill(&mut values, *kind, i, model);
        bytes.clear();
        match dt {
            Dt::F32 => values.iter().for_each(|v| bytes.extend(v.to_le_bytes())),
            Dt::Bf16 => values
                .iter()
                .for_each(|v| bytes.extend(bf16_bits(*v).to_le_bytes())),
        }
        w.write_all(&bytes)?;
    }
    w.flush()?;
    drop(w);
    let config = format!(
        "{{\n  \"architectures\": [\"GPT2LMHeadModel\"],\n  \"model_type\": \"gpt2\",\n  \"n_ctx\": {ctx},\n  \"n_embd\": {d},\n  \"n_head\": {h},\n  \"n_layer\": {l},\n  \"n_positions\": {ctx},\n  \"vocab_size\": {v},\n  \"torch_dtype\": \"{t}\"\n}}\n",
        ctx = shape.ctx,
        d = shape.d,
        h = (shape.d / 64).max(1),
        l = shape.layers,
        v = shape.vocab,
        t = dt.torch()
    );
    fs::write(dir.join("config.json"), config)?;
    Ok(fs::metadata(&path)?.len())
}

/// One measurement of the floor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Floor {
    /// Every input read once, one after the other.
    pub(crate) read: Duration,
    /// Then an output-sized file written once and synced.
    pub(crate) write: Duration,
    /// The same reads and write at the same time (a thread per input and
    /// one writer), as a merge overlaps them.
    pub(crate) together: Duration,
}

impl Floor {
    /// The faster of the two ways: the least time this machine needed to
    /// move the merge's bytes.
    pub(crate) fn best(&self) -> Duration {
        (self.read + self.write).min(self.together)
    }
}

/// The floor: read every input byte once, write an output-sized file once
/// (synced), first one after the other, then at the same time.
pub(crate) fn floor(inputs: &[PathBuf], out_bytes: u64, scratch: &Path) -> Result<Floor> {
    let mut buf = vec![0u8; 8 << 20];
    let t = Instant::now();
    for p in inputs {
        std::hint::black_box(read_through(p, &mut buf)?);
    }
    let read = t.elapsed();
    let t = Instant::now();
    let path = scratch.join("floor.bin");
    write_synced(&path, out_bytes, &buf)?;
    let write = t.elapsed();
    fs::remove_file(&path)?;
    let together = floor_together(inputs, out_bytes, scratch)?;
    Ok(Floor {
        read,
        write,
        together,
    })
}

/// Every input read once (a thread each) while an output-sized file is
/// written and synced (another thread): the I/O floor of a merge that
/// overlaps its reads and writes. Returns the wall time.
pub(crate) fn floor_together(
    inputs: &[PathBuf],
    out_bytes: u64,
    scratch: &Path,
) -> Result<Duration> {
    let path = scratch.join("floor.bin");
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let readers: Vec<_> = inputs
            .iter()
            .map(|p| s.spawn(move || read_through(p, &mut vec![0u8; 8 << 20])))
            .collect();
        let writer = s.spawn(|| write_synced(&path, out_bytes, &vec![1u8; 8 << 20]));
        for r in readers {
            std::hint::black_box(r.join().expect("floor reader panicked")?);
        }
        writer.join().expect("floor writer panicked")
    })?;
    let wall = t.elapsed();
    fs::remove_file(&path)?;
    Ok(wall)
}

/// Reads all of `path` through `buf`; returns a byte of what it read, so
/// that the reads cannot be optimised away.
pub(crate) fn read_through(path: &Path, buf: &mut [u8]) -> Result<u8> {
    let mut f = File::open(path).with_context(|| path.display().to_string())?;
    let mut x = 0u8;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            return Ok(x);
        }
        x ^= buf[n - 1];
    }
}

/// Writes `bytes` bytes (copies of `buf`) to a new file at `path` and
/// syncs it, syncing in the background as `tensormerge`'s writer does (the
/// same [`Writeback`](tensormerge::io::Writeback), as often), so that the
/// floor gets the same head start on the disk as a merge.
pub(crate) fn write_synced(path: &Path, bytes: u64, buf: &[u8]) -> Result<()> {
    use tensormerge::io::Writeback;
    let mut f = File::create(path).with_context(|| path.display().to_string())?;
    let mut writeback = Writeback::new(&f)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
        writeback.written(n as u64);
    }
    writeback.finish()?;
    f.sync_all()?;
    Ok(())
}

/// Makes `cmd` spawn its child so that the child's `ru_maxrss` is (nearly)
/// its own.
///
/// Linux carries the RSS high-water mark of the address space a process
/// replaces at `execve` into its `ru_maxrss`. `Command` spawns with `vfork`
/// semantics (posix_spawn), where that address space is this process's, so
/// the child would report our peak (the generator's buffers). A `pre_exec`
/// hook makes `Command` use a real `fork`, whose copy starts its high-water
/// mark at our *current* RSS; `malloc_trim` first hands the memory our
/// allocator keeps after frees (the generator's and checker's buffers) back
/// to the system, so that this is small (`scale::inherited` measures it).
pub(crate) fn real_fork(cmd: &mut Command) {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only releases free memory of glibc's heap.
    unsafe {
        libc::malloc_trim(0);
    }
    // SAFETY: the hook does nothing, so it is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| Ok(()));
    }
}

/// Runs `cmd`, waits with `wait4` and returns (wall time, exit status, peak
/// RSS in bytes, CPU time user + system).
pub(crate) fn run_measured(cmd: &mut Command) -> Result<(Duration, i32, u64, Duration)> {
    real_fork(cmd);
    let t = Instant::now();
    let child = cmd.spawn().context("starting tensormerge")?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero `rusage` is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (we never call
    // `Child::wait`); `status` and `usage` are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = t.elapsed();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    // Linux reports ru_maxrss in KiB.
    Ok((wall, code, usage.ru_maxrss as u64 * 1024, cpu))
}

pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The task arithmetic of the config files, written as an expression: the
/// weights 0.5, 0.3, 0.2 on the task vectors, λ = 1.
const EVAL_EXPR: &str = "base + (0.5 * (ft1 - base) + 0.3 * (ft2 - base) + 0.2 * (ft3 - base))";

/// Most peak RSS of each merge (issue #13).
const MAX_RSS: u64 = 256 << 20;

/// The merges of the main table with their targets, as ratios to the floor
/// (issue #13: on two cores, f32 task_arithmetic ≤ 1.15×, f32 ties ≤ 1.6×,
/// bf16 task_arithmetic ≤ 1.3×, bf16 ties ≤ 2×, eval ≤ 1.3×).
fn targets(dt: Dt) -> [(&'static str, f64); 3] {
    match dt {
        Dt::F32 => [("task_arithmetic", 1.15), ("ties", 1.6), ("eval", 1.3)],
        Dt::Bf16 => [("task_arithmetic", 1.3), ("ties", 2.0), ("eval", 1.3)],
    }
}

pub(crate) fn config(method: &str, root: &Path, dt: Dt) -> String {
    let m = |n: &str| root.join(n).display().to_string();
    let mut s = format!(
        "merge_method: {method}\nbase_model: {}\ndtype: {}\nmodels:\n",
        m("base"),
        dt.torch()
    );
    for (i, w) in [0.5, 0.3, 0.2].iter().enumerate() {
        s.push_str(&format!(
            "  - model: {}\n    parameters:\n",
            m(&format!("ft{}", i + 1))
        ));
        s.push_str(&format!("      weight: {w}\n"));
        if method == "ties" {
            s.push_str("      density: 0.2\n");
        }
    }
    s
}

struct Args {
    quick: bool,
    dir: Option<PathBuf>,
    keep: bool,
    bin: Option<PathBuf>,
    check: bool,
    jobs: Option<String>,
    repeat: usize,
    /// `--methods`: only the per-method lines.
    methods_only: bool,
    /// `--only a,b`: the per-method lines of these methods (and the yardsticks).
    only: Option<Vec<String>>,
}

/// The options of `cargo xtask bench` (the GPT-2-small merges).
pub(crate) const USAGE: &str = "usage: cargo xtask bench [--quick] [--dir DIR] [--keep] [--bin PATH] [--check] [-j N] [--repeat N] [--methods] [--only M1,M2]";

/// The options of `cargo xtask bench --nn`.
pub(crate) const NN_USAGE: &str = "usage: cargo xtask bench --nn [--quick]";

fn parse_args(args: &[String]) -> Result<Args> {
    let mut a = Args {
        quick: false,
        dir: None,
        keep: false,
        bin: None,
        check: false,
        jobs: None,
        repeat: 1,
        methods_only: false,
        only: None,
    };
    let mut it = args.iter();
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--keep" => a.keep = true,
            "--check" => a.check = true,
            "--methods" => a.methods_only = true,
            "--only" => {
                a.only = Some(
                    it.next()
                        .context("--only needs a comma-separated list of methods")?
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                )
            }
            "--dir" => a.dir = Some(it.next().context("--dir needs a path")?.into()),
            "--bin" => a.bin = Some(it.next().context("--bin needs a path")?.into()),
            "-j" | "--jobs" => a.jobs = Some(it.next().context("-j needs a number")?.clone()),
            "--repeat" => {
                a.repeat = it
                    .next()
                    .context("--repeat needs a number")?
                    .parse()
                    .ok()
                    .filter(|n: &usize| *n >= 1)
                    .context("--repeat needs a positive number")?
            }
            other => bail!("unknown option `{other}`\n{USAGE}"),
        }
    }
    Ok(a)
}

pub(crate) fn build_binary() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building tensormerge (release)...");
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "tensormerge-cli",
            "--bin",
            "tensormerge",
        ])
        .status()?;
    if !status.success() {
        bail!("building tensormerge failed: {status}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_relative() {
        root.join(target)
    } else {
        target
    };
    Ok(target.join("release").join("tensormerge"))
}

/// Removes the work directory unless asked to keep it.
struct Cleanup {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs the task.
pub fn run(args: &[String]) -> Result<()> {
    // Buffers of 256 KiB and more straight from the system and back to it
    // when freed: glibc otherwise raises this threshold after the first
    // large free, and the floor's 8 MiB read buffers (a thread each) would
    // stay in its heaps, in the resident set every child inherits at the
    // fork (see `real_fork`), and in the children's peak RSS.
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` only changes glibc's allocation policy.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
    if args.iter().any(|a| a == "--scale") {
        return crate::scale::run(args);
    }
    if args.iter().any(|a| a == "--nn") {
        let mut c = Command::new(env!("CARGO"));
        c.args([
            "run",
            "--release",
            "-p",
            "tensormerge-nn",
            "--example",
            "nn-bench",
            "--",
        ]);
        if args.iter().any(|a| a == "--quick") {
            c.arg("--quick");
        }
        let status = c.status().context("cannot run cargo")?;
        if !status.success() {
            bail!("the nn bench failed: {status}");
        }
        return Ok(());
    }
    let args = parse_args(args)?;
    let shape = if args.quick { QUICK } else { GPT2_SMALL };
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => build_binary()?,
    };
    if !bin.is_file() {
        bail!("no tensormerge binary at {}", bin.display());
    }
    let (root, fresh) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("tensormerge-bench-{}", std::process::id())),
            true,
        ),
    };
    fs::create_dir_all(&root)?;
    let _cleanup = Cleanup {
        dir: root.clone(),
        keep: args.keep || !fresh,
    };
    let params: usize = tensors(shape).iter().map(|(_, s, _)| numel(s)).sum();
    println!(
        "models: GPT-2 shape (vocab {}, ctx {}, d {}, {} layers), {} parameters, 1 base + 3 fine-tunes",
        shape.vocab, shape.ctx, shape.d, shape.layers, params
    );
    println!("binary: {}", bin.display());
    let load = |when: &str| {
        if let Ok(l) = fs::read_to_string("/proc/loadavg") {
            println!(
                "load average {when}: {} ({} cores)",
                l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
        }
    };
    load("before");
    let mut missed = Vec::new();
    if args.methods_only {
        missed.extend(crate::bench_methods::run(
            &bin,
            &root,
            shape,
            args.only.as_deref(),
            args.jobs.as_deref(),
            args.repeat,
        )?);
    }
    let dtypes: &[Dt] = if args.methods_only {
        &[]
    } else {
        println!(
            "{:<5} {:<16} {:>9} {:>11} {:>10} {:>9} {:>7} {:>7}  verdict",
            "dtype", "method", "wall", "input/s", "peak RSS", "floor", "ratio", "target"
        );
        &[Dt::F32, Dt::Bf16]
    };
    for &dt in dtypes {
        let dir = root.join(dt.label());
        let mut inputs = Vec::new();
        let t = Instant::now();
        for (i, name) in ["base", "ft1", "ft2", "ft3"].iter().enumerate() {
            let mdir = dir.join(name);
            let file = mdir.join("model.safetensors");
            if !file.is_file() {
                write_model(&mdir, shape, dt, i)?;
            }
            inputs.push(file);
        }
        let input_bytes: u64 = inputs
            .iter()
            .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let out_bytes = fs::metadata(&inputs[0])?.len();
        eprintln!(
            "{}: {:.0} MiB of inputs ready in {:.1} s",
            dt.label(),
            mib(input_bytes),
            t.elapsed().as_secs_f64()
        );
        // The floor: best of three, so the merge is compared with the
        // fastest plain read + write this machine managed (one after the
        // other, or at the same time).
        let mut best = Duration::MAX;
        let mut parts = None;
        for _ in 0..3 {
            let f = floor(&inputs, out_bytes, &dir)?;
            if f.best() < best {
                best = f.best();
                parts = Some(f);
            }
        }
        let parts = parts.expect("three floors measured");
        println!(
            "{:<5} {:<16} {:>8.3}s {:>7.0} MB/s {:>10} {:>9} {:>7} {:>7}  read {:.2} s + write&sync {:.2} s; together {:.2} s",
            dt.label(),
            "floor",
            best.as_secs_f64(),
            input_bytes as f64 / best.as_secs_f64() / 1e6,
            "",
            "",
            "1.0x",
            "",
            parts.read.as_secs_f64(),
            parts.write.as_secs_f64(),
            parts.together.as_secs_f64()
        );
        let runs = targets(dt);
        for (method, target) in runs {
            let out = dir.join(format!("out-{method}"));
            let _ = fs::remove_dir_all(&out);
            let err_path = dir.join(format!("{method}.err"));
            let mut cmd = Command::new(&bin);
            cmd.arg("--no-progress");
            if method == "eval" {
                // The same task arithmetic, as an expression (`tensormerge eval`).
                cmd.arg("eval").arg(EVAL_EXPR);
                for name in ["base", "ft1", "ft2", "ft3"] {
                    cmd.arg("--model")
                        .arg(format!("{name}={}", dir.join(name).display()));
                }
            } else {
                let cfg = dir.join(format!("{method}.yml"));
                fs::write(&cfg, config(method, &dir, dt))?;
                cmd.arg("merge").arg(&cfg);
                if let Some(j) = &args.jobs {
                    cmd.arg("-j").arg(j);
                }
            }
            cmd.arg("-o").arg(&out).stdin(Stdio::null());
            // Best wall time of `--repeat` runs (the machine may be shared),
            // with that run's CPU time; the largest peak RSS of all runs.
            let (mut wall, mut code, mut rss, mut cpu) = (Duration::MAX, 0, 0u64, Duration::ZERO);
            let mut written = 0;
            for _ in 0..args.repeat {
                cmd.stdout(File::create(dir.join(format!("{method}.log")))?)
                    .stderr(File::create(&err_path)?);
                let (w, c, r, u) = run_measured(&mut cmd)?;
                written = dir_bytes(&out);
                let _ = fs::remove_dir_all(&out);
                rss = rss.max(r);
                code = c;
                if c != 0 {
                    break;
                }
                if w < wall {
                    (wall, cpu) = (w, u);
                }
            }
            let label = format!("{} {method}", dt.label());
            if code != 0 || written < out_bytes * 9 / 10 {
                let err = fs::read_to_string(&err_path).unwrap_or_default();
                let err = err.lines().take(6).collect::<Vec<_>>().join("\n      ");
                println!(
                    "{:<5} {:<16} FAILED (exit {code}, {written} bytes written): {err}",
                    dt.label(),
                    method
                );
                missed.push(label);
                continue;
            }
            let ratio = wall.as_secs_f64() / best.as_secs_f64();
            let rss_ok = rss <= MAX_RSS;
            if !(ratio <= target && rss_ok) {
                missed.push(label);
            }
            println!(
                "{:<5} {:<16} {:>8.3}s {:>7.0} MB/s {:>6.0} MiB {:>8.3}s {:>6.2}x {:>6.1}x  {} (cpu {:.2} s)",
                dt.label(),
                method,
                wall.as_secs_f64(),
                input_bytes as f64 / wall.as_secs_f64() / 1e6,
                mib(rss),
                best.as_secs_f64(),
                ratio,
                target,
                match (ratio <= target, rss_ok) {
                    (true, true) => "ok",
                    (false, true) => "SLOW",
                    (true, false) => "RSS over 256 MiB",
                    (false, false) => "SLOW, RSS over 256 MiB",
                },
                cpu.as_secs_f64()
            );
        }
    }
    if !args.methods_only {
        missed.extend(crate::bench_methods::run(
            &bin,
            &root,
            shape,
            args.only.as_deref(),
            args.jobs.as_deref(),
            args.repeat,
        )?);
    }
    load("after");
    if !missed.is_empty() {
        println!("missed or failed: {}", missed.join(", "));
        if args.check {
            bail!("targets missed: {}", missed.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_its_parameter_count() {
        let n: usize = tensors(GPT2_SMALL).iter().map(|(_, s, _)| numel(s)).sum();
        assert_eq!(n, 124_439_808);
        assert_eq!(tensors(GPT2_SMALL).len(), 2 + 12 * 12 + 2);
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        for x in [1.0f32, -0.3, 0.1, 3.3, 1e-20, 65504.0] {
            let b = bf16_bits(x);
            let back = f32::from_bits((b as u32) << 16);
            let next = f32::from_bits(((b as u32) + 1) << 16);
            let prev = f32::from_bits(((b as u32) - 1) << 16);
            assert!((x - back).abs() <= (x - next).abs() && (x - back).abs() <= (x - prev).abs());
        }
    }

    #[test]
    fn written_models_have_a_valid_safetensors_header() {
        let dir = std::env::temp_dir().join(format!("tm-bench-test-{}", std::process::id()));
        let size = write_model(&dir, QUICK, Dt::Bf16, 1).unwrap();
        let bytes = fs::read(dir.join("model.safetensors")).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let params: usize = tensors(QUICK).iter().map(|(_, s, _)| numel(s)).sum();
        assert_eq!(size as usize, 8 + n + params * 2);
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(header.contains("\"h.1.mlp.c_proj.bias\":{\"dtype\":\"BF16\",\"shape\":[128]"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
