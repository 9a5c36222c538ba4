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
}

impl HubOptions {
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
        HubOptions {
            cache_dir,
            endpoint,
            token,
            offline,
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
    use super::*;
    use hf_hub::api::sync::{ApiBuilder, ApiRepo};
    use hf_hub::{Cache, Repo, RepoType};

    /// Runs an hf-hub call, turning its panics (it `expect`s some headers,
    /// e.g. the `Location` of a redirect) into an error message.
    fn guarded<T>(f: impl FnOnce() -> Result<T, hf_hub::api::sync::ApiError>) -> Result<T, String> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(p) => {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(format!(
                    "the hub client failed on a malformed answer ({what})"
                ))
            }
        }
    }

    /// Downloads what the cache lacks of the model's weights and support
    /// files, and returns the snapshot directory.
    pub(super) fn fetch(hub_id: &HubId, opts: &HubOptions, id: &str) -> Result<PathBuf, IoError> {
        let fail = |file: &str, message: String| IoError::Download {
            repo: hub_id.repo.clone(),
            revision: hub_id.revision.clone(),
            file: file.to_string(),
            message,
        };
        let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
            .with_endpoint(opts.endpoint.clone())
            .with_token(opts.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| fail("(client)", e.to_string()))?;
        let repo: ApiRepo = api.repo(Repo::with_revision(
            hub_id.repo.clone(),
            RepoType::Model,
            hub_id.revision.clone(),
        ));
        let info = guarded(|| repo.info()).map_err(|m| fail("(repository info)", m))?;
        if !is_commit(&info.sha) {
            return Err(fail(
                "(repository info)",
                format!("`{}` is not a commit hash", info.sha),
            ));
        }
        let files: std::collections::HashSet<&str> =
            info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let snap = opts.repo_dir(hub_id).join("snapshots").join(&info.sha);
        let get = |file: &str| -> Result<PathBuf, IoError> {
            let cached = snap.join(file);
            if cached.is_file() {
                return Ok(cached);
            }
            let path = guarded(|| repo.download(file)).map_err(|m| fail(file, m))?;
            if path != cached {
                return Err(fail(
                    file,
                    format!(
                        "the hub served a different commit than {} (the revision moved during the download?)",
                        info.sha
                    ),
                ));
            }
            // hf-hub stores a body cut short without a Content-Length as if it
            // were complete: validate weights now, and never leave an invalid
            // file in the cache where later runs would take it as downloaded.
            if file.ends_with(".safetensors") {
                if let Err(e) = Model::open_path(&path) {
                    let blob = std::fs::canonicalize(&path).ok();
                    let _ = std::fs::remove_file(&path);
                    if let Some(blob) = blob {
                        let _ = std::fs::remove_file(blob);
                    }
                    return Err(fail(
                        file,
                        format!(
                            "the downloaded file is invalid and was removed from the cache: {e}"
                        ),
                    ));
                }
            }
            Ok(path)
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
        // Record the branch or tag, as hf-hub does (even when all was cached).
        if !is_commit(&hub_id.revision) || hub_id.revision != info.sha {
            let ref_file = opts.repo_dir(hub_id).join("refs").join(&hub_id.revision);
            if let Some(parent) = ref_file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| IoError::io(parent, e))?;
            }
            std::fs::write(&ref_file, &info.sha).map_err(|e| IoError::io(&ref_file, e))?;
        }
        Ok(snap)
    }
}
