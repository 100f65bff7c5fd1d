//! Occlusion (Zeiler and Fergus, 2014): how much the target logit drops when a window of the
//! image is replaced by a baseline value, averaged over the windows covering each pixel. The
//! same grid as the local attack, so the two maps compare pixel for pixel. Scored by the
//! target's log-odds instead ([`OcclusionScore::LogOdds`]), a window counts by how much it
//! separates the target from the other classes, not by what it adds to every class's logit.

use crate::error::Result;
use crate::grid::WindowGrid;
use crate::target::check_inputs;
use candle_core::Tensor;
use vulnmap_models::{log_odds, Classifier};

/// What occlusion measures a window's effect on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum OcclusionScore {
    /// The target's output, the logit unless the model is scored otherwise (Zeiler and Fergus's,
    /// Captum's).
    #[default]
    Output,
    /// The target's log-odds, `log(p / (1 - p))` from the model's logits: a window
    /// that lowers every class's logit alike moves it little, and where the model is sure the
    /// probability saturates but the log-odds keep ranking windows.
    LogOdds,
}

impl OcclusionScore {
    /// Each image's score of class `target` (`pixels` `B x C x H x W`): `B`.
    fn of(self, model: &dyn Classifier, pixels: &Tensor, target: usize) -> Result<Tensor> {
        Ok(match self {
            OcclusionScore::Output => model.forward(pixels)?.narrow(1, target, 1)?.squeeze(1)?,
            OcclusionScore::LogOdds => {
                // From the logits: the log-odds are the same whatever score the outputs are.
                let logits = model.logits(pixels)?;
                let targets = vec![target as u32; logits.dim(0)?];
                log_odds(&logits, &targets)?.to_dtype(logits.dtype())?
            }
        })
    }
}

/// What an occluded window shows instead of the image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OcclusionBaseline {
    /// A constant (0: black, Captum's default).
    Value(f32),
    /// The image blurred by a Gaussian of this many pixels: removes detail without drawing a
    /// new shape (a black square can itself look like a lesion, or an object).
    Blurred {
        /// The Gaussian's standard deviation, in pixels (positive).
        sigma: f64,
    },
}

impl OcclusionBaseline {
    /// What replaces each pixel of `pixels` (`N x C x H x W`) where a region is removed.
    pub(crate) fn fill(self, pixels: &Tensor) -> Result<Tensor> {
        Ok(match self {
            OcclusionBaseline::Value(v) => pixels.ones_like()?.affine(v as f64, 0.0)?,
            OcclusionBaseline::Blurred { sigma } => crate::blur::gaussian_blur(pixels, sigma)?,
        })
    }
}

/// Occlusion's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occlusion {
    /// Side of each square occluding window, in pixels (default 32); at most the image's sides.
    pub window: usize,
    /// Pixels between neighbouring windows (default 16); see [`WindowGrid`].
    pub stride: usize,
    /// What an occluded window shows (default black, `Value(0.0)`).
    pub baseline: OcclusionBaseline,
    /// What a window's effect is measured on (default the target's output).
    pub score: OcclusionScore,
    /// Occluded images per forward pass.
    pub batch_size: usize,
}

impl Default for Occlusion {
    fn default() -> Self {
        Self {
            window: 32,
            stride: 16,
            baseline: OcclusionBaseline::Value(0.0),
            score: OcclusionScore::Output,
            batch_size: 32,
        }
    }
}

impl Occlusion {
    /// The mean drop of the target's score per pixel, `N x 1 x H x W` (positive where occlusion
    /// hurts).
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        check_inputs(model, pixels, targets, self.batch_size)?;
        let (n, _, h, w) = pixels.dims4()?;
        let grid = WindowGrid::new(self.window, self.stride);
        let positions = grid.positions((h, w))?;
        let device = pixels.device();
        let dtype = pixels.dtype();
        let coverage =
            Tensor::from_vec(grid.coverage((h, w))?, (1, h, w), device)?.to_dtype(dtype)?;
        let fill = self.baseline.fill(pixels)?;
        let mut maps = Vec::with_capacity(n);
        for (i, &t) in targets.iter().enumerate().take(n) {
            let x = pixels.narrow(0, i, 1)?;
            let x_fill = fill.narrow(0, i, 1)?;
            let base = self.score.of(model, &x, t)?; // 1
            let mut total = Tensor::zeros((1, h, w), dtype, device)?;
            for chunk in positions.chunks(self.batch_size) {
                let masks: Vec<f32> = chunk.iter().flat_map(|&p| grid.mask((h, w), p)).collect();
                let masks =
                    Tensor::from_vec(masks, (chunk.len(), 1, h, w), device)?.to_dtype(dtype)?;
                // x * (1 - m) + fill * m
                let occluded = x
                    .broadcast_mul(&masks.affine(-1.0, 1.0)?)?
                    .broadcast_add(&masks.broadcast_mul(&x_fill)?)?;
                let scores = self.score.of(model, &occluded, t)?; // B
                let drops = base
                    .broadcast_sub(&scores)?
                    .reshape((chunk.len(), 1, 1, 1))?;
                total = (total + masks.broadcast_mul(&drops)?.sum(0)?)?;
            }
            maps.push(total.broadcast_div(&coverage)?);
        }
        Ok(Tensor::stack(&maps, 0)?)
    }
}
