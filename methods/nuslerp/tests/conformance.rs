//! The testkit's conformance suite for `nuslerp`, flattened and row-wise
//! (weights drawn by the suite; swapping the models swaps `t` and `1 − t`).
use tensormerge_method_nuslerp as _;

tensormerge_methods::conformance_suite!(nuslerp_conformance, "nuslerp", symmetric());

tensormerge_methods::conformance_suite!(
    nuslerp_rows_conformance,
    "nuslerp",
    global("nuslerp_flatten", false),
    global("nuslerp_row_wise", true),
    symmetric(),
);
