//! The one attack loop every variant runs (paper, section II).
//!
//! Each job gets its own noise generator, drawn from the job's seed (its latent `z` is drawn once
//! and fixed). At every iteration the generators make noise, the noise is scaled by alpha,
//! multiplied by the job's mask (none, a window, a saliency map, a learned mask), added to the
//! image and clamped to [0, 1]; the classifier judges the perturbed images; a job that meets its
//! goal (untargeted: the label changed, targeted: the label is the target, each with confidence
//! above the threshold) stops and keeps its result, the others take an Adam step on their
//! generator (lr 2e-4, betas 0.5/0.999) and go on, up to the cap. Jobs run in banks of at most
//! `batch_size` images per classifier pass, and of no more generators than
//! [`GENERATOR_BUDGET`] holds; the classifier's weights are constants and get no gradients.

use crate::error::{ensure, Error, Result};
use crate::nets::bank::Placement;
use crate::nets::free_mask::FreeMask;
use crate::nets::generator::{GeneratorKind, NoiseGenerators};
use crate::nets::unet::UNet;
use crate::outcome::AttackOutcome;
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use vulnmap_models::{differentiable_log_odds, log_odds, Classifier};
use vulnmap_saliency::{
    area_gap, field_of_view, GaussianBlur, Method, SmoothGrad, WindowGrid, FIELD_OF_VIEW_THRESHOLD,
};
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
    /// Any label but this one: the loss is `-CE(class)`. An attack map that explains a class
    /// other than the predicted one (the image's true label, as localisation benchmarks ask)
    /// attacks that class; on a correctly classified image it is [`Goal::Untargeted`].
    Away(usize),
    /// This label: the loss is `CE(target)`.
    Targeted(usize),
}

impl Goal {
    /// The class the attack's loss is about, for an image whose clean label is `clean`.
    pub fn class(self, clean: usize) -> usize {
        match self {
            Goal::Untargeted => clean,
            Goal::Away(c) | Goal::Targeted(c) => c,
        }
    }

    /// Whether the attack drives its class's probability down (untargeted or away) rather
    /// than up (targeted).
    pub fn moves_away(self) -> bool {
        !matches!(self, Goal::Targeted(_))
    }

    /// `+1` where the attack drives its class's log-odds down, `-1` where up: the sign that
    /// makes "what the attack took from its class" positive when it succeeds.
    pub fn direction(self) -> f32 {
        if self.moves_away() {
            1.0
        } else {
            -1.0
        }
    }

    /// Whether a perturbed image labelled `label` meets the goal (`clean`: the clean label).
    pub fn met_by(self, label: usize, clean: usize) -> bool {
        match self {
            Goal::Targeted(t) => label == t,
            _ => label != self.class(clean),
        }
    }

    /// The class asked for, for a targeted goal.
    pub fn target(self) -> Option<usize> {
        match self {
            Goal::Targeted(t) => Some(t),
            _ => None,
        }
    }

    /// Whether the class this goal names is one of `model`'s.
    pub(crate) fn check(self, model: &dyn Classifier) -> Result<()> {
        let (what, class) = match self {
            Goal::Untargeted => return Ok(()),
            Goal::Away(c) => ("class to attack", c),
            Goal::Targeted(t) => ("target class", t),
        };
        ensure(class < model.num_classes(), || {
            format!(
                "{what} {class} is out of range for {} with {} classes",
                model.arch(),
                model.num_classes()
            )
        })
    }
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
    /// A `size x size` window at `(top, left)` blurred as occlusion's baseline (a Gaussian of
    /// sigma [`OCCLUDED_SIGMA`]), the generator's window-sized noise added to it: occlusion
    /// sharpened by an attack (the local attack's occlude game).
    Occluded {
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

/// Sigma, in pixels, of the blur inside an occluded window: occlusion's default blurred baseline.
pub const OCCLUDED_SIGMA: f64 = 10.0;

/// The largest log-odds at which a loss of `log p` still has a usable gradient in `dtype`. It
/// scales as `1 - p = e^-lo`, which log-softmax's backward pass keeps exact where `p` itself
/// rounds to 1, until it nears the dtype's smallest normal numbers: `e^-87` for f32 and bf16,
/// where `e^-40` leaves a margin of 20 orders; `e^-9.7` for f16, where `e^-8` leaves less than one.
fn precise_log_odds(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 8.0,
        _ => 40.0,
    }
}

impl Region {
    /// Generators of one bank must be alike: whole-image noise, or noise of one window size.
    fn noise_side(&self) -> Option<usize> {
        match *self {
            Region::Window { size, .. } | Region::Occluded { size, .. } => Some(size),
            Region::Whole | Region::Outside { .. } => None,
        }
    }

