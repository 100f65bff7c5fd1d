//! Extremal perturbation (Fong, Patrick and Vedaldi, ICCV 2019), as TorchRay's
//! `extremal_perturbation`: for each area `a`, the smooth mask of area `a` that keeps the target
//! score highest when everything outside it is blurred away (preserve), lowest when the inside is
//! (delete), or both at once (dual).
//!
//! TorchRay's protocol, step by step:
//! - a perturbation pyramid of `levels` images blurred with sigma `max_blur * (1 - l / (L - 1))`
//!   (a Gaussian of `2 ceil(4 sigma) + 1` taps, zero beyond the image in the model's normalised
//!   space: the normalisation mean in pixels); a mask value picks a level, linearly interpolated;
//! - the mask is a `ceil(H / step) x ceil(W / step)` grid of parameters in [0, 1], made smooth by
//!   a soft maximum (coldness 20) over the parameters within `sigma` pixels, each weighted by
//!   `exp(-2 max(d / sigma - 1/2, 0)^2)`, computed on a margin of `sigma` pixels around the image;
//! - the energy is the reward (the target logit; its margin over the best other class with the
//!   contrastive reward) minus 300 x the mean squared difference between the sorted mask and the
//!   area's reference (`1 - a` zeros, then ones); the weight grows by 0.35% an iteration;
//! - `max_iters` steps of SGD (learning rate 0.01, momentum 0.9, dampening 0.9) on the
//!   parameters, clamped to [0, 1] after each; every other iteration the perturbed image is
//!   flipped left-right (jitter).
//!
//! Each (image, area) pair is a mask; `batch_size` perturbed images' masks are optimised
//! together. The map is the masks summed over the areas (TorchRay's benchmark sums areas 0.025, 0.05, 0.1 and 0.2).

use crate::blur::{Edges, GaussianBlur};
use crate::error::{ensure, Result};
use crate::target::check_inputs;
use candle_core::{DType, Device, Tensor, Var};
use vulnmap_models::Classifier;

/// Which game the mask plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ExtremalVariant {
    /// Keep the target score high with only the mask's region kept.
    #[default]
    Preserve,
    /// Make the target score low with the mask's region blurred away.
    Delete,
    /// Both: the preserved image's reward minus the deleted image's.
    Dual,
}

/// What the mask optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ExtremalReward {
    /// The target's score (TorchRay's `simple_reward`).
    #[default]
    Simple,
    /// The target's score minus the best other class's (TorchRay's `contrastive_reward`).
    Contrastive,
}

/// Extremal perturbation's settings; the defaults are TorchRay's.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtremalPerturbation {
    /// Mask areas, as fractions of the image (default `[0.1]`).
    pub areas: Vec<f64>,
    /// The game (default preserve).
    pub variant: ExtremalVariant,
    /// The reward (default simple).
    pub reward: ExtremalReward,
    /// Optimisation steps (default 800).
    pub max_iters: usize,
    /// Levels of the blur pyramid (default 8).
    pub levels: usize,
    /// The strongest blur's sigma, in pixels (default 20).
    pub max_blur: f64,
    /// Pixels between mask parameters (default 7).
    pub step: usize,
    /// The mask's smoothing radius, in pixels (default 21).
    pub sigma: f64,
    /// Flip the perturbed image left-right every other step (default true).
    pub jitter: bool,
    /// Perturbed images per forward pass: masks optimised together, each (image, area) pair one
    /// mask, two images per mask in the dual game (default 4; at least one mask per pass).
    pub batch_size: usize,
}

impl Default for ExtremalPerturbation {
    fn default() -> Self {
        Self {
            areas: vec![0.1],
            variant: ExtremalVariant::Preserve,
            reward: ExtremalReward::Simple,
            max_iters: 800,
            levels: 8,
            max_blur: 20.0,
            step: 7,
            sigma: 21.0,
            jitter: true,
            batch_size: 4,
        }
    }
}

const LEARNING_RATE: f64 = 0.01;
const MOMENTUM: f64 = 0.9;
const DAMPENING: f64 = 0.9;
const REGULARISER_WEIGHT: f64 = 300.0;
const REGULARISER_GROWTH: f64 = 1.0035;
const COLDNESS: f64 = 20.0;

