//! The `Classifier` contract every attack and saliency method is written against.
//!
//! Pixels go in as f32 `N x C x H x W` in [0, 1]; normalisation lives inside the model, never in
//! the caller, so an attack's alpha is always in pixel units.

use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// The mean and standard deviation of ImageNet pixels, used by torchvision and timm models.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What a classifier expects of its input.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// The height the model was trained at (ResNets and EfficientNets accept other sizes too).
    pub height: usize,
    /// The width the model was trained at.
    pub width: usize,
    /// Colour channels; grey images are repeated to three for ImageNet models.
    pub channels: usize,
    /// Per-channel value subtracted from [0, 1] pixels inside the model.
    pub mean: [f32; 3],
    /// Per-channel divisor applied after subtracting `mean`.
    pub std: [f32; 3],
}

impl InputSpec {
    /// torchvision's convention: 224 x 224 RGB, ImageNet mean and std.
    pub fn imagenet(size: usize) -> Self {
        Self {
            height: size,
            width: size,
            channels: 3,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// TensorFlow's EfficientNet-Lite convention: `(x - 127/255) / (128/255)`.
    pub fn tf_lite(size: usize) -> Self {
        Self {
            height: size,
            width: size,
            channels: 3,
            mean: [127.0 / 255.0; 3],
            std: [128.0 / 255.0; 3],
        }
    }

    /// Checks that `pixels` is `N x C x H x W` with this spec's channels and normalises it,
    /// converting to `dtype`. Differentiable, so gradients reach the pixels.
    pub fn normalize(&self, pixels: &Tensor, dtype: DType) -> Result<Tensor> {
        let dims = pixels.dims();
        if dims.len() != 4 || dims[1] != self.channels {
            candle_core::bail!(
                "expected pixels of shape (N, {}, H, W) in [0, 1], got {:?}",
                self.channels,
                dims
            );
        }
        let device = pixels.device();
        let c = self.channels;
        let mean = Tensor::from_slice(&self.mean[..c], (1, c, 1, 1), device)?.to_dtype(dtype)?;
        let std = Tensor::from_slice(&self.std[..c], (1, c, 1, 1), device)?.to_dtype(dtype)?;
        pixels
            .to_dtype(dtype)?
            .broadcast_sub(&mean)?
            .broadcast_div(&std)
    }
}

/// The names of a classifier's output classes, in logit order.
#[derive(Debug, Clone, PartialEq)]
pub struct Classes(Arc<[String]>);

impl Classes {
    /// Classes with the given names.
    pub fn new(names: Vec<String>) -> Self {
        Self(names.into())
    }

    /// The 1000 ImageNet-1k classes, in the order of torchvision's and timm's heads.
    pub fn imagenet() -> Self {
        Self::new(crate::imagenet::class_names())
    }

    /// ImageNet's names for a 1000-class head, numbered names for any other size.
    pub fn for_head(num_classes: usize) -> Self {
        if num_classes == 1000 {
            Self::imagenet()
        } else {
            Self::numbered(num_classes)
        }
    }

    /// `n` classes named `class 0`, `class 1`, ... for heads without names.
    pub fn numbered(n: usize) -> Self {
        Self::new((0..n).map(|i| format!("class {i}")).collect())
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of class `index`, if there is one.
    pub fn name(&self, index: usize) -> Option<&str> {
        self.0.get(index).map(String::as_str)
    }

    /// All names in logit order.
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

/// An image classifier whose input gradient attacks and saliency methods can follow.
///
/// Implementations keep their weights as constants unless built for training, so a backward pass
/// from the logits reaches the pixels without computing weight gradients.
pub trait Classifier: Send + Sync {
    /// The architecture's name, as the CLI spells it (`resnet50`, `efficientnet-lite0`, ...).
    fn arch(&self) -> &str;

    /// Input size, channels and normalisation.
    fn input_spec(&self) -> &InputSpec;

    /// The output classes.
    fn classes(&self) -> &Classes;

    /// The number of output classes (logits per image).
    fn num_classes(&self) -> usize {
        self.classes().len()
    }

    /// The device the weights live on; inputs must be on it too.
    fn device(&self) -> &Device;

    /// The dtype computations run in.
    fn dtype(&self) -> DType;

    /// Logits (`N x classes`) from pixels in [0, 1]. `train` selects BatchNorm batch statistics
    /// (and updates the running statistics), as in PyTorch's `model.train()`.
    fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor>;

    /// Logits in evaluation mode.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.forward_t(pixels, false)
    }

    /// The logits in evaluation mode even where the outputs are another score of them (a
    /// [`ScoredClassifier`]'s): what probabilities, labels and an attack's loss are computed
    /// from, whichever score the maps explain. Differentiable.
    fn logits(&self, pixels: &Tensor) -> Result<Tensor> {
        self.forward(pixels)
    }

    /// Names of the layers whose outputs [`Classifier::features`] can return, input to output.
    fn layers(&self) -> Vec<String>;

    /// The layer Grad-CAM uses when none is named (the last convolutional stage).
    fn default_layer(&self) -> String;

    /// The feature map `layer` outputs for `pixels`, in evaluation mode.
    fn features(&self, pixels: &Tensor, layer: &str) -> Result<Tensor>;

    /// The logits the rest of the network computes from `layer`'s feature map, in evaluation mode.
    /// `forward_from(features(x, l), l)` equals `forward(x)`.
    fn forward_from(&self, features: &Tensor, layer: &str) -> Result<Tensor>;

    /// The same network (shared weights) whose rectifiers backpropagate only positive gradients,
    /// for guided backpropagation (Springenberg et al., 2015); `None` for a network that has no
    /// such variant. The forward pass is unchanged.
    fn guided(&self) -> Option<Box<dyn Classifier>> {
        None
    }
}

/// The error for a layer name a model does not have, listing those it has.
pub(crate) fn unknown_layer(arch: &str, layer: &str, layers: &[String]) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{arch} has no layer `{layer}`; its layers are: {}",
        layers.join(", ")
    ))
}

