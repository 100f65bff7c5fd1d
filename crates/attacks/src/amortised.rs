//! The amortised mask: one network, trained across a set of images, that predicts the dual
//! game's masks of any image in a single forward pass (Dabkowski and Gal, 2017, "Real time image
//! saliency for black box classifiers"), where the mask attack learns a mask per image by dozens
//! of updates.
//!
//! The game is the mask attack's dual game without its generator (a network shared by all images
//! has no per-image noise to train): the mask's region replaced by the blurred image should lose
//! the explained class, everything but it replaced so should keep it, at each of several areas
//! (extremal perturbation's sorted-mask constraint), smooth (total variation, and a Gaussian of
//! half a cell), and pulled towards each training image's gradient map of the class, as the mask
//! attack's masks are pulled towards SmoothGrad's (one backward pass where SmoothGrad takes 25,
//! for every image of every epoch). The class comes in at the bottleneck through a learned
//! embedding, as the paper's class selector, so one network explains any class of the
//! classifier.
//!
//! The network is an encoder-decoder of 3x3 convolutions with group normalisation (four stride-2
//! levels, two decoding levels with skip connections) whose output is a cell grid of a quarter of
//! the image's side, upsampled bilinearly; its weights are named by [`VarBuilder`] paths (`encoder.0`,
//! `class_embedding`, `decoder.1`, `head`) and saved as safetensors.

use crate::engine::{blurred_baseline, total_variation};
use crate::error::{ensure, Result};
use crate::nets::free_mask::FreeMask;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Embedding, GroupNorm, Module, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use std::path::Path;
use vulnmap_models::init::seeded_var_builder;
use vulnmap_models::Classifier;
use vulnmap_ops::{Conv2d, Padding};
use vulnmap_saliency::{area_gap, GaussianBlur, Gradient, Method};
use vulnmap_train::optim::{Adam, AdamConfig};

/// The image's side over the mask's cells per side (cells of 4 pixels, as the dual mask's).
pub const CELL: usize = 4;

/// The image's sides must be divisible by this (four stride-2 levels).
pub const MULTIPLE: usize = 16;

/// How the amortised mask network is built and trained.
#[derive(Debug, Clone, PartialEq)]
pub struct AmortisedMask {
    /// Channels at the first level, doubled at each of the next three (default 16).
    pub width: usize,
    /// The areas the network's masks keep, one mask per area; the map is their mean, as
    /// extremal perturbation sums its areas (default 0.025, 0.05 and 0.1, the dual mask's).
    pub areas: Vec<f64>,
    /// Weight of the area constraint (default 10: at the dual mask's 100 the shared network's
    /// masks fell to 0 everywhere within two epochs, their sigmoid saturated, before the class's
    /// terms could shape them).
    pub lambda_area: f64,
    /// Weight of the total variation `mean |grad m|^beta` (default 1e-2).
    pub lambda_tv: f64,
    /// beta (default 3).
    pub beta: f64,
    /// Weight of the masks' squared distance to the explained class's gradient map of each
    /// training image (default 1000; the mask attack pulls by 300). Without it the network keeps what
    /// the game needs but puts its maximum off the evidence (on the fundus lesions its pointing
    /// game fell below an untrained network's; docs/attack_maps.md); the gradient singles out
    /// the evidence among the regions the game keeps.
    pub gamma: f64,
    /// Sigma, in pixels, of the blurred baseline (default 10).
    pub blur_sigma: f64,
    /// Blur the baseline within each image's field of view (fundus images' black surround).
    pub field_of_view: bool,
    /// The mask's Gaussian smoothing, sigma as a fraction of a cell (default 0.5).
    pub smooth: f64,
    /// Passes over the training images (default 10).
    pub epochs: usize,
    /// Images per update; each passes `2 x areas` perturbed images through the classifier
    /// (default 8).
    pub batch_size: usize,
    /// Adam's learning rate (default 1e-3).
    pub lr: f64,
    /// Seeds the weights and the order of the training images.
    pub seed: u64,
    /// Show a progress bar while training.
    pub progress: bool,
}

