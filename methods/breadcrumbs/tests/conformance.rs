//! The testkit's conformance suites for `breadcrumbs` and `breadcrumbs_ties`:
//! with density 1 they equal `task_arithmetic` and `ties` bit for bit.
use tensormerge_method_breadcrumbs as _;
use tensormerge_method_task_arithmetic as _;
use tensormerge_method_ties as _;

tensormerge_methods::conformance_suite!(
    breadcrumbs_conformance,
    "breadcrumbs",
    per_model("density", 0.5),
    per_model("gamma", 0.1),
    symmetric(),
    identity(Identity::equals(
        "task_arithmetic",
        vec![("lambda", 0.7.into())],
        vec![("density", 1.0.into()), ("gamma", 0.3.into())],
        vec![("lambda", 0.7.into())],
    )),
    identity(Identity::returns_base(
        vec![("lambda", 0.0.into())],
        vec![("density", 0.5.into())]
    )),
);

tensormerge_methods::conformance_suite!(
    breadcrumbs_ties_conformance,
    "breadcrumbs_ties",
    per_model("density", 0.6),
    per_model("gamma", 0.05),
    global("rescale", true),
    symmetric(),
    identity(Identity::equals(
        "ties",
        vec![("normalize", true.into())],
        vec![("density", 1.0.into())],
        vec![],
    )),
);