impl std::fmt::Debug for dyn Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("arch", &self.arch())
            .field("classes", &self.num_classes())
            .field("device", self.device())
            .field("dtype", &self.dtype())
            .finish()
    }
}

/// What a classifier's outputs are taken to be, for explaining them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Score {
    /// The logits as they are (Captum's and pytorch-grad-cam's default).
    #[default]
    Logit,
    /// Each logit minus the mean of all: what the softmax depends on, without the part all
    /// classes share. For two classes, half the logit difference.
    CentredLogit,
    /// `log_softmax` of the logits (saturates in f32 for very confident predictions).
    LogProbability,
    /// `softmax` of the logits.
    Probability,
}

impl Score {
    /// Applies the score to `N x classes` logits.
    pub fn apply(self, logits: &Tensor) -> Result<Tensor> {
        match self {
            Score::Logit => Ok(logits.clone()),
            Score::CentredLogit => logits.broadcast_sub(&logits.mean_keepdim(1)?),
            Score::LogProbability => candle_nn::ops::log_softmax(logits, 1),
            Score::Probability => candle_nn::ops::softmax(logits, 1),
        }
    }
}

/// Each row's log-odds of its class (`logits` `B x K`, `classes` `B`), as `B` f32, detached:
/// the class's logit less the log-sum-exp of the others' logits, `log(p / (1 - p))` without
/// `1 - p`'s rounding to 0 when the model is sure (a probability saturates, its log-odds do not).
/// Invariant to a shift of a row's logits, so the same for [`Score::Logit`],
/// [`Score::CentredLogit`] and [`Score::LogProbability`] outputs.
pub fn log_odds(logits: &Tensor, classes: &[u32]) -> Result<Tensor> {
    differentiable_log_odds(&logits.detach().to_dtype(DType::F32)?, classes)
}

