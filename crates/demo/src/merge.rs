//! Running one merge of the sweep.

use std::path::Path;

use tensormerge_core::ModelTensorMapper;
use tensormerge_io::{MapperExt, WriterOptions};
use tensormerge_methods::{Merge, ParamValue};

use crate::DemoError;
use crate::experiment::{Inputs, MethodPlan, Setting};
use tensormerge_method_karcher as _;
use tensormerge_method_linear as _;
use tensormerge_method_model_stock as _;
use tensormerge_method_slerp as _;
use tensormerge_method_task_arithmetic as _;

/// One merge: a method, its setting and inputs.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// How the method is run.
    pub plan: &'a MethodPlan,
    /// The swept values.
    pub setting: &'a Setting,
    /// Whether the base model is passed to the method.
    pub with_base: bool,
    /// The model directories.
    pub inputs: &'a Inputs,
    /// Seed of random methods.
    pub seed: u64,
    /// The equivalent YAML config.
    pub yaml: &'a str,
}

fn failed(job: &Job<'_>, e: impl std::error::Error + Send + Sync + 'static) -> DemoError {
    DemoError::Merge {
        method: job.plan.name.to_string(),
        setting: job.setting.to_string(),
        source: Box::new(e),
    }
}

/// Merges into the model directory `out` (replaced if it exists).
pub fn merge(job: &Job<'_>, out: &Path) -> Result<(), DemoError> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|source| DemoError::Io {
            path: out.to_path_buf(),
            source,
        })?;
    }
    let method = tensormerge_methods::registry()
        .get(job.plan.name)
        .map_err(|e| failed(job, e))?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (mapper, template) =
        ModelTensorMapper::open(&path(&job.inputs.base)).map_err(|e| failed(job, e))?;
    let load = |p: &Path| mapper.load(&path(p)).map_err(|e| failed(job, e));
    let base = if job.with_base {
        Some(load(&job.inputs.base)?)
    } else {
        None
    };
    let models = [load(&job.inputs.models[0])?, load(&job.inputs.models[1])?];
    let fishers = match job.plan.fisher_param {
        Some(_) => Some([load(&job.inputs.fishers[0])?, load(&job.inputs.fishers[1])?]),
        None => None,
    };
    let mut global: Vec<(&str, ParamValue)> = Vec::new();
    if let Some(l) = job.setting.lambda {
        global.push(("lambda", l.into()));
    }
    if let Some(t) = job.setting.t {
        global.push(("t", t.into()));
    }
    let per_model: Vec<Vec<(&str, ParamValue)>> = (0..2)
        .map(|_| {
            job.setting
                .density
                .map(|d| vec![("density", ParamValue::from(d))])
                .unwrap_or_default()
        })
        .collect();
    let merge = Merge::new(method, global, per_model)
        .map_err(|e| failed(job, e))?
        .seed(job.seed);
    let aux: Vec<Option<&tensormerge_core::ParamVector>> = match &fishers {
        Some(f) => f.iter().map(Some).collect(),
        None => vec![None, None],
    };
    let merged = merge
        .run_with_aux(base.as_ref(), &[&models[0], &models[1]], &aux, None)
        .map_err(|e| failed(job, e))?;
    mapper
        .save(&merged, out, &template, WriterOptions::default())
        .map_err(|e| failed(job, e))?;
    Ok(())
}