impl ExtremalPerturbation {
    /// The masks summed over the areas (`N x 1 x H x W`).
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        Ok(self.masks(model, pixels, targets)?.sum_keepdim(1)?)
    }

    /// Each area's mask (`N x areas x H x W`, values in [0, 1]).
    pub fn masks(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        check_inputs(model, pixels, targets, self.batch_size)?;
        self.check()?;
        let (n, _, h, w) = pixels.dims4()?;
        let areas = self.areas.len();
        // (image, area) pairs, image-major, in passes of at most `batch_size` perturbed images.
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (0..areas).map(move |a| (i, a)))
            .collect();
        let per_pass = (self.batch_size / self.games()).max(1);
        let mut masks = Vec::with_capacity(pairs.len().div_ceil(per_pass));
        for chunk in pairs.chunks(per_pass) {
            masks.push(self.optimise(model, pixels, targets, chunk)?);
        }
        Ok(Tensor::cat(&masks, 0)?.reshape((n, areas, h, w))?)
    }

    /// Perturbed images per mask: two in the dual game (kept and deleted), else one.
    fn games(&self) -> usize {
        match self.variant {
            ExtremalVariant::Dual => 2,
            _ => 1,
        }
    }

    fn check(&self) -> Result<()> {
        ensure(!self.areas.is_empty(), || "no mask areas".into())?;
        for &a in &self.areas {
            ensure(a > 0.0 && a < 1.0, || {
                format!("a mask area is a fraction in (0, 1), got {a}")
            })?;
        }
        ensure(self.max_iters >= 1, || {
            "max_iters must be at least 1".into()
        })?;
        ensure(self.levels >= 2, || {
            "the blur pyramid needs two levels".into()
        })?;
        ensure(self.step >= 1, || "step must be at least 1".into())?;
        ensure(self.sigma > 0.0 && self.max_blur > 0.0, || {
            "sigma and max_blur must be positive".into()
        })
    }

    /// One pass: the masks of `pairs` (image index, area index) optimised together
    /// (`pairs x H x W`).
    fn optimise(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
        pairs: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        let device = pixels.device();
        let k = pairs.len();
        // The pyramids of the pass's images (a contiguous range, as pairs are image-major), one
        // per mask.
        let first = pairs[0].0;
        let images = pairs[k - 1].0 + 1 - first;
        let pyramid = self.pyramid(model, &pixels.narrow(0, first, images)?.detach())?;
        let of_mask: Vec<u32> = pairs.iter().map(|&(i, _)| (i - first) as u32).collect();
        let pyramid = pyramid
            .index_select(&Tensor::new(of_mask, device)?, 0)?
            .reshape((k, self.levels, c, h, w))?;
        let generator = MaskGenerator::new((h, w), self.step, self.sigma, device)?;
        let (ph, pw) = generator.shape_in;
        let params = Var::from_tensor(&Tensor::ones((k, 1, ph, pw), DType::F32, device)?)?;
        let cells = generator.shape_out.0 * generator.shape_out.1;
        let pair_areas: Vec<f64> = pairs.iter().map(|&(_, a)| self.areas[a]).collect();
        let games = self.games();
        // Mask j's target, once per game (the dual game's deleted images follow the kept ones).
        let target_index: Vec<u32> = (0..games)
            .flat_map(|_| pairs.iter().map(|&(i, _)| targets[i] as u32))
            .collect();
        let target_index = Tensor::from_vec(target_index, (k * games, 1), device)?;
        let mut weight = REGULARISER_WEIGHT;
        let mut velocity: Option<Tensor> = None;
        for t in 0..self.max_iters {
            let (cropped, full) = generator.generate(params.as_tensor())?;
            let x = match self.variant {
                ExtremalVariant::Preserve => apply(&pyramid, &cropped)?,
                ExtremalVariant::Delete => apply(&pyramid, &cropped.affine(-1.0, 1.0)?)?,
                ExtremalVariant::Dual => Tensor::cat(
                    &[
                        apply(&pyramid, &cropped)?,
                        apply(&pyramid, &cropped.affine(-1.0, 1.0)?)?,
                    ],
                    0,
                )?,
            };
            let x = if self.jitter && t % 2 == 0 {
                x.flip(&[3])?
            } else {
                x
            };
            let logits = model.forward(&x)?.to_dtype(DType::F32)?;
            let score = self.score(&logits, &target_index)?; // k * games
            let reward = match self.variant {
                ExtremalVariant::Preserve => score,
                ExtremalVariant::Delete => score.neg()?,
                ExtremalVariant::Dual => (score.narrow(0, 0, k)? - score.narrow(0, k, k)?)?,
            };
            let regul = (area_gap(&full.reshape((k, cells))?, &pair_areas)? * weight)?;
            let energy = (reward - regul)?.sum_all()?;
            let grads = energy.neg()?.backward()?;
            let grad = grads
                .get(params.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("no gradient for the mask".into()))?
                .detach();
            // SGD with momentum and dampening (PyTorch's: the first step takes the gradient).
            let v = match velocity.take() {
                None => grad,
                Some(v) => ((v * MOMENTUM)? + (grad * (1.0 - DAMPENING))?)?,
            };
            let updated = (params.as_tensor() - (&v * LEARNING_RATE)?)?.clamp(0f32, 1f32)?;
            params.set(&updated)?;
            velocity = Some(v);
            weight *= REGULARISER_GROWTH;
        }
        let (cropped, _) = generator.generate(&params.as_tensor().detach())?;
        Ok(cropped.reshape((k, h, w))?)
    }

    /// The reward's score of each perturbed image: the target's logit, or its margin over the
    /// best other class.
    fn score(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let target = logits.gather(targets, 1)?.squeeze(1)?;
        match self.reward {
            ExtremalReward::Simple => Ok(target),
            ExtremalReward::Contrastive => {
                // TorchRay sets the target's own logit to -100 before taking the maximum.
                let classes = logits.dim(1)?;
                let index = Tensor::arange(0u32, classes as u32, logits.device())?
                    .unsqueeze(0)?
                    .broadcast_as(logits.shape())?;
                let is_target = index.broadcast_eq(&targets.broadcast_as(logits.shape())?)?;
                let others = is_target.where_cond(
                    &Tensor::full(-100f32, logits.shape(), logits.device())?,
                    logits,
                )?;
                Ok((target - others.max(1)?)?)
            }
        }
    }

    /// The blur pyramid of each image: `N x L x C x H x W`, level 0 the most blurred and level
    /// `L - 1` the image itself.
    fn pyramid(&self, model: &dyn Classifier, pixels: &Tensor) -> Result<Tensor> {
        let spec = model.input_spec();
        let mean = Tensor::from_vec(spec.mean.to_vec(), (1, 3, 1, 1), pixels.device())?
            .to_dtype(pixels.dtype())?;
        let centred = pixels.broadcast_sub(&mean)?;
        let last = self.levels - 1;
        let mut levels = Vec::with_capacity(self.levels);
        for l in 0..self.levels {
            let sigma = self.max_blur * (1.0 - l as f64 / last as f64);
            let level = if l == last || sigma <= 0.0 {
                pixels.clone()
            } else {
                let blur = GaussianBlur {
                    sigma,
                    taps: Some(2 * (4.0 * sigma).ceil() as usize + 1),
                    edges: Edges::Zero,
                };
                blur.apply(&centred)?.broadcast_add(&mean)?
            };
            levels.push(level.unsqueeze(1)?);
        }
        Ok(Tensor::cat(&levels, 1)?)
    }
}

