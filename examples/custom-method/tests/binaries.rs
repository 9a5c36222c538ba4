//! The binary that links the third-party crate lists and runs its method;
//! a binary linking only the stock set does not have it.

use std::process::Command;

fn stdout(exe: &str) -> String {
    let out = Command::new(exe).output().expect("run the binary");
    assert!(
        out.status.success(),
        "{exe} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn the_custom_binary_lists_and_runs_the_third_party_method() {
    let text = stdout(env!("CARGO_BIN_EXE_custom-merge"));
    let names: Vec<&str> = text.lines().filter_map(|l| l.split('\t').next()).collect();
    let line = text
        .lines()
        .find(|l| l.starts_with("example_median\t"))
        .expect("example_median is listed");
    assert!(line.contains("tensormerge-example-custom-method"), "{line}");
    for builtin in ["linear", "task_arithmetic", "ties", "dare_ties", "fisher"] {
        assert!(names.contains(&builtin), "{builtin} missing:\n{text}");
    }
    // Usable: median of (1, 3, 2), (5, 1, 2), (2, 2, 9).
    assert!(
        text.contains("example_median([1, 5, 2], [3, 1, 2], [2, 2, 9]) = [2.0, 2.0, 2.0]"),
        "{text}"
    );
}

#[test]
fn the_stock_set_does_not_have_it() {
    let text = stdout(env!("CARGO_BIN_EXE_stock-registry"));
    let names: Vec<&str> = text.lines().collect();
    assert!(
        names.contains(&"ties") && names.contains(&"linear"),
        "{text}"
    );
    assert!(!names.contains(&"example_median"), "{text}");
    assert!(!names.contains(&"template_scale"), "{text}");
    assert!(!tensormerge::builtin::is_builtin(
        "tensormerge-example-custom-method"
    ));
}
