//! Downloads from a small HTTP server on 127.0.0.1, started by the test, that
//! answers like the Hugging Face hub as hf-hub 0.5 calls it:
//! `GET /api/models/{repo}/revision/{rev}` (repository info: commit and file
//! list) and `GET /{repo}/resolve/{rev}/{file}` with `Range` requests, answered
//! with `etag`, `x-repo-commit` and `Content-Range` headers.
//!
//! One test per binary: it sets environment variables (NO_PROXY, HF_*) while
//! no other test thread runs.
#![cfg(feature = "hub")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::write_model;
use tensormerge_core::{DType, ModelTensorMapper};
use tensormerge_io::{HubOptions, IoError, MapperExt, Model, WriterOptions};

const SHA_TINY: &str = "1111111111111111111111111111111111111111";
const SHA_SHARDED: &str = "2222222222222222222222222222222222222222";
const SHA_EVIL: &str = "3333333333333333333333333333333333333333";
const SHA_PICKLE: &str = "4444444444444444444444444444444444444444";

#[derive(Clone)]
struct Repo {
    sha: String,
    files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Logged {
    path: String,
    authorization: Option<String>,
}

struct Server {
    endpoint: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Logged>>>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Server {
    fn requests(&self, needle: &str) -> Vec<Logged> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.path.contains(needle))
            .cloned()
            .collect()
    }
}

/// A stand-in etag: FNV-1a of the content, as 64 hex digits.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}").repeat(4)
}

fn start(repos: BTreeMap<String, Repo>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (stop2, log2) = (stop.clone(), log.clone());
    let handle = std::thread::spawn(move || {
        // Bounded: stops when dropped, and in any case after 60 s.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = serve(stream, &repos, &log2, port);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => break,
            }
        }
    });
    Server {
        endpoint,
        stop,
        log,
        handle: Some(handle),
    }
}

/// Answers one request, then closes the connection.
fn serve(
    stream: TcpStream,
    repos: &BTreeMap<String, Repo>,
    log: &Mutex<Vec<Logged>>,
    port: u16,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => authorization = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    log.lock().unwrap().push(Logged {
        path: path.clone(),
        authorization,
    });
    let mut out = stream;
    let respond = |out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(body)?;
        out.flush()
    };
    let not_found = |out: &mut TcpStream| {
        respond(
            out,
            "404 Not Found",
            &[("x-error-code".into(), "EntryNotFound".into())],
            b"not found",
        )
    };
    if let Some(rest) = path.strip_prefix("/api/models/") {
        // {org}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        if parts.len() == 4 && parts[2] == "revision" {
            let key = format!("{}/{}", parts[0], parts[1]);
            if let Some(repo) = repos
                .get(&key)
                .filter(|r| parts[3] == "main" || parts[3] == r.sha)
            {
                let siblings: Vec<_> = repo
                    .files
                    .keys()
                    .map(|f| serde_json::json!({ "rfilename": f }))
                    .collect();
                let body = serde_json::json!({ "sha": repo.sha, "siblings": siblings }).to_string();
                return respond(
                    &mut out,
                    "200 OK",
                    &[("Content-Type".into(), "application/json".into())],
                    body.as_bytes(),
                );
            }
        }
        return not_found(&mut out);
    }
    // The CDN: /cdn/{org}/{name}/{file}, its own etag, no commit header.
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let parts: Vec<&str> = rest.splitn(3, '/').collect();
        if parts.len() == 3
            && let Some(body) = repos
                .get(&format!("{}/{}", parts[0], parts[1]))
                .and_then(|r| r.files.get(parts[2]))
        {
            let headers = vec![("etag".to_string(), "\"s3-etag-1\"".to_string())];
            return respond(&mut out, "200 OK", &headers, body);
        }
        return not_found(&mut out);
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" {
        let key = format!("{}/{}", parts[0], parts[1]);
        let repo = repos
            .get(&key)
            .filter(|r| parts[3] == "main" || parts[3] == r.sha);
        if let Some((repo, body)) = repo.and_then(|r| Some((r, r.files.get(parts[4])?))) {
            // Like the real hub, large files of the sharded repository are
            // redirected to a CDN on another origin (`localhost` rather than
            // `127.0.0.1`), with the commit and the content's etag on the redirect.
            if parts[0..2] == ["org", "sharded"] && parts[4].ends_with(".safetensors") {
                let headers = vec![
                    ("x-repo-commit".to_string(), repo.sha.clone()),
                    ("x-linked-etag".to_string(), format!("\"{}\"", etag(body))),
                    ("x-linked-size".to_string(), body.len().to_string()),
                    (
                        "Location".to_string(),
                        format!("http://localhost:{port}/cdn/org/sharded/{}", parts[4]),
                    ),
                ];
                return respond(&mut out, "302 Found", &headers, b"");
            }
            let mut headers = vec![
                ("etag".to_string(), format!("\"{}\"", etag(body))),
                ("x-repo-commit".to_string(), repo.sha.clone()),
            ];
            let len = body.len();
            if let Some(r) = range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                let (a, b) = r.split_once('-').unwrap_or((r, ""));
                let a: usize = a.parse().unwrap_or(0).min(len);
                let b: usize = b.parse().map(|b: usize| b + 1).unwrap_or(len).min(len);
                headers.push((
                    "Content-Range".into(),
                    format!("bytes {a}-{}/{len}", b.max(a + 1) - 1),
                ));
                return respond(
                    &mut out,
                    "206 Partial Content",
                    &headers,
                    &body[a..b.max(a)],
                );
            }
            return respond(&mut out, "200 OK", &headers, body);
        }
    }
    not_found(&mut out)
}

fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn downloads_from_a_loopback_hub_and_then_works_offline() {
    // SAFETY: the only test in this binary; no other thread reads the
    // environment while it is changed.
    unsafe {
        std::env::set_var("NO_PROXY", "127.0.0.1,localhost");
        std::env::set_var("no_proxy", "127.0.0.1,localhost");
        for k in [
            "HF_HUB_OFFLINE",
            "HF_HOME",
            "HF_TOKEN",
            "HF_ENDPOINT",
            "HF_HUB_CACHE",
        ] {
            std::env::remove_var(k);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    // Fixtures: a single-file model, a sharded one, a malicious index, a pickle-only repo.
    let tiny = tmp.path().join("tiny");
    write_model(
        &tiny,
        &[
            ("w", vec![3], DType::BF16, vec![1.0, 2.0, -4.0]),
            ("ids", vec![2], DType::I64, vec![0.0, 1.0]),
        ],
        WriterOptions::default(),
    );
    std::fs::write(tiny.join("config.json"), r#"{"torch_dtype": "bfloat16"}"#).unwrap();
    std::fs::write(tiny.join("tokenizer.json"), "{}").unwrap();
    let sharded = tmp.path().join("sharded");
    write_model(
        &sharded,
        &[
            ("a", vec![2], DType::F32, vec![1.0, 2.0]),
            ("b", vec![2], DType::F32, vec![3.0, 4.0]),
        ],
        WriterOptions {
            max_shard_bytes: 8,
            ..Default::default()
        },
    );
    std::fs::write(sharded.join("README.md"), "not downloaded").unwrap();
    let mut evil_files = files_of(&sharded);
    evil_files.insert(
        "model.safetensors.index.json".into(),
        br#"{"metadata":{},"weight_map":{"a":"../../../../evil.safetensors"}}"#.to_vec(),
    );
    let mut repos = BTreeMap::new();
    repos.insert(
        "org/tiny".to_string(),
        Repo {
            sha: SHA_TINY.into(),
            files: files_of(&tiny),
        },
    );
    repos.insert(
        "org/sharded".to_string(),
        Repo {
            sha: SHA_SHARDED.into(),
            files: files_of(&sharded),
        },
    );
    repos.insert(
        "org/evil".to_string(),
        Repo {
            sha: SHA_EVIL.into(),
            files: evil_files,
        },
    );
    repos.insert(
        "org/pickle".to_string(),
        Repo {
            sha: SHA_PICKLE.into(),
            files: BTreeMap::from([("pytorch_model.bin".to_string(), b"pickle".to_vec())]),
        },
    );
    let server = start(repos);
    let cache = tmp.path().join("hf").join("hub");
    let opts = HubOptions {
        cache_dir: cache.clone(),
        endpoint: server.endpoint.clone(),
        token: Some("hf_test_token".into()),
        offline: false,
        timeout: HubOptions::DEFAULT_TIMEOUT,
    };

    // Single file: weights and support files land in the standard layout.
    let m = Model::open_hub("org/tiny", &opts).unwrap();
    assert_eq!(m.name(), "org/tiny");
    assert_eq!(m.read_f32_vec("w").unwrap(), vec![1.0, 2.0, -4.0]);
    let snap = cache.join("models--org--tiny/snapshots").join(SHA_TINY);
    assert_eq!(m.dir(), snap);
    assert!(snap.join("config.json").is_file() && snap.join("tokenizer.json").is_file());
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--tiny/refs/main"))
            .unwrap()
            .trim(),
        SHA_TINY
    );
    // Files are fetched pinned to the commit the repository info named.
    let downloads = server.requests(&format!("/org/tiny/resolve/{SHA_TINY}/model.safetensors"));
    assert!(!downloads.is_empty());
    assert!(
        downloads
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer hf_test_token")),
        "{downloads:?}"
    );

    // A second open uses the cache: no new download of the weights.
    let before = server.requests("/org/tiny/resolve/").len();
    Model::open_hub("org/tiny", &opts).unwrap();
    assert_eq!(server.requests("/org/tiny/resolve/").len(), before);

    // Sharded: the index and both shards; README not fetched.
    let m = Model::open_hub(&format!("org/sharded@{SHA_SHARDED}"), &opts).unwrap();
    assert_eq!(m.files().len(), 2);
    assert_eq!(m.read_f32_vec("b").unwrap(), vec![3.0, 4.0]);
    assert!(server.requests("README.md").is_empty());
    // Shards came through the CDN redirect: the token went to the hub, never
    // to the other origin, and the blob is named by the hub's linked etag.
    let cdn = server.requests("/cdn/");
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert!(cdn.iter().all(|r| r.authorization.is_none()), "{cdn:?}");
    assert!(
        server
            .requests("/org/sharded/resolve/")
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer hf_test_token"))
    );
    let shard = m.files()[0].to_path_buf();
    let blob = std::fs::canonicalize(&shard).unwrap();
    assert_eq!(
        blob.file_name().unwrap().to_str().unwrap(),
        etag(&std::fs::read(&shard).unwrap())
    );
    assert!(
        blob.starts_with(std::fs::canonicalize(cache.join("models--org--sharded/blobs")).unwrap())
    );

    // A malicious index: refused before any request for the escaping name.
    let e = Model::open_hub("org/evil", &opts).unwrap_err();
    assert!(
        matches!(&e, IoError::UnsafeShardName { file, .. } if file.contains("..")),
        "{e}"
    );
    assert!(server.requests("evil.safetensors").is_empty());
    assert!(!tmp.path().join("evil.safetensors").exists());

    // Pickle-only repository, unknown repository.
    let e = Model::open_hub("org/pickle", &opts).unwrap_err();
    assert!(matches!(e, IoError::Pickle { .. }), "{e}");
    let e = Model::open_hub("org/missing", &opts).unwrap_err();
    assert!(
        matches!(&e, IoError::Download { repo, .. } if repo == "org/missing"),
        "{e}"
    );

    // Through the environment: HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN and `Model::open`.
    let cache2 = tmp.path().join("cache2");
    // SAFETY: as above.
    unsafe {
        std::env::set_var("HF_ENDPOINT", &server.endpoint);
        std::env::set_var("HF_HUB_CACHE", &cache2);
        std::env::set_var("HF_TOKEN", "hf_env_token");
    }
    let (mapper, template) = ModelTensorMapper::open("org/tiny").unwrap();
    assert_eq!(
        template.dir(),
        cache2.join("models--org--tiny/snapshots").join(SHA_TINY)
    );
    let v = mapper.from_hub("org/tiny").unwrap();
    assert_eq!(v.values().unwrap(), &[1.0, 2.0, -4.0]);
    assert!(
        server
            .requests("")
            .iter()
            .any(|r| r.authorization.as_deref() == Some("Bearer hf_env_token"))
    );

    // Offline: the server is gone; cached ids still open, others name what is missing.
    drop(server);
    // SAFETY: as above.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    let m = Model::open("org/tiny").unwrap();
    assert_eq!(m.read_f32_vec("w").unwrap(), vec![1.0, 2.0, -4.0]);
    let e = Model::open("org/sharded").unwrap_err();
    assert!(
        matches!(&e, IoError::OfflineMissing { file, .. } if file == "refs/main"),
        "{e}"
    );
    // Saving a hub model writes next to nothing in the cache.
    let out = tmp.path().join("out");
    mapper
        .save(&(2.0 * &v), &out, &m, WriterOptions::default())
        .unwrap();
    assert_eq!(
        Model::open_path(&out).unwrap().read_f32_vec("w").unwrap(),
        vec![2.0, 4.0, -8.0]
    );
    assert!(out.join("config.json").is_file());
}
