//! The one attack loop every variant runs (paper, section II).
//!
//! Each job gets its own noise generator, drawn from the job's seed (its latent `z` is drawn once
//! and fixed). At every iteration the generators make noise, the noise is scaled by alpha,
//! multiplied by the job's mask (none, a window, a saliency map, a learned mask), added to the
//! image and clamped to [0, 1]; the classifier judges the perturbed images; a job that meets its
//! goal (untargeted: the label changed, targeted: the label is the target, each with confidence
//! above the threshold) stops and keeps its result, the others take an Adam step on their
//! generator (lr 2e-4, betas 0.5/0.999) and go on, up to the cap. Jobs run in banks of at most
//! `batch_size`; the classifier's weights are constants and get no gradients.

use crate::error::{ensure, Error, Result};
use crate::nets::bank::Placement;
use crate::nets::free_mask::FreeMask;
use crate::nets::generator::{GeneratorKind, NoiseGenerators};
use crate::nets::unet::UNet;
use crate::outcome::AttackOutcome;
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use vulnmap_models::Classifier;
use vulnmap_saliency::{Method, SmoothGrad, WindowGrid};
use vulnmap_train::optim::{Adam, AdamConfig};

/// Which generator makes full-image noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum GeneratorChoice {
    /// The authors' DCGAN for 224 x 224 images, the size-generic one otherwise.
    #[default]
    Auto,
    /// The authors' DCGAN (224 x 224 images only).
    Paper,
    /// The size-generic DCGAN.
    Generic,
}

/// Settings shared by every attack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttackConfig {
    /// Noise strength in pixel units (the paper: 0.02 for random attacks, 0.05 for masked ones).
    pub alpha: f64,
    /// Generator updates at most.
    pub max_iters: usize,
    /// Adam's learning rate for the generators (the authors' 2e-4) ...
    pub lr: f64,
    /// ... and its betas (0.5, 0.999), as DCGAN.
    pub betas: (f64, f64),
    /// The probability the perturbed image's label must exceed to count as a success.
    pub confidence: f64,
    /// Seed of the generators' weights and latent vectors.
    pub seed: u64,
    /// Which generator makes full-image noise (default `Auto`).
    pub generator: GeneratorChoice,
    /// Jobs per bank (images, windows, seeds or alphas attacked together).
    pub batch_size: usize,
    /// Show a progress bar on stderr (hidden when it is not a terminal).
    pub progress: bool,
}

impl Default for AttackConfig {
    /// The paper's random attack: alpha 0.02, 100 iterations, Adam 2e-4 (0.5, 0.999),
    /// confidence 0.9.
    fn default() -> Self {
        Self {
            alpha: 0.02,
            max_iters: 100,
            lr: 2e-4,
            betas: (0.5, 0.999),
            confidence: 0.9,
            seed: 0,
            generator: GeneratorChoice::Auto,
            batch_size: 8,
            progress: false,
        }
    }
}

/// Whether an attack aims at a class (`mode: targeted` with its `target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AttackMode {
    /// Any label but the clean image's.
    #[default]
    Untargeted,
    /// One class, named by a target.
    Targeted,
}

impl AttackMode {
    /// The goal of this mode with `target`: a targeted attack needs one, an untargeted one
    /// takes none.
    pub fn goal(self, target: Option<usize>) -> Result<Goal> {
        match (self, target) {
            (AttackMode::Untargeted, None) => Ok(Goal::Untargeted),
            (AttackMode::Targeted, Some(t)) => Ok(Goal::Targeted(t)),
            (AttackMode::Targeted, None) => Err(Error::InvalidParameter(
                "a targeted attack needs a target class".into(),
            )),
            (AttackMode::Untargeted, Some(t)) => Err(Error::InvalidParameter(format!(
                "target {t} given to an untargeted attack; set the mode to targeted"
            ))),
        }
    }
}

/// What an attack wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Any label but the clean image's: the loss is `-CE(original label)`.
    Untargeted,
    /// This label: the loss is `CE(target)`.
    Targeted(usize),
}

