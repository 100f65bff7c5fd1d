//! Running a pipeline: images in fixed chunks (the unit of `--resume` and `--shard`), every step
//! on a whole chunk at once, one result row per (image, step) appended as each chunk-step ends.

use crate::config::step_ids;
use crate::error::{Error, Result};
use crate::figures;
use crate::rows::{Found, ResultRow, RowKey};
use crate::rundir::{self, Results};
use crate::schema::*;
use crate::source::{self, Item, Source};
use crate::steps::metrics::ScoredMaps;
use crate::steps::{self, Chunk, StepContext};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vulnmap_attacks::amortised::MaskModel;
use vulnmap_models::{Arch, Classifier, DeviceName, Score, ScoredClassifier};

/// Every N-th chunk of images, starting at chunk I (`--shard I/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard this is, from 0 to `count - 1`: it runs chunks `c` with `c % count == index`.
    pub index: usize,
    /// How many shards the run is split into (at least 1).
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a shard I/N with 0 <= I < N (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run directory.
    pub out: PathBuf,
    /// Overrides the pipeline's device.
    pub device: Option<DeviceName>,
    /// Run only this shard's chunks (`--shard I/N`), leaving the report to `merge`; `None`: all.
    /// A pipeline that fine-tunes cannot be split into more than one shard.
    pub shard: Option<Shard>,
    /// Continue a run in `out`, skipping finished rows.
    pub resume: bool,
    /// Write into `out` even when it holds results (discarded) or files that are not a run's.
    pub force: bool,
    /// Where the fundus benchmark is cached.
    pub cache: PathBuf,
    /// Progress bars on stderr.
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub out: PathBuf,
    /// Images covered: this shard's, or, after `merge`, those of all shards.
    pub images: usize,
    /// Rows in `results.jsonl` when the run ended.
    pub rows: usize,
    /// `report.html`, when one was written (unsharded runs; shards get theirs from `merge`).
    pub report: Option<PathBuf>,
}

/// The default benchmark cache: `$VULNMAP_CACHE`, else `$XDG_CACHE_HOME/vulnmap`, else
/// `~/.cache/vulnmap`.
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("VULNMAP_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("vulnmap");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("vulnmap"))
        .unwrap_or_else(|| std::env::temp_dir().join("vulnmap-cache"))
}

struct Runner<'a> {
    pipeline: &'a Pipeline,
    out: PathBuf,
    model: Box<dyn Classifier>,
    preprocess: vulnmap_data::Preprocess,
    ids: Vec<String>,
    figures: bool,
    /// The trained mask networks, by step id.
    networks: HashMap<String, MaskModel>,
}

/// Runs `pipeline` into `options.out`.
pub fn run(pipeline: &Pipeline, options: &RunOptions) -> Result<RunSummary> {
    let out = &options.out;
    let existing = match (options.resume, options.force) {
        (_, true) => rundir::Existing::Replace,
        (true, false) => rundir::Existing::Resume,
        (false, false) => rundir::Existing::Refuse,
    };
    let _dir = rundir::RunDir::open(out, &crate::config::to_yaml(pipeline)?, existing)?;
    let mut results = Results::open(out, options.resume)?;
    let has_finetune = pipeline
        .steps
        .iter()
        .any(|s| matches!(s, Step::Finetune(_)));
    let trains = |what: &str| {
        Error::Run(format!(
            "a pipeline that {what} cannot be sharded: every shard would train its own"
        ))
    };
    if options.shard.is_some_and(|s| s.count > 1) {
        if has_finetune {
            return Err(trains("fine-tunes"));
        }
        if pipeline
            .steps
            .iter()
            .any(|s| matches!(s, Step::MaskNetwork(_)))
        {
            return Err(trains("trains a mask network"));
        }
    }

    let device = options.device.unwrap_or(pipeline.device).open()?;
    let source = source::open(pipeline, out, &options.cache)?;
    let records = source
        .items
        .iter()
        .map(|item| rundir::ItemRecord::of(&item.path, out))
        .collect::<Result<Vec<_>>>()?;
    rundir::check_items(out, &records)?;
    let ids = step_ids(&pipeline.steps);
    let model = model(
        pipeline,
        &source,
        &ids,
        &mut results,
        out,
        &device,
        options.progress,
    )?;
    let size = model.input_spec().height;
    let mut runner = Runner {
        pipeline,
        out: out.clone(),
        preprocess: source::preprocess(&pipeline.data, source.generated, size),
        model,
        ids,
        figures: pipeline.outputs.figures,
        networks: HashMap::new(),
    };
    runner.train_mask_networks(&source, options.progress)?;

    let chunk_size = pipeline.chunk_size.unwrap_or(pipeline.batch_size).max(1);
    let chunks: Vec<(usize, &[Item])> = source
        .items
        .chunks(chunk_size)
        .enumerate()
        .filter(|(c, _)| options.shard.is_none_or(|s| c % s.count == s.index))
        .collect();
    let per_image: Vec<usize> = (0..pipeline.steps.len())
        .filter(|&s| !matches!(pipeline.steps[s], Step::Finetune(_)))
        .collect();
    let bar = progress_bar(
        (chunks.len() * per_image.len()) as u64,
        options.progress,
        &pipeline.name,
    );
    for (c, items) in &chunks {
        runner.run_chunk(*c, items, &per_image, &mut results, &bar)?;
    }
    bar.finish_and_clear();

    let images: usize = chunks.iter().map(|(_, i)| i.len()).sum();
    let rows = rundir::sort_results(out, &runner.ids)?;
    let info = json!({
        "pipeline": pipeline.name,
        "shard": options.shard.map(|s| format!("{}/{}", s.index, s.count)),
        "images": images,
        "rows": rows.len(),
    });
    vulnmap_data::fs::write_atomic(
        &out.join(rundir::RUN_INFO),
        serde_json::to_string_pretty(&info)?.as_bytes(),
    )?;
    let report = if options.shard.is_none_or(|s| s.count == 1) && pipeline.outputs.report {
        Some(crate::report::write(out, pipeline, &rows)?)
    } else {
        None
    };
    Ok(RunSummary {
        out: out.clone(),
        images,
        rows: rows.len(),
        report,
    })
}

