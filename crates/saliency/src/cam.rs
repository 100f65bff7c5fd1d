//! Class activation maps: a layer's feature maps `A` (K channels, `h x w`) weighted, summed over
//! the channels and rectified. The rules differ in the weights, each as pytorch-grad-cam
//! computes it (`g` is the gradient of the target logit with respect to `A`):
//!
//! | rule | weight of channel k (at position ij) | paper | pytorch-grad-cam |
//! |---|---|---|---|
//! | Grad-CAM | `mean_ij g_kij` | Selvaraju et al., ICCV 2017 | `GradCAM` |
//! | Grad-CAM++ | `sum_ij alpha_kij relu(g_kij)`, `alpha = g^2 / (2 g^2 + sum_ij A_k g^3 + 1e-6)` | Chattopadhay et al., WACV 2018 | `GradCAMPlusPlus` |
//! | LayerCAM | `relu(g_kij)`, per position | Jiang et al., IEEE TIP 2021 | `LayerCAM` |
//! | Eigen-CAM | the first principal component of the positions' activations (no gradient, no class) | Muhammad and Yeasin, IJCNN 2020 | `EigenCAM` |
//! | Score-CAM | `softmax_k` of the target logit of the image times `A_k` (upsampled, scaled to [0, 1]) | Wang et al., CVPR workshops 2020 | `ScoreCAM` |
//!
//! Eigen-CAM's principal component has no sign of its own; it is taken so that the map
//! correlates positively with the summed activations (pytorch-grad-cam leaves it to the SVD).
//! Score-CAM multiplies vulnmap's pixels in [0, 1] (masked pixels go black), where
//! pytorch-grad-cam multiplies the normalised tensor (masked pixels go to the mean colour).

use crate::error::{ensure, Error, Result};
use crate::target::check_inputs;
use candle_core::{DType, Device, Tensor, Var};
use vulnmap_models::Classifier;
use vulnmap_ops::resize::bilinear;

/// How a class activation map weights the layer's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CamRule {
    /// Grad-CAM: the channel's mean gradient.
    #[default]
    GradCam,
    /// Grad-CAM++: the positive gradients, each weighted by its higher-order coefficient.
    GradCamPlusPlus,
    /// LayerCAM: the positive gradient at each position.
    LayerCam,
    /// Eigen-CAM: the activations' first principal component.
    EigenCam,
    /// Score-CAM: the target logit when the image is masked by each channel.
    ScoreCam,
}

impl CamRule {
    /// The rule's name in file names and messages (as `vulnmap explain --method` spells it).
    pub fn name(self) -> &'static str {
        match self {
            CamRule::GradCam => "grad-cam",
            CamRule::GradCamPlusPlus => "grad-cam-plus-plus",
            CamRule::LayerCam => "layer-cam",
            CamRule::EigenCam => "eigen-cam",
            CamRule::ScoreCam => "score-cam",
        }
    }
}

/// A class activation map's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cam {
    /// How the channels are weighted.
    pub rule: CamRule,
    /// The layer (see [`Classifier::layers`]); `None` is the model's default, the last
    /// convolutional stage (`layer4` for ResNets, as pytorch-grad-cam recommends).
    pub layer: Option<String>,
    /// Images per forward/backward pass (Score-CAM: masked images per forward pass; at least
    /// 1; default 16); bounds memory, not the result.
    pub batch_size: usize,
}

impl Default for Cam {
    fn default() -> Self {
        Self::new(CamRule::default())
    }
}

