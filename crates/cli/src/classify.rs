//! `vulnmap classify`: the most likely classes of each image.

use crate::model_args::ModelArgs;
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use vulnmap_data::Preprocess;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5, value_parser = crate::flags::top)]
    top: usize,
    /// Resize the shorter side to this before cropping (default: 256/224 of the model's input,
    /// as torchvision's evaluation transform; the paper's code used the input size itself).
    #[arg(long, value_parser = crate::flags::resize)]
    resize: Option<u32>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16, value_parser = crate::flags::batch_size)]
    batch_size: usize,
    /// One JSON object per image on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Prediction {
    class: usize,
    name: String,
    probability: f32,
}

#[derive(Serialize)]
struct ImageResult<'a> {
    image: &'a std::path::Path,
    model: &'a str,
    top: Vec<Prediction>,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let model = args.model.load()?;
    let spec = model.input_spec();
    let size = spec.height as u32;
    let preprocess = Preprocess {
        resize: Some(args.resize.unwrap_or(size * 256 / 224)),
        crop: Some((spec.height as u32, spec.width as u32)),
    };
    let k = args.top.clamp(1, model.num_classes());
    let mut out = std::io::stdout().lock();
    for chunk in args.images.chunks(args.batch_size.max(1)) {
        let pixels = preprocess.load_batch(chunk, model.device())?;
        let logits = model.logits(&pixels).context("forward pass")?;
        let probs = candle_nn::ops::softmax(&logits, 1)?.to_vec2::<f32>()?;
        for (path, p) in chunk.iter().zip(probs) {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top: Vec<Prediction> = order[..k]
                .iter()
                .map(|&c| Prediction {
                    class: c,
                    name: model.classes().name(c).unwrap_or("").to_string(),
                    probability: p[c],
                })
                .collect();
            if args.json {
                let line = ImageResult {
                    image: path,
                    model: model.arch(),
                    top,
                };
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
            } else {
                writeln!(out, "{}", path.display())?;
                for t in &top {
                    writeln!(out, "  {:>5}  {:<40} {:.4}", t.class, t.name, t.probability)?;
                }
            }
        }
    }
    Ok(())
}