/// Where the noise may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// The whole image.
    Whole,
    /// A `size x size` window with its top-left corner at `(top, left)`; the generator makes
    /// window-sized noise (the local attack).
    Window {
        /// Row of the window's top-left corner, in pixels.
        top: usize,
        /// Column of the window's top-left corner, in pixels.
        left: usize,
        /// Side of the square window, in pixels; the window must fit inside the image.
        size: usize,
    },
    /// Everywhere but a `size x size` window at `(top, left)`: the window is preserved (the
    /// local attack's preserve game); the generator makes whole-image noise.
    Outside {
        /// Row of the window's top-left corner, in pixels.
        top: usize,
        /// Column of the window's top-left corner, in pixels.
        left: usize,
        /// Side of the square window, in pixels; the window must fit inside the image.
        size: usize,
    },
}

impl Region {
    /// Generators of one bank must be alike: whole-image noise, or noise of one window size.
    fn noise_side(&self) -> Option<usize> {
        match *self {
            Region::Window { size, .. } => Some(size),
            Region::Whole | Region::Outside { .. } => None,
        }
    }
}

/// One attack to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Job {
    /// Index of the image in the batch of pixels given to [`run`].
    pub image: usize,
    /// What this job's attack wants.
    pub goal: Goal,
    /// Where this job's noise may go.
    pub region: Region,
    /// Noise strength in pixel units (positive); see [`AttackConfig::alpha`].
    pub alpha: f64,
    /// Seed of this job's generator (jobs with one seed start from the same generator).
    pub seed: u64,
}

/// What the sparsity term of the mask attack penalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Sparsity {
    /// `mean(m)`: the area the noise may touch, the stated intent of Eq. 6 ("encourages most of
    /// the mask to be turned off"). The default.
    #[default]
    Area,
    /// `mean(|1 - m|)`: Eq. 6 as printed, which pushes the mask *on* everywhere.
    Literal,
}

/// Which network learns the mask, as settings name it (`network: unet` or `free`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum MaskNetworkKind {
    /// A U-Net.
    #[default]
    Unet,
    /// The authors' free low-resolution mask.
    Free,
}

impl MaskNetworkKind {
    /// The network of this kind: a U-Net of `base` channels or a free mask of `cells` per side.
    pub fn network(self, base: usize, cells: usize) -> MaskNetwork {
        match self {
            MaskNetworkKind::Unet => MaskNetwork::UNet { base },
            MaskNetworkKind::Free => MaskNetwork::Free { cells },
        }
    }

    /// Adam's learning rate for this network when none is given: 1e-3 for the U-Net, the
    /// authors' 0.01 for the free mask (whose cells move slowly otherwise).
    pub fn default_lr(self) -> f64 {
        match self {
            MaskNetworkKind::Unet => 1e-3,
            MaskNetworkKind::Free => 1e-2,
        }
    }
}

/// The network that learns the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskNetwork {
    /// A U-Net `m = U(I)` with this many base channels (sides divisible by 16).
    UNet {
        /// Channels at the first level, doubled at each of the four levels down (default 16).
        base: usize,
    },
    /// The authors' final code: a free `cells x cells` mask upsampled bilinearly.
    Free {
        /// Cells per side of the low-resolution mask (the authors' code: 28).
        cells: usize,
    },
}

/// The mask attack's mask and loss terms (paper, Eq. 6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnedMask {
    /// The network that learns the mask (default a U-Net of 16 base channels).
    pub network: MaskNetwork,
    /// Adam's learning rate for the mask (the authors' free mask: 0.01).
    pub lr: f64,
    /// What the sparsity term penalises (default [`Sparsity::Area`]).
    pub sparsity: Sparsity,
    /// lambda1 (1e-4).
    pub lambda_sparsity: f64,
    /// lambda2 (1e-2), weight of the total variation `mean |grad m|^beta`.
    pub lambda_tv: f64,
    /// beta (3).
    pub beta: f64,
    /// gamma (1), weight of `MSE(M_c(I), m)` towards the clean image's SmoothGrad map.
    pub gamma: f64,
    /// The SmoothGrad map the mask is pulled towards.
    pub reference: SmoothGrad,
}

