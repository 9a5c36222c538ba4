//! `custom-merge`: a binary that links the built-in methods (through
//! `tensormerge::builtin`) and the third-party `example_median`, prints the
//! registry (one method per line: name, crate, summary), then merges three
//! small vectors with `example_median` to show that it is usable.

use std::process::ExitCode;
use std::sync::Arc;

use tensormerge::builtin;
use tensormerge::{DType, Layout, Merge, ParamVector, TensorInfo};
use tensormerge_example_custom_method as _; // link the third-party method

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let registry = builtin::registry();
    registry.check()?;
    for r in registry.registrations() {
        let info = r.method().info();
        println!("{}\t{}\t{}", info.name, r.crate_name(), info.summary);
    }
    let layout = Arc::new(Layout::new(vec![TensorInfo::new(
        "w",
        vec![3],
        DType::F32,
    )])?);
    let v = |x: [f32; 3]| ParamVector::from_vec(layout.clone(), x.to_vec());
    let (a, b, c) = (
        v([1.0, 5.0, 2.0])?,
        v([3.0, 1.0, 2.0])?,
        v([2.0, 2.0, 9.0])?,
    );
    let method = registry.get("example_median")?;
    let out = Merge::with_defaults(method, 3)?.run(None, &[&a, &b, &c])?;
    println!(
        "example_median([1, 5, 2], [3, 1, 2], [2, 2, 9]) = {:?}",
        out.values()?
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
