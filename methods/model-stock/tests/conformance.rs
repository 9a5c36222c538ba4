//! The testkit's conformance suite for `model_stock`, per tensor and per row:
//! copies of one model give that model back exactly.
use tensormerge_method_model_stock as _;

tensormerge_methods::conformance_suite!(
    model_stock_conformance,
    "model_stock",
    symmetric(),
    identity(Identity::copies_return_copy(vec![], vec![])),
);

tensormerge_methods::conformance_suite!(
    model_stock_filter_wise_conformance,
    "model_stock",
    global("filter_wise", true),
    symmetric(),
    identity(Identity::copies_return_copy(
        vec![("filter_wise", true.into())],
        vec![]
    )),
);
