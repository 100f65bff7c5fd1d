//! The images a pipeline runs on, in a fixed order, with whatever is known about each (label,
//! lesion mask); and the model, from the pipeline, the fundus benchmark or a fine-tuning step.

use crate::error::{Error, Result};
use crate::schema::{DataSpec, Pipeline};
use std::path::{Path, PathBuf};
use vulnmap_data::split::{split_by_patient, PAPER_FRACTIONS};
use vulnmap_data::synthetic::{write_dataset, FundusConfig, LabelScheme};
use vulnmap_data::{Dataset, ManifestOptions, Preprocess};
use vulnmap_train::fundus_benchmark::{BenchmarkConfig, FundusBenchmark};

/// One image to run on. `index` is its place in the whole (unsharded) run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Item {
    pub(crate) index: usize,
    pub(crate) path: PathBuf,
    pub(crate) label: Option<usize>,
    pub(crate) mask: Option<PathBuf>,
}

/// The images, the dataset they came from (for fine-tuning) and the benchmark, if any.
pub(crate) struct Source {
    pub items: Vec<Item>,
    pub dataset: Option<Dataset>,
    pub benchmark: Option<FundusBenchmark>,
    /// Generated images are already the model's size: no resizing by default.
    pub generated: bool,
}

/// The benchmark configuration a pipeline's `fundus_benchmark` names.
pub(crate) fn benchmark_config(spec: &crate::schema::BenchmarkSpec) -> BenchmarkConfig {
    let mut config = BenchmarkConfig::default();
    config.fundus.patients = spec.patients;
    config.fundus.size = spec.size;
    config.epochs = spec.epochs;
    config.lr = spec.lr;
    config.seed = spec.seed;
    config
}

/// Reads (or generates) the pipeline's data. `run_dir` holds generated sets; `cache` the
/// benchmark.
pub(crate) fn open(pipeline: &Pipeline, run_dir: &Path, cache: &Path) -> Result<Source> {
    let d = &pipeline.data;
    let mut benchmark = None;
    let mut generated = false;
    let dataset = if !d.files.is_empty() || d.glob.is_some() {
        None
    } else if let Some(m) = &d.manifest {
        let options = ManifestOptions {
            classes: d.labels.clone(),
            ..ManifestOptions::default()
        };
        Some(Dataset::from_manifest(m, &options)?.0)
    } else if let Some(f) = &d.folders {
        Some(Dataset::from_folders(f)?)
    } else if let Some(s) = &d.synthetic {
        generated = true;
        let out = run_dir.join("data");
        let manifest = out.join("manifest.csv");
        if !manifest.is_file() {
            let config = FundusConfig {
                patients: s.patients,
                size: s.size,
                seed: s.seed,
                lesion_prevalence: s.lesion_prevalence,
                fa_fraction: s.fa_fraction,
                ..FundusConfig::default()
            };
            tracing::info!(
                "generating {} synthetic patients in {}",
                s.patients,
                out.display()
            );
            write_dataset(&config, &out)?;
        }
        let options = ManifestOptions {
            classes: Some(LabelScheme::Binary.classes()),
            ..ManifestOptions::default()
        };
        Some(Dataset::from_manifest(&manifest, &options)?.0)
    } else if let Some(b) = &d.fundus_benchmark {
        generated = true;
        let prepared = FundusBenchmark::prepare(&benchmark_config(b), cache)?;
        let dataset = prepared.dataset()?;
        benchmark = Some(prepared);
        Some(dataset)
    } else {
        return Err(Error::Run("the pipeline names no data source".into()));
    };

    let mut items: Vec<Item> = match &dataset {
        None => files(d)?
            .into_iter()
            .map(|path| Item {
                index: 0,
                path,
                label: None,
                mask: None,
            })
            .collect(),
        Some(ds) => {
            let splits = split_by_patient(ds, PAPER_FRACTIONS, split_seed(pipeline, &benchmark));
            let mut chosen = d.split.select(&splits, ds.len());
            chosen.sort_unstable();
            samples(ds, &chosen)
        }
    };
    if d.lesions_only {
        items = with_lesions(items)?;
    }
    if let Some(limit) = d.limit {
        items.truncate(limit);
    }
    for (i, item) in items.iter_mut().enumerate() {
        item.index = i;
    }
    if items.is_empty() {
        return Err(Error::Run(format!(
            "the data of pipeline `{}` has no images (split `{}`{})",
            pipeline.name,
            crate::schema::spelling(&d.split),
            if d.lesions_only { ", lesions only" } else { "" }
        )));
    }
    Ok(Source {
        items,
        dataset,
        benchmark,
        generated,
    })
}

