//! The testkit's conformance suite for `fisher`: with equal Fishers it is
//! `linear` (to rounding: the sums are formed differently).
use tensormerge_method_fisher as _;
use tensormerge_method_linear as _;

tensormerge_methods::conformance_suite!(
    fisher_conformance,
    "fisher",
    symmetric(),
    identity(Identity::Equals {
        other: "linear",
        global: vec![],
        per_model: vec![],
        other_global: vec![],
        other_per_model: vec![],
        equal_aux: true,
        tolerance: 1e-6,
    }),
    identity(Identity::Equals {
        other: "linear",
        global: vec![
            ("normalize_fishers", false.into()),
            ("fisher_floor", 0.0.into())
        ],
        per_model: vec![("weight", 0.4.into())],
        other_global: vec![],
        other_per_model: vec![("weight", 0.4.into())],
        equal_aux: true,
        tolerance: 1e-6,
    }),
);
