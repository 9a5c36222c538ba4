//! `tensormerge generate|perplexity|fisher`: running and scoring models
//! (the `tensormerge-nn` crate, on candle).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tensormerge::nn::{
    ArchConfig, FisherOptions, GenerateOptions, PerplexityOptions, Pipeline, Sampling, fisher,
    read_text,
};

use crate::printer::{Printer, Usage};

/// Options of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model (directory, .safetensors file next to its config.json, or
    /// cached hub id): a causal LM (llama, mistral, qwen2, gpt2).
    pub model: String,

    /// A prompt; repeat for several (one output block each).
    #[arg(long, value_name = "TEXT", required = true)]
    pub prompt: Vec<String>,

    /// Largest number of new tokens per prompt (generation also stops at the
    /// config's `eos_token_id` or at the model's context length).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub max_new_tokens: usize,

    /// Sample with this softmax temperature (nucleus sampling; default
    /// decoding is greedy).
    #[arg(long, value_name = "T", conflicts_with = "greedy")]
    pub temperature: Option<f64>,

    /// Nucleus sampling: keep the most likely tokens up to this probability
    /// mass [default with sampling: 1.0].
    #[arg(long, value_name = "P", conflicts_with = "greedy")]
    pub top_p: Option<f64>,

    /// Seed of sampling [default with sampling: 0]; prompt i uses random
    /// stream i, so each prompt's text does not depend on the others.
    #[arg(long, value_name = "S", conflicts_with = "greedy")]
    pub seed: Option<u64>,

    /// Greedy decoding (the default when no sampling option is given): the
    /// most likely token each step, as `transformers`' `generate(do_sample=False)`.
    #[arg(long)]
    pub greedy: bool,

    /// Print JSON: `[{"prompt":..., "completion":..., "tokens":[...]}]`.
    #[arg(long)]
    pub json: bool,

    /// Threads of the matrix multiplies [default: number of cores].
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
}

/// Options of `perplexity`.
#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// The models to score, one line each (loaded one at a time).
    #[arg(required = true)]
    pub models: Vec<String>,

    /// The UTF-8 text to score.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,

    /// Tokens per window. Windows of exactly this many tokens start every
    /// `--stride` tokens while they fit; the first token of each window is
    /// never scored, and with overlapping windows each token is scored once.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub context: usize,

    /// Distance between window starts [default: the context, non-overlapping].
    #[arg(long, value_name = "N")]
    pub stride: Option<usize>,

    /// Use only the first N tokens of the text.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,

    /// Print JSON: one object per model.
    #[arg(long)]
    pub json: bool,

    /// Threads of the matrix multiplies [default: number of cores].
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
}

/// Options of `fisher`.
#[derive(Debug, Args)]
pub struct FisherArgs {
    /// The model: a causal LM (llama, mistral, qwen2, gpt2) or a
    /// BertForSequenceClassification.
    pub model: String,

    /// The corpus: UTF-8 text for a causal LM (one sample per window of
    /// `--context` tokens); for a BERT classifier a CSV (`text,label`) or TSV
    /// (`text<TAB>label`) of labelled rows, labels as ids or `id2label` names.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,

    /// The output safetensors file: the model's float tensor names and shapes,
    /// f32, the sample count in `__metadata__`; what `merge_method: fisher`
    /// reads as a model's `fisher` parameter.
    #[arg(short, long, value_name = "FISHER")]
    pub output: PathBuf,

    /// Number of samples [default: one per window or row; windows are cycled
    /// when more are asked for].
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,

    /// Tokens per window (causal LMs).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub context: usize,

    /// The empirical Fisher: gradients of the observed next tokens (labels),
    /// not of targets sampled from the model (the true Fisher, default).
    #[arg(long)]
    pub empirical: bool,

    /// Seed of the sampled targets of the true Fisher.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,

    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,

    /// Threads of the matrix multiplies [default: number of cores]. The file
    /// is the same for any number of threads.
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
}

/// Prepares the process for running a model: the allocator keeps freed
/// memory (see `tensormerge_nn::keep_freed_memory`: candle allocates every
/// output, and glibc's fresh mmaps made page zeroing 54% of the time), and
/// the thread count of candle's matrix multiplies (it reads
/// `RAYON_NUM_THREADS` when it runs one).
fn prepare(jobs: Option<usize>) -> Result<()> {
    tensormerge::nn::keep_freed_memory();
    match jobs {
        Some(0) => Err(Usage::Arg("--jobs must be at least 1".into()).into()),
        Some(n) => {
            // SAFETY: called by the command before it starts any thread
            // (no model is loaded and no pool exists yet), so no other thread
            // reads the environment concurrently.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
            Ok(())
        }
        None => Ok(()),
    }
}

/// With `--overwrite`, the output must still not be one of the model's own
/// files (its weights or config).
fn refuse_model_file(output: &std::path::Path, model: &str) -> Result<()> {
    let (Ok(out), Ok(m)) = (std::fs::canonicalize(output), std::fs::canonicalize(model)) else {
        return Ok(());
    };
    let inside = if m.is_dir() {
        out.parent() == Some(m.as_path())
    } else {
        out == m
            || (out.parent() == m.parent() && out.file_name().is_some_and(|n| n == "config.json"))
    };
    if inside
        && out
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json")
    {
        return Err(Usage::Arg(format!(
            "{} is a file of the model `{model}`: write the Fisher elsewhere",
            output.display()
        ))
        .into());
    }
    Ok(())
}

