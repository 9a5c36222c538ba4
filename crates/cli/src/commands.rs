//! The commands: thin wrappers over the libraries that print results on stdout.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tensormerge::builtin;
use tensormerge::core::DType;
use tensormerge::engine::{EngineError, MergeConfig, RunOptions, execute, execute_part, plan};
use tensormerge::methods::{BaseModel, MergeMethod, Scope};

use crate::cli::{Command, DemoArgs, EvalArgs, MergeArgs, MethodsArgs, MethodsCommand};
use crate::printer::{Printer, Usage};

pub fn run(command: Command, p: &Printer) -> Result<()> {
    match command {
        Command::Merge(a) => merge(a, p),
        Command::Join(a) => crate::shard::join_cmd(a, p),
        Command::Eval(a) => eval(a, p),
        Command::Methods(a) => methods(a),
        Command::Inspect(a) => crate::inspect::inspect(a, p),
        Command::Demo(a) => demo(a, p),
        Command::Lora(a) => crate::lora::run(a, p),
        Command::Generate(a) => crate::nn::generate(a, p),
        Command::Perplexity(a) => crate::nn::perplexity(a, p),
        Command::Fisher(a) => crate::nn::fisher(a, p),
    }
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn merge(a: MergeArgs, p: &Printer) -> Result<()> {
    let config = MergeConfig::from_path(&a.config)
        .map_err(EngineError::from)
        .with_context(|| format!("invalid config `{}`", a.config.display()))?;
    let opts = RunOptions {
        seed: a.seed,
        out_shard_bytes: a.out_shard_size.0,
        overwrite: a.overwrite,
        threads: a.jobs,
        max_memory: a.max_memory.0,
        allow_non_finite: a.allow_non_finite,
        cancel: None,
    };
    let mut opts = opts;
    if a.jobs == Some(0) {
        return Err(Usage::Arg("--jobs must be at least 1".into()).into());
    }
    // Make sure every built-in method is linked and registered.
    let _ = builtin::registry();
    if a.dry_run {
        let plan = plan(&config, &opts)
            .with_context(|| format!("cannot plan the merge of `{}`", a.config.display()))?;
        for w in &plan.warnings {
            p.warn(w);
        }
        println!("{plan}");
        if let Some(s) = a.shard {
            let r =
                tensormerge::io::pieces::assigned_shards(s.worker, s.workers, plan.shards.len());
            let files: Vec<&str> = plan.shards[r.clone()]
                .iter()
                .map(|f| f.file_name.as_str())
                .collect();
            println!(
                "worker {s} writes {} of {} shard(s){}{} (plan {})",
                r.len(),
                plan.shards.len(),
                if files.is_empty() { "" } else { ": " },
                files.join(", "),
                &plan.fingerprint()[..12]
            );
        }
        return Ok(());
    }
    opts.cancel = Some(cancel_on_signal()?);
    let report = plan(&config, &opts)
        .and_then(|mut plan| {
            if a.no_card {
                plan.card = None;
            }
            match a.shard {
                None => execute(&plan, &a.output, &opts, p),
                Some(s) => execute_part(&plan, &a.output, &opts, p, s.worker, s.workers),
            }
        })
        .with_context(|| format!("merge of `{}` failed", a.config.display()))?;
    if let Some(s) = a.shard {
        println!(
            "worker {s}: merged {} tensors ({} copied) into {}: {} shard(s), {} written in {:.1} s (method {}, seed {}); run `tensormerge join {}` when every worker is done",
            report.tensors_merged + report.tensors_copied,
            report.tensors_copied,
            report.out_dir.display(),
            report.shards,
            human(report.bytes_written),
            report.seconds,
            config.merge_method,
            report.seed,
            a.output.display()
        );
        return Ok(());
    }
    p.info(&format!(
        "{} threads, chunks of {} elements, {} read",
        report.threads,
        report.chunk_len,
        human(report.bytes_read)
    ));
    println!(
        "merged {} tensors ({} copied) into {}: {} shard(s), {} written in {:.1} s (method {}, seed {})",
        report.tensors_merged + report.tensors_copied,
        report.tensors_copied,
        report.out_dir.display(),
        report.shards,
        human(report.bytes_written),
        report.seconds,
        config.merge_method,
        report.seed
    );
    Ok(())
}

/// A flag set on SIGINT/SIGTERM (Ctrl-C): the executor stops at its next
/// chunk, drops the writer (removing the temporary output directory) and
/// returns `EngineError::Cancelled` (exit code 130). A second signal exits
/// at once.
pub(crate) fn cancel_on_signal() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(flag)
}

