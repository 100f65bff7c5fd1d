//! Which class each image is explained for, and the checks every method runs on its inputs.

use crate::error::{ensure, Result};
use candle_core::Tensor;
use vulnmap_models::Classifier;

/// The predicted (top-1) class of each image, evaluated `batch_size` images at a time.
pub fn predicted_classes(
    model: &dyn Classifier,
    pixels: &Tensor,
    batch_size: usize,
) -> Result<Vec<usize>> {
    let n = pixels.dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(batch_size.max(1)) {
        let len = batch_size.max(1).min(n - start);
        let logits = model.forward(&pixels.narrow(0, start, len)?)?;
        out.extend(
            logits
                .argmax(1)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|c| c as usize),
        );
    }
    Ok(out)
}

/// Checks `pixels` is `N x C x H x W`, there is one target per image, each a class of `model`,
/// and `batch_size` is positive.
pub(crate) fn check_inputs(
    model: &dyn Classifier,
    pixels: &Tensor,
    targets: &[usize],
    batch_size: usize,
) -> Result<()> {
    let dims = pixels.dims();
    ensure(dims.len() == 4, || {
        format!("expected images of shape (N, C, H, W), got {dims:?}")
    })?;
    ensure(targets.len() == dims[0], || {
        format!("{} targets given for {} images", targets.len(), dims[0])
    })?;
    ensure(batch_size > 0, || {
        "batch_size must be at least 1".to_string()
    })?;
    let classes = model.num_classes();
    for &t in targets {
        ensure(t < classes, || {
            format!(
                "target class {t} is out of range for {} with {classes} classes",
                model.arch()
            )
        })?;
    }
    Ok(())
}
