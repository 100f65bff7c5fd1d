//! The options every command that needs a model shares: `--model`, `--weights`, `--device`.

use anyhow::Result;
use candle_core::DType;
use std::path::PathBuf;
use vulnmap_models::{parse_device, zoo, Arch, Classifier};

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// resnet18|34|50|101|152, efficientnet-lite0 or tiny-resnet.
    #[arg(long, short = 'm', value_parser = parse_arch)]
    pub model: Arch,
    /// A .safetensors or PyTorch .pth checkpoint, or hf://owner/name[/file][@rev] on the Hugging
    /// Face hub; without it, hub models download their default.
    #[arg(long, short = 'w')]
    pub weights: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn parse_arch(s: &str) -> std::result::Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

impl ModelArgs {
    /// Loads the classifier these options name.
    pub fn load(&self) -> Result<Box<dyn Classifier>> {
        let device = parse_device(&self.device)?;
        tracing::info!(model = %self.model, device = ?device, "loading model");
        Ok(zoo::load(
            self.model,
            self.weights.as_deref(),
            DType::F32,
            &device,
        )?)
    }
}
