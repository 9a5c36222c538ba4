//! `cargo xtask bench --scale`: merges of checkpoints larger than memory.
//!
//! For each size (`--sizes`, fractions of `--scale-gb`, default 0.25, 0.5
//! and 1 of 10 GB per input) it writes a base and three fine-tunes in BF16
//! with Llama-7B's tensor shapes (d 4096, MLP 11008, vocabulary 32000; the
//! number of layers chosen so that each file is about the asked size), then,
//! through the release `tensormerge` binary as a child process:
//!
//! - the I/O floor on the same files in the same run: every input read once
//!   and an output-sized file written and synced, all at once (one thread
//!   per input, one writing), as a merge overlaps them; measured cold, then
//!   again at once (warm: whatever of the inputs the page cache kept);
//! - `task_arithmetic` on one worker, cold, then again at once (against the
//!   warm floor; its output must be byte-identical to the first run's);
//! - the same task arithmetic split over two workers on this machine
//!   (`--shard 0/2` and `--shard 1/2` at once, `-j 1` each) plus `join`,
//!   whose output must be byte-identical to the one-worker output;
//! - `ties` (density 0.2) on one worker, cold;
//! - for each: wall time, ratio to the floor, peak RSS (`ru_maxrss`, target
//!   < 1 GiB; a child's figure is never below what it inherits from this
//!   process at the fork, so figures at that level are shown as "≤");
//! - every output checked against an independent recomputation (in this
//!   file, from the input bytes, in f64) of a sample of tensors: task
//!   arithmetic to within one BF16 step per element, ties likewise except
//!   where a model's |τ| equals its trim threshold exactly (which of those
//!   entries a top-k keeps is a tie-breaking choice; they are counted and
//!   left out).
//!
//! Every merge writes 1 GB output shards (`--out-shard-size 1GB`), so that
//! even the smallest size gives both workers shards to write. Outputs are
//! compared by SHA-256 of each file, and each is deleted before the next
//! is written, so the disk must hold the four inputs and one output (checked
//! first, with a 1 GB margin); the generated inputs are deleted after each
//! size unless `--keep`.
//!
//! The page cache is dropped (`echo 3 > /proc/sys/vm/drop_caches`, root
//! only) before the floor and before each cold run; without root every run
//! is warm (whatever of the inputs the page cache holds), and the report
//! says which.
//!
//! Options: `--scale-gb G` (size of each input at 1x; default 10),
//! `--sizes 0.25,0.5,1`, `--dir DIR` (default: a fresh directory under the
//! system temporary directory), `--keep`, `--bin PATH`.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::{
    Dt, Rng, bf16_bits, build_binary, config, floor_together, mib, real_fork, run_measured,
};

/// Llama-7B's widths.
const D: usize = 4096;
const FFN: usize = 11008;
const VOCAB: usize = 32000;

/// Peak RSS target of every merge.
const RSS_LIMIT: u64 = 1 << 30;

/// `--out-shard-size` of every merge: small enough that even the smallest
/// size has several output shards for the two `--shard` workers to share.
const OUT_SHARD: &str = "1GB";

/// The tensors of a Llama-shaped model with `layers` layers, in checkpoint
/// order.
fn llama(layers: usize) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, D])];
    for i in 0..layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        t.extend([
            (p("input_layernorm.weight"), vec![D]),
            (p("self_attn.q_proj.weight"), vec![D, D]),
            (p("self_attn.k_proj.weight"), vec![D, D]),
            (p("self_attn.v_proj.weight"), vec![D, D]),
            (p("self_attn.o_proj.weight"), vec![D, D]),
            (p("post_attention_layernorm.weight"), vec![D]),
            (p("mlp.gate_proj.weight"), vec![FFN, D]),
            (p("mlp.up_proj.weight"), vec![FFN, D]),
            (p("mlp.down_proj.weight"), vec![D, FFN]),
        ]);
    }
    t.push(("model.norm.weight".to_string(), vec![D]));
    t.push(("lm_head.weight".to_string(), vec![VOCAB, D]));
    t
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// Layers so that a BF16 file is about `bytes` (at least one).
fn layers_for(bytes: f64) -> usize {
    let fixed = (2 * VOCAB * D + D) as f64 * 2.0;
    let per_layer = (4 * D * D + 3 * D * FFN + 2 * D) as f64 * 2.0;
    (((bytes - fixed) / per_layer).round() as i64).max(1) as usize
}

