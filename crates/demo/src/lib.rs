//! # tensormerge-demo
//!
//! The built-in, offline experiment behind `tensormerge demo`: it shows, in
//! numbers and a picture, that merging keeps two abilities that each
//! fine-tune alone loses.
//!
//! 1. The handwritten digits data (embedded, see [`data`]) is split with a
//!    fixed seed into train and test sets.
//! 2. A small MLP (64-128-128-10, ReLU, softmax; [`mlp`]) is trained briefly
//!    on a small subset of all ten classes: the *base*.
//! 3. Fine-tune A continues from the base on digits 0-4 only, fine-tune B on
//!    digits 5-9 only; each forgets the other task.
//! 4. The exact diagonal Fisher of each fine-tune on its own task
//!    ([`fisher`]) is saved next to it.
//! 5. Every model is written as a real model directory (safetensors +
//!    `config.json`, [`modelio`]) and merged like any checkpoint, with every
//!    registered method that applies, over a sweep of λ / density / t
//!    ([`experiment::plan_method`]), each merge a mergekit YAML config run by
//!    the engine's `run_merge` ([`merge`]), as `tensormerge merge` runs it;
//!    the config of each method's best merge is saved.
//! 6. Each merge is evaluated on the held-out test split: task A (0-4),
//!    task B (5-9) and all ten digits. Each method's setting is chosen by
//!    joint accuracy on a validation split held out of the training data, so
//!    the test numbers are not tuned on the test split.
//!
//! Output directory: `models/{base,task_a,task_b,task_a_fisher,task_b_fisher}`,
//! `merged/METHOD/` (each method's chosen merge), `configs/METHOD.yml` (its
//! config, runnable with `tensormerge merge`), `results.csv` (every merge of
//! the sweep) and `joint_accuracy.svg` (the plot).
//!
//! Choices worth knowing:
//! - The Fisher is computed exactly, summing over all ten classes weighted by
//!   the model's probabilities (as METHODS.md defines it), rather than by
//!   sampling one label per example or using the empirical Fisher at the true
//!   labels: exact is affordable for ten classes and has no sampling noise.
//! - A method that takes a base and one model (slerp, nearswap) gets
//!   fine-tune A as its base and B as its model; a method with an optional
//!   base is run on the two fine-tunes alone first (Fisher averaging as in
//!   the paper), with the base only if that fails; a required per-model
//!   `weight` is set to 1 for both.
//! - Training is plain mini-batch SGD with momentum in `f32`, single-threaded,
//!   with `ChaCha8Rng` streams derived from the seed, so a run is reproducible
//!   on one machine; the matrix kernels may round differently on another CPU.
//!
//! The library entry point is [`run`]`(&DemoOptions { out, seed, quick },
//! &dyn DemoProgress) -> Result<DemoReport, DemoError>`; the command line
//! prints the returned [`DemoReport`] (its `Display` is the table and the
//! output paths) and implements [`DemoProgress`] with a progress bar.
//!
//! The parts are usable on their own:
//!
//! ```
//! use tensormerge_demo::{Dataset, Mlp, TrainConfig, diagonal_fisher, train};
//! use rand::SeedableRng;
//!
//! let data = Dataset::digits().unwrap();
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let (train_set, test_set) = data.split(0.25, &mut rng);
//! let mut model = Mlp::new(&[64, 16, 10], &mut rng);
//! let cfg = TrainConfig { epochs: 3, batch_size: 32, learning_rate: 0.1, momentum: 0.9 };
//! train(&mut model, &train_set, &cfg, &mut rng);
//! assert!(model.accuracy(&test_set) > 0.6);
//!
//! // Fisher of the model on the digits 0-4, same shapes as the parameters.
//! let fisher = diagonal_fisher(&model, &train_set.filter_classes(|c| c < 5));
//! assert_eq!(fisher.weights[0].dim(), (16, 64));
//! assert!(fisher.biases[1].iter().all(|&f| f >= 0.0));
//! ```
#![deny(missing_docs)]

use std::path::PathBuf;

pub mod data;
pub mod experiment;
pub mod fisher;
pub mod merge;
pub mod mlp;
pub mod modelio;
pub mod plot;

pub use data::Dataset;
pub use experiment::{Accuracy, DemoOptions, DemoReport, ReportRow, Setting, SweepPoint, run};
pub use fisher::diagonal_fisher;
pub use mlp::{Mlp, TrainConfig, train};

/// Receives the demo's progress; the command line draws a bar. Every method
/// has an empty default.
pub trait DemoProgress {
    /// A phase begins (`"training"` in epochs, `"fisher"` in models,
    /// `"merging"` in merges) with its number of steps.
    fn phase(&self, _name: &str, _total: u64) {}
    /// Steps of the current phase are done.
    fn advance(&self, _steps: u64) {}
    /// Something worth telling the user.
    fn message(&self, _text: &str) {}
}

/// A [`DemoProgress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl DemoProgress for NoProgress {}

/// Errors of the demo, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded data did not parse (line 0: the file as a whole).
    #[error("digits data, line {line}: {detail}")]
    Data {
        /// 1-based line of the CSV.
        line: usize,
        /// What was wrong.
        detail: String,
    },
    /// A model tensor is missing or has the wrong size.
    #[error("tensor `{tensor}`: {detail}")]
    Model {
        /// The tensor's name.
        tensor: String,
        /// What was wrong.
        detail: String,
    },
    /// A file or directory could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A model directory could not be written or read.
    #[error("model directory {path}")]
    ModelIo {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A merge failed.
    #[error("merge `{method}` ({setting})")]
    Merge {
        /// The method.
        method: String,
        /// Its setting.
        setting: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The plot could not be drawn.
    #[error("plot {path}: {detail}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The drawing error.
        detail: String,
    },
}
