//! One path from raw attributions to maps: reduce the channels, keep the positive part if asked,
//! resize to the image, clip at a percentile and scale to [0, 1].

use crate::error::{ensure, Result};
use candle_core::Tensor;
use vulnmap_ops::resize::bilinear;

/// How channels become one value per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Sum of absolute values (SmoothGrad's authors, Captum's visualisation default).
    SumAbs,
    /// Largest absolute value (Simonyan et al.).
    MaxAbs,
    /// Plain sum, keeping the sign.
    Sum,
}

/// Raw attributions to `N x H x W` maps in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostProcess {
    /// How channels become one value per pixel (default the sum of absolute values).
    pub reduction: Reduction,
    /// Set negative values to zero after reducing (Grad-CAM, RISE, extremal perturbation, LIME).
    pub positive_only: bool,
    /// Values above this percentile of the map become 1 (99 as SmoothGrad's authors); `None`
    /// scales by the maximum.
    pub clip_percentile: Option<f64>,
}

impl Default for PostProcess {
    fn default() -> Self {
        Self {
            reduction: Reduction::SumAbs,
            positive_only: false,
            clip_percentile: Some(99.0),
        }
    }
}

impl PostProcess {
    /// Reduces `attributions` (`N x C x h x w`), resizes to `size` and scales each map so its
    /// minimum is 0 and its clip percentile (or maximum) is 1.
    pub fn apply(&self, attributions: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        if let Some(p) = self.clip_percentile {
            ensure((0.0..=100.0).contains(&p), || {
                format!("clip percentile must be in [0, 100], got {p}")
            })?;
        }
        let reduced = match self.reduction {
            Reduction::SumAbs => attributions.abs()?.sum_keepdim(1)?,
            Reduction::MaxAbs => attributions.abs()?.max_keepdim(1)?,
            Reduction::Sum => attributions.sum_keepdim(1)?,
        };
        let reduced = if self.positive_only {
            reduced.relu()?
        } else {
            reduced
        };
        let resized = bilinear(&reduced, size, false)?.squeeze(1)?;
        let n = resized.dim(0)?;
        let mut maps = Vec::with_capacity(n);
        for i in 0..n {
            maps.push(self.scale(&resized.get(i)?)?);
        }
        Ok(Tensor::stack(&maps, 0)?)
    }

    fn scale(&self, map: &Tensor) -> Result<Tensor> {
        let mut values = map
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        values.sort_by(f32::total_cmp);
        let lo = values.first().copied().unwrap_or(0.0) as f64;
        let hi = match self.clip_percentile {
            Some(p) => percentile(&values, p) as f64,
            None => values.last().copied().unwrap_or(0.0) as f64,
        };
        if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            return Ok(map.zeros_like()?);
        }
        Ok(map
            .affine(1.0 / (hi - lo), -lo / (hi - lo))?
            .clamp(0.0, 1.0)?)
    }
}

/// The `p`-th percentile of sorted `values`, interpolating linearly (numpy's default).
pub(crate) fn percentile(sorted: &[f32], p: f64) -> f32 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let t = (pos - lo as f64) as f32;
    sorted[lo] + (sorted[hi] - sorted[lo]) * t
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn percentile_matches_numpy() {
        let v: Vec<f32> = (0..=100).map(|i| i as f32).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
    }

    #[test]
    fn maps_are_in_unit_range_with_clipping() {
        let v: Vec<f32> = (0..200).map(|i| i as f32 - 50.0).collect();
        let a = Tensor::from_vec(v, (1, 2, 10, 10), &Device::Cpu).unwrap();
        let m = PostProcess::default().apply(&a, (10, 10)).unwrap();
        assert_eq!(m.dims(), &[1, 10, 10]);
        let flat = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(flat.iter().all(|&x| (0.0..=1.0).contains(&x)));
        assert_eq!(
            flat.iter().filter(|&&x| x == 1.0).count(),
            1,
            "only values above p99 clip"
        );
        let zeros = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let m = PostProcess::default().apply(&zeros, (8, 8)).unwrap();
        assert_eq!(m.dims(), &[1, 8, 8]);
        assert_eq!(m.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
