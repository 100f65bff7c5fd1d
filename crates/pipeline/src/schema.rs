//! The pipeline file: what a YAML experiment may say, with the paper's values as defaults.
//!
//! Every struct denies unknown keys, so a misspelt setting is an error, not a silent default.
//! Steps are written as one-key maps, `- smoothgrad: {samples: 25}`; `{}` takes every default.

use serde::{Deserialize, Serialize};
use vulnmap_attacks::local::{LocalAttack, LocalGame, WindowScore, WindowSpread};
use vulnmap_attacks::saliency_attack::Control;
use vulnmap_attacks::{
    AttackMode, DualReward, GeneratorChoice, MaskGame, MaskNetworkKind, Sparsity,
};
use vulnmap_data::Split;
use vulnmap_models::{Arch, DeviceName, Score};
use vulnmap_onnx::Normalize;
use vulnmap_saliency::metrics::localisation::PointingGame;
use vulnmap_saliency::{
    Aggregate, BaselineKind, ExtremalReward, ExtremalVariant, Integration, OcclusionScore,
};

/// A whole pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Names the run: the report's title, the progress bar and `run.json`; letters, digits, `_`,
    /// `.` and `-` (no `..`), as step ids are, since both name files.
    pub name: String,
    /// Free text shown under the report's title (default: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Seed of every random draw that a step does not seed itself.
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto`; `vulnmap run --device` overrides it.
    #[serde(default)]
    pub device: DeviceName,
    /// Absent only when the data is the fundus benchmark, whose trained model is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// Where the images come from.
    pub data: DataSpec,
    /// What to do, in order (at least one); each a one-key map naming its kind.
    pub steps: Vec<Step>,
    /// What to write besides `results.jsonl` (default: figures and a report).
    #[serde(default)]
    pub outputs: Outputs,
    /// Images per forward/backward pass (and attacks per bank).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Images per unit of work: the granularity of `results.jsonl`, `--resume` and `--shard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<usize>,
    /// Which class every map, attack map and metric explains (default `predicted`).
    #[serde(default, skip_serializing_if = "Explained::is_predicted")]
    pub explain: Explained,
}

/// Which class a pipeline's maps explain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Explained {
    /// The model's most probable class for each image.
    #[default]
    Predicted,
    /// Each image's label, whatever the model predicts: the localisation benchmarks' protocol
    /// (TorchRay's pointing game, Quantus's localisation metrics explain the true class), so that
    /// a misclassified image's map still shows the labelled class's evidence. Needs labelled
    /// data (a manifest, folders, synthetic data or the fundus benchmark).
    Label,
}

impl Explained {
    /// Whether this is the default, [`Explained::Predicted`].
    pub fn is_predicted(&self) -> bool {
        *self == Explained::Predicted
    }
}

fn default_batch_size() -> usize {
    8
}

/// The classifier under study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `resnet18|34|50|101|152`, `efficientnet-lite0` or `tiny-resnet` (or `onnx` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    /// A checkpoint path or `hf://owner/name[/file][@rev]`; absent: the hub default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// A classifier exported to ONNX (pixels in [0, 1] in, logits out), instead of `arch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx: Option<String>,
    /// For an ONNX graph exported without its normalisation: `imagenet`, `MEAN,STD` or
    /// `M1,M2,M3,S1,S2,S3` (default `none`: the graph normalises).
    #[serde(default, skip_serializing_if = "Normalize::is_none")]
    pub normalize: Normalize,
    /// The input size of an ONNX graph whose height and width are dynamic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<usize>,
    /// A file of class names, one per line (ONNX models; default the model's metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<String>,
    /// What maps and attacks explain: `logit`, `centred-logit`, `log-probability`.
    #[serde(default)]
    pub score: Score,
}

impl ModelSpec {
    /// A native architecture with `weights` (none: the hub default).
    pub fn native(arch: Arch, weights: Option<String>) -> Self {
        Self {
            arch: Some(arch),
            weights,
            onnx: None,
            normalize: Normalize::None,
            input_size: None,
            classes: None,
            score: Score::default(),
        }
    }

    /// The model's name for reports: the architecture or the ONNX file's name.
    pub fn name(&self) -> String {
        match (&self.arch, &self.onnx) {
            (Some(arch), _) => arch.to_string(),
            (None, Some(path)) => std::path::Path::new(path)
                .file_name()
                .map_or(path.clone(), |n| n.to_string_lossy().into_owned()),
            (None, None) => "no model".into(),
        }
    }
}

/// Where the images come from: exactly one of `files`, `glob`, `manifest`, `folders`,
/// `synthetic` or `fundus_benchmark`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Image files, in the order given; no labels or lesion masks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// A glob pattern for image files, taken in sorted order; no labels or lesion masks.
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
    #[serde(default)]
    pub split: Split,
    /// Only images with a non-empty lesion mask (the benchmark's localisation metrics).
    #[serde(default)]
    pub lesions_only: bool,
    /// At most this many images, the first ones in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Resize the shorter side to this before the centre crop (default: 256/224 of the input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<u32>,
    /// The classes of a manifest, in label order: a row with another label is an error. Without
    /// it the sorted distinct labels are the classes, and a manifest of one label is refused
    /// (its labels would not index the model's classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

/// A synthetic fundus set (see `vulnmap_data::synthetic::FundusConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    /// Patients to generate, two eyes each (default 20; at least 1).
    pub patients: usize,
    /// Image side in pixels (default 224; at least 32).
    pub size: usize,
    /// Seed of the generation: the same seed gives the same images (default 0).
    pub seed: u64,
    /// Probability that an eye has lesions, in [0, 1] (default 0.5).
    pub lesion_prevalence: f64,
    /// Probability that an eye has a fluorescein angiogram besides its colour
    /// photograph, in [0, 1] (default 1: every eye).
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

/// The fundus benchmark (see `vulnmap_train::fundus_benchmark`); defaults are its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchmarkSpec {
    /// Patients to generate, two eyes each (default 150; at least 10, for the 60/20/20 split).
    pub patients: usize,
    /// Image side in pixels, and so the model's input size (default 128; at least 32).
    pub size: usize,
    /// Training epochs of the tiny-resnet (default 12).
    pub epochs: usize,
    /// Adam's learning rate for that training (default 2e-3).
    pub lr: f64,
    /// Seed of the model's initial weights, the patient split and the shuffling (default 0).
    pub seed: u64,
}

