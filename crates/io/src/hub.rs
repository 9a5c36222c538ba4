//! Hub ids (`org/name[@revision]`), the standard cache, and (cargo feature
//! `hub`) downloads through `hf-hub`.
//!
//! hf-hub 0.5 reads neither `HF_HUB_OFFLINE` nor `HF_HUB_CACHE` nor
//! `HF_TOKEN`, and `HF_ENDPOINT` only through `ApiBuilder::from_env`, so
//! [`HubOptions::from_env`] reads them all itself and the download code
//! passes them explicitly. Offline lookups never touch the network and read
//! the standard cache layout (`models--org--name/refs/<rev>`,
//! `models--org--name/snapshots/<commit>/<file>`) directly; so does an
//! online fetch for files already cached.

use std::path::{Path, PathBuf};

use crate::{IoError, Model};

/// A parsed hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// The revision (branch, tag or commit); `main` when not given.
    pub revision: String,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`.
    ///
    /// ```
    /// use tensormerge_io::HubId;
    /// let id = HubId::parse("Qwen/Qwen2.5-0.5B@v1").unwrap();
    /// assert_eq!((id.repo.as_str(), id.revision.as_str()), ("Qwen/Qwen2.5-0.5B", "v1"));
    /// assert_eq!(HubId::parse("gpt2/x").unwrap().revision, "main");
    /// assert!(HubId::parse("../x").is_err());
    /// ```
    pub fn parse(id: &str) -> Result<HubId, IoError> {
        let bad = |reason| IoError::InvalidHubId {
            id: id.to_string(),
            reason,
        };
        let (repo, revision) = match id.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (id, "main"),
        };
        let Some((org, name)) = repo.split_once('/') else {
            return Err(bad("no `/` between organisation and name"));
        };
        let part_ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && !p.starts_with('-')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !part_ok(org) || !part_ok(name) {
            return Err(bad(
                "organisation and name must be non-empty and use only letters, digits, `-`, `_` and `.`",
            ));
        }
        if revision.is_empty()
            || revision.starts_with('/')
            || revision
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
            || revision.chars().any(|c| c.is_control() || c == '\\')
        {
            return Err(bad("invalid revision"));
        }
        Ok(HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Where and how hub models are fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache (`.../huggingface/hub`), holding `models--org--name` folders.
    pub cache_dir: PathBuf,
    /// Base URL of the hub, without a trailing slash.
    pub endpoint: String,
    /// Access token sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Use the cache only; never touch the network.
    pub offline: bool,
    /// How long to wait for a connection, and for the answer to each request
    /// (not for a whole large download). From `TENSORMERGE_HUB_TIMEOUT`
    /// (seconds), else [`HubOptions::DEFAULT_TIMEOUT`].
    pub timeout: std::time::Duration,
}

impl HubOptions {
    /// The default [`HubOptions::timeout`]: 60 seconds.
    pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