/// Joins shard run directories into `out` and writes the report: refused when `out` holds
/// anything (unless `force`) or a shard is missing or unfinished (unless `allow_partial`).
pub fn merge(
    out: &Path,
    shards: &[PathBuf],
    force: bool,
    allow_partial: bool,
) -> Result<RunSummary> {
    let first = shards
        .first()
        .ok_or_else(|| Error::Run("merge needs at least one run directory".into()))?;
    let text = std::fs::read_to_string(first.join(rundir::PIPELINE))
        .map_err(|e| Error::io(first.join(rundir::PIPELINE), e))?;
    let pipeline: Pipeline = crate::config::from_yaml(&text)
        .map_err(|e| Error::Run(format!("{}: {e}", first.join(rundir::PIPELINE).display())))?;
    let ids = step_ids(&pipeline.steps);
    let rows = rundir::merge(out, shards, &ids, force, allow_partial)?;
    let images = rows
        .iter()
        .filter_map(|r| r.image)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let report = if pipeline.outputs.report {
        Some(crate::report::write(out, &pipeline, &rows)?)
    } else {
        None
    };
    Ok(RunSummary {
        out: out.to_path_buf(),
        images,
        rows: rows.len(),
        report,
    })
}

fn progress_bar(len: u64, show: bool, name: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} chunk-steps (eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_message(name.to_string());
    bar
}

/// The classifier the steps study: fine-tuned by the first step, the benchmark's, or loaded.
fn model(
    pipeline: &Pipeline,
    source: &Source,
    ids: &[String],
    results: &mut Results,
    out: &Path,
    device: &Device,
    progress: bool,
) -> Result<Box<dyn Classifier>> {
    let score = pipeline
        .model
        .as_ref()
        .map(|m| m.score)
        // The benchmark's two-class model: explain what the decision depends on (see Score).
        .unwrap_or(Score::CentredLogit);
    let base: Box<dyn Classifier> = if let Some(Step::Finetune(f)) = pipeline.steps.first() {
        crate::finetune::run(pipeline, f, &ids[0], source, results, out, device, progress)?
    } else if let (None, Some(b)) = (&pipeline.model, &source.benchmark) {
        b.model(device)?
    } else {
        let spec = pipeline
            .model
            .as_ref()
            .ok_or_else(|| Error::Run("the pipeline names no model".into()))?;
        let default_weights = match &source.benchmark {
            Some(b) if spec.arch == Some(Arch::TinyResNet) => Some(b.checkpoint.as_path()),
            _ => None,
        };
        crate::model::load(spec, default_weights, device)?
    };
    Ok(Box::new(ScoredClassifier::new(base, score)))
}

