//! `docs/methods.md` must equal what `cargo xtask codegen` generates from the
//! registry; it fails when a method, parameter, default or summary changed
//! without regenerating the file.

use std::path::Path;

use tensormerge::builtin;
use tensormerge::docs::{METHODS_MD, methods_markdown};

#[test]
fn methods_md_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(METHODS_MD);
    let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run `cargo xtask codegen`",
            path.display()
        )
    });
    let fresh = methods_markdown();
    if on_disk != fresh {
        let line = on_disk
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || on_disk.lines().count().min(fresh.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "{} is stale (first difference at line {line}); run `cargo xtask codegen`",
            path.display()
        );
    }
}

#[test]
fn every_method_and_parameter_is_documented() {
    let md = methods_markdown();
    let reg = builtin::registry();
    assert!(reg.names().len() >= 10, "{:?}", reg.names());
    for m in reg.methods() {
        let info = m.info();
        let section = md
            .split("\n## ")
            .find(|s| s.starts_with(&format!("`{}`", info.name)))
            .unwrap_or_else(|| panic!("no section for {}", info.name));
        assert!(section.contains(info.paper), "{}: paper missing", info.name);
        for p in info.params {
            assert!(
                section.contains(&format!("| `{}` |", p.name)),
                "{}: parameter {} missing",
                info.name,
                p.name
            );
        }
    }
    // Spot checks of the rendering.
    assert!(md.contains("| `t` | global | number | required |"));
    assert!(md.contains("| `gamma` | per model | number in [0, 1] | `0.01` |"));
}
