//! Where the shared assets are: example images, the EfficientNet-Lite0 weights and the PyTorch
//! reference fixtures, which stay outside the repository.
//!
//! `VULNMAP_ASSETS` names the folder; without it, a folder `shared` beside the working directory
//! or one of its ancestors is used when it exists (a checkout's `../shared`). Pipelines expand
//! `${VULNMAP_ASSETS}` to it; tests reach it through `vulnmap-testkit`.

use std::path::{Path, PathBuf};

/// The environment variable naming the assets folder.
pub const ASSETS_VAR: &str = "VULNMAP_ASSETS";

/// The shared assets folder, if one can be found.
pub fn assets_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(ASSETS_VAR) {
        return Some(PathBuf::from(dir));
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .filter_map(Path::parent)
        .map(|p| p.join("shared"))
        .find(|p| p.join("assets").is_dir() || p.join("fixtures").is_dir())
}
