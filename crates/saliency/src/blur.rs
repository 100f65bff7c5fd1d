//! Gaussian blur of image batches: the blurred baseline of Integrated Gradients and occlusion,
//! and the insertion metric's starting image (RISE's 11-tap kernel with reflected edges); a blur
//! within a field of view, for images framed by a black surround.

use crate::error::{ensure, Result};
use candle_core::{Tensor, D};
use vulnmap_ops::separable::{correlate, Along};

/// What a blur reads past the image's edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Edges {
    /// The edge pixel, repeated.
    #[default]
    Replicate,
    /// The image mirrored about its edge pixel (`c b | a b c`), as PyTorch's `reflect` padding
    /// and torchvision's `gaussian_blur`.
    Reflect,
    /// Zeros beyond the edge, as TorchRay's `imsmooth`.
    Zero,
}

/// A separable Gaussian blur of each channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianBlur {
    /// Standard deviation, in pixels.
    pub sigma: f64,
    /// Kernel taps (odd); `None`: `2 ceil(3 sigma) + 1`, the Gaussian's whole support.
    pub taps: Option<usize>,
    /// What the kernel reads past the edges.
    pub edges: Edges,
}

impl GaussianBlur {
    /// The insertion metric's substrate in RISE's protocol: 11 taps of sigma 5, reflected edges
    /// (torchvision's `gaussian_blur(x, 11, 5)`).
    pub fn rise() -> Self {
        Self {
            sigma: 5.0,
            taps: Some(11),
            edges: Edges::Reflect,
        }
    }

    /// The whole Gaussian of `sigma`, edges replicated: vulnmap's blurred baselines.
    pub fn full(sigma: f64) -> Self {
        Self {
            sigma,
            taps: None,
            edges: Edges::Replicate,
        }
    }

    /// Blurs each channel of `x` (`N x C x H x W`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let sigma = self.sigma;
        ensure(sigma > 0.0 && sigma.is_finite(), || {
            format!("blur sigma must be positive, got {sigma}")
        })?;
        let (n, c, h, w) = x.dims4()?;
        let radius = match self.taps {
            Some(taps) => {
                ensure(taps % 2 == 1, || {
                    format!("a blur kernel has an odd number of taps, got {taps}")
                })?;
                taps / 2
            }
            None => ((3.0 * sigma).ceil() as usize).min(h.max(w) - 1).max(1),
        };
        let taps: Vec<f32> = (0..=2 * radius)
            .map(|i| {
                let d = i as f64 - radius as f64;
                (-(d * d) / (2.0 * sigma * sigma)).exp() as f32
            })
            .collect();
        let total: f32 = taps.iter().sum();
        let taps: Vec<f64> = taps.iter().map(|t| f64::from(t / total)).collect();
        let k = taps.len();
        let planes = x.reshape((n * c, 1, h, w))?;
        let padded = match self.edges {
            Edges::Replicate => planes
                .pad_with_same(D::Minus1, radius, radius)?
                .pad_with_same(D::Minus2, radius, radius)?,
            Edges::Zero => planes
                .pad_with_zeros(D::Minus1, radius, radius)?
                .pad_with_zeros(D::Minus2, radius, radius)?,
            Edges::Reflect => {
                ensure(radius < h && radius < w, || {
                    format!("a {k}-tap reflected blur needs an image larger than {radius} pixels on each side, got {h}x{w}")
                })?;
                reflect(&reflect(&planes, 3, radius)?, 2, radius)?
            }
        };
        let rows = correlate(&padded, &taps, Along::Rows)?;
        let both = correlate(&rows, &taps, Along::Columns)?;
        Ok(both.reshape((n, c, h, w))?)
    }

    /// Blurs each channel of `x` (`N x C x H x W`) within `inside` (`N x 1 x H x W`, 1 in view
    /// and 0 outside, as [`crate::field_of_view`] finds it): the blur of `x * inside` over the
    /// blur of `inside` (a normalised convolution), so nothing outside leaks in; outside, `x` is
    /// kept. Where everything is inside, this is [`GaussianBlur::apply`].
    pub fn apply_within(&self, x: &Tensor, inside: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        ensure(inside.dims() == [n, 1, h, w], || {
            format!(
                "a field of view of shape {:?} for images of shape {:?}",
                inside.dims(),
                x.dims()
            )
        })?;
        let inside = inside.to_dtype(x.dtype())?;
        let weight = self.apply(&inside)?;
        // Inside the view the weight is at least the Gaussian's share of its own pixel.
        let blurred = self
            .apply(&x.broadcast_mul(&inside)?)?
            .broadcast_div(&weight.clamp(1e-6, f64::MAX)?)?;
        let outside = inside.affine(-1.0, 1.0)?;
        Ok((blurred.broadcast_mul(&inside)? + x.broadcast_mul(&outside)?)?)
    }
}

