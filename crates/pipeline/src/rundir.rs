//! The run directory: its format marker, the resolved pipeline, the image list, `results.jsonl`
//! (one JSON object per (image, step), appended and flushed as each finishes), and joining the
//! directories of shards.
//!
//! A crash loses at most the row being written: a torn last line is dropped on `--resume`, and
//! every complete row is kept. At the end of a run the file is rewritten in (image, step) order
//! through a temporary file and a rename, so sharded, resumed and plain runs compare equal.
//!
//! Nothing already written is lost without `--force`: a folder that is not a run directory, a
//! run of another pipeline with results, and finished rows are refused; one process writes a
//! run directory at a time ([`vulnmap_data::fs::DirLock`]).

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
/// A summary of the run as JSON: pipeline name, shard, images and rows; written when it ends.
pub const RUN_INFO: &str = "run.json";
/// The images the run covers, in order, with their sizes in bytes: `--resume` and `merge` refuse
/// a data source that now resolves to a different list.
pub const ITEMS: &str = "items.json";
/// Marks a folder as a vulnmap run directory and says which format its files are in.
pub const FORMAT_FILE: &str = "vulnmap-run.json";
/// The format this version writes and reads. A later release that changes the files raises it,
/// and refuses (or migrates) runs of an older format; this one refuses newer ones.
pub const FORMAT: u32 = 1;

/// What a run directory's contents are replaced by, in order of what vulnmap writes there: with
/// `--force`, these are removed before the run starts again.
const OUTPUTS: &[&str] = &[
    RESULTS,
    RUN_INFO,
    ITEMS,
    "report.html",
    "table1.md",
    "table1.csv",
    "metrics.md",
    "metrics.csv",
    "figures",
    "maps",
    "model",
    "mask_network",
    "data",
];

#[derive(serde::Serialize, serde::Deserialize)]
struct FormatMarker {
    format: u32,
    written_by: String,
}

/// An open run directory: locked for this process while the value lives.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: vulnmap_data::fs::DirLock,
}

/// What to do with results already in a run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse a folder that holds results (or is not a run directory).
    Refuse,
    /// Keep the rows there and skip them (`--resume`).
    Resume,
    /// Discard vulnmap's outputs there and start again (`--force`).
    Replace,
}

