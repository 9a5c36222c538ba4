//! Hostile configs and expressions: duplicate keys, deep nesting, alias
//! bombs, YAML tags, out-of-range numbers, very long and very deep
//! expressions. Each must end in a clear error (or a correct result), never a
//! panic, a stack overflow or unbounded time and memory.

use std::time::{Duration, Instant};

use tensormerge_engine::MergeConfig;
use tensormerge_engine::expr::{self, ExprError, MAX_DEPTH, MAX_LEN};

fn err(text: &str) -> String {
    MergeConfig::from_yaml_str(text)
        .expect_err("hostile config accepted")
        .to_string()
}

#[test]
fn duplicate_top_level_key_is_refused_with_its_line() {
    let e = err("merge_method: linear\nmodels:\n  - model: a\nmerge_method: ties\n");
    assert!(e.contains("merge_method"), "{e}");
    assert!(e.to_lowercase().contains("duplicate"), "{e}");
    assert!(e.contains('4'), "no line number: {e}");
}

#[test]
fn duplicate_parameter_key_is_refused() {
    let e = err(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1.0\n      weight: 2.0\n",
    );
    assert!(e.contains("weight"), "{e}");
    assert!(e.to_lowercase().contains("duplicate"), "{e}");
}

#[test]
fn duplicate_model_entries_key_in_flow_mapping_is_refused() {
    let e = err("merge_method: linear\nmodels: [{model: a, model: b}]\n");
    assert!(e.to_lowercase().contains("duplicate"), "{e}");
}

/// Runs `f` on a thread with a small stack (1 MiB; the CLI parses on its 8 MiB main thread): deep recursion on
/// hostile input would overflow it and abort the test process.
fn small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn deeply_nested_flow_sequences_are_refused_without_overflow() {
    for depth in [200usize, 5_000, 100_000] {
        let text = format!(
            "merge_method: linear\nmodels: [{{model: a}}]\nparameters:\n  weight: {}1{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let start = Instant::now();
        let e = small_stack(move || MergeConfig::from_yaml_str(&text).map(|_| ()));
        assert!(e.is_err(), "depth {depth} accepted");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn deeply_nested_block_mappings_are_refused_without_overflow() {
    let mut text = String::from("merge_method: linear\nmodels: [{model: a}]\nparameters:\n");
    for i in 0..2_000 {
        text.push_str(&" ".repeat(2 + i));
        text.push_str("k:\n");
    }
    let e = small_stack(move || MergeConfig::from_yaml_str(&text).map(|_| ()));
    assert!(e.is_err());
}

#[test]
fn alias_bomb_is_bounded() {
    // "Billion laughs": each level references the previous one ten times.
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text.push_str("merge_method: linear\nmodels: [{model: a}]\n");
    let start = Instant::now();
    let r = MergeConfig::from_yaml_str(&text);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "alias expansion took {:?}",
        start.elapsed()
    );
    // Either the alias budget or the unknown key `a0` refuses it.
    assert!(r.is_err());
}

#[test]
fn yaml_tags_never_construct_anything() {
    for text in [
        "merge_method: !!python/object/apply:os.system [\"echo pwned\"]\nmodels: [{model: a}]\n",
        "merge_method: linear\nmodels:\n  - model: !!python/name:os.system a\n",
        "merge_method: linear\nmodels: [{model: a}]\nparameters: !!binary aGVsbG8=\n",
    ] {
        // Whatever the parser does with a tag, a method or model reference
        // must never come out of a tagged node as anything but plain text,
        // and here none of these is a valid config.
        match MergeConfig::from_yaml_str(text) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(c) => {
                assert!(!c.merge_method.contains("system"), "{c:?}");
                assert!(c.models.iter().all(|m| !format!("{m:?}").contains("pwned")));
            }
        }
    }
}

#[test]
fn out_of_range_numbers_are_refused() {
    for (text, key) in [
        (
            "merge_method: linear\nmodels: [{model: a}]\nseed: -1\n",
            "seed",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}]\nseed: 99999999999999999999999\n",
            "seed",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1e400}}]\n",
            "weight",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: -.inf}}]\n",
            "weight",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(key), "{text}: {e}");
    }
}

#[test]
fn config_file_that_is_not_utf8_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.yml");
    std::fs::write(&p, b"merge_method: linear\n\xff\xfe\x00models: []\n").unwrap();
    let e = MergeConfig::from_path(&p).unwrap_err().to_string();
    assert!(e.contains("bad.yml"), "{e}");
}

#[test]
fn expression_longer_than_the_limit_is_refused() {
    let src = format!("a{}", " + a".repeat(MAX_LEN / 4));
    assert!(src.len() > MAX_LEN);
    match expr::parse(&src) {
        Err(ExprError::TooLong { len, max }) => {
            assert_eq!((len, max), (src.len(), MAX_LEN));
        }
        other => panic!("expected TooLong, got {other:?}"),
    }
}

#[test]
fn longest_flat_expression_parses_and_evaluates_on_a_small_stack() {
    // Just under the limit: ~16k additions and ~16k unary minus signs.
    let mut src = String::from("a");
    while src.len() + 8 < MAX_LEN / 2 {
        src.push_str(" + a");
    }
    src.push_str(" - ");
    src.push_str(&"-".repeat(MAX_LEN / 2 - 16));
    src.push('a');
    assert!(src.len() <= MAX_LEN);
    let n_plus = src.matches(" + a").count();
    let n_neg = src.matches('-').count() - 1;
    let out = small_stack(move || {
        let e = expr::parse(&src).expect("long expression");
        let mut ev = expr::Evaluator::new(&e);
        let a = [1.5f32, -2.0];
        let out = ev.eval(&[&a], 2).unwrap().to_vec();
        drop(e);
        out
    });
    // (1 + n_plus) * a - (-1)^n_neg * a, computed independently.
    let sign = if n_neg % 2 == 0 { 1.0f64 } else { -1.0 };
    for (x, &a) in out.iter().zip(&[1.5f64, -2.0]) {
        let expected = (1 + n_plus) as f64 * a - sign * a;
        assert_eq!(f64::from(*x), expected);
    }
}

#[test]
fn parentheses_deeper_than_the_limit_are_refused_at_their_column() {
    let ok = format!("{}a{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
    assert!(expr::parse(&ok).is_ok());
    for depth in [MAX_DEPTH + 1, 30_000] {
        let src = format!("{}a{}", "(".repeat(depth), ")".repeat(depth));
        let e = small_stack(move || expr::parse(&src).unwrap_err());
        assert!(matches!(e, ExprError::TooDeep { .. }), "{e:?}");
        assert_eq!(e.column(), Some(MAX_DEPTH + 1));
    }
}

#[test]
fn multibyte_text_in_errors_renders_without_panicking() {
    for src in [
        "é + * b",
        "a + ü",
        "模型 - ",
        "a \u{202e}+ b",
        "a + 1e99999",
        "a + ☃☃☃)",
    ] {
        if let Err(e) = expr::parse(src) {
            let text = e.to_string();
            assert!(!text.is_empty());
            if let Some(c) = e.column() {
                assert!(c >= 1 && c <= src.chars().count() + 1, "{src}: column {c}");
            }
        }
    }
}
