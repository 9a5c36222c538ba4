//! The testkit's conformance suite for `slerp`: `t = 0` is the base, `t = 1`
//! the model, exactly.
use tensormerge_method_slerp as _;

tensormerge_methods::conformance_suite!(
    slerp_conformance,
    "slerp",
    global("t", 0.3),
    identity(Identity::returns_base(vec![("t", 0.0.into())], vec![])),
    identity(Identity::single_model_returns_model(
        vec![("t", 1.0.into())],
        vec![]
    )),
);
