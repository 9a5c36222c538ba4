//! The mergekit-parity methods through the streaming engine, configured by
//! mergekit YAML with filters and layer gradients: the output files must equal
//! the in-memory `Merge` run with the per-tensor parameters resolved here by
//! hand (bit for bit), on 1 and 2 threads and a small memory budget.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tensormerge::core::{DType, Layout, ModelTensorMapper, ParamVector, TensorInfo, convert};
use tensormerge::engine::{MergeConfig, NoProgress, RunOptions, run_merge};
use tensormerge::io::{Model, ModelWriter, WriterOptions};
use tensormerge::methods::{Merge, ParamValue};

const NAMES: &[(&str, &[usize])] = &[
    ("model.embed_tokens.weight", &[10, 8]),
    ("model.layers.0.self_attn.q_proj.weight", &[6, 8]),
    ("model.layers.0.mlp.up_proj.weight", &[6, 8]),
    ("model.layers.1.self_attn.q_proj.weight", &[6, 8]),
    ("model.layers.1.mlp.up_proj.weight", &[6, 8]),
    ("model.layers.2.self_attn.q_proj.weight", &[6, 8]),
    ("model.layers.2.mlp.up_proj.weight", &[6, 8]),
    ("model.norm.weight", &[8]),
];

fn write_model(dir: &Path, seed: u32) -> PathBuf {
    let infos: Vec<TensorInfo> = NAMES
        .iter()
        .map(|(n, s)| TensorInfo::new(*n, s.to_vec(), DType::F32))
        .collect();
    let mut w = ModelWriter::create(dir, infos.clone(), WriterOptions::default()).unwrap();
    for (k, t) in infos.iter().enumerate() {
        let vals: Vec<f32> = (0..t.numel() as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503) + k as u32 * 977);
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        w.write(
            &t.name,
            &convert::encode_f32_vec(DType::F32, &vals).unwrap(),
        )
        .unwrap();
    }
    w.finish().unwrap();
    std::fs::write(
        dir.join("config.json"),
        "{\"torch_dtype\": \"float32\", \"num_hidden_layers\": 3}\n",
    )
    .unwrap();
    dir.to_path_buf()
}

fn layer(name: &str) -> Option<f64> {
    name.split('.').find_map(|p| p.parse::<f64>().ok())
}

/// A gradient `[a, b]` over the 3 layers (first value outside layers).
fn grad(name: &str, a: f64, b: f64) -> f64 {
    a + (b - a) * layer(name).map_or(0.0, |l| l / 2.0)
}

