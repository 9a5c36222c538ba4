//! The testkit's conformance suite for `linear`.
use tensormerge_method_linear as _;

tensormerge_methods::conformance_suite!(
    linear_conformance,
    "linear",
    symmetric(),
    identity(Identity::copies_return_copy(vec![], vec![])),
    identity(Identity::copies_return_copy(
        vec![],
        vec![("weight", 0.3.into())]
    )),
);
