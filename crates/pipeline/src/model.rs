//! The classifier a pipeline's `model` section (or a command's `--model`) names: a native
//! architecture with its weights, or a classifier exported to ONNX.

use crate::error::{Error, Result};
use crate::schema::ModelSpec;
use candle_core::{DType, Device};
use std::path::Path;
use vulnmap_models::{zoo, Classes, Classifier};

/// Loads the model `spec` names onto `device`; `default_weights` stands in when a native
/// architecture is named without weights (the benchmark's cached checkpoint).
pub fn load(
    spec: &ModelSpec,
    default_weights: Option<&Path>,
    device: &Device,
) -> Result<Box<dyn Classifier>> {
    match (&spec.arch, &spec.onnx) {
        (Some(arch), None) => {
            let weights = spec.weights.as_deref().map(Path::new).or(default_weights);
            Ok(zoo::load(*arch, weights, DType::F32, device)?)
        }
        (None, Some(path)) => {
            let classes = match &spec.classes {
                Some(file) => Some(read_classes(Path::new(file))?),
                None => None,
            };
            let options = vulnmap_onnx::LoadOptions {
                normalize: spec.normalize,
                input_size: spec.input_size.map(|s| (s, s)),
                classes,
            };
            Ok(Box::new(vulnmap_onnx::load_with(path, &options, device)?))
        }
        _ => Err(Error::Run(
            "a model is either `arch` (with `weights`) or `onnx`, exactly one of them".into(),
        )),
    }
}

/// Class names from `path`, one per line (blank lines skipped).
pub fn read_classes(path: &Path) -> Result<Classes> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(Error::Run(format!(
            "{}: no class names (expected one per line)",
            path.display()
        )));
    }
    Ok(Classes::new(names))
}