/// The row of `found` for `item` (none: a dataset-level step), its paths relative to `out`.
/// Each item's label, which `explain: label` makes the class its maps explain.
fn labels(items: &[Item], classes: usize) -> Result<Vec<usize>> {
    items
        .iter()
        .map(|item| match item.label {
            Some(label) if label < classes => Ok(label),
            Some(label) => Err(Error::Run(format!(
                "{}: label {label} is not one of the model's {classes} classes (explain: label)",
                item.path.display()
            ))),
            None => Err(Error::Run(format!(
                "{}: no label to explain (explain: label)",
                item.path.display()
            ))),
        })
        .collect()
}

fn row(item: Option<&Item>, step: &str, out: &Path, seconds: f64, found: Found) -> ResultRow {
    ResultRow {
        image: item.map(|i| i.index),
        step: step.to_string(),
        file: item.map(|i| {
            let file = i.path.strip_prefix(out).unwrap_or(&i.path);
            file.display().to_string()
        }),
        seconds: (seconds * 1000.0).round() / 1000.0,
        found,
    }
}

impl Runner<'_> {
    fn run_chunk(
        &self,
        chunk: usize,
        items: &[Item],
        steps: &[usize],
        results: &mut Results,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let pending = |s: usize| {
            items
                .iter()
                .any(|i| !results.is_done(&(Some(i.index), self.ids[s].clone())))
        };
        let todo: Vec<usize> = steps.iter().copied().filter(|&s| pending(s)).collect();
        bar.inc((steps.len() - todo.len()) as u64);
        if todo.is_empty() {
            return Ok(());
        }
        let paths: Vec<&Path> = items.iter().map(|i| i.path.as_path()).collect();
        let pixels = self.preprocess.load_batch(&paths, self.model.device())?;
        let targets = match self.pipeline.explain {
            Explained::Predicted => vulnmap_saliency::predicted_classes(
                self.model.as_ref(),
                &pixels,
                self.pipeline.batch_size,
            )?,
            Explained::Label => labels(items, self.model.num_classes())?,
        };
        let chunk_data = Chunk {
            items,
            pixels,
            targets,
        };
        if self.figures {
            for (i, item) in items.iter().enumerate() {
                let path = self.out.join(figures::input(item));
                if !path.is_file() {
                    figures::save_rgb(&chunk_data.pixels.get(i)?, &path)?;
                }
            }
        }
        let mut maps: HashMap<String, Tensor> = HashMap::new();
        for s in todo {
            let id = &self.ids[s];
            let step = &self.pipeline.steps[s];
            tracing::debug!(chunk, step = %id, "running");
            let start = Instant::now();
            let (rows, map) = self
                .step(step, id, &chunk_data, &mut maps, chunk)
                .map_err(|e| Error::Step {
                    id: id.clone(),
                    chunk,
                    source: Box::new(e),
                })?;
            let seconds = start.elapsed().as_secs_f64() / items.len() as f64;
            if let Some(m) = map {
                let m = m.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let file = self.map_file(id, chunk);
                std::fs::create_dir_all(file.parent().unwrap_or(&self.out))
                    .map_err(|e| Error::io(&file, e))?;
                let tmp = vulnmap_data::fs::temp_path(&file);
                m.save_safetensors("maps", &tmp)?;
                vulnmap_data::fs::rename(&tmp, &file)?;
                maps.insert(id.clone(), m);
            }
            let rows = rows
                .into_iter()
                .zip(items)
                .map(|(found, item)| row(Some(item), id, &self.out, seconds, found))
                .collect();
            results.append(rows)?;
            bar.inc(1);
        }
        Ok(())
    }

    fn map_file(&self, id: &str, chunk: usize) -> PathBuf {
        self.out
            .join("maps")
            .join(id)
            .join(format!("chunk-{chunk:05}.safetensors"))
    }

    /// Maps of step `id` for chunk `chunk`: made in this pass, or saved by an earlier one.
    fn maps_of(
        &self,
        id: &str,
        chunk: usize,
        maps: &mut HashMap<String, Tensor>,
    ) -> Result<Tensor> {
        if let Some(m) = maps.get(id) {
            return Ok(m.clone());
        }
        let file = self.map_file(id, chunk);
        let loaded = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| Error::Run(format!("{}: {e}", file.display())))?;
        let m = loaded
            .get("maps")
            .cloned()
            .ok_or_else(|| Error::Run(format!("{}: no `maps` tensor", file.display())))?;
        maps.insert(id.to_string(), m.clone());
        Ok(m)
    }

    fn step(
        &self,
        step: &Step,
        id: &str,
        chunk: &Chunk,
        maps: &mut HashMap<String, Tensor>,
        chunk_index: usize,
    ) -> Result<(Vec<Found>, Option<Tensor>)> {
        let cx = self.context();
        if let Some(method) = steps::maps::method(step, cx.seed, cx.batch_size)? {
            let m = method.explain(cx.model, &chunk.pixels, &chunk.targets)?;
            let rows = cx
                .map_rows(chunk, id, &m)?
                .into_iter()
                .filter_map(|map| Found::map_of(step.kind(), map))
                .collect();
            return Ok((rows, Some(m)));
        }
        let (rows, m) = match step {
            Step::Classify(s) => (steps::classify::run(&cx, s, chunk)?, None),
            Step::RandomAttack(s) => (steps::attacks::random(&cx, s, id, chunk)?, None),
            Step::AlphaSweep(s) => (steps::attacks::alpha_sweep(&cx, s, chunk)?, None),
            Step::LocalAttack(s) => {
                let (rows, m) = steps::attacks::local(&cx, s, id, chunk)?;
                (rows, Some(m))
            }
            Step::SaliencyAttack(s) => (steps::attacks::saliency(&cx, s, id, chunk)?, None),
            Step::MaskAttack(s) => {
                let (rows, m) = steps::attacks::mask(&cx, s, id, chunk)?;
                (rows, Some(m))
            }
            Step::MaskNetwork(_) => {
                let net = self.networks.get(id).ok_or_else(|| {
                    Error::Run(format!("the mask network `{id}` was not trained"))
                })?;
                let (rows, m) = steps::mask_network::maps(&cx, net, id, chunk)?;
                (rows, Some(m))
            }
            Step::Metrics(s) => {
                let sources = self.scored_maps(s, id, maps, chunk_index)?;
                let masks = self.lesion_masks(chunk)?;
                let rows = steps::metrics::run(&cx, s, chunk, &masks, &sources)?;
                (rows, None)
            }
            _ => return Err(Error::Run(format!("step `{id}` does not run per image"))),
        };
        Ok((rows, m))
    }

    /// Trains (or reloads) every `mask_network` step's network before the images' steps, so
    /// their seconds per map count one pass, not the training.
    fn train_mask_networks(&mut self, source: &Source, progress: bool) -> Result<()> {
        let mut training = None;
        for (step, id) in self.pipeline.steps.iter().zip(&self.ids) {
            let Step::MaskNetwork(s) = step else { continue };
            if training.is_none() {
                training = Some(source::training_items(
                    self.pipeline,
                    source,
                    "mask_network",
                )?);
            }
            let items = training.as_deref().unwrap_or_default();
            let net = steps::mask_network::network(
                &self.context(),
                s,
                id,
                items,
                &self.preprocess,
                progress,
            )?;
            self.networks.insert(id.clone(), net);
        }
        Ok(())
    }

    /// What the steps need of the run.
    fn context(&self) -> StepContext<'_> {
        StepContext {
            model: self.model.as_ref(),
            seed: self.pipeline.seed,
            batch_size: self.pipeline.batch_size,
            out: &self.out,
            figures: self.figures,
        }
    }

    /// The maps the metrics step `id` scores: those of the map-making steps before it (only
    /// those it names in `of`, when it names any).
    fn scored_maps(
        &self,
        s: &MetricsStep,
        id: &str,
        maps: &mut HashMap<String, Tensor>,
        chunk_index: usize,
    ) -> Result<Vec<ScoredMaps>> {
        let position = self.ids.iter().position(|i| i == id).unwrap_or(0);
        self.ids[..position]
            .iter()
            .zip(&self.pipeline.steps)
            .filter(|(sid, st)| st.makes_maps() && (s.of.is_empty() || s.of.contains(sid)))
            .map(|(sid, st)| {
                Ok(ScoredMaps {
                    id: sid.clone(),
                    kind: st.kind(),
                    maps: self.maps_of(sid, chunk_index, maps)?,
                    method: steps::maps::method(st, self.pipeline.seed, self.pipeline.batch_size)?,
                })
            })
            .collect()
    }

    /// Each image's lesion mask, where it has one, preprocessed as the image.
    fn lesion_masks(&self, chunk: &Chunk) -> Result<Vec<Option<Vec<bool>>>> {
        chunk
            .items
            .iter()
            .map(|item| {
                item.mask
                    .as_ref()
                    .map(|m| source::load_mask(m, &self.preprocess))
                    .transpose()
            })
            .collect()
    }
}

/// Key of a dataset-level row.
pub(crate) fn dataset_key(id: &str) -> RowKey {
    (None, id.to_string())
}

/// A dataset-level result row.
pub(crate) fn dataset_row(id: &str, out: &Path, seconds: f64, found: Found) -> ResultRow {
    row(None, id, out, seconds, found)
}
