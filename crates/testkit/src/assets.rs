//! The shared assets in tests: a test that needs one skips with a printed reason when the assets
//! are absent, unless `VULNMAP_REQUIRE_ASSETS=1` (set by CI) makes that a failure.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vulnmap_data::assets::{assets_dir, ASSETS_VAR};

/// The environment variable that turns a missing asset from a skip into a test failure.
pub const REQUIRE_VAR: &str = "VULNMAP_REQUIRE_ASSETS";

/// Whether missing assets must fail tests rather than skip them.
pub fn assets_required() -> bool {
    matches!(
        std::env::var(REQUIRE_VAR).as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// The path of `relative` (e.g. `fixtures/resnet18_parity.safetensors`) in the assets folder.
///
/// When the folder or the file is missing, prints why the test is skipped and returns `None`, or
/// panics with the same reason when [`assets_required`].
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

/// All tensors of a safetensors fixture, on `device`, in f32 where they are floating point.
/// Panics naming the file when it cannot be read.
pub fn read_fixture(path: &Path, device: &Device) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, device)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
        .into_iter()
        .map(|(name, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)
                    .unwrap_or_else(|e| panic!("fixture {}: {name}: {e}", path.display()))
            } else {
                t
            };
            (name, t)
        })
        .collect()
}
