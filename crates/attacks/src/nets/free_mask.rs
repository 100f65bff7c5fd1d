//! The authors' final mask: a free low-resolution mask (28 x 28 in their code) upsampled
//! bilinearly to the image, learned directly instead of predicted by a U-Net.
//!
//! Values are `sigmoid(logits)` so they stay in [0, 1] without clipping; logits start at 3
//! (mask 0.95, "on", as the authors' initialisation at ones). Upsampling is the differentiable
//! [`vulnmap_ops::resize::bilinear`] with `align_corners`, as their code. Optionally the
//! upsampled mask is smoothed by a Gaussian, as extremal perturbation draws smooth masks: a mask
//! can then keep blobs but not thin lines, whose maximum says little about where the evidence is.

use super::bank::{self, Placement};
use candle_core::{Result, Tensor, Var};
use vulnmap_ops::resize::bilinear;
use vulnmap_saliency::GaussianBlur;

/// A bank of free masks.
pub(crate) struct FreeMask {
    pub logits: Var,
    size: (usize, usize),
    /// Pixels the upsampled mask extends past each side of the image, so that it can be shifted
    /// (jittered) by up to this much and still cover the image; 0: no jitter.
    margin: usize,
    /// Sigma, in pixels, of the Gaussian smoothing the upsampled mask; 0: none.
    smooth: f64,
}

impl FreeMask {
    /// `entries` masks of `low` resolution, upsampled to `size` plus `margin` pixels on each side,
    /// smoothed by a Gaussian of sigma `smooth` pixels (0: not), starting at `init_logit`.
    pub(crate) fn new(
        entries: usize,
        low: (usize, usize),
        size: (usize, usize),
        init_logit: f64,
        margin: usize,
        smooth: f64,
        at: &Placement,
    ) -> Result<Self> {
        if low.0 == 0 || low.1 == 0 {
            candle_core::bail!("a free mask of {}x{} cells", low.0, low.1);
        }
        Ok(Self {
            logits: bank::constant(entries, &[1, low.0, low.1], init_logit, at)?,
            size,
            margin,
            smooth,
        })
    }

    /// The masks `B x 1 x H x W` in (0, 1), shifted by `shift` pixels (rows, columns; each in
    /// `-margin..=margin`).
    pub(crate) fn forward(&self, shift: (isize, isize)) -> Result<Tensor> {
        let (h, w) = self.size;
        let m = self.margin;
        let mut full = Self::upsample(self.logits.as_tensor(), (h + 2 * m, w + 2 * m))?;
        if self.smooth > 0.0 {
            full = GaussianBlur::full(self.smooth)
                .apply(&full)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        if m == 0 {
            return Ok(full);
        }
        let at = |s: isize| (m as isize + s.clamp(-(m as isize), m as isize)) as usize;
        full.narrow(2, at(shift.0), h)?.narrow(3, at(shift.1), w)
    }

    /// The margin shifts may use.
    pub(crate) fn margin(&self) -> usize {
        self.margin
    }

    /// The mask of given logits (`B x 1 x h x w`), upsampled to `size`.
    pub(crate) fn upsample(logits: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        bilinear(&candle_nn::ops::sigmoid(logits)?, size, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn starts_on_everywhere_and_gradients_match_finite_differences() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let mask = FreeMask::new(2, (7, 7), (28, 20), 3.0, 0, 0.0, &Placement::f32(&dev))?;
        let m = mask.forward((0, 0))?;
        assert_eq!(m.dims(), &[2, 1, 28, 20]);
        assert!((m.min_all()?.to_scalar::<f32>()? - 0.9526).abs() < 1e-3);
        let logits = Tensor::randn(0f64, 1.0, (2, 1, 4, 5), &dev)?.to_dtype(DType::F64)?;
        vulnmap_testkit::gradcheck::finite_difference_check(
            &logits,
            |l| FreeMask::upsample(l, (9, 11)),
            1e-6,
            1e-6,
        )?;
        Ok(())
    }

    #[test]
    fn smoothing_keeps_a_blob_above_a_thin_line_of_the_same_height() -> Result<()> {
        // 16 cells of 4 pixels: a line one cell wide down column 2 and a 3 x 3 block of cells,
        // both fully on (logit 8) on an off mask (logit -8).
        let dev = candle_core::Device::Cpu;
        let mut logits = vec![-8f32; 16 * 16];
        for row in 0..16 {
            logits[row * 16 + 2] = 8.0;
        }
        for row in 7..10 {
            for col in 9..12 {
                logits[row * 16 + col] = 8.0;
            }
        }
        let logits = Tensor::from_vec(logits, (1, 1, 16, 16), &dev)?;
        let at = Placement::f32(&dev);
        let peak = |smooth: f64| -> Result<(f32, f32)> {
            let mask = FreeMask::new(1, (16, 16), (64, 64), 0.0, 0, smooth, &at)?;
            mask.logits.set(&logits)?;
            let m = mask
                .forward((0, 0))?
                .squeeze(0)?
                .squeeze(0)?
                .to_vec2::<f32>()?;
            let line = m
                .iter()
                .flat_map(|row| &row[..24])
                .fold(0f32, |a, &b| a.max(b));
            Ok((line, m[34][42]))
        };
        // Unsmoothed both come close to 1; smoothed by one cell the line loses far more of its
        // height than the blob.
        let (line, blob) = peak(0.0)?;
        assert!(line > 0.9 && blob > 0.99, "{line} {blob}");
        let (line, blob) = peak(4.0)?;
        assert!(blob > 0.7 && line < 0.5, "line {line}, blob {blob}");
        Ok(())
    }

    #[test]
    fn a_shift_moves_the_mask_and_no_shift_is_the_centre() -> Result<()> {
        let dev = vulnmap_testkit::device();
        let mask = FreeMask::new(1, (3, 3), (12, 12), 0.0, 2, 0.0, &Placement::f32(&dev))?;
        let logits = Tensor::randn(0f32, 2.0, (1, 1, 3, 3), &dev)?;
        mask.logits.set(&logits)?;
        let full = FreeMask::upsample(&logits, (16, 16))?;
        let centre = mask.forward((0, 0))?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(diff(&centre, &full.narrow(2, 2, 12)?.narrow(3, 2, 12)?)? < 1e-6);
        let shifted = mask.forward((-1, 2))?;
        assert!(diff(&shifted, &full.narrow(2, 1, 12)?.narrow(3, 4, 12)?)? < 1e-6);
        // Shifts past the margin stop at it.
        let far = mask.forward((9, -9))?;
        assert!(diff(&far, &full.narrow(2, 4, 12)?.narrow(3, 0, 12)?)? < 1e-6);
        Ok(())
    }
}