/// [`log_odds`] in `logits`' dtype, keeping the graph: their gradient is the gradient of the
/// class's log-odds.
pub fn differentiable_log_odds(logits: &Tensor, classes: &[u32]) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let device = logits.device();
    let classes = Tensor::new(classes, device)?.unsqueeze(1)?;
    let own = logits.gather(&classes, 1)?.squeeze(1)?;
    let is_own = Tensor::arange(0u32, k as u32, device)?
        .unsqueeze(0)?
        .broadcast_eq(&classes)?;
    let others = is_own
        .where_cond(
            &Tensor::full(f32::NEG_INFINITY, (b, k), device)?.to_dtype(logits.dtype())?,
            logits,
        )?
        .log_sum_exp(1)?;
    own - others
}

/// A classifier whose outputs are `score` of another's logits, so that every saliency method and
/// attack explains that score.
///
/// Explaining a logit also explains whatever the classes' logits share, which the decision
/// ignores; for a two-class model that shared part can dominate (the optic disc's brightness
/// raising both logits of the fundus benchmark model). [`Score::CentredLogit`] removes it.
pub struct ScoredClassifier<C> {
    inner: C,
    score: Score,
}

impl<C: Classifier> ScoredClassifier<C> {
    /// `inner`, its outputs replaced by `score` of its logits.
    pub fn new(inner: C, score: Score) -> Self {
        Self { inner, score }
    }

    /// The wrapped classifier.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The score its outputs are.
    pub fn score(&self) -> Score {
        self.score
    }
}

impl<C: Classifier> Classifier for ScoredClassifier<C> {
    fn arch(&self) -> &str {
        self.inner.arch()
    }
    fn input_spec(&self) -> &InputSpec {
        self.inner.input_spec()
    }
    fn classes(&self) -> &Classes {
        self.inner.classes()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
    fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        self.score.apply(&self.inner.forward_t(pixels, train)?)
    }
    fn logits(&self, pixels: &Tensor) -> Result<Tensor> {
        self.inner.logits(pixels)
    }
    fn layers(&self) -> Vec<String> {
        self.inner.layers()
    }
    fn default_layer(&self) -> String {
        self.inner.default_layer()
    }
    fn features(&self, pixels: &Tensor, layer: &str) -> Result<Tensor> {
        self.inner.features(pixels, layer)
    }
    fn forward_from(&self, features: &Tensor, layer: &str) -> Result<Tensor> {
        self.score.apply(&self.inner.forward_from(features, layer)?)
    }

    fn guided(&self) -> Option<Box<dyn Classifier>> {
        let inner = self.inner.guided()?;
        Some(Box::new(ScoredClassifier::new(inner, self.score)))
    }
}

impl<C: Classifier + ?Sized> Classifier for Box<C> {
    fn arch(&self) -> &str {
        (**self).arch()
    }
    fn input_spec(&self) -> &InputSpec {
        (**self).input_spec()
    }
    fn classes(&self) -> &Classes {
        (**self).classes()
    }
    fn device(&self) -> &Device {
        (**self).device()
    }
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        (**self).forward_t(pixels, train)
    }
    fn logits(&self, pixels: &Tensor) -> Result<Tensor> {
        (**self).logits(pixels)
    }
    fn layers(&self) -> Vec<String> {
        (**self).layers()
    }
    fn default_layer(&self) -> String {
        (**self).default_layer()
    }
    fn features(&self, pixels: &Tensor, layer: &str) -> Result<Tensor> {
        (**self).features(pixels, layer)
    }
    fn forward_from(&self, features: &Tensor, layer: &str) -> Result<Tensor> {
        (**self).forward_from(features, layer)
    }

    fn guided(&self) -> Option<Box<dyn Classifier>> {
        (**self).guided()
    }
}

