//! `cargo xtask` answers `--help` with its usage on stdout (exit 0), and an
//! unknown task or option with an error naming it and the usage (exit 1),
//! before it builds or writes anything.

use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        // No backtrace in the error text, whatever the caller's environment.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .expect("run xtask")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

#[test]
fn help_prints_the_usage_and_succeeds() {
    for args in [&[][..], &["--help"], &["-h"], &["help"]] {
        let out = xtask(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let stdout = text(&out.stdout);
        for task in ["demo", "bench", "codegen", "fuzz"] {
            assert!(
                stdout.contains(&format!("\n  {task} ")),
                "{args:?}: {stdout}"
            );
        }
    }
    let out = xtask(&["bench", "--help"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    for option in ["--repeat N", "--scale", "--scale-gb G", "--nn"] {
        assert!(stdout.contains(option), "{option}: {stdout}");
    }
    let out = xtask(&["codegen", "--help"]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("--check"));
}

#[test]
fn unknown_tasks_and_options_are_named() {
    for (args, named, usage) in [
        (&["nope"][..], "unknown task `nope`", "tasks:"),
        (
            &["bench", "--bogus"],
            "unknown option `--bogus`",
            "--repeat N",
        ),
        (
            &["bench", "--scale", "--bogus"],
            "unknown option `--bogus`",
            "--scale-gb G",
        ),
        (
            &["codegen", "--bogus"],
            "unknown argument `--bogus`",
            "--check",
        ),
    ] {
        let out = xtask(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(stderr.contains(usage), "{args:?}: {stderr}");
        assert!(!stderr.contains("Stack backtrace"), "{args:?}: {stderr}");
    }
}