impl Default for LearnedMask {
    /// Eq. 6's weights (lambda1 1e-4, lambda2 1e-2, beta 3, gamma 1) with the area sparsity and
    /// a U-Net of 16 base channels.
    fn default() -> Self {
        Self {
            network: MaskNetwork::UNet { base: 16 },
            lr: MaskNetworkKind::Unet.default_lr(),
            sparsity: Sparsity::Area,
            lambda_sparsity: 1e-4,
            lambda_tv: 1e-2,
            beta: 3.0,
            gamma: 1.0,
            reference: SmoothGrad::authors(),
        }
    }
}

/// How the noise is masked.
#[derive(Debug, Clone)]
pub enum Masking {
    /// Not at all.
    None,
    /// One `H x W` mask per job, the same at every iteration.
    Fixed(Vec<Tensor>),
    /// The saliency attack: the normalised SmoothGrad map of the current perturbed image,
    /// recomputed every `every` updates (the paper: every one; `None`: once, on the clean image,
    /// as the authors' code), values below `threshold` set to zero.
    Saliency {
        /// How the saliency map is computed.
        method: SmoothGrad,
        /// Updates between recomputations; `None` computes the map once, on the clean image.
        every: Option<usize>,
        /// Map values (in [0, 1]) below this are set to zero; 0 keeps every value.
        threshold: f32,
    },
    /// The mask attack: a mask learned together with the noise.
    Learned(LearnedMask),
}

/// One whole-image job per image, each for its goal, with the config's alpha and seed (the
/// random, saliency-mask and mask attacks).
pub(crate) fn whole_image_jobs(goals: &[Goal], config: &AttackConfig) -> Vec<Job> {
    goals
        .iter()
        .enumerate()
        .map(|(image, &goal)| Job {
            image,
            goal,
            region: Region::Whole,
            alpha: config.alpha,
            seed: config.seed,
        })
        .collect()
}

/// Checks and runs `jobs` on `pixels` (`N x C x H x W` in [0, 1]) against `model`; results in
/// job order.
pub fn run(
    model: &dyn Classifier,
    pixels: &Tensor,
    jobs: &[Job],
    masking: &Masking,
    config: &AttackConfig,
) -> Result<Vec<AttackOutcome>> {
    let (n, _, h, w) = pixels.dims4()?;
    ensure(config.batch_size > 0, || {
        "batch_size must be at least 1".into()
    })?;
    ensure(config.confidence > 0.0 && config.confidence < 1.0, || {
        format!("confidence must be in (0, 1), got {}", config.confidence)
    })?;
    ensure(config.lr > 0.0, || {
        format!("learning rate must be positive, got {}", config.lr)
    })?;
    if let Masking::Fixed(masks) = masking {
        ensure(masks.len() == jobs.len(), || {
            format!("{} masks for {} jobs", masks.len(), jobs.len())
        })?;
    }
    for job in jobs {
        ensure(job.image < n, || {
            format!("job for image {} of {n}", job.image)
        })?;
        ensure(job.alpha > 0.0 && job.alpha.is_finite(), || {
            format!(
                "alpha must be a positive number of pixel units, got {}",
                job.alpha
            )
        })?;
        if let Goal::Targeted(t) = job.goal {
            ensure(t < model.num_classes(), || {
                format!(
                    "target class {t} is out of range for {} with {} classes",
                    model.arch(),
                    model.num_classes()
                )
            })?;
        }
        if let Region::Window { top, left, size } | Region::Outside { top, left, size } = job.region
        {
            ensure(size > 0 && top + size <= h && left + size <= w, || {
                format!(
                    "a {size}x{size} window at ({top}, {left}) does not fit in the {h}x{w} image"
                )
            })?;
        }
    }
    if matches!(config.generator, GeneratorChoice::Paper) {
        ensure((h, w) == (224, 224), || {
            format!("the authors' generator makes 224x224 noise but the images are {h}x{w}; use the generic generator")
        })?;
    }
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut start = 0;
    while start < jobs.len() {
        // A bank needs one kind of generator: runs of jobs with the same noise shape.
        let mut end = start + 1;
        while end < jobs.len()
            && end - start < config.batch_size
            && jobs[end].region.noise_side() == jobs[start].region.noise_side()
        {
            end += 1;
        }
        let fixed = match masking {
            Masking::Fixed(m) => Some(&m[start..end]),
            _ => None,
        };
        outcomes
            .extend(Bank::new(model, pixels, &jobs[start..end], fixed, masking, config)?.run()?);
        start = end;
    }
    Ok(outcomes)
}