type Params = (
    Vec<(&'static str, ParamValue)>,
    Vec<Vec<(&'static str, ParamValue)>>,
);

/// Runs `yaml` through the engine and compares every tensor with the
/// in-memory merge under `params(tensor)`.
#[allow(clippy::too_many_arguments)]
fn check(
    tmp: &Path,
    tag: &str,
    method: &str,
    yaml: &str,
    base: Option<&Path>,
    models: &[&Path],
    seed: u64,
    params: impl Fn(&str) -> Params,
) {
    let config = MergeConfig::from_yaml_str(yaml).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let mut outs = Vec::new();
    for (threads, budget) in [(1, 1u64 << 30), (2, 4096)] {
        let out = tmp.join(format!("{tag}-{threads}"));
        let opts = RunOptions {
            threads: Some(threads),
            max_memory: budget,
            ..RunOptions::default()
        };
        run_merge(&config, &out, &opts, &NoProgress).unwrap_or_else(|e| panic!("{tag}: {e}"));
        outs.push(Model::open_path(&out).unwrap());
    }
    let load = |p: &Path| {
        let m = Model::open_path(p).unwrap();
        ModelTensorMapper::for_model(&m).to_vector(&m).unwrap()
    };
    let vb = base.map(load);
    let vms: Vec<ParamVector> = models.iter().map(|p| load(p)).collect();
    let refs: Vec<&ParamVector> = vms.iter().collect();
    let layout: Arc<Layout> = vms[0].layout().clone();
    let m = tensormerge::builtin::registry().get(method).unwrap();
    for (t, r) in layout.float_tensors() {
        let (g, per) = params(&t.name);
        let want = Merge::new(m, g, per)
            .unwrap()
            .seed(seed)
            .run(vb.as_ref(), &refs)
            .unwrap();
        for out in &outs {
            let got = out.read_f32_vec(&t.name).unwrap();
            assert_eq!(
                got,
                want.values().unwrap()[r.clone()],
                "{tag}: tensor {}",
                t.name
            );
        }
    }
}

#[test]
fn parity_methods_through_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let (base, a, b, c) = (
        write_model(&p.join("base"), 1),
        write_model(&p.join("a"), 2),
        write_model(&p.join("b"), 3),
        write_model(&p.join("c"), 4),
    );
    let (sb, sa, sbb, sc) = (
        base.display().to_string(),
        a.display().to_string(),
        b.display().to_string(),
        c.display().to_string(),
    );

    // slerp: mergekit's form (the base listed among the models), a filter
    // and a layer gradient on `t`.
    let yaml = format!(
        "merge_method: slerp\nbase_model: {sb}\nmodels:\n  - model: {sb}\n  - model: {sa}\nparameters:\n  t:\n    - filter: self_attn\n      value: 0.3\n    - value: [0.0, 1.0]\n"
    );
    check(p, "slerp", "slerp", &yaml, Some(&base), &[&a], 0, |n| {
        let t = if n.contains("self_attn") {
            0.3
        } else {
            grad(n, 0.0, 1.0)
        };
        (vec![("t", t.into())], vec![vec![]])
    });

    // della: per-model density by filter, gradient on epsilon, a seed.
    let yaml = format!(
        "merge_method: della\nbase_model: {sb}\nseed: 11\nmodels:\n  - model: {sa}\n    parameters:\n      weight: 1.0\n      density:\n        - filter: mlp\n          value: 0.5\n        - value: 0.8\n  - model: {sbb}\n    parameters:\n      weight: 0.5\n      density: 0.6\nparameters:\n  epsilon: [0.05, 0.15]\n  lambda: 0.9\n"
    );
    check(
        p,
        "della",
        "della",
        &yaml,
        Some(&base),
        &[&a, &b],
        11,
        |n| {
            let d0 = if n.contains("mlp") { 0.5 } else { 0.8 };
            let e = grad(n, 0.05, 0.15);
            (
                vec![("lambda", 0.9.into())],
                vec![
                    vec![
                        ("weight", 1.0.into()),
                        ("density", d0.into()),
                        ("epsilon", e.into()),
                    ],
                    vec![
                        ("weight", 0.5.into()),
                        ("density", 0.6.into()),
                        ("epsilon", e.into()),
                    ],
                ],
            )
        },
    );

    // breadcrumbs_ties: gradient on gamma.
    let yaml = format!(
        "merge_method: breadcrumbs_ties\nbase_model: {sb}\nmodels:\n  - model: {sa}\n  - model: {sbb}\nparameters:\n  density: 0.6\n  gamma: [0.0, 0.2]\n  weight: 1.0\n"
    );
    check(
        p,
        "bct",
        "breadcrumbs_ties",
        &yaml,
        Some(&base),
        &[&a, &b],
        0,
        |n| {
            let per = vec![
                ("density", 0.6.into()),
                ("gamma", grad(n, 0.0, 0.2).into()),
                ("weight", 1.0.into()),
            ];
            (vec![], vec![per.clone(), per])
        },
    );

    // model_stock filter-wise, three models.
    let yaml = format!(
        "merge_method: model_stock\nbase_model: {sb}\nmodels:\n  - model: {sa}\n  - model: {sbb}\n  - model: {sc}\nparameters:\n  filter_wise: true\n"
    );
    check(
        p,
        "ms",
        "model_stock",
        &yaml,
        Some(&base),
        &[&a, &b, &c],
        0,
        |_| (vec![("filter_wise", true.into())], vec![vec![]; 3]),
    );

    // nuslerp around a base, row-wise, weights by gradient.
    let yaml = format!(
        "merge_method: nuslerp\nbase_model: {sb}\nmodels:\n  - model: {sa}\n    parameters:\n      weight: [1.0, 3.0]\n  - model: {sbb}\n    parameters:\n      weight: 1.0\nparameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\n"
    );
    check(
        p,
        "nuslerp",
        "nuslerp",
        &yaml,
        Some(&base),
        &[&a, &b],
        0,
        |n| {
            (
                vec![
                    ("nuslerp_flatten", false.into()),
                    ("nuslerp_row_wise", true.into()),
                ],
                vec![
                    vec![("weight", grad(n, 1.0, 3.0).into())],
                    vec![("weight", 1.0.into())],
                ],
            )
        },
    );

    // passthrough with a filtered scale.
    let yaml = format!(
        "merge_method: passthrough\nmodels:\n  - model: {sa}\n    parameters:\n      scale:\n        - filter: up_proj\n          value: 0.0\n        - value: 1.0\n"
    );
    check(p, "pt", "passthrough", &yaml, None, &[&a], 0, |n| {
        let s = if n.contains("up_proj") { 0.0 } else { 1.0 };
        (vec![], vec![vec![("scale", s.into())]])
    });

    // The rest with plain parameters.
    let yaml = format!(
        "merge_method: karcher\nmodels:\n  - model: {sa}\n    parameters:\n      weight: 2.0\n  - model: {sbb}\n  - model: {sc}\nparameters:\n  max_iter: 20\n"
    );
    check(
        p,
        "karcher",
        "karcher",
        &yaml,
        None,
        &[&a, &b, &c],
        0,
        |_| {
            (
                vec![("max_iter", 20i64.into())],
                vec![vec![("weight", 2.0.into())], vec![], vec![]],
            )
        },
    );
    let yaml = format!(
        "merge_method: multislerp\nbase_model: {sb}\nmodels:\n  - model: {sa}\n    parameters:\n      weight: 0.7\n  - model: {sbb}\n    parameters:\n      weight: 0.3\n"
    );
    check(
        p,
        "multislerp",
        "multislerp",
        &yaml,
        Some(&base),
        &[&a, &b],
        0,
        |_| {
            (
                vec![],
                vec![vec![("weight", 0.7.into())], vec![("weight", 0.3.into())]],
            )
        },
    );
    let yaml = format!(
        "merge_method: nearswap\nbase_model: {sb}\nmodels:\n  - model: {sb}\n  - model: {sa}\nparameters:\n  t: [0.1, 0.5]\n"
    );
    check(
        p,
        "nearswap",
        "nearswap",
        &yaml,
        Some(&base),
        &[&a],
        0,
        |n| (vec![("t", grad(n, 0.1, 0.5).into())], vec![vec![]]),
    );
    let yaml = format!(
        "merge_method: sce\nbase_model: {sb}\nmodels:\n  - model: {sa}\n  - model: {sbb}\n  - model: {sc}\nparameters:\n  select_topk: 0.4\n"
    );
    check(
        p,
        "sce",
        "sce",
        &yaml,
        Some(&base),
        &[&a, &b, &c],
        0,
        |_| (vec![("select_topk", 0.4.into())], vec![vec![]; 3]),
    );
    let yaml = format!(
        "merge_method: magnitude_prune\nbase_model: {sb}\nmodels:\n  - model: {sa}\n    parameters:\n      density: [0.2, 0.9]\n  - model: {sbb}\n    parameters:\n      density: 0.5\n      weight: -0.5\nparameters:\n  rescale: true\n"
    );
    check(
        p,
        "mp",
        "magnitude_prune",
        &yaml,
        Some(&base),
        &[&a, &b],
        0,
        |n| {
            (
                vec![("rescale", true.into())],
                vec![
                    vec![("density", grad(n, 0.2, 0.9).into())],
                    vec![("density", 0.5.into()), ("weight", (-0.5).into())],
                ],
            )
        },
    );
}
