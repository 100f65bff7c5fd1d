//! Deletion and insertion (Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of
//! Black-box Models", BMVC 2018): remove the most salient pixels first and watch the target
//! probability fall (a good map falls fast: low area under the curve), or insert them into a
//! blurred copy and watch it rise (a good map rises fast: high area).
//!
//! The defaults are RISE's protocol:
//!
//! | | deletion | insertion |
//! |---|---|---|
//! | start | the image | the image blurred: 11 taps, sigma 5, reflected edges |
//! | each step | the next pixels (all channels) set to 0 | the next pixels copied from the image |
//! | order | map value, highest first; ties in row-major order | the same |
//! | pixels per step | 224 (224 steps at 224 x 224) | the same |
//! | score | softmax probability of the target class | the same |
//! | area | trapezoid over the fraction of pixels changed, 0 to 1 | the same |

use crate::blur::GaussianBlur;
use crate::error::{ensure, Result};
use candle_core::{DType, Tensor};
use vulnmap_models::Classifier;

/// The curve's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CausalMetric {
    /// Pixels changed per step (224 in RISE's protocol at 224 x 224).
    pub pixels_per_step: usize,
    /// The blur that makes insertion's starting image (RISE: 11 taps, sigma 5, reflected).
    pub blur: GaussianBlur,
    /// Step images per forward pass.
    pub batch_size: usize,
}

impl Default for CausalMetric {
    fn default() -> Self {
        Self {
            pixels_per_step: 224,
            blur: GaussianBlur::rise(),
            batch_size: 32,
        }
    }
}

/// Target probability after each step, and the area under it (x from 0 to 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// Fraction of the pixels changed at each point.
    pub fractions: Vec<f64>,
    /// The target's probability at each point, in [0, 1].
    pub scores: Vec<f64>,
    /// Trapezoidal area under `scores` against `fractions`, in [0, 1].
    pub auc: f64,
}

impl CausalMetric {
    /// Deletion: from `image` (`C x H x W`) towards zeros, most salient pixels of `map`
    /// (`H x W`) first.
    pub fn deletion(
        &self,
        model: &dyn Classifier,
        image: &Tensor,
        map: &Tensor,
        target: usize,
    ) -> Result<Curve> {
        self.curve(model, image, &image.zeros_like()?, map, target)
    }

    /// Insertion: from a blurred copy of `image` towards `image`, most salient pixels first.
    pub fn insertion(
        &self,
        model: &dyn Classifier,
        image: &Tensor,
        map: &Tensor,
        target: usize,
    ) -> Result<Curve> {
        let blurred = self.blur.apply(&image.unsqueeze(0)?)?.squeeze(0)?;
        self.curve(model, &blurred, image, map, target)
    }

    fn curve(
        &self,
        model: &dyn Classifier,
        start: &Tensor,
        finish: &Tensor,
        map: &Tensor,
        target: usize,
    ) -> Result<Curve> {
        ensure(self.pixels_per_step > 0, || {
            "pixels_per_step must be at least 1".into()
        })?;
        ensure(self.batch_size > 0, || {
            "batch_size must be at least 1".into()
        })?;
        let (_, h, w) = start.dims3()?;
        ensure(map.dims() == [h, w], || {
            format!("map of shape {:?} for a {h}x{w} image", map.dims())
        })?;
        ensure(target < model.num_classes(), || {
            format!(
                "target class {target} is out of range for {} classes",
                model.num_classes()
            )
        })?;
        // Rank of every pixel, most salient first (ties by position, so the order is fixed), in
        // double precision so that no two values of a double map tie by rounding.
        let values = map.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        let mut rank = vec![0f32; values.len()];
        for (r, &p) in order.iter().enumerate() {
            rank[p] = r as f32;
        }
        let device = start.device();
        let rank = Tensor::from_vec(rank, (1, 1, h, w), device)?;
        let total = h * w;
        let steps = total.div_ceil(self.pixels_per_step);
        let counts: Vec<usize> = (0..=steps)
            .map(|k| (k * self.pixels_per_step).min(total))
            .collect();
        let mut scores = Vec::with_capacity(counts.len());
        for chunk in counts.chunks(self.batch_size) {
            let thresholds: Vec<f32> = chunk.iter().map(|&c| c as f32).collect();
            let thresholds = Tensor::from_vec(thresholds, (chunk.len(), 1, 1, 1), device)?;
            // 1 where the pixel's rank is below the step's count: already changed.
            let changed = rank.broadcast_lt(&thresholds)?.to_dtype(start.dtype())?;
            let images = start
                .unsqueeze(0)?
                .broadcast_mul(&changed.affine(-1.0, 1.0)?)?
                .broadcast_add(&finish.unsqueeze(0)?.broadcast_mul(&changed)?)?;
            let probs = candle_nn::ops::softmax(&model.logits(&images)?, 1)?;
            let p = probs
                .narrow(1, target, 1)?
                .squeeze(1)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            scores.extend(p);
        }
        let fractions: Vec<f64> = counts.iter().map(|&c| c as f64 / total as f64).collect();
        let auc = fractions
            .windows(2)
            .zip(scores.windows(2))
            .map(|(x, y)| (x[1] - x[0]) * (y[0] + y[1]) / 2.0)
            .sum();
        Ok(Curve {
            fractions,
            scores,
            auc,
        })
    }
}
