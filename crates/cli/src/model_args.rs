//! The options every command that needs a model shares: `--model`, `--weights`, `--device`.

use anyhow::Result;
use candle_core::DType;
use std::path::PathBuf;
use vulnmap_models::{zoo, Arch, Classifier, DeviceName};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ModelArgs {
    /// resnet18|34|50|101|152, efficientnet-lite0 or tiny-resnet.
    #[arg(long, short = 'm', value_parser = parse_arch)]
    pub model: Arch,
    /// A .safetensors or PyTorch .pth checkpoint, or hf://owner/name[/file][@rev] on the Hugging
    /// Face hub; without it, hub models download their default.
    #[arg(long, short = 'w')]
    pub weights: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto (a GPU when there is one; a pipeline's default too).
    #[arg(long, default_value_t)]
    pub device: DeviceName,
}

pub(crate) fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

impl ModelArgs {
    /// Loads the classifier these options name.
    pub(crate) fn load(&self) -> Result<Box<dyn Classifier>> {
        let device = self.device.open()?;
        tracing::info!(model = %self.model, device = ?device, "loading model");
        Ok(zoo::load(
            self.model,
            self.weights.as_deref(),
            DType::F32,
            &device,
        )?)
    }
}
