//! Every crate under `methods/` (except the copyable template) must be
//! referenced by `tensormerge::builtin` and its methods must reach the
//! registry of a binary linking `tensormerge`.

use std::path::Path;

use tensormerge::builtin;

/// `(directory, package name)` of every crate under `methods/`.
fn method_crates() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../methods");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).expect("methods/ directory") {
        let dir = entry.unwrap().path();
        let manifest = dir.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let name = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("name = \"")
                    .and_then(|r| r.strip_suffix('"'))
            })
            .unwrap_or_else(|| panic!("no package name in {}", manifest.display()));
        let dir_name = dir.file_name().unwrap().to_string_lossy().into_owned();
        out.push((dir_name, name.to_string()));
    }
    out.sort();
    out
}

#[test]
fn every_method_crate_is_builtin_and_registered() {
    let crates = method_crates();
    assert!(
        crates.iter().any(|(d, _)| d == "linear"),
        "found {crates:?}"
    );
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/builtin.rs"))
            .unwrap();
    let registered: Vec<&str> = builtin::registry()
        .registrations()
        .iter()
        .map(|r| r.crate_name())
        .collect();
    let mut missing = Vec::new();
    for (dir, package) in &crates {
        if dir == "template" {
            assert!(
                !builtin::is_builtin(package),
                "the template must not be built in"
            );
            continue;
        }
        let ident = package.replace('-', "_");
        if !builtin::is_builtin(package) {
            missing.push(format!("{package}: not in builtin::CRATES"));
        }
        if !source.contains(&format!("use {ident} as _;")) {
            missing.push(format!(
                "{package}: no `use {ident} as _;` in crates/tensormerge/src/builtin.rs"
            ));
        }
        if !registered.contains(&package.as_str()) {
            missing.push(format!(
                "{package}: registers no method in a binary linking `tensormerge`"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "built-in method crates not linked:\n{}",
        missing.join("\n")
    );
    // And nothing is listed that does not exist.
    for package in builtin::CRATES {
        assert!(
            crates.iter().any(|(_, p)| p == package),
            "{package} is listed but not under methods/"
        );
    }
}

#[test]
fn the_registry_is_consistent() {
    let reg = builtin::registry();
    reg.check().expect("no method name is registered twice");
    let names = reg.names();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for name in [
        "dare_linear",
        "dare_ties",
        "fisher",
        "linear",
        "task_arithmetic",
        "ties",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}

#[test]
fn the_example_third_party_method_is_not_in_the_stock_set() {
    // examples/custom-method registers `example_median`; the stock set must not.
    assert!(builtin::registry().get("example_median").is_err());
    assert!(!builtin::is_builtin("tensormerge-example-custom-method"));
}