    /// The window's corner and side, for the regions that have one.
    fn window(&self) -> Option<(usize, usize, usize)> {
        match *self {
            Region::Window { top, left, size }
            | Region::Occluded { top, left, size }
            | Region::Outside { top, left, size } => Some((top, left, size)),
            Region::Whole => None,
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

/// What the learned mask does to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum MaskGame {
    /// The paper's Eq. 6: the generator's noise goes through the mask; the attack stops when the
    /// label flips.
    Noise,
    /// A preserve / delete pair on a blurred baseline (as extremal perturbation's dual game and
    /// iGOS++): the masked region is replaced by the blurred image plus the generator's noise
    /// (deleted), and everything but the masked region is (preserved, against the same noise).
    /// The mask lowers the label's log-probability on the deleted image and keeps it on the
    /// preserved one, at a given area; the generator attacks the deleted image. Runs every update
    /// (a map, not a flip); untargeted only. The `mask_attack` step's default: it makes the
    /// better map (docs/attack_maps.md).
    #[default]
    Dual,
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

/// What the dual game's two halves score: the explained class's log-probability, or its
/// log-odds (`log(p / (1 - p))`, from the logits), which keeps moving where the model is sure and
/// the log-probability sits at 0 (extremal perturbation scores its masks by the class's logit
/// for the same reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum DualReward {
    /// The class's log-probability.
    #[default]
    LogProbability,
    /// The class's log-odds.
    LogOdds,
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
    /// gamma (1 in the noise game, 0 in [`LearnedMask::dual`]), weight of `MSE(M_c(I), m)`
    /// towards the clean image's SmoothGrad map of the class the attack moves away from. In the
    /// dual game the pull breaks the ties between the regions a mask keeps in full: of several
    /// kept regions the model uses (a lesion, the optic disc), the one whose pixels the class's
    /// gradient also singles out keeps the maximum.
    pub gamma: f64,
    /// The SmoothGrad map the mask is pulled towards (not computed when `gamma` is 0).
    pub reference: SmoothGrad,
    /// What the mask does (default the paper's [`MaskGame::Noise`]).
    pub game: MaskGame,
    /// The dual game's mask area, a fraction of the image in (0, 1) (default 0.1); it replaces
    /// the sparsity term there.
    pub area: f64,
    /// Weight of the dual game's area constraint (extremal perturbation's sorted-mask gap).
    pub lambda_area: f64,
    /// Sigma, in pixels, of the dual game's blurred baseline.
    pub blur_sigma: f64,
    /// The free mask's largest shift either way, as a fraction of a cell, drawn afresh at each
    /// update so the mask cannot align with the model's grid (Fong and Vedaldi's jitter); 0:
    /// none. The map is the unshifted mask.
    pub jitter: f64,
    /// The free mask's Gaussian smoothing, sigma as a fraction of a cell; 0: none (the
    /// paper's). Extremal perturbation's masks are smooth too: a smooth mask keeps blobs, not
    /// the thin lines along high-contrast edges that a blurred baseline otherwise makes it
    /// keep, so its maximum lands on the evidence.
    pub smooth: f64,
    /// Blur the dual game's baseline within each image's field of view
    /// ([`vulnmap_saliency::field_of_view`]), for images framed by a black surround (fundus
    /// photographs, angiograms): a plain blur mixes the surround into the frame's edge, and the
    /// mask then keeps that edge sharp rather than the evidence.
    pub field_of_view: bool,
    /// What the dual game's halves score (default the log-probability).
    pub reward: DualReward,
}

impl LearnedMask {
    /// Adam's learning rate for the dual game's free mask, whose logits start at 0 and must
    /// reach either side within a few dozen updates.
    pub const DUAL_LR: f64 = 0.05;

    /// The dual game's jitter: half a cell.
    pub const DUAL_JITTER: f64 = 0.5;

    /// The dual game with a free `cells x cells` mask: area 0.1, a baseline blurred with
    /// sigma 10, a jitter of half a cell.
    pub fn dual(cells: usize) -> Self {
        Self {
            network: MaskNetwork::Free { cells },
            lr: Self::DUAL_LR,
            game: MaskGame::Dual,
            jitter: Self::DUAL_JITTER,
            gamma: 0.0,
            ..Self::default()
        }
    }
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
            game: MaskGame::Noise,
            area: 0.1,
            lambda_area: 100.0,
            blur_sigma: 10.0,
            jitter: 0.0,
            smooth: 0.0,
            field_of_view: false,
            reward: DualReward::LogProbability,
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
    let keep = Keep {
        images: true,
        contributions: false,
    };
    run_keeping(model, pixels, jobs, masking, config, keep)
}

/// What outcomes keep beside their scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keep {
    /// Each outcome's noise and perturbed image.
    pub images: bool,
    /// Each outcome's [`AttackOutcome::contribution`] (banks without a mask).
    pub contributions: bool,
}

/// [`run`], keeping what `keep` asks for.
pub(crate) fn run_keeping(
    model: &dyn Classifier,
    pixels: &Tensor,
    jobs: &[Job],
    masking: &Masking,
    config: &AttackConfig,
    keep: Keep,
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
        job.goal.check(model)?;
        if let Some((top, left, size)) = job.region.window() {
            ensure(size > 0 && top + size <= h && left + size <= w, || {
                format!(
                    "a {size}x{size} window at ({top}, {left}) does not fit in the {h}x{w} image"
                )
            })?;
        }
    }
    if let Masking::Learned(spec) = masking {
        check_learned(spec, jobs)?;
    }
    if matches!(config.generator, GeneratorChoice::Paper) {
        ensure((h, w) == (224, 224), || {
            format!("the authors' generator makes 224x224 noise but the images are {h}x{w}; use the generic generator")
        })?;
    }
    // The dual game passes two images per job.
    let per_pass = match masking {
        Masking::Learned(spec) if spec.game == MaskGame::Dual => (config.batch_size / 2).max(1),
        _ => config.batch_size,
    };
    let mut outcomes = Vec::with_capacity(jobs.len());
    // One placement for every bank: the networks' initial weights are drawn once per seed.
    let at = Placement::f32(model.device());
    let mut start = 0;
    while start < jobs.len() {
        let kind = generator_kind(&jobs[start].region, config.generator, (h, w));
        let per_bank = per_pass.min(jobs_within_budget(kind)?);
        // A bank needs one kind of generator: runs of jobs with the same noise shape.
        let mut end = start + 1;
        while end < jobs.len()
            && end - start < per_bank
            && jobs[end].region.noise_side() == jobs[start].region.noise_side()
        {
            end += 1;
        }
        let fixed = match masking {
            Masking::Fixed(m) => Some(&m[start..end]),
            _ => None,
        };
        let bank = Bank::new(
            model,
            pixels,
            &jobs[start..end],
            fixed,
            masking,
            config,
            &at,
        )?;
        outcomes.extend(bank.run(keep)?);
        start = end;
    }
    Ok(outcomes)
}

/// The generator a job's region needs: window-sized for window noise, else the chosen one for
/// `h x w` images.
fn generator_kind(
    region: &Region,
    choice: GeneratorChoice,
    (h, w): (usize, usize),
) -> GeneratorKind {
    match *region {
        Region::Window { size, .. } | Region::Occluded { size, .. } => GeneratorKind::Generic {
            height: size,
            width: size,
        },
        Region::Whole | Region::Outside { .. } => match choice {
            GeneratorChoice::Paper => GeneratorKind::Paper,
            GeneratorChoice::Auto if (h, w) == (224, 224) => GeneratorKind::Paper,
            _ => GeneratorKind::Generic {
                height: h,
                width: w,
            },
        },
    }
}

/// Bytes of generator state one bank may hold. Each job's generator keeps four copies of its
/// weights in f32 (weights, gradients, Adam's two moments): the authors' 49 M-weight generator
/// (780 MB of such state, 1.4 GB at its peak with the update's temporaries) gets a bank of its
/// own whatever `batch_size` says; small generators are bounded by `batch_size` alone.
pub const GENERATOR_BUDGET: usize = 1 << 30;

/// How many jobs of `kind` fit in [`GENERATOR_BUDGET`] (at least one).
fn jobs_within_budget(kind: GeneratorKind) -> Result<usize> {
    let per_job = kind.weights()? * 4 * std::mem::size_of::<f32>();
    Ok((GENERATOR_BUDGET / per_job.max(1)).max(1))
}

/// `B x 1 x H x W`: 1 inside each job's window that `window` picks from its region, 0 elsewhere;
/// `None` when it picks none.
fn window_masks(
    jobs: &[Job],
    (h, w): (usize, usize),
    device: &candle_core::Device,
    window: impl Fn(&Region) -> Option<(usize, usize, usize)>,
) -> Result<Option<Tensor>> {
    if !jobs.iter().any(|j| window(&j.region).is_some()) {
        return Ok(None);
    }
    let inside: Vec<f32> = jobs
        .iter()
        .flat_map(|j| match window(&j.region) {
            Some((top, left, size)) => WindowGrid::new(size, size).mask((h, w), (top, left)),
            None => vec![0.0; h * w],
        })
        .collect();
    Ok(Some(Tensor::from_vec(
        inside,
        (jobs.len(), 1, h, w),
        device,
    )?))
}

/// Checks a learned mask's settings against the jobs.
fn check_learned(spec: &LearnedMask, jobs: &[Job]) -> Result<()> {
    ensure(spec.lr > 0.0 && spec.beta > 0.0, || {
        "the mask's learning rate and beta must be positive".into()
    })?;
    ensure(spec.jitter >= 0.0 && spec.jitter.is_finite(), || {
        format!("jitter is a fraction of a cell, got {}", spec.jitter)
    })?;
    ensure(spec.gamma >= 0.0 && spec.gamma.is_finite(), || {
        format!(
            "gamma weighs the pull towards SmoothGrad, 0 or more, got {}",
            spec.gamma
        )
    })?;
    ensure(spec.smooth >= 0.0 && spec.smooth.is_finite(), || {
        format!(
            "smooth is a fraction of a cell, 0 or more, got {}",
            spec.smooth
        )
    })?;
    ensure(
        spec.smooth == 0.0 || matches!(spec.network, MaskNetwork::Free { .. }),
        || "smooth applies to the free mask only; the U-Net's mask is not smoothed".into(),
    )?;
    ensure(
        spec.reward == DualReward::LogProbability || spec.game == MaskGame::Dual,
        || "the log-odds reward scores the dual game's halves; the noise game has none".into(),
    )?;
    ensure(!spec.field_of_view || spec.game == MaskGame::Dual, || {
        "field_of_view blurs the dual game's baseline; the noise game has none".into()
    })?;
    if spec.game == MaskGame::Dual {
        ensure(spec.area > 0.0 && spec.area < 1.0, || {
            format!(
                "the dual game's mask area is a fraction in (0, 1), got {}",
                spec.area
            )
        })?;
        ensure(spec.blur_sigma > 0.0 && spec.blur_sigma.is_finite(), || {
            format!(
                "the dual game's blur sigma must be positive, got {}",
                spec.blur_sigma
            )
        })?;
        ensure(spec.lambda_area >= 0.0, || {
            format!("lambda_area must not be negative, got {}", spec.lambda_area)
        })?;
        ensure(jobs.iter().all(|j| j.goal.moves_away()), || {
            "the dual game maps a class it attacks: its goal is untargeted".into()
        })?;
    }
    Ok(())
}

/// A learned mask network and its optimiser.
enum Learner {
    UNet(UNet),
    Free(FreeMask),
}

impl Learner {
    /// The masks; a free mask shifted by `shift` pixels (rows, columns).
    fn forward(&self, images: &Tensor, shift: (isize, isize)) -> Result<Tensor> {
        Ok(match self {
            Learner::UNet(u) => u.forward(images)?,
            Learner::Free(f) => f.forward(shift)?,
        })
    }

