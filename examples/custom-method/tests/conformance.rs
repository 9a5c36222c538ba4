//! The testkit's conformance suite for the third-party `example_median`, run the way
//! a method crate outside this repository runs it: from an integration test, with the
//! `testkit` feature enabled only for dev-dependencies (so `cargo build` needs no feature).
use tensormerge_example_custom_method as _;

tensormerge_methods::conformance_suite!(
    example_median_conformance,
    "example_median",
    symmetric(),
    identity(Identity::copies_return_copy(vec![], vec![])),
);
