//! The pipeline file: what a YAML experiment may say, with the paper's values as defaults.
//!
//! Every struct denies unknown keys, so a misspelt setting is an error, not a silent default.
//! Steps are written as one-key maps, `- smoothgrad: {samples: 25}`; `{}` takes every default.

use serde::{Deserialize, Serialize};

/// A whole pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Seed of every random draw that a step does not seed itself.
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto`; `vulnmap run --device` overrides it.
    #[serde(default = "default_device")]
    pub device: String,
    /// Absent only when the data is the fundus benchmark, whose trained model is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    pub data: DataSpec,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub outputs: Outputs,
    /// Images per forward/backward pass (and attacks per bank).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Images per unit of work: the granularity of `results.jsonl`, `--resume` and `--shard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<usize>,
}

fn default_device() -> String {
    "auto".into()
}
fn default_batch_size() -> usize {
    8
}

/// The classifier under study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `resnet18|34|50|101|152`, `efficientnet-lite0` or `tiny-resnet`.
    pub arch: String,
    /// A checkpoint path or `hf://owner/name[/file][@rev]`; absent: the hub default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// What maps and attacks explain: `logit`, `centred-logit`, `log-probability`.
    #[serde(default = "default_score")]
    pub score: String,
}

fn default_score() -> String {
    "logit".into()
}

/// Where the images come from: exactly one of `files`, `glob`, `manifest`, `folders`,
/// `synthetic` or `fundus_benchmark`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glob: Option<String>,
    /// A CSV manifest (path, label, modality, patient_id, mask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// A folder with one sub-folder per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folders: Option<String>,
    /// A synthetic fundus set generated into the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticSpec>,
    /// The synthetic fundus benchmark: generated, tiny-resnet trained on it, both cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fundus_benchmark: Option<BenchmarkSpec>,
    /// Which patient-grouped split of a dataset to use: `train`, `val`, `test` or `all`.
    #[serde(default = "default_split")]
    pub split: String,
    /// Only images with a non-empty lesion mask (the benchmark's localisation metrics).
    #[serde(default)]
    pub lesions_only: bool,
    /// At most this many images, the first ones in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Resize the shorter side to this before the centre crop (default: 256/224 of the input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<u32>,
}

fn default_split() -> String {
    "test".into()
}

/// A synthetic fundus set (see `vulnmap_data::synthetic::FundusConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    pub patients: usize,
    pub size: usize,
    pub seed: u64,
    pub lesion_prevalence: f64,
    pub fa_fraction: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            patients: 20,
            size: 224,
            seed: 0,
            lesion_prevalence: 0.5,
            fa_fraction: 1.0,
        }
    }
}

/// The fundus benchmark (see `vulnmap_models::fundus_benchmark`); defaults are its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchmarkSpec {
    pub patients: usize,
    pub size: usize,
    pub epochs: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for BenchmarkSpec {
    fn default() -> Self {
        let d = vulnmap_models::fundus_benchmark::BenchmarkConfig::default();
        Self {
            patients: d.fundus.patients,
            size: d.fundus.size,
            epochs: d.epochs,
            lr: d.lr,
            seed: d.seed,
        }
    }
}

/// What to write besides `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outputs {
    /// Maps, overlays, noise and perturbed images as PNGs.
    pub figures: bool,
    /// `report.html` with the tables and figures embedded.
    pub report: bool,
    /// Images shown in the report (all are in `figures/`).
    pub report_images: usize,
}

impl Default for Outputs {
    fn default() -> Self {
        Self {
            figures: true,
            report: true,
            report_images: 8,
        }
    }
}

/// One step, applied to every image (or, for `finetune`, to the dataset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Classify(Classify),
    Gradient(Gradient),
    Smoothgrad(SmoothGradStep),
    IntegratedGradients(IntegratedGradientsStep),
    GradCam(GradCamStep),
    Occlusion(OcclusionStep),
    Rise(RiseStep),
    RandomAttack(RandomAttackStep),
    AlphaSweep(AlphaSweepStep),
    LocalAttack(LocalAttackStep),
    SaliencyAttack(SaliencyAttackStep),
    MaskAttack(MaskAttackStep),
    Metrics(MetricsStep),
    Finetune(FinetuneStep),
}

