//! What the steps' settings mean to the libraries, and how each step runs on a chunk of images:
//! each step's conversion into vulnmap's own settings, shared by the runner and the CLI so that
//! both run the same thing.
//!
//! - [`maps`]: the saliency-method steps as [`vulnmap_saliency::Method`]s.
//! - [`attacks`]: the attack steps: their settings as the attack library's, and their runs.
//! - `classify`: the top classes of each image.

pub mod attacks;
pub(crate) mod classify;
pub mod maps;

use crate::error::{Error, Result};
use crate::figures;
use crate::schema::AttackSettings;
use crate::source::Item;
use candle_core::Tensor;
use serde_json::{json, Map, Value};
use std::path::Path;
use vulnmap_attacks::{AttackConfig, AttackOutcome};
use vulnmap_models::Classifier;

/// One result row's step-specific fields, per image.
pub(crate) type Rows = Vec<Map<String, Value>>;

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

    /// An attack's outcome as a row value, with the class names of both labels.
    pub(crate) fn outcome(&self, o: &AttackOutcome) -> Result<Value> {
        let mut v = serde_json::to_value(o)?;
        if let Value::Object(m) = &mut v {
            let names = self.model.classes();
            m.insert(
                "name_from".into(),
                json!(names.name(o.label_from).unwrap_or("")),
            );
            m.insert(
                "name_to".into(),
                json!(names.name(o.label_to).unwrap_or("")),
            );
        }
        Ok(v)
    }

    /// Saves an attack's noise and perturbed image and puts their paths into `data`.
    fn attack_figures(
        &self,
        item: &Item,
        id: &str,
        o: &AttackOutcome,
        data: &mut Map<String, Value>,
    ) -> Result<()> {
        if !self.figures {
            return Ok(());
        }
        let noise = figures::file(item, id, "noise");
        figures::save_noise(&o.noise, o.alpha, &self.out.join(&noise))?;
        let perturbed = figures::file(item, id, "perturbed");
        figures::save_rgb(&o.perturbed, &self.out.join(&perturbed))?;
        data.insert("noise_figure".into(), json!(noise));
        data.insert("perturbed_figure".into(), json!(perturbed));
        Ok(())
    }

    /// An attack's row: its outcome and, with figures, its noise and perturbed image.
    pub(crate) fn outcome_row(
        &self,
        item: &Item,
        id: &str,
        o: &AttackOutcome,
    ) -> Result<Map<String, Value>> {
        let mut data = Map::new();
        data.insert("outcome".into(), self.outcome(o)?);
        self.attack_figures(item, id, o, &mut data)?;
        Ok(data)
    }

    /// Adds [`StepContext::map_rows`] to the rows of a step whose maps are `maps`.
    pub(crate) fn add_map_rows(
        &self,
        rows: &mut Rows,
        chunk: &Chunk,
        id: &str,
        maps: &Tensor,
    ) -> Result<()> {
        for (row, extra) in rows.iter_mut().zip(self.map_rows(chunk, id, maps)?) {
            row.extend(extra);
        }
        Ok(())
    }

    /// Each image's target and, with figures, its map and overlay PNGs.
    pub(crate) fn map_rows(&self, chunk: &Chunk, id: &str, maps: &Tensor) -> Result<Rows> {
        let mut rows = Vec::new();
        for (i, item) in chunk.items.iter().enumerate() {
            let mut data = Map::new();
            let t = chunk.targets[i];
            data.insert("target".into(), json!(t));
            data.insert(
                "target_name".into(),
                json!(self.model.classes().name(t).unwrap_or("")),
            );
            if self.figures {
                let map = maps.get(i)?;
                let (m, o) = (
                    figures::file(item, id, "map"),
                    figures::file(item, id, "overlay"),
                );
                figures::save_map(
                    &map,
                    &chunk.pixels.get(i)?,
                    &self.out.join(&m),
                    &self.out.join(&o),
                )?;
                data.insert("map_figure".into(), json!(m));
                data.insert("overlay_figure".into(), json!(o));
            }
            rows.push(data);
        }
        Ok(rows)
    }
}
