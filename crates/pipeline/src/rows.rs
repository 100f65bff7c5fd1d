//! The rows of `results.jsonl`, typed: the steps and the runner write them, and the report,
//! `merge` and `vulnmap eval` read them back. A row is the (image, step) it belongs to and what
//! that step found, its fields chosen by the row's `kind`.

use crate::error::Result;
use crate::schema::{Measure, StepKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vulnmap_attacks::rounds::{RoundStats, SweepPoint};
use vulnmap_attacks::AttackOutcome;
use vulnmap_data::json::nan_from_null;
use vulnmap_models::Classes;
use vulnmap_train::train::TrainReport;

/// A row's identity: the image (none for dataset-level steps) and the step id.
pub type RowKey = (Option<usize>, String);

/// One line of `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// The image's index in the data source; `None` for a dataset-level step (`finetune`).
    pub image: Option<usize>,
    /// The step's id.
    pub step: String,
    /// The image file, relative to the run directory when it lies inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Wall-clock seconds per image of the step's chunk (ms resolution).
    pub seconds: f64,
    /// What the step found; its `kind` is the step's kind.
    #[serde(flatten)]
    pub found: Found,
}

impl ResultRow {
    /// The row's identity.
    pub fn key(&self) -> RowKey {
        (self.image, self.step.clone())
    }

    /// The kind of step that wrote the row.
    pub fn kind(&self) -> StepKind {
        self.found.kind()
    }

    /// The row as one JSON line (keys sorted, so the text does not depend on field order).
    pub fn to_line(&self) -> Result<String> {
        Ok(serde_json::to_value(self)?.to_string())
    }

    /// Whether two rows agree on everything but timing (NaN equal to NaN, as in the file).
    pub fn same_result(&self, other: &ResultRow) -> bool {
        let untimed = |r: &ResultRow| {
            serde_json::to_value(ResultRow {
                seconds: 0.0,
                ..r.clone()
            })
            .ok()
        };
        untimed(self) == untimed(other)
    }

    /// The attack outcome of an attack row (the first round's, with rounds).
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.found {
            Found::RandomAttack(a) => Some(&a.outcome),
            Found::SaliencyAttack(a) => Some(&a.outcome),
            Found::MaskAttack(a) => Some(&a.outcome),
            _ => None,
        }
    }

    /// The figures of an attack row.
    pub fn attack_figures(&self) -> Option<&AttackFigures> {
        match &self.found {
            Found::RandomAttack(a) => Some(&a.figures),
            Found::SaliencyAttack(a) => Some(&a.figures),
            Found::MaskAttack(a) => Some(&a.figures),
            _ => None,
        }
    }

    /// The map fields of a row whose step makes maps.
    pub fn map(&self) -> Option<&MapFound> {
        match &self.found {
            Found::Gradient(m)
            | Found::InputXGradient(m)
            | Found::GuidedBackprop(m)
            | Found::Smoothgrad(m)
            | Found::IntegratedGradients(m)
            | Found::GradCam(m)
            | Found::GradCamPlusPlus(m)
            | Found::LayerCam(m)
            | Found::EigenCam(m)
            | Found::ScoreCam(m)
            | Found::Occlusion(m)
            | Found::Rise(m)
            | Found::ExtremalPerturbation(m)
            | Found::Lime(m)
            | Found::KernelShap(m)
            | Found::MaskNetwork(m) => Some(m),
            Found::LocalAttack(l) => Some(&l.map),
            Found::MaskAttack(a) => Some(&a.map),
            _ => None,
        }
    }
}

/// What a step found, by the kind of step (the row's `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(missing_docs)] // each variant is the step kind of the same name
pub enum Found {
    Classify(Classified),
    Gradient(MapFound),
    InputXGradient(MapFound),
    GuidedBackprop(MapFound),
    Smoothgrad(MapFound),
    IntegratedGradients(MapFound),
    GradCam(MapFound),
    GradCamPlusPlus(MapFound),
    LayerCam(MapFound),
    EigenCam(MapFound),
    ScoreCam(MapFound),
    Occlusion(MapFound),
    Rise(MapFound),
    ExtremalPerturbation(MapFound),
    Lime(MapFound),
    KernelShap(MapFound),
    RandomAttack(RandomAttacked),
    AlphaSweep(Swept),
    LocalAttack(LocalAttacked),
    SaliencyAttack(SaliencyAttacked),
    MaskAttack(MaskAttacked),
    MaskNetwork(MapFound),
    Metrics(Scored),
    Finetune(Finetuned),
}

