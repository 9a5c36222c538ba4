//! The experiment: train, fine-tune, estimate Fishers, write model
//! directories, merge through the engine with every applicable registered
//! method over a sweep, evaluate, and write the CSV and the plot.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tensormerge_methods::{BaseModel, Default as ParamDefault, MergeMethod, ParamKind, Scope};

use crate::data::Dataset;
use crate::fisher::diagonal_fisher;
use crate::merge::{Job, merge};
use crate::mlp::{Mlp, TrainConfig, train};
use crate::modelio::{read_model, write_model};
use crate::plot::{Panel, Series, draw};
use crate::{DemoError, DemoProgress};

/// Layer widths of the demo network.
pub const LAYER_SIZES: [usize; 4] = [64, 128, 128, 10];

/// Share of the data held out for testing.
pub const TEST_FRACTION: f64 = 0.25;

/// Share of the remaining (training) data held out to choose each method's
/// setting, so that the test accuracies in the table are not tuned on the
/// test split.
pub const VALIDATION_FRACTION: f64 = 0.15;

/// Options of one run of the demo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoOptions {
    /// Output directory (created; files in it are replaced).
    pub out: PathBuf,
    /// Seed of the split, the initialisation, the batches and DARE's masks.
    pub seed: u64,
    /// Fewer epochs and a smaller sweep (for tests).
    pub quick: bool,
}

/// Accuracy on the held-out test split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    /// Digits 0-4 (task A).
    pub task_a: f64,
    /// Digits 5-9 (task B).
    pub task_b: f64,
    /// All ten digits.
    pub joint: f64,
}

/// One value of each swept setting (absent: the method's default).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Setting {
    /// Global `lambda` (scale of the merged task vector).
    pub lambda: Option<f64>,
    /// Share of each task vector kept: the per-model `density` (TIES, DARE,
    /// ...), or the global `select_topk` of `sce` (see `density_key`).
    pub density: Option<f64>,
    /// The parameter `density` stands for: `"density"` (also when empty) or
    /// `"select_topk"`.
    pub density_key: &'static str,
    /// Global `t` (interpolation factor).
    pub t: Option<f64>,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.density_key.is_empty() {
            "density"
        } else {
            self.density_key
        };
        let parts: Vec<String> = [(key, self.density), ("lambda", self.lambda), ("t", self.t)]
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
            .collect();
        if parts.is_empty() {
            f.write_str("defaults")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// One merge of the sweep and its accuracy.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// Registered method name.
    pub method: String,
    /// The setting merged with.
    pub setting: Setting,
    /// Which models the method was given.
    pub arrangement: Arrangement,
    /// Accuracy of the merged model on the test split.
    pub accuracy: Accuracy,
    /// Joint accuracy on the validation split (chooses the best setting).
    pub validation_joint: f64,
}

impl SweepPoint {
    /// The setting, and the inputs when they are not the base and both
    /// fine-tunes: `density=0.3 lambda=1`, `defaults (A+B)`, `t=0.5 (A->B)`.
    pub fn label(&self) -> String {
        match self.arrangement {
            Arrangement::BaseAndBoth => self.setting.to_string(),
            other => format!("{} ({})", self.setting, other.as_str()),
        }
    }
}

/// One row of the report table.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// `base`, `fine-tune A`, `fine-tune B`, or a method name.
    pub name: String,
    /// What the model is, or the method's best setting.
    pub setting: String,
    /// Its accuracy on the test split.
    pub accuracy: Accuracy,
    /// Its joint accuracy on the validation split.
    pub validation_joint: f64,
    /// The model directory holding it.
    pub model_dir: PathBuf,
}

