//! Hostile models reach the planner: a pickle-only directory, a header
//! claiming more than the limit, an index naming a file outside its
//! directory, a named pipe. Planning (the dry run, before any weight is
//! read) must end in an error naming the model reference and the problem,
//! without panicking, blocking, or writing anything.

use std::path::Path;

use tensormerge_engine::{MergeConfig, RunOptions, plan};
use tensormerge_methods::{
    BaseModel, Chunk, MergeMethod, MethodError, MethodInfo, register_method,
};

/// A trivial method (the first model's values), so that planning gets past
/// the method lookup to the models: no method crate is linked here.
#[derive(Debug)]
struct First;

static INFO: MethodInfo = MethodInfo {
    name: "hostile_first",
    summary: "the first model's values (test only)",
    paper: "none",
    base: BaseModel::Unused,
    min_models: 1,
    max_models: None,
    params: &[],
};

impl MergeMethod for First {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
        out.copy_from_slice(chunk.models[0]);
        Ok(())
    }
}

register_method!(First);

fn tiny(path: &Path) {
    let header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0u8; 8]);
    std::fs::write(path, b).unwrap();
}

fn plan_err(good: &Path, bad: &Path) -> String {
    let cfg = MergeConfig::from_yaml_str(&format!(
        "merge_method: hostile_first\nmodels:\n  - model: {}\n  - model: {}\n",
        good.display(),
        bad.display()
    ))
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(plan(&cfg, &RunOptions::default()).map(|_| ()).map_err(|e| {
            // The whole chain of causes, as the CLI prints it.
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(&format!("\n{c}"));
                src = c.source();
            }
            s
        }));
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("planning blocked or panicked")
        .expect_err("a hostile model was planned")
}

#[test]
fn hostile_models_fail_planning_with_their_names() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    std::fs::create_dir(&good).unwrap();
    tiny(&good.join("model.safetensors"));

    // Pickle only: refused, never unpickled.
    let pickle = tmp.path().join("pickled");
    std::fs::create_dir(&pickle).unwrap();
    std::fs::write(pickle.join("pytorch_model.bin"), b"\x80\x02cos\nsystem\n").unwrap();
    let e = plan_err(&good, &pickle);
    assert!(e.contains("pickled") && e.contains("pickle"), "{e}");

    // A header length past the limit.
    let huge = tmp.path().join("huge");
    std::fs::create_dir(&huge).unwrap();
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(huge.join("model.safetensors"), b).unwrap();
    let e = plan_err(&good, &huge);
    assert!(e.contains("huge") && e.contains("limit"), "{e}");

    // An index reaching outside its directory (the file really exists).
    let escape = tmp.path().join("escape");
    std::fs::create_dir(&escape).unwrap();
    tiny(&tmp.path().join("outside.safetensors"));
    std::fs::write(
        escape.join("model.safetensors.index.json"),
        r#"{"weight_map":{"w":"../outside.safetensors"}}"#,
    )
    .unwrap();
    let e = plan_err(&good, &escape);
    assert!(e.contains("../outside.safetensors"), "{e}");
}

#[cfg(unix)]
#[test]
fn a_named_pipe_as_a_model_fails_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.safetensors");
    tiny(&good);
    let fifo = tmp.path().join("pipe.safetensors");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let e = plan_err(&good, &fifo);
    assert!(e.contains("pipe.safetensors"), "{e}");
}