impl RunDir {
    /// Opens (creating) the run directory `path` for a run of the pipeline written as
    /// `pipeline_yaml`: checks it is a run directory of a format this version reads (or an empty
    /// or new folder), locks it, and settles what is already there as `existing` says.
    pub fn open(path: &Path, pipeline_yaml: &str, existing: Existing) -> Result<Self> {
        let marker = path.join(FORMAT_FILE);
        let is_run = marker.is_file() || path.join(PIPELINE).is_file();
        if !is_run {
            vulnmap_data::fs::refuse_foreign(
                path,
                existing == Existing::Replace,
                "a vulnmap run directory",
            )?;
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let lock = vulnmap_data::fs::DirLock::acquire(path)?;
        if marker.is_file() {
            check_format(&marker)?;
        }
        let dir = Self {
            path: path.to_path_buf(),
            _lock: lock,
        };
        let rows = read_rows(&path.join(RESULTS), false)?.len();
        let saved = std::fs::read_to_string(path.join(PIPELINE)).ok();
        let other_pipeline = saved.as_deref().is_some_and(|s| s != pipeline_yaml);
        match existing {
            _ if !is_run => {}
            _ if rows == 0 => dir.clear()?,
            Existing::Replace => {
                tracing::warn!(
                    "--force: discarding the {rows} results in {} and starting again",
                    path.display()
                );
                dir.clear()?;
            }
            Existing::Resume if other_pipeline => {
                return Err(Error::Run(format!(
                    "{} holds {rows} results of another pipeline ({}); --resume continues the \
                     same pipeline only: choose another --out, or pass --force to discard them",
                    path.display(),
                    changed_line(saved.as_deref().unwrap_or_default(), pipeline_yaml)
                )))
            }
            Existing::Resume => {}
            Existing::Refuse => {
                return Err(Error::Run(format!(
                    "{} already holds {rows} results{}; pass --resume to continue that run, \
                     --force to discard them, or choose another --out",
                    path.display(),
                    if other_pipeline {
                        format!(
                            " of another pipeline ({})",
                            changed_line(saved.as_deref().unwrap_or_default(), pipeline_yaml)
                        )
                    } else {
                        String::new()
                    }
                )))
            }
        }
        let text = serde_json::to_string_pretty(&FormatMarker {
            format: FORMAT,
            written_by: format!("vulnmap {}", env!("CARGO_PKG_VERSION")),
        })?;
        vulnmap_data::fs::write_atomic(&marker, text.as_bytes())?;
        vulnmap_data::fs::write_atomic(&path.join(PIPELINE), pipeline_yaml.as_bytes())?;
        Ok(dir)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes vulnmap's outputs (a run that wrote no rows, or `--force`); the user's own files,
    /// the format marker and the lock stay.
    fn clear(&self) -> Result<()> {
        for name in OUTPUTS {
            let p = self.path.join(name);
            let removed = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&p, e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Where the pipeline saved in a run directory and the one given now part: the first line that
/// differs, so that a refused `--resume` says which setting changed (a key written by another
/// version of vulnmap, too).
fn changed_line(saved: &str, now: &str) -> String {
    const SHOWN_CHARS: usize = 120;
    let mut saved_lines = saved.lines();
    let mut now_lines = now.lines();
    for line in 1.. {
        match (saved_lines.next(), now_lines.next()) {
            (Some(a), Some(b)) if a == b => continue,
            (None, None) => break,
            (a, b) => {
                // A hand-edited file's line can be any length: the message shows its start.
                let shown = |l: Option<&str>| {
                    l.map_or("(nothing)".to_string(), |l| {
                        let l = l.trim();
                        match l.char_indices().nth(SHOWN_CHARS) {
                            Some((end, _)) => format!("`{}...`", &l[..end]),
                            None => format!("`{l}`"),
                        }
                    })
                };
                return format!(
                    "line {line} of its {PIPELINE} is {}, this pipeline's is {}",
                    shown(a),
                    shown(b)
                );
            }
        }
    }
    format!("see its {PIPELINE}")
}

fn check_format(marker: &Path) -> Result<()> {
    let text = std::fs::read_to_string(marker).map_err(|e| Error::io(marker, e))?;
    let found: FormatMarker = serde_json::from_str(&text).map_err(|e| {
        Error::Run(format!(
            "{}: not a vulnmap run-directory marker ({e})",
            marker.display()
        ))
    })?;
    if found.format > FORMAT {
        return Err(Error::Run(format!(
            "{} is a run directory of format {} (written by {}); this vulnmap {} reads format {} \
             and older: use a newer vulnmap, or choose another --out",
            marker.parent().unwrap_or(marker).display(),
            found.format,
            found.written_by,
            env!("CARGO_PKG_VERSION"),
            FORMAT
        )));
    }
    Ok(())
}

/// One image of a run's list, as stored in `items.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ItemRecord {
    /// The image file.
    pub path: PathBuf,
    /// Its size in bytes when the run started.
    pub bytes: u64,
}

impl ItemRecord {
    /// The record of the image at `path` as it is now; images inside the run directory `dir`
    /// (generated data) are recorded relative to it, so the shards of one run agree.
    pub fn of(path: &Path, dir: &Path) -> Result<Self> {
        let bytes = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        let path = path.strip_prefix(dir).unwrap_or(path).to_path_buf();
        Ok(Self { path, bytes })
    }
}

/// Writes the run's image list, or, when the run directory already has one (a resumed run),
/// checks the data still resolves to it, naming the first image that differs.
pub fn check_items(dir: &Path, items: &[ItemRecord]) -> Result<()> {
    let path = dir.join(ITEMS);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let stored: Vec<ItemRecord> = serde_json::from_str(&text).map_err(|e| {
                Error::Run(format!("{}: not a list of images ({e})", path.display()))
            })?;
            match first_difference(&stored, items) {
                None => Ok(()),
                Some(difference) => Err(Error::Run(format!(
                    "the data now resolves to other images than this run's ({}): {difference}; \
                     --resume would mix two data sets: restore the data, or start a new run",
                    path.display()
                ))),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_string_pretty(items)?;
            vulnmap_data::fs::write_atomic(&path, text.as_bytes())?;
            Ok(())
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The first place where two image lists differ, in words.
fn first_difference(stored: &[ItemRecord], now: &[ItemRecord]) -> Option<String> {
    for (i, (a, b)) in stored.iter().zip(now).enumerate() {
        if a.path != b.path {
            return Some(format!(
                "image {i} was {}, is now {}",
                a.path.display(),
                b.path.display()
            ));
        }
        if a.bytes != b.bytes {
            return Some(format!(
                "image {i}, {}, was {} bytes, is now {} bytes",
                a.path.display(),
                a.bytes,
                b.bytes
            ));
        }
    }
    match stored.len().cmp(&now.len()) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(format!(
            "image {} ({}) is new: the run had {} images, the data has {}",
            stored.len(),
            now[stored.len()].path.display(),
            stored.len(),
            now.len()
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "image {} ({}) is gone: the run had {} images, the data has {}",
            now.len(),
            stored[now.len()].path.display(),
            stored.len(),
            now.len()
        )),
    }
}

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

/// Which shards a set of run directories holds, from their `run.json`: the problems that make it
/// incomplete (unfinished or missing shards), or an error for sets that cannot be joined at all.
fn shard_set(shards: &[PathBuf]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut count = None;
    let mut present = std::collections::BTreeSet::new();
    for shard in shards {
        let info = shard.join(RUN_INFO);
        let text = match std::fs::read_to_string(&info) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                problems.push(format!(
                    "{} has not finished (no {RUN_INFO})",
                    shard.display()
                ));
                continue;
            }
            Err(e) => return Err(Error::io(&info, e)),
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Run(format!("{}: not a run summary ({e})", info.display())))?;
        let (i, n) = match value.get("shard").and_then(|s| s.as_str()) {
            None => (0, 1),
            Some(s) => {
                let shard: crate::runner::Shard = s
                    .parse()
                    .map_err(|e| Error::Run(format!("{}: {e}", info.display())))?;
                (shard.index, shard.count)
            }
        };
        if *count.get_or_insert(n) != n {
            return Err(Error::Run(format!(
                "{} is shard {i}/{n}, but an earlier one was split into {} shards; only the \
                 shards of one split can be merged",
                shard.display(),
                count.unwrap_or(n)
            )));
        }
        present.insert(i);
    }
    if let Some(n) = count {
        let missing: Vec<String> = (0..n)
            .filter(|i| !present.contains(i))
            .map(|i| format!("{i}/{n}"))
            .collect();
        if !missing.is_empty() {
            problems.push(format!("shards {} are missing", missing.join(", ")));
        }
    }
    Ok(problems)
}

/// Joins shard run directories into `out`: the same pipeline and images in each, rows joined (a
/// row found twice must be the same), figures and maps copied. Returns the joined rows, sorted.
///
/// An incomplete set of shards (one unfinished, or one missing) is refused unless
/// `allow_partial`; an `out` that already holds anything is refused unless `force`.
pub fn merge(
    out: &Path,
    shards: &[PathBuf],
    step_order: &[String],
    force: bool,
    allow_partial: bool,
) -> Result<Vec<ResultRow>> {
    let first = shards
        .first()
        .ok_or_else(|| Error::Run("merge needs at least one run directory".into()))?;
    let out_abs = std::path::absolute(out).map_err(|e| Error::io(out, e))?;
    for shard in shards {
        if std::path::absolute(shard).map_err(|e| Error::io(shard, e))? == out_abs {
            return Err(Error::Run(format!(
                "merge --out {} is one of the shards being merged; choose a new folder",
                out.display()
            )));
        }
    }
    let pipeline = std::fs::read_to_string(first.join(PIPELINE))
        .map_err(|e| Error::io(first.join(PIPELINE), e))?;
    let items = std::fs::read_to_string(first.join(ITEMS)).ok();
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
        if std::fs::read_to_string(shard.join(ITEMS)).ok() != items {
            return Err(Error::Run(format!(
                "{} ran on other images than {} (compare their {ITEMS}); only shards of one run \
                 can be merged",
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
    }
    let problems = shard_set(shards)?;
    if !problems.is_empty() && !allow_partial {
        return Err(Error::Run(format!(
            "the shards are incomplete: {}; pass --allow-partial to merge what there is",
            problems.join("; ")
        )));
    }
    for problem in &problems {
        tracing::warn!("merging a partial run: {problem}");
    }
    if !force {
        vulnmap_data::fs::refuse_foreign(out, false, "a new folder for the merged run")?;
    }
    let existing = if force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    let dir = RunDir::open(out, &pipeline, existing)?;
    for shard in shards {
        copy_tree(&shard.join("figures"), &out.join("figures"))?;
        copy_tree(&shard.join("maps"), &out.join("maps"))?;
        copy_tree(&shard.join("data"), &out.join("data"))?;
    }
    if let Some(items) = items {
        vulnmap_data::fs::write_atomic(&dir.path().join(ITEMS), items.as_bytes())?;
    }
    let rows = sorted(joined.into_values().collect(), step_order);
    write_rows(&out.join(RESULTS), &rows)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::changed_line;

    #[test]
    fn the_changed_line_is_named_and_a_long_one_shortened() {
        assert_eq!(
            changed_line("a\nb\n", "a\nc\n"),
            "line 2 of its pipeline.yaml is `b`, this pipeline's is `c`"
        );
        assert_eq!(
            changed_line("a\n", "a\nb\n"),
            "line 2 of its pipeline.yaml is (nothing), this pipeline's is `b`"
        );
        let long = "x".repeat(10_000);
        let message = changed_line(&long, "y");
        assert!(message.len() < 300, "{message}");
        assert!(message.contains(&format!("`{}...`", "x".repeat(120))));
    }
}
