//! The testkit's conformance suite for `magnitude_prune`: with density 1 it
//! equals `task_arithmetic` bit for bit.
use tensormerge_method_magnitude_prune as _;
use tensormerge_method_task_arithmetic as _;

tensormerge_methods::conformance_suite!(
    magnitude_prune_conformance,
    "magnitude_prune",
    per_model("density", 0.4),
    symmetric(),
    identity(Identity::equals(
        "task_arithmetic",
        vec![],
        vec![("density", 1.0.into())],
        vec![]
    )),
);
