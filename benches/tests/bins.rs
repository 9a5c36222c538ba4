//! The measuring binaries run to the end on every case at a small size: a
//! case they cannot handle (a method without a per-tensor pass, a
//! two-model method) must not stop the report half-way.

use std::process::Command;

use tensormerge_benches::CASES;

/// Runs a binary of this package with `args`; its exit code and stdout.
fn run(exe: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(exe)
        .args(args)
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "{exe} {args:?} panicked:\n{stderr}"
    );
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("utf-8"),
    )
}

/// The lines of `stdout` that start with `label` followed by a space.
fn lines_of<'a>(stdout: &'a str, label: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter(|l| l.strip_prefix(label).is_some_and(|r| r.starts_with(' ')))
        .collect()
}

#[test]
fn bench_phases_reports_every_case() {
    let (code, stdout) = run(env!("CARGO_BIN_EXE_bench-phases"), &["4096", "1"]);
    assert_eq!(code, Some(0), "{stdout}");
    for case in CASES
        .iter()
        .filter(|c| !["linear", "task_arithmetic"].contains(&c.method))
    {
        let summary: Vec<_> = lines_of(&stdout, case.label)
            .into_iter()
            .filter(|l| l.contains("least cpu ms") || l.contains("no per-tensor pass"))
            .collect();
        assert_eq!(summary.len(), 1, "{}: {stdout}", case.label);
    }
    // The sparsifying methods do have phases.
    assert!(
        lines_of(&stdout, "dare_linear d=0.5")
            .iter()
            .any(|l| l.contains("least cpu ms"))
    );
    assert!(
        lines_of(&stdout, "fisher (self)")
            .iter()
            .any(|l| l.contains("no per-tensor pass"))
    );
}

#[test]
fn bench_checksum_is_the_same_on_every_run() {
    let exe = env!("CARGO_BIN_EXE_bench-checksum");
    let (code, first) = run(exe, &["3001"]);
    assert_eq!(code, Some(0));
    for case in CASES {
        assert_eq!(
            lines_of(&first, case.label).len(),
            1,
            "{}: {first}",
            case.label
        );
    }
    let (_, second) = run(exe, &["3001"]);
    assert_eq!(first, second);
}

#[test]
fn bench_ratios_reports_every_case() {
    // Ratios at this size say nothing (a target may be missed: exit 1);
    // the report must still be complete.
    let (code, stdout) = run(env!("CARGO_BIN_EXE_bench-ratios"), &["4096", "1"]);
    assert!(matches!(code, Some(0 | 1)), "{code:?}: {stdout}");
    for case in CASES {
        assert_eq!(
            lines_of(&stdout, case.label).len(),
            1,
            "{}: {stdout}",
            case.label
        );
    }
}