impl Found {
    /// The kind of step that found it.
    pub fn kind(&self) -> StepKind {
        match self {
            Found::Classify(_) => StepKind::Classify,
            Found::Gradient(_) => StepKind::Gradient,
            Found::InputXGradient(_) => StepKind::InputXGradient,
            Found::GuidedBackprop(_) => StepKind::GuidedBackprop,
            Found::Smoothgrad(_) => StepKind::Smoothgrad,
            Found::IntegratedGradients(_) => StepKind::IntegratedGradients,
            Found::GradCam(_) => StepKind::GradCam,
            Found::GradCamPlusPlus(_) => StepKind::GradCamPlusPlus,
            Found::LayerCam(_) => StepKind::LayerCam,
            Found::EigenCam(_) => StepKind::EigenCam,
            Found::ScoreCam(_) => StepKind::ScoreCam,
            Found::Occlusion(_) => StepKind::Occlusion,
            Found::Rise(_) => StepKind::Rise,
            Found::ExtremalPerturbation(_) => StepKind::ExtremalPerturbation,
            Found::Lime(_) => StepKind::Lime,
            Found::KernelShap(_) => StepKind::KernelShap,
            Found::RandomAttack(_) => StepKind::RandomAttack,
            Found::AlphaSweep(_) => StepKind::AlphaSweep,
            Found::LocalAttack(_) => StepKind::LocalAttack,
            Found::SaliencyAttack(_) => StepKind::SaliencyAttack,
            Found::MaskAttack(_) => StepKind::MaskAttack,
            Found::MaskNetwork(_) => StepKind::MaskNetwork,
            Found::Metrics(_) => StepKind::Metrics,
            Found::Finetune(_) => StepKind::Finetune,
        }
    }

    /// The map-making step of `kind` with `map`; `None` when that kind makes no plain map.
    pub(crate) fn map_of(kind: StepKind, map: MapFound) -> Option<Found> {
        Some(match kind {
            StepKind::Gradient => Found::Gradient(map),
            StepKind::InputXGradient => Found::InputXGradient(map),
            StepKind::GuidedBackprop => Found::GuidedBackprop(map),
            StepKind::Smoothgrad => Found::Smoothgrad(map),
            StepKind::IntegratedGradients => Found::IntegratedGradients(map),
            StepKind::GradCam => Found::GradCam(map),
            StepKind::GradCamPlusPlus => Found::GradCamPlusPlus(map),
            StepKind::LayerCam => Found::LayerCam(map),
            StepKind::EigenCam => Found::EigenCam(map),
            StepKind::ScoreCam => Found::ScoreCam(map),
            StepKind::Occlusion => Found::Occlusion(map),
            StepKind::Rise => Found::Rise(map),
            StepKind::ExtremalPerturbation => Found::ExtremalPerturbation(map),
            StepKind::Lime => Found::Lime(map),
            StepKind::KernelShap => Found::KernelShap(map),
            StepKind::MaskNetwork => Found::MaskNetwork(map),
            _ => return None,
        })
    }
}

/// `classify`: the most likely classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classified {
    /// The most likely class.
    pub predicted: usize,
    /// Its name ("" when the model has no class names).
    pub name: String,
    /// The `top` most likely classes, most likely first.
    pub top: Vec<TopClass>,
    /// The image's label, when the data has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<usize>,
    /// Whether `predicted` is the label, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
}

/// One of the most likely classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopClass {
    /// The class index.
    pub class: usize,
    /// Its name ("" when the model has no class names).
    pub name: String,
    /// Its softmax probability.
    pub probability: f32,
}

/// A map-making step: the class explained and, with figures, the map's PNGs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapFound {
    /// The class the map explains (the predicted one).
    pub target: usize,
    /// Its name ("" when the model has no class names).
    pub target_name: String,
    /// The map as a PNG, relative to the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_figure: Option<String>,
    /// The map over the image, relative to the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_figure: Option<String>,
}

/// An attack's outcome as the row holds it: [`AttackOutcome`] without its tensors, with the
/// names of both labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Noise strength in pixel units.
    pub alpha: f64,
    /// Cross-entropy of the clean image against its own label (against the explained label
    /// when an attack map explains another class: `explain: label`).
    #[serde(deserialize_with = "nan_from_null")]
    pub origin_loss: f64,
    /// The attack's loss when it stopped.
    #[serde(deserialize_with = "nan_from_null")]
    pub final_loss: f64,
    /// The clean image's predicted class.
    pub label_from: usize,
    /// The perturbed image's predicted class.
    pub label_to: usize,
    /// The class asked for, for targeted attacks.
    pub target: Option<usize>,
    /// Generator updates made (the cap when the goal was never met).
    pub iterations: usize,
    /// The perturbed image's probability of `label_to`.
    #[serde(deserialize_with = "nan_from_null")]
    pub confidence: f64,
    /// Whether the goal was met.
    pub success: bool,
    /// Why an unsuccessful attack stopped.
    pub failure: Option<String>,
    /// The name of `label_from` ("" when the model has no class names).
    pub name_from: String,
    /// The name of `label_to`.
    pub name_to: String,
}