/// Values of element range `start..start + out.len()` of tensor `index` in
/// model `model` (0 = base): base values plus, for a fine-tune, a task
/// vector. Generated in blocks of 4096 elements, each from its own stream,
/// so any range can be regenerated (and the files written in pieces).
fn values(out: &mut [f32], index: usize, model: usize, start: usize, norm: bool) {
    let (center, scale) = if norm { (1.0, 0.1) } else { (0.0, 0.05) };
    let mut i = 0;
    while i < out.len() {
        let block = (start + i) / 4096;
        let off = (start + i) % 4096;
        let n = (4096 - off).min(out.len() - i);
        let mut b = Rng::new(0, ((index as u64) << 32) | block as u64);
        let mut d = Rng::new(model as u64, ((index as u64) << 32) | block as u64);
        for _ in 0..off {
            b.next();
            d.next();
        }
        for v in &mut out[i..i + n] {
            *v = center + scale * b.next();
            if model > 0 {
                *v += scale * 0.02 * d.next();
            } else {
                d.next();
            }
        }
        i += n;
    }
}

/// Writes a BF16 model directory (`model.safetensors`, `config.json`).
fn write_model(dir: &Path, layers: usize, model: usize) -> Result<u64> {
    fs::create_dir_all(dir)?;
    let list = llama(layers);
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0usize;
    for (name, shape) in &list {
        let bytes = numel(shape) * 2;
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
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
    let mut vals = vec![0f32; 1 << 20];
    let mut bytes = Vec::with_capacity(2 << 20);
    for (i, (name, shape)) in list.iter().enumerate() {
        let n = numel(shape);
        let mut at = 0;
        while at < n {
            let k = (n - at).min(vals.len());
            values(&mut vals[..k], i, model, at, name.contains("norm"));
            bytes.clear();
            for v in &vals[..k] {
                bytes.extend(bf16_bits(*v).to_le_bytes());
            }
            w.write_all(&bytes)?;
            at += k;
        }
    }
    w.flush()?;
    drop(w);
    fs::write(
        dir.join("config.json"),
        format!(
            "{{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"model_type\": \"llama\",\n  \"hidden_size\": {D},\n  \"intermediate_size\": {FFN},\n  \"num_hidden_layers\": {layers},\n  \"vocab_size\": {VOCAB},\n  \"torch_dtype\": \"bfloat16\"\n}}\n"
        ),
    )?;
    Ok(fs::metadata(&path)?.len())
}

/// Where each tensor of a safetensors model directory lives:
/// (file, absolute offset, dtype).
struct Located {
    file: PathBuf,
    offset: u64,
    dtype: String,
    numel: usize,
}

fn locate(dir: &Path, name: &str) -> Result<Located> {
    let index = dir.join("model.safetensors.index.json");
    let file = if index.is_file() {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&index)?)?;
        let f = v["weight_map"][name]
            .as_str()
            .with_context(|| format!("{name} not in {}", index.display()))?;
        dir.join(f)
    } else {
        dir.join("model.safetensors")
    };
    let mut f = File::open(&file).with_context(|| file.display().to_string())?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)?;
    let v: serde_json::Value = serde_json::from_slice(&h)?;
    let t = &v[name];
    let start = t["data_offsets"][0].as_u64().context("data_offsets")?;
    let shape: Vec<usize> = t["shape"]
        .as_array()
        .context("shape")?
        .iter()
        .map(|d| d.as_u64().unwrap_or(0) as usize)
        .collect();
    Ok(Located {
        file,
        offset: 8 + n + start,
        dtype: t["dtype"].as_str().unwrap_or("").to_string(),
        numel: numel(&shape),
    })
}

/// A BF16 tensor as f32.
fn read_bf16(dir: &Path, name: &str) -> Result<Vec<f32>> {
    let l = locate(dir, name)?;
    if l.dtype != "BF16" {
        bail!("{name} in {} is {}, not BF16", dir.display(), l.dtype);
    }
    let mut f = File::open(&l.file)?;
    f.seek(SeekFrom::Start(l.offset))?;
    let mut b = vec![0u8; l.numel * 2];
    f.read_exact(&mut b)?;
    Ok(b.chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect())
}

/// BF16 steps between two BF16 values (as f32).
fn ulps(a: f32, b: f32) -> u32 {
    let k = |x: f32| {
        let u = (x.to_bits() >> 16) as i32;
        if u & 0x8000 != 0 { 0x8000 - u } else { u }
    };
    (k(a) - k(b)).unsigned_abs()
}

