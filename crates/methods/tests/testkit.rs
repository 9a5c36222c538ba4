//! The conformance checks catch broken methods: each deliberately broken
//! method below fails exactly the check aimed at it.
#![cfg(feature = "testkit")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tensormerge_methods::testkit::{Identity, Suite, identity, symmetric};
use tensormerge_methods::*;

macro_rules! method {
    ($ty:ident, $name:literal, |$c:ident, $out:ident| $body:block) => {
        struct $ty;
        impl MergeMethod for $ty {
            fn info(&self) -> &'static MethodInfo {
                static INFO: MethodInfo = MethodInfo {
                    name: $name,
                    summary: "deliberately broken",
                    paper: "none",
                    base: BaseModel::Optional,
                    min_models: 1,
                    max_models: None,
                    params: &[],
                };
                &INFO
            }
            fn merge(&self, $c: &Chunk<'_>, $out: &mut [f32]) -> Result<(), MethodError> {
                $body
                Ok(())
            }
        }
        register_method!($ty);
    };
}

method!(FirstModel, "broken_first_model", |c, out| {
    out.copy_from_slice(c.models[0]);
});

method!(OffsetDependent, "broken_offset_dependent", |c, out| {
    for (i, o) in out.iter_mut().enumerate() {
        *o = c.models[0][i] + c.offset as f32;
    }
});

static CALLS: AtomicU32 = AtomicU32::new(0);
method!(CallCounting, "broken_call_counting", |c, out| {
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    for (i, o) in out.iter_mut().enumerate() {
        *o = c.models[0][i] + n as f32;
    }
});

method!(MakesNan, "broken_makes_nan", |c, out| {
    for (i, o) in out.iter_mut().enumerate() {
        *o = c.models[0][i] * f32::NAN;
    }
});

method!(Biased, "broken_biased_mean", |c, out| {
    for (i, o) in out.iter_mut().enumerate() {
        *o = c.models.iter().map(|m| m[i]).sum::<f32>() / c.models.len() as f32 + 1e-3;
    }
});

/// Adds 1 to whichever tensor its whole-model pass saw first.
struct FirstTensorSeen;
struct FirstPass(Option<String>);
impl StatsPass for FirstPass {
    fn observe(&mut self, _: usize, c: &Chunk<'_>) -> Result<(), MethodError> {
        self.0.get_or_insert_with(|| c.tensor.name.to_string());
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<Stats, MethodError> {
        Ok(Arc::new(self.0.unwrap_or_default()))
    }
}
impl MergeMethod for FirstTensorSeen {
    fn info(&self) -> &'static MethodInfo {
        static INFO: MethodInfo = MethodInfo {
            name: "broken_first_tensor_seen",
            summary: "deliberately broken",
            paper: "none",
            base: BaseModel::Optional,
            min_models: 1,
            max_models: None,
            params: &[],
        };
        &INFO
    }
    fn model_pass(&self, _: &Params, _: &[Params]) -> Option<Box<dyn StatsPass>> {
        Some(Box::new(FirstPass(None)))
    }
    fn merge(&self, c: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        let first = c
            .tensor
            .model_stats
            .and_then(|s| s.downcast_ref::<String>())
            .cloned()
            .unwrap_or_default();
        let bump = if first == c.tensor.name { 1.0 } else { 0.0 };
        for (i, o) in out.iter_mut().enumerate() {
            *o = c.models[0][i] + bump;
        }
        Ok(())
    }
}
register_method!(FirstTensorSeen);

fn fails(f: impl FnOnce()) -> String {
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .expect_err("the check should have failed");
    err.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn a_method_ignoring_the_model_order_passes_but_is_not_symmetric() {
    let suite = Suite::new("broken_first_model").cases(16);
    suite.check_chunking();
    suite.check_threads();
    suite.check_tensor_order();
    suite.check_shapes();
    suite.check_finite();
    let msg = fails(|| suite.clone().with(symmetric()).check_symmetry());
    assert!(msg.contains("symmetry"), "{msg}");
}

#[test]
fn chunk_dependence_is_caught() {
    let suite = Suite::new("broken-offset-dependent").cases(32);
    let msg = fails(|| suite.check_chunking());
    assert!(msg.contains("chunking"), "{msg}");
}

#[test]
fn run_to_run_differences_are_caught_by_the_thread_check() {
    let suite = Suite::new("broken_call_counting").cases(8);
    let msg = fails(|| suite.check_threads());
    assert!(msg.contains("thread count"), "{msg}");
}

#[test]
fn tensor_order_dependence_is_caught() {
    let suite = Suite::new("broken_first_tensor_seen").cases(64);
    suite.check_chunking();
    let msg = fails(|| suite.check_tensor_order());
    assert!(msg.contains("tensor order"), "{msg}");
}

#[test]
fn nan_is_caught() {
    let msg = fails(|| Suite::new("broken_makes_nan").cases(4).check_finite());
    assert!(msg.contains("finite"), "{msg}");
}

#[test]
fn a_false_identity_is_caught() {
    let suite = Suite::new("broken_biased_mean")
        .cases(8)
        .with(identity(Identity::copies_return_copy(vec![], vec![])));
    let msg = fails(|| suite.check_identities());
    assert!(msg.contains("identity"), "{msg}");
}
