//! The command-line interface: clap definitions. Doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::size::Size;

/// Merge fine-tuned checkpoints by tensor arithmetic.
///
/// Models are safetensors directories (sharded or not), single .safetensors
/// files, or hub ids `org/name[@revision]`. Merging streams tensor by tensor:
/// memory depends on the largest tensors, not on the model.
#[derive(Debug, Parser)]
#[command(
    name = "tensormerge",
    version,
    term_width = 100,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Options of every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Print only results and errors (no progress, no warnings).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Print more detail (settings, timings); repeat for more.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// When to color the output.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,

    /// Do not draw progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

/// When to color the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// When stderr is a terminal and NO_COLOR is not set.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Merge models as described by a mergekit-style YAML config.
    Merge(MergeArgs),
    /// Assemble the pieces of a sharded merge (`merge --shard I/N`, run by
    /// every worker) into the finished model directory: checks every piece
    /// (none missing or doubled, one plan, sizes and SHA-256), writes the
    /// index and renames the model into place.
    Join(JoinArgs),
    /// Evaluate an arithmetic expression over whole models, tensor by tensor.
    Eval(EvalArgs),
    /// List the merge methods, or show one in detail.
    Methods(MethodsArgs),
    /// Show a model's tensors, dtypes, parameter count and shards; compare it
    /// with another model.
    Inspect(InspectArgs),
    /// Run the built-in experiment: train small networks on two tasks, merge
    /// them with every method, and report how much of each task survives.
    Demo(DemoArgs),
    /// PEFT LoRA adapters: apply one to a model, or extract one from a
    /// fine-tuned model.
    Lora(crate::lora::LoraArgs),
    /// Generate text with a causal LM (llama, mistral, qwen2, gpt2): one
    /// block per prompt on stdout, greedy by default or seeded nucleus sampling.
    Generate(crate::nn::GenerateArgs),
    /// Perplexity and mean negative log-likelihood per token of each model on
    /// a text file, one line per model.
    Perplexity(crate::nn::PerplexityArgs),
    /// The diagonal Fisher information of a model on a corpus, written as the
    /// safetensors file `merge_method: fisher` reads.
    Fisher(crate::nn::FisherArgs),
}

/// Options of `merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The merge config (mergekit YAML: merge_method, base_model, models or
    /// slices, parameters, dtype, out_dtype, tokenizer_source, seed). Merging is
    /// always done in f32; `dtype` (or `out_dtype`, which wins) sets the
    /// output dtype of floating-point tensors, which otherwise keep the base's.
    pub config: PathBuf,

    /// Output directory (written to a temporary sibling and renamed into
    /// place when complete).
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,

    /// Print the plan (tensors, parameters, shards, bytes) without reading
    /// any weight or writing anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Seed of random methods (DARE); overrides the config's `seed`.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Largest output shard (e.g. 5GB, 500MB, 2GiB).
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub out_shard_size: Size,

    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Worker threads [default: number of cores].
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,

    /// Memory budget for tensors in flight (input chunks, results waiting to
    /// be written); large tensors are processed in chunks to stay under it
    /// (methods that need whole tensors, such as slerp, may go over it by
    /// one tensor's working set).
    #[arg(long, value_name = "SIZE", default_value = "256MiB")]
    pub max_memory: Size,
    /// Accept NaN and infinite values in the input weights and Fisher files
    /// (refused by default, naming the model, tensor and element).
    #[arg(long)]
    pub allow_non_finite: bool,

    /// Write no model card. By default the output gets a `README.md` as
    /// mergekit writes one: the method and its paper, the models, and the
    /// config verbatim (a template model's own README is never copied).
    #[arg(long)]
    pub no_card: bool,

    /// Run worker I (counted from 0) of N of a sharded merge: plan the whole
    /// merge, write only this worker's output shards, as pieces in
    /// OUT.pieces/ (never a finished model); `tensormerge join OUT` then
    /// assembles them. Inputs must be at the same paths (or hub ids in a
    /// filled cache) on every machine.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::shard::ShardArg>,
}

/// Options of `join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The output directory the workers were given (`-o OUT`); the pieces are
    /// read from OUT.pieces/ and removed after a successful join.
    pub output: PathBuf,

    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Keep OUT.pieces/ after a successful join.
    #[arg(long)]
    pub keep_pieces: bool,
}

/// Options of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The expression, e.g. `base + 0.5 * ((legal - base) + (recipe - base))`.
    pub expr: String,

    /// A model the expression names, as NAME=PATH_OR_HUB_ID (repeat).
    #[arg(short, long = "model", value_name = "NAME=REF", required = true)]
    pub models: Vec<String>,

    /// Output directory.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,

    /// Output dtype of floating-point tensors [default: the template's].
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,

    /// The model (by NAME) whose tensor order, non-float tensors and config
    /// files the output takes [default: the first model the expression uses].
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,

    /// Largest output shard (e.g. 5GB).
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    pub out_shard_size: Size,

    /// Replace the output directory if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Worker threads [default: number of cores].
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,

    /// Memory budget for evaluation buffers.
    #[arg(long, value_name = "SIZE", default_value = "512MiB")]
    pub max_memory: Size,
    /// Accept NaN and infinite values in the input weights (refused by
    /// default, naming the model, tensor and element).
    #[arg(long)]
    pub allow_non_finite: bool,

    /// Write no model card (by default the output gets a `README.md` with
    /// the expression and the models).
    #[arg(long)]
    pub no_card: bool,
}

/// Options of `methods`.
#[derive(Debug, Args)]
pub struct MethodsArgs {
    #[command(subcommand)]
    pub command: Option<MethodsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum MethodsCommand {
    /// List every registered merge method (the default).
    List,
    /// Show a method's parameters, defaults, documentation and paper.
    Show {
        /// Method name (snake_case or kebab-case).
        name: String,
    },
}

/// Options of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model (directory, .safetensors file or hub id).
    pub model: String,

    /// Compare with this model: per-tensor L2 distance and cosine.
    #[arg(long, value_name = "OTHER")]
    pub against: Option<String>,

    /// With --against: compare task vectors (MODEL − BASE and OTHER − BASE)
    /// instead of raw weights for the cosine.
    #[arg(long, value_name = "BASE", requires = "against")]
    pub base: Option<String>,

    /// Do not list tensors, only the summary.
    #[arg(long)]
    pub summary: bool,
}

/// Options of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output directory for models, CSV, plot and configs.
    #[arg(
        short,
        long,
        visible_alias = "out",
        value_name = "OUT",
        default_value = "tensormerge-demo"
    )]
    pub output: PathBuf,

    /// Seed of the data split, training and random methods.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// Fewer epochs and a smaller sweep (seconds instead of a minute).
    #[arg(long)]
    pub quick: bool,
}