/// Everything the demo measured and wrote. `Display` prints the table.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// Base, fine-tune A, fine-tune B, then each merge method at its best
    /// setting (by joint accuracy on the validation split), in registry order.
    pub rows: Vec<ReportRow>,
    /// Every merge of the sweep.
    pub sweep: Vec<SweepPoint>,
    /// Registered methods that do not apply to this experiment, with the reason.
    pub skipped: Vec<(String, String)>,
    /// The output directory.
    pub out_dir: PathBuf,
    /// The CSV of every number (reference models and sweep).
    pub csv_path: PathBuf,
    /// The plot of joint accuracy against each method's setting.
    pub svg_path: PathBuf,
    /// Examples in the train, validation and test splits.
    pub split_sizes: (usize, usize, usize),
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl DemoReport {
    /// The row called `name`.
    pub fn row(&self, name: &str) -> Option<&ReportRow> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// The merged rows (every row after the base and the two fine-tunes).
    pub fn merged_rows(&self) -> &[ReportRow] {
        self.rows.get(3..).unwrap_or(&[])
    }

    /// The table as text: one line per model, accuracies on the test split.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<17} {:<26} {:>12} {:>12} {:>12}\n",
            "model", "setting", "task A (0-4)", "task B (5-9)", "joint (0-9)"
        );
        s += &format!("{}\n", "-".repeat(17 + 26 + 3 * 13 + 2));
        for r in &self.rows {
            s += &format!(
                "{:<17} {:<26} {:>12.3} {:>12.3} {:>12.3}\n",
                r.name, r.setting, r.accuracy.task_a, r.accuracy.task_b, r.accuracy.joint
            );
        }
        s
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (train, validation, test) = self.split_sizes;
        writeln!(
            f,
            "Accuracy on the held-out test split ({test} digits). Models trained on {train};\n\
             each method's setting chosen by joint accuracy on {validation} validation digits.\n"
        )?;
        f.write_str(&self.table())?;
        for (name, why) in &self.skipped {
            writeln!(f, "not applicable: {name}: {why}")?;
        }
        writeln!(f, "\nmodels:  {}", self.out_dir.join("models").display())?;
        writeln!(f, "merged:  {}", self.out_dir.join("merged").display())?;
        writeln!(f, "configs: {}", self.out_dir.join("configs").display())?;
        writeln!(f, "csv:     {}", self.csv_path.display())?;
        writeln!(f, "plot:    {}", self.svg_path.display())
    }
}

/// Epochs, sizes and sweep grids of a run.
struct Schedule {
    base_per_class: usize,
    base: TrainConfig,
    fine_tune: TrainConfig,
    lambdas: &'static [f64],
    densities: &'static [f64],
    ts: &'static [f64],
}

fn schedule(quick: bool) -> Schedule {
    let base = TrainConfig {
        epochs: 3,
        batch_size: 32,
        learning_rate: 0.05,
        momentum: 0.9,
    };
    // Gentle fine-tunes (small steps, little momentum) keep the task vectors
    // small enough to add: with the base's step size, the best λ of
    // task arithmetic falls to 0.25 and the merges are worse.
    let fine_tune = TrainConfig {
        epochs: 10,
        batch_size: 32,
        learning_rate: 0.01,
        momentum: 0.5,
    };
    if quick {
        Schedule {
            base_per_class: 10,
            base,
            fine_tune: TrainConfig {
                epochs: 5,
                ..fine_tune
            },
            lambdas: &[0.5, 1.0],
            densities: &[0.3, 1.0],
            ts: &[0.5],
        }
    } else {
        Schedule {
            base_per_class: 10,
            base,
            fine_tune,
            lambdas: &[0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
            densities: &[0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
            ts: &[0.3, 0.4, 0.5, 0.6, 0.7],
        }
    }
}

/// A seeded stream per phase, so phases do not shift each other's draws.
fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which models a merge is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrangement {
    /// `base_model`: the base; `models`: fine-tunes A and B.
    BaseAndBoth,
    /// `models`: fine-tunes A and B, no base.
    BothOnly,
    /// `base_model`: fine-tune A; `models`: fine-tune B (methods between two
    /// endpoints, such as slerp: `t = 0` is A, `t = 1` is B).
    AToB,
}

impl Arrangement {
    /// Short name for the CSV: `base+A+B`, `A+B` or `A->B`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arrangement::BaseAndBoth => "base+A+B",
            Arrangement::BothOnly => "A+B",
            Arrangement::AToB => "A->B",
        }
    }
}