    /// Options from the environment, as `huggingface_hub` reads them:
    /// `HF_HUB_CACHE` (else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
    /// `HF_ENDPOINT` (else `https://huggingface.co`), `HF_TOKEN` (else the
    /// file `HF_TOKEN_PATH`, else `HF_HOME/token`), and `HF_HUB_OFFLINE`
    /// (`1`, `true`, `yes` or `on`).
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`HubOptions::from_env`] with variables from `var` (for tests and
    /// embedding).
    ///
    /// ```
    /// use tensormerge_io::HubOptions;
    /// let o = HubOptions::from_lookup(|k| match k {
    ///     "HF_HOME" => Some("/data/hf".into()),
    ///     "HF_ENDPOINT" => Some("http://127.0.0.1:8080/".into()),
    ///     "HF_HUB_OFFLINE" => Some("1".into()),
    ///     _ => None,
    /// });
    /// assert_eq!(o.cache_dir, std::path::Path::new("/data/hf/hub"));
    /// assert_eq!(o.endpoint, "http://127.0.0.1:8080");
    /// assert!(o.offline);
    /// ```
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let home = nonempty("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| nonempty("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("huggingface")
        });
        let cache_dir = nonempty("HF_HUB_CACHE")
            .or_else(|| nonempty("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let endpoint = nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".to_string())
            .trim_end_matches('/')
            .to_string();
        let token = nonempty("HF_TOKEN")
            .or_else(|| nonempty("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = nonempty("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = nonempty("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        let timeout = nonempty("TENSORMERGE_HUB_TIMEOUT")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(std::time::Duration::from_secs_f64)
            .unwrap_or(Self::DEFAULT_TIMEOUT);
        HubOptions {
            cache_dir,
            endpoint,
            token,
            offline,
            timeout,
        }
    }

    /// The cache folder of one repository (`models--org--name`).
    pub fn repo_dir(&self, id: &HubId) -> PathBuf {
        self.cache_dir
            .join(format!("models--{}", id.repo.replace('/', "--")))
    }
}

/// Whether a reference that is not an existing path should be treated as a hub id.
pub(crate) fn looks_like_hub_id(reference: &str) -> bool {
    !reference.starts_with(['.', '/', '~', '\\'])
        && !reference.ends_with(".safetensors")
        && HubId::parse(reference).is_ok()
}

/// Whether `rev` is a full commit hash.
fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot directory of `id` in the cache, resolving a branch or tag
/// through `refs/`, without any network access.
fn cached_snapshot(id: &HubId, opts: &HubOptions) -> Result<PathBuf, IoError> {
    let repo_dir = opts.repo_dir(id);
    if is_commit(&id.revision) {
        let snap = repo_dir.join("snapshots").join(&id.revision);
        if snap.is_dir() {
            return Ok(snap);
        }
    }
    let ref_file = repo_dir.join("refs").join(&id.revision);
    let commit = std::fs::read_to_string(&ref_file).map_err(|_| IoError::OfflineMissing {
        repo: id.repo.clone(),
        revision: id.revision.clone(),
        file: format!("refs/{}", id.revision),
        cache: repo_dir.clone(),
    })?;
    let commit = commit.trim();
    if !is_commit(commit) {
        return Err(IoError::HubCache {
            path: ref_file,
            message: format!("`{commit}` is not a commit hash"),
        });
    }
    Ok(repo_dir.join("snapshots").join(commit))
}

/// Checks that a cached snapshot holds a complete model; names the first
/// missing file.
fn check_offline_snapshot(id: &HubId, snap: &Path) -> Result<(), IoError> {
    let missing = |file: &str| IoError::OfflineMissing {
        repo: id.repo.clone(),
        revision: id.revision.clone(),
        file: file.to_string(),
        cache: snap.to_path_buf(),
    };
    if snap.join(crate::SINGLE_FILE).is_file() {
        return Ok(());
    }
    let index = snap.join(crate::INDEX_FILE);
    if !index.is_file() {
        return Err(missing(crate::SINGLE_FILE));
    }
    for shard in crate::model::index_shards(&index)? {
        crate::model::check_shard_name(&index, snap, &shard).map_err(|e| match e {
            IoError::MissingShard { .. } | IoError::ShardNotFile { .. } => missing(&shard),
            other => other,
        })?;
    }
    Ok(())
}

impl Model {
    /// Opens the hub model `id` (`org/name[@revision]`) with explicit options:
    /// from the cache when `opts.offline` (an error naming the first missing
    /// file otherwise), else fetching what the cache lacks (feature `hub`).
    pub fn open_hub(id: &str, opts: &HubOptions) -> Result<Model, IoError> {
        let hub_id = HubId::parse(id)?;
        let snap = if opts.offline {
            let snap = cached_snapshot(&hub_id, opts)?;
            check_offline_snapshot(&hub_id, &snap)?;
            snap
        } else {
            download::fetch(&hub_id, opts, id)?
        };
        let mut model = Model::open_path(&snap)?;
        model.set_name(id.to_string());
        Ok(model)
    }
}

/// Opens a hub model with options from the environment.
pub(crate) fn open_hub(reference: &str) -> Result<Model, IoError> {
    Model::open_hub(reference, &HubOptions::from_env())
}

#[cfg(not(feature = "hub"))]
mod download {
    use super::*;

    pub(super) fn fetch(_: &HubId, _: &HubOptions, id: &str) -> Result<PathBuf, IoError> {
        Err(IoError::HubDisabled { id: id.to_string() })
    }
}

#[cfg(feature = "hub")]
mod download {
    //! Repository info comes from hf-hub (`ApiRepo::info`, whose redirects
    //! ureq follows with authorization kept to the same host). Files are
    //! fetched here rather than through `ApiRepo::download`: hf-hub 0.5
    //! follows the hub's redirect to its CDN itself and sends the
    //! `Authorization` header along to that other host, and it moves a
    //! download into the cache without checking that it is complete. Here
    //! redirects are followed by hand, the token goes only to the endpoint's
    //! own origin, the byte count is checked against `Content-Length`, and a
    //! file is validated (safetensors header, JSON) before it is moved into
    //! the cache under the standard layout (`blobs/<etag>` and a relative
    //! link in `snapshots/<commit>/`).

    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};

    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    use ureq::http::{HeaderMap, Uri};

    const MAX_REDIRECTS: usize = 10;

    /// Downloads what the cache lacks of the model's weights and support
    /// files, and returns the snapshot directory.
    pub(super) fn fetch(hub_id: &HubId, opts: &HubOptions, id: &str) -> Result<PathBuf, IoError> {
        let fail = |file: &str, message: String| IoError::Download {
            repo: hub_id.repo.clone(),
            revision: hub_id.revision.clone(),
            file: file.to_string(),
            message,
        };
        let repo = Repo::with_revision(
            hub_id.repo.clone(),
            RepoType::Model,
            hub_id.revision.clone(),
        );
        let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
            .with_endpoint(opts.endpoint.clone())
            .with_token(opts.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| fail("(client)", e.to_string()))?;
        // hf-hub 0.5 has no timeout setting: a hub that accepts the connection
        // and never answers would hang the merge. Ask on a helper thread and
        // give up after `opts.timeout` (the thread ends with its request).
        let (tx, rx) = std::sync::mpsc::channel();
        let api_repo = api.repo(repo.clone());
        std::thread::spawn(move || {
            let _ = tx.send(api_repo.info().map_err(|e| e.to_string()));
        });
        let info = match rx.recv_timeout(opts.timeout) {
            Ok(r) => r.map_err(|e| fail("(repository info)", e))?,
            Err(_) => {
                return Err(fail(
                    "(repository info)",
                    format!(
                        "no answer from {} within {:?} (set TENSORMERGE_HUB_TIMEOUT to wait longer, \
                         or HF_HUB_OFFLINE=1 to use the cache only)",
                        opts.endpoint, opts.timeout
                    ),
                ));
            }
        };
        if !is_commit(&info.sha) {
            return Err(fail(
                "(repository info)",
                format!("`{}` is not a commit hash", info.sha),
            ));
        }
        let files: std::collections::HashSet<&str> =
            info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let repo_dir = opts.repo_dir(hub_id);
        let snap = repo_dir.join("snapshots").join(&info.sha);
        let client = Client::new(opts).map_err(|m| fail("(client)", m))?;
        let get = |file: &str| -> Result<PathBuf, IoError> {
            let cached = snap.join(file);
            if cached.is_file() {
                return Ok(cached);
            }
            // Pinned to the commit, so that every file comes from one snapshot.
            let url = format!(
                "{}/{}/resolve/{}/{}",
                opts.endpoint,
                repo.url(),
                info.sha,
                file
            );
            client
                .download(&url, &repo_dir, &info.sha, file)
                .map_err(|m| fail(file, m))
        };
        if files.contains(crate::SINGLE_FILE) {
            get(crate::SINGLE_FILE)?;
        } else if files.contains(crate::INDEX_FILE) {
            let index = get(crate::INDEX_FILE)?;
            for shard in crate::model::index_shards(&index)? {
                // Untrusted names: checked before they become URLs and cache paths.
                crate::model::check_shard_name_lexically(&index, &shard)?;
                get(&shard)?;
            }
        } else if let Some(bin) = info
            .siblings
            .iter()
            .find(|s| s.rfilename.ends_with(".bin") || s.rfilename.ends_with(".pt"))
        {
            return Err(IoError::Pickle {
                path: PathBuf::from(format!("{id}/{}", bin.rfilename)),
                dir: PathBuf::from(id),
            });
        } else {
            return Err(fail(
                crate::SINGLE_FILE,
                "the repository has neither model.safetensors nor model.safetensors.index.json"
                    .into(),
            ));
        }
        for file in crate::SUPPORT_FILES {
            if files.contains(file) {
                get(file)?;
            }
        }
        // Record the branch or tag, as huggingface_hub does.
        if hub_id.revision != info.sha {
            let ref_file = repo_dir.join("refs").join(&hub_id.revision);
            if let Some(parent) = ref_file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| IoError::io(parent, e))?;
            }
            std::fs::write(&ref_file, &info.sha).map_err(|e| IoError::io(&ref_file, e))?;
        }
        Ok(snap)
    }

    /// `scheme://authority` of a URL, lower-cased.
    fn origin(uri: &Uri) -> Option<String> {
        Some(format!(
            "{}://{}",
            uri.scheme_str()?.to_ascii_lowercase(),
            uri.authority()?.as_str().to_ascii_lowercase()
        ))
    }

    /// Resolves a `Location` header against the URL that answered with it.
    fn resolve(base: &Uri, location: &str) -> Option<String> {
        if let Ok(u) = location.parse::<Uri>()
            && u.scheme().is_some()
            && u.authority().is_some()
        {
            return Some(location.to_string());
        }
        if let Some(rest) = location.strip_prefix("//") {
            return Some(format!("{}://{rest}", base.scheme_str()?));
        }
        let origin = origin(base)?;
        if location.starts_with('/') {
            return Some(format!("{origin}{location}"));
        }
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        Some(format!("{origin}{dir}{location}"))
    }

    fn header<'a>(chain: &'a [HeaderMap], name: &str) -> Option<&'a str> {
        chain
            .iter()
            .find_map(|h| h.get(name).and_then(|v| v.to_str().ok()))
    }

    struct Client {
        agent: ureq::Agent,
        endpoint_origin: Option<String>,
        token: Option<String>,
    }

    impl Client {
        fn new(opts: &HubOptions) -> Result<Client, String> {
            let endpoint: Uri = opts
                .endpoint
                .parse()
                .map_err(|e| format!("invalid endpoint `{}`: {e}", opts.endpoint))?;
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .max_redirects(0)
                .http_status_as_error(false)
                .timeout_connect(Some(opts.timeout))
                .timeout_recv_response(Some(opts.timeout))
                .user_agent(concat!("tensormerge/", env!("CARGO_PKG_VERSION")))
                .build()
                .into();
            Ok(Client {
                agent,
                endpoint_origin: origin(&endpoint),
                token: opts.token.clone(),
            })
        }

        /// GET `url`, following redirects by hand. The token is sent only to
        /// the endpoint's own origin. Returns the final response and the
        /// headers of every response on the way (the hub's own response
        /// carries the commit and the etag; a CDN's does not).
        fn get(
            &self,
            url: &str,
        ) -> Result<(ureq::http::Response<ureq::Body>, Vec<HeaderMap>), String> {
            let mut url = url.to_string();
            let mut chain = Vec::new();
            for _ in 0..=MAX_REDIRECTS {
                let uri: Uri = url
                    .parse()
                    .map_err(|e| format!("invalid URL `{url}`: {e}"))?;
                let mut req = self.agent.get(&url).header("Accept-Encoding", "identity");
                if let Some(t) = &self.token
                    && origin(&uri).is_some()
                    && origin(&uri) == self.endpoint_origin
                {
                    req = req.header("Authorization", format!("Bearer {t}"));
                }
                let resp = req.call().map_err(|e| format!("{url}: {e}"))?;
                let status = resp.status();
                chain.push(resp.headers().clone());
                if status.is_redirection() {
                    let location = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| format!("{url}: HTTP {status} without a Location header"))?;
                    url = resolve(&uri, location)
                        .ok_or_else(|| format!("{url}: cannot follow redirect to `{location}`"))?;
                    continue;
                }
                if !status.is_success() {
                    let code = resp
                        .headers()
                        .get("x-error-code")
                        .and_then(|v| v.to_str().ok())
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default();
                    let mut body = String::new();
                    let _ = resp
                        .into_body()
                        .into_with_config()
                        .limit(512)
                        .reader()
                        .read_to_string(&mut body);
                    let body = body.trim();
                    let hint = if status.as_u16() == 401 || status.as_u16() == 403 {
                        "; gated or private repositories need a token (HF_TOKEN)"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "HTTP {}{code}{}{hint}",
                        status.as_u16(),
                        if body.is_empty() {
                            String::new()
                        } else {
                            format!(": {body}")
                        }
                    ));
                }
                return Ok((resp, chain));
            }
            Err(format!("more than {MAX_REDIRECTS} redirects"))
        }

        /// Downloads one file of commit `sha` into the cache and returns its
        /// snapshot path. Nothing that looks complete is left on failure.
        fn download(
            &self,
            url: &str,
            repo_dir: &Path,
            sha: &str,
            file: &str,
        ) -> Result<PathBuf, String> {
            let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
            let blobs = repo_dir.join("blobs");
            let target = repo_dir.join("snapshots").join(sha).join(file);
            std::fs::create_dir_all(&blobs).map_err(|e| io(&blobs, e))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            let (resp, chain) = self.get(url)?;
            if let Some(commit) = header(&chain, "x-repo-commit")
                && commit != sha
            {
                return Err(format!(
                    "the hub served commit {commit} instead of {sha} (the revision moved during the download?)"
                ));
            }
            let etag = header(&chain, "x-linked-etag")
                .or_else(|| header(&chain, "etag"))
                .map(|e| {
                    e.trim()
                        .trim_start_matches("W/")
                        .trim_matches('"')
                        .to_string()
                })
                .filter(|e| {
                    !e.is_empty()
                        && !e.starts_with('.')
                        && e.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            let encoded = resp.headers().get("content-encoding").is_some();
            let expected: Option<u64> = resp
                .headers()
                .get("content-length")
                .filter(|_| !encoded)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .or_else(|| header(&chain, "x-linked-size").and_then(|v| v.parse().ok()));

            static NEXT: AtomicU64 = AtomicU64::new(0);
            let part = blobs.join(format!(
                "{}.{}-{}.part",
                etag.as_deref().unwrap_or("download"),
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let result = (|| -> Result<(), String> {
                let mut out = std::fs::File::create(&part).map_err(|e| io(&part, e))?;
                let mut reader = resp.into_body().into_reader();
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                loop {
                    let k = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => k,
                        Err(e) => {
                            return Err(format!(
                                "connection failed after {n}{} bytes: {e}",
                                expected.map(|x| format!(" of {x}")).unwrap_or_default()
                            ));
                        }
                    };
                    out.write_all(&buf[..k]).map_err(|e| io(&part, e))?;
                    n += k as u64;
                }
                if let Some(x) = expected
                    && x != n
                {
                    return Err(format!("received {n} of {x} bytes (download cut short)"));
                }
                out.sync_all().map_err(|e| io(&part, e))?;
                drop(out);
                validate(file, &part)
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            let Some(etag) = etag else {
                std::fs::rename(&part, &target).map_err(|e| io(&target, e))?;
                return Ok(target);
            };
            let blob = blobs.join(&etag);
            std::fs::rename(&part, &blob).map_err(|e| io(&blob, e))?;
            link(&blob, &target, &etag, file).map_err(|e| io(&target, e))?;
            Ok(target)
        }
    }

    /// Points `snapshots/<sha>/<file>` at `blobs/<etag>` (a relative link,
    /// as huggingface_hub makes; a copy where links are unavailable).
    fn link(blob: &Path, target: &Path, etag: &str, file: &str) -> std::io::Result<()> {
        let _ = std::fs::remove_file(target);
        #[cfg(unix)]
        {
            let depth = file.split('/').count() + 1;
            let rel = format!("{}blobs/{etag}", "../".repeat(depth));
            let _ = blob;
            std::os::unix::fs::symlink(rel, target)
        }
        #[cfg(not(unix))]
        {
            let _ = (etag, file);
            std::fs::copy(blob, target).map(|_| ())
        }
    }

    /// Checks a downloaded file before it enters the cache: safetensors
    /// headers are validated, JSON must parse.
    fn validate(file: &str, path: &Path) -> Result<(), String> {
        if file.ends_with(".safetensors") {
            let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
            // SAFETY: a private file this process just wrote and closed.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| e.to_string())?;
            crate::header::parse(Path::new(file), &map)
                .map_err(|e| format!("downloaded file is not valid: {e}"))?;
        } else if file.ends_with(".json") {
            let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
            serde_json::from_reader::<_, serde::de::IgnoredAny>(std::io::BufReader::new(f))
                .map_err(|e| format!("downloaded file is not valid JSON: {e}"))?;
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn redirects_resolve_against_the_answering_url() {
            let base: Uri = "https://hub.example:8443/org/m/resolve/main/x.bin"
                .parse()
                .unwrap();
            assert_eq!(
                resolve(&base, "https://cdn.example/blob?sig=1").unwrap(),
                "https://cdn.example/blob?sig=1"
            );
            assert_eq!(
                resolve(&base, "/api/x").unwrap(),
                "https://hub.example:8443/api/x"
            );
            assert_eq!(
                resolve(&base, "//cdn.example/a").unwrap(),
                "https://cdn.example/a"
            );
            assert_eq!(
                resolve(&base, "y.bin").unwrap(),
                "https://hub.example:8443/org/m/resolve/main/y.bin"
            );
            assert_eq!(origin(&base).unwrap(), "https://hub.example:8443");
            let other: Uri = "https://HUB.example:8443/z".parse().unwrap();
            assert_eq!(origin(&other), origin(&base));
        }
    }
}
