//! The testkit's conformance suite for `ties`, in both trim scopes.
use tensormerge_method_ties as _;

tensormerge_methods::conformance_suite!(
    ties_conformance,
    "ties",
    per_model("density", 0.5),
    symmetric(),
    identity(Identity::single_model_returns_model(
        vec![],
        vec![("density", 1.0.into()), ("weight", 1.0.into())]
    )),
);

tensormerge_methods::conformance_suite!(
    ties_model_scope_conformance,
    "ties",
    per_model("density", 0.3),
    global("trim_scope", "model"),
    global("consensus", "count"),
    symmetric(),
    identity(Identity::single_model_returns_model(
        vec![("trim_scope", "model".into())],
        vec![("density", 1.0.into())]
    )),
);