/// How one registered method is run in this experiment.
#[derive(Debug, Clone)]
pub struct MethodPlan {
    /// The method.
    pub name: &'static str,
    /// Arrangements to try in order (an optional base is tried without,
    /// then with).
    pub arrangements: Vec<Arrangement>,
    /// Whether each model gets its Fisher file (a per-model model-reference
    /// parameter such as `fisher`), and under which name.
    pub fisher_param: Option<&'static str>,
    /// Whether each model must be given `weight: 1` (a required per-model
    /// `weight`, as multislerp and nuslerp declare).
    pub weight_required: bool,
    /// The settings to merge with.
    pub settings: Vec<Setting>,
}

/// Decides how `method` is run on two fine-tunes of one base, or why it does
/// not apply. Driven by the method's declared parameters: `lambda` is swept
/// over `lambdas`, `density` over `densities` (crossed with `lambda`), `t`
/// over `ts`; everything else keeps its default.
pub fn plan_method(
    method: &dyn MergeMethod,
    lambdas: &[f64],
    densities: &[f64],
    ts: &[f64],
) -> Result<MethodPlan, String> {
    let info = method.info();
    // A method of a base and one model interpolates between two endpoints:
    // it gets fine-tune A as its base and B as its model.
    let two_endpoints =
        info.max_models == Some(1) && info.min_models <= 1 && info.base != BaseModel::Unused;
    if info.max_models.is_some_and(|m| m < 2) && !two_endpoints {
        return Err(format!(
            "takes at most {} model(s); the demo merges two fine-tunes",
            info.max_models.unwrap_or(0)
        ));
    }
    if info.min_models > 2 {
        return Err(format!(
            "needs at least {} models; the demo has two fine-tunes",
            info.min_models
        ));
    }
    use Arrangement::*;
    let arrangements = match info.base {
        _ if two_endpoints => vec![AToB],
        BaseModel::Required => vec![BaseAndBoth],
        // Merge the two fine-tunes alone where the base is optional (slerp
        // between them, Fisher averaging as in the paper); with the base only
        // if that fails.
        BaseModel::Optional => vec![BothOnly, BaseAndBoth],
        BaseModel::Unused => vec![BothOnly],
    };
    let mut fisher_param = None;
    let mut weight_required = false;
    let (mut lambda, mut density, mut t) = (false, None, false);
    for p in info.params {
        let float = matches!(p.kind, ParamKind::Float { .. });
        match (p.name, p.scope) {
            ("lambda", Scope::Global) if float => lambda = true,
            ("density", Scope::PerModel) | ("select_topk", Scope::Global) if float => {
                density = Some(p.name);
            }
            ("t", Scope::Global) if float => t = true,
            (name, Scope::PerModel) if p.kind == ParamKind::ModelRef => fisher_param = Some(name),
            ("weight", Scope::PerModel) if float && p.default == ParamDefault::Required => {
                weight_required = true;
            }
            (name, _) if p.default == ParamDefault::Required => {
                return Err(format!(
                    "needs parameter `{name}` ({}), which the demo has no value for",
                    p.kind
                ));
            }
            _ => {}
        }
    }
    let opt = |v: &[f64]| -> Vec<Option<f64>> { v.iter().map(|&x| Some(x)).collect() };
    let lambda_values = if lambda { opt(lambdas) } else { vec![None] };
    let mut settings = Vec::new();
    if let Some(key) = density {
        for &d in densities {
            for &l in &lambda_values {
                settings.push(Setting {
                    lambda: l,
                    density: Some(d),
                    density_key: key,
                    t: None,
                });
            }
        }
    } else if lambda {
        settings.extend(lambda_values.iter().map(|&l| Setting {
            lambda: l,
            ..Setting::default()
        }));
    } else if t {
        settings.extend(ts.iter().map(|&t| Setting {
            t: Some(t),
            ..Setting::default()
        }));
    } else {
        settings.push(Setting::default());
    }
    Ok(MethodPlan {
        name: info.name,
        arrangements,
        fisher_param,
        weight_required,
        settings,
    })
}

