//! The saliency methods by name, each with its default post-processing, behind one `explain`.

use crate::error::{Error, Result};
use crate::postprocess::{PostProcess, Reduction};
use crate::{GradCam, Gradient, IntegratedGradients, Occlusion, Rise, SmoothGrad};
use candle_core::Tensor;
use vulnmap_models::Classifier;

/// A saliency method and its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Gradient(Gradient),
    SmoothGrad(SmoothGrad),
    IntegratedGradients(IntegratedGradients),
    GradCam(GradCam),
    Occlusion(Occlusion),
    Rise(Rise),
}

impl Method {
    /// The names the CLI and pipelines use, in that order.
    pub const NAMES: [&'static str; 6] = [
        "gradient",
        "smoothgrad",
        "integrated-gradients",
        "grad-cam",
        "occlusion",
        "rise",
    ];

    /// The method called `name`, with its default settings.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gradient" => Method::Gradient(Gradient::default()),
            "smoothgrad" => Method::SmoothGrad(SmoothGrad::default()),
            "integrated-gradients" => Method::IntegratedGradients(IntegratedGradients::default()),
            "grad-cam" => Method::GradCam(GradCam::default()),
            "occlusion" => Method::Occlusion(Occlusion::default()),
            "rise" => Method::Rise(Rise::default()),
            _ => {
                return Err(Error::InvalidParameter(format!(
                    "unknown saliency method `{name}`; known: {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }

    /// The method's name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Gradient(_) => "gradient",
            Method::SmoothGrad(_) => "smoothgrad",
            Method::IntegratedGradients(_) => "integrated-gradients",
            Method::GradCam(_) => "grad-cam",
            Method::Occlusion(_) => "occlusion",
            Method::Rise(_) => "rise",
        }
    }

    /// Sets the bound on images per forward/backward pass.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        match &mut self {
            Method::Gradient(m) => m.batch_size = batch_size,
            Method::SmoothGrad(m) => m.batch_size = batch_size,
            Method::IntegratedGradients(m) => m.batch_size = batch_size,
            Method::GradCam(m) => m.batch_size = batch_size,
            Method::Occlusion(m) => m.batch_size = batch_size,
            Method::Rise(m) => m.batch_size = batch_size,
        }
        self
    }

    /// Raw attributions (`N x C x H x W`, or `N x 1 x h x w` for Grad-CAM).
    pub fn attribute(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        targets: &[usize],
    ) -> Result<Tensor> {
        match self {
            Method::Gradient(m) => m.attribute(model, pixels, targets),
            Method::SmoothGrad(m) => m.attribute(model, pixels, targets),
            Method::IntegratedGradients(m) => m.attribute(model, pixels, targets),
            Method::GradCam(m) => m.attribute(model, pixels, targets),
            Method::Occlusion(m) => m.attribute(model, pixels, targets),
            Method::Rise(m) => m.attribute(model, pixels, targets),
        }
    }

    /// How this method's attributions become maps: channel sum of absolute values clipped at the
    /// 99th percentile for gradient methods; the positive part scaled by its maximum for the rest.
    pub fn postprocess(&self) -> PostProcess {
        match self {
            Method::Gradient(_) | Method::SmoothGrad(_) | Method::IntegratedGradients(_) => {
                PostProcess::default()
            }
            Method::GradCam(_) | Method::Occlusion(_) | Method::Rise(_) => PostProcess {
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