impl Default for AmortisedMask {
    fn default() -> Self {
        Self {
            width: 16,
            areas: vec![0.025, 0.05, 0.1],
            lambda_area: 10.0,
            lambda_tv: 1e-2,
            beta: 3.0,
            gamma: 1000.0,
            blur_sigma: 10.0,
            field_of_view: false,
            smooth: 0.5,
            epochs: 10,
            batch_size: 8,
            lr: 1e-3,
            seed: 0,
            progress: false,
        }
    }
}

impl AmortisedMask {
    fn check(&self) -> Result<()> {
        ensure(self.width >= 1, || {
            "the mask network's width must be at least 1".into()
        })?;
        ensure(!self.areas.is_empty(), || {
            "the mask network needs at least one area".into()
        })?;
        for &a in &self.areas {
            ensure(a > 0.0 && a < 1.0, || {
                format!("an area is a fraction of the image in (0, 1), got {a}")
            })?;
        }
        ensure(self.epochs >= 1 && self.batch_size >= 1, || {
            format!(
                "the mask network trains for at least one epoch of at least one image, got {} \
                 epochs of {}",
                self.epochs, self.batch_size
            )
        })?;
        for (name, value) in [
            ("lr", self.lr),
            ("blur_sigma", self.blur_sigma),
            ("beta", self.beta),
        ] {
            ensure(value.is_finite() && value > 0.0, || {
                format!("the mask network's {name} must be positive, got {value}")
            })?;
        }
        for (name, value) in [
            ("lambda_area", self.lambda_area),
            ("lambda_tv", self.lambda_tv),
            ("gamma", self.gamma),
            ("smooth", self.smooth),
        ] {
            ensure(value.is_finite() && value >= 0.0, || {
                format!("the mask network's {name} must be at least 0, got {value}")
            })?;
        }
        Ok(())
    }
}

/// A 3x3 convolution, group normalisation and ReLU: the normalisation keeps every layer's
/// activations centred, so no layer's ReLUs all die while the area constraint, large at first,
/// drives the mask (a wider network without it stopped learning in its first epoch).
struct ConvBlock {
    conv: Conv2d,
    norm: GroupNorm,
}

impl ConvBlock {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2d::new(
            cin,
            cout,
            3,
            stride,
            Padding::Uniform(1),
            false,
            vb.pp("conv"),
        )?;
        let norm = candle_nn::group_norm(GROUPS.min(cout), cout, 1e-5, vb.pp("norm"))?;
        Ok(Self { conv, norm })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(&self.conv.forward(x)?)?.relu()?)
    }
}

/// Channel groups of the group normalisation (Wu and He's 32 is too many for 16 channels).
const GROUPS: usize = 8;

/// The network: cell-grid mask logits, one channel per area, of images and classes.
struct MaskNet {
    encoder: Vec<ConvBlock>,
    class_embedding: Embedding,
    decoder: Vec<ConvBlock>,
    head: Conv2d,
}

impl MaskNet {
    fn new(width: usize, classes: usize, areas: usize, vb: VarBuilder) -> Result<Self> {
        let w = width;
        let levels = [
            (3, w, 1),
            (w, 2 * w, 2),
            (2 * w, 4 * w, 2),
            (4 * w, 8 * w, 2),
        ];
        let mut encoder = Vec::new();
        for (i, &(cin, cout, stride)) in levels.iter().enumerate() {
            encoder.push(ConvBlock::new(
                cin,
                cout,
                stride,
                vb.pp(format!("encoder.{i}")),
            )?);
        }
        encoder.push(ConvBlock::new(8 * w, 8 * w, 2, vb.pp("encoder.4"))?);
        let class_embedding = candle_nn::embedding(classes, 8 * w, vb.pp("class_embedding"))?;
        let decoder = vec![
            ConvBlock::new(16 * w, 4 * w, 1, vb.pp("decoder.0"))?,
            ConvBlock::new(8 * w, 2 * w, 1, vb.pp("decoder.1"))?,
        ];
        let head = Conv2d::new(2 * w, areas, 1, 1, Padding::Uniform(0), true, vb.pp("head"))?;
        Ok(Self {
            encoder,
            class_embedding,
            decoder,
            head,
        })
    }

