//! The mask attack (paper, II-C and III-C-3, Eq. 6, Fig. 11): a U-Net (or the authors' free
//! low-resolution mask) learns where the noise may go, jointly with the generator, under
//! sparsity, smoothness (total variation with exponent beta) and closeness to SmoothGrad; the
//! learned mask is a saliency map.

use crate::engine::{run, whole_image_jobs, AttackConfig, Goal, LearnedMask, Masking};
use crate::error::{ensure, Result};
use crate::outcome::AttackOutcome;
use candle_core::Tensor;
use vulnmap_models::Classifier;

/// The mask attack on each image for its goal; each outcome's `mask` is the learned mask.
pub fn mask_attack(
    model: &dyn Classifier,
    pixels: &Tensor,
    goals: &[Goal],
    spec: &LearnedMask,
    config: &AttackConfig,
) -> Result<Vec<AttackOutcome>> {
    ensure(goals.len() == pixels.dim(0)?, || {
        "one goal per image".into()
    })?;
    ensure(spec.lr > 0.0 && spec.beta > 0.0, || {
        "the mask's learning rate and beta must be positive".into()
    })?;
    let jobs = whole_image_jobs(goals, config);
    run(model, pixels, &jobs, &Masking::Learned(*spec), config)
}