/// Each mask's perturbed image: the pyramid level its value picks, linearly interpolated
/// (`pyramid` `K x L x C x H x W`, `mask` `K x 1 x H x W`).
fn apply(pyramid: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (k, levels, c, h, w) = pyramid.dims5()?;
    let scaled = (mask * (levels - 1) as f64)?; // K x 1 x H x W
    let floor = scaled.detach().floor()?;
    let frac = (&scaled - &floor)?;
    // One-hot selections of the two levels (constants: the gradient flows through `frac`).
    let level = Tensor::arange(0f32, levels as f32, mask.device())?.reshape((1, levels, 1, 1))?;
    let lower = floor.broadcast_eq(&level)?.to_dtype(pyramid.dtype())?; // K x L x H x W
    let upper_index = (floor + 1.0)?.clamp(0f32, (levels - 1) as f32)?;
    let upper = upper_index
        .broadcast_eq(&level)?
        .to_dtype(pyramid.dtype())?;
    let pick = |onehot: &Tensor| -> Result<Tensor> {
        Ok(pyramid
            .broadcast_mul(&onehot.unsqueeze(2)?)?
            .sum(1)?
            .reshape((k, c, h, w))?)
    };
    let (y0, y1) = (pick(&lower)?, pick(&upper)?);
    Ok((&y0 + (y1 - &y0)?.broadcast_mul(&frac)?)?)
}

