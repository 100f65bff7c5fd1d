//! What the steps' settings mean to the libraries, and how each step runs on a chunk of images:
//! each step's conversion into vulnmap's own settings, shared by the runner and the CLI so that
//! both run the same thing.
//!
//! - [`maps`]: the saliency-method steps as [`vulnmap_saliency::Method`]s.
//! - [`attacks`]: the attack steps: their settings as the attack library's, and their runs.
//! - `classify`: the top classes of each image.
//! - [`finetune`]: the fine-tuning settings as the training library's.
//! - `mask_network`: the mask network's training (once per run) and its maps.
//! - `metrics`: the scores of earlier steps' maps.

pub mod attacks;
pub(crate) mod classify;
pub mod finetune;
pub mod maps;
pub(crate) mod mask_network;
pub(crate) mod metrics;

use crate::error::{Error, Result};
use crate::figures;
use crate::rows::{AttackFigures, MapFound, Outcome};
use crate::schema::AttackSettings;
use crate::source::Item;
use candle_core::Tensor;
use std::path::Path;
use vulnmap_attacks::{AttackConfig, AttackOutcome};
use vulnmap_models::Classifier;

/// Everything a step needs about the chunk it runs on.
pub(crate) struct Chunk<'a> {
    pub(crate) items: &'a [Item],
    pub(crate) pixels: Tensor,
    pub(crate) targets: Vec<usize>,
}

/// What a step needs of the run: the model, the seed, the batch bound and where figures go.
pub(crate) struct StepContext<'a> {
    pub(crate) model: &'a dyn Classifier,
    pub(crate) seed: u64,
    pub(crate) batch_size: usize,
    pub(crate) out: &'a Path,
    pub(crate) figures: bool,
}

impl StepContext<'_> {
    /// The attack configuration of `a`, after checking its target against the model's classes.
    pub(crate) fn attack_config(&self, a: &AttackSettings) -> Result<AttackConfig> {
        if let Some(t) = a.target {
            let n = self.model.classes().len();
            if t >= n {
                return Err(Error::Run(format!(
                    "target class {t} is not below the model's {n} classes"
                )));
            }
        }
        Ok(attacks::config(a, self.seed, self.batch_size))
    }

    /// An attack's outcome as a row holds it, with the class names of both labels.
    pub(crate) fn outcome(&self, o: &AttackOutcome) -> Outcome {
        Outcome::of(o, self.model.classes())
    }

    /// Saves an attack's noise and perturbed image (with figures) and says where they went.
    pub(crate) fn attack_figures(
        &self,
        item: &Item,
        id: &str,
        o: &AttackOutcome,
    ) -> Result<AttackFigures> {
        let (true, Some(noise_image), Some(perturbed_image)) =
            (self.figures, &o.noise, &o.perturbed)
        else {
            return Ok(AttackFigures::default());
        };
        let noise = figures::file(item, id, "noise");
        figures::save_noise(noise_image, o.alpha, &self.out.join(&noise))?;
        let perturbed = figures::file(item, id, "perturbed");
        figures::save_rgb(perturbed_image, &self.out.join(&perturbed))?;
        Ok(AttackFigures {
            noise_figure: Some(noise),
            perturbed_figure: Some(perturbed),
        })
    }

    /// Each image's target and, with figures, its map and overlay PNGs.
    pub(crate) fn map_rows(&self, chunk: &Chunk, id: &str, maps: &Tensor) -> Result<Vec<MapFound>> {
        let mut rows = Vec::new();
        for (i, item) in chunk.items.iter().enumerate() {
            let target = chunk.targets[i];
            let mut found = MapFound {
                target,
                target_name: self.model.classes().name(target).unwrap_or("").to_string(),
                map_figure: None,
                overlay_figure: None,
            };
            if self.figures {
                let (m, o) = (
                    figures::file(item, id, "map"),
                    figures::file(item, id, "overlay"),
                );
                figures::save_map(
                    &maps.get(i)?,
                    &chunk.pixels.get(i)?,
                    &self.out.join(&m),
                    &self.out.join(&o),
                )?;
                found.map_figure = Some(m);
                found.overlay_figure = Some(o);
            }
            rows.push(found);
        }
        Ok(rows)
    }
}
