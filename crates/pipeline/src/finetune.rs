//! The `finetune` step: trains the pipeline's model on the data's training split (patient-grouped
//! 60/20/20), keeps the best checkpoint in `model/best.safetensors`, and hands it to later steps.

use crate::error::{Error, Result};
use crate::rows::{Finetuned, Found};
use crate::rundir::Results;
use crate::runner::{dataset_key, dataset_row};
use crate::schema::{FinetuneStep, Pipeline};
use crate::source::Source;
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::Arc;
use vulnmap_data::split::{split_by_patient, PAPER_FRACTIONS};
use vulnmap_models::{zoo, Checkpoint, Classes, Classifier};
use vulnmap_train::train::{fit, TrainableModel};

/// Fine-tunes (or, when its row is already in `results`, reloads) the model.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    pipeline: &Pipeline,
    step: &FinetuneStep,
    id: &str,
    source: &Source,
    results: &mut Results,
    out: &Path,
    device: &Device,
    progress: bool,
) -> Result<Box<dyn Classifier>> {
    let spec = pipeline.model.as_ref().ok_or_else(|| {
        Error::Run("finetune needs a model (arch, and weights unless scratch)".into())
    })?;
    let arch = spec.arch.ok_or_else(|| {
        Error::Run("finetune needs a native `arch`; an ONNX graph cannot be trained".into())
    })?;
    let best = out.join("model").join("best.safetensors");
    if results.is_done(&dataset_key(id)) && best.is_file() {
        tracing::info!("reusing the fine-tuned model {}", best.display());
        return Ok(zoo::load(arch, Some(&best), DType::F32, device)?);
    }
    let dataset = source.dataset.clone().ok_or_else(|| {
        Error::Run("finetune needs labelled data: a manifest, folders or synthetic".into())
    })?;
    let splits = split_by_patient(&dataset, PAPER_FRACTIONS, pipeline.seed);
    let classes = Classes::new(dataset.classes.clone());
    let model = if step.scratch {
        TrainableModel::fresh(arch, &classes, step.size, pipeline.seed, device)?
    } else {
        let path = zoo::weights_path(arch, spec.weights.as_deref().map(Path::new))?;
        TrainableModel::finetune(
            arch,
            &Checkpoint::open(&path)?,
            &classes,
            step.size,
            pipeline.seed,
            device,
        )?
    };
    std::fs::create_dir_all(best.parent().unwrap_or(out)).map_err(|e| Error::io(out, e))?;
    let config = crate::steps::finetune::train_config(
        step,
        pipeline.seed,
        pipeline.data.resize,
        best.clone(),
        progress,
    );
    let start = std::time::Instant::now();
    let report = fit(&model, Arc::new(dataset), &splits, &config)?;
    let found = Found::Finetune(Finetuned {
        checkpoint: "model/best.safetensors".into(),
        report,
    });
    results.append(vec![dataset_row(
        id,
        out,
        start.elapsed().as_secs_f64(),
        found,
    )])?;
    Ok(zoo::load(arch, Some(&best), DType::F32, device)?)
}