/// The input model directories of the merges.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The base model.
    pub base: PathBuf,
    /// Fine-tune A and B.
    pub models: [PathBuf; 2],
    /// Their Fisher estimates.
    pub fishers: [PathBuf; 2],
}

fn quoted(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).unwrap_or_default()
}

/// The mergekit-style YAML config of one merge.
pub fn config_yaml(
    plan: &MethodPlan,
    setting: &Setting,
    arrangement: Arrangement,
    inputs: &Inputs,
    seed: u64,
) -> String {
    let mut y = format!("merge_method: {}\n", plan.name);
    let skip = match arrangement {
        Arrangement::BaseAndBoth => {
            y += &format!("base_model: {}\n", quoted(&inputs.base));
            0
        }
        Arrangement::BothOnly => 0,
        Arrangement::AToB => {
            y += &format!("base_model: {}\n", quoted(&inputs.models[0]));
            1
        }
    };
    y += "models:\n";
    for (model, fisher) in inputs.models.iter().zip(&inputs.fishers).skip(skip) {
        y += &format!("  - model: {}\n", quoted(model));
        let mut params = Vec::new();
        if plan.weight_required {
            params.push("weight: 1.0".to_string());
        }
        if let Some(d) = setting
            .density
            .filter(|_| setting.density_key != "select_topk")
        {
            params.push(format!("density: {d}"));
        }
        if let Some(name) = plan.fisher_param {
            params.push(format!("{name}: {}", quoted(fisher)));
        }
        if !params.is_empty() {
            y += &format!("    parameters: {{{}}}\n", params.join(", "));
        }
    }
    let mut global = Vec::new();
    if let Some(d) = setting
        .density
        .filter(|_| setting.density_key == "select_topk")
    {
        global.push(format!("select_topk: {d}"));
    }
    if let Some(l) = setting.lambda {
        global.push(format!("lambda: {l}"));
    }
    if let Some(t) = setting.t {
        global.push(format!("t: {t}"));
    }
    if !global.is_empty() {
        y += &format!("parameters: {{{}}}\n", global.join(", "));
    }
    y += &format!("dtype: float32\nseed: {seed}\n");
    y
}

/// Test splits of the two tasks.
struct TestSets {
    a: Dataset,
    b: Dataset,
    all: Dataset,
}

impl TestSets {
    fn evaluate(&self, m: &Mlp) -> Accuracy {
        Accuracy {
            task_a: m.accuracy(&self.a),
            task_b: m.accuracy(&self.b),
            joint: m.accuracy(&self.all),
        }
    }
}

