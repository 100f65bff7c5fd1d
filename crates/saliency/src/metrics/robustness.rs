//! How much a map moves when the image barely does: max- and average-sensitivity (Yeh et al.,
//! "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019), as Quantus measures them:
//!
//! | | max-sensitivity | average-sensitivity |
//! |---|---|---|
//! | perturbation | uniform noise in [-r, r] added to every pixel (not clipped) | the same |
//! | per sample | `||a(x + noise) - a(x)||_F / ||a(x)||_F`, `a` the raw attribution for the same target | the same |
//! | over samples | the largest | the mean |
//! | Quantus | `MaxSensitivity` | `AvgSensitivity` |
//!
//! Lower is more robust. Sample k's noise is drawn from the seed and k alone, so every image
//! and every batching sees the same noise.

use crate::error::{ensure, Result};
use crate::Method;
use candle_core::{DType, Device, Tensor};
use vulnmap_data::random;
use vulnmap_models::Classifier;

/// The settings of the sensitivity measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensitivity {
    /// Largest change of a pixel, in pixel units (default 0.05).
    pub radius: f64,
    /// Noisy copies per image (default 10; Quantus: 200).
    pub samples: usize,
    /// Seed of the noise.
    pub seed: u64,
}

impl Default for Sensitivity {
    fn default() -> Self {
        Self {
            radius: 0.05,
            samples: 10,
            seed: 0,
        }
    }
}

/// One image's sensitivities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensitivities {
    /// The largest relative change over the samples.
    pub max: f64,
    /// The mean relative change over the samples.
    pub mean: f64,
}

impl Sensitivity {
    /// Sample `k`'s noise, uniform in [-radius, radius], of `shape` (one image's).
    pub fn noise(&self, k: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let mut rng = random::rng(self.seed, &format!("sensitivity {k}"));
        let v = random::uniform_vec(&mut rng, count, -self.radius, self.radius);
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// Each image's max- and average-sensitivity of `method` (NaN where its attribution is zero).
    pub fn measure(
        &self,
        model: &dyn Classifier,
        method: &Method,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Sensitivities>> {
        ensure(self.samples >= 1, || {
            "at least one noisy copy is needed".into()
        })?;
        ensure(self.radius > 0.0 && self.radius.is_finite(), || {
            format!("the noise radius must be positive, got {}", self.radius)
        })?;
        let n = pixels.dim(0)?;
        let norms = |a: &Tensor| -> Result<Vec<f64>> {
            Ok(a.to_dtype(DType::F64)?
                .sqr()?
                .flatten_from(1)?
                .sum(1)?
                .sqrt()?
                .to_vec1::<f64>()?)
        };
        let original = method.attribute(model, pixels, targets)?;
        let scale = norms(&original)?;
        let mut ratios = vec![Vec::with_capacity(self.samples); n];
        for k in 0..self.samples {
            let noise = self
                .noise(k, &pixels.dims()[1..], pixels.device())?
                .to_dtype(pixels.dtype())?;
            let moved = method.attribute(model, &pixels.broadcast_add(&noise)?, targets)?;
            let change = norms(&(moved - &original)?)?;
            for (i, r) in ratios.iter_mut().enumerate() {
                r.push(change[i] / scale[i]);
            }
        }
        Ok(ratios
            .iter()
            .map(|r| Sensitivities {
                max: r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                mean: r.iter().sum::<f64>() / r.len() as f64,
            })
            .collect())
    }
}
