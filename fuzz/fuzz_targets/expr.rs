//! The expression language: parser, error rendering, and agreement of the
//! in-memory and chunked evaluators (see `checks/expr.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensormerge_fuzz::expr;

fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data) {
        expr::check(src);
    }
});