/// Runs the whole demo into `opts.out` and returns what it measured.
///
/// Deterministic for a given seed (on one machine: the matrix kernels may
/// round differently on another CPU).
pub fn run(opts: &DemoOptions, progress: &dyn DemoProgress) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let sched = schedule(opts.quick);
    let out = &opts.out;
    for sub in ["models", "merged", "configs"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }

    // Data and split.
    let data = Dataset::digits()?;
    let (train_all, test_set) = data.split(TEST_FRACTION, &mut rng(opts.seed, 0));
    let (train_set, validation_set) = train_all.split(VALIDATION_FRACTION, &mut rng(opts.seed, 5));
    let tests = TestSets {
        a: test_set.filter_classes(|c| c < 5),
        b: test_set.filter_classes(|c| c >= 5),
        all: test_set.clone(),
    };
    let (train_a, train_b) = (
        train_set.filter_classes(|c| c < 5),
        train_set.filter_classes(|c| c >= 5),
    );
    let base_set = train_set.balanced_subset(sched.base_per_class, &mut rng(opts.seed, 1));

    // Training.
    let steps = sched.base.epochs + 2 * sched.fine_tune.epochs;
    progress.phase("training", steps as u64);
    let mut r = rng(opts.seed, 2);
    let mut base = Mlp::new(&LAYER_SIZES, &mut r);
    for _ in 0..sched.base.epochs {
        train(
            &mut base,
            &base_set,
            &TrainConfig {
                epochs: 1,
                ..sched.base
            },
            &mut r,
        );
        progress.advance(1);
    }
    let fine_tune = |set: &Dataset, stream: u64| {
        let mut m = base.clone();
        let mut r = rng(opts.seed, stream);
        for _ in 0..sched.fine_tune.epochs {
            train(
                &mut m,
                set,
                &TrainConfig {
                    epochs: 1,
                    ..sched.fine_tune
                },
                &mut r,
            );
            progress.advance(1);
        }
        m
    };
    let model_a = fine_tune(&train_a, 3);
    let model_b = fine_tune(&train_b, 4);

    // Fishers and model directories.
    progress.phase("fisher", 2);
    let fisher_a = diagonal_fisher(&model_a, &train_a);
    progress.advance(1);
    let fisher_b = diagonal_fisher(&model_b, &train_b);
    progress.advance(1);
    let models_dir = out.join("models");
    let inputs = Inputs {
        base: models_dir.join("base"),
        models: [models_dir.join("task_a"), models_dir.join("task_b")],
        fishers: [
            models_dir.join("task_a_fisher"),
            models_dir.join("task_b_fisher"),
        ],
    };
    let base_desc = format!(
        "base: trained {} epochs on {} examples of all ten digits",
        sched.base.epochs,
        base_set.len()
    );
    write_model(&base, &inputs.base, &base_desc)?;
    write_model(
        &model_a,
        &inputs.models[0],
        "fine-tune A: the base trained on digits 0-4",
    )?;
    write_model(
        &model_b,
        &inputs.models[1],
        "fine-tune B: the base trained on digits 5-9",
    )?;
    write_model(
        &fisher_a,
        &inputs.fishers[0],
        "diagonal Fisher of fine-tune A on its training digits 0-4 (arXiv:2111.09832)",
    )?;
    write_model(
        &fisher_b,
        &inputs.fishers[1],
        "diagonal Fisher of fine-tune B on its training digits 5-9 (arXiv:2111.09832)",
    )?;

    // Reference rows, read back from disk as the merges will be.
    let mut rows = Vec::new();
    for (name, setting, dir) in [
        (
            "base",
            format!("{} examples, 0-9", base_set.len()),
            &inputs.base,
        ),
        (
            "fine-tune A",
            "digits 0-4 only".to_string(),
            &inputs.models[0],
        ),
        (
            "fine-tune B",
            "digits 5-9 only".to_string(),
            &inputs.models[1],
        ),
    ] {
        let model = read_model(dir, &LAYER_SIZES)?;
        rows.push(ReportRow {
            name: name.to_string(),
            setting,
            accuracy: tests.evaluate(&model),
            validation_joint: model.accuracy(&validation_set),
            model_dir: dir.clone(),
        });
    }

    // Plans for every registered method.
    let mut plans = Vec::new();
    let mut skipped = Vec::new();
    for method in tensormerge::builtin::registry().methods() {
        match plan_method(method, sched.lambdas, sched.densities, sched.ts) {
            Ok(p) => plans.push(p),
            Err(why) => skipped.push((method.info().name.to_string(), why)),
        }
    }

    // The sweep.
    let total: usize = plans.iter().map(|p| p.settings.len()).sum();
    progress.phase("merging", total as u64);
    let scratch = out.join(".sweep");
    let mut sweep = Vec::new();
    for plan in &plans {
        let mut best: Option<(SweepPoint, String)> = None;
        let mut failure = None;
        for setting in &plan.settings {
            let mut done = None;
            for &arrangement in &plan.arrangements {
                let yaml = config_yaml(plan, setting, arrangement, &inputs, opts.seed);
                let label = setting.to_string();
                let job = Job {
                    method: plan.name,
                    setting: &label,
                    yaml: &yaml,
                };
                match merge(&job, &scratch) {
                    Ok(()) => {
                        done = Some((arrangement, yaml));
                        break;
                    }
                    Err(e) => failure = Some(e),
                }
            }
            progress.advance(1);
            let Some((arrangement, yaml)) = done else {
                continue;
            };
            let merged = read_model(&scratch, &LAYER_SIZES)?;
            let point = SweepPoint {
                method: plan.name.to_string(),
                setting: *setting,
                arrangement,
                accuracy: tests.evaluate(&merged),
                validation_joint: merged.accuracy(&validation_set),
            };
            if best
                .as_ref()
                .is_none_or(|(b, _)| point.validation_joint > b.validation_joint)
            {
                best = Some((point.clone(), yaml));
            }
            sweep.push(point);
        }
        match best {
            None => {
                let why = failure.map_or("no setting merged".to_string(), |e| e.to_string());
                skipped.push((plan.name.to_string(), why));
            }
            Some((point, yaml)) => {
                // Keep the best merge and its config.
                let dir = out.join("merged").join(plan.name);
                let label = point.setting.to_string();
                let job = Job {
                    method: plan.name,
                    setting: &label,
                    yaml: &yaml,
                };
                merge(&job, &dir)?;
                let config = out.join("configs").join(format!("{}.yml", plan.name));
                std::fs::write(&config, &yaml).map_err(io_err(&config))?;
                rows.push(ReportRow {
                    name: plan.name.to_string(),
                    setting: point.label(),
                    accuracy: point.accuracy,
                    validation_joint: point.validation_joint,
                    model_dir: dir,
                });
            }
        }
    }
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(io_err(&scratch))?;
    }
    skipped.sort();

    // CSV and plot.
    let csv_path = out.join("results.csv");
    std::fs::write(&csv_path, csv(&rows, &sweep)).map_err(io_err(&csv_path))?;
    let svg_path = out.join("joint_accuracy.svg");
    let references: Vec<(String, f64)> = rows[..3]
        .iter()
        .map(|r| (r.name.clone(), r.accuracy.joint))
        .collect();
    draw(&svg_path, &panels(&plans, &sweep), &references)?;

    Ok(DemoReport {
        rows,
        sweep,
        skipped,
        out_dir: out.clone(),
        csv_path,
        svg_path,
        split_sizes: (train_set.len(), validation_set.len(), test_set.len()),
        elapsed: started.elapsed(),
    })
}