    /// How far a free mask may be shifted (0 for the U-Net).
    fn margin(&self) -> usize {
        match self {
            Learner::UNet(_) => 0,
            Learner::Free(f) => f.margin(),
        }
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
    /// Per job: the clean image's log-odds of its loss label.
    origin_log_odds: Vec<f64>,
    /// Per job (`B`): its goal's [`Goal::direction`]; the loss is the cross-entropy times its
    /// negative.
    directions: Tensor,
    fixed_mask: Option<Tensor>,
    /// `B x 1 x H x W`, 0 in each preserved window and 1 elsewhere, when the bank has one.
    outside_windows: Option<Tensor>,
    /// What the noise is added to, when not the clean images: occluded windows blurred.
    substrate: Option<Tensor>,
    learner: Option<MaskLearner>,
}

/// The mask attack's network, its optimiser, its settings, what it needs beside the images.
struct MaskLearner {
    network: Learner,
    adam: Adam,
    spec: LearnedMask,
    /// The clean images' SmoothGrad maps (`B x 1 x H x W`), when `gamma` pulls towards them.
    reference: Option<Tensor>,
    /// The dual game's blurred images.
    baseline: Option<Tensor>,
    /// Draws the jitter's shifts.
    rng: vulnmap_data::random::SeededRng,
}

impl MaskLearner {
    /// The mask of update `k` of `cap`: jittered, except at the last update (the map).
    fn mask(&mut self, images: &Tensor, k: usize, cap: usize) -> Result<Tensor> {
        use rand::Rng;
        let m = self.network.margin() as i64;
        let shift = if m > 0 && k < cap {
            (
                self.rng.random_range(-m..=m) as isize,
                self.rng.random_range(-m..=m) as isize,
            )
        } else {
            (0, 0)
        };
        self.network.forward(images, shift)
    }
}

impl<'a> Bank<'a> {
    fn new(
        model: &'a dyn Classifier,
        pixels: &Tensor,
        jobs: &'a [Job],
        fixed: Option<&[Tensor]>,
        masking: &'a Masking,
        config: &'a AttackConfig,
        at: &Placement,
    ) -> Result<Self> {
        let device = at.device.clone();
        // Each distinct image once (a local attack's windows share theirs), and each job's.
        let mut distinct: Vec<u32> = jobs.iter().map(|j| j.image as u32).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let of_job: Vec<u32> = jobs
            .iter()
            .map(|j| distinct.partition_point(|&i| i < j.image as u32) as u32)
            .collect();
        let of_job = Tensor::new(of_job.as_slice(), &device)?;
        let distinct_images = pixels
            .index_select(&Tensor::new(distinct.as_slice(), pixels.device())?, 0)?
            .to_device(&device)?
            .to_dtype(DType::F32)?
            .detach();
        let images = distinct_images.index_select(&of_job, 0)?;
        let (_, _, h, w) = images.dims4()?;
        let kind = generator_kind(&jobs[0].region, config.generator, (h, w));
        let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
        let generators = NoiseGenerators::new(kind, &seeds, at)?;
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
        // The clean images' labels and losses, one pass per distinct image.
        let clean_logits = model.logits(&distinct_images)?.index_select(&of_job, 0)?;
        let clean_log_probs = candle_nn::ops::log_softmax(&clean_logits, 1)?;
        let clean_labels: Vec<usize> = clean_logits
            .argmax(1)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        // The class each job's loss is about.
        let loss_labels: Vec<u32> = jobs
            .iter()
            .zip(&clean_labels)
            .map(|(j, &c)| j.goal.class(c) as u32)
            .collect();
        let goals: Vec<Goal> = jobs.iter().map(|j| j.goal).collect();
        let directions = Tensor::new(
            goals
                .iter()
                .map(|g| g.direction())
                .collect::<Vec<f32>>()
                .as_slice(),
            &device,
        )?;
        let origin_losses = origin_losses(&clean_log_probs, &goals, &clean_labels)?;
        let origin_log_odds: Vec<f64> = log_odds(&clean_logits, &loss_labels)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        // Occluded windows: the images with each job's window blurred (each distinct image
        // blurred once), where its noise goes.
        let substrate = match window_masks(jobs, (h, w), &device, |r| match *r {
            Region::Occluded { top, left, size } => Some((top, left, size)),
            _ => None,
        })? {
            Some(inside) => {
                let blurred = GaussianBlur::full(OCCLUDED_SIGMA)
                    .apply(&distinct_images)?
                    .index_select(&of_job, 0)?;
                Some((&images + (blurred - &images)?.broadcast_mul(&inside)?)?.detach())
            }
            None => None,
        };
        let outside_windows = window_masks(jobs, (h, w), &device, |r| match *r {
            Region::Outside { top, left, size } => Some((top, left, size)),
            _ => None,
        })?
        .map(|inside| inside.affine(-1.0, 1.0))
        .transpose()?;
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
                let network = match spec.network {
                    MaskNetwork::UNet { base } => {
                        Learner::UNet(UNet::new(images.dim(1)?, base, &seeds, at)?)
                    }
                    MaskNetwork::Free { cells } => {
                        // On everywhere for the noise game (the authors' start at ones); half on
                        // for the dual game, where on and off are both a move.
                        let start = match spec.game {
                            MaskGame::Noise => 3.0,
                            MaskGame::Dual => 0.0,
                        };
                        Learner::Free(FreeMask::new(
                            jobs.len(),
                            (cells, cells),
                            (h, w),
                            start,
                            (spec.jitter * h.max(w) as f64 / cells as f64).round() as usize,
                            spec.smooth * h.max(w) as f64 / cells as f64,
                            at,
                        )?)
                    }
                };
                let adam = Adam::new(
                    network.vars(),
                    AdamConfig {
                        lr: spec.lr,
                        beta1: config.betas.0,
                        beta2: config.betas.1,
                        ..AdamConfig::default()
                    },
                )?;
                let reference = if spec.gamma > 0.0 {
                    // The map of the class each attack is about: the label it moves away from
                    // (the prediction, for a plain untargeted attack), a targeted one's clean
                    // prediction.
                    let explained: Vec<usize> = jobs
                        .iter()
                        .zip(loss_labels.iter().zip(&clean_labels))
                        .map(|(j, (&loss, &clean))| match j.goal.moves_away() {
                            true => loss as usize,
                            false => clean,
                        })
                        .collect();
                    Some(saliency_masks(
                        model,
                        &images,
                        &explained,
                        &spec.reference,
                        0.0,
                    )?)
                } else {
                    None
                };
                let baseline = match spec.game {
                    MaskGame::Noise => None,
                    MaskGame::Dual => Some(blurred_baseline(
                        &images,
                        spec.blur_sigma,
                        spec.field_of_view,
                    )?),
                };
                Some(MaskLearner {
                    network,
                    adam,
                    spec: *spec,
                    reference,
                    baseline,
                    rng: vulnmap_data::random::rng(config.seed, "mask jitter"),
                })
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
            origin_log_odds,
            directions,
            fixed_mask,
            outside_windows,
            substrate,
            learner,
        })
    }