/// A learned mask network and its optimiser.
enum Learner {
    UNet(UNet),
    Free(FreeMask),
}

impl Learner {
    fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Learner::UNet(u) => u.forward(images)?,
            Learner::Free(f) => f.forward()?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        match self {
            Learner::UNet(u) => u.vars(),
            Learner::Free(f) => vec![f.logits.clone()],
        }
    }
}

/// One bank of jobs attacked together.
struct Bank<'a> {
    model: &'a dyn Classifier,
    config: &'a AttackConfig,
    jobs: &'a [Job],
    masking: &'a Masking,
    /// `B x C x H x W` clean images.
    images: Tensor,
    generators: NoiseGenerators,
    adam: Adam,
    /// `B x 1 x 1 x 1`.
    alphas: Tensor,
    /// Per job: the label the loss is about (original label, or target) and the clean label.
    loss_labels: Vec<u32>,
    clean_labels: Vec<usize>,
    origin_losses: Vec<f64>,
    fixed_mask: Option<Tensor>,
    /// `B x 1 x H x W`, 0 in each preserved window and 1 elsewhere, when the bank has one.
    outside_windows: Option<Tensor>,
    learner: Option<(Learner, Adam, LearnedMask, Tensor)>,
}

impl<'a> Bank<'a> {
    fn new(
        model: &'a dyn Classifier,
        pixels: &Tensor,
        jobs: &'a [Job],
        fixed: Option<&[Tensor]>,
        masking: &'a Masking,
        config: &'a AttackConfig,
    ) -> Result<Self> {
        let device = model.device().clone();
        let index = Tensor::new(
            jobs.iter()
                .map(|j| j.image as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            pixels.device(),
        )?;
        let images = pixels
            .index_select(&index, 0)?
            .to_device(&device)?
            .to_dtype(DType::F32)?
            .detach();
        let (_, _, h, w) = images.dims4()?;
        let kind = match jobs[0].region {
            Region::Window { size, .. } => GeneratorKind::Generic {
                height: size,
                width: size,
            },
            Region::Whole | Region::Outside { .. } => match config.generator {
                GeneratorChoice::Paper => GeneratorKind::Paper,
                GeneratorChoice::Auto if (h, w) == (224, 224) => GeneratorKind::Paper,
                _ => GeneratorKind::Generic {
                    height: h,
                    width: w,
                },
            },
        };
        let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
        let at = Placement::f32(&device);
        let generators = NoiseGenerators::new(kind, &seeds, &at)?;
        let adam_config = AdamConfig {
            lr: config.lr,
            beta1: config.betas.0,
            beta2: config.betas.1,
            ..AdamConfig::default()
        };
        let adam = Adam::new(generators.vars(), adam_config)?;
        let alphas = Tensor::from_vec(
            jobs.iter().map(|j| j.alpha as f32).collect::<Vec<_>>(),
            (jobs.len(), 1, 1, 1),
            &device,
        )?;
        // The clean images' labels and losses.
        let clean_logits = model.forward(&images)?;
        let clean_log_probs = candle_nn::ops::log_softmax(&clean_logits, 1)?;
        let clean_labels: Vec<usize> = clean_logits
            .argmax(1)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let label_index = Tensor::new(
            clean_labels
                .iter()
                .map(|&c| c as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &device,
        )?
        .unsqueeze(1)?;
        let origin_losses: Vec<f64> = clean_log_probs
            .gather(&label_index, 1)?
            .squeeze(1)?
            .neg()?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        let loss_labels = jobs
            .iter()
            .zip(&clean_labels)
            .map(|(j, &c)| match j.goal {
                Goal::Untargeted => c as u32,
                Goal::Targeted(t) => t as u32,
            })
            .collect();
        let outside_windows = if jobs
            .iter()
            .any(|j| matches!(j.region, Region::Outside { .. }))
        {
            let keep: Vec<f32> = jobs
                .iter()
                .flat_map(|j| match j.region {
                    Region::Outside { top, left, size } => WindowGrid::new(size, size)
                        .mask((h, w), (top, left))
                        .into_iter()
                        .map(|inside| 1.0 - inside)
                        .collect(),
                    _ => vec![1.0; h * w],
                })
                .collect();
            Some(Tensor::from_vec(keep, (jobs.len(), 1, h, w), &device)?)
        } else {
            None
        };
        let fixed_mask = match fixed {
            Some(masks) => {
                let masks = masks
                    .iter()
                    .map(|m| -> Result<Tensor> {
                        ensure(m.dims() == [h, w], || {
                            format!("a mask of shape {:?} for {h}x{w} images", m.dims())
                        })?;
                        Ok(m.to_device(&device)?.to_dtype(DType::F32)?.unsqueeze(0)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::stack(&masks, 0)?)
            }
            None => None,
        };
        let learner = match masking {
            Masking::Learned(spec) => {
                let learner = match spec.network {
                    MaskNetwork::UNet { base } => {
                        Learner::UNet(UNet::new(images.dim(1)?, base, &seeds, &at)?)
                    }
                    MaskNetwork::Free { cells } => {
                        Learner::Free(FreeMask::new(jobs.len(), (cells, cells), (h, w), 3.0, &at)?)
                    }
                };
                let mask_adam = Adam::new(
                    learner.vars(),
                    AdamConfig {
                        lr: spec.lr,
                        beta1: config.betas.0,
                        beta2: config.betas.1,
                        ..AdamConfig::default()
                    },
                )?;
                let reference =
                    saliency_masks(model, &images, &clean_labels, &spec.reference, 0.0)?;
                Some((learner, mask_adam, *spec, reference))
            }
            _ => None,
        };
        Ok(Self {
            model,
            config,
            jobs,
            masking,
            images,
            generators,
            adam,
            alphas,
            loss_labels,
            clean_labels,
            origin_losses,
            fixed_mask,
            outside_windows,
            learner,
        })
    }

    /// The generators' noise placed on the images: `B x 3 x H x W`.
    fn placed_noise(&self) -> Result<Tensor> {
        let noise = self.generators.forward()?;
        let (_, _, h, w) = self.images.dims4()?;
        // A bank's noise is all window-sized or all image-sized (`Region::noise_side`).
        if let Some(keep) = &self.outside_windows {
            return Ok(noise.broadcast_mul(keep)?);
        }
        if !self
            .jobs
            .iter()
            .any(|j| matches!(j.region, Region::Window { .. }))
        {
            return Ok(noise);
        }
        let placed = self
            .jobs
            .iter()
            .enumerate()
            .map(|(b, job)| -> Result<Tensor> {
                let n = noise.get(b)?;
                Ok(match job.region {
                    Region::Window { top, left, size } => n
                        .pad_with_zeros(1, top, h - top - size)?
                        .pad_with_zeros(2, left, w - left - size)?,
                    Region::Whole | Region::Outside { .. } => n,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&placed, 0)?)
    }

    fn run(mut self) -> Result<Vec<AttackOutcome>> {
        let b = self.jobs.len();
        let device = self.images.device().clone();
        let cap = self.config.max_iters;
        let mut outcomes: Vec<Option<AttackOutcome>> = vec![None; b];
        let mut active = vec![true; b];
        let mut probabilities: Vec<Vec<f64>> = vec![Vec::with_capacity(cap + 1); b];
        let bar = progress(self.config.progress, cap as u64, b);
        let mut saliency_mask: Option<Tensor> = None;
        for k in 0..=cap {
            let noise = self.placed_noise()?;
            // The mask of this iteration.
            let mask = match self.masking {
                Masking::None => None,
                Masking::Fixed(_) => self.fixed_mask.clone(),
                Masking::Saliency {
                    method,
                    every,
                    threshold,
                } => {
                    let due = match every {
                        Some(e) => *e > 0 && k % e == 0,
                        None => false,
                    };
                    if saliency_mask.is_none() || due {
                        // Recomputed on the current perturbed image (the clean one at first).
                        let current = match &saliency_mask {
                            None => self.images.clone(),
                            Some(m) => {
                                perturb(&self.images, &noise, &self.alphas, Some(m))?.detach()
                            }
                        };
                        saliency_mask = Some(saliency_masks(
                            self.model,
                            &current,
                            &self.clean_labels,
                            method,
                            *threshold,
                        )?);
                    }
                    saliency_mask.clone()
                }
                Masking::Learned(_) => match &self.learner {
                    Some((learner, _, _, _)) => Some(learner.forward(&self.images)?),
                    None => None,
                },
            };
            let perturbed = perturb(&self.images, &noise, &self.alphas, mask.as_ref())?;
            let logits = self.model.forward(&perturbed)?;
            let log_probs = candle_nn::ops::log_softmax(&logits, 1)?;
            let index = Tensor::new(self.loss_labels.as_slice(), &device)?.unsqueeze(1)?;
            let ce = log_probs.gather(&index, 1)?.squeeze(1)?.neg()?; // B
                                                                      // Untargeted jobs maximise the cross-entropy of their label, targeted ones minimise it.
            let signs: Vec<f32> = self
                .jobs
                .iter()
                .map(|j| {
                    if j.goal == Goal::Untargeted {
                        -1.0
                    } else {
                        1.0
                    }
                })
                .collect();
            let mut loss = (&ce * Tensor::new(signs.as_slice(), &device)?)?;
            if let (Some((_, _, spec, reference)), Some(m)) = (&self.learner, &mask) {
                loss = (loss + mask_terms(m, reference, spec)?)?;
            }
            // One read-back per iteration: label, its probability and the loss of every job.
            let predicted = logits.argmax(1)?.to_dtype(DType::F32)?;
            let confidence = log_probs.max(1)?.exp()?;
            let attacked = ce.neg()?.exp()?;
            let summary = Tensor::stack(
                &[
                    &predicted,
                    &confidence,
                    &loss.to_dtype(DType::F32)?,
                    &attacked.to_dtype(DType::F32)?,
                ],
                1,
            )?
            .to_vec2::<f32>()?;
            for j in 0..b {
                if !active[j] {
                    continue;
                }
                let [label, conf, value, p] =
                    [summary[j][0], summary[j][1], summary[j][2], summary[j][3]];
                probabilities[j].push(p as f64);
                let label = label as usize;
                let met = match self.jobs[j].goal {
                    Goal::Untargeted => label != self.clean_labels[j],
                    Goal::Targeted(t) => label == t,
                } && conf as f64 > self.config.confidence;
                let failure = if !value.is_finite() {
                    Some("the loss became NaN or infinite".to_string())
                } else if !met && k == cap {
                    Some(format!("no success within {cap} iterations"))
                } else {
                    None
                };
                if met || failure.is_some() {
                    active[j] = false;
                    let alpha = self.jobs[j].alpha;
                    let m = mask.as_ref().map(|m| m.get(j)).transpose()?;
                    let delta = match &m {
                        Some(m) => (noise.get(j)?.broadcast_mul(m)? * alpha)?,
                        None => (noise.get(j)? * alpha)?,
                    };
                    outcomes[j] = Some(AttackOutcome {
                        alpha,
                        origin_loss: self.origin_losses[j],
                        final_loss: value as f64,
                        label_from: self.clean_labels[j],
                        label_to: label,
                        target: match self.jobs[j].goal {
                            Goal::Targeted(t) => Some(t),
                            Goal::Untargeted => None,
                        },
                        iterations: k,
                        confidence: conf as f64,
                        probabilities: std::mem::take(&mut probabilities[j]),
                        success: met,
                        failure,
                        noise: delta.detach(),
                        perturbed: perturbed.get(j)?.detach(),
                        mask: m.map(|m| m.squeeze(0)).transpose()?.map(|m| m.detach()),
                    });
                }
            }
            bar.set_position(k as u64);
            bar.set_message(format!(
                "{} of {b} done",
                active.iter().filter(|a| !**a).count()
            ));
            if active.iter().all(|a| !a) || k == cap {
                break;
            }
            let on = Tensor::new(
                active
                    .iter()
                    .map(|&a| a as u8 as f32)
                    .collect::<Vec<_>>()
                    .as_slice(),
                &device,
            )?;
            let grads = (loss * &on)?.sum_all()?.backward()?;
            self.adam.step_active(&grads, &on)?;
            if let Some((_, mask_adam, _, _)) = &mut self.learner {
                mask_adam.step_active(&grads, &on)?;
            }
        }
        bar.finish_and_clear();
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every job ends with an outcome"))
            .collect())
    }
}

/// `clamp(images + alpha * noise * mask, 0, 1)`.
fn perturb(
    images: &Tensor,
    noise: &Tensor,
    alphas: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let delta = noise.broadcast_mul(alphas)?;
    let delta = match mask {
        Some(m) => delta.broadcast_mul(m)?,
        None => delta,
    };
    Ok((images + delta)?.clamp(0f32, 1f32)?)
}

/// Normalised SmoothGrad maps of `images` for `labels` as `B x 1 x H x W` masks, values below
/// `threshold` set to zero.
pub(crate) fn saliency_masks(
    model: &dyn Classifier,
    images: &Tensor,
    labels: &[usize],
    method: &SmoothGrad,
    threshold: f32,
) -> Result<Tensor> {
    let maps = Method::SmoothGrad(*method)
        .explain(model, &images.detach(), labels)?
        .unsqueeze(1)?;
    if threshold > 0.0 {
        let keep = maps.ge(threshold as f64)?.to_dtype(maps.dtype())?;
        Ok((maps * keep)?)
    } else {
        Ok(maps)
    }
}

/// The mask attack's extra loss per job: sparsity, total variation and closeness to SmoothGrad.
fn mask_terms(mask: &Tensor, reference: &Tensor, spec: &LearnedMask) -> Result<Tensor> {
    let sparsity = match spec.sparsity {
        Sparsity::Area => mask.mean((1, 2, 3))?,
        Sparsity::Literal => mask.affine(-1.0, 1.0)?.abs()?.mean((1, 2, 3))?,
    };
    let (_, _, h, w) = mask.dims4()?;
    let dy = (mask.narrow(2, 1, h - 1)? - mask.narrow(2, 0, h - 1)?)?.abs()?;
    let dx = (mask.narrow(3, 1, w - 1)? - mask.narrow(3, 0, w - 1)?)?.abs()?;
    let tv = (dy.powf(spec.beta)?.mean((1, 2, 3))? + dx.powf(spec.beta)?.mean((1, 2, 3))?)?;
    let mse = (mask - reference)?.sqr()?.mean((1, 2, 3))?;
    Ok(((sparsity * spec.lambda_sparsity)? + (tv * spec.lambda_tv)? + (mse * spec.gamma)?)?)
}

fn progress(show: bool, len: u64, jobs: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] iteration {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("attacking {jobs}"));
    bar
}

/// Checks and returns the device and sizes the attacks need.
pub(crate) fn image_size(pixels: &Tensor) -> Result<(usize, usize)> {
    let dims = pixels.dims();
    ensure(dims.len() == 4, || {
        format!("expected images of shape (N, C, H, W), got {dims:?}")
    })?;
    Ok((dims[2], dims[3]))
}
