//! Runs the demo in quick mode and checks what it writes and measures.

use std::collections::BTreeSet;

use tensormerge_demo::experiment::CSV_HEADER;
use tensormerge_demo::{DemoOptions, DemoProgress, DemoReport, run};

/// Records every callback, to check that progress adds up.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, u64, u64)>>);

impl DemoProgress for Recorder {
    fn phase(&self, name: &str, total: u64) {
        self.0.lock().unwrap().push((name.to_string(), total, 0));
    }
    fn advance(&self, steps: u64) {
        self.0.lock().unwrap().last_mut().unwrap().2 += steps;
    }
}

fn quick(out: &std::path::Path, seed: u64) -> (DemoReport, Vec<(String, u64, u64)>) {
    let progress = Recorder::default();
    let opts = DemoOptions {
        out: out.to_path_buf(),
        seed,
        quick: true,
    };
    let report = run(&opts, &progress).unwrap();
    (report, progress.0.into_inner().unwrap())
}

#[test]
fn quick_demo_writes_everything_and_merging_beats_both_fine_tunes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let (report, phases) = quick(&out, 0);

    // Progress: every phase completes exactly.
    let names: Vec<&str> = phases.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["training", "fisher", "merging"]);
    assert!(phases.iter().all(|p| p.1 == p.2 && p.1 > 0), "{phases:?}");

    // The table: the references, then every registered method, merged or
    // explained.
    let table = report.to_string();
    for name in ["base", "fine-tune A", "fine-tune B"] {
        assert!(report.row(name).is_some() && table.contains(name), "{name}");
    }
    let merged: BTreeSet<&str> = report
        .merged_rows()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    let skipped: BTreeSet<&str> = report.skipped.iter().map(|s| s.0.as_str()).collect();
    assert!(merged.is_disjoint(&skipped));
    for method in tensormerge::builtin::registry().names() {
        assert!(
            merged.contains(method) || skipped.contains(method),
            "{method} neither merged nor skipped"
        );
        assert!(table.contains(method), "{method} missing from\n{table}");
    }
    for must in [
        "task_arithmetic",
        "linear",
        "ties",
        "dare_linear",
        "dare_ties",
        "fisher",
    ] {
        assert!(
            merged.contains(must),
            "{must} not merged: {:?}",
            report.skipped
        );
    }

    // Files: inputs, Fishers, the best merge and config of each method, CSV, plot.
    for m in ["base", "task_a", "task_b", "task_a_fisher", "task_b_fisher"] {
        let dir = out.join("models").join(m);
        assert!(dir.join("model.safetensors").is_file(), "{m}");
        assert!(dir.join("config.json").is_file(), "{m}");
    }
    for r in report.merged_rows() {
        assert!(
            r.model_dir.join("model.safetensors").is_file(),
            "{}",
            r.name
        );
        let config =
            std::fs::read_to_string(out.join("configs").join(format!("{}.yml", r.name))).unwrap();
        assert!(config.starts_with(&format!("merge_method: {}\n", r.name)));
    }
    assert!(!out.join(".sweep").exists());
    let svg = std::fs::read_to_string(&report.svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("task_arithmetic"));

    // The CSV has every number of the sweep, and marks each best setting.
    let csv = std::fs::read_to_string(&report.csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3 + report.sweep.len());
    for row in &rows {
        assert_eq!(row.len(), 10, "{row:?}");
        for acc in &row[5..9] {
            let v: f64 = acc.parse().unwrap();
            assert!((0.0..=1.0).contains(&v), "{row:?}");
        }
    }
    for r in report.merged_rows() {
        let best: Vec<&Vec<&str>> = rows
            .iter()
            .filter(|row| row[0] == r.name && row[9] == "true")
            .collect();
        assert_eq!(best.len(), 1, "{}", r.name);
        let joint: f64 = best[0][7].parse().unwrap();
        assert!((joint - r.accuracy.joint).abs() < 1e-4);
        // The best row is the maximum of that method's sweep on the
        // validation split.
        let validation: f64 = best[0][8].parse().unwrap();
        assert!((validation - r.validation_joint).abs() < 1e-4);
        assert!(
            report
                .sweep
                .iter()
                .filter(|p| p.method == r.name)
                .all(|p| p.validation_joint <= r.validation_joint)
        );
    }

    // The point of the demo: each fine-tune forgets the other task, and the
    // best merge keeps both.
    let a = report.row("fine-tune A").unwrap().accuracy;
    let b = report.row("fine-tune B").unwrap().accuracy;
    assert!(a.task_a > 0.9 && a.task_b < 0.1, "{a:?}");
    assert!(b.task_b > 0.9 && b.task_a < 0.1, "{b:?}");
    let best = report
        .merged_rows()
        .iter()
        .map(|r| r.accuracy.joint)
        .fold(0.0, f64::max);
    assert!(
        best > a.joint.max(b.joint) + 0.2,
        "best merge {best}, fine-tunes {a:?} {b:?}"
    );

    // A saved config, run again by the engine as `tensormerge merge` would,
    // gives the same bytes.
    let config =
        tensormerge_engine::MergeConfig::from_path(&out.join("configs").join("ties.yml")).unwrap();
    let again = tmp.path().join("ties-again");
    let opts = tensormerge_engine::RunOptions::default();
    tensormerge_engine::run_merge(&config, &again, &opts, &tensormerge_engine::NoProgress).unwrap();
    let file = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(file(&again), file(&report.row("ties").unwrap().model_dir));

    // Same seed, same numbers; the output directory is reused.
    let (again, _) = quick(&out, 0);
    assert_eq!(again.rows, report.rows);
    assert_eq!(again.sweep, report.sweep);
}

#[test]
fn an_unusable_output_directory_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, "not a directory").unwrap();
    let opts = DemoOptions {
        out: file.join("demo"),
        seed: 0,
        quick: true,
    };
    let e = run(&opts, &tensormerge_demo::NoProgress).unwrap_err();
    assert!(matches!(e, tensormerge_demo::DemoError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("plain-file"), "{e}");
}
