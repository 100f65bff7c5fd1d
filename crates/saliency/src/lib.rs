//! Saliency methods and the metrics that judge them, for any [`vulnmap_models::Classifier`].
//!
//! ```no_run
//! use vulnmap_saliency::{Method, SmoothGrad};
//!
//! // `pixels`: N x 3 x H x W in [0, 1]; returns N x H x W maps in [0, 1].
//! fn smoothgrad_maps(
//!     model: &dyn vulnmap_models::Classifier,
//!     pixels: &candle_core::Tensor,
//! ) -> vulnmap_saliency::Result<candle_core::Tensor> {
//!     let targets = vulnmap_saliency::predicted_classes(model, pixels, 16)?;
//!     Method::SmoothGrad(SmoothGrad::authors()).explain(model, pixels, &targets)
//! }
//! ```
//!
//! Every method evaluates the model in batches of at most `batch_size` images, and random draws
//! are seeded, so batched and unbatched runs give the same maps.
//!
//! Modules:
//! - `gradient`: the vanilla input gradient (Simonyan et al.), input x gradient and guided
//!   backpropagation.
//! - `smoothgrad`: SmoothGrad, SmoothGrad-Squared and VarGrad; the paper's authors' preset.
//! - `integrated_gradients`: Integrated Gradients, black or blurred baseline, Riemann or
//!   Gauss-Legendre.
//! - `cam`: class activation maps on a named layer: Grad-CAM, Grad-CAM++, LayerCAM,
//!   Eigen-CAM, Score-CAM.
//! - `extremal`: extremal perturbation (Fong et al.): smooth area-constrained masks optimised
//!   on a blur pyramid, preserve, delete and dual games, batched over images and areas.
//! - `occlusion`: sliding-window occlusion on the local attack's grid.
//! - `rise`: RISE's random masks.
//! - `surrogate`: LIME and KernelSHAP, linear surrogates on superpixels.
//! - `method`: the methods by name with their default post-processing.
//! - `postprocess`: channel reduction, percentile clipping, scaling to [0, 1], resizing.
//! - [`metrics`]: deletion/insertion, pointing game, AUROC, IoU, sparseness, complexity,
//!   randomisation check.
//! - [`render`]: colour maps, overlays, PNG output.
//! - `grid`: the window grid shared with the local attack.
//! - `blur`: Gaussian blur (IG and occlusion baselines, insertion substrate), and within a
//!   field of view.
//! - `field_of_view`: the field of view of images framed by a black surround (fundus).
//! - `target`: predicted classes and input checks.
//!
//! Cargo features: none (CUDA comes through `vulnmap-models`).

mod blur;
mod cam;
mod error;
mod extremal;
mod field_of_view;
mod gradient;
mod grid;
mod integrated_gradients;
mod method;
pub mod metrics;
mod occlusion;
mod postprocess;
pub mod render;
mod rise;
mod smoothgrad;
mod surrogate;
mod target;

pub use blur::{Edges, GaussianBlur};
pub use cam::{Cam, CamRule};
pub use error::{Error, Result};
pub use extremal::{area_gap, ExtremalPerturbation, ExtremalReward, ExtremalVariant};
pub use field_of_view::{field_of_view, FIELD_OF_VIEW_THRESHOLD};
pub use gradient::{input_gradients, Gradient, GuidedBackprop, InputXGradient};
pub use grid::WindowGrid;
pub use integrated_gradients::{Baseline, BaselineKind, IntegratedGradients, Integration};
pub use method::Method;
pub use occlusion::{Occlusion, OcclusionBaseline, OcclusionScore};
pub use postprocess::{PostProcess, Reduction};
pub use rise::Rise;
pub use smoothgrad::{Aggregate, SmoothGrad};
pub use surrogate::{Surrogate, SurrogateKind};
pub use target::predicted_classes;
