//! Running one merge of the sweep through the engine, exactly as
//! `tensormerge merge CONFIG -o OUT` does: the mergekit YAML config is parsed
//! into a [`MergeConfig`] and run by [`run_merge`], which opens the model
//! directories with `tensormerge-io`, plans, streams every tensor through the
//! method and writes the output directory.

use std::path::Path;

use tensormerge_engine::{MergeConfig, NoProgress, RunOptions, run_merge};

use crate::DemoError;

/// One merge: the method's name and setting (for error messages only) and
/// its config.
///
/// The job carries plain strings rather than the experiment's own types, so
/// that this module depends only on the engine and the experiment depends on
/// it, not the other way round.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The method's registry name.
    pub method: &'a str,
    /// The swept values, as the report prints them (see
    /// [`Setting`](crate::experiment::Setting)'s `Display`).
    pub setting: &'a str,
    /// The mergekit YAML config (see
    /// [`config_yaml`](crate::experiment::config_yaml)).
    pub yaml: &'a str,
}

fn failed(job: &Job<'_>, e: impl std::error::Error + Send + Sync + 'static) -> DemoError {
    DemoError::Merge {
        method: job.method.to_string(),
        setting: job.setting.to_string(),
        source: Box::new(e),
    }
}

/// Merges into the model directory `out` (replaced if it exists).
pub fn merge(job: &Job<'_>, out: &Path) -> Result<(), DemoError> {
    let config = MergeConfig::from_yaml_str(job.yaml).map_err(|e| failed(job, e))?;
    let opts = RunOptions {
        overwrite: true,
        ..RunOptions::default()
    };
    run_merge(&config, out, &opts, &NoProgress).map_err(|e| failed(job, e))?;
    Ok(())
}