impl Cam {
    /// `rule` on the model's default layer.
    pub fn new(rule: CamRule) -> Self {
        Self {
            rule,
            layer: None,
            batch_size: 16,
        }
    }

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
        match self.rule {
            CamRule::ScoreCam => {
                for (i, &target) in targets.iter().enumerate() {
                    maps.push(self.score_cam(model, &pixels.narrow(0, i, 1)?, target, &layer)?);
                }
            }
            _ => {
                for start in (0..n).step_by(self.batch_size) {
                    let len = self.batch_size.min(n - start);
                    let batch = pixels.narrow(0, start, len)?;
                    let features = model.features(&batch, &layer)?.detach();
                    let cam = match self.rule {
                        CamRule::EigenCam => eigen_cam(&features)?,
                        rule => {
                            let g = feature_gradient(
                                model,
                                &features,
                                &targets[start..start + len],
                                &layer,
                            )?;
                            gradient_cam(rule, &features, &g)?
                        }
                    };
                    maps.push(cam.relu()?);
                }
            }
        }
        Ok(Tensor::cat(&maps, 0)?)
    }

    /// Score-CAM of one image (`1 x C x H x W`): `1 x 1 x h x w`.
    fn score_cam(
        &self,
        model: &dyn Classifier,
        image: &Tensor,
        target: usize,
        layer: &str,
    ) -> Result<Tensor> {
        let (_, _, h, w) = image.dims4()?;
        let features = model.features(image, layer)?.detach().squeeze(0)?; // K x h' x w'
        let k = features.dim(0)?;
        let mut scores = Vec::with_capacity(k);
        for start in (0..k).step_by(self.batch_size) {
            let len = self.batch_size.min(k - start);
            // Each channel upsampled as torch's UpsamplingBilinear2d (corners aligned), then
            // scaled to [0, 1], masks the image.
            let masks = bilinear(&features.narrow(0, start, len)?.unsqueeze(1)?, (h, w), true)?;
            let flat = masks.flatten_from(1)?;
            let lo = flat.min_keepdim(1)?.unsqueeze(2)?.unsqueeze(3)?;
            let hi = flat.max_keepdim(1)?.unsqueeze(2)?.unsqueeze(3)?;
            let masks = masks
                .broadcast_sub(&lo)?
                .broadcast_div(&(hi - &lo)?.affine(1.0, 1e-8)?)?;
            let logits = model.forward(&image.broadcast_mul(&masks)?)?;
            scores.extend(
                logits
                    .narrow(1, target, 1)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        let weights = Tensor::from_vec(scores, (1, k, 1, 1), &Device::Cpu)?
            .to_device(features.device())?
            .to_dtype(features.dtype())?;
        let weights = candle_nn::ops::softmax(&weights, 1)?;
        let cam = features
            .unsqueeze(0)?
            .broadcast_mul(&weights)?
            .sum_keepdim(1)?;
        Ok(cam.relu()?)
    }
}

/// The gradient of each image's target logit with respect to the layer's `features`.
fn feature_gradient(
    model: &dyn Classifier,
    features: &Tensor,
    targets: &[usize],
    layer: &str,
) -> Result<Tensor> {
    let a = Var::from_tensor(features)?;
    let logits = model.forward_from(a.as_tensor(), layer)?;
    let t: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
    let index = Tensor::from_slice(&t, (t.len(), 1), logits.device())?;
    let grads = logits.gather(&index, 1)?.sum_all()?.backward()?;
    let g = grads
        .get(a.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg(format!("no gradient reached layer {layer}")))?;
    Ok(g.clone())
}

/// The unrectified map of a gradient rule from activations `a` and their gradients `g`
/// (both `N x K x h x w`).
fn gradient_cam(rule: CamRule, a: &Tensor, g: &Tensor) -> Result<Tensor> {
    let weighted = match rule {
        CamRule::GradCam => a.broadcast_mul(&g.mean_keepdim((2, 3))?)?,
        CamRule::GradCamPlusPlus => {
            let g2 = g.sqr()?;
            let g3 = (&g2 * g)?;
            let sum_a = a.sum_keepdim((2, 3))?;
            let denominator = ((&g2 * 2.0)? + g3.broadcast_mul(&sum_a)?)?.affine(1.0, 1e-6)?;
            let alpha = (g2 / denominator)?;
            let weights = (alpha * g.relu()?)?.sum_keepdim((2, 3))?;
            a.broadcast_mul(&weights)?
        }
        CamRule::LayerCam => (g.relu()? * a)?,
        CamRule::EigenCam | CamRule::ScoreCam => {
            return Err(Error::InvalidParameter(format!(
                "{} does not weight channels by gradients",
                rule.name()
            )))
        }
    };
    Ok(weighted.sum_keepdim(1)?)
}

/// Eigen-CAM: each image's activations projected on their first principal component
/// (`N x 1 x h x w`), the sign making the map correlate positively with the summed activations.
fn eigen_cam(features: &Tensor) -> Result<Tensor> {
    let (n, k, h, w) = features.dims4()?;
    ensure(h * w >= 2, || {
        "Eigen-CAM needs a layer with at least two positions".into()
    })?;
    let mut maps = Vec::with_capacity(n);
    for i in 0..n {
        // Positions x channels, each channel centred over the positions.
        let x = features
            .get(i)?
            .reshape((k, h * w))?
            .t()?
            .to_dtype(DType::F64)?;
        let x = x.broadcast_sub(&x.mean_keepdim(0)?)?;
        // X V[0] = U[:, 0] S[0]: the leading eigenvector of X X^T (positions x positions),
        // scaled by the square root of its eigenvalue.
        let gram = x
            .matmul(&x.t()?)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f64>()?;
        let (u, lambda) = leading_eigenvector(&gram);
        let summed = features
            .get(i)?
            .sum(0)?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f64>()?;
        let mean = summed.iter().sum::<f64>() / summed.len() as f64;
        let agreement: f64 = u.iter().zip(&summed).map(|(a, b)| a * (b - mean)).sum();
        let sign = if agreement < 0.0 { -1.0 } else { 1.0 };
        let projection: Vec<f32> = u
            .iter()
            .map(|v| (sign * v * lambda.max(0.0).sqrt()) as f32)
            .collect();
        maps.push(Tensor::from_vec(projection, (1, 1, h, w), &Device::Cpu)?);
    }
    Ok(Tensor::cat(&maps, 0)?
        .to_device(features.device())?
        .to_dtype(features.dtype())?)
}

/// The unit eigenvector of the largest eigenvalue of the symmetric positive semi-definite
/// `m`, and that eigenvalue, by power iteration.
fn leading_eigenvector(m: &[Vec<f64>]) -> (Vec<f64>, f64) {
    let n = m.len();
    // A start with a component along every direction a real matrix is likely to have.
    let mut v: Vec<f64> = (0..n)
        .map(|i| 1.0 + (i as f64 + 1.0).sqrt().fract())
        .collect();
    let mut lambda = 0.0;
    for _ in 0..10_000 {
        let next: Vec<f64> = m
            .iter()
            .map(|row| row.iter().zip(&v).map(|(a, b)| a * b).sum())
            .collect();
        let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return (vec![0.0; n], 0.0);
        }
        let next: Vec<f64> = next.iter().map(|x| x / norm).collect();
        let change: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
        v = next;
        lambda = norm;
        if change < 1e-12 {
            break;
        }
    }
    (v, lambda)
}
