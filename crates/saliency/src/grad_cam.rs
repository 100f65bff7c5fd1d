//! Grad-CAM (Selvaraju et al., 2017): a layer's feature maps weighted by the spatial mean of the
//! target's gradient with respect to them, then rectified.

use crate::error::Result;
use crate::target::check_inputs;
use candle_core::{Tensor, Var};
use vulnmap_models::Classifier;

/// Grad-CAM's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradCam {
    /// The layer (see [`Classifier::layers`]); `None` is the model's default, the last
    /// convolutional stage (`layer4` for ResNets, as pytorch-grad-cam recommends).
    pub layer: Option<String>,
    /// Images per forward/backward pass (at least 1; default 16); bounds memory, not the result.
    pub batch_size: usize,
}

impl Default for GradCam {
    fn default() -> Self {
        Self {
            layer: None,
            batch_size: 16,
        }
    }
}

impl GradCam {
    /// Class activation maps `N x 1 x h x w` at the layer's resolution, rectified.
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        check_inputs(model, pixels, targets, self.batch_size)?;
        let layer = self.layer.clone().unwrap_or_else(|| model.default_layer());
        let n = pixels.dim(0)?;
        let mut maps = Vec::new();
        for start in (0..n).step_by(self.batch_size) {
            let len = self.batch_size.min(n - start);
            let features = model.features(&pixels.narrow(0, start, len)?, &layer)?;
            let a = Var::from_tensor(&features.detach())?;
            let logits = model.forward_from(a.as_tensor(), &layer)?;
            let t: Vec<u32> = targets[start..start + len]
                .iter()
                .map(|&t| t as u32)
                .collect();
            let index = Tensor::from_slice(&t, (len, 1), logits.device())?;
            let grads = logits.gather(&index, 1)?.sum_all()?.backward()?;
            let g = grads.get(a.as_tensor()).ok_or_else(|| {
                candle_core::Error::Msg(format!("no gradient reached layer {layer}"))
            })?;
            let weights = g.mean_keepdim((2, 3))?; // N x K x 1 x 1
            maps.push(
                a.as_tensor()
                    .broadcast_mul(&weights)?
                    .sum_keepdim(1)?
                    .relu()?,
            );
        }
        Ok(Tensor::cat(&maps, 0)?)
    }
}
