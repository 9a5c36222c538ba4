//! The testkit's conformance suite for `karcher`.
use tensormerge_method_karcher as _;

tensormerge_methods::conformance_suite!(
    karcher_conformance,
    "karcher",
    symmetric(),
    identity(Identity::single_model_returns_model(vec![], vec![])),
);
