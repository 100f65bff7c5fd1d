//! The run directory: the resolved pipeline, `results.jsonl` (one JSON object per (image, step),
//! appended and flushed as each finishes), and joining the directories of shards.
//!
//! A crash loses at most the row being written: a torn last line is dropped on `--resume`, and
//! every complete row is kept. At the end of a run the file is rewritten in (image, step) order
//! through a temporary file and a rename, so sharded, resumed and plain runs compare equal.

use crate::error::{Error, Result};
use crate::rows::{ResultRow, RowKey};
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The results file: one JSON row per (image, step), appended as each chunk-step ends.
pub const RESULTS: &str = "results.jsonl";
/// The resolved pipeline, as YAML; a run into a folder holding another pipeline is refused.
pub const PIPELINE: &str = "pipeline.yaml";
/// A summary of the run as JSON: pipeline name, shard, images and rows.
pub const RUN_INFO: &str = "run.json";

/// Reads the rows of a results file, dropping a torn last line (and cutting it off the file
/// when `repair`).
pub fn read_rows(path: &Path, repair: bool) -> Result<Vec<ResultRow>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut rows = Vec::new();
    let mut good_bytes = 0u64;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        number += 1;
        let complete = line.ends_with('\n');
        match (serde_json::from_str::<ResultRow>(line.trim_end()), complete) {
            (Ok(row), true) => {
                rows.push(row);
                good_bytes += n as u64;
            }
            (_, false) => {
                tracing::warn!(
                    "{}: dropping the unfinished last line {number} (an interrupted write)",
                    path.display()
                );
                break;
            }
            (Err(e), true) => {
                return Err(Error::Run(format!(
                    "{}, line {number}: not a result row ({e})",
                    path.display()
                )))
            }
        }
    }
    if repair {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        if len != good_bytes {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            f.set_len(good_bytes).map_err(|e| Error::io(path, e))?;
        }
    }
    Ok(rows)
}

/// The results file of a run being written.
pub struct Results {
    path: PathBuf,
    file: File,
    done: HashSet<RowKey>,
}

impl Results {
    /// Opens `dir/results.jsonl` for appending; with `resume`, the rows already there count as
    /// done; without, existing rows are an error (nothing already written is overwritten).
    pub fn open(dir: &Path, resume: bool) -> Result<Self> {
        let path = dir.join(RESULTS);
        let existing = read_rows(&path, resume)?;
        if !resume && !existing.is_empty() {
            return Err(Error::Run(format!(
                "{} already holds {} results; pass --resume to continue that run, or choose another --out",
                dir.display(),
                existing.len()
            )));
        }
        let done = existing.iter().map(ResultRow::key).collect();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file, done })
    }

    /// Whether the row `key` is already in the file (from before a resume, or appended since).
    pub fn is_done(&self, key: &RowKey) -> bool {
        self.done.contains(key)
    }

    /// Appends `rows` (skipping finished ones) and flushes them to the disk.
    pub fn append(&mut self, rows: Vec<ResultRow>) -> Result<()> {
        let mut text = String::new();
        for row in rows {
            if self.done.insert(row.key()) {
                text.push_str(&row.to_line()?);
                text.push('\n');
            }
        }
        if text.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Rewrites `dir/results.jsonl` with its rows in (image, step order) order, atomically.
pub fn sort_results(dir: &Path, step_order: &[String]) -> Result<Vec<ResultRow>> {
    let path = dir.join(RESULTS);
    let rows = read_rows(&path, false)?;
    let rows = sorted(rows, step_order);
    write_rows(&path, &rows)?;
    Ok(rows)
}

fn sorted(rows: Vec<ResultRow>, step_order: &[String]) -> Vec<ResultRow> {
    let rank = |step: &str| {
        step_order
            .iter()
            .position(|s| s == step)
            .unwrap_or(usize::MAX)
    };
    let mut keyed: BTreeMap<(Option<usize>, usize, String), ResultRow> = BTreeMap::new();
    for row in rows {
        keyed.insert((row.image, rank(&row.step), row.step.clone()), row);
    }
    keyed.into_values().collect()
}

fn write_rows(path: &Path, rows: &[ResultRow]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&row.to_line()?);
        text.push('\n');
    }
    vulnmap_data::fs::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Copies `from` into `to` recursively, keeping files already there.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if !from.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if !target.exists() {
            std::fs::copy(entry.path(), &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    Ok(())
}

/// Joins shard run directories into `out`: the same pipeline in each, rows joined (a row found
/// twice must be the same), figures and maps copied. Returns the joined rows, sorted.
pub fn merge(out: &Path, shards: &[PathBuf], step_order: &[String]) -> Result<Vec<ResultRow>> {
    let first = shards
        .first()
        .ok_or_else(|| Error::Run("merge needs at least one run directory".into()))?;
    let pipeline = std::fs::read_to_string(first.join(PIPELINE))
        .map_err(|e| Error::io(first.join(PIPELINE), e))?;
    let mut joined: BTreeMap<RowKey, ResultRow> = BTreeMap::new();
    for shard in shards {
        let p = shard.join(PIPELINE);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        if text != pipeline {
            return Err(Error::Run(format!(
                "{} ran a different pipeline than {}; only shards of one run can be merged",
                shard.display(),
                first.display()
            )));
        }
        for row in read_rows(&shard.join(RESULTS), false)? {
            let key = row.key();
            match joined.get(&key) {
                Some(seen) if !seen.same_result(&row) => {
                    return Err(Error::Run(format!(
                        "image {:?} step `{}` has different results in two shards (from {})",
                        key.0,
                        key.1,
                        shard.display()
                    )))
                }
                Some(_) => {}
                None => {
                    joined.insert(key, row);
                }
            }
        }
        copy_tree(&shard.join("figures"), &out.join("figures"))?;
        copy_tree(&shard.join("maps"), &out.join("maps"))?;
        copy_tree(&shard.join("data"), &out.join("data"))?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    vulnmap_data::fs::write_atomic(&out.join(PIPELINE), pipeline.as_bytes())?;
    let rows = sorted(joined.into_values().collect(), step_order);
    write_rows(&out.join(RESULTS), &rows)?;
    Ok(rows)
}
