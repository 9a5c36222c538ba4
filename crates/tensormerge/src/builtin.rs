//! The built-in merge methods.
//!
//! A method crate registers itself with the registry only if it is linked
//! into the binary, and it is linked only if some crate references it. This
//! module references every built-in method crate (every crate under
//! `methods/` except the copyable `methods/template`), so any binary that
//! depends on `tensormerge` and calls [`registry`] sees them all. A test
//! (`tests/builtin.rs`) fails when a crate under `methods/` is missing here
//! or its methods do not reach the registry.
//!
//! Adding a method crate: add it to `Cargo.toml`, add a `use … as _;` line
//! and its package name to [`CRATES`].
//!
//! ```
//! let names = tensormerge::builtin::registry().names();
//! assert!(names.contains(&"ties") || names.contains(&"linear"));
//! ```

use tensormerge_method_breadcrumbs as _;
use tensormerge_method_dare as _;
use tensormerge_method_della as _;
use tensormerge_method_fisher as _;
use tensormerge_method_karcher as _;
use tensormerge_method_linear as _;
use tensormerge_method_magnitude_prune as _;
use tensormerge_method_model_stock as _;
use tensormerge_method_multislerp as _;
use tensormerge_method_nearswap as _;
use tensormerge_method_nuslerp as _;
use tensormerge_method_passthrough as _;
use tensormerge_method_sce as _;
use tensormerge_method_slerp as _;
use tensormerge_method_task_arithmetic as _;
use tensormerge_method_ties as _;

/// Package names of the built-in method crates, sorted.
pub const CRATES: &[&str] = &[
    "tensormerge-method-breadcrumbs",
    "tensormerge-method-dare",
    "tensormerge-method-della",
    "tensormerge-method-fisher",
    "tensormerge-method-karcher",
    "tensormerge-method-linear",
    "tensormerge-method-magnitude-prune",
    "tensormerge-method-model-stock",
    "tensormerge-method-multislerp",
    "tensormerge-method-nearswap",
    "tensormerge-method-nuslerp",
    "tensormerge-method-passthrough",
    "tensormerge-method-sce",
    "tensormerge-method-slerp",
    "tensormerge-method-task-arithmetic",
    "tensormerge-method-ties",
];

/// The global method registry, with every built-in method linked in.
pub fn registry() -> &'static tensormerge_methods::Registry {
    tensormerge_methods::registry()
}

/// Whether `crate_name` (a package name) is a built-in method crate.
pub fn is_builtin(crate_name: &str) -> bool {
    CRATES.contains(&crate_name)
}