impl Default for BenchmarkSpec {
    fn default() -> Self {
        let d = vulnmap_train::fundus_benchmark::BenchmarkConfig::default();
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
    /// `classify`: the most probable classes of each image.
    Classify(Classify),
    /// `gradient`: the vanilla input gradient map.
    Gradient(Gradient),
    /// `input_x_gradient`: the input x gradient map.
    InputXGradient(Gradient),
    /// `guided_backprop`: the guided backpropagation map.
    GuidedBackprop(Gradient),
    /// `smoothgrad`: the SmoothGrad map.
    Smoothgrad(SmoothGradStep),
    /// `integrated_gradients`: the Integrated Gradients map.
    IntegratedGradients(IntegratedGradientsStep),
    /// `grad_cam`: the Grad-CAM map.
    GradCam(CamStep),
    /// `grad_cam_plus_plus`: the Grad-CAM++ map.
    GradCamPlusPlus(CamStep),
    /// `layer_cam`: the LayerCAM map.
    LayerCam(CamStep),
    /// `eigen_cam`: the Eigen-CAM map (class-agnostic).
    EigenCam(CamStep),
    /// `score_cam`: the Score-CAM map.
    ScoreCam(CamStep),
    /// `occlusion`: the sliding-window occlusion map.
    Occlusion(OcclusionStep),
    /// `rise`: the RISE map.
    Rise(RiseStep),
    /// `extremal_perturbation`: Fong et al.'s smooth area-constrained masks, summed over areas.
    ExtremalPerturbation(ExtremalStep),
    /// `lime`: LIME's superpixel map.
    Lime(SurrogateStep),
    /// `kernel_shap`: KernelSHAP's superpixel map.
    KernelShap(SurrogateStep),
    /// `random_attack`: whole-image noise until the label flips.
    RandomAttack(RandomAttackStep),
    /// `alpha_sweep`: the random attack's iterations against the noise strength.
    AlphaSweep(AlphaSweepStep),
    /// `local_attack`: a map of how fast noise in each window flips the label.
    LocalAttack(LocalAttackStep),
    /// `saliency_attack`: noise masked by SmoothGrad, against random masks.
    SaliencyAttack(SaliencyAttackStep),
    /// `mask_attack`: noise masked by a learned mask, which is kept as a map.
    MaskAttack(MaskAttackStep),
    /// `mask_network`: one network trained on the training split to predict the dual game's
    /// mask of any image in one pass; its masks are the maps.
    MaskNetwork(MaskNetworkStep),
    /// `metrics`: scores of earlier steps' maps.
    Metrics(MetricsStep),
    /// `finetune`: trains the model before the other steps; must come first.
    Finetune(FinetuneStep),
}

impl Step {
    /// The kind of step (its YAML key).
    pub fn kind(&self) -> StepKind {
        match self {
            Step::Classify(_) => StepKind::Classify,
            Step::Gradient(_) => StepKind::Gradient,
            Step::InputXGradient(_) => StepKind::InputXGradient,
            Step::GuidedBackprop(_) => StepKind::GuidedBackprop,
            Step::Smoothgrad(_) => StepKind::Smoothgrad,
            Step::IntegratedGradients(_) => StepKind::IntegratedGradients,
            Step::GradCam(_) => StepKind::GradCam,
            Step::GradCamPlusPlus(_) => StepKind::GradCamPlusPlus,
            Step::LayerCam(_) => StepKind::LayerCam,
            Step::EigenCam(_) => StepKind::EigenCam,
            Step::ScoreCam(_) => StepKind::ScoreCam,
            Step::Occlusion(_) => StepKind::Occlusion,
            Step::Rise(_) => StepKind::Rise,
            Step::ExtremalPerturbation(_) => StepKind::ExtremalPerturbation,
            Step::Lime(_) => StepKind::Lime,
            Step::KernelShap(_) => StepKind::KernelShap,
            Step::RandomAttack(_) => StepKind::RandomAttack,
            Step::AlphaSweep(_) => StepKind::AlphaSweep,
            Step::LocalAttack(_) => StepKind::LocalAttack,
            Step::SaliencyAttack(_) => StepKind::SaliencyAttack,
            Step::MaskAttack(_) => StepKind::MaskAttack,
            Step::MaskNetwork(_) => StepKind::MaskNetwork,
            Step::Metrics(_) => StepKind::Metrics,
            Step::Finetune(_) => StepKind::Finetune,
        }
    }

    /// The id the user gave, if any.
    pub fn given_id(&self) -> Option<&str> {
        match self {
            Step::Classify(s) => s.id.as_deref(),
            Step::Gradient(s) | Step::InputXGradient(s) | Step::GuidedBackprop(s) => {
                s.id.as_deref()
            }
            Step::Smoothgrad(s) => s.id.as_deref(),
            Step::IntegratedGradients(s) => s.id.as_deref(),
            Step::GradCam(s)
            | Step::GradCamPlusPlus(s)
            | Step::LayerCam(s)
            | Step::EigenCam(s)
            | Step::ScoreCam(s) => s.id.as_deref(),
            Step::Occlusion(s) => s.id.as_deref(),
            Step::Rise(s) => s.id.as_deref(),
            Step::ExtremalPerturbation(s) => s.id.as_deref(),
            Step::Lime(s) | Step::KernelShap(s) => s.id.as_deref(),
            Step::RandomAttack(s) => s.id.as_deref(),
            Step::AlphaSweep(s) => s.id.as_deref(),
            Step::LocalAttack(s) => s.id.as_deref(),
            Step::SaliencyAttack(s) => s.id.as_deref(),
            Step::MaskAttack(s) => s.id.as_deref(),
            Step::MaskNetwork(s) => s.id.as_deref(),
            Step::Metrics(s) => s.id.as_deref(),
            Step::Finetune(s) => s.id.as_deref(),
        }
    }

    /// Whether the step makes one saliency map per image (which `metrics` can score).
    pub fn makes_maps(&self) -> bool {
        matches!(
            self,
            Step::Gradient(_)
                | Step::InputXGradient(_)
                | Step::GuidedBackprop(_)
                | Step::Smoothgrad(_)
                | Step::IntegratedGradients(_)
                | Step::GradCam(_)
                | Step::GradCamPlusPlus(_)
                | Step::LayerCam(_)
                | Step::EigenCam(_)
                | Step::ScoreCam(_)
                | Step::Occlusion(_)
                | Step::Rise(_)
                | Step::ExtremalPerturbation(_)
                | Step::Lime(_)
                | Step::KernelShap(_)
                | Step::LocalAttack(_)
                | Step::MaskAttack(_)
                | Step::MaskNetwork(_)
        )
    }
}

/// The kinds of step, spelled as their YAML keys (and as the `kind` of their result rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// `classify`.
    Classify,
    /// `gradient`.
    Gradient,
    /// `input_x_gradient`.
    InputXGradient,
    /// `guided_backprop`.
    GuidedBackprop,
    /// `smoothgrad`.
    Smoothgrad,
    /// `integrated_gradients`.
    IntegratedGradients,
    /// `grad_cam`.
    GradCam,
    /// `grad_cam_plus_plus`.
    GradCamPlusPlus,
    /// `layer_cam`.
    LayerCam,
    /// `eigen_cam`.
    EigenCam,
    /// `score_cam`.
    ScoreCam,
    /// `occlusion`.
    Occlusion,
    /// `rise`.
    Rise,
    /// `extremal_perturbation`.
    ExtremalPerturbation,
    /// `lime`.
    Lime,
    /// `kernel_shap`.
    KernelShap,
    /// `random_attack`.
    RandomAttack,
    /// `alpha_sweep`.
    AlphaSweep,
    /// `local_attack`.
    LocalAttack,
    /// `saliency_attack`.
    SaliencyAttack,
    /// `mask_attack`.
    MaskAttack,
    /// `mask_network`.
    MaskNetwork,
    /// `metrics`.
    Metrics,
    /// `finetune`.
    Finetune,
}

