//! SmoothGrad (Smilkov et al., 2017): gradients averaged over noisy copies of the image.

use crate::error::{ensure, Result};
use crate::gradient::batch_gradient;
use crate::target::check_inputs;
use candle_core::{DType, Tensor};
use vulnmap_data::random;
use vulnmap_models::Classifier;

/// How the noisy gradients are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[cfg_attr(feature = "clap", value(rename_all = "lower"))]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// Their mean.
    #[default]
    Plain,
    /// The mean of their squares (SmoothGrad-Squared; the paper's authors).
    Squared,
    /// Their variance (VarGrad).
    VarGrad,
}

/// SmoothGrad's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothGrad {
    /// Noisy copies per image.
    pub samples: usize,
    /// Noise standard deviation as a fraction of the image's value range (max - min).
    pub noise_level: f64,
    /// How the noisy gradients are combined (default `Plain`; the authors': `Squared`).
    pub aggregate: Aggregate,
    /// Seed of the noise (default 0); each sample's draw is shared by every image.
    pub seed: u64,
    /// Noisy copies per backward pass.
    pub batch_size: usize,
}

impl Default for SmoothGrad {
    /// Smilkov et al.'s recommendation: 15% noise; 25 samples.
    fn default() -> Self {
        Self {
            samples: 25,
            noise_level: 0.15,
            aggregate: Aggregate::Plain,
            seed: 0,
            batch_size: 16,
        }
    }
}

impl SmoothGrad {
    /// The paper's authors' settings: 25 samples, sigma 15% of the range, squared gradients of
    /// the top logit (their map is then the channel sum of absolute values, scaled to the 99th
    /// percentile: [`crate::PostProcess::default`]). They measured the range of the *normalised*
    /// image; here it is the pixel range, the same up to the per-channel scale of normalisation.
    pub fn authors() -> Self {
        Self {
            aggregate: Aggregate::Squared,
            ..Self::default()
        }
    }

    /// Aggregated gradients, `N x C x H x W`. Sample `j` of every image uses the same standard
    /// normal draw (scaled by that image's sigma), so a map does not depend on which other images
    /// share the call or on the batch size.
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        check_inputs(model, pixels, targets, self.batch_size)?;
        ensure(self.samples > 0, || {
            "SmoothGrad needs at least one sample (samples = 0)".into()
        })?;
        ensure(
            self.noise_level >= 0.0 && self.noise_level.is_finite(),
            || {
                format!(
                    "SmoothGrad noise level must be a non-negative fraction, got {}",
                    self.noise_level
                )
            },
        )?;
        let (n, c, h, w) = pixels.dims4()?;
        let device = pixels.device();
        let sigmas: Vec<f32> = (0..n)
            .map(|i| {
                let img = pixels.get(i)?;
                let range = (img.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?
                    - img.min_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
                    as f64;
                Ok((self.noise_level * range) as f32)
            })
            .collect::<Result<_>>()?;
        // (image, sample) pairs, image-major, in chunks of batch_size.
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (0..self.samples).map(move |j| (i, j)))
            .collect();
        let mut sum: Vec<Option<Tensor>> = vec![None; n];
        let mut sum_sq: Vec<Option<Tensor>> = vec![None; n];
        for chunk in pairs.chunks(self.batch_size) {
            let mut noisy = Vec::with_capacity(chunk.len());
            for &(i, j) in chunk {
                let noise = random::randn(
                    &mut random::rng(self.seed, &format!("smoothgrad {j}")),
                    (c, h, w),
                    device,
                )?
                .to_dtype(pixels.dtype())?;
                noisy.push((pixels.get(i)? + (noise * sigmas[i] as f64)?)?);
            }
            let batch = Tensor::stack(&noisy, 0)?;
            drop(noisy);
            let batch_targets: Vec<u32> = chunk.iter().map(|&(i, _)| targets[i] as u32).collect();
            let grads = batch_gradient(model, batch, &batch_targets)?;
            // Add each image's run of rows to its sums.
            let mut row = 0;
            while row < chunk.len() {
                let i = chunk[row].0;
                let len = chunk[row..].iter().take_while(|p| p.0 == i).count();
                let g = grads.narrow(0, row, len)?;
                accumulate(&mut sum[i], g.sum(0)?)?;
                if self.aggregate != Aggregate::Plain {
                    accumulate(&mut sum_sq[i], g.sqr()?.sum(0)?)?;
                }
                row += len;
            }
        }
        let m = self.samples as f64;
        let maps = (0..n)
            .map(|i| {
                let mean = (sum[i].take().expect("every image has samples") / m)?;
                Ok(match self.aggregate {
                    Aggregate::Plain => mean,
                    Aggregate::Squared => (sum_sq[i].take().expect("squares") / m)?,
                    Aggregate::VarGrad => {
                        ((sum_sq[i].take().expect("squares") / m)? - mean.sqr()?)?
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&maps, 0)?)
    }
}

fn accumulate(slot: &mut Option<Tensor>, value: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(acc) => (acc + value)?,
        None => value,
    });
    Ok(())
}
