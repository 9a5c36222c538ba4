//! The testkit's conformance suites for `dare_linear` and `dare_ties`: with
//! density 1 each equals its non-dropping counterpart bit for bit.
use tensormerge_method_dare as _;
use tensormerge_method_task_arithmetic as _;
use tensormerge_method_ties as _;

tensormerge_methods::conformance_suite!(
    dare_linear_conformance,
    "dare_linear",
    per_model("density", 0.5),
    identity(Identity::equals(
        "task_arithmetic",
        vec![],
        vec![("density", 1.0.into())],
        vec![]
    )),
    identity(Identity::equals(
        "task_arithmetic",
        vec![("lambda", 0.5.into()), ("normalize", true.into())],
        vec![("density", 1.0.into())],
        vec![("lambda", 0.5.into()), ("normalize", true.into())]
    )),
);

tensormerge_methods::conformance_suite!(
    dare_ties_conformance,
    "dare_ties",
    per_model("density", 0.5),
    global("rescale", "density"),
    identity(Identity::equals(
        "ties",
        vec![],
        vec![("density", 1.0.into())],
        vec![("normalize", false.into())]
    )),
    identity(Identity::equals(
        "ties",
        vec![("normalize", true.into()), ("consensus", "count".into())],
        vec![("density", 1.0.into())],
        vec![("consensus", "count".into())]
    )),
);