    /// `B x areas x H/4 x W/4` logits of `images` (`B x 3 x H x W`) for `classes` (`B`, u32).
    fn forward(&self, images: &Tensor, classes: &Tensor) -> Result<Tensor> {
        let mut skips = Vec::new();
        let mut x = images.clone();
        for level in &self.encoder {
            x = level.forward(&x)?;
            skips.push(x.clone());
        }
        // The class selector: the class's embedding added to every bottleneck position.
        let class = self
            .class_embedding
            .forward(classes)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        x = x.broadcast_add(&class)?.relu()?;
        // Up from 1/16 to 1/8 (with level 3), then to 1/4 (with level 2).
        for (decoder, skip) in self.decoder.iter().zip([&skips[3], &skips[2]]) {
            let (_, _, h, w) = skip.dims4()?;
            let up = x.upsample_nearest2d(h, w)?;
            x = decoder.forward(&Tensor::cat(&[&up, skip], 1)?)?;
        }
        Ok(self.head.forward(&x)?)
    }
}

/// Gives the training images of the given indices: pixels `B x 3 x H x W` in [0, 1] and the
/// class each explains.
pub type LoadBatch<'a> = dyn Fn(&[usize]) -> Result<(Tensor, Vec<usize>)> + 'a;

/// What one epoch of training did, averaged over its images and areas.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Epoch {
    /// The loss.
    pub loss: f64,
    /// The explained class's probability on the preserved images (raised by training).
    pub preserved: f64,
    /// The explained class's probability on the deleted images (lowered by training).
    pub deleted: f64,
}

/// A trained (or loaded) amortised mask network for one classifier.
pub struct MaskModel {
    varmap: VarMap,
    net: MaskNet,
    spec: AmortisedMask,
    classes: usize,
}

