//! RISE (Petsiuk et al., 2018): the image seen through many random smooth masks; each pixel's
//! saliency is the target probability averaged over the masks that keep it.

use crate::error::{ensure, Result};
use crate::target::check_inputs;
use candle_core::{DType, Tensor};
use rand::Rng;
use vulnmap_data::random;
use vulnmap_models::Classifier;
use vulnmap_ops::resize::bilinear;

/// RISE's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rise {
    /// Random masks per image (at least 1; default 1000; RISE's ImageNet setting: 4000).
    pub masks: usize,
    /// Cells per side of the coarse random grid.
    pub cells: usize,
    /// Probability that a cell is kept.
    pub keep: f64,
    /// Seed of the masks (default 0); every image sees the same masks.
    pub seed: u64,
    /// Masked images per forward pass.
    pub batch_size: usize,
}

impl Default for Rise {
    /// The RISE paper's ImageNet settings, with fewer masks (4000 there).
    fn default() -> Self {
        Self {
            masks: 1000,
            cells: 7,
            keep: 0.5,
            seed: 0,
            batch_size: 32,
        }
    }
}

impl Rise {
    /// Masks `first..first + count` (`count x 1 x H x W`): a random `cells x cells` binary grid,
    /// upsampled bilinearly to `(cells + 1) * cell` pixels and cropped at a random shift.
    pub fn masks(
        &self,
        first: usize,
        count: usize,
        (h, w): (usize, usize),
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let s = self.cells;
        let (ch, cw) = (h.div_ceil(s), w.div_ceil(s));
        let mut out = Vec::with_capacity(count);
        for k in first..first + count {
            let mut rng = random::rng(self.seed, &format!("rise {k}"));
            let grid: Vec<f32> = (0..s * s)
                .map(|_| (rng.random::<f64>() < self.keep) as u8 as f32)
                .collect();
            let (dy, dx) = (rng.random_range(0..ch), rng.random_range(0..cw));
            let grid = Tensor::from_vec(grid, (1, 1, s, s), device)?;
            let up = bilinear(&grid, ((s + 1) * ch, (s + 1) * cw), false)?;
            out.push(up.narrow(2, dy, h)?.narrow(3, dx, w)?.squeeze(0)?);
        }
        Ok(Tensor::stack(&out, 0)?)
    }

    /// Saliency `N x 1 x H x W`: sum of target probability times mask, over masks, divided by
    /// `masks * keep`.
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        check_inputs(model, pixels, targets, self.batch_size)?;
        ensure(self.masks > 0, || {
            "RISE needs at least one mask (masks = 0)".into()
        })?;
        ensure(self.cells > 0, || {
            "RISE needs at least one cell per side (cells = 0)".into()
        })?;
        ensure(self.keep > 0.0 && self.keep <= 1.0, || {
            format!("RISE keep probability must be in (0, 1], got {}", self.keep)
        })?;
        let (n, _, h, w) = pixels.dims4()?;
        let device = pixels.device();
        let mut maps = vec![Tensor::zeros((1, h, w), DType::F32, device)?; n];
        for first in (0..self.masks).step_by(self.batch_size) {
            let count = self.batch_size.min(self.masks - first);
            let masks = self
                .masks(first, count, (h, w), device)?
                .to_dtype(pixels.dtype())?;
            for (i, map) in maps.iter_mut().enumerate() {
                let masked = pixels.narrow(0, i, 1)?.broadcast_mul(&masks)?;
                let probs = candle_nn::ops::softmax(&model.logits(&masked)?, 1)?;
                let p = probs.narrow(1, targets[i], 1)?.reshape((count, 1, 1, 1))?;
                *map = (&*map + masks.broadcast_mul(&p)?.sum(0)?.to_dtype(DType::F32)?)?;
            }
        }
        let scale = 1.0 / (self.masks as f64 * self.keep);
        let maps = maps
            .into_iter()
            .map(|m| m * scale)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&maps, 0)?.to_dtype(pixels.dtype())?)
    }
}
