//! The `finetune` step's settings as the training library's [`TrainConfig`] (shared by the
//! pipeline's step and `vulnmap finetune`).

use crate::schema::FinetuneStep;
use std::path::PathBuf;
use vulnmap_data::Preprocess;
use vulnmap_train::optim::AdamConfig;
use vulnmap_train::train::{LrSchedule, TrainConfig};

/// The training of `step`, seeded by `seed`; images resized (shorter side) to `resize` (default:
/// the step's size) and centre-cropped; the best weights kept in `checkpoint`.
pub fn train_config(
    step: &FinetuneStep,
    seed: u64,
    resize: Option<u32>,
    checkpoint: PathBuf,
    progress: bool,
) -> TrainConfig {
    TrainConfig {
        epochs: step.epochs,
        batch_size: step.batch_size,
        adam: AdamConfig {
            lr: step.lr,
            weight_decay: step.weight_decay,
            ..AdamConfig::default()
        },
        schedule: if step.cosine {
            LrSchedule::Cosine
        } else {
            LrSchedule::Constant
        },
        seed,
        preprocess: Preprocess::resize_crop(resize.unwrap_or(step.size as u32), step.size as u32),
        freeze_backbone: step.freeze_backbone,
        random_flips: step.flips,
        noise_std: step.noise,
        checkpoint: Some(checkpoint),
        progress,
    }
}