impl Outcome {
    /// `o` with its labels named from `classes`.
    pub fn of(o: &AttackOutcome, classes: &Classes) -> Self {
        Self {
            alpha: o.alpha,
            origin_loss: o.origin_loss,
            final_loss: o.final_loss,
            label_from: o.label_from,
            label_to: o.label_to,
            target: o.target,
            iterations: o.iterations,
            confidence: o.confidence,
            success: o.success,
            failure: o.failure.clone(),
            name_from: classes.name(o.label_from).unwrap_or("").to_string(),
            name_to: classes.name(o.label_to).unwrap_or("").to_string(),
        }
    }
}

/// An attack's noise and perturbed image as PNGs, relative to the run directory (with figures).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttackFigures {
    /// The noise added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_figure: Option<String>,
    /// The perturbed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perturbed_figure: Option<String>,
}

/// `random_attack`: the outcome and, with `rounds`, every round's iterations and their summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RandomAttacked {
    /// The (first round's) outcome.
    pub outcome: Outcome,
    /// Its figures.
    #[serde(flatten)]
    pub figures: AttackFigures,
    /// The rounds summarised, with more than one round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<RoundStats>,
    /// Each round's iterations, with more than one round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<Vec<usize>>,
}

/// `alpha_sweep`: the rounds at each alpha.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Swept {
    /// One point per alpha.
    pub sweep: Vec<SweepPoint>,
}

/// `local_attack`: the windows' attacks and the map they make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalAttacked {
    /// Which variant made the map: what differs from the paper's settings (`preserve`,
    /// `probability_drop`, `seeds=N`, joined by `+`), or `paper`, which is not written, so rows
    /// from before variants read back to the same text.
    #[serde(default = "paper", skip_serializing_if = "is_paper")]
    pub variant: String,
    /// How many windows were attacked.
    pub windows: usize,
    /// The standard deviation of the window scores.
    #[serde(deserialize_with = "nan_from_null")]
    pub contrast: f64,
    /// Each window's iterations, row by row.
    pub iterations: Vec<usize>,
    /// Windows whose attack met its goal.
    pub successes: usize,
    /// Top-left corner of the highest-scoring window (the fastest, in the paper's variant).
    pub fastest_window: Option<(usize, usize)>,
    /// The map.
    #[serde(flatten)]
    pub map: MapFound,
}

/// `saliency_attack`: the masked attack and its random-mask controls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaliencyAttacked {
    /// The attack with the saliency mask.
    pub outcome: Outcome,
    /// Its figures.
    #[serde(flatten)]
    pub figures: AttackFigures,
    /// Each control's attack, by the control's name.
    pub controls: BTreeMap<String, Outcome>,
}

/// `mask_attack`: the attack with the learned mask, and the mask as the map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskAttacked {
    /// Which variant made the map: what differs from the paper's settings (`dual`,
    /// `areas=...`, `seeds=N`, joined by `+`), or `paper`, which is not written, so rows from
    /// before variants read back to the same text.
    #[serde(default = "paper", skip_serializing_if = "is_paper")]
    pub variant: String,
    /// The attack's outcome.
    pub outcome: Outcome,
    /// Its figures.
    #[serde(flatten)]
    pub figures: AttackFigures,
    /// The learned mask as a map.
    #[serde(flatten)]
    pub map: MapFound,
}

/// `metrics`: each scored step's scores for the image, by step id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Scores by the id of the step whose map they score.
    pub scores: BTreeMap<String, Scores>,
}

/// One map's scores; a measure not asked for, or not defined for the image, is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)] // each field is the measure of the same name
pub struct Scores {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointing_game: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointing_game_difficult: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iou: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insertion: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparseness: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sensitivity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_sensitivity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infidelity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub road_morf: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub road_lerf: Option<f64>,
}

