//! The options every command that needs a model shares: `--model` (a native architecture or an
//! ONNX file), `--weights`, the ONNX options and `--device`.

use anyhow::{bail, Result};
use std::path::PathBuf;
use vulnmap_models::{Arch, Classifier, DeviceName, Score};
use vulnmap_onnx::Normalize;
use vulnmap_pipeline::schema::ModelSpec;

/// What `--model` names.
#[derive(Debug, Clone)]
pub(crate) enum ModelName {
    /// A built-in architecture.
    Native(Arch),
    /// A classifier exported to ONNX.
    Onnx(PathBuf),
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ModelArgs {
    /// resnet18|34|50|101|152, efficientnet-lite0, tiny-resnet, or a classifier exported to
    /// ONNX (path/to/model.onnx: pixels in [0, 1] in, logits out).
    #[arg(long, short = 'm', value_parser = parse_model)]
    pub model: ModelName,
    /// A .safetensors or PyTorch .pth checkpoint, or hf://owner/name[/file][@rev] on the Hugging
    /// Face hub; without it, hub models download their default.
    #[arg(long, short = 'w')]
    pub weights: Option<PathBuf>,
    /// For an ONNX graph exported without its normalisation: imagenet, MEAN,STD or
    /// M1,M2,M3,S1,S2,S3 (default none: the graph normalises).
    #[arg(long, value_parser = parse_normalize)]
    pub normalize: Option<Normalize>,
    /// The input size of an ONNX graph whose height and width are dynamic.
    #[arg(long, value_parser = crate::flags::image_size)]
    pub input_size: Option<u32>,
    /// Class names of an ONNX model, one per line (default: its `classes` metadata, else
    /// ImageNet's for 1000 outputs).
    #[arg(long)]
    pub classes: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto (a GPU when there is one; a pipeline's default too).
    #[arg(long, default_value_t)]
    pub device: DeviceName,
}

pub(crate) fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

/// An architecture's name, or a path ending in `.onnx` (or naming an existing file).
fn parse_model(s: &str) -> std::result::Result<ModelName, String> {
    match s.parse::<Arch>() {
        Ok(arch) => Ok(ModelName::Native(arch)),
        Err(_) if s.ends_with(".onnx") || std::path::Path::new(s).is_file() => {
            Ok(ModelName::Onnx(PathBuf::from(s)))
        }
        Err(e) => Err(format!("{e}, or the path of an .onnx file")),
    }
}

fn parse_normalize(s: &str) -> std::result::Result<Normalize, String> {
    s.parse()
}

impl ModelArgs {
    /// The model these options name, as a pipeline's `model` section.
    pub(crate) fn spec(&self, score: Score) -> Result<ModelSpec> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let mut spec = match &self.model {
            ModelName::Native(arch) => {
                let onnx_only = [
                    ("--normalize", self.normalize.is_some()),
                    ("--input-size", self.input_size.is_some()),
                    ("--classes", self.classes.is_some()),
                ];
                if let Some((flag, _)) = onnx_only.iter().find(|(_, given)| *given) {
                    bail!("{flag} is for ONNX models (--model path/to/model.onnx); {arch} knows its own");
                }
                ModelSpec::native(*arch, path(&self.weights))
            }
            ModelName::Onnx(file) => {
                if self.weights.is_some() {
                    bail!(
                        "--weights is for built-in architectures; an ONNX file holds its weights"
                    );
                }
                ModelSpec {
                    arch: None,
                    weights: None,
                    onnx: Some(file.display().to_string()),
                    normalize: self.normalize.unwrap_or_default(),
                    input_size: self.input_size.map(|s| s as usize),
                    classes: path(&self.classes),
                    score,
                }
            }
        };
        spec.score = score;
        Ok(spec)
    }

    /// Loads the classifier these options name.
    pub(crate) fn load(&self) -> Result<Box<dyn Classifier>> {
        let device = self.device.open()?;
        let spec = self.spec(Score::default())?;
        tracing::info!(model = %spec.name(), device = ?device, "loading model");
        Ok(vulnmap_pipeline::model::load(&spec, None, &device)?)
    }
}
