//! `vulnmap attack`: the paper's attacks on images, a Table I row per image, the noise and the
//! perturbed image as PNGs.

use crate::model_args::ModelArgs;
use anyhow::{Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use vulnmap_attacks::saliency_attack::{
    clean_masks, control_masks, fixed_mask_attack, saliency_attack, Control, SaliencyAttack,
};
use vulnmap_attacks::{
    mask_attack::mask_attack, random::random_attack, AttackConfig, Goal, LearnedMask, MaskNetwork,
};
use vulnmap_data::Preprocess;
use vulnmap_models::Classifier;
use vulnmap_saliency::SmoothGrad;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// untargeted: any other label; targeted: the class --target.
    #[arg(long, default_value = "untargeted", value_parser = ["untargeted", "targeted"])]
    mode: String,
    /// The class a targeted attack aims for.
    #[arg(long, required_if_eq("mode", "targeted"))]
    target: Option<usize>,
    /// Where the noise may go: none (the random attack), saliency (SmoothGrad mask), random (the
    /// SmoothGrad mask's values shuffled: same budget), unet or free (a learned mask).
    #[arg(long, default_value = "none", value_parser = ["none", "saliency", "random", "unet", "free"])]
    mask: String,
    /// Noise strength in pixel units (default 0.02 without a mask, 0.05 with one: the paper's).
    #[arg(long)]
    alpha: Option<f64>,
    /// Generator updates at most.
    #[arg(long, default_value_t = 100)]
    max_iters: usize,
    /// Adam's learning rate for the generator.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for <image>_noise.png and <image>_perturbed.png.
    #[arg(long, default_value = "attacks")]
    out: PathBuf,
    /// Images attacked together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let model = args.model.load()?;
    if let Some(t) = args.target {
        anyhow::ensure!(
            t < model.classes().len(),
            "--target {t}: the model has {} classes",
            model.classes().len()
        );
    }
    let size = model.input_spec().height as u32;
    let preprocess = Preprocess::resize_crop(size * 256 / 224, size);
    let goal = match args.target {
        Some(t) if args.mode == "targeted" => Goal::Targeted(t),
        _ => Goal::Untargeted,
    };
    let config = AttackConfig {
        alpha: args
            .alpha
            .unwrap_or(if args.mask == "none" { 0.02 } else { 0.05 }),
        max_iters: args.max_iters,
        lr: args.lr,
        seed: args.seed,
        batch_size: args.batch_size.max(1),
        progress: true,
        ..AttackConfig::default()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "| image | alpha | origin loss | final loss | label change | iterations | confidence |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|")?;
    }
    for chunk in args.images.chunks(args.batch_size.max(1)) {
        let pixels = preprocess.load_batch(chunk, model.device())?;
        let goals = vec![goal; chunk.len()];
        let saliency = SaliencyAttack::default();
        let outcomes = match args.mask.as_str() {
            "saliency" => saliency_attack(model.as_ref(), &pixels, &goals, &saliency, &config)?,
            "random" => {
                let masks = control_masks(
                    &clean_masks(model.as_ref(), &pixels, &saliency)?,
                    Control::Permuted,
                    args.seed,
                )?;
                fixed_mask_attack(model.as_ref(), &pixels, &goals, masks, &config)?
            }
            "unet" | "free" => {
                let spec = LearnedMask {
                    network: if args.mask == "free" {
                        MaskNetwork::Free { cells: 14 }
                    } else {
                        MaskNetwork::UNet { base: 16 }
                    },
                    lr: if args.mask == "free" { 0.01 } else { 1e-3 },
                    reference: SmoothGrad {
                        seed: args.seed,
                        ..SmoothGrad::authors()
                    },
                    ..LearnedMask::default()
                };
                mask_attack(model.as_ref(), &pixels, &goals, &spec, &config)?
            }
            _ => random_attack(model.as_ref(), &pixels, &goals, &config)?,
        };
        for (path, o) in chunk.iter().zip(&outcomes) {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let noise = args.out.join(format!("{stem}_noise.png"));
            let perturbed = args.out.join(format!("{stem}_perturbed.png"));
            vulnmap_pipeline::figures::save_noise(&o.noise, o.alpha, &noise)?;
            vulnmap_pipeline::figures::save_rgb(&o.perturbed, &perturbed)?;
            if let Some(mask) = &o.mask {
                let mask_path = args.out.join(format!("{stem}_mask.png"));
                let picture = vulnmap_saliency::render::colorize(
                    &mask.to_device(&candle_core::Device::Cpu)?,
                    vulnmap_saliency::render::Colormap::Inferno,
                )?;
                vulnmap_saliency::render::save(&picture, &mask_path)?;
            }
            if args.json {
                let names = model.classes();
                let mut line = serde_json::to_value(o)?;
                if let Some(m) = line.as_object_mut() {
                    m.insert("image".into(), json!(path));
                    m.insert("name_from".into(), json!(names.name(o.label_from)));
                    m.insert("name_to".into(), json!(names.name(o.label_to)));
                    m.insert("noise_png".into(), json!(noise));
                    m.insert("perturbed_png".into(), json!(perturbed));
                }
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "| {} {}", path.display(), o.table_row())?;
            }
        }
    }
    Ok(())
}
