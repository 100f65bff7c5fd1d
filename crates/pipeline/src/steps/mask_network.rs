//! The `mask_network` step: one network trained on the training split, then a single pass per
//! image. The weights are kept in `mask_network/<id>.safetensors` (and what each epoch did in
//! `mask_network/<id>.json`), so a resumed run reuses them instead of training again.

use super::{Chunk, StepContext};
use crate::error::{Error, Result};
use crate::rows::Found;
use crate::schema::MaskNetworkStep;
use crate::source::Item;
use candle_core::Tensor;
use std::path::{Path, PathBuf};
use vulnmap_attacks::amortised::MaskModel;
use vulnmap_data::Preprocess;

/// Where step `id` keeps its weights, in run directory `out`.
fn weights_file(out: &Path, id: &str) -> PathBuf {
    out.join("mask_network").join(format!("{id}.safetensors"))
}

/// The network of step `id`: loaded from the run directory when an earlier pass trained it,
/// else trained on `training` (each image explaining its label) and saved.
pub(crate) fn network(
    cx: &StepContext,
    step: &MaskNetworkStep,
    id: &str,
    training: &[Item],
    preprocess: &Preprocess,
    progress: bool,
) -> Result<MaskModel> {
    let spec = step.spec(cx.seed, progress);
    let classes = cx.model.num_classes();
    let device = cx.model.device();
    let file = weights_file(cx.out, id);
    if file.is_file() {
        tracing::info!("reusing the mask network {}", file.display());
        return Ok(MaskModel::load(&file, &spec, classes, device)?);
    }
    let labels = training
        .iter()
        .map(|item| match item.label {
            Some(label) if label < classes => Ok(label),
            other => Err(Error::Run(format!(
                "{}: the mask network explains each training image's label, and {} is not one of \
                 the model's {classes} classes",
                item.path.display(),
                other.map_or("none".to_string(), |l| l.to_string())
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(
        "training the mask network `{id}` on {} images for {} epochs",
        training.len(),
        step.epochs
    );
    let start = std::time::Instant::now();
    let mut net = MaskModel::new(&spec, classes, device)?;
    let epochs = net.train(cx.model, training.len(), &|batch: &[usize]| {
        let paths: Vec<&Path> = batch.iter().map(|&i| training[i].path.as_path()).collect();
        let pixels = preprocess.load_batch(&paths, device)?;
        Ok((pixels, batch.iter().map(|&i| labels[i]).collect()))
    })?;
    let dir = file.parent().unwrap_or(cx.out);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let summary = serde_json::json!({
        "training_images": training.len(),
        "seconds": start.elapsed().as_secs_f64(),
        "epochs": epochs,
    });
    vulnmap_data::fs::write_atomic(
        &file.with_extension("json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    // The weights last, through a temporary file: their presence means the training finished.
    let tmp = vulnmap_data::fs::temp_path(&file);
    net.save(&tmp)?;
    vulnmap_data::fs::rename(&tmp, &file)?;
    Ok(net)
}

/// The network's maps of `chunk`, a pass of at most `batch_size` images at a time, and their rows.
pub(crate) fn maps(
    cx: &StepContext,
    net: &MaskModel,
    id: &str,
    chunk: &Chunk,
) -> Result<(Vec<Found>, Tensor)> {
    let n = chunk.items.len();
    let mut parts = Vec::new();
    for start in (0..n).step_by(cx.batch_size.max(1)) {
        let len = cx.batch_size.min(n - start);
        let pixels = chunk.pixels.narrow(0, start, len)?;
        parts.push(net.maps(&pixels, &chunk.targets[start..start + len])?);
    }
    let maps = Tensor::cat(&parts, 0)?;
    let rows = cx
        .map_rows(chunk, id, &maps)?
        .into_iter()
        .map(Found::MaskNetwork)
        .collect();
    Ok((rows, maps))
}
