//! `vulnmap explain`: saliency maps of images as colour PNGs and overlays.

use crate::model_args::ModelArgs;
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use vulnmap_data::Preprocess;
use vulnmap_models::{Score, ScoredClassifier};
use vulnmap_pipeline::schema::MapStep;
use vulnmap_pipeline::steps::maps;
use vulnmap_saliency::render::{colorize, overlay, save, Colormap};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// The saliency method, with a pipeline's default settings (the attacks' maps come from
    /// `vulnmap eval` or a pipeline).
    #[arg(long, value_enum)]
    method: MapStep,
    /// Explain this class instead of each image's predicted one.
    #[arg(long)]
    target: Option<usize>,
    /// What to explain: centred-logit (logit minus the mean of all) is recommended for
    /// two-class models.
    #[arg(long, value_enum, default_value_t)]
    score: Score,
    /// Output folder for <image>_<method>.png and <image>_<method>_overlay.png.
    #[arg(long, default_value = "explanations")]
    out: PathBuf,
    /// Resize the shorter side to this before cropping (default 256/224 of the input size).
    #[arg(long)]
    resize: Option<u32>,
    /// Images per forward/backward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// One JSON object per image on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Explained<'a> {
    image: &'a Path,
    method: &'a str,
    target: usize,
    target_name: &'a str,
    map: PathBuf,
    overlay: PathBuf,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let model = args.model.load()?;
    let step = args.method.step();
    let method = maps::method(&step, 0, args.batch_size)?.with_context(|| {
        format!(
            "`{}` is an attack, not a saliency method: score its maps with `vulnmap eval` or run \
             it in a pipeline",
            step.kind()
        )
    })?;
    let model = ScoredClassifier::new(model, args.score);
    let size = vulnmap_models::Classifier::input_spec(&model).height as u32;
    let preprocess = Preprocess {
        resize: Some(args.resize.unwrap_or(size * 256 / 224)),
        crop: Some((size, size)),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = std::io::stdout().lock();
    for chunk in args.images.chunks(args.batch_size.max(1)) {
        let pixels = preprocess.load_batch(chunk, vulnmap_models::Classifier::device(&model))?;
        let targets = match args.target {
            Some(t) => vec![t; chunk.len()],
            None => vulnmap_saliency::predicted_classes(&model, &pixels, args.batch_size)?,
        };
        let maps = method.explain(&model, &pixels, &targets)?;
        for (i, path) in chunk.iter().enumerate() {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let map_path = args.out.join(format!("{stem}_{}.png", method.name()));
            let overlay_path = args
                .out
                .join(format!("{stem}_{}_overlay.png", method.name()));
            let map = maps.get(i)?;
            save(&colorize(&map, Colormap::Inferno)?, &map_path)?;
            save(
                &overlay(&pixels.get(i)?, &map, 0.5, Colormap::Inferno)?,
                &overlay_path,
            )?;
            let name = vulnmap_models::Classifier::classes(&model)
                .name(targets[i])
                .unwrap_or("");
            if args.json {
                let line = Explained {
                    image: path,
                    method: method.name(),
                    target: targets[i],
                    target_name: name,
                    map: map_path,
                    overlay: overlay_path,
                };
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
            } else {
                writeln!(
                    out,
                    "{}: {} for class {} ({name}) -> {}",
                    path.display(),
                    method.name(),
                    targets[i],
                    overlay_path.display()
                )?;
            }
        }
    }
    Ok(())
}
