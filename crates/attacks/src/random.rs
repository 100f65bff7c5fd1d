//! The random attack (paper, III-B): generator noise over the whole image, untargeted or targeted.

use crate::engine::{run, whole_image_jobs, AttackConfig, Goal, Masking};
use crate::error::Result;
use crate::outcome::AttackOutcome;
use candle_core::Tensor;
use vulnmap_models::Classifier;

/// Attacks each image of `pixels` (`N x C x H x W`) for its goal, all with `config.alpha` and
/// `config.seed`.
pub fn random_attack(
    model: &dyn Classifier,
    pixels: &Tensor,
    goals: &[Goal],
    config: &AttackConfig,
) -> Result<Vec<AttackOutcome>> {
    crate::error::ensure(goals.len() == pixels.dim(0)?, || {
        format!(
            "{} goals for {} images",
            goals.len(),
            pixels.dim(0).unwrap_or(0)
        )
    })?;
    let jobs = whole_image_jobs(goals, config);
    run(model, pixels, &jobs, &Masking::None, config)
}
