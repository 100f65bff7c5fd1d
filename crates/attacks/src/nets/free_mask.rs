//! The authors' final mask: a free low-resolution mask (28 x 28 in their code) upsampled
//! bilinearly to the image, learned directly instead of predicted by a U-Net.
//!
//! Values are `sigmoid(logits)` so they stay in [0, 1] without clipping; logits start at 3
//! (mask 0.95, "on", as the authors' initialisation at ones). Upsampling is the differentiable
//! [`vulnmap_ops::resize::bilinear`] with `align_corners`, as their code.

use super::bank::{self, Placement};
use candle_core::{Result, Tensor, Var};
use vulnmap_ops::resize::bilinear;

/// A bank of free masks.
pub(crate) struct FreeMask {
    pub logits: Var,
    size: (usize, usize),
}

impl FreeMask {
    /// `entries` masks of `low` resolution, upsampled to `size`, starting at `init_logit`.
    pub(crate) fn new(
        entries: usize,
        low: (usize, usize),
        size: (usize, usize),
        init_logit: f64,
        at: &Placement,
    ) -> Result<Self> {
        if low.0 == 0 || low.1 == 0 {
            candle_core::bail!("a free mask of {}x{} cells", low.0, low.1);
        }
        Ok(Self {
            logits: bank::constant(entries, &[1, low.0, low.1], init_logit, at)?,
            size,
        })
    }

    /// The masks `B x 1 x H x W` in (0, 1).
    pub(crate) fn forward(&self) -> Result<Tensor> {
        Self::upsample(self.logits.as_tensor(), self.size)
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
        let mask = FreeMask::new(2, (7, 7), (28, 20), 3.0, &Placement::f32(&dev))?;
        let m = mask.forward()?;
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
}