/// Extremal perturbation's area constraint: for each row of `masks` (`K x cells`, values in
/// [0, 1]), the mean squared difference between its values sorted and the mask of exactly its
/// area (`areas[k]`: `1 - a` of the cells 0, the rest 1). Zero only for a binary mask of that
/// area; differentiable through the sort's gather.
pub fn area_gap(masks: &Tensor, areas: &[f64]) -> Result<Tensor> {
    let (k, cells) = masks.dims2()?;
    ensure(areas.len() == k, || {
        format!("{} areas for {k} masks", areas.len())
    })?;
    let reference: Vec<f32> = areas
        .iter()
        .flat_map(|&a| {
            let zeros = (cells as f64 * (1.0 - a)) as usize;
            (0..cells).map(move |i| if i < zeros { 0.0 } else { 1.0 })
        })
        .collect();
    let reference =
        Tensor::from_vec(reference, (k, cells), masks.device())?.to_dtype(masks.dtype())?;
    let sorted = masks.gather(&sorted_order(masks)?, 1)?;
    Ok((sorted - reference)?.sqr()?.mean(1)?)
}

/// Each row's ascending order (computed on the host: a sort of a mask's cells).
fn sorted_order(rows: &Tensor) -> Result<Tensor> {
    let (k, cells) = rows.dims2()?;
    let values = rows
        .detach()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let mut order = Vec::with_capacity(k * cells);
    for row in &values {
        let mut idx: Vec<u32> = (0..cells as u32).collect();
        idx.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]));
        order.extend(idx);
    }
    Ok(Tensor::from_vec(order, (k, cells), rows.device())?)
}

/// TorchRay's `MaskGenerator`: parameters every `step` pixels to a smooth mask, each output
/// pixel a soft maximum of the parameters within reach, weighted by their distance.
struct MaskGenerator {
    shape: (usize, usize),
    step: usize,
    radius: usize,
    padding: usize,
    margin: usize,
    shape_in: (usize, usize),
    shape_mid: (usize, usize),
    shape_out: (usize, usize),
    /// `1 x (2 radius + 1)^2 x out_h x out_w`.
    weight: Tensor,
}

impl MaskGenerator {
    fn new(shape: (usize, usize), step: usize, sigma: f64, device: &Device) -> Result<Self> {
        let margin = sigma;
        let padding = 1 + ((margin + sigma) / step as f64).ceil() as usize;
        let radius = 1 + (sigma / step as f64).ceil() as usize;
        let taps = 2 * radius + 1;
        let shape_in = (shape.0.div_ceil(step), shape.1.div_ceil(step));
        let mid = |z: usize| z + 2 * padding + 1 - taps;
        let shape_mid = (mid(shape_in.0), mid(shape_in.1));
        let shape_up = (step * shape_mid.0, step * shape_mid.1);
        let shape_out = (shape_up.0 + 1 - step, shape_up.1 + 1 - step);
        let (oh, ow) = shape_out;
        let step_inv = (
            shape_mid.0 as f32 / shape_up.0 as f32,
            shape_mid.1 as f32 / shape_up.1 as f32,
        );
        let mut weight = vec![0f32; taps * taps * oh * ow];
        for ky in 0..taps {
            for kx in 0..taps {
                let k = ky * taps + kx;
                for uy in 0..oh {
                    let iy = (step_inv.0 * uy as f32).floor() + ky as f32 - padding as f32;
                    let dy = uy as f32 - (margin as f32 + step as f32 * iy);
                    for ux in 0..ow {
                        let ix = (step_inv.1 * ux as f32).floor() + kx as f32 - padding as f32;
                        let dx = ux as f32 - (margin as f32 + step as f32 * ix);
                        let z = (dy * dy + dx * dx).sqrt() / sigma as f32;
                        let over = (z - 0.5).max(0.0);
                        weight[(k * oh + uy) * ow + ux] = (-2.0 * over * over).exp();
                    }
                }
            }
        }
        Ok(Self {
            shape,
            step,
            radius,
            padding,
            margin: margin.round() as usize,
            shape_in,
            shape_mid,
            shape_out,
            weight: Tensor::from_vec(weight, (1, taps * taps, oh, ow), device)?,
        })
    }