impl Step {
    /// The key that names this kind of step in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Classify(_) => "classify",
            Step::Gradient(_) => "gradient",
            Step::Smoothgrad(_) => "smoothgrad",
            Step::IntegratedGradients(_) => "integrated_gradients",
            Step::GradCam(_) => "grad_cam",
            Step::Occlusion(_) => "occlusion",
            Step::Rise(_) => "rise",
            Step::RandomAttack(_) => "random_attack",
            Step::AlphaSweep(_) => "alpha_sweep",
            Step::LocalAttack(_) => "local_attack",
            Step::SaliencyAttack(_) => "saliency_attack",
            Step::MaskAttack(_) => "mask_attack",
            Step::Metrics(_) => "metrics",
            Step::Finetune(_) => "finetune",
        }
    }

    /// The id the user gave, if any.
    pub fn given_id(&self) -> Option<&str> {
        match self {
            Step::Classify(s) => s.id.as_deref(),
            Step::Gradient(s) => s.id.as_deref(),
            Step::Smoothgrad(s) => s.id.as_deref(),
            Step::IntegratedGradients(s) => s.id.as_deref(),
            Step::GradCam(s) => s.id.as_deref(),
            Step::Occlusion(s) => s.id.as_deref(),
            Step::Rise(s) => s.id.as_deref(),
            Step::RandomAttack(s) => s.id.as_deref(),
            Step::AlphaSweep(s) => s.id.as_deref(),
            Step::LocalAttack(s) => s.id.as_deref(),
            Step::SaliencyAttack(s) => s.id.as_deref(),
            Step::MaskAttack(s) => s.id.as_deref(),
            Step::Metrics(s) => s.id.as_deref(),
            Step::Finetune(s) => s.id.as_deref(),
        }
    }

    /// Whether the step makes one saliency map per image (which `metrics` can score).
    pub fn makes_maps(&self) -> bool {
        matches!(
            self,
            Step::Gradient(_)
                | Step::Smoothgrad(_)
                | Step::IntegratedGradients(_)
                | Step::GradCam(_)
                | Step::Occlusion(_)
                | Step::Rise(_)
                | Step::LocalAttack(_)
                | Step::MaskAttack(_)
        )
    }
}

/// Top-k classes of each image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Classify {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub top: usize,
}

impl Default for Classify {
    fn default() -> Self {
        Self { id: None, top: 5 }
    }
}

/// The vanilla input gradient.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gradient {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// SmoothGrad (`aggregate`: `plain`, `squared` or `vargrad`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoothGradStep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub samples: usize,
    pub noise_level: f64,
    pub aggregate: String,
}

impl Default for SmoothGradStep {
    fn default() -> Self {
        Self {
            id: None,
            samples: 25,
            noise_level: 0.15,
            aggregate: "plain".into(),
        }
    }
}

/// Integrated Gradients (`baseline`: `black` or `blurred`; `integration`: `gauss-legendre`,
/// `riemann-middle`, `riemann-trapezoid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegratedGradientsStep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub steps: usize,
    pub baseline: String,
    /// Blur of the `blurred` baseline, in pixels.
    pub sigma: f64,
    pub integration: String,
}

impl Default for IntegratedGradientsStep {
    fn default() -> Self {
        Self {
            id: None,
            steps: 50,
            baseline: "blurred".into(),
            sigma: 10.0,
            integration: "gauss-legendre".into(),
        }
    }
}

/// Grad-CAM on a named layer (default: the model's last feature map).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GradCamStep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
}

/// Sliding-window occlusion (`baseline`: `black`, `grey` or `blurred`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OcclusionStep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub window: usize,
    pub stride: usize,
    pub baseline: String,
    pub sigma: f64,
}

impl Default for OcclusionStep {
    fn default() -> Self {
        Self {
            id: None,
            window: 32,
            stride: 16,
            baseline: "blurred".into(),
            sigma: 10.0,
        }
    }
}

/// RISE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiseStep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub masks: usize,
    pub cells: usize,
    pub keep: f64,
}

impl Default for RiseStep {
    fn default() -> Self {
        Self {
            id: None,
            masks: 1000,
            cells: 7,
            keep: 0.5,
        }
    }
}

/// Settings every generator attack shares.
#[derive(Debug, Clone, PartialEq)]
pub struct AttackSettings {
    /// `untargeted` or `targeted` (with `target`).
    pub mode: String,
    pub target: Option<usize>,
    pub alpha: f64,
    pub max_iters: usize,
    pub lr: f64,
    pub confidence: f64,
    /// `auto`, `paper` (the authors' DCGAN, 224 x 224 only) or `generic`.
    pub generator: String,
}

impl Default for AttackSettings {
    /// The paper's random attack: alpha 0.02, 100 updates, Adam 2e-4, confidence 0.9.
    fn default() -> Self {
        Self {
            mode: "untargeted".into(),
            target: None,
            alpha: 0.02,
            max_iters: 100,
            lr: 2e-4,
            confidence: 0.9,
            generator: "auto".into(),
        }
    }
}