fn open(model: &str, p: &Printer) -> Result<Pipeline> {
    p.info(&format!("loading {model}"));
    Pipeline::open(model).with_context(|| format!("cannot load the model `{model}`"))
}

pub fn generate(a: GenerateArgs, p: &Printer) -> Result<()> {
    prepare(a.jobs)?;
    let sampling = if a.greedy || (a.temperature.is_none() && a.top_p.is_none() && a.seed.is_none())
    {
        Sampling::Greedy
    } else {
        Sampling::TopP {
            temperature: a.temperature.unwrap_or(1.0),
            top_p: a.top_p.unwrap_or(1.0),
            seed: a.seed.unwrap_or(0),
        }
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
    };
    let model = open(&a.model, p)?;
    let mut out = Vec::with_capacity(a.prompt.len());
    use tensormerge_demo::DemoProgress as _;
    p.phase("generate", a.prompt.len() as u64);
    for prompt in &a.prompt {
        let g = model
            .generate(std::slice::from_ref(prompt), &opts)
            .with_context(|| format!("generating from `{}` failed", a.model))?;
        out.extend(g);
        p.advance(1);
    }
    tensormerge::engine::Progress::finish(p);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (i, g) in out.iter().enumerate() {
            if i > 0 {
                println!();
            }
            // The whole sequence decoded at once, as `transformers`' text
            // generation pipeline prints it (word-level tokenizers put the
            // spaces back between prompt and completion).
            let mut ids = model.encode(&g.prompt)?;
            ids.extend(&g.tokens);
            println!("=== prompt {}: {}", i + 1, g.prompt);
            println!("{}", model.decode(&ids)?);
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct PerplexityRow<'a> {
    model: &'a str,
    #[serde(flatten)]
    result: tensormerge::nn::Perplexity,
}

pub fn perplexity(a: PerplexityArgs, p: &Printer) -> Result<()> {
    prepare(a.jobs)?;
    let text = read_text(&a.text).context("cannot read the text to score")?;
    let opts = PerplexityOptions {
        context: a.context,
        stride: a.stride,
        max_tokens: a.max_tokens,
    };
    use tensormerge_demo::DemoProgress as _;
    let mut rows = Vec::with_capacity(a.models.len());
    p.phase("perplexity", a.models.len() as u64);
    for m in &a.models {
        // One model in memory at a time.
        let model = open(m, p)?;
        let r = model
            .perplexity(&text, &opts)
            .with_context(|| format!("scoring `{m}` on {} failed", a.text.display()))?;
        drop(model);
        p.advance(1);
        if !a.json {
            // Results as they come: a long list of models shows progress.
            p.suspend(|| {
                println!(
                    "{m}\tperplexity {:.4}\tnll {:.6} nats/token\t({} tokens scored in {} windows of {})",
                    r.perplexity, r.nll, r.scored_tokens, r.windows, a.context
                )
            });
        }
        rows.push(PerplexityRow {
            model: m,
            result: r,
        });
    }
    tensormerge::engine::Progress::finish(p);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

pub fn fisher(a: FisherArgs, p: &Printer) -> Result<()> {
    prepare(a.jobs)?;
    if a.output.exists() && !a.overwrite {
        return Err(Usage::Arg(format!(
            "{} exists; pass --overwrite to replace it",
            a.output.display()
        ))
        .into());
    }
    refuse_model_file(&a.output, &a.model)?;
    let model = open(&a.model, p)?;
    let opts = FisherOptions {
        samples: a.samples,
        context: a.context,
        empirical: a.empirical,
        seed: a.seed,
    };
    use tensormerge_demo::DemoProgress as _;
    let mut started = false;
    let mut progress = |_done: usize, total: usize| {
        if !started {
            p.phase("fisher", total as u64);
            started = true;
        }
        p.advance(1);
    };
    let result = match model.config() {
        ArchConfig::Bert(c) if c.num_labels.is_some() => {
            let rows = fisher::read_labeled(&a.text, &c.labels)
                .context("cannot read the labelled rows")?;
            model.fisher_classifier(&rows, &opts, &mut progress)
        }
        _ => {
            let text = read_text(&a.text).context("cannot read the corpus")?;
            model.fisher_lm(&text, &opts, &mut progress)
        }
    }
    .with_context(|| format!("computing the Fisher of `{}` failed", a.model))?;
    tensormerge::engine::Progress::finish(p);
    let path = fisher::write_fisher(&a.output, &result)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    let params: usize = result.tensors.iter().map(|(t, _)| t.numel()).sum();
    println!(
        "wrote {} ({} {} Fisher, {} samples, {} tensors, {} parameters)",
        path.display(),
        a.model,
        if result.empirical {
            "empirical"
        } else {
            "true"
        },
        result.samples,
        result.tensors.len(),
        params
    );
    Ok(())
}