/// `x` padded by `radius` on both sides of `dim`, mirrored about the edge pixels.
fn reflect(x: &Tensor, dim: usize, radius: usize) -> Result<Tensor> {
    let n = x.dim(dim)? as i64;
    let r = radius as i64;
    let index: Vec<u32> = (-r..n + r)
        .map(|p| {
            let q = if p < 0 {
                -p
            } else if p >= n {
                2 * (n - 1) - p
            } else {
                p
            };
            q as u32
        })
        .collect();
    let len = index.len();
    let index = Tensor::from_vec(index, len, x.device())?;
    Ok(x.index_select(&index, dim)?)
}

/// Blurs each channel of `x` (`N x C x H x W`) with the whole Gaussian of standard deviation
/// `sigma` pixels, edges replicated ([`GaussianBlur::full`]).
pub(crate) fn gaussian_blur(x: &Tensor, sigma: f64) -> Result<Tensor> {
    GaussianBlur::full(sigma).apply(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn blur_keeps_constants_and_mass_and_spreads_a_point() {
        let flat = Tensor::full(0.3f32, (1, 3, 9, 9), &Device::Cpu).unwrap();
        let out = gaussian_blur(&flat, 2.0).unwrap();
        let d = (out - &flat)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
        let mut v = vec![0f32; 81];
        v[40] = 1.0;
        let point = Tensor::from_vec(v, (1, 1, 9, 9), &Device::Cpu).unwrap();
        let out = gaussian_blur(&point, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(out[40] < 0.2 && out[40] > out[41] && out[41] > out[42] && out[41] == out[39]);
        assert!(gaussian_blur(&point, 0.0).is_err());
    }

    #[test]
    fn a_blur_within_a_view_keeps_the_surround_out_and_the_outside_unchanged() -> Result<()> {
        // A 1 x 12 row: a black surround on the left (columns 0-3), a constant 0.8 in view.
        let row: Vec<f32> = (0..12).map(|i| if i < 4 { 0.0 } else { 0.8 }).collect();
        let x = Tensor::from_vec(row, (1, 1, 1, 12), &Device::Cpu)?.repeat((1, 3, 5, 1))?;
        let view: Vec<f32> = (0..12).map(|i| if i < 4 { 0.0 } else { 1.0 }).collect();
        let view = Tensor::from_vec(view, (1, 1, 1, 12), &Device::Cpu)?.repeat((1, 1, 5, 1))?;
        let blur = GaussianBlur::full(2.0);
        let within = blur
            .apply_within(&x, &view)?
            .get(0)?
            .get(1)?
            .get(2)?
            .to_vec1::<f32>()?;
        for (i, v) in within.iter().enumerate() {
            let want = if i < 4 { 0.0 } else { 0.8 };
            assert!((v - want).abs() < 1e-5, "{i}: {v} against {want}");
        }
        // The plain blur darkens the rim of the view with the surround.
        let plain = blur.apply(&x)?.get(0)?.get(1)?.get(2)?.to_vec1::<f32>()?;
        assert!(plain[4] < 0.6 && plain[3] > 0.2);
        // Everything in view: the plain blur.
        let all = Tensor::ones((1, 1, 5, 12), DType::F32, &Device::Cpu)?;
        let ramp = Tensor::arange(0f32, 60.0, &Device::Cpu)?.reshape((1, 1, 5, 12))?;
        let gap = (blur.apply_within(&ramp, &all)? - blur.apply(&ramp)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(gap < 1e-4, "{gap}");
        let wrong = Tensor::ones((1, 1, 4, 12), DType::F32, &Device::Cpu)?;
        assert!(blur.apply_within(&x, &wrong).is_err());
        Ok(())
    }

    #[test]
    fn the_rise_blur_is_torchvisions_eleven_tap_reflected_gaussian() {
        // torchvision.transforms.functional.gaussian_blur(x, 11, 5) of a 1 x 12 ramp, by hand:
        // 1-D taps exp(-d^2 / 50) / sum for d = -5..5, the row mirrored about its ends.
        let ramp: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let x = Tensor::from_vec(ramp.clone(), (1, 1, 1, 12), &Device::Cpu).unwrap();
        let x = x.repeat((1, 1, 6, 1)).unwrap();
        let out = GaussianBlur::rise()
            .apply(&x)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(3)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let taps: Vec<f64> = (-5..=5).map(|d| (-(d * d) as f64 / 50.0).exp()).collect();
        let total: f64 = taps.iter().sum();
        for (i, &got) in out.iter().enumerate() {
            let want: f64 = (-5i64..=5)
                .zip(&taps)
                .map(|(d, t)| {
                    let p = i as i64 + d;
                    let q = if p < 0 {
                        -p
                    } else if p > 11 {
                        22 - p
                    } else {
                        p
                    };
                    t * q as f64
                })
                .sum::<f64>()
                / total;
            assert!((got as f64 - want).abs() < 1e-5, "{i}: {got} vs {want}");
        }
        // Interior pixels of a ramp stay put (the kernel is symmetric); edges do not.
        assert!((out[6] - 6.0).abs() < 1e-5 && out[0] > 0.5);
        let tiny = Tensor::zeros((1, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(GaussianBlur::rise().apply(&tiny).is_err());
        let even = GaussianBlur {
            taps: Some(10),
            ..GaussianBlur::rise()
        };
        assert!(even.apply(&x).is_err());
    }
}