/// The sample checked: the embedding, three projections at the start,
/// middle and end, the final norm.
fn sample(layers: usize) -> Vec<String> {
    let mid = layers / 2;
    vec![
        "model.embed_tokens.weight".into(),
        "model.layers.0.self_attn.q_proj.weight".into(),
        format!("model.layers.{mid}.mlp.down_proj.weight"),
        format!("model.layers.{}.mlp.up_proj.weight", layers - 1),
        "model.norm.weight".into(),
    ]
}

/// The weights and densities of `bench::config`.
const WEIGHTS: [f64; 3] = [0.5, 0.3, 0.2];
const DENSITY: f64 = 0.2;

/// Checks `out`'s sample tensors against an independent computation.
/// Returns (elements compared, elements left out, largest BF16 step
/// difference).
fn check(root: &Path, out: &Path, method: &str, layers: usize) -> Result<(u64, u64, u32)> {
    let (mut compared, mut skipped, mut worst) = (0u64, 0u64, 0u32);
    for name in sample(layers) {
        let base = read_bf16(&root.join("base"), &name)?;
        let fts: Vec<Vec<f32>> = (1..=3)
            .map(|i| read_bf16(&root.join(format!("ft{i}")), &name))
            .collect::<Result<_>>()?;
        let got = read_bf16(out, &name)?;
        let n = base.len();
        // ties: each model's trim threshold, the k-th largest |τ|.
        let thresholds: Vec<f32> = if method == "ties" {
            fts.iter()
                .map(|ft| {
                    let mut a: Vec<f32> =
                        ft.iter().zip(&base).map(|(x, b)| (x - b).abs()).collect();
                    let k = (DENSITY * n as f64).floor() as usize;
                    if k == 0 {
                        return f32::INFINITY;
                    }
                    let (_, t, _) = a.select_nth_unstable_by(k - 1, |x, y| y.total_cmp(x));
                    *t
                })
                .collect()
        } else {
            Vec::new()
        };
        for e in 0..n {
            let b = base[e] as f64;
            let expected = if method == "ties" {
                let tau: Vec<f32> = fts.iter().map(|ft| ft[e] - base[e]).collect();
                if tau.iter().zip(&thresholds).any(|(t, th)| t.abs() == *th) {
                    skipped += 1;
                    continue;
                }
                let delta: Vec<f64> = tau
                    .iter()
                    .zip(&thresholds)
                    .zip(WEIGHTS)
                    .map(|((t, th), w)| if t.abs() > *th { w * *t as f64 } else { 0.0 })
                    .collect();
                let sum: f64 = delta.iter().sum();
                let elected_pos = sum >= 0.0;
                let (mut num, mut den) = (0.0, 0.0);
                for (d, w) in delta.iter().zip(WEIGHTS) {
                    if *d != 0.0 && (*d > 0.0) == elected_pos {
                        num += d;
                        den += w;
                    }
                }
                b + if den != 0.0 { num / den } else { 0.0 }
            } else {
                b + fts
                    .iter()
                    .zip(WEIGHTS)
                    .map(|(ft, w)| w * (ft[e] as f64 - b))
                    .sum::<f64>()
            };
            let expected = f32::from_bits((bf16_bits(expected as f32) as u32) << 16);
            worst = worst.max(ulps(expected, got[e]));
            compared += 1;
        }
    }
    Ok((compared, skipped, worst))
}

/// Each file of a model directory with its SHA-256 (`sha256sum`), in name
/// order: two outputs are byte-identical when these are equal. Checksums
/// instead of a byte comparison, so that only one output need be on disk
/// at a time.
fn digests(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    let out = Command::new("sha256sum")
        .args(&names)
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .context("running sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum failed in {}", dir.display());
    }
    let text = String::from_utf8(out.stdout)?;
    let sums: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if sums.len() != names.len() {
        bail!(
            "sha256sum gave {} sums for {} files in {}",
            sums.len(),
            names.len(),
            dir.display()
        );
    }
    Ok(names.into_iter().zip(sums).collect())
}

