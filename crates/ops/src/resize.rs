//! Bilinear resizing of `N x C x H x W` tensors as two matrix products, so it is differentiable
//! (candle's `upsample_bilinear2d` has no backward pass) and runs on every device.
//!
//! The interpolation follows PyTorch's `F.interpolate(mode="bilinear", antialias=False)` with or
//! without `align_corners`.

use candle_core::{DType, Device, Result, Tensor};

/// The `out x len` matrix that resamples a length-`len` signal to `out` samples.
fn interpolation_matrix(len: usize, out: usize, align_corners: bool) -> Vec<f32> {
    let mut m = vec![0f32; out * len];
    for i in 0..out {
        let src = if align_corners {
            if out > 1 {
                i as f64 * (len as f64 - 1.0) / (out as f64 - 1.0)
            } else {
                0.0
            }
        } else {
            ((i as f64 + 0.5) * len as f64 / out as f64 - 0.5).max(0.0)
        };
        let lo = (src.floor() as usize).min(len - 1);
        let hi = (lo + 1).min(len - 1);
        let t = (src - lo as f64) as f32;
        m[i * len + lo] += 1.0 - t;
        m[i * len + hi] += t;
    }
    m
}

fn matrix(
    len: usize,
    out: usize,
    align_corners: bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(
        interpolation_matrix(len, out, align_corners),
        (out, len),
        device,
    )?
    .to_dtype(dtype)
}

/// Resizes the last two dimensions of `x` (`N x C x H x W`) to `size` (height, width).
pub fn bilinear(x: &Tensor, size: (usize, usize), align_corners: bool) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) == size {
        return Ok(x.clone());
    }
    if h == 0 || w == 0 || size.0 == 0 || size.1 == 0 {
        candle_core::bail!("cannot resize {h}x{w} to {}x{}", size.0, size.1);
    }
    let (dtype, device) = (x.dtype(), x.device());
    let rows = matrix(h, size.0, align_corners, dtype, device)?; // H' x H
    let cols = matrix(w, size.1, align_corners, dtype, device)?.t()?; // W x W'
                                                                      // (N C H) x W . W x W' -> N C H W', then rows: H' x H . (H x W') per image-channel.
    let y = x
        .reshape((n * c * h, w))?
        .matmul(&cols)?
        .reshape((n * c, h, size.1))?;
    let y = rows.broadcast_matmul(&y)?;
    y.reshape((n, c, size.0, size.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vulnmap_testkit::gradcheck::finite_difference_check;

    #[test]
    fn matches_pytorch_reference_values() -> Result<()> {
        // torch.nn.functional.interpolate(torch.arange(6.).view(1,1,2,3), size=(3,4), mode="bilinear",
        // align_corners=False) and align_corners=True.
        let x = Tensor::arange(0f32, 6.0, &vulnmap_testkit::device())?.reshape((1, 1, 2, 3))?;
        let got = bilinear(&x, (3, 4), false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = [
            0.0, 0.625, 1.375, 2.0, 1.5, 2.125, 2.875, 3.5, 3.0, 3.625, 4.375, 5.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        let got = bilinear(&x, (3, 4), true)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = [
            0.0, 0.6666667, 1.3333334, 2.0, 1.5, 2.1666667, 2.8333333, 3.5, 3.0, 3.6666667,
            4.3333335, 5.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // Downsampling 4 x 5 to 3 x 2 (no antialiasing, as PyTorch's default).
        let y = Tensor::arange(0f32, 20.0, &vulnmap_testkit::device())?.reshape((1, 1, 4, 5))?;
        let got = bilinear(&y, (3, 2), false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = [1.5833334, 4.0833335, 8.25, 10.75, 14.916668, 17.416668];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let x = Tensor::randn(0f64, 1.0, (2, 2, 4, 5), &vulnmap_testkit::device())?;
        for align in [false, true] {
            finite_difference_check(&x, |x| bilinear(x, (9, 7), align), 1e-6, 1e-8)?;
            finite_difference_check(&x, |x| bilinear(x, (3, 2), align), 1e-6, 1e-8)?;
        }
        Ok(())
    }
}