impl StepKind {
    /// The YAML key of this kind of step.
    pub fn name(self) -> String {
        spelling(&self)
    }
}

impl std::fmt::Display for StepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The steps that make one saliency map per image, as `vulnmap explain --method` and
/// `vulnmap eval --methods` name them (kebab-case there, the YAML key's snake_case here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum MapStep {
    /// The vanilla input gradient.
    Gradient,
    /// Input x gradient.
    #[cfg_attr(feature = "clap", value(alias = "input_x_gradient"))]
    InputXGradient,
    /// Guided backpropagation.
    #[cfg_attr(feature = "clap", value(alias = "guided_backprop"))]
    GuidedBackprop,
    /// SmoothGrad.
    Smoothgrad,
    /// Integrated Gradients.
    #[cfg_attr(feature = "clap", value(alias = "integrated_gradients"))]
    IntegratedGradients,
    /// Grad-CAM.
    #[cfg_attr(feature = "clap", value(alias = "grad_cam"))]
    GradCam,
    /// Grad-CAM++.
    #[cfg_attr(feature = "clap", value(alias = "grad_cam_plus_plus"))]
    GradCamPlusPlus,
    /// LayerCAM.
    #[cfg_attr(feature = "clap", value(alias = "layer_cam"))]
    LayerCam,
    /// Eigen-CAM (class-agnostic).
    #[cfg_attr(feature = "clap", value(alias = "eigen_cam"))]
    EigenCam,
    /// Score-CAM.
    #[cfg_attr(feature = "clap", value(alias = "score_cam"))]
    ScoreCam,
    /// Sliding-window occlusion.
    Occlusion,
    /// RISE.
    Rise,
    /// Extremal perturbation (TorchRay's settings).
    #[cfg_attr(feature = "clap", value(alias = "extremal_perturbation"))]
    ExtremalPerturbation,
    /// LIME on superpixels.
    Lime,
    /// KernelSHAP on superpixels.
    #[cfg_attr(feature = "clap", value(alias = "kernel_shap"))]
    KernelShap,
    /// The local attack's window map.
    #[cfg_attr(feature = "clap", value(alias = "local_attack"))]
    LocalAttack,
    /// The mask attack's learned mask.
    #[cfg_attr(feature = "clap", value(alias = "mask_attack"))]
    MaskAttack,
}

impl MapStep {
    /// The step with a pipeline's default settings.
    pub fn step(self) -> Step {
        match self {
            MapStep::Gradient => Step::Gradient(Gradient::default()),
            MapStep::InputXGradient => Step::InputXGradient(Gradient::default()),
            MapStep::GuidedBackprop => Step::GuidedBackprop(Gradient::default()),
            MapStep::Smoothgrad => Step::Smoothgrad(SmoothGradStep::default()),
            MapStep::IntegratedGradients => {
                Step::IntegratedGradients(IntegratedGradientsStep::default())
            }
            MapStep::GradCam => Step::GradCam(CamStep::default()),
            MapStep::GradCamPlusPlus => Step::GradCamPlusPlus(CamStep::default()),
            MapStep::LayerCam => Step::LayerCam(CamStep::default()),
            MapStep::EigenCam => Step::EigenCam(CamStep::default()),
            MapStep::ScoreCam => Step::ScoreCam(CamStep::default()),
            MapStep::Occlusion => Step::Occlusion(OcclusionStep::default()),
            MapStep::Rise => Step::Rise(RiseStep::default()),
            MapStep::ExtremalPerturbation => Step::ExtremalPerturbation(ExtremalStep::default()),
            MapStep::Lime => Step::Lime(SurrogateStep::default()),
            MapStep::KernelShap => Step::KernelShap(SurrogateStep::default()),
            MapStep::LocalAttack => Step::LocalAttack(LocalAttackStep::default()),
            MapStep::MaskAttack => Step::MaskAttack(MaskAttackStep::default()),
        }
    }
}

/// Top-k classes of each image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Classify {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// How many of the most probable classes to record per image (default 5).
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
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// SmoothGrad (`aggregate`: `plain`, `squared` or `vargrad`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmoothGradStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Noisy copies per image (default 25; at least 1).
    pub samples: usize,
    /// Noise standard deviation as a fraction of the image's value range (default 0.15).
    pub noise_level: f64,
    /// How the noisy gradients combine: `plain` (mean; the default), `squared` or `vargrad`.
    pub aggregate: Aggregate,
}

impl Default for SmoothGradStep {
    fn default() -> Self {
        Self {
            id: None,
            samples: 25,
            noise_level: 0.15,
            aggregate: Aggregate::default(),
        }
    }
}

/// Integrated Gradients (`baseline`: `black` or `blurred`; `integration`: `gauss-legendre`,
/// `riemann-middle`, `riemann-trapezoid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegratedGradientsStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Points on the path from baseline to image (default 50; at least 1).
    pub steps: usize,
    /// Where the path starts: `black` or `blurred` (the default).
    pub baseline: BaselineKind,
    /// Blur of the `blurred` baseline, in pixels.
    pub sigma: f64,
    /// How the path integral is approximated (default `gauss-legendre`).
    pub integration: Integration,
}

impl Default for IntegratedGradientsStep {
    fn default() -> Self {
        Self {
            id: None,
            steps: 50,
            baseline: BaselineKind::Blurred,
            sigma: 10.0,
            integration: Integration::default(),
        }
    }
}

/// A class activation map (Grad-CAM, Grad-CAM++, LayerCAM, Eigen-CAM, Score-CAM) on a named
/// layer (default: the model's last feature map).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CamStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The layer whose feature map is used, e.g. `layer3` for ResNets or `_blocks.10` for
    /// EfficientNet-Lite; absent: the model's last convolutional stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
}

/// Sliding-window occlusion (`baseline`: `black`, `grey` or `blurred`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OcclusionStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Side of the square patch occluded, in pixels (default 32).
    pub window: usize,
    /// Step between patch positions, in pixels (default 16).
    pub stride: usize,
    /// What fills the patch: `black`, `grey` (0.5) or `blurred` (the default).
    pub baseline: BaselineKind,
    /// Blur of the `blurred` baseline, in pixels (default 10).
    pub sigma: f64,
    /// What a window's effect is measured on: `output` (the target's output, the model's
    /// score; the default) or `log_odds` (the target's log-odds, from the logits).
    pub score: OcclusionScore,
}

