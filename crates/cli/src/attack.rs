//! `vulnmap attack`: the paper's attacks on images, a Table I row per image, the noise and the
//! perturbed image as PNGs.

use crate::model_args::ModelArgs;
use anyhow::{Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use vulnmap_attacks::saliency_attack::{
    clean_masks, control_masks, fixed_mask_attack, saliency_attack, Control,
};
use vulnmap_attacks::{
    mask_attack::mask_attack_averaged, random::random_attack, AttackConfig, AttackMode,
    GeneratorChoice, MaskGame, MaskNetworkKind,
};
use vulnmap_data::Preprocess;
use vulnmap_models::Classifier;
use vulnmap_pipeline::schema::{
    AttackSettings, MaskAttackStep, RandomAttackStep, SaliencyAttackStep,
};
use vulnmap_pipeline::steps::attacks;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// untargeted: any other label; targeted: the class --target.
    #[arg(long, value_enum, default_value_t)]
    mode: AttackMode,
    /// The class a targeted attack aims for.
    #[arg(long, required_if_eq("mode", "targeted"))]
    target: Option<usize>,
    /// Where the noise may go.
    #[arg(long, value_enum, default_value_t)]
    mask: MaskChoice,
    /// Noise strength in pixel units (default 0.02 without a mask, 0.05 with one: the paper's).
    #[arg(long)]
    alpha: Option<f64>,
    /// Generator updates at most (default 100, the paper's; `--mask dual`: 40).
    #[arg(long)]
    max_iters: Option<usize>,
    /// Adam's learning rate for the generator.
    #[arg(long, default_value_t = AttackSettings::default().lr)]
    lr: f64,
    /// The probability the new label must exceed to count as a success.
    #[arg(long, default_value_t = AttackSettings::default().confidence)]
    confidence: f64,
    /// Which generator makes the noise (default `auto`; `--mask dual`: `generic`).
    #[arg(long, value_enum)]
    generator: Option<GeneratorChoice>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for <image>_noise.png and <image>_perturbed.png.
    #[arg(long, default_value = "attacks")]
    out: PathBuf,
    /// Images attacked together.
    #[arg(long, default_value_t = 8, value_parser = crate::flags::batch_size)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

/// Where the noise may go: the pipeline's attack steps, with their default settings.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
enum MaskChoice {
    /// Everywhere: the random attack.
    #[default]
    None,
    /// Where SmoothGrad is: the saliency-mask attack.
    Saliency,
    /// The SmoothGrad mask's values shuffled (the same budget elsewhere).
    #[value(alias = "random")]
    Permuted,
    /// Each pixel on with the SmoothGrad mask's mean as probability.
    Bernoulli,
    /// A mask a U-Net learns (Eq. 6).
    Unet,
    /// A free low-resolution mask learned directly (the authors' code).
    Free,
    /// The dual game's free mask: the label kept where the mask is on and removed where it is
    /// off, on a blurred baseline, under area constraints (a map of every update, not a flip);
    /// the pipeline's `mask_attack: {}`, with its defaults. The row and the noise and perturbed
    /// images are the first area's attack; the mask is the mean over the areas.
    Dual,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let saliency_step = SaliencyAttackStep::default();
    // The mask choices are the pipeline's `mask_attack` step: the paper's noise game with either
    // network, or the dual game with its defaults.
    let noise_game = |network| MaskAttackStep {
        network: Some(network),
        game: MaskGame::Noise,
        ..MaskAttackStep::default()
    };
    let mask_step = match args.mask {
        MaskChoice::Unet => noise_game(MaskNetworkKind::Unet),
        MaskChoice::Free => noise_game(MaskNetworkKind::Free),
        _ => MaskAttackStep::default(),
    };
    let defaults = match args.mask {
        MaskChoice::None => RandomAttackStep::default().attack(),
        MaskChoice::Unet | MaskChoice::Free | MaskChoice::Dual => mask_step.attack(),
        _ => saliency_step.attack(),
    };
    let settings = AttackSettings {
        mode: args.mode,
        target: args.target,
        alpha: args.alpha.unwrap_or(defaults.alpha),
        max_iters: args.max_iters.unwrap_or(defaults.max_iters),
        lr: args.lr,
        confidence: args.confidence,
        generator: args.generator.unwrap_or(defaults.generator),
    };
    // The pipeline's checks, before the model is loaded.
    vulnmap_pipeline::config::check_attack(&settings, "vulnmap attack")?;
    anyhow::ensure!(
        !(args.mask == MaskChoice::Dual && args.mode == AttackMode::Targeted),
        "--mask dual maps the label the model gives: it is untargeted (drop --mode targeted)"
    );
    let goal = settings.goal()?;
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
    let config = AttackConfig {
        progress: true,
        ..attacks::config(&settings, args.seed, args.batch_size.max(1))
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
    let names = crate::output_names::output_names(&args.images);
    let batch = args.batch_size.max(1);
    for (c, chunk) in args.images.chunks(batch).enumerate() {
        let pixels = preprocess.load_batch(chunk, model.device())?;
        let goals = vec![goal; chunk.len()];
        let saliency = attacks::saliency_spec(&saliency_step, args.seed, config.batch_size);
        let control = |control| -> Result<_> {
            let clean = clean_masks(model.as_ref(), &pixels, &saliency)?;
            let masks = control_masks(&clean, control, args.seed)?;
            Ok(fixed_mask_attack(
                model.as_ref(),
                &pixels,
                &goals,
                masks,
                &config,
            )?)
        };
        let learned = || -> Result<_> {
            let (_, _, h, w) = pixels.dims4()?;
            let spec = attacks::mask_spec(&mask_step, h.max(w), args.seed, config.batch_size);
            Ok(mask_attack_averaged(
                model.as_ref(),
                &pixels,
                &goals,
                &spec,
                &mask_step.areas(),
                mask_step.seeds,
                &config,
            )?)
        };
        let outcomes = match args.mask {
            MaskChoice::None => random_attack(model.as_ref(), &pixels, &goals, &config)?,
            MaskChoice::Saliency => {
                saliency_attack(model.as_ref(), &pixels, &goals, &saliency, &config)?
            }
            MaskChoice::Permuted => control(Control::Permuted)?,
            MaskChoice::Bernoulli => control(Control::Bernoulli)?,
            MaskChoice::Unet | MaskChoice::Free | MaskChoice::Dual => learned()?,
        };
        for (i, (path, o)) in chunk.iter().zip(&outcomes).enumerate() {
            let stem = &names[c * batch + i];
            let noise = args.out.join(format!("{stem}_noise.png"));
            let perturbed = args.out.join(format!("{stem}_perturbed.png"));
            // Whole-image attacks keep their images (only local attacks' windows do not).
            let (Some(noise_image), Some(perturbed_image)) = (&o.noise, &o.perturbed) else {
                anyhow::bail!("the attack on {} kept no noise image", path.display());
            };
            vulnmap_pipeline::figures::save_noise(noise_image, o.alpha, &noise)?;
            vulnmap_pipeline::figures::save_rgb(perturbed_image, &perturbed)?;
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