    /// Each job's [`AttackOutcome::contribution`]: pixel by pixel, what its first perturbation
    /// took from the log-odds of its loss label (gave them, for a job moving towards a class), by
    /// the trapezoid rule between the clean image `x` and the perturbed one `x~`: over the
    /// channels, the sum of `(x - x~) * (grad lo(x) + grad lo(x~)) / 2`, exact where the log-odds
    /// are quadratic in the pixels and no noise was clamped. `loss_grad` is the attack loss's
    /// gradient at `x~` (per job, in its noise's shape; zero where the noise was clamped),
    /// `log_odds` the log-odds at `x~`.
    fn contributions(
        &self,
        loss_grad: &Tensor,
        perturbed: &Tensor,
        log_odds: &[f32],
    ) -> Result<Vec<Tensor>> {
        let clean = self.clean_log_odds_gradients()?;
        self.jobs
            .iter()
            .enumerate()
            .map(|(j, job)| {
                // Window noise has the window's shape.
                let within = |t: Tensor| -> Result<Tensor> {
                    Ok(match job.region {
                        Region::Window { top, left, size }
                        | Region::Occluded { top, left, size } => {
                            t.narrow(1, top, size)?.narrow(2, left, size)?
                        }
                        Region::Whole | Region::Outside { .. } => t,
                    })
                };
                let taken = within((self.images.get(j)? - perturbed.get(j)?.detach())?)?;
                let at_clean = within(clean.get(j)?)?;
                // The loss is +-log p: its gradient over 1 - p = 1 / (1 + e^lo) is the
                // log-odds' in the loss's sign. Where the loss's gradient underflows, the clean
                // end stands for both.
                let lo = log_odds[j] as f64;
                let ends = match lo <= precise_log_odds(self.model.dtype()) {
                    true => ((at_clean + (loss_grad.get(j)? * (1.0 + lo.exp()))?)? * 0.5)?,
                    false => at_clean,
                };
                Ok((taken * ends)?.sum(0)?)
            })
            .collect()
    }

