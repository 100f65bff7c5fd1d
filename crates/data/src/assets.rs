//! Where the shared assets are: example images, the EfficientNet-Lite0 weights and the PyTorch
//! reference fixtures, which stay outside the repository.
//!
//! `VULNMAP_ASSETS` names the folder; without it, a folder `shared` beside the working directory
//! or one of its ancestors is used when it exists (a checkout's `../shared`). Tests that need the
//! assets call [`test_asset`], which skips them with a printed reason when the assets are absent,
//! unless `VULNMAP_REQUIRE_ASSETS=1` (set by CI) makes that a failure.

use std::path::{Path, PathBuf};

/// The environment variable naming the assets folder.
pub const ASSETS_VAR: &str = "VULNMAP_ASSETS";
/// The environment variable that turns a missing asset from a skip into a test failure.
pub const REQUIRE_VAR: &str = "VULNMAP_REQUIRE_ASSETS";

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

/// Whether missing assets must fail tests rather than skip them.
pub fn assets_required() -> bool {
    matches!(
        std::env::var(REQUIRE_VAR).as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// The path of `relative` (e.g. `fixtures/resnet18_parity.safetensors`) in the assets folder.
///
/// For tests: when the folder or the file is missing, prints why the test is skipped and returns
/// `None`, or panics with the same reason when [`assets_required`].
pub fn test_asset(relative: &str) -> Option<PathBuf> {
    let reason = match assets_dir() {
        None => format!(
            "no assets folder: set {ASSETS_VAR} or put the shared assets in a `shared` folder beside the checkout"
        ),
        Some(dir) => {
            let path = dir.join(relative);
            if path.exists() {
                return Some(path);
            }
            format!("asset {} is missing", path.display())
        }
    };
    if assets_required() {
        panic!("{reason} ({REQUIRE_VAR} is set, so this is a failure)");
    }
    eprintln!("skipping: {reason}");
    None
}
