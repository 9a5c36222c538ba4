//! The testkit's conformance suite for `multislerp` (weights drawn by the suite).
use tensormerge_method_multislerp as _;

tensormerge_methods::conformance_suite!(
    multislerp_conformance,
    "multislerp",
    symmetric(),
    identity(Identity::single_model_returns_model(
        vec![],
        vec![("weight", 1.0.into())]
    )),
);
