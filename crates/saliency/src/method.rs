//! The saliency methods by name, each with its default post-processing, behind one `explain`.

use crate::error::Result;
use crate::postprocess::{PostProcess, Reduction};
use crate::{
    Cam, ExtremalPerturbation, Gradient, GuidedBackprop, InputXGradient, IntegratedGradients,
    Occlusion, Rise, SmoothGrad, Surrogate,
};
use candle_core::Tensor;
use vulnmap_models::Classifier;

/// A saliency method and its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// The vanilla gradient (Simonyan et al., 2014).
    Gradient(Gradient),
    /// Input x gradient (Shrikumar et al., 2016).
    InputXGradient(InputXGradient),
    /// Guided backpropagation (Springenberg et al., 2015).
    GuidedBackprop(GuidedBackprop),
    /// SmoothGrad (Smilkov et al., 2017): gradients averaged over noisy copies.
    SmoothGrad(SmoothGrad),
    /// Integrated Gradients (Sundararajan et al., 2017): gradients along a path from a baseline.
    IntegratedGradients(IntegratedGradients),
    /// A class activation map (Grad-CAM, Grad-CAM++, LayerCAM, Eigen-CAM, Score-CAM): a layer's
    /// feature maps, weighted by the rule.
    Cam(Cam),
    /// Extremal perturbation (Fong et al., 2019): smooth masks of given areas that keep (or
    /// delete) the target's score on a blurred background; the masks summed over the areas.
    ExtremalPerturbation(ExtremalPerturbation),
    /// Occlusion (Zeiler and Fergus, 2014): the drop of the target's logit (or log-odds) when
    /// windows are covered.
    Occlusion(Occlusion),
    /// RISE (Petsiuk et al., 2018): the target probability through random smooth masks.
    Rise(Rise),
    /// LIME or KernelSHAP: a weighted linear surrogate on superpixels.
    Surrogate(Surrogate),
}

impl Method {
    /// The method's name in file names and messages (as `vulnmap explain --method` spells it).
    pub fn name(&self) -> &'static str {
        match self {
            Method::Gradient(_) => "gradient",
            Method::InputXGradient(_) => "input-x-gradient",
            Method::GuidedBackprop(_) => "guided-backprop",
            Method::SmoothGrad(_) => "smoothgrad",
            Method::IntegratedGradients(_) => "integrated-gradients",
            Method::Cam(m) => m.rule.name(),
            Method::ExtremalPerturbation(_) => "extremal-perturbation",
            Method::Occlusion(_) => "occlusion",
            Method::Rise(_) => "rise",
            Method::Surrogate(m) => m.name(),
        }
    }

    /// Sets the bound on images per forward/backward pass.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        match &mut self {
            Method::Gradient(m) => m.batch_size = batch_size,
            Method::InputXGradient(m) => m.batch_size = batch_size,
            Method::GuidedBackprop(m) => m.batch_size = batch_size,
            Method::SmoothGrad(m) => m.batch_size = batch_size,
            Method::IntegratedGradients(m) => m.batch_size = batch_size,
            Method::Cam(m) => m.batch_size = batch_size,
            Method::ExtremalPerturbation(m) => m.batch_size = batch_size,
            Method::Occlusion(m) => m.batch_size = batch_size,
            Method::Rise(m) => m.batch_size = batch_size,
            Method::Surrogate(m) => m.batch_size = batch_size,
        }
        self
    }

    /// Raw attributions (`N x C x H x W`, or `N x 1 x h x w` for class activation maps).
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        match self {
            Method::Gradient(m) => m.attribute(model, pixels, targets),
            Method::InputXGradient(m) => m.attribute(model, pixels, targets),
            Method::GuidedBackprop(m) => m.attribute(model, pixels, targets),
            Method::SmoothGrad(m) => m.attribute(model, pixels, targets),
            Method::IntegratedGradients(m) => m.attribute(model, pixels, targets),
            Method::Cam(m) => m.attribute(model, pixels, targets),
            Method::ExtremalPerturbation(m) => m.attribute(model, pixels, targets),
            Method::Occlusion(m) => m.attribute(model, pixels, targets),
            Method::Rise(m) => m.attribute(model, pixels, targets),
            Method::Surrogate(m) => m.attribute(model, pixels, targets),
        }
    }

    /// How this method's attributions become maps: channel sum of absolute values clipped at the
    /// 99th percentile for gradient methods; occlusion's signed drops scaled from their minimum
    /// to their maximum; the positive part scaled by its maximum for the rest.
    pub fn postprocess(&self) -> PostProcess {
        match self {
            Method::Gradient(_)
            | Method::InputXGradient(_)
            | Method::GuidedBackprop(_)
            | Method::SmoothGrad(_)
            | Method::IntegratedGradients(_) => PostProcess::default(),
            // A window whose occlusion raises the score ranks below one that does nothing: the
            // causal metrics delete and insert pixels in the map's order, and a positive part
            // would leave most windows tied at 0, ordered by position.
            Method::Occlusion(_) => PostProcess {
                reduction: Reduction::Sum,
                positive_only: false,
                clip_percentile: None,
            },
            Method::Cam(_)
            | Method::ExtremalPerturbation(_)
            | Method::Rise(_)
            | Method::Surrogate(_) => PostProcess {
                reduction: Reduction::Sum,
                positive_only: true,
                clip_percentile: None,
            },
        }
    }

    /// Saliency maps `N x H x W` in [0, 1], at the images' size.
    pub fn explain(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        let (_, _, h, w) = pixels.dims4()?;
        let attributions = self.attribute(model, pixels, targets)?;
        self.postprocess().apply(&attributions, (h, w))
    }
}
