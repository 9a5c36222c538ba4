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
//!    `config.json`) and merged through the engine like any checkpoint, with
//!    every registered method that applies, over a sweep of λ / density.
//! 6. Each result is evaluated on the held-out test split: task A (0-4),
//!    task B (5-9) and all ten digits.
//!
//! The library entry point (being built; this is the contract the CLI codes
//! against):
//!
//! ```text
//! pub struct DemoOptions { pub out: PathBuf, pub seed: u64, pub quick: bool }
//! pub trait DemoProgress {            // implemented by the CLI with indicatif
//!     fn phase(&self, name: &str, total: u64);   // a new phase with `total` steps
//!     fn advance(&self, steps: u64);
//!     fn message(&self, text: &str);
//! }
//! pub struct NoProgress;              // DemoProgress that does nothing
//! pub fn run(opts: &DemoOptions, progress: &dyn DemoProgress) -> Result<DemoReport, DemoError>;
//! // DemoReport: Display prints the table; fields rows, sweep, out_dir,
//! // csv_path, svg_path, skipped (methods that do not apply, with the reason).
//! ```
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
pub mod fisher;
pub mod mlp;

pub use data::Dataset;
pub use fisher::diagonal_fisher;
pub use mlp::{Mlp, TrainConfig, train};

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
    /// The plot could not be drawn.
    #[error("plot {path}: {detail}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// The drawing error.
        detail: String,
    },
}
