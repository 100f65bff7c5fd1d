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
    let jobs = whole_image_jobs(goals, config);
    run(model, pixels, &jobs, &Masking::Learned(*spec), config)
}

/// The mask attack once per area (the spec's own area when `areas` is empty) and per seed
/// (`seeds` of them from the config's), as extremal perturbation sums its areas: each image's
/// outcome is its first attack's, with `mask` the mean of all its learned masks.
pub fn mask_attack_averaged(
    model: &dyn Classifier,
    pixels: &Tensor,
    goals: &[Goal],
    spec: &LearnedMask,
    areas: &[f64],
    seeds: usize,
    config: &AttackConfig,
) -> Result<Vec<AttackOutcome>> {
    ensure(seeds >= 1, || "seeds must be at least 1".into())?;
    let areas = if areas.is_empty() {
        vec![spec.area]
    } else {
        areas.to_vec()
    };
    let mut first: Option<Vec<AttackOutcome>> = None;
    let mut sums: Vec<Option<Tensor>> = vec![None; goals.len()];
    for &area in &areas {
        for s in 0..seeds as u64 {
            let spec = LearnedMask { area, ..*spec };
            let config = AttackConfig {
                seed: config.seed.wrapping_add(s),
                ..*config
            };
            let outcomes = mask_attack(model, pixels, goals, &spec, &config)?;
            for (sum, o) in sums.iter_mut().zip(&outcomes) {
                if let Some(m) = &o.mask {
                    *sum = Some(match sum.take() {
                        Some(total) => (total + m)?,
                        None => m.clone(),
                    });
                }
            }
            first.get_or_insert(outcomes);
        }
    }
    let runs = (areas.len() * seeds) as f64;
    let mut outcomes = first.unwrap_or_default();
    for (o, sum) in outcomes.iter_mut().zip(sums) {
        o.mask = sum.map(|m| m / runs).transpose()?;
    }
    Ok(outcomes)
}
