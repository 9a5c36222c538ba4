//! Checks shared by the fuzz targets and by the regression tests of the main
//! workspace (which include the same files with `#[path]`).
#![allow(missing_docs)]

#[path = "../checks/expr.rs"]
pub mod expr;
#[path = "../checks/header.rs"]
pub mod header;
#[cfg(unix)]
#[path = "../checks/index.rs"]
pub mod index;
#[path = "../checks/yaml_config.rs"]
pub mod yaml_config;

/// A scratch directory private to this fuzzing process.
pub fn scratch_dir(target: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tensormerge-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
