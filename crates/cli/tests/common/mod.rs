//! Helpers shared by the end-to-end tests of the `tensormerge` binary
//! (`mod common;` in each test file). Not every test file uses every helper.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The built binary, offline, with colours decided by the flags alone and
/// the thread count of candle not inherited from the environment.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tensormerge"));
    c.env_remove("NO_COLOR")
        .env_remove("RAYON_NUM_THREADS")
        .env("HF_HUB_OFFLINE", "1");
    c
}

/// Runs the binary with `args`.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run tensormerge")
}

/// Bytes of an output stream as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Asserts exit code `code` and that stderr contains every needle.
pub fn fails(o: &Output, code: i32, needles: &[&str]) {
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {e}");
    for n in needles {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}