fn eval(a: EvalArgs, p: &Printer) -> Result<()> {
    use tensormerge::engine::expr::{EvalOptions, run_eval};
    let mut models = Vec::new();
    for m in &a.models {
        let (name, reference) = m
            .split_once('=')
            .ok_or_else(|| Usage::Arg(format!("--model `{m}` is not NAME=PATH")))?;
        models.push((name.trim().to_string(), reference.trim().to_string()));
    }
    let out_dtype = match &a.dtype {
        None => None,
        Some(s) => {
            let d: DType = s
                .parse()
                .map_err(|_| Usage::Arg(format!("--dtype: unknown dtype `{s}`")))?;
            if !d.is_float() {
                return Err(
                    Usage::Arg(format!("--dtype: `{s}` is not a floating-point dtype")).into(),
                );
            }
            Some(d)
        }
    };
    // The expression engine's options may grow; defaults fill what we do not set.
    #[allow(clippy::needless_update)]
    let opts = EvalOptions {
        out_dtype,
        template: a.template.clone(),
        max_shard_bytes: a.out_shard_size.0,
        overwrite: a.overwrite,
        max_memory: a.max_memory.0,
        allow_non_finite: a.allow_non_finite,
        card: !a.no_card,
        ..EvalOptions::default()
    };
    if a.jobs == Some(0) {
        return Err(Usage::Arg("--jobs must be at least 1".into()).into());
    }
    let pool = match a.jobs {
        Some(n) => Some(rayon::ThreadPoolBuilder::new().num_threads(n).build()?),
        None => None,
    };
    let mut opts = opts;
    opts.cancel = Some(cancel_on_signal()?);
    let go = || run_eval(&a.expr, &models, &a.output, &opts, p);
    let report = match &pool {
        Some(pool) => pool.install(go),
        None => go(),
    }
    .with_context(|| format!("evaluation of `{}` failed", a.expr))?;
    println!(
        "evaluated {} tensors ({} copied) into {}: {} written",
        report.tensors_evaluated + report.tensors_copied,
        report.tensors_copied,
        report.out_dir.display(),
        human(report.bytes_written)
    );
    Ok(())
}

fn methods(a: MethodsArgs) -> Result<()> {
    let reg = builtin::registry();
    match a.command.unwrap_or(MethodsCommand::List) {
        MethodsCommand::List => {
            let methods: Vec<&dyn MergeMethod> = reg.methods().collect();
            let w = methods
                .iter()
                .map(|m| m.info().name.len())
                .max()
                .unwrap_or(4)
                .max(4);
            let mut out = format!("{:<w$}  {:<8}  SUMMARY\n", "NAME", "BASE");
            for m in methods {
                let i = m.info();
                writeln!(
                    out,
                    "{:<w$}  {:<8}  {}",
                    i.name,
                    base_text(i.base),
                    i.summary
                )?;
            }
            print!("{out}");
        }
        MethodsCommand::Show { name } => {
            let m = reg.get(&name)?;
            print!("{}", show(m));
        }
    }
    Ok(())
}

fn base_text(b: BaseModel) -> &'static str {
    match b {
        BaseModel::Required => "required",
        BaseModel::Optional => "optional",
        BaseModel::Unused => "unused",
    }
}

fn show(m: &dyn MergeMethod) -> String {
    let i = m.info();
    let mut out = String::new();
    let _ = writeln!(out, "{}: {}", i.name, i.summary);
    let _ = writeln!(out, "paper: {}", i.paper);
    let _ = writeln!(out, "base model: {}", base_text(i.base));
    let models = match i.max_models {
        Some(x) if x == i.min_models => format!("exactly {x}"),
        Some(x) => format!("{} to {x}", i.min_models),
        None => format!("at least {}", i.min_models),
    };
    let _ = writeln!(out, "models: {models}");
    let _ = writeln!(
        out,
        "large tensors: {}",
        if m.chunkable() {
            "merged in chunks"
        } else {
            "merged whole"
        }
    );
    if i.params.is_empty() {
        let _ = writeln!(out, "parameters: none");
        return out;
    }
    let _ = writeln!(out, "parameters:");
    let nw = i
        .params
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let kinds: Vec<String> = i.params.iter().map(|s| s.kind.to_string()).collect();
    let kw = kinds
        .iter()
        .map(|k| k.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let defaults: Vec<String> = i.params.iter().map(|s| s.default.to_string()).collect();
    let dw = defaults.iter().map(|d| d.len()).max().unwrap_or(7).max(7);
    let _ = writeln!(
        out,
        "  {:<nw$}  {:<9}  {:<kw$}  {:<dw$}  DESCRIPTION",
        "NAME", "SCOPE", "TYPE", "DEFAULT"
    );
    for ((s, k), d) in i.params.iter().zip(&kinds).zip(&defaults) {
        let scope = match s.scope {
            Scope::PerModel => "per model",
            Scope::Global => "global",
        };
        let pad = kw - k.chars().count();
        let _ = writeln!(
            out,
            "  {:<nw$}  {scope:<9}  {k}{}  {d:<dw$}  {}",
            s.name,
            " ".repeat(pad),
            s.doc
        );
    }
    out
}

fn demo(a: DemoArgs, p: &Printer) -> Result<()> {
    let opts = tensormerge_demo::DemoOptions {
        out: a.output.clone(),
        seed: a.seed,
        quick: a.quick,
    };
    let report = tensormerge_demo::run(&opts, p).context("the demo failed")?;
    tensormerge::engine::Progress::finish(p);
    println!("{report}");
    Ok(())
}