impl Default for OcclusionStep {
    fn default() -> Self {
        Self {
            id: None,
            window: 32,
            stride: 16,
            baseline: BaselineKind::Blurred,
            sigma: 10.0,
            score: OcclusionScore::Output,
        }
    }
}

/// LIME or KernelSHAP on a grid of superpixels (`baseline`: what an "off" superpixel becomes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SurrogateStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Superpixels per side of the grid (default 8: 64 superpixels).
    pub cells: usize,
    /// Patterns scored per image (default 1000).
    pub samples: usize,
    /// What an "off" superpixel becomes: `black` (the default, Captum's), `grey` or `blurred`.
    pub baseline: BaselineKind,
    /// Blur of the `blurred` baseline, in pixels (default 10).
    pub sigma: f64,
}

impl Default for SurrogateStep {
    fn default() -> Self {
        let lime = vulnmap_saliency::Surrogate::lime();
        Self {
            id: None,
            cells: lime.cells,
            samples: lime.samples,
            baseline: BaselineKind::Black,
            sigma: 10.0,
        }
    }
}

/// RISE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiseStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Random masks per image (default 1000).
    pub masks: usize,
    /// Cells per side of each mask's coarse random grid (default 7).
    pub cells: usize,
    /// Probability that a grid cell is kept, in (0, 1] (default 0.5).
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

/// Extremal perturbation (TorchRay's settings by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtremalStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Mask areas as fractions of the image, each in (0, 1); the map sums their masks (default
    /// `[0.1]`; TorchRay's benchmark: `[0.025, 0.05, 0.1, 0.2]`).
    pub areas: Vec<f64>,
    /// `preserve` (the default), `delete` or `dual`.
    pub variant: ExtremalVariant,
    /// `simple` (the target's score, the default) or `contrastive` (its margin over the best
    /// other class).
    pub reward: ExtremalReward,
    /// Optimisation steps (default 800).
    pub max_iters: usize,
    /// Pixels between mask parameters (default 7).
    pub step: usize,
    /// Mask smoothing radius in pixels (default 21).
    pub sigma: f64,
    /// The strongest blur of the perturbation pyramid, in pixels (default 20).
    pub max_blur: f64,
    /// Flip the perturbed image left-right every other step (default true).
    pub jitter: bool,
}

impl Default for ExtremalStep {
    fn default() -> Self {
        let d = vulnmap_saliency::ExtremalPerturbation::default();
        Self {
            id: None,
            areas: d.areas,
            variant: d.variant,
            reward: d.reward,
            max_iters: d.max_iters,
            step: d.step,
            sigma: d.sigma,
            max_blur: d.max_blur,
            jitter: d.jitter,
        }
    }
}

/// One mask network trained across the data's training split (its `lesions_only` filter
/// applied), each image explaining its label, then run once on every image: the dual game's
/// masks without a per-image optimisation ([`vulnmap_attacks::amortised`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskNetworkStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Channels at the network's first level, doubled at each of the next three (default 16).
    pub width: usize,
    /// The areas its masks keep, one mask each; the map is their mean (default 0.025, 0.05, 0.1).
    pub areas: Vec<f64>,
    /// Passes over the training images (default 10).
    pub epochs: usize,
    /// Training images per update (default 8); each passes `2 x areas` images through the model.
    pub batch_size: usize,
    /// Adam's learning rate (default 1e-3).
    pub lr: f64,
    /// Weight of the area constraint (default 10).
    pub lambda_area: f64,
    /// Weight of the masks' total variation (default 1e-2).
    pub lambda_tv: f64,
    /// Weight of the pull towards each training image's gradient map of its class (default
    /// 1000; 0: none).
    pub gamma: f64,
    /// The masks' Gaussian smoothing, sigma as a fraction of a 4-pixel cell (default 0.5).
    pub smooth: f64,
    /// Sigma, in pixels, of the blurred baseline (default 10).
    pub blur_sigma: f64,
    /// Blur the baseline within each image's field of view, as the mask attack's default
    /// (default true).
    pub field_of_view: bool,
}

impl Default for MaskNetworkStep {
    fn default() -> Self {
        let d = vulnmap_attacks::amortised::AmortisedMask::default();
        Self {
            id: None,
            width: d.width,
            areas: d.areas,
            epochs: d.epochs,
            batch_size: d.batch_size,
            lr: d.lr,
            lambda_area: d.lambda_area,
            lambda_tv: d.lambda_tv,
            gamma: d.gamma,
            smooth: d.smooth,
            blur_sigma: d.blur_sigma,
            field_of_view: true,
        }
    }
}

impl MaskNetworkStep {
    /// The network's settings, seeded by `seed`.
    pub fn spec(&self, seed: u64, progress: bool) -> vulnmap_attacks::amortised::AmortisedMask {
        vulnmap_attacks::amortised::AmortisedMask {
            width: self.width,
            areas: self.areas.clone(),
            lambda_area: self.lambda_area,
            lambda_tv: self.lambda_tv,
            gamma: self.gamma,
            blur_sigma: self.blur_sigma,
            field_of_view: self.field_of_view,
            smooth: self.smooth,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            seed,
            progress,
            ..vulnmap_attacks::amortised::AmortisedMask::default()
        }
    }
}

/// Settings every generator attack shares.
#[derive(Debug, Clone, PartialEq)]
pub struct AttackSettings {
    /// `untargeted` or `targeted` (with `target`).
    pub mode: AttackMode,
    /// The class index a `targeted` attack must reach; `None` when untargeted.
    pub target: Option<usize>,
    /// Noise strength in pixel units, in (0, 1].
    pub alpha: f64,
    /// Generator updates at most before the attack counts as failed.
    pub max_iters: usize,
    /// Adam's learning rate for the noise generators.
    pub lr: f64,
    /// Probability the new label must exceed to count as a success, in (0, 1).
    pub confidence: f64,
    /// `auto`, `paper` (the authors' DCGAN, 224 x 224 only) or `generic`.
    pub generator: GeneratorChoice,
}

impl AttackSettings {
    /// What the attack wants: any other label, or the target when the mode is targeted.
    pub fn goal(&self) -> vulnmap_attacks::Result<vulnmap_attacks::Goal> {
        self.mode.goal(self.target)
    }
}

impl Default for AttackSettings {
    /// The paper's random attack: alpha 0.02, 100 updates, Adam 2e-4, confidence 0.9.
    fn default() -> Self {
        let paper = AttackDefaults::paper(0.02);
        Self {
            mode: AttackMode::default(),
            target: None,
            alpha: paper.alpha,
            max_iters: paper.max_iters,
            lr: paper.lr,
            confidence: 0.9,
            generator: paper.generator,
        }
    }
}

/// What an attack step's shared keys resolve to where they are left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttackDefaults {
    /// Noise strength in pixel units.
    pub alpha: f64,
    /// Adam's learning rate for the noise generators.
    pub lr: f64,
    /// Generator updates at most.
    pub max_iters: usize,
    /// The noise generator.
    pub generator: GeneratorChoice,
}

