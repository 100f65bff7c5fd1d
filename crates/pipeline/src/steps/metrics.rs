//! The `metrics` step: scores the maps of earlier steps, per image, against the lesion masks
//! (pointing game, AUROC, IoU), against the model (deletion, insertion, ROAD), by their own
//! concentration (sparseness, complexity) and, for saliency methods, by their robustness to
//! small noise (max- and average-sensitivity) and their faithfulness (infidelity).

use super::{Chunk, StepContext};
use crate::error::Result;
use crate::rows::{Found, Scored, Scores};
use crate::schema::{Measure, MetricsStep, StepKind};
use candle_core::Tensor;
use std::collections::BTreeMap;
use vulnmap_saliency::metrics::causal::CausalMetric;
use vulnmap_saliency::metrics::complexity::{complexity, sparseness};
use vulnmap_saliency::metrics::infidelity::Infidelity;
use vulnmap_saliency::metrics::localisation::{auroc, iou, PointingGame};
use vulnmap_saliency::metrics::road::{Order, Road};
use vulnmap_saliency::metrics::robustness::Sensitivity;
use vulnmap_saliency::{GaussianBlur, Method};

/// The maps one earlier step made for the chunk's images.
pub(crate) struct ScoredMaps {
    /// The step's id.
    pub(crate) id: String,
    /// Its kind, which sets the pointing game's tolerance.
    pub(crate) kind: StepKind,
    /// `N x H x W`, on the CPU.
    pub(crate) maps: Tensor,
    /// The saliency method that made them, to make them again for the sensitivity measures
    /// (`None` for the attacks).
    pub(crate) method: Option<Method>,
}

/// Scores every map of `sources` for each image of `chunk`; `masks` are the images' lesion
/// masks (`H x W`, row-major), where they have one.
pub(crate) fn run(
    cx: &StepContext,
    s: &MetricsStep,
    chunk: &Chunk,
    masks: &[Option<Vec<bool>>],
    sources: &[ScoredMaps],
) -> Result<Vec<Found>> {
    let model = cx.model;
    let (_, _, h, w) = chunk.pixels.dims4()?;
    let causal = CausalMetric {
        pixels_per_step: s.pixels_per_step,
        blur: GaussianBlur {
            sigma: s.blur_sigma,
            taps: Some(s.blur_taps),
            ..GaussianBlur::rise()
        },
        // One batch of step images at a time, as every other step: `batch_size` bounds memory.
        batch_size: cx.batch_size,
    };
    let measure = |m: Measure| s.measures.contains(&m);
    let mut per_image: Vec<BTreeMap<String, Scores>> = vec![BTreeMap::new(); chunk.items.len()];
    let sensitivity = Sensitivity {
        radius: s.sensitivity_radius,
        samples: s.sensitivity_samples,
        seed: cx.seed,
    };
    let road = Road {
        seed: cx.seed,
        ..Road::default()
    };
    let infidelity = Infidelity {
        sigma: s.infidelity_sigma,
        samples: s.infidelity_samples,
        normalize: false,
        seed: cx.seed,
    };
    for source in sources {
        let sensitivities = match &source.method {
            Some(method)
                if measure(Measure::MaxSensitivity) || measure(Measure::AvgSensitivity) =>
            {
                Some(sensitivity.measure(model, method, &chunk.pixels, &chunk.targets)?)
            }
            _ => None,
        };
        let infidelities = match &source.method {
            Some(method) if measure(Measure::Infidelity) => {
                let a = method.attribute(model, &chunk.pixels, &chunk.targets)?;
                let (_, _, ah, aw) = a.dims4()?;
                // Class activation maps are at their layer's resolution: no infidelity.
                if (ah, aw) == (h, w) {
                    Some(infidelity.measure(model, &chunk.pixels, &a, &chunk.targets)?)
                } else {
                    None
                }
            }
            _ => None,
        };
        let game = match source.kind {
            StepKind::Gradient
            | StepKind::InputXGradient
            | StepKind::GuidedBackprop
            | StepKind::Smoothgrad
            | StepKind::IntegratedGradients => PointingGame {
                tolerance: s.pointing_tolerance,
                ..PointingGame::torchray()
            },
            _ => PointingGame {
                tolerance: s.pointing_tolerance,
                smooth: 0.0,
            },
        };
        for (i, scored) in per_image.iter_mut().enumerate() {
            let map = source.maps.get(i)?;
            let mut scores = Scores::default();
            if let Some(mask) = masks[i]
                .as_ref()
                .filter(|m| m.len() == h * w && m.iter().any(|&b| b))
            {
                if measure(Measure::PointingGame) {
                    scores.pointing_game = Some(game.hit(&map, mask)?);
                }
                if measure(Measure::PointingGameDifficult) && PointingGame::is_difficult(mask) {
                    scores.pointing_game_difficult = Some(game.hit(&map, mask)?);
                }
                if measure(Measure::Auroc) && mask.iter().any(|&b| !b) {
                    scores.auroc = Some(auroc(&map, mask)?);
                }
                if measure(Measure::Iou) {
                    scores.iou = Some(iou(&map, mask, 0.5)?);
                }
            }
            let image = chunk.pixels.get(i)?;
            let map_dev = map.to_device(model.device())?;
            let target = chunk.targets[i];
            if measure(Measure::Deletion) {
                scores.deletion = Some(causal.deletion(model, &image, &map_dev, target)?.auc);
            }
            if measure(Measure::Insertion) {
                scores.insertion = Some(causal.insertion(model, &image, &map_dev, target)?.auc);
            }
            for (m, order) in [
                (Measure::RoadMorf, Order::MoRF),
                (Measure::RoadLerf, Order::LeRF),
            ] {
                if measure(m) {
                    let curve = road.curve(model, &image, &map_dev, target, order)?;
                    match order {
                        Order::MoRF => scores.road_morf = Some(curve.mean),
                        Order::LeRF => scores.road_lerf = Some(curve.mean),
                    }
                }
            }
            if measure(Measure::Sparseness) {
                scores.sparseness = Some(sparseness(&map)?);
            }
            if measure(Measure::Complexity) {
                scores.complexity = Some(complexity(&map)?);
            }
            if let Some(v) = &infidelities {
                scores.infidelity = Some(v[i]);
            }
            if let Some(v) = &sensitivities {
                if measure(Measure::MaxSensitivity) {
                    scores.max_sensitivity = Some(v[i].max);
                }
                if measure(Measure::AvgSensitivity) {
                    scores.avg_sensitivity = Some(v[i].mean);
                }
            }
            scored.insert(source.id.clone(), scores);
        }
    }
    Ok(per_image
        .into_iter()
        .map(|scores| Found::Metrics(Scored { scores }))
        .collect())
}
