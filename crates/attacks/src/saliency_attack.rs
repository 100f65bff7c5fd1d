//! The saliency attack and its random-mask controls (paper, III-C-2, Figs. 9-10, Table I rows 3
//! and 4): noise multiplied by the normalised SmoothGrad map, recomputed every k updates; against
//! masks with the same pixel budget, the saliency mask's values permuted or a Bernoulli mask.

use crate::engine::{run, saliency_masks, whole_image_jobs, AttackConfig, Goal, Masking};
use crate::error::{ensure, Result};
use crate::outcome::AttackOutcome;
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use vulnmap_data::random;
use vulnmap_models::Classifier;
use vulnmap_saliency::SmoothGrad;

/// The saliency mask's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaliencyAttack {
    /// How the mask is computed (the authors' SmoothGrad by default).
    pub method: SmoothGrad,
    /// Recompute the mask on the current perturbed image every this many updates (the paper:
    /// 1); `None`: once, on the clean image (the authors' code).
    pub every: Option<usize>,
    /// Mask values below this are set to zero (the authors' code: 0.1).
    pub threshold: f32,
}

impl Default for SaliencyAttack {
    fn default() -> Self {
        Self {
            method: SmoothGrad::authors(),
            every: Some(1),
            threshold: 0.0,
        }
    }
}

/// The saliency attack on each image for its goal.
pub fn saliency_attack(
    model: &dyn Classifier,
    pixels: &Tensor,
    goals: &[Goal],
    spec: &SaliencyAttack,
    config: &AttackConfig,
) -> Result<Vec<AttackOutcome>> {
    ensure(goals.len() == pixels.dim(0)?, || {
        "one goal per image".into()
    })?;
    let masking = Masking::Saliency {
        method: spec.method,
        every: spec.every,
        threshold: spec.threshold,
    };
    run(
        model,
        pixels,
        &whole_image_jobs(goals, config),
        &masking,
        config,
    )
}

/// A random mask with the saliency mask's pixel budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Control {
    /// The clean image's saliency mask with its pixels shuffled: the same values, elsewhere
    /// (the authors' control).
    #[default]
    #[cfg_attr(feature = "clap", value(alias = "random"))]
    Permuted,
    /// Each pixel on with probability equal to the saliency mask's mean (the same expected sum).
    Bernoulli,
}

/// The clean images' saliency masks (`H x W` each) as the saliency attack starts from them.
pub fn clean_masks(
    model: &dyn Classifier,
    pixels: &Tensor,
    spec: &SaliencyAttack,
) -> Result<Vec<Tensor>> {
    let labels: Vec<usize> =
        vulnmap_saliency::predicted_classes(model, pixels, spec.method.batch_size)?;
    let masks = saliency_masks(model, pixels, &labels, &spec.method, spec.threshold)?;
    (0..masks.dim(0)?)
        .map(|i| Ok(masks.get(i)?.squeeze(0)?.to_device(&Device::Cpu)?))
        .collect()
}

/// `control` masks built from `masks`, seeded.
pub fn control_masks(masks: &[Tensor], control: Control, seed: u64) -> Result<Vec<Tensor>> {
    masks
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (h, w) = m.dims2()?;
            let values = m.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut rng = random::rng(seed, &format!("control mask {i}"));
            let out: Vec<f32> = match control {
                Control::Permuted => {
                    let mut v = values;
                    v.shuffle(&mut rng);
                    v
                }
                Control::Bernoulli => {
                    let p = values.iter().map(|&x| x as f64).sum::<f64>() / values.len() as f64;
                    (0..values.len())
                        .map(|_| (rng.random::<f64>() < p) as u8 as f32)
                        .collect()
                }
            };
            Ok(Tensor::from_vec(out, (h, w), &Device::Cpu)?)
        })
        .collect()
}

/// The attack with fixed `masks` (one `H x W` per image): the random-mask controls.
pub fn fixed_mask_attack(
    model: &dyn Classifier,
    pixels: &Tensor,
    goals: &[Goal],
    masks: Vec<Tensor>,
    config: &AttackConfig,
) -> Result<Vec<AttackOutcome>> {
    ensure(
        goals.len() == pixels.dim(0)? && masks.len() == goals.len(),
        || "one goal and one mask per image".into(),
    )?;
    run(
        model,
        pixels,
        &whole_image_jobs(goals, config),
        &Masking::Fixed(masks),
        config,
    )
}