impl AttackDefaults {
    /// The paper's settings (100 updates, Adam 2e-4, `auto`) at noise strength `alpha`.
    pub const fn paper(alpha: f64) -> Self {
        Self {
            alpha,
            lr: 2e-4,
            max_iters: 100,
            generator: GeneratorChoice::Auto,
        }
    }
}

/// The defaults of an attack step's shared keys, which may follow the step's game.
trait StepDefaults {
    fn defaults(&self) -> AttackDefaults;
}

/// An attack step: [`AttackSettings`]' keys written inline (serde's `flatten` would lose the
/// line numbers of errors and the denial of unknown keys), then the step's own.
macro_rules! attack_step {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty = $default:expr),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its
            /// kind, with `-2`, `-3` ... on repeats).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub id: Option<String>,
            /// `untargeted` (the default: any other label) or `targeted` (the label `target`).
            pub mode: AttackMode,
            /// The class index to reach; given exactly when `mode` is `targeted`.
            #[serde(skip_serializing_if = "Option::is_none")]
            pub target: Option<usize>,
            /// Noise strength in pixel units, in (0, 1] (default 0.02; 0.05 for `saliency_attack`,
            /// `mask_attack` and the local attack's occlude game; unused by `alpha_sweep`, which
            /// takes `alphas`).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub alpha: Option<f64>,
            /// Generator updates at most before the attack counts as failed (default 100; the
            /// mask attack's dual game: 40; the local attack's occlude game: 1).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub max_iters: Option<usize>,
            /// Adam's learning rate for the noise generators (default 2e-4; the local attack's
            /// occlude game: 2e-3).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub lr: Option<f64>,
            /// Probability the new label must exceed to count as a success, in (0, 1)
            /// (default 0.9).
            pub confidence: f64,
            /// `auto` (the default: `paper` at 224 x 224, else `generic`), `paper` (the
            /// authors' DCGAN, 224 x 224 only) or `generic` (the default of the mask attack's
            /// dual game and the local attack's occlude game).
            #[serde(skip_serializing_if = "Option::is_none")]
            pub generator: Option<GeneratorChoice>,
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                let a = AttackSettings::default();
                Self {
                    id: None,
                    mode: a.mode,
                    target: a.target,
                    alpha: None,
                    max_iters: None,
                    lr: None,
                    confidence: a.confidence,
                    generator: None,
                    $($field: $default,)*
                }
            }
        }

        impl $name {
            /// The shared attack settings, the step's own defaults where its keys leave them
            /// out.
            pub fn attack(&self) -> AttackSettings {
                let d = self.defaults();
                AttackSettings {
                    mode: self.mode,
                    target: self.target,
                    alpha: self.alpha.unwrap_or(d.alpha),
                    max_iters: self.max_iters.unwrap_or(d.max_iters),
                    lr: self.lr.unwrap_or(d.lr),
                    confidence: self.confidence,
                    generator: self.generator.unwrap_or(d.generator),
                }
            }

            /// Writes the noise strength, learning rate, updates and generator the step
            /// resolves to into its keys, so a saved pipeline says what ran whatever a later
            /// version's defaults.
            pub fn pin_settings(&mut self) {
                let a = self.attack();
                self.alpha = Some(a.alpha);
                self.max_iters = Some(a.max_iters);
                self.lr = Some(a.lr);
                self.generator = Some(a.generator);
            }
        }
    };
}

attack_step! {
    /// The random attack (Table I), repeated over `rounds` seeds.
    RandomAttackStep {
        /// Attacks per image, seeded `seed`, `seed + 1` ...; above 1 the row also
        /// holds their statistics (default 1).
        rounds: usize = 1,
    }
}

attack_step! {
    /// Iterations against alpha (Fig. 6), `rounds` seeds per alpha.
    AlphaSweepStep {
        /// Noise strengths to try, in pixel units, each in (0, 1] (default 0.005, 0.01, 0.02,
        /// 0.05, 0.1).
        alphas: Vec<f64> = vec![0.005, 0.01, 0.02, 0.05, 0.1],
        /// Attacks (seeds) per alpha (default 5).
        rounds: usize = 5,
    }
}

attack_step! {
    /// The local attack's window map: by default the occlude game with its scores spread by the
    /// attack, the settings the attack-maps benchmark picked ([`LocalAttackStep::OCCLUDE`]);
    /// `game: delete` is the paper's (Figs. 7-8), every other key then at the paper's default.
    LocalAttackStep {
        /// Side of the square window the noise is confined to, in pixels (default: a quarter of
        /// the image's side in the occlude game, occlusion's windows; the paper's 100 in the
        /// others).
        #[serde(skip_serializing_if = "Option::is_none")]
        window: Option<usize> = None,
        /// Step between windows, in pixels (default: an eighth of the image's side in the
        /// occlude game; the paper's 50 in the others).
        #[serde(skip_serializing_if = "Option::is_none")]
        stride: Option<usize> = None,
        /// `occlude` (the default: the window blurred as occlusion's baseline, noise added to
        /// it), `delete` (the paper's: noise in the window) or `preserve` (noise everywhere
        /// else).
        game: LocalGame = LocalGame::default(),
        /// `speed` (the paper's: updates to flip), `probability_drop` (continuous) or
        /// `log_odds_drop` (the same in log-odds, for models sure of their label; the occlude
        /// game's default).
        #[serde(skip_serializing_if = "Option::is_none")]
        score: Option<WindowScore> = None,
        /// Generator seeds per window, their scores averaged (default 1, the paper's).
        #[serde(skip_serializing_if = "is_one")]
        seeds: usize = 1,
        /// How a window's score spreads over its pixels: `even` (the paper's) or `attack` (by
        /// each pixel's part in what the attack's first perturbation took from the label's
        /// log-odds; the occlude game's default).
        #[serde(skip_serializing_if = "Option::is_none")]
        spread: Option<WindowSpread> = None,
    }
}

attack_step! {
    /// The SmoothGrad-masked attack against random masks of the same budget (Figs. 9-10).
    SaliencyAttackStep {
        /// SmoothGrad samples per mask (default 25).
        samples: usize = vulnmap_saliency::SmoothGrad::authors().samples,
        /// SmoothGrad noise as a fraction of the image's value range (default 0.15).
        noise_level: f64 = vulnmap_saliency::SmoothGrad::authors().noise_level,
        /// Recompute the mask every this many updates; 0: once, on the clean image.
        every: usize = 1,
        /// Values of the normalised map below this are set to zero, in [0, 1) (default 0: none).
        threshold: f32 = 0.0,
        /// Random-mask controls: `permuted` (same values, shuffled) and/or `bernoulli`.
        controls: Vec<Control> = vec![Control::Permuted],
    }
}

