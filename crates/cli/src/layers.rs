//! `vulnmap layers`: the feature maps a layer-based method (Grad-CAM and the other CAMs) can
//! use, with their shapes, marking the one used when `--layer` is not given.

use crate::model_args::ModelArgs;
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::io::Write;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// One JSON object per layer on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Layer<'a> {
    name: &'a str,
    /// Its shape for one image.
    shape: Vec<usize>,
    /// Whether the rest of the network is computed from it alone, so that Grad-CAM can use it.
    usable: bool,
    /// The layer Grad-CAM uses by default.
    default: bool,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let model = args.model.load()?;
    let spec = model.input_spec();
    let probe = Tensor::zeros(
        (1, spec.channels, spec.height, spec.width),
        DType::F32,
        model.device(),
    )?;
    let default = model.default_layer();
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(out, "{:<60} {:<22} grad-cam", "layer", "shape (one image)")?;
    }
    for name in model.layers() {
        let features = model.features(&probe, &name)?;
        let layer = Layer {
            name: &name,
            shape: features.dims().to_vec(),
            usable: model.forward_from(&features, &name).is_ok(),
            default: name == default,
        };
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&layer)?)?;
        } else {
            let mark = match (layer.default, layer.usable) {
                (true, _) => "default",
                (false, true) => "yes",
                (false, false) => "no (skipped by a connection)",
            };
            writeln!(
                out,
                "{:<60} {:<22} {mark}",
                name,
                format!("{:?}", layer.shape)
            )?;
        }
    }
    Ok(())
}
