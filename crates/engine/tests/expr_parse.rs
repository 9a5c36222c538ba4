//! Parsing: accepted syntax, errors with columns and carets, hostile inputs.

use tensormerge_engine::expr::{Evaluator, ExprError, MAX_DEPTH, MAX_LEN, parse};

/// Evaluates on one element per model (models in order of first use).
fn eval1(src: &str, values: &[f32]) -> f32 {
    let e = parse(src).unwrap_or_else(|err| panic!("{src}: {err}"));
    let inputs: Vec<[f32; 1]> = values.iter().map(|v| [*v]).collect();
    let slices: Vec<&[f32]> = inputs.iter().map(|a| &a[..]).collect();
    let mut ev = Evaluator::new(&e);
    ev.eval(&slices, 1).unwrap()[0]
}

#[test]
fn precedence_and_associativity_follow_arithmetic() {
    let (a, b, c) = (7.0f32, 3.0f32, 2.0f32);
    assert_eq!(eval1("a - b - c", &[a, b, c]), (a - b) - c);
    assert_eq!(eval1("a / b / c", &[a, b, c]), (a / b) / c);
    assert_eq!(eval1("a - b * c", &[a, b, c]), a - b * c);
    assert_eq!(eval1("(a - b) * c", &[a, b, c]), (a - b) * c);
    assert_eq!(eval1("a + b / c - a", &[a, b, c]), (a + b / c) - a);
    assert_eq!(eval1("-a * b", &[a, b]), (-a) * b);
    assert_eq!(eval1("a - -b", &[a, b]), a - (-b));
    assert_eq!(eval1("a * - - b", &[a, b]), a * b);
    assert_eq!(eval1("--a", &[a]), a);
    assert_eq!(eval1("-(a - b)", &[a, b]), -(a - b));
    assert_eq!(eval1("2 * 3 + a", &[a]), 6.0 + a);
    assert_eq!(eval1("1 / (a - a)", &[a]), f32::INFINITY);
}

#[test]
fn numbers_in_every_accepted_form() {
    let x = 1.0f32;
    for (src, want) in [
        ("x * 2", 2.0f32),
        ("x * 0.5", 0.5),
        ("x * .25", 0.25),
        ("x * 3.", 3.0),
        ("x * 1e-3", 1e-3),
        ("x * 1.5E+2", 150.0),
        ("x * 2e2", 200.0),
        ("x * 0.1", 0.1),
    ] {
        assert_eq!(eval1(src, &[x]), want, "{src}");
    }
}

#[test]
fn names_and_whitespace() {
    let e = parse("\tbase_1 +\n  ft2 *_x ").unwrap();
    assert_eq!(e.models().collect::<Vec<_>>(), ["base_1", "ft2", "_x"]);
    assert_eq!(e.column_of("ft2"), Some(13));
    assert_eq!(e.to_string(), "\tbase_1 +\n  ft2 *_x ");
    let repeated = parse("a + a * b - a").unwrap();
    assert_eq!(repeated.models().collect::<Vec<_>>(), ["a", "b"]);
}

fn syntax(src: &str) -> (usize, String) {
    match parse(src) {
        Err(e @ ExprError::Syntax { .. }) => (e.column().unwrap(), e.to_string()),
        other => panic!("{src:?}: expected a syntax error, got {other:?}"),
    }
}

#[test]
fn syntax_errors_point_at_the_column() {
    let cases: &[(&str, usize, &str)] = &[
        ("base + 0.5 * (legal - )", 23, "found `)`"),
        ("a + * b", 5, "found `*`"),
        ("a b", 3, "expected an operator"),
        ("(a + b", 7, "expected `)` to close the `(` at column 1"),
        ("a + b)", 6, "unmatched `)`"),
        ("a +", 4, "found the end of the expression"),
        ("a ^ 2", 3, "no power operator"),
        ("a + 2b", 6, "write `*` for a product"),
        ("a * 1e", 7, "exponent"),
        ("a * 1.2.3", 5, "not a valid number"),
        ("a * 1e39", 5, "too large"),
        ("+a", 1, "no unary plus"),
        ("a = b", 3, "single formula"),
        ("   ", 1, "empty"),
        ("a + ()", 6, "found `)`"),
        ("é + a", 1, "unexpected character `\\u{e9}`"),
        ("a + é", 5, "unexpected character"),
    ];
    for (src, col, msg) in cases {
        let (column, text) = syntax(src);
        assert_eq!(column, *col, "{src:?}: {text}");
        assert!(text.contains(msg), "{src:?}: {text}");
        assert!(
            text.starts_with(&format!("syntax error at column {col}: ")),
            "{text}"
        );
    }
}

#[test]
fn caret_sits_under_the_column() {
    for src in ["base + 0.5 * (legal - )", "a ^ 2", "a\t+ *b", "é + a $"] {
        let err = parse(src).unwrap_err();
        let col = err.column().unwrap();
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], format!("  {}", src.replace('\t', " ")).trim_end());
        let caret_at = lines[2].chars().count() - 1;
        assert!(lines[2].ends_with('^') && lines[2].trim() == "^", "{text}");
        // The caret is under the offending character.
        let under: char = lines[1].chars().nth(caret_at).unwrap_or(' ');
        let expected: char = src.chars().nth(col - 1).unwrap_or(' ');
        let expected = if expected == '\t' { ' ' } else { expected };
        assert_eq!(under, expected, "{text}");
    }
}

