//! Writing files so that nothing already written is lost: a temporary file beside the target,
//! then a rename (atomic on one filesystem); and one writer per output folder ([`DirLock`]).

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file [`DirLock`] holds in a folder vulnmap writes.
pub const LOCK_FILE: &str = ".vulnmap.lock";

/// One writer per folder: an advisory lock on `dir/.vulnmap.lock`, held while the value lives.
///
/// The operating system releases the lock when its process ends, however it ends, so a lock
/// left by a killed run is stale and is simply taken over. The file names the holder (pid, host,
/// start time) for the message a second writer gets.
#[derive(Debug)]
pub struct DirLock {
    file: File,
}

impl DirLock {
    /// Takes the lock of `dir` (which must exist), or fails naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut holder = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::InvalidArgument(format!(
                    "{} is being written by another vulnmap ({}, per {}); wait for it to end or \
                     choose another output folder",
                    dir.display(),
                    if holder.is_empty() {
                        "its pid not yet written"
                    } else {
                        holder
                    },
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        file.read_to_string(&mut holder)
            .map_err(|e| Error::io(&path, e))?;
        if !holder.trim().is_empty() {
            tracing::info!(
                "{}: taking over the lock of a run that ended without releasing it ({})",
                dir.display(),
                holder.trim()
            );
        }
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let me = format!(
            "pid {} on {}, since {since} (Unix seconds)\n",
            std::process::id(),
            host_name()
        );
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { file })
    }
}

impl Drop for DirLock {
    /// Empties the file (an empty lock file was released cleanly) and releases the lock. The
    /// file itself stays: removing it would let a waiting opener lock a file no one else sees.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this machine".into())
}

/// Refuses to write into `dir` when it exists and is not empty, unless `force`, naming its first
/// entry; `what` says what the folder should have been (the caller has already recognised its own
/// kind of folder, such as a run directory, and handles that itself).
pub fn refuse_foreign(dir: &Path, force: bool, what: &str) -> Result<()> {
    if force {
        return Ok(());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(Error::InvalidArgument(format!(
                "{} is a file, not a folder; choose another output folder",
                dir.display()
            )))
        }
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE)
        .collect();
    names.sort();
    match names.first() {
        None => Ok(()),
        Some(first) => Err(Error::InvalidArgument(format!(
            "{} is not {what} and is not empty (it holds {} entries, such as {}); choose a new or \
             empty folder, or pass --force to write into it",
            dir.display(),
            names.len(),
            dir.join(first).display()
        ))),
    }
}

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
