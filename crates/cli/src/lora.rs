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
    /// Extract a PEFT LoRA adapter from a fine-tuned model: the task vector
    /// FT − BASE of every linear weight, approximated by its rank-R truncated
    /// SVD (B = U·diag(σ), A = Vᵀ, lora_alpha = r, so the scale is 1).
    ///
    /// Linear weights are the 2-D floating-point `<module>.weight` tensors of
    /// the base that the fine-tuned model has with the same shape, except
    /// embeddings and output heads (embed_tokens, wte, wpe, lm_head,
    /// word_embeddings, position_embeddings, token_type_embeddings,
    /// embed_positions, embed_in, embed_out); weights that did not change
    /// are left out. The output directory (adapter_config.json,
    /// adapter_model.safetensors) loads in `lora apply`, in merge configs
    /// (`BASE+ADAPTER`) and in peft; it is written to a temporary sibling and
    /// renamed into place. --json prints each weight's relative Frobenius
    /// error ‖D − B·A‖ / ‖D‖.
    Extract(ExtractArgs),
}

/// Options of `lora extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The base model (directory, .safetensors file or hub id).
    #[arg(long, value_name = "BASE")]
    pub base: String,

    /// The fine-tuned model whose difference from the base is extracted.
    #[arg(long, value_name = "FT")]
    pub model: String,

    /// Output adapter directory.
    #[arg(short, long, value_name = "ADAPTER")]
    pub output: PathBuf,

    /// The rank R of the adapter (weights smaller than R get their full
    /// rank, padded with zeros).
    #[arg(long, value_name = "R")]
    pub rank: usize,

    /// Dtype of the adapter's tensors.
    #[arg(long, value_name = "DTYPE", default_value = "float32")]
    pub dtype: String,

    /// Print the result as JSON on stdout: each weight's name, shape, rank
    /// and relative error, and the totals.
    #[arg(long)]
    pub json: bool,

    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Worker threads (one weight per worker) [default: number of cores].
    /// The output is the same, byte for byte, on any number.
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
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
        LoraCommand::Extract(a) => extract(a, p),
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

/// Runs `go` on a pool of `jobs` threads (rayon's global pool when `None`).
fn in_pool<T: Send>(jobs: Option<usize>, go: impl FnOnce() -> T + Send) -> Result<T> {
    match jobs {
        Some(0) => Err(Usage::Arg("--jobs must be at least 1".into()).into()),
        Some(n) => Ok(rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()?
            .install(go)),
        None => Ok(go()),
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
    let report = in_pool(a.jobs, || {
        lora::apply(&a.base, &a.adapter, &a.output, &opts, p)
    })?
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

fn extract(a: ExtractArgs, p: &Printer) -> Result<()> {
    if a.rank == 0 {
        return Err(Usage::Arg("--rank must be at least 1".into()).into());
    }
    let opts = lora::ExtractOptions {
        rank: a.rank,
        dtype: float_dtype(&Some(a.dtype.clone()))?.unwrap_or(DType::F32),
        overwrite: a.overwrite,
        cancel: Some(crate::commands::cancel_on_signal()?),
    };
    let report = in_pool(a.jobs, || {
        lora::extract(&a.base, &a.model, &a.output, &opts, p)
    })?
    .with_context(|| {
        format!(
            "extracting a LoRA adapter from `{}` against `{}` failed",
            a.model, a.base
        )
    })?;
    if a.json {
        let tensors: Vec<serde_json::Value> = report
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "shape": t.shape,
                    "rank": t.rank,
                    "relative_error": t.relative_error,
                })
            })
            .collect();
        let v = serde_json::json!({
            "adapter": report.out_dir,
            "r": report.rank,
            "lora_alpha": report.rank,
            "dtype": opts.dtype.as_str(),
            "tensors": tensors,
            "unchanged": report.unchanged,
            "totals": {
                "tensors": report.tensors.len(),
                "unchanged": report.unchanged.len(),
                "parameters": report.parameters,
                "bytes": report.bytes_written,
                "relative_error": report.relative_error,
                "max_relative_error": report
                    .tensors
                    .iter()
                    .map(|t| t.relative_error)
                    .fold(0.0, f64::max),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let worst = report
        .tensors
        .iter()
        .max_by(|x, y| x.relative_error.total_cmp(&y.relative_error));
    println!(
        "extracted {} weights at rank {} into {} ({} parameters, {}); relative error {:.3e} overall{}{}",
        report.tensors.len(),
        report.rank,
        report.out_dir.display(),
        report.parameters,
        crate::commands::human(report.bytes_written),
        report.relative_error,
        worst.map_or(String::new(), |w| format!(
            ", at most {:.3e} (`{}`)",
            w.relative_error, w.name
        )),
        if report.unchanged.is_empty() {
            String::new()
        } else {
            format!("; {} unchanged weights left out", report.unchanged.len())
        }
    );
    Ok(())
}
