//! The testkit's conformance suites for `della` and `della_linear`: with
//! density 1 they equal `ties` and `task_arithmetic` bit for bit.
use tensormerge_method_della as _;
use tensormerge_method_task_arithmetic as _;
use tensormerge_method_ties as _;

tensormerge_methods::conformance_suite!(
    della_conformance,
    "della",
    per_model("density", 0.5),
    per_model("epsilon", 0.2),
    identity(Identity::equals(
        "ties",
        vec![],
        vec![("density", 1.0.into())],
        vec![]
    )),
);

tensormerge_methods::conformance_suite!(
    della_linear_conformance,
    "della_linear",
    per_model("density", 0.4),
    global("rescale", "density"),
    identity(Identity::equals(
        "task_arithmetic",
        vec![],
        vec![("density", 1.0.into())],
        vec![]
    )),
);