/// An attack step: [`AttackSettings`]' keys written inline (serde's `flatten` would lose the
/// line numbers of errors and the denial of unknown keys), then the step's own.
macro_rules! attack_step {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty = $default:expr),* $(,)? } alpha = $alpha:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            #[serde(skip_serializing_if = "Option::is_none")]
            pub id: Option<String>,
            pub mode: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            pub target: Option<usize>,
            pub alpha: f64,
            pub max_iters: usize,
            pub lr: f64,
            pub confidence: f64,
            pub generator: String,
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                let a = AttackSettings::default();
                Self {
                    id: None,
                    mode: a.mode,
                    target: a.target,
                    alpha: $alpha,
                    max_iters: a.max_iters,
                    lr: a.lr,
                    confidence: a.confidence,
                    generator: a.generator,
                    $($field: $default,)*
                }
            }
        }

        impl $name {
            /// The shared attack settings.
            pub fn attack(&self) -> AttackSettings {
                AttackSettings {
                    mode: self.mode.clone(),
                    target: self.target,
                    alpha: self.alpha,
                    max_iters: self.max_iters,
                    lr: self.lr,
                    confidence: self.confidence,
                    generator: self.generator.clone(),
                }
            }
        }
    };
}

attack_step! {
    /// The random attack (Table I), repeated over `rounds` seeds.
    RandomAttackStep {
        rounds: usize = 1,
    } alpha = 0.02
}

attack_step! {
    /// Iterations against alpha (Fig. 6), `rounds` seeds per alpha.
    AlphaSweepStep {
        alphas: Vec<f64> = vec![0.005, 0.01, 0.02, 0.05, 0.1],
        rounds: usize = 5,
    } alpha = 0.02
}

attack_step! {
    /// The local attack's window map (Figs. 7-8).
    LocalAttackStep {
        window: usize = 100,
        stride: usize = 50,
    } alpha = 0.02
}

attack_step! {
    /// The SmoothGrad-masked attack against random masks of the same budget (Figs. 9-10).
    SaliencyAttackStep {
        samples: usize = vulnmap_saliency::SmoothGrad::authors().samples,
        noise_level: f64 = vulnmap_saliency::SmoothGrad::authors().noise_level,
        /// Recompute the mask every this many updates; 0: once, on the clean image.
        every: usize = 1,
        threshold: f32 = 0.0,
        /// Random-mask controls: `permuted` (same values, shuffled) and/or `bernoulli`.
        controls: Vec<String> = vec!["permuted".into()],
    } alpha = 0.05
}

attack_step! {
    /// The mask attack of Eq. 6 (Fig. 11); `network`: `unet` or `free`.
    MaskAttackStep {
        network: String = "unet".into(),
        /// U-Net base channels.
        base: usize = 16,
        /// Free-mask cells per side.
        cells: usize = 14,
        mask_lr: f64 = vulnmap_attacks::LearnedMask::default().lr,
        /// `area` (the stated intent) or `literal` (Eq. 6 as printed).
        sparsity: String = "area".into(),
        lambda_sparsity: f64 = 1e-4,
        lambda_tv: f64 = 1e-2,
        beta: f64 = 3.0,
        gamma: f64 = 1.0,
        /// SmoothGrad samples of the map the mask is pulled towards.
        samples: usize = vulnmap_saliency::SmoothGrad::authors().samples,
    } alpha = 0.05
}

/// Scores the maps of earlier steps against the images' lesion masks and the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsStep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Ids of the map-making steps to score; empty: all of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub of: Vec<String>,
    /// `pointing_game`, `auroc`, `iou`, `deletion`, `insertion`.
    pub measures: Vec<String>,
    /// Pixels changed per deletion/insertion step (RISE: 224 at 224 x 224).
    pub pixels_per_step: usize,
}

impl Default for MetricsStep {
    fn default() -> Self {
        Self {
            id: None,
            of: Vec::new(),
            measures: vec![
                "pointing_game".into(),
                "auroc".into(),
                "deletion".into(),
                "insertion".into(),
            ],
            pixels_per_step: 224,
        }
    }
}

/// Fine-tunes `model` on the data's training split; later steps use the best checkpoint on the
/// data's `split`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneStep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub freeze_backbone: bool,
    /// Train from a fresh initialisation instead of the model's weights.
    pub scratch: bool,
    pub cosine: bool,
    pub flips: bool,
    pub noise: f64,
    /// Input side (images are resized and centre-cropped to it).
    pub size: usize,
}

impl Default for FinetuneStep {
    /// The paper's fine-tuning: Adam 1e-4, batch 32.
    fn default() -> Self {
        Self {
            id: None,
            epochs: 10,
            lr: 1e-4,
            batch_size: 32,
            freeze_backbone: false,
            scratch: false,
            cosine: false,
            flips: false,
            noise: 0.0,
            size: 224,
        }
    }
}
