//! Gaussian blur of image batches: the blurred baseline of Integrated Gradients and the
//! insertion metric's starting image.

use crate::error::{ensure, Result};
use candle_core::{Tensor, D};

/// Blurs each channel of `x` (`N x C x H x W`) with a Gaussian of standard deviation `sigma`
/// pixels (kernel radius 3 sigma, edges replicated).
pub(crate) fn gaussian_blur(x: &Tensor, sigma: f64) -> Result<Tensor> {
    ensure(sigma > 0.0, || {
        format!("blur sigma must be positive, got {sigma}")
    })?;
    let (n, c, h, w) = x.dims4()?;
    let radius = ((3.0 * sigma).ceil() as usize).min(h.max(w) - 1).max(1);
    let taps: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f64 - radius as f64;
            (-(d * d) / (2.0 * sigma * sigma)).exp() as f32
        })
        .collect();
    let total: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / total).collect();
    let k = taps.len();
    let kernel = Tensor::from_vec(taps, k, x.device())?.to_dtype(x.dtype())?;
    let planes = x.reshape((n * c, 1, h, w))?;
    // Replicate the edges, then convolve rows and columns.
    let padded = planes
        .pad_with_same(D::Minus1, radius, radius)?
        .pad_with_same(D::Minus2, radius, radius)?;
    let rows = padded.conv2d(&kernel.reshape((1, 1, 1, k))?, 0, 1, 1, 1)?;
    let both = rows.conv2d(&kernel.reshape((1, 1, k, 1))?, 0, 1, 1, 1)?;
    Ok(both.reshape((n, c, h, w))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