    /// Each job's gradient of its loss label's log-odds at its clean image (`B x C x H x W`),
    /// times its goal's [`Goal::direction`] (the sign of `+-log p` in its loss): one batched
    /// backward pass over the bank's distinct (image, label) pairs.
    fn clean_log_odds_gradients(&self) -> Result<Tensor> {
        let mut pairs: Vec<(usize, u32)> = Vec::new();
        let mut first_job: Vec<u32> = Vec::new();
        let mut row_of_job: Vec<u32> = Vec::with_capacity(self.jobs.len());
        for (j, (job, &label)) in self.jobs.iter().zip(&self.loss_labels).enumerate() {
            let row = match pairs.iter().position(|&p| p == (job.image, label)) {
                Some(row) => row,
                None => {
                    pairs.push((job.image, label));
                    first_job.push(j as u32);
                    pairs.len() - 1
                }
            };
            row_of_job.push(row as u32);
        }
        let device = self.images.device();
        let x = Var::from_tensor(
            &self
                .images
                .index_select(&Tensor::new(first_job.as_slice(), device)?, 0)?,
        )?;
        let labels: Vec<u32> = pairs.iter().map(|&(_, label)| label).collect();
        let odds = differentiable_log_odds(&self.model.logits(x.as_tensor())?, &labels)?;
        let grads = odds.sum_all()?.backward()?;
        let grad = grads.get(x.as_tensor()).ok_or_else(|| {
            Error::InvalidParameter(format!(
                "{} gave no gradient for its input",
                self.model.arch()
            ))
        })?;
        Ok(grad
            .index_select(&Tensor::new(row_of_job.as_slice(), device)?, 0)?
            .broadcast_mul(&self.directions.reshape((self.jobs.len(), 1, 1, 1))?)?)
    }

