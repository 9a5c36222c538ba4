//! The testkit's conformance suite for `task_arithmetic`.
use tensormerge_method_task_arithmetic as _;

tensormerge_methods::conformance_suite!(
    task_arithmetic_conformance,
    "task_arithmetic",
    global("lambda", 0.7),
    symmetric(),
    identity(Identity::returns_base(vec![("lambda", 0.0.into())], vec![])),
    identity(Identity::returns_base(
        vec![("lambda", 0.0.into()), ("normalize", true.into())],
        vec![]
    )),
);
