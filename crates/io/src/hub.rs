//! Hub ids (`org/name[@revision]`) and, with the `hub` feature, downloads.

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

/// Whether a reference that is not an existing path should be treated as a hub id.
pub(crate) fn looks_like_hub_id(reference: &str) -> bool {
    !reference.starts_with(['.', '/', '~', '\\'])
        && !reference.ends_with(".safetensors")
        && HubId::parse(reference).is_ok()
}

/// Opens a hub model: from the cache or by download (feature `hub`).
pub(crate) fn open_hub(reference: &str) -> Result<Model, IoError> {
    HubId::parse(reference)?;
    Err(IoError::HubDisabled {
        id: reference.to_string(),
    })
}
