//! Writing files so that nothing already written is lost: a temporary file beside the target,
//! then a rename (atomic on one filesystem).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A temporary path in the same directory as `path` (so the rename stays on one filesystem).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    let ext = path.extension().map(|e| e.to_string_lossy().into_owned());
    let tmp = format!(".{name}.tmp-{}", std::process::id());
    // Keep the extension last: encoders pick the format from it.
    let tmp = match ext {
        Some(ext) => format!("{tmp}.{ext}"),
        None => tmp,
    };
    path.with_file_name(tmp)
}

/// Moves `tmp` over `path`, removing `tmp` if that fails.
pub fn rename(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        Error::io(path, e)
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    rename(&tmp, path)
}
