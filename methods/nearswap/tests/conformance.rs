//! The testkit's conformance suite for `nearswap`: `t = 0` keeps the base, a
//! huge `t` swaps in the whole model.
use tensormerge_method_nearswap as _;

tensormerge_methods::conformance_suite!(
    nearswap_conformance,
    "nearswap",
    global("t", 0.5),
    identity(Identity::returns_base(vec![("t", 0.0.into())], vec![])),
    identity(Identity::single_model_returns_model(
        vec![("t", 1e30.into())],
        vec![]
    )),
);