    /// The mask cropped to the image (`K x 1 x H x W`) and with its margin (`K x 1 x out`).
    fn generate(&self, params: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = params.dim(0)?;
        let taps = 2 * self.radius + 1;
        let (mh, mw) = self.shape_mid;
        let padded = params
            .pad_with_zeros(2, self.padding, self.padding)?
            .pad_with_zeros(3, self.padding, self.padding)?;
        // F.unfold: every (ky, kx) shift of the parameters, as channels.
        let mut shifted = Vec::with_capacity(taps * taps);
        for ky in 0..taps {
            for kx in 0..taps {
                shifted.push(padded.narrow(2, ky, mh)?.narrow(3, kx, mw)?);
            }
        }
        let unfolded = Tensor::cat(&shifted, 1)?; // K x taps^2 x mh x mw
                                                  // Nearest upsampling by `step`, then the crop to the output shape.
        let s = self.step;
        let up = unfolded
            .reshape((k, taps * taps, mh, 1, mw, 1))?
            .broadcast_as((k, taps * taps, mh, s, mw, s))?
            .reshape((k, taps * taps, mh * s, mw * s))?
            .narrow(2, 0, self.shape_out.0)?
            .narrow(3, 0, self.shape_out.1)?;
        let weighted = up.broadcast_mul(&self.weight)?;
        // Soft maximum over the taps: sum(m * softmax(coldness * m)).
        let hot = (&weighted * COLDNESS)?;
        let hot = hot.broadcast_sub(&hot.max_keepdim(1)?.detach())?.exp()?;
        let soft = hot.broadcast_div(&hot.sum_keepdim(1)?)?;
        let full = (weighted * soft)?.sum_keepdim(1)?.clamp(0f32, 1f32)?;
        let m = self.margin;
        let cropped = full
            .narrow(2, m, self.shape.0)?
            .narrow(3, m, self.shape.1)?
            .contiguous()?;
        Ok((cropped, full))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fraction of a mask's pixels above one half.
    fn area(mask: &Tensor) -> f32 {
        let v = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().filter(|&&x| x > 0.5).count() as f32 / v.len() as f32
    }

    #[test]
    fn the_mask_generator_has_torchrays_shapes_and_keeps_constants() {
        // TorchRay at 224 x 224, step 7, sigma 21: 32 x 32 parameters, a 260 x 260 output.
        let g = MaskGenerator::new((224, 224), 7, 21.0, &Device::Cpu).unwrap();
        assert_eq!(g.shape_in, (32, 32));
        assert_eq!(g.shape_out, (260, 260));
        let ones = Tensor::ones((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
        let (cropped, full) = g.generate(&ones).unwrap();
        assert_eq!(cropped.dims(), &[1, 1, 224, 224]);
        assert_eq!(full.dims(), &[1, 1, 260, 260]);
        // All parameters 1: the inside of the mask is 1.
        assert!(area(&cropped) > 0.99);
        let zeros = ones.zeros_like().unwrap();
        let (cropped, _) = g.generate(&zeros).unwrap();
        assert_eq!(cropped.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn a_mask_picks_pyramid_levels_by_linear_interpolation() {
        let levels: Vec<f32> = (0..4).map(|l| l as f32 * 10.0).collect();
        let pyramid = Tensor::from_vec(levels, (1, 4, 1, 1, 1), &Device::Cpu).unwrap();
        for (m, expected) in [(0.0f32, 0.0f32), (1.0, 30.0), (0.5, 15.0), (0.2, 6.0)] {
            let mask = Tensor::full(m, (1, 1, 1, 1), &Device::Cpu).unwrap();
            let out = apply(&pyramid, &mask).unwrap().flatten_all().unwrap();
            let got = out.to_vec1::<f32>().unwrap()[0];
            assert!((got - expected).abs() < 1e-4, "{m}: {got}");
        }
    }
}
