//! `tensormerge lora apply|extract`: PEFT LoRA adapters.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tensormerge::core::DType;
use tensormerge::engine::expr::EvalOptions;
use tensormerge::engine::lora;

use crate::printer::{Printer, Usage};
use crate::size::Size;

/// Options of `lora`.
#[derive(Debug, Args)]
pub struct LoraArgs {
    #[command(subcommand)]
    pub command: LoraCommand,
}

#[derive(Debug, Subcommand)]
pub enum LoraCommand {
    /// Apply a PEFT LoRA adapter to a model and write the adapted model:
    /// every targeted weight becomes W + (lora_alpha / r) · B @ A
    /// (lora_alpha / sqrt(r) with use_rslora), streamed tensor by tensor.
    Apply(ApplyArgs),
}

/// Options of `lora apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The base model (directory, .safetensors file or hub id).
    pub base: String,

    /// The adapter directory (adapter_config.json, adapter_model.safetensors).
    pub adapter: PathBuf,

    /// Output directory.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,

    /// Output dtype of floating-point tensors [default: the base's].
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,

    /// Largest output shard (e.g. 5GB).
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub out_shard_size: Size,

    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Worker threads [default: number of cores].
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,

    /// Memory budget for buffers.
    #[arg(long, value_name = "SIZE", default_value = "512MiB")]
    pub max_memory: Size,
}

pub fn run(a: LoraArgs, p: &Printer) -> Result<()> {
    match a.command {
        LoraCommand::Apply(a) => apply(a, p),
    }
}

/// Parses a `--dtype` value (a floating-point dtype name).
pub fn float_dtype(s: &Option<String>) -> Result<Option<DType>> {
    let Some(s) = s else { return Ok(None) };
    let d: DType = s
        .parse()
        .map_err(|_| Usage::Arg(format!("--dtype: unknown dtype `{s}`")))?;
    if !d.is_float() {
        return Err(Usage::Arg(format!("--dtype: `{s}` is not a floating-point dtype")).into());
    }
    Ok(Some(d))
}

fn pool(jobs: Option<usize>) -> Result<Option<rayon::ThreadPool>> {
    match jobs {
        Some(0) => Err(Usage::Arg("--jobs must be at least 1".into()).into()),
        Some(n) => Ok(Some(
            rayon::ThreadPoolBuilder::new().num_threads(n).build()?,
        )),
        None => Ok(None),
    }
}

fn apply(a: ApplyArgs, p: &Printer) -> Result<()> {
    let opts = EvalOptions {
        out_dtype: float_dtype(&a.dtype)?,
        max_shard_bytes: a.out_shard_size.0,
        overwrite: a.overwrite,
        max_memory: a.max_memory.0,
        cancel: Some(crate::commands::cancel_on_signal()?),
        ..EvalOptions::default()
    };
    let pool = pool(a.jobs)?;
    let go = || lora::apply(&a.base, &a.adapter, &a.output, &opts, p);
    let report = match &pool {
        Some(pool) => pool.install(go),
        None => go(),
    }
    .with_context(|| {
        format!(
            "applying the LoRA adapter {} to `{}` failed",
            a.adapter.display(),
            a.base
        )
    })?;
    println!(
        "applied {} to {}: {} tensors into {} ({} written)",
        a.adapter.display(),
        a.base,
        report.tensors_evaluated + report.tensors_copied,
        report.out_dir.display(),
        crate::commands::human(report.bytes_written)
    );
    Ok(())
}