/// Header of the CSV.
pub const CSV_HEADER: &str =
    "model,inputs,density,lambda,t,task_a,task_b,joint,validation_joint,best";

fn csv(rows: &[ReportRow], sweep: &[SweepPoint]) -> String {
    let f = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    let mut s = format!("{CSV_HEADER}\n");
    for r in &rows[..3.min(rows.len())] {
        let a = r.accuracy;
        s += &format!(
            "{},,,,,{:.4},{:.4},{:.4},{:.4},\n",
            r.name, a.task_a, a.task_b, a.joint, r.validation_joint
        );
    }
    for p in sweep {
        let best = rows
            .iter()
            .any(|r| r.name == p.method && r.setting == p.label());
        let a = p.accuracy;
        s += &format!(
            "{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{}\n",
            p.method,
            p.arrangement.as_str(),
            f(p.setting.density),
            f(p.setting.lambda),
            f(p.setting.t),
            a.task_a,
            a.task_b,
            a.joint,
            p.validation_joint,
            best
        );
    }
    s
}

/// Plot panels: methods swept over density (best λ at each density), over λ
/// alone, over `t`; methods without a sweep are flat lines in the first panel.
fn panels(plans: &[MethodPlan], sweep: &[SweepPoint]) -> Vec<Panel> {
    let mut by_density = Vec::new();
    let mut by_lambda = Vec::new();
    let mut by_t = Vec::new();
    let mut flat = Vec::new();
    for plan in plans {
        let points: Vec<&SweepPoint> = sweep.iter().filter(|p| p.method == plan.name).collect();
        if points.is_empty() {
            continue;
        }
        let first = points[0].setting;
        let mut xy: Vec<(f64, f64)> = Vec::new();
        let (target, label) = if first.density.is_some() {
            // At each density, the λ chosen on the validation split.
            let mut chosen: Vec<(f64, f64, f64)> = Vec::new();
            for p in &points {
                let d = p.setting.density.unwrap_or(1.0);
                let (v, j) = (p.validation_joint, p.accuracy.joint);
                match chosen.iter_mut().find(|(x, _, _)| *x == d) {
                    Some(e) if v > e.1 => *e = (d, v, j),
                    Some(_) => {}
                    None => chosen.push((d, v, j)),
                }
            }
            xy = chosen.into_iter().map(|(d, _, j)| (d, j)).collect();
            let mut label = plan.name.to_string();
            if first.density_key == "select_topk" {
                label += " (select_topk)";
            }
            if first.lambda.is_some() {
                label += " (λ by validation)";
            }
            (&mut by_density, label)
        } else if first.lambda.is_some() {
            xy = points
                .iter()
                .map(|p| (p.setting.lambda.unwrap_or(1.0), p.accuracy.joint))
                .collect();
            (&mut by_lambda, plan.name.to_string())
        } else if first.t.is_some() {
            xy = points
                .iter()
                .map(|p| (p.setting.t.unwrap_or(0.5), p.accuracy.joint))
                .collect();
            (&mut by_t, plan.name.to_string())
        } else {
            xy.push((0.0, points[0].accuracy.joint));
            (&mut flat, format!("{} (no setting)", plan.name))
        };
        xy.sort_by(|a, b| a.0.total_cmp(&b.0));
        target.push(Series { label, points: xy });
    }
    let mut out: Vec<Panel> = [
        ("swept over λ", "lambda", by_lambda),
        ("swept over density", "density", by_density),
        ("swept over t", "t", by_t),
    ]
    .into_iter()
    .filter(|(_, _, series)| !series.is_empty())
    .map(|(title, axis, series)| Panel {
        title: title.to_string(),
        axis: axis.to_string(),
        series,
    })
    .collect();
    if let Some(first) = out.first_mut() {
        first.series.append(&mut flat);
    } else if !flat.is_empty() {
        out.push(Panel {
            title: "merges".to_string(),
            axis: "no setting".to_string(),
            series: flat,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensormerge_methods::{Chunk, MethodError, MethodInfo, ParamSpec};

    struct Fake(&'static MethodInfo);
    impl MergeMethod for Fake {
        fn info(&self) -> &'static MethodInfo {
            self.0
        }
        fn merge(&self, _: &Chunk<'_>, _: &mut [f32]) -> Result<(), MethodError> {
            Ok(())
        }
    }
    const FLOAT: ParamKind = ParamKind::Float {
        min: 0.0,
        max: f64::INFINITY,
    };
    static DARE_LIKE: MethodInfo = MethodInfo {
        name: "dare_like",
        summary: "",
        paper: "",
        base: BaseModel::Required,
        min_models: 1,
        max_models: None,
        params: &[
            ParamSpec::per_model_float("density", 0.0, 1.0, ParamDefault::Float(1.0), ""),
            ParamSpec::global("lambda", FLOAT, ParamDefault::Float(1.0), ""),
            ParamSpec {
                name: "fisher",
                scope: Scope::PerModel,
                kind: ParamKind::ModelRef,
                default: ParamDefault::Unset,
                doc: "",
            },
        ],
    };
    static ONE_MODEL: MethodInfo = MethodInfo {
        name: "one_model",
        base: BaseModel::Unused,
        max_models: Some(1),
        ..DARE_LIKE
    };
    static ENDPOINTS: MethodInfo = MethodInfo {
        name: "endpoints",
        max_models: Some(1),
        params: &[ParamSpec::global("t", FLOAT, ParamDefault::Required, "")],
        ..DARE_LIKE
    };
    static NEEDS_K: MethodInfo = MethodInfo {
        name: "needs_k",
        base: BaseModel::Optional,
        params: &[ParamSpec::global("k", FLOAT, ParamDefault::Required, "")],
        ..DARE_LIKE
    };
    static SCE_LIKE: MethodInfo = MethodInfo {
        name: "sce_like",
        params: &[ParamSpec::global(
            "select_topk",
            FLOAT,
            ParamDefault::Float(1.0),
            "",
        )],
        ..DARE_LIKE
    };
    static INTERP: MethodInfo = MethodInfo {
        name: "interp",
        base: BaseModel::Optional,
        params: &[
            ParamSpec::global("t", FLOAT, ParamDefault::Required, ""),
            ParamSpec::per_model_float("weight", 0.0, 1.0, ParamDefault::Required, ""),
        ],
        ..DARE_LIKE
    };

    #[test]
    fn plans_follow_the_declared_parameters() {
        let p = plan_method(&Fake(&DARE_LIKE), &[0.5, 1.0], &[0.1, 0.2, 0.3], &[0.5]).unwrap();
        assert_eq!(p.settings.len(), 6);
        assert_eq!(p.settings[1].to_string(), "density=0.1 lambda=1");
        assert_eq!(p.arrangements, vec![Arrangement::BaseAndBoth]);
        assert_eq!(p.fisher_param, Some("fisher"));
        let e = plan_method(&Fake(&ONE_MODEL), &[1.0], &[1.0], &[1.0]).unwrap_err();
        assert!(e.contains("at most 1"), "{e}");
        let p = plan_method(&Fake(&ENDPOINTS), &[1.0], &[1.0], &[0.5]).unwrap();
        assert_eq!(p.arrangements, vec![Arrangement::AToB]);
        let y = config_yaml(&p, &p.settings[0], Arrangement::AToB, &inputs(), 1);
        assert_eq!(
            y,
            "merge_method: endpoints\nbase_model: \"/m/a\"\nmodels:\n  - model: \"/m/b\"\nparameters: {t: 0.5}\ndtype: float32\nseed: 1\n"
        );
        let e = plan_method(&Fake(&NEEDS_K), &[1.0], &[1.0], &[1.0]).unwrap_err();
        assert!(e.contains("`k`"), "{e}");
        let p = plan_method(&Fake(&INTERP), &[1.0], &[1.0], &[0.25, 0.75]).unwrap();
        assert_eq!(
            p.arrangements,
            vec![Arrangement::BothOnly, Arrangement::BaseAndBoth]
        );
        assert_eq!(p.settings.len(), 2);
        assert_eq!(p.settings[0].to_string(), "t=0.25");
        assert!(p.weight_required && p.fisher_param.is_none());
        let y = config_yaml(&p, &p.settings[0], Arrangement::BothOnly, &inputs(), 1);
        assert!(
            y.contains("    parameters: {weight: 1.0}\n") && y.contains("parameters: {t: 0.25}\n")
        );
        assert_eq!(Setting::default().to_string(), "defaults");
        let p = plan_method(&Fake(&SCE_LIKE), &[1.0], &[0.2, 0.4], &[]).unwrap();
        assert_eq!(p.settings.len(), 2);
        assert_eq!(p.settings[1].to_string(), "select_topk=0.4");
        let y = config_yaml(&p, &p.settings[1], Arrangement::BaseAndBoth, &inputs(), 1);
        assert!(
            y.contains("\nparameters: {select_topk: 0.4}\n") && !y.contains("density"),
            "{y}"
        );
    }

    fn inputs() -> Inputs {
        Inputs {
            base: "/m/base".into(),
            models: ["/m/a".into(), "/m/b".into()],
            fishers: ["/m/fa".into(), "/m/fb".into()],
        }
    }

    #[test]
    fn configs_are_mergekit_yaml() {
        let plan = plan_method(&Fake(&DARE_LIKE), &[0.5], &[0.3], &[]).unwrap();
        let inputs = inputs();
        let y = config_yaml(
            &plan,
            &plan.settings[0],
            Arrangement::BaseAndBoth,
            &inputs,
            7,
        );
        assert_eq!(
            y,
            "merge_method: dare_like\nbase_model: \"/m/base\"\nmodels:\n  - model: \"/m/a\"\n    parameters: {density: 0.3, fisher: \"/m/fa\"}\n  - model: \"/m/b\"\n    parameters: {density: 0.3, fisher: \"/m/fb\"}\nparameters: {lambda: 0.5}\ndtype: float32\nseed: 7\n"
        );
        let y = config_yaml(
            &plan,
            &Setting::default(),
            Arrangement::BothOnly,
            &inputs,
            0,
        );
        assert!(!y.contains("base_model") && !y.contains("\nparameters"));
    }
}
