//! Where model files come from: a local directory (`[model] path`), or the
//! Hugging Face hub cache for `[model] id`, filled by `mailtriage model fetch`.
//!
//! The daemon never downloads at start-up: a relay must not depend on the
//! hub being reachable to boot. `HF_HOME` moves the cache; with
//! `HF_HUB_OFFLINE=1`, `model fetch` only checks the cache.

use std::path::{Path, PathBuf};

use hf_hub::api::tokio::ApiBuilder;
use hf_hub::Cache;

use super::encoder::MODEL_FILES;
use super::ModelError;

/// The directory holding the model's files.
pub fn resolve(path: Option<&Path>, id: &str) -> Result<PathBuf, ModelError> {
    if let Some(p) = path {
        if !p.is_dir() {
            return Err(ModelError::MissingFile(p.to_owned()));
        }
        return Ok(p.to_owned());
    }
    from_cache(id).ok_or_else(|| {
        ModelError::Config(format!(
            "model `{id}` is not in the Hugging Face cache ({}): run `mailtriage model fetch`, \
             or set [model] path to a directory with {}",
            Cache::from_env().path().display(),
            MODEL_FILES.join(", ")
        ))
    })
}

fn from_cache(id: &str) -> Option<PathBuf> {
    let repo = Cache::from_env().model(id.to_string());
    let paths: Vec<PathBuf> = MODEL_FILES.iter().map(|f| repo.get(f)).collect::<Option<_>>()?;
    paths[0].parent().map(Path::to_path_buf)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Downloads the model's files into the cache (or, offline, checks they are there).
pub async fn fetch(id: &str) -> Result<PathBuf, ModelError> {
    if offline() {
        return from_cache(id).ok_or_else(|| {
            ModelError::Fetch(format!(
                "HF_HUB_OFFLINE is set and `{id}` is not in {}",
                Cache::from_env().path().display()
            ))
        });
    }
    let api = ApiBuilder::from_env().with_progress(true).build().map_err(|e| ModelError::Fetch(e.to_string()))?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for f in MODEL_FILES {
        let p = repo.get(f).await.map_err(|e| ModelError::Fetch(format!("{id}/{f}: {e}")))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| ModelError::Fetch("no files".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_path_wins_and_missing_cache_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve(Some(dir.path()), "x/y").unwrap(), dir.path());
        assert!(resolve(Some(&dir.path().join("nope")), "x/y").unwrap_err().to_string().contains("nope"));
        let err = resolve(None, "nobody/no-such-model-here").unwrap_err().to_string();
        assert!(err.contains("model fetch"), "{err}");
    }
}