/// The task arithmetic of `cfg` split over two `--shard` workers running at
/// once on this machine (`-j 1` each), then `join`; the result compared
/// with the one-worker `reference`. Returns (workers' wall time, join's,
/// peak RSS as text, whether all is well, the check's text).
fn sharded(
    bin: &Path,
    cfg: &Path,
    out: &Path,
    reference: &[(String, String)],
) -> Result<(Duration, Duration, String, bool, String)> {
    drop_caches();
    let mut cmds: Vec<Command> = (0..2)
        .map(|i| {
            let mut c = Command::new(bin);
            c.args(["--no-progress", "merge"])
                .arg(cfg)
                .arg("-o")
                .arg(out)
                .args(["--out-shard-size", OUT_SHARD])
                .args(["-j", "1", "--shard", &format!("{i}/2")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c
        })
        .collect();
    let (wall_w, results) = run_together(&mut cmds)?;
    let mut join = Command::new(bin);
    join.args(["--no-progress", "join"])
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (wall_j, code_j, rss_j, _) = run_measured(&mut join)?;
    let worst = results.iter().map(|r| r.1).max().unwrap_or(0).max(rss_j);
    let floor = inherited();
    let rss = format!(
        "workers {}, join {}",
        results
            .iter()
            .map(|r| peak_text(r.1, floor))
            .collect::<Vec<_>>()
            .join(" and "),
        peak_text(rss_j, floor)
    );
    let codes_ok = results.iter().all(|r| r.0 == 0) && code_j == 0;
    let same = codes_ok && digests(out)? == reference;
    let text = if same {
        format!("ok: byte-identical to 1 worker ({} files)", reference.len())
    } else {
        format!(
            "FAILED: exit codes {:?}, join {code_j}; differs from 1 worker",
            results.iter().map(|r| r.0).collect::<Vec<_>>()
        )
    };
    Ok((wall_w, wall_j, rss, same && worst < RSS_LIMIT, text))
}

/// The peak RSS a child spawned now would report if it used no memory of
/// its own: the resident set it inherits from this process at the fork
/// (see `bench::real_fork`), measured by spawning `true` the same way.
/// A child's `ru_maxrss` is the larger of this and its own peak.
fn inherited() -> u64 {
    let mut t = Command::new("true");
    t.stdin(Stdio::null()).stdout(Stdio::null());
    run_measured(&mut t).map_or(0, |r| r.2)
}

/// A peak RSS as text; at or below what a child inherits (`floor`) the
/// child's own peak is only known to be at most that.
fn peak_text(rss: u64, floor: u64) -> String {
    if rss <= floor {
        format!("≤ {:.0} MiB", mib(rss))
    } else {
        format!("{:.0} MiB", mib(rss))
    }
}

/// Drops the page cache (root only). Returns whether it did.
fn drop_caches() -> bool {
    // SAFETY: `sync` takes no arguments and cannot fail.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Free bytes on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path, `s` valid for writes.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        bail!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Runs several children at once; returns the wall time until the last
/// one ended, and each one's exit code and peak RSS.
fn run_together(cmds: &mut [Command]) -> Result<(Duration, Vec<(i32, u64)>)> {
    let t = Instant::now();
    let mut pids = Vec::new();
    for c in cmds.iter_mut() {
        real_fork(c);
        pids.push(c.spawn().context("starting tensormerge")?.id() as libc::pid_t);
    }
    let mut out = Vec::new();
    for pid in pids {
        let mut status: libc::c_int = 0;
        // SAFETY: as in `bench::run_measured`.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our unreaped child; pointers valid for writes.
        if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
            bail!("wait4 failed: {}", std::io::Error::last_os_error());
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        };
        out.push((code, usage.ru_maxrss as u64 * 1024));
    }
    Ok((t.elapsed(), out))
}

struct Args {
    gb: f64,
    sizes: Vec<f64>,
    dir: Option<PathBuf>,
    keep: bool,
    bin: Option<PathBuf>,
}

/// The options of `cargo xtask bench --scale`.
pub(crate) const USAGE: &str = "usage: cargo xtask bench --scale [--scale-gb G] [--sizes 0.25,0.5,1] [--dir DIR] [--keep] [--bin PATH]";

fn parse_args(args: &[String]) -> Result<Args> {
    let mut a = Args {
        gb: 10.0,
        sizes: vec![0.25, 0.5, 1.0],
        dir: None,
        keep: false,
        bin: None,
    };
    let mut it = args.iter();
    let num = |s: Option<&String>, what: &str| -> Result<f64> {
        s.with_context(|| format!("{what} needs a number"))?
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x > 0.0)
            .with_context(|| format!("{what} needs a positive number"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--scale" => {}
            "--scale-gb" => a.gb = num(it.next(), "--scale-gb")?,
            "--sizes" => {
                a.sizes = it
                    .next()
                    .context("--sizes needs a list like 0.25,0.5,1")?
                    .split(',')
                    .map(|s| num(Some(&s.trim().to_string()), "--sizes"))
                    .collect::<Result<_>>()?
            }
            "--dir" => a.dir = Some(it.next().context("--dir needs a path")?.into()),
            "--bin" => a.bin = Some(it.next().context("--bin needs a path")?.into()),
            "--keep" => a.keep = true,
            other => bail!("unknown option `{other}`\n{USAGE}"),
        }
    }
    Ok(a)
}

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

/// Runs the task.
pub fn run(args: &[String]) -> Result<()> {
    let args = parse_args(args)?;
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => build_binary()?,
    };
    if !bin.is_file() {
        bail!("no tensormerge binary at {}", bin.display());
    }
    let root = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tensormerge-scale-{}", std::process::id()))
    });
    fs::create_dir_all(&root)?;
    let cold = drop_caches();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    println!(
        "scale bench: BF16, Llama-7B widths, 1 base + 3 fine-tunes; memory {:.1} GB; page cache {}",
        gb(mem),
        if cold {
            "dropped before every run (cold)"
        } else {
            "not dropped (not root): warm, whatever fits in the page cache"
        }
    );
    let load = || {
        fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    println!("binary: {}; load average before: {}", bin.display(), load());
    println!(
        "| size | layers | inputs | run | wall | floor | ratio | peak RSS | check |\n|---|---|---|---|---|---|---|---|---|"
    );
    let mut failed = Vec::new();
    for &frac in &args.sizes {
        let layers = layers_for(args.gb * frac * 1e9);
        let per_input: u64 = 8 + llama(layers)
            .iter()
            .map(|(_, s)| numel(s) as u64 * 2)
            .sum::<u64>();
        // Peak disk use: the four inputs plus one output (each output is
        // reduced to its checksums and deleted before the next is written;
        // the floor's file is deleted by `floor`).
        let need = per_input * 5 + (1 << 30);
        let free = free_bytes(&root)?;
        if free < need {
            bail!(
                "{frac}x needs {:.1} GB free in {} (4 inputs, 1 output and 1 GB), only {:.1} GB free: use a smaller --scale-gb, fewer --sizes or another --dir",
                gb(need),
                root.display(),
                gb(free)
            );
        }
        let dir = root.join(format!("x{frac}"));
        fs::create_dir_all(&dir)?;
        let t = Instant::now();
        let mut inputs = Vec::new();
        for (i, name) in ["base", "ft1", "ft2", "ft3"].iter().enumerate() {
            write_model(&dir.join(name), layers, i)?;
            inputs.push(dir.join(name).join("model.safetensors"));
        }
        let input_bytes = per_input * 4;
        eprintln!(
            "{frac}x: {:.1} GB of inputs written in {:.0} s",
            gb(input_bytes),
            t.elapsed().as_secs_f64()
        );
        let size = format!("{frac}x");
        let inp = format!("4 x {:.2} GB", gb(per_input));
        drop_caches();
        let fl = floor_together(&inputs, per_input, &dir)?;
        let fl_warm = floor_together(&inputs, per_input, &dir)?;
        let cache = if cold { "cold" } else { "warm" };
        println!(
            "| {size} | {layers} | {inp} | floor, {cache} | {:.0} s | | 1.00x | | |",
            fl.as_secs_f64()
        );
        println!(
            "| {size} | {layers} | {inp} | floor, again at once | {:.0} s | | 1.00x | | |",
            fl_warm.as_secs_f64()
        );
        let row = |run: &str, wall: Duration, fl: Duration, rss: &str, check: &str| {
            println!(
                "| {size} | {layers} | {inp} | {run} | {:.1} s | {:.1} s | {:.2}x | {rss} | {check} |",
                wall.as_secs_f64(),
                fl.as_secs_f64(),
                wall.as_secs_f64() / fl.as_secs_f64(),
            );
        };
        let rss_text = |rss: u64| peak_text(rss, inherited());
        // The reference checksums of the one-worker task arithmetic.
        let mut single: Option<Vec<(String, String)>> = None;
        // (method, page cache dropped first)
        for (method, drop) in [
            ("task_arithmetic", true),
            ("task_arithmetic", false),
            ("ties", true),
        ] {
            let cfg = dir.join(format!("{method}.yml"));
            fs::write(&cfg, config(method, &dir, Dt::Bf16))?;
            let out = dir.join(format!("out-{method}"));
            let err = dir.join(format!("{method}.err"));
            let state = if !drop { "again at once" } else { cache };
            if drop {
                drop_caches();
            }
            let mut cmd = Command::new(&bin);
            cmd.args(["--no-progress", "merge"])
                .arg(&cfg)
                .arg("-o")
                .arg(&out)
                .args(["--out-shard-size", OUT_SHARD])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&err)?);
            let (wall, code, rss, _) = run_measured(&mut cmd)?;
            if code != 0 {
                println!(
                    "| {size} | {layers} | {inp} | {method} | FAILED (exit {code}): {} |",
                    fs::read_to_string(&err)
                        .unwrap_or_default()
                        .lines()
                        .next()
                        .unwrap_or("")
                );
                failed.push(format!("{size} {method}"));
                continue;
            }
            let mut ok = rss < RSS_LIMIT;
            let check_text = if single.is_none() || method != "task_arithmetic" {
                let (n, skipped, worst) = check(&dir, &out, method, layers)?;
                ok &= worst <= 1;
                format!(
                    "{} {n} elements of {} tensors, max {worst} BF16 step(s){}",
                    if ok { "ok:" } else { "FAILED:" },
                    sample(layers).len(),
                    if skipped > 0 {
                        format!(", {skipped} at a trim threshold left out")
                    } else {
                        String::new()
                    }
                )
            } else {
                let same = single.as_ref() == Some(&digests(&out)?);
                ok &= same;
                if same {
                    "ok: byte-identical to the first run".to_string()
                } else {
                    "FAILED: differs from the first run".to_string()
                }
            };
            if !ok {
                failed.push(format!("{size} {method} ({state})"));
            }
            if method == "task_arithmetic" && single.is_none() {
                single = Some(digests(&out)?);
            }
            row(
                &format!("{method}, 1 worker, {state}"),
                wall,
                if drop { fl } else { fl_warm },
                &rss_text(rss),
                &check_text,
            );
            fs::remove_dir_all(&out)?;
            if method == "task_arithmetic" && single.is_some() && !drop {
                // Two workers at once on this machine, then join.
                let out = dir.join("sharded").join("out-task_arithmetic");
                let (wall_w, wall_j, rss, sharded_ok, text) =
                    sharded(&bin, &cfg, &out, single.as_deref().unwrap_or(&[]))?;
                if !sharded_ok {
                    failed.push(format!("{size} sharded"));
                }
                row(
                    &format!(
                        "task_arithmetic, 2 workers (-j 1 each), {cache}: workers {:.0} s + join {:.0} s",
                        wall_w.as_secs_f64(),
                        wall_j.as_secs_f64()
                    ),
                    wall_w + wall_j,
                    fl,
                    &rss,
                    &text,
                );
                let _ = fs::remove_dir_all(dir.join("sharded"));
            }
        }
        if !args.keep {
            fs::remove_dir_all(&dir)?;
        }
    }
    println!("load average after: {}", load());
    if args.dir.is_none() && !args.keep {
        let _ = fs::remove_dir_all(&root);
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_layers() {
        // Llama-7B's 32 layers: 6.74 billion parameters, 13.5 GB in BF16.
        let n: usize = llama(32).iter().map(|(_, s)| numel(s)).sum();
        assert_eq!(n, 6_738_415_616);
        assert_eq!(layers_for(13.48e9), 32);
        assert_eq!(layers_for(1.0), 1);
    }

    #[test]
    fn values_do_not_depend_on_how_a_tensor_is_cut() {
        let mut whole = vec![0f32; 10_000];
        values(&mut whole, 3, 2, 0, false);
        let mut parts = vec![0f32; 10_000];
        let (a, b) = parts.split_at_mut(5_000);
        values(a, 3, 2, 0, false);
        values(b, 3, 2, 5_000, false);
        assert_eq!(whole, parts);
        let mut base = vec![0f32; 10_000];
        values(&mut base, 3, 0, 0, false);
        assert_ne!(base, whole);
        assert!(
            whole
                .iter()
                .zip(&base)
                .all(|(x, b)| (x - b).abs() <= 0.05 * 0.02)
        );
    }

    #[test]
    fn bf16_steps() {
        assert_eq!(ulps(1.0, 1.0), 0);
        let next = f32::from_bits(((1.0f32.to_bits() >> 16) + 1) << 16);
        assert_eq!(ulps(1.0, next), 1);
        let neg = f32::from_bits((0x8000 + 1) << 16);
        assert_eq!(ulps(neg, f32::from_bits(1 << 16)), 2);
    }
}
