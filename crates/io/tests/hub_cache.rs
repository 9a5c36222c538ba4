//! Hub ids against a cache directory laid out by the test (offline mode:
//! no network, no `hub` feature needed), and option parsing.

mod common;

use std::path::{Path, PathBuf};

use common::write_model;
use tensormerge_core::DType;
use tensormerge_io::{HubId, HubOptions, IoError, Model, WriterOptions};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        // Unroutable: offline mode must not use it.
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        offline: true,
        timeout: HubOptions::DEFAULT_TIMEOUT,
    }
}

/// Lays out `models--org--name` as huggingface_hub does: blobs, a snapshot of
/// symlinks (copies off unix), and `refs/main`.
fn cache_model(cache: &Path, repo: &str, files_from: &Path) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    for (i, e) in std::fs::read_dir(files_from).unwrap().enumerate() {
        let e = e.unwrap();
        let blob = repo_dir.join("blobs").join(format!("{i:064x}"));
        std::fs::copy(e.path(), &blob).unwrap();
        let link = snap.join(e.file_name());
        #[cfg(unix)]
        std::os::unix::fs::symlink(format!("../../blobs/{i:064x}"), &link).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).unwrap();
    }
    snap
}

#[test]
fn offline_reads_the_standard_cache_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model(
        &src,
        &[
            ("w", vec![2], DType::BF16, vec![1.0, -2.0]),
            ("b", vec![1], DType::F32, vec![0.5]),
        ],
        WriterOptions {
            max_shard_bytes: 4,
            ..Default::default()
        },
    );
    std::fs::write(src.join("config.json"), "{}").unwrap();
    let cache = tmp.path().join("hub");
    let snap = cache_model(&cache, "org/tiny", &src);
    let opts = offline(&cache);

    for id in ["org/tiny", "org/tiny@main", &format!("org/tiny@{COMMIT}")] {
        let m = Model::open_hub(id, &opts).unwrap();
        assert_eq!(m.name(), id);
        assert_eq!(m.dir(), snap);
        assert_eq!(m.files().len(), 2, "sharded through the index");
        assert_eq!(m.read_f32_vec("w").unwrap(), vec![1.0, -2.0]);
        assert_eq!(m.read_f32_vec("b").unwrap(), vec![0.5]);
    }

    // Unknown revision and unknown repository: the missing ref is named.
    let e = Model::open_hub("org/tiny@v2", &opts).unwrap_err();
    assert!(
        matches!(&e, IoError::OfflineMissing { file, .. } if file == "refs/v2"),
        "{e}"
    );
    assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
    let e = Model::open_hub("org/absent", &opts).unwrap_err();
    assert!(
        matches!(&e, IoError::OfflineMissing { file, .. } if file == "refs/main"),
        "{e}"
    );

    // A shard missing from the snapshot is named.
    std::fs::remove_file(snap.join("model-00002-of-00002.safetensors")).unwrap();
    let e = Model::open_hub("org/tiny", &opts).unwrap_err();
    assert!(
        matches!(&e, IoError::OfflineMissing { file, .. } if file == "model-00002-of-00002.safetensors"),
        "{e}"
    );
    // No weights at all.
    for f in std::fs::read_dir(&snap).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let e = Model::open_hub("org/tiny", &opts).unwrap_err();
    assert!(
        matches!(&e, IoError::OfflineMissing { file, .. } if file == "model.safetensors"),
        "{e}"
    );
    // A ref that is not a commit.
    std::fs::write(cache.join("models--org--tiny/refs/main"), "../../etc").unwrap();
    let e = Model::open_hub("org/tiny", &opts).unwrap_err();
    assert!(matches!(e, IoError::HubCache { .. }), "{e}");
}

#[test]
fn invalid_ids_are_refused() {
    let opts = offline(Path::new("/nonexistent"));
    for id in [
        "org",
        "org/",
        "/name",
        "a/b/c",
        "org/../x",
        "org/name@",
        "org/name@../x",
        "or g/name",
    ] {
        let e = Model::open_hub(id, &opts).unwrap_err();
        assert!(matches!(e, IoError::InvalidHubId { .. }), "{id}: {e}");
    }
    assert_eq!(HubId::parse("a/b@refs/pr/1").unwrap().revision, "refs/pr/1");
}

#[test]
fn options_follow_the_huggingface_hub_variables() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("token"), "hf_file_token\n").unwrap();
    let home = tmp.path().to_str().unwrap().to_string();
    let env = |pairs: &'static [(&'static str, &'static str)], home: String| {
        move |k: &str| {
            if k == "HF_HOME" {
                return Some(home.clone());
            }
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let o = HubOptions::from_lookup(env(&[], home.clone()));
    assert_eq!(o.cache_dir, tmp.path().join("hub"));
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert_eq!(o.token.as_deref(), Some("hf_file_token"));
    assert!(!o.offline);
    let o = HubOptions::from_lookup(env(
        &[
            ("HF_HUB_CACHE", "/elsewhere/cache"),
            ("HF_TOKEN", "hf_env"),
            ("HF_HUB_OFFLINE", "true"),
            ("HF_ENDPOINT", "https://mirror.example//"),
        ],
        home.clone(),
    ));
    assert_eq!(o.cache_dir, Path::new("/elsewhere/cache"));
    assert_eq!(o.token.as_deref(), Some("hf_env"));
    assert!(o.offline);
    assert_eq!(o.endpoint, "https://mirror.example");
    let o = HubOptions::from_lookup(env(&[("HF_HUB_OFFLINE", "0")], home));
    assert!(!o.offline);
    let o = HubOptions::from_lookup(|k| (k == "HOME").then(|| "/home/u".to_string()));
    assert_eq!(o.cache_dir, Path::new("/home/u/.cache/huggingface/hub"));
}

#[cfg(not(feature = "hub"))]
#[test]
fn online_hub_ids_need_the_feature() {
    let mut opts = offline(Path::new("/nonexistent"));
    opts.offline = false;
    let e = Model::open_hub("org/name", &opts).unwrap_err();
    assert!(matches!(e, IoError::HubDisabled { .. }), "{e}");
}