#[test]
fn long_expressions_show_a_window_around_the_column() {
    let src = format!("{} + * x", vec!["a"; 200].join(" + "));
    let err = parse(&src).unwrap_err();
    let col = err.column().unwrap();
    assert_eq!(src.chars().nth(col - 1), Some('*'));
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].len() < 100, "{text}");
    assert!(lines[1].starts_with("  ..."), "{text}");
    let caret_at = lines[2].len() - 1;
    assert_eq!(lines[1].as_bytes()[caret_at], b'*', "{text}");
}

#[test]
fn scalar_only_expressions_are_refused() {
    assert!(matches!(parse("1 + 2"), Err(ExprError::NoModel { .. })));
    assert!(matches!(parse("-(3)"), Err(ExprError::NoModel { .. })));
}

#[test]
fn hostile_nesting_is_an_error_not_a_crash() {
    // Just inside the limit works.
    let ok = format!("{}a{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
    assert_eq!(eval1(&ok, &[4.0]), 4.0);
    // One deeper, and far deeper, are errors at the first `(` too many.
    for depth in [MAX_DEPTH + 1, 10_000, MAX_LEN / 2] {
        let src = format!("{}a{}", "(".repeat(depth), ")".repeat(depth));
        let src = &src[..src.len().min(MAX_LEN)];
        match parse(src) {
            Err(e @ ExprError::TooDeep { .. }) => {
                assert_eq!(e.column(), Some(MAX_DEPTH + 1));
                assert!(e.to_string().contains(&format!("deeper than {MAX_DEPTH}")));
            }
            other => panic!("depth {depth}: {other:?}"),
        }
    }
    // Unclosed parentheses only.
    assert!(matches!(
        parse(&"(".repeat(MAX_LEN)),
        Err(ExprError::TooDeep { .. })
    ));
}

#[test]
fn hostile_length_is_an_error_not_a_crash() {
    let too_long = "a+".repeat(MAX_LEN / 2) + "a";
    assert!(matches!(
        parse(&too_long),
        Err(ExprError::TooLong { len, max }) if len == MAX_LEN + 1 && max == MAX_LEN
    ));
    // The longest accepted chains, of every shape, parse, evaluate and drop
    // without recursion: a left-deep sum, a unary-minus run, a long product.
    let n = MAX_LEN / 4 - 1;
    let sum = format!("a{}", " + a".repeat(n));
    assert_eq!(eval1(&sum, &[1.0]), (n + 1) as f32);
    let negs = format!("{}a", "-".repeat(MAX_LEN - 1));
    assert_eq!(
        eval1(&negs, &[2.0]),
        if (MAX_LEN - 1).is_multiple_of(2) {
            2.0
        } else {
            -2.0
        }
    );
    let prod = format!("a{}", "*1".repeat((MAX_LEN - 1) / 2));
    assert_eq!(eval1(&prod, &[3.0]), 3.0);
    // Right-nested at the depth limit, each level holding a pending operand:
    // the evaluator's scratch stays bounded by the nesting depth.
    let mut right = String::from("a");
    for _ in 0..MAX_DEPTH {
        right = format!("a - (a * 2 + {right})");
    }
    let e = parse(&right).unwrap();
    let ev = Evaluator::new(&e);
    assert!(
        ev.scratch_buffers() <= MAX_DEPTH + 2,
        "{}",
        ev.scratch_buffers()
    );
}

#[test]
fn garbage_never_panics() {
    // A small deterministic fuzz over the token alphabet.
    let alphabet: Vec<char> = "ab01.e+-*/() \t^é".chars().collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..3000 {
        let len = (state % 24) as usize;
        let mut s = String::new();
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s.push(alphabet[(state % alphabet.len() as u64) as usize]);
        }
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        match parse(&s) {
            Ok(e) => {
                let n = e.models().len();
                let inputs = vec![[1.5f32]; n];
                let slices: Vec<&[f32]> = inputs.iter().map(|a| &a[..]).collect();
                Evaluator::new(&e).eval(&slices, 1).unwrap();
            }
            Err(err) => {
                if let Some(col) = err.column() {
                    assert!(col >= 1 && col <= s.chars().count() + 1, "{s:?}: {err}");
                }
            }
        }
    }
}

#[test]
fn many_distinct_names_parse_in_linear_time() {
    // About 10,000 distinct names in the longest accepted text.
    let mut src = String::from("m0");
    let mut i = 1;
    while src.len() + 8 < MAX_LEN {
        src.push_str(&format!("+m{i}"));
        i += 1;
    }
    let start = std::time::Instant::now();
    let e = parse(&src).unwrap();
    assert_eq!(e.models().len(), i);
    assert_eq!(e.column_of("m1"), Some(4));
    let ones = vec![[1.0f32]; i];
    let slices: Vec<&[f32]> = ones.iter().map(|a| &a[..]).collect();
    assert_eq!(Evaluator::new(&e).eval(&slices, 1).unwrap(), &[i as f32]);
    assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
}