attack_step! {
    /// The mask attack: by default the dual game with the settings the attack-maps benchmark
    /// picked ([`MaskAttackStep::DUAL`]); `game: noise` is the paper's Eq. 6 (Fig. 11), every
    /// other key then at the paper's default.
    MaskAttackStep {
        /// What learns the mask: `free` (a `cells` x `cells` grid upsampled, as in the authors'
        /// final code; the dual game's default) or `unet` (the noise game's default).
        #[serde(skip_serializing_if = "Option::is_none")]
        network: Option<MaskNetworkKind> = None,
        /// U-Net base channels.
        base: usize = 16,
        /// Free-mask cells per side (default: the dual game's cells of 4 pixels; the noise
        /// game's 14).
        #[serde(skip_serializing_if = "Option::is_none")]
        cells: Option<usize> = None,
        /// Adam's learning rate for the mask; absent: 0.15 for the dual game's free mask, else the
        /// network's own (1e-3 for the U-Net, the authors' 0.01 for the free mask).
        #[serde(skip_serializing_if = "Option::is_none")]
        mask_lr: Option<f64> = None,
        /// `area` (the stated intent) or `literal` (Eq. 6 as printed).
        sparsity: Sparsity = Sparsity::default(),
        /// Weight of the sparsity term, Eq. 6's lambda1 (default 1e-4).
        lambda_sparsity: f64 = 1e-4,
        /// Weight of the total variation `mean |grad m|^beta`, Eq. 6's lambda2 (default 1e-2).
        lambda_tv: f64 = 1e-2,
        /// Exponent of the total variation term (default 3).
        beta: f64 = 3.0,
        /// Weight of the pull towards the clean image's SmoothGrad map of the explained class
        /// (default: 1 in the noise game, Eq. 6's; 300 in the dual game, where it breaks the
        /// ties between regions a mask keeps in full).
        #[serde(skip_serializing_if = "Option::is_none")]
        gamma: Option<f64> = None,
        /// SmoothGrad samples of the map the mask is pulled towards.
        samples: usize = vulnmap_saliency::SmoothGrad::authors().samples,
        /// `dual` (the default: a preserve / delete pair on a blurred baseline at given areas,
        /// every update; the sparsity term does not apply) or `noise` (the paper's Eq. 6: noise
        /// through the mask until the label flips).
        game: MaskGame = MaskGame::default(),
        /// The dual game's mask areas, fractions of the image, one attack each; the map is their
        /// masks' mean (default [`MaskAttackStep::DUAL`]'s).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        areas: Vec<f64> = Vec::new(),
        /// Weight of the dual game's area constraint (default 100).
        #[serde(skip_serializing_if = "Option::is_none")]
        lambda_area: Option<f64> = None,
        /// Sigma, in pixels, of the dual game's blurred baseline (default 10).
        #[serde(skip_serializing_if = "Option::is_none")]
        blur_sigma: Option<f64> = None,
        /// The free mask's random shift at each update, as a fraction of a cell (default: 0.5 in
        /// the dual game, 0 in the noise game).
        #[serde(skip_serializing_if = "Option::is_none")]
        jitter: Option<f64> = None,
        /// The free mask's Gaussian smoothing, sigma as a fraction of a cell (default: 2 pixels in
        /// the dual game; none in the noise game, the paper's); smooth masks keep blobs rather
        /// than thin lines along edges.
        #[serde(skip_serializing_if = "Option::is_none")]
        smooth: Option<f64> = None,
        /// Blur the dual game's baseline within each image's field of view (default true), for
        /// images framed by a black surround (fundus photographs, angiograms): a plain blur
        /// smears the surround into the frame's edge, and the mask then keeps that edge. On an
        /// image without a surround the field of view is the whole image.
        #[serde(skip_serializing_if = "Option::is_none")]
        field_of_view: Option<bool> = None,
        /// Seeds per area, their masks averaged (default 1).
        #[serde(skip_serializing_if = "is_one")]
        seeds: usize = 1,
        /// What the dual game's halves score: `log_probability` (the default) or `log_odds`
        /// (which keeps moving where the model is sure of the class).
        #[serde(skip_serializing_if = "is_default")]
        reward: DualReward = DualReward::default(),
    }
}

/// Left out of a saved pipeline at its default, so that runs saved before the key existed still
/// resume.
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl StepDefaults for RandomAttackStep {
    fn defaults(&self) -> AttackDefaults {
        AttackDefaults::paper(0.02)
    }
}

impl StepDefaults for AlphaSweepStep {
    fn defaults(&self) -> AttackDefaults {
        AttackDefaults::paper(0.02)
    }
}

impl StepDefaults for LocalAttackStep {
    fn defaults(&self) -> AttackDefaults {
        match self.game {
            LocalGame::Occlude => Self::OCCLUDE.attack,
            LocalGame::Delete | LocalGame::Preserve => AttackDefaults::paper(0.02),
        }
    }
}

impl StepDefaults for SaliencyAttackStep {
    fn defaults(&self) -> AttackDefaults {
        AttackDefaults::paper(0.05)
    }
}

impl StepDefaults for MaskAttackStep {
    fn defaults(&self) -> AttackDefaults {
        let paper = AttackDefaults::paper(0.05);
        if self.dual() {
            AttackDefaults {
                max_iters: Self::DUAL.updates,
                generator: GeneratorChoice::Generic,
                ..paper
            }
        } else {
            paper
        }
    }
}

/// The occlude game's settings where a `local_attack` step leaves them out: those the
/// attack-maps benchmark picked (docs/attack_maps.md, "Spread by the attack"), with which the
/// map beats occlusion on the same windows on both of RISE's curves on ImageNet photos and on
/// both curves and AUROC on the fundus lesions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OccludeDefaults {
    /// The window's side as a fraction of the image's: `side / window_parts`.
    pub window_parts: usize,
    /// The stride as a fraction of the image's side: `side / stride_parts`.
    pub stride_parts: usize,
    /// How a window's attack is scored.
    pub score: WindowScore,
    /// How its score spreads over its pixels.
    pub spread: WindowSpread,
    /// The noise strength, learning rate, updates and generator.
    pub attack: AttackDefaults,
}

impl LocalAttackStep {
    /// The occlude game's defaults.
    pub const OCCLUDE: OccludeDefaults = OccludeDefaults {
        window_parts: 4,
        stride_parts: 8,
        score: WindowScore::LogOddsDrop,
        spread: WindowSpread::Attack,
        attack: AttackDefaults {
            alpha: 0.05,
            lr: 2e-3,
            max_iters: 1,
            generator: GeneratorChoice::Generic,
        },
    };

    /// The paper's window and stride (w = 100, s = 50), the delete and preserve games' defaults.
    pub const PAPER_WINDOWS: (usize, usize) = (100, 50);

    fn occludes(&self) -> bool {
        self.game == LocalGame::Occlude
    }

    /// The window's side on images of `side` pixels: the step's `window`, else the game's.
    pub fn window(&self, side: usize) -> usize {
        self.window.unwrap_or(if self.occludes() {
            (side / Self::OCCLUDE.window_parts).max(1)
        } else {
            Self::PAPER_WINDOWS.0
        })
    }

