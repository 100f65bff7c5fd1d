//! Weights from the Hugging Face hub by repo id, through the usual local cache.
//!
//! The cache is the one `huggingface_hub` uses (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), so files fetched from Python are found here too. With
//! `HF_HUB_OFFLINE=1`, or without network, only the cache is consulted, and a miss is an error
//! that says how to pass a local file instead.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// A file in a hub model repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    /// `owner/name`, e.g. `timm/resnet50.tv_in1k`.
    pub repo: String,
    /// The file in the repository, e.g. `model.safetensors`.
    pub file: String,
    /// Branch, tag or commit (`main` by default).
    pub revision: String,
}

impl HubFile {
    /// `file` of `repo` at `main`.
    pub fn new(repo: &str, file: &str) -> Self {
        Self {
            repo: repo.to_string(),
            file: file.to_string(),
            revision: "main".to_string(),
        }
    }

    /// Parses `hf://owner/name[/path/in/repo][@revision]` (the file defaults to
    /// `model.safetensors`); `None` for anything that is not such a URI (a local path).
    pub fn from_uri(uri: &str) -> Option<Result<Self>> {
        let rest = uri.strip_prefix("hf://")?;
        let (rest, revision) = match rest.rsplit_once('@') {
            Some((r, rev)) => (r, rev),
            None => (rest, "main"),
        };
        let parts: Vec<&str> = rest.splitn(3, '/').collect();
        if parts.len() < 2 || parts[..2].iter().any(|p| p.is_empty()) || revision.is_empty() {
            return Some(Err(Error::InvalidArgument(format!(
                "`{uri}` is not a hub reference; expected hf://owner/name[/file][@revision]"
            ))));
        }
        // Every part becomes a path in the hub cache: none may climb out of it.
        let file = parts.get(2).copied().unwrap_or("");
        let climbs = |segment: &str| segment == ".." || segment == "." || segment.contains('\\');
        if parts[..2].iter().any(|p| climbs(p))
            || file.split('/').filter(|s| !s.is_empty()).any(climbs)
            || file.starts_with('/')
            || revision.split('/').any(climbs)
        {
            return Some(Err(Error::InvalidArgument(format!(
                "`{uri}`: a hub reference may not contain `.`, `..` or `\\` path parts, nor an absolute file"
            ))));
        }
        Some(Ok(Self {
            repo: format!("{}/{}", parts[0], parts[1]),
            file: parts
                .get(2)
                .filter(|f| !f.is_empty())
                .unwrap_or(&"model.safetensors")
                .to_string(),
            revision: revision.to_string(),
        }))
    }

    /// The default weights of a model name, where the hub has them under tensor names vulnmap
    /// reads: torchvision's ImageNet ResNets as timm republishes them.
    pub fn default_for(arch: &str) -> Option<Self> {
        let repo = match arch {
            "resnet18" => "timm/resnet18.tv_in1k",
            "resnet34" => "timm/resnet34.tv_in1k",
            "resnet50" => "timm/resnet50.tv_in1k",
            "resnet101" => "timm/resnet101.tv_in1k",
            "resnet152" => "timm/resnet152.tv_in1k",
            _ => return None,
        };
        Some(Self::new(repo, "model.safetensors"))
    }

    /// The hub cache directory in use.
    pub fn cache_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
            return PathBuf::from(dir);
        }
        if let Some(home) = std::env::var_os("HF_HOME") {
            return PathBuf::from(home).join("hub");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        home.join(".cache").join("huggingface").join("hub")
    }

    /// The file in the local cache, if it is there.
    pub fn cached(&self) -> Option<PathBuf> {
        let repo = hf_hub::Repo::with_revision(
            self.repo.clone(),
            hf_hub::RepoType::Model,
            self.revision.clone(),
        );
        hf_hub::Cache::new(Self::cache_dir())
            .repo(repo)
            .get(&self.file)
    }

    /// The local path of the file: from the cache, else downloaded into it (unless offline).
    pub fn resolve(&self) -> Result<PathBuf> {
        if let Some(path) = self.cached() {
            tracing::debug!(repo = %self.repo, path = %path.display(), "weights found in the hub cache");
            return Ok(path);
        }
        if offline() {
            return Err(self.unavailable("HF_HUB_OFFLINE is set and the file is not in the cache"));
        }
        self.download()
    }

    #[cfg(feature = "hub")]
    fn download(&self) -> Result<PathBuf> {
        tracing::info!(repo = %self.repo, file = %self.file, "downloading weights from the Hugging Face hub");
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(Self::cache_dir()))
            .with_progress(true)
            .build()
            .map_err(|e| self.unavailable(&e.to_string()))?;
        let repo = hf_hub::Repo::with_revision(
            self.repo.clone(),
            hf_hub::RepoType::Model,
            self.revision.clone(),
        );
        api.repo(repo)
            .get(&self.file)
            .map_err(|e| self.unavailable(&e.to_string()))
    }

    #[cfg(not(feature = "hub"))]
    fn download(&self) -> Result<PathBuf> {
        Err(self.unavailable("this build has no hub support (cargo feature `hub`)"))
    }

    fn unavailable(&self, why: &str) -> Error {
        Error::Hub(format!(
            "cannot get {} from the Hugging Face hub repo {} ({why}). Without network, download it \
             elsewhere (https://huggingface.co/{}/resolve/{}/{}) and pass the local file with \
             --weights PATH (a .safetensors or PyTorch .pth file), or place it in the hub cache at {}",
            self.file,
            self.repo,
            self.repo,
            self.revision,
            self.file,
            Self::cache_dir().display()
        ))
    }
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes") | Ok("ON") | Ok("on")
    )
}

#[cfg(test)]
mod tests {
    use super::HubFile;

    #[test]
    fn hub_references_parse_and_may_not_climb_out_of_the_cache() {
        let f = HubFile::from_uri("hf://timm/resnet50.tv_in1k/sub/w.safetensors@v1.0")
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.repo.as_str(), f.file.as_str(), f.revision.as_str()),
            ("timm/resnet50.tv_in1k", "sub/w.safetensors", "v1.0")
        );
        let f = HubFile::from_uri("hf://owner/name").unwrap().unwrap();
        assert_eq!(
            (f.file.as_str(), f.revision.as_str()),
            ("model.safetensors", "main")
        );
        assert!(HubFile::from_uri("weights/model.safetensors").is_none());
        for bad in [
            "hf://owner/name/../../../etc/passwd",
            "hf://owner/name//etc/passwd",
            "hf://../name/model.safetensors",
            "hf://owner/../model.safetensors",
            "hf://owner/name/a/./b",
            "hf://owner/name/model.safetensors@../../x",
            "hf://owner/name/..\\..\\x",
            "hf:///etc/passwd",
        ] {
            let e = HubFile::from_uri(bad).unwrap().unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