/// The seed of the patient split: the benchmark's own, else the pipeline's.
fn split_seed(pipeline: &Pipeline, benchmark: &Option<FundusBenchmark>) -> u64 {
    benchmark.as_ref().map_or(pipeline.seed, |b| b.config.seed)
}

/// The samples `indices` of `ds` as items (indexed later).
fn samples(ds: &Dataset, indices: &[usize]) -> Vec<Item> {
    indices
        .iter()
        .map(|&i| {
            let s = &ds.samples[i];
            Item {
                index: 0,
                path: s.path.clone(),
                label: Some(s.label),
                mask: s.mask.clone(),
            }
        })
        .collect()
}

/// The items whose lesion mask marks a lesion.
fn with_lesions(items: Vec<Item>) -> Result<Vec<Item>> {
    let mut kept = Vec::new();
    for item in items {
        if let Some(mask) = &item.mask {
            if load_mask(mask, &Preprocess::none())?.iter().any(|&m| m) {
                kept.push(item);
            }
        }
    }
    Ok(kept)
}

/// The training split's images, filtered as the data's (`lesions_only`), for a step that trains
/// on them (`what` names it in the error when the data has no split).
pub(crate) fn training_items(
    pipeline: &Pipeline,
    source: &Source,
    what: &str,
) -> Result<Vec<Item>> {
    let ds = source.dataset.as_ref().ok_or_else(|| {
        Error::Run(format!(
            "{what} trains on the training split of labelled data (a manifest, folders, \
             synthetic or the fundus benchmark); files and globs have none"
        ))
    })?;
    let splits = split_by_patient(ds, PAPER_FRACTIONS, split_seed(pipeline, &source.benchmark));
    let mut items = samples(ds, &splits.train);
    if pipeline.data.lesions_only {
        items = with_lesions(items)?;
    }
    if items.is_empty() {
        return Err(Error::Run(format!(
            "{what}: the training split of pipeline `{}` has no images{}",
            pipeline.name,
            if pipeline.data.lesions_only {
                " with lesions"
            } else {
                ""
            }
        )));
    }
    Ok(items)
}

fn files(d: &DataSpec) -> Result<Vec<PathBuf>> {
    if let Some(g) = &d.glob {
        let mut paths: Vec<PathBuf> = glob::glob(g)
            .map_err(|e| Error::Run(format!("glob `{g}`: {e}")))?
            .flatten()
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        return Ok(paths);
    }
    Ok(d.files.iter().map(PathBuf::from).collect())
}

/// A lesion mask (white = lesion) after `preprocess`, row-major.
pub(crate) fn load_mask(path: &Path, preprocess: &Preprocess) -> Result<Vec<bool>> {
    let mask = preprocess.load(path)?;
    let first = mask.get(0)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(first.into_iter().map(|v| v > 0.5).collect())
}

/// The preprocessing for a model with `size x size` inputs: generated images are used as they
/// are; others are resized (shorter side `resize`, default 256/224 of the size) and cropped.
pub(crate) fn preprocess(data: &DataSpec, generated: bool, size: usize) -> Preprocess {
    let size = size as u32;
    let resize = data
        .resize
        .unwrap_or(if generated { size } else { size * 256 / 224 });
    Preprocess::resize_crop(resize, size)
}
