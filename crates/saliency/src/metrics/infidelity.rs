//! Infidelity (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS
//! 2019), as Captum's `captum.metrics.infidelity` computes it:
//!
//! | | infidelity |
//! |---|---|
//! | perturbation | `I` Gaussian, standard deviation `sigma` per pixel; the model sees `x - I` |
//! | per sample | `(I . a - (f(x) - f(x - I)))^2`, `f` the target's score, `a` the attribution |
//! | `normalize` | `a` first scaled by `beta = E[(I . a)(f(x) - f(x - I))] / E[(I . a)^2]` (Captum's `normalize=True`) |
//! | over samples | the mean |
//!
//! Lower is more faithful: a linear model's gradient has infidelity 0. The attribution must have
//! the image's height and width, with the image's channels or one channel (then shared by all
//! channels); class activation maps at a layer's resolution have no infidelity. Sample k's noise
//! is drawn from the seed and k alone.

use crate::error::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use vulnmap_data::random;
use vulnmap_models::Classifier;

/// Infidelity's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Infidelity {
    /// Standard deviation of the perturbation, in pixel units (default 0.05).
    pub sigma: f64,
    /// Perturbations per image (default 10, Captum's).
    pub samples: usize,
    /// Scale the attribution by its best factor first (Captum's `normalize`; default false).
    pub normalize: bool,
    /// Seed of the perturbations.
    pub seed: u64,
}

impl Default for Infidelity {
    fn default() -> Self {
        Self {
            sigma: 0.05,
            samples: 10,
            normalize: false,
            seed: 0,
        }
    }
}

impl Infidelity {
    /// Sample `k`'s perturbation `I`, of `shape` (one image's).
    pub fn perturbation(&self, k: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let mut rng = random::rng(self.seed, &format!("infidelity {k}"));
        let v = random::normal_vec(&mut rng, count, 0.0, self.sigma);
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// Each image's infidelity of `attributions` (`N x C x H x W` or `N x 1 x H x W`).
    pub fn measure(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        attributions: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<f64>> {
        ensure(self.samples >= 1, || {
            "at least one perturbation is needed".into()
        })?;
        ensure(self.sigma > 0.0 && self.sigma.is_finite(), || {
            format!(
                "the perturbation's sigma must be positive, got {}",
                self.sigma
            )
        })?;
        let (n, c, h, w) = pixels.dims4()?;
        let (an, ac, ah, aw) = attributions.dims4()?;
        ensure(
            an == n && (ac == c || ac == 1) && (ah, aw) == (h, w),
            || {
                format!(
                    "infidelity needs attributions of the images' size ({n} x {c} or 1 x {h} x {w}), got {:?}",
                    attributions.dims()
                )
            },
        )?;
        ensure(targets.len() == n, || {
            format!("{} targets given for {n} images", targets.len())
        })?;
        let index: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
        let index = Tensor::from_vec(index, (n, 1), pixels.device())?;
        let score = |x: &Tensor| -> Result<Vec<f64>> {
            Ok(model
                .forward(x)?
                .gather(&index, 1)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?)
        };
        let base = score(pixels)?;
        let a = attributions.to_dtype(pixels.dtype())?;
        // Per sample and image: I . a and f(x) - f(x - I).
        let mut dots = vec![Vec::with_capacity(self.samples); n];
        let mut drops = vec![Vec::with_capacity(self.samples); n];
        for k in 0..self.samples {
            let i = self
                .perturbation(k, &[c, h, w], pixels.device())?
                .to_dtype(pixels.dtype())?;
            let dot = a
                .broadcast_mul(&i)?
                .flatten_from(1)?
                .sum(1)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            let moved = score(&pixels.broadcast_sub(&i)?)?;
            for j in 0..n {
                dots[j].push(dot[j]);
                drops[j].push(base[j] - moved[j]);
            }
        }
        Ok(dots
            .iter()
            .zip(&drops)
            .map(|(d, f)| {
                let beta = if self.normalize {
                    let num: f64 = d.iter().zip(f).map(|(d, f)| d * f).sum();
                    let den: f64 = d.iter().map(|d| d * d).sum();
                    if den == 0.0 {
                        0.0
                    } else {
                        num / den
                    }
                } else {
                    1.0
                };
                d.iter()
                    .zip(f)
                    .map(|(d, f)| (beta * d - f).powi(2))
                    .sum::<f64>()
                    / d.len() as f64
            })
            .collect())
    }
}