impl<C: Classifier + ?Sized> Classifier for &C {
    fn arch(&self) -> &str {
        (**self).arch()
    }
    fn input_spec(&self) -> &InputSpec {
        (**self).input_spec()
    }
    fn classes(&self) -> &Classes {
        (**self).classes()
    }
    fn device(&self) -> &Device {
        (**self).device()
    }
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn forward_t(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        (**self).forward_t(pixels, train)
    }
    fn logits(&self, pixels: &Tensor) -> Result<Tensor> {
        (**self).logits(pixels)
    }
    fn layers(&self) -> Vec<String> {
        (**self).layers()
    }
    fn default_layer(&self) -> String {
        (**self).default_layer()
    }
    fn features(&self, pixels: &Tensor, layer: &str) -> Result<Tensor> {
        (**self).features(pixels, layer)
    }
    fn forward_from(&self, features: &Tensor, layer: &str) -> Result<Tensor> {
        (**self).forward_from(features, layer)
    }

    fn guided(&self) -> Option<Box<dyn Classifier>> {
        (**self).guided()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_odds_are_the_logit_against_the_others_and_survive_saturation() -> Result<()> {
        let logits = Tensor::new(&[[2f32, 0.0, -1.0], [40.0, 0.0, 0.0]], &Device::Cpu)?;
        let got = log_odds(&logits, &[0, 0])?.to_vec1::<f32>()?;
        // log(p / (1 - p)) = z_c - log(sum over the other classes of e^z), worked by hand.
        let want = [2.0 - (1.0f64 + (-1.0f64).exp()).ln(), 40.0 - 2f64.ln()];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        // Another class of the same row: its logit against the rest, row 0's class 0 among them.
        let other = log_odds(&logits, &[1, 2])?.to_vec1::<f32>()?;
        let want = (2f64.exp() + (-1f64).exp()).ln();
        assert!((other[0] as f64 + want).abs() < 1e-5, "{}", other[0]);
        // Where the probability rounds to 1 in f32, the log-odds still tell 40 from 30.
        let sure = Tensor::new(&[[30f32, 0.0, 0.0], [40.0, 0.0, 0.0]], &Device::Cpu)?;
        let p = candle_nn::ops::softmax(&sure, 1)?.to_vec2::<f32>()?;
        assert_eq!((p[0][0], p[1][0]), (1.0, 1.0));
        let odds = log_odds(&sure, &[0, 0])?.to_vec1::<f32>()?;
        assert!((odds[1] - odds[0] - 10.0).abs() < 1e-4, "{odds:?}");
        // The same for every score that shifts a row's logits.
        for score in [Score::CentredLogit, Score::LogProbability] {
            let shifted = log_odds(&score.apply(&logits)?, &[0, 0])?.to_vec1::<f32>()?;
            for (g, s) in got.iter().zip(&shifted) {
                assert!((g - s).abs() < 1e-5, "{score:?}: {g} vs {s}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_log_odds_gradient_is_one_for_the_class_and_minus_the_others_shares() -> Result<()> {
        let logits = candle_core::Var::new(&[[2f32, 0.0, -1.0], [40.0, 0.0, 0.0]], &Device::Cpu)?;
        let odds = differentiable_log_odds(logits.as_tensor(), &[0, 1])?;
        let grads = odds.sum_all()?.backward()?;
        let got = grads
            .get(logits.as_tensor())
            .expect("the logits' gradient")
            .to_vec2::<f32>()?;
        // d/dz_k of z_c - log sum_{j != c} e^{z_j}: 1 for c, minus k's softmax among the others.
        let share = |z: f64, others: &[f64]| -> f64 {
            -z.exp() / others.iter().map(|o| o.exp()).sum::<f64>()
        };
        let want = [
            [1.0, share(0.0, &[0.0, -1.0]), share(-1.0, &[0.0, -1.0])],
            [share(40.0, &[40.0, 0.0]), 1.0, share(0.0, &[40.0, 0.0])],
        ];
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        // In the logits' own dtype: the others' minus infinity takes it.
        let wide = differentiable_log_odds(&logits.as_tensor().to_dtype(DType::F64)?, &[0, 1])?;
        assert_eq!(wide.dtype(), DType::F64);
        for (w, n) in wide.to_vec1::<f64>()?.iter().zip(odds.to_vec1::<f32>()?) {
            assert!((w - n as f64).abs() < 1e-4, "{w} vs {n}");
        }
        Ok(())
    }
}