impl MaskModel {
    /// A network with fresh weights (seeded by `spec.seed`) for a classifier of `classes` classes.
    pub fn new(spec: &AmortisedMask, classes: usize, device: &Device) -> Result<Self> {
        spec.check()?;
        ensure(classes >= 1, || "the classifier has no classes".into())?;
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, spec.seed, DType::F32, device);
        let net = MaskNet::new(spec.width, classes, spec.areas.len(), vb)?;
        // Each area's mask starts near that area everywhere (its logit is the head's bias), the
        // constraint's cheapest uniform value, so the constraint does not first drive the
        // sigmoid into saturation, where the class's terms could no longer shape the mask.
        let start: Vec<f32> = spec
            .areas
            .iter()
            .map(|&a| (a / (1.0 - a)).ln() as f32)
            .collect();
        if let Some(bias) = varmap
            .data()
            .lock()
            .ok()
            .and_then(|d| d.get("head.bias").cloned())
        {
            bias.set(&Tensor::new(start.as_slice(), device)?)?;
        }
        Ok(Self {
            varmap,
            net,
            spec: spec.clone(),
            classes,
        })
    }

    /// The network saved by [`MaskModel::save`], for the same settings and classes.
    pub fn load(
        path: &Path,
        spec: &AmortisedMask,
        classes: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut model = Self::new(spec, classes, device)?;
        // Sets each variable's value in place: the layers hold the same variables.
        model.varmap.load(path).map_err(|e| {
            crate::Error::InvalidParameter(format!(
                "{}: not this mask network's weights ({e})",
                path.display()
            ))
        })?;
        Ok(model)
    }

    /// Writes the weights to `path` (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.varmap.save(path)?;
        Ok(())
    }

    /// Trains the network on `count` images, which `load` gives a batch at a time, for `model`.
    pub fn train(
        &mut self,
        model: &dyn Classifier,
        count: usize,
        load: &LoadBatch,
    ) -> Result<Vec<Epoch>> {
        ensure(count >= 1, || {
            "the mask network needs at least one training image".into()
        })?;
        let spec = &self.spec;
        let mut adam = Adam::new(
            self.varmap.all_vars(),
            AdamConfig {
                lr: spec.lr,
                ..AdamConfig::default()
            },
        )?;
        let mut rng = vulnmap_data::random::rng(spec.seed, "mask network order");
        let batches = count.div_ceil(spec.batch_size);
        let bar = progress(spec.progress, (spec.epochs * batches) as u64);
        let mut epochs = Vec::new();
        for epoch in 0..spec.epochs {
            let mut order: Vec<usize> = (0..count).collect();
            order.shuffle(&mut rng);
            let mut sums = [0.0; 3];
            for batch in order.chunks(spec.batch_size) {
                let (pixels, classes) = load(batch)?;
                let (loss, preserved, deleted) = self.loss(model, &pixels, &classes)?;
                adam.step(&loss.backward()?)?;
                let n = batch.len() as f64;
                sums[0] += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * n;
                sums[1] += preserved * n;
                sums[2] += deleted * n;
                bar.inc(1);
            }
            let [loss, preserved, deleted] = sums.map(|s| s / count as f64);
            ensure(loss.is_finite(), || {
                format!(
                    "the mask network's loss became {loss} in epoch {}",
                    epoch + 1
                )
            })?;
            tracing::info!(
                "mask network epoch {}/{}: loss {loss:.4}, the class's probability {preserved:.3} \
                 preserved, {deleted:.3} deleted",
                epoch + 1,
                spec.epochs
            );
            epochs.push(Epoch {
                loss,
                preserved,
                deleted,
            });
        }
        bar.finish_and_clear();
        Ok(epochs)
    }

    /// The masks, `B x areas x H x W` in (0, 1), of `pixels` for `classes`.
    fn area_masks(&self, pixels: &Tensor, classes: &[usize]) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        ensure(c == 3, || {
            format!("the mask network takes 3-channel images, got {c}")
        })?;
        ensure(h % MULTIPLE == 0 && w % MULTIPLE == 0, || {
            format!("the mask network takes sides divisible by {MULTIPLE}, got {h} x {w}")
        })?;
        ensure(classes.len() == b, || {
            format!("{} classes for {b} images", classes.len())
        })?;
        if let Some(&k) = classes.iter().find(|&&k| k >= self.classes) {
            return Err(crate::Error::InvalidParameter(format!(
                "class {k} is not one of the mask network's {} classes",
                self.classes
            )));
        }
        let device = pixels.device();
        let index: Vec<u32> = classes.iter().map(|&k| k as u32).collect();
        let index = Tensor::new(index.as_slice(), device)?;
        let logits = self.net.forward(&pixels.to_dtype(DType::F32)?, &index)?;
        let mut masks = FreeMask::upsample(&logits, (h, w))?;
        if self.spec.smooth > 0.0 {
            masks = GaussianBlur::full(self.spec.smooth * CELL as f64).apply(&masks)?;
        }
        Ok(masks)
    }

    /// Each image's map (`B x H x W`): the mean of its masks over the areas.
    pub fn maps(&self, pixels: &Tensor, classes: &[usize]) -> Result<Tensor> {
        Ok(self
            .area_masks(pixels, classes)?
            .detach()
            .mean(1)?
            .to_dtype(pixels.dtype())?)
    }

    /// The dual game's loss over a batch, and the class's mean probability on the preserved and
    /// the deleted images.
    fn loss(
        &self,
        model: &dyn Classifier,
        pixels: &Tensor,
        classes: &[usize],
    ) -> Result<(Tensor, f64, f64)> {
        let spec = &self.spec;
        let b = pixels.dim(0)?;
        let masks = self.area_masks(pixels, classes)?;
        let baseline = blurred_baseline(pixels, spec.blur_sigma, spec.field_of_view)?;
        let away = (&baseline - pixels)?;
        let mut deleted = Vec::new();
        let mut preserved = Vec::new();
        let mut terms = Vec::new();
        let pull = if spec.gamma > 0.0 {
            let gradient = Method::Gradient(Gradient {
                batch_size: b.max(1),
            });
            let maps = gradient.explain(model, &pixels.detach(), classes)?;
            Some(maps.unsqueeze(1)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        for (a, &area) in spec.areas.iter().enumerate() {
            let mask = masks.narrow(1, a, 1)?;
            // The mask's share of the way from the image to the baseline.
            let shift = away.broadcast_mul(&mask.to_dtype(pixels.dtype())?)?;
            deleted.push((pixels + &shift)?);
            preserved.push((&baseline - &shift)?);
            let gap = area_gap(&mask.flatten_from(1)?, &vec![area; b])?;
            terms.push((gap.mean_all()? * spec.lambda_area)?);
        }
        let areas = spec.areas.len();
        let images: Vec<&Tensor> = deleted.iter().chain(&preserved).collect();
        let logits = model.logits(&Tensor::cat(&images, 0)?)?;
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let index: Vec<u32> = (0..2 * areas)
            .flat_map(|_| classes.iter().map(|&k| k as u32))
            .collect();
        let index = Tensor::new(index.as_slice(), pixels.device())?.unsqueeze(1)?;
        let scores = log_probs.gather(&index, 1)?.squeeze(1)?;
        let on_deleted = scores.narrow(0, 0, areas * b)?;
        let on_preserved = scores.narrow(0, areas * b, areas * b)?;
        // Every image's masks are the same size: the mean of their means is the overall mean.
        let tv = total_variation(&masks, spec.beta)?.mean_all()?;
        // Each area's game weighs as one dual-game mask of the mask attack: the class's two terms
        // and the area constraint, averaged over the areas.
        let loss = ((on_deleted.mean_all()? - on_preserved.mean_all()?)?
            + Tensor::stack(&terms, 0)?.mean_all()?)?;
        let mut loss = (loss + (tv * spec.lambda_tv)?)?;
        if let Some(reference) = &pull {
            let gap = masks.broadcast_sub(reference)?.sqr()?.mean_all()?;
            loss = (loss + (gap * spec.gamma)?)?;
        }
        let mean_probability = |s: &Tensor| -> Result<f64> {
            Ok(s.detach()
                .exp()?
                .mean_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?)
        };
        Ok((
            loss,
            mean_probability(&on_preserved)?,
            mean_probability(&on_deleted)?,
        ))
    }
}

fn progress(show: bool, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "training the mask network [{bar:30}] batch {pos}/{len} (eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> AmortisedMask {
        AmortisedMask {
            width: 2,
            areas: vec![0.1, 0.2],
            ..AmortisedMask::default()
        }
    }

    #[test]
    fn a_saved_network_loads_to_the_same_maps_and_other_weights_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let net = MaskModel::new(&small(), 3, &dev)?;
        let pixels = Tensor::rand(0f32, 1.0, (2, 3, 32, 48), &dev)?;
        let maps = net.maps(&pixels, &[0, 2])?;
        assert_eq!(maps.dims(), &[2, 32, 48]);
        // Each area's mask starts mostly off, the smaller area's more (its bias is the area's
        // logit; the first layers' output spreads the sigmoid's input around it).
        let mean = net
            .area_masks(&pixels, &[0, 2])?
            .mean((0, 2, 3))?
            .to_vec1::<f32>()?;
        assert!(
            mean[0] > 0.02 && mean[0] < mean[1] && mean[1] < 0.3,
            "{mean:?}"
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("net.safetensors");
        net.save(&file)?;
        let loaded = MaskModel::load(&file, &small(), 3, &dev)?;
        let diff = (loaded.maps(&pixels, &[0, 2])? - &maps)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // Another seed draws other weights; the file's are what a load gives.
        let other = MaskModel::new(&AmortisedMask { seed: 1, ..small() }, 3, &dev)?;
        assert!(
            (other.maps(&pixels, &[0, 2])? - &maps)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                > 0.0
        );
        let wider = AmortisedMask {
            width: 4,
            ..small()
        };
        let e = MaskModel::load(&file, &wider, 3, &dev)
            .err()
            .expect("a wider network's weights differ")
            .to_string();
        assert!(e.contains("net.safetensors"), "{e}");
        Ok(())
    }

    #[test]
    fn bad_settings_and_inputs_are_refused_with_the_reason() -> Result<()> {
        let dev = Device::Cpu;
        let refused = |spec: AmortisedMask| {
            MaskModel::new(&spec, 2, &dev)
                .err()
                .expect("refused")
                .to_string()
        };
        let e = refused(AmortisedMask {
            areas: vec![],
            ..small()
        });
        assert!(e.contains("at least one area"), "{e}");
        let e = refused(AmortisedMask {
            areas: vec![1.5],
            ..small()
        });
        assert!(e.contains("1.5"), "{e}");
        let e = refused(AmortisedMask { lr: 0.0, ..small() });
        assert!(e.contains("lr"), "{e}");
        let net = MaskModel::new(&small(), 2, &dev)?;
        let e = net
            .maps(&Tensor::zeros((1, 3, 30, 32), DType::F32, &dev)?, &[0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("30 x 32"), "{e}");
        let e = net
            .maps(&Tensor::zeros((1, 3, 32, 32), DType::F32, &dev)?, &[2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("class 2"), "{e}");
        Ok(())
    }
}