    /// The stride on images of `side` pixels: the step's `stride`, else the game's.
    pub fn stride(&self, side: usize) -> usize {
        self.stride.unwrap_or(if self.occludes() {
            (side / Self::OCCLUDE.stride_parts).max(1)
        } else {
            Self::PAPER_WINDOWS.1
        })
    }

    /// How a window's attack is scored: the step's `score`, else the game's.
    pub fn score(&self) -> WindowScore {
        self.score.unwrap_or(if self.occludes() {
            Self::OCCLUDE.score
        } else {
            WindowScore::Speed
        })
    }

    /// How a window's score spreads over its pixels: the step's `spread`, else the game's.
    pub fn spread(&self) -> WindowSpread {
        self.spread.unwrap_or(if self.occludes() {
            Self::OCCLUDE.spread
        } else {
            WindowSpread::Even
        })
    }

    /// [`Self::pin_settings`], the score and the spread; in the delete and preserve games the
    /// window and stride too (the occlude game's follow each image's size).
    pub fn pin_local_settings(&mut self) {
        self.pin_settings();
        self.score = Some(self.score());
        self.spread = Some(self.spread());
        if !self.occludes() {
            self.window.get_or_insert(Self::PAPER_WINDOWS.0);
            self.stride.get_or_insert(Self::PAPER_WINDOWS.1);
        }
    }

    /// The attack library's local attack on images of `side` pixels.
    pub fn spec(&self, side: usize) -> LocalAttack {
        LocalAttack {
            window: self.window(side),
            stride: self.stride(side),
            game: self.game,
            score: self.score(),
            seeds: self.seeds,
            spread: self.spread(),
        }
    }
}

/// The dual game's settings where a `mask_attack` step leaves them out: those the attack-maps
/// benchmark picked (docs/attack_maps.md), with which the mask beats Grad-CAM on both of RISE's
/// curves on ImageNet photos and matches the best classic method's pointing game on the fundus
/// lesions, with the best AUROC there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DualDefaults {
    /// Side of a free-mask cell, in pixels: the cells per side follow the image's size.
    pub cell_pixels: usize,
    /// Sigma of the free mask's smoothing, in pixels (half a cell).
    pub smooth_pixels: f64,
    /// The mask areas, fractions of the image; the map is their masks' mean.
    pub areas: &'static [f64],
    /// Adam's learning rate for the free mask.
    pub mask_lr: f64,
    /// Generator (and mask) updates per area.
    pub updates: usize,
    /// The pull towards the explained class's SmoothGrad map.
    pub gamma: f64,
}

impl MaskAttackStep {
    /// The noise game's free-mask cells per side when `cells` leaves them out.
    pub const NOISE_CELLS: usize = 14;

    /// The dual game's defaults.
    pub const DUAL: DualDefaults = DualDefaults {
        cell_pixels: 4,
        smooth_pixels: 2.0,
        areas: &[0.025, 0.05, 0.1],
        mask_lr: 0.15,
        updates: 40,
        gamma: 300.0,
    };

    /// Whether the step plays the dual game.
    pub fn dual(&self) -> bool {
        self.game == MaskGame::Dual
    }

    /// What learns the mask: the step's `network`, else the free mask in the dual game and the
    /// U-Net in the noise game.
    pub fn network(&self) -> MaskNetworkKind {
        self.network.unwrap_or(if self.dual() {
            MaskNetworkKind::Free
        } else {
            MaskNetworkKind::Unet
        })
    }

    /// The free mask's cells per side on images of `side` pixels (the dual game's default
    /// within the `cells` limit).
    pub fn cells(&self, side: usize) -> usize {
        self.cells.unwrap_or(if self.dual() {
            (side / Self::DUAL.cell_pixels).clamp(1, crate::limits::CELLS.max as usize)
        } else {
            Self::NOISE_CELLS
        })
    }

    /// [`Self::pin_settings`], and the network; in the noise game the cells too (the dual
    /// game's follow each image's size).
    pub fn pin_mask_settings(&mut self) {
        self.pin_settings();
        self.network = Some(self.network());
        if !self.dual() {
            self.cells = Some(Self::NOISE_CELLS);
        }
    }

    /// The free mask's smoothing, as a fraction of a cell, on images of `side` pixels.
    pub fn smooth(&self, side: usize) -> f64 {
        match self.smooth {
            Some(smooth) => smooth,
            None if self.dual() && self.network() == MaskNetworkKind::Free => {
                Self::DUAL.smooth_pixels * self.cells(side) as f64 / side.max(1) as f64
            }
            None => 0.0,
        }
    }

    /// The dual game's areas, one attack each (the noise game has none).
    pub fn areas(&self) -> Vec<f64> {
        match (self.dual(), self.areas.is_empty()) {
            (true, true) => Self::DUAL.areas.to_vec(),
            _ => self.areas.clone(),
        }
    }

    /// The pull towards SmoothGrad: the step's `gamma`, else Eq. 6's 1 in the noise game and
    /// the picked 300 in the dual game.
    pub fn gamma(&self) -> f64 {
        self.gamma.unwrap_or(if self.dual() {
            Self::DUAL.gamma
        } else {
            vulnmap_attacks::LearnedMask::default().gamma
        })
    }

    /// Whether the dual game's baseline is blurred within the field of view.
    pub fn field_of_view(&self) -> bool {
        self.field_of_view.unwrap_or(self.dual())
    }

    /// The mask's learning rate: the step's `mask_lr`, else the picked one for the dual game's
    /// free mask and the network's own otherwise.
    pub fn mask_lr(&self) -> f64 {
        match (self.mask_lr, self.network()) {
            (Some(lr), _) => lr,
            (None, MaskNetworkKind::Free) if self.dual() => Self::DUAL.mask_lr,
            (None, network) => network.default_lr(),
        }
    }

    /// The mask's jitter, as a fraction of a cell: the step's `jitter`, else the dual game's
    /// and none in the noise game.
    pub fn jitter(&self) -> f64 {
        self.jitter.unwrap_or(if self.dual() {
            vulnmap_attacks::LearnedMask::DUAL_JITTER
        } else {
            0.0
        })
    }
}

