//! The vanilla gradient (Simonyan et al., 2014): how each pixel moves the target logit; input x
//! gradient, the gradient times the pixel; and guided backpropagation (Springenberg et al.,
//! 2015), the gradient with only positive gradients passed back through every rectifier.

use crate::error::Result;
use crate::target::check_inputs;
use candle_core::{Tensor, Var};
use vulnmap_models::Classifier;

/// The gradient of each image's target logit with respect to its pixels (`N x C x H x W`),
/// `batch_size` images per backward pass.
pub fn input_gradients(
    model: &dyn Classifier,
    pixels: &Tensor,
    targets: &[usize],
    batch_size: usize,
) -> Result<Tensor> {
    check_inputs(model, pixels, targets, batch_size)?;
    let n = pixels.dim(0)?;
    let mut grads = Vec::with_capacity(n.div_ceil(batch_size));
    for start in (0..n).step_by(batch_size) {
        let len = batch_size.min(n - start);
        let chunk_targets: Vec<u32> = targets[start..start + len]
            .iter()
            .map(|&t| t as u32)
            .collect();
        grads.push(batch_gradient(
            model,
            pixels.narrow(0, start, len)?,
            &chunk_targets,
        )?);
    }
    Ok(Tensor::cat(&grads, 0)?)
}

/// One backward pass: the gradient of the sum of the images' target logits (images do not
/// interact in eval mode, so each image gets its own gradient).
pub(crate) fn batch_gradient(
    model: &dyn Classifier,
    pixels: Tensor,
    targets: &[u32],
) -> Result<Tensor> {
    let x = Var::from_tensor(&pixels.detach())?;
    // The variable is a copy: a batch built for this pass is freed here, not held beside it.
    drop(pixels);
    let logits = model.forward(x.as_tensor())?;
    let index = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
    let selected = logits.gather(&index, 1)?;
    let grads = selected.sum_all()?.backward()?;
    let grad = grads.get(x.as_tensor()).ok_or_else(|| {
        candle_core::Error::Msg(format!("{} gave no gradient for its input", model.arch()))
    })?;
    Ok(grad.clone())
}

/// Settings of the vanilla gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gradient {
    /// Images per backward pass (at least 1; default 16); bounds memory, not the result.
    pub batch_size: usize,
}

impl Default for Gradient {
    fn default() -> Self {
        Self { batch_size: 16 }
    }
}

impl Gradient {
    /// The gradient of each image's target logit with respect to its pixels (`N x C x H x W`).
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        input_gradients(model, pixels, targets, self.batch_size)
    }
}

/// Input x gradient (Shrikumar et al., 2016; Captum's `InputXGradient`): each pixel times the
/// gradient of the target logit with respect to it. vulnmap's inputs are pixels in [0, 1] (the
/// model normalises inside), so this is pixels x gradient; Captum's is the normalised input x
/// its gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputXGradient {
    /// Images per backward pass (at least 1; default 16); bounds memory, not the result.
    pub batch_size: usize,
}

impl Default for InputXGradient {
    fn default() -> Self {
        Self { batch_size: 16 }
    }
}

impl InputXGradient {
    /// `pixels * d logit_target / d pixels` (`N x C x H x W`).
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        let grads = input_gradients(model, pixels, targets, self.batch_size)?;
        Ok((grads * pixels)?)
    }
}

/// Guided backpropagation (Springenberg et al., 2015; Captum's `GuidedBackprop`): the input
/// gradient of the target logit when every ReLU passes back only positive gradients. Adebayo
/// et al. (2018) showed its maps barely change when the network's weights are randomised: it
/// fails the model-parameter randomisation check, which is why it is offered, next to the
/// gradient, for that comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuidedBackprop {
    /// Images per backward pass (at least 1; default 16); bounds memory, not the result.
    pub batch_size: usize,
}

impl Default for GuidedBackprop {
    fn default() -> Self {
        Self { batch_size: 16 }
    }
}

impl GuidedBackprop {
    /// The guided gradient (`N x C x H x W`); an error for a model without guided rectifiers.
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        let guided = model.guided().ok_or_else(|| {
            crate::error::Error::InvalidParameter(format!(
                "{} has no guided-backpropagation variant (its rectifiers are not vulnmap's own)",
                model.arch()
            ))
        })?;
        input_gradients(guided.as_ref(), pixels, targets, self.batch_size)
    }
}
