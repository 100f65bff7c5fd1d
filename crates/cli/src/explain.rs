//! `vulnmap explain`: saliency maps of images as colour PNGs and overlays.

use crate::model_args::ModelArgs;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use vulnmap_data::npy::write_npy;
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
    /// Output folder for <image>_<method>.png and <image>_<method>_overlay.png (and, with
    /// --save-maps, the arrays).
    #[arg(long, default_value = "explanations")]
    out: PathBuf,
    /// Resize the shorter side to this before cropping (default 256/224 of the input size).
    #[arg(long, value_parser = crate::flags::resize)]
    resize: Option<u32>,
    /// Images per forward/backward pass.
    #[arg(long, default_value_t = 16, value_parser = crate::flags::batch_size)]
    batch_size: usize,
    /// Also write each map as numbers: `<image>_<method>.safetensors` (tensor `map`, H x W in
    /// [0, 1]) and `<image>_<method>.npy` (for `numpy.load`).
    #[arg(long)]
    save_maps: bool,
    /// With --save-maps, also the raw attribution before post-processing (tensor `attribution`
    /// in the safetensors file, and `<image>_<method>_raw.npy`): C x H x W, or 1 x h x w at the
    /// layer's resolution for class activation maps.
    #[arg(long, requires = "save_maps")]
    raw: bool,
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    arrays: Vec<PathBuf>,
}

/// Writes image `stem`'s map (and, with `raw`, its attribution) as safetensors and `.npy` into
/// `out`; returns the files written.
fn save_arrays(
    out: &Path,
    stem: &str,
    method: &str,
    map: &Tensor,
    attribution: Option<&Tensor>,
) -> Result<Vec<PathBuf>> {
    let map = map.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let mut tensors = HashMap::from([("map".to_string(), map.clone())]);
    let file = out.join(format!("{stem}_{method}.safetensors"));
    let npy = out.join(format!("{stem}_{method}.npy"));
    write_npy(&npy, &map.flatten_all()?.to_vec1::<f32>()?, map.dims())?;
    let mut written = vec![file.clone(), npy];
    if let Some(a) = attribution {
        let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let raw = out.join(format!("{stem}_{method}_raw.npy"));
        write_npy(&raw, &a.flatten_all()?.to_vec1::<f32>()?, a.dims())?;
        tensors.insert("attribution".to_string(), a);
        written.push(raw);
    }
    let tmp = vulnmap_data::fs::temp_path(&file);
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("writing {}", file.display()))?;
    vulnmap_data::fs::rename(&tmp, &file)?;
    Ok(written)
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
    let names = crate::output_names::output_names(&args.images);
    let batch = args.batch_size.max(1);
    for (c, chunk) in args.images.chunks(batch).enumerate() {
        let pixels = preprocess.load_batch(chunk, vulnmap_models::Classifier::device(&model))?;
        let targets = match args.target {
            Some(t) => vec![t; chunk.len()],
            None => vulnmap_saliency::predicted_classes(&model, &pixels, args.batch_size)?,
        };
        let (_, _, h, w) = pixels.dims4()?;
        let attributions = method.attribute(&model, &pixels, &targets)?;
        let maps = method.postprocess().apply(&attributions, (h, w))?;
        for (i, path) in chunk.iter().enumerate() {
            let stem = &names[c * batch + i];
            let map_path = args.out.join(format!("{stem}_{}.png", method.name()));
            let overlay_path = args
                .out
                .join(format!("{stem}_{}_overlay.png", method.name()));
            let map = maps.get(i)?;
            save(&colorize(&map, Colormap::Inferno)?, &map_path)?;
            let arrays = if args.save_maps {
                let raw = args.raw.then(|| attributions.get(i)).transpose()?;
                save_arrays(&args.out, stem, method.name(), &map, raw.as_ref())?
            } else {
                Vec::new()
            };
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
                    arrays,
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