/// Scores the maps of earlier steps against the images' lesion masks and the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Ids of the map-making steps to score; empty: all of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub of: Vec<String>,
    /// `pointing_game`, `pointing_game_difficult`, `auroc`, `iou`, `deletion`, `insertion`, `sparseness`, `complexity`,
    /// `road_morf`, `road_lerf`, `max_sensitivity`, `avg_sensitivity`, `infidelity` (the last
    /// three for saliency methods,
    /// not attacks; infidelity for attributions at the image's size, not class activation maps).
    pub measures: Vec<Measure>,
    /// Pixels changed per deletion/insertion step (RISE: 224 at 224 x 224).
    pub pixels_per_step: usize,
    /// Standard deviation of insertion's blurred start, in pixels (RISE: 5).
    pub blur_sigma: f64,
    /// Taps of that blur's kernel, odd (RISE: 11); edges are reflected, as RISE's.
    pub blur_taps: usize,
    /// Largest pixel change of the sensitivity measures' noise, in pixel units (default 0.05).
    pub sensitivity_radius: f64,
    /// Noisy copies per image for the sensitivity measures (default 10).
    pub sensitivity_samples: usize,
    /// Standard deviation of infidelity's Gaussian perturbations, in pixel units (default 0.05).
    pub infidelity_sigma: f64,
    /// Perturbations per image for infidelity (default 10, Captum's).
    pub infidelity_samples: usize,
    /// The pointing game's tolerance in pixels: a hit is a region pixel strictly closer than
    /// this to the map's maximum (default 15, TorchRay's; 1: the maximum on a region pixel).
    /// Small images make 15 pixels a large share of the side.
    #[serde(skip_serializing_if = "is_torchray_tolerance")]
    pub pointing_tolerance: f64,
}

impl Default for MetricsStep {
    fn default() -> Self {
        let rise = vulnmap_saliency::GaussianBlur::rise();
        let sensitivity = vulnmap_saliency::metrics::robustness::Sensitivity::default();
        let infidelity = vulnmap_saliency::metrics::infidelity::Infidelity::default();
        Self {
            id: None,
            of: Vec::new(),
            measures: Measure::DEFAULT.to_vec(),
            pixels_per_step: 224,
            blur_sigma: rise.sigma,
            blur_taps: rise.taps.unwrap_or(11),
            sensitivity_radius: sensitivity.radius,
            sensitivity_samples: sensitivity.samples,
            infidelity_sigma: infidelity.sigma,
            infidelity_samples: infidelity.samples,
            pointing_tolerance: PointingGame::torchray().tolerance,
        }
    }
}

/// What a `metrics` step measures (ordered as tables list them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Whether the map's maximum falls on the lesion (TorchRay's pointing game).
    #[cfg_attr(feature = "clap", value(alias = "pointing_game"))]
    PointingGame,
    /// The pointing game on the difficult subset only: images whose lesion covers less than a
    /// quarter of the image (Excitation Backprop's rule; TorchRay's `difficult=True`).
    #[cfg_attr(feature = "clap", value(alias = "pointing_game_difficult"))]
    PointingGameDifficult,
    /// Area under the ROC curve of the map as a lesion detector.
    Auroc,
    /// Intersection over union of the map above 0.5 with the lesion.
    Iou,
    /// Area under the deletion curve (RISE): lower is better.
    Deletion,
    /// Area under the insertion curve (RISE): higher is better.
    Insertion,
    /// The Gini index of the map (Chalasani et al.; Quantus): higher is sparser.
    Sparseness,
    /// The entropy of the map as a distribution (Bhatt et al.; Quantus): lower is simpler.
    Complexity,
    /// The largest relative change of the attribution under small noise (Yeh et al.; Quantus).
    MaxSensitivity,
    /// The mean relative change of the attribution under small noise (Yeh et al.; Quantus).
    AvgSensitivity,
    /// How badly the attribution predicts the score's change under noise (Yeh et al.; Captum).
    Infidelity,
    /// ROAD, most relevant pixels removed first: the mean target probability (lower is better).
    RoadMorf,
    /// ROAD, least relevant pixels removed first: the mean target probability (higher is better).
    RoadLerf,
}

impl Measure {
    /// What a `metrics` step measures when it does not say.
    pub const DEFAULT: [Measure; 4] = [
        Measure::PointingGame,
        Measure::Auroc,
        Measure::Deletion,
        Measure::Insertion,
    ];

    /// Every measure, in the order tables list them.
    pub const ALL: [Measure; 13] = [
        Measure::PointingGame,
        Measure::PointingGameDifficult,
        Measure::Auroc,
        Measure::Iou,
        Measure::Deletion,
        Measure::Insertion,
        Measure::Sparseness,
        Measure::Complexity,
        Measure::MaxSensitivity,
        Measure::AvgSensitivity,
        Measure::Infidelity,
        Measure::RoadMorf,
        Measure::RoadLerf,
    ];

    /// The measure's name in YAML and in `results.jsonl`.
    pub fn name(self) -> String {
        spelling(&self)
    }

    /// The measure's column title in the scores table.
    pub fn title(self) -> &'static str {
        match self {
            Measure::PointingGame => "pointing game",
            Measure::PointingGameDifficult => "pointing game, difficult subset",
            Measure::Auroc => "AUROC",
            Measure::Iou => "IoU@0.5",
            Measure::Deletion => "deletion AUC (lower is better)",
            Measure::Insertion => "insertion AUC (higher is better)",
            Measure::Sparseness => "sparseness (Gini)",
            Measure::Complexity => "complexity (entropy)",
            Measure::MaxSensitivity => "max-sensitivity (lower is better)",
            Measure::AvgSensitivity => "avg-sensitivity (lower is better)",
            Measure::Infidelity => "infidelity (lower is better)",
            Measure::RoadMorf => "ROAD MoRF (lower is better)",
            Measure::RoadLerf => "ROAD LeRF (higher is better)",
        }
    }
}

/// How a setting's value is written in YAML (its serde spelling), for messages and row keys.
pub fn spelling<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// Fine-tunes `model` on the data's training split; later steps use the best checkpoint on the
/// data's `split`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneStep {
    /// Names the step in `results.jsonl`, file names and `metrics.of` (default: its kind, with
    /// `-2`, `-3` ... on repeats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Passes over the training split (default 10).
    pub epochs: usize,
    /// Adam's learning rate (default 1e-4).
    pub lr: f64,
    /// Adam's weight decay (L2, as `torch.optim.Adam`; default 0, left out of the resolved file
    /// then, so runs from before it existed still resume).
    #[serde(skip_serializing_if = "is_zero")]
    pub weight_decay: f64,
    /// Training images per update (default 32).
    pub batch_size: usize,
    /// Train only the classification head (default false).
    pub freeze_backbone: bool,
    /// Train from a fresh initialisation instead of the model's weights.
    pub scratch: bool,
    /// Decay the learning rate to zero over the epochs by a cosine (default false: constant).
    pub cosine: bool,
    /// Flip training images at random, left-right and up-down (default false).
    pub flips: bool,
    /// Standard deviation of Gaussian noise added to training pixels, in pixel units
    /// (default 0: none).
    pub noise: f64,
    /// Input side (images are resized and centre-cropped to it).
    pub size: usize,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// Left out of a saved pipeline at its default, so that runs saved before the key existed still
/// resume.
fn is_torchray_tolerance(v: &f64) -> bool {
    *v == PointingGame::torchray().tolerance
}

impl Default for FinetuneStep {
    /// The paper's fine-tuning: Adam 1e-4, batch 32.
    fn default() -> Self {
        Self {
            id: None,
            epochs: 10,
            lr: 1e-4,
            weight_decay: 0.0,
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
