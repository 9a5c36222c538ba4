//! `tensormerge inspect`: what a model holds, and how far it is from another.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use tensormerge::engine::{EngineError, Mismatch};
use tensormerge::io::Model;

use crate::cli::InspectArgs;
use crate::printer::Printer;

fn open(reference: &str) -> Result<Model> {
    Model::open(reference)
        .map_err(|e| EngineError::io(format!("cannot open model `{reference}`"), e))
        .map_err(anyhow::Error::from)
}

pub fn inspect(a: InspectArgs, _p: &Printer) -> Result<()> {
    let model = open(&a.model)?;
    let mut out = summary(&model, !a.summary);
    if let Some(other_ref) = &a.against {
        let other = open(other_ref)?;
        let base = a.base.as_deref().map(open).transpose()?;
        out.push_str(&compare(
            &model,
            &other,
            base.as_ref(),
            other_ref,
            a.base.as_deref(),
        )?);
    }
    print!("{out}");
    Ok(())
}

fn summary(m: &Model, list: bool) -> String {
    let layout = m.layout();
    let mut out = String::new();
    let _ = writeln!(out, "model: {}", m.name());
    let files = m.files();
    let _ = writeln!(out, "files: {}", files.len());
    for f in &files {
        let size = std::fs::metadata(f).map(|x| x.len()).unwrap_or(0);
        let name = f.file_name().map_or_else(
            || f.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let _ = writeln!(out, "  {name} ({size} bytes)");
    }
    let floats = layout
        .tensors()
        .iter()
        .filter(|t| t.dtype.is_float())
        .count();
    let _ = writeln!(out, "tensors: {} ({floats} floating point)", layout.len());
    let _ = writeln!(out, "parameters: {} (floating point)", layout.num_params());
    let _ = writeln!(out, "tensor bytes: {}", layout.total_bytes());
    let mut dtypes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in layout.tensors() {
        let e = dtypes.entry(t.dtype.to_string()).or_default();
        e.0 += 1;
        e.1 += t.numel();
    }
    let d: Vec<String> = dtypes
        .iter()
        .map(|(k, (n, p))| format!("{k} ({n} tensors, {p} elements)"))
        .collect();
    let _ = writeln!(out, "dtypes: {}", d.join(", "));
    if list {
        let w = layout
            .tensors()
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            out,
            "{:<w$}  {:<5}  {:<20}  ELEMENTS",
            "NAME", "DTYPE", "SHAPE"
        );
        for t in layout.tensors() {
            let _ = writeln!(
                out,
                "{:<w$}  {:<5}  {:<20}  {}",
                t.name,
                t.dtype.to_string(),
                format!("{:?}", t.shape),
                t.numel()
            );
        }
    }
    out
}

/// Per-tensor L2 distance ‖m − o‖ and cosine (of m and o, or of the task
/// vectors m − b and o − b), in f64, one tensor in memory at a time.
fn compare(
    m: &Model,
    o: &Model,
    base: Option<&Model>,
    o_ref: &str,
    b_ref: Option<&str>,
) -> Result<String> {
    let mut mismatches = Vec::new();
    for (name, other) in [(o_ref, Some(o)), (b_ref.unwrap_or(""), base)] {
        let Some(other) = other else { continue };
        for d in m.layout().differences(other.layout()) {
            if let tensormerge::core::CoreError::LayoutMismatch { tensor, detail } = d {
                mismatches.push(Mismatch {
                    model: name.to_string(),
                    tensor,
                    detail,
                });
            }
        }
    }
    if !mismatches.is_empty() {
        return Err(EngineError::Incompatible(mismatches)).context("the models cannot be compared");
    }
    let read = |x: &Model, n: &str| {
        x.read_f32_vec(n)
            .map_err(|e| EngineError::io(format!("cannot read tensor `{n}` of `{}`", x.name()), e))
    };
    let mut out = String::new();
    let what = match b_ref {
        Some(b) => format!("task vectors against `{b}`"),
        None => "weights".to_string(),
    };
    let _ = writeln!(out, "\nagainst: {o_ref} (cosine of {what})");
    let w = m
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<w$}  {:>14}  {:>10}",
        "NAME", "L2_DISTANCE", "COSINE"
    );
    let (mut dist2, mut dot, mut na, mut nb) = (0f64, 0f64, 0f64, 0f64);
    for (t, _) in m.layout().float_tensors() {
        let a = read(m, &t.name)?;
        let b = read(o, &t.name)?;
        let r = base.map(|x| read(x, &t.name)).transpose()?;
        let (mut d2, mut dt, mut xa, mut xb) = (0f64, 0f64, 0f64, 0f64);
        for i in 0..a.len() {
            let (u, v) = (a[i] as f64, b[i] as f64);
            d2 += (u - v) * (u - v);
            let (u, v) = match &r {
                Some(r) => (u - r[i] as f64, v - r[i] as f64),
                None => (u, v),
            };
            dt += u * v;
            xa += u * u;
            xb += v * v;
        }
        let cos = if xa > 0.0 && xb > 0.0 {
            dt / (xa.sqrt() * xb.sqrt())
        } else {
            f64::NAN
        };
        let _ = writeln!(out, "{:<w$}  {:>14.6e}  {:>10.6}", t.name, d2.sqrt(), cos);
        dist2 += d2;
        dot += dt;
        na += xa;
        nb += xb;
    }
    let cos = if na > 0.0 && nb > 0.0 {
        dot / (na.sqrt() * nb.sqrt())
    } else {
        f64::NAN
    };
    let _ = writeln!(
        out,
        "{:<w$}  {:>14.6e}  {:>10.6}",
        "(whole model)",
        dist2.sqrt(),
        cos
    );
    Ok(out)
}
