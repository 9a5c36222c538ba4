//! Faults while reading and writing: a full disk (RLIMIT_FSIZE in a child
//! process, so no privileges or special file systems are needed), a writer
//! killed with SIGKILL mid-model, and an input file truncated while it is
//! open. The output directory never appears half-written, the temporary
//! directory is removed or clearly named, and reading a shrunken input is an
//! error, not a crash.
//!
//! Each test runs its faulty part in a child: the test binary re-executed
//! for the same test with `TM_FAULT_CHILD` set.
#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tensormerge_core::{DType, TensorInfo, convert};
use tensormerge_io::{Model, ModelWriter, WriterOptions};

const CHILD: &str = "TM_FAULT_CHILD";
const DIR: &str = "TM_FAULT_DIR";

/// In the child: the directory the parent gave.
fn child_dir() -> Option<PathBuf> {
    std::env::var_os(CHILD).map(|_| PathBuf::from(std::env::var_os(DIR).expect("TM_FAULT_DIR")))
}

/// A command re-running this test binary for `test` alone, as the child.
fn child_command(test: &str, dir: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env(DIR, dir);
    c
}

/// Entries of `dir` other than `keep`, by name.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn tensors(n: usize, numel: usize) -> Vec<TensorInfo> {
    (0..n)
        .map(|i| TensorInfo::new(format!("layer.{i}.weight"), vec![numel], DType::F32))
        .collect()
}

fn values(i: usize, numel: usize) -> Vec<u8> {
    let v: Vec<f32> = (0..numel).map(|j| (i * numel + j) as f32 * 0.25).collect();
    convert::encode_f32_vec(DType::F32, &v).unwrap()
}

#[test]
fn disk_full_fails_cleanly_and_leaves_no_output() {
    const TEST: &str = "disk_full_fails_cleanly_and_leaves_no_output";
    if let Some(dir) = child_dir() {
        // Child, with a file size limit of a few KiB and SIGXFSZ ignored, so
        // that writes past it fail with EFBIG like on a full disk.
        let out = dir.join("out");
        let numel = 64 * 1024;
        let mut w = ModelWriter::create(&out, tensors(4, numel), WriterOptions::default()).unwrap();
        let temp = w.temp_dir().to_path_buf();
        let mut err = None;
        for i in 0..4 {
            if let Err(e) = w.write(&format!("layer.{i}.weight"), &values(i, numel)) {
                err = Some(e);
                break;
            }
        }
        let err = match err {
            Some(e) => {
                drop(w);
                e
            }
            None => w
                .finish()
                .expect_err("a 1 MiB model fit under the file size limit"),
        };
        println!("CHILD-ERROR: {err}");
        // The writer is gone (dropped by `finish`, or here): its temp dir too.
        assert!(!temp.exists(), "temporary directory left behind");
        assert!(!out.exists());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // `ulimit -f` counts 512- or 1024-byte blocks depending on the shell:
    // either way a few KiB, far below the 1 MiB written. An ignored signal
    // stays ignored across exec.
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 8 && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env(DIR, tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-ERROR: ").map(|(_, e)| e))
        .unwrap_or_else(|| panic!("no error reported: {stdout}"));
    // The message names the file being written and the OS error.
    assert!(line.contains(".out.tensormerge-tmp-"), "{line}");
    assert!(line.contains("File too large"), "{line}");
    // Nothing left in the parent directory: no output, no temp dir.
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

#[test]
fn sigkill_mid_write_never_leaves_a_finished_looking_output() {
    const TEST: &str = "sigkill_mid_write_never_leaves_a_finished_looking_output";
    let numel = 16 * 1024;
    if let Some(dir) = child_dir() {
        // Child: write slowly, in pieces, telling the parent once started.
        let out = dir.join("out");
        let opts = WriterOptions {
            max_shard_bytes: 2 * 4 * numel as u64,
            ..WriterOptions::default()
        };
        let mut w = ModelWriter::create(&out, tensors(8, numel), opts).unwrap();
        for i in 0..8 {
            let bytes = values(i, numel);
            for piece in bytes.chunks(4096) {
                w.write(&format!("layer.{i}.weight"), piece).unwrap();
                if i == 1 {
                    println!("STARTED");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        w.finish().unwrap();
        println!("FINISHED (the parent should have killed us)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut child = child_command(TEST, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("child ended before writing").unwrap();
        if line.contains("STARTED") {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");

    // No output directory; the only leftover is the temp dir, named after
    // the output and the dead process, holding no index and no finished model.
    let out = tmp.path().join("out");
    assert!(!out.exists());
    let left = entries(tmp.path());
    assert_eq!(left.len(), 1, "{left:?}");
    let stale = format!(".out.tensormerge-tmp-{pid}");
    assert!(
        left[0] == stale || left[0].starts_with(&format!("{stale}-")),
        "{left:?}"
    );
    let temp = tmp.path().join(&left[0]);
    assert!(!temp.join("model.safetensors.index.json").exists());
    assert!(
        Model::open_path(&temp).is_err(),
        "a killed write opens as a model"
    );

    // A new run writes the model; the stale temp dir stays recognisable.
    let mut w = ModelWriter::create(&out, tensors(2, 4), WriterOptions::default()).unwrap();
    for i in 0..2 {
        w.write(&format!("layer.{i}.weight"), &values(i, 4))
            .unwrap();
    }
    w.finish().unwrap();
    let m = Model::open_path(&out).unwrap();
    assert_eq!(
        m.read_f32_vec("layer.1.weight").unwrap(),
        vec![1.0, 1.25, 1.5, 1.75]
    );
}

#[test]
fn input_truncated_while_open_is_an_error_not_a_crash() {
    const TEST: &str = "input_truncated_while_open_is_an_error_not_a_crash";
    let numel = 256 * 1024; // 1 MiB: many pages past the cut
    if let Some(dir) = child_dir() {
        let model_dir = dir.join("m");
        let mut w =
            ModelWriter::create(&model_dir, tensors(2, numel), WriterOptions::default()).unwrap();
        for i in 0..2 {
            w.write(&format!("layer.{i}.weight"), &values(i, numel))
                .unwrap();
        }
        w.finish().unwrap();
        let m = Model::open_path(&model_dir).unwrap();
        let first = m.read_f32_vec("layer.0.weight").unwrap();
        assert_eq!(first[3], 0.75);
        // Another process (a sync tool, a partial re-download) cuts the file.
        let file = model_dir.join("model.safetensors");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let e = m
            .read_f32_vec("layer.1.weight")
            .expect_err("read a tensor past the end of a truncated file");
        println!("CHILD-ERROR: {e}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let output = child_command(TEST, tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "reading a truncated input killed the process ({:?}, signal {:?}); stdout:\n{stdout}",
        output.status,
        output.status.signal()
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-ERROR: ").map(|(_, e)| e))
        .unwrap_or_else(|| panic!("no error reported: {stdout}"));
    assert!(line.contains("model.safetensors"), "{line}");
    assert!(start.elapsed() < Duration::from_secs(20));
}