    /// The generators' noise placed on the images: `B x 3 x H x W`; `probe`, a zero variable of
    /// the generators' output shape added to their noise, gets the noise's gradient.
    fn placed_noise(&self, probe: Option<&Var>) -> Result<Tensor> {
        let noise = self.generators.forward()?;
        let noise = match probe {
            Some(p) => (noise + p.as_tensor())?,
            None => noise,
        };
        let (_, _, h, w) = self.images.dims4()?;
        // A bank's noise is all window-sized or all image-sized (`Region::noise_side`).
        if let Some(keep) = &self.outside_windows {
            return Ok(noise.broadcast_mul(keep)?);
        }
        if self.jobs[0].region.noise_side().is_none() {
            return Ok(noise);
        }
        let placed = self
            .jobs
            .iter()
            .enumerate()
            .map(|(b, job)| -> Result<Tensor> {
                let n = noise.get(b)?;
                Ok(match job.region {
                    Region::Window { top, left, size } | Region::Occluded { top, left, size } => n
                        .pad_with_zeros(1, top, h - top - size)?
                        .pad_with_zeros(2, left, w - left - size)?,
                    Region::Whole | Region::Outside { .. } => n,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&placed, 0)?)
    }

    /// Attacks every job of the bank, its outcomes keeping what `keep` asks for.
    fn run(mut self, keep: Keep) -> Result<Vec<AttackOutcome>> {
        let keep_images = keep.images;
        let b = self.jobs.len();
        let device = self.images.device().clone();
        let cap = self.config.max_iters;
        let mut outcomes: Vec<Option<AttackOutcome>> = vec![None; b];
        let mut active = vec![true; b];
        let mut probabilities: Vec<Vec<f64>> = vec![Vec::with_capacity(cap + 1); b];
        let mut judged_log_odds: Vec<Vec<f64>> = vec![Vec::with_capacity(cap + 1); b];
        let bar = progress(self.config.progress, cap as u64, b);
        let mut saliency_mask: Option<Tensor> = None;
        let mut contributions: Vec<Option<Tensor>> = vec![None; b];
        // Every job's log-odds of its loss label at its first judged image.
        let mut first_log_odds: Vec<f32> = Vec::new();
        for k in 0..=cap {
            // The first judged images' gradient, read off a zero variable added to the noise:
            // candle keeps no gradient of an intermediate tensor.
            let probe = if keep.contributions && k == 0 && matches!(self.masking, Masking::None) {
                Some(self.generators.zero_noise()?)
            } else {
                None
            };
            let noise = self.placed_noise(probe.as_ref())?;
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
                Masking::Learned(_) => match &mut self.learner {
                    Some(learner) => Some(learner.mask(&self.images, k, cap)?),
                    None => None,
                },
            };
            let baseline = self.learner.as_ref().and_then(|l| l.baseline.as_ref());
            let (perturbed, preserved) = match (baseline, &mask) {
                (Some(baseline), Some(m)) => {
                    let (deleted, preserved) =
                        dual_images(&self.images, baseline, &noise, &self.alphas, m)?;
                    (deleted, Some(preserved))
                }
                _ => (
                    perturb(
                        self.substrate.as_ref().unwrap_or(&self.images),
                        &noise,
                        &self.alphas,
                        mask.as_ref(),
                    )?,
                    None,
                ),
            };
            let index = Tensor::new(self.loss_labels.as_slice(), &device)?.unsqueeze(1)?;
            // Only the dual game takes the log-odds reward (`check_learned`).
            let by_log_odds = self
                .learner
                .as_ref()
                .is_some_and(|l| l.spec.reward == DualReward::LogOdds);
            // What a loss term drives down to raise the class: its cross-entropy, or its negated
            // log-odds.
            let penalty = |logits: &Tensor| -> Result<Tensor> {
                Ok(if by_log_odds {
                    differentiable_log_odds(logits, &self.loss_labels)?.neg()?
                } else {
                    candle_nn::ops::log_softmax(logits, 1)?
                        .gather(&index, 1)?
                        .squeeze(1)?
                        .neg()?
                })
            };
            let (logits, preserved_penalty) = match &preserved {
                None => (self.model.logits(&perturbed)?, None),
                Some(kept) => {
                    // One pass for both images of each job.
                    let both = self.model.logits(&Tensor::cat(&[&perturbed, kept], 0)?)?;
                    let kept_penalty = penalty(&both.narrow(0, b, b)?)?;
                    (both.narrow(0, 0, b)?, Some(kept_penalty))
                }
            };
            let log_probs = candle_nn::ops::log_softmax(&logits, 1)?;
            // Each job's cross-entropy (`B`): jobs moving away from their class maximise it,
            // targeted ones minimise it.
            let ce = log_probs.gather(&index, 1)?.squeeze(1)?.neg()?;
            let driven = if by_log_odds {
                penalty(&logits)?
            } else {
                ce.clone()
            };
            let mut loss = driven.broadcast_mul(&self.directions.neg()?)?;
            if let Some(kept) = preserved_penalty {
                // The dual game also keeps the label on the preserved image.
                loss = (loss + kept)?;
            }
            if let (Some(learner), Some(m)) = (&self.learner, &mask) {
                loss = (loss + mask_terms(m, learner.reference.as_ref(), &learner.spec)?)?;
            }
            // The dual game makes a map: it runs every update.
            let stops_early = preserved.is_none();
            // One read-back per iteration: label, its probability and the loss of every job.
            let predicted = logits.argmax(1)?.to_dtype(DType::F32)?;
            let confidence = log_probs.max(1)?.exp()?;
            let attacked = ce.neg()?.exp()?;
            let odds = log_odds(&logits, &self.loss_labels)?;
            let summary = Tensor::stack(
                &[
                    &predicted,
                    &confidence,
                    &loss.to_dtype(DType::F32)?,
                    &attacked.to_dtype(DType::F32)?,
                    &odds,
                ],
                1,
            )?
            .to_vec2::<f32>()?;
            if k == 0 {
                first_log_odds = summary.iter().map(|row| row[4]).collect();
            }
            for j in 0..b {
                if !active[j] {
                    continue;
                }
                let [label, conf, value, p, odds] = [
                    summary[j][0],
                    summary[j][1],
                    summary[j][2],
                    summary[j][3],
                    summary[j][4],
                ];
                probabilities[j].push(p as f64);
                judged_log_odds[j].push(odds as f64);
                let label = label as usize;
                let met = self.jobs[j].goal.met_by(label, self.clean_labels[j])
                    && conf as f64 > self.config.confidence;
                let failure = if !value.is_finite() {
                    Some("the loss became NaN or infinite".to_string())
                } else if !met && k == cap {
                    Some(format!("no success within {cap} iterations"))
                } else {
                    None
                };
                if (met && (stops_early || k == cap)) || failure.is_some() {
                    active[j] = false;
                    let alpha = self.jobs[j].alpha;
                    let m = mask.as_ref().map(|m| m.get(j)).transpose()?;
                    let delta = match &m {
                        _ if !keep_images => None,
                        _ if !stops_early => Some((perturbed.get(j)? - self.images.get(j)?)?),
                        Some(m) => Some((noise.get(j)?.broadcast_mul(m)? * alpha)?),
                        None => Some((noise.get(j)? * alpha)?),
                    };
                    outcomes[j] = Some(AttackOutcome {
                        alpha,
                        origin_loss: self.origin_losses[j],
                        final_loss: value as f64,
                        label_from: self.clean_labels[j],
                        label_to: label,
                        target: self.jobs[j].goal.target(),
                        iterations: k,
                        confidence: conf as f64,
                        probabilities: std::mem::take(&mut probabilities[j]),
                        origin_log_odds: self.origin_log_odds[j],
                        log_odds: std::mem::take(&mut judged_log_odds[j]),
                        success: met,
                        failure,
                        noise: delta.map(|d| d.detach()),
                        perturbed: keep_images
                            .then(|| perturbed.get(j).map(|p| p.detach()))
                            .transpose()?,
                        mask: m.map(|m| m.squeeze(0)).transpose()?.map(|m| m.detach()),
                        contribution: None,
                    });
                }
            }
            bar.set_position(k as u64);
            bar.set_message(format!(
                "{} of {b} done",
                active.iter().filter(|a| !**a).count()
            ));
            let finished = active.iter().all(|a| !a) || k == cap;
            if finished && probe.is_none() {
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
            // A probe wants every job's gradient; the optimiser still moves only active jobs.
            let grads = match &probe {
                Some(_) => loss.sum_all()?.backward()?,
                None => (loss * &on)?.sum_all()?.backward()?,
            };
            if let Some(p) = &probe {
                let grad = grads.get(p.as_tensor()).ok_or_else(|| {
                    Error::InvalidParameter(format!(
                        "the noise of a bank of {b} attacks got no gradient: the classifier's output does not depend on its input"
                    ))
                })?;
                // The noise's gradient is alpha times the perturbed image's where it was not
                // clamped.
                let grad = grad.broadcast_div(&self.alphas)?;
                contributions = self
                    .contributions(&grad, &perturbed, &first_log_odds)?
                    .into_iter()
                    .map(Some)
                    .collect();
            }
            if finished {
                break;
            }
            // The iteration after the last step only judges: no moments to keep.
            let last = k + 1 == cap;
            let learner = self.learner.as_mut().map(|l| &mut l.adam);
            for adam in std::iter::once(&mut self.adam).chain(learner) {
                match last {
                    true => adam.last_step_active(&grads, &on)?,
                    false => adam.step_active(&grads, &on)?,
                }
            }
        }
        bar.finish_and_clear();
        Ok(outcomes
            .into_iter()
            .zip(contributions)
            .map(|(o, contribution)| AttackOutcome {
                contribution,
                ..o.expect("every job ends with an outcome")
            })
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

/// Table I's origin loss of each goal: the clean image's cross-entropy (from its log-probabilities,
/// `B x K`) against the class the attack moves away from, or a targeted attack's clean label.
pub(crate) fn origin_losses(
    clean_log_probs: &Tensor,
    goals: &[Goal],
    clean: &[usize],
) -> Result<Vec<f64>> {
    let classes: Vec<u32> = goals
        .iter()
        .zip(clean)
        .map(|(g, &c)| if g.moves_away() { g.class(c) } else { c } as u32)
        .collect();
    let index = Tensor::new(classes.as_slice(), clean_log_probs.device())?.unsqueeze(1)?;
    Ok(clean_log_probs
        .gather(&index, 1)?
        .squeeze(1)?
        .neg()?
        .to_dtype(DType::F64)?
        .to_vec1()?)
}

/// The dual game's pair: the masked region replaced by the blurred image plus noise (deleted),
/// and everything but the masked region replaced so (preserved). The preserved image's noise is a
/// constant: the generator attacks only the deleted image.
fn dual_images(
    images: &Tensor,
    baseline: &Tensor,
    noise: &Tensor,
    alphas: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let noisy = |n: &Tensor| -> Result<Tensor> {
        Ok((baseline + n.broadcast_mul(alphas)?)?.clamp(0f32, 1f32)?)
    };
    let substrate = noisy(noise)?;
    let deleted = (images + (substrate - images)?.broadcast_mul(mask)?)?;
    let fixed = noisy(&noise.detach())?;
    let preserved = (&fixed + (images - &fixed)?.broadcast_mul(mask)?)?;
    Ok((deleted, preserved))
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

/// The mask attack's extra loss per job: sparsity (in the dual game, the gap to the mask of
/// its area), total variation and closeness to SmoothGrad.
fn mask_terms(mask: &Tensor, reference: Option<&Tensor>, spec: &LearnedMask) -> Result<Tensor> {
    let b = mask.dim(0)?;
    let sparsity = match (spec.game, spec.sparsity) {
        (MaskGame::Dual, _) => {
            (area_gap(&mask.flatten_from(1)?, &vec![spec.area; b])? * spec.lambda_area)?
        }
        (MaskGame::Noise, Sparsity::Area) => (mask.mean((1, 2, 3))? * spec.lambda_sparsity)?,
        (MaskGame::Noise, Sparsity::Literal) => {
            (mask.affine(-1.0, 1.0)?.abs()?.mean((1, 2, 3))? * spec.lambda_sparsity)?
        }
    };
    let tv = total_variation(mask, spec.beta)?;
    let terms = (sparsity + (tv * spec.lambda_tv)?)?;
    Ok(match reference {
        Some(r) => (terms + ((mask - r)?.sqr()?.mean((1, 2, 3))? * spec.gamma)?)?,
        None => terms,
    })
}

/// Each mask's total variation (`B`, of `B x C x H x W` masks): `mean |grad m|^beta` down the
/// rows plus across the columns.
pub(crate) fn total_variation(mask: &Tensor, beta: f64) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let dy = (mask.narrow(2, 1, h - 1)? - mask.narrow(2, 0, h - 1)?)?.abs()?;
    let dx = (mask.narrow(3, 1, w - 1)? - mask.narrow(3, 0, w - 1)?)?.abs()?;
    Ok((dy.powf(beta)?.mean((1, 2, 3))? + dx.powf(beta)?.mean((1, 2, 3))?)?)
}

/// The dual game's baseline: `images` blurred by a Gaussian of `sigma` pixels, within each
/// image's field of view when asked.
pub(crate) fn blurred_baseline(images: &Tensor, sigma: f64, within_view: bool) -> Result<Tensor> {
    let blur = GaussianBlur::full(sigma);
    Ok(if within_view {
        let view = field_of_view(images, FIELD_OF_VIEW_THRESHOLD)?;
        blur.apply_within(images, &view)?
    } else {
        blur.apply(images)?
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_authors_generator_banks_alone_and_window_generators_many() -> Result<()> {
        // The authors' DCGAN: 48.7 M transposed-convolution weights and 8 K BatchNorm ones.
        let paper = GeneratorKind::Paper.weights()?;
        assert!((48_000_000..50_000_000).contains(&paper), "{paper}");
        assert_eq!(jobs_within_budget(GeneratorKind::Paper)?, 1);
        let window = GeneratorKind::Generic {
            height: 32,
            width: 32,
        };
        assert!(jobs_within_budget(window)? >= 60);
        Ok(())
    }

    #[test]
    fn the_dual_pair_swaps_image_and_noisy_baseline_and_only_deletion_trains_the_generator(
    ) -> Result<()> {
        let dev = Device::Cpu;
        let images = Tensor::full(0.8f32, (1, 1, 2, 2), &dev)?;
        let baseline = Tensor::full(0.2f32, (1, 1, 2, 2), &dev)?;
        let noise = Var::from_tensor(&Tensor::new(&[[[[0.5f32, -0.5], [1.0, 0.0]]]], &dev)?)?;
        let alphas = Tensor::full(0.2f32, (1, 1, 1, 1), &dev)?;
        let mask = Tensor::new(&[[[[1f32, 0.0], [0.0, 0.5]]]], &dev)?;
        let (deleted, preserved) =
            dual_images(&images, &baseline, noise.as_tensor(), &alphas, &mask)?;
        // Noisy baseline: 0.2 + 0.2 * noise = [[0.3, 0.1], [0.4, 0.2]].
        let close = |t: &Tensor, want: [f32; 4]| -> Result<()> {
            let got = t.flatten_all()?.to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{got:?} against {want:?}");
            }
            Ok(())
        };
        close(&deleted, [0.3, 0.8, 0.8, 0.5])?;
        close(&preserved, [0.8, 0.1, 0.4, 0.5])?;
        let grads = (deleted.sum_all()? + preserved.sum_all()?)?.backward()?;
        // d(deleted)/d(noise) = alpha * mask; the preserved image adds nothing.
        close(
            grads.get(noise.as_tensor()).expect("a gradient"),
            [0.2, 0.0, 0.0, 0.1],
        )
    }
}
