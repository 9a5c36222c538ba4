//! The testkit's conformance suite for `sce`.
use tensormerge_method_sce as _;

tensormerge_methods::conformance_suite!(
    sce_conformance,
    "sce",
    global("select_topk", 0.5),
    symmetric(),
    identity(Identity::single_model_returns_model(vec![], vec![])),
);