impl Scores {
    /// The score of `measure` as a number (a pointing-game hit as 1, a miss as 0).
    pub fn get(&self, measure: Measure) -> Option<f64> {
        match measure {
            Measure::PointingGame => self.pointing_game.map(|hit| f64::from(u8::from(hit))),
            Measure::PointingGameDifficult => self
                .pointing_game_difficult
                .map(|hit| f64::from(u8::from(hit))),
            Measure::Auroc => self.auroc,
            Measure::Iou => self.iou,
            Measure::Deletion => self.deletion,
            Measure::Insertion => self.insertion,
            Measure::Sparseness => self.sparseness,
            Measure::Complexity => self.complexity,
            Measure::MaxSensitivity => self.max_sensitivity,
            Measure::AvgSensitivity => self.avg_sensitivity,
            Measure::Infidelity => self.infidelity,
            Measure::RoadMorf => self.road_morf,
            Measure::RoadLerf => self.road_lerf,
        }
    }
}

/// `finetune`: where the model went and how training went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finetuned {
    /// The kept weights, relative to the run directory.
    pub checkpoint: String,
    /// Every epoch's figures and the test scores.
    pub report: TrainReport,
}

fn paper() -> String {
    "paper".into()
}

fn is_paper(variant: &str) -> bool {
    variant == "paper"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows as written by earlier versions of vulnmap, one per kind that has fields of its own.
    const LINES: [&str; 6] = [
        r#"{"file":"a.png","image":0,"kind":"classify","name":"cat","predicted":3,"seconds":0.01,"step":"classify","top":[{"class":3,"name":"cat","probability":0.75}]}"#,
        r#"{"file":"a.png","image":0,"iterations":[2,5],"kind":"random_attack","outcome":{"alpha":0.1,"confidence":0.9,"failure":null,"final_loss":-3.0,"iterations":2,"label_from":3,"label_to":1,"name_from":"cat","name_to":"dog","origin_loss":0.2,"success":true,"target":null},"rounds":{"max_iterations":0,"mean_iterations":null,"median_iterations":null,"min_iterations":0,"rounds":2,"std_iterations":null,"success_rate":0.0,"successes":0},"seconds":1.5,"step":"r"}"#,
        r#"{"contrast":0.25,"fastest_window":[0,50],"file":"a.png","image":0,"iterations":[1,2],"kind":"local_attack","map_figure":"figures/a/l_map.png","overlay_figure":"figures/a/l_overlay.png","seconds":2.0,"step":"l","successes":2,"target":3,"target_name":"cat","windows":2}"#,
        r#"{"file":"a.png","image":0,"kind":"metrics","scores":{"gradient":{"deletion":0.1,"insertion":0.5,"pointing_game":true}},"seconds":0.3,"step":"metrics"}"#,
        r#"{"checkpoint":"model/best.safetensors","image":null,"kind":"finetune","report":{"best_epoch":1,"epochs":[],"test_accuracy":null,"test_loss":null},"seconds":9.0,"step":"finetune"}"#,
        r#"{"file":"a.png","image":0,"kind":"grad_cam","seconds":0.02,"step":"grad_cam","target":3,"target_name":"cat"}"#,
    ];

    #[test]
    fn rows_read_back_to_the_same_text() {
        for line in LINES {
            let row: ResultRow = serde_json::from_str(line).unwrap();
            assert_eq!(row.to_line().unwrap(), line);
            assert!(row.same_result(&row), "{line}");
        }
    }

    #[test]
    fn a_variant_other_than_the_papers_is_written_and_read() {
        let line = LINES[2].replace(
            r#""target_name":"cat","#,
            r#""target_name":"cat","variant":"probability_drop+seeds=3","#,
        );
        let row: ResultRow = serde_json::from_str(&line).unwrap();
        let Found::LocalAttack(local) = &row.found else {
            panic!("a local_attack row")
        };
        assert_eq!(local.variant, "probability_drop+seeds=3");
        assert_eq!(row.to_line().unwrap(), line);
        let old: ResultRow = serde_json::from_str(LINES[2]).unwrap();
        let Found::LocalAttack(local) = &old.found else {
            panic!("a local_attack row")
        };
        assert_eq!(local.variant, "paper");
    }

    #[test]
    fn the_kind_selects_the_fields() {
        let row: ResultRow = serde_json::from_str(LINES[3]).unwrap();
        assert_eq!(row.kind(), StepKind::Metrics);
        let Found::Metrics(m) = &row.found else {
            panic!("not a metrics row")
        };
        assert_eq!(m.scores["gradient"].get(Measure::PointingGame), Some(1.0));
        assert_eq!(m.scores["gradient"].get(Measure::Auroc), None);
        let unknown = LINES[5].replace("grad_cam\",\"seconds", "sharpened\",\"seconds");
        assert!(serde_json::from_str::<ResultRow>(&unknown).is_err());
    }
}
