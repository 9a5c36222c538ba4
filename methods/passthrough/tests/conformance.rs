//! The testkit's conformance suite for `passthrough`.
use tensormerge_method_passthrough as _;

tensormerge_methods::conformance_suite!(
    passthrough_conformance,
    "passthrough",
    per_model("scale", 0.5),
    identity(Identity::single_model_returns_model(vec![], vec![])),
    identity(Identity::single_model_returns_model(
        vec![],
        vec![("scale", 1.0.into())]
    )),
);
